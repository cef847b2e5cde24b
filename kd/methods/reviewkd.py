"""ReviewKD (Chen et al., CVPR 2021, "Distilling Knowledge via Knowledge Review"): attention-based fusion (ABF) of
the student's levels, deepest first, and the hierarchical context loss (HCL) against the teacher's levels.

The settings are mdistiller's CIFAR-100 ones (megvii-research/mdistiller, mdistiller/engine/cfg.py REVIEWKD and
configs/cifar100/reviewkd.yaml), which follow the paper's code (dvlab-research/ReviewKD, CIFAR-100/). There the
channels and spatial sizes of every level are tables per student family; here they are read from the bound models
(probe_shapes in bind), which gives the same numbers for the CRD pairs (tests/methods/test_reviewkd.py checks them).

Levels: the student's stage outputs, then its pooled embedding as a 1x1 map; the teacher's stage outputs before
their final ReLU where its model declares them (the "preact" entry of its `feature_layers`), then its pooled
embedding.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.methods.base import FeatureCriterion, Step, autocast_off, average_pool_to, full_precision
from kd.methods.hooks import default_layers, probe_shapes

SUM = "+"  # a teacher layer "a+b" is the sum of the features captured at a and b


def hierarchical_context_loss(student: Tensor, teacher: Tensor, levels: Sequence[int]) -> Tensor:
    """Chen et al. CVPR 2021 (HCL): (MSE(f_s, f_t) + sum_k 2^-k MSE(P_k f_s, P_k f_t)) / (1 + sum_k 2^-k).

    P_k is adaptive average pooling to levels[k] x levels[k] (as a plain avg_pool2d where the size divides the map:
    the same bins, and a deterministic CUDA backward); only levels smaller than the map's height count, and the
    weights 1/2, 1/4, 1/8 go to the levels kept, in order (hcl_loss in mdistiller/distillers/ReviewKD.py).
    """
    loss, total, weight = F.mse_loss(student, teacher), 1.0, 1.0
    for size in levels:
        if size >= student.shape[2]:
            continue
        weight /= 2.0
        pooled = (average_pool_to(feature, (size, size)) for feature in (student, teacher))
        loss = loss + weight * F.mse_loss(*pooled)
        total += weight
    return loss / total


class ABF(nn.Module):
    """Attention-based fusion: 1x1 conv + BN to mid channels, fused with the deeper level's residual by two
    per-position sigmoid weights, resized to the teacher's map, then 3x3 conv + BN to the teacher's channels."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.project = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        # As the reference ABF (kaiming_uniform_ with a=1 on both convs; the attention conv keeps torch's default).
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.project[0].weight, a=1)

    def forward(self, x: Tensor, residual: Optional[Tensor], out_size: Sequence[int]) -> tuple[Tensor, Tensor]:
        """(this level's output for the teacher's map, the fused map the next shallower level fuses with)."""
        x = self.reduce(x)
        if self.attention is not None:
            residual = F.interpolate(residual, size=x.shape[2:], mode="nearest")  # the deeper map, upsampled
            weights = self.attention(torch.cat([x, residual], dim=1))
            x = x * weights[:, 0:1] + residual * weights[:, 1:2]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.project(x), x


def review(features: Sequence[Tensor], abfs: Sequence[ABF], out_sizes: Sequence[Sequence[int]]) -> list[Tensor]:
    """The review path: levels in shallow-to-deep order go through their ABF deepest first, each fused with the
    deeper level's map; returns the outputs in shallow-to-deep order (mdistiller's ReviewKD.forward_train)."""
    outputs, residual = [], None
    for feature, abf, size in zip(reversed(features), reversed(abfs), reversed(out_sizes)):
        output, residual = abf(feature, residual, size)
        outputs.append(output)
    return outputs[::-1]


def review_layout(student_shapes: Sequence[Sequence[int]], teacher_shapes: Sequence[Sequence[int]],
                  max_mid_channels: int = 512) -> dict:
    """The ABF sizes from the levels' shapes (shallow to deep), as mdistiller's IN_CHANNELS, OUT_CHANNELS, SHAPES,
    OUT_SHAPES (listed deepest first there) and the mid width min(MAX_MID_CHANNEL, deepest student channels)."""
    if len(student_shapes) != len(teacher_shapes) or not student_shapes:
        raise ValueError(f"ReviewKD pairs levels in order: got {len(student_shapes)} student and "
                         f"{len(teacher_shapes)} teacher levels. Set student_layers / teacher_layers to equal lengths.")
    as_map = [tuple(s) if len(s) == 4 else (*s, 1, 1) for s in (*student_shapes, *teacher_shapes)]
    if any(len(s) != 4 for s in as_map):
        raise ValueError(f"ReviewKD reads maps (N, C, H, W) or vectors (N, C); got {[tuple(s) for s in as_map]}.")
    student, teacher = as_map[: len(student_shapes)], as_map[len(student_shapes):]
    return {
        "in_channels": [s[1] for s in student], "out_channels": [t[1] for t in teacher],
        "mid_channels": min(max_mid_channels, student[-1][1]),
        "shapes": [tuple(s[2:]) for s in student], "out_shapes": [tuple(t[2:]) for t in teacher],
    }


def teacher_levels(teacher: nn.Module) -> list[str]:
    """The teacher's default levels: each stage output before its final ReLU where the model's `feature_layers`
    declare it ("preact", one name per stage, "a+b" for a sum of two captures), else the stage; then the embedding.

    The zoo declares "preact" where hooks see that value exactly: CIFAR ResNets (their last block's bn2 output plus
    its shortcut) and VGG (the blocks, which end before the ReLU). WRN, MobileNetV2, ShuffleNets and torchvision
    ResNets declare none: their stage outputs are used.
    """
    layers = default_layers(teacher)
    preact = layers.get("preact", layers["stages"])
    if len(preact) != len(layers["stages"]):
        raise ValueError(
            f"{type(teacher).__name__}.feature_layers declares {len(preact)} 'preact' layers for "
            f"{len(layers['stages'])} stages: list one per stage, in the order of 'stages', or set "
            "loss.reviewkd.teacher_layers."
        )
    return [*preact, layers["embedding"]]


def as_map(feature: Tensor) -> Tensor:
    """A pooled embedding (N, C) as the 1x1 map (N, C, 1, 1) the review path reads; maps unchanged."""
    return feature[:, :, None, None] if feature.dim() == 2 else feature


class ReviewKDLoss(FeatureCriterion):
    """Chen et al. CVPR 2021 (ReviewKD): weight * min(epoch / warmup_epochs, 1) * sum_levels HCL(ABF-review(f_s), f_t).

    Levels: every stage output and the pooled embedding of the student (mdistiller's "feats" + pooled_feat,
    STU_PREACT False for CIFAR-100); of the teacher, the same with each stage taken before its final ReLU where its
    model declares it (teacher_levels; mdistiller's "preact_feats"). The ABFs' channels and sizes come from the probed
    shapes (review_layout). Its values, with their sources (mdistiller): conf/loss/reviewkd.yaml; epoch is 1-based as
    in mdistiller's trainer.
    """

    term = "loss_reviewkd"
    one_pair = False

    def __init__(self, weight: float, warmup_epochs: int, max_mid_channels: int, teacher_preact: bool,
                 levels: Sequence[int], student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(weight, student_layers, teacher_layers)
        if warmup_epochs < 0 or max_mid_channels < 1:
            raise ValueError(f"ReviewKD: warmup_epochs={warmup_epochs} must be >= 0 and "
                             f"max_mid_channels={max_mid_channels} >= 1.")
        self.warmup_epochs, self.max_mid_channels = warmup_epochs, max_mid_channels
        self.teacher_preact = teacher_preact
        self.levels = tuple(int(size) for size in levels)
        self.abfs = nn.ModuleList()
        self.teacher_parts: list[list[str]] = []  # per level, the captured teacher layers it sums
        self.out_sizes: list[tuple[int, ...]] = []

    def pick(self, layers: dict) -> list[str]:
        return [*layers["stages"], layers["embedding"]]

    def warmup_factor(self, epoch: int) -> float:
        """min(epoch / warmup_epochs, 1): 20 warm-up epochs (reviewkd.yaml) give 1/20 in epoch 1, 1 from epoch 20."""
        return 1.0 if self.warmup_epochs == 0 else min(epoch / self.warmup_epochs, 1.0)

    def bind(self, student: nn.Module, teacher: Optional[nn.Module], images: Tensor, train_labels: Tensor) -> None:
        if teacher is None:
            raise ValueError("ReviewKDLoss distils the teacher's features: it needs a teacher.")
        student_names = self.resolve(student, self.student_layers, "student")
        teacher_names = self.resolve(teacher, self.teacher_layers, "teacher")
        if self.teacher_layers is None and self.teacher_preact:
            teacher_names = teacher_levels(teacher)
        parts = [name.split(SUM) for name in teacher_names]
        captured = list(dict.fromkeys(part for group in parts for part in group))
        student_shapes = probe_shapes(student, student_names, images)
        teacher_shapes = probe_shapes(teacher, captured, images)
        for group in parts:
            if len({teacher_shapes[part] for part in group}) != 1:
                raise ValueError(f"ReviewKD: the teacher layers summed in {SUM.join(group)!r} differ in shape: "
                                 f"{[tuple(teacher_shapes[part]) for part in group]}.")
        layout = review_layout([student_shapes[n] for n in student_names],
                               [teacher_shapes[group[0]] for group in parts], self.max_mid_channels)
        deepest = len(student_names) - 1
        self.abfs = nn.ModuleList(
            ABF(c_in, layout["mid_channels"], c_out, fuse=i < deepest)
            for i, (c_in, c_out) in enumerate(zip(layout["in_channels"], layout["out_channels"]))
        ).to(images.device)
        self.teacher_parts, self.out_sizes = parts, layout["out_shapes"]
        self.bound_layers = (student_names, captured)

    def features(self, step: Step) -> tuple[list[Tensor], list[Tensor]]:
        """Student and teacher levels as maps; a teacher level named "a+b" is the sum of the two captures."""
        students, captured = super().features(step)
        by_name = dict(zip(self.layers()[1], captured))
        teachers = [sum(by_name[part] for part in group) for group in self.teacher_parts]
        return [as_map(s) for s in students], [as_map(t) for t in teachers]

    def forward(self, step: Step) -> dict[str, Tensor]:
        students, teachers = self.features(step)
        if students[0].shape[0] < 2:  # the 1x1 level's BatchNorm has no batch statistics for one sample
            return {self.term: students[0].sum() * 0.0}
        outputs = review(students, self.abfs, self.out_sizes)
        with autocast_off(teachers[0]):
            loss = sum(hierarchical_context_loss(full_precision(o), t, self.levels) for o, t in zip(outputs, teachers))
        return {self.term: self.weight * self.warmup_factor(step.epoch) * loss}
