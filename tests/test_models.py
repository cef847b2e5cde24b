"""Model zoo: RepDistiller-exact parameter counts, width scaling, logits shapes and the YAML registry."""

import functools
import importlib
import math
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torchvision
from hydra.utils import get_method
from omegaconf import OmegaConf
from torch import nn

from kd.methods.hooks import default_layers, probe_shapes

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"

MODULES = {
    "cifar_resnet": [
        "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
        "resnet8x4", "resnet32x4",
    ],
    "wrn": ["wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"],
    "vgg": ["vgg8", "vgg11", "vgg13", "vgg16", "vgg19"],
    "mobilenetv2": ["mobilenetv2"],
    "shufflenet": ["shufflenetv1", "shufflenetv2"],
    "torchvision_resnet": ["tv_resnet18"],
    "resnetv2": ["ResNet18", "ResNet50"],
    "simple_cnn": ["simple_cnn"],
    "mobilenetv1": ["mobilenetv1"],
}
MODULE_OF = {name: module for module, names in MODULES.items() for name in names}
NAMES = list(MODULE_OF)
WIDTHS = (0.25, 0.5, 1.0, 2.0)

# Width 1, 100 classes. resnet20, resnet32x4, wrn_40_2 and ResNet50 are the given references; the rest agree
# with the counts below written from the architecture descriptions, and with the CRD-era tables
# (0.86M resnet56, 1.23M resnet8x4, 0.70M wrn_16_2, 0.57M wrn_40_1, 3.96M vgg8, 9.46M vgg13,
# 0.81M MobileNetV2, 0.95M ShuffleV1, 1.36M ShuffleV2). ResNet18 has torchvision's CIFAR-stem resnet18's count:
# the same layers under other names.
EXPECTED_PARAMS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "mobilenetv2": 812_836,
    "shufflenetv1": 949_258,
    "shufflenetv2": 1_355_528,
    "tv_resnet18": 11_220_132,
    "ResNet18": 11_220_132,
    "ResNet50": 23_705_252,
    "simple_cnn": 106_372,
    "mobilenetv1": 3_309_476,  # 4_231_976 at 1000 classes, the count of mdistiller's ImageNet MobileNetV1
}


def factory(name: str):
    """The factory function registered under `name`."""
    return getattr(importlib.import_module(f"kd.models.{MODULE_OF[name]}"), name)


def num_params(model: nn.Module) -> int:
    """Trainable parameter count (BatchNorm running statistics are buffers, not parameters)."""
    return sum(p.numel() for p in model.parameters())


class Probe(NamedTuple):
    """What one build and forward pass showed."""

    logits_shape: tuple[int, ...]
    num_params: int
    finite: bool | None  # None on the meta device, which has no values


@functools.lru_cache(maxsize=None)
def probe(name: str, width: float, num_classes: int) -> Probe:
    """Build one model and run a (2, 3, 32, 32) batch through it in eval mode without gradients."""
    # Allocating and initialising the width-2 models (~0.7e9 parameters over the zoo and both class
    # counts) took most of this file's 30 s. The meta device runs the same constructors and shape
    # checks without storage; widths up to 1 still run real CPU kernels on real weights.
    device = "cpu" if width <= 1.0 else "meta"
    with torch.device(device), torch.no_grad():
        model = factory(name)(num_classes=num_classes, width=width).eval()
        logits = model(torch.randn(2, 3, 32, 32))
    finite = None if device == "meta" else bool(torch.isfinite(logits).all())
    return Probe(tuple(logits.shape), num_params(model), finite)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Run this module on one thread, restoring the setting afterwards."""
    # Batch-2 forwards gain nothing from threads, and two OpenMP threads stall badly when the other
    # core is busy (seen: 1.5 s vs 15 ms for one wrn_40_1 forward).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Independent counts, written from the architecture descriptions rather than from the model code.


def conv(c_in: int, c_out: int, k: int = 1, groups: int = 1, bias: bool = False) -> int:
    """Parameters of a k x k convolution."""
    return c_in // groups * c_out * k * k + (c_out if bias else 0)


def bn(c: int) -> int:
    """Parameters of a BatchNorm (weight and bias; running statistics are buffers)."""
    return 2 * c


def linear(c_in: int, c_out: int) -> int:
    """Parameters of a linear layer with bias."""
    return c_in * c_out + c_out


def count_cifar_resnet(depth: int, filters: list[int], classes: int) -> int:
    """3x3 stem+BN; 3 stages of (depth-2)/6 BasicBlocks; 1x1 conv+BN shortcut on stride/width change; fc."""
    total, c_in = conv(3, filters[0], 3) + bn(filters[0]), filters[0]
    for stage, c in enumerate(filters[1:]):
        for i in range((depth - 2) // 6):
            total += conv(c_in, c, 3) + bn(c) + conv(c, c, 3) + bn(c)
            if i == 0 and (stage > 0 or c_in != c):
                total += conv(c_in, c) + bn(c)
            c_in = c
    return total + linear(c_in, classes)


def count_wrn(depth: int, k: int, classes: int) -> int:
    """3x3 stem; (depth-4)/6 pre-act blocks per stage (BN, conv, BN, conv, 1x1 shortcut on width change)."""
    total, c_in = conv(3, 16, 3), 16
    for c in (16 * k, 32 * k, 64 * k):
        for _ in range((depth - 4) // 6):
            total += bn(c_in) + conv(c_in, c, 3) + bn(c) + conv(c, c, 3)
            total += conv(c_in, c) if c_in != c else 0
            c_in = c
    return total + bn(c_in) + linear(c_in, classes)


VGG_CONVS = {
    "vgg8": [64, 128, 256, 512, 512],
    "vgg11": [64, 128, 256, 256] + [512] * 4,
    "vgg13": [64, 64, 128, 128, 256, 256] + [512] * 4,
    "vgg16": [64, 64, 128, 128] + [256] * 3 + [512] * 6,
    "vgg19": [64, 64, 128, 128] + [256] * 4 + [512] * 8,
}


def count_vgg(convs: list[int], classes: int) -> int:
    """Conv3x3 with bias + BN for every layer; one 512 -> classes linear."""
    total, c_in = 0, 3
    for c in convs:
        total, c_in = total + conv(c_in, c, 3, bias=True) + bn(c), c
    return total + linear(512, classes)


def count_mobilenetv2_half(classes: int) -> int:
    """Width 0.5, t=6: stem 16; every unit has expand 1x1, depthwise 3x3, project 1x1 (+BN); 1280 head."""
    total, c_in = conv(3, 16, 3) + bn(16), 16
    for t, c, n in [(1, 8, 1), (6, 12, 2), (6, 16, 3), (6, 32, 4), (6, 48, 3), (6, 80, 3), (6, 160, 1)]:
        for _ in range(n):
            h = c_in * t
            total += conv(c_in, h) + bn(h) + conv(h, h, 3, groups=h) + bn(h) + conv(h, c) + bn(c)
            c_in = c
    return total + conv(c_in, 1280) + bn(1280) + linear(1280, classes)


def count_shufflenetv1(classes: int) -> int:
    """g=3; stride-2 units output `out - in` channels (concat); bottleneck = output/4; first 1x1 ungrouped."""
    total, c_in = conv(3, 24) + bn(24), 24
    for out, n in [(240, 4), (480, 8), (960, 4)]:
        for i in range(n):
            branch = out - c_in if i == 0 else out
            mid, g1 = branch // 4, 1 if c_in == 24 else 3
            total += conv(c_in, mid, groups=g1) + bn(mid) + conv(mid, mid, 3, groups=mid) + bn(mid)
            total += conv(mid, branch, groups=3) + bn(branch)
            c_in = out
    return total + linear(960, classes)


def count_shufflenetv2(classes: int) -> int:
    """Per stage: a down unit (two branches of out/2) then n split units on out/2 channels; 1024 head."""
    total, c_in = conv(3, 24) + bn(24), 24
    for out, n in [(116, 3), (232, 7), (464, 3)]:
        m = out // 2
        total += conv(c_in, c_in, 3, groups=c_in) + bn(c_in) + conv(c_in, m) + bn(m)
        total += conv(c_in, m) + bn(m) + conv(m, m, 3, groups=m) + bn(m) + conv(m, m) + bn(m)
        total += n * (2 * (conv(m, m) + bn(m)) + conv(m, m, 3, groups=m) + bn(m))
        c_in = out
    return total + conv(464, 1024) + bn(1024) + linear(1024, classes)


def count_resnetv2(bottleneck: bool, blocks: list[int], classes: int) -> int:
    """3x3 stem+BN; stages of 64/128/256/512 planes (expanded 4x by bottlenecks); projection on change; linear."""
    expansion = 4 if bottleneck else 1
    total, c_in = conv(3, 64, 3) + bn(64), 64
    for stage, (planes, n) in enumerate(zip([64, 128, 256, 512], blocks)):
        out = planes * expansion
        for i in range(n):
            if bottleneck:
                total += conv(c_in, planes) + bn(planes) + conv(planes, planes, 3) + bn(planes) + conv(planes, out)
            else:
                total += conv(c_in, planes, 3) + bn(planes) + conv(planes, planes, 3)
            total += bn(out)
            if i == 0 and (stage > 0 or c_in != out):
                total += conv(c_in, out) + bn(out)
            c_in = out
    return total + linear(c_in, classes)


def count_mobilenetv1(classes: int) -> int:
    """Stem conv3x3 3->32 + BN; 13 depthwise 3x3 + BN, pointwise 1x1 + BN units (64, 128x2, 256x2, 512x6, 1024x2);
    linear."""
    total, c_in = conv(3, 32, 3) + bn(32), 32
    for c in [64, 128, 128, 256, 256] + [512] * 6 + [1024, 1024]:
        total += conv(c_in, c_in, 3, groups=c_in) + bn(c_in) + conv(c_in, c) + bn(c)
        c_in = c
    return total + linear(1024, classes)


def count_simple_cnn(classes: int) -> int:
    """Three conv3x3 (no bias) + BN stages of 32/64/128 channels; linear."""
    return conv(3, 32, 3) + bn(32) + conv(32, 64, 3) + bn(64) + conv(64, 128, 3) + bn(128) + linear(128, classes)


NARROW, WIDE = [16, 16, 32, 64], [32, 64, 128, 256]
DESCRIBED_COUNTS = {
    **{f"resnet{d}": functools.partial(count_cifar_resnet, d, NARROW) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": functools.partial(count_cifar_resnet, 8, WIDE),
    "resnet32x4": functools.partial(count_cifar_resnet, 32, WIDE),
    **{f"wrn_{d}_{k}": functools.partial(count_wrn, d, k) for d in (16, 40) for k in (1, 2)},
    **{name: functools.partial(count_vgg, convs) for name, convs in VGG_CONVS.items()},
    "mobilenetv2": count_mobilenetv2_half,
    "shufflenetv1": count_shufflenetv1,
    "shufflenetv2": count_shufflenetv2,
    "ResNet18": functools.partial(count_resnetv2, False, [2, 2, 2, 2]),
    "ResNet50": functools.partial(count_resnetv2, True, [3, 4, 6, 3]),
    "simple_cnn": count_simple_cnn,
    "mobilenetv1": count_mobilenetv1,
}


@pytest.mark.parametrize("name", sorted(DESCRIBED_COUNTS))
def test_described_count_matches_reference(name):
    assert DESCRIBED_COUNTS[name](100) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", NAMES)
def test_param_count_at_width_1(name):
    result = probe(name, 1.0, 100)
    assert result.num_params == EXPECTED_PARAMS[name]
    assert result.finite


def torchvision_resnet18_cifar(num_classes: int) -> nn.Module:
    """A real torchvision ResNet-18 with the usual CIFAR stem change made by hand."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def test_resnet18_matches_torchvision_with_cifar_stem():
    ours = factory("tv_resnet18")(num_classes=100)
    reference = torchvision_resnet18_cifar(100)
    assert num_params(ours) == num_params(reference) == EXPECTED_PARAMS["tv_resnet18"]
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: v.shape for k, v in reference.state_dict().items()}
    assert isinstance(ours, torchvision.models.ResNet)


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", NAMES)
def test_logits_shape(name, width, num_classes):
    result = probe(name, width, num_classes)
    assert result.logits_shape == (2, num_classes)
    assert result.finite is not False


@pytest.mark.parametrize("name", NAMES)
def test_params_grow_strictly_with_width(name):
    counts = [probe(name, width, 100).num_params for width in WIDTHS]
    assert all(small < big for small, big in zip(counts, counts[1:])), counts


@pytest.mark.parametrize("width", [0.0, -1.0, math.nan])
@pytest.mark.parametrize("name", NAMES)
def test_non_positive_width_raises(name, width):
    with pytest.raises(ValueError, match="width"):
        factory(name)(num_classes=10, width=width)


# RepDistiller's state_dict layout, so its published teacher checkpoints load without renaming.
REPDISTILLER_KEYS = {
    "resnet8x4": ["conv1.weight", "layer1.0.downsample.0.weight", "layer3.0.bn2.running_var", "fc.bias"],
    "wrn_40_2": ["block1.layer.0.convShortcut.weight", "block3.layer.5.bn2.weight", "bn1.bias", "fc.weight"],
    "vgg13": ["block0.0.bias", "block0.4.running_mean", "block4.4.weight", "classifier.weight"],
    "mobilenetv2": ["conv1.0.weight", "blocks.0.0.conv.0.weight", "blocks.6.0.conv.7.bias", "conv2.1.weight",
                    "classifier.0.weight"],
    "shufflenetv1": ["conv1.weight", "layer1.0.conv1.weight", "layer3.3.bn3.bias", "linear.weight"],
    "shufflenetv2": ["layer1.0.conv5.weight", "layer2.7.bn3.weight", "conv2.weight", "bn2.bias", "linear.bias"],
    "ResNet18": ["conv1.weight", "bn1.bias", "layer2.0.shortcut.0.weight", "layer4.1.bn2.running_var", "linear.weight"],
    "ResNet50": ["layer1.0.shortcut.0.weight", "layer1.0.shortcut.1.bias", "layer3.5.conv3.weight",
                 "layer4.2.bn3.weight", "linear.bias"],
}


@pytest.mark.parametrize("name", sorted(REPDISTILLER_KEYS))
def test_repdistiller_state_dict_keys(name):
    with torch.device("meta"):
        keys = factory(name)(num_classes=100).state_dict().keys()
    assert set(REPDISTILLER_KEYS[name]) <= set(keys)


@pytest.mark.parametrize("name", NAMES)
def test_model_yaml_targets_factory(name):
    cfg = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    assert OmegaConf.to_container(cfg, resolve=False) == {
        "_target_": f"kd.models.{MODULE_OF[name]}.{name}",
        "num_classes": "${dataset.num_classes}",
        "width": 1.0,
    }
    assert get_method(cfg._target_) is factory(name)


def resnetv2_layout(bottleneck: bool, blocks: list[int], classes: int) -> dict[str, tuple[int, ...]]:
    """Every state_dict key and shape of RepDistiller's models/resnetv2.py, written from its module names.

    Stem `conv1`/`bn1`; `layer1..4.<block>` with `conv1/bn1/conv2/bn2` (+ `conv3/bn3` in bottlenecks) and, where
    stride or width changes, `shortcut.0` (1x1 conv) + `shortcut.1` (BN); head `linear`.
    """
    layout: dict[str, tuple[int, ...]] = {}

    def add_conv(key: str, c_in: int, c_out: int, k: int) -> None:
        layout[f"{key}.weight"] = (c_out, c_in, k, k)

    def add_bn(key: str, c: int) -> None:
        layout.update({f"{key}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")})
        layout[f"{key}.num_batches_tracked"] = ()

    expansion = 4 if bottleneck else 1
    add_conv("conv1", 3, 64, 3)
    add_bn("bn1", 64)
    c_in = 64
    for stage, (planes, n) in enumerate(zip([64, 128, 256, 512], blocks), start=1):
        out = planes * expansion
        for i in range(n):
            key = f"layer{stage}.{i}"
            if bottleneck:
                shapes = [(c_in, planes, 1), (planes, planes, 3), (planes, out, 1)]
            else:
                shapes = [(c_in, planes, 3), (planes, out, 3)]
            for j, (a, b, k) in enumerate(shapes, start=1):
                add_conv(f"{key}.conv{j}", a, b, k)
                add_bn(f"{key}.bn{j}", b)
            if i == 0 and (stage > 1 or c_in != out):
                add_conv(f"{key}.shortcut.0", c_in, out, 1)
                add_bn(f"{key}.shortcut.1", out)
            c_in = out
    layout["linear.weight"], layout["linear.bias"] = (classes, c_in), (classes,)
    return layout


@pytest.mark.parametrize("name, bottleneck, blocks", [("ResNet18", False, [2, 2, 2, 2]),
                                                      ("ResNet50", True, [3, 4, 6, 3])])
def test_resnetv2_state_dict_is_repdistillers(name, bottleneck, blocks):
    with torch.device("meta"):
        state = factory(name)(num_classes=100).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == resnetv2_layout(bottleneck, blocks, 100)
    assert not [k for k in state if k.startswith("fc.") or "downsample" in k]
    embedding = 2048 if bottleneck else 512
    assert state["linear.weight"].shape == (100, embedding)
    # ResNet50's first block widens 64 -> 256 and so projects; ResNet18's first block is an identity.
    assert ("layer1.0.shortcut.0.weight" in state) == bottleneck


@pytest.mark.parametrize("name, embedding", [("ResNet18", 512), ("ResNet50", 2048)])
def test_resnetv2_default_feature_layers(name, embedding):
    with torch.device("meta"):
        model = factory(name)(num_classes=100)
        layers = default_layers(model)
        shapes = probe_shapes(model, layers["stages"] + [layers["embedding"]], torch.empty(2, 3, 32, 32))
    assert layers == {"stages": ["layer1", "layer2", "layer3", "layer4"], "embedding": "linear:in"}
    expansion = embedding // 512
    assert [tuple(shapes[s]) for s in layers["stages"]] == [
        (2, 64 * expansion, 32, 32), (2, 128 * expansion, 16, 16), (2, 256 * expansion, 8, 8), (2, embedding, 4, 4)
    ]
    assert shapes["linear:in"] == (2, embedding)


# ---------------------------------------------------------------------------------------------------------------
# ImageNet MobileNetV1: mdistiller's student of the ResNet-50 -> MobileNetV1 pair


def mdistiller_mobilenetv1_layout(classes: int) -> dict[str, tuple[int, ...]]:
    """Every state_dict key and shape of mdistiller's models/imagenet/mobilenetv1.py, written from its module names.

    `model.0` = (conv 3x3, BN, ReLU); `model.1..13` = (depthwise conv, BN, ReLU, pointwise conv, BN, ReLU);
    `model.14` = the pooling (no state); `fc`.
    """
    layout: dict[str, tuple[int, ...]] = {}

    def add_bn(key: str, c: int) -> None:
        layout.update({f"{key}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")})
        layout[f"{key}.num_batches_tracked"] = ()

    layout["model.0.0.weight"] = (32, 3, 3, 3)
    add_bn("model.0.1", 32)
    c_in = 32
    for unit, c in enumerate([64, 128, 128, 256, 256] + [512] * 6 + [1024, 1024], start=1):
        layout[f"model.{unit}.0.weight"] = (c_in, 1, 3, 3)
        add_bn(f"model.{unit}.1", c_in)
        layout[f"model.{unit}.3.weight"] = (c, c_in, 1, 1)
        add_bn(f"model.{unit}.4", c)
        c_in = c
    layout["fc.weight"], layout["fc.bias"] = (classes, 1024), (classes,)
    return layout


def test_mobilenetv1_has_mdistillers_parameter_count_and_state_dict_at_1000_classes():
    with torch.device("meta"):
        model = factory("mobilenetv1")(num_classes=1000)
    # 4_231_976: also what counting mdistiller's own MobileNetV1() gives.
    assert num_params(model) == count_mobilenetv1(1000) == 4_231_976
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == mdistiller_mobilenetv1_layout(1000)
    assert list(state) == list(mdistiller_mobilenetv1_layout(1000))  # their order too


def test_mobilenetv1_stages_are_mdistillers_feats_at_strides_4_to_32():
    with torch.device("meta"):
        model = factory("mobilenetv1")(num_classes=1000)
        layers = default_layers(model)
        shapes = probe_shapes(model, layers["stages"] + [layers["embedding"]], torch.empty(2, 3, 224, 224))
    assert layers == {"stages": ["model.3", "model.5", "model.11", "model.13"], "embedding": "fc:in"}
    assert [tuple(shapes[s]) for s in layers["stages"]] == [
        (2, 128, 56, 56), (2, 256, 28, 28), (2, 512, 14, 14), (2, 1024, 7, 7)]
    assert shapes["fc:in"] == (2, 1024)


@pytest.mark.parametrize("width, channels", [(0.25, 8), (0.5, 16), (0.75, 24)])
def test_mobilenetv1_width_is_the_papers_multiplier(width, channels):
    with torch.device("meta"):
        state = factory("mobilenetv1")(num_classes=1000, width=width).state_dict()
    assert state["model.0.0.weight"].shape[0] == channels and state["fc.weight"].shape == (1000, 32 * channels)


# ---------------------------------------------------------------------------------------------------------------
# torchvision and timm models by name


@pytest.mark.parametrize("option, name", [("torchvision", "resnet18"), ("timm", "mobilenetv3_small_100")])
def test_library_options_name_their_factory_and_a_default_model(option, name):
    cfg = OmegaConf.load(CONF_DIR / f"{option}.yaml")
    assert OmegaConf.to_container(cfg, resolve=False) == {
        "defaults": ["/library_model_schema@_here_", "_self_"],
        "_target_": f"kd.models.{option}_models.{option}_model",
        "name": name,
        "num_classes": "${dataset.num_classes}",
        "width": 1.0,
    }


@pytest.mark.parametrize("name", ["resnet34", "mobilenet_v3_small", "efficientnet_b0"])
def test_a_torchvision_model_by_name_is_torchvisions(name):
    from kd.models.torchvision_models import torchvision_model

    with torch.device("meta"):
        ours = torchvision_model(name, num_classes=10)
        reference = torchvision.models.get_model(name, num_classes=10, weights=None)
    assert type(ours) is type(reference)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}


def test_torchvision_auxiliary_heads_stay_but_the_train_forward_returns_logits():
    from kd.models.torchvision_models import torchvision_model

    with torch.device("meta"):
        model = torchvision_model("googlenet", num_classes=10).train()
        logits = model(torch.empty(2, 3, 64, 64))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 10)
    assert any(k.startswith("aux1.") for k in model.state_dict())  # the ImageNet weights hold them


def test_timm_model_by_name_is_timms(one_thread):
    import timm

    from kd.models.timm_models import timm_model

    torch.manual_seed(0)
    ours = timm_model("mobilenetv3_small_100", num_classes=10)
    torch.manual_seed(0)
    reference = timm.create_model("mobilenetv3_small_100", num_classes=10, pretrained=False)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), reference.state_dict().values()))
    with torch.no_grad():
        assert ours.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("module, name, close", [
    ("torchvision_models", "resnet35", "resnet34"),
    ("torchvision_models", "mobilenet_v3", "mobilenet_v3_small"),
    ("timm_models", "mobilenetv3_small", "mobilenetv3_small_100"),
    ("timm_models", "resnet5", "resnet50"),
])
def test_an_unknown_library_model_lists_close_names(module, name, close):
    factory_of = getattr(importlib.import_module(f"kd.models.{module}"), module.replace("_models", "_model"))
    with pytest.raises(ValueError, match=rf"has no .*model '{name}'.*Close names: .*\b{close}\b"):
        factory_of(name, num_classes=10)


@pytest.mark.parametrize("module", ["torchvision_models", "timm_models"])
def test_a_library_model_refuses_a_width_other_than_1(module):
    factory_of = getattr(importlib.import_module(f"kd.models.{module}"), module.replace("_models", "_model"))
    with pytest.raises(ValueError, match=r"width must be 1, got 0.5. Pick a narrower or wider model by name"):
        factory_of("resnet18", num_classes=10, width=0.5)
