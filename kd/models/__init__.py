"""Model zoo (CIFAR and ImageNet families, and torchvision / timm by name): every factory is `name(num_classes, width)
-> nn.Module` returning logits."""

import difflib

from torch import nn


def scale_channels(channels: int, width: float, divisor: int = 1) -> int:
    """Scale a channel count by `width`, rounded half-up to a multiple of `divisor` (at least one)."""
    # `not width > 0` also rejects NaN, which would otherwise fail later with an obscure error.
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    return max(divisor, int(channels * width / divisor + 0.5) * divisor)


def init_weights(model: nn.Module, linear_std: float | None = None) -> None:
    """He-normal (fan-out) convs with zero bias, unit BatchNorm; linears N(0, linear_std) if given."""
    # The CRD / RepDistiller zoo initialises this way; matching it keeps teacher accuracies comparable.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and linear_std is not None:
            nn.init.normal_(module.weight, 0.0, linear_std)
            nn.init.zeros_(module.bias)


class GlobalAvgPool(nn.Module):
    """Mean over H and W (N, C, 1, 1): AdaptiveAvgPool2d(1)'s value, with a deterministic CUDA backward."""

    def forward(self, x):
        return x.mean((2, 3), keepdim=True)


def close_names(name: str, names: list[str], count: int = 8) -> str:
    """The `count` entries of `names` closest to a misspelt `name`, comma-separated (for error messages)."""
    found = difflib.get_close_matches(name, names, n=count, cutoff=0.5)
    # A prefix ("resnet" for resnet18, resnet34, ...) is what a user often types; difflib ranks those low.
    found += [n for n in names if n.startswith(name) and n not in found][: count - len(found)]
    return ", ".join(found) or "none"
