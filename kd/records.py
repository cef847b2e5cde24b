"""What a run leaves in its folder: metrics.jsonl, result.json, checkpoints, and the facts they carry."""
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parent.parent


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python values (what W&B, result.json and checkpoints store)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def model_name(model_cfg: DictConfig) -> str:
    """A model node's name: the factory its `_target_` names (e.g. resnet20)."""
    return model_cfg._target_.rsplit(".", 1)[-1]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, record: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


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
    """torch.save through a temporary file, so a crash mid-write leaves the previous checkpoint intact."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        with open(tmp, "rb") as f:  # on disk before the rename, so a power cut cannot leave an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class UnusableCheckpoint(ValueError):
    """A checkpoint that cannot be read as tensors and plain values, or lacks what its reader needs."""


def load_checkpoint(path: Path, required: tuple[str, ...], device: torch.device | str = "cpu") -> dict[str, Any]:
    """torch.load with weights_only=True (never runs pickled code); refuse a truncated, corrupt or incomplete file."""
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # truncated zip, garbage bytes, or a pickle that wants to build arbitrary objects
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise UnusableCheckpoint(
            f"{path} is not a readable checkpoint ({type(error).__name__}: {reason}). It is truncated, corrupt, or "
            "holds objects other than tensors and plain values, which are never unpickled."
        ) from None
    missing = [key for key in required if not isinstance(payload, dict) or key not in payload]
    if missing:
        raise UnusableCheckpoint(f"{path} lacks {', '.join(missing)}: not a complete checkpoint of this repository.")
    return payload


_ABSENT = object()  # a key only one side has


def config_differences(recorded: dict[str, Any], current: dict[str, Any], ignored: tuple[str, ...]) -> list[str]:
    """`key: recorded -> current` for each dotted key whose value differs, skipping `ignored` keys and subtrees."""
    old, new = flatten(recorded), flatten(current)
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


def profile_model(model: nn.Module, image_shape: tuple[int, ...], batch_size: int, device: torch.device) -> dict:
    """Eval-mode forward speed on this device: median batch-1 latency and throughput at batch_size."""
    was_training = model.training
    model.eval()
    profile = {}
    for batch, name in ((1, "latency_ms"), (batch_size, "throughput_img_s")):
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
        _synchronize(inputs.device)
        start = time.perf_counter()
        model(inputs)
        _synchronize(inputs.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _synchronize(device: torch.device) -> None:
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
