"""ReviewKD: HCL and the ABF review path against element-by-element computations written from the paper, the ABF
sizes derived from the bound models against mdistiller's / the paper code's tables, the teacher's pre-ReLU
features, warm-up, gradients, and the conf/loss preset."""

import pytest
import torch
from torch import nn

from kd.methods.base import Step
from kd.methods.hooks import capture, default_layers
from kd.methods.reviewkd import ABF, ReviewKDLoss, hierarchical_context_loss, review, review_layout, teacher_levels
from kd.models.cifar_resnet import resnet8, resnet8x4, resnet20, resnet32x4, resnet56
from kd.models.vgg import vgg8, vgg13
from kd.models.wrn import wrn_16_2, wrn_40_2
from support.criteria import compose_loss, configured

F64 = torch.float64
LABELS = torch.arange(24) % 4

pytestmark = pytest.mark.usefixtures("one_thread")


def randn(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------------------------------------------------------
# independent computations, element by element


def ref_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum((float(x) - float(y)) ** 2 for x, y in zip(a.flatten(), b.flatten())) / a.numel()


def ref_pool(f: torch.Tensor, size: int) -> torch.Tensor:
    """Adaptive average pooling: cell i covers rows floor(i H / size) .. ceil((i + 1) H / size) - 1."""
    n, c, h, w = f.shape
    out = torch.zeros(n, c, size, size, dtype=f.dtype)
    for i in range(size):
        for j in range(size):
            rows = range(i * h // size, -(-(i + 1) * h // size))
            cols = range(j * w // size, -(-(j + 1) * w // size))
            cells = [f[:, :, y, x] for y in rows for x in cols]
            out[:, :, i, j] = sum(cells) / len(cells)
    return out


def ref_hcl(fs: torch.Tensor, ft: torch.Tensor) -> float:
    """Chen et al.: the full-map MSE with weight 1, then each pyramid level smaller than the map (4, 2, 1) with
    weights 1/2, 1/4, 1/8 in turn; divided by the sum of the weights used."""
    terms, weights = [ref_mse(fs, ft)], [1.0]
    for size in (4, 2, 1):
        if size < fs.shape[2]:
            weights.append(weights[-1] / 2)
            terms.append(ref_mse(ref_pool(fs, size), ref_pool(ft, size)))
    return sum(w * t for w, t in zip(weights, terms)) / sum(weights)


def ref_conv(f: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """A k x k convolution, stride 1, zero padding k // 2, by explicit sums."""
    n, c_in, h, w = f.shape
    c_out, _, k, _ = weight.shape
    pad = k // 2
    out = torch.zeros(n, c_out, h, w, dtype=f.dtype)
    for y in range(h):
        for x in range(w):
            for dy in range(k):
                for dx in range(k):
                    yy, xx = y + dy - pad, x + dx - pad
                    if 0 <= yy < h and 0 <= xx < w:
                        out[:, :, y, x] += f[:, :, yy, xx] @ weight[:, :, dy, dx].T
    return out if bias is None else out + bias[None, :, None, None]


def ref_batchnorm(f: torch.Tensor, norm: nn.BatchNorm2d) -> torch.Tensor:
    """Training-mode BatchNorm: per channel, the batch's mean and biased variance over N, H, W."""
    out = torch.empty_like(f)
    for k in range(f.shape[1]):
        values = f[:, k]
        mean = values.mean()
        variance = ((values - mean) ** 2).mean()
        out[:, k] = (values - mean) / torch.sqrt(variance + norm.eps) * norm.weight[k] + norm.bias[k]
    return out


def ref_nearest(f: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize: output row y reads input row floor(y H_in / H_out)."""
    h, w = f.shape[2:]
    rows = [y * h // size[0] for y in range(size[0])]
    cols = [x * w // size[1] for x in range(size[1])]
    return f[:, :, rows][:, :, :, cols]


def ref_abf(abf: ABF, x: torch.Tensor, residual, out_size) -> tuple[torch.Tensor, torch.Tensor]:
    """Chen et al.'s ABF: reduce (1x1 conv + BN); with a residual, attention weights a = sigmoid(W [x; r] + b) per
    position and x a_0 + r a_1; resized to the teacher's map; projected (3x3 conv + BN)."""
    x = ref_batchnorm(ref_conv(x, abf.reduce[0].weight), abf.reduce[1])
    if residual is not None:
        residual = ref_nearest(residual, tuple(x.shape[2:]))
        conv = abf.attention[0]
        logits = ref_conv(torch.cat([x, residual], dim=1), conv.weight, conv.bias)
        a = 1 / (1 + torch.exp(-logits))
        x = x * a[:, 0:1] + residual * a[:, 1:2]
    if tuple(x.shape[2:]) != tuple(out_size):
        x = ref_nearest(x, tuple(out_size))
    return ref_batchnorm(ref_conv(x, abf.project[0].weight), abf.project[1]), x


# ---------------------------------------------------------------------------------------------------------------
# the tensor functions against them


@pytest.mark.parametrize("size", [8, 6, 4, 2, 1])
def test_hcl_matches_the_pyramid_formula(size):
    fs, ft = randn(2, 3, size, size, seed=1), randn(2, 3, size, size, seed=2)
    assert hierarchical_context_loss(fs, ft, (4, 2, 1)).item() == pytest.approx(ref_hcl(fs, ft), rel=1e-12)


def test_hcl_never_calls_adaptive_pooling_where_sizes_divide(monkeypatch):
    """adaptive_avg_pool2d's CUDA backward refuses deterministic=true: HCL's usual levels (4, 2, 1 of 32/16/8-px
    maps) pool with avg_pool2d (and mean for 1x1), and loss and gradients keep the bits adaptive pooling gave."""
    maps = [torch.randn(4, 8, size, size, generator=torch.Generator().manual_seed(size)) for size in (32, 16, 8)]
    expected = []
    for fs in maps:  # the reference: the same formula with adaptive pooling
        fs = fs.clone().requires_grad_()
        loss, total, weight = torch.nn.functional.mse_loss(fs, fs.detach().flip(0)), 1.0, 1.0
        for size in (4, 2, 1):
            weight /= 2.0
            pooled = [torch.nn.functional.adaptive_avg_pool2d(f, size) for f in (fs, fs.detach().flip(0))]
            loss, total = loss + weight * torch.nn.functional.mse_loss(*pooled), total + weight
        (loss / total).backward()
        expected.append((loss / total, fs.grad))

    def refused(*args, **kwargs):
        raise RuntimeError("adaptive_avg_pool2d_backward_cuda does not have a deterministic implementation")

    monkeypatch.setattr(torch.nn.functional, "adaptive_avg_pool2d", refused)
    for fs, (loss, grad) in zip(maps, expected):
        fs = fs.clone().requires_grad_()
        got = hierarchical_context_loss(fs, fs.detach().flip(0), (4, 2, 1))
        got.backward()
        assert torch.equal(got, loss) and torch.equal(fs.grad, grad)


def test_hcl_is_zero_on_equal_maps():
    f = randn(2, 3, 8, 8, seed=3)
    assert hierarchical_context_loss(f, f.clone(), (4, 2, 1)).item() == 0.0


def test_review_path_matches_the_abf_definition():
    # Three levels, shallow to deep: a 4x4 map whose teacher map is 8x8 (resized), a 2x2 map, the pooled vector.
    torch.manual_seed(0)
    student = [randn(3, 2, 4, 4, seed=1), randn(3, 3, 2, 2, seed=2), randn(3, 3, 1, 1, seed=3)]
    out_sizes = [(8, 8), (2, 2), (1, 1)]
    abfs = nn.ModuleList([ABF(2, 3, 2, fuse=True), ABF(3, 3, 4, fuse=True), ABF(3, 3, 5, fuse=False)]).double()
    outputs = review(student, abfs, out_sizes)
    residual, expected = None, []
    for feature, abf, size in zip(student[::-1], list(abfs)[::-1], out_sizes[::-1]):
        output, residual = ref_abf(abf, feature, residual, size)
        expected.insert(0, output)
    assert [tuple(o.shape) for o in outputs] == [(3, 2, 8, 8), (3, 4, 2, 2), (3, 5, 1, 1)]
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_review_layout_reads_channels_sizes_and_the_mid_width():
    layout = review_layout([(2, 4, 8, 8), (2, 8, 4, 4), (2, 16)], [(2, 6, 8, 8), (2, 12, 2, 2), (2, 24)], 10)
    assert layout == {
        "in_channels": [4, 8, 16], "out_channels": [6, 12, 24], "mid_channels": 10,
        "shapes": [(8, 8), (4, 4), (1, 1)], "out_shapes": [(8, 8), (2, 2), (1, 1)],
    }
    with pytest.raises(ValueError, match="pairs levels in order"):
        review_layout([(2, 4, 8, 8)], [], 512)


# ---------------------------------------------------------------------------------------------------------------
# the ABF sizes of the CRD pairs, derived from the models, against the reference tables

# Deepest level first, as the tables list them. resnet32x4 -> resnet8x4: megvii-research/mdistiller,
# mdistiller/engine/cfg.py (REVIEWKD.IN_CHANNELS, OUT_CHANNELS, SHAPES, OUT_SHAPES; configs/cifar100/reviewkd.yaml
# keeps them). The others: the paper's code, dvlab-research/ReviewKD CIFAR-100/model/reviewkd.py build_review_kd
# (its 'resnet', 'wrn' (r = 2) and 'vgg' branches; out_shapes = shapes there; shapes beyond the student's levels
# are unused). Mid width: min(512, IN_CHANNELS[-1]) in both ReviewKD.py files.
TABLES = {
    "resnet32x4 -> resnet8x4": (resnet32x4, resnet8x4, [256, 256, 128, 64], [256, 256, 128, 64], [1, 8, 16, 32],
                                [1, 8, 16, 32]),
    "resnet56 -> resnet20": (resnet56, resnet20, [64, 64, 32, 16], [64, 64, 32, 16], [1, 8, 16, 32],
                             [1, 8, 16, 32]),
    "wrn_40_2 -> wrn_16_2": (wrn_40_2, wrn_16_2, [128, 128, 64, 32], [128, 128, 64, 32], [1, 8, 16, 32],
                             [1, 8, 16, 32]),
    "vgg13 -> vgg8": (vgg13, vgg8, [512, 512, 512, 256, 128], [512, 512, 512, 256, 128], [1, 4, 4, 8, 16],
                      [1, 4, 4, 8, 16]),
}


@pytest.mark.parametrize("pair", list(TABLES))
def test_derived_abf_sizes_match_the_reference_tables(pair):
    make_teacher, make_student, in_channels, out_channels, shapes, out_shapes = TABLES[pair]
    torch.manual_seed(0)
    student, teacher = make_student(num_classes=100), make_teacher(num_classes=100).eval()
    criterion = configured(ReviewKDLoss)
    criterion.bind(student, teacher, torch.randn(1, 3, 32, 32), LABELS)
    abfs = list(criterion.abfs)[::-1]  # deepest first
    assert [abf.reduce[0].in_channels for abf in abfs] == in_channels
    assert [abf.project[0].out_channels for abf in abfs] == out_channels
    assert {abf.reduce[0].out_channels for abf in abfs} == {min(512, in_channels[0])}
    assert [abf.attention is not None for abf in abfs] == [False] + [True] * (len(abfs) - 1)
    assert [size for size, _ in criterion.out_sizes[::-1]] == out_shapes
    student_layers, _ = criterion.layers()
    with torch.no_grad(), capture(student, student_layers) as features:
        student.eval()(torch.randn(1, 3, 32, 32))
    student_sizes = [features[n].shape[2] if features[n].dim() == 4 else 1 for n in student_layers]
    assert student_sizes[::-1] == shapes


# ---------------------------------------------------------------------------------------------------------------
# the teacher's features before their final ReLU


@pytest.mark.parametrize("make", [resnet8, resnet20, vgg8], ids=["resnet8", "resnet20", "vgg8"])
def test_teacher_preact_layers_are_the_stage_outputs_before_their_relu(make):
    torch.manual_seed(0)
    model = make(num_classes=4, width=0.25).eval()
    stages = list(type(model).feature_layers["stages"])
    preact = default_layers(model)["preact"]
    parts = [name.split("+") for name in preact]
    with torch.no_grad(), capture(model, stages + [p for group in parts for p in group]) as features:
        model(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    for stage, group in zip(stages, parts):
        value = sum(features[p] for p in group)
        assert (value < 0).any(), stage  # really before the ReLU
        torch.testing.assert_close(torch.relu(value), features[stage], msg=stage)


def test_teacher_levels_are_the_declared_preact_layers_else_the_stages():
    assert teacher_levels(resnet8(4)) == [
        "layer1.0.bn2+layer1.0:in",  # identity shortcut
        "layer2.0.bn2+layer2.0.downsample", "layer3.0.bn2+layer3.0.downsample", "fc:in",
    ]
    assert teacher_levels(resnet20(4))[2] == "layer3.2.bn2+layer3.2:in"
    assert teacher_levels(resnet8x4(4))[0] == "layer1.0.bn2+layer1.0.downsample"  # 32 -> 64 channels: a projection
    assert teacher_levels(vgg8(4)) == ["block1", "block2", "block3", "block4", "classifier:in"]
    # BN + in-place ReLU: no exact capture, so WRN declares no "preact" and its stage outputs are used.
    assert teacher_levels(wrn_16_2(4)) == ["block1", "block2", "block3", "fc:in"]
    model = resnet8(4)
    model.feature_layers = {**model.feature_layers, "preact": ("layer1.0.bn2",)}
    with pytest.raises(ValueError, match=r"CifarResNet.feature_layers declares 1 'preact' layers for 3 stages: list "
                                         r"one per stage.*loss.reviewkd.teacher_layers"):
        teacher_levels(model)


# ---------------------------------------------------------------------------------------------------------------
# the criterion bound to tiny models


def tiny_models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return resnet8(num_classes=4, width=0.25).train(), resnet8(num_classes=4, width=0.5).eval()


def bound(**kwargs) -> tuple[ReviewKDLoss, nn.Module, nn.Module]:
    criterion = configured(ReviewKDLoss, **kwargs)
    student, teacher = tiny_models()
    criterion.bind(student, teacher, torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9)), LABELS)
    return criterion, student, teacher


def forward_step(criterion, student, teacher, epoch=20, batch=4) -> tuple[Step, dict]:
    images = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    student_layers, teacher_layers = criterion.layers()
    with capture(student, student_layers) as captured:
        logits = student(images)
    student_features = dict(captured)
    with torch.inference_mode(), capture(teacher, teacher_layers) as captured:
        teacher_logits = teacher(images)
    teacher_features = {name: value.clone() for name, value in captured.items()}
    step = Step(logits, LABELS[:batch], teacher_logits.clone(), student_features, teacher_features, epoch=epoch)
    return step, criterion(step)


def test_criterion_is_the_weighted_hcl_of_the_review_path():
    criterion, student, teacher = bound(weight=3.0)
    assert criterion.layers() == (
        ["layer1", "layer2", "layer3", "fc:in"],
        ["layer1.0.bn2", "layer1.0:in", "layer2.0.bn2", "layer2.0.downsample", "layer3.0.bn2",
         "layer3.0.downsample", "fc:in"],
    )
    step, terms = forward_step(criterion, student, teacher)
    assert list(terms) == ["loss_reviewkd"]
    s, t = step.student_features, step.teacher_features
    students = [s["layer1"], s["layer2"], s["layer3"], s["fc:in"][:, :, None, None]]
    teachers = [t["layer1.0.bn2"] + t["layer1.0:in"], t["layer2.0.bn2"] + t["layer2.0.downsample"],
                t["layer3.0.bn2"] + t["layer3.0.downsample"], t["fc:in"][:, :, None, None]]
    outputs = review(students, criterion.abfs, criterion.out_sizes)
    expected = sum(hierarchical_context_loss(o, target, criterion.levels) for o, target in zip(outputs, teachers))
    torch.testing.assert_close(terms["loss_reviewkd"], 3.0 * expected)


def test_warmup_ramps_the_term_linearly_over_the_first_epochs():
    criterion, student, teacher = bound(warmup_epochs=20)
    assert [criterion.warmup_factor(e) for e in (1, 10, 20, 21)] == [0.05, 0.5, 1.0, 1.0]
    assert configured(ReviewKDLoss, warmup_epochs=0).warmup_factor(1) == 1.0
    torch.manual_seed(1)
    _, full = forward_step(criterion, student, teacher, epoch=20)
    torch.manual_seed(1)
    _, first = forward_step(criterion, student, teacher, epoch=1)
    torch.testing.assert_close(first["loss_reviewkd"], full["loss_reviewkd"] / 20)


def test_gradients_reach_the_student_and_the_abfs_but_never_the_teacher():
    criterion, student, teacher = bound()
    step, _ = forward_step(criterion, student, teacher)
    step.student_features = {k: v.detach().requires_grad_() for k, v in step.student_features.items()}
    step.teacher_features = {k: v.requires_grad_() for k, v in step.teacher_features.items()}
    term = criterion(step)["loss_reviewkd"]
    assert torch.isfinite(term)
    term.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in step.student_features.values())
    assert all(f.grad is None for f in step.teacher_features.values())
    for name, parameter in criterion.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_a_batch_of_one_gives_a_zero_term():
    criterion, student, teacher = bound()
    _, terms = forward_step(criterion, student, teacher, batch=1)
    assert terms["loss_reviewkd"].item() == 0.0


def test_layers_can_be_configured():
    criterion, _, _ = bound(teacher_preact=False)
    assert criterion.layers()[1] == ["layer1", "layer2", "layer3", "fc:in"]
    criterion, student, teacher = bound(student_layers=["layer2", "layer3"],
                                        teacher_layers=["layer2.0.bn2+layer2.0.downsample", "layer3"])
    assert criterion.layers() == (["layer2", "layer3"], ["layer2.0.bn2", "layer2.0.downsample", "layer3"])
    assert len(criterion.abfs) == 2 and criterion.abfs[0].attention is not None and criterion.abfs[1].attention is None
    _, terms = forward_step(criterion, student, teacher)
    assert torch.isfinite(terms["loss_reviewkd"])
    with pytest.raises(ValueError, match="pairs levels in order"):
        bound(student_layers=["layer3"])
    with pytest.raises(ValueError, match="differ in shape"):
        bound(teacher_layers=["layer1", "layer2", "layer3", "layer3+layer2"])
    with pytest.raises(ValueError, match="needs a teacher"):
        configured(ReviewKDLoss).bind(resnet8(4), None, torch.randn(2, 3, 8, 8), LABELS)


def test_preset_is_ce_plus_reviewkd_with_mdistillers_settings():
    criterion = compose_loss("loss=reviewkd")
    assert sorted(criterion.terms) == ["ce", "reviewkd"]
    ce, method = criterion.terms["ce"], criterion.terms["reviewkd"]
    assert (ce.weight, ce.label_smoothing) == (1.0, 0.0)  # mdistiller/engine/cfg.py REVIEWKD.CE_WEIGHT
    assert (method.weight, method.warmup_epochs, method.max_mid_channels) == (5.0, 20, 512)
    assert method.teacher_preact and method.levels == (4, 2, 1)
    assert method.student_layers is None and method.teacher_layers is None
    student, teacher = tiny_models()
    criterion.bind(student, teacher, torch.randn(2, 3, 8, 8), LABELS)
    _, terms = forward_step(criterion, student, teacher)
    assert sorted(terms) == ["loss_ce", "loss_reviewkd"]
    total = sum(terms.values())
    assert torch.isfinite(total)
    total.backward()
    assert student.conv1.weight.grad.abs().sum() > 0
