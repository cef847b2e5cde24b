"""Hinton KD, the soft-target term and logit standardisation (kd/methods/kd.py): reference values from the
formulas, T^2 scaling, edge cases, gradients, validation, and the kd_ls option's paper settings."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from kd.methods.base import CELoss, Step
from kd.methods.dist import DISTLoss
from kd.methods.dkd import DKDLoss
from kd.methods.kd import KDLoss, SoftTargets, kd_divergence, standardize
from support.criteria import (
    ALPHAS,
    BATCH,
    CLASS_COUNTS,
    TEMPERATURES,
    compose_loss,
    frozen_teacher_logits,
    make_logits,
    reference_ce,
    reference_kd_loss,
    reference_kl,
    reference_softmax,
)


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
        (lambda standardized: DKDLoss(1.0, 1.0, 8.0, 4.0, 20, standardize=standardized), "loss_dkd"),
        (lambda standardized: DKDLoss(1.0, 1.0, 8.0, 2.0, 20, standardize=standardized, kd_weight=9.0), "loss_dkd"),
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
        SoftTargets(weight=-1.0, temperature=4.0)


def test_dist_and_kd_ls_options_hold_their_papers_settings():
    dist = compose_loss("loss=dist")
    assert isinstance(dist, DISTLoss)
    assert (dist.ce_weight, dist.beta, dist.gamma, dist.temperature) == (1.0, 2.0, 2.0, 4.0)
    kd_ls = compose_loss("loss=kd_ls")
    ce, soft = kd_ls.terms["ce"], kd_ls.terms["kd"]
    assert isinstance(ce, CELoss) and isinstance(soft, SoftTargets)
    # Their 0.1 * CE + 9 * KD at base temperature 2, standardised logits.
    assert (ce.weight, soft.weight, soft.temperature, soft.standardize) == (0.1, 9.0, 2.0, True)
