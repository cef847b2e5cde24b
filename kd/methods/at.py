"""Zagoruyko & Komodakis ICLR 2017 (AT): the student's spatial attention maps matched to the teacher's, stage by
stage. conf/loss/at.yaml."""
from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor

from kd.methods.base import FeatureCriterion, Step, autocast_off, check_spatial, pool_to_common_size


def attention_map(feature: Tensor, p: float) -> Tensor:
    """Zagoruyko & Komodakis ICLR 2017: at(f) = normalize(mean_c |f_c|^p), flattened per sample (N, H*W)."""
    return F.normalize(feature.pow(p).mean(dim=1).flatten(1), dim=1)


def attention_loss(student: Tensor, teacher: Tensor, p: float) -> Tensor:
    """AT for one stage pair: mean over samples and positions of (at(f_s) - at(f_t))^2.

    As RepDistiller (distiller_zoo/AT.py), the larger map is first average-pooled to the smaller one's size.
    """
    student, teacher = pool_to_common_size(student, teacher)
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


class ATLoss(FeatureCriterion):
    """Zagoruyko & Komodakis ICLR 2017 (AT): weight * sum over stage pairs of mean (at(f_s) - at(f_t))^2.

    at(f) = normalize(mean_c f_c^p) (attention_loss). As RepDistiller (helper/loops.py, feat[1:-1]): every stage
    output, stem and embedding left out. Its values (weight, p), with their sources: conf/loss/at.yaml.
    """

    term = "loss_at"
    one_pair = False

    def __init__(self, weight: float, p: float, student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(weight, student_layers, teacher_layers)
        self.p = p

    def pick(self, layers: dict) -> list[str]:
        return list(layers["stages"])

    def build(self, student_shapes, teacher_shapes, images, train_labels) -> None:
        check_spatial("AT", student_shapes, teacher_shapes)

    def forward(self, step: Step) -> dict[str, Tensor]:
        students, teachers = self.features(step)
        with autocast_off(students[0]):
            loss = sum(attention_loss(s, t, self.p) for s, t in zip(students, teachers))
        return {self.term: self.weight * loss}
