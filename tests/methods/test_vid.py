"""VID (kd/methods/vid.py) against the Gaussian negative log-likelihood written with loops, its regressor and
variances, and the vid / cc options' settings."""
import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from kd.methods.base import Step
from kd.methods.vid import VIDLoss, vid_loss
from support.criteria import F64, LABELS, bind, preset, randn, ref_average_pool, tiny_models

# Tiny tensors: one thread is faster, and keeps these tests quick when the CPU is shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def ref_vid(mean: torch.Tensor, target: torch.Tensor, variance: list[float]) -> float:
    """Ahn et al.: -log N(t | mu, var_c) per element without 0.5 log(2 pi), averaged over all elements."""
    n, c, h, w = target.shape
    total = 0.0
    for i in range(n):
        for k in range(c):
            for y in range(h):
                for x in range(w):
                    total += 0.5 * (math.log(variance[k]) + (float(target[i, k, y, x] - mean[i, k, y, x])) ** 2
                                    / variance[k])
    return total / (n * c * h * w)


def test_vid_loss_matches_the_gaussian_negative_log_likelihood():
    mean, target = randn(2, 3, 2, 2, seed=1), randn(2, 3, 2, 2, seed=2)
    variance = [0.5, 2.0, 5.0]
    value = vid_loss(mean, target, torch.tensor(variance, dtype=F64))
    assert value.item() == pytest.approx(ref_vid(mean, target, variance), rel=1e-12)


def ref_conv1x1(weights: list[torch.Tensor], f: torch.Tensor) -> torch.Tensor:
    """VID's regressor position by position: W3 relu(W2 relu(W1 x)) on each pixel's channel vector."""
    n, _, h, w = f.shape
    out = torch.zeros(n, weights[-1].shape[0], h, w, dtype=f.dtype)
    for i in range(n):
        for y in range(h):
            for x in range(w):
                v = f[i, :, y, x]
                for k, weight in enumerate(weights):
                    v = weight[:, :, 0, 0] @ v
                    v = v.clamp(min=0) if k < len(weights) - 1 else v
                out[i, :, y, x] = v
    return out


def test_vid_criterion_matches_its_definition_and_starts_at_the_initial_variance():
    # RepDistiller's init_pred_var 5 and eps 1e-5 (vid.yaml); an 8x8 student, a 4x4 teacher
    criterion = VIDLoss(weight=2.0, init_variance=5.0, eps=1e-5, student_layers=["layer1"], teacher_layers=["layer2"])
    bind(criterion)
    criterion.double()
    (alpha,) = criterion.log_scales
    variance = torch.log1p(torch.exp(alpha.detach())) + 1e-5
    assert_close(variance, torch.full_like(variance, 5.0))  # RepDistiller's init_pred_var
    with torch.no_grad():
        alpha.copy_(randn(len(alpha), seed=3))
    student, teacher = randn(2, 4, 8, 8, seed=1), randn(2, 16, 4, 4, seed=2)
    step = Step(torch.zeros(2, 4, dtype=F64), LABELS[:2], None, {"layer1": student}, {"layer2": teacher})
    value = criterion(step)["loss_vid"].item()
    weights = [m.weight.detach() for m in criterion.regressors[0] if isinstance(m, nn.Conv2d)]
    assert [tuple(w.shape[:2]) for w in weights] == [(16, 4), (16, 16), (16, 16)]  # VIDLoss(s, t, t)
    mean = ref_conv1x1(weights, ref_average_pool(student, 2))  # the larger map pooled before the regressor
    variances = [math.log(1 + math.exp(float(a))) + 1e-5 for a in alpha.detach()]
    assert value == pytest.approx(2.0 * ref_vid(mean, teacher, variances), rel=1e-10)


def test_vid_with_an_identity_regressor_on_equal_features_is_half_the_mean_log_variance():
    criterion = VIDLoss(weight=1.0, init_variance=5.0, eps=1e-5, student_layers=["layer2"], teacher_layers=["layer2"])
    student, _ = tiny_models()
    bind(criterion, student, student)
    criterion.regressors[0] = nn.Identity()
    features = {"layer2": randn(2, 8, 4, 4).float()}
    terms = criterion(Step(torch.zeros(2, 4), LABELS[:2], None, features, {"layer2": features["layer2"].clone()}))
    assert terms["loss_vid"].item() == pytest.approx(0.5 * math.log(5.0), rel=1e-6)


def test_vid_and_cc_preset_settings():
    vid = preset("vid").terms["vid"]
    assert (vid.init_variance, vid.eps) == (5.0, 1e-5)  # distiller_zoo/VID.py init_pred_var, eps
    assert preset("cc").terms["cc"].feat_dim == 128  # train_student.py --feat_dim
