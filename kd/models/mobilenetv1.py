"""ImageNet MobileNetV1 (Howard et al., 2017), laid out as mdistiller's student for the ResNet-50 -> MobileNetV1 pair.

Module names and order follow mdistiller's `mdistiller/models/imagenet/mobilenetv1.py`: one Sequential `model` of 14
conv units (a full 3x3 conv, then 13 depthwise-separable units) and the pooling at index 14, then `fc`. Its published
ImageNet checkpoints therefore load strictly at width 1 and 1000 classes.
"""

import torch
from torch import nn

from kd.models import GlobalAvgPool, scale_channels

# (output channels, stride) of the 13 depthwise-separable units at width 1; the stem gives 32 channels at stride 2.
_UNITS = [
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
]
# 8 keeps every channel count of the paper's multipliers (0.25, 0.5, 0.75) exact and hardware-friendly.
_DIVISOR = 8


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Full 3x3 conv (no bias), BN, ReLU: the stem."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _depthwise_separable(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 conv-BN-ReLU, then pointwise 1x1 conv-BN-ReLU (indices 0..5, as mdistiller's)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    """Stride-2 stem, 13 depthwise-separable units (total stride 32), global average pool, linear."""

    # What mdistiller's forward returns as feats (the post-ReLU outputs at strides 4, 8, 16, 32: units 3, 5, 11, 13)
    # and pooled_feat; kd.methods.hooks.default_layers reads it.
    feature_layers = {"stages": ("model.3", "model.5", "model.11", "model.13"), "embedding": "fc:in"}

    def __init__(self, channels: list[int], num_classes: int) -> None:
        super().__init__()
        units = [_conv_bn_relu(3, channels[0], stride=2)]
        for in_channels, out_channels, (_, stride) in zip(channels, channels[1:], _UNITS):
            units.append(_depthwise_separable(in_channels, out_channels, stride))
        # mdistiller pools with AvgPool2d(7), which fits 224x224 inputs only; the global mean is the same function
        # there, has no state either (so the keys stay theirs) and takes any input size.
        units.append(GlobalAvgPool())
        self.model = nn.Sequential(*units)
        self.fc = nn.Linear(channels[-1], num_classes)
        # PyTorch's default initialisation, as mdistiller's student was trained with.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.model(x), 1))


def mobilenetv1(num_classes: int = 1000, width: float = 1.0) -> nn.Module:
    """MobileNetV1 (4.23M parameters at 1000 classes); `width` is the paper's multiplier alpha on every unit."""
    stem = 32
    channels = [scale_channels(c, width, _DIVISOR) for c in (stem, *(c for c, _ in _UNITS))]
    return MobileNetV1(channels, num_classes)
