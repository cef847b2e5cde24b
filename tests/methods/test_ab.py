"""AB (kd/methods/ab.py) against the paper's loss written with loops, RepDistiller's layer weights and scale, the
connectors, its layers (before the final ReLU) and where its gradients go: only its init stage distils."""
import pytest
import torch
from torch import nn

from kd.methods.ab import ABLoss, ab_loss, boundary_loss, connector
from kd.methods.base import Step
from kd.methods.hooks import capture
from support.criteria import LABELS, bind, compose_loss, configured, forward_step, probe_images, randn, tiny_models

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_boundary(student: torch.Tensor, teacher: torch.Tensor, margin: float) -> float:
    """Heo et al. AAAI 2019, Eq. (alternative loss): sum over neurons of rho(t) relu(m - s)^2 + (1 - rho(t))
    relu(m + s)^2, rho(t) = 1 when the teacher's neuron is active (t > 0); one neuron at a time."""
    total = 0.0
    for s, t in zip(student.flatten().tolist(), teacher.flatten().tolist()):
        total += max(margin - s, 0.0) ** 2 if t > 0 else max(margin + s, 0.0) ** 2
    return total


@pytest.mark.parametrize("margin", [1.0, 0.5, 2.0])
def test_boundary_loss_is_the_papers_loss(margin):
    student, teacher = randn(3, 4, 5, 5, seed=1) * 2, randn(3, 4, 5, 5, seed=2)
    teacher[0, 0] = 0.0  # t = 0: inactive, like t < 0
    assert boundary_loss(student, teacher, margin).item() == pytest.approx(
        reference_boundary(student, teacher, margin), rel=1e-12)


def test_ab_loss_weighs_the_layers_as_repdistiller():
    """sum_i 2^(i - n + 1) * loss_i / batch * 3 / 1000: the deepest layer 1, the one before 1/2, then 1/4."""
    students = [randn(2, 3, 8, 8, seed=1), randn(2, 4, 4, 4, seed=2), randn(2, 5, 2, 2, seed=3)]
    teachers = [randn(2, 3, 8, 8, seed=4), randn(2, 4, 4, 4, seed=5), randn(2, 5, 2, 2, seed=6)]
    expected = sum(w * reference_boundary(s, t, 1.0) / 2 * 3 / 1000
                   for w, s, t in zip((0.25, 0.5, 1.0), students, teachers))
    assert ab_loss(students, teachers).item() == pytest.approx(expected, rel=1e-12)


def test_connector_is_the_identity_or_a_conv_with_batchnorm_and_no_relu():
    assert isinstance(connector((2, 4, 8, 8), (2, 4, 8, 8)), nn.Identity)
    for student, teacher in [((2, 4, 8, 8), (2, 6, 8, 8)), ((2, 4, 8, 8), (2, 4, 4, 4))]:
        module = connector(student, teacher)
        assert [type(m) for m in module] == [nn.Conv2d, nn.BatchNorm2d]  # pre-activation targets: no ReLU
        assert module(torch.randn(student)).shape == teacher


def test_ab_reads_the_stages_before_their_relu_and_distils_in_its_init_stage_only():
    criterion = configured(ABLoss)
    student, teacher = bind(criterion)
    preact = ["layer1.0.bn2+layer1.0:in", "layer2.0.bn2+layer2.0.downsample", "layer3.0.bn2+layer3.0.downsample"]
    stage = criterion.init_stage()
    assert stage.layers == (preact, preact) and stage.trains_student and stage.modules == [criterion.connectors]
    assert (stage.epochs, stage.lr) == (30, None)
    # The training step reads nothing and adds nothing: after the init stage the run is CE alone.
    assert criterion.layers() == ([], []) and not criterion.needs_teacher
    combined = compose_loss("loss=ab")
    bind(combined, student, teacher)
    _, terms = forward_step(combined, student, teacher)
    assert list(terms) == ["loss_ce"]


def init_step(criterion: ABLoss, student: nn.Module, teacher: nn.Module) -> tuple[Step, dict]:
    """One init-stage step as kd.stages runs it: the stage's layers hooked, the teacher under inference_mode."""
    student_layers, teacher_layers = criterion.init_stage().layers
    images = probe_images()
    with capture(student, student_layers) as captured:
        logits = student(images)
    with torch.inference_mode(), capture(teacher, teacher_layers) as features:
        teacher(images)
    step = Step(logits, LABELS[:4], None, dict(captured), {k: v.clone() for k, v in features.items()})
    return step, criterion.init_stage().loss(step)


def test_init_term_is_the_weighted_loss_of_the_connected_features_and_trains_student_and_connectors():
    criterion = configured(ABLoss, weight=2.0, margin=0.5)
    student, teacher = bind(criterion)
    step, terms = init_step(criterion, student, teacher)
    names = criterion.init_stage().layers[0]
    # The sums the hooks hold are the blocks' values before their ReLU: the bn2 output plus the shortcut.
    sums = [step.student_features[n.split("+")[0]] + step.student_features[n.split("+")[1]] for n in names]
    assert all(torch.equal(step.student_features[n], s) for n, s in zip(names, sums))
    connected = [c(step.student_features[n]) for c, n in zip(criterion.connectors, names)]
    expected = sum(w * reference_boundary(s, step.teacher_features[n], 0.5) / 4 * 3 / 1000
                   for w, s, n in zip((0.25, 0.5, 1.0), connected, names))
    assert terms["loss_ab"].item() == pytest.approx(2.0 * expected, rel=1e-5)
    terms["loss_ab"].backward()
    assert all(p.grad is not None for p in student.layer1.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in criterion.connectors.parameters())
    assert all(p.grad is None for p in teacher.parameters()) and student.fc.weight.grad is None


def test_ab_refuses_settings_it_cannot_train():
    with pytest.raises(ValueError, match=r"AB: init_epochs=0 must be >= 1 \(it distils in that stage alone\)"):
        configured(ABLoss, init_epochs=0)
    with pytest.raises(ValueError, match=r"AB: init_lr=0.0 must be > 0, or null for the optimizer's lr"):
        configured(ABLoss, init_lr=0.0)
    with pytest.raises(ValueError, match=r"AB: margin=0.0 must be > 0"):
        configured(ABLoss, margin=0.0)
    student, teacher = tiny_models()
    with pytest.raises(ValueError, match=r"AB compares spatial maps"):
        pooled = configured(ABLoss, student_layers=["fc:in"], teacher_layers=["fc:in"])
        pooled.bind(student, teacher, probe_images(), LABELS)
