"""DIST (kd/methods/dist.py), written with loops: one Pearson correlation per sample (a row over the classes) and
one per class (a column over the batch), each from sums, means and square roots."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from kd.methods.base import Step
from kd.methods.dist import DISTLoss, dist_divergence
from support.criteria import BATCH, CLASS_COUNTS, make_logits, reference_ce, reference_softmax


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
    criterion = DISTLoss(ce_weight=1.0, beta=2.0, gamma=2.0, temperature=temperature)
    got = criterion(Step(student, targets, student.clone()))["loss_dist"]
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
