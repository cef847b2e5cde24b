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
    step: int = 0  # the batch's position in its epoch, 0-based
    seed: int = 0  # the run's seed: with epoch and step, the key of a criterion's random draws (CRD's negatives)
    # The global batch's size over all ranks; this rank holds its rows distributed.shard(batch_size). None: the
    # rows here are the whole batch (one process). Keyed draws are made for the global batch, then sliced.
    batch_size: Optional[int] = None


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


class SoftTargets(Criterion):
    """Hinton's soft-target term alone, weight * T^2 * KL(softmax(teacher/T) || softmax(student/T)), for
    compositions that weight CE separately (the CRD paper's CE + KD + CRD; logit standardisation's 0.1 CE + 9 KD)."""

    def __init__(self, weight: float = 1.0, temperature: float = 4.0, standardize: bool = False):
        super().__init__()
        _check_non_negative(weight=weight)
        _check_temperature(temperature)
        self.weight, self.temperature, self.standardize = weight, temperature, standardize

    def forward(self, step: Step) -> dict[str, Tensor]:
        student, teacher = step.student_logits, step.teacher_logits
        if self.standardize:
            student, teacher = standardize(student), standardize(teacher)
        return {"loss_kd": self.weight * kd_divergence(student, teacher, self.temperature)}


class Combined(Criterion):
    """A weighted sum of criteria (each holds its own weights), e.g. CE + KD + a feature term (CRD+KD)."""

    def __init__(self, **terms: Criterion):
        super().__init__()
        if not terms:
            raise ValueError("loss is a Combined with no criteria: add one, e.g. +loss.ce._target_=kd.losses.CELoss.")
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


def _check_non_negative(**weights: float) -> None:
    for key, value in weights.items():
        if value < 0:
            raise ValueError(f"loss.{key}={value} is negative: loss weights must be >= 0 (0 turns the term off).")


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"loss.temperature={temperature} must be > 0 (T=1 is the plain softmax).")


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

    Defaults are mdistiller's (mdistiller/engine/cfg.py: CE 1, alpha 1, beta 8, T 4, warm-up 20 epochs); beta is
    tuned per pair (configs/cifar100/dkd/*.yaml, set by the pair presets through pair_hparams.dkd_beta). The
    warm-up ramps the KD term linearly over the first epochs (epoch is 1-based, as in mdistiller's trainer).
    standardize=true applies logit standardisation (Sun et al. CVPR 2024) to both logits before the DKD term only
    (sunshangquan/logit-standardization-KD, mdistiller/distillers/DKD.py); CE stays on the raw logits. kd_weight
    multiplies alpha and beta, as that repository's --kd-weight does (tools/train.py).
    """

    def __init__(
        self,
        ce_weight: float = 1.0,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        warmup_epochs: int = 20,
        standardize: bool = False,
        kd_weight: float = 1.0,
    ):
        super().__init__()
        _check_non_negative(ce_weight=ce_weight, alpha=alpha, beta=beta, kd_weight=kd_weight)
        _check_temperature(temperature)
        if warmup_epochs < 0:
            raise ValueError(f"loss.warmup_epochs={warmup_epochs} is negative: use 0 for no warm-up.")
        self.ce_weight, self.alpha, self.beta, self.kd_weight = ce_weight, alpha, beta, kd_weight
        self.temperature = temperature
        self.warmup_epochs = warmup_epochs
        self.standardize = standardize

    def warmup_factor(self, epoch: int) -> float:
        """min(epoch / warmup_epochs, 1): 1/20 in epoch 1, 1 from epoch 20 on (the default)."""
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


def pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of a with the same row of b: cosine of the mean-centred rows.

    The eps is added to the product of the norms, as in the DIST reference (cosine_similarity in
    hunto/image_classification_sota, lib/models/losses/dist_kd.py, eps=1e-8), not to each norm.
    """
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_divergence(
    student_logits: Tensor, teacher_logits: Tensor, beta: float, gamma: float, temperature: float
) -> Tensor:
    """Huang et al. NeurIPS 2022 (DIST): tau^2 * (beta * (1 - mean_i rho(Y_s[i,:], Y_t[i,:]))
    + gamma * (1 - mean_j rho(Y_s[:,j], Y_t[:,j]))), Y = softmax(z / tau), rho = Pearson correlation.

    The first term is the inter-class relation (each sample's row over the classes), the second the intra-class
    relation (each class's column over the batch), as in DIST_KD's classification/lib/models/losses/dist_kd.py
    (the hunto/image_classification_sota submodule). Its eps (see pearson_rows) makes identical logits give
    tau^2 * eps / (|y - mean y|^2 + eps) per row or column rather than 0: negligible, except for a class whose
    probability is near 0 in every sample of the batch, whose column then counts as uncorrelated (as there).
    """
    y_student = F.softmax(student_logits / temperature, dim=1)
    y_teacher = F.softmax(teacher_logits / temperature, dim=1)
    inter = 1.0 - pearson_rows(y_student, y_teacher).mean()
    intra = 1.0 - pearson_rows(y_student.T, y_teacher.T).mean()
    return (beta * inter + gamma * intra) * temperature**2


class DISTLoss(Criterion):
    """Huang et al. NeurIPS 2022 (DIST): ce_weight * CE + tau^2 * (beta * L_inter + gamma * L_intra), L = 1 - Pearson.

    Defaults are DIST's CIFAR-100 setting: CE weight 1, tau 4, beta = gamma = 2 (hunto/DIST_KD runs it as
    classification/configs/strategies/distill/dist_cifar.yaml: KD weight 2 on DIST(beta=1, gamma=1) at tau 4).
    """

    def __init__(self, ce_weight: float = 1.0, beta: float = 2.0, gamma: float = 2.0, temperature: float = 4.0):
        super().__init__()
        _check_non_negative(ce_weight=ce_weight, beta=beta, gamma=gamma)
        _check_temperature(temperature)
        self.ce_weight, self.beta, self.gamma = ce_weight, beta, gamma
        self.temperature = temperature

    def forward(self, step: Step) -> dict[str, Tensor]:
        student, teacher = step.student_logits, step.teacher_logits
        return {
            "loss_ce": self.ce_weight * F.cross_entropy(student, step.targets),
            "loss_dist": dist_divergence(student, teacher, self.beta, self.gamma, self.temperature),
        }
