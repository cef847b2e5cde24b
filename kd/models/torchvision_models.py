"""Any torchvision classification model by name (`model@teacher=torchvision teacher.name=resnet34`), randomly
initialised; its ImageNet weights come through teacher_checkpoint=torchvision:<Weights> (kd.pretrained)."""

import torchvision
from torch import nn

from kd.models import close_names


def classification_models() -> list[str]:
    """The names torchvision.models.get_model builds into an image classifier (detection, video, ... left out)."""
    return torchvision.models.list_models(module=torchvision.models)


def torchvision_model(name: str = "resnet18", num_classes: int = 1000, width: float = 1.0) -> nn.Module:
    """torchvision.models.get_model(name, num_classes=..., weights=None); `width` must be 1 (widths are in the name)."""
    names = classification_models()
    if name not in names:
        raise ValueError(f"torchvision has no classification model {name!r} (teacher.name / student.name). Close "
                         f"names: {close_names(name, names)}. All: torchvision.models.list_models(module="
                         "torchvision.models).")
    if width != 1.0:
        raise ValueError(f"torchvision's {name} has one width: width must be 1, got {width:g}. Pick a narrower or "
                         "wider model by name instead (e.g. resnet18 / resnet50, mobilenet_v3_small / _large).")
    model = torchvision.models.get_model(name, num_classes=num_classes, weights=None)
    if getattr(model, "aux_logits", False):
        # GoogLeNet and Inception v3 return (logits, auxiliary logits) in train mode; the loop wants logits. The
        # auxiliary heads stay, so state_dicts (and the ImageNet weights, which hold them) keep matching.
        model.aux_logits = False
    return model
