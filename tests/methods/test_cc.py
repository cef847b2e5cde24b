"""CC (kd/methods/cc.py) against RepDistiller's formula written with loops, and its linear embeddings."""
import pytest
import torch

from kd.methods.base import Step
from kd.methods.cc import CCLoss, correlation_congruence_loss
from support.criteria import F64, LABELS, bind, randn

# Tiny tensors: one thread is faster, and keeps these tests quick when the CPU is shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def ref_cc(es: torch.Tensor, et: torch.Tensor) -> float:
    """RepDistiller's CC: (1 / (b - 1)) sum_i sum_d |es_id - et_id| |es_(i+1)d - et_(i+1)d|."""
    b, d = es.shape
    delta = [[abs(float(es[i, k] - et[i, k])) for k in range(d)] for i in range(b)]
    return sum(delta[i][k] * delta[i + 1][k] for i in range(b - 1) for k in range(d)) / (b - 1)


def test_cc_loss_matches_repdistillers_formula():
    es, et = randn(5, 4, seed=1), randn(5, 4, seed=2)
    assert correlation_congruence_loss(es, et).item() == pytest.approx(ref_cc(es, et), rel=1e-12)


def test_cc_criterion_embeds_both_networks_linearly():
    criterion = CCLoss(weight=0.5, feat_dim=3)
    bind(criterion)
    criterion.double()
    s_dim, t_dim = criterion.embed_student.in_features, criterion.embed_teacher.in_features
    student, teacher = randn(4, s_dim, seed=1), randn(4, t_dim, seed=2)
    value = criterion(Step(torch.zeros(4, 4, dtype=F64), LABELS[:4], None, {"fc:in": student}, {"fc:in": teacher}))

    def embed(linear, x):
        return torch.stack([linear.weight.detach() @ row + linear.bias.detach() for row in x])

    expected = ref_cc(embed(criterion.embed_student, student), embed(criterion.embed_teacher, teacher))
    assert value["loss_cc"].item() == pytest.approx(0.5 * expected, rel=1e-10)
