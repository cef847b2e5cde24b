"""Decode speed, measured: JPEG decoders for the streaming path's training views, and the whole loader against
torchvision's standard ImageFolder pipeline, on one folder in one run.

    python -m tools.bench --data --folder /tmp/kd_jpeg --make-from ../shared/data/cifar10 --per-class 200 --size 224
    python -m tools.bench --data --folder /tmp/kd_jpeg --workers 2

--make-from writes the folder once (root/train/<class>/*.jpg: the first --per-class training images of each class of
an image folder, resized to --size, quality 90); it is never needed again. Printed:

1. Decoders, in this process on one thread: training views per CPU-second (decode + RandomResizedCrop box + resize
   to --crop + flip, uint8) and decodes alone per CPU-second, for each candidate: Pillow, Pillow with draft()
   (reduced-size decoding), torchvision.io.decode_jpeg on the CPU, simplejpeg with Pillow's resize, and simplejpeg
   with torch's uint8 resize (kd.streaming's choice). nvJPEG (batched torchvision.io.decode_jpeg on CUDA) only where
   CUDA is present.
2. Loaders over the folder's training images, --workers DataLoader workers each, batches of --batch-size: (a)
   torchvision.datasets.ImageFolder + PIL + transforms (RandomResizedCrop, RandomHorizontalFlip, ToTensor,
   Normalize), (b) kd.streaming.StreamingData.epoch (uint8 views, normalised later on the device), and (b) with the
   normalisation done on the CPU too. Per loader: images per second of wall time, and images per CPU-second (this
   process and its exited workers, from getrusage): the per-core rate, which other load on shared cores does not
   change much. --repeats runs every measurement that many times, in turn, and keeps each one's best.
"""
import argparse
import io
import math
import resource
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from kd import data, streaming

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# torchvision 0.29 deprecates its image decoders (for TorchCodec's): still a candidate here, without the warning.
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)


def make_folder(source: Path, folder: Path, per_class: int, size: tuple[int, int]) -> int:
    """Write folder/train/<class>/*.jpg once: the first per_class images of each class of source/train, resized
    (bicubic)
    to size (width, height), JPEG quality 90. Returns the number of images (existing ones are kept)."""
    count = 0
    for class_dir in sorted(p for p in (source / "train").iterdir() if p.is_dir()):
        out = folder / "train" / class_dir.name
        out.mkdir(parents=True, exist_ok=True)
        for file in sorted(f for f in class_dir.iterdir() if f.suffix.lower() in data.IMAGE_SUFFIXES)[:per_class]:
            target = out / f"{file.stem}.jpg"
            if not target.exists():
                with Image.open(file) as image:
                    image.convert("RGB").resize(size, Image.BICUBIC).save(target, quality=90)
            count += 1
    return count


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have exited (DataLoader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# ---------------------------------------------------------------------------------------------------------------
# 1. decoders: one training view each (the same boxes and flips for all)


def pil_view(path: Path, size: int, draw: Callable, draft: bool = False) -> np.ndarray:
    """Pillow: decode, crop and resize in one call (what torchvision's transforms do on a PIL image), flip."""
    with Image.open(path) as image:
        width, height = image.size
        top, left, h, w = draw(height, width)
        box = (left, top, left + w, top + h)
        if draft:  # reduced-size (DCT-scaled) decoding, the box kept at >= size pixels a side
            image.draft("RGB", (math.ceil(width * size / w), math.ceil(height * size / h)))
            scale = image.size[0] / width
            box = tuple(v * scale for v in box)
        view = image.convert("RGB").resize((size, size), Image.BILINEAR, box=box)
    return np.asarray(view.transpose(Image.FLIP_LEFT_RIGHT))


def torchvision_view(path: Path, size: int, draw: Callable) -> np.ndarray:
    """torchvision.io.decode_jpeg on the CPU, torch's uint8 resize, flip."""
    image = torchvision.io.decode_jpeg(torchvision.io.read_file(str(path)), mode=torchvision.io.ImageReadMode.RGB)
    top, left, h, w = draw(*image.shape[1:])
    crop = image[None, :, top:top + h, left:left + w]
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0].flip(2).permute(1, 2, 0).numpy()


def simplejpeg_pil_view(path: Path, size: int, draw: Callable) -> np.ndarray:
    """simplejpeg (full size), Pillow's resize, flip."""
    pixels = simplejpeg.decode_jpeg(path.read_bytes())
    top, left, h, w = draw(*pixels.shape[:2])
    view = Image.fromarray(pixels).resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    return np.asarray(view.transpose(Image.FLIP_LEFT_RIGHT))


def streaming_view(path: Path, size: int, draw: Callable) -> np.ndarray:
    """kd.streaming's: simplejpeg with DCT scaling, torch's uint8 resize, flip."""
    return streaming.load_region(path, size, draw).flip(1).numpy()


DECODES = {
    "Pillow": lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB")),
    "torchvision": lambda b: torchvision.io.decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8)),
    "simplejpeg": lambda b: simplejpeg.decode_jpeg(b),
}
# candidate: (training view, the decoder it uses at full size: its decodes alone are timed too)
VIEWS = {
    "Pillow (decode + resize(box))": (pil_view, "Pillow"),
    "Pillow + draft() (reduced-size decode)": (lambda p, s, d: pil_view(p, s, d, draft=True), None),
    "torchvision.io.decode_jpeg (CPU) + torch resize": (torchvision_view, "torchvision"),
    "simplejpeg + Pillow resize": (simplejpeg_pil_view, "simplejpeg"),
    "simplejpeg + torch uint8 resize (kd.streaming)": (streaming_view, "simplejpeg"),
}


def decoder_rates(files: list[Path], size: int, repeats: int) -> list[tuple[str, float, Optional[float]]]:
    """(candidate, training views per CPU-second, decodes alone per CPU-second) on one thread, each the best of
    `repeats` passes taken in turn (the files' bytes are in the page cache from the first read on)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    contents = [f.read_bytes() for f in files]
    best: dict[str, tuple[float, float]] = {}
    try:
        for _ in range(repeats):
            for name, (view, decoder) in VIEWS.items():
                started = time.process_time()
                for i, file in enumerate(files):
                    rng = streaming.view_generator(0, 1, i)
                    box = lambda h, w, rng=rng: streaming.resized_crop_box(h, w, rng, (0.08, 1.0), (3 / 4, 4 / 3))  # noqa: E731
                    view(file, size, box)
                rate = len(files) / (time.process_time() - started)
                decode = _rate(DECODES[decoder], contents) if decoder else 0.0
                previous = best.get(name, (0.0, 0.0))
                best[name] = (max(previous[0], rate), max(previous[1], decode))
    finally:
        torch.set_num_threads(threads)
    return [(name, rate, decode or None) for name, (rate, decode) in best.items()]


def _rate(decode: Callable, contents: list[bytes]) -> float:
    started = time.process_time()
    for content in contents:
        decode(content)
    return len(contents) / (time.process_time() - started)


def nvjpeg_rate(files: list[Path], batch_size: int) -> Optional[float]:
    """Batched nvJPEG decodes per second of wall time (torchvision.io.decode_jpeg on CUDA); None without CUDA.
    Not run on the CPU machines this repository is tested on."""
    if not torch.cuda.is_available():
        return None
    contents = [torchvision.io.read_file(str(f)) for f in files]
    torchvision.io.decode_jpeg(contents[:batch_size], device="cuda")  # warm-up: nvJPEG's handles
    torch.cuda.synchronize()
    started = time.perf_counter()
    for start in range(0, len(contents), batch_size):
        torchvision.io.decode_jpeg(contents[start:start + batch_size], device="cuda")
    torch.cuda.synchronize()
    return len(contents) / (time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------------------------
# 2. loaders


def reference_loader(root: Path, size: int, workers: int, batch_size: int) -> DataLoader:
    """(a) torchvision's standard ImageNet training pipeline: ImageFolder + PIL + transforms, float tensors."""
    recipe = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    dataset = datasets.ImageFolder(str(root / "train"), transform=recipe)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                      generator=torch.Generator().manual_seed(0))


def streaming_data(root: Path, size: int, workers: int) -> streaming.StreamingData:
    """(b) this repository's streaming path over the same files (the folder's train part, evaluated on itself)."""
    names, classes = data.scan_folder(root, ("train", "train"), None)
    files = data.file_split(root, *names["train"])
    source = data.FileSplits(files, files, classes, size, "resized_crop", workers)
    stats = [torch.tensor(v).view(1, -1, 1, 1) for v in (MEAN, STD)]
    return streaming.StreamingData.from_files(source, files, None, *stats, (0, True))


def timed(batches) -> tuple[int, float, float]:
    """(images, wall seconds, CPU-seconds) to go through an iterable of batches (first element: the images)."""
    wall, cpu, count = time.perf_counter(), cpu_seconds(), 0
    for batch in batches:
        count += len(batch[0] if isinstance(batch, (list, tuple)) else batch.views)
    return count, time.perf_counter() - wall, cpu_seconds() - cpu


def loader_rates(root: Path, size: int, workers: int, batch_size: int, repeats: int) -> dict[str, dict[str, float]]:
    """Each loader's best (over repeats, run alternately) images per wall second and per CPU-second."""
    path = streaming_data(root, size, workers)
    runs = {
        "(a) torchvision ImageFolder + PIL + transforms": lambda: reference_loader(root, size, workers, batch_size),
        "(b) kd.streaming (uint8 views)": lambda: path.epoch(0, 1, batch_size),
        "(b) kd.streaming + normalise on the CPU":
            lambda: ((path.inputs(b.views),) for b in path.epoch(0, 2, batch_size)),
    }
    best: dict[str, dict[str, float]] = {}
    for _ in range(repeats):
        for name, batches in runs.items():
            count, wall, cpu = timed(batches())
            rates = {"images": count, "per_s": count / wall, "per_cpu_s": count / cpu}
            if name not in best or rates["per_cpu_s"] > best[name]["per_cpu_s"]:
                best[name] = rates
    return best


# ---------------------------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Measure and print both tables; return them (tools.bench --data calls this)."""
    parser = argparse.ArgumentParser(prog="python -m tools.bench --data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, required=True, help="root/train/<class>/*.jpg")
    parser.add_argument("--make-from", type=Path, help="an image folder to write --folder from, once")
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--size", default="224", help="the written JPEGs' size: 224 or WIDTHxHEIGHT (500x375)")
    parser.add_argument("--crop", type=int, default=224, help="the training views' size")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--decoder-images", type=int, default=500, help="images for the decoder table")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.make_from is not None:
        width, _, height = args.size.partition("x")
        count = make_folder(args.make_from, args.folder, args.per_class, (int(width), int(height or width)))
        print(f"{args.folder}: {count} JPEGs")
    files = sorted((args.folder / "train").glob("*/*.jpg"))
    if not files:
        raise SystemExit(f"{args.folder}/train/<class>/ holds no .jpg files: write them with --make-from.")
    step = max(1, len(files) // args.decoder_images)
    decoders = decoder_rates(files[::step][:args.decoder_images], args.crop, args.repeats)
    print(f"\n1. decoders: {args.crop}-px training views (RandomResizedCrop + flip, uint8), one thread, "
          f"{min(len(files), args.decoder_images)} images, best of {args.repeats}")
    print(f"{'candidate':52s} {'views/CPU-s':>12s} {'decodes/CPU-s':>14s}")
    for name, rate, decode in decoders:
        print(f"{name:52s} {rate:12.0f} {'-' if decode is None else f'{decode:.0f}':>14s}")
    nvjpeg = nvjpeg_rate(files, args.batch_size)
    print(f"{'nvJPEG (batched decode_jpeg on CUDA)':52s} {'':12s} "
          f"{'no CUDA here' if nvjpeg is None else f'{nvjpeg:.0f} /wall-s':>14s}")
    loaders = loader_rates(args.folder, args.crop, args.workers, args.batch_size, args.repeats)
    print(f"\n2. loaders: {len(files)} images, {args.workers} workers, batches of {args.batch_size}, best of "
          f"{args.repeats}")
    print(f"{'loader':52s} {'images/s':>10s} {'images/CPU-s':>13s}")
    for name, rates in loaders.items():
        print(f"{name:52s} {rates['per_s']:10.0f} {rates['per_cpu_s']:13.0f}")
    reference, ours = (loaders[name] for name in list(loaders)[:2])
    ratio = {"per_cpu_s": ours["per_cpu_s"] / reference["per_cpu_s"], "per_s": ours["per_s"] / reference["per_s"]}
    print(f"\n(b) / (a): {ratio['per_cpu_s']:.2f}x per CPU-second, {ratio['per_s']:.2f}x per wall second")
    return {"decoders": decoders, "nvjpeg": nvjpeg, "loaders": loaders, "ratio": ratio}


if __name__ == "__main__":
    main()
