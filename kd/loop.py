"""The training loop: one epoch of training (`train_one_epoch`, `train_step`), evaluation (`predict`, `score`) and
the `Job` they read (the models, criterion, optimizer, data path and settings of a run).

The loop asks the data path (kd.datapath: in memory, or streamed from disk) for the epoch's batches of views, runs
the student (and the teacher, live or from the teacher-output cache), and sums the criterion's terms; it never learns
which method, data path or phase it runs. `kd.engine` builds a Job and drives the epochs around it.
"""
import math
import time
from collections import defaultdict
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm

from kd import distributed, teachers
from kd.datapath import Batch, DataPath
from kd.feedback import Progress
from kd.methods.base import Criterion, Step
from kd.methods.hooks import capture
from kd.teacher_cache import StoredEpoch, TeacherCache


@dataclass
class Job:
    """Everything an epoch needs, so the loop functions take one argument instead of twelve."""

    model: nn.Module  # the trained network itself: what is evaluated and saved
    teacher: Optional[nn.Module]
    criterion: Criterion
    optimizer: Optimizer
    scheduler: LRScheduler
    data: DataPath
    seed: int
    batch_size: int
    eval_batch_size: int
    progress_bar: bool
    teacher_predictions: dict[str, Tensor] = field(default_factory=dict)  # teacher argmax on test/val: agreement
    forward: Optional[Callable[[Tensor], Tensor]] = None  # the model as trained: compiled and/or DDP-wrapped
    amp_dtype: Optional[torch.dtype] = None  # autocast dtype; None = fp32
    scaler: Optional[torch.amp.GradScaler] = None  # loss scaling for fp16 (a no-op otherwise)
    cache: Optional[TeacherCache] = None
    progress: Optional[Progress] = None  # plain progress lines, where no progress bar is shown (a log file)

    def autocast(self) -> ContextManager:
        return autocast(self.data.device, self.amp_dtype)


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager:
    """Mixed precision in `dtype` on `device`; a no-op for dtype None (fp32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs


def training_forward(job: Job, compile_mode: Optional[str]) -> Callable[[Tensor], Tensor]:
    """The model as the training step calls it: DDP-wrapped under torchrun, torch.compile'd in `compile_mode` (None:
    eager). Static shapes: a dynamic-shape graph, made when the last batch is shorter, would serve every later step."""
    device = job.data.device
    forward: Callable[[Tensor], Tensor] = job.model
    if distributed.world_size() > 1:
        # No buffer broadcast before each forward: rank 0's buffers are given to all ranks once per epoch, before
        # evaluation (distributed.broadcast_buffers), which is what the evaluated and saved model needs.
        forward = nn.parallel.DistributedDataParallel(job.model, device_ids=[device] if device.type == "cuda" else None,
                                                      broadcast_buffers=False)
    if compile_mode is not None:
        if job.criterion.layers() != ([], []):
            raise ValueError("compile=true with a loss that reads features (forward hooks) is not supported: "
                             "set compile=false.")
        if compile_mode in CUDA_GRAPH_MODES and device.type != "cuda":
            raise ValueError(f"compile_mode={compile_mode} captures CUDA graphs, which need a CUDA device: use "
                             "compile_mode=default (or max-autotune-no-cudagraphs) here.")
        if compile_mode in CUDA_GRAPH_MODES and distributed.world_size() > 1:
            raise ValueError(f"compile_mode={compile_mode} (CUDA graphs) is not supported under torchrun: use "
                             "compile_mode=default.")
        forward = torch.compile(forward, dynamic=False, mode=compile_mode)
    return forward


def run_epoch(job: Job, epoch: int) -> dict[str, Any]:
    """One epoch of training and its evaluation, as one flat, namespaced metrics dict."""
    started = time.perf_counter()
    metrics: dict[str, Any] = {"epoch": epoch, "lr": job.optimizer.param_groups[0]["lr"]}
    metrics.update(_prefixed("train", train_one_epoch(job, epoch)))
    job.scheduler.step()
    metrics["time/train_s"] = time.perf_counter() - started
    distributed.broadcast_buffers(job.model)  # every rank evaluates the model rank 0 saves
    for split in job.data.splits:
        logits = predict(job.model, job.data, split, job.eval_batch_size, job.amp_dtype)
        reference = job.teacher_predictions.get(split)
        metrics.update(_prefixed(split, score(logits, job.data.split_labels(split), reference)))
    metrics["time/epoch_s"] = time.perf_counter() - started
    if job.progress is not None:
        job.progress.epoch_s = metrics["time/epoch_s"]  # the ETA's length of the epochs to come
    return metrics


def train_one_epoch(job: Job, epoch: int) -> dict[str, float]:
    """One pass over the augmented training set; returns per-image averages of the loss terms and top-1.

    Every rank draws the same global batch and the same augmentation from (seed, epoch), then trains on its
    share of it: the views, and so the results, do not depend on the number of processes.
    """
    job.model.train()
    sums = EpochSums(job.data.device)
    teacher = EpochTeacher(job, epoch)
    student_layers, _ = job.criterion.layers()
    steps = math.ceil(job.data.num_train / job.batch_size)
    loader = tqdm(job.data.epoch(job.seed, epoch, job.batch_size), total=steps, desc=f"epoch {epoch}",
                  disable=not job.progress_bar, leave=False)
    if job.progress is not None:
        job.progress.start(epoch, steps)
    with capture(job.model, student_layers) if student_layers else nullcontext({}) as student_features:
        for step, batch in enumerate(loader):
            teacher.seen += batch.size
            if batch.size < distributed.world_size():
                continue  # a last batch too small to give every rank a sample (all ranks skip it)
            train_step(job, StepContext(teacher, student_features, sums, epoch, step), batch)
            if job.progress is not None:
                job.progress.step(step + 1, batch.size)
    teacher.finish()
    return sums.averages(epoch)


@dataclass
class StepContext:
    """What a training step reads besides its batch: the epoch's teacher, the hooked student features, the sums."""

    teacher: "EpochTeacher"
    student_features: dict[str, Tensor]
    sums: "EpochSums"
    epoch: int
    step: int


def train_step(job: Job, context: StepContext, batch: Batch) -> None:
    """One optimisation step on this rank's share of a global batch. Nothing here reads a value back to the host, so
    on a GPU the CPU queues the next steps while this one runs (tests/test_hot_path.py counts such reads: none)."""
    images, labels = job.data.inputs(batch.views), batch.labels
    with job.autocast():
        logits = job.forward(images)
        teacher_logits, teacher_features = context.teacher(images, batch.rows)
        terms = job.criterion(Step(logits, labels, teacher_logits, dict(context.student_features), teacher_features,
                                   batch.index, context.epoch, context.step, job.seed, batch.size))
        loss = sum(terms.values())
    optimize(job, loss)
    context.sums.add(context.step, loss, terms, logits, labels)


class EpochSums:
    """Per-image sums of the loss terms and top-1 over an epoch, kept on the device (no host read per step)."""

    def __init__(self, device: torch.device):
        self.sums: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=device))
        self.first_bad_step = torch.full((), math.inf, device=device)

    def add(self, step: int, loss: Tensor, terms: dict[str, Tensor], logits: Tensor, labels: Tensor) -> None:
        # The first non-finite step is tracked on the device and reported when the epoch ends.
        bad = self.first_bad_step
        self.first_bad_step = torch.where(torch.isfinite(loss), bad, bad.clamp(max=step))
        for name, value in {"loss": loss, **terms}.items():
            self.sums[name] += value.detach().float() * len(labels)
        self.sums["acc1"] += (logits.argmax(1) == labels).sum() * 100.0
        self.sums["count"] += len(labels)

    def averages(self, epoch: int) -> dict[str, float]:
        return epoch_averages(self.sums, self.first_bad_step, epoch)


def optimize(job: Job, loss: Tensor) -> None:
    """Backward and step; adapter gradients are averaged over ranks (DDP averages the model's)."""
    job.optimizer.zero_grad(set_to_none=True)
    job.scaler.scale(loss).backward()
    if distributed.world_size() > 1:
        for parameter in job.criterion.parameters():
            if parameter.grad is not None:
                distributed.sum_(parameter.grad).div_(distributed.world_size())
    job.scaler.step(job.optimizer)
    job.scaler.update()


def epoch_averages(sums: dict[str, Tensor], first_bad_step: Tensor, epoch: int) -> dict[str, float]:
    """Per-image averages over all ranks; stop on the first non-finite step."""
    names = sorted(sums)
    totals = distributed.sum_(torch.stack([sums[name] for name in names]))
    if math.isfinite(bad := distributed.min_(first_bad_step).item()):
        kept = f"the last checkpoint is from epoch {epoch - 1}" if epoch > 1 else "no checkpoint was written"
        raise FloatingPointError(
            f"non-finite training loss at epoch {epoch}, step {int(bad)}: stopped; {kept}. "
            "Lower the learning rate or check the inputs."
        )
    totals = dict(zip(names, totals.tolist()))
    count = totals.pop("count")
    return {name: total / count for name, total in totals.items()}


class EpochTeacher:
    """The teacher's outputs for one epoch's views: read from the teacher cache, or computed live (and then
    stored in the cache for the next job). Rows are numbered in the order the epoch visits the samples."""

    def __init__(self, job: Job, epoch: int):
        self.job, self.epoch, self.seen = job, epoch, 0
        self.active = job.teacher is not None and job.criterion.needs_teacher
        stored = job.cache.load(epoch) if self.active and job.cache is not None else None
        # The epoch stays in host memory; on a GPU each chunk of it is copied over while the steps before it run,
        # so a step slices rows already there (no copy per step) and the device holds two chunks, not the epoch.
        self.stored = StoredEpoch(stored, job.data.device, job.batch_size) if stored is not None else None
        self.recording = None
        if self.active and job.cache is not None and self.stored is None and not job.cache.full:
            self.recording = job.cache.recorder(job.data.device, job.batch_size)
        self.layers = job.criterion.layers()[1]

    def __call__(self, images: Tensor, rows: slice) -> tuple[Optional[Tensor], dict[str, Tensor]]:
        """(logits, features) for this rank's images, which are `rows` of the epoch's order."""
        if not self.active:
            return None, {}
        if self.stored is not None:
            return self.stored.rows(rows), {}
        # Eval mode (set at load) makes the targets a fixed function of the view: BN uses running statistics.
        # inference_mode: no graph or saved activations for a network that is never updated.
        hooks = capture(self.job.teacher, self.layers) if self.layers else nullcontext({})
        with torch.inference_mode(), hooks as features:
            logits = self.job.teacher(images)
        # float32 copies: normal tensors again (the loss may save them for backward), and the same dtype as the
        # cache hands out, so live and cached teacher logits are the same numbers under every precision.
        logits = logits.to(torch.float32, copy=True)
        if self.recording is not None:
            self.recording.write(rows, logits)
        return logits, {name: value.clone() for name, value in features.items()}

    def finish(self) -> None:
        if self.recording is not None and self.seen == self.job.cache.shape[0]:
            self.job.cache.save(self.epoch, self.recording.outputs())


@torch.inference_mode()
def predict(
    model: nn.Module, data: DataPath, split: str, batch_size: int, amp_dtype: Optional[torch.dtype] = None
) -> Tensor:
    """Logits (float32) for a whole split, in order, in eval mode, with the split's evaluation views.

    Under torchrun each rank predicts its share and the shares are summed into place, so every sample is
    counted exactly once and every rank holds all the logits.
    """
    was_training = model.training
    model.eval()
    evaluated = folded(model)
    with autocast(data.device, amp_dtype):
        parts = [evaluated(data.inputs(views)).float() for views in data.evaluation(split, batch_size)]
    model.train(was_training)
    if distributed.world_size() == 1:
        return torch.cat(parts)
    n = len(data.split_labels(split))
    logits = torch.zeros(n, parts[0].shape[1], device=data.device)
    logits[distributed.shard(n)] = torch.cat(parts)
    return distributed.sum_(logits)


def folded(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with each BatchNorm after a convolution folded into it (teachers.fold_batchnorm):
    the same function to float32 rounding, a quarter less evaluation time for a CIFAR ResNet on the CPU. `model`
    itself when nothing folds (no BatchNorm, or a forward torch.fx cannot trace)."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    copy = deepcopy(model)
    return copy if teachers.fold_batchnorm(copy, quiet=True) else model


def score(logits: Tensor, labels: Tensor, reference: Optional[Tensor]) -> dict[str, float]:
    """Loss, top-1 and top-5 (%) of logits; agreement (%) of their argmax with a reference model's."""
    metrics = {"loss": nn.functional.cross_entropy(logits.float(), labels).item()}
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    metrics["acc1"] = (top[:, 0] == labels).float().mean().item() * 100
    metrics["acc5"] = (top == labels[:, None]).any(1).float().mean().item() * 100
    if reference is not None:
        metrics["agreement"] = (top[:, 0] == reference).float().mean().item() * 100
    return metrics


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{key}": value for key, value in metrics.items()}

