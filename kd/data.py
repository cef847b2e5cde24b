"""Datasets decoded once into uint8 tensors, and the standard CIFAR augmentation applied per batch.

Every source returns `Splits` of uint8 images (N, 3, H, W) with int64 labels. Training batches are
cropped, flipped and normalised on the compute device; all randomness comes from a generator seeded by
(seed, epoch), so an epoch's batches are a pure function of the config, whatever happened before it.
"""
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from kd import records

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

    With cache_dir, the decoded tensors are saved there once and later runs load them instead of decoding
    every image again. The cache file is named by a fingerprint of the tree (every file's path, size and
    modification time) and the decode settings, so adding, removing or editing an image rebuilds it.
    """
    if cache_dir is None:
        return _decode_folder(Path(root), image_size, max_per_class)
    fingerprint = _folder_fingerprint(Path(root), image_size, max_per_class)
    cache_file = Path(cache_dir).expanduser() / f"{Path(root).resolve().name}_{fingerprint[:16]}.pt"
    if cache_file.is_file():
        try:
            stored = torch.load(cache_file, weights_only=True)
            if stored["fingerprint"] == fingerprint:
                return Splits(Split(*stored["train"]), Split(*stored["test"]), stored["classes"])
        except Exception:  # a damaged cache file is rebuilt below
            pass
    splits = _decode_folder(Path(root), image_size, max_per_class)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    payload = {"fingerprint": fingerprint, "classes": splits.classes, "root": str(Path(root).resolve()),
               "train": [splits.train.images, splits.train.labels], "test": [splits.test.images, splits.test.labels]}
    records.save_checkpoint(cache_file, payload)  # through a temporary file: parallel jobs never read half
    return splits


def _folder_fingerprint(root: Path, image_size: int, max_per_class: Optional[int]) -> str:
    """sha256 of the decode settings and every file's relative path, size and mtime under root/train, root/test."""
    digest = hashlib.sha256(f"{image_size}|{max_per_class}|".encode())
    for part in ("train", "test"):
        for class_dir in _class_dirs(root / part):
            for entry in sorted(os.scandir(root / part / class_dir), key=lambda e: e.name):
                stat = entry.stat()
                digest.update(f"{part}/{class_dir}/{entry.name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _decode_folder(root_path: Path, image_size: int, max_per_class: Optional[int]) -> Splits:
    root = str(root_path)
    train_classes, test_classes = (_class_dirs(root_path / part) for part in ("train", "test"))
    if train_classes != test_classes:
        raise ValueError(
            f"{root}: train and test hold different classes (only in train: "
            f"{sorted(set(train_classes) - set(test_classes))}, only in test: "
            f"{sorted(set(test_classes) - set(train_classes))}). Both need the same class folders."
        )
    load = lambda part: _load_images(root_path / part, train_classes, image_size, max_per_class)  # noqa: E731
    return Splits(load("train"), load("test"), train_classes)


def _class_dirs(path: Path) -> list[str]:
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} does not exist: dataset.source.root must hold train/<class>/ and test/<class>/ folders."
        )
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{path} holds no class folders: expected {path}/<class>/<image files>.")
    return classes


def _load_images(path: Path, classes: list[str], image_size: int, max_per_class: Optional[int]) -> Split:
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(f for f in (path / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path / name} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
        for file in files[:max_per_class]:
            with Image.open(file) as image:
                image = image.convert("RGB")
                if image.size != (image_size, image_size):
                    image = image.resize((image_size, image_size), Image.BILINEAR)
                images.append(np.asarray(image))
            labels.append(label)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return Split(pixels, torch.tensor(labels))


def hold_out(train: Split, fraction: float, seed: int) -> tuple[Split, Optional[Split]]:
    """Split a seeded validation set off the training set (none when fraction is 0)."""
    if fraction <= 0:
        return train, None
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(len(train) * fraction))
    return train.subset(order[n_val:]), train.subset(order[:n_val])


def augment(images: Tensor, padding: int, hflip: bool, generator: torch.Generator) -> Tensor:
    """RandomCrop(size, padding, zero fill) then RandomHorizontalFlip(0.5), drawn per image, for a batch.

    The random draws are made on the CPU so a seed gives the same views on every device.
    """
    n, channels, height, width = images.shape
    if padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding))
        offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(images.device)
        rows = (offsets[0, :, None] + torch.arange(height, device=images.device))[:, None, :, None]
        cols = (offsets[1, :, None] + torch.arange(width, device=images.device))[:, None, None, :]
        batch = torch.arange(n, device=images.device)[:, None, None, None]
        channel = torch.arange(channels, device=images.device)[None, :, None, None]
        images = padded[batch, channel, rows, cols]
    if hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    return images


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
