"""VGG with batch norm for CIFAR (Simonyan & Zisserman, 2015) in the CRD / RepDistiller 5-block layout."""

import torch
import torch.nn.functional as F
from torch import nn

from kd.models import GlobalAvgPool, init_weights, scale_channels

# Conv widths per block; block i is followed by pool i (max-pools, then a global average pool).
_LAYOUTS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _make_block(in_channels: int, widths: list[int]) -> nn.Sequential:
    """Conv3x3(bias)-BN-ReLU repeated, without the last ReLU so the block output is pre-activation."""
    layers: list[nn.Module] = []
    for out_channels in widths:
        layers += [
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
        in_channels = out_channels
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """Five conv blocks with max-pools between them, global average pool, one linear classifier."""

    # What RepDistiller's is_feat=True returns between stem and logits: the ReLU'd outputs of blocks 1-4 (as the
    # next pool's input; block 3's is block 4's input, pool3 being skipped at 32x32) and the pooled embedding;
    # kd.methods.hooks.default_layers reads it. At 64x64 block 4 sees block 3's output max-pooled. "preact": each
    # stage before that ReLU, i.e. the block's own output (_make_block leaves its last ReLU out), for ReviewKD and AB.
    # "stem": its first feature, block 0's ReLU'd output (pool0's input).
    feature_layers = {"stages": ("pool1:in", "pool2:in", "block4:in", "pool4:in"), "embedding": "classifier:in",
                      "preact": ("block1", "block2", "block3", "block4"), "stem": "pool0:in"}

    def __init__(self, layout: list[list[int]], num_classes: int) -> None:
        super().__init__()
        ends = [3] + [widths[-1] for widths in layout]
        self.block0 = _make_block(ends[0], layout[0])
        self.block1 = _make_block(ends[1], layout[1])
        self.block2 = _make_block(ends[2], layout[2])
        self.block3 = _make_block(ends[3], layout[3])
        self.block4 = _make_block(ends[4], layout[4])
        self.pool0 = nn.MaxPool2d(2)
        self.pool1 = nn.MaxPool2d(2)
        self.pool2 = nn.MaxPool2d(2)
        self.pool3 = nn.MaxPool2d(2)
        self.pool4 = GlobalAvgPool()
        self.classifier = nn.Linear(ends[5], num_classes)
        init_weights(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # RepDistiller skips pool3 on 32x32 inputs so block4 still sees a 2x2 map; it pools only at 64x64.
        skip_pool3 = x.shape[-1] < 64
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = F.relu(self.block3(x))
        x = x if skip_pool3 else self.pool3(x)
        x = self.pool4(F.relu(self.block4(x)))
        return self.classifier(torch.flatten(x, 1))


def _vgg(name: str, num_classes: int, width: float) -> VGG:
    """Build the named VGG with every conv width scaled by `width`."""
    layout = [[scale_channels(c, width) for c in widths] for widths in _LAYOUTS[name]]
    return VGG(layout, num_classes)


def vgg8(num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """VGG-8 with batch norm (RepDistiller's `vgg8_bn`, one conv per block)."""
    return _vgg("vgg8", num_classes, width)


def vgg11(num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """VGG-11 with batch norm (configuration A)."""
    return _vgg("vgg11", num_classes, width)


def vgg13(num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """VGG-13 with batch norm (configuration B)."""
    return _vgg("vgg13", num_classes, width)


def vgg16(num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """VGG-16 with batch norm (configuration D)."""
    return _vgg("vgg16", num_classes, width)


def vgg19(num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """VGG-19 with batch norm (configuration E)."""
    return _vgg("vgg19", num_classes, width)
