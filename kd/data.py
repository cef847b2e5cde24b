"""Datasets decoded once into uint8 tensors, and the standard CIFAR augmentation applied per batch.

Every source returns `Splits` of uint8 images (N, 3, H, W) with int64 labels. Training batches are
cropped, flipped and normalised on the compute device; all randomness comes from a generator seeded by
(seed, epoch), so an epoch's batches are a pure function of the config, whatever happened before it.
"""
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from kd import records

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


def image_folder(
    root: str, image_size: int = 32, max_per_class: Optional[int] = None, cache_dir: Optional[str] = None
) -> Splits:
    """A root/train/<class>/* and root/test/<class>/* tree of images, decoded once (RGB, image_size).

    With cache_dir, the decoded tensors are saved there once and later runs load them instead of decoding every
    image again. The cache file is addressed by the content of the images it was decoded from (every file's bytes
    and relative path), the decode settings and the decoder's version, and carries a checksum of the tensors that
    is verified when it is read: an edited image, or a damaged cache file, is never served. A cache folder that
    cannot be written (a read-only ~/.cache) is skipped with one warning.
    """
    files, classes = _listing(Path(root), max_per_class)
    if cache_dir is None:
        return _decode(files, classes, image_size)
    fingerprint = _content_fingerprint(Path(root), files, image_size)
    cache_file = Path(cache_dir).expanduser() / f"{Path(root).resolve().name}_{fingerprint[:16]}.pt"
    splits = _read_decoded(cache_file, fingerprint)
    if splits is None:
        splits = _decode(files, classes, image_size)
        _write_decoded(cache_file, fingerprint, splits)
    return splits


# Bump when decoding changes what a file decodes to: the decode cache keys on it.
DECODER_VERSION = 2
Listing = dict[str, list[tuple[Path, int]]]  # "train"/"test" -> (file, label) in order


def _listing(root: Path, max_per_class: Optional[int]) -> tuple[Listing, list[str]]:
    """The image files of each part with their labels, and the class names (the same folders in both parts)."""
    train_classes, test_classes = (_class_dirs(root / part) for part in ("train", "test"))
    if train_classes != test_classes:
        raise ValueError(
            f"{root}: train and test hold different classes (only in train: "
            f"{sorted(set(train_classes) - set(test_classes))}, only in test: "
            f"{sorted(set(test_classes) - set(train_classes))}). Both need the same class folders."
        )
    files: Listing = {}
    for part in ("train", "test"):
        files[part] = []
        for label, name in enumerate(train_classes):
            found = sorted(f for f in (root / part / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{root / part / name} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
            files[part] += [(file, label) for file in found[:max_per_class]]
    return files, train_classes


def _content_fingerprint(root: Path, files: Listing, image_size: int) -> str:
    """sha256 of the decoder (its version, Pillow's), the size, and every listed file's relative path and bytes."""
    digest = hashlib.sha256(f"{DECODER_VERSION}|{PIL.__version__}|{image_size}|".encode())
    for part, entries in files.items():
        for file, label in entries:
            digest.update(f"{file.relative_to(root)}|{label}|".encode())
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def _class_dirs(path: Path) -> list[str]:
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} does not exist: dataset.source.root must hold train/<class>/ and test/<class>/ folders."
        )
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{path} holds no class folders: expected {path}/<class>/<image files>.")
    return classes


def _decode(files: Listing, classes: list[str], image_size: int) -> Splits:
    def split(entries: list[tuple[Path, int]]) -> Split:
        pixels = np.stack([read_image(file, image_size) for file, _ in entries])
        return Split(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), torch.tensor([l for _, l in entries]))

    return Splits(split(files["train"]), split(files["test"]), classes)


def read_image(path: Path, image_size: int) -> np.ndarray:
    """One image as (image_size, image_size, 3) uint8 RGB; a file that does not decode is named in the error."""
    try:
        with Image.open(path) as image:
            image = to_rgb(image)
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(
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
    deleted (and the caller decodes again)."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, weights_only=True)
        tensors = [*stored["train"], *stored["test"]]
        intact = stored["fingerprint"] == fingerprint and stored["checksum"] == records.sha256_tensors(*tensors)
    except Exception as error:  # truncated, garbage, or a dict of another shape
        intact, reason = False, f"{type(error).__name__}: {error}"
    else:
        reason = "its checksum or fingerprint does not match its content"
    if not intact:
        log.warning("decode cache file %s is damaged (%s): deleting it and decoding the images again", path, reason)
        path.unlink(missing_ok=True)
        return None
    return Splits(Split(*stored["train"]), Split(*stored["test"]), stored["classes"])


def _write_decoded(path: Path, fingerprint: str, splits: Splits) -> None:
    """Store the decoded splits (through a temporary file); an unwritable cache folder is skipped with a warning."""
    tensors = [splits.train.images, splits.train.labels, splits.test.images, splits.test.labels]
    payload = {"fingerprint": fingerprint, "classes": splits.classes, "checksum": records.sha256_tensors(*tensors),
               "train": tensors[:2], "test": tensors[2:]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        records.save_checkpoint(path, payload)
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


def augment(images: Tensor, padding: int, hflip: bool, generator: torch.Generator) -> Tensor:
    """RandomCrop(size, padding, zero fill) then RandomHorizontalFlip(0.5), drawn per image, for a batch."""
    offsets, flips = draw_augmentation(len(images), padding, hflip, generator)
    offsets, flips = (t.to(images.device) if t is not None else None for t in (offsets, flips))
    return crop_and_flip(images, padding, offsets, flips)


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


def batches(split: Split, batch_size: int, generator: Optional[torch.Generator] = None) -> Iterator[Split]:
    """Mini-batches in a random order drawn from `generator`, or in order when it is None; keeps the last one."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    order = order.to(split.labels.device)
    for start in range(0, n, batch_size):
        yield split.subset(order[start : start + batch_size])


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator behind one epoch's order and augmentation: a pure function of (seed, epoch)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)
