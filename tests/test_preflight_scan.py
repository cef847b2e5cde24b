"""The pre-flight scan (kd.scan) and the bad-folder cases around it: every bad file of every split is named in one
error before any run folder is written, a file that passes the scan but does not decode is named in one line by
the worker that meets it, non-UTF-8 names and a per-class limit below 1 are refused; each leaves the data as it was.
"""
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd import data, engine, scan, streaming
from support import tree_state
from support.folders import SHARED_CIFAR10
from support.images import write_imagenet, write_tiny_imagenet
from support.runs import PLAIN, compose_cfg
from tools import bench

CLASSES = ("ant", "bee")


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (24, 20), **save) -> bytes:
    """A JPEG of random pixels (width, height), encoded by Pillow with the save options given."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", **save)
    return buffer.getvalue()


def write_folder(root: Path, per_class: int = 3) -> Path:
    """root/{train,test}/{ant,bee}/<i>.jpg: 16x16 JPEGs."""
    for part in ("train", "test"):
        for label, name in enumerate(CLASSES):
            (root / part / name).mkdir(parents=True)
            for i in range(per_class):
                (root / part / name / f"{i}.jpg").write_bytes(jpeg_bytes(10 * label + i, (16, 16)))
    return root


def marker_offset(content: bytes, marker: int) -> int:
    """Where a JPEG's first segment with this marker starts (walking the segments from the start)."""
    offset = 2
    while content[offset + 1] != marker:
        offset += 2 + int.from_bytes(content[offset + 2:offset + 4], "big")
    return offset


def damaged_past_its_header() -> bytes:
    """A JPEG whose frame header and end marker are intact but whose scan header is garbage: it passes the scan
    and no decoder reads it."""
    content = jpeg_bytes(3, (16, 16))
    sos = marker_offset(content, 0xDA)
    return content[:sos + 4] + b"\x55" * 10 + content[sos + 14:]


# ---------------------------------------------------------------------------------------------------------------
# one error listing every bad file, before any work


def test_five_bad_files_of_both_splits_are_listed_in_one_error_before_the_run_folder_is_written(tmp_path):
    root = write_folder(tmp_path / "images")
    bad = {
        root / "train" / "ant" / "cut.jpg": (jpeg_bytes()[:100], "a JPEG cut short in its header: truncated"),
        root / "train" / "ant" / "zero.jpg": (b"", r"empty \(0 bytes\)"),
        root / "train" / "bee" / "notes.JPEG": (b"hello, I am text", r"not an image: it starts with b'hello, I am t"),
        root / "train" / "bee" / "gone.jpg": (None, r"a broken symbolic link \(to .*nowhere.jpg, which does not"),
        root / "test" / "bee" / "zero.jpg": (b"", r"empty \(0 bytes\)"),  # found only after an epoch, before the scan
    }
    for path, (content, _) in bad.items():
        path.symlink_to(tmp_path / "nowhere.jpg") if content is None else path.write_bytes(content)
    before = tree_state(root)
    cfg = compose_cfg(tmp_path, *PLAIN, "dataset=imagefolder", "dataset.num_classes=2", f"dataset.source.root={root}",
                      "dataset.source.path=stream", "dataset.source.num_workers=0", "dataset.source.cache_dir=null")
    with pytest.raises(ValueError) as error:
        engine.run(cfg, tmp_path / "run")
    message = str(error.value)
    assert message.startswith(f"5 of the 17 image files under {root} cannot be read as images"), message
    for path, (_, problem) in bad.items():
        assert re.search(f"\n  {re.escape(str(path))}: {problem}.*\n", message), (path, message)
    assert message.endswith("Delete or replace them, then run again; or set dataset.source.scan=false to skip the "
                            "scan (a bad file then stops the run when it is decoded).")
    assert {p.name for p in (tmp_path / "run").iterdir()} == {".lock"}  # no run.json, no train.log
    assert tree_state(root) == before


BAD_FILES = {  # name: (content or how to make it, the problem listed)
    "empty": (b"", r"empty \(0 bytes\)"),
    "text-named-jpeg": (b"<!DOCTYPE html><html>", r"not an image: it starts with b'<!DOCTYPE html><', no JPEG, PNG"),
    "header-cut": (jpeg_bytes()[:150], r"a JPEG cut short in its header: truncated"),
    "data-cut": (jpeg_bytes(size=(64, 64))[:1500], r"truncated or corrupt: it does not decode \(OSError: image file"),
    "no-frame-header": (b"\xff\xd8\xff\xda\x00\x02" + b"\x00" * 40 + b"\xff\xd9",
                        r"a JPEG without a frame header before its image data: corrupt"),
    "zero-width-jpeg": ("zero-width", r"a JPEG whose frame header gives 0x16 pixels"),
    "png-cut": ("png-cut", r"truncated or corrupt: it does not decode"),
    "png-without-ihdr": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, r"a PNG without its IHDR header: truncated or corrupt"),
    "broken-link": ("link", r"a broken symbolic link \(to .*missing.jpg, which does not exist\)"),
    "folder": ("folder", r"a folder, not an image file"),
    "pipe": ("pipe", r"not a regular file \(a pipe, socket or device\)"),  # opened without blocking
}


def plant(path: Path, how) -> None:
    if isinstance(how, bytes):
        path.write_bytes(how)
    elif how == "zero-width":
        content = jpeg_bytes(size=(16, 16))
        sof = marker_offset(content, 0xC0)
        path.write_bytes(content[:sof + 7] + b"\x00\x00" + content[sof + 9:])
    elif how == "png-cut":
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
        path.write_bytes(buffer.getvalue()[:2000])
    elif how == "link":
        path.symlink_to(path.parent / "missing.jpg")
    elif how == "folder":
        path.mkdir()
    elif how == "pipe":
        os.mkfifo(path)


@pytest.mark.parametrize("case", BAD_FILES)
def test_each_kind_of_bad_file_is_named_with_what_is_wrong(case, tmp_path):
    root = write_folder(tmp_path / "images")
    how, problem = BAD_FILES[case]
    bad = root / "test" / "bee" / ("bad.png" if case.startswith("png") else "bad.jpg")
    plant(bad, how)
    before = tree_state(tmp_path)
    with pytest.raises(ValueError, match=rf"^1 of the 13 image files .*\n  {re.escape(str(bad))}: {problem}"):
        data.image_folder(str(root), 16, path="stream")
    assert tree_state(tmp_path) == before


def test_decodable_files_of_every_kind_pass_the_scan(tmp_path):
    root = write_imagenet(tmp_path / "imagenet", per_class={"train": 2, "val": 1})  # with a CMYK JPEG, a PNG as .JPEG
    odd = root / "train" / "ant"
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    for name, save in {"progressive.JPEG": {"progressive": True}, "exif.JPEG": {"exif": os.urandom(60_000)},
                       "icc.JPEG": {"icc_profile": os.urandom(70_000)}}.items():
        image.save(odd / name, "JPEG", **save)  # the EXIF and ICC segments push the frame header past 4 KiB
    (odd / "padded.JPEG").write_bytes(jpeg_bytes() + b"\x00" * 1000)  # bytes after the end marker: still decodes
    for suffix in ("bmp", "gif", "webp", "tif", "png"):
        image.save(odd / f"other.{suffix}")
    names = [str(p.relative_to(root)) for p in sorted(root.rglob("*.*")) if p.suffix.lower() in data.IMAGE_SUFFIXES]
    assert len(names) == 3 * 3 + 3 + 4 + 5
    assert marker_offset((odd / "icc.JPEG").read_bytes(), 0xC0) > scan.HEAD_BYTES
    assert scan.scan_images(root, names) == []
    assert len(data.imagenet(str(root)).train) == 3 * 2 + 3 + 4 + 5


def test_a_hundred_bad_files_are_counted_and_the_first_fifty_named(tmp_path):
    root = write_imagenet(tmp_path / "imagenet", per_class={"train": 2, "val": 1})
    for i in range(100):
        (root / "train" / "cat" / f"empty_{i:03d}.JPEG").write_bytes(b"")
    before = tree_state(tmp_path)
    with pytest.raises(ValueError) as error:
        data.imagenet(str(root))
    lines = str(error.value).splitlines()
    assert lines[0].startswith(f"100 of the 112 image files under {root} cannot be read as images")
    assert lines[1:51] == [f"  {root / 'train' / 'cat' / f'empty_{i:03d}.JPEG'}: empty (0 bytes)" for i in range(50)]
    assert lines[51] == "  ... and 50 more"
    assert tree_state(tmp_path) == before


def test_tiny_imagenet_and_the_in_memory_path_are_scanned_before_any_decode(tmp_path, monkeypatch):
    tiny = write_tiny_imagenet(tmp_path / "tiny")
    (tiny / "val" / "images" / "val_3.JPEG").write_bytes(b"")
    folder = write_folder(tmp_path / "images")
    (folder / "train" / "ant" / "zero.jpg").write_bytes(b"")
    before = tree_state(tmp_path)
    monkeypatch.setattr(data, "read_image", lambda *a: pytest.fail("decoded before the scan"))
    with pytest.raises(ValueError, match=rf"^1 of the 15 .*\n  {re.escape(str(tiny))}/val/images/val_3.JPEG: empty"):
        data.tiny_imagenet(str(tiny), cache_dir=None)
    with pytest.raises(ValueError, match=rf"^1 of the 13 .*\n  {re.escape(str(folder))}/train/ant/zero.jpg: empty"):
        data.image_folder(str(folder), 16, path="memory", cache_dir=str(tmp_path / "cache"))
    assert tree_state(tmp_path) == before


def test_scan_false_skips_the_scan(tmp_path):
    root = write_folder(tmp_path / "images")
    (root / "train" / "ant" / "zero.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="zero.jpg: empty"):
        data.image_folder(str(root), 16, path="stream")
    files = data.image_folder(str(root), 16, path="stream", scan=False)
    assert b"train/ant/zero.jpg" in files.train.paths.tolist()
    for name in ("imagefolder", "imagenet", "tiny_imagenet"):
        assert compose_cfg(tmp_path, f"dataset={name}").dataset.source.scan is True


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason=f"{SHARED_CIFAR10} is not present")
def test_the_shared_cifar10_folder_scans_clean():
    names, _ = data.scan_folder(SHARED_CIFAR10, ("train", "test"), None)
    listed = names["train"][0] + names["test"][0]
    assert len(listed) == 60_000 and scan.scan_images(SHARED_CIFAR10, listed) == []


# ---------------------------------------------------------------------------------------------------------------
# what passes the scan and still does not decode: one line, naming the file


def test_a_file_damaged_past_its_header_is_named_in_one_line_not_a_worker_traceback(tmp_path):
    root = write_imagenet(tmp_path / "imagenet", per_class={"train": 2, "val": 2})
    bad = root / "val" / "bee" / "bee_01.JPEG"
    bad.write_bytes(damaged_past_its_header())
    source = data.imagenet(str(root), image_size=16, num_workers=2)  # the scan passes it: its header is intact
    before = tree_state(tmp_path)
    stats = [torch.full((1, 3, 1, 1), v) for v in (0.5, 0.25)]
    path = streaming.StreamingData.from_files(source, source.train, None, *stats, (0, True))
    assert len(list(path.epoch(0, 1, 4))) == 3  # training never meets it
    with pytest.raises(data.UnreadableImage) as error:
        list(path.evaluation("test", 2))
    message = str(error.value)
    assert message.startswith(f"{bad} cannot be decoded as an image (") and "\n" not in message, message
    assert "DataLoader worker" not in message and "Traceback" not in message
    assert message.endswith("it is truncated, corrupt or missing. Replace or delete it, then run again.")
    assert error.value.__cause__ is None and error.value.__suppress_context__
    assert tree_state(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------
# names that are not UTF-8, and max_per_class


@pytest.mark.parametrize("where", ["file", "class folder"])
def test_a_name_that_is_not_utf8_is_refused_naming_the_folder_and_its_bytes(where, tmp_path):
    root = write_folder(tmp_path / "images")
    raw = b"caf\xe9.jpg" if where == "file" else b"caf\xe9"
    folder = root / "train" / "ant" if where == "file" else root / "train"
    target = os.path.join(os.fsencode(folder), raw)
    if where == "file":
        Path(os.fsdecode(target)).write_bytes(jpeg_bytes())
    else:
        os.mkdir(target)
    before = tree_state(tmp_path)
    for source in (lambda: data.image_folder(str(root), 16, path="stream"), lambda: data.image_folder(str(root), 16)):
        with pytest.raises(ValueError) as error:
            source()
        assert str(error.value) == (f"{folder} holds names that are not valid UTF-8 (1): {raw!r}. Rename them to "
                                    "UTF-8 names (or move them out of the dataset), then run again.")
        str(error.value).encode("utf-8")  # printable: no surrogate escape in the message
    assert tree_state(tmp_path) == before


@pytest.mark.parametrize("value", [-1, 0])
@pytest.mark.parametrize("source", ["image_folder", "imagenet", "tiny_imagenet"])
def test_max_per_class_below_one_is_refused(source, value, tmp_path):
    root = {"image_folder": write_folder, "imagenet": write_imagenet, "tiny_imagenet": write_tiny_imagenet}[source](
        tmp_path / "data")
    before = tree_state(tmp_path)
    with pytest.raises(ValueError, match=re.escape(
            f"dataset.source.max_per_class={value}: must be a whole number >= 1 (the images kept per class, the first "
            "in name order), or null to keep every image.")):
        getattr(data, source)(str(root), max_per_class=value)
    assert tree_state(tmp_path) == before


def test_max_per_class_is_refused_through_the_config_before_the_run_folder_is_written(tmp_path):
    root = write_folder(tmp_path / "images")
    cfg = compose_cfg(tmp_path, *PLAIN, "dataset=imagefolder", "dataset.num_classes=2", f"dataset.source.root={root}",
                      "dataset.source.max_per_class=-1")
    before = tree_state(root)
    with pytest.raises(ValueError, match=r"dataset\.source\.max_per_class=-1: must be a whole number >= 1"):
        engine.run(cfg, tmp_path / "run")
    assert {p.name for p in (tmp_path / "run").iterdir()} == {".lock"} and tree_state(root) == before


# ---------------------------------------------------------------------------------------------------------------
# the measurement


def test_bench_scan_writes_a_folder_and_times_warm_and_cold_scans(tmp_path, capsys):
    result = bench.main(["--scan", "--folder", str(tmp_path / "jpegs"), "--make", "60", "--size", "40x30",
                         "--threads", "1", "4", "--evict"])
    assert result["files"] == 60 and [(r["threads"], r["cold"]) for r in result["scans"]] == [
        (1, False), (4, False), (1, True), (4, True)]
    assert all(r["files_per_s"] > 0 and r["imagenet_s"] == pytest.approx(1_331_167 / r["files_per_s"])
               for r in result["scans"])
    with Image.open(tmp_path / "jpegs" / "test" / "class0" / "0000009.jpg") as image:
        assert image.size == (40, 30)
    assert "ImageNet (1.33 M files)" in capsys.readouterr().out
    (tmp_path / "jpegs" / "train" / "class0" / "0000000.jpg").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"(?s)1 of the 60 image files .*/0000000.jpg: empty"):
        bench.main(["--scan", "--folder", str(tmp_path / "jpegs"), "--threads", "2"])
