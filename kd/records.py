"""What a run leaves in its folder and what a sweep leaves in its own: the records, the rules that compare them (which
keys a resume, a relaunch or a report may ignore), and the facts they carry. Writing them (atomically, once, by the
run that holds the folder's lock) is kd.fileio's.

A run folder holds `run.json` (the run's own record: overrides, resolved config, W&B id; written once the run has
passed its checks), `train.log`, `metrics.jsonl`, `last.pt`/`best.pt`, `result.json` (the final record: a pure
function of config, code and data, so an interrupted and resumed run writes the same bytes), `run_info.json`
(what varies between executions: wall time, resumes, environment, speed) and `.lock` (held for the run's life).
A sweep folder holds `sweep.json`: its grid of jobs, checked before a relaunch may add to it.
"""
import hashlib
import itertools
import platform
import subprocess
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

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
