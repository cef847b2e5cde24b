"""Training criteria. A criterion is called as criterion(step) with the batch's `Step` and returns a dict of
named, already-weighted loss terms whose sum is the loss; the loop logs each term without knowing the method.

Criteria that read intermediate features name the modules (`layers()`) and build their adapters in `bind()`,
which the engine calls once, before the optimizer is made, so the adapters train with the student.
"""
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Step:
    """What a criterion sees for one training batch."""

    student_logits: Tensor
    targets: Tensor
    teacher_logits: Optional[Tensor] = None
    student_features: dict[str, Tensor] = field(default_factory=dict)  # module name -> its output
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    index: Optional[Tensor] = None  # the samples' positions in the training split (CRD's memory bank)
    epoch: int = 1  # 1-based (DKD's warm-up)


class Criterion(nn.Module):
    """Base of every criterion: by default it reads the teacher's logits and no features, and has no adapters."""

    needs_teacher: bool = True

    def layers(self) -> tuple[list[str], list[str]]:
        """Names of the student's and the teacher's modules whose outputs forward() reads (after bind)."""
        return [], []

    def bind(self, student: nn.Module, teacher: Optional[nn.Module], images: Tensor, train_labels: Tensor) -> None:
        """Resolve layer names and build adapters, given both models, a sample input batch and the train labels."""


def kd_divergence(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al. 2015: T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over classes, mean over batch.

    The T^2 factor keeps the gradient scale of the soft term independent of T (the soft-target gradients
    scale as 1/T^2), so alpha means the same thing at every temperature.
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def standardize(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Sun et al. CVPR 2024 (logit standardisation): (z - mean(z)) / (std(z) + eps) per sample, unbiased std."""
    return (logits - logits.mean(dim=1, keepdim=True)) / (logits.std(dim=1, keepdim=True) + eps)


class CELoss(Criterion):
    """Cross-entropy on the labels, times `weight`; the teacher's logits are ignored."""

    needs_teacher = False

    def __init__(self, label_smoothing: float = 0.0, weight: float = 1.0):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.weight = weight

    def forward(self, step: Step) -> dict[str, Tensor]:
        ce = F.cross_entropy(step.student_logits, step.targets, label_smoothing=self.label_smoothing)
        return {"loss_ce": self.weight * ce}


class KDLoss(Criterion):
    """Hinton KD: (1 - alpha) * CE(student, y) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    standardize=true applies logit standardisation (Sun et al. 2024) to both logits before the KL term; T is
    then their "base temperature".
    """

    def __init__(self, alpha: float = 0.9, temperature: float = 4.0, standardize: bool = False):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"loss.alpha={alpha} is outside [0, 1]: it weights the KD term against CE.")
        if temperature <= 0:
            raise ValueError(f"loss.temperature={temperature} must be > 0 (T=1 is the plain softmax).")
        self.alpha = alpha
        self.temperature = temperature
        self.standardize = standardize

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0

    def forward(self, step: Step) -> dict[str, Tensor]:
        student, teacher = step.student_logits, step.teacher_logits
        terms = {"loss_ce": (1.0 - self.alpha) * F.cross_entropy(student, step.targets)}
        if self.alpha > 0:
            if self.standardize:
                student, teacher = standardize(student), standardize(teacher)
            terms["loss_kd"] = self.alpha * kd_divergence(student, teacher, self.temperature)
        else:  # the alpha=0 baseline: no teacher pass, the same keys in the logs
            terms["loss_kd"] = student.new_zeros(())
        return terms


class Combined(Criterion):
    """A weighted sum of criteria (each holds its own weights), e.g. CE + KD + a feature term (CRD+KD)."""

    def __init__(self, **terms: Criterion):
        super().__init__()
        if not terms:
            raise ValueError("loss.terms is empty: name at least one criterion, e.g. ce.")
        self.terms = nn.ModuleDict(terms)

    @property
    def needs_teacher(self) -> bool:
        return any(term.needs_teacher for term in self.terms.values())

    def layers(self) -> tuple[list[str], list[str]]:
        student, teacher = [], []
        for term in self.terms.values():
            s, t = term.layers()
            student += [name for name in s if name not in student]
            teacher += [name for name in t if name not in teacher]
        return student, teacher

    def bind(self, student: nn.Module, teacher: Optional[nn.Module], images: Tensor, train_labels: Tensor) -> None:
        for term in self.terms.values():
            term.bind(student, teacher, images, train_labels)

    def forward(self, step: Step) -> dict[str, Tensor]:
        merged: dict[str, Tensor] = {}
        for name, term in self.terms.items():
            for key, value in term(step).items():
                if key in merged:
                    raise ValueError(f"loss term {key!r} comes from two criteria (the second is {name!r}).")
                merged[key] = value
        return merged
