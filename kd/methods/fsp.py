"""Yim et al. CVPR 2017 (FSP, "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and
Transfer Learning"): the student's flow between consecutive layers, as Gram matrices across them, matches the
teacher's.

As RepDistiller runs it for the CRD paper's FSP row, FSP distils in an init stage only (kd.stages): the student
trains on the FSP loss alone, then with CE alone. conf/loss/fsp.yaml.
"""
from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor

from kd.methods.base import (
    FeatureCriterion,
    InitStage,
    Step,
    autocast_off,
    check_init_stage,
    check_spatial,
    pool_to_common_size,
)


def fsp_matrix(lower: Tensor, upper: Tensor) -> Tensor:
    """Yim et al. CVPR 2017 (FSP): G_ij = sum_{h,w} upper_i(h, w) * lower_j(h, w) / (H W), shape (b, C_up, C_low).

    The larger map is average-pooled to the smaller one's size first, as RepDistiller's distiller_zoo/FSP.py.
    """
    lower, upper = pool_to_common_size(lower, upper)
    positions = lower.shape[2] * lower.shape[3]
    return upper.flatten(2) @ lower.flatten(2).transpose(1, 2) / positions


def fsp_loss(students: Sequence[Tensor], teachers: Sequence[Tensor]) -> Tensor:
    """sum over consecutive layer pairs (k, k+1) of mean (G_s,k - G_t,k)^2: the FSP matrices' squared difference,
    averaged over batch and matrix entries, summed over the pairs (RepDistiller: sum of FSP.compute_loss)."""
    loss = students[0].new_zeros(())
    for k in range(len(students) - 1):
        student = fsp_matrix(students[k], students[k + 1])
        teacher = fsp_matrix(teachers[k], teachers[k + 1])
        loss = loss + F.mse_loss(student, teacher)
    return loss


class FSPLoss(FeatureCriterion):
    """Yim et al. CVPR 2017 (FSP): an init stage of init_epochs on weight * fsp_loss(f_s, f_t), then nothing.

    Layers: the stem's output (where the model declares "stem") and every stage output, on both networks; each pair
    of consecutive layers gives one FSP matrix, so the student's layers need the teacher's channel counts (refused
    otherwise, as RepDistiller refuses them: hence its N/A for wrn_40_2 -> wrn_40_1). The init stage trains the
    student with the run's optimizer at init_lr (null: its lr) on the unweighted sum (weight 1) as RepDistiller
    (train_student.py lines 254-263 (feat[:-1]), init_epochs 30; helper/pretrain.py lines 72-74); the main stage
    adds no term (helper/loops.py lines 174-176: loss_kd = 0, so run_cifar_distill.sh's -b 50 is never used).
    """

    term = "loss_fsp"
    one_pair = False
    needs_teacher = False  # the training step reads no teacher; the init stage does (kd.stages)

    def __init__(self, weight: float, init_epochs: int, init_lr: Optional[float],
                 student_layers: Optional[Sequence[str]] = None, teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(weight, student_layers, teacher_layers)
        check_init_stage("FSP", init_epochs, init_lr, minimum=1)
        self.init_epochs, self.init_lr = init_epochs, init_lr

    def pick(self, layers: dict) -> list[str]:
        return [layers["stem"], *layers["stages"]] if "stem" in layers else list(layers["stages"])

    def build(self, student_shapes, teacher_shapes, images, train_labels) -> None:
        check_spatial("FSP", student_shapes, teacher_shapes)
        student_channels, teacher_channels = [s[1] for s in student_shapes], [t[1] for t in teacher_shapes]
        if len(student_shapes) < 2 or student_channels != teacher_channels:
            raise ValueError(
                f"FSP compares the FSP matrices of consecutive layers, so it needs at least two layers and the "
                f"teacher's channel counts in the student's: got student {student_channels}, teacher "
                f"{teacher_channels}. Use a pair of equal widths (RepDistiller's FSP row is N/A for wrn_40_2 -> "
                "wrn_40_1), or set loss.fsp.student_layers / teacher_layers to layers whose channels agree."
            )

    def layers(self) -> tuple[list[str], list[str]]:
        return [], []  # the training step reads no feature: FSP distils in its init stage

    def forward(self, step: Step) -> dict[str, Tensor]:
        return {}

    def init_stage(self) -> InitStage:
        return InitStage(self.init_epochs, self.init_terms, [], True, self.bound(), self.init_lr)

    def init_terms(self, step: Step) -> dict[str, Tensor]:
        """The init stage's term: weight * fsp_loss of the student's layers against the teacher's."""
        students, teachers = self.features(step)
        with autocast_off(teachers[0]):
            return {self.term: self.weight * fsp_loss(students, teachers)}
