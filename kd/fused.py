"""Fused sweeps: the jobs of a sweep that differ only in settings that keep the student's shapes (loss weights and
temperature, seed, learning rate, weight decay, momentum) train in one process as one stacked model array (HFTA,
Wang et al., MLSys 2021).

Each member keeps its own run folder and records (run.json, metrics.jsonl, last.pt, best.pt, run_info.json,
result.json, W&B run) in the form a lone run writes them, with its own criterion, its own SGD state and its own
seed's batch order and augmentation; members of one seed share the batch and the teacher pass (or the teacher
cache entry of their seed, which lone runs and fused groups read and write alike). A finished member is
returned without training, an interrupted one resumes from its own last.pt, a member whose loss turns non-finite is
stopped with the lone run's error while the others go on. hydra_plugins/kd_fused_launcher groups a sweep's jobs.

Two ways to run the stacked members (plan picks, once per group): GroupedStudents, HFTA's own, runs the members as
one model whose channels are the members' side by side (grouped convolutions, BatchNorm over all members' channels,
batched linear layers), in less time than vmap on the CPU (tools/bench_fused.py); StackedStudents runs
vmap(functional_call), for any model. GroupedStudents is used when every layer with weights is a Conv2d,
BatchNorm2d or Linear, its logits equal each member's own and no member's logits depend on another's weights
(checked on a few images). On the CPU the members are stacked in chunks small enough for the caches (chunk_size).
"""
import copy
import functools
import json
import logging
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from kd import config, distributed, engine, feedback, fileio, hardware, records, tracking
from kd.config import Phase
from kd.loop import EpochSums, EpochTeacher, Job, predict, score
from kd.methods.base import Step

log = logging.getLogger(__name__)

# The settings fused jobs may differ in: each member has its own criterion (every loss value but the loss's
# structure: its _target_s and standardize), its own seed (batch order, augmentation, initialisation) and its own
# SGD hyperparameters. Everything else (models, data, teacher, epochs, batch size, schedule) is the group's key.
FUSED_KEYS = ("seed", "optimizer.lr", "optimizer.weight_decay", "optimizer.momentum")
LOSS_STRUCTURE = ("_target_", "standardize")  # the loss keys that are part of the group's key
CPU_CHUNK_BYTES = 8 << 20  # the largest activation of a stacked model on the CPU (chunk_size)
# Logit losses: a criterion with no adapter, no feature hook and no init stage, so a member is its student alone.
FUSABLE_LOSSES = ("kd.methods.kd.KDLoss", "kd.methods.kd.SoftTargets", "kd.methods.dkd.DKDLoss",
                  "kd.methods.dist.DISTLoss", "kd.methods.base.CELoss", "kd.methods.base.Combined")


def unfusable_reason(cfg: DictConfig) -> Optional[str]:
    """Why this job cannot train in a fused group (it then runs alone), or None when it can."""
    if Phase(cfg.phase) is not Phase.student:
        return "phase=teacher trains alone"
    targets = {v for k, v in records.flatten(records.plain_config(cfg.loss)).items() if k.endswith("_target_")}
    if not targets <= set(FUSABLE_LOSSES):
        return f"loss {sorted(targets - set(FUSABLE_LOSSES))[0]} reads features or keeps state (logit losses fuse)"
    optimizer = cfg.optimizer
    if optimizer._target_ != "torch.optim.SGD" or optimizer.get("dampening", 0) or optimizer.get("maximize", False):
        return f"optimizer {optimizer._target_} (only SGD without dampening is fused)"
    if cfg.compile or distributed.world_size() > 1:
        return "compile=true or torchrun"
    if hardware.resolve_precision(cfg.precision, hardware.resolve_device(cfg.device)) == torch.float16:
        return "fp16 loss scaling is per run"
    return None


def group_key(cfg: DictConfig) -> str:
    """The settings a fused group shares: the resolved config less FUSED_KEYS and the loss's values, plus whether
    the loss reads the teacher (a member that does not would record no teacher, as when it runs alone)."""
    flat = records.flatten(records.plain_config(cfg))
    kept = {k: v for k, v in flat.items() if k not in FUSED_KEYS
            and not (k.startswith("loss.") and k.rsplit(".", 1)[-1] not in LOSS_STRUCTURE)}
    kept["needs_teacher"] = bool(instantiate(cfg.loss).needs_teacher)
    return json.dumps(kept, sort_keys=True, default=str)


@dataclass
class Member:
    """One job of a fused group: what its lone run would receive, and what it holds while it trains."""

    cfg: DictConfig
    out_dir: Path
    overrides: list[str] = field(default_factory=list)
    choices: Optional[dict[str, Any]] = None
    outcome: Any = None  # its result dict, or the exception that stopped it
    checkpoint: Optional[dict] = None
    record: Optional[dict] = None
    job: Optional[Job] = None
    facts: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # [metrics, best] of its last epoch
    logger: Optional[logging.Logger] = None
    tracker: Any = None  # its W&B run while it trains

    @property
    def epoch(self) -> int:
        return self.checkpoint["epoch"] if self.checkpoint else 0


def run_group(members: Sequence[Member], memory_gb: Optional[float] = None) -> list[Any]:
    """Train the members as fused groups; returns each member's result dict, or the exception that stopped it (the
    lone run's error: a refusal, a non-finite loss), or None for a folder another process holds. `memory_gb`: the
    cap on one fused group's estimated memory (None: no cap)."""
    started = time.perf_counter()
    with ExitStack() as stack:
        pending = [m for m in members if open_member(m, stack)]
        for part in partition(pending):
            train_part(part, memory_gb, started)
    return [m.outcome for m in members]


def open_member(member: Member, stack: ExitStack) -> bool:
    """The lone run's first steps: checks, the folder's lock, the previous run (finished: its result, kept)."""
    try:
        member.cfg = engine.phase_config(member.cfg)
        config.check_config(member.cfg)
        unwritable = stack.enter_context(fileio.folder_lock(member.out_dir))
        finished, member.checkpoint, member.record = engine.previous_run(member.cfg, member.out_dir)
        if finished is not None:
            log.info("%s already holds this run's result.json: returning it without training again", member.out_dir)
            member.outcome = finished
            return False
        if unwritable is not None:
            raise unwritable
    except fileio.FolderBusy as busy:
        log.warning("skipped %s: another process is running it (%s)", member.out_dir, busy.holder or "its lock")
        return False
    except Exception as error:  # noqa: BLE001 (the member's own refusal, reported as its job's failure)
        member.outcome = error
        return False
    return True


def partition(members: list[Member]) -> list[list[Member]]:
    """Members that resume from the same epoch with the same teacher and precision train together: each then trains
    from its own last.pt exactly as alone, and one epoch loop serves them all (a group killed together resumes
    together; a member added later starts in a group of its own)."""
    parts: dict[tuple, list[Member]] = {}
    for member in members:
        checkpoint = member.checkpoint or {}
        key = (member.epoch, checkpoint.get("teacher_sha256"), checkpoint.get("precision"))
        parts.setdefault(key, []).append(member)
    return list(parts.values())


def train_part(members: list[Member], memory_gb: Optional[float], started: float) -> None:
    """Set up the members (one data load, one teacher), then train them in groups within the memory cap."""
    try:
        set_up_members(members)
    except Exception as error:  # noqa: BLE001 (a shared refusal: the teacher or the data; nothing was written)
        for member in members:
            member.outcome = error
        return
    size = group_size(members[0].job, memory_gb)
    if size < len(members):
        log.info("fused group of %d split into groups of %d (memory_gb=%s)", len(members), size, memory_gb)
    for start in range(0, len(members), size):
        train_fused(members[start:start + size], started)


def set_up_members(members: list[Member]) -> None:
    """The leader's set-up as a lone run's (teacher found, read and measured; data loaded, teacher cache opened),
    shared by the others, each with its own criterion, model (from its seed), optimizer and schedule, and the teacher
    cache entry of its seed (one per seed: the views, so the teacher's outputs, are the seed's)."""
    leader = members[0]
    leader.job, leader.facts, leader.info = engine.set_up(leader.cfg, leader.overrides, leader.checkpoint)
    caches = {leader.cfg.seed: leader.job.cache}
    for member in members[1:]:
        engine.check_resumed_data(member.cfg, member.checkpoint, leader.job.data)
        precision = member.checkpoint.get("precision") if member.checkpoint else None
        member.job = engine.build_job(member.cfg, Phase.student, instantiate(member.cfg.loss), leader.job.data,
                                      leader.job.data.device, leader.job.teacher, precision)
        member.job.teacher_predictions = leader.job.teacher_predictions
        member.facts, member.info = dict(leader.facts), dict(leader.info)
        if leader.job.cache is not None and member.cfg.seed not in caches:
            sha256 = leader.facts["teacher/sha256"]
            caches[member.cfg.seed] = engine.open_teacher_cache(member.cfg, member.job, sha256)
        member.job.cache = caches.get(member.cfg.seed)


def group_size(job: Job, memory_gb: Optional[float]) -> int:
    """How many members fit in memory_gb by member_bytes (at least one). memory_gb None: on CUDA, 80% of the
    device's free memory; on the CPU, no cap."""
    if memory_gb is None and job.data.device.type == "cuda":
        memory_gb = 0.8 * torch.cuda.mem_get_info(job.data.device)[0] / 1e9
    if memory_gb is None:
        return 1 << 30
    return max(1, int(memory_gb * 1e9 // member_bytes(job)))


def member_bytes(job: Job) -> int:
    """One member's estimated memory: 5x its parameters' bytes (its model's parameters and momentum, their stacked
    copies and the stacked gradients), plus the activations a training forward at the batch size saves for backward."""
    weights = sum(p.numel() * p.element_size() for p in job.model.parameters())
    return 5 * weights + saved_activations(job)[0]


def saved_activations(job: Job) -> tuple[int, int]:
    """The bytes a training forward of the member at its batch size saves for backward, and the largest saved
    tensor's (counted on a forward of a copy of its model, on at most a batch of images, scaled to the batch)."""
    sizes = []

    def pack(tensor: Tensor) -> Tensor:
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    images = job.data.sample_inputs(min(job.batch_size, job.data.num_train))
    model = copy.deepcopy(job.model).train()  # its own BatchNorm statistics: the member's stay untouched
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(images)
    scale = job.batch_size / len(images)
    return int(sum(sizes) * scale), int(max(sizes) * scale)


def chunk_size(job: Job) -> int:
    """How many members one stacked model holds. On the CPU, as many as keep a layer's activations of all of them
    within CPU_CHUNK_BYTES: a grouped layer much larger than the caches costs more per member than a lone one. 8 jobs
    of tools.bench --fused on 2 AMD EPYC cores, fused time over sequential time by stack size 1/2/4/8: quickstart
    pair (resnet8 x0.5, 2 MiB per member) 0.56/0.51/0.50/0.48; resnet56 -> resnet20 (4 MiB per member)
    0.63/0.65/0.72/0.93. On a GPU, all of them (the memory cap bounds the group)."""
    if job.data.device.type != "cpu":
        return 1 << 30
    return max(1, CPU_CHUNK_BYTES // saved_activations(job)[1])


def train_fused(members: list[Member], started: float) -> None:
    """Each member's records begin as a lone run's (run.json, train.log, its last.pt restored), then one epoch loop
    trains the members still going; each ends with its W&B run, run_info.json and result.json."""
    try:
        for member in members:
            start_member(member, len(members))
        how = plan([m.job for m in members])
        log.info("fused group of %d: %s, in stacks of %d", len(members),
                 "grouped convolutions" if how.grouped else "vmap", min(how.chunk, len(members)))
        for epoch in range(members[0].epoch + 1, members[0].cfg.epochs + 1):
            active = [m for m in members if m.outcome is None]
            if not active:
                break
            fused_epoch(active, epoch, how)
        for member in members:
            finish_member(member, started)
    except Exception as error:  # noqa: BLE001 (each job fails with it, as each would alone; last.pt is kept)
        for member in members:
            member.outcome = error if member.outcome is None else member.outcome
    finally:  # Ctrl-C or an error: the W&B runs still open end failed, as a lone run's
        for member in members:
            end_run(member, failed=True)
            close_logger(member)


def start_member(member: Member, size: int) -> None:
    """What a lone run does once its checks have passed: run.json, train.log, its start line, last.pt restored, its
    W&B run started (each member's run is open while the group trains, and logs each epoch as it ends)."""
    cfg, job = member.cfg, member.job
    member.record = member.record or engine.start_record(cfg, member.out_dir, member.overrides)
    member.logger = member_logger(member.out_dir)
    member.logger.info(feedback.start_line(cfg, job, hardware.precision_name(job.amp_dtype), member.out_dir))
    member.logger.info("fused: trained in one process with the %d other jobs of its group (kd.fused)", size - 1)
    if member.checkpoint is not None:
        engine.restore(job, member.checkpoint)
        member.history = [member.checkpoint["metrics"], member.checkpoint["best"]]
    fileio.keep_epochs(member.out_dir / "metrics.jsonl", member.epoch)
    teacher_facts = {k: v for k, v in member.facts.items() if k.startswith("teacher")}
    member.tracker = tracking.start(cfg, member.out_dir, member.record["wandb_id"], teacher_facts, member.choices)
    member.tracker.summary.update({**member.facts, **member.info})
    tracking.log_history(member.tracker, member.out_dir / "metrics.jsonl")  # a resumed member's epochs before


def member_logger(out_dir: Path) -> logging.Logger:
    """A logger writing to out_dir/train.log (and, through the root logger, the console)."""
    logger = logging.getLogger(f"kd.fused.{out_dir.name.replace('.', '_')}")
    logger.setLevel(logging.INFO)
    handler = logging.FileHandler(out_dir / "train.log")
    handler.setFormatter(logging.Formatter(engine.LOG_FORMAT))
    logger.addHandler(handler)
    return logger


def close_logger(member: Member) -> None:
    if member.logger is not None:
        for handler in list(member.logger.handlers):
            member.logger.removeHandler(handler)
            handler.close()
        member.logger = None


def fused_epoch(members: list[Member], epoch: int, how: "Plan") -> None:
    """One epoch of the stacked members; then each member's schedule, evaluation and records as a lone run's, or
    its stop when its loss turned non-finite (its last.pt stays that of the epoch before, as alone)."""
    started = time.perf_counter()
    jobs = [m.job for m in members]
    lrs = [job.optimizer.param_groups[0]["lr"] for job in jobs]
    students = stack_students(jobs, how)
    sums = [EpochSums(job.data.device) for job in jobs]
    fused_steps(jobs, students, epoch, sums)
    students.write_back(jobs)
    train_s = time.perf_counter() - started
    for member, member_sums, lr in zip(members, sums, lrs):
        try:
            averages = member_sums.averages(epoch)
        except FloatingPointError as error:
            member.logger.error("%s", error)
            member.outcome = error
            end_run(member, failed=True)  # as a lone run's, when it stops
            continue
        metrics = {"epoch": epoch, "lr": lr, **{f"train/{k}": v for k, v in averages.items()}}
        with warnings.catch_warnings():  # the stacked step, not this optimizer's step(), moved its parameters
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
            member.job.scheduler.step()
        metrics["time/train_s"] = train_s
        metrics.update(evaluate(member.job))
        metrics["time/epoch_s"] = time.perf_counter() - started
        record_epoch(member, metrics)


def fused_steps(jobs: list[Job], students: "Stacks", epoch: int, sums: list[EpochSums]) -> None:
    """The epoch's steps: each seed's batches (one loader and one teacher pass or cache read per seed), the stacked
    forward, each member's criterion on its own logits, one backward, the stacked SGD step."""
    data, batch_size = jobs[0].data, jobs[0].batch_size
    seeds = list(dict.fromkeys(job.seed for job in jobs))
    slot = [seeds.index(job.seed) for job in jobs]
    loaders = [data.epoch(seed, epoch, batch_size) for seed in seeds]
    teachers = [EpochTeacher(jobs[slot.index(k)], epoch) for k in range(len(seeds))]  # live, or the seed's cache
    for step, batches in enumerate(zip(*loaders)):
        images = [data.inputs(batch.views) for batch in batches]
        for seed_teacher, batch in zip(teachers, batches):
            seed_teacher.seen += batch.size
        with jobs[0].autocast():
            teacher = [t(x, batch.rows)[0] for t, x, batch in zip(teachers, images, batches)]
            shared = len(seeds) == 1
            logits = students(images[0] if shared else torch.stack([images[k] for k in slot]), shared)
            losses = []
            for i, job in enumerate(jobs):
                batch = batches[slot[i]]
                terms = job.criterion(Step(logits[i], batch.labels, teacher[slot[i]], {}, {}, batch.index, epoch,
                                           step, job.seed, batch.size))
                losses.append(sum(terms.values()))
                sums[i].add(step, losses[-1], terms, logits[i], batch.labels)
        torch.stack(losses).sum().backward()  # each member's gradient is its own loss's: the members are independent
        students.step()
    for seed_teacher in teachers:
        seed_teacher.finish()  # an epoch run live, whole: into the seed's cache


def evaluate(job: Job) -> dict[str, float]:
    """The lone run's evaluation of a member (kd.loop.run_epoch)."""
    metrics = {}
    for split in job.data.splits:
        logits = predict(job.model, job.data, split, job.eval_batch_size, job.amp_dtype)
        scores = score(logits, job.data.split_labels(split), job.teacher_predictions.get(split))
        metrics.update({f"{split}/{key}": value for key, value in scores.items()})
    return metrics


def record_epoch(member: Member, metrics: dict[str, Any]) -> None:
    """The epoch's line in train.log, its metrics.jsonl line, best.pt and last.pt, as kd.engine.fit writes them."""
    job, cfg = member.job, member.cfg
    best_key = "val/acc1" if "val" in job.data.splits else "test/acc1"
    best = member.history[1] if member.history else None
    best = metrics if best is None or metrics[best_key] > best[best_key] else best
    member.history = [metrics, best]
    member.tracker.log(metrics, step=metrics["epoch"])
    member.logger.info(engine.epoch_line(metrics, cfg.epochs))
    fileio.append_jsonl(member.out_dir / "metrics.jsonl", metrics)
    engine.save_checkpoints(job, cfg, member.out_dir, metrics, best, teacher_of(member))


def teacher_of(member: Member) -> dict[str, Any]:
    return {"teacher_sha256": member.facts.get("teacher/sha256"),
            "teacher_checkpoint": member.facts.get("teacher_checkpoint")}


def finish_member(member: Member, started: float) -> None:
    """The member's W&B run ends, then run_info.json and result.json (the commit point) are written; a stopped
    member's W&B run ends failed, as a lone run's does, and it writes neither file."""
    cfg, job, out_dir = member.cfg, member.job, member.out_dir
    if member.outcome is not None:
        end_run(member, failed=True)
        return
    info = dict(member.info)
    if job.cache is not None:
        info.update(engine.teacher_cache_summary(job.cache))
    metrics, best = member.history
    best_key = "val/acc1" if "val" in job.data.splits else "test/acc1"
    result = {**member.facts, **engine.summarize(metrics, best, best_key)}
    member.tracker.summary.update({**result, **info})
    end_run(member, failed=False)
    info.update(wall_time_s=time.perf_counter() - started, env=records.environment(job.data.device))
    info["resumed_from_epoch"] = member.checkpoint["epoch"] if member.checkpoint else None
    result.update(world_size=distributed.world_size(), config=records.plain_config(cfg))
    fileio.write_json(out_dir / "run_info.json", info)
    fileio.write_json(out_dir / "result.json", result)  # the commit point: the member is finished
    member.outcome = result


def end_run(member: Member, failed: bool) -> None:
    """Finish the member's W&B run (exit code 1 when it failed or its group stopped), once."""
    if member.tracker is not None:
        member.tracker.finish(exit_code=1 if failed else None)
        member.tracker = None


class StackedStudents:
    """The members' students as one stacked model (torch.func.stack_module_state): one vmap(functional_call)
    forward, BatchNorm statistics updated per member in train mode, and SGD per member with its own lr, weight
    decay and momentum, in torch.optim.SGD's arithmetic (dampening 0)."""

    def __init__(self, jobs: list[Job]):
        models = [job.model for job in jobs]
        self.members = len(jobs)
        self.params, self.buffers = stack_module_state(models)
        self.base = copy.deepcopy(models[0]).to("meta")
        groups = [job.optimizer.param_groups[0] for job in jobs]
        per_member = lambda key: torch.tensor([g[key] for g in groups], device=jobs[0].data.device)  # noqa: E731
        self.lr, self.weight_decay, self.momentum = per_member("lr"), per_member("weight_decay"), per_member("momentum")
        self.nesterov = groups[0]["nesterov"]
        self.buffers_sgd = {name: torch.stack([momentum_buffer(job, name) for job in jobs]) for name in self.params}

    def __call__(self, images: Tensor, shared: bool) -> Tensor:
        """Logits (members, batch, classes) for one batch shared by all members, or one batch per member."""
        self.base.train()
        return vmap(self._forward, in_dims=(0, 0, None if shared else 0))(self.params, self.buffers, images)

    def _forward(self, params: dict[str, Tensor], buffers: dict[str, Tensor], images: Tensor) -> Tensor:
        return functional_call(self.base, (params, buffers), (images,))

    @torch.no_grad()
    def step(self) -> None:
        """torch.optim.SGD's update per member: d = g + wd p; b = m b + d; d = b (or d + m b, Nesterov); p -= lr d."""
        for name, param in self.params.items():
            shape = (-1,) + (1,) * (param.dim() - 1)
            update = param.grad + self.weight_decay.view(shape) * param
            buffer = self.buffers_sgd[name].mul_(self.momentum.view(shape)).add_(update)
            update = update + self.momentum.view(shape) * buffer if self.nesterov else buffer
            param.sub_(self.lr.view(shape) * update)
            param.grad = None

    @torch.no_grad()
    def write_back(self, jobs: list[Job]) -> None:
        """Each member's parameters, BatchNorm statistics and momentum buffers back into its model and optimizer."""
        for i, job in enumerate(jobs):
            named = dict(job.model.named_parameters())
            for name, value in self.params.items():
                named[name].copy_(value[i])
                if self.momentum[i] != 0:  # SGD keeps no buffer without momentum
                    job.optimizer.state[named[name]]["momentum_buffer"] = self.buffers_sgd[name][i].clone()
            for name, value in dict(job.model.named_buffers()).items():
                value.copy_(self.buffers[name][i])


def momentum_buffer(job: Job, name: str) -> Tensor:
    """The member's SGD momentum buffer of a parameter (zeros before its first step: then b = d, as SGD's clone)."""
    param = job.model.get_parameter(name)
    buffer = job.optimizer.state.get(param, {}).get("momentum_buffer")
    return buffer if buffer is not None else torch.zeros_like(param)


@dataclass(frozen=True)
class Plan:
    """How a group's members are stacked, decided once per group (plan): `chunk` members per stacked model, as
    GroupedStudents (`grouped`) or StackedStudents."""

    chunk: int
    grouped: bool


def plan(jobs: list[Job]) -> Plan:
    """chunk_size's chunks, grouped where the first chunk's members pass GroupedStudents' check."""
    chunk = chunk_size(jobs[0])
    return Plan(chunk, GroupedStudents(jobs[:chunk]).checked(jobs[:chunk]))


def stack_students(jobs: list[Job], how: Optional[Plan] = None) -> "Stacks":
    """The members as stacked models as `how` says (default: plan(jobs))."""
    how = how or plan(jobs)
    kind = GroupedStudents if how.grouped else StackedStudents
    return Stacks([kind(jobs[start:start + how.chunk]) for start in range(0, len(jobs), how.chunk)])


class Stacks:
    """Stacked models run one after another, as one StackedStudents: their logits (members, batch, classes) in
    member order, their SGD steps, their write-backs."""

    def __init__(self, stacks: list[StackedStudents]):
        self.stacks = stacks

    def __call__(self, images: Tensor, shared: bool) -> Tensor:
        logits, start = [], 0
        for stack in self.stacks:
            logits.append(stack(images if shared else images[start:start + stack.members], shared))
            start += stack.members
        return torch.cat(logits) if len(logits) > 1 else logits[0]

    def step(self) -> None:
        for stack in self.stacks:
            stack.step()

    def write_back(self, jobs: list[Job]) -> None:
        start = 0
        for stack in self.stacks:
            stack.write_back(jobs[start:start + stack.members])
            start += stack.members


class GroupedStudents(StackedStudents):
    """The members as one model on (batch, members x channels, H, W) tensors, member-major: each Conv2d a grouped
    convolution with members x its groups, each BatchNorm2d one over every member's channels (per-channel statistics
    are per member), each Linear a batched matrix product; their weights are views of the stacked parameters, so
    step() and write_back() are StackedStudents'. `model` is None where the members' model has a layer with weights
    that has no grouped counterpart; checked() says whether the grouped model is right for the members."""

    CHECK_IMAGES = 16  # images of the check that the grouped logits equal each member's
    CHECK_TOLERANCE = 1e-3  # largest difference allowed, relative to the largest logit (float32 order: 1e-7 to 1e-4)

    def __init__(self, jobs: list[Job]):
        super().__init__(jobs)
        self.memory_format = hardware.memory_format(jobs[0].data)
        self.model = grouped_model(jobs[0].model, self.params, self.buffers, self.members)

    def __call__(self, images: Tensor, shared: bool) -> Tensor:
        """Logits (members, batch, classes), as StackedStudents'."""
        self.model.train()
        return self.grouped_logits(images, shared)

    def grouped_logits(self, images: Tensor, shared: bool) -> Tensor:
        if shared:
            x = images.repeat(1, self.members, 1, 1)
        else:  # (members, batch, C, H, W) -> (batch, members x C, H, W)
            x = images.transpose(0, 1).flatten(1, 2)
        logits = self.model(x.contiguous(memory_format=self.memory_format))
        return logits.view(logits.shape[0], self.members, -1).transpose(0, 1)

    def checked(self, jobs: list[Job]) -> bool:
        """Whether the grouped model exists and is the members side by side, on a few images in train mode (every
        BatchNorm statistic put back after): its logits equal each member's own, and the first and last member's
        logits have no gradient in any other member's parameters. A model that mixes channels (concatenating or
        shuffling them, as ShuffleNets do) fails either."""
        if self.model is None:
            return False
        images = jobs[0].data.sample_inputs(min(self.CHECK_IMAGES, jobs[0].data.num_train))
        kept = [(job.model.training, {k: v.clone() for k, v in job.model.named_buffers()}) for job in jobs]
        stacked = {k: v.clone() for k, v in self.buffers.items()}
        tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        # IEEE fp32 on a GPU too (a bf16 run leaves TF32 on): the logits then differ by the sums' order alone
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            with torch.no_grad():
                alone = torch.stack([job.model.train()(images) for job in jobs]).float()
            self.model.train()
            together = self.grouped_logits(images, shared=True)
            crossing = [i for i in (0, self.members - 1) if self.crosses(together[i], i)]
        except RuntimeError as error:
            say_once(f"fused group runs through vmap: the grouped model failed ({error})")
            return False
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
            for job, (mode, buffers) in zip(jobs, kept):
                job.model.train(mode).load_state_dict(buffers, strict=False)
            for name, value in stacked.items():
                self.buffers[name].copy_(value)
        difference = (together.detach().float() - alone).abs().max()
        if crossing or not difference <= self.CHECK_TOLERANCE * alone.abs().max():
            say_once(f"fused group runs through vmap: the grouped model's logits differ by {difference:.3g}"
                     + (f", member {crossing[0]}'s depend on other members" if crossing else ""))
            return False
        return True

    def crosses(self, logits: Tensor, member: int) -> bool:
        """Whether `logits` of `member` have a gradient in another member's parameters."""
        names = list(self.params)
        grads = torch.autograd.grad(logits.sum(), [self.params[n] for n in names], retain_graph=True,
                                    allow_unused=True)
        return any(g is not None and torch.cat([g[:member], g[member + 1:]]).ne(0).any() for g in grads)


@functools.cache
def say_once(message: str) -> None:
    """Why a group runs through vmap, logged once per process (each group checks)."""
    log.info("%s", message)


def grouped_model(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor],
                  members: int) -> Optional[nn.Module]:
    """A copy of `model` whose Conv2d, BatchNorm2d and Linear layers are their grouped counterparts over the stacked
    `params` and `buffers`; None when another layer holds weights or a layer's options are not covered."""
    grouped = copy.deepcopy(model).to("meta")
    for name, module in list(grouped.named_modules()):
        tensors = lambda n: {k: v for k, v in {**params, **buffers}.items() if k.rpartition(".")[0] == n}  # noqa: E731
        owned = tensors(name)
        if not owned:
            continue
        layer = grouped_layer(module, owned, members, name)
        if layer is None:
            return None
        parent, _, child = name.rpartition(".")
        setattr(grouped.get_submodule(parent), child, layer)
    return grouped


def grouped_layer(module: nn.Module, owned: dict[str, Tensor], members: int, name: str) -> Optional[nn.Module]:
    """The grouped counterpart of one layer with weights (`owned`: its stacked tensors by full name), or None."""
    tensors = {k.rpartition(".")[2]: v for k, v in owned.items()}
    if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and isinstance(module.padding, tuple):
        return GroupedConv2d(module, tensors, members)
    if type(module) is nn.BatchNorm2d and module.momentum is not None:
        return GroupedBatchNorm2d(module, tensors)
    if type(module) is nn.Linear:
        return GroupedLinear(tensors)
    say_once(f"fused group runs through vmap: {name} ({type(module).__name__}) has no grouped counterpart")
    return None


class GroupedConv2d(nn.Module):
    """A Conv2d of every member at once: weight (members x out, in / groups, kh, kw), members x groups groups; a 1x1
    strided unpadded one convolves x[..., ::s, ::s] with stride 1 on the CPU, as kd.cpu_conv routes it."""

    def __init__(self, conv: nn.Conv2d, tensors: dict[str, Tensor], members: int):
        super().__init__()
        self.weight, self.bias = tensors["weight"], tensors.get("bias")
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups = members * conv.groups
        self.subsample = conv.kernel_size == (1, 1) and conv.stride != (1, 1) and conv.padding == (0, 0)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.flatten(0, 1)
        bias = None if self.bias is None else self.bias.flatten()
        if self.subsample and x.device.type == "cpu":
            return F.conv2d(x[..., ::self.stride[0], ::self.stride[1]], weight, bias, 1, 0, self.dilation,
                            self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class GroupedBatchNorm2d(nn.Module):
    """A BatchNorm2d of every member at once: one over members x channels, whose running statistics are views of
    the stacked buffers (updated in place in train mode, as each member's alone)."""

    def __init__(self, bn: nn.BatchNorm2d, tensors: dict[str, Tensor]):
        super().__init__()
        self.eps, self.momentum = bn.eps, bn.momentum
        self.weight, self.bias = tensors.get("weight"), tensors.get("bias")
        self.running_mean, self.running_var = tensors.get("running_mean"), tensors.get("running_var")
        self.num_batches_tracked = tensors.get("num_batches_tracked")

    def forward(self, x: Tensor) -> Tensor:
        flat = lambda t: None if t is None else t.view(-1)  # noqa: E731 (views: the stacked tensors are updated)
        batch_stats = self.training or self.running_mean is None
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, flat(self.running_mean), flat(self.running_var), flat(self.weight), flat(self.bias),
                            batch_stats, self.momentum, self.eps)


class GroupedLinear(nn.Module):
    """A Linear of every member at once: (batch, members x in) -> (batch, members x out), a batched matmul."""

    def __init__(self, tensors: dict[str, Tensor]):
        super().__init__()
        self.weight, self.bias = tensors["weight"], tensors.get("bias")

    def forward(self, x: Tensor) -> Tensor:
        members = self.weight.shape[0]
        x = x.reshape(x.shape[0], members, -1).transpose(0, 1)  # (members, batch, in)
        out = torch.bmm(x, self.weight.transpose(1, 2))
        if self.bias is not None:
            out = out + self.bias.unsqueeze(1)
        return out.transpose(0, 1).flatten(1)
