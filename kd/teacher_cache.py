"""Teacher-output cache: the frozen teacher's logits for every augmented view of an epoch, on disk.

Student jobs that share a teacher and a data seed (a sweep over alpha, temperature or student width) draw the
same batches and the same augmented views, so the teacher's outputs are the same for all of them. The first job
to reach an epoch stores them; later and parallel jobs read them instead of running the teacher. The teacher and
the student still see the same view of each image ("consistent teaching", Beyer et al. 2022): what is cached is
the output for the exact view of that epoch, not one per image.

An entry is a folder named by a hash of everything the outputs depend on (`key.json`), holding one
`epoch_NNNN.pt` per epoch: rows in the order the epoch visits the training set. Files are written through a
temporary file and renamed, so parallel writers of the same epoch are harmless (their bytes are identical) and a
reader never sees a partial file. With float32 storage a student trained from the cache is bit-identical to one
trained with the live teacher.
"""
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from kd import records

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TeacherCache:
    """One cache entry: `load(epoch)` the stored logits or None, `save(epoch, logits)` after a live epoch."""

    def __init__(self, root: Path, key: dict[str, Any], shape: tuple[int, int], dtype: str, max_bytes: float):
        if dtype not in DTYPES:
            raise ValueError(f"teacher_cache_dtype={dtype}: must be one of {', '.join(DTYPES)}.")
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.root, self.dir = Path(root), Path(root) / digest
        self.key, self.shape, self.dtype, self.max_bytes = key, shape, DTYPES[dtype], max_bytes
        self.hits = self.misses = 0
        self.full = False  # set when this entry alone would exceed max_bytes: stop writing, keep reading

    def load(self, epoch: int) -> Optional[Tensor]:
        """The epoch's teacher logits (float32, CPU), or None when not stored (or unreadable: then rewritten)."""
        path = self._file(epoch)
        try:
            logits = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            self.misses += 1
            return None
        except Exception as error:  # a damaged file is a miss: the live teacher recomputes and replaces it
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            log.warning("teacher cache file %s is unreadable (%s): recomputing it", path, reason)
            self.misses += 1
            return None
        if tuple(logits.shape) != self.shape or logits.dtype != self.dtype:
            log.warning("teacher cache file %s holds %s %s, expected %s %s: recomputing it",
                        path, tuple(logits.shape), logits.dtype, self.shape, self.dtype)
            self.misses += 1
            return None
        self.hits += 1
        os.utime(self.dir)  # recency for the least-recently-used eviction
        return logits.float()

    def save(self, epoch: int, logits: Tensor) -> None:
        """Store an epoch's logits (unless the size bound forbids it), then evict old entries beyond the bound."""
        if self.full:
            return
        size = logits.numel() * self.dtype.itemsize
        if size + self.size_bytes() > self.max_bytes:
            log.warning("teacher cache entry %s would exceed teacher_cache_max_gb=%g: not storing more epochs "
                        "(raise it, or use teacher_cache_dtype=bfloat16)", self.dir, self.max_bytes / 1e9)
            self.full = True
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            records.write_json(self.dir / "key.json", self.key)
            records.save_checkpoint(self._file(epoch), logits.to("cpu", self.dtype).contiguous())
        except OSError as error:  # e.g. another job evicted this entry meanwhile: the run goes on without it
            log.warning("could not store teacher outputs in %s (%s)", self.dir, error)
            return
        self._evict()

    def size_bytes(self) -> int:
        return _folder_bytes(self.dir)

    def _file(self, epoch: int) -> Path:
        return self.dir / f"epoch_{epoch:04d}.pt"

    def _evict(self) -> None:
        """Delete the least recently used other entries while the cache is over its bound."""
        entries = [p for p in self.root.iterdir() if p.is_dir() and p != self.dir]
        sizes = {p: _folder_bytes(p) for p in entries}
        total = sum(sizes.values()) + self.size_bytes()
        for entry in sorted(entries, key=_mtime):
            if total <= self.max_bytes:
                break
            log.info("teacher cache over teacher_cache_max_gb: deleting %s", entry)
            shutil.rmtree(entry, ignore_errors=True)
            total -= sizes[entry]


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
