"""CIFAR ShuffleNet V1 (Zhang et al., 2018) and V2 (Ma et al., 2018) as in the CRD / RepDistiller zoo."""

import torch
import torch.nn.functional as F
from torch import nn

from kd.models import GlobalAvgPool, scale_channels


class ChannelShuffle(nn.Module):
    """Interleave channels across `groups` so the next grouped conv sees every group."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    """ShuffleNet V1 unit: grouped 1x1, shuffle, depthwise 3x3, grouped 1x1; add, or concat when strided."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, first_groups: int) -> None:
        super().__init__()
        mid_planes = out_planes // 4
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, mid_planes, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ChannelShuffle(first_groups)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, 3, stride, 1, groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.shortcut(x)
        out = torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut
        return F.relu(out)


class ShuffleNetV1(nn.Module):
    """1x1 stem, three stages of Bottlenecks (each opening with a stride-2 concat unit), pool, linear."""

    # What RepDistiller's is_feat=True returns between stem and logits (the stage outputs, the pooled
    # embedding); kd.methods.hooks.default_layers reads it.
    feature_layers = {"stages": ("layer1", "layer2", "layer3"), "embedding": "linear:in"}

    def __init__(self, stem: int, planes: list[int], blocks: list[int], groups: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.layer1 = _v1_stage(stem, planes[0], blocks[0], groups, first_groups=1)
        self.layer2 = _v1_stage(planes[0], planes[1], blocks[1], groups, first_groups=groups)
        self.layer3 = _v1_stage(planes[1], planes[2], blocks[2], groups, first_groups=groups)
        self.avgpool = GlobalAvgPool()
        self.linear = nn.Linear(planes[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


def _v1_stage(in_planes: int, out_planes: int, blocks: int, groups: int, first_groups: int) -> nn.Sequential:
    """A V1 stage; the opening unit's branch only adds `out - in` channels since it concatenates its input."""
    # The paper leaves the very first 1x1 ungrouped because the stem has too few channels to split.
    layers = [Bottleneck(in_planes, out_planes - in_planes, 2, groups, first_groups)]
    layers += [Bottleneck(out_planes, out_planes, 1, groups, groups) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def shufflenetv1(num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """ShuffleNet V1, groups 3, stage widths 240/480/960 and 4/8/4 units (RepDistiller's ShuffleV1)."""
    groups = 3
    # Multiples of 12 keep every branch width divisible by 4 (bottleneck) and its quarter by 3 (groups).
    divisor = 4 * groups
    stem = scale_channels(24, width, divisor)
    planes, in_planes = [], stem
    for channels in (240, 480, 960):
        # A stage must add channels to the ones its opening unit concatenates, even at tiny widths.
        in_planes = max(scale_channels(channels, width, divisor), in_planes + divisor)
        planes.append(in_planes)
    return ShuffleNetV1(stem, planes, [4, 8, 4], groups, num_classes)


class DownBlock(nn.Module):
    """ShuffleNet V2 stride-2 unit: two strided branches, each producing half the output channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class BasicBlock(nn.Module):
    """ShuffleNet V2 unit: split channels in halves, transform one half, concat, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, transformed = x.chunk(2, dim=1)
        transformed = F.relu(self.bn1(self.conv1(transformed)))
        transformed = self.bn2(self.conv2(transformed))
        transformed = F.relu(self.bn3(self.conv3(transformed)))
        return self.shuffle(torch.cat([kept, transformed], 1))


class ShuffleNetV2(nn.Module):
    """1x1 stem, three stages (DownBlock then BasicBlocks), 1x1 conv head, pool, linear."""

    # What RepDistiller's is_feat=True returns between stem and logits (the stage outputs, the pooled
    # embedding); kd.methods.hooks.default_layers reads it.
    feature_layers = {"stages": ("layer1", "layer2", "layer3"), "embedding": "linear:in"}

    def __init__(self, stem: int, channels: list[int], blocks: list[int], num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.layer1 = _v2_stage(stem, channels[0], blocks[0])
        self.layer2 = _v2_stage(channels[0], channels[1], blocks[1])
        self.layer3 = _v2_stage(channels[1], channels[2], blocks[2])
        self.conv2 = nn.Conv2d(channels[2], channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels[3])
        self.avgpool = GlobalAvgPool()
        self.linear = nn.Linear(channels[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


def _v2_stage(in_channels: int, out_channels: int, blocks: int) -> nn.Sequential:
    """A V2 stage: one DownBlock followed by `blocks` BasicBlocks."""
    return nn.Sequential(DownBlock(in_channels, out_channels), *[BasicBlock(out_channels) for _ in range(blocks)])


def shufflenetv2(num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """ShuffleNet V2 1x: stage widths 116/232/464, head 1024, 3/7/3 units (RepDistiller's ShuffleV2)."""
    # Even widths so channels split into equal halves and shuffle in two groups.
    stem = scale_channels(24, width, 2)
    channels = [scale_channels(c, width, 2) for c in (116, 232, 464, 1024)]
    return ShuffleNetV2(stem, channels, [3, 7, 3], num_classes)
