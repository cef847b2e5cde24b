"""FSP (kd/methods/fsp.py) against the paper's FSP matrix and loss written with loops, its layers (the stem, then
every stage), the refusal of unequal widths, and where its gradients go: only its init stage distils."""
import pytest
import torch
from torch.testing import assert_close

from kd.methods.base import Step
from kd.methods.fsp import FSPLoss, fsp_loss, fsp_matrix
from kd.methods.hooks import capture
from kd.models.cifar_resnet import resnet8
from kd.models.vgg import vgg8
from kd.models.wrn import wrn_16_1
from support.criteria import LABELS, compose_loss, configured, forward_step, probe_images, randn, ref_average_pool

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_fsp(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """Yim et al. CVPR 2017, Eq. (2): G_ij = sum_{s,t} F1_i(s, t) F2_j(s, t) / (h w), one entry at a time; F2 the
    upper (output) layer, so rows index its channels as RepDistiller's (b, C_upper, C_lower) matrix."""
    batch, c_low, h, w = lower.shape
    c_up = upper.shape[1]
    out = torch.zeros(batch, c_up, c_low, dtype=lower.dtype)
    for b in range(batch):
        for i in range(c_up):
            for j in range(c_low):
                out[b, i, j] = sum(float(upper[b, i, y, x] * lower[b, j, y, x]) for y in range(h) for x in range(w))
    return out / (h * w)


def test_fsp_matrix_is_the_papers_gram_matrix_across_two_layers():
    lower, upper = randn(2, 3, 4, 4, seed=1), randn(2, 5, 4, 4, seed=2)
    assert_close(fsp_matrix(lower, upper), reference_fsp(lower, upper), rtol=1e-12, atol=1e-12)


def test_the_larger_map_is_average_pooled_to_the_smaller_first():
    lower, upper = randn(2, 3, 8, 8, seed=1), randn(2, 5, 4, 4, seed=2)
    assert_close(fsp_matrix(lower, upper), reference_fsp(ref_average_pool(lower, 2), upper), rtol=1e-12, atol=1e-12)


def test_fsp_loss_sums_the_mean_squared_differences_of_consecutive_pairs():
    students = [randn(2, 3, 8, 8, seed=1), randn(2, 4, 8, 8, seed=2), randn(2, 6, 4, 4, seed=3)]
    teachers = [randn(2, 3, 8, 8, seed=4), randn(2, 4, 8, 8, seed=5), randn(2, 6, 4, 4, seed=6)]
    expected = 0.0
    for k in range(2):
        g_s, g_t = reference_fsp(*pair(students, k)), reference_fsp(*pair(teachers, k))
        expected += float(((g_s - g_t) ** 2).sum()) / g_s.numel()
    assert fsp_loss(students, teachers).item() == pytest.approx(expected, rel=1e-12)


def pair(features: list, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layers k and k + 1, detached, the larger one average-pooled to the other's size."""
    lower, upper = features[k].detach(), features[k + 1].detach()
    factor = lower.shape[2] // upper.shape[2]
    return (ref_average_pool(lower, factor) if factor > 1 else lower), upper


@pytest.mark.parametrize("make, stem", [(resnet8, "layer1:in"), (wrn_16_1, "block1:in"), (vgg8, "pool0:in")])
def test_fsp_reads_the_stem_and_every_stage_as_repdistiller(make, stem):
    """RepDistiller's feat[:-1]: the stem's output (conv-BN-ReLU for ResNets, the stem conv for WRN, block 0's
    ReLU'd output for VGG), then every stage output."""
    torch.manual_seed(0)
    student, teacher = make(num_classes=4, width=0.25).train(), make(num_classes=4, width=0.25).eval()
    criterion = configured(FSPLoss)
    criterion.bind(student, teacher, probe_images(32), LABELS)
    names = criterion.init_stage().layers[0]
    assert names[0] == stem and names[1:] == list(student.feature_layers["stages"])
    with torch.no_grad(), capture(student, [stem]) as features:
        student(probe_images(32))
    if make is resnet8:
        assert_close(features[stem], student.relu(student.bn1(student.conv1(probe_images(32)))))


def test_fsp_distils_in_its_init_stage_only_and_trains_the_student():
    torch.manual_seed(0)
    student, teacher = resnet8(num_classes=4, width=0.25).train(), resnet8(num_classes=4, width=0.25).eval()
    combined = compose_loss("loss=fsp")
    combined.bind(student, teacher, probe_images(), LABELS)
    _, terms = forward_step(combined, student, teacher)
    assert list(terms) == ["loss_ce"] and not combined.needs_teacher and combined.layers() == ([], [])
    stage = combined.init_stage()
    assert (stage.epochs, stage.lr, stage.trains_student, stage.modules) == (30, None, True, [])
    images = probe_images()
    with capture(student, stage.layers[0]) as captured:
        logits = student(images)
    with torch.inference_mode(), capture(teacher, stage.layers[1]) as features:
        teacher(images)
    teacher_features = {k: v.clone() for k, v in features.items()}
    step = Step(logits, LABELS[:4], None, dict(captured), teacher_features)
    loss = stage.loss(step)["loss_fsp"]
    students, teachers = ([features[n] for n in stage.layers[0]] for features in (captured, teacher_features))
    expected = sum(float(((reference_fsp(*pair(students, k)) - reference_fsp(*pair(teachers, k))) ** 2).mean())
                   for k in range(len(students) - 1))
    assert loss.item() == pytest.approx(expected, rel=1e-5)  # weight 1: RepDistiller sums the pairs unweighted
    loss.backward()
    assert all(p.grad is not None for p in student.layer1.parameters()) and student.fc.weight.grad is None
    assert all(p.grad is None for p in teacher.parameters())


def test_fsp_refuses_a_student_narrower_than_its_teacher():
    torch.manual_seed(0)
    student, teacher = resnet8(num_classes=4, width=0.25), resnet8(num_classes=4, width=0.5)
    with pytest.raises(ValueError, match=r"FSP .* teacher's channel counts in the student's: got student \[4, 4, "
                                         r"8, 16\], teacher \[8, 8, 16, 32\]\. Use a pair of equal widths"):
        configured(FSPLoss).bind(student, teacher, probe_images(), LABELS)
    with pytest.raises(ValueError, match=r"FSP: init_epochs=0 must be >= 1"):
        configured(FSPLoss, init_epochs=0)
