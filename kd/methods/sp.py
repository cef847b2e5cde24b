"""Tung & Mori ICCV 2019 (SP): the batch's pairwise similarities of the student matched to the teacher's.
conf/loss/sp.yaml."""
from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor

from kd.methods.base import FeatureCriterion, Step, autocast_off


def similarity_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Tung & Mori ICCV 2019 (SP): ||G_s - G_t||_F^2 / b^2, G = row-normalised f f^T of the flattened batch (b, b)."""
    b = student.shape[0]
    student, teacher = student.reshape(b, -1), teacher.reshape(b, -1)
    gram_s = F.normalize(student @ student.t(), dim=1)
    gram_t = F.normalize(teacher @ teacher.t(), dim=1)
    return (gram_s - gram_t).pow(2).sum() / (b * b)


class SPLoss(FeatureCriterion):
    """Tung & Mori ICCV 2019 (SP): weight * ||G_s - G_t||_F^2 / b^2, G the row-normalised batch similarity f f^T.

    As RepDistiller (helper/loops.py, feat[-2]): the last stage output; its weight (beta), with its source:
    conf/loss/sp.yaml. Several equally long student_layers / teacher_layers are summed pair by pair.
    """

    term = "loss_sp"
    one_pair = False

    def __init__(self, weight: float, student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(weight, student_layers, teacher_layers)

    def pick(self, layers: dict) -> list[str]:
        return [layers["stages"][-1]]

    def forward(self, step: Step) -> dict[str, Tensor]:
        students, teachers = self.features(step)
        with autocast_off(students[0]):
            loss = sum(similarity_loss(s, t) for s, t in zip(students, teachers))
        return {self.term: self.weight * loss}
