"""Park et al. CVPR 2019 (RKD): the batch's pairwise distances and triplet angles of the embeddings, student
against teacher. conf/loss/rkd.yaml."""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.methods.base import FeatureCriterion, Step, autocast_off


def pairwise_distances(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Distances between the rows of x (b, d): sqrt(max(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, eps)), 0 on the diagonal."""
    squared = x.pow(2).sum(dim=1)
    distances = (squared[:, None] + squared[None, :] - 2 * x @ x.t()).clamp(min=eps).sqrt()
    return distances * (1 - torch.eye(len(x), dtype=x.dtype, device=x.device))


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Park et al. CVPR 2019 (RKD-D): smooth L1 between the pairwise distances, each divided by its mean over i != j."""

    def normalised(x: Tensor) -> Tensor:
        d = pairwise_distances(x.reshape(x.shape[0], -1))
        return d / (d.sum() / (d > 0).sum())  # the mean of the non-zero distances, without a host sync

    if student.shape[0] < 2:  # no pair (a last batch of one): nothing to match, and no mean to divide by
        return student.sum() * 0.0
    return F.smooth_l1_loss(normalised(student), normalised(teacher))


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Park et al. CVPR 2019 (RKD-A): smooth L1 between cos angle(x_i, x_j, x_k) = <e_ji, e_ki> over all triplets.

    e_ji = (x_i - x_j) / |x_i - x_j| (0 when i = j), so the b^3 entries include the degenerate ones, as in
    RepDistiller's distiller_zoo/RKD.py.
    """

    def angles(x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        directions = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=2)  # [j, i] = unit(x_i - x_j)
        return (directions @ directions.transpose(1, 2)).flatten()

    return F.smooth_l1_loss(angles(student), angles(teacher))


def rkd_loss(student: Tensor, teacher: Tensor, distance_weight: float, angle_weight: float) -> Tensor:
    """Park et al. CVPR 2019 (RKD): distance_weight * RKD-D + angle_weight * RKD-A (RepDistiller's w_d, w_a)."""
    return distance_weight * rkd_distance_loss(student, teacher) + angle_weight * rkd_angle_loss(student, teacher)


class RKDLoss(FeatureCriterion):
    """Park et al. CVPR 2019 (RKD): weight * (distance_weight * RKD-D + angle_weight * RKD-A) on the embedding.

    As RepDistiller (distiller_zoo/RKD.py; helper/loops.py feat[-1]); its values, with their sources:
    conf/loss/rkd.yaml.
    """

    term = "loss_rkd"

    def __init__(self, weight: float, distance_weight: float, angle_weight: float,
                 student_layers: Optional[Sequence[str]] = None, teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(weight, student_layers, teacher_layers)
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight

    def pick(self, layers: dict) -> list[str]:
        return [layers["embedding"]]

    def forward(self, step: Step) -> dict[str, Tensor]:
        (student,), (teacher,) = self.features(step)
        with autocast_off(student):
            loss = rkd_loss(student, teacher, self.distance_weight, self.angle_weight)
        return {self.term: self.weight * loss}
