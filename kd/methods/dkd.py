"""Zhao et al. CVPR 2022 (DKD): decoupled KD, target-class (TCKD) and non-target-class (NCKD) terms weighted apart.
conf/loss/dkd.yaml, and dkd_ls.yaml with logit standardisation."""
import torch
import torch.nn.functional as F
from torch import Tensor

from kd.methods.base import Criterion, Step, check_non_negative, check_temperature
from kd.methods.kd import standardize


def dkd_divergence(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, alpha: float, beta: float, temperature: float
) -> Tensor:
    """Zhao et al. CVPR 2022 (DKD): alpha * TCKD + beta * NCKD, each T^2 * KL(teacher || student), mean over batch.

    TCKD compares the binary distributions b = [p_gt, 1 - p_gt] of softmax(z / T); NCKD compares the distributions
    over the non-target classes, softmax(z / T) renormalised without the label's class. As in the paper's
    reference (megvii-research/mdistiller, mdistiller/distillers/DKD.py): the non-target softmax is taken after
    subtracting 1000 from the label's scaled logit (its probability underflows to 0, so the KL terms stay finite
    where a -inf mask would give 0 * inf), and both KLs are summed over classes and divided by the batch size
    (mdistiller's size_average=False / batch, i.e. "batchmean"). The binary log-probabilities are computed here
    with logsumexp instead of the log of summed probabilities: equal in value, finite when p_gt rounds to 1.
    """
    scaled_student, scaled_teacher = student_logits / temperature, teacher_logits / temperature
    # A comparison, not F.one_hot: one_hot reads the labels' min and max back to the host (a GPU sync every step).
    is_target = targets[:, None] == torch.arange(student_logits.shape[1], device=targets.device)

    def binary_log_probs(scaled: Tensor) -> Tensor:  # [log p_gt, log (1 - p_gt)] per sample
        log_total = scaled.logsumexp(dim=1)
        log_target = scaled.gather(1, targets[:, None]).squeeze(1) - log_total
        log_rest = scaled.masked_fill(is_target, float("-inf")).logsumexp(dim=1) - log_total
        return torch.stack([log_target, log_rest], dim=1)

    tckd = F.kl_div(
        binary_log_probs(scaled_student), binary_log_probs(scaled_teacher), reduction="batchmean", log_target=True
    )
    gt_penalty = 1000.0 * is_target.to(scaled_student.dtype)
    nckd = F.kl_div(
        F.log_softmax(scaled_student - gt_penalty, dim=1),
        F.log_softmax(scaled_teacher - gt_penalty, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (alpha * tckd + beta * nckd) * temperature**2


class DKDLoss(Criterion):
    """Zhao et al. CVPR 2022 (DKD): ce_weight * CE + min(epoch / warmup_epochs, 1) * (alpha * TCKD + beta * NCKD).

    Its values, with their sources (mdistiller), are in conf/loss/dkd.yaml; beta is tuned per pair (set by the pair
    presets through pair_hparams.dkd_beta). The warm-up ramps the KD term linearly over the first epochs (epoch is
    1-based, as in mdistiller's trainer).
    standardize=true applies logit standardisation (Sun et al. CVPR 2024) to both logits before the DKD term only
    (sunshangquan/logit-standardization-KD, mdistiller/distillers/DKD.py); CE stays on the raw logits. kd_weight
    multiplies alpha and beta, as that repository's --kd-weight does (tools/train.py).
    """

    def __init__(
        self,
        ce_weight: float,
        alpha: float,
        beta: float,
        temperature: float,
        warmup_epochs: int,
        standardize: bool = False,
        kd_weight: float = 1.0,  # 1: plain DKD; logit standardisation's --kd-weight scales alpha and beta
    ):
        super().__init__()
        check_non_negative(ce_weight=ce_weight, alpha=alpha, beta=beta, kd_weight=kd_weight)
        check_temperature(temperature)
        if warmup_epochs < 0:
            raise ValueError(f"loss.warmup_epochs={warmup_epochs} is negative: use 0 for no warm-up.")
        self.ce_weight, self.alpha, self.beta, self.kd_weight = ce_weight, alpha, beta, kd_weight
        self.temperature = temperature
        self.warmup_epochs = warmup_epochs
        self.standardize = standardize

    def warmup_factor(self, epoch: int) -> float:
        """min(epoch / warmup_epochs, 1): with 20 warm-up epochs (dkd.yaml), 1/20 in epoch 1, 1 from epoch 20 on."""
        return 1.0 if self.warmup_epochs == 0 else min(epoch / self.warmup_epochs, 1.0)

    def forward(self, step: Step) -> dict[str, Tensor]:
        student, teacher = step.student_logits, step.teacher_logits
        terms = {"loss_ce": self.ce_weight * F.cross_entropy(student, step.targets)}
        if self.standardize:
            student, teacher = standardize(student), standardize(teacher)
        alpha, beta = self.kd_weight * self.alpha, self.kd_weight * self.beta
        dkd = dkd_divergence(student, teacher, step.targets, alpha, beta, self.temperature)
        terms["loss_dkd"] = self.warmup_factor(step.epoch) * dkd
        return terms
