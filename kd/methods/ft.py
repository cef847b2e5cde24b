"""Kim et al. NeurIPS 2018 (FT, "Paraphrasing Complex Network: Network Compression via Factor Transfer"): a
paraphraser, an autoencoder pre-trained on the teacher's last stage, gives the teacher's factors; a translator maps
the student's last stage to factors that learn to match them.

As RepDistiller runs it for the CRD paper's FT row: an init stage (kd.stages) trains the paraphraser alone on its
reconstruction loss; then the student and the translator train with CE + weight * the factor loss, the paraphraser
frozen. conf/loss/ft.yaml.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.methods.base import (
    FeatureCriterion,
    InitStage,
    Step,
    autocast_off,
    check_init_stage,
    check_spatial,
    full_precision,
    pool_to_common_size,
)


def factor(feature: Tensor) -> Tensor:
    """A factor map as RepDistiller compares it: mean over channels of F^2 at each position, L2-normalised per
    sample, shape (b, H W)."""
    return F.normalize(feature.pow(2).mean(1).flatten(1), dim=1)


def factor_loss(student_factor: Tensor, teacher_factor: Tensor) -> Tensor:
    """Kim et al. NeurIPS 2018 (FT, p = 1) as RepDistiller's distiller_zoo/FT.py computes it: mean over samples and
    positions of |factor(F_s) - factor(F_t)|, the larger map average-pooled to the smaller one's size first.

    The paper normalises the whole factor vector (all channels and positions); RepDistiller, whose code made the CRD
    paper's FT row, first averages the squared factors over channels (p1 = 2, p2 = 1 there).
    """
    student_factor, teacher_factor = pool_to_common_size(student_factor, teacher_factor)
    return (factor(student_factor) - factor(teacher_factor)).abs().mean()


def _convs(channels: Sequence[int], transposed: bool, batch_norm: bool) -> nn.Sequential:
    """3x3 stride-1 convolutions (transposed ones for a decoder) between the given widths, each followed by
    BatchNorm (if batch_norm) and LeakyReLU(0.1), as RepDistiller's models/util.py Paraphraser and Translator."""
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels, channels[1:]):
        layers += [conv(c_in, c_out, 3, 1, 1), *([nn.BatchNorm2d(c_out)] if batch_norm else [])]
        layers.append(nn.LeakyReLU(0.1, inplace=True))
    return nn.Sequential(*layers)


def paraphraser(teacher_channels: int, rate: float) -> tuple[nn.Sequential, nn.Sequential]:
    """FT's paraphraser as (encoder, decoder): C -> C -> k C -> k C and back, k = rate, no BatchNorm (RepDistiller:
    Paraphraser(t_shape), k 0.5, use_bn False). The encoder's output is the teacher's factor."""
    factors = int(teacher_channels * rate)
    encoder = _convs([teacher_channels, teacher_channels, factors, factors], transposed=False, batch_norm=False)
    decoder = _convs([factors, factors, teacher_channels, teacher_channels], transposed=True, batch_norm=False)
    return encoder, decoder


def translator(student_channels: int, teacher_channels: int, rate: float) -> nn.Sequential:
    """FT's translator: C_s -> C_s -> k C_t -> k C_t with BatchNorm (RepDistiller: Translator(s, t), k 0.5)."""
    factors = int(teacher_channels * rate)
    return _convs([student_channels, student_channels, factors, factors], transposed=False, batch_norm=True)


class FTLoss(FeatureCriterion):
    """Kim et al. NeurIPS 2018 (FT): weight * factor_loss(translator(f_s), encoder(f_t)) on the last stage outputs,
    after an init stage of init_epochs that trains the paraphraser on mean (decoder(encoder(f_t)) - f_t)^2.

    As RepDistiller (train_student.py lines 239-253: feat[-2], Paraphraser(t), Translator(s, t), nn.MSELoss,
    init_epochs 30; helper/pretrain.py lines 22-27: the init stage's lr is 0.01 for ResNet and WRN students, else the
    student's, set per pair as pair_hparams.ft_init_lr; helper/loops.py lines 177-180 and run_cifar_distill.sh
    `-a 0 -b 200`: weight 200). The paraphraser is frozen after its init stage (no gradient reaches it); the
    translator trains with the student. Neither has dropout, and only the translator has BatchNorm.
    """

    term = "loss_ft"
    init_term = "loss_ft_reconstruction"

    def __init__(self, weight: float, rate: float, init_epochs: int, init_lr: Optional[float],
                 student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(weight, student_layers, teacher_layers)
        check_init_stage("FT", init_epochs, init_lr, minimum=0)
        if not 0 < rate <= 1:
            raise ValueError(f"FT: rate={rate} must be in (0, 1]: the factors' share of the teacher's channels.")
        self.rate, self.init_epochs, self.init_lr = rate, init_epochs, init_lr
        self.encoder: Optional[nn.Module] = None
        self.decoder: Optional[nn.Module] = None
        self.translator: Optional[nn.Module] = None

    def pick(self, layers: dict) -> list[str]:
        return [layers["stages"][-1]]

    def build(self, student_shapes, teacher_shapes, images, train_labels) -> None:
        check_spatial("FT", student_shapes, teacher_shapes)
        if int(teacher_shapes[0][1] * self.rate) < 1:
            raise ValueError(f"FT: rate={self.rate} leaves no factor of the teacher's {teacher_shapes[0][1]} "
                             "channels: raise it.")
        self.encoder, self.decoder = (m.to(images.device) for m in paraphraser(teacher_shapes[0][1], self.rate))
        self.translator = translator(student_shapes[0][1], teacher_shapes[0][1], self.rate).to(images.device)

    def forward(self, step: Step) -> dict[str, Tensor]:
        (student,), (teacher,) = self.features(step)
        with torch.no_grad():  # the paraphraser is frozen after its init stage
            teacher_factor = full_precision(self.encoder(teacher))
        student_factor = full_precision(self.translator(student))  # the convs may run under autocast
        with autocast_off(teacher):
            return {self.term: self.weight * factor_loss(student_factor, teacher_factor)}

    def init_stage(self) -> Optional[InitStage]:
        if self.init_epochs == 0:
            return None
        layers = ([], self.bound()[1])  # the teacher's alone: the student does not run
        return InitStage(self.init_epochs, self.init_terms, [self.encoder, self.decoder], False, layers, self.init_lr)

    def init_terms(self, step: Step) -> dict[str, Tensor]:
        """The init stage's term: mean (decoder(encoder(f_t)) - f_t)^2, the paraphraser's reconstruction error."""
        name = self.bound()[1][0]
        if name not in step.teacher_features:
            raise KeyError(f"FT's init stage reads the teacher's {name!r}, absent from the step's teacher_features.")
        teacher = full_precision(step.teacher_features[name]).detach()
        reconstructed = full_precision(self.decoder(self.encoder(teacher)))
        with autocast_off(teacher):
            return {self.init_term: F.mse_loss(reconstructed, teacher)}
