"""Logit criteria (CE, Hinton KD, DKD, DIST, logit standardisation, Combined): reference values from the papers'
formulas, T^2 scaling, edge cases, gradients, validation, and the loss options' paper settings."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from kd.losses import (
    CELoss,
    Combined,
    Criterion,
    DISTLoss,
    DKDLoss,
    KDLoss,
    SoftTargets,
    Step,
    dist_divergence,
    dkd_divergence,
    kd_divergence,
    standardize,
)

TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
ALPHAS = (0.0, 0.1, 0.5, 0.9, 1.0)
CLASS_COUNTS = (10, 100)
BATCH = 8


def make_logits(num_classes: int, seed: int = 0, batch: int = BATCH, scale: float = 3.0):
    """Student logits, teacher logits and labels in float64, from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, num_classes, generator=g, dtype=torch.float64) * scale
    teacher = torch.randn(batch, num_classes, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(0, num_classes, (batch,), generator=g)
    return student, teacher, targets


def reference_softmax(logits: torch.Tensor) -> torch.Tensor:
    """softmax over classes, written out with exp and sum (max subtracted for stability)."""
    shifted = logits - logits.max(dim=1, keepdim=True).values
    e = torch.exp(shifted)
    return e / e.sum(dim=1, keepdim=True)


def reference_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """mean over batch of sum_c p_t,c (log p_t,c - log p_s,c), p = softmax(logits / T); no T^2."""
    p_t = reference_softmax(teacher / temperature)
    p_s = reference_softmax(student / temperature)
    per_sample = (p_t * (torch.log(p_t) - torch.log(p_s))).sum(dim=1)
    return per_sample.sum() / student.shape[0]


def reference_ce(student: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean over batch of -log softmax(student)[y]."""
    p = reference_softmax(student)
    picked = p[torch.arange(student.shape[0]), targets]
    return -torch.log(picked).sum() / student.shape[0]


def reference_kd_loss(student, teacher, targets, alpha: float, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015: (1 - alpha) * CE(student, y) + alpha * T^2 * KL(p_t || p_s)."""
    return (1 - alpha) * reference_ce(student, targets) + alpha * temperature**2 * reference_kl(
        student, teacher, temperature
    )


# ---------------------------------------------------------------------------------------------------------------
# reference values


def test_reference_helpers_are_sane():
    # The reference itself must be right, or the comparisons below prove nothing: check it on a hand case.
    student = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    teacher = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)  # p_t = (3/4, 1/4)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert_close(reference_kl(student, teacher, 1.0), torch.tensor(expected, dtype=torch.float64))
    assert_close(reference_ce(student, torch.tensor([1])), torch.tensor(math.log(2.0), dtype=torch.float64))


@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_kd_divergence_matches_formula(num_classes, temperature):
    student, teacher, _ = make_logits(num_classes, seed=num_classes + int(temperature))
    got = kd_divergence(student, teacher, temperature)
    expected = temperature**2 * reference_kl(student, teacher, temperature)
    assert got.dtype == torch.float64
    assert got.shape == ()
    assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_kd_loss_matches_formula(num_classes, temperature, alpha):
    student, teacher, targets = make_logits(num_classes, seed=7 * num_classes + int(temperature))
    criterion = KDLoss(alpha=alpha, temperature=temperature)
    terms = criterion(Step(student, targets, teacher))
    total = sum(terms.values())
    assert_close(total, reference_kd_loss(student, teacher, targets, alpha, temperature), rtol=1e-10, atol=1e-12)
    assert_close(terms["loss_ce"], (1 - alpha) * reference_ce(student, targets), rtol=1e-10, atol=1e-12)
    assert_close(
        terms["loss_kd"].to(torch.float64),
        alpha * temperature**2 * reference_kl(student, teacher, temperature),
        rtol=1e-10,
        atol=1e-12,
    )


# ---------------------------------------------------------------------------------------------------------------
# T^2 scaling and special cases


@pytest.mark.parametrize("temperature", (2.0, 4.0, 8.0))
def test_kd_term_is_t_squared_times_kl(temperature):
    student, teacher, _ = make_logits(10, seed=3)
    kd = kd_divergence(student, teacher, temperature)
    kl = reference_kl(student, teacher, temperature)
    assert_close(kd / kl, torch.tensor(temperature**2, dtype=torch.float64), rtol=1e-10, atol=0)
    # Not just the KL: the unscaled value is clearly different.
    assert not torch.isclose(kd, kl, rtol=1e-3)


def test_kd_loss_applies_t_squared_once():
    student, teacher, targets = make_logits(10, seed=4)
    temperature = 4.0
    terms = KDLoss(alpha=1.0, temperature=temperature)(Step(student, targets, teacher))
    kl = reference_kl(student, teacher, temperature)
    assert_close(terms["loss_kd"] / kl, torch.tensor(temperature**2, dtype=torch.float64), rtol=1e-10, atol=0)


def test_alpha_zero_is_plain_cross_entropy_without_teacher():
    student, _, targets = make_logits(10, seed=5)
    criterion = KDLoss(alpha=0.0, temperature=4.0)
    assert criterion.needs_teacher is False
    terms = criterion(Step(student, targets, None))
    assert_close(sum(terms.values()), F.cross_entropy(student, targets), rtol=1e-12, atol=0)
    assert_close(terms["loss_ce"], reference_ce(student, targets), rtol=1e-10, atol=0)
    assert terms["loss_kd"].item() == 0.0


@pytest.mark.parametrize("alpha", (0.1, 0.5, 1.0))
def test_needs_teacher_when_alpha_positive(alpha):
    assert KDLoss(alpha=alpha, temperature=4.0).needs_teacher is True


def test_ce_loss_does_not_need_teacher():
    assert CELoss().needs_teacher is False


def test_alpha_one_has_zero_ce_term():
    student, teacher, targets = make_logits(10, seed=6)
    terms = KDLoss(alpha=1.0, temperature=4.0)(Step(student, targets, teacher))
    assert terms["loss_ce"].item() == 0.0
    assert terms["loss_kd"].item() > 0.0


def test_temperature_one_is_kl_of_plain_softmaxes():
    student, teacher, _ = make_logits(10, seed=8)
    p_s, p_t = reference_softmax(student), reference_softmax(teacher)
    expected = (p_t * torch.log(p_t / p_s)).sum(dim=1).mean()
    assert_close(kd_divergence(student, teacher, 1.0), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_kd_term_is_zero_for_identical_logits(temperature):
    student, _, targets = make_logits(100, seed=9)
    assert_close(kd_divergence(student, student.clone(), temperature), torch.tensor(0.0, dtype=torch.float64))
    terms = KDLoss(alpha=0.9, temperature=temperature)(Step(student, targets, student.clone()))
    assert_close(terms["loss_kd"], torch.tensor(0.0, dtype=torch.float64))
    # The CE term is still there: identical logits do not zero the whole loss.
    assert terms["loss_ce"].item() > 0.0


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_kd_term_is_zero_for_logits_shifted_by_a_constant(temperature):
    # softmax is invariant to a per-row shift, so the targets are the same distribution.
    student, _, _ = make_logits(10, seed=10)
    teacher = student + torch.arange(BATCH, dtype=torch.float64)[:, None] * 5.0
    assert_close(kd_divergence(student, teacher, temperature), torch.tensor(0.0, dtype=torch.float64))


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_kd_term_is_positive_for_different_logits(temperature):
    student, teacher, _ = make_logits(10, seed=11)
    assert kd_divergence(student, teacher, temperature).item() > 1e-6


# ---------------------------------------------------------------------------------------------------------------
# returned dict


def test_kd_loss_returns_ce_and_kd_terms_summing_to_the_loss():
    student, teacher, targets = make_logits(10, seed=12)
    criterion = KDLoss(alpha=0.5, temperature=4.0)
    terms = criterion(Step(student, targets, teacher))
    assert set(terms) == {"loss_ce", "loss_kd"}
    assert all(value.shape == () for value in terms.values())
    assert_close(
        terms["loss_ce"] + terms["loss_kd"],
        reference_kd_loss(student, teacher, targets, 0.5, 4.0),
        rtol=1e-10,
        atol=1e-12,
    )


def test_kd_loss_alpha_zero_keeps_the_same_keys():
    student, _, targets = make_logits(10, seed=13)
    assert set(KDLoss(alpha=0.0, temperature=4.0)(Step(student, targets, None))) == {"loss_ce", "loss_kd"}


def test_ce_loss_returns_only_ce_and_ignores_teacher():
    student, teacher, targets = make_logits(10, seed=14)
    criterion = CELoss()
    terms = criterion(Step(student, targets, teacher))
    assert set(terms) == {"loss_ce"}
    assert_close(terms["loss_ce"], reference_ce(student, targets), rtol=1e-10, atol=0)
    assert_close(criterion(Step(student, targets, None))["loss_ce"], terms["loss_ce"], rtol=0, atol=0)


def test_ce_loss_label_smoothing_changes_the_loss():
    student, _, targets = make_logits(10, seed=15)
    eps = 0.1
    smoothed = CELoss(label_smoothing=eps)(Step(student, targets, None))["loss_ce"]
    log_p = torch.log(reference_softmax(student))
    q = torch.full_like(log_p, eps / 10)
    q[torch.arange(BATCH), targets] += 1 - eps
    assert_close(smoothed, -(q * log_p).sum(dim=1).mean(), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# gradients


def frozen_teacher_logits(teacher: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """As kd.engine.teacher_logits: no graph for the teacher, then a normal tensor the loss may save."""
    with torch.inference_mode():
        logits = teacher(inputs)
    return logits.clone()


@pytest.mark.parametrize("alpha", (0.5, 1.0))
def test_gradients_reach_student_and_never_teacher(alpha):
    torch.manual_seed(0)
    inputs = torch.randn(BATCH, 6, dtype=torch.float64)
    targets = torch.randint(0, 10, (BATCH,))
    student = nn.Linear(6, 10).double()
    teacher = nn.Linear(6, 10).double().requires_grad_(False)
    teacher.eval()

    teacher_logits = frozen_teacher_logits(teacher, inputs)
    assert not teacher_logits.requires_grad
    student_logits = student(inputs)
    student_logits.retain_grad()
    terms = KDLoss(alpha=alpha, temperature=4.0)(Step(student_logits, targets, teacher_logits))
    sum(terms.values()).backward()

    assert student_logits.grad is not None and student_logits.grad.abs().sum() > 0
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert teacher_logits.grad is None
    assert all(p.grad is None for p in teacher.parameters())


def test_kd_gradient_matches_analytic_form():
    # d/dz_s [T^2 KL(p_t || p_s)] = T (p_s - p_t) / B per logit: the T^2 factor keeps the scale at O(1/T).
    student, teacher, _ = make_logits(10, seed=16)
    student.requires_grad_(True)
    temperature = 4.0
    kd_divergence(student, teacher, temperature).backward()
    p_s = reference_softmax(student.detach() / temperature)
    p_t = reference_softmax(teacher / temperature)
    assert_close(student.grad, temperature * (p_s - p_t) / BATCH, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# hyperparameter validation


@pytest.mark.parametrize("alpha", (-0.1, -1.0, 1.0001, 2.0))
def test_alpha_outside_unit_interval_is_rejected(alpha):
    with pytest.raises(ValueError, match=r"loss\.alpha"):
        KDLoss(alpha=alpha, temperature=4.0)


@pytest.mark.parametrize("temperature", (0.0, -1.0, -4.0))
def test_nonpositive_temperature_is_rejected(temperature):
    with pytest.raises(ValueError, match=r"loss\.temperature"):
        KDLoss(alpha=0.5, temperature=temperature)


@pytest.mark.parametrize("alpha", (0.0, 1.0))
def test_alpha_bounds_are_accepted(alpha):
    assert KDLoss(alpha=alpha, temperature=0.5).alpha == alpha


# ---------------------------------------------------------------------------------------------------------------
# reduction convention


@pytest.mark.parametrize("temperature", (1.0, 4.0))
def test_kd_term_is_a_per_sample_mean(temperature):
    student, teacher, _ = make_logits(10, seed=18)
    once = kd_divergence(student, teacher, temperature)
    twice = kd_divergence(torch.cat([student, student]), torch.cat([teacher, teacher]), temperature)
    assert_close(twice, once, rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
def test_kd_term_is_batchmean_not_elementwise_mean(num_classes):
    # Hinton's KD sums over classes and averages over the batch (F.kl_div's "batchmean"). Some KD repos use
    # reduction="mean", which also divides by the number of classes C: that shrinks the KD term by 1/C.
    student, teacher, _ = make_logits(num_classes, seed=19)
    temperature = 4.0
    mean_reduced = F.kl_div(
        F.log_softmax(student / temperature, dim=1),
        F.softmax(teacher / temperature, dim=1),
        reduction="mean",
    ) * temperature**2
    got = kd_divergence(student, teacher, temperature)
    assert_close(got, num_classes * mean_reduced, rtol=1e-10, atol=1e-12)
    assert not torch.isclose(got, mean_reduced, rtol=1e-3)


def test_kd_loss_float32_close_to_float64_reference():
    student, teacher, targets = make_logits(100, seed=20)
    terms = KDLoss(alpha=0.9, temperature=4.0)(Step(student.float(), targets, teacher.float()))
    assert terms["loss_kd"].dtype == torch.float32
    expected = reference_kd_loss(student, teacher, targets, 0.9, 4.0)
    assert_close(sum(terms.values()).double(), expected, rtol=1e-5, atol=1e-6)


# ===============================================================================================================
# DKD (Zhao et al., CVPR 2022), written per sample from the paper's Eqs. (1)-(4): explicit probabilities, a loop
# over samples and an index list for the non-target classes (no masks, no -1000 trick).


def reference_dkd(student, teacher, targets, alpha: float, beta: float, temperature: float) -> torch.Tensor:
    """T^2 * mean_i [alpha * KL(b_t || b_s) + beta * KL(p~_t || p~_s)], b = (p_gt, 1 - p_gt), p~ = p_rest / sum."""
    total = torch.zeros((), dtype=student.dtype)
    for i in range(student.shape[0]):
        p_s = reference_softmax(student[i : i + 1] / temperature)[0]
        p_t = reference_softmax(teacher[i : i + 1] / temperature)[0]
        gt = int(targets[i])
        b_s = torch.stack([p_s[gt], 1 - p_s[gt]])
        b_t = torch.stack([p_t[gt], 1 - p_t[gt]])
        tckd = (b_t * torch.log(b_t / b_s)).sum()
        rest = [j for j in range(student.shape[1]) if j != gt]
        q_s, q_t = p_s[rest] / p_s[rest].sum(), p_t[rest] / p_t[rest].sum()
        nckd = (q_t * torch.log(q_t / q_s)).sum()
        total = total + alpha * tckd + beta * nckd
    return temperature**2 * total / student.shape[0]


def test_reference_dkd_decomposes_kd():
    # The paper's Eq. (4): KL(p_t || p_s) = TCKD + (1 - p_t,gt) * NCKD, per sample. Checks the reference itself.
    student, teacher, targets = make_logits(10, seed=30, batch=1)
    temperature = 2.0
    p_t_gt = reference_softmax(teacher / temperature)[0, targets[0]].item()
    tckd = reference_dkd(student, teacher, targets, 1.0, 0.0, temperature)
    nckd = reference_dkd(student, teacher, targets, 0.0, 1.0, temperature)
    kd = temperature**2 * reference_kl(student, teacher, temperature)
    assert_close(tckd + (1 - p_t_gt) * nckd, kd, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("alpha, beta", [(1.0, 8.0), (1.0, 2.0), (0.5, 0.0), (0.0, 6.0)])
def test_dkd_divergence_matches_formula(num_classes, temperature, alpha, beta):
    student, teacher, targets = make_logits(num_classes, seed=31 + num_classes + int(temperature))
    got = dkd_divergence(student, teacher, targets, alpha, beta, temperature)
    assert got.dtype == torch.float64 and got.shape == ()
    expected = reference_dkd(student, teacher, targets, alpha, beta, temperature)
    assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("temperature", (1.0, 4.0))
def test_dkd_with_coupled_weights_is_kd(temperature):
    # For one sample, alpha = 1 and beta = 1 - p_t,gt recouple the two parts into the plain KD term (Eq. 4).
    student, teacher, targets = make_logits(100, seed=32, batch=1)
    p_t_gt = F.softmax(teacher / temperature, dim=1)[0, targets[0]].item()
    got = dkd_divergence(student, teacher, targets, 1.0, 1.0 - p_t_gt, temperature)
    assert_close(got, kd_divergence(student, teacher, temperature), rtol=1e-10, atol=1e-12)


def test_dkd_loss_returns_weighted_ce_and_dkd_terms():
    student, teacher, targets = make_logits(100, seed=33)
    criterion = DKDLoss(ce_weight=0.5, alpha=1.0, beta=6.0, temperature=4.0, warmup_epochs=20)
    terms = criterion(Step(student, targets, teacher, epoch=40))
    assert set(terms) == {"loss_ce", "loss_dkd"}
    assert all(value.shape == () for value in terms.values())
    assert_close(terms["loss_ce"], 0.5 * reference_ce(student, targets), rtol=1e-10, atol=1e-12)
    assert_close(terms["loss_dkd"], reference_dkd(student, teacher, targets, 1.0, 6.0, 4.0), rtol=1e-9, atol=1e-12)


def test_dkd_kd_weight_multiplies_alpha_and_beta():
    student, teacher, targets = make_logits(10, seed=34)
    scaled = DKDLoss(alpha=1.0, beta=8.0, kd_weight=9.0)(Step(student, targets, teacher, epoch=20))["loss_dkd"]
    expected = reference_dkd(student, teacher, targets, 9.0, 72.0, 4.0)
    assert_close(scaled, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("epoch, factor", [(1, 1 / 20), (10, 0.5), (20, 1.0), (40, 1.0)])
def test_dkd_warmup_ramps_the_kd_term_only(epoch, factor):
    student, teacher, targets = make_logits(10, seed=35)
    criterion = DKDLoss(warmup_epochs=20)
    terms = criterion(Step(student, targets, teacher, epoch=epoch))
    full = reference_dkd(student, teacher, targets, 1.0, 8.0, 4.0)
    assert_close(terms["loss_dkd"], factor * full, rtol=1e-9, atol=1e-12)
    assert_close(terms["loss_ce"], reference_ce(student, targets), rtol=1e-10, atol=0)  # CE is never ramped


def test_dkd_without_warmup_is_full_from_the_first_epoch():
    student, teacher, targets = make_logits(10, seed=36)
    terms = DKDLoss(warmup_epochs=0)(Step(student, targets, teacher, epoch=1))
    assert_close(terms["loss_dkd"], reference_dkd(student, teacher, targets, 1.0, 8.0, 4.0), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_dkd_term_is_zero_for_identical_logits(temperature):
    student, _, targets = make_logits(100, seed=37)
    zero = torch.tensor(0.0, dtype=torch.float64)
    assert_close(dkd_divergence(student, student.clone(), targets, 1.0, 8.0, temperature), zero)
    terms = DKDLoss(temperature=temperature)(Step(student, targets, student.clone(), epoch=30))
    assert_close(terms["loss_dkd"], zero)
    assert terms["loss_ce"].item() > 0.0


def test_dkd_is_finite_when_the_target_probability_rounds_to_one():
    # float32, target logit 120 above the rest: 1 - p_gt underflows to 0, yet the binary KL and its gradient
    # stay finite (log-probabilities from logsumexp, not the log of a sum of probabilities).
    student = torch.zeros(4, 10)
    student[:, 3] = 120.0
    student.requires_grad_(True)
    teacher = torch.randn(4, 10, generator=torch.Generator().manual_seed(38))
    targets = torch.full((4,), 3)
    value = dkd_divergence(student, teacher, targets, 1.0, 8.0, 1.0)
    value.backward()
    assert torch.isfinite(value) and value.item() > 0
    assert torch.isfinite(student.grad).all()


def test_dkd_float32_close_to_float64_reference():
    student, teacher, targets = make_logits(100, seed=39)
    got = dkd_divergence(student.float(), teacher.float(), targets, 1.0, 8.0, 4.0)
    assert got.dtype == torch.float32
    assert_close(got.double(), reference_dkd(student, teacher, targets, 1.0, 8.0, 4.0), rtol=1e-5, atol=1e-6)


# ===============================================================================================================
# DIST (Huang et al., NeurIPS 2022), written with loops: one Pearson correlation per sample (a row over the
# classes) and one per class (a column over the batch), each from sums, means and square roots.


def reference_pearson(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """sum (x - mean x)(y - mean y) / (sqrt(sum (x - mean x)^2) * sqrt(sum (y - mean y)^2) + eps)."""
    dx, dy = x - x.sum() / len(x), y - y.sum() / len(y)
    return (dx * dy).sum() / (torch.sqrt((dx * dx).sum()) * torch.sqrt((dy * dy).sum()) + eps)


def reference_dist(student, teacher, beta: float, gamma: float, temperature: float) -> torch.Tensor:
    """tau^2 * (beta * (1 - mean over samples of rho(rows)) + gamma * (1 - mean over classes of rho(columns)))."""
    y_s, y_t = reference_softmax(student / temperature), reference_softmax(teacher / temperature)
    rows = [reference_pearson(y_s[i], y_t[i]) for i in range(y_s.shape[0])]
    columns = [reference_pearson(y_s[:, j], y_t[:, j]) for j in range(y_s.shape[1])]
    inter = 1 - sum(rows) / len(rows)
    intra = 1 - sum(columns) / len(columns)
    return temperature**2 * (beta * inter + gamma * intra)


def test_reference_pearson_is_the_correlation_coefficient():
    x, y, _ = make_logits(10, seed=40, batch=2)
    assert_close(reference_pearson(x[0], y[0], eps=0.0), torch.corrcoef(torch.stack([x[0], y[0]]))[0, 1])
    assert_close(reference_pearson(x[0], 3 * x[0] + 1, eps=0.0), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
@pytest.mark.parametrize("temperature", (1.0, 4.0))
@pytest.mark.parametrize("beta, gamma", [(2.0, 2.0), (1.0, 0.0), (0.0, 1.0)])
def test_dist_divergence_matches_formula(num_classes, temperature, beta, gamma):
    student, teacher, _ = make_logits(num_classes, seed=41 + num_classes + int(temperature))
    got = dist_divergence(student, teacher, beta, gamma, temperature)
    assert got.dtype == torch.float64 and got.shape == ()
    assert_close(got, reference_dist(student, teacher, beta, gamma, temperature), rtol=1e-9, atol=1e-12)


def test_dist_loss_returns_weighted_ce_and_dist_terms():
    student, teacher, targets = make_logits(100, seed=42)
    terms = DISTLoss(ce_weight=0.5, beta=2.0, gamma=3.0, temperature=4.0)(Step(student, targets, teacher))
    assert set(terms) == {"loss_ce", "loss_dist"}
    assert_close(terms["loss_ce"], 0.5 * reference_ce(student, targets), rtol=1e-10, atol=1e-12)
    assert_close(terms["loss_dist"], reference_dist(student, teacher, 2.0, 3.0, 4.0), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("temperature", (1.0, 2.0, 4.0))
def test_dist_term_is_zero_for_identical_logits_up_to_eps(temperature):
    # 1 - rho(y, y) = eps / (|y - mean y|^2 + eps) with the reference's eps in the denominator: zero up to eps.
    student, _, targets = make_logits(10, seed=43)
    y = F.softmax(student / temperature, dim=1)

    def residual(rows: torch.Tensor) -> torch.Tensor:
        norms2 = ((rows - rows.mean(dim=1, keepdim=True)) ** 2).sum(dim=1)
        return (1e-8 / (norms2 + 1e-8)).mean()

    expected = temperature**2 * (2.0 * residual(y) + 2.0 * residual(y.T))
    got = DISTLoss(temperature=temperature)(Step(student, targets, student.clone()))["loss_dist"]
    assert_close(got, expected, rtol=1e-6, atol=1e-15)
    assert got.item() < 1e-4


def test_dist_inter_term_ignores_the_batch_order_and_intra_term_the_class_order():
    # Rows are samples (inter-class relation), columns are classes (intra-class relation): permuting the samples
    # of both leaves each row's correlation, permuting the classes of both leaves each column's.
    student, teacher, _ = make_logits(10, seed=44)
    batch_perm, class_perm = torch.randperm(BATCH), torch.randperm(10)
    for beta, gamma in [(1.0, 0.0), (0.0, 1.0)]:
        plain = dist_divergence(student, teacher, beta, gamma, 4.0)
        rows = dist_divergence(student[batch_perm], teacher[batch_perm], beta, gamma, 4.0)
        cols = dist_divergence(student[:, class_perm], teacher[:, class_perm], beta, gamma, 4.0)
        assert_close(rows, plain, rtol=1e-12, atol=1e-14)
        assert_close(cols, plain, rtol=1e-12, atol=1e-14)


# ===============================================================================================================
# logit standardisation (Sun et al., CVPR 2024)


def test_standardize_gives_zero_mean_unit_unbiased_std_rows():
    logits, _, _ = make_logits(100, seed=50)
    z = standardize(logits)
    assert_close(z.mean(dim=1), torch.zeros(BATCH, dtype=torch.float64), rtol=0, atol=1e-12)
    # Unbiased (n - 1) std, as torch.std and the LS code: written out here.
    std = torch.sqrt(((z - z.mean(dim=1, keepdim=True)) ** 2).sum(dim=1) / (100 - 1))
    assert_close(std, torch.ones(BATCH, dtype=torch.float64), rtol=1e-6, atol=0)  # eps 1e-7 against std ~3
    manual = torch.stack(
        [(row - row.mean()) / (torch.sqrt(((row - row.mean()) ** 2).sum() / 99) + 1e-7) for row in logits]
    )
    assert_close(z, manual, rtol=1e-12, atol=1e-12)


def test_standardize_is_invariant_to_per_row_shift_and_positive_scale():
    logits, _, _ = make_logits(10, seed=51)
    g = torch.Generator().manual_seed(52)
    scale = torch.rand(BATCH, 1, generator=g, dtype=torch.float64) * 5 + 0.5
    shift = torch.randn(BATCH, 1, generator=g, dtype=torch.float64) * 10
    assert_close(standardize(logits * scale + shift), standardize(logits), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "make_criterion, key",
    [
        (lambda standardized: DKDLoss(standardize=standardized), "loss_dkd"),
        (lambda standardized: DKDLoss(temperature=2.0, kd_weight=9.0, standardize=standardized), "loss_dkd"),
        (lambda standardized: KDLoss(alpha=0.9, temperature=2.0, standardize=standardized), "loss_kd"),
    ],
)
def test_standardize_option_is_the_plain_loss_on_standardized_logits(make_criterion, key):
    student, teacher, targets = make_logits(100, seed=53)
    got = make_criterion(True)(Step(student, targets, teacher, epoch=7))
    plain = make_criterion(False)(Step(standardize(student), targets, standardize(teacher), epoch=7))
    assert_close(got[key], plain[key], rtol=1e-12, atol=1e-14)
    # CE stays on the raw logits (as in the LS code): only the distillation term sees standardised logits.
    raw_ce = make_criterion(False)(Step(student, targets, teacher, epoch=7))["loss_ce"]
    assert_close(got["loss_ce"], raw_ce, rtol=0, atol=0)


# ===============================================================================================================
# gradients and inputs, for every new criterion


NEW_CRITERIA = {
    "dkd": lambda: DKDLoss(),
    "dkd_standardized": lambda: DKDLoss(temperature=2.0, kd_weight=9.0, standardize=True),
    "dist": lambda: DISTLoss(),
    "kd_standardized": lambda: KDLoss(alpha=0.9, temperature=2.0, standardize=True),
}


@pytest.mark.parametrize("name", sorted(NEW_CRITERIA))
def test_new_criteria_send_gradients_to_the_student_only_and_leave_inputs_alone(name):
    torch.manual_seed(0)
    inputs = torch.randn(BATCH, 6, dtype=torch.float64)
    targets = torch.randint(0, 10, (BATCH,))
    student = nn.Linear(6, 10).double()
    teacher = nn.Linear(6, 10).double().requires_grad_(False).eval()
    teacher_logits = frozen_teacher_logits(teacher, inputs)
    student_logits = student(inputs)
    student_logits.retain_grad()
    before = (student_logits.detach().clone(), teacher_logits.clone(), targets.clone())

    terms = NEW_CRITERIA[name]()(Step(student_logits, targets, teacher_logits, epoch=5))
    sum(terms.values()).backward()

    for value, original in zip((student_logits, teacher_logits, targets), before):
        assert torch.equal(value.detach(), original)  # nothing is modified in place
    assert student_logits.grad is not None and torch.isfinite(student_logits.grad).all()
    assert student_logits.grad.abs().sum() > 0
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert teacher_logits.grad is None and not teacher_logits.requires_grad
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("name", sorted(NEW_CRITERIA))
def test_new_criteria_distillation_term_alone_has_a_gradient(name):
    # The distillation term by itself (without CE) reaches the student's logits.
    student, teacher, targets = make_logits(10, seed=60)
    student.requires_grad_(True)
    terms = NEW_CRITERIA[name]()(Step(student, targets, teacher, epoch=20))
    (kd_term,) = [value for key, value in terms.items() if key != "loss_ce"]
    (grad,) = torch.autograd.grad(kd_term, student)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# ===============================================================================================================
# Combined


class SoftTargetsOnly(Criterion):
    """A test criterion with its own term name: the KD term alone, T=4."""

    def forward(self, step: Step) -> dict[str, torch.Tensor]:
        return {"loss_soft": kd_divergence(step.student_logits, step.teacher_logits, 4.0)}


def test_combined_logs_each_term_and_sums_to_the_loss():
    student, teacher, targets = make_logits(10, seed=70)
    step = Step(student, targets, teacher)
    combined = Combined(kd=KDLoss(alpha=0.5, temperature=4.0), soft=SoftTargetsOnly())
    terms = combined(step)
    kd_terms, soft_terms = KDLoss(alpha=0.5, temperature=4.0)(step), SoftTargetsOnly()(step)
    assert set(terms) == {"loss_ce", "loss_kd", "loss_soft"}
    for key, value in {**kd_terms, **soft_terms}.items():
        assert_close(terms[key], value, rtol=0, atol=0)
    expected_total = 0.5 * reference_ce(student, targets) + (0.5 + 1.0) * 16.0 * reference_kl(student, teacher, 4.0)
    assert_close(sum(terms.values()), expected_total, rtol=1e-10, atol=1e-12)


def test_combined_rejects_duplicate_term_names():
    # CELoss and KDLoss both return loss_ce: summing both would count CE twice under one logged name.
    student, teacher, targets = make_logits(10, seed=71)
    combined = Combined(ce=CELoss(), kd=KDLoss(alpha=0.9, temperature=4.0))
    with pytest.raises(ValueError, match="'loss_ce'.*'kd'"):
        combined(Step(student, targets, teacher))


def test_combined_needs_the_teacher_when_any_term_does():
    assert Combined(ce=CELoss()).needs_teacher is False
    assert Combined(ce=CELoss(), soft=SoftTargetsOnly()).needs_teacher is True
    with pytest.raises(ValueError, match=r"Combined with no criteria: add one"):
        Combined()


# ===============================================================================================================
# hyperparameter validation


@pytest.mark.parametrize(
    "factory, key, value",
    [
        (DKDLoss, "temperature", 0.0),
        (DKDLoss, "temperature", -4.0),
        (DKDLoss, "ce_weight", -1.0),
        (DKDLoss, "alpha", -0.1),
        (DKDLoss, "beta", -8.0),
        (DKDLoss, "kd_weight", -9.0),
        (DKDLoss, "warmup_epochs", -1),
        (DISTLoss, "temperature", 0.0),
        (DISTLoss, "temperature", -1.0),
        (DISTLoss, "ce_weight", -1.0),
        (DISTLoss, "beta", -2.0),
        (DISTLoss, "gamma", -2.0),
    ],
)
def test_bad_hyperparameters_are_rejected_naming_the_key_and_the_fix(factory, key, value):
    with pytest.raises(ValueError, match=rf"loss\.{key}={value}") as error:
        factory(**{key: value})
    assert any(fix in str(error.value) for fix in ("must be > 0", "must be >= 0", "use 0"))


@pytest.mark.parametrize("factory", [DKDLoss, DISTLoss])
def test_zero_weights_are_accepted(factory):
    weights = {"ce_weight": 0.0, "beta": 0.0}
    criterion = factory(**weights)
    student, teacher, targets = make_logits(10, seed=80)
    assert all(torch.isfinite(value) for value in criterion(Step(student, targets, teacher)).values())


# ===============================================================================================================
# the loss options hold their papers' settings; DKD's beta follows the pair preset


def compose_loss(*overrides: str):
    import hydra

    import kd.config  # noqa: F401  (registers the typed root schema)

    with hydra.initialize(version_base="1.3", config_path="../conf"):
        cfg = hydra.compose("config", overrides=list(overrides))
    from hydra.utils import instantiate

    return instantiate(cfg.loss)


# mdistiller configs/cifar100/dkd/*.yaml; resnet110 -> resnet20 has none there (the default 8).
DKD_BETA = {
    None: 8.0,
    "crd_resnet56_resnet20": 2.0,
    "crd_resnet110_resnet32": 2.0,
    "crd_resnet110_resnet20": 8.0,
    "crd_resnet32x4_resnet8x4": 8.0,
    "crd_vgg13_vgg8": 6.0,
    "crd_wrn_40_2_wrn_16_2": 6.0,
    "crd_wrn_40_2_wrn_40_1": 6.0,
}


@pytest.mark.parametrize("experiment", list(DKD_BETA), ids=str)
def test_dkd_beta_follows_the_pair_preset(experiment):
    overrides = ["loss=dkd"] + ([f"experiment={experiment}"] if experiment else [])
    criterion = compose_loss(*overrides)
    assert isinstance(criterion, DKDLoss)
    assert criterion.beta == DKD_BETA[experiment]
    assert (criterion.ce_weight, criterion.alpha, criterion.warmup_epochs) == (1.0, 1.0, 20)
    # mdistiller/engine/cfg.py
    assert (criterion.temperature, criterion.kd_weight, criterion.standardize) == (4.0, 1.0, False)


def test_dkd_ls_defaults():
    """Without a pair preset: logit-standardization-KD README's --base-temp 2 --kd-weight 9 on DKD's default beta; the
    pair presets' own values (their logs) are checked in test_config.test_pair_values_reach_the_instantiated_losses."""
    criterion = compose_loss("loss=dkd_ls")
    assert isinstance(criterion, DKDLoss)
    assert (criterion.ce_weight, criterion.alpha, criterion.beta, criterion.warmup_epochs) == (1.0, 1.0, 8.0, 20)
    assert (criterion.temperature, criterion.kd_weight, criterion.standardize) == (2.0, 9.0, True)


def test_pair_beta_can_be_overridden_from_the_command_line():
    assert compose_loss("loss=dkd", "experiment=crd_vgg13_vgg8", "pair_hparams.dkd_beta=3").beta == 3.0
    assert compose_loss("loss=dkd", "experiment=crd_vgg13_vgg8", "loss.beta=4").beta == 4.0


def test_dist_and_kd_ls_options_hold_their_papers_settings():
    dist = compose_loss("loss=dist")
    assert isinstance(dist, DISTLoss)
    assert (dist.ce_weight, dist.beta, dist.gamma, dist.temperature) == (1.0, 2.0, 2.0, 4.0)
    kd_ls = compose_loss("loss=kd_ls")
    ce, soft = kd_ls.terms["ce"], kd_ls.terms["kd"]
    assert isinstance(ce, CELoss) and isinstance(soft, SoftTargets)
    # Their 0.1 * CE + 9 * KD at base temperature 2, standardised logits.
    assert (ce.weight, soft.weight, soft.temperature, soft.standardize) == (0.1, 9.0, 2.0, True)


def test_soft_targets_is_the_weighted_kd_term_of_kd_loss():
    student, teacher, targets = make_logits(10, seed=5)
    soft = SoftTargets(weight=3.0, temperature=4.0)(Step(student, targets, teacher))
    kd = KDLoss(alpha=1.0, temperature=4.0)(Step(student, targets, teacher))
    assert set(soft) == {"loss_kd"}
    assert_close(soft["loss_kd"], 3.0 * kd["loss_kd"], rtol=1e-12, atol=0)
    standardized = SoftTargets(weight=1.0, temperature=2.0, standardize=True)(Step(student, targets, teacher))
    expected = reference_kl(standardize(student), standardize(teacher), 2.0) * 4.0
    assert_close(standardized["loss_kd"], expected, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="loss.weight=-1"):
        SoftTargets(weight=-1.0)
