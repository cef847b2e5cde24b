"""Pre-activation Wide ResNets (Zagoruyko & Komodakis, 2016) laid out as in the CRD / RepDistiller zoo."""

import torch
from torch import nn

from kd.models import GlobalAvgPool, init_weights, scale_channels


class BasicBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; a 1x1 conv on the activated input when the width changes."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        # camelCase kept so state_dict keys match RepDistiller checkpoints (its pretrained teachers load as is).
        self.convShortcut = None
        if in_planes != out_planes:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        # Identity shortcuts carry the raw input; projections see the activated one, as in the original.
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One stage of `blocks` BasicBlocks; the first one changes width and stride."""

    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        layers = [BasicBlock(in_planes, out_planes, stride)]
        layers += [BasicBlock(out_planes, out_planes, 1) for _ in range(blocks - 1)]
        self.layer = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k: 3x3 stem, three pre-activation stages, final BN-ReLU, average pool, linear."""

    # What RepDistiller's is_feat=True returns between stem and logits (the raw, pre-activation stage outputs,
    # the pooled embedding, and as "stem" the stem conv's output, its first feature); kd.methods.hooks.default_layers
    # reads it.
    feature_layers = {"stages": ("block1", "block2", "block3"), "embedding": "fc:in", "stem": "block1:in"}

    def __init__(self, depth: int, channels: list[int], num_classes: int) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        blocks = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, channels[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(blocks, channels[0], channels[1], stride=1)
        self.block2 = NetworkBlock(blocks, channels[1], channels[2], stride=2)
        self.block3 = NetworkBlock(blocks, channels[2], channels[3], stride=2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = GlobalAvgPool()
        self.fc = nn.Linear(channels[3], num_classes)
        init_weights(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _wrn(depth: int, widen_factor: int, num_classes: int, width: float) -> WideResNet:
    """Build WRN-depth-widen_factor with every channel count also scaled by `width`."""
    base = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
    return WideResNet(depth, [scale_channels(c, width) for c in base], num_classes)


def wrn_16_1(num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """WRN-16-1."""
    return _wrn(16, 1, num_classes, width)


def wrn_16_2(num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """WRN-16-2."""
    return _wrn(16, 2, num_classes, width)


def wrn_40_1(num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """WRN-40-1."""
    return _wrn(40, 1, num_classes, width)


def wrn_40_2(num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """WRN-40-2."""
    return _wrn(40, 2, num_classes, width)
