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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm

from kd import records, teachers, tracking
from kd.config import Phase
from kd.data import Split, augment, batches, epoch_generator, hold_out, normalize
from kd.losses import CELoss, Step

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

    def inputs(self, images: Tensor) -> Tensor:
        return normalize(images, self.mean, self.std)


@dataclass
class Job:
    """Everything an epoch needs, so the loop functions take one argument instead of twelve."""

    model: nn.Module
    teacher: Optional[nn.Module]
    criterion: nn.Module
    optimizer: Optimizer
    scheduler: LRScheduler
    data: Data
    seed: int
    batch_size: int
    eval_batch_size: int
    progress_bar: bool
    teacher_predictions: dict[str, Tensor]  # the frozen teacher's argmax on test (and val), for agreement


def run(cfg: DictConfig, out_dir: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train the phase's model, write metrics.jsonl, checkpoints and result.json into out_dir; return the result.

    Re-running into the same out_dir resumes from its last.pt, or returns its result.json when it finished.
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
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = tracking.start(cfg, out_dir, checkpoint.get("wandb_id") if checkpoint else None)
    try:
        tracker.summary.update(summary)
        result = {**summary, **fit(job, cfg, out_dir, tracker, checkpoint)}
        tracker.summary.update(result)
    except BaseException:
        tracker.finish(exit_code=1)  # else the next job of a multirun would log into this run
        raise
    tracker.finish()
    if Phase(cfg.phase) is Phase.teacher:
        result["teacher_checkpoint"] = str(teachers.save_to_store(cfg, job.model, result, out_dir))
    result.update(wall_time_s=time.perf_counter() - started, env=records.environment(job.data.mean.device))
    result["resumed_from_epoch"] = checkpoint["epoch"] if checkpoint else None
    result["config"] = records.plain_config(cfg)
    records.write_json(out_dir / "result.json", result)
    return result


def set_up(cfg: DictConfig, overrides: Sequence[str]) -> tuple[Job, dict[str, Any]]:
    """Everything before the first epoch, cheapest checks first: criterion, teacher, data, model; the run's facts."""
    phase = Phase(cfg.phase)
    configure_determinism(cfg.deterministic)
    device = resolve_device(cfg.device)
    criterion = instantiate(cfg.loss) if phase is Phase.student else CELoss()  # the loss checks alpha and T
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    teacher_path, teacher_payload = None, None
    if phase is Phase.student:
        teacher_path = find_or_train_teacher(cfg, criterion.needs_teacher, overrides)
    if teacher_path is not None:  # read and checked before any data is decoded
        teacher_payload = teachers.read(teacher_path, cfg.teacher)
    data = load_data(cfg.dataset, device)
    job = build_job(cfg, phase, criterion, data, device)
    summary = {"phase": phase.value, "params": records.count_parameters(job.model)}
    image_shape = tuple(data.test.images.shape[1:])
    summary["flops_per_image"] = records.forward_flops(job.model, image_shape, device)
    if cfg.profile:
        summary.update(records.profile_model(job.model, image_shape, cfg.batch_size, device))
    if teacher_path is not None:
        summary.update(attach_teacher(job, cfg, teacher_path, device, teacher_payload))
    return job, summary


# Keys that change nothing a run computes: a run folder may be resumed with other values of these.
RESULT_NEUTRAL = (
    "logger", "device", "progress_bar", "threads", "profile", "eval_batch_size", "teacher_store",
    "teacher_lock_timeout_s", "train_missing_teacher", "teacher_acc_tolerance", "dataset.source.download",
)
# A teacher run never reads these (a teacher trained on demand carries its student's values).
TEACHER_PHASE_NEUTRAL = ("loss", "student", "teacher_seed", "teacher_checkpoint")
# What last.pt must hold to resume a run exactly.
RESUME_KEYS = ("model", "optimizer", "scheduler", "epoch", "metrics", "best", "rng", "config")


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
    job.optimizer.load_state_dict(checkpoint["optimizer"])
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
    if not cfg.logger.init_timeout_s > 0:
        problems.append(f"logger.init_timeout_s={cfg.logger.init_timeout_s}: must be > 0 (seconds)")
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))


def resolve_device(name: str) -> torch.device:
    """device=auto picks CUDA when present, else the CPU; an explicit device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but no CUDA device is visible: use device=auto or device=cpu.")
    return device


def load_data(dataset_cfg: DictConfig, device: torch.device) -> Data:
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
        *stats, dataset_cfg.crop_padding, dataset_cfg.hflip,
    )


def build_job(cfg: DictConfig, phase: Phase, criterion: nn.Module, data: Data, device: torch.device) -> Job:
    """Seed, then build the trained model, its optimizer and schedule (the teacher is attached later)."""
    torch.manual_seed(cfg.seed)
    model = instantiate(cfg.student if phase is Phase.student else cfg.teacher).to(device)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    scheduler = instantiate(cfg.scheduler)(optimizer)
    progress = cfg.progress_bar if cfg.progress_bar is not None else _stderr_is_terminal()
    return Job(
        model, None, criterion.to(device), optimizer, scheduler, data,
        cfg.seed, cfg.batch_size, cfg.eval_batch_size, progress, {},
    )


def attach_teacher(
    job: Job, cfg: DictConfig, path: Path, device: torch.device, payload: Optional[dict] = None
) -> dict[str, Any]:
    """Load the frozen teacher, measure it on this data, and refuse it when that disagrees with its record."""
    payload = payload if payload is not None else teachers.read(path, cfg.teacher)
    teacher, recorded = teachers.build(payload, cfg.teacher, device), payload["metrics"]
    measured = {}
    for name, split in (("test", job.data.test), ("val", job.data.val)):
        if split is not None:
            logits = predict(teacher, split, job.data, job.eval_batch_size)
            measured[name] = score(logits, split.labels, None)
            job.teacher_predictions[name] = logits.argmax(1)
    gap = abs(measured["test"]["acc1"] - recorded["test/acc1"])
    if gap > cfg.teacher_acc_tolerance:
        raise ValueError(
            f"teacher {path} scores {measured['test']['acc1']:.2f}% test top-1 here but {recorded['test/acc1']:.2f}% "
            f"when it was trained (more than teacher_acc_tolerance={cfg.teacher_acc_tolerance}): wrong checkpoint, "
            "dataset or normalization."
        )
    job.teacher = teacher
    log.info("teacher %s: test top-1 %.2f (recorded %.2f)", path, measured["test"]["acc1"], recorded["test/acc1"])
    summary = {f"teacher/{name}/{key}": value for name, m in measured.items() for key, value in m.items()}
    return {**summary, "teacher/acc1": measured["test"]["acc1"], "teacher_checkpoint": str(path)}


def fit(job: Job, cfg: DictConfig, out_dir: Path, tracker, checkpoint: Optional[dict] = None) -> dict[str, Any]:
    """The epoch loop: train, step the schedule, evaluate, record; keep last.pt and best.pt; resume after last.pt."""
    best_key = "val/acc1" if job.data.val is not None else "test/acc1"
    metrics_file = out_dir / "metrics.jsonl"
    done = checkpoint["epoch"] if checkpoint else 0
    metrics, best = (checkpoint["metrics"], checkpoint["best"]) if checkpoint else (None, None)
    records.keep_epochs(metrics_file, done)  # drop lines an interrupted run wrote after its last checkpoint
    for epoch in range(done + 1, cfg.epochs + 1):
        metrics = run_epoch(job, epoch)
        best = metrics if best is None or metrics[best_key] > best[best_key] else best
        records.append_jsonl(metrics_file, metrics)
        tracker.log(metrics, step=epoch)
        log.info(epoch_line(metrics, cfg.epochs))
        save_checkpoints(job, cfg, out_dir, metrics, best, tracker.id)
    return summarize(metrics, best, best_key)


def run_epoch(job: Job, epoch: int) -> dict[str, Any]:
    """One epoch of training and its evaluation, as one flat, namespaced metrics dict."""
    started = time.perf_counter()
    metrics: dict[str, Any] = {"epoch": epoch, "lr": job.optimizer.param_groups[0]["lr"]}
    metrics.update(_prefixed("train", train_one_epoch(job, epoch)))
    job.scheduler.step()
    metrics["time/train_s"] = time.perf_counter() - started
    for name, split in (("val", job.data.val), ("test", job.data.test)):
        if split is not None:
            logits = predict(job.model, split, job.data, job.eval_batch_size)
            metrics.update(_prefixed(name, score(logits, split.labels, job.teacher_predictions.get(name))))
    metrics["time/epoch_s"] = time.perf_counter() - started
    return metrics


def train_one_epoch(job: Job, epoch: int) -> dict[str, float]:
    """One pass over the augmented training set; returns per-image averages of the loss terms and top-1."""
    job.model.train()
    generator = epoch_generator(job.seed, epoch)  # order and augmentation of this epoch, from (seed, epoch)
    sums: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=job.data.mean.device))
    first_bad_step = torch.full((), math.inf, device=job.data.mean.device)
    steps = math.ceil(len(job.data.train) / job.batch_size)
    loader = batches(job.data.train, job.batch_size, generator)
    loader = tqdm(loader, total=steps, desc=f"epoch {epoch}", disable=not job.progress_bar, leave=False)
    for step, batch in enumerate(loader):
        images = job.data.inputs(augment(batch.images, job.data.crop_padding, job.data.hflip, generator))
        logits = job.model(images)
        terms = job.criterion(Step(logits, batch.labels, teacher_logits(job, images), index=batch.index, epoch=epoch))
        loss = sum(terms.values())
        job.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        job.optimizer.step()
        # Tracked on the device: no host sync per step; the first non-finite step is reported below.
        first_bad_step = torch.where(torch.isfinite(loss), first_bad_step, first_bad_step.clamp(max=step))
        for name, value in {"loss": loss, **terms}.items():
            sums[name] += value.detach() * len(batch)
        sums["acc1"] += (logits.argmax(1) == batch.labels).sum() * 100.0
    if math.isfinite(bad := first_bad_step.item()):
        kept = f"the last checkpoint is from epoch {epoch - 1}" if epoch > 1 else "no checkpoint was written"
        raise FloatingPointError(
            f"non-finite training loss at epoch {epoch}, step {int(bad)}: stopped; {kept}. "
            "Lower the learning rate or check the inputs."
        )
    return {name: (total / len(job.data.train)).item() for name, total in sums.items()}


def teacher_logits(job: Job, images: Tensor) -> Optional[Tensor]:
    """The frozen teacher's logits for the same augmented view the student sees (None when unused)."""
    if job.teacher is None or not job.criterion.needs_teacher:
        return None
    # Eval mode (set at load) makes the targets a fixed function of the view: BN uses running statistics.
    # inference_mode: no graph or saved activations for a network that is never updated.
    with torch.inference_mode():
        logits = job.teacher(images)
    return logits.clone()  # a normal tensor again, so the loss may save it for backward


@torch.inference_mode()
def predict(model: nn.Module, split: Split, data: Data, batch_size: int) -> Tensor:
    """Logits for a whole split, in order, in eval mode and without augmentation."""
    was_training = model.training
    model.eval()
    logits = torch.cat([model(data.inputs(batch.images)) for batch in batches(split, batch_size)])
    model.train(was_training)
    return logits


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
    payload.update(optimizer=job.optimizer.state_dict(), scheduler=job.scheduler.state_dict(), epoch=metrics["epoch"])
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
