"""What every criterion shares (kd/methods/base.py): CELoss, Combined, the weight checks, pooling to a common size,
and the contract of the feature criteria across methods: default layers, layer errors, bind, the weighted term,
zero on equal features, gradients to the student and the adapters but never the teacher, and the conf/loss presets
bound to real (tiny) models."""
import functools

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from kd.methods.ab import ABLoss
from kd.methods.at import ATLoss, attention_loss
from kd.methods.base import CELoss, Combined, Criterion, Step, average_pool_to
from kd.methods.cc import CCLoss, correlation_congruence_loss
from kd.methods.crd import CRDLoss
from kd.methods.dist import DISTLoss
from kd.methods.dkd import DKDLoss
from kd.methods.fitnet import FitNetLoss
from kd.methods.fsp import FSPLoss
from kd.methods.kd import KDLoss, kd_divergence
from kd.methods.nst import NSTLoss, nst_loss
from kd.methods.pkt import PKTLoss, pkt_loss
from kd.methods.rkd import RKDLoss, rkd_loss
from kd.methods.sp import SPLoss, similarity_loss
from kd.methods.vid import VIDLoss
from kd.models.cifar_resnet import resnet8
from support.criteria import (
    BATCH,
    LABELS,
    bind,
    configured,
    forward_step,
    frozen_teacher_logits,
    make_logits,
    preset,
    probe_images,
    randn,
    reference_ce,
    reference_kl,
    reference_softmax,
    tiny_models,
)

# Tiny tensors: one thread is faster, and keeps these tests quick when the CPU is shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_ce_loss_does_not_need_teacher():
    assert CELoss().needs_teacher is False


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


def test_combined_hands_on_the_init_stage_of_its_one_term_that_has_one():
    combined = Combined(ce=CELoss(), ab=configured(ABLoss, init_epochs=3))
    assert combined.init_epochs == 3 and Combined(ce=CELoss()).init_epochs == 0
    bind(combined)
    assert combined.init_stage().epochs == 3 and Combined(ce=CELoss()).init_stage() is None
    with pytest.raises(ValueError, match=r"loss terms \['ab', 'fsp'\] each declare an init stage, and a run trains "
                                         r"one: keep one of them \(or set the others' init_epochs=0\)"):
        Combined(ab=configured(ABLoss), fsp=configured(FSPLoss))


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
        configured(factory, **{key: value})
    assert any(fix in str(error.value) for fix in ("must be > 0", "must be >= 0", "use 0"))


@pytest.mark.parametrize("factory", [DKDLoss, DISTLoss])
def test_zero_weights_are_accepted(factory):
    weights = {"ce_weight": 0.0, "beta": 0.0}
    criterion = configured(factory, **weights)
    student, teacher, targets = make_logits(10, seed=80)
    assert all(torch.isfinite(value) for value in criterion(Step(student, targets, teacher)).values())


NEW_CRITERIA = {
    "dkd": lambda: configured(DKDLoss),
    "dkd_standardized": lambda: configured(DKDLoss, temperature=2.0, kd_weight=9.0, standardize=True),
    "dist": lambda: configured(DISTLoss),
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


@pytest.mark.parametrize("shape, size", [((2, 3, 8, 8), (4, 4)), ((2, 3, 32, 32), (8, 8)), ((1, 2, 8, 4), (2, 2)),
                                         ((2, 3, 6, 6), (4, 4)), ((2, 3, 8, 8), (1, 1))])
def test_average_pool_to_is_adaptive_pooling(shape, size):
    """Integer factors take avg_pool2d (a deterministic CUDA backward): the same values as adaptive pooling; the
    6 -> 4 case (overlapping bins) stays adaptive; a 1x1 output is the mean, as adaptive pooling computes it."""
    feature = randn(*shape, seed=3)
    assert_close(average_pool_to(feature, size), torch.nn.functional.adaptive_avg_pool2d(feature, size))
    assert_close(average_pool_to(feature.float(), size), torch.nn.functional.adaptive_avg_pool2d(feature.float(), size))


@pytest.mark.parametrize(
    "loss",
    [similarity_loss, pkt_loss, functools.partial(rkd_loss, distance_weight=25.0, angle_weight=50.0),
     correlation_congruence_loss],
    ids=["sp", "pkt", "rkd", "cc"],
)
def test_batch_losses_are_finite_on_a_batch_of_one(loss):
    student = randn(1, 5, seed=1).requires_grad_()
    value = loss(student, randn(1, 5 if loss is correlation_congruence_loss else 7, seed=2))
    assert value.item() == pytest.approx(0.0, abs=1e-12)
    value.backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize(
    "loss",
    [functools.partial(attention_loss, p=2.0), similarity_loss, pkt_loss,
     functools.partial(rkd_loss, distance_weight=25.0, angle_weight=50.0), nst_loss, correlation_congruence_loss],
    ids=["at", "sp", "pkt", "rkd", "nst", "cc"],
)
def test_zero_when_the_student_features_are_the_teachers(loss):
    f = randn(4, 3, 4, 4, seed=3)
    assert loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert loss(f, randn(4, 3, 4, 4, seed=4)).item() > 1e-4


def test_layers_default_to_repdistillers_features():
    stages = {"stages": ["s1", "s2", "s3", "s4"], "embedding": "e:in"}
    assert configured(FitNetLoss).pick(stages) == ["s2"]  # hint_layer=2 with the stem as feature 0
    assert configured(ATLoss).pick(stages) == ["s1", "s2", "s3", "s4"]
    assert configured(SPLoss).pick(stages) == ["s4"]
    for criterion in (configured(PKTLoss), configured(RKDLoss), configured(CRDLoss), configured(CCLoss)):
        assert criterion.pick(stages) == ["e:in"]
    for criterion in (configured(VIDLoss), configured(NSTLoss)):  # helper/loops.py feat[1:-1]
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
        criterion = configured(cls)
        bind(criterion, student, teacher)
        assert criterion.layers() == expected


def test_layer_errors_are_clear():
    with pytest.raises(RuntimeError, match="before bind"):
        configured(ATLoss).layers()
    with pytest.raises(ValueError, match="equally many layers"):
        bind(configured(ATLoss, student_layers=["layer1", "layer2"]))
    with pytest.raises(ValueError, match="one layer each"):
        bind(configured(PKTLoss, student_layers=["fc:in", "layer3"]))
    with pytest.raises(ValueError, match="no module 'layer7'"):
        bind(configured(SPLoss, teacher_layers=["layer7"]))
    with pytest.raises(ValueError, match="needs a teacher"):
        configured(SPLoss).bind(resnet8(4, 0.25), None, probe_images(), LABELS)
    for cls in (ATLoss, VIDLoss, NSTLoss):
        with pytest.raises(ValueError, match="spatial maps"):
            bind(configured(cls, student_layers=["fc:in"], teacher_layers=["fc:in"]))
    criterion = configured(SPLoss)
    bind(criterion)
    step = Step(torch.zeros(4, 4), LABELS[:4], torch.zeros(4, 4), {}, {})
    with pytest.raises(KeyError, match="capture criterion.layers"):
        criterion(step)


def test_bind_leaves_the_models_as_they_were():
    student, teacher = tiny_models()
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in (student, teacher)]
    bind(configured(CRDLoss, num_negatives=4), student, teacher)
    bind(configured(FitNetLoss), student, teacher)
    assert student.training and not teacher.training
    for model, state in zip((student, teacher), states):
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "criterion, function",
    [
        (ATLoss(weight=3.0, p=2.0), lambda s, t: sum(attention_loss(a, b, 2.0) for a, b in zip(s, t))),
        (SPLoss(weight=3.0), lambda s, t: similarity_loss(s[0], t[0])),
        (PKTLoss(weight=3.0), lambda s, t: pkt_loss(s[0], t[0])),
        (RKDLoss(weight=3.0, distance_weight=25.0, angle_weight=50.0), lambda s, t: rkd_loss(s[0], t[0], 25.0, 50.0)),
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


ALL = [*(functools.partial(configured, cls) for cls in (FitNetLoss, ATLoss, SPLoss, PKTLoss, RKDLoss)),
       lambda: configured(CRDLoss, num_negatives=6, feat_dim=8),
       *(functools.partial(configured, cls) for cls in (VIDLoss, NSTLoss, CCLoss))]


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
