"""CIFAR ResNets (He et al., 2016, Sec. 4.2) laid out as in the CRD / RepDistiller zoo."""

import torch
import torch.nn.functional as F
from torch import nn

from kd.models import GlobalAvgPool, init_weights, scale_channels


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus an identity or 1x1-conv-BN projection shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """3x3 stem, three stages of BasicBlocks (strides 1, 2, 2), global average pool, linear."""

    # What RepDistiller's is_feat=True returns between stem and logits (post-ReLU stage outputs, the pooled
    # embedding, and as "stem" the stem's output, its first feature); kd.methods.hooks.default_layers reads it. Each
    # instance adds "preact" (preact_layer), which depends on the blocks it built.
    feature_layers = {"stages": ("layer1", "layer2", "layer3"), "embedding": "fc:in", "stem": "layer1:in"}

    def __init__(self, depth: int, filters: list[int], num_classes: int) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _make_stage(filters[0], filters[1], blocks, stride=1)
        self.layer2 = _make_stage(filters[1], filters[2], blocks, stride=2)
        self.layer3 = _make_stage(filters[2], filters[3], blocks, stride=2)
        self.avgpool = GlobalAvgPool()
        self.fc = nn.Linear(filters[3], num_classes)
        stages = CifarResNet.feature_layers["stages"]
        self.feature_layers = {**CifarResNet.feature_layers,
                               "preact": tuple(preact_layer(name, self.get_submodule(name)) for name in stages)}
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def preact_layer(name: str, stage: nn.Sequential) -> str:
    """Stage `name`'s output before its final ReLU, as hooks can capture it (ReviewKD's teacher levels).

    The last block returns F.relu(bn2(...) + shortcut) and no module outputs that sum, so it is named as the sum
    ("a+b") of the block's bn2 output and of its shortcut: downsample's output, or the block's input (":in").
    """
    last = f"{name}.{len(stage) - 1}"
    shortcut = f"{last}.downsample" if stage[-1].downsample is not None else f"{last}:in"
    return f"{last}.bn2+{shortcut}"


def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """A stage whose first block changes stride/width and the rest keep it."""
    layers = [BasicBlock(in_planes, planes, stride)]
    layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _resnet(depth: int, filters: tuple[int, ...], num_classes: int, width: float) -> CifarResNet:
    """Build a CIFAR ResNet with every filter count scaled by `width`."""
    return CifarResNet(depth, [scale_channels(f, width) for f in filters], num_classes)


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)  # the "x4" variants of the CRD paper


def resnet8(num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """ResNet-8 (filters 16/16/32/64)."""
    return _resnet(8, _NARROW, num_classes, width)


def resnet14(num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """ResNet-14 (filters 16/16/32/64)."""
    return _resnet(14, _NARROW, num_classes, width)


def resnet20(num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """ResNet-20 (filters 16/16/32/64)."""
    return _resnet(20, _NARROW, num_classes, width)


def resnet32(num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """ResNet-32 (filters 16/16/32/64)."""
    return _resnet(32, _NARROW, num_classes, width)


def resnet44(num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """ResNet-44 (filters 16/16/32/64)."""
    return _resnet(44, _NARROW, num_classes, width)


def resnet56(num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """ResNet-56 (filters 16/16/32/64)."""
    return _resnet(56, _NARROW, num_classes, width)


def resnet110(num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """ResNet-110 (filters 16/16/32/64)."""
    return _resnet(110, _NARROW, num_classes, width)


def resnet8x4(num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """ResNet-8x4 (filters 32/64/128/256)."""
    return _resnet(8, _WIDE, num_classes, width)


def resnet32x4(num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """ResNet-32x4 (filters 32/64/128/256)."""
    return _resnet(32, _WIDE, num_classes, width)
