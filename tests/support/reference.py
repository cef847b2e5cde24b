"""Reference code the tests compare the library with: the per-batch form of what kd.data.epoch_plan draws for a
whole epoch (a batch's order, then its crops and flips, from one generator), and the standard CIFAR augmentation
applied to one batch."""
from typing import Iterator, Optional

import torch
from torch import Tensor

from kd.data import Split, crop_and_flip, draw_augmentation


def augment(images: Tensor, padding: int, hflip: bool, generator: torch.Generator) -> Tensor:
    """RandomCrop(size, padding, zero fill) then RandomHorizontalFlip(0.5), drawn per image, for a batch."""
    offsets, flips = draw_augmentation(len(images), padding, hflip, generator)
    offsets, flips = (t.to(images.device) if t is not None else None for t in (offsets, flips))
    return crop_and_flip(images, padding, offsets, flips)


def batches(split: Split, batch_size: int, generator: Optional[torch.Generator] = None) -> Iterator[Split]:
    """Mini-batches in a random order drawn from `generator`, or in order when it is None; keeps the last one."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    order = order.to(split.labels.device)
    for start in range(0, n, batch_size):
        yield split.subset(order[start : start + batch_size])
