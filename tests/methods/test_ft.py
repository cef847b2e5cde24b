"""FT (kd/methods/ft.py) against its factor loss written with loops, the paraphraser and translator as RepDistiller
builds them, the init stage's reconstruction loss, and where the gradients go in each stage."""
import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from kd.methods.base import Step
from kd.methods.ft import FTLoss, factor_loss, paraphraser, translator
from support.criteria import bind, compose_loss, configured, forward_step, randn, ref_average_pool

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_factor_loss(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """RepDistiller's FactorTransfer (p1 = 2, p2 = 1), one sample and position at a time: per sample, the factor map
    a(h, w) = mean_c F_c(h, w)^2 divided by its L2 norm over positions; then the mean of |a_s - a_t|."""
    def factor(feature: torch.Tensor, b: int) -> list[float]:
        values = [sum(float(feature[b, c, y, x]) ** 2 for c in range(feature.shape[1])) / feature.shape[1]
                  for y in range(feature.shape[2]) for x in range(feature.shape[3])]
        norm = math.sqrt(sum(v * v for v in values))
        return [v / norm for v in values]

    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for s, t in zip(factor(student, b), factor(teacher, b)):
            total, count = total + abs(s - t), count + 1
    return total / count


def test_factor_loss_is_the_l1_distance_of_the_normalised_factor_maps():
    student, teacher = randn(2, 3, 4, 4, seed=1), randn(2, 5, 4, 4, seed=2)
    assert factor_loss(student, teacher).item() == pytest.approx(reference_factor_loss(student, teacher), rel=1e-12)


def test_factor_loss_pools_the_larger_map_first():
    student, teacher = randn(2, 3, 8, 8, seed=1), randn(2, 5, 4, 4, seed=2)
    expected = reference_factor_loss(ref_average_pool(student, 2), teacher)
    assert factor_loss(student, teacher).item() == pytest.approx(expected, rel=1e-12)


def test_paraphraser_and_translator_are_repdistillers():
    """models/util.py: the paraphraser C -> C -> C/2 -> C/2 and back, no BN; the translator C_s -> C_s -> C_t/2 ->
    C_t/2 with BN; 3x3 stride-1 convolutions (transposed in the decoder) and LeakyReLU 0.1 after each."""
    encoder, decoder = paraphraser(8, 0.5)
    convs = lambda m, kind: [(c.in_channels, c.out_channels) for c in m if isinstance(c, kind)]  # noqa: E731
    assert convs(encoder, nn.Conv2d) == [(8, 8), (8, 4), (4, 4)]
    assert convs(decoder, nn.ConvTranspose2d) == [(4, 4), (4, 8), (8, 8)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in [*encoder, *decoder])
    relus = [m for m in [*encoder, *decoder] if isinstance(m, nn.LeakyReLU)]
    assert len(relus) == 6 and all(m.negative_slope == 0.1 for m in relus)
    translate = translator(6, 8, 0.5)
    assert convs(translate, nn.Conv2d) == [(6, 6), (6, 4), (4, 4)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in translate) == 3
    x = torch.randn(2, 8, 4, 4)
    assert decoder(encoder(x)).shape == x.shape and translate(torch.randn(2, 6, 4, 4)).shape == (2, 4, 4, 4)


def test_ft_term_is_the_weighted_factor_loss_and_never_trains_the_paraphraser():
    criterion = configured(FTLoss, weight=3.0)
    student, teacher = bind(criterion)
    step, terms = forward_step(criterion, student, teacher)
    assert criterion.layers() == (["layer3"], ["layer3"])  # the last stage output of both
    expected = reference_factor_loss(criterion.translator(step.student_features["layer3"]).detach(),
                                     criterion.encoder(step.teacher_features["layer3"]).detach())
    assert terms["loss_ft"].item() == pytest.approx(3.0 * expected, rel=1e-5)
    terms["loss_ft"].backward()
    assert all(p.grad is not None for p in student.layer3.parameters())
    assert all(p.grad is not None for p in criterion.translator.parameters())
    frozen = [*criterion.encoder.parameters(), *criterion.decoder.parameters(), *teacher.parameters()]
    assert all(p.grad is None for p in frozen)


def test_init_stage_trains_the_paraphraser_alone_on_its_reconstruction_error():
    criterion = configured(FTLoss)
    student, teacher = bind(criterion)
    stage = criterion.init_stage()
    assert (stage.epochs, stage.lr, stage.trains_student) == (30, 0.01, False)
    assert stage.layers == ([], ["layer3"]) and stage.modules == [criterion.encoder, criterion.decoder]
    feature = randn(4, 32, 2, 2, seed=3).float()  # the teacher's layer3: 32 channels
    terms = stage.loss(Step(None, torch.zeros(4, dtype=torch.long), None, {}, {"layer3": feature}))
    reconstructed = criterion.decoder(criterion.encoder(feature))
    assert_close(terms["loss_ft_reconstruction"], ((reconstructed - feature) ** 2).mean())
    terms["loss_ft_reconstruction"].backward()
    assert all(p.grad is not None for p in [*criterion.encoder.parameters(), *criterion.decoder.parameters()])
    assert all(p.grad is None for p in [*criterion.translator.parameters(), *student.parameters()])


def test_ft_preset_and_its_settings():
    combined = compose_loss("loss=ft")
    ft = combined.terms["ft"]
    assert (ft.weight, ft.rate, ft.init_epochs, ft.init_lr) == (200.0, 0.5, 30, 0.01) and combined.needs_teacher
    assert configured(FTLoss, init_epochs=0).init_stage() is None  # no init stage: the paraphraser stays as initialised
    with pytest.raises(ValueError, match=r"FT: rate=0.0 must be in \(0, 1\]"):
        configured(FTLoss, rate=0.0)
    with pytest.raises(ValueError, match=r"FT: init_epochs=-1 must be >= 0"):
        configured(FTLoss, init_epochs=-1)
