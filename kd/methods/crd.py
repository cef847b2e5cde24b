"""Tian et al. ICLR 2020 (CRD): NCE between the student's and the teacher's embeddings against negatives of other
classes drawn from momentum memory banks. conf/loss/crd.yaml (and crd_kd.yaml, CRD composed with KD).

The negatives' layout per class (NegativePool) is made once in bind; each step draws its negatives from a
generator keyed by (seed, epoch, step), for the global batch, with nothing read back to the host.

At ImageNet size (N >= LARGE_DATA training samples) a step holds nothing of size N besides the two banks: the
negatives come from (B, K + spare) draws instead of (B, N) keys (_drawn_negatives), the scores from the (b, 1 + K)
memory rows gathered in chunks instead of a (b, N) product (gathered_dots), and the banks are updated in place. Below
it (CIFAR's 50 k, Tiny-ImageNet's 100 k) every number is as it was before that path existed.
"""
import hashlib
import math
from typing import Any, Iterator, NamedTuple, Optional, Sequence

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


# The data size from which a step works in memory bounded by the batch and K rather than by N (see the module's
# docstring). At N = 2^18 and batch 256 the (B, N) float64 keys would be 0.5 GB; at ImageNet's 1.28 M, 2.6 GB.
LARGE_DATA = 2 ** 18
# _drawn_negatives is used where every class has at least this many times K other-class samples: then the expected
# number of repeats among K + spare draws is at most K / 128 (K^2 / 2M for M other-class samples), and the spare
# draws, K / 16 + 64, are at least 8 times that (ImageNet, K = 16384: 105 +- 10 repeats expected, 1088 spare).
DRAWN_RATIO = 64
# The most bytes of gathered memory rows (chunk, 1 + K, feat_dim) that gathered_dots holds at once.
GATHER_BYTES = 2 ** 26


class NegativePool(NamedTuple):
    """CRD's negatives for every class, laid out once (bind) so that a step draws them without a host read."""

    labels: Tensor  # (N,) the training split's labels
    by_class: Tensor  # (N,) the split's positions, ordered by class (stable)
    starts: Tensor  # (C,) where each class begins in by_class
    counts: Tensor  # (C,) samples per class
    distinct: Tensor  # (C,) bool: the class has at least k other-class samples, drawn without replacement
    k: int
    draws: tuple[bool, bool]  # (some class draws without replacement, some with): the draws a step makes
    spare: int = 0  # > 0: draws without replacement come from K + spare draws (_drawn_negatives), not from N keys


def negative_pool(labels: Tensor, k: int) -> NegativePool:
    """The layout sample_negatives reads; the host reads the class counts here, once, instead of at every step.

    RepDistiller's 'exact' mode (dataset/cifar100.py, CIFAR100InstanceSample) draws without replacement when the
    anchor's class has at least k other-class samples, with replacement otherwise: decided here, per class. From
    LARGE_DATA samples on, where every class has DRAWN_RATIO * k others, the draws use _drawn_negatives (spare > 0).
    """
    labels = labels.long()
    counts = torch.bincount(labels)
    if bool((counts == len(labels)).any()):
        raise ValueError("CRD found no sample of another class for an anchor: the training split has one class.")
    others = len(labels) - counts
    distinct = others >= k
    by_class = torch.argsort(labels, stable=True)
    draws = (bool(distinct.any()), not bool(distinct.all()))
    drawn = len(labels) >= LARGE_DATA and bool((others[counts > 0] >= DRAWN_RATIO * k).all())
    spare = k // 16 + 64 if drawn else 0
    return NegativePool(labels, by_class, counts.cumsum(0) - counts, counts, distinct, k, draws, spare)


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
        draw = _drawn_negatives if pool.spare else _distinct_negatives
        distinct = draw(pool, anchor_labels, generator, batch_size, rows)
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
    """With replacement: k uniform draws among the other classes' samples (_other_class_draws)."""
    u = torch.rand(batch_size, pool.k, dtype=torch.float64, device=anchor_labels.device, generator=generator)[rows]
    return _positions(pool, anchor_labels, _other_class_draws(pool, anchor_labels, u))


def _drawn_negatives(pool: NegativePool, anchor_labels: Tensor, generator: torch.Generator, batch_size: int,
                     rows: slice) -> Tensor:
    """Without replacement from k + spare draws with replacement: the first k distinct ones, in draw order. The first
    k distinct values of an i.i.d. uniform sequence are a uniformly random k-subset in random order (the law of
    _distinct_negatives), read from (B, k + spare) numbers instead of (B, N) keys. Should a row draw fewer than k
    distinct values (see DRAWN_RATIO), its first draws fill the rest: other-class samples, some repeated."""
    u = torch.rand(batch_size, pool.k + pool.spare, dtype=torch.float64, device=anchor_labels.device,
                   generator=generator)[rows]
    drawn = _other_class_draws(pool, anchor_labels, u)
    ordered, order = drawn.sort(dim=1, stable=True)  # stable: a value's first draw comes first among its repeats
    repeat = torch.zeros_like(drawn, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    first = torch.empty_like(repeat).scatter_(1, order, ~repeat)  # back in draw order
    rank = first.cumsum(1) - 1
    slot = torch.where(first & (rank < pool.k), rank, pool.k)  # an extra column k takes every other draw
    picked = torch.cat([drawn[:, :pool.k], drawn[:, :1]], dim=1).scatter_(1, slot, drawn)[:, :pool.k]
    return _positions(pool, anchor_labels, picked)


def _other_class_draws(pool: NegativePool, anchor_labels: Tensor, u: Tensor) -> Tensor:
    """j uniform in [0, N - n_c) from u uniform in [0, 1): the j-th sample of by_class once the anchor's class c is
    skipped (_positions). float64 uniforms: floor(u * m) is uniform to within m / 2^53."""
    others = len(pool.labels) - pool.counts[anchor_labels][:, None]
    return (u * others).long().clamp_max_(others - 1)  # u < 1, but u * m may round up to m


def _positions(pool: NegativePool, anchor_labels: Tensor, j: Tensor) -> Tensor:
    """The training-split positions of draws j (_other_class_draws): by_class with the anchor's class (a block of
    n_c positions there) skipped."""
    start, count = pool.starts[anchor_labels][:, None], pool.counts[anchor_labels][:, None]
    return pool.by_class[j + torch.where(j >= start, count, 0)]


def momentum_update(memory: Tensor, index: Tensor, values: Tensor, momentum: float) -> Tensor:
    """A copy of memory whose rows `index` are normalize(momentum * row + (1 - momentum) * value) (CRD's banks)."""
    return momentum_update_(memory.clone(), index, values, momentum)


def momentum_update_(memory: Tensor, index: Tensor, values: Tensor, momentum: float) -> Tensor:
    """momentum_update in place: memory's rows `index` overwritten (index_copy_), nothing of memory's size made."""
    rows = momentum * memory[index] + (1 - momentum) * values.to(memory.dtype)
    return memory.index_copy_(0, index, F.normalize(rows, dim=1))


def gathered_dots(anchor: Tensor, memory: Tensor, index: Tensor, changing: Optional[Tensor] = None) -> Tensor:
    """(b, 1 + K) dot products <anchor_i, memory[index_ij]>, differentiable in anchor (_GatheredDots).

    `changing`: the rows of memory that the caller overwrites in place before backward (the banks' update); their
    values now are kept for backward, which gathers the other rows again from memory.
    """
    return _GatheredDots.apply(anchor, memory, index, changing)


class _GatheredDots(torch.autograd.Function):
    """gathered_dots: memory rows are gathered chunk by chunk, forward and backward, so no (b, 1 + K, d) tensor is
    made nor saved (2.1 GB at b = 256, K = 16384, d = 128). memory is held by reference, not saved: its in-place
    update would fail the saved tensors' version check. Backward gathers the rows as they are then and adds, for the
    `changing` ones, their change back to the copy taken here (_changed_rows)."""

    @staticmethod
    def forward(ctx, anchor: Tensor, memory: Tensor, index: Tensor, changing: Optional[Tensor]) -> Tensor:
        ctx.memory, ctx.index, ctx.changing = memory, index, changing
        ctx.before = None if changing is None else memory[changing]  # a copy: (B, d)
        dots = anchor.new_empty(index.shape)
        for chunk, rows in _gathered(memory, index):
            torch.bmm(rows.to(anchor.dtype), anchor[chunk, :, None], out=dots[chunk, :, None])
        return dots

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Optional[Tensor], None, None, None]:
        grad_anchor = grad.new_empty(len(grad), ctx.memory.shape[1])
        for chunk, rows in _gathered(ctx.memory, ctx.index):
            torch.bmm(grad[chunk, None, :], rows.to(grad.dtype), out=grad_anchor[chunk, None, :])
        if ctx.changing is not None and len(ctx.changing) > 0:
            grad_anchor += _changed_rows(ctx, grad)
        return grad_anchor, None, None, None


def _gathered(memory: Tensor, index: Tensor) -> Iterator[tuple[slice, Tensor]]:
    """(rows of index, memory[those rows of index]) for chunks of index's rows whose memory rows take at most
    GATHER_BYTES (one row at least), gathered into one buffer: on the CPU a new tensor per chunk is several times
    slower (fresh memory to fault in each time)."""
    size = max(1, min(len(index), GATHER_BYTES // (index[0].numel() * memory[0].nbytes)))
    buffer = memory.new_empty(size * index.shape[1], memory.shape[1])
    for start in range(0, len(index), size):
        part = index[start:start + size]
        rows = torch.index_select(memory, 0, part.flatten(), out=buffer[:part.numel()])
        yield slice(start, start + size), rows.view(*part.shape, memory.shape[1])


def _changed_rows(ctx: Any, grad: Tensor) -> Tensor:
    """sum_j grad_ij (row before - row now) over the candidates j among `changing`: what backward's gather from the
    updated memory misses. Small tensors only: (b, 1 + K) weights, summed per changing row, times (B, d) changes."""
    changing, order = ctx.changing.sort()
    found = torch.searchsorted(changing, ctx.index).clamp_max_(len(changing) - 1)
    weights = torch.where(changing[found] == ctx.index, grad, 0)  # repeats in changing: the first, same values
    per_row = grad.new_zeros(len(grad), len(changing)).scatter_add_(1, found, weights)
    change = (ctx.before - ctx.memory[ctx.changing])[order].to(grad.dtype)
    return per_row @ change


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
        self.pool_draws, self.pool_spare = pool.draws, pool.spare

    def pool(self) -> NegativePool:
        """The negatives' layout made in build, on the criterion's device."""
        return NegativePool(self.pool_labels, self.pool_by_class, self.pool_starts, self.pool_counts,
                            self.pool_distinct, self.num_negatives, self.pool_draws, self.pool_spare)

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
        # Under torchrun every rank applies the whole batch's rows, so the banks stay the same on all ranks.
        sizes = distributed.shard_sizes(batch_size)  # known on every rank: no count is exchanged
        updated = distributed.gather_rows(index, sizes=sizes)[0] if self.training else None
        dots_s, dots_t = self.dots(anchor_student, anchor_teacher, contrast_index, updated)
        scores_s = torch.exp(dots_s / self.temperature)
        scores_t = torch.exp(dots_t / self.temperature)
        # Z = N * the mean score over the whole batch: the ranks' sums added and divided by the global count, so
        # every rank fixes the one-process Z (a mean of the ranks' means would weigh unequal shares wrongly).
        sums = distributed.sum_(torch.stack([scores_s.sum(), scores_t.sum()]).detach())
        estimate = sums / (batch_size * contrast_index.shape[1]) * num_data
        normalizers = torch.where(self.normalizers < 0, estimate.to(self.normalizers.dtype), self.normalizers)
        self.normalizers.copy_(normalizers)
        loss = nce_loss(scores_s / normalizers[0], num_data) + nce_loss(scores_t / normalizers[1], num_data)
        if self.training:
            with torch.no_grad():
                anchor_student, anchor_teacher = distributed.gather_rows(anchor_student, anchor_teacher, sizes=sizes)
                if num_data >= LARGE_DATA:  # in place: gathered_dots kept the rows it overwrites
                    momentum_update_(self.memory_student, updated, anchor_student, self.momentum)
                    momentum_update_(self.memory_teacher, updated, anchor_teacher, self.momentum)
                else:  # new tensors: the products in dots keep the old banks for backward
                    self.memory_student = momentum_update(self.memory_student, updated, anchor_student, self.momentum)
                    self.memory_teacher = momentum_update(self.memory_teacher, updated, anchor_teacher, self.momentum)
        return loss

    def dots(self, anchor_student: Tensor, anchor_teacher: Tensor, contrast_index: Tensor,
             updated: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """<anchor, memory row> of each anchor and its 1 + K candidates, against the other side's memory."""
        if len(self.pool_labels) >= LARGE_DATA:
            # The (b, 1 + K) rows gathered in chunks: 78 times fewer FLOPs than the (b, N) product at ImageNet size.
            return (gathered_dots(anchor_student, self.memory_teacher, contrast_index, updated),
                    gathered_dots(anchor_teacher, self.memory_student, contrast_index, updated))
        # All N dot products at once, then the 1 + K picked: a (b, N) product is smaller than the
        # (b, 1 + K, feat_dim) memory rows RepDistiller gathers, and gives the same scores.
        memory_t, memory_s = self.memory_teacher.to(anchor_student.dtype), self.memory_student.to(anchor_teacher.dtype)
        return (anchor_student @ memory_t.t()).gather(1, contrast_index), (anchor_teacher @ memory_s.t()).gather(
            1, contrast_index)
