"""ResNet-18 and ResNet-50 (He et al., 2016) for 32x32 inputs, laid out as in the CRD / RepDistiller zoo.

The module is named after RepDistiller's `models/resnetv2.py`, its second ResNet file: these are the ordinary
post-activation ResNets with ImageNet's four stages of 64..512 planes, not the pre-activation "ResNet v2". Module
names follow that file (`shortcut`, `linear`) so its published teacher checkpoints load without renaming.
"""

import torch
import torch.nn.functional as F
from torch import nn

from kd.models import GlobalAvgPool, init_weights, scale_channels


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """Identity (an empty Sequential: no state) or a strided 1x1 conv + BN projection, both named `shortcut`."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand to 4x planes, each with BN; plus the shortcut, then ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """3x3 stride-1 stem (no max-pool), four stages (strides 1, 2, 2, 2), global average pool, linear."""

    # What RepDistiller's is_feat=True returns between stem and logits (post-ReLU stage outputs, the pooled
    # embedding); kd.methods.hooks.default_layers reads it.
    feature_layers = {"stages": ("layer1", "layer2", "layer3", "layer4"), "embedding": "linear:in"}

    def __init__(self, block: type[BasicBlock | Bottleneck], blocks: list[int], planes: list[int],
                 num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, planes[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        in_planes = planes[0]
        stages = []
        for stage_planes, count, stride in zip(planes, blocks, (1, 2, 2, 2)):
            stages.append(_make_stage(block, in_planes, stage_planes, count, stride))
            in_planes = stage_planes * block.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = GlobalAvgPool()
        self.linear = nn.Linear(in_planes, num_classes)
        # RepDistiller's initialisation; its linear keeps PyTorch's default. Its optional zero-initialised last BN
        # of each block is off by default and its teachers were trained without it, so it is not offered here.
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(torch.flatten(self.avgpool(x), 1))


def _make_stage(block: type[BasicBlock | Bottleneck], in_planes: int, planes: int, count: int,
                stride: int) -> nn.Sequential:
    """A stage whose first block changes stride/width and the rest keep it."""
    layers = [block(in_planes, planes, stride)]
    layers += [block(planes * block.expansion, planes) for _ in range(count - 1)]
    return nn.Sequential(*layers)


def _resnet(block: type[BasicBlock | Bottleneck], blocks: list[int], num_classes: int, width: float) -> ResNet:
    """Build a ResNet with the stem and the 64/128/256/512 stage planes scaled by `width`."""
    return ResNet(block, blocks, [scale_channels(p, width) for p in (64, 128, 256, 512)], num_classes)


def ResNet18(num_classes: int = 100, width: float = 1.0) -> nn.Module:  # noqa: N802 (the zoo's published name)
    """ResNet-18: BasicBlocks [2, 2, 2, 2], 512-d embedding."""
    return _resnet(BasicBlock, [2, 2, 2, 2], num_classes, width)


def ResNet50(num_classes: int = 100, width: float = 1.0) -> nn.Module:  # noqa: N802 (the zoo's published name)
    """ResNet-50: Bottlenecks [3, 4, 6, 3], 2048-d embedding."""
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes, width)
