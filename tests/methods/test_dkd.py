"""DKD (kd/methods/dkd.py), written per sample from the paper's Eqs. (1)-(4): explicit probabilities, a loop over
samples and an index list for the non-target classes (no masks, no -1000 trick); warm-up, kd_weight, and the dkd /
dkd_ls options' settings per pair preset."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from kd.methods.base import Step
from kd.methods.dkd import DKDLoss, dkd_divergence
from kd.methods.kd import kd_divergence
from support.criteria import (
    CLASS_COUNTS,
    TEMPERATURES,
    compose_loss,
    make_logits,
    reference_ce,
    reference_kl,
    reference_softmax,
)


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


# mdistiller's DKD values (conf/loss/dkd.yaml), written out: the reference computations below use them.
DKD = {"ce_weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 20}


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
    scaled = DKDLoss(**DKD, kd_weight=9.0)(Step(student, targets, teacher, epoch=20))["loss_dkd"]
    expected = reference_dkd(student, teacher, targets, 9.0, 72.0, 4.0)
    assert_close(scaled, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("epoch, factor", [(1, 1 / 20), (10, 0.5), (20, 1.0), (40, 1.0)])
def test_dkd_warmup_ramps_the_kd_term_only(epoch, factor):
    student, teacher, targets = make_logits(10, seed=35)
    criterion = DKDLoss(**DKD)
    terms = criterion(Step(student, targets, teacher, epoch=epoch))
    full = reference_dkd(student, teacher, targets, 1.0, 8.0, 4.0)
    assert_close(terms["loss_dkd"], factor * full, rtol=1e-9, atol=1e-12)
    assert_close(terms["loss_ce"], reference_ce(student, targets), rtol=1e-10, atol=0)  # CE is never ramped


def test_dkd_without_warmup_is_full_from_the_first_epoch():
    student, teacher, targets = make_logits(10, seed=36)
    terms = DKDLoss(**DKD | {"warmup_epochs": 0})(Step(student, targets, teacher, epoch=1))
    assert_close(terms["loss_dkd"], reference_dkd(student, teacher, targets, 1.0, 8.0, 4.0), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_dkd_term_is_zero_for_identical_logits(temperature):
    student, _, targets = make_logits(100, seed=37)
    zero = torch.tensor(0.0, dtype=torch.float64)
    assert_close(dkd_divergence(student, student.clone(), targets, 1.0, 8.0, temperature), zero)
    terms = DKDLoss(**DKD | {"temperature": temperature})(Step(student, targets, student.clone(), epoch=30))
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
