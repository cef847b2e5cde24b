"""What a run leaves in its folder and what a sweep leaves in its own: the records, the rules for writing them
(atomically, once, by the run that owns the folder), and the facts they carry.

A run folder holds `run.json` (the run's own record: overrides, resolved config, W&B id; written once the run has
passed its checks), `train.log`, `metrics.jsonl`, `last.pt`/`best.pt`, `result.json` (the final record: a pure
function of config, code and data, so an interrupted and resumed run writes the same bytes), `run_info.json`
(what varies between executions: wall time, resumes, environment, speed) and `.lock` (held for the run's life).
A sweep folder holds `sweep.json`: its grid of jobs, checked before a relaunch may add to it.
"""
import errno
import fcntl
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import platform
import re
import statistics
import subprocess
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parent.parent

# Data-source settings that say where or how to fetch the data, not what it is: how many workers decode it, whether
# it is held in memory or streamed (the same views either way), and what the teacher cache's address of it reads.
SOURCE_NEUTRAL = ("download", "cache_dir", "num_workers", "path", "in_memory_max_gb", "digest")
# Keys that change nothing a run computes: a run folder may be resumed, and a sweep relaunched, with other values of
# these, and a report puts runs that differ only here in one group.
RESULT_NEUTRAL = (
    "logger", "device", "progress_bar", "threads", "profile", "eval_batch_size", "teacher_store",
    "teacher_lock_timeout_s", "train_missing_teacher", "teacher_acc_tolerance", "retrain_teacher",
    # What a run shows while it runs, and the name of its folder.
    "progress_every_s", "run_name",
    *(f"dataset.source.{key}" for key in SOURCE_NEUTRAL),
    # float32 cache entries are bit-exact, so reading the teacher from the cache or live gives the same run.
    "teacher_cache", "teacher_cache_dir", "teacher_cache_max_gb",
    # How a teacher file is read, not which weights: the student's records cite the file by sha256.
    "teacher_checkpoint_key",
)
# A teacher run never reads these (a teacher trained on demand carries its student's values).
TEACHER_PHASE_NEUTRAL = ("loss", "student", "teacher_seed", "teacher_checkpoint", "pair_hparams", "teacher_cache_dtype")


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python values (what W&B, result.json and checkpoints store); pair_hparams holds
    only the keys set (None leaves the loss option's own value), as it did before it was typed, so runs recorded
    then resume, and group in a report, with runs recorded now."""
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if isinstance(plain.get("pair_hparams"), dict):
        plain["pair_hparams"] = {k: v for k, v in plain["pair_hparams"].items() if v is not None}
    return plain


def model_name(model_cfg: DictConfig) -> str:
    """A model node's name: the factory its `_target_` names (e.g. resnet20), then the model's name for the options
    that build any model of a library (torchvision_model-resnet34, timm_model-mobilenetv3_small_100)."""
    factory = model_cfg._target_.rsplit(".", 1)[-1]
    return f"{factory}-{model_cfg.name}" if model_cfg.get("name") else factory


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


_ABSENT = object()  # a key only one side has


# Criteria recorded under the modules they lived in before kd/methods/ (one file per method): the same classes, so a
# run recorded then resumes, is returned and is grouped in a report as one recorded now.
MOVED_TARGETS = {
    f"kd.{module}.{name}": f"kd.methods.{file}.{name}"
    for module, file, names in (
        ("losses", "base", ("CELoss", "Combined")), ("losses", "kd", ("KDLoss", "SoftTargets")),
        ("losses", "dkd", ("DKDLoss",)), ("losses", "dist", ("DISTLoss",)),
        ("feature_losses", "fitnet", ("FitNetLoss",)), ("feature_losses", "at", ("ATLoss",)),
        ("feature_losses", "sp", ("SPLoss",)), ("feature_losses", "pkt", ("PKTLoss",)),
        ("feature_losses", "rkd", ("RKDLoss",)), ("feature_losses", "crd", ("CRDLoss",)),
        ("feature_losses", "vid", ("VIDLoss",)), ("feature_losses", "nst", ("NSTLoss",)),
        ("feature_losses", "cc", ("CCLoss",)), ("review_kd", "reviewkd", ("ReviewKDLoss",)),
    )
    for name in names
}


def flatten_config(config: dict[str, Any]) -> dict[str, Any]:
    """A recorded config as dotted keys (flatten), each `_target_` under the name its class has now (MOVED_TARGETS)."""
    flat = flatten(config)
    return {k: MOVED_TARGETS.get(v, v) if k.endswith("_target_") and isinstance(v, str) else v for k, v in flat.items()}


def config_differences(recorded: dict[str, Any], current: dict[str, Any], ignored: tuple[str, ...]) -> list[str]:
    """`key: recorded -> current` for each dotted key whose value differs, skipping `ignored` keys and subtrees."""
    old, new = flatten_config(recorded), flatten_config(current)
    show = lambda tree, key: repr(tree[key]) if key in tree else "absent"  # noqa: E731
    changed = (k for k in old.keys() | new.keys() if old.get(k, _ABSENT) != new.get(k, _ABSENT))
    keys = sorted(k for k in changed if not is_under(k, ignored))
    return [f"{k}: {show(old, k)} -> {show(new, k)}" for k in keys]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and empty dicts are leaves."""
    if isinstance(tree, dict) and tree:
        return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.removesuffix("."): tree}


def is_under(key: str, roots: Sequence[str]) -> bool:
    """Whether a dotted key is one of `roots` or inside one of them."""
    return any(key == root or key.startswith(root + ".") for root in roots)


def sha256_tensors(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' dtypes, shapes and bytes (on the CPU, in order): a content address."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy() if tensor.numel() else b"")
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


# ---------------------------------------------------------------------------------------------------------------
# sweeps: the grid of jobs, from the sweep's arguments


def sweep_grid(params: dict[str, str], overrides: Sequence[str]) -> list[tuple[str, ...]]:
    """The jobs Hydra's basic sweeper runs for these sweeper params and command-line overrides (its cartesian
    product, in its order), each as its list of `key=value` overrides; parsed with Hydra's own parser."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    arguments = [f"{k}={v}" for k, v in params.items()] + list(overrides)
    choices: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        if override.is_sweep_override():
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
    return [tuple(job) for job in itertools.product(*choices.values())]


def bounded_name(name: str, limit: int = 200) -> str:
    """A folder name for `name`: slashes escaped, and cut to `limit` bytes with a hash of the whole appended when
    longer (filesystems allow 255 bytes per name)."""
    name = name.replace("%", "%25").replace("/", "%2F")
    encoded = name.encode()
    if len(encoded) <= limit:
        return name
    digest = hashlib.sha256(encoded).hexdigest()[:12]
    return encoded[: limit - 13].decode(errors="ignore") + "_" + digest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, image_shape: tuple[int, ...], device: torch.device) -> int:
    """Forward FLOPs for one image (torch.utils.flop_counter counts a multiply-add as 2 FLOPs), eval mode."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, *image_shape, device=device))
    model.train(was_training)
    return counter.get_total_flops()


def profile_model(
    model: nn.Module, image_shape: tuple[int, ...], batch_size: int, device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> dict:
    """Eval-mode forward speed on this device in the run's precision: median batch-1 latency and throughput at
    batch_size."""
    was_training = model.training
    model.eval()
    profile = {}
    for batch, name in ((1, "latency_ms"), (batch_size, "throughput_img_s")):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            seconds = _median_forward_seconds(model, torch.zeros(batch, *image_shape, device=device))
        profile[name] = seconds * 1e3 if batch == 1 else batch / seconds
    model.train(was_training)
    return profile


@torch.inference_mode()
def _median_forward_seconds(model: nn.Module, inputs: torch.Tensor, budget_s: float = 0.5) -> float:
    """Median of timed forwards after two warm-up ones; at least 3 and at most 50, within about budget_s."""
    for _ in range(2):
        model(inputs)
    times: list[float] = []
    while len(times) < 3 or (sum(times) < budget_s and len(times) < 50):
        synchronize(inputs.device)
        start = time.perf_counter()
        model(inputs)
        synchronize(inputs.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA; the CPU runs eagerly), so the host clock measures it: every timing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, so a number can be traced to what produced it."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "hostname": platform.node(),
        "git_commit": git_commit(),
    }
