"""The pre-flight scan of an image dataset's files: every listed file is opened, stat'ed and its header read (JPEG's
markers up to the frame header, PNG's IHDR, the magic of GIF, BMP, WebP and TIFF) and its last bytes checked for
the format's end marker, in a thread pool, without decoding it. Every problem is listed in one error, by path,
before any run folder is written or any image decoded (on ImageNet, a bad file met while streaming is hours in).

A file whose end marker is missing (a JPEG cut short by a copy or a download) is decoded by Pillow, the decoder of
last resort on both data paths, and listed only when that fails: a decodable file is never refused. A file whose
header is intact but whose image data is damaged in the middle can pass; the decode during training then names it
(kd.data.UnreadableImage). `python -m tools.bench --scan` measures the scan's speed (tools/bench_scan.py).
"""
import functools
import logging
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence

from PIL import Image

log = logging.getLogger(__name__)

HEAD_BYTES = 4096  # a page: what one read costs anyway; a JPEG's frame header is almost always inside it
TAIL_BYTES = 256  # where the end marker is looked for (writers may pad after it)
THREADS = 16  # opens and reads release the GIL: cold reads overlap (2-3x faster than 1 thread here: kd/bench_scan.py)
CHUNK = 1024  # files per task: a future per file of ImageNet would cost more than the scan
LISTED = 50  # bad files named in the error; the count covers the rest
# JPEG frame headers (SOF0-SOF15 less DHT C4, JPG C8, DAC CC): precision, height, width follow the length.
JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM, RST0-7: markers without a length
FORMATS = "JPEG, PNG, GIF, BMP, WebP or TIFF"


class BadFile(Exception):
    """What is wrong with one file (the message completes "<path>: ")."""


def check_images(root: Path, names: Sequence[str], threads: int = THREADS) -> None:
    """Refuse the dataset when any of the files (paths relative to root) is not a readable image, naming them all."""
    started = time.perf_counter()
    problems = scan_images(root, names, threads)
    log.info("scanned %s image files under %s in %.1f s (dataset.source.scan=false skips this)",
             f"{len(names):,}", root, time.perf_counter() - started)
    if problems:
        raise ValueError(scan_report(root, problems, len(names)))


def scan_images(root: Path, names: Sequence[str], threads: int = THREADS) -> list[tuple[str, str]]:
    """(name, problem) for each listed file that is not a readable image, in listing order."""
    scan_chunk = functools.partial(_scan_chunk, str(root))
    chunks = (names[start:start + CHUNK] for start in range(0, len(names), CHUNK))
    with ThreadPoolExecutor(threads) as pool:
        return [problem for found in pool.map(scan_chunk, chunks) for problem in found]


def _scan_chunk(root: str, names: Sequence[str]) -> list[tuple[str, str]]:
    found = []
    for name in names:
        problem = file_problem(os.path.join(root, name))
        if problem is not None:
            found.append((name, problem))
    return found


def scan_report(root: Path, problems: list[tuple[str, str]], count: int) -> str:
    """The error listing the first LISTED bad files by path, the count of the rest, and the ways out."""
    lines = [f"  {root / name}: {problem}" for name, problem in problems[:LISTED]]
    if len(problems) > LISTED:
        lines.append(f"  ... and {len(problems) - LISTED:,} more")
    return (f"{len(problems):,} of the {count:,} image files under {root} cannot be read as images (found by the "
            "pre-flight scan, before any work):\n" + "\n".join(lines) + "\nDelete or replace them, then run again; "
            "or set dataset.source.scan=false to skip the scan (a bad file then stops the run when it is decoded).")


def file_problem(path: str) -> Optional[str]:
    """What keeps the file at path from being read as an image, or None: it is missing, a broken link, not a
    regular file, empty, unreadable, not an image, or truncated."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # non-blocking: a pipe named .jpg must not hang the scan
    except OSError as error:
        if os.path.islink(path):
            return f"a broken symbolic link (to {os.readlink(path)}, which does not exist)"
        return f"cannot be opened ({error.strerror})"
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            return "a folder, not an image file"
        if not stat.S_ISREG(info.st_mode):
            return "not a regular file (a pipe, socket or device)"
        if info.st_size == 0:
            return "empty (0 bytes)"
        complete = _check_header(_reader(fd, info.st_size), info.st_size)
        return None if complete else _decode_problem(path)
    except BadFile as problem:
        return str(problem)
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    finally:
        os.close(fd)


def _reader(fd: int, size: int) -> Callable[[int, int], bytes]:
    """read(offset, n): the file's bytes there (fewer at its end), from a window of HEAD_BYTES read at a time."""
    window = [0, os.pread(fd, HEAD_BYTES, 0)]

    def read(offset: int, n: int) -> bytes:
        start, content = window
        end = start + len(content)
        if not (start <= offset and (offset + n <= end or end >= size)):
            window[:] = [offset, os.pread(fd, max(n, HEAD_BYTES), offset)]
            start, content = window
        return content[offset - start:offset - start + n]

    return read


def _check_header(read: Callable[[int, int], bytes], size: int) -> bool:
    """Raise BadFile for a file that is no image of a known format or has a broken header; return whether its end
    looks complete (False: it may be truncated, and only a decode can tell)."""
    head = read(0, 32)
    if head[:3] == b"\xff\xd8\xff":
        _jpeg_size(read)
        return b"\xff\xd9" in _tail(read, size)  # EOI: never inside the entropy-coded data (FF is stuffed there)
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        _png_size(head)
        return b"IEND" in _tail(read, size)
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return _tail(read, size).rstrip(b"\x00").endswith(b";")  # the trailer
    if head[:2] == b"BM":
        return int.from_bytes(head[2:6], "little") <= size  # the size it declares is there
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return int.from_bytes(head[4:8], "little") + 8 <= size
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return True
    raise BadFile(f"not an image: it starts with {head[:16]!r}, no {FORMATS} header")


def _tail(read: Callable[[int, int], bytes], size: int) -> bytes:
    return read(max(0, size - TAIL_BYTES), TAIL_BYTES)


def _png_size(head: bytes) -> tuple[int, int]:
    """A PNG's (height, width) from its IHDR chunk, the first one."""
    if head[12:16] != b"IHDR" or len(head) < 24:
        raise BadFile("a PNG without its IHDR header: truncated or corrupt")
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if width == 0 or height == 0:
        raise BadFile(f"a PNG whose header gives {width}x{height} pixels")
    return height, width


def _jpeg_size(read: Callable[[int, int], bytes]) -> tuple[int, int]:
    """A JPEG's (height, width) from its frame header, found by walking the markers from the start of the file."""
    offset = 2
    while True:
        segment = read(offset, 9)  # marker (2), length (2), then a frame header's precision (1), height, width
        if len(segment) < 4 or (segment[1] in JPEG_FRAMES and len(segment) < 9):
            raise BadFile("a JPEG cut short in its header: truncated")
        if segment[0] != 0xFF:
            raise BadFile(f"a JPEG whose header is corrupt (no marker at byte {offset})")
        marker = segment[1]
        if marker == 0xFF or marker in JPEG_STANDALONE:  # a fill byte, or a marker without a length
            offset += 1 if marker == 0xFF else 2
            continue
        if marker in (0xD9, 0xDA):
            raise BadFile("a JPEG without a frame header before its image data: corrupt")
        if marker in JPEG_FRAMES:
            height, width = int.from_bytes(segment[5:7], "big"), int.from_bytes(segment[7:9], "big")
            if height == 0 or width == 0:
                raise BadFile(f"a JPEG whose frame header gives {width}x{height} pixels")
            return height, width
        length = int.from_bytes(segment[2:4], "big")
        if length < 2:
            raise BadFile(f"a JPEG whose header is corrupt (a segment of length {length} at byte {offset})")
        offset += 2 + length


def _decode_problem(path: str) -> Optional[str]:
    """Decode a file whose end looked incomplete with Pillow (both data paths' decoder of last resort): None when it
    decodes, else why not."""
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        return f"truncated or corrupt: it does not decode ({type(error).__name__}: {error})"
    return None
