"""Heo et al. AAAI 2019 (AB, "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden
Neurons"): the student's pre-ReLU stage outputs, through connectors, learn on which side of zero the teacher's lie.

As RepDistiller runs it for the CRD paper's AB row, AB distils in an init stage only (kd.stages): the student's
layers and the connectors train on the AB loss alone, then the run trains with CE alone. conf/loss/ab.yaml.
"""
from typing import Optional, Sequence

from torch import Tensor, nn

from kd.methods.base import (
    FeatureCriterion,
    InitStage,
    Step,
    autocast_off,
    check_init_stage,
    check_spatial,
    full_precision,
)
from kd.methods.fitnet import hint_regressor


def boundary_loss(student: Tensor, teacher: Tensor, margin: float = 1.0) -> Tensor:
    """Heo et al. AAAI 2019 (AB, the alternative L2 loss): sum over all elements of (s + m)^2 [s > -m, t <= 0] +
    (s - m)^2 [s <= m, t > 0], i.e. ||rho(t) * relu(m - s) + (1 - rho(t)) * relu(m + s)||^2 with rho(t) = [t > 0]:
    a student activation is pushed past the margin m on the side of zero where the teacher's is."""
    below = ((student > -margin) & (teacher <= 0)).to(student.dtype)
    above = ((student <= margin) & (teacher > 0)).to(student.dtype)
    return ((student + margin).pow(2) * below + (student - margin).pow(2) * above).sum()


def ab_loss(students: Sequence[Tensor], teachers: Sequence[Tensor], margin: float = 1.0) -> Tensor:
    """sum_i 2^(i - n + 1) * boundary_loss(s_i, t_i) / b * 3 / 1000 over n layer pairs, shallow to deep: the deepest
    layer weighs 1, each shallower one half the next; b is the batch size. RepDistiller's distiller_zoo/AB.py."""
    n, batch = len(students), students[0].shape[0]
    loss = students[0].new_zeros(())
    for i, (student, teacher) in enumerate(zip(students, teachers)):
        loss = loss + 2.0 ** (i - n + 1) * boundary_loss(student, teacher, margin) / batch * 3 / 1000
    return loss


def connector(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """AB's connector from a student map to the teacher's: the identity when channels and height agree, else
    FitNet's regressor conv with BatchNorm and no ReLU (RepDistiller's Connector: ConvReg(use_relu=False))."""
    if student_shape[1] == teacher_shape[1] and student_shape[2] == teacher_shape[2]:
        return nn.Identity()
    return hint_regressor(student_shape, teacher_shape)[:2]  # conv, BatchNorm


class ABLoss(FeatureCriterion):
    """Heo et al. AAAI 2019 (AB): an init stage of init_epochs on weight * ab_loss(connector(f_s), f_t), then nothing.

    Layers: every stage output before its final ReLU (the models' "preact" layers; their stage outputs where they
    declare none), on both networks, paired in order. WRN declares none: RepDistiller takes its stages through the
    next block's BatchNorm (wrn.py, preact=True), whose output the in-place ReLU after it overwrites, so hooks
    cannot capture it; its raw stage outputs are used instead (the same fallback as ReviewKD's teacher levels).
    The init stage trains the student and the connectors with the run's optimizer at init_lr (null: its lr), as
    RepDistiller (train_student.py lines 227-238: Connector, init_epochs 30, init() of helper/pretrain.py at
    opt.learning_rate); the main stage adds no term (helper/loops.py lines 171-173: loss_kd = 0), and the connectors,
    unused there, stay as the init stage left them.
    """

    term = "loss_ab"
    one_pair = False
    needs_teacher = False  # the training step reads no teacher; the init stage does (kd.stages)

    def __init__(self, weight: float, margin: float, init_epochs: int, init_lr: Optional[float],
                 student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(weight, student_layers, teacher_layers)
        check_init_stage("AB", init_epochs, init_lr, minimum=1)
        if not margin > 0:
            raise ValueError(f"AB: margin={margin} must be > 0.")
        self.margin, self.init_epochs, self.init_lr = margin, init_epochs, init_lr
        self.connectors = nn.ModuleList()

    def pick(self, layers: dict) -> list[str]:
        return list(layers.get("preact", layers["stages"]))

    def build(self, student_shapes, teacher_shapes, images, train_labels) -> None:
        check_spatial("AB", student_shapes, teacher_shapes)
        pairs = zip(student_shapes, teacher_shapes)
        self.connectors = nn.ModuleList(connector(s, t) for s, t in pairs).to(images.device)

    def layers(self) -> tuple[list[str], list[str]]:
        return [], []  # the training step reads no feature: AB distils in its init stage

    def forward(self, step: Step) -> dict[str, Tensor]:
        return {}

    def init_stage(self) -> InitStage:
        return InitStage(self.init_epochs, self.init_terms, [self.connectors], True, self.bound(), self.init_lr)

    def init_terms(self, step: Step) -> dict[str, Tensor]:
        """The init stage's term: weight * ab_loss of the connected student features against the teacher's."""
        students, teachers = self.features(step)
        connected = [full_precision(c(s)) for c, s in zip(self.connectors, students)]  # the convs may autocast
        with autocast_off(teachers[0]):
            return {self.term: self.weight * ab_loss(connected, teachers, self.margin)}
