"""Training criteria. Each is called as criterion(student_logits, teacher_logits, targets) and returns a
dict of named, already-weighted loss terms whose sum is the loss; the loop logs each term."""
import torch.nn.functional as F
from torch import Tensor, nn


def kd_divergence(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al. 2015: T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over classes, mean over batch.

    The T^2 factor keeps the gradient scale of the soft term independent of T (the soft-target gradients
    scale as 1/T^2), so alpha means the same thing at every temperature.
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


class CELoss(nn.Module):
    """Cross-entropy on the labels; the teacher's logits are ignored."""

    needs_teacher = False

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor) -> dict[str, Tensor]:
        return {"loss_ce": F.cross_entropy(student_logits, targets, label_smoothing=self.label_smoothing)}


class KDLoss(nn.Module):
    """Hinton KD: (1 - alpha) * CE(student, y) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))."""

    def __init__(self, alpha: float = 0.9, temperature: float = 4.0):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"loss.alpha={alpha} is outside [0, 1]: it weights the KD term against CE.")
        if temperature <= 0:
            raise ValueError(f"loss.temperature={temperature} must be > 0 (T=1 is the plain softmax).")
        self.alpha = alpha
        self.temperature = temperature

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor) -> dict[str, Tensor]:
        terms = {"loss_ce": (1.0 - self.alpha) * F.cross_entropy(student_logits, targets)}
        if self.alpha > 0:
            terms["loss_kd"] = self.alpha * kd_divergence(student_logits, teacher_logits, self.temperature)
        else:  # the alpha=0 baseline: no teacher pass, the same keys in the logs
            terms["loss_kd"] = student_logits.new_zeros(())
        return terms
