"""What every method shares: the `Step` a criterion reads, the `Criterion` protocol, `Combined` (a sum of criteria),
`CELoss` (the label term every preset adds, and the teacher phase's loss), `FeatureCriterion` (layer names, bind,
adapters) and the helpers the methods' files use.

A criterion is called as criterion(step) with the batch's `Step` and returns a dict of named, already-weighted loss
terms whose sum is the loss; the loop logs each term without knowing the method. Criteria that read intermediate
features name the modules (`layers()`) and build their adapters in `bind()`, which the engine calls once, before the
optimizer is made, so the adapters train with the student. A criterion may also declare an `InitStage` (AB, FSP, FT):
epochs that kd.stages trains on the criterion's own init loss before epoch 1.

Feature terms run in float32 or wider with autocast off (full_precision, autocast_off): they sum thousands of small
products and CRD exponentiates scores / 0.07, which overflows float16. Teacher features are detached: no gradient
ever reaches the teacher. Each feature criterion's `weight` is RepDistiller's beta (HobbitLong/RepDistiller,
scripts/run_cifar_distill.sh) and its default layers RepDistiller's features, in terms of
kd.methods.hooks.default_layers; student_layers / teacher_layers (module names, ":in" for a module's input) replace
them.
"""
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.methods.hooks import default_layers, probe_shapes


@dataclass
class Step:
    """What a criterion sees for one training batch."""

    student_logits: Optional[Tensor]  # None only in an init stage that does not run the student (FT's)
    targets: Tensor
    teacher_logits: Optional[Tensor] = None
    student_features: dict[str, Tensor] = field(default_factory=dict)  # module name -> its output
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    index: Optional[Tensor] = None  # the samples' positions in the training split (CRD's memory bank)
    epoch: int = 1  # 1-based (DKD's warm-up)
    step: int = 0  # the batch's position in its epoch, 0-based
    seed: int = 0  # the run's seed: with epoch and step, the key of a criterion's random draws (CRD's negatives)
    # The global batch's size over all ranks; this rank holds its rows distributed.shard(batch_size). None: the
    # rows here are the whole batch (one process). Keyed draws are made for the global batch, then sliced.
    batch_size: Optional[int] = None


@dataclass
class InitStage:
    """What a criterion trains before epoch 1, on a loss of its own (RepDistiller's init stage of AB, FSP and FT,
    helper/pretrain.py); kd.stages runs it with the run's optimizer at a constant learning rate."""

    epochs: int
    loss: Callable[[Step], dict[str, Tensor]]  # the stage's named, already-weighted terms
    modules: list[nn.Module]  # the criterion's modules it trains (AB's connectors, FT's paraphraser)
    trains_student: bool  # the student trains too (AB, FSP); False: the student does not even run (FT)
    layers: tuple[list[str], list[str]]  # the student's and the teacher's layers the loss reads
    lr: Optional[float] = None  # None: the run optimizer's lr


class Criterion(nn.Module):
    """Base of every criterion: by default it reads the teacher's logits and no features, and has no adapters."""

    needs_teacher: bool = True  # the training step reads the teacher (an init stage always does: kd.stages)
    init_epochs: int = 0  # epochs of an init stage before epoch 1 (init_stage()); known before bind

    def layers(self) -> tuple[list[str], list[str]]:
        """Names of the student's and the teacher's modules whose outputs forward() reads (after bind)."""
        return [], []

    def bind(self, student: nn.Module, teacher: Optional[nn.Module], images: Tensor, train_labels: Tensor) -> None:
        """Resolve layer names and build adapters, given both models, a sample input batch and the train labels."""

    def init_stage(self) -> Optional[InitStage]:
        """The stage trained before epoch 1 (after bind), or None when the criterion has none."""
        return None


class CELoss(Criterion):
    """Cross-entropy on the labels, times `weight`; the teacher's logits are ignored."""

    needs_teacher = False

    def __init__(self, label_smoothing: float = 0.0, weight: float = 1.0):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.weight = weight

    def forward(self, step: Step) -> dict[str, Tensor]:
        ce = F.cross_entropy(step.student_logits, step.targets, label_smoothing=self.label_smoothing)
        return {"loss_ce": self.weight * ce}


class Combined(Criterion):
    """A weighted sum of criteria (each holds its own weights), e.g. CE + KD + a feature term (CRD+KD)."""

    def __init__(self, **terms: Criterion):
        super().__init__()
        if not terms:
            raise ValueError(
                "loss is a Combined with no criteria: add one, e.g. +loss.ce._target_=kd.methods.base.CELoss."
            )
        staged = [name for name, term in terms.items() if term.init_epochs > 0]
        if len(staged) > 1:
            raise ValueError(f"loss terms {staged} each declare an init stage, and a run trains one: keep one of them "
                             "(or set the others' init_epochs=0).")
        self.terms = nn.ModuleDict(terms)

    @property
    def needs_teacher(self) -> bool:
        return any(term.needs_teacher for term in self.terms.values())

    @property
    def init_epochs(self) -> int:
        return max(term.init_epochs for term in self.terms.values())

    def init_stage(self) -> Optional[InitStage]:
        stages = [term.init_stage() for term in self.terms.values()]
        return next((stage for stage in stages if stage is not None), None)

    def layers(self) -> tuple[list[str], list[str]]:
        student, teacher = [], []
        for term in self.terms.values():
            s, t = term.layers()
            student += [name for name in s if name not in student]
            teacher += [name for name in t if name not in teacher]
        return student, teacher

    def bind(self, student: nn.Module, teacher: Optional[nn.Module], images: Tensor, train_labels: Tensor) -> None:
        for term in self.terms.values():
            term.bind(student, teacher, images, train_labels)

    def forward(self, step: Step) -> dict[str, Tensor]:
        merged: dict[str, Tensor] = {}
        for name, term in self.terms.items():
            for key, value in term(step).items():
                if key in merged:
                    raise ValueError(f"loss term {key!r} comes from two criteria (the second is {name!r}).")
                merged[key] = value
        return merged


class FeatureCriterion(Criterion):
    """A feature method's weight and layer names; bind() resolves the names against the models, probes the
    features' shapes and builds the adapters, forward() reads the named features from the Step."""

    term = ""  # the key of the returned loss term
    one_pair = True  # one student layer and one teacher layer; else equally many, paired in order

    def __init__(self, weight: float, student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__()
        if not weight >= 0:
            raise ValueError(f"{type(self).__name__}: weight={weight} must be >= 0 (0 turns the term off).")
        self.weight = weight
        self.student_layers = None if student_layers is None else [str(name) for name in student_layers]
        self.teacher_layers = None if teacher_layers is None else [str(name) for name in teacher_layers]
        self.bound_layers: Optional[tuple[list[str], list[str]]] = None

    def pick(self, layers: dict) -> list[str]:
        """The default layer names of one model, from kd.methods.hooks.default_layers."""
        raise NotImplementedError

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size], images: Tensor,
              train_labels: Tensor) -> None:
        """Create the adapters (on images' device), given the features' shapes."""

    def layers(self) -> tuple[list[str], list[str]]:
        return self.bound()

    def bound(self) -> tuple[list[str], list[str]]:
        """The student's and the teacher's layer names that bind() resolved, in pair order."""
        if self.bound_layers is None:
            raise RuntimeError(f"{type(self).__name__}.layers() before bind(): bind the criterion to the models first.")
        return list(self.bound_layers[0]), list(self.bound_layers[1])

    def bind(self, student: nn.Module, teacher: Optional[nn.Module], images: Tensor, train_labels: Tensor) -> None:
        if teacher is None:
            raise ValueError(f"{type(self).__name__} distils the teacher's features: it needs a teacher.")
        student_names = self.resolve(student, self.student_layers, "student")
        teacher_names = self.resolve(teacher, self.teacher_layers, "teacher")
        if len(student_names) != len(teacher_names) or (self.one_pair and len(student_names) != 1):
            wanted = "one layer each" if self.one_pair else "equally many layers, paired in order"
            raise ValueError(
                f"{type(self).__name__} needs {wanted}: student {student_names}, teacher {teacher_names}. "
                "Set student_layers / teacher_layers in the loss config."
            )
        student_shapes = probe_shapes(student, student_names, images)
        teacher_shapes = probe_shapes(teacher, teacher_names, images)
        self.build([student_shapes[n] for n in student_names], [teacher_shapes[n] for n in teacher_names],
                   images, train_labels)
        self.bound_layers = (student_names, teacher_names)

    def resolve(self, model: nn.Module, names: Optional[list[str]], role: str) -> list[str]:
        if names is not None:
            if not names:
                raise ValueError(f"{type(self).__name__}: {role}_layers is empty; null uses the default layers.")
            return names
        try:
            return self.pick(default_layers(model))
        except ValueError as error:
            raise ValueError(f"{type(self).__name__}, {role}: {error}") from None

    def features(self, step: Step) -> tuple[list[Tensor], list[Tensor]]:
        """The student's features (with their graph) and the teacher's (detached), in layer order, at full precision."""
        student_names, teacher_names = self.bound()

        def fetch(features: dict[str, Tensor], name: str, role: str) -> Tensor:
            if name not in features:
                raise KeyError(
                    f"{type(self).__name__} reads the {role}'s {name!r}, absent from the step's {role}_features "
                    f"({sorted(features)}): capture criterion.layers() on both models."
                )
            return full_precision(features[name])

        student = [fetch(step.student_features, name, "student") for name in student_names]
        teacher = [fetch(step.teacher_features, name, "teacher").detach() for name in teacher_names]
        return student, teacher


# ---------------------------------------------------------------------------------------------------------------
# checks and helpers for the methods' files


def check_non_negative(**weights: float) -> None:
    """Refuse a negative loss weight, naming its key (loss.<key>)."""
    for key, value in weights.items():
        if value < 0:
            raise ValueError(f"loss.{key}={value} is negative: loss weights must be >= 0 (0 turns the term off).")


def check_temperature(temperature: float) -> None:
    """Refuse a temperature that is not > 0."""
    if temperature <= 0:
        raise ValueError(f"loss.temperature={temperature} must be > 0 (T=1 is the plain softmax).")


def check_spatial(method: str, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
    """Refuse feature pairs that are not both maps (N, C, H, W), for methods that compare spatial maps."""
    for s, t in zip(student_shapes, teacher_shapes):
        if len(s) != 4 or len(t) != 4:
            raise ValueError(
                f"{method} compares spatial maps (N, C, H, W); got student {tuple(s)}, teacher {tuple(t)}."
            )


def check_init_stage(method: str, init_epochs: int, init_lr: Optional[float], minimum: int) -> None:
    """Refuse an init stage shorter than `minimum` epochs, or a learning rate that is not > 0 (null: the run's)."""
    if init_epochs < minimum:
        why = "it distils in that stage alone" if minimum else "a count of epochs"
        raise ValueError(f"{method}: init_epochs={init_epochs} must be >= {minimum} ({why}).")
    if init_lr is not None and not init_lr > 0:
        raise ValueError(f"{method}: init_lr={init_lr} must be > 0, or null for the optimizer's lr.")


def full_precision(tensor: Tensor) -> Tensor:
    """float16 / bfloat16 as float32; float32 and float64 unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


@contextmanager
def autocast_off(tensor: Tensor) -> Iterator[None]:
    """The body runs without autocast on tensor's device type: the loss in the precision of its inputs."""
    with torch.autocast(tensor.device.type, enabled=False):
        yield


def pool_to_common_size(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Both maps at the smaller one's height and width: the larger is average-pooled down.

    What RepDistiller's AT, VID and NST do when the student's and the teacher's maps differ in size
    (distiller_zoo/AT.py, VID.py, NST.py; they pool to (H, H), the same for the square maps of this zoo).
    """
    size = (min(student.shape[2], teacher.shape[2]), min(student.shape[3], teacher.shape[3]))
    return average_pool_to(student, size), average_pool_to(teacher, size)


def average_pool_to(feature: Tensor, size: tuple[int, int]) -> Tensor:
    """feature (N, C, H, W) average-pooled to `size`: adaptive pooling, as a plain kernel = stride pool when H and W
    are multiples of the size (the same bins, so the same values). adaptive_avg_pool2d has no deterministic CUDA
    backward; avg_pool2d has, so deterministic runs of the usual 2x / 4x cases do not fail."""
    height, width = feature.shape[2:]
    if (height, width) == size:
        return feature
    if size == (1, 1):  # what adaptive_avg_pool2d itself runs for a 1x1 output: the same bits as before
        return feature.mean((2, 3), keepdim=True)
    if height % size[0] == 0 and width % size[1] == 0:
        factor = (height // size[0], width // size[1])
        return F.avg_pool2d(feature, kernel_size=factor, stride=factor)
    return F.adaptive_avg_pool2d(feature, size)
