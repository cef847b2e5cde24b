"""Hinton et al. 2015 (KD): softened teacher probabilities as targets, with logit standardisation (Sun et al., CVPR
2024) as an option. conf/loss/kd.yaml (KDLoss: CE and KD weighted by alpha) and kd_ls.yaml (CE + SoftTargets, the
soft-target term alone, as the compositions weight it)."""
import torch.nn.functional as F
from torch import Tensor

from kd.methods.base import Criterion, Step, check_non_negative, check_temperature


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


class KDLoss(Criterion):
    """Hinton KD: (1 - alpha) * CE(student, y) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    standardize=true applies logit standardisation (Sun et al. 2024) to both logits before the KL term; T is
    then their "base temperature".
    """

    def __init__(self, alpha: float, temperature: float, standardize: bool = False):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"loss.alpha={alpha} is outside [0, 1]: it weights the KD term against CE.")
        check_temperature(temperature)
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


class SoftTargets(Criterion):
    """Hinton's soft-target term alone, weight * T^2 * KL(softmax(teacher/T) || softmax(student/T)), for
    compositions that weight CE separately (the CRD paper's CE + KD + CRD; logit standardisation's 0.1 CE + 9 KD)."""

    def __init__(self, weight: float, temperature: float, standardize: bool = False):
        super().__init__()
        check_non_negative(weight=weight)
        check_temperature(temperature)
        self.weight, self.temperature, self.standardize = weight, temperature, standardize

    def forward(self, step: Step) -> dict[str, Tensor]:
        student, teacher = step.student_logits, step.teacher_logits
        if self.standardize:
            student, teacher = standardize(student), standardize(teacher)
        return {"loss_kd": self.weight * kd_divergence(student, teacher, self.temperature)}
