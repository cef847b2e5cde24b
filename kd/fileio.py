"""Files written whole or not at all, and read back with checks: atomic writes (a reader sees the old file or the
new one, never half), JSON and JSON-lines records, checkpoints (saved atomically, loaded without running pickled
code), sha256 of files and tensors, and the lock that makes one process the only writer of a run folder. A write the
user can fix (a read-only folder, a full disk) raises CannotWrite, one line naming the path and the fix.
"""
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import pickle
import platform
import re
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file


class CannotWrite(OSError):
    """A write refused for a reason the user can fix: a read-only folder, no permission, a full disk. Its text is one
    line naming the path and the fix. An OSError still, so code that goes on without an optional cache catches it."""

    def __str__(self) -> str:
        return str(self.strerror)  # the whole line (kept in strerror, so the error pickles across processes)


READ_ONLY_FIX = ("Make its folder writable, or use a writable one (hydra.run.dir=..., hydra.sweep.dir=..., "
                 "teacher_store=...).")
FULL_DISK_FIX = ("Free space on that disk (or raise the quota), then run the same command again: what was written "
                 "before is intact, and a run resumes from its last checkpoint.")
READ_ONLY_ERRORS = (errno.EROFS, errno.EACCES, errno.EPERM)
FULL_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def writing(path: Path, read_only_fix: Optional[str] = None) -> Iterator[None]:
    """Turn an OSError the user can fix (a read-only folder, no permission, a full disk) raised in the body into
    CannotWrite naming `path` and the fix (`read_only_fix`, if given, for the first two); any other OSError (a bug, a
    failing disk) passes unchanged, traceback and all."""
    try:
        yield
    except CannotWrite:
        raise
    except OSError as error:
        if error.errno in FULL_DISK_ERRORS:
            fix = FULL_DISK_FIX
        elif error.errno in READ_ONLY_ERRORS:
            fix = read_only_fix or READ_ONLY_FIX
        else:
            raise
        why = error.strerror or os.strerror(error.errno)
        raise CannotWrite(error.errno, f"{path}: cannot be written ({why}). {fix}") from error


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a write may take fewer): the one primitive every record goes through."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers see the old or the new file, never half.
    A read-only folder or a full disk raises CannotWrite naming `path`, and the temporary file is removed."""
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(fd, _FILE_MODE)  # mkstemp's files are private (0600); records are read by others too
                write_all(f.fileno(), data)
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def check_writable(folder: Path, read_only_fix: Optional[str] = None) -> None:
    """Create `folder` if needed and check that a file can be created in it (an unnamed one where the OS allows:
    nothing is left behind); CannotWrite naming the folder and the fix when it cannot."""
    with writing(folder, read_only_fix):
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass


def write_json(path: Path, record: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


class CorruptRecord(ValueError):
    """A record file that is not what this repository wrote: truncated, edited, or of another kind."""


def read_json(path: Path, fix: str) -> dict[str, Any]:
    """A JSON object from `path`; a damaged file raises CorruptRecord naming it, with `fix` (what to do)."""
    try:
        record = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptRecord(f"{path} is damaged (not valid JSON: {error}). {fix}") from None
    if not isinstance(record, dict):
        raise CorruptRecord(f"{path} is damaged (a JSON {type(record).__name__}, not an object). {fix}")
    return record


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Add one line; a write that fails (a full disk) is cut off again, so no half line is left behind."""
    with writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                write_all(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
            except OSError:
                os.ftruncate(fd, end)  # frees what the line took, so this works on a full disk too
                raise
        finally:
            os.close(fd)


def keep_epochs(path: Path, last_epoch: int) -> None:
    """Cut metrics.jsonl back to epochs 1..last_epoch (lines of an epoch whose checkpoint never landed go)."""
    kept = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line half-written when the process died
                continue
            if record.get("epoch", math.inf) <= last_epoch:
                kept.append(line + "\n")
    if kept:
        atomic_write_bytes(path, "".join(kept).encode())
    else:  # a fresh start: no file until the first epoch is done
        path.unlink(missing_ok=True)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save through a temporary file, so a crash mid-write leaves the previous checkpoint intact.

    Serialised in memory first: torch.save names the archive inside the file after the file it writes to, so saving
    to a randomly named temporary file would give equal payloads different bytes (and sha256s).
    """
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


class UnusableCheckpoint(ValueError):
    """A checkpoint that cannot be read as tensors and plain values, or lacks what its reader needs."""


class UnsafeCheckpoint(UnusableCheckpoint):
    """A checkpoint whose pickle holds objects other than tensors and plain values (never built); `weights_keys`:
    its top-level keys that hold a dict of tensors alone (each readable by itself: load_checkpoint_entry)."""

    def __init__(self, message: str, weights_keys: Sequence[str] = ()):
        super().__init__(message)
        self.weights_keys = list(weights_keys)


def load_checkpoint(path: Path, required: tuple[str, ...], device: torch.device | str = "cpu") -> dict[str, Any]:
    """torch.load with weights_only=True (never runs pickled code); refuse a truncated, corrupt or incomplete file,
    and one holding other objects, naming the key that holds each."""
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        if _refused_global(error) is None:
            raise UnusableCheckpoint(_unreadable(path, error)) from None
        held = _load_with_placeholders(path, device)  # which keys hold what, still without building any of it
        raise UnsafeCheckpoint(_unsafe_message(path, held), _weights_keys(held)) from None
    except Exception as error:  # truncated zip, garbage bytes
        raise UnusableCheckpoint(_unreadable(path, error)) from None
    missing = [key for key in required if not isinstance(payload, dict) or key not in payload]
    if missing:
        raise UnusableCheckpoint(f"{path} lacks {', '.join(missing)}: not a complete checkpoint of this repository.")
    return payload


def load_checkpoint_entry(path: Path, key: str, device: torch.device | str = "cpu") -> Any:
    """One top-level entry of a checkpoint, weights-only; the objects the file holds under other keys are replaced by
    inert placeholders, never built. The entry itself must hold tensors and plain values alone."""
    payload = _load_with_placeholders(path, device)
    if not isinstance(payload, dict) or key not in payload:
        keys = sorted(map(str, payload))[:10] if isinstance(payload, dict) else type(payload).__name__
        raise UnusableCheckpoint(f"{path} has no top-level key {key!r} (it holds {keys}).")
    if _unbuilt_names(payload[key]):
        raise UnsafeCheckpoint(_unsafe_message(path, {key: payload[key]}))
    return payload[key]


class Unbuilt:
    """Stands in for a class or function a checkpoint's pickle names that is not a tensor or a plain value: the
    weights-only unpickler calls this instead, so none of the file's own code runs; what it is given is dropped."""

    name = ""  # the global it stands in for

    def __new__(cls, *args: Any, **kwargs: Any) -> "Unbuilt":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def append(self, item: Any) -> None:  # a list subclass's items
        pass

    def extend(self, items: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:  # a dict subclass's items
        pass


def _load_with_placeholders(path: Path, device: torch.device | str, limit: int = 64) -> Any:
    """torch.load(weights_only=True) with each global it refuses mapped to an Unbuilt placeholder (one load per
    refused global: torch names one at a time)."""
    stand_ins: list[tuple[type, str]] = []
    while True:
        try:
            with torch.serialization.safe_globals(stand_ins):
                return torch.load(path, map_location=device, weights_only=True)
        except pickle.UnpicklingError as error:
            name = _refused_global(error)
            if name is None or len(stand_ins) >= 2 * limit or any(name == known for _, known in stand_ins):
                raise UnusableCheckpoint(_unreadable(path, error)) from None
            # torch names builtins.open as `open`: map both spellings
            placeholder = type("Unbuilt", (Unbuilt,), {"name": name if "." in name else f"builtins.{name}"})
            stand_ins += [(placeholder, name), (placeholder, f"builtins.{name}")]
        except Exception as error:
            raise UnusableCheckpoint(_unreadable(path, error)) from None


def _refused_global(error: Exception) -> Optional[str]:
    """The class or function a weights-only load refused (an ordinary global, not a blocked module's), if that is why
    it failed."""
    found = re.search(r"Unsupported global: GLOBAL (\S+) was not an allowed global", str(error))
    return found.group(1) if found else None


def _unbuilt_names(tree: Any) -> list[str]:
    """The globals of the placeholders anywhere in a loaded payload."""
    if isinstance(tree, Unbuilt):
        return [tree.name]
    if isinstance(tree, dict):
        tree = [*tree.keys(), *tree.values()]
    if isinstance(tree, (list, tuple, set, frozenset)):
        return sorted({name for item in tree for name in _unbuilt_names(item)})
    return []


def _unsafe_message(path: Path, payload: Any) -> str:
    """Where a payload loaded with placeholders holds objects: `'opt' holds argparse.Namespace`."""
    if isinstance(payload, dict):
        held = [f"{key!r} holds {', '.join(names)}" for key, value in payload.items()
                if (names := _unbuilt_names(value))]
    else:
        held = [f"it is a pickled {', '.join(_unbuilt_names(payload))}"]
    return (f"{path} holds objects other than tensors and plain values ({'; '.join(held)}), which are never "
            "unpickled: nothing from the file was run.")


def _weights_keys(payload: Any) -> list[str]:
    """The top-level keys whose entry is a non-empty dict of tensors (a state_dict), `model` first."""
    if not isinstance(payload, dict):
        return []
    keys = [key for key, value in payload.items() if isinstance(key, str) and isinstance(value, dict) and value
            and all(isinstance(v, torch.Tensor) for v in value.values())]
    return sorted(keys, key=lambda key: key != "model")


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _unreadable(path: Path, error: Exception) -> str:
    """A checkpoint torch.load refused, with torch's reason in one plain line: no terminal codes, no advice to load
    with weights_only=False."""
    text = _ANSI.sub("", str(error)).replace(torch.serialization.UNSAFE_MESSAGE, "")
    text = text.split("WeightsUnpickler error:")[-1].split("Check the documentation of torch.load")[0]
    reason = " ".join(text.replace("Weights only load failed.", "").split())
    reason = reason if len(reason) <= 300 else reason[:297].rsplit(" ", 1)[0] + " ..."
    return (f"{path} is not a readable checkpoint ({type(error).__name__}: {reason}). It is truncated, corrupt, or "
            "holds objects other than tensors and plain values, which are never unpickled: nothing from it was run.")


def sha256_tensors(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' dtypes, shapes and bytes (on the CPU, in order): a content address."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy() if tensor.numel() else b"")
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# one writer per run folder


class FolderBusy(RuntimeError):
    """Another live process holds the run folder's lock; `holder` names it (pid, host, start time)."""

    def __init__(self, message: str, holder: str = ""):
        super().__init__(message)
        self.holder = holder

    def __reduce__(self):  # pickled whole (a broadcast to the other ranks under torchrun)
        return FolderBusy, (str(self), self.holder)


@contextmanager
def folder_lock(folder: Path) -> Iterator[Optional[CannotWrite]]:
    """Hold `<folder>/.lock` (flock) while the body runs, yielding None; a second process is refused, naming the holder.

    The OS releases a flock when its holder dies, so a lock left by a killed run is taken over by the next one;
    the holder's pid, host and start time are written into the file for the message a refused process shows.
    A folder that exists but cannot be written (read-only, no permission, full) yields, without a lock, the
    CannotWrite the caller raises before its first write: it may still read a finished run there, which no run writes
    again. A folder that cannot be created raises it.
    """
    fix = f"Make {folder} writable, or give this run another folder (hydra.run.dir=... / hydra.sweep.dir=...)."
    with writing(folder, fix):
        folder.mkdir(parents=True, exist_ok=True)
    path, refusal = folder / ".lock", None
    try:
        with writing(folder, fix):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except CannotWrite as error:
        refusal = error
    if refusal is not None:
        yield refusal
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process that has not written its name yet"
        os.close(fd)
        raise FolderBusy(
            f"{folder} is in use by another run ({holder}). Wait for it to finish, or give this run another folder "
            "(hydra.run.dir=... / hydra.sweep.dir=...).", holder
        ) from None
    try:
        _sign_lock(fd, folder, fix)
        remove_stale_temporaries(folder)
        yield None
    finally:
        os.close(fd)  # releases the flock


def _sign_lock(fd: int, folder: Path, fix: str) -> None:
    """Write the holder's pid, host and start time into the lock file."""
    started = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
    with writing(folder, fix):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {platform.node()}, started {started}\n".encode(), 0)


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files of writes a killed process left in `folder` (call while holding its lock: no
    live writer can be using them). Readers never open them; this only keeps the folder clean."""
    for path in Path(folder).glob(".*.tmp"):
        path.unlink(missing_ok=True)
