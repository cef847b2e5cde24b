"""torchvision's ResNet-18 adapted to 32x32 inputs, keeping torchvision's module names and state_dict keys."""

from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from kd.models import GlobalAvgPool, scale_channels


class CifarResNet18(ResNet):
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool, so 32x32 inputs keep their resolution."""

    def __init__(self, num_classes: int = 100, width: float = 1.0) -> None:
        planes = [scale_channels(c, width) for c in (64, 128, 256, 512)]
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        # torchvision hard-codes the ImageNet stem and the 64..512 widths, so those parts are rebuilt
        # with its own _make_layer; forward, BasicBlock and every module name stay torchvision's.
        self.inplanes = planes[0]
        self.conv1 = nn.Conv2d(3, planes[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = self._norm_layer(planes[0])
        self.maxpool = nn.Identity()
        self.avgpool = GlobalAvgPool()  # deterministic CUDA backward (deterministic=true)
        self.layer1 = self._make_layer(BasicBlock, planes[0], 2)
        self.layer2 = self._make_layer(BasicBlock, planes[1], 2, stride=2)
        self.layer3 = self._make_layer(BasicBlock, planes[2], 2, stride=2)
        self.layer4 = self._make_layer(BasicBlock, planes[3], 2, stride=2)
        self.fc = nn.Linear(planes[3], num_classes)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Re-apply torchvision's initialisation to the rebuilt modules (its linear keeps the default)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


def tv_resnet18(num_classes: int = 100, width: float = 1.0) -> nn.Module:
    """torchvision ResNet-18 for 32x32 inputs; `width` scales the 64/128/256/512 stage widths."""
    return CifarResNet18(num_classes, width)
