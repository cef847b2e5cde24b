"""A small plain CNN: a fast, non-residual baseline student for smoke runs and ablations."""

import torch
from torch import nn

from kd.models import GlobalAvgPool, init_weights, scale_channels


def _stage(in_channels: int, out_channels: int) -> nn.Sequential:
    """Conv3x3-BN-ReLU then a 2x2 max-pool that halves the resolution."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SimpleCNN(nn.Module):
    """Three conv stages (32x32 -> 4x4), global average pool, linear."""

    # Stage outputs and the classifier's input, for distillation (kd.methods.hooks.default_layers reads it).
    feature_layers = {"stages": ("block1", "block2", "block3"), "embedding": "fc:in"}

    def __init__(self, channels: list[int], num_classes: int) -> None:
        super().__init__()
        self.block1 = _stage(3, channels[0])
        self.block2 = _stage(channels[0], channels[1])
        self.block3 = _stage(channels[1], channels[2])
        self.avgpool = GlobalAvgPool()
        self.fc = nn.Linear(channels[2], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def simple_cnn(num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """Plain CNN with 32/64/128 channels scaled by `width`."""
    return SimpleCNN([scale_channels(c, width) for c in (32, 64, 128)], num_classes)
