"""Peng et al. ICCV 2019 (CC), correlation congruence as RepDistiller runs it: products of consecutive samples'
embedding differences, on learned linear embeddings. conf/loss/cc.yaml."""
import math
from typing import Optional, Sequence

from torch import Tensor, nn

from kd.methods.base import FeatureCriterion, Step, autocast_off, full_precision


def correlation_congruence_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Peng et al. ICCV 2019 (CC) as RepDistiller runs it: mean_i sum_d |e_s,i - e_t,i|_d |e_s,i+1 - e_t,i+1|_d.

    RepDistiller's distiller_zoo/CC.py (code its authors sent, used for the CRD paper's CC row) multiplies the
    embedding differences of consecutive samples in the batch (i = 1 .. b-1) rather than comparing the paper's
    b x b kernel correlation matrices. A batch of one has no pair: the term is then 0.
    """
    delta = (student - teacher).flatten(1).abs()
    if delta.shape[0] < 2:
        return student.sum() * 0.0
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


class CCLoss(FeatureCriterion):
    """Peng et al. ICCV 2019 (CC): weight * correlation_congruence_loss(W_s e_s + b_s, W_t e_t + b_t).

    Both embeddings (the classifiers' inputs) go through a learned linear map to feat_dim, without normalisation.
    As RepDistiller (train_student.py --distill correlation: LinearEmbed of models/util.py on feat[-1];
    distiller_zoo/CC.py). Its values (weight, feat_dim), with their sources: conf/loss/cc.yaml.
    """

    term = "loss_cc"

    def __init__(self, weight: float, feat_dim: int, student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(weight, student_layers, teacher_layers)
        if feat_dim < 1:
            raise ValueError(f"CC: feat_dim={feat_dim} must be >= 1.")
        self.feat_dim = feat_dim
        self.embed_student: Optional[nn.Module] = None
        self.embed_teacher: Optional[nn.Module] = None

    def pick(self, layers: dict) -> list[str]:
        return [layers["embedding"]]

    def build(self, student_shapes, teacher_shapes, images, train_labels) -> None:
        self.embed_student = nn.Linear(math.prod(student_shapes[0][1:]), self.feat_dim).to(images.device)
        self.embed_teacher = nn.Linear(math.prod(teacher_shapes[0][1:]), self.feat_dim).to(images.device)

    def forward(self, step: Step) -> dict[str, Tensor]:
        (student,), (teacher,) = self.features(step)
        embedded_student = full_precision(self.embed_student(student.flatten(1)))  # the linear maps may autocast
        embedded_teacher = full_precision(self.embed_teacher(teacher.flatten(1)))
        with autocast_off(student):
            return {self.term: self.weight * correlation_congruence_loss(embedded_student, embedded_teacher)}
