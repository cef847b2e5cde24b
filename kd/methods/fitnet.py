"""Romero et al. ICLR 2015 (FitNets): a learned regressor from the student's hint layer to the teacher's, trained
in one stage with CE as RepDistiller does. conf/loss/fitnet.yaml."""
from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kd.methods.base import FeatureCriterion, Step, autocast_off, full_precision


def hint_loss(regressed_student: Tensor, teacher: Tensor) -> Tensor:
    """Romero et al. ICLR 2015 (FitNets): mean over all elements of (r(f_s) - f_t)^2, r the learned regressor."""
    return F.mse_loss(regressed_student, teacher)


def hint_regressor(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """FitNet's regressor from the student's hint (N, C_s, H_s, W_s) to the teacher's (N, C_t, H_t, W_t).

    As RepDistiller's ConvReg (models/util.py): a stride-2 3x3 conv when H_s = 2 H_t, a stride-2 4x4 transposed
    conv when 2 H_s = H_t, else a conv with kernel (1 + H_s - H_t, 1 + W_s - W_t); then BatchNorm and ReLU.
    """
    if len(student_shape) != 4 or len(teacher_shape) != 4:
        raise ValueError(
            f"FitNet regresses feature maps (N, C, H, W); got student {tuple(student_shape)} and teacher "
            f"{tuple(teacher_shape)}: pick conv stage outputs as student_layers / teacher_layers."
        )
    (_, s_channels, s_height, s_width), (_, t_channels, t_height, t_width) = student_shape, teacher_shape
    if s_height == 2 * t_height:
        conv = nn.Conv2d(s_channels, t_channels, kernel_size=3, stride=2, padding=1)
    elif 2 * s_height == t_height:
        conv = nn.ConvTranspose2d(s_channels, t_channels, kernel_size=4, stride=2, padding=1)
    elif s_height >= t_height and s_width >= t_width:
        conv = nn.Conv2d(s_channels, t_channels, kernel_size=(1 + s_height - t_height, 1 + s_width - t_width))
    else:
        raise ValueError(
            f"FitNet has no regressor from a {s_height}x{s_width} student hint to a {t_height}x{t_width} teacher "
            "hint (it maps 2x larger, 2x smaller, or larger-or-equal maps): choose other hint layers."
        )
    return nn.Sequential(conv, nn.BatchNorm2d(t_channels), nn.ReLU(inplace=True))


class FitNetLoss(FeatureCriterion):
    """Romero et al. ICLR 2015 (FitNets): weight * mean (r(f_s) - f_t)^2 on a hint layer, r a learned regressor.

    Trained in one stage with CE as RepDistiller does (train_student.py, --distill hint, hint_layer=2: the second
    stage's output, i.e. the middle one of a 3-stage CIFAR ResNet and the second of 4 in VGG, MobileNetV2 and
    ResNet-18); its weight (beta), with its source: conf/loss/fitnet.yaml. The regressor (hint_regressor) is built in
    bind() and trained with the student.
    """

    term = "loss_fitnet"

    def __init__(self, weight: float, student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(weight, student_layers, teacher_layers)
        self.regressor: Optional[nn.Module] = None

    def pick(self, layers: dict) -> list[str]:
        if len(layers["stages"]) < 2:
            raise ValueError(f"FitNet's hint is the second stage output; the model has stages {layers['stages']}.")
        return [layers["stages"][1]]

    def build(self, student_shapes, teacher_shapes, images, train_labels) -> None:
        self.regressor = hint_regressor(student_shapes[0], teacher_shapes[0]).to(images.device)

    def forward(self, step: Step) -> dict[str, Tensor]:
        (student,), (teacher,) = self.features(step)
        regressed = self.regressor(student)
        with autocast_off(teacher):
            return {self.term: self.weight * hint_loss(full_precision(regressed), teacher)}
