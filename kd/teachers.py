"""The teacher store: trained teachers filed under a key of what defines them, immutable once filed, and loading
them safely.

An entry `<teacher_store>/<name>/` (name: dataset, model, width, seed and a hash of the identity) holds versions
`v1/`, `v2/`, ...: each `teacher.pt` plus `manifest.json` (identity, resolved config, final result, class names,
sha256 of the weights), written last. A version with a manifest is complete and never modified again (its files are
made read-only); one without is work in progress. A teacher phase whose identity is stored returns the stored
teacher; `retrain_teacher=true` trains and files a new version beside the old, and students use the newest.

The entry's name does not hold the training images' content (known only once the data is loaded, and left out so
that existing entries keep their names): each manifest records the digest of the images its teacher was trained on
(`train_digest`, the data path's train_digest()), and a lookup that knows the data's digest takes the newest version
trained on that data, never one trained on other images. Images added to or replaced in a folder thus get a version
of their own in the same entry.
"""
import glob
import hashlib
import json
import logging
import re
import shlex
import stat
import sys
import tempfile
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.fx
from filelock import FileLock, Timeout
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from kd import fileio, pretrained, published_teachers, records
from kd.checkpoints import TeacherFile, read_teacher_file
from kd.datapath import DataPath
from kd.fileio import read_json, save_checkpoint, sha256_file, write_json
from kd.published_teachers import PUBLISHED_LAYOUT
from kd.records import SOURCE_NEUTRAL, model_name, plain_config

log = logging.getLogger(__name__)

# Keys of the config that change what a teacher learns; everything else (device, logging, the student's recipe, ...)
# does not.
IDENTITY_KEYS = ("dataset", "teacher", "teacher_recipe")
# The training recipe's keys: at the top level the student's, under teacher_recipe the teacher's.
RECIPE_KEYS = ("epochs", "batch_size", "optimizer", "scheduler")


def dataset_identity(dataset_cfg: DictConfig) -> dict[str, Any]:
    """The dataset node as plain values, without the settings that do not change the data."""
    dataset = OmegaConf.to_container(dataset_cfg, resolve=True)
    for key in SOURCE_NEUTRAL:
        dataset["source"].pop(key, None)
    return dataset


def identity(cfg: DictConfig, seed: int) -> dict[str, Any]:
    """What defines a teacher: data, architecture, its own training recipe (teacher_recipe) and seed."""
    return {"dataset": dataset_identity(cfg.dataset), "teacher": OmegaConf.to_container(cfg.teacher, resolve=True),
            "teacher_recipe": OmegaConf.to_container(cfg.teacher_recipe, resolve=True), "seed": seed}


def shared_recipe(cfg: DictConfig) -> bool:
    """Whether the teacher trains with the student's (top-level) recipe: teacher_recipe=student."""
    return OmegaConf.is_interpolation(cfg.teacher_recipe, "epochs")


def entry_dir(cfg: DictConfig, seed: int) -> Path:
    """The store folder for the teacher that cfg defines: readable name plus a hash of its identity."""
    digest = hashlib.sha256(json.dumps(identity(cfg, seed), sort_keys=True).encode()).hexdigest()[:12]
    name = f"{cfg.dataset.name}_{model_name(cfg.teacher)}_w{cfg.teacher.width:g}_seed{seed}_{digest}"
    return Path(cfg.teacher_store) / name


def versions(entry: Path) -> list[Path]:
    """The entry's version folders v1, v2, ... in order."""
    found = [p for p in Path(entry).glob("v*") if re.fullmatch(r"v\d+", p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[1:]))


def newest_complete(entry: Path) -> Optional[Path]:
    """The newest version folder with a manifest (a complete teacher), or None."""
    complete = [v for v in versions(entry) if (v / "manifest.json").is_file()]
    return complete[-1] if complete else None


def pending_version(entry: Path, with_run: bool) -> Path:
    """The version folder a new teacher is filed into: the newest one if it is incomplete (a filing or an on-demand
    training cut short) and fits the caller (`with_run`: it trains in `<version>/run`), else the next number."""
    existing = versions(entry)
    if existing and not (existing[-1] / "manifest.json").exists() and (existing[-1] / "run").exists() == with_run:
        return existing[-1]
    return Path(entry) / f"v{int(existing[-1].name[1:]) + 1 if existing else 1}"


def stored_teacher(cfg: DictConfig, train_digest: str) -> Optional[Path]:
    """The stored teacher of cfg's teacher identity at seed cfg.seed (the teacher phase) trained on the data of this
    digest, or None."""
    version = version_for_data(entry_dir(cfg, cfg.seed), train_digest)
    return version / "teacher.pt" if version is not None else None


def version_for_data(entry: Path, train_digest: str) -> Optional[Path]:
    """The newest complete version trained on the data of `train_digest`, or None.

    A version filed before manifests recorded the digest is taken only when no newer version records one (its data
    cannot be checked: a store of an earlier version of this repository keeps working, with a warning)."""
    other_data = False
    for version in reversed([v for v in versions(entry) if (v / "manifest.json").is_file()]):
        recorded = read_manifest(version).get("train_digest")
        if recorded == train_digest:
            return version
        if recorded is None and not other_data:
            log.warning("%s records no digest of the images it was trained on (it was filed by an earlier version of "
                        "this repository): using it unchecked. retrain_teacher=true files a version that records it.",
                        version)
            return version
        other_data = other_data or recorded is not None
    return None


def version_with_sha256(entry: Path, sha256: str) -> Optional[Path]:
    """The complete version whose teacher.pt has this sha256 (as its manifest records), or None."""
    found = [v for v in versions(entry) if (v / "manifest.json").is_file() and read_manifest(v)["sha256"] == sha256]
    return found[-1] if found else None


# What every manifest holds, and of which type: a manifest without one is damaged.
MANIFEST_KEYS = {"config": dict, "result": dict, "sha256": str}


def read_manifest(version: Path) -> dict[str, Any]:
    """A stored version's manifest; a damaged one (unreadable, or lacking a key) names itself and the way out."""
    fix = f"Delete the version folder {version} to train that teacher again."
    manifest = read_json(version / "manifest.json", fix)
    missing = [key for key, kind in MANIFEST_KEYS.items() if not isinstance(manifest.get(key), kind)]
    if missing:
        raise fileio.CorruptRecord(f"{version / 'manifest.json'} is damaged (it holds no {', '.join(missing)}). {fix}")
    return manifest


def check_writable(store: Path) -> None:
    """Refuse a teacher store that cannot be written before any training (not after 240 epochs)."""
    try:
        Path(store).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=store, prefix=".write_test_"):
            pass
    except OSError as error:
        raise PermissionError(
            f"teacher_store={store} cannot be written ({error.strerror or error}): the trained teacher could not be "
            "filed. Point teacher_store at a writable folder."
        ) from None


def save_to_store(
    cfg: DictConfig, model: nn.Module, result: dict[str, Any], run_dir: Path, data: DataPath,
    version: Optional[Path] = None,
) -> Path:
    """File a finished teacher (its final weights) as a new version of its entry; returns the checkpoint path.

    `data` is what it was trained on (its manifest records the class names and the training images' digest).
    `version` is the folder an on-demand training ran in (`<version>/run`); otherwise the next free version is used.
    Complete versions are never written again: a second teacher of the same identity becomes a version of its own.
    """
    classes, train_digest = data.classes, data.train_digest()
    entry = entry_dir(cfg, cfg.seed)
    # Under the entry's lock, so two jobs never file into the same version.
    with store_lock(entry, cfg.teacher_lock_timeout_s):
        version = version or pending_version(entry, with_run=False)
        if newest_complete(entry) is not None:
            log.warning("the store already holds a teacher of this identity: filing this one as %s (students use the "
                        "newest version; earlier ones stay as they were)", version)
        version.mkdir(parents=True, exist_ok=True)
        checkpoint = version / "teacher.pt"
        save_checkpoint(checkpoint, {**checkpoint_payload(cfg.teacher, model, result, cfg), "classes": classes})
        manifest = {"identity": identity(cfg, cfg.seed), "result": result, "sha256": sha256_file(checkpoint),
                    "run_dir": str(run_dir), "config": plain_config(cfg), "classes": classes, "version": version.name,
                    "train_digest": train_digest}
        write_json(version / "manifest.json", manifest)  # the commit point: the version is complete
        for path in (checkpoint, version / "manifest.json"):
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    log.info("teacher stored in %s (test/acc1 %.2f)", version, result["test/acc1"])
    return checkpoint


def checkpoint_payload(model_cfg: DictConfig, model: nn.Module, metrics: dict[str, Any], cfg: DictConfig) -> dict:
    """Weights with what is needed to check them: architecture node, metrics, resolved config."""
    return {
        "model": model.state_dict(),
        "arch": OmegaConf.to_container(model_cfg, resolve=True),
        "metrics": metrics,
        "config": plain_config(cfg),
    }


def from_store(cfg: DictConfig) -> bool:
    """Whether a student run looks its teacher up in the store (teacher_checkpoint=auto without teachers_dir)."""
    return cfg.teacher_checkpoint == "auto" and cfg.teachers_dir is None


def resolve(cfg: DictConfig, required: bool, overrides: list[str], train_digest: Optional[str] = None) -> Path | None:
    """The teacher checkpoint for a student run, or None when none is configured and none is required; for
    torchvision:<Weights> / timm:<name> the library's cached file (a kd.pretrained.LibraryWeights). From the store:
    the newest version trained on the data of `train_digest`, or (None: the data not loaded yet) the newest one."""
    choice = cfg.teacher_checkpoint
    if choice == "none":
        if required:
            raise ValueError("the loss needs a teacher but teacher_checkpoint=none: set it to auto, a path, or "
                             "a library's weights (torchvision:<Weights>, timm:<name>).")
        return None
    if pretrained.library_of(choice):  # torchvision:<Weights> / timm:<name>: the library's cached file
        return pretrained.locate(choice, cfg.teacher)
    if choice != "auto":
        path = Path(choice)
        if not path.is_file():
            raise FileNotFoundError(f"teacher_checkpoint={choice}: no such file.")
        return path
    if not from_store(cfg):
        return published_teacher(Path(cfg.teachers_dir), model_name(cfg.teacher))
    entry = entry_dir(cfg, cfg.teacher_seed)
    version = newest_complete(entry) if train_digest is None else version_for_data(entry, train_digest)
    if version is not None:
        return version / "teacher.pt"
    what = "for this config"
    if newest_complete(entry) is not None:  # images added to or replaced in the folder since it was trained
        what += " trained on these training images (the stored versions were trained on other images)"
    if not required:
        log.info("no teacher in the store %s; training without one (%s)", what, entry)
        return None
    raise MissingTeacher(
        entry,
        f"no trained teacher {what} in {entry}. Train it first:\n  {teacher_command(cfg, overrides)}\n"
        "or pass teacher_checkpoint=PATH, or train_missing_teacher=true to train it on demand."
        + stored_alternatives(cfg),
    )


MAX_ALTERNATIVES = 5  # stored teachers a missing teacher's message lists, closest first
MAX_OVERRIDES = 6  # beyond as many differing settings, an alternative is selected by its path


def stored_alternatives(cfg: DictConfig) -> str:
    """The store's teachers of the same dataset and model as the one asked for (any width, seed, recipe): how each
    one's identity differs from it, as "key: stored X, asked Y", and the overrides that select it; "" when none."""
    asked = records.flatten_config(identity(cfg, cfg.teacher_seed))
    found = []
    for version in same_model_versions(cfg):
        try:
            manifest = read_manifest(version)
        except (OSError, fileio.CorruptRecord):  # a damaged version: its own lookup names it
            continue
        stored = records.flatten_config(manifest.get("identity") or {})
        keys = sorted(k for k in stored.keys() | asked.keys() if stored.get(k, _ABSENT) != asked.get(k, _ABSENT))
        keys = [k for k in keys if not follows_another(cfg, k)] or keys  # scheduler.epochs: ${..epochs}
        if keys:  # none: the asked identity itself, trained on other images (the message says so)
            found.append((len(keys), str(version), version, stored, keys, manifest["result"].get("test/acc1")))
    if not found:
        return ""
    found.sort(key=lambda item: item[:2])
    lines = [f"\nThe store holds {len(found)} other teacher{'s' if len(found) > 1 else ''} of "
             f"{model_name(cfg.teacher)} on {cfg.dataset.name} (closest first; add the overrides to use one):"]
    for _, _, version, stored, keys, acc1 in found[:MAX_ALTERNATIVES]:
        lines += alternative_lines(version, stored, asked, keys, acc1)
    if len(found) > MAX_ALTERNATIVES:
        lines.append(f"  ... and {len(found) - MAX_ALTERNATIVES} more in {cfg.teacher_store}")
    return "\n".join(lines)


def follows_another(cfg: DictConfig, key: str) -> bool:
    """Whether the dotted config key is an interpolation of another (its override would be redundant)."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node and OmegaConf.is_interpolation(node, leaf)


def same_model_versions(cfg: DictConfig) -> list[Path]:
    """The newest complete version of each store entry of cfg's dataset name and teacher model (entries are named
    `<dataset>_<model>_w<width>_seed<seed>_<hash>`)."""
    pattern = f"{glob.escape(cfg.dataset.name)}_{glob.escape(model_name(cfg.teacher))}_w*_seed*_*"
    entries = sorted(p for p in Path(cfg.teacher_store).glob(pattern) if p.is_dir())
    return [version for version in map(newest_complete, entries) if version is not None]


def alternative_lines(version: Path, stored: dict[str, Any], asked: dict[str, Any], keys: list[str],
                      acc1: Any) -> list[str]:
    """A stored teacher's lines in a missing teacher's message: where, how it differs, the overrides selecting it."""
    show = lambda tree, key: json.dumps(tree[key]) if key in tree else "absent"  # noqa: E731
    differences = [f"{key}: {show(stored, key)} stored, {show(asked, key)} asked" for key in keys]
    accuracy = f" (test/acc1 {acc1:.2f})" if isinstance(acc1, (int, float)) else ""
    shown = "; ".join(differences[:4]) + (f"; and {len(keys) - 4} more" if len(keys) > 4 else "")
    if len(keys) > MAX_OVERRIDES:
        selection = [f"teacher_checkpoint={version / 'teacher.pt'}"]
    else:
        selection = [selecting_override(key, stored, asked) for key in keys]
    return [f"  {version}{accuracy}: {shown}", f"    {' '.join(shlex.quote(o) for o in selection)}"]


def selecting_override(key: str, stored: dict[str, Any], asked: dict[str, Any]) -> str:
    """The override that gives identity key `key` the stored teacher's value (the identity's seed is teacher_seed)."""
    name = "teacher_seed" if key == "seed" else key
    if key not in stored:
        return f"~{name}"
    return f"{'' if key in asked else '+'}{name}={override_value(stored[key])}"


def override_value(value: Any) -> str:
    """A plain value in Hydra's override syntax: null, true, 0.05, [0.9,0.999], a string quoted where it must be."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(override_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if re.fullmatch(r"[A-Za-z_/.][\w/.\-]*", text) and text.lower() not in ("null", "true", "false", "nan", "inf"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


_ABSENT = object()


def published_teacher(folder: Path, model: str) -> Path:
    """The published teacher for `model` (our factory names are theirs: resnet56, wrn_40_2, vgg13, ResNet50) in a
    folder of RepDistiller's / mdistiller's layout."""
    path = folder / PUBLISHED_LAYOUT.format(model=model)
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("*_vanilla")) if folder.is_dir() else []
        raise FileNotFoundError(
            f"teachers_dir={folder} has no teacher for model@teacher={model}: expected {path} (the "
            f"{PUBLISHED_LAYOUT} layout of RepDistiller's and mdistiller's published teachers; "
            f"{'found: ' + ', '.join(found) if found else 'no <model>_vanilla folder there'}). The published CIFAR-100 "
            f"teachers: python -m kd.teachers fetch crd --dir {folder}"
        )
    return path


class MissingTeacher(FileNotFoundError):
    """The store has no teacher for this config; `entry` is where it belongs."""

    def __init__(self, entry: Path, message: str):
        super().__init__(message)
        self.entry = entry


def teacher_config(cfg: DictConfig) -> DictConfig:
    """The teacher-phase config that trains the teacher a student config needs."""
    teacher_cfg = cfg.copy()
    teacher_cfg.phase = "teacher"
    teacher_cfg.seed = cfg.teacher_seed
    return teacher_cfg


@contextmanager
def store_lock(entry: Path, timeout_s: float) -> Iterator[None]:
    """Hold `<entry>/.lock` so parallel jobs (joblib, SLURM arrays) train and file a teacher only once.

    flock-based: the OS drops the lock when its holder dies, so a crashed job never leaves it stale.
    """
    key = (threading.get_ident(), str(Path(entry).resolve()))
    if key in _HELD:  # this thread holds it already (a teacher trained on demand files itself)
        yield
        return
    entry.mkdir(parents=True, exist_ok=True)  # the lock lives inside, so the store lists only entries
    lock = FileLock(entry / ".lock", timeout=timeout_s)
    try:
        if not _try_acquire(lock):
            log.info("waiting (up to %g s) for %s: another job is training or filing this teacher", timeout_s, entry)
            lock.acquire()
    except Timeout:
        raise TimeoutError(
            f"waited {timeout_s:g} s for {lock.lock_file}: another job is still training this teacher. "
            "Raise teacher_lock_timeout_s, or train it first with phase=teacher."
        ) from None
    _HELD.add(key)
    for version in versions(entry):  # what a filing killed mid-write left (no writer is alive: we hold the lock)
        fileio.remove_stale_temporaries(version)
    try:
        yield
    finally:
        _HELD.discard(key)
        lock.release()


def _try_acquire(lock: FileLock) -> bool:
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    return True


# (thread, entry) pairs holding an entry's lock: a second FileLock on the same file would wait for the first forever.
_HELD: set[tuple[int, str]] = set()


# Overrides (by their first key) that concern only the student run.
STUDENT_ONLY = {"phase", "seed", "loss", "student", "model@student", "teacher_checkpoint", "teacher_seed", "logger",
                "pair_hparams"}


def override_head(override: str) -> str:
    """An override's first key: `optimizer.lr=0.1` -> optimizer, `+model@teacher=x` -> model@teacher."""
    return override.lstrip("+~").split("=", 1)[0].split(".", 1)[0]


def teacher_command(cfg: DictConfig, overrides: list[str]) -> str:
    """The command that trains the teacher a student run needs: its overrides minus the student-only ones (and minus
    the student's recipe, unless the teacher shares it)."""
    dropped = STUDENT_ONLY | (set() if shared_recipe(cfg) else set(RECIPE_KEYS))
    kept = [o for o in overrides if override_head(o) not in dropped]
    args = ["python", "train.py", "phase=teacher", f"seed={cfg.teacher_seed}", *kept]
    return " ".join(shlex.quote(a) for a in args)


def read(path: Path, model_cfg: DictConfig, key: Optional[str] = None) -> TeacherFile:
    """Load a teacher checkpoint of any accepted format (kd.checkpoints; `key`: only that key's state_dict) and check
    it fits the teacher config node; a stored or fetched teacher must also still match the sha256 its manifest
    recorded (a fetched one is checked before it is read)."""
    published_teachers.verified_sha256(path)
    teacher = read_teacher_file(path, model_cfg, key)
    if path.name == "teacher.pt" and (path.parent / "manifest.json").is_file():
        recorded = read_manifest(path.parent).get("sha256")
        if sha256_file(path) != recorded:
            raise ValueError(f"{path} does not match the sha256 in {path.parent / 'manifest.json'}: the file changed "
                             f"after it was filed. Delete {path.parent} to train that teacher again.")
    return teacher


class ConvLeafTracer(torch.fx.Tracer):
    """torch.fx's tracer, with every Conv2d a leaf: kd.cpu_conv's routed convolution (a subclass outside torch.nn,
    whose forward branches on the device) is called, not traced through."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, nn.Conv2d) or super().is_leaf_module(module, qualified_name)


def fold_batchnorm(model: nn.Module, quiet: bool = False) -> int:
    """Fold each BatchNorm that only normalises one convolution's output into that convolution, in an eval-mode
    model that is never trained again (the frozen teacher): the same function with one pass over memory less.

    The pairs are found by tracing the forward with torch.fx; the model itself keeps its module tree (the folded
    BatchNorm becomes an Identity), so forward hooks by module name still work. Returns the number folded (0 when
    the forward cannot be traced; logged unless quiet).
    """
    try:
        graph = ConvLeafTracer().trace(model)
    except Exception as error:  # data-dependent control flow: leave the model as it is
        if not quiet:
            log.info("teacher not traceable by torch.fx (%s): BatchNorm left unfolded", type(error).__name__)
        return 0
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    folded = 0
    for node in graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if not (isinstance(modules.get(node.target), nn.BatchNorm2d) and isinstance(source, torch.fx.Node)):
            continue
        conv = modules.get(source.target) if source.op == "call_module" else None
        if isinstance(conv, nn.Conv2d) and len(source.users) == 1 and calls[source.target] == calls[node.target] == 1:
            model.set_submodule(source.target, fuse_conv_bn_eval(conv, modules[node.target]))
            model.set_submodule(node.target, nn.Identity())
            folded += 1
    return folded


def build(teacher_file: TeacherFile, model_cfg: DictConfig, device: torch.device) -> nn.Module:
    """The frozen teacher: built from its config node, weights from a checked file, eval mode, no gradients."""
    teacher = instantiate(model_cfg)
    teacher.load_state_dict(teacher_file.state_dict)
    return teacher.to(device).eval().requires_grad_(False)


if __name__ == "__main__":  # python -m kd.teachers fetch crd: the published teachers (kd.published_teachers)
    sys.exit(published_teachers.main())
