"""Passalis & Tefas ECCV 2018 (PKT): the batch's cosine-kernel conditional distributions, student against teacher.
conf/loss/pkt.yaml."""
from typing import Optional, Sequence

import torch
from torch import Tensor

from kd.methods.base import FeatureCriterion, Step, autocast_off


def pkt_loss(student: Tensor, teacher: Tensor, eps: float = 1e-7) -> Tensor:
    """Passalis & Tefas ECCV 2018 (PKT): mean_ij q_ij log((q_ij + eps) / (p_ij + eps)) over the b x b entries.

    p (student) and q (teacher) are the cosine similarities of the batch's embeddings, (cos + 1) / 2, each row
    normalised to sum to 1; eps and the mean over entries are those of RepDistiller's distiller_zoo/PKT.py.
    """

    def conditional(x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        x = x / (x.norm(dim=1, keepdim=True) + eps)
        similarity = (x @ x.t() + 1.0) / 2.0
        return similarity / similarity.sum(dim=1, keepdim=True)

    p, q = conditional(student), conditional(teacher)
    return (q * torch.log((q + eps) / (p + eps))).mean()


class PKTLoss(FeatureCriterion):
    """Passalis & Tefas ECCV 2018 (PKT): weight * mean q log(q / p), p, q the batch's cosine-kernel distributions.

    As RepDistiller (helper/loops.py, feat[-1]): on the embedding (the classifier's input); its weight (beta), with
    its source: conf/loss/pkt.yaml.
    """

    term = "loss_pkt"

    def __init__(self, weight: float, student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(weight, student_layers, teacher_layers)

    def pick(self, layers: dict) -> list[str]:
        return [layers["embedding"]]

    def forward(self, step: Step) -> dict[str, Tensor]:
        (student,), (teacher,) = self.features(step)
        with autocast_off(student):
            return {self.term: self.weight * pkt_loss(student, teacher)}
