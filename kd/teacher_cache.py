"""Teacher-output cache: the frozen teacher's logits for every augmented view of an epoch, on disk.

Student jobs that share a teacher and a data seed (a sweep over alpha, temperature or student width) draw the
same batches and the same augmented views, so the teacher's outputs are the same for all of them. The first job
to reach an epoch stores them; later and parallel jobs read them instead of running the teacher. The teacher and
the student still see the same view of each image ("consistent teaching", Beyer et al. 2022): what is cached is
the output for the exact view of that epoch, not one per image.

An entry is a folder named by a hash of everything the outputs depend on (`key.json`): the training data's content,
the teacher's weights (sha256), the code that computes the outputs (the teacher's own model code, model_code, and the
rest by OUTPUT_CODE_VERSION), the views (seed, batch size, augmentation), the numerics (precision, memory layout,
device type, torch version) and the storage dtype. It holds one `epoch_NNNN.pt` per epoch: rows in the order the
epoch visits the training set, with the entry's key, the epoch and a sha256 of the rows, all verified when read; a
file that fails is deleted, reported and recomputed, never used. Files are written through a temporary file and
renamed, so parallel writers of the same epoch are harmless (their bytes are identical) and a reader never sees a
partial file.

Eviction deletes only what the cache can prove it wrote: a folder named by the digest of the key.json it holds, with
nothing in it but key.json, epoch files and the atomic writer's temporaries. Anything else in the cache folder (a
user's results, another tool's files) is never deleted nor counted against the bound. Writes and eviction hold
`<root>/.teacher_cache.lock`, so parallel jobs of a sweep never evict an entry that another is writing. A read-only
cache is read where its files verify; a damaged file is skipped (not deleted), and nothing is written into it.

The live teacher and the cache hand the loss float32 logits under every precision. With float32 storage (the
default) a student trained from the cache is therefore bit-identical to one trained with the live teacher, in fp32,
bf16 and fp16 alike; bfloat16 storage is exact under bf16 autocast (the teacher's logits are bf16 numbers there) and
rounds them otherwise.
"""
import fcntl
import hashlib
import importlib
import importlib.metadata
import inspect
import json
import logging
import os
import re
import sys
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from kd import fileio
from kd.data import to_device

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The code that computes a cached output, besides the teacher's model (model_code keys each teacher by its own): the
# frozen teacher's preparation (BatchNorm folding), the views (order, crops, flips, normalisation) and the loop's
# teacher pass under autocast. Each version maps to the sha256 of that code (output_code_digest); tests/test_records.py
# fails when the code no longer matches the newest entry. Then add an entry {N + 1: <new digest>}: the key changes and
# no older output is read again.
OUTPUT_CODE = ("kd.teachers.fold_batchnorm", "kd.teachers.build", "kd.loop.EpochTeacher",
               "kd.datapath.InMemoryData.inputs", "kd.datapath.InMemoryData.epoch", "kd.loop.autocast",
               "kd.data.draw_augmentation",
               "kd.data.crop_and_flip", "kd.data.epoch_plan", "kd.data.normalize", "kd.data.epoch_generator",
               "kd.teacher_cache.EpochOutputs", "kd.teacher_cache.RecordedEpoch", "kd.teacher_cache.chunk_rows")
OUTPUT_CODE_VERSIONS = {1: "2b235ce38fda365f360ebbd6c57a103f928d2a9f0e30d7d9b140c82f2644d2b4",
                        # 2: kd/models declare "preact" layers and name kd.methods.hooks (no forward changed)
                        2: "f4c746105add9d7b890d816654cdff0d846c20fd81fba655d7092657da9e6813",
                        # 3: kd/models declare "stem" layers (FSP's; no forward changed)
                        3: "81a6d846d0a0836da62e98452bd3dced1bc2f819c7efb6e898bf25cad1b94e59",
                        # 4: kd/models left this list: each teacher's own model code is in its key (model_code)
                        4: "edb63b580230f8c1621d34736c2a751f647ef359891d8b15f147beab648b5f46",
                        # 5: an epoch's outputs stream to and from host memory in chunks (RecordedEpoch; same rows)
                        5: "e4ab0d4c1a0e5abe0f2af8356a5faed305d2ac87f221dcb0da805270dd2d6a23",
                        # 6: CPU runs channels-last again, strided 1x1 convolutions routed (kd.cpu_conv), with 5's
                        # chunked epochs
                        6: "2cc912a3e5f850886302351b6ae45faf1830f53cc46bdf92be563c8d4397ec3d"}
OUTPUT_CODE_VERSION = max(OUTPUT_CODE_VERSIONS)


def output_code_digest() -> str:
    """sha256 of the source of OUTPUT_CODE (functions and classes by name)."""
    digest = hashlib.sha256()
    for name in OUTPUT_CODE:
        module, _, attribute = name.partition(".")[2].partition(".")
        target = importlib.import_module(f"kd.{module}")
        for part in attribute.split("."):
            target = getattr(target, part)
        digest.update(inspect.getsource(target).encode())
    return digest.hexdigest()


def model_code(teacher: nn.Module, factory: str) -> dict[str, Any]:
    """The model code a teacher's outputs depend on: the source of the kd modules that define its classes and its
    factory (`_target_`), and the kd modules those name (kd.models' shared layers), hashed; and the version of each
    library (torchvision, timm) whose classes or functions they use (torch's is in the cache key already). A model
    file this teacher never uses is in none of them, so adding or editing one changes no other teacher's key."""
    names = {type(module).__module__ for module in teacher.modules()} | {factory.rpartition(".")[0]}
    project, libraries = _code_closure(names)
    digest = hashlib.sha256()
    for name in sorted(project):
        digest.update(f"{name}\n".encode() + Path(sys.modules[name].__file__).read_bytes())
    return {"modules": sorted(project), "sha256": digest.hexdigest(), "libraries": libraries}


def _code_closure(names: set[str]) -> tuple[set[str], dict[str, str]]:
    """The kd modules among `names` and those their globals name, transitively; the versions of the other packages
    they reach (the standard library and torch left out)."""
    project, libraries, pending = set(), {}, set(names)
    while pending:
        name = pending.pop()
        package = name.partition(".")[0]
        if package != "kd":
            if package not in ("torch", "builtins") and package not in sys.stdlib_module_names:
                libraries[package] = _version(package)
            continue
        if name in project:
            continue
        project.add(name)
        pending |= _named_modules(importlib.import_module(name))
    return project, dict(sorted(libraries.items()))


def _named_modules(module: Any) -> set[str]:
    """The modules a module's globals come from: imported modules, and the modules of its functions and classes.
    A package's own submodules are left out: the import system binds each loaded one there, used or not."""
    named = set()
    for value in vars(module).values():
        if inspect.ismodule(value):
            if not value.__name__.startswith(f"{module.__name__}."):
                named.add(value.__name__)
        elif callable(value) and isinstance(getattr(value, "__module__", None), str):
            named.add(value.__module__)
    return named


def _version(package: str) -> str:
    """A package's version: its __version__, else its distribution's."""
    version = getattr(sys.modules.get(package), "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
    return str(version)


# Top-k storage: the classes outside a row's k largest logits get logit (k-th largest - TOPK_GAP), so that
# softmax(z / T) gives them probability exp(-TOPK_GAP / T), which underflows to 0 in float32 for T up to ~100: the
# teacher's distribution is its top k renormalised (Fast Knowledge Distillation, Shen & Xing, ECCV 2022).
TOPK_GAP = 1e4


@dataclass
class EpochOutputs:
    """One epoch's teacher outputs, rows in the epoch's order: dense logits (N, C), or (top_k) the k largest logits
    of each row and their classes, which `rows()` expands back to (B, C) logits on the device, per step."""

    num_classes: int
    logits: Optional[Tensor] = None  # (N, C)
    values: Optional[Tensor] = None  # (N, k), each row descending
    indices: Optional[Tensor] = None  # (N, k)

    @classmethod
    def empty(cls, n: int, num_classes: int, top_k: Optional[int], device: torch.device,
              pin_memory: bool = False) -> "EpochOutputs":
        """Unwritten rows; pin_memory: in page-locked host memory, which a CUDA copy reads or fills asynchronously."""
        if top_k is None:
            return cls(num_classes, logits=torch.empty(n, num_classes, device=device, pin_memory=pin_memory))
        return cls(num_classes, values=torch.empty(n, top_k, device=device, pin_memory=pin_memory),
                   indices=torch.empty(n, top_k, dtype=torch.long, device=device, pin_memory=pin_memory))

    def write(self, rows: slice, logits: Tensor) -> None:
        if self.logits is not None:
            self.logits[rows] = logits
        else:
            self.values[rows], self.indices[rows] = logits.topk(self.values.shape[1], dim=1)

    def rows(self, rows: slice) -> Tensor:
        """float32 (B, C) logits for these rows: stored ones, or the top-k ones with the rest TOPK_GAP below."""
        if self.logits is not None:
            return self.logits[rows]
        values = self.values[rows]
        dense = (values[:, -1:] - TOPK_GAP).expand(-1, self.num_classes).contiguous()
        return dense.scatter_(1, self.indices[rows], values)

    def to(self, device: torch.device) -> "EpochOutputs":
        moved = [to_device(t, device) for t in (self.logits, self.values, self.indices)]
        return EpochOutputs(self.num_classes, *moved)

    def part(self, rows: slice) -> "EpochOutputs":
        """These rows (views, not copies)."""
        return self.map(lambda tensor: tensor[rows])

    def map(self, function: Any) -> "EpochOutputs":
        """The outputs with `function` applied to each stored tensor."""
        return EpochOutputs(self.num_classes, *(None if t is None else function(t)
                                                for t in (self.logits, self.values, self.indices)))

    def num_rows(self) -> int:
        return len(next(iter(self.tensors().values())))

    def tensors(self) -> dict[str, Tensor]:
        found = {"logits": self.logits, "values": self.values, "indices": self.indices}
        return {name: tensor for name, tensor in found.items() if tensor is not None}


# The rows of one chunk of a streamed epoch (StoredEpoch, RecordedEpoch): whole batches, about this many bytes. Two
# chunks are on the device at a time: 128 MB, where a whole ImageNet epoch of dense logits is 5.1 GB.
STREAM_BYTES = 2 ** 26


def chunk_rows(outputs: EpochOutputs, batch_size: int) -> int:
    """Rows per streamed chunk: a whole number of batches, so that a step's rows lie in one chunk."""
    row_bytes = sum(tensor[0].nbytes for tensor in outputs.tensors().values())
    return batch_size * max(1, STREAM_BYTES // (batch_size * row_bytes))


class StoredEpoch:
    """A stored epoch read by the steps: kept in host memory, each chunk of rows moved to the device (_to_device)
    while the steps of the chunk before it run; a step reads its rows there. On the CPU the chunks are the host's
    own rows (views): nothing is copied."""

    def __init__(self, host: EpochOutputs, device: torch.device, batch_size: int):
        self.host, self.device, self.chunk = host, device, chunk_rows(host, batch_size)
        self.chunks: dict[int, EpochOutputs] = {}  # chunk number -> its rows on the device

    def rows(self, rows: slice) -> Tensor:
        """float32 (B, C) logits for these rows, on the device (EpochOutputs.rows)."""
        number = rows.start // self.chunk
        if (rows.stop - 1) // self.chunk != number:  # across two chunks: not a step's rows (whole batches per chunk)
            return self.host.part(rows).map(lambda tensor: _to_device(tensor, self.device)).rows(slice(None))
        for ahead in (number, number + 1):  # the next chunk is queued now, ahead of the steps that read it
            if ahead not in self.chunks and ahead * self.chunk < self.host.num_rows():
                part = self.host.part(slice(ahead * self.chunk, (ahead + 1) * self.chunk))
                self.chunks[ahead] = part.map(lambda tensor: _to_device(tensor, self.device))
        for done in [n for n in self.chunks if n < number]:
            del self.chunks[done]
        start = number * self.chunk
        return self.chunks[number].rows(slice(rows.start - start, rows.stop - start))


class RecordedEpoch:
    """A live epoch's outputs, collected in host memory: a step writes its rows on the device into its chunk, and
    each full chunk is copied to the host without the host waiting (_to_host); `outputs()` waits for the copies once.
    On the CPU the steps write into the host rows themselves: nothing is copied."""

    def __init__(self, host: EpochOutputs, device: torch.device, batch_size: int):
        self.host, self.device, self.chunk = host, device, chunk_rows(host, batch_size)
        self.chunks: dict[int, tuple[EpochOutputs, int]] = {}  # chunk number -> (its rows on the device, written)
        self.copied: Any = None  # what _to_host returned for the last chunk: waited for in outputs()

    def write(self, rows: slice, logits: Tensor) -> None:
        """Store a step's logits (B, C) as rows `rows` (EpochOutputs.write)."""
        number = rows.start // self.chunk
        if (rows.stop - 1) // self.chunk != number:  # across two chunks: not a step's rows (whole batches per chunk)
            part = self.host.part(rows)
            staged = part if _shares_host(self.device) else _empty_like(part, self.device)
            staged.write(slice(None), logits)
            self.copied = _to_host(staged, part, self.device) or self.copied
            return
        bounds = slice(number * self.chunk, min((number + 1) * self.chunk, self.host.num_rows()))
        if number not in self.chunks:
            part = self.host.part(bounds)
            self.chunks[number] = (part if _shares_host(self.device) else _empty_like(part, self.device), 0)
        staged, written = self.chunks[number]
        staged.write(slice(rows.start - bounds.start, rows.stop - bounds.start), logits)
        self.chunks[number] = (staged, written + rows.stop - rows.start)
        if written + rows.stop - rows.start == bounds.stop - bounds.start:
            self._flush(number)

    def _flush(self, number: int) -> None:
        staged, _ = self.chunks.pop(number)
        part = self.host.part(slice(number * self.chunk, (number + 1) * self.chunk))
        self.copied = _to_host(staged, part, self.device) or self.copied

    def outputs(self) -> EpochOutputs:
        """The epoch's rows in host memory, once every copy has landed (chunks not filled are copied as they are)."""
        for number in sorted(self.chunks):
            self._flush(number)
        _wait(self.copied)
        return self.host


def _empty_like(outputs: EpochOutputs, device: torch.device) -> EpochOutputs:
    return outputs.map(lambda tensor: torch.empty_like(tensor, device=device))


# The device-specific steps of StoredEpoch and RecordedEpoch. The CUDA branches (page-locked memory, non_blocking
# copies, an event) have never run on a GPU in this repository's sessions; on the CPU nothing is copied, and the
# tests make _shares_host False to run the copying path there (synchronous copies).
def _shares_host(device: torch.device) -> bool:
    """Whether the steps can read and write the host rows themselves (a CPU run): no chunk is copied."""
    return device.type == "cpu"


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    """A host tensor's copy on the device, queued on the current stream without the host waiting (CUDA reads a
    pinned copy asynchronously; the caching host allocator keeps it until the copy is done)."""
    if _shares_host(device):
        return host
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device, copy=True)


def _to_host(staged: EpochOutputs, host: EpochOutputs, device: torch.device) -> Any:
    """Copy device rows into (pinned) host rows without the host waiting; what _wait needs to know they landed."""
    if _shares_host(device):
        return None  # the rows were written in place
    for source, target in zip(staged.tensors().values(), host.tensors().values()):
        target.copy_(source, non_blocking=device.type == "cuda")
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()  # on the current stream, after the copies: the device buffers may be reused in stream order
    return event


def _wait(copied: Any) -> None:
    if copied is not None:
        copied.synchronize()  # once per epoch: the last chunk's copy, and in stream order every copy before it


class TeacherCache:
    """One cache entry: `load(epoch)` the stored outputs or None, `save(epoch, outputs)` after a live epoch."""

    def __init__(self, root: Path, key: dict[str, Any], shape: tuple[int, int], dtype: str, max_bytes: float,
                 top_k: Optional[int] = None):
        if dtype not in DTYPES:
            raise ValueError(f"teacher_cache_dtype={dtype}: must be one of {', '.join(DTYPES)}.")
        self.key = {**key, "dtype": dtype, "top_k": top_k, "output_code_version": OUTPUT_CODE_VERSION}
        self.digest = _digest(self.key)  # the folder's name, which eviction checks against the key.json inside
        self.root, self.dir = Path(root), Path(root) / self.digest
        self.shape, self.dtype, self.max_bytes, self.top_k = shape, DTYPES[dtype], max_bytes, top_k
        self.hits = self.misses = self.rejected = 0
        self.full = False  # set when this entry alone would exceed max_bytes: stop writing, keep reading
        self.unwritable = False  # set when a write or deletion failed (a read-only cache): leave the folder alone

    def empty(self, device: torch.device) -> EpochOutputs:
        """Where a live epoch records its outputs, for save()."""
        return EpochOutputs.empty(self.shape[0], self.shape[1], self.top_k, device)

    def recorder(self, device: torch.device, batch_size: int) -> RecordedEpoch:
        """Where a live epoch on `device` records its outputs, in host memory (page-locked for CUDA), for save()."""
        host = EpochOutputs.empty(self.shape[0], self.shape[1], self.top_k, torch.device("cpu"),
                                  pin_memory=device.type == "cuda")
        return RecordedEpoch(host, device, batch_size)

    def load(self, epoch: int) -> Optional[EpochOutputs]:
        """The epoch's teacher outputs (float32, CPU), or None when not stored; a file that fails its checks is
        deleted (left as it is in a read-only cache), counted in `rejected`, and the live teacher recomputes the
        epoch."""
        path = self._file(epoch)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            problem = self._problem(stored, epoch)
        except Exception as error:  # truncated, garbage, or not a dict
            problem = f"unreadable ({type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:120]})"
        if problem:
            self._reject(path, problem)
            self.rejected += 1
            self.misses += 1
            return None
        self.hits += 1
        with suppress(OSError):  # recency for the least-recently-used eviction: best effort (a read-only cache)
            os.utime(self.dir)
        tensors = {name: stored[name] for name in self._names()}
        return EpochOutputs(self.shape[1], **{n: t.float() if n != "indices" else t.long() for n, t in tensors.items()})

    def _reject(self, path: Path, problem: str) -> None:
        """Delete a file that failed its checks; where that fails (a read-only cache), leave it and stop writing."""
        if self.unwritable:
            log.info("teacher cache file %s rejected (%s): skipped, the teacher recomputes this epoch", path, problem)
            return
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            self.unwritable = self.full = True
            log.warning("teacher cache file %s rejected (%s): skipped, the teacher recomputes this epoch. The teacher "
                        "cache folder %s cannot be written (%s): this run reads the files that verify and deletes or "
                        "stores nothing there", path, problem, self.root, error)
            return
        log.warning("teacher cache file %s rejected (%s): deleted, the teacher recomputes this epoch", path, problem)

    def _names(self) -> tuple[str, ...]:
        return ("logits",) if self.top_k is None else ("values", "indices")

    def _shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        n, classes = self.shape
        if self.top_k is None:
            return {"logits": ((n, classes), self.dtype)}
        return {"values": ((n, self.top_k), self.dtype), "indices": ((n, self.top_k), _index_dtype(classes))}

    def _problem(self, stored: Any, epoch: int) -> str:
        """What is wrong with a loaded epoch file ("" when nothing is)."""
        if not isinstance(stored, dict) or not {*self._names(), "sha256", "entry", "epoch"} <= stored.keys():
            return "not an epoch file of this cache"
        if (stored["entry"], stored["epoch"]) != (self.digest, epoch):
            return f"written for entry {stored['entry']} epoch {stored['epoch']}"
        for name, (shape, dtype) in self._shapes().items():
            found = stored[name]
            if tuple(found.shape) != shape or found.dtype != dtype:
                return f"holds {name} {tuple(found.shape)} {found.dtype}, expected {shape} {dtype}"
        if _checksum(self.digest, epoch, *(stored[name] for name in self._names())) != stored["sha256"]:
            return "its checksum does not match its rows"
        return ""

    def save(self, epoch: int, outputs: EpochOutputs) -> None:
        """Store an epoch's outputs (unless the size bound forbids it), then evict old entries beyond the bound."""
        if self.full:
            return
        tensors = {name: tensor.to("cpu", dtype).contiguous()
                   for (name, (_, dtype)), tensor in zip(self._shapes().items(), outputs.tensors().values())}
        size = sum(t.numel() * t.dtype.itemsize for t in tensors.values())
        if size + self.size_bytes() > self.max_bytes:
            log.warning("teacher cache entry %s would exceed teacher_cache_max_gb=%g: not storing more epochs "
                        "(raise it, or use teacher_cache_dtype=bfloat16, or teacher_cache_topk=10)", self.dir,
                        self.max_bytes / 1e9)
            self.full = True
            return
        checksum = _checksum(self.digest, epoch, *tensors.values())
        payload = {**tensors, "sha256": checksum, "entry": self.digest, "epoch": epoch}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with _locked(self.root):  # no other job evicts this entry while it is written, nor writes while we evict
                self.dir.mkdir(exist_ok=True)
                fileio.write_json(self.dir / "key.json", self.key)  # the marker first: eviction proves ownership by it
                fileio.save_checkpoint(self._file(epoch), payload)
                self._evict()
        except OSError as error:  # a read-only or full cache folder
            log.warning("could not store teacher outputs in %s (%s): going on without storing more (reading what is "
                        "stored)", self.dir, error)
            self.full = self.unwritable = True

    def size_bytes(self) -> int:
        return _folder_bytes(self.dir)

    def _file(self, epoch: int) -> Path:
        return self.dir / f"epoch_{epoch:04d}.pt"

    def _evict(self) -> None:
        """Delete the least recently used other entries while the cache is over its bound (call holding the lock).
        Only entries the cache provably wrote are counted and deleted; anything else is left, and warned about."""
        entries, foreign = _survey(self.root)
        if foreign:
            _warn_foreign(self.root, foreign)
        others = [entry for entry in entries if entry != self.dir]
        sizes = {entry: _folder_bytes(entry) for entry in others}
        total = sum(sizes.values()) + self.size_bytes()
        for entry in sorted(others, key=_mtime):
            if total <= self.max_bytes:
                break
            if _remove_entry(entry):
                total -= sizes[entry]


LOCK_NAME = ".teacher_cache.lock"
ENTRY_NAME = re.compile(r"[0-9a-f]{16}")
# What the cache writes into an entry: its key, epoch files, and fileio.atomic_write_bytes' temporaries of both.
ENTRY_FILE = re.compile(r"key\.json|epoch_\d{4}\.pt|\.(key\.json|epoch_\d{4}\.pt)\.\w+\.tmp")


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold the cache folder's lock (flock: the OS drops it when its holder dies), waiting for another holder."""
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _digest(key: Any) -> str:
    """An entry's name: the first 16 hex digits of the sha256 of its key (as JSON, keys sorted)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _owned(entry: Path) -> bool:
    """Whether `entry` is provably a cache entry: a real folder named by the digest of the key in its key.json,
    holding nothing but plain files of the names the cache writes."""
    if not ENTRY_NAME.fullmatch(entry.name) or entry.is_symlink() or not entry.is_dir():
        return False
    try:
        with os.scandir(entry) as found:
            if not all(f.is_file(follow_symlinks=False) and ENTRY_FILE.fullmatch(f.name) for f in found):
                return False
        return _digest(json.loads((entry / "key.json").read_text())) == entry.name
    except (OSError, ValueError):  # gone meanwhile, no key.json, not JSON
        return False


def _survey(root: Path) -> tuple[list[Path], list[str]]:
    """The entries in `root` that the cache provably wrote, and the names of everything else there (its lock aside)."""
    entries, foreign = [], []
    for path in sorted(root.iterdir()):
        if _owned(path):
            entries.append(path)
        elif path.name != LOCK_NAME:
            foreign.append(path.name)
    return entries, foreign


def _remove_entry(entry: Path) -> bool:
    """Delete an entry file by file (its key.json last, so that a remnant is still provable), then its folder.
    Proved again first; a file that is not the cache's is never deleted (the folder then stays). True when gone."""
    if not _owned(entry):
        return False
    log.info("teacher cache over teacher_cache_max_gb: deleting %s", entry)
    try:
        for path in sorted(entry.iterdir(), key=lambda file: file.name == "key.json"):
            if ENTRY_FILE.fullmatch(path.name):
                path.unlink(missing_ok=True)
        entry.rmdir()
    except OSError as error:
        log.warning("teacher cache entry %s could not be deleted entirely (%s): what is left stays", entry, error)
        return False
    return True


_warned_roots: set[str] = set()  # cache folders holding foreign content, each warned about once per process


def _warn_foreign(root: Path, names: list[str]) -> None:
    if str(root) in _warned_roots:
        return
    _warned_roots.add(str(root))
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    log.warning("teacher cache folder %s holds %d item(s) the cache did not write (%s): they are never deleted nor "
                "counted against teacher_cache_max_gb. Set teacher_cache_dir to a folder of its own.", root,
                len(names), shown)


def _checksum(entry: str, epoch: int, *tensors: Tensor) -> str:
    """sha256 binding an epoch file's rows to its entry and epoch: a file copied from elsewhere does not verify."""
    return hashlib.sha256(f"{entry}|{epoch}|{fileio.sha256_tensors(*tensors)}".encode()).hexdigest()


def _index_dtype(num_classes: int) -> torch.dtype:
    """The smallest integer type that holds a class index (int16 up to 32767 classes: ImageNet's 1000 fit)."""
    return torch.int16 if num_classes <= torch.iinfo(torch.int16).max else torch.int32


def _folder_bytes(path: Path) -> int:
    try:
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    except FileNotFoundError:
        return 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
