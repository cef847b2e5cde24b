"""Tian et al. ICLR 2020 (CRD): NCE between the student's and the teacher's embeddings against negatives of other
classes drawn from momentum memory banks. conf/loss/crd.yaml (and crd_kd.yaml, CRD composed with KD).

The negatives' layout per class (NegativePool) is made once in bind; each step draws its negatives from a
generator keyed by (seed, epoch, step), for the global batch, with nothing read back to the host.
"""
import hashlib
import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd import distributed
from kd.methods.base import FeatureCriterion, Step, autocast_off, full_precision


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


class CRDLoss(FeatureCriterion):
    """Tian et al. ICLR 2020 (CRD): weight * (NCE(student anchors vs teacher memory) + NCE(teacher vs student memory)).

    Both embeddings (the classifier inputs) go through a linear map to feat_dim and L2 normalisation. Two memory
    banks, one row per training sample, hold momentum averages of the normalised student and teacher embeddings.
    For an anchor v of sample i, P_j = exp(<m_j, v> / T) / Z over j = i (the positive) and num_negatives samples of
    other classes; Z = N * mean(exp(<m_j, v> / T)) is set on the first batch and then fixed (nce_loss gives the
    NCE), as RepDistiller's 'exact' mode; its values, with their sources: conf/loss/crd.yaml. The banks and Z are
    buffers (checkpointed); the banks are updated in training mode only. The negatives are drawn for the global batch
    from a generator keyed by (seed, epoch, step) (sample_negatives), so any number of ranks, and a resumed run, draw
    the same ones.
    """

    term = "loss_crd"

    def __init__(self, weight: float, feat_dim: int, num_negatives: int, temperature: float, momentum: float,
                 student_layers: Optional[Sequence[str]] = None, teacher_layers: Optional[Sequence[str]] = None):
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
