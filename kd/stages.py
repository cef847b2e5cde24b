"""The init stage: epochs a criterion trains on a loss of its own before epoch 1 (kd.methods.base.InitStage), as
RepDistiller's train_student.py trains AB, FSP and FT (init() of helper/pretrain.py, init_epochs 30).

kd.engine.fit calls run_init_stage once, before its epoch loop. The stage
- trains what the criterion's InitStage names (the student, adapters) with a fresh optimizer of the run's kind
  (cfg.optimizer: RepDistiller's init uses SGD with the run's momentum and weight decay) at a constant learning rate
  (the stage's, else the optimizer's), and evaluates nothing;
- takes the views of init epoch e from the data path's epoch -e: a pure function of (seed, -e), apart from every
  main epoch's;
- runs the teacher on every step: it reads the teacher's features, which the teacher cache does not hold;
- records one line per init epoch in init.jsonl ("epoch", "lr", "init/<term>", "time/epoch_s") and train.log;
  metrics.jsonl keeps the evaluated epochs 1..epochs that the report, the plots and W&B's steps count;
- writes last.pt after each init epoch with stage "init" and its optimizer's state, so a run killed in the stage
  resumes after its last finished init epoch to the same bits; a last.pt of the main stage means the stage is done.
"""
import logging
import math
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.optim import Optimizer

from kd import distributed, fileio
from kd.datapath import Batch
from kd.loop import Job
from kd.methods.base import Criterion, InitStage, Step
from kd.methods.hooks import capture

log = logging.getLogger(__name__)

RECORD = "init.jsonl"


def needs_teacher(criterion: Criterion) -> bool:
    """Whether a run of this criterion needs its teacher: its training step reads it, or its init stage does."""
    return criterion.needs_teacher or criterion.init_epochs > 0


@dataclass
class InitRun:
    """An init stage being trained: the stage, its optimizer and its loss scaler (fp16)."""

    stage: InitStage
    optimizer: Optimizer
    scaler: torch.amp.GradScaler


def run_init_stage(job: Job, cfg: DictConfig, out_dir: Path, checkpoint: Optional[dict],
                   payload: Callable[[], dict[str, Any]]) -> None:
    """Train the criterion's init stage, or what a killed run left of it; nothing without one or once it is done.
    `payload` gives last.pt's content before epoch 1 (kd.engine.checkpoint_payload), to which the stage is added."""
    stage = job.criterion.init_stage()
    if stage is None:
        return
    init = InitRun(stage, *init_optimizer(job, cfg, stage))
    done = resume_point(init, checkpoint)
    main, record = distributed.is_main(), out_dir / RECORD
    if main:
        fileio.keep_epochs(record, done)  # drop lines an interrupted run wrote after its last checkpoint
    if 0 < done < stage.epochs:
        log.info("resuming the init stage after init epoch %d of %d", done, stage.epochs)
    for epoch in range(done + 1, stage.epochs + 1):
        metrics = train_init_epoch(job, init, epoch)
        log.info(init_line(metrics, stage.epochs))
        if main:
            fileio.append_jsonl(record, metrics)
            state = {"epoch": epoch, "optimizer": init.optimizer.state_dict(), "scaler": init.scaler.state_dict()}
            fileio.save_checkpoint(out_dir / "last.pt", {**payload(), "stage": "init", "init": state})


def init_optimizer(job: Job, cfg: DictConfig, stage: InitStage) -> tuple[Optimizer, torch.amp.GradScaler]:
    """A fresh optimizer of the run's kind over what the stage trains, at the stage's lr (null: the optimizer's)."""
    student = list(job.model.parameters()) if stage.trains_student else []
    parameters = student + [p for module in stage.modules for p in module.parameters()]
    optimizer = instantiate(cfg.optimizer, **({} if stage.lr is None else {"lr": stage.lr}))(parameters)
    return optimizer, torch.amp.GradScaler(job.data.device.type, enabled=job.amp_dtype == torch.float16)


def resume_point(init: InitRun, checkpoint: Optional[dict]) -> int:
    """Init epochs already trained: none on a fresh start, all after a main-stage last.pt (those written before the
    init stage existed have no "stage"), else the init last.pt's count, whose optimizer state is restored."""
    if checkpoint is None:
        return 0
    if checkpoint.get("stage") != "init":
        return init.stage.epochs
    init.optimizer.load_state_dict(checkpoint["init"]["optimizer"])
    init.scaler.load_state_dict(checkpoint["init"]["scaler"])
    return checkpoint["init"]["epoch"]


def train_init_epoch(job: Job, init: InitRun, epoch: int) -> dict[str, Any]:
    """One pass over the training set on the stage's loss; returns the record line (per-image averages)."""
    started = time.perf_counter()
    job.model.train(init.stage.trains_student)  # a student that is not trained keeps its BatchNorm statistics
    for module in init.stage.modules:
        module.train()
    sums: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=job.data.device))
    first_bad = torch.full((), math.inf, device=job.data.device)
    hooks = capture(job.model, init.stage.layers[0]) if init.stage.trains_student else nullcontext({})
    with hooks as student_features:
        for step, batch in enumerate(job.data.epoch(job.seed, -epoch, job.batch_size)):
            if batch.size < distributed.world_size():
                continue  # a last batch too small to give every rank a sample (all ranks skip it)
            loss, terms = init_step(job, init, batch, student_features, (epoch, step))
            first_bad = torch.where(torch.isfinite(loss), first_bad, first_bad.clamp(max=step))
            for name, value in {"loss": loss, **terms}.items():
                sums[name] += value.detach().float() * len(batch.labels)
            sums["count"] += len(batch.labels)
    distributed.broadcast_buffers(job.model)  # every rank goes on with the statistics of the model rank 0 saves
    averages = init_averages(sums, first_bad, epoch)
    metrics = {"epoch": epoch, "lr": init.optimizer.param_groups[0]["lr"]}
    return metrics | {f"init/{name}": value for name, value in averages.items()} | {
        "time/epoch_s": time.perf_counter() - started}


def init_step(job: Job, init: InitRun, batch: Batch, student_features: dict[str, Tensor],
              position: tuple[int, int]) -> tuple[Tensor, dict[str, Tensor]]:
    """One optimisation step of the stage on this rank's share of a global batch (position: init epoch, step);
    nothing is read back to the host."""
    images = job.data.inputs(batch.views)
    with job.autocast():
        logits = job.model(images) if init.stage.trains_student else None
        teacher = teacher_features(job.teacher, init.stage.layers[1], images)
        step = Step(logits, batch.labels, None, dict(student_features), teacher, batch.index, *position, job.seed,
                    batch.size)
        terms = init.stage.loss(step)
        loss = sum(terms.values())
    init.optimizer.zero_grad(set_to_none=True)
    init.scaler.scale(loss).backward()
    if distributed.world_size() > 1:  # the student runs without DDP here: average every gradient over the ranks
        for group in init.optimizer.param_groups:
            for parameter in (p for p in group["params"] if p.grad is not None):
                distributed.sum_(parameter.grad).div_(distributed.world_size())
    init.scaler.step(init.optimizer)
    init.scaler.update()
    return loss, terms


def teacher_features(teacher: nn.Module, names: list[str], images: Tensor) -> dict[str, Tensor]:
    """The frozen teacher's named features for images, as kd.loop.EpochTeacher takes them: no graph, then copies
    that are normal tensors again (the loss may save them for backward)."""
    with torch.inference_mode(), capture(teacher, names) as features:
        teacher(images)
    return {name: value.clone() for name, value in features.items()}


def init_averages(sums: dict[str, Tensor], first_bad: Tensor, epoch: int) -> dict[str, float]:
    """Per-image averages over all ranks; stop on the first non-finite step, keeping the last checkpoint."""
    names = sorted(sums)
    totals = distributed.sum_(torch.stack([sums[name] for name in names]))
    if math.isfinite(bad := distributed.min_(first_bad).item()):
        kept = f"the last checkpoint is from init epoch {epoch - 1}" if epoch > 1 else "no checkpoint was written"
        raise FloatingPointError(f"non-finite init-stage loss at init epoch {epoch}, step {int(bad)}: stopped; {kept}. "
                                 "Lower the stage's learning rate (the loss's init_lr) or check the inputs.")
    totals = dict(zip(names, totals.tolist()))
    count = totals.pop("count")
    return {name: total / count for name, total in totals.items()}


def init_line(metrics: dict[str, Any], epochs: int) -> str:
    """The log line of one init epoch."""
    terms = " ".join(f"{key[len('init/'):]} {value:.4f}" for key, value in metrics.items() if key.startswith("init/"))
    return f"init epoch {metrics['epoch']}/{epochs} | {terms} | lr {metrics['lr']:.4g} | {metrics['time/epoch_s']:.1f}s"
