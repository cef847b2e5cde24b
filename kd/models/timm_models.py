"""Any timm model by name (`model@student=timm student.name=mobilenetv3_small_100`), randomly initialised; its
pretrained weights come through teacher_checkpoint=timm:<name.tag> (kd.pretrained)."""

import timm
from torch import nn

from kd.models import close_names


def timm_model(name: str = "mobilenetv3_small_100", num_classes: int = 1000, width: float = 1.0) -> nn.Module:
    """timm.create_model(name, num_classes=..., pretrained=False); `width` must be 1 (widths are in the name)."""
    if not timm.is_model(name):
        raise ValueError(f"timm has no model {name!r} (teacher.name / student.name). Close names: "
                         f"{close_names(timm.models.get_arch_name(name), timm.list_models())}. All: "
                         "timm.list_models().")
    if width != 1.0:
        raise ValueError(f"timm's {name} has one width: width must be 1, got {width:g}. Pick a narrower or wider "
                         "model by name instead (e.g. mobilenetv3_small_050 / _075 / _100, resnet18 / resnet50).")
    return timm.create_model(name, num_classes=num_classes, pretrained=False)
