"""The streaming data path (`StreamingData`): image folders too large to hold decoded (ImageNet), decoded epoch by
epoch in DataLoader worker processes, behind the interface the loop reads (kd.datapath.DataPath).

Views. With recipe resized_crop (the torchvision reference recipe of the ImageNet papers), a training view is
RandomResizedCrop(size, scale (0.08, 1), ratio (3/4, 4/3)) + a horizontal flip, an evaluation view Resize(256/224 *
size) + CenterCrop(size), each made as one crop of the decoded image resized (bilinear, antialiased) to size x size.
With recipe pad_crop, a view is the in-memory path's: the image decoded by kd.data.read_image, then RandomCrop with
zero padding + flip with the offsets and flips kd.data.epoch_plan draws, so a folder gives the same views, and the
same run, on either path. Workers hand back uint8 (3, H, W) views, collated into shared memory; batches are pinned
and copied to the device without blocking, and normalised there (`inputs`), as on the in-memory path.

Determinism. The epoch's order is the permutation kd.data.epoch_plan draws from (seed, epoch), as in memory. A
resized crop and its flip come from a generator seeded by a hash of (seed, epoch, sample index), drawn in the worker
that decodes the sample (the box needs the image's size, read from its header there): a view is a pure function of
(seed, epoch, index), whatever the number of workers or ranks. The DataLoader's own seeds come from a private
generator, so streaming leaves the global RNG as the in-memory path does.

Ranks. Under torchrun each rank's batch sampler yields, for global batch b, only the positions of its share
(kd.distributed.shard) of b: a rank decodes its share and nothing else. Evaluation decodes the rank's contiguous
share of the split.

Decoding. JPEGs are decoded by simplejpeg (libjpeg-turbo, straight into a numpy array), at 1/2, 1/4 or 1/8 scale
(DCT scaling) when the crop keeps at least `size` pixels a side at that scale; other files (PNG, CMYK JPEGs) by
Pillow. The crop is resized by torch's uint8 bilinear kernel. tools/bench_data.py measures the alternatives.
"""
import functools
import hashlib
import io
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Union

import numpy as np
import PIL
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from kd import data, distributed
from kd.data import EpochPlan, FileSplit, FileSplits, epoch_generator, epoch_plan, normalize, to_rgb
from kd.datapath import Batch


@dataclass(frozen=True)
class Recipe:
    """How a file becomes a network-sized view, for training and for evaluation."""

    kind: str  # "resized_crop" or "pad_crop" (kd.data.RECIPES)
    size: int
    hflip: bool = True
    padding: int = 0  # pad_crop's zero padding
    scale: tuple[float, float] = (0.08, 1.0)  # resized_crop: the crop's share of the image's area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # resized_crop: the crop's aspect ratio (log-uniform)

    @property
    def eval_resize(self) -> int:
        """The shorter side before the centre crop: 256 for 224, as in torchvision's reference evaluation."""
        return self.size * 256 // 224


class ViewKey(NamedTuple):
    """Everything a worker needs to make one training view."""

    index: int  # the sample's position in the training split
    seed: int
    epoch: int
    offset_y: int = 0  # pad_crop: the crop offsets and flip drawn with the epoch's order (kd.data.epoch_plan)
    offset_x: int = 0
    flip: bool = False


# ---------------------------------------------------------------------------------------------------------------
# one view


def view_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator behind one resized-crop training view: a pure function of (seed, epoch, sample index)."""
    key = hashlib.blake2b(f"{seed}|{epoch}|{index}".encode(), digest_size=16).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(key, "little")))


def resized_crop_box(
    height: int, width: int, rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w) (Szegedy et al. 2015): an area drawn uniformly from `scale` times
    the image's and an aspect ratio drawn log-uniformly from `ratio`, up to 10 tries until the box fits the image;
    then the whole image cut to the nearest allowed ratio, centred. Only uniform doubles are drawn (rng.random), whose
    stream numpy keeps stable."""
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = rng.random(4)
        area = height * width * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_low + u[1] * (log_high - log_low))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1)), h, w
    aspect = width / height
    if aspect < ratio[0]:
        h, w = min(height, round(width / ratio[0])), width
    elif aspect > ratio[1]:
        h, w = height, min(width, round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def center_box(height: int, width: int, size: int, resize: int) -> tuple[int, int, int, int]:
    """Resize(shorter side to `resize`) then CenterCrop(size), as the box of the original image they keep: the resized
    sides and the crop's offsets rounded as torchvision rounds them, mapped back (to the nearest original pixel)."""
    if height <= width:
        resized = resize, int(resize * width / height)
    else:
        resized = int(resize * height / width), resize
    top, left = (int(round((side - size) / 2.0)) for side in resized)
    scale_y, scale_x = height / resized[0], width / resized[1]
    box = round(top * scale_y), round(left * scale_x), round(size * scale_y), round(size * scale_x)
    return box[0], box[1], max(1, min(box[2], height - box[0])), max(1, min(box[3], width - box[1]))


def train_view(path: Path, recipe: Recipe, key: ViewKey) -> Tensor:
    """One training view (3, size, size) uint8, a pure function of the file and the key."""
    if recipe.kind == "pad_crop":
        pixels = data.read_image(path, recipe.size)  # exactly the in-memory path's decode
        if recipe.padding:
            pad = recipe.padding
            pixels = np.pad(pixels, ((pad, pad), (pad, pad), (0, 0)))
            pixels = pixels[key.offset_y:key.offset_y + recipe.size, key.offset_x:key.offset_x + recipe.size]
        return torch.from_numpy(np.array(pixels[:, ::-1] if key.flip else pixels)).permute(2, 0, 1).contiguous()
    rng = view_generator(key.seed, key.epoch, key.index)
    flip = recipe.hflip and rng.random() < 0.5
    view = load_region(path, recipe.size, lambda h, w: resized_crop_box(h, w, rng, recipe.scale, recipe.ratio))
    return view.flip(2) if flip else view


def eval_view(path: Path, recipe: Recipe) -> Tensor:
    """One evaluation view (3, size, size) uint8: the centre crop, or for pad_crop the image as read_image gives it."""
    if recipe.kind == "pad_crop":
        return torch.from_numpy(np.array(data.read_image(path, recipe.size))).permute(2, 0, 1).contiguous()
    return load_region(path, recipe.size, lambda h, w: center_box(h, w, recipe.size, recipe.eval_resize))


def load_region(path: Path, size: int, choose_box) -> Tensor:
    """Read a file, choose a box from its (height, width), decode it and resize the box to (3, size, size) uint8; a
    file that does not decode is named in the error (met in a DataLoader worker, it reaches the main process as an
    Unreadable batch: see Views.__getitems__)."""
    try:
        content = path.read_bytes()
        return _region(content, size, choose_box)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise data.UnreadableImage(
            f"{path} cannot be decoded as an image ({type(error).__name__}: {error}): it is truncated, corrupt or "
            "missing. Replace or delete it, then run again."
        ) from None


def _region(content: bytes, size: int, choose_box) -> Tensor:
    header = _jpeg_header(content)
    if header is not None:
        box = choose_box(*header)
        try:
            return _jpeg_region(content, header, box, size)
        except ValueError:  # strict libjpeg-turbo refuses what it only warns about (extraneous bytes): Pillow decides
            pass
    with Image.open(io.BytesIO(content)) as image:  # not a JPEG libjpeg-turbo decodes to RGB: Pillow, full size
        pixels = np.array(to_rgb(image))
    top, left, h, w = box if header is not None else choose_box(*pixels.shape[:2])
    return resize(pixels[top:top + h, left:left + w], size)


def _jpeg_region(content: bytes, header: tuple[int, int], box: tuple[int, int, int, int], size: int) -> Tensor:
    """A JPEG's box resized to size: decoded by simplejpeg, at 1/k scale (DCT scaling) when the box keeps at least
    `size` pixels a side there (k = 2, 4, 8, the scales libjpeg-turbo decodes fastest); the antialiased resize then
    has less to average, to the same effect."""
    (height, width), (top, left, h, w) = header, box
    k = 8
    while k > 1 and (h < k * size or w < k * size):
        k //= 2
    pixels = simplejpeg.decode_jpeg(content, colorspace="RGB", min_height=-(-height // k), min_width=-(-width // k))
    if k > 1:
        top, left, bottom, right = round(top / k), round(left / k), round((top + h) / k), round((left + w) / k)
        h, w = max(1, bottom - top), max(1, right - left)
    return resize(pixels[top:top + h, left:left + w], size)


def _jpeg_header(content: bytes) -> Optional[tuple[int, int]]:
    """(height, width) of a JPEG that simplejpeg decodes to RGB, or None: another format, a header it cannot read,
    or CMYK/YCCK (Adobe's inverted convention, which Pillow handles)."""
    if content[:2] != b"\xff\xd8":
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(content)
    except ValueError:
        return None
    return None if colorspace in ("CMYK", "YCCK") else (height, width)


def resize(pixels: np.ndarray, size: int) -> Tensor:
    """(h, w, 3) uint8 -> (3, size, size) uint8, bilinear with antialiasing: torch's uint8 kernel, faster than
    Pillow's (tools/bench_data.py), and fastest on a dense channels-last input (the crop is copied first: 10 us)."""
    image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None]
    if image.shape[2:] != (size, size):
        image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return image[0].contiguous()  # the kernel writes (3, size, size); a copy only for an unresized channels-last crop


DECODERS = {"simplejpeg": simplejpeg.__version__, "pillow": PIL.__version__, "torch": torch.__version__}


# ---------------------------------------------------------------------------------------------------------------
# batches


class Views(Dataset):
    """A split's views, made where the DataLoader asks for them (its workers): an item is (view, label, index).
    Training items are asked for by ViewKey, evaluation items by the sample's position."""

    def __init__(self, files: FileSplit, recipe: Recipe, split: str):
        self.files, self.recipe, self.split = files, recipe, split

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: Union[ViewKey, int]) -> tuple[Tensor, int, int]:
        index = key.index if isinstance(key, ViewKey) else int(key)
        path = self.files.path(index)
        view = train_view(path, self.recipe, key) if isinstance(key, ViewKey) else eval_view(path, self.recipe)
        return view, int(self.files.labels[index]), index

    def __getitems__(self, keys: list) -> list:
        """A batch's items, as the DataLoader fetches them; a file that does not decode makes the batch Unreadable,
        so the main process raises its one-line message instead of the worker's traceback."""
        try:
            return [self[key] for key in keys]
        except data.UnreadableImage as error:
            return [Unreadable(str(error))]


@dataclass(frozen=True)
class Unreadable:
    """Sent back by a worker in place of a batch holding a file that does not decode: the message naming it."""

    message: str


def checked(batch):
    """A collated batch, or the one-line error naming its undecodable file (raised here, in the main process)."""
    if isinstance(batch, Unreadable):
        raise data.UnreadableImage(batch.message) from None
    return batch


def collate(items: list, size: int) -> "tuple[Tensor, Tensor, Tensor] | Unreadable":
    """Views (B, 3, H, W) uint8, labels and indices (B,) int64; an empty share gives empty tensors; a batch with an
    undecodable file stays Unreadable."""
    if items and isinstance(items[0], Unreadable):
        return items[0]
    if not items:
        return torch.empty((0, 3, size, size), dtype=torch.uint8), torch.empty(0, dtype=torch.long), torch.empty(
            0, dtype=torch.long)
    views, labels, index = zip(*items)
    # default_collate stacks straight into shared memory in a worker: no second copy to send the batch over.
    return default_collate(list(views)), torch.tensor(labels), torch.tensor(index)


class ShareSampler(Sampler):
    """The DataLoader's batch sampler for one epoch: for each global batch of the epoch's order, the ViewKeys of this
    rank's share of it (kd.distributed.shard), so that a rank decodes its share only."""

    def __init__(self, plan: EpochPlan, seed: int, epoch: int, batch_size: int):
        self.order = plan.order.numpy()
        self.offsets = plan.offsets.numpy() if plan.offsets is not None else None
        self.flips = plan.flips.numpy() if plan.flips is not None else None
        self.seed, self.epoch, self.batch_size = seed, epoch, batch_size

    def shares(self) -> Iterator[tuple[int, slice]]:
        """(global batch size, this rank's rows of the epoch's order) for each global batch."""
        n = len(self.order)
        for start in range(0, n, self.batch_size):
            size = min(self.batch_size, n - start)
            share = distributed.shard(size)
            yield size, slice(start + share.start, start + share.stop)

    def key(self, row: int) -> ViewKey:
        offsets = (int(self.offsets[0, row]), int(self.offsets[1, row])) if self.offsets is not None else (0, 0)
        flip = bool(self.flips[row]) if self.flips is not None else False
        return ViewKey(int(self.order[row]), self.seed, self.epoch, *offsets, flip)

    def __iter__(self) -> Iterator[list[ViewKey]]:
        for _, rows in self.shares():
            yield [self.key(row) for row in range(rows.start, rows.stop)]

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)


# ---------------------------------------------------------------------------------------------------------------
# the data path


@dataclass
class StreamingData:
    """Image files decoded per epoch in DataLoader workers: kd.datapath.DataPath's streaming implementation."""

    train: FileSplit
    val: Optional[FileSplit]
    test: FileSplit
    recipe: Recipe
    mean: Tensor  # (1, C, 1, 1) on the device
    std: Tensor
    num_workers: int = 0
    channels_last: bool = False
    classes: list[str] = field(default_factory=list)
    digest: str = "sampled"  # what train_digest reads of each file: "sampled" or "full"
    _train_digest: Optional[str] = field(default=None, repr=False)
    _labels: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_files(
        cls, source: FileSplits, train: FileSplit, val: Optional[FileSplit], mean: Tensor, std: Tensor,
        augmentation: tuple[int, bool], channels_last: bool = False,
    ) -> "StreamingData":
        """A source's files (train and val as held out of its training split); augmentation = (crop_padding, hflip)."""
        padding, hflip = augmentation
        recipe = Recipe(source.recipe, source.image_size, hflip, padding if source.recipe == "pad_crop" else 0)
        return cls(train, val, source.test, recipe, mean, std, source.num_workers, channels_last,
                   list(source.classes), source.digest)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def splits(self) -> tuple[str, ...]:
        return ("val", "test") if self.val is not None else ("test",)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return 3, self.recipe.size, self.recipe.size

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def train_labels(self) -> Tensor:
        return self.split_labels("train")

    def split_labels(self, split: str) -> Tensor:
        if split not in self._labels:
            self._labels[split] = self._split(split).labels.to(self.device)
        return self._labels[split]

    def inputs(self, views: Tensor) -> Tensor:
        """Network inputs: normalised floats, in NHWC memory order when channels_last is on."""
        x = normalize(views, self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def sample_inputs(self, n: int) -> Tensor:
        """The first n training images' evaluation views, as network inputs (decoded here, in this process)."""
        views = Views(self.train, self.recipe, "sample")
        return self.inputs(self._moved(collate([views[i] for i in range(min(n, len(views)))], self.recipe.size)[0]))

    def epoch(self, seed: int, epoch: int, batch_size: int) -> Iterator[Batch]:
        """The epoch's batches, this rank's share of each, decoded by the workers in the order of the epoch."""
        sampler = ShareSampler(self._plan(seed, epoch, batch_size), seed, epoch, batch_size)
        loader = self._loader(Views(self.train, self.recipe, "train"), sampler)
        for (size, rows), batch in zip(sampler.shares(), loader):
            views, labels, index = checked(batch)
            yield Batch(self._moved(views), self._moved(labels), self._moved(index), rows, size)

    def evaluation(self, split: str, batch_size: int) -> Iterator[Tensor]:
        """This rank's contiguous share of a split (distributed.shard), in order, as evaluation views."""
        files = self._split(split)
        share = distributed.shard(len(files))
        batches = [list(range(s, min(s + batch_size, share.stop))) for s in range(share.start, share.stop, batch_size)]
        for batch in self._loader(Views(files, self.recipe, split), batches):
            yield self._moved(checked(batch)[0])

    def train_digest(self) -> str:
        """The training split's content address (the teacher cache's key): see files_digest for what it covers."""
        if self._train_digest is None:
            self._train_digest = files_digest(self.train, self.recipe, self.classes, self.digest)
        return self._train_digest

    def _plan(self, seed: int, epoch: int, batch_size: int) -> EpochPlan:
        """The epoch's order (and pad_crop's offsets and flips), drawn as the in-memory path draws them."""
        padding, hflip = (self.recipe.padding, self.recipe.hflip) if self.recipe.kind == "pad_crop" else (0, False)
        return epoch_plan(self.num_train, batch_size, padding, hflip, epoch_generator(seed, epoch), torch.device("cpu"))

    def _loader(self, views: Views, batches) -> DataLoader:
        # A private generator for the workers' base seed: the DataLoader would otherwise draw it from the global
        # RNG, and the runs of the two paths would differ wherever it is used (dropout).
        return DataLoader(views, batch_sampler=batches, num_workers=self.num_workers,
                          collate_fn=functools.partial(collate, size=self.recipe.size),
                          pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(0))

    def _moved(self, tensor: Tensor) -> Tensor:
        """A collated CPU tensor on the device: from the DataLoader's pinned memory, without blocking the host."""
        return tensor if self.device.type == "cpu" else tensor.to(self.device, non_blocking=True)

    def _split(self, split: str) -> FileSplit:
        found = getattr(self, split) if split in ("train", "val", "test") else None
        if found is None:
            raise ValueError(f"this dataset has no {split} split")
        return found


# ---------------------------------------------------------------------------------------------------------------
# the training data's content address

SAMPLE_BYTES = 4096  # a page: what one read costs anyway


def files_digest(files: FileSplit, recipe: Recipe, classes: list[str], mode: str = "sampled") -> str:
    """sha256 of the training split as the views see it, without reading every byte of 1.28 M files.

    Covers: the class names in label order; every file in split order, by its path relative to the dataset root,
    its label, its size in bytes, and its first and last SAMPLE_BYTES bytes (the whole file when it is at most twice
    that) with mode "sampled", or all its bytes with mode "full"; the view recipe (size, crop, padding, flip); and the
    decoders' versions (simplejpeg, Pillow, torch's resize). Does not cover, with mode "sampled": bytes between the
    first and last 4 KiB of a larger file when its size stays the same (a JPEG re-encoded or edited keeps neither its
    size nor its ends in practice; a same-size patch in the middle of the entropy-coded data, e.g. bit rot, goes
    unnoticed: use digest=full for certainty). File times and the root's location are left out on purpose: a copy
    of the data elsewhere keeps its address. Reads 8 KiB of each file, 16 files at a time.
    """
    header = {"classes": classes, "count": len(files), "recipe": asdict(recipe), "decoders": DECODERS, "mode": mode}
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    labels = files.labels.tolist()
    fingerprint = functools.partial(file_fingerprint, mode=mode)
    with ThreadPoolExecutor(16) as pool:  # file reads release the GIL: the opens and seeks overlap
        for start in range(0, len(files), 4096):  # in chunks: never a future per file of ImageNet at once
            stop = min(start + 4096, len(files))
            for i, part in zip(range(start, stop), pool.map(fingerprint, (files.path(i) for i in range(start, stop)))):
                digest.update(files.paths[i] + f"|{labels[i]}|".encode() + part)
    return digest.hexdigest()


def file_fingerprint(path: Path, mode: str = "sampled") -> bytes:
    """sha256 of a file's size and of its first and last SAMPLE_BYTES bytes (mode "sampled") or all of it ("full");
    an empty or missing file is refused, naming it."""
    content = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ValueError(f"{path} is empty (0 bytes): replace or delete it, then run again.")
        content.update(size.to_bytes(8, "little"))
        if mode == "full" or size <= 2 * SAMPLE_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                content.update(block)
        else:
            content.update(f.read(SAMPLE_BYTES))
            f.seek(size - SAMPLE_BYTES)
            content.update(f.read(SAMPLE_BYTES))
    return content.digest()
