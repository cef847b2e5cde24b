"""Feature distillation (FitNet, AT, SP, PKT, RKD, CRD, VID, NST, CC): values against loop-by-loop computations written
from the
papers' formulas, zero when the features match, gradients to the student and the adapters but never the teacher,
CRD's memory, Z and negative sampling, and the conf/loss presets bound to real (tiny) models."""

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.testing import assert_close

from kd.feature_losses import (
    ATLoss, CCLoss, CRDLoss, FitNetLoss, NSTLoss, PKTLoss, RKDLoss, SPLoss, VIDLoss, attention_loss,
    correlation_congruence_loss, hint_loss, hint_regressor, momentum_update, nce_loss, nst_loss, pkt_loss,
    average_pool_to, negative_pool, rkd_angle_loss, rkd_distance_loss, rkd_loss, sample_negatives, similarity_loss,
    step_generator, vid_loss,
)
from kd.features import capture
from kd.losses import Step
from kd.models.cifar_resnet import resnet8
from support.syncs import SyncCounter

CONF = Path(__file__).resolve().parents[1] / "conf"
F64 = torch.float64


# Tiny tensors: one thread is faster, and keeps these tests quick when the CPU is shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def randn(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------------------------------------------------------
# independent computations, element by element


def ref_attention_map(f: torch.Tensor, p: float) -> list[list[float]]:
    """Per sample: a_hw = (1/C) sum_c f_chw^p, divided by sqrt(sum_hw a_hw^2)."""
    n, c, h, w = f.shape
    maps = []
    for i in range(n):
        a = [sum(float(f[i, k, y, x]) ** p for k in range(c)) / c for y in range(h) for x in range(w)]
        norm = math.sqrt(sum(v * v for v in a))
        maps.append([v / norm for v in a])
    return maps


def ref_average_pool(f: torch.Tensor, factor: int) -> torch.Tensor:
    n, c, h, w = f.shape
    out = torch.zeros(n, c, h // factor, w // factor, dtype=f.dtype)
    for y in range(h // factor):
        for x in range(w // factor):
            out[:, :, y, x] = f[:, :, y * factor:(y + 1) * factor, x * factor:(x + 1) * factor].sum((2, 3)) / factor**2
    return out


def ref_attention_loss(fs: torch.Tensor, ft: torch.Tensor, p: float = 2.0) -> float:
    if fs.shape[2] > ft.shape[2]:
        fs = ref_average_pool(fs, fs.shape[2] // ft.shape[2])
    elif ft.shape[2] > fs.shape[2]:
        ft = ref_average_pool(ft, ft.shape[2] // fs.shape[2])
    ms, mt = ref_attention_map(fs, p), ref_attention_map(ft, p)
    squares = [(a - b) ** 2 for rs, rt in zip(ms, mt) for a, b in zip(rs, rt)]
    return sum(squares) / len(squares)


def ref_similarity_loss(fs: torch.Tensor, ft: torch.Tensor) -> float:
    b = fs.shape[0]

    def gram(f):
        rows = [[float((f[i].flatten() * f[j].flatten()).sum()) for j in range(b)] for i in range(b)]
        return [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in rows]

    gs, gt = gram(fs), gram(ft)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def ref_pkt_loss(fs: torch.Tensor, ft: torch.Tensor, eps: float = 1e-7) -> float:
    b = fs.shape[0]

    def probabilities(f):
        f = f.reshape(b, -1)
        cos = [[float(f[i] @ f[j]) / ((float(f[i].norm()) + eps) * (float(f[j].norm()) + eps)) for j in range(b)]
               for i in range(b)]
        kernel = [[(v + 1) / 2 for v in row] for row in cos]
        return [[v / sum(row) for v in row] for row in kernel]

    p, q = probabilities(fs), probabilities(ft)
    return sum(q[i][j] * math.log((q[i][j] + eps) / (p[i][j] + eps)) for i in range(b) for j in range(b)) / b**2


def huber(x: float) -> float:  # smooth L1 with beta 1
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def ref_rkd(fs: torch.Tensor, ft: torch.Tensor) -> tuple[float, float]:
    """(distance loss, angle loss) of Park et al.: psi_D = |x_i - x_j| / mu, psi_A = cos of the angle at x_j."""
    b = fs.shape[0]
    xs, xt = fs.reshape(b, -1), ft.reshape(b, -1)

    def distances(x):
        d = [[float((x[i] - x[j]).norm()) for j in range(b)] for i in range(b)]
        mu = sum(d[i][j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        return [[v / mu for v in row] for row in d]

    def angles(x):
        def unit(v):
            n = float(v.norm())
            return v / n if n > 0 else v * 0

        return [float(unit(x[i] - x[j]) @ unit(x[k] - x[j])) for j in range(b) for i in range(b) for k in range(b)]

    ds, dt = distances(xs), distances(xt)
    distance = sum(huber(ds[i][j] - dt[i][j]) for i in range(b) for j in range(b)) / b**2
    angle = sum(huber(a - c) for a, c in zip(angles(xs), angles(xt))) / b**3
    return distance, angle


def ref_nce(probabilities: torch.Tensor, num_data: int, eps: float = 1e-7) -> float:
    b, k = probabilities.shape[0], probabilities.shape[1] - 1
    total = 0.0
    for i in range(b):
        p = float(probabilities[i, 0])
        total += math.log(p / (p + k / num_data + eps))
        for j in range(1, k + 1):
            total += math.log((k / num_data) / (float(probabilities[i, j]) + k / num_data + eps))
    return -total / b


def ref_pool_to(f: torch.Tensor, size: int) -> torch.Tensor:
    return f if f.shape[2] == size else ref_average_pool(f, f.shape[2] // size)


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


def ref_nst(fs: torch.Tensor, ft: torch.Tensor) -> float:
    """Huang & Wang: per sample MMD^2 of the channel sets under k(x, y) = (x.y)^2, x the unit-norm channel maps."""
    size = min(fs.shape[2], ft.shape[2])
    fs, ft = ref_pool_to(fs, size), ref_pool_to(ft, size)

    def channels(f, i):
        rows = [[float(v) for v in f[i, k].flatten()] for k in range(f.shape[1])]
        return [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in rows]

    def mean_kernel(a, b):
        return sum(sum(x * y for x, y in zip(u, v)) ** 2 for u in a for v in b) / (len(a) * len(b))

    total = 0.0
    for i in range(fs.shape[0]):
        s, t = channels(fs, i), channels(ft, i)
        total += mean_kernel(t, t) + mean_kernel(s, s) - 2 * mean_kernel(s, t)
    return total / fs.shape[0]


def ref_cc(es: torch.Tensor, et: torch.Tensor) -> float:
    """RepDistiller's CC: (1 / (b - 1)) sum_i sum_d |es_id - et_id| |es_(i+1)d - et_(i+1)d|."""
    b, d = es.shape
    delta = [[abs(float(es[i, k] - et[i, k])) for k in range(d)] for i in range(b)]
    return sum(delta[i][k] * delta[i + 1][k] for i in range(b - 1) for k in range(d)) / (b - 1)


# ---------------------------------------------------------------------------------------------------------------
# the tensor functions against them


def test_hint_loss_is_the_mean_squared_error():
    a, b = randn(2, 3, 4, 4, seed=1), randn(2, 3, 4, 4, seed=2)
    expected = sum((float(x) - float(y)) ** 2 for x, y in zip(a.flatten(), b.flatten())) / a.numel()
    assert hint_loss(a, b).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("student_size, teacher_size", [(4, 4), (8, 4), (4, 8)])
def test_attention_loss_matches_the_formula(student_size, teacher_size):
    fs, ft = randn(3, 5, student_size, student_size, seed=1), randn(3, 7, teacher_size, teacher_size, seed=2)
    assert attention_loss(fs, ft).item() == pytest.approx(ref_attention_loss(fs, ft), rel=1e-10)


def test_attention_loss_with_p_4():
    fs, ft = randn(2, 3, 4, 4, seed=1), randn(2, 6, 4, 4, seed=2)
    assert attention_loss(fs, ft, p=4.0).item() == pytest.approx(ref_attention_loss(fs, ft, p=4.0), rel=1e-10)


@pytest.mark.parametrize("shape, size", [((2, 3, 8, 8), (4, 4)), ((2, 3, 32, 32), (8, 8)), ((1, 2, 8, 4), (2, 2)),
                                         ((2, 3, 6, 6), (4, 4))])
def test_average_pool_to_is_adaptive_pooling(shape, size):
    """Integer factors take avg_pool2d (a deterministic CUDA backward): the same values as adaptive pooling; the
    6 -> 4 case (overlapping bins) stays adaptive."""
    feature = randn(*shape, seed=3)
    assert_close(average_pool_to(feature, size), torch.nn.functional.adaptive_avg_pool2d(feature, size))
    assert_close(average_pool_to(feature.float(), size), torch.nn.functional.adaptive_avg_pool2d(feature.float(), size))


def test_similarity_loss_matches_the_formula():
    fs, ft = randn(5, 3, 2, 2, seed=1), randn(5, 8, 1, 1, seed=2)  # any widths: only b x b matrices are compared
    assert similarity_loss(fs, ft).item() == pytest.approx(ref_similarity_loss(fs, ft), rel=1e-10)


def test_pkt_loss_matches_the_formula():
    fs, ft = randn(6, 4, seed=1), randn(6, 9, seed=2)
    assert pkt_loss(fs, ft).item() == pytest.approx(ref_pkt_loss(fs, ft), rel=1e-9)


def test_rkd_losses_match_the_formula():
    fs, ft = randn(5, 4, seed=1), randn(5, 6, seed=2)
    distance, angle = ref_rkd(fs, ft)
    assert rkd_distance_loss(fs, ft).item() == pytest.approx(distance, rel=1e-9)
    assert rkd_angle_loss(fs, ft).item() == pytest.approx(angle, rel=1e-9)
    assert rkd_loss(fs, ft).item() == pytest.approx(25 * distance + 50 * angle, rel=1e-9)
    assert rkd_loss(fs, ft, 2.0, 3.0).item() == pytest.approx(2 * distance + 3 * angle, rel=1e-9)


def test_vid_loss_matches_the_gaussian_negative_log_likelihood():
    mean, target = randn(2, 3, 2, 2, seed=1), randn(2, 3, 2, 2, seed=2)
    variance = [0.5, 2.0, 5.0]
    value = vid_loss(mean, target, torch.tensor(variance, dtype=F64))
    assert value.item() == pytest.approx(ref_vid(mean, target, variance), rel=1e-12)


@pytest.mark.parametrize("student_size, teacher_size", [(4, 4), (8, 4), (4, 8)])
def test_nst_loss_matches_the_mmd_formula(student_size, teacher_size):
    fs, ft = randn(2, 3, student_size, student_size, seed=1), randn(2, 5, teacher_size, teacher_size, seed=2)
    assert nst_loss(fs, ft).item() == pytest.approx(ref_nst(fs, ft), rel=1e-10)


def test_cc_loss_matches_repdistillers_formula():
    es, et = randn(5, 4, seed=1), randn(5, 4, seed=2)
    assert correlation_congruence_loss(es, et).item() == pytest.approx(ref_cc(es, et), rel=1e-12)


@pytest.mark.parametrize(
    "loss", [similarity_loss, pkt_loss, rkd_loss, correlation_congruence_loss], ids=["sp", "pkt", "rkd", "cc"]
)
def test_batch_losses_are_finite_on_a_batch_of_one(loss):
    student = randn(1, 5, seed=1).requires_grad_()
    value = loss(student, randn(1, 5 if loss is correlation_congruence_loss else 7, seed=2))
    assert value.item() == pytest.approx(0.0, abs=1e-12)
    value.backward()
    assert torch.isfinite(student.grad).all()


def test_nce_loss_matches_the_formula():
    probabilities = torch.rand(3, 6, generator=torch.Generator().manual_seed(0), dtype=F64) * 1e-3
    assert nce_loss(probabilities, num_data=50).item() == pytest.approx(ref_nce(probabilities, 50), rel=1e-12)


@pytest.mark.parametrize(
    "loss", [attention_loss, similarity_loss, pkt_loss, rkd_loss, nst_loss, correlation_congruence_loss],
    ids=["at", "sp", "pkt", "rkd", "nst", "cc"],
)
def test_zero_when_the_student_features_are_the_teachers(loss):
    f = randn(4, 3, 4, 4, seed=3)
    assert loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert loss(f, randn(4, 3, 4, 4, seed=4)).item() > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# FitNet's regressor


@pytest.mark.parametrize(
    "student, teacher, conv",
    [
        ((2, 4, 8, 8), (2, 6, 4, 4), nn.Conv2d),  # 2x larger: stride-2 3x3 conv
        ((2, 4, 4, 4), (2, 6, 8, 8), nn.ConvTranspose2d),  # 2x smaller: stride-2 4x4 transposed conv
        ((2, 4, 6, 6), (2, 6, 4, 4), nn.Conv2d),  # otherwise larger: a 3x3 valid conv
        ((2, 4, 4, 4), (2, 6, 4, 4), nn.Conv2d),  # equal: a 1x1 conv
    ],
)
def test_hint_regressor_maps_the_student_hint_to_the_teachers_shape(student, teacher, conv):
    regressor = hint_regressor(student, teacher)
    assert type(regressor[0]) is conv
    assert isinstance(regressor[1], nn.BatchNorm2d) and isinstance(regressor[2], nn.ReLU)
    assert regressor(torch.randn(student)).shape == teacher


def test_hint_regressor_refuses_shapes_it_cannot_map():
    with pytest.raises(ValueError, match="no regressor from a 4x4 student hint to a 6x6"):
        hint_regressor((2, 4, 4, 4), (2, 6, 6, 6))
    with pytest.raises(ValueError, match="feature maps"):
        hint_regressor((2, 4), (2, 6, 4, 4))


# ---------------------------------------------------------------------------------------------------------------
# criteria bound to tiny models


LABELS = torch.arange(24) % 4  # a training split of 24 samples in 4 classes


def tiny_models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    student, teacher = resnet8(num_classes=4, width=0.25), resnet8(num_classes=4, width=0.5)
    return student.train(), teacher.eval()


def probe_images(size: int = 8) -> torch.Tensor:
    return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(9))


def bind(criterion, student=None, teacher=None):
    if student is None:
        student, teacher = tiny_models()
    criterion.bind(student, teacher, probe_images(), LABELS)
    return student, teacher


def forward_step(criterion, student, teacher, index=None, seed=5) -> tuple[Step, dict]:
    """One training step as the engine runs it: hooks on both models, the teacher under inference_mode."""
    images = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    index = torch.tensor([0, 5, 10, 15]) if index is None else index
    student_layers, teacher_layers = criterion.layers()
    with capture(student, student_layers) as captured:
        logits = student(images)
    student_features = dict(captured)
    with torch.inference_mode(), capture(teacher, teacher_layers) as captured:
        teacher_logits = teacher(images)
    teacher_features = {name: value.clone() for name, value in captured.items()}
    step = Step(logits, LABELS[index], teacher_logits.clone(), student_features, teacher_features, index=index)
    return step, criterion(step)


def test_layers_default_to_repdistillers_features():
    stages = {"stages": ["s1", "s2", "s3", "s4"], "embedding": "e:in"}
    assert FitNetLoss().pick(stages) == ["s2"]  # hint_layer=2 with the stem as feature 0
    assert ATLoss().pick(stages) == ["s1", "s2", "s3", "s4"]
    assert SPLoss().pick(stages) == ["s4"]
    for criterion in (PKTLoss(), RKDLoss(), CRDLoss(), CCLoss()):
        assert criterion.pick(stages) == ["e:in"]
    for criterion in (VIDLoss(), NSTLoss()):  # helper/loops.py feat[1:-1]
        assert criterion.pick(stages) == ["s1", "s2", "s3", "s4"]
    expected_layers = {
        FitNetLoss: (["layer2"], ["layer2"]),
        ATLoss: (["layer1", "layer2", "layer3"],) * 2,
        SPLoss: (["layer3"], ["layer3"]),
        PKTLoss: (["fc:in"], ["fc:in"]),
        VIDLoss: (["layer1", "layer2", "layer3"],) * 2,
        NSTLoss: (["layer1", "layer2", "layer3"],) * 2,
        CCLoss: (["fc:in"], ["fc:in"]),
    }
    student, teacher = tiny_models()
    for cls, expected in expected_layers.items():
        criterion = cls()
        bind(criterion, student, teacher)
        assert criterion.layers() == expected


def test_configured_layers_replace_the_defaults():
    criterion = FitNetLoss(student_layers=["layer3"], teacher_layers=["layer2"])
    bind(criterion)
    assert criterion.layers() == (["layer3"], ["layer2"])
    assert isinstance(criterion.regressor[0], nn.ConvTranspose2d)  # 2x2 student hint up to the teacher's 4x4


def test_layer_errors_are_clear():
    with pytest.raises(RuntimeError, match="before bind"):
        ATLoss().layers()
    with pytest.raises(ValueError, match="equally many layers"):
        bind(ATLoss(student_layers=["layer1", "layer2"]))
    with pytest.raises(ValueError, match="one layer each"):
        bind(PKTLoss(student_layers=["fc:in", "layer3"]))
    with pytest.raises(ValueError, match="no module 'layer7'"):
        bind(SPLoss(teacher_layers=["layer7"]))
    with pytest.raises(ValueError, match="needs a teacher"):
        SPLoss().bind(resnet8(4, 0.25), None, probe_images(), LABELS)
    for cls in (ATLoss, VIDLoss, NSTLoss):
        with pytest.raises(ValueError, match="spatial maps"):
            bind(cls(student_layers=["fc:in"], teacher_layers=["fc:in"]))
    criterion = SPLoss()
    bind(criterion)
    step = Step(torch.zeros(4, 4), LABELS[:4], torch.zeros(4, 4), {}, {})
    with pytest.raises(KeyError, match="capture criterion.layers"):
        criterion(step)


def test_bind_leaves_the_models_as_they_were():
    student, teacher = tiny_models()
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in (student, teacher)]
    bind(CRDLoss(num_negatives=4), student, teacher)
    bind(FitNetLoss(), student, teacher)
    assert student.training and not teacher.training
    for model, state in zip((student, teacher), states):
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "criterion, function",
    [
        (ATLoss(weight=3.0), lambda s, t: sum(attention_loss(a, b) for a, b in zip(s, t))),
        (SPLoss(weight=3.0), lambda s, t: similarity_loss(s[0], t[0])),
        (PKTLoss(weight=3.0), lambda s, t: pkt_loss(s[0], t[0])),
        (RKDLoss(weight=3.0), lambda s, t: rkd_loss(s[0], t[0])),
        (NSTLoss(weight=3.0), lambda s, t: sum(nst_loss(a, b) for a, b in zip(s, t))),
    ],
    ids=["at", "sp", "pkt", "rkd", "nst"],
)
def test_criterion_returns_its_weighted_term(criterion, function):
    student, teacher = bind(criterion)
    step, terms = forward_step(criterion, student, teacher)
    s_names, t_names = criterion.layers()
    expected = function([step.student_features[n] for n in s_names], [step.teacher_features[n] for n in t_names])
    assert list(terms) == [criterion.term]
    assert_close(terms[criterion.term], 3.0 * expected)


def test_fitnet_term_is_the_weighted_mse_of_the_regressed_hint():
    criterion = FitNetLoss(weight=2.0)
    student, teacher = bind(criterion)
    step, terms = forward_step(criterion, student, teacher)
    regressed = criterion.regressor(step.student_features["layer2"])
    assert_close(terms["loss_fitnet"], 2.0 * hint_loss(regressed, step.teacher_features["layer2"]))


def test_fitnet_with_an_identity_regressor_is_zero_on_equal_features():
    criterion = FitNetLoss(student_layers=["layer2"], teacher_layers=["layer2"])
    student, _ = tiny_models()
    bind(criterion, student, student)
    criterion.regressor = nn.Identity()
    features = {"layer2": randn(2, 4, 4, 4)}
    terms = criterion(Step(torch.zeros(2, 4), LABELS[:2], None, features, {"layer2": features["layer2"].clone()}))
    assert terms["loss_fitnet"].item() == 0.0


ALL = [FitNetLoss, ATLoss, SPLoss, PKTLoss, RKDLoss, lambda: CRDLoss(num_negatives=6, feat_dim=8), VIDLoss, NSTLoss,
       CCLoss]


@pytest.mark.parametrize("make", ALL, ids=["fitnet", "at", "sp", "pkt", "rkd", "crd", "vid", "nst", "cc"])
def test_gradients_reach_the_student_and_adapters_but_never_the_teacher(make):
    criterion = make()
    student, teacher = bind(criterion)
    step, _ = forward_step(criterion, student, teacher)
    student_features = {k: v.detach().requires_grad_() for k, v in step.student_features.items()}
    teacher_features = {k: v.requires_grad_() for k, v in step.teacher_features.items()}
    step.student_features, step.teacher_features = student_features, teacher_features
    (term,) = criterion(step).values()
    assert torch.isfinite(term)
    term.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in student_features.values())
    assert all(f.grad is None for f in teacher_features.values())
    for name, parameter in criterion.named_parameters():  # regressors, VID's variances, CRD's and CC's embeddings
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    expected = {FitNetLoss: 4, CRDLoss: 4, CCLoss: 4, VIDLoss: 3 * (3 + 1)}  # VID: 3 convs + variances per stage
    assert len(list(criterion.parameters())) == expected.get(type(criterion), 0)


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
    criterion = VIDLoss(weight=2.0, student_layers=["layer1"], teacher_layers=["layer2"])  # 8x8 student, 4x4 teacher
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
    criterion = VIDLoss(student_layers=["layer2"], teacher_layers=["layer2"])
    student, _ = tiny_models()
    bind(criterion, student, student)
    criterion.regressors[0] = nn.Identity()
    features = {"layer2": randn(2, 8, 4, 4).float()}
    terms = criterion(Step(torch.zeros(2, 4), LABELS[:2], None, features, {"layer2": features["layer2"].clone()}))
    assert terms["loss_vid"].item() == pytest.approx(0.5 * math.log(5.0), rel=1e-6)


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


# ---------------------------------------------------------------------------------------------------------------
# CRD


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_negatives_come_from_other_classes_without_replacement_when_possible():
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 3)
    anchors = torch.tensor([0, 1, 2, 2, 0])
    negatives = sample_negatives(negative_pool(labels, 8), anchors, generator(0))
    assert negatives.shape == (5, 8) and negatives.dtype == torch.long
    assert (labels[negatives] != anchors[:, None]).all()
    assert all(len(set(row.tolist())) == 8 for row in negatives)  # distinct: 13 or 20 other-class samples
    pool = negative_pool(labels, 15)  # classes 0 and 1 have 13 negatives: drawn with replacement
    assert pool.distinct.tolist() == [False, False, True] and pool.draws == (True, True)
    for seed in range(20):
        negatives = sample_negatives(pool, anchors, generator(seed))
        assert (labels[negatives] != anchors[:, None]).all()
        assert all(len(set(row.tolist())) == 15 for row, a in zip(negatives, anchors) if a == 2)
    assert negative_pool(labels, 21).draws == (False, True) and negative_pool(labels, 3).draws == (True, False)
    first = sample_negatives(pool, anchors, generator(1))
    assert torch.equal(sample_negatives(pool, anchors, generator(1)), first)  # the generator decides
    assert not torch.equal(sample_negatives(pool, anchors, generator(2)), first)
    with pytest.raises(ValueError, match="one class"):
        negative_pool(torch.zeros(5, dtype=torch.long), 3)


CHI2_999 = {5: 20.52, 6: 22.46, 34: 65.25}  # the chi-square distribution's 0.999 quantiles, by degrees of freedom


def chi_square(counts: torch.Tensor) -> float:
    """Pearson's statistic of counts against equal expected counts."""
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


def test_distinct_negatives_are_a_uniform_subset_of_the_other_classes():
    """Without replacement: k distinct positions, every allowed one equally likely; over 4000 draws of 3 of the 7
    other-class samples, the 35 subsets are equally frequent too (chi-square below its 0.999 quantile)."""
    labels = torch.tensor([0] * 3 + [1] * 4 + [2] * 3)  # anchor class 0: the 7 samples 3..9 are allowed
    pool, draws = negative_pool(labels, 3), 4000
    anchors = torch.zeros(draws, dtype=torch.long)
    negatives = sample_negatives(pool, anchors, generator(0))
    assert (negatives >= 3).all() and all(len(set(row)) == 3 for row in negatives.tolist())
    positions = torch.bincount(negatives.flatten(), minlength=10)[3:].double()
    assert chi_square(positions) < CHI2_999[6]
    subsets = torch.tensor([sum(1 << p for p in row) for row in negatives.tolist()])
    frequencies = torch.unique(subsets, return_counts=True)[1].double()
    assert len(frequencies) == 35 and chi_square(frequencies) < CHI2_999[34]


def test_repeated_negatives_are_uniform_over_the_other_classes():
    """With replacement (k above the other-class count): each draw uniform over the other classes' samples,
    whichever block of the class-ordered layout the anchor's class occupies."""
    labels = torch.tensor([1, 0, 2, 1, 0, 2, 2, 1, 0, 2])  # classes 0 and 1 have 7 others, class 2 has 6
    pool = negative_pool(labels, 8)
    assert pool.draws == (False, True)
    for anchor in range(3):
        negatives = sample_negatives(pool, torch.full((500,), anchor), generator(anchor))
        allowed = (labels != anchor).nonzero().flatten()
        counts = torch.bincount(negatives.flatten(), minlength=10).double()
        assert counts[labels == anchor].sum() == 0
        assert chi_square(counts[allowed]) < CHI2_999[len(allowed) - 1]


def test_a_share_of_a_batch_gets_its_rows_of_the_whole_batch_draw():
    """The draws are made for the global batch and sliced: rows [2:5] of a batch of 7, drawn alone, are rows 2..4 of
    the draw for all 7, in both modes (tests/test_distributed.py checks it with 2 real ranks)."""
    labels = torch.arange(30) % 3
    anchors = torch.tensor([0, 1, 2, 2, 0, 1, 1])
    for k in (5, 25):  # without and with replacement
        pool = negative_pool(labels, k)
        whole = sample_negatives(pool, anchors, generator(3))
        assert torch.equal(sample_negatives(pool, anchors[2:5], generator(3), 7, slice(2, 5)), whole[2:5])


def test_sampling_reads_nothing_back_to_the_host():
    """Both modes in one batch: no sync (no .item(), no boolean mask, no multinomial), and the global RNG untouched."""
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 3)
    pool = negative_pool(labels, 15)
    state = torch.get_rng_state()
    with SyncCounter() as syncs:
        sample_negatives(pool, torch.tensor([0, 1, 2, 2, 0]), generator(0))
    assert dict(syncs.found) == {} and torch.equal(torch.get_rng_state(), state)


def test_step_generator_is_keyed_by_seed_epoch_step_and_stream():
    def draw(stream: str = "crd", **key) -> torch.Tensor:
        step = Step(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), **{"seed": 1, "epoch": 2, "step": 3, **key})
        return torch.rand(4, generator=step_generator(step, stream, torch.device("cpu")))

    base = draw()
    assert torch.equal(draw(), base)
    for other in (draw(seed=2), draw(epoch=3), draw(step=4), draw("another")):
        assert not torch.equal(other, base)


def test_momentum_update_mixes_and_renormalises_only_the_batch_rows():
    memory = torch.nn.functional.normalize(randn(6, 3, seed=1), dim=1)
    values = torch.nn.functional.normalize(randn(2, 3, seed=2), dim=1)
    index = torch.tensor([4, 1])
    updated = momentum_update(memory, index, values, momentum=0.5)
    for row, value in zip(index.tolist(), values):
        mixed = 0.5 * memory[row] + 0.5 * value
        assert_close(updated[row], mixed / mixed.norm())
    for row in (0, 2, 3, 5):
        assert torch.equal(updated[row], memory[row])
    assert not torch.equal(updated, memory)  # a new tensor; the input is left as it was


def bound_crd(k: int = 5) -> CRDLoss:
    criterion = CRDLoss(weight=0.8, feat_dim=6, num_negatives=k)
    bind(criterion)
    return criterion.double()


def crd_step(student_dim: int, teacher_dim: int, index: torch.Tensor, seed: int = 0, step: int = 0) -> Step:
    b = len(index)
    features_s = {"fc:in": randn(b, student_dim, seed=seed)}
    features_t = {"fc:in": randn(b, teacher_dim, seed=seed + 1)}
    return Step(torch.zeros(b, 4, dtype=F64), LABELS[index], None, features_s, features_t, index=index, step=step)


def crd_negatives(step: Step, k: int = 5) -> torch.Tensor:
    """The negatives CRDLoss draws for this step: keyed by (seed, epoch, step), independent of the global RNG."""
    generator = step_generator(step, "crd", torch.device("cpu"))
    return sample_negatives(negative_pool(LABELS, k), LABELS[step.index], generator)


def ref_crd(criterion: CRDLoss, step: Step, negatives: torch.Tensor, fixed_z=None) -> tuple[float, list[float]]:
    """CRD from its definition, sample by sample: the weighted loss, and the two Z (this batch's, or fixed_z)."""
    n, temperature = len(LABELS), criterion.temperature

    def embed(linear, x):
        v = (linear.weight @ x + linear.bias).detach()
        return v / v.norm()

    sides = [
        (criterion.embed_student, step.student_features["fc:in"], criterion.memory_teacher),
        (criterion.embed_teacher, step.teacher_features["fc:in"], criterion.memory_student),
    ]
    total, normalizers = 0.0, []
    for side, (linear, features, memory) in enumerate(sides):
        scores = []
        for i, sample in enumerate(step.index.tolist()):
            v = embed(linear, features[i])
            candidates = [sample] + negatives[i].tolist()
            scores.append([math.exp(float(memory[j] @ v) / temperature) for j in candidates])
        z = sum(map(sum, scores)) / sum(map(len, scores)) * n if fixed_z is None else fixed_z[side]
        normalizers.append(z)
        total += ref_nce(torch.tensor(scores, dtype=F64) / z, n)
    return criterion.weight * total, normalizers


def test_crd_matches_its_definition_and_fixes_z_after_the_first_batch():
    criterion = bound_crd()
    index = torch.tensor([3, 8, 13, 22])
    step = crd_step(criterion.embed_student.in_features, criterion.embed_teacher.in_features, index)
    negatives = crd_negatives(step)
    expected, normalizers = ref_crd(criterion, step, negatives)  # before the call updates the memory
    terms = criterion(step)
    assert list(terms) == ["loss_crd"]
    assert terms["loss_crd"].item() == pytest.approx(expected, rel=1e-9)
    assert criterion.normalizers.tolist() == pytest.approx(normalizers, rel=1e-12)
    # The second batch is normalised by the first batch's Z.
    step = crd_step(criterion.embed_student.in_features, criterion.embed_teacher.in_features, index, seed=4, step=1)
    negatives = crd_negatives(step)
    expected_second, _ = ref_crd(criterion, step, negatives, fixed_z=normalizers)
    re_estimated, second_normalizers = ref_crd(criterion, step, negatives)
    value = criterion(step)["loss_crd"].item()
    assert criterion.normalizers.tolist() == pytest.approx(normalizers, rel=1e-12)
    assert value == pytest.approx(expected_second, rel=1e-9)
    assert second_normalizers != pytest.approx(normalizers) and value != pytest.approx(re_estimated)


def test_crd_updates_its_memory_banks_in_training_only():
    criterion = bound_crd()
    index = torch.tensor([1, 6])
    step = crd_step(criterion.embed_student.in_features, criterion.embed_teacher.in_features, index)
    before = criterion.memory_student.clone(), criterion.memory_teacher.clone()
    criterion(step)
    with torch.no_grad():
        anchors = [
            torch.nn.functional.normalize(criterion.embed_student(step.student_features["fc:in"]), dim=1),
            torch.nn.functional.normalize(criterion.embed_teacher(step.teacher_features["fc:in"]), dim=1),
        ]
    for memory, old, anchor in zip((criterion.memory_student, criterion.memory_teacher), before, anchors):
        mixed = 0.5 * old[index] + 0.5 * anchor
        assert_close(memory[index], mixed / mixed.norm(dim=1, keepdim=True))
        assert_close(memory[index].norm(dim=1), torch.ones(2, dtype=F64))
        untouched = torch.ones(len(LABELS), dtype=torch.bool)
        untouched[index] = False
        assert torch.equal(memory[untouched], old[untouched])
    criterion.eval()
    frozen = criterion.memory_student.clone()
    criterion(step)
    assert torch.equal(criterion.memory_student, frozen)


def test_crd_state_is_in_its_state_dict_and_restores():
    criterion = bound_crd()
    assert criterion.memory_student.shape == criterion.memory_teacher.shape == (len(LABELS), 6)
    index = torch.tensor([0, 9])
    step = crd_step(criterion.embed_student.in_features, criterion.embed_teacher.in_features, index)
    criterion(step)
    state = criterion.state_dict()
    buffers_and_embeddings = {"memory_student", "memory_teacher", "normalizers", "embed_student.weight"}
    assert buffers_and_embeddings <= state.keys()
    assert "train_labels" not in state  # the data's, passed to bind again on resume
    restored = bound_crd()
    restored.load_state_dict(state)
    torch.manual_seed(3)  # the global RNG plays no part: the step's key draws the negatives
    expected = criterion(step)["loss_crd"]
    torch.manual_seed(4)
    assert torch.equal(restored(step)["loss_crd"], expected)


def test_crd_leaves_the_global_rng_alone_and_draws_by_the_step_key():
    criterion = bound_crd()
    index = torch.tensor([2, 7, 11])
    step = crd_step(criterion.embed_student.in_features, criterion.embed_teacher.in_features, index)
    state = torch.get_rng_state()
    first = criterion.eval()(step)["loss_crd"]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(criterion(step)["loss_crd"], first)  # eval: the banks are as they were
    step.step = 1
    assert not torch.equal(criterion(step)["loss_crd"], first)  # another step, other negatives


def test_crd_checks_the_rows_against_the_global_batch():
    criterion = bound_crd()
    step = crd_step(criterion.embed_student.in_features, criterion.embed_teacher.in_features, torch.tensor([1, 2]))
    step.batch_size = 3  # one process holds the whole batch: 3 rows, not 2
    with pytest.raises(ValueError, match="share of a batch of 3"):
        criterion(step)
    step.batch_size = 2
    assert torch.isfinite(criterion(step)["loss_crd"])


def test_crd_needs_the_sample_index():
    criterion = bound_crd()
    step = crd_step(criterion.embed_student.in_features, criterion.embed_teacher.in_features, torch.tensor([0]))
    step.index = None
    with pytest.raises(ValueError, match="step.index"):
        criterion(step)


# ---------------------------------------------------------------------------------------------------------------
# the conf/loss presets

PRESETS = {
    "fitnet": ("FitNetLoss", 100.0),
    "at": ("ATLoss", 1000.0),
    "sp": ("SPLoss", 3000.0),
    "pkt": ("PKTLoss", 30000.0),
    "rkd": ("RKDLoss", 1.0),
    "crd": ("CRDLoss", 0.8),
    "vid": ("VIDLoss", 1.0),
    "nst": ("NSTLoss", 50.0),
    "cc": ("CCLoss", 0.02),
}


def preset(name: str):
    node = OmegaConf.load(CONF / "loss" / f"{name}.yaml")
    if "crd" in node:
        assert node.crd.num_negatives == 16384 and node.crd.feat_dim == 128
        assert node.crd.temperature == 0.07 and node.crd.momentum == 0.5
        node.crd.num_negatives = 4  # 24 training samples here
    return instantiate(node)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_is_ce_plus_the_method_with_repdistillers_beta(name):
    cls_name, beta = PRESETS[name]
    criterion = preset(name)
    assert sorted(criterion.terms) == sorted(["ce", name])
    assert criterion.terms["ce"].weight == 1.0 and criterion.terms["ce"].label_smoothing == 0.0
    method = criterion.terms[name]
    assert type(method).__name__ == cls_name and method.weight == beta
    assert method.student_layers is None and method.teacher_layers is None
    student, teacher = bind(criterion)
    step, terms = forward_step(criterion, student, teacher)
    assert sorted(terms) == sorted(["loss_ce", f"loss_{name}"])
    total = sum(terms.values())
    assert torch.isfinite(total)
    total.backward()
    assert student.conv1.weight.grad.abs().sum() > 0


def test_rkd_preset_weights():
    method = preset("rkd").terms["rkd"]
    assert (method.distance_weight, method.angle_weight) == (25.0, 50.0)


def test_vid_and_cc_preset_settings():
    vid = preset("vid").terms["vid"]
    assert (vid.init_variance, vid.eps) == (5.0, 1e-5)  # distiller_zoo/VID.py init_pred_var, eps
    assert preset("cc").terms["cc"].feat_dim == 128  # train_student.py --feat_dim


def test_crd_kd_preset_is_repdistillers_crd_plus_kd():
    criterion = preset("crd_kd")
    ce, kd, crd = criterion.terms["ce"], criterion.terms["kd"], criterion.terms["crd"]
    assert (ce.weight, kd.weight, kd.temperature, crd.weight) == (1.0, 1.0, 4.0, 0.8)  # -r 1 -a 1 -b 0.8, kd_T 4
    student, teacher = bind(criterion)
    _, terms = forward_step(criterion, student, teacher)
    assert sorted(terms) == ["loss_ce", "loss_crd", "loss_kd"]
    assert torch.isfinite(sum(terms.values()))
