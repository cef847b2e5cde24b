"""Intermediate features by module name: forward hooks in a context manager, and the zoo's default layers,
for the methods that read features (kd.methods.base.FeatureCriterion) and for kd.loop, which captures them.

A layer name is a dotted module path as `model.named_modules()` lists it ("layer2", "blocks.4", "fc"); the suffix
":in" takes that module's input instead of its output, so "fc:in" is the pooled embedding the classifier reads, and
"a+b" is the sum of the features captured at a and b (a value no module outputs, such as a residual block's sum
before its final ReLU: "layer1.0.bn2+layer1.0:in").
"""
from contextlib import contextmanager
from functools import partial
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

INPUT_SUFFIX = ":in"
SUM = "+"  # "a+b": the sum of the features captured at a and b
# torchvision ResNets (and models named like them): their four stages and their linear classifier `fc`.
TORCHVISION_STAGES = ("layer1", "layer2", "layer3", "layer4")

_HINT = (
    "Set the method's student_layers / teacher_layers in the loss config (e.g. loss.fitnet.student_layers=[layer2]) "
    "to dotted module names from model.named_modules(), with ':in' for a module's input (e.g. fc:in)."
)


def top_level_modules(model: nn.Module) -> str:
    return ", ".join(name for name, _ in model.named_children()) or "(none)"


def resolve(model: nn.Module, name: str) -> tuple[nn.Module, bool]:
    """The module a layer name points at, and whether its input (":in") rather than its output is taken."""
    takes_input = name.endswith(INPUT_SUFFIX)
    path = name[: -len(INPUT_SUFFIX)] if takes_input else name
    try:
        return model.get_submodule(path), takes_input
    except AttributeError:
        raise ValueError(
            f"{type(model).__name__} has no module {path!r} (layer name {name!r}); its top-level modules are: "
            f"{top_level_modules(model)}. {_HINT}"
        ) from None


def _store(features: dict, versions: dict, name: str, value) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"layer {name!r} gave a {type(value).__name__}, not a tensor: pick a module with one output.")
    if value.is_inference():
        # Inference tensors keep no version counter, so a later in-place op could not be detected: copy now.
        features[name] = value.clone()
        return
    features[name] = value
    versions[name] = value._version


def _output_hook(features: dict, versions: dict, name: str, module: nn.Module, args, output) -> None:
    _store(features, versions, name, output)


def _input_hook(features: dict, versions: dict, name: str, module: nn.Module, args) -> None:
    _store(features, versions, name, args[0] if args else None)


def _reset(features: dict, versions: dict, model: nn.Module, args) -> None:
    features.clear()
    versions.clear()


def _check_captured(features: dict, versions: dict, names: list[str], model: nn.Module, args, output) -> None:
    """After the whole forward: every layer ran, and no captured tensor was modified in place afterwards."""
    missing = [name for name in names if name not in features]
    if missing:
        raise RuntimeError(
            f"layers {missing} of {type(model).__name__} were not called during its forward (a module that this "
            f"input size skips?), so they hold no feature. {_HINT}"
        )
    for name, version in versions.items():
        if features[name]._version != version:
            raise RuntimeError(
                f"the tensor captured at {name!r} was modified in place later in the forward of "
                f"{type(model).__name__} (e.g. by a ReLU(inplace=True)), so it no longer holds that layer's value. "
                f"Capture the module that modifies it, or the next module's input ('<next>:in'). {_HINT}"
            )


def _add_sums(features: dict, names: list[str], model: nn.Module, args, output) -> None:
    """After the whole forward (and its checks): each "a+b" name gets the sum of its parts' features."""
    for name in names:
        parts = [features[part] for part in name.split(SUM)]
        if len({part.shape for part in parts}) != 1:
            raise RuntimeError(f"layer {name!r} sums features of different shapes {[tuple(p.shape) for p in parts]}: "
                               f"name parts of one shape. {_HINT}")
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        features[name] = total


@contextmanager
def capture(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Yield a dict that each forward of `model` fills with {layer name: its output (or input, for "name:in")}.

    The dict is emptied at the start of every forward, so it holds the last forward's features; copy it before the
    next forward if they are still needed. Hooks are removed on exit, also when the body raises. A captured tensor
    is the one the model goes on computing with (no copy, gradients flow through it) and the forward fails if it
    is later modified in place; under torch.inference_mode (no version counters) it is copied instead. A name "a+b"
    holds the sum of a's and b's features, which are captured (and held in the dict) as any name.
    """
    names = list(dict.fromkeys(names))
    parts = list(dict.fromkeys(part for name in names for part in name.split(SUM)))
    targets = [(name, *resolve(model, name)) for name in parts]  # every name is checked before any hook is added
    features: dict[str, Tensor] = {}
    versions: dict[str, int] = {}
    handles = [model.register_forward_pre_hook(partial(_reset, features, versions))]
    try:
        for name, module, takes_input in targets:
            if takes_input:
                handles.append(module.register_forward_pre_hook(partial(_input_hook, features, versions, name)))
            else:
                handles.append(module.register_forward_hook(partial(_output_hook, features, versions, name)))
        handles.append(model.register_forward_hook(partial(_check_captured, features, versions, parts)))
        sums = [name for name in names if SUM in name]
        if sums:  # registered after the check, so it runs after it
            handles.append(model.register_forward_hook(partial(_add_sums, features, sums)))
        yield features
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def probe_shapes(model: nn.Module, names: Sequence[str], images: Tensor) -> dict[str, torch.Size]:
    """The shape of each named layer's feature for `images`, from one forward in eval mode.

    Eval mode leaves BatchNorm's running statistics alone; every module's own training flag is restored after.
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with capture(model, names) as features:
            model(images)
        return {name: features[name].shape for name in dict.fromkeys(names)}
    finally:
        for module, training in modes.items():
            module.training = training


def default_layers(model: nn.Module) -> dict:
    """{"stages": stage output names in order, "embedding": the classifier's input} for a model of the zoo, and
    "preact" where the model declares it: each stage's output before its final ReLU, as hooks capture it exactly
    ("a+b" names the sum of two captures), one per stage (ReviewKD's teacher levels, AB's features); "stem" where it
    declares it: the output of the layers before the first stage (RepDistiller's first feature, FSP's first layer).

    Zoo models declare `feature_layers` (the features RepDistiller's `is_feat=True` returns, stem and logits left
    out); timm models list their stages in `feature_info`; other models fall back to torchvision's ResNet names
    (layer1..layer4, `fc`), else this raises.
    """
    declared = getattr(model, "feature_layers", None)
    if declared is not None:
        layers = {"stages": list(declared["stages"]), "embedding": declared["embedding"]}
        layers |= {"preact": list(declared["preact"])} if "preact" in declared else {}
        return layers | ({"stem": declared["stem"]} if "stem" in declared else {})
    listed = _feature_info_layers(model)
    if listed is not None:
        return listed
    children = dict(model.named_children())
    stages = []
    for name in TORCHVISION_STAGES:
        if name not in children:
            break
        stages.append(name)
    if stages and isinstance(children.get("fc"), nn.Linear):
        return {"stages": stages, "embedding": "fc:in"}
    raise ValueError(
        f"no default feature layers for {type(model).__name__}: it declares no `feature_layers`, lists no timm "
        f"`feature_info` and has no torchvision-style layer1.. stages with an `fc` classifier (top-level modules: "
        f"{top_level_modules(model)}). {_HINT}"
    )


def _feature_info_layers(model: nn.Module) -> dict | None:
    """A timm model's stages (its `feature_info` entries at stride 4 and beyond) and its classifier's input, or None
    when the model lists no usable stages or classifier."""
    info, get_classifier = getattr(model, "feature_info", None), getattr(model, "get_classifier", None)
    if not isinstance(info, list) or get_classifier is None:
        return None
    # The stride-2 entry is the stem's output (or a first block at the stem's resolution): RepDistiller's features
    # leave the stem out and torchvision's layer1..layer4 start at stride 4, so timm models pair stage by stage
    # with torchvision ResNets, mdistiller's ImageNet models and each other.
    stages = [entry.get("module") for entry in info if isinstance(entry, dict) and entry.get("reduction", 0) >= 4]
    head = get_classifier()
    names = {module: name for name, module in model.named_modules()}
    classifier = names.get(head) if isinstance(head, nn.Module) else None
    if not stages or not classifier or not all(_is_module(model, name) for name in stages):
        return None
    return {"stages": stages, "embedding": classifier + INPUT_SUFFIX}


def _is_module(model: nn.Module, name) -> bool:
    """Whether `name` is a dotted path to a submodule of model."""
    try:
        return isinstance(name, str) and bool(name) and isinstance(model.get_submodule(name), nn.Module)
    except AttributeError:
        return False
