"""CIFAR MobileNetV2 (Sandler et al., 2018) as used in the CRD tables (RepDistiller's `mobile_half`)."""

import torch
from torch import nn

from kd.models import GlobalAvgPool, init_weights, scale_channels

# (expansion t, output channels c, repeats n, first stride s) at width multiplier 1.
_SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
# 4 is the largest multiple that keeps every width-0.5 channel count (8, 12, 16, ...) exact.
_DIVISOR = 4


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Sequential:
    """Conv (no bias), BN, ReLU; padding keeps the size for stride 1."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Pointwise expansion, depthwise 3x3, linear pointwise projection; residual when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        # The expansion conv is kept even for t=1, unlike torchvision; RepDistiller's parameter count needs it.
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """Stride-2 stem, seven inverted-residual stages, 1x1 conv to the last width, pool, linear."""

    # What RepDistiller's is_feat=True returns between stem and logits (the outputs of stages 1, 2, 4 and 6, the
    # pooled embedding); kd.methods.hooks.default_layers reads it.
    feature_layers = {"stages": ("blocks.1", "blocks.2", "blocks.4", "blocks.6"), "embedding": "classifier:in"}

    def __init__(self, num_classes: int, width_mult: float) -> None:
        super().__init__()
        in_channels = scale_channels(32, width_mult, _DIVISOR)
        self.conv1 = _conv_bn_relu(3, in_channels, 3, stride=2)
        self.blocks = nn.ModuleList()
        for expansion, channels, repeats, stride in _SETTINGS:
            out_channels = scale_channels(channels, width_mult, _DIVISOR)
            layers = []
            for i in range(repeats):
                layers.append(InvertedResidual(in_channels, out_channels, stride if i == 0 else 1, expansion))
                in_channels = out_channels
            self.blocks.append(nn.Sequential(*layers))
        # As in the paper, the 1280-d head is kept for multipliers <= 1 and only grows beyond 1.
        last_channels = scale_channels(1280, width_mult, _DIVISOR) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(in_channels, last_channels, 1, stride=1)
        self.avgpool = GlobalAvgPool()
        self.classifier = nn.Sequential(nn.Linear(last_channels, num_classes))
        init_weights(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        x = self.avgpool(self.conv2(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenetv2(num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """MobileNetV2 with expansion 6 and width multiplier 0.5 * `width` (width 1 = CRD's MobileNetV2)."""
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    return MobileNetV2(num_classes, width_mult=0.5 * width)
