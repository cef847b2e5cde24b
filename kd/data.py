"""Dataset sources, datasets decoded once into uint8 tensors, and the standard CIFAR augmentation applied per batch.

A source returns `Splits` of uint8 images (N, 3, H, W) with int64 labels (the in-memory path, kd.datapath), or
`FileSplits`, lists of image files that kd.streaming decodes epoch by epoch in DataLoader workers (ImageNet, and
image folders too large to hold decoded). Training batches are cropped, flipped and normalised on the compute device;
all randomness comes from a generator seeded by (seed, epoch), so an epoch's batches are a pure function of the
config, whatever happened before it.
"""
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from kd import fileio
from kd import scan as preflight

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Split:
    images: Tensor  # uint8 (N, 3, H, W)
    labels: Tensor  # int64 (N,)
    index: Optional[Tensor] = None  # for a subset: its samples' positions in the split it was taken from

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor) -> "Split":
        return Split(self.images[index], self.labels[index], index)

    def to(self, device: torch.device) -> "Split":
        index = self.index.to(device) if self.index is not None else None
        return Split(self.images.to(device), self.labels.to(device), index)


@dataclass
class Splits:
    train: Split
    test: Split
    classes: list[str]


@dataclass
class FileSplit:
    """A split's image files (paths relative to root, as a numpy bytes array: one object, so DataLoader workers that
    read it do not copy it page by page as they would a list of str) and their labels."""

    root: Path
    paths: np.ndarray  # dtype S: UTF-8 paths relative to root
    labels: Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> Path:
        return self.root / self.paths[i].decode()

    def subset(self, index: Tensor) -> "FileSplit":
        return FileSplit(self.root, self.paths[index.numpy()], self.labels[index])


@dataclass
class FileSplits:
    """Image files decoded per epoch by the streaming path (kd.streaming), and how their views are made."""

    train: FileSplit
    test: FileSplit
    classes: list[str]
    image_size: int
    # resized_crop: the ImageNet recipe (RandomResizedCrop + flip; Resize + CenterCrop to evaluate). pad_crop: the
    # in-memory path's (each image resized to image_size as read_image does, then RandomCrop with zero padding + flip),
    # view for view the same as the in-memory path gives, so an image folder's results do not depend on its path.
    recipe: str = "resized_crop"
    num_workers: int = 8
    # What train_digest reads of each file: "sampled" (its size, first and last 4 KiB) or "full" (all its bytes).
    digest: str = "sampled"


def digits(image_size: int = 32, test_fraction: float = 0.2, split_seed: int = 0) -> Splits:
    """scikit-learn's bundled 8x8 digits, upscaled (bilinear) to image_size, 3 channels, seeded split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = torch.from_numpy(bunch.images).float()[:, None]  # values 0..16
    pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (pixels * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    data = Split(images.contiguous(), torch.from_numpy(bunch.target).long())
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(split_seed))
    n_test = round(len(data) * test_fraction)
    return Splits(data.subset(order[n_test:]), data.subset(order[:n_test]), [str(d) for d in range(10)])


def cifar(root: str, num_classes: int, download: bool = True) -> Splits:
    """CIFAR-10 or CIFAR-100 through torchvision (downloaded into `root` when asked to)."""
    from torchvision import datasets

    if num_classes not in (10, 100):
        raise ValueError(f"CIFAR has 10 or 100 classes, not {num_classes}.")
    dataset_class = datasets.CIFAR10 if num_classes == 10 else datasets.CIFAR100
    try:
        train = dataset_class(root, train=True, download=download)
        test = dataset_class(root, train=False, download=download)
    except (RuntimeError, OSError) as error:
        raise RuntimeError(
            f"CIFAR-{num_classes} could not be loaded from {root!r} ({error}). Download it there "
            f"(dataset.source.download=true, with network access) or point dataset.source.root at a copy."
        ) from error

    def to_split(ds) -> Split:
        return Split(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))

    return Splits(to_split(train), to_split(test), list(train.classes))


Listing = dict[str, list[tuple[Path, int]]]  # "train"/"test" -> (file, label) in order
PATHS = ("auto", "memory", "stream")
RECIPES = ("pad_crop", "resized_crop")


def image_folder(
    root: str, image_size: int = 32, max_per_class: Optional[int] = None, cache_dir: Optional[str] = None,
    path: str = "auto", in_memory_max_gb: float = 4.0, num_workers: int = 4, recipe: str = "pad_crop",
    digest: str = "sampled", scan: bool = True,
) -> "Splits | FileSplits":
    """A root/train/<class>/* and root/test/<class>/* tree of images: decoded once (RGB, image_size) and held in
    memory, or streamed (FileSplits: decoded per epoch in num_workers DataLoader workers).

    path=auto holds the folder in memory when its decoded size, 3 * image_size**2 bytes per image of train and test,
    is at most in_memory_max_gb (GB = 1e9 bytes), and streams it otherwise; memory and stream force either.
    recipe=pad_crop (the CIFAR augmentation) gives the same views on both paths; resized_crop (ImageNet's) streams.

    With cache_dir, the decoded tensors are saved there once and later runs load them instead of decoding every
    image again. The cache file is addressed by the content of the images it was decoded from (every file's bytes
    and relative path), the decode settings and the decoder's version, and carries a checksum of the tensors that
    is verified when it is read: an edited image, or a damaged cache file, is never served. A cache folder that
    cannot be written (a read-only ~/.cache) is skipped with one warning.

    With scan, every listed file's header is checked first (kd.scan), and every bad file is named in one error.
    """
    check_source_settings(path, recipe, image_size, num_workers, digest)
    check_max_per_class(max_per_class)
    names, classes = scan_folder(Path(root), ("train", "test"), max_per_class)
    if scan:
        preflight.check_images(Path(root), [name for part in names.values() for name in part[0]])
    if _streams(path, recipe, sum(len(n) for n, _ in names.values()), image_size, in_memory_max_gb):
        splits = {part: file_split(Path(root), *names[part]) for part in ("train", "test")}
        return FileSplits(splits["train"], splits["test"], classes, image_size, recipe, num_workers, digest)
    files = {part: [(Path(root) / name, label) for name, label in zip(*names[part])] for part in names}
    return _decoded(Path(root), files, classes, image_size, cache_dir)


def imagenet(
    root: str, image_size: int = 224, num_workers: int = 8, max_per_class: Optional[int] = None,
    digest: str = "sampled", scan: bool = True,
) -> FileSplits:
    """ImageNet-1k (root/train/<wnid>/*.JPEG, root/val/<wnid>/*.JPEG), streamed with the resized-crop recipe; its
    val folder is the test split, as in every ImageNet table (dataset.val_fraction holds a validation split out).
    With scan, every file's header is checked before any work (kd.scan), and every bad file is named in one error."""
    check_source_settings("stream", "resized_crop", image_size, num_workers, digest)
    check_max_per_class(max_per_class)
    val = Path(root) / "val"
    if val.is_dir() and not any(p.is_dir() for p in val.iterdir()) and any(val.glob("*.JPEG")):
        raise FileNotFoundError(f"{val} holds its images loose: sort them into val/<wnid>/ folders first (the "
                                "PyTorch ImageNet example's valprep.sh does it), the layout train/ has.")
    names, classes = scan_folder(Path(root), ("train", "val"), max_per_class)
    if scan:
        preflight.check_images(Path(root), names["train"][0] + names["val"][0])
    train, test = (file_split(Path(root), *names[part]) for part in ("train", "val"))
    return FileSplits(train, test, classes, image_size, "resized_crop", num_workers, digest)


def tiny_imagenet(
    root: str, image_size: int = 64, max_per_class: Optional[int] = None, cache_dir: Optional[str] = None,
    scan: bool = True,
) -> Splits:
    """Tiny ImageNet as distributed (tiny-imagenet-200: train/<wnid>/images/*.JPEG; val/images/*.JPEG labelled by
    val/val_annotations.txt), decoded once and held in memory (1.3 GB at 64 px). Its val split is the test split:
    test/ has no labels. With scan, every file's header is checked first (kd.scan), every bad file named at once."""
    check_max_per_class(max_per_class)
    root_path = Path(root)
    classes = _class_dirs(root_path / "train", ("train", "val"))
    wnids = root_path / "wnids.txt"
    if wnids.is_file() and sorted(wnids.read_text().split()) != classes:
        raise ValueError(f"{wnids} lists other classes than the folders of {root_path / 'train'}: an incomplete copy?")
    files: Listing = {"train": [], "test": []}
    for label, name in enumerate(classes):
        images = root_path / "train" / name / "images"
        found = sorted(f for f in images.glob("*") if f.suffix.lower() in IMAGE_SUFFIXES) if images.is_dir() else []
        check_utf8_names(images, [f.name for f in found])
        if not found:
            raise FileNotFoundError(f"{images} holds no images: expected train/<wnid>/images/*.JPEG.")
        files["train"] += [(f, label) for f in found[:max_per_class]]
    by_class = _tiny_imagenet_val(root_path, classes)
    for label, name in enumerate(classes):
        files["test"] += [(f, label) for f in by_class[name][:max_per_class]]
    if scan:
        preflight.check_images(root_path, [str(f.relative_to(root_path)) for part in files.values() for f, _ in part])
    return _decoded(root_path, files, classes, image_size, cache_dir)


def _tiny_imagenet_val(root: Path, classes: list[str]) -> dict[str, list[Path]]:
    """Tiny ImageNet's validation images of each class, in name order, from val/val_annotations.txt
    (file <tab> wnid <tab> box), every listed file present and every training class among them."""
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise FileNotFoundError(f"{annotations} does not exist: Tiny ImageNet's val/ holds images/ and "
                                "val_annotations.txt (file, wnid, box per line).")
    by_class: dict[str, list[Path]] = {name: [] for name in classes}
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        file, wnid = root / "val" / "images" / fields[0], fields[1]
        if wnid not in by_class:
            raise ValueError(f"{annotations} line {number} labels {fields[0]} {wnid}, a class train/ does not hold.")
        if not file.is_file():
            raise FileNotFoundError(f"{annotations} line {number} names {file}, which does not exist.")
        by_class[wnid].append(file)
    missing = [name for name, found in by_class.items() if not found]
    if missing:
        raise ValueError(f"{root}: classes present in train but missing in val ({len(missing)}: {missing[:10]}): "
                         "every class needs validation images.")
    return {name: sorted(found) for name, found in by_class.items()}


def check_source_settings(path: str, recipe: str, image_size: int, num_workers: int, digest: str) -> None:
    """Refuse streaming and path settings no run can use, before any file is listed."""
    problems = []
    if path not in PATHS:
        problems.append(f"dataset.source.path={path}: must be one of {', '.join(PATHS)}")
    if recipe not in RECIPES:
        problems.append(f"dataset.source.recipe={recipe}: must be one of {', '.join(RECIPES)}")
    if path == "memory" and recipe == "resized_crop":
        problems.append("dataset.source.path=memory with recipe=resized_crop: the in-memory path crops with padding "
                        "(recipe=pad_crop); resized crops are made while streaming (path=stream or auto)")
    if image_size < 1 or num_workers < 0:
        problems.append(f"dataset.source.image_size={image_size}, num_workers={num_workers}: need >= 1 and >= 0")
    if digest not in ("sampled", "full"):
        problems.append(f"dataset.source.digest={digest}: must be sampled or full")
    if problems:
        raise ValueError("invalid dataset source: " + "; ".join(problems))


def check_max_per_class(max_per_class: Optional[int]) -> None:
    """Refuse a per-class limit that keeps no image, or drops some silently (a negative slice bound)."""
    if max_per_class is not None and (isinstance(max_per_class, bool) or not isinstance(max_per_class, int)
                                      or max_per_class < 1):
        raise ValueError(f"dataset.source.max_per_class={max_per_class}: must be a whole number >= 1 (the images "
                         "kept per class, the first in name order), or null to keep every image.")


def check_utf8_names(folder: Path, names: list[str]) -> None:
    """Refuse file names that are not valid UTF-8 (os.listdir gives them as surrogate escapes, which no record or
    file list can encode), naming the folder and each raw name."""
    try:
        "".join(names).encode()
    except UnicodeEncodeError:
        raw = [os.fsencode(name) for name in names if not _encodes(name)]
        shown = ", ".join(repr(name) for name in raw[:20]) + (f" and {len(raw) - 20} more" if len(raw) > 20 else "")
        raise ValueError(f"{folder} holds names that are not valid UTF-8 ({len(raw)}): {shown}. Rename them to "
                         "UTF-8 names (or move them out of the dataset), then run again.") from None


def _encodes(name: str) -> bool:
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


def _streams(path: str, recipe: str, count: int, image_size: int, in_memory_max_gb: float) -> bool:
    """Whether a folder of `count` images is streamed: forced, the resized-crop recipe, or too large decoded."""
    if path != "auto" or recipe == "resized_crop":
        return path == "stream" or recipe == "resized_crop"
    decoded = count * 3 * image_size * image_size
    if decoded > in_memory_max_gb * 1e9:
        log.info("streaming the image folder: %d images decode to %.1f GB at %d px, above "
                 "dataset.source.in_memory_max_gb=%g", count, decoded / 1e9, image_size, in_memory_max_gb)
        return True
    return False


def _decoded(root: Path, files: Listing, classes: list[str], image_size: int, cache_dir: Optional[str]) -> Splits:
    """The listed files decoded (image_size, RGB), through the decode cache in cache_dir when it is set."""
    if cache_dir is None:
        return _decode(files, classes, image_size)
    fingerprint = _content_fingerprint(root, files, image_size)
    cache_file = Path(cache_dir).expanduser() / f"{root.resolve().name}_{fingerprint[:16]}.pt"
    splits = _read_decoded(cache_file, fingerprint)
    if splits is None:
        splits = _decode(files, classes, image_size)
        _write_decoded(cache_file, fingerprint, splits)
    return splits


# Bump when decoding changes what a file decodes to: the decode cache keys on it.
DECODER_VERSION = 2


def scan_folder(
    root: Path, parts: tuple[str, str], max_per_class: Optional[int]
) -> tuple[dict[str, tuple[list[str], list[int]]], list[str]]:
    """Each part's image files (paths relative to root, sorted within a class) and labels, and the class names: the
    same class folders in both parts (the first part's), each holding at least one image."""
    first, second = parts
    classes, other = (_class_dirs(root / part, parts) for part in parts)
    if classes != other:
        raise ValueError(
            f"{root}: {first} and {second} hold different classes (only in {first}: "
            f"{sorted(set(classes) - set(other))[:20]}, only in {second}: {sorted(set(other) - set(classes))[:20]}). "
            "Both need the same class folders."
        )
    found: dict[str, tuple[list[str], list[int]]] = {}
    for part in parts:
        names, labels = [], []
        for label, name in enumerate(classes):
            # os.scandir and str: an ImageNet listing is 1.28 M names, and Path objects would cost ~1 KB each.
            with os.scandir(root / part / name) as entries:
                files = sorted(e.name for e in entries if os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES)
            check_utf8_names(root / part / name, files)
            if not files:
                raise FileNotFoundError(f"{root / part / name} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
            files = files[:max_per_class]
            names += [f"{part}/{name}/{file}" for file in files]
            labels += [label] * len(files)
        found[part] = (names, labels)
    return found, classes


def file_split(root: Path, names: list[str], labels: list[int]) -> FileSplit:
    return FileSplit(root, np.array([n.encode() for n in names], dtype=bytes), torch.tensor(labels, dtype=torch.long))


def _content_fingerprint(root: Path, files: Listing, image_size: int) -> str:
    """sha256 of the decoder (its version, Pillow's), the size, and every listed file's relative path and bytes."""
    digest = hashlib.sha256(f"{DECODER_VERSION}|{PIL.__version__}|{image_size}|".encode())
    for entries in files.values():
        for file, label in entries:
            digest.update(f"{file.relative_to(root)}|{label}|".encode())
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def _class_dirs(path: Path, parts: tuple[str, str] = ("train", "test")) -> list[str]:
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} does not exist: dataset.source.root must hold {parts[0]}/<class>/ and {parts[1]}/<class>/ folders."
        )
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    check_utf8_names(path, classes)
    if not classes:
        raise FileNotFoundError(f"{path} holds no class folders: expected {path}/<class>/<image files>.")
    return classes


def _decode(files: Listing, classes: list[str], image_size: int) -> Splits:
    def split(entries: list[tuple[Path, int]]) -> Split:
        pixels = np.stack([read_image(file, image_size) for file, _ in entries])
        labels = torch.tensor([label for _, label in entries])
        return Split(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), labels)

    return Splits(split(files["train"]), split(files["test"]), classes)


class UnreadableImage(ValueError):
    """An image file that does not decode; the message names it and the fix, in one line."""


def read_image(path: Path, image_size: int) -> np.ndarray:
    """One image as (image_size, image_size, 3) uint8 RGB; a file that does not decode is named in the error."""
    try:
        with Image.open(path) as image:
            image = to_rgb(image)
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise UnreadableImage(
            f"{path} cannot be decoded as an image ({type(error).__name__}: {error}): it is truncated or corrupt. "
            "Replace or delete it, then run again."
        ) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit greyscale (PNG modes I;16 and I) is scaled to 8 bits (65535 -> 255); Pillow's convert
    would clip every value above 255 to white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        levels = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8))
    return image.convert("RGB")


_warned: set[str] = set()  # optional caches that could not be used, each warned about once


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def _read_decoded(path: Path, fingerprint: str) -> Optional[Splits]:
    """The decoded splits stored at path, if it holds this fingerprint and its checksum verifies; a bad file is
    deleted (left as it is in a read-only folder) and the caller decodes again."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, weights_only=True)
        tensors = [*stored["train"], *stored["test"]]
        intact = stored["fingerprint"] == fingerprint and stored["checksum"] == fileio.sha256_tensors(*tensors)
    except Exception as error:  # truncated, garbage, or a dict of another shape
        intact, reason = False, f"{type(error).__name__}: {error}"
    else:
        reason = "its checksum or fingerprint does not match its content"
    if not intact:
        try:
            path.unlink(missing_ok=True)
        except OSError as error:  # a read-only cache: one warning for the folder (the failed rewrite adds none)
            _warn_once(str(path.parent), f"decode cache file {path} is damaged ({reason}): decoding the images again. "
                       f"Its folder {path.parent} cannot be written ({error}), so the file stays and nothing is "
                       "stored (set dataset.source.cache_dir to a writable folder, or null to silence this).")
            return None
        log.warning("decode cache file %s is damaged (%s): deleted, decoding the images again", path, reason)
        return None
    return Splits(Split(*stored["train"]), Split(*stored["test"]), stored["classes"])


def _write_decoded(path: Path, fingerprint: str, splits: Splits) -> None:
    """Store the decoded splits (through a temporary file); an unwritable cache folder is skipped with a warning."""
    tensors = [splits.train.images, splits.train.labels, splits.test.images, splits.test.labels]
    payload = {"fingerprint": fingerprint, "classes": splits.classes, "checksum": fileio.sha256_tensors(*tensors),
               "train": tensors[:2], "test": tensors[2:]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fileio.save_checkpoint(path, payload)
    except OSError as error:
        _warn_once(str(path.parent), f"decode cache folder {path.parent} cannot be written ({error}): going on "
                   "without it (set dataset.source.cache_dir to a writable folder, or null to silence this).")


def hold_out(train: Split, fraction: float, seed: int) -> tuple[Split, Optional[Split]]:
    """Split a seeded validation set off the training set (none when fraction is 0)."""
    if fraction <= 0:
        return train, None
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(len(train) * fraction))
    return train.subset(order[n_val:]), train.subset(order[:n_val])


def draw_augmentation(
    n: int, padding: int, hflip: bool, generator: torch.Generator
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The random part of RandomCrop(padding) + RandomHorizontalFlip(0.5) for n images, drawn on the CPU (so a seed
    gives the same views on every device): crop offsets (2, n) in [0, 2 * padding] and flips (n,) bool, or None."""
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator) if padding > 0 else None
    flips = torch.rand(n, generator=generator) < 0.5 if hflip else None
    return offsets, flips


def crop_and_flip(images: Tensor, padding: int, offsets: Optional[Tensor], flips: Optional[Tensor]) -> Tensor:
    """Apply drawn crop offsets (zero fill) and flips to a batch, on the images' device, as one batched gather."""
    n, channels, height, width = images.shape
    if offsets is not None:
        padded = F.pad(images, (padding, padding, padding, padding))
        rows = (offsets[0, :, None] + torch.arange(height, device=images.device))[:, None, :, None]
        cols = (offsets[1, :, None] + torch.arange(width, device=images.device))[:, None, None, :]
        batch = torch.arange(n, device=images.device)[:, None, None, None]
        channel = torch.arange(channels, device=images.device)[None, :, None, None]
        images = padded[batch, channel, rows, cols]
    if flips is not None:
        images = torch.where(flips[:, None, None, None], images.flip(3), images)
    return images


@dataclass
class EpochPlan:
    """An epoch's visiting order and augmentation, all drawn at its start, on the compute device: a training step
    slices them and never waits on the host (no per-step copy from pageable memory)."""

    order: Tensor  # (N,) positions in the split, in visiting order
    offsets: Optional[Tensor]  # (2, N) crop offsets, in visiting order
    flips: Optional[Tensor]  # (N,) horizontal flips, in visiting order


def epoch_plan(
    n: int, batch_size: int, padding: int, hflip: bool, generator: torch.Generator, device: torch.device
) -> EpochPlan:
    """Draw an epoch's order, then each batch's crops and flips, in exactly the order a batch-by-batch loop draws
    them (so views, and teacher-cache rows, are the same as drawing per step); one copy to the device."""
    order = torch.randperm(n, generator=generator)
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    drawn = [draw_augmentation(size, padding, hflip, generator) for size in sizes]
    offsets = torch.cat([o for o, _ in drawn], dim=1) if padding > 0 else None
    flips = torch.cat([f for _, f in drawn]) if hflip else None
    moved = [to_device(t, device) for t in (order, offsets, flips)]
    return EpochPlan(*moved)


def to_device(tensor: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    """A CPU tensor on `device`: from pinned memory and without blocking the host when that is a GPU."""
    if tensor is None or device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 images to float, scaled to [0, 1], then standardised per channel (mean/std shaped (1, C, 1, 1))."""
    return (images.float() / 255.0 - mean) / std


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator behind one epoch's order and augmentation: a pure function of (seed, epoch)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)
