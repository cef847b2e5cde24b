"""The pre-flight scan's speed (kd.scan), measured on one image folder: files per second and the time it would take
on ImageNet-1k (1,281,167 training + 50,000 validation files) at that rate.

    python -m tools.bench --scan --folder /tmp/kd_scan100k --make 100000 --evict   # 100,000 32x32 JPEGs, written once
    python -m tools.bench --scan --folder /tmp/kd_scan500 --make 10000 --size 500x375 --evict  # ImageNet-sized, 110 KB
    python -m tools.bench --scan --folder ../shared/data/cifar10   # an existing root/{train,test}/<class>/

--make N writes N JPEGs of --size (32x32 by default; a noisy gradient, quality 90: 110 KB at 500x375, ImageNet's
typical size and file size; 90% under train/, 10% under test/, 10 classes) into --folder once, when it holds none
yet. A file larger than kd.scan.HEAD_BYTES costs the scan a second read (its last bytes). The folder is listed as
kd.data.image_folder lists it (timed apart), then scanned once per --threads count. Warm: the files' pages are in
the page cache (a second scan of the same data). --evict also times cold scans: before each, every file's cached
pages are written back and dropped (fdatasync, posix_fadvise DONTNEED: the files' own pages only; the file system's
inode cache stays warm), so each header is read from the disk. Use --evict on a folder of your own only: it slows
other readers of the same files until they are cached again.
"""
import argparse
import io
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from kd import data, scan

IMAGENET_FILES = 1_281_167 + 50_000


def make_folder(folder: Path, count: int, size: tuple[int, int] = (32, 32)) -> None:
    """Write count JPEGs of size (width, height) as folder/{train,test}/class<k>/<i>.jpg, from 64 encodings."""
    rng = np.random.default_rng(0)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    gradient = np.stack([x * 255 / width, y * 255 / height, np.full((height, width), 80.0)], axis=-1)
    encodings = []
    for _ in range(64):
        buffer = io.BytesIO()
        pixels = np.clip(gradient + rng.normal(0, 30, gradient.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        encodings.append(buffer.getvalue())
    for i in range(count):
        part = "test" if i % 10 == 9 else "train"
        path = folder / part / f"class{i // 10 % 10}" / f"{i:07d}.jpg"
        if i < 100:
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encodings[i % len(encodings)])


def evict(root: Path, names: Sequence[str]) -> None:
    """Drop the files' pages from the page cache, so that the next scan reads them from the disk."""
    for name in names:
        fd = os.open(root / name, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # pages not yet written back (a folder just made) are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_scan(root: Path, names: Sequence[str], threads: int, cold: bool) -> dict[str, float]:
    """One scan's time, files per second, and the ImageNet time at that rate; it must find no bad file."""
    if cold:
        evict(root, names)
    started = time.perf_counter()
    problems = scan.scan_images(root, names, threads)
    seconds = time.perf_counter() - started
    if problems:
        raise SystemExit(scan.scan_report(root, problems, len(names)))
    return {"threads": threads, "cold": cold, "seconds": seconds, "files_per_s": len(names) / seconds,
            "imagenet_s": IMAGENET_FILES * seconds / len(names)}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Write the folder if asked, list it, scan it once per thread count; print and return the figures."""
    parser = argparse.ArgumentParser(prog="python -m tools.bench --scan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, required=True, help="root/{train,test}/<class>/<images>")
    parser.add_argument("--make", type=int, help="write this many JPEGs into --folder first (once)")
    parser.add_argument("--size", default="32", help="--make's JPEG size: 32 or WIDTHxHEIGHT (500x375)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4, scan.THREADS, 64])
    parser.add_argument("--evict", action="store_true", help="also time cold scans (drops the files' cached pages)")
    args = parser.parse_args(argv)
    if args.make and not (args.folder / "train").is_dir():
        started = time.perf_counter()
        width, _, height = args.size.partition("x")
        make_folder(args.folder, args.make, (int(width), int(height or width)))
        print(f"wrote {args.make:,} JPEGs into {args.folder} in {time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    listing, _ = data.scan_folder(args.folder, ("train", "test"), None)
    names = [name for part in listing.values() for name in part[0]]
    listed = time.perf_counter() - started
    print(f"{args.folder}: {len(names):,} files listed in {listed:.2f} s")
    rows = [timed_scan(args.folder, names, threads, cold) for cold in ([False, True] if args.evict else [False])
            for threads in args.threads]
    print(f"{'threads':>7s} {'cache':>5s} {'seconds':>8s} {'files/s':>9s} {'ImageNet (1.33 M files)':>24s}")
    for row in rows:
        print(f"{row['threads']:7d} {'cold' if row['cold'] else 'warm':>5s} {row['seconds']:8.2f} "
              f"{row['files_per_s']:9,.0f} {row['imagenet_s']:22.0f} s")
    return {"files": len(names), "listing_s": listed, "scans": rows}


if __name__ == "__main__":
    main()
