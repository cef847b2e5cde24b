"""Ahn et al. CVPR 2019 (VID): the teacher's features' Gaussian likelihood under a regressed student mean and a
learned variance per channel. conf/loss/vid.yaml."""
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.methods.base import FeatureCriterion, Step, autocast_off, check_spatial, full_precision, pool_to_common_size


def vid_loss(predicted_mean: Tensor, teacher: Tensor, variance: Tensor) -> Tensor:
    """Ahn et al. CVPR 2019 (VID): mean over all elements of 0.5 * (log var_c + (t - mu(f_s))^2 / var_c).

    The Gaussian negative log-likelihood of the teacher's feature under mean mu (the regressed student feature)
    and one learned variance per channel, without its constant 0.5 log(2 pi); averaged over batch, channels and
    positions, as RepDistiller's distiller_zoo/VID.py.
    """
    variance = variance.reshape(1, -1, *([1] * (teacher.dim() - 2)))
    return (0.5 * (torch.log(variance) + (predicted_mean - teacher).pow(2) / variance)).mean()


def vid_regressor(student_channels: int, teacher_channels: int) -> nn.Module:
    """VID's mean predictor: 1x1 conv, ReLU, 1x1 conv, ReLU, 1x1 conv, no biases, teacher_channels wide inside.

    As RepDistiller: VIDLoss(s, t, t) in train_student.py, i.e. num_mid_channel = the teacher's channel count.
    """
    return nn.Sequential(
        nn.Conv2d(student_channels, teacher_channels, 1, bias=False), nn.ReLU(),
        nn.Conv2d(teacher_channels, teacher_channels, 1, bias=False), nn.ReLU(),
        nn.Conv2d(teacher_channels, teacher_channels, 1, bias=False),
    )


def softplus_inverse(value: float) -> float:
    """x with log(1 + exp(x)) = value: the raw parameter that starts VID's variance at a given value."""
    return math.log(math.expm1(value))


class VIDLoss(FeatureCriterion):
    """Ahn et al. CVPR 2019 (VID): weight * sum over stage pairs of mean 0.5 * (log var_c + (t - mu(f_s))^2 / var_c).

    mu is a learned 1x1-conv regressor (vid_regressor) and var_c = softplus(alpha_c) + eps a learned variance per
    teacher channel, starting at init_variance. As RepDistiller (distiller_zoo/VID.py; helper/loops.py feat[1:-1]:
    every stage output); its values, with their sources: conf/loss/vid.yaml. The larger of two maps is
    average-pooled to the other's size before the regressor, as there.
    """

    term = "loss_vid"
    one_pair = False

    def __init__(self, weight: float, init_variance: float, eps: float,
                 student_layers: Optional[Sequence[str]] = None, teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(weight, student_layers, teacher_layers)
        if not init_variance > eps > 0:
            raise ValueError(f"VID: init_variance={init_variance} must exceed eps={eps} > 0 (softplus is positive).")
        self.init_variance, self.eps = init_variance, eps
        self.regressors = nn.ModuleList()
        self.log_scales = nn.ParameterList()

    def pick(self, layers: dict) -> list[str]:
        return list(layers["stages"])

    def build(self, student_shapes, teacher_shapes, images, train_labels) -> None:
        check_spatial("VID", student_shapes, teacher_shapes)
        start = softplus_inverse(self.init_variance - self.eps)  # softplus(start) + eps = init_variance
        device = images.device
        pairs = zip(student_shapes, teacher_shapes)
        self.regressors = nn.ModuleList(vid_regressor(s[1], t[1]).to(device) for s, t in pairs)
        self.log_scales = nn.ParameterList(torch.full((t[1],), start, device=device) for t in teacher_shapes)

    def variances(self) -> list[Tensor]:
        """var_c = softplus(alpha_c) + eps per teacher channel, one vector per stage pair."""
        return [F.softplus(full_precision(alpha)) + self.eps for alpha in self.log_scales]

    def forward(self, step: Step) -> dict[str, Tensor]:
        students, teachers = self.features(step)
        loss = students[0].new_zeros(())
        for student, teacher, regressor, variance in zip(students, teachers, self.regressors, self.variances()):
            student, teacher = pool_to_common_size(student, teacher)
            predicted = full_precision(regressor(student))  # the regressor may run under autocast
            with autocast_off(teacher):
                loss = loss + vid_loss(predicted, teacher, variance)
        return {self.term: self.weight * loss}
