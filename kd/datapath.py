"""The data paths the loop reads: one small interface (`DataPath`), two implementations.

`InMemoryData` (here) holds datasets that fit in memory (digits, CIFAR, Tiny ImageNet, small image folders) decoded
once as uint8 tensors on the compute device, and crops, flips and normalises each batch there. `StreamingData`
(kd.streaming) decodes image folders too large for that (ImageNet) in DataLoader workers, epoch by epoch. The loop
asks either for the epoch's batches of views with their sample positions, and never learns which one it reads.

On both, a view is a pure function of (seed, epoch, sample position), whatever the number of workers or ranks, and
under torchrun each rank receives only its share of each global batch (and of each evaluation split).
"""
from dataclasses import dataclass, field
from typing import Iterator, Optional, Protocol

import torch
from torch import Tensor

from kd import distributed, fileio
from kd.data import Split, crop_and_flip, epoch_generator, epoch_plan, normalize


@dataclass
class Batch:
    """This rank's share of one global training batch: augmented views (uint8, on the device), labels, positions in
    the training split, the share's rows in the epoch's order (the teacher cache's rows), and the global batch size."""

    views: Tensor
    labels: Tensor
    index: Tensor
    rows: slice
    size: int

    def __len__(self) -> int:
        return len(self.labels)


class DataPath(Protocol):
    """What the loop and the engine read from a dataset, whichever path serves it."""

    classes: list[str]  # class names, in label order
    channels_last: bool
    splits: tuple[str, ...]  # the evaluation splits it has: ("test",) or ("val", "test")

    @property
    def device(self) -> torch.device: ...

    @property
    def image_shape(self) -> tuple[int, int, int]: ...  # (C, H, W) of a network input

    @property
    def num_train(self) -> int: ...

    @property
    def train_labels(self) -> Tensor: ...  # every training label, in split order, on the device

    def epoch(self, seed: int, epoch: int, batch_size: int) -> Iterator[Batch]: ...

    def evaluation(self, split: str, batch_size: int) -> Iterator[Tensor]: ...  # this rank's share, in order

    def split_labels(self, split: str) -> Tensor: ...  # the whole split's labels, on the device

    def inputs(self, views: Tensor) -> Tensor: ...  # uint8 views -> normalised network inputs

    def sample_inputs(self, n: int) -> Tensor: ...  # network inputs of the first n training images

    def train_digest(self) -> str: ...  # the training split's content address (the teacher cache's key)


@dataclass
class InMemoryData:
    """The decoded splits on the compute device, and how training batches are augmented and normalised."""

    train: Split
    val: Optional[Split]
    test: Split
    mean: Tensor  # (1, C, 1, 1) on the device
    std: Tensor
    crop_padding: int
    hflip: bool
    channels_last: bool = False
    classes: list[str] = field(default_factory=list)
    _train_digest: Optional[str] = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def splits(self) -> tuple[str, ...]:
        return ("val", "test") if self.val is not None else ("test",)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.test.images.shape[1:])

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def train_labels(self) -> Tensor:
        return self.train.labels

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def train_digest(self) -> str:
        """sha256 of the training split's images and labels, in order: the content the teacher cache keys on."""
        if self._train_digest is None:
            self._train_digest = fileio.sha256_tensors(self.train.images, self.train.labels)
        return self._train_digest

    def inputs(self, views: Tensor) -> Tensor:
        """Network inputs: normalised floats, in NHWC memory order when channels_last is on."""
        x = normalize(views, self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def sample_inputs(self, n: int) -> Tensor:
        return self.inputs(self.train.images[:n])

    def epoch(self, seed: int, epoch: int, batch_size: int) -> Iterator[Batch]:
        """The epoch's batches (this rank's share of each), in an order and with crops and flips drawn at the
        epoch's start from (seed, epoch): every rank draws the same global batches and crops only its share."""
        n = len(self.train)
        plan = epoch_plan(n, batch_size, self.crop_padding, self.hflip, epoch_generator(seed, epoch), self.device)
        for start in range(0, n, batch_size):
            size = min(batch_size, n - start)
            share = distributed.shard(size)
            rows = slice(start + share.start, start + share.stop)
            index = plan.order[rows]
            offsets = plan.offsets[:, rows] if plan.offsets is not None else None
            flips = plan.flips[rows] if plan.flips is not None else None
            views = crop_and_flip(self.train.images[index], self.crop_padding, offsets, flips)
            yield Batch(views, self.train.labels[index], index, rows, size)

    def evaluation(self, split: str, batch_size: int) -> Iterator[Tensor]:
        """This rank's contiguous share of a split (distributed.shard), in order, unaugmented."""
        images = self._split(split).images
        local = images[distributed.shard(len(images))]
        for start in range(0, len(local), batch_size):
            yield local[start:start + batch_size]

    def split_labels(self, split: str) -> Tensor:
        return self._split(split).labels

    def _split(self, split: str) -> Split:
        found = getattr(self, split) if split in ("train", "val", "test") else None
        if found is None:
            raise ValueError(f"this dataset has no {split} split")
        return found
