"""Teacher checkpoints in the forms the field publishes them, read without running any pickled code and matched
strictly against the teacher config.

Accepted: this repository's checkpoints (`model`, `arch`, `metrics`: teacher.pt, last.pt, best.pt); the
RepDistiller / mdistiller dict (`model` = the state_dict, with `epoch`, `accuracy` or `best_acc`, `optimizer`: their
published `<model>_vanilla/ckpt_epoch_240.pth`); a bare state_dict; a `.safetensors` file. A state_dict saved from
nn.DataParallel (every key `module.`-prefixed) is read without the prefix; one written before PyTorch 0.4.1 (no
BatchNorm `num_batches_tracked` at all: RepDistiller was tested on 0.4.0) gets those counts as 0, as BatchNorm's own
loading of such a file does. A library's pretrained weights
(teacher_checkpoint=torchvision:... / timm:..., kd.pretrained) are read as the library loads its cached file. The
architecture always comes from model@teacher, never from the file: a file that does not load strictly is refused,
naming its missing, unexpected and mis-shaped keys and the model options that would fit it.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from kd import fileio, pretrained, records
from kd.pretrained import LibraryWeights

MODEL_OPTIONS = records.REPO_ROOT / "conf" / "model"  # the registry of model@teacher options
# BatchNorm's count of training batches, added in PyTorch 0.4.1; files saved before it have none.
BATCH_COUNT = "num_batches_tracked"


@dataclass
class TeacherFile:
    """A teacher checkpoint as read: its weights, its format and what it records about itself."""

    state_dict: dict[str, Tensor]
    # "kd" (this repository), "repdistiller", "state_dict", "safetensors"; a library's weights name
    # (ResNet34_Weights.IMAGENET1K_V1, resnet50.a1_in1k) for teacher_checkpoint=torchvision:... / timm:...
    format: str
    metrics: Optional[dict[str, Any]] = None  # this repository's record of the run (test/acc1, ...)
    recorded_acc1: Optional[float] = None  # the accuracy the file states (ours: test/acc1; theirs: accuracy/best_acc)
    classes: Optional[list[str]] = None  # the class names it was trained on (this repository's files)
    arch: Optional[dict[str, Any]] = None  # the model node it was built from (this repository's files)


def read_teacher_file(path: Path, model_cfg: DictConfig, key: Optional[str] = None) -> TeacherFile:
    """Read a teacher checkpoint of any accepted format and check that it fits model_cfg exactly; `key`: read only
    that top-level key of a pickled file, as a state_dict (teacher_checkpoint_key)."""
    library = isinstance(path, LibraryWeights)
    if key is not None and (library or Path(path).suffix == ".safetensors"):
        raise ValueError(f"teacher_checkpoint_key={key} reads one key of a pickled checkpoint (.pt, .pth), and {path} "
                         "holds weights alone: drop teacher_checkpoint_key.")
    teacher = _read_library(path) if library else _read(Path(path), key)
    if teacher.format == "kd":
        check_arch(teacher, model_cfg, path)
    model = _meta_model(model_cfg)
    problem = mismatch(teacher.state_dict, model)
    if problem:
        fits = fitting_options(teacher.state_dict, model_cfg)
        hint = f" It fits: {'; '.join(fits)}." if fits else " No model option fits it."
        what = f"{path.library} weights {path.weights}" if library else f"{teacher.format} format"
        raise ValueError(f"teacher checkpoint {path} ({what}) does not fit model@teacher="
                         f"{records.model_name(model_cfg)} (num_classes={model_cfg.num_classes}, width="
                         f"{model_cfg.width:g}): {problem}.{hint}")
    teacher.state_dict = _with_batch_counts(teacher.state_dict, model)
    return teacher


def _read_library(weights: LibraryWeights) -> TeacherFile:
    """A library's pretrained weights as the library loads them; their recorded accuracy is the library's (ImageNet-1k
    top-1 for torchvision), so a measurement far from it is warned about."""
    state, accuracy = pretrained.read(weights)
    return TeacherFile(state, weights.weights, recorded_acc1=accuracy)


def _read(path: Path, key: Optional[str] = None) -> TeacherFile:
    if key is not None:
        return _read_entry(path, key)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return TeacherFile(_unwrapped(load_file(str(path))), "safetensors")
        except Exception as error:
            raise fileio.UnusableCheckpoint(f"{path} is not a readable safetensors file ({error}).") from None
    try:
        payload = fileio.load_checkpoint(path, ())  # weights_only: a pickle holding objects is refused unrun
    except fileio.UnsafeCheckpoint as unsafe:
        raise fileio.UnsafeCheckpoint(f"{unsafe} {_weights_only_way_out(unsafe.weights_keys)}") from None
    if isinstance(payload, dict) and "arch" in payload and isinstance(payload.get("model"), dict):
        metrics = payload.get("metrics") or {}
        return TeacherFile(payload["model"], "kd", metrics, metrics.get("test/acc1"), payload.get("classes"),
                           payload["arch"])
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        accuracy = payload.get("accuracy", payload.get("best_acc"))
        accuracy = float(accuracy) if isinstance(accuracy, (int, float, Tensor)) else None
        return TeacherFile(_unwrapped(payload["model"]), "repdistiller", recorded_acc1=accuracy)
    if isinstance(payload, dict) and payload and all(isinstance(v, Tensor) for v in payload.values()):
        return TeacherFile(_unwrapped(payload), "state_dict")
    raise fileio.UnusableCheckpoint(
        f"{path} holds neither a state_dict nor a checkpoint dict with one under 'model' "
        f"(top-level keys: {sorted(payload)[:10] if isinstance(payload, dict) else type(payload).__name__})."
    )


def _read_entry(path: Path, key: str) -> TeacherFile:
    """The state_dict under one top-level key (teacher_checkpoint_key), the file's other keys never built."""
    state = fileio.load_checkpoint_entry(path, key)
    if not (isinstance(state, dict) and state and all(isinstance(v, Tensor) for v in state.values())):
        raise fileio.UnusableCheckpoint(f"{path}: {key!r} holds no state_dict (a dict of tensors), so "
                                         f"teacher_checkpoint_key={key} has no weights to read there.")
    return TeacherFile(_unwrapped(state), "state_dict")


def _weights_only_way_out(weights_keys: list[str]) -> str:
    """How to use a teacher file that holds objects: read its state_dict's key alone, or save the weights alone."""
    if weights_keys:
        return (f"Its weights under {weights_keys[0]!r} are tensors only: add teacher_checkpoint_key={weights_keys[0]} "
                "to read that key alone, weights-only (the other keys are never built).")
    return ("It holds no state_dict (a dict of tensors) under a key of its own: save the model's weights alone where "
            "the file was made (torch.save(model.state_dict(), path)) and use that file.")


def _unwrapped(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state_dict without nn.DataParallel's `module.` prefix (when every key has it)."""
    if state and all(key.startswith("module.") for key in state):
        return {key[len("module."):]: value for key, value in state.items()}
    return state


def check_arch(teacher: TeacherFile, model_cfg: DictConfig, path: Path) -> None:
    """This repository's checkpoints name their model node: it must be the teacher config's."""
    expected = OmegaConf.to_container(model_cfg, resolve=True)
    mismatched = {k: (teacher.arch.get(k), v) for k, v in expected.items() if teacher.arch.get(k) != v}
    if mismatched:
        details = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in mismatched.items())
        raise ValueError(f"teacher checkpoint {path} does not match the teacher config ({details}).")


def legacy_batchnorm(state: dict[str, Tensor]) -> bool:
    """Whether a state_dict predates BatchNorm's num_batches_tracked (PyTorch < 0.4.1): it holds none at all. A file
    missing only some of them is damaged, not old, and stays refused."""
    return not any(map(_is_batch_count, state))


def _is_batch_count(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == BATCH_COUNT


def _with_batch_counts(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A pre-0.4.1 state_dict completed with each BatchNorm's num_batches_tracked = 0, the value BatchNorm's own
    _load_from_state_dict gives such a file: the count only steers training with momentum=None, never an eval
    forward, so the teacher computes what it computed when it was saved."""
    if not legacy_batchnorm(state):
        return state
    counts = {key: torch.tensor(0, dtype=torch.long) for key in model.state_dict() if _is_batch_count(key)}
    return {**state, **counts}


def mismatch(state: dict[str, Tensor], model: nn.Module, shown: int = 5) -> str:
    """How a state_dict fails to load strictly into model ("" when it loads): missing, unexpected, mis-shaped keys.
    A pre-0.4.1 file's absent num_batches_tracked are not missing (kd.checkpoints fills them in)."""
    expected = model.state_dict()
    legacy = legacy_batchnorm(state)
    missing = [k for k in expected if k not in state and not (legacy and _is_batch_count(k))]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
                 for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = [f"{name} ({len(keys)}): {', '.join(keys[:shown])}{', ...' if len(keys) > shown else ''}"
             for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
    return "; ".join(parts)


def fitting_options(state: dict[str, Tensor], model_cfg: DictConfig) -> list[str]:
    """The model@teacher options (and width, class count) whose state_dict the file matches key for key."""
    fits = []
    for option, node in _option_nodes(model_cfg):
        classes = _classifier_outputs(state, node) or model_cfg.num_classes
        named = f" teacher.name={node.name}" if "name" in node else ""
        for width in dict.fromkeys([float(model_cfg.width), 1.0, *_width_ratios(state, node)]):
            candidate = OmegaConf.merge(node, {"num_classes": classes, "width": width})
            try:
                if not mismatch(state, _meta_model(candidate)):
                    fits.append(f"model@teacher={option}{named} teacher.width={width:g} ({classes} classes)")
            except Exception:  # a width this family cannot take
                continue
    return fits


def _option_nodes(model_cfg: DictConfig) -> Iterator[tuple[str, DictConfig]]:
    """The model options' nodes (name, node) to try a file against."""
    for option in sorted(MODEL_OPTIONS.glob("*.yaml")):
        node = OmegaConf.load(option)
        node.pop("defaults", None)  # a schema for composition (conf/model/timm.yaml), not an argument
        if "name" in node:
            # An option that builds any model of a library by name: only the configured model is tried (trying its
            # whole library would take minutes).
            if model_cfg._target_ != node._target_:
                continue
            node.name = model_cfg.name
        yield option.stem, node


def _meta_model(model_cfg: DictConfig) -> nn.Module:
    """The model built on the meta device: its state_dict's keys and shapes, without memory or initialisation."""
    with torch.device("meta"):
        return instantiate(model_cfg)


def _classifier_outputs(state: dict[str, Tensor], node: DictConfig) -> Optional[int]:
    """The number of classes the file's classifier has, read at the key where this model option keeps its own."""
    probe = _meta_model(OmegaConf.merge(node, {"num_classes": 7, "width": 1.0}))
    heads = [k for k, v in probe.state_dict().items() if v.ndim == 2 and v.shape[0] == 7]
    return int(state[heads[-1]].shape[0]) if heads and heads[-1] in state else None


def _width_ratios(state: dict[str, Tensor], node: DictConfig) -> list[float]:
    """The width at which this option's first convolution has the file's channel count (a file of another width)."""
    reference = _meta_model(OmegaConf.merge(node, {"num_classes": 10, "width": 1.0})).state_dict()
    first = next((k for k, v in reference.items() if v.ndim == 4), None)
    if first is None or first not in state:
        return []
    return [round(state[first].shape[0] / reference[first].shape[0], 4)]
