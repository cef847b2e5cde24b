"""The training engine: `run(cfg, out_dir)` trains the teacher or the student that `cfg.phase` names.

Flow: check the config -> return out_dir's result.json if this run finished there, or resume from its
last.pt -> (student) find, load and check the teacher -> load data -> train epoch by epoch, evaluating on
test (and validation) after each -> records in out_dir, W&B, the teacher store.
"""
import json
import logging
import math
import os
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm

from kd import distributed, records, teachers, tracking
from kd.config import Phase
from kd.data import Split, augment, batches, epoch_generator, hold_out, normalize
from kd.features import capture
from kd.losses import CELoss, Criterion, Step
from kd.teacher_cache import DTYPES, TeacherCache

log = logging.getLogger(__name__)


@dataclass
class Data:
    """The decoded splits on the compute device, and how training batches are augmented and normalised."""

    train: Split
    val: Optional[Split]
    test: Split
    mean: Tensor
    std: Tensor
    crop_padding: int
    hflip: bool
    channels_last: bool = False

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def inputs(self, images: Tensor) -> Tensor:
        """Network inputs: normalised floats, in NHWC memory order when channels_last is on."""
        x = normalize(images, self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@dataclass
class Job:
    """Everything an epoch needs, so the loop functions take one argument instead of twelve."""

    model: nn.Module  # the trained network itself: what is evaluated and saved
    teacher: Optional[nn.Module]
    criterion: Criterion
    optimizer: Optimizer
    scheduler: LRScheduler
    data: Data
    seed: int
    batch_size: int
    eval_batch_size: int
    progress_bar: bool
    teacher_predictions: dict[str, Tensor] = field(default_factory=dict)  # teacher argmax on test/val: agreement
    forward: Optional[Callable[[Tensor], Tensor]] = None  # the model as trained: compiled and/or DDP-wrapped
    amp_dtype: Optional[torch.dtype] = None  # autocast dtype; None = fp32
    scaler: Optional[torch.amp.GradScaler] = None  # loss scaling for fp16 (a no-op otherwise)
    cache: Optional[TeacherCache] = None

    def autocast(self) -> ContextManager:
        return autocast(self.data.mean.device, self.amp_dtype)


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager:
    """Mixed precision in `dtype` on `device`; a no-op for dtype None (fp32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def run(cfg: DictConfig, out_dir: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train the phase's model, write metrics.jsonl, checkpoints and result.json into out_dir; return the result.

    Re-running into the same out_dir resumes from its last.pt, or returns its result.json when it finished.
    Under torchrun every rank trains its share of each batch; rank 0 alone logs and writes.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    check_config(cfg)
    finished, checkpoint = previous_run(cfg, out_dir)
    if finished is not None:
        log.info("%s already holds this run's result.json: returning it without training again", out_dir)
        return finished
    job, summary = set_up(cfg, overrides)
    if checkpoint is not None:
        restore(job, checkpoint)
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
    tracker = tracking.start(cfg, out_dir, checkpoint.get("wandb_id") if checkpoint else None)
    try:
        tracker.summary.update(summary)
        result = {**summary, **fit(job, cfg, out_dir, tracker, checkpoint)}
        if job.cache is not None:
            result.update(teacher_cache_summary(job.cache))
        tracker.summary.update(result)
    except BaseException:
        tracker.finish(exit_code=1)  # else the next job of a multirun would log into this run
        raise
    tracker.finish()
    if not distributed.is_main():
        return result
    if Phase(cfg.phase) is Phase.teacher:
        result["teacher_checkpoint"] = str(teachers.save_to_store(cfg, job.model, result, out_dir))
    result.update(wall_time_s=time.perf_counter() - started, env=records.environment(job.data.mean.device))
    result.update(resumed_from_epoch=checkpoint["epoch"] if checkpoint else None, world_size=distributed.world_size())
    result["config"] = records.plain_config(cfg)
    records.write_json(out_dir / "result.json", result)
    return result


def set_up(cfg: DictConfig, overrides: Sequence[str]) -> tuple[Job, dict[str, Any]]:
    """Everything before the first epoch, cheapest checks first: criterion, teacher, data, model; the run's facts."""
    phase = Phase(cfg.phase)
    configure_determinism(cfg.deterministic)
    device = resolve_device(cfg.device)
    criterion = instantiate(cfg.loss) if phase is Phase.student else CELoss()  # the loss checks its values
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    teacher_path, teacher_payload = None, None
    if phase is Phase.student:
        teacher_path = find_or_train_teacher(cfg, criterion.needs_teacher, overrides)
    if teacher_path is not None:  # read and checked before any data is decoded
        teacher_payload = teachers.read(teacher_path, cfg.teacher)
    # gloo DDP with NHWC gradients and several CPU threads corrupts the heap (torch 2.14, reproduced with
    # torchrun and OMP_NUM_THREADS=2): data-parallel CPU runs keep NCHW.
    channels_last = cfg.channels_last and not (distributed.world_size() > 1 and device.type == "cpu")
    data = load_data(cfg.dataset, device, channels_last)
    teacher = frozen_teacher(teacher_payload, cfg.teacher, data) if teacher_payload is not None else None
    job = build_job(cfg, phase, criterion, data, device, teacher)
    summary = {"phase": phase.value, "params": records.count_parameters(job.model)}
    summary["adapter_params"] = records.count_parameters(job.criterion)
    image_shape = tuple(data.test.images.shape[1:])
    summary["flops_per_image"] = records.forward_flops(job.model, image_shape, device)
    if cfg.profile:
        summary.update(records.profile_model(job.model, image_shape, cfg.batch_size, device))
    if teacher is not None:
        summary.update(check_teacher(job, cfg, teacher_path, teacher_payload["metrics"]))
        job.cache = open_teacher_cache(cfg, job, teacher_path)
    return job, summary


def frozen_teacher(payload: dict[str, Any], model_cfg: DictConfig, data: Data) -> nn.Module:
    """The teacher as the student phase runs it: eval mode, no gradients, the data's memory format, and each
    BatchNorm after a convolution folded into it (in eval mode it is an affine map)."""
    teacher = teachers.build(payload, model_cfg, data.mean.device).to(memory_format=data.memory_format)
    teachers.fold_batchnorm(teacher)
    return teacher


# Keys that change nothing a run computes: a run folder may be resumed with other values of these.
RESULT_NEUTRAL = (
    "logger", "device", "progress_bar", "threads", "profile", "eval_batch_size", "teacher_store",
    "teacher_lock_timeout_s", "train_missing_teacher", "teacher_acc_tolerance",
    *(f"dataset.source.{key}" for key in teachers.SOURCE_NEUTRAL),
    # float32 cache entries are bit-exact, so reading the teacher from the cache or live gives the same run.
    "teacher_cache", "teacher_cache_dir", "teacher_cache_max_gb",
)
# A teacher run never reads these (a teacher trained on demand carries its student's values).
TEACHER_PHASE_NEUTRAL = ("loss", "student", "teacher_seed", "teacher_checkpoint", "pair_hparams", "teacher_cache_dtype")
# What last.pt must hold to resume a run exactly.
RESUME_KEYS = ("model", "criterion", "optimizer", "scheduler", "scaler", "epoch", "metrics", "best", "rng", "config")


def previous_run(cfg: DictConfig, out_dir: Path) -> tuple[Optional[dict], Optional[dict]]:
    """(result, None) when out_dir holds this run finished, (None, last.pt) when interrupted, else (None, None)."""
    result_file, last = out_dir / "result.json", out_dir / "last.pt"
    if result_file.is_file():
        result = json.loads(result_file.read_text())
        check_same_config(cfg, result["config"], result_file)
        return result, None
    if not last.is_file():
        return None, None
    try:
        checkpoint = records.load_checkpoint(last, RESUME_KEYS)
    except records.UnusableCheckpoint as error:
        raise records.UnusableCheckpoint(
            f"cannot resume: {error} Delete it to start this run over in {out_dir}, or pick another hydra.run.dir."
        ) from None
    check_same_config(cfg, checkpoint["config"], last)
    log.info("resuming %s after epoch %d of %d", out_dir, checkpoint["epoch"], cfg.epochs)
    return None, checkpoint


def check_same_config(cfg: DictConfig, recorded: dict[str, Any], source: Path) -> None:
    """Refuse to resume or reuse a run folder that another config wrote, naming the keys that differ."""
    ignored = RESULT_NEUTRAL + (TEACHER_PHASE_NEUTRAL if Phase(cfg.phase) is Phase.teacher else ())
    differences = records.config_differences(recorded, records.plain_config(cfg), ignored)
    if differences:
        raise ValueError(
            f"{source} was written by another config (recorded -> now: {'; '.join(differences)}). Use another "
            "run folder (hydra.run.dir / hydra.sweep.dir), or delete that one to start over."
        )


def restore(job: Job, checkpoint: dict[str, Any]) -> None:
    """Put the model, optimizer, schedule and global RNG back as they were when last.pt was written."""
    job.model.load_state_dict(checkpoint["model"])
    job.criterion.load_state_dict(checkpoint["criterion"])  # adapters (FitNet regressor, CRD embeddings, memory)
    job.optimizer.load_state_dict(checkpoint["optimizer"])
    job.scaler.load_state_dict(checkpoint["scaler"])
    job.scheduler.load_state_dict(checkpoint["scheduler"])
    # Batches come from epoch_generator; the global RNG matters only to models with dropout.
    torch.set_rng_state(checkpoint["rng"]["cpu"])
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index, state in enumerate(checkpoint["rng"]["cuda"][:visible]):
        torch.cuda.set_rng_state(state, index)


def configure_determinism(deterministic: bool) -> None:
    """deterministic=true: repeatable kernels (errors where none exists), no cuDNN autotuning; false: autotuning."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts, so before CUDA work
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic  # autotuning picks the fastest kernels, not the same ones


def find_or_train_teacher(cfg: DictConfig, required: bool, overrides: Sequence[str]) -> Optional[Path]:
    """The student's teacher checkpoint; with train_missing_teacher=true a missing one is trained first, once."""
    try:
        return teachers.resolve(cfg, required, list(overrides))
    except teachers.MissingTeacher as missing:
        if not cfg.train_missing_teacher:
            raise
        if distributed.world_size() > 1:  # rank 0 would hold the lock while the others wait on it
            raise ValueError(f"{missing}\ntrain_missing_teacher=true does not work under torchrun: train the teacher "
                             "first (phase=teacher, under torchrun too if you like).") from None
        with teachers.store_lock(missing.entry, cfg.teacher_lock_timeout_s):
            if not (missing.entry / "manifest.json").is_file():  # a parallel job may have filed it meanwhile
                log.info("training the missing teacher into %s", missing.entry)
                run(teachers.teacher_config(cfg), missing.entry / "run")
        return missing.entry / "teacher.pt"


def check_config(cfg: DictConfig) -> None:
    """Reject values no run can use, before any work starts."""
    problems = []
    if cfg.epochs < 1:
        problems.append(f"epochs={cfg.epochs}: need at least 1")
    if cfg.batch_size < 1 or cfg.eval_batch_size < 1:
        problems.append(f"batch_size={cfg.batch_size}, eval_batch_size={cfg.eval_batch_size}: need at least 1")
    for role in ("teacher", "student"):
        if not cfg[role].width > 0:  # also catches NaN
            problems.append(f"{role}.width={cfg[role].width}: the width multiplier must be > 0 (1 = standard)")
    if not 0.0 <= cfg.dataset.val_fraction < 1.0:
        problems.append(f"dataset.val_fraction={cfg.dataset.val_fraction}: must be in [0, 1)")
    if cfg.logger.mode not in tracking.MODES:
        problems.append(f"logger.mode={cfg.logger.mode}: must be one of {', '.join(tracking.MODES)}")
    if cfg.teacher_cache_dtype not in DTYPES:
        problems.append(f"teacher_cache_dtype={cfg.teacher_cache_dtype}: must be one of {', '.join(DTYPES)}")
    if cfg.precision != "auto" and cfg.precision not in PRECISIONS:
        problems.append(f"precision={cfg.precision}: must be auto, {', '.join(PRECISIONS)}")
    if not cfg.logger.init_timeout_s > 0:
        problems.append(f"logger.init_timeout_s={cfg.logger.init_timeout_s}: must be > 0 (seconds)")
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))


def resolve_device(name: str) -> torch.device:
    """device=auto picks CUDA when present (this rank's GPU under torchrun), else the CPU; a named one must exist."""
    if name == "auto":
        return torch.device(f"cuda:{distributed.local_rank()}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but no CUDA device is visible: use device=auto or device=cpu.")
    return device


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype: precision=auto is bf16 on CUDA (fast, no loss scaling) and fp32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name not in PRECISIONS:
        raise ValueError(f"precision={name}: must be auto, {', '.join(PRECISIONS)}.")
    return PRECISIONS[name]


def load_data(dataset_cfg: DictConfig, device: torch.device, channels_last: bool = False) -> Data:
    """Decode the dataset, hold out the validation split, and move everything to the device once."""
    splits = instantiate(dataset_cfg.source)
    if len(splits.classes) != dataset_cfg.num_classes:
        raise ValueError(
            f"dataset.num_classes={dataset_cfg.num_classes} but the data has {len(splits.classes)} classes: "
            f"set dataset.num_classes={len(splits.classes)}."
        )
    train, val = hold_out(splits.train, dataset_cfg.val_fraction, dataset_cfg.split_seed)
    stats = [torch.tensor(list(v), device=device).view(1, -1, 1, 1) for v in (dataset_cfg.mean, dataset_cfg.std)]
    return Data(
        train.to(device), val.to(device) if val is not None else None, splits.test.to(device),
        *stats, dataset_cfg.crop_padding, dataset_cfg.hflip, channels_last,
    )


def build_job(
    cfg: DictConfig, phase: Phase, criterion: Criterion, data: Data, device: torch.device,
    teacher: Optional[nn.Module] = None,
) -> Job:
    """Seed, build the trained model, bind the criterion to both models (its adapters), optimizer, schedule,
    precision and the forward the training step calls."""
    torch.manual_seed(cfg.seed)
    model = instantiate(cfg.student if phase is Phase.student else cfg.teacher)
    model = model.to(device, memory_format=data.memory_format)
    criterion.bind(model, teacher, data.inputs(data.train.images[:2]), data.train.labels)
    criterion.to(device)
    # Adapters (regressors, embeddings) train with the student, under the same optimizer settings.
    optimizer = instantiate(cfg.optimizer)([*model.parameters(), *criterion.parameters()])
    scheduler = instantiate(cfg.scheduler)(optimizer)
    progress = cfg.progress_bar if cfg.progress_bar is not None else _stderr_is_terminal()
    amp_dtype = resolve_precision(cfg.precision, device)
    job = Job(
        model, teacher, criterion, optimizer, scheduler, data, cfg.seed, cfg.batch_size, cfg.eval_batch_size,
        progress, amp_dtype=amp_dtype, scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
    )
    job.forward = training_forward(job, cfg.compile)
    return job


def check_teacher(job: Job, cfg: DictConfig, path: Path, recorded: dict[str, Any]) -> dict[str, Any]:
    """Measure the frozen teacher on this data, and refuse it when that disagrees with its record."""
    measured = {}
    for name, split in (("test", job.data.test), ("val", job.data.val)):
        if split is not None:
            logits = predict(job.teacher, split, job.data, job.eval_batch_size, job.amp_dtype)
            measured[name] = score(logits, split.labels, None)
            job.teacher_predictions[name] = logits.argmax(1)
    gap = abs(measured["test"]["acc1"] - recorded["test/acc1"])
    if gap > cfg.teacher_acc_tolerance:
        raise ValueError(
            f"teacher {path} scores {measured['test']['acc1']:.2f}% test top-1 here but {recorded['test/acc1']:.2f}% "
            f"when it was trained (more than teacher_acc_tolerance={cfg.teacher_acc_tolerance}): wrong checkpoint, "
            "dataset or normalization."
        )
    log.info("teacher %s: test top-1 %.2f (recorded %.2f)", path, measured["test"]["acc1"], recorded["test/acc1"])
    summary = {f"teacher/{name}/{key}": value for name, m in measured.items() for key, value in m.items()}
    return {**summary, "teacher/acc1": measured["test"]["acc1"], "teacher_checkpoint": str(path)}


def open_teacher_cache(cfg: DictConfig, job: Job, teacher_path: Path) -> Optional[TeacherCache]:
    """The cache entry for this teacher, data seed, data and numerics; None when the cache cannot serve the run."""
    if not cfg.teacher_cache or not job.criterion.needs_teacher:
        return None
    if job.criterion.layers()[1]:
        log.info("teacher cache off: the loss reads the teacher's features, and only logits are cached")
        return None
    if distributed.world_size() > 1:
        log.info("teacher cache off: not used under torchrun (each rank runs the teacher on its share)")
        return None
    key = {
        "teacher_sha256": records.sha256_file(teacher_path), "teacher": records.plain_config(cfg.teacher),
        # which views, in which order:
        "dataset": teachers.dataset_identity(cfg.dataset), "seed": cfg.seed, "batch_size": cfg.batch_size,
        # the numerics of the teacher pass:
        "precision": str(job.amp_dtype), "channels_last": job.data.channels_last, "batchnorm_folded": True,
        "device": job.data.mean.device.type, "torch": torch.__version__,
    }
    root = Path(cfg.teacher_cache_dir) if cfg.teacher_cache_dir else Path(teacher_path).parent / "outputs_cache"
    shape = (len(job.data.train), cfg.dataset.num_classes)
    return TeacherCache(root, key, shape, cfg.teacher_cache_dtype, cfg.teacher_cache_max_gb * 1e9)


def teacher_cache_summary(cache: TeacherCache) -> dict[str, Any]:
    return {"teacher_cache/hits": cache.hits, "teacher_cache/misses": cache.misses,
            "teacher_cache/bytes": cache.size_bytes(), "teacher_cache/dir": str(cache.dir)}


def training_forward(job: Job, compile_model: bool) -> Callable[[Tensor], Tensor]:
    """The model as the training step calls it: DDP-wrapped under torchrun, torch.compile'd when asked."""
    forward: Callable[[Tensor], Tensor] = job.model
    if distributed.world_size() > 1:
        device = job.data.mean.device
        forward = nn.parallel.DistributedDataParallel(job.model, device_ids=[device] if device.type == "cuda" else None)
    if compile_model:
        if job.criterion.layers() != ([], []):
            raise ValueError("compile=true with a loss that reads features (forward hooks) is not supported: "
                             "set compile=false.")
        forward = torch.compile(forward)
    return forward


def fit(job: Job, cfg: DictConfig, out_dir: Path, tracker, checkpoint: Optional[dict] = None) -> dict[str, Any]:
    """The epoch loop: train, step the schedule, evaluate, record; keep last.pt and best.pt; resume after last.pt."""
    best_key = "val/acc1" if job.data.val is not None else "test/acc1"
    metrics_file = out_dir / "metrics.jsonl"
    done = checkpoint["epoch"] if checkpoint else 0
    metrics, best = (checkpoint["metrics"], checkpoint["best"]) if checkpoint else (None, None)
    main = distributed.is_main()
    if main:
        records.keep_epochs(metrics_file, done)  # drop lines an interrupted run wrote after its last checkpoint
    for epoch in range(done + 1, cfg.epochs + 1):
        metrics = run_epoch(job, epoch)
        best = metrics if best is None or metrics[best_key] > best[best_key] else best
        tracker.log(metrics, step=epoch)
        log.info(epoch_line(metrics, cfg.epochs))
        if main:
            records.append_jsonl(metrics_file, metrics)
            save_checkpoints(job, cfg, out_dir, metrics, best, tracker.id)
    return summarize(metrics, best, best_key)


def run_epoch(job: Job, epoch: int) -> dict[str, Any]:
    """One epoch of training and its evaluation, as one flat, namespaced metrics dict."""
    started = time.perf_counter()
    metrics: dict[str, Any] = {"epoch": epoch, "lr": job.optimizer.param_groups[0]["lr"]}
    metrics.update(_prefixed("train", train_one_epoch(job, epoch)))
    job.scheduler.step()
    metrics["time/train_s"] = time.perf_counter() - started
    distributed.broadcast_buffers(job.model)  # every rank evaluates the model rank 0 saves
    for name, split in (("val", job.data.val), ("test", job.data.test)):
        if split is not None:
            logits = predict(job.model, split, job.data, job.eval_batch_size, job.amp_dtype)
            metrics.update(_prefixed(name, score(logits, split.labels, job.teacher_predictions.get(name))))
    metrics["time/epoch_s"] = time.perf_counter() - started
    return metrics


def train_one_epoch(job: Job, epoch: int) -> dict[str, float]:
    """One pass over the augmented training set; returns per-image averages of the loss terms and top-1.

    Every rank draws the same global batch and the same augmentation from (seed, epoch), then trains on its
    share of it: the views, and so the results, do not depend on the number of processes.
    """
    job.model.train()
    device = job.data.mean.device
    generator = epoch_generator(job.seed, epoch)  # order and augmentation of this epoch, from (seed, epoch)
    sums: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=device))
    first_bad_step = torch.full((), math.inf, device=device)
    teacher = EpochTeacher(job, epoch)
    student_layers, _ = job.criterion.layers()
    steps = math.ceil(len(job.data.train) / job.batch_size)
    loader = batches(job.data.train, job.batch_size, generator)
    loader = tqdm(loader, total=steps, desc=f"epoch {epoch}", disable=not job.progress_bar, leave=False)
    with capture(job.model, student_layers) if student_layers else nullcontext({}) as student_features:
        for step, batch in enumerate(loader):
            views = augment(batch.images, job.data.crop_padding, job.data.hflip, generator)
            rows = teacher.advance(len(batch))
            if len(batch) < distributed.world_size():
                continue  # a last batch too small to give every rank a sample (all ranks skip it)
            share = distributed.shard(len(batch))
            images, labels = job.data.inputs(views[share]), batch.labels[share]
            with job.autocast():
                logits = job.forward(images)
                teacher_logits, teacher_features = teacher(images, rows, share)
                terms = job.criterion(Step(
                    logits, labels, teacher_logits, dict(student_features), teacher_features, batch.index[share], epoch
                ))
                loss = sum(terms.values())
            optimize(job, loss)
            # Tracked on the device: no host sync per step; the first non-finite step is reported below.
            first_bad_step = torch.where(torch.isfinite(loss), first_bad_step, first_bad_step.clamp(max=step))
            for name, value in {"loss": loss, **terms}.items():
                sums[name] += value.detach().float() * len(labels)
            sums["acc1"] += (logits.argmax(1) == labels).sum() * 100.0
            sums["count"] += len(labels)
    teacher.finish()
    return epoch_averages(sums, first_bad_step, epoch)


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
        self.stored = job.cache.load(epoch) if self.active and job.cache is not None else None
        self.recording = None
        if self.active and job.cache is not None and self.stored is None and not job.cache.full:
            self.recording = torch.empty(job.cache.shape, device=job.data.mean.device)
        self.layers = job.criterion.layers()[1]

    def advance(self, n: int) -> slice:
        rows = slice(self.seen, self.seen + n)
        self.seen += n
        return rows

    def __call__(self, images: Tensor, rows: slice, share: slice) -> tuple[Optional[Tensor], dict[str, Tensor]]:
        """(logits, features) for this rank's images, which are rows[share] of the epoch."""
        if not self.active:
            return None, {}
        if self.stored is not None:
            return self.stored[rows][share].to(images.device), {}
        # Eval mode (set at load) makes the targets a fixed function of the view: BN uses running statistics.
        # inference_mode: no graph or saved activations for a network that is never updated.
        hooks = capture(self.job.teacher, self.layers) if self.layers else nullcontext({})
        with torch.inference_mode(), hooks as features:
            logits = self.job.teacher(images)
        if self.recording is not None:
            self.recording[rows] = logits.float()
        # Clones are normal tensors again, so the loss may save them for backward.
        return logits.clone(), {name: value.clone() for name, value in features.items()}

    def finish(self) -> None:
        if self.recording is not None and self.seen == self.recording.shape[0]:
            self.job.cache.save(self.epoch, self.recording)


@torch.inference_mode()
def predict(
    model: nn.Module, split: Split, data: Data, batch_size: int, amp_dtype: Optional[torch.dtype] = None
) -> Tensor:
    """Logits (float32) for a whole split, in order, in eval mode and without augmentation.

    Under torchrun each rank predicts its shard and the shards are summed into place, so every sample is
    counted exactly once and every rank holds all the logits.
    """
    was_training = model.training
    model.eval()
    share = distributed.shard(len(split))
    local = Split(split.images[share], split.labels[share])
    with autocast(data.mean.device, amp_dtype):
        parts = [model(data.inputs(batch.images)).float() for batch in batches(local, batch_size)]
    model.train(was_training)
    if distributed.world_size() == 1:
        return torch.cat(parts)
    logits = torch.zeros(len(split), parts[0].shape[1], device=data.mean.device)
    logits[share] = torch.cat(parts)
    return distributed.sum_(logits)


def score(logits: Tensor, labels: Tensor, reference: Optional[Tensor]) -> dict[str, float]:
    """Loss, top-1 and top-5 (%) of logits; agreement (%) of their argmax with a reference model's."""
    metrics = {"loss": nn.functional.cross_entropy(logits.float(), labels).item()}
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    metrics["acc1"] = (top[:, 0] == labels).float().mean().item() * 100
    metrics["acc5"] = (top == labels[:, None]).any(1).float().mean().item() * 100
    if reference is not None:
        metrics["agreement"] = (top[:, 0] == reference).float().mean().item() * 100
    return metrics


def save_checkpoints(
    job: Job, cfg: DictConfig, out_dir: Path, metrics: dict[str, Any], best: dict[str, Any], run_id: Optional[str]
) -> None:
    """best.pt when this epoch is the best, then last.pt: everything an exact resume needs, written last."""
    model_cfg = cfg.student if Phase(cfg.phase) is Phase.student else cfg.teacher
    payload = teachers.checkpoint_payload(model_cfg, job.model, metrics, cfg)
    payload.update(criterion=job.criterion.state_dict(), optimizer=job.optimizer.state_dict())
    payload.update(scheduler=job.scheduler.state_dict(), scaler=job.scaler.state_dict(), epoch=metrics["epoch"])
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    payload.update(best=best, rng={"cpu": torch.get_rng_state(), "cuda": cuda_rng}, wandb_id=run_id)
    if best is metrics:
        records.save_checkpoint(out_dir / "best.pt", payload)
    # last.pt is the epoch's commit point: once it lands, best.pt and metrics.jsonl are already up to date.
    records.save_checkpoint(out_dir / "last.pt", payload)


def summarize(last: dict[str, Any], best: dict[str, Any], best_key: str) -> dict[str, Any]:
    """Final metrics: the last epoch's, plus the test metrics at the epoch that `best_key` selects."""
    result = {k: v for k, v in last.items() if k.split("/")[0] in ("train", "val", "test")}
    result.update(epochs=last["epoch"], best_epoch=best["epoch"], best_selected_by=best_key)
    for key in ("test/acc1", "test/acc5", "val/acc1"):
        if key in best:
            result[f"{key}_best"] = best[key]
    return result


def epoch_line(m: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {m['epoch']}/{epochs}", f"train loss {m['train/loss']:.4f} acc1 {m['train/acc1']:.2f}"]
    for split in ("val", "test"):
        if f"{split}/acc1" in m:
            part = f"{split} loss {m[f'{split}/loss']:.4f} acc1 {m[f'{split}/acc1']:.2f} acc5 {m[f'{split}/acc5']:.2f}"
            parts.append(part + (f" agree {m[f'{split}/agreement']:.2f}" if f"{split}/agreement" in m else ""))
    return " | ".join(parts + [f"lr {m['lr']:.4g}", f"{m['time/epoch_s']:.1f}s"])


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{key}": value for key, value in metrics.items()}


def _stderr_is_terminal() -> bool:
    import sys

    return sys.stderr.isatty()
