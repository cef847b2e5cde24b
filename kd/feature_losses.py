"""Feature-based distillation: FitNet, AT, SP, PKT, RKD, CRD, VID, NST and CC, each a pure tensor function plus a
thin criterion.

Every criterion returns one term (loss_fitnet, loss_at, ...) already multiplied by its `weight`, RepDistiller's
beta (HobbitLong/RepDistiller, scripts/run_cifar_distill.sh). The features are RepDistiller's too (train_student.py,
helper/loops.py, in terms of kd.features.default_layers): FitNet the second stage output (its hint_layer=2, the
stem being feature 0), AT, VID and NST every stage output, SP the last one, PKT / RKD / CRD / CC the classifier's
input. Each criterion's student_layers / teacher_layers (module names, ":in" for a module's input) replace these
defaults.

The losses run in float32 or wider with autocast off: they sum thousands of small products and CRD exponentiates
scores / 0.07, which overflows float16. Teacher features are detached: no gradient ever reaches the teacher.
"""
import hashlib
import math
from contextlib import contextmanager
from typing import Iterator, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd import distributed
from kd.features import default_layers, probe_shapes
from kd.losses import Criterion, Step


def full_precision(tensor: Tensor) -> Tensor:
    """float16 / bfloat16 as float32; float32 and float64 unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


@contextmanager
def autocast_off(tensor: Tensor) -> Iterator[None]:
    with torch.autocast(tensor.device.type, enabled=False):
        yield


# ---------------------------------------------------------------------------------------------------------------
# the methods as tensor functions


def hint_loss(regressed_student: Tensor, teacher: Tensor) -> Tensor:
    """Romero et al. ICLR 2015 (FitNets): mean over all elements of (r(f_s) - f_t)^2, r the learned regressor."""
    return F.mse_loss(regressed_student, teacher)


def hint_regressor(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """FitNet's regressor from the student's hint (N, C_s, H_s, W_s) to the teacher's (N, C_t, H_t, W_t).

    As RepDistiller's ConvReg (models/util.py): a stride-2 3x3 conv when H_s = 2 H_t, a stride-2 4x4 transposed
    conv when 2 H_s = H_t, else a conv with kernel (1 + H_s - H_t, 1 + W_s - W_t); then BatchNorm and ReLU.
    """
    if len(student_shape) != 4 or len(teacher_shape) != 4:
        raise ValueError(
            f"FitNet regresses feature maps (N, C, H, W); got student {tuple(student_shape)} and teacher "
            f"{tuple(teacher_shape)}: pick conv stage outputs as student_layers / teacher_layers."
        )
    (_, s_channels, s_height, s_width), (_, t_channels, t_height, t_width) = student_shape, teacher_shape
    if s_height == 2 * t_height:
        conv = nn.Conv2d(s_channels, t_channels, kernel_size=3, stride=2, padding=1)
    elif 2 * s_height == t_height:
        conv = nn.ConvTranspose2d(s_channels, t_channels, kernel_size=4, stride=2, padding=1)
    elif s_height >= t_height and s_width >= t_width:
        conv = nn.Conv2d(s_channels, t_channels, kernel_size=(1 + s_height - t_height, 1 + s_width - t_width))
    else:
        raise ValueError(
            f"FitNet has no regressor from a {s_height}x{s_width} student hint to a {t_height}x{t_width} teacher "
            "hint (it maps 2x larger, 2x smaller, or larger-or-equal maps): choose other hint layers."
        )
    return nn.Sequential(conv, nn.BatchNorm2d(t_channels), nn.ReLU(inplace=True))


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """Zagoruyko & Komodakis ICLR 2017: at(f) = normalize(mean_c |f_c|^p), flattened per sample (N, H*W)."""
    return F.normalize(feature.pow(p).mean(dim=1).flatten(1), dim=1)


def attention_loss(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """AT for one stage pair: mean over samples and positions of (at(f_s) - at(f_t))^2.

    As RepDistiller (distiller_zoo/AT.py), the larger map is first average-pooled to the smaller one's size.
    """
    student, teacher = pool_to_common_size(student, teacher)
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


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
    if height % size[0] == 0 and width % size[1] == 0:
        factor = (height // size[0], width // size[1])
        return F.avg_pool2d(feature, kernel_size=factor, stride=factor)
    return F.adaptive_avg_pool2d(feature, size)


def similarity_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Tung & Mori ICCV 2019 (SP): ||G_s - G_t||_F^2 / b^2, G = row-normalised f f^T of the flattened batch (b, b)."""
    b = student.shape[0]
    student, teacher = student.reshape(b, -1), teacher.reshape(b, -1)
    gram_s = F.normalize(student @ student.t(), dim=1)
    gram_t = F.normalize(teacher @ teacher.t(), dim=1)
    return (gram_s - gram_t).pow(2).sum() / (b * b)


def pkt_loss(student: Tensor, teacher: Tensor, eps: float = 1e-7) -> Tensor:
    """Passalis & Tefas ECCV 2018 (PKT): mean_ij q_ij log((q_ij + eps) / (p_ij + eps)) over the b x b entries.

    p (student) and q (teacher) are the cosine similarities of the batch's embeddings, (cos + 1) / 2, each row
    normalised to sum to 1; eps and the mean over entries are those of RepDistiller's distiller_zoo/PKT.py.
    """

    def conditional(x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        x = x / (x.norm(dim=1, keepdim=True) + eps)
        similarity = (x @ x.t() + 1.0) / 2.0
        return similarity / similarity.sum(dim=1, keepdim=True)

    p, q = conditional(student), conditional(teacher)
    return (q * torch.log((q + eps) / (p + eps))).mean()


def pairwise_distances(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Distances between the rows of x (b, d): sqrt(max(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, eps)), 0 on the diagonal."""
    squared = x.pow(2).sum(dim=1)
    distances = (squared[:, None] + squared[None, :] - 2 * x @ x.t()).clamp(min=eps).sqrt()
    return distances * (1 - torch.eye(len(x), dtype=x.dtype, device=x.device))


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Park et al. CVPR 2019 (RKD-D): smooth L1 between the pairwise distances, each divided by its mean over i != j."""

    def normalised(x: Tensor) -> Tensor:
        d = pairwise_distances(x.reshape(x.shape[0], -1))
        return d / (d.sum() / (d > 0).sum())  # the mean of the non-zero distances, without a host sync

    if student.shape[0] < 2:  # no pair (a last batch of one): nothing to match, and no mean to divide by
        return student.sum() * 0.0
    return F.smooth_l1_loss(normalised(student), normalised(teacher))


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Park et al. CVPR 2019 (RKD-A): smooth L1 between cos angle(x_i, x_j, x_k) = <e_ji, e_ki> over all triplets.

    e_ji = (x_i - x_j) / |x_i - x_j| (0 when i = j), so the b^3 entries include the degenerate ones, as in
    RepDistiller's distiller_zoo/RKD.py.
    """

    def angles(x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        directions = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=2)  # [j, i] = unit(x_i - x_j)
        return (directions @ directions.transpose(1, 2)).flatten()

    return F.smooth_l1_loss(angles(student), angles(teacher))


def rkd_loss(student: Tensor, teacher: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0) -> Tensor:
    """Park et al. CVPR 2019 (RKD): distance_weight * RKD-D + angle_weight * RKD-A (RepDistiller's w_d=25, w_a=50)."""
    return distance_weight * rkd_distance_loss(student, teacher) + angle_weight * rkd_angle_loss(student, teacher)


def vid_loss(predicted_mean: Tensor, teacher: Tensor, variance: Tensor) -> Tensor:
    """Ahn et al. CVPR 2019 (VID): mean over all elements of 0.5 * (log var_c + (t - mu(f_s))^2 / var_c).

    The Gaussian negative log-likelihood of the teacher's feature under mean mu (the regressed student feature)
    and one learned variance per channel, without its constant 0.5 log(2 pi); averaged over batch, channels and
    positions, as RepDistiller's distiller_zoo/VID.py.
    """
    variance = variance.reshape(1, -1, *([1] * (teacher.dim() - 2)))
    return (0.5 * (torch.log(variance) + (predicted_mean - teacher).pow(2) / variance)).mean()


def vid_regressor(student_channels: int, teacher_channels: int) -> nn.Module:
    """VID's mean predictor: 1x1 conv, ReLU, 1x1 conv, ReLU, 1x1 conv, no biases, teacher_channels wide inside.

    As RepDistiller: VIDLoss(s, t, t) in train_student.py, i.e. num_mid_channel = the teacher's channel count.
    """
    return nn.Sequential(
        nn.Conv2d(student_channels, teacher_channels, 1, bias=False), nn.ReLU(),
        nn.Conv2d(teacher_channels, teacher_channels, 1, bias=False), nn.ReLU(),
        nn.Conv2d(teacher_channels, teacher_channels, 1, bias=False),
    )


def softplus_inverse(value: float) -> float:
    """x with log(1 + exp(x)) = value: the raw parameter that starts VID's variance at a given value."""
    return math.log(math.expm1(value))


def nst_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Huang & Wang 2017 (NST): MMD^2 between the channels of f_s and of f_t, with the kernel k(x, y) = (x.y)^2.

    Each channel is a point: its map over the positions, L2-normalised. Per sample, MMD^2 = mean_ij k(t_i, t_j)
    + mean_ij k(s_i, s_j) - 2 mean_ij k(s_i, t_j), averaged over the batch (distiller_zoo/NST.py, its full_loss
    branch). The larger map is first average-pooled to the smaller one's size.
    """
    student, teacher = pool_to_common_size(student, teacher)
    s, t = F.normalize(student.flatten(2), dim=2), F.normalize(teacher.flatten(2), dim=2)

    def kernel_mean(a: Tensor, b: Tensor) -> Tensor:
        return (a @ b.transpose(1, 2)).pow(2).mean()

    return kernel_mean(t, t) + kernel_mean(s, s) - 2 * kernel_mean(s, t)


def correlation_congruence_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Peng et al. ICCV 2019 (CC) as RepDistiller runs it: mean_i sum_d |e_s,i - e_t,i|_d |e_s,i+1 - e_t,i+1|_d.

    RepDistiller's distiller_zoo/CC.py (code its authors sent, used for the CRD paper's CC row) multiplies the
    embedding differences of consecutive samples in the batch (i = 1 .. b-1) rather than comparing the paper's
    b x b kernel correlation matrices. A batch of one has no pair: the term is then 0.
    """
    delta = (student - teacher).flatten(1).abs()
    if delta.shape[0] < 2:
        return student.sum() * 0.0
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


def nce_loss(probabilities: Tensor, num_data: int, eps: float = 1e-7) -> Tensor:
    """Tian et al. ICLR 2020 (CRD, Eq. 18): NCE with the positive in column 0 and K negatives after it.

    -(sum_i log(P_i0 / (P_i0 + K/N)) + sum_i,k log((K/N) / (P_ik + K/N))) / b, with eps added to the denominators
    as in RepDistiller's crd/criterion.py ContrastLoss; P are the normalised scores exp(s/T) / Z, N the data size.
    """
    b, k = probabilities.shape[0], probabilities.shape[1] - 1
    noise = k / num_data  # K times the uniform noise probability 1/N
    positive, negatives = probabilities[:, 0], probabilities[:, 1:]
    log_positive = torch.log(positive / (positive + noise + eps))
    log_negatives = torch.log(noise / (negatives + noise + eps))
    return -(log_positive.sum() + log_negatives.sum()) / b


class NegativePool(NamedTuple):
    """CRD's negatives for every class, laid out once (bind) so that a step draws them without a host read."""

    labels: Tensor  # (N,) the training split's labels
    by_class: Tensor  # (N,) the split's positions, ordered by class (stable)
    starts: Tensor  # (C,) where each class begins in by_class
    counts: Tensor  # (C,) samples per class
    distinct: Tensor  # (C,) bool: the class has at least k other-class samples, drawn without replacement
    k: int
    draws: tuple[bool, bool]  # (some class draws without replacement, some with): the draws a step makes


def negative_pool(labels: Tensor, k: int) -> NegativePool:
    """The layout sample_negatives reads; the host reads the class counts here, once, instead of at every step.

    RepDistiller's 'exact' mode (dataset/cifar100.py, CIFAR100InstanceSample) draws without replacement when the
    anchor's class has at least k other-class samples, with replacement otherwise: decided here, per class.
    """
    labels = labels.long()
    counts = torch.bincount(labels)
    if bool((counts == len(labels)).any()):
        raise ValueError("CRD found no sample of another class for an anchor: the training split has one class.")
    distinct = len(labels) - counts >= k
    by_class = torch.argsort(labels, stable=True)
    draws = (bool(distinct.any()), not bool(distinct.all()))
    return NegativePool(labels, by_class, counts.cumsum(0) - counts, counts, distinct, k, draws)


def step_generator(step: Step, stream: str, device: torch.device) -> torch.Generator:
    """A generator on `device` that is a pure function of (seed, epoch, step, stream): draws that do not depend on
    the number of ranks, on the global RNG or on what ran before (a resumed run makes the same ones)."""
    digest = hashlib.sha256(f"{stream}:{step.seed}:{step.epoch}:{step.step}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little"))  # host-side: no sync


def sample_negatives(pool: NegativePool, anchor_labels: Tensor, generator: torch.Generator,
                     batch_size: Optional[int] = None, rows: Optional[slice] = None) -> Tensor:
    """(b, k) positions in the training split, drawn per anchor uniformly among samples of another class (CRD).

    The random numbers are drawn for a whole batch of batch_size anchors (default: b) and rows `rows` of it
    (default: all) are kept, so each rank of a data-parallel run gets its rows of the one-process draw.
    anchor_labels are those rows' labels. Nothing is read back to the host: no data-dependent shape or branch.
    """
    batch_size = len(anchor_labels) if batch_size is None else batch_size
    rows = slice(0, batch_size) if rows is None else rows
    without, with_replacement = pool.draws
    distinct = repeated = None
    if without:
        distinct = _distinct_negatives(pool, anchor_labels, generator, batch_size, rows)
    if with_replacement:
        repeated = _repeated_negatives(pool, anchor_labels, generator, batch_size, rows)
    if distinct is None or repeated is None:
        return distinct if repeated is None else repeated
    return torch.where(pool.distinct[anchor_labels][:, None], distinct, repeated)


def _distinct_negatives(pool: NegativePool, anchor_labels: Tensor, generator: torch.Generator, batch_size: int,
                        rows: slice) -> Tensor:
    """Without replacement: the k largest of i.i.d. uniform keys over the allowed samples (an exponential race with
    equal weights) are a uniformly random k-subset; -1 keys keep the anchor's class out. float64 keys: ties, which
    topk would break by position, are ~1e-7 likely per row at N = 50000 (float32 keys: ~75 tied pairs)."""
    keys = torch.rand(batch_size, len(pool.labels), dtype=torch.float64, device=anchor_labels.device,
                      generator=generator)[rows]
    keys.masked_fill_(pool.labels[None, :] == anchor_labels[:, None], -1.0)  # in place: one (B, N) buffer at most
    return keys.topk(pool.k, dim=1).indices  # sorted: the same order whatever the number of rows


def _repeated_negatives(pool: NegativePool, anchor_labels: Tensor, generator: torch.Generator, batch_size: int,
                        rows: slice) -> Tensor:
    """With replacement: j uniform in [0, N - n_c), the j-th sample of by_class once the anchor's class c (a block
    of n_c positions there) is skipped. float64 uniforms: floor(u * m) is uniform to within m / 2^53."""
    u = torch.rand(batch_size, pool.k, dtype=torch.float64, device=anchor_labels.device, generator=generator)[rows]
    start, count = pool.starts[anchor_labels][:, None], pool.counts[anchor_labels][:, None]
    others = len(pool.labels) - count
    j = (u * others).long().clamp_max_(others - 1)  # u < 1, but u * m may round up to m
    return pool.by_class[j + torch.where(j >= start, count, 0)]


def momentum_update(memory: Tensor, index: Tensor, values: Tensor, momentum: float) -> Tensor:
    """A copy of memory whose rows `index` are normalize(momentum * row + (1 - momentum) * value) (CRD's banks)."""
    rows = momentum * memory[index] + (1 - momentum) * values.to(memory.dtype)
    return memory.index_copy(0, index, F.normalize(rows, dim=1))


# ---------------------------------------------------------------------------------------------------------------
# criteria


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
        """The default layer names of one model, from kd.features.default_layers."""
        raise NotImplementedError

    def build(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size], images: Tensor,
              train_labels: Tensor) -> None:
        """Create the adapters (on images' device), given the features' shapes."""

    def layers(self) -> tuple[list[str], list[str]]:
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
        student_names, teacher_names = self.layers()

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


class FitNetLoss(FeatureCriterion):
    """Romero et al. ICLR 2015 (FitNets): weight * mean (r(f_s) - f_t)^2 on a hint layer, r a learned regressor.

    Trained in one stage with CE as RepDistiller does (train_student.py, --distill hint, hint_layer=2: the second
    stage's output, i.e. the middle one of a 3-stage CIFAR ResNet and the second of 4 in VGG, MobileNetV2 and
    ResNet-18), weight (beta) 100. The regressor (hint_regressor) is built in bind() and trained with the student.
    """

    term = "loss_fitnet"

    def __init__(self, weight: float = 100.0, student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(weight, student_layers, teacher_layers)
        self.regressor: Optional[nn.Module] = None

    def pick(self, layers: dict) -> list[str]:
        if len(layers["stages"]) < 2:
            raise ValueError(f"FitNet's hint is the second stage output; the model has stages {layers['stages']}.")
        return [layers["stages"][1]]

    def build(self, student_shapes, teacher_shapes, images, train_labels) -> None:
        self.regressor = hint_regressor(student_shapes[0], teacher_shapes[0]).to(images.device)

    def forward(self, step: Step) -> dict[str, Tensor]:
        (student,), (teacher,) = self.features(step)
        regressed = self.regressor(student)
        with autocast_off(teacher):
            return {self.term: self.weight * hint_loss(full_precision(regressed), teacher)}


class ATLoss(FeatureCriterion):
    """Zagoruyko & Komodakis ICLR 2017 (AT): weight * sum over stage pairs of mean (at(f_s) - at(f_t))^2.

    at(f) = normalize(mean_c f_c^p), p = 2 (attention_loss). As RepDistiller (helper/loops.py, feat[1:-1]): every
    stage output, stem and embedding left out; weight (beta) 1000.
    """

    term = "loss_at"
    one_pair = False

    def __init__(self, weight: float = 1000.0, p: float = 2.0, student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(weight, student_layers, teacher_layers)
        self.p = p

    def pick(self, layers: dict) -> list[str]:
        return list(layers["stages"])

    def build(self, student_shapes, teacher_shapes, images, train_labels) -> None:
        for s, t in zip(student_shapes, teacher_shapes):
            if len(s) != 4 or len(t) != 4:
                raise ValueError(f"AT compares spatial maps (N, C, H, W); got student {tuple(s)}, teacher {tuple(t)}.")

    def forward(self, step: Step) -> dict[str, Tensor]:
        students, teachers = self.features(step)
        with autocast_off(students[0]):
            loss = sum(attention_loss(s, t, self.p) for s, t in zip(students, teachers))
        return {self.term: self.weight * loss}


class SPLoss(FeatureCriterion):
    """Tung & Mori ICCV 2019 (SP): weight * ||G_s - G_t||_F^2 / b^2, G the row-normalised batch similarity f f^T.

    As RepDistiller (helper/loops.py, feat[-2]): the last stage output; weight (beta) 3000. Several equally long
    student_layers / teacher_layers are summed pair by pair.
    """

    term = "loss_sp"
    one_pair = False

    def __init__(self, weight: float = 3000.0, student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(weight, student_layers, teacher_layers)

    def pick(self, layers: dict) -> list[str]:
        return [layers["stages"][-1]]

    def forward(self, step: Step) -> dict[str, Tensor]:
        students, teachers = self.features(step)
        with autocast_off(students[0]):
            loss = sum(similarity_loss(s, t) for s, t in zip(students, teachers))
        return {self.term: self.weight * loss}


class PKTLoss(FeatureCriterion):
    """Passalis & Tefas ECCV 2018 (PKT): weight * mean q log(q / p), p, q the batch's cosine-kernel distributions.

    As RepDistiller (helper/loops.py, feat[-1]): on the embedding (the classifier's input); weight (beta) 30000.
    """

    term = "loss_pkt"

    def __init__(self, weight: float = 30000.0, student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(weight, student_layers, teacher_layers)

    def pick(self, layers: dict) -> list[str]:
        return [layers["embedding"]]

    def forward(self, step: Step) -> dict[str, Tensor]:
        (student,), (teacher,) = self.features(step)
        with autocast_off(student):
            return {self.term: self.weight * pkt_loss(student, teacher)}


class RKDLoss(FeatureCriterion):
    """Park et al. CVPR 2019 (RKD): weight * (distance_weight * RKD-D + angle_weight * RKD-A) on the embedding.

    As RepDistiller (distiller_zoo/RKD.py w_d=25, w_a=50; helper/loops.py feat[-1]); weight (beta) 1.
    """

    term = "loss_rkd"

    def __init__(self, weight: float = 1.0, distance_weight: float = 25.0, angle_weight: float = 50.0,
                 student_layers: Optional[Sequence[str]] = None, teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(weight, student_layers, teacher_layers)
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight

    def pick(self, layers: dict) -> list[str]:
        return [layers["embedding"]]

    def forward(self, step: Step) -> dict[str, Tensor]:
        (student,), (teacher,) = self.features(step)
        with autocast_off(student):
            loss = rkd_loss(student, teacher, self.distance_weight, self.angle_weight)
        return {self.term: self.weight * loss}


class CRDLoss(FeatureCriterion):
    """Tian et al. ICLR 2020 (CRD): weight * (NCE(student anchors vs teacher memory) + NCE(teacher vs student memory)).

    Both embeddings (the classifier inputs) go through a linear map to feat_dim and L2 normalisation. Two memory
    banks, one row per training sample, hold momentum averages of the normalised student and teacher embeddings.
    For an anchor v of sample i, P_j = exp(<m_j, v> / T) / Z over j = i (the positive) and num_negatives samples of
    other classes; Z = N * mean(exp(<m_j, v> / T)) is set on the first batch and then fixed (nce_loss gives the
    NCE). Defaults from RepDistiller (train_student.py, crd/memory.py, crd/criterion.py): feat_dim 128, 16384
    negatives in 'exact' mode, T 0.07, momentum 0.5, weight (beta) 0.8. The banks and Z are buffers (checkpointed);
    the banks are updated in training mode only. The negatives are drawn for the global batch from a generator keyed
    by (seed, epoch, step) (sample_negatives), so any number of ranks, and a resumed run, draw the same ones.
    """

    term = "loss_crd"

    def __init__(self, weight: float = 0.8, feat_dim: int = 128, num_negatives: int = 16384,
                 temperature: float = 0.07, momentum: float = 0.5, student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(weight, student_layers, teacher_layers)
        if feat_dim < 1 or num_negatives < 1:
            raise ValueError(f"CRD: feat_dim={feat_dim} and num_negatives={num_negatives} must be >= 1.")
        if not temperature > 0 or not 0 <= momentum < 1:
            raise ValueError(f"CRD: temperature={temperature} must be > 0 and momentum={momentum} in [0, 1).")
        self.feat_dim = feat_dim
        self.num_negatives = num_negatives
        self.temperature = temperature
        self.momentum = momentum
        self.embed_student: Optional[nn.Module] = None
        self.embed_teacher: Optional[nn.Module] = None

    def pick(self, layers: dict) -> list[str]:
        return [layers["embedding"]]

    def build(self, student_shapes, teacher_shapes, images, train_labels) -> None:
        device = images.device
        self.embed_student = nn.Linear(math.prod(student_shapes[0][1:]), self.feat_dim).to(device)
        self.embed_teacher = nn.Linear(math.prod(teacher_shapes[0][1:]), self.feat_dim).to(device)
        # Uniform in [-stdv, stdv] as RepDistiller's ContrastMemory; every row is overwritten (normalised) on its
        # sample's first visit.
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        for name in ("memory_student", "memory_teacher"):
            memory = torch.rand(len(train_labels), self.feat_dim, device=device) * (2 * stdv) - stdv
            self.register_buffer(name, memory)
        # Z of the student-anchored and of the teacher-anchored scores; negative until the first batch sets them.
        self.register_buffer("normalizers", torch.full((2,), -1.0, device=device))
        # The data's, passed to bind again on resume: buffers (moved with the criterion), not state.
        pool = negative_pool(train_labels.to(device=device, dtype=torch.long), self.num_negatives)
        for name in ("labels", "by_class", "starts", "counts", "distinct"):
            self.register_buffer(f"pool_{name}", getattr(pool, name), persistent=False)
        self.pool_draws = pool.draws

    def pool(self) -> NegativePool:
        """The negatives' layout made in build, on the criterion's device."""
        return NegativePool(self.pool_labels, self.pool_by_class, self.pool_starts, self.pool_counts,
                            self.pool_distinct, self.num_negatives, self.pool_draws)

    def forward(self, step: Step) -> dict[str, Tensor]:
        if step.index is None:
            raise ValueError("CRD needs step.index, the samples' positions in the training split (its memory rows).")
        (student,), (teacher,) = self.features(step)
        embedded_student = full_precision(self.embed_student(student.flatten(1)))  # the linear maps may autocast
        embedded_teacher = full_precision(self.embed_teacher(teacher.flatten(1)))
        batch_size, rows = self.rows(step)
        generator = step_generator(step, "crd", step.index.device)
        negatives = sample_negatives(self.pool(), self.pool_labels[step.index], generator, batch_size, rows)
        with autocast_off(student):
            anchors = F.normalize(embedded_student, dim=1), F.normalize(embedded_teacher, dim=1)
            loss = self.contrast(*anchors, step.index, negatives, batch_size)
        return {self.term: self.weight * loss}

    @staticmethod
    def rows(step: Step) -> tuple[int, slice]:
        """The global batch's size and this rank's rows of it (all of it on one process)."""
        if step.batch_size is None and distributed.world_size() > 1:
            raise ValueError("CRD under torchrun needs step.batch_size, the global batch's size (kd.loop sets it).")
        batch_size = len(step.index) if step.batch_size is None else step.batch_size
        rows = distributed.shard(batch_size)
        if rows.stop - rows.start != len(step.index):
            raise ValueError(f"CRD: {len(step.index)} rows here, but rank {distributed.rank()}'s share of a batch "
                             f"of {batch_size} is {rows.stop - rows.start}.")
        return batch_size, rows

    def contrast(self, anchor_student: Tensor, anchor_teacher: Tensor, index: Tensor, negatives: Tensor,
                 batch_size: int) -> Tensor:
        """NCE of both directions for this rank's rows of a batch of batch_size; updates Z on the first call and
        the memory banks in training."""
        num_data = len(self.pool_labels)
        contrast_index = torch.cat([index[:, None], negatives], dim=1)  # (b, 1 + K): the positive first
        # All N dot products at once, then the 1 + K picked: a (b, N) product is smaller than the
        # (b, 1 + K, feat_dim) memory rows RepDistiller gathers, and gives the same scores.
        memory_t, memory_s = self.memory_teacher.to(anchor_student.dtype), self.memory_student.to(anchor_teacher.dtype)
        scores_s = torch.exp((anchor_student @ memory_t.t()).gather(1, contrast_index) / self.temperature)
        scores_t = torch.exp((anchor_teacher @ memory_s.t()).gather(1, contrast_index) / self.temperature)
        # Z = N * the mean score over the whole batch: the ranks' sums added and divided by the global count, so
        # every rank fixes the one-process Z (a mean of the ranks' means would weigh unequal shares wrongly).
        sums = distributed.sum_(torch.stack([scores_s.sum(), scores_t.sum()]).detach())
        estimate = sums / (batch_size * contrast_index.shape[1]) * num_data
        normalizers = torch.where(self.normalizers < 0, estimate.to(self.normalizers.dtype), self.normalizers)
        self.normalizers.copy_(normalizers)
        loss = nce_loss(scores_s / normalizers[0], num_data) + nce_loss(scores_t / normalizers[1], num_data)
        if self.training:
            with torch.no_grad():  # new tensors, not in place: the products above keep the old banks for backward
                # Under torchrun every rank applies the whole batch's rows, so the banks stay the same on all ranks.
                sizes = distributed.shard_sizes(batch_size)  # known on every rank: no count is exchanged
                index, anchor_student, anchor_teacher = distributed.gather_rows(
                    index, anchor_student, anchor_teacher, sizes=sizes)
                self.memory_student = momentum_update(self.memory_student, index, anchor_student, self.momentum)
                self.memory_teacher = momentum_update(self.memory_teacher, index, anchor_teacher, self.momentum)
        return loss


def _check_spatial(method: str, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
    for s, t in zip(student_shapes, teacher_shapes):
        if len(s) != 4 or len(t) != 4:
            raise ValueError(
                f"{method} compares spatial maps (N, C, H, W); got student {tuple(s)}, teacher {tuple(t)}."
            )


class VIDLoss(FeatureCriterion):
    """Ahn et al. CVPR 2019 (VID): weight * sum over stage pairs of mean 0.5 * (log var_c + (t - mu(f_s))^2 / var_c).

    mu is a learned 1x1-conv regressor (vid_regressor) and var_c = softplus(alpha_c) + eps a learned variance per
    teacher channel, starting at init_variance. As RepDistiller (distiller_zoo/VID.py init_pred_var=5, eps=1e-5;
    helper/loops.py feat[1:-1]: every stage output; scripts/run_cifar_distill.sh weight (beta) 1). The larger of
    two maps is average-pooled to the other's size before the regressor, as there.
    """

    term = "loss_vid"
    one_pair = False

    def __init__(self, weight: float = 1.0, init_variance: float = 5.0, eps: float = 1e-5,
                 student_layers: Optional[Sequence[str]] = None, teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(weight, student_layers, teacher_layers)
        if not init_variance > eps > 0:
            raise ValueError(f"VID: init_variance={init_variance} must exceed eps={eps} > 0 (softplus is positive).")
        self.init_variance, self.eps = init_variance, eps
        self.regressors = nn.ModuleList()
        self.log_scales = nn.ParameterList()

    def pick(self, layers: dict) -> list[str]:
        return list(layers["stages"])

    def build(self, student_shapes, teacher_shapes, images, train_labels) -> None:
        _check_spatial("VID", student_shapes, teacher_shapes)
        start = softplus_inverse(self.init_variance - self.eps)  # softplus(start) + eps = init_variance
        device = images.device
        pairs = zip(student_shapes, teacher_shapes)
        self.regressors = nn.ModuleList(vid_regressor(s[1], t[1]).to(device) for s, t in pairs)
        self.log_scales = nn.ParameterList(torch.full((t[1],), start, device=device) for t in teacher_shapes)

    def variances(self) -> list[Tensor]:
        """var_c = softplus(alpha_c) + eps per teacher channel, one vector per stage pair."""
        return [F.softplus(full_precision(alpha)) + self.eps for alpha in self.log_scales]

    def forward(self, step: Step) -> dict[str, Tensor]:
        students, teachers = self.features(step)
        loss = students[0].new_zeros(())
        for student, teacher, regressor, variance in zip(students, teachers, self.regressors, self.variances()):
            student, teacher = pool_to_common_size(student, teacher)
            predicted = full_precision(regressor(student))  # the regressor may run under autocast
            with autocast_off(teacher):
                loss = loss + vid_loss(predicted, teacher, variance)
        return {self.term: self.weight * loss}


class NSTLoss(FeatureCriterion):
    """Huang & Wang 2017 (NST): weight * sum over stage pairs of MMD^2 with the kernel (x.y)^2 between channels.

    nst_loss compares the L2-normalised channel maps. As RepDistiller (helper/loops.py feat[1:-1]: every stage
    output; scripts/run_cifar_distill.sh weight (beta) 50); no adapters: the channel counts may differ.
    """

    term = "loss_nst"
    one_pair = False

    def __init__(self, weight: float = 50.0, student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(weight, student_layers, teacher_layers)

    def pick(self, layers: dict) -> list[str]:
        return list(layers["stages"])

    def build(self, student_shapes, teacher_shapes, images, train_labels) -> None:
        _check_spatial("NST", student_shapes, teacher_shapes)

    def forward(self, step: Step) -> dict[str, Tensor]:
        students, teachers = self.features(step)
        with autocast_off(students[0]):
            loss = sum(nst_loss(s, t) for s, t in zip(students, teachers))
        return {self.term: self.weight * loss}


class CCLoss(FeatureCriterion):
    """Peng et al. ICCV 2019 (CC): weight * correlation_congruence_loss(W_s e_s + b_s, W_t e_t + b_t).

    Both embeddings (the classifiers' inputs) go through a learned linear map to feat_dim, without normalisation.
    As RepDistiller (train_student.py --distill correlation: LinearEmbed of models/util.py to feat_dim 128 on
    feat[-1]; distiller_zoo/CC.py; scripts/run_cifar_distill.sh weight (beta) 0.02).
    """

    term = "loss_cc"

    def __init__(self, weight: float = 0.02, feat_dim: int = 128, student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__(weight, student_layers, teacher_layers)
        if feat_dim < 1:
            raise ValueError(f"CC: feat_dim={feat_dim} must be >= 1.")
        self.feat_dim = feat_dim
        self.embed_student: Optional[nn.Module] = None
        self.embed_teacher: Optional[nn.Module] = None

    def pick(self, layers: dict) -> list[str]:
        return [layers["embedding"]]

    def build(self, student_shapes, teacher_shapes, images, train_labels) -> None:
        self.embed_student = nn.Linear(math.prod(student_shapes[0][1:]), self.feat_dim).to(images.device)
        self.embed_teacher = nn.Linear(math.prod(teacher_shapes[0][1:]), self.feat_dim).to(images.device)

    def forward(self, step: Step) -> dict[str, Tensor]:
        (student,), (teacher,) = self.features(step)
        embedded_student = full_precision(self.embed_student(student.flatten(1)))  # the linear maps may autocast
        embedded_teacher = full_precision(self.embed_teacher(teacher.flatten(1)))
        with autocast_off(student):
            return {self.term: self.weight * correlation_congruence_loss(embedded_student, embedded_teacher)}
