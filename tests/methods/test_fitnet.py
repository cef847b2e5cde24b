"""FitNet (kd/methods/fitnet.py): the hint loss, the regressor's shapes, configured layers and the weighted term."""
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from kd.methods.base import Step
from kd.methods.fitnet import FitNetLoss, hint_loss, hint_regressor
from support.criteria import LABELS, bind, configured, forward_step, randn, tiny_models

# Tiny tensors: one thread is faster, and keeps these tests quick when the CPU is shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_hint_loss_is_the_mean_squared_error():
    a, b = randn(2, 3, 4, 4, seed=1), randn(2, 3, 4, 4, seed=2)
    expected = sum((float(x) - float(y)) ** 2 for x, y in zip(a.flatten(), b.flatten())) / a.numel()
    assert hint_loss(a, b).item() == pytest.approx(expected, rel=1e-12)


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


def test_configured_layers_replace_the_defaults():
    criterion = configured(FitNetLoss, student_layers=["layer3"], teacher_layers=["layer2"])
    bind(criterion)
    assert criterion.layers() == (["layer3"], ["layer2"])
    assert isinstance(criterion.regressor[0], nn.ConvTranspose2d)  # 2x2 student hint up to the teacher's 4x4


def test_fitnet_term_is_the_weighted_mse_of_the_regressed_hint():
    criterion = FitNetLoss(weight=2.0)
    student, teacher = bind(criterion)
    step, terms = forward_step(criterion, student, teacher)
    regressed = criterion.regressor(step.student_features["layer2"])
    assert_close(terms["loss_fitnet"], 2.0 * hint_loss(regressed, step.teacher_features["layer2"]))


def test_fitnet_with_an_identity_regressor_is_zero_on_equal_features():
    criterion = configured(FitNetLoss, student_layers=["layer2"], teacher_layers=["layer2"])
    student, _ = tiny_models()
    bind(criterion, student, student)
    criterion.regressor = nn.Identity()
    features = {"layer2": randn(2, 4, 4, 4)}
    terms = criterion(Step(torch.zeros(2, 4), LABELS[:2], None, features, {"layer2": features["layer2"].clone()}))
    assert terms["loss_fitnet"].item() == 0.0
