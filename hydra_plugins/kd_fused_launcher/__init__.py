"""`hydra/launcher=fused`: the jobs of a multirun that differ only in kd.fused.FUSED_KEYS (and the loss's values)
train in one process as one stacked model array (kd.fused); every other job runs as Hydra's basic launcher runs it,
with one line saying why. conf/hydra/launcher/fused.yaml selects it:

    python train.py -m hydra/launcher=fused experiment=quickstart phase=student loss.alpha=0.5,0.9 seed=0,1

Each job gets its Hydra job folder as the basic launcher makes it, its own records (kd.fused), and one JobReturn, so
the sweep callback (kd.sweep) and kd.report see the sweep as if its jobs had run one after another.
"""
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence

from hydra._internal.callbacks import Callbacks
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A job's composed config and folder, as train.py would receive them, before it trains."""

    index: int
    config: DictConfig  # the whole sweep config (hydra node included)
    member: Any = None  # kd.fused.Member, once its folder is made


class FusedLauncher(Launcher):
    """The basic launcher's jobs, with the fusable ones trained together (kd.fused.run_group)."""

    def __init__(self, memory_gb: Optional[float] = None) -> None:
        self.memory_gb = memory_gb
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from kd import fused  # here: Hydra imports every plugin module when it starts

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs, fusing those that differ only in {', '.join(fused.FUSED_KEYS)} "
                 "and the loss's values")
        jobs = [self.prepare(initial_job_idx + i, overrides) for i, overrides in enumerate(job_overrides)]
        returns: dict[int, JobReturn] = {}
        for group in self.groups(jobs, fused):
            if len(group) == 1:
                returns[group[0].index] = self.run_alone(group[0])
            else:
                returns.update(self.run_fused(group, fused))
        return [returns[job.index] for job in jobs]

    def prepare(self, index: int, overrides: Sequence[str]) -> Prepared:
        log.info(f"\t#{index} : {' '.join(filter_overrides(overrides))}")
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config):
            config.hydra.job.id = index
            config.hydra.job.num = index
        return Prepared(index, config)

    def groups(self, jobs: list[Prepared], fused) -> list[list[Prepared]]:
        """Jobs by kd.fused.group_key; a job that cannot be fused is a group of its own, with one line saying why."""
        groups: dict[str, list[Prepared]] = {}
        for job in jobs:
            task = task_config(job.config)
            try:
                reason = fused.unfusable_reason(task)
                key = fused.group_key(task) if reason is None else None
            except Exception as error:  # noqa: BLE001 (a bad value: the job's own run refuses it, naming the key)
                reason, key = f"its config is refused ({type(error).__name__})", None
            if reason is not None:
                log.info(f"\t#{job.index} runs alone: {reason}")
            groups.setdefault(key or f"alone-{job.index}", []).append(job)
        return list(groups.values())

    def run_alone(self, job: Prepared) -> JobReturn:
        """As Hydra's basic launcher runs a job."""
        result = run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=job.config,
                         job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return result

    def run_fused(self, group: list[Prepared], fused) -> dict[int, JobReturn]:
        """Make each job's folder as run_job does (its Hydra config, its logging), then train them together."""
        log.info(f"fused group of {len(group)}: #{', #'.join(str(job.index) for job in group)}")
        returns = {}
        # The callbacks see each job start here and end once it has trained (kd.sweep sums the sweep up then).
        quiet = HydraContext(config_loader=self.hydra_context.config_loader, callbacks=Callbacks())
        for job in group:
            self.hydra_context.callbacks.on_job_start(config=job.config, task_function=self.task_function)
            returns[job.index] = run_job(hydra_context=quiet, task_function=member_of, config=job.config,
                                         job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
            job.member = returns[job.index].return_value
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        try:
            outcomes = fused.run_group([job.member for job in group], self.memory_gb)
        except KeyboardInterrupt:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            stop_interrupted(group, self.config)
        for job, outcome in zip(group, outcomes):
            settle(returns[job.index], outcome)
            self.hydra_context.callbacks.on_job_end(config=job.config, job_return=returns[job.index])
        return returns


def stop_interrupted(group: list[Prepared], config: DictConfig) -> NoReturn:
    """Ctrl-C in a fused group: as train.py's jobs stop a sweep, one line per job the group had not finished (how far
    it got, the command that relaunches the sweep) and the exit status a shell gives SIGINT."""
    from kd import engine, feedback

    command = feedback.resume_command(task_config(config), config.hydra)
    for job in group:
        member = job.member
        if member is not None and member.outcome is None:
            epochs = engine.phase_config(member.cfg).epochs
            print(feedback.interrupted_line(member.out_dir, epochs, command, sweep=True), file=sys.stderr)
    raise SystemExit(130) from None


def task_config(config: DictConfig) -> DictConfig:
    """The job's config as train.py receives it: without the hydra node."""
    task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    OmegaConf.set_struct(task, True)
    return task


def member_of(cfg: DictConfig):
    """Inside run_job: the job's kd.fused.Member, with what train.py would pass to kd.engine.run in a multirun."""
    from kd import fused

    hydra_cfg = HydraConfig.get()
    cfg.logger.group = cfg.logger.group or "/".join(Path(hydra_cfg.sweep.dir).parts[-2:])  # as train.py's
    return fused.Member(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task),
                        dict(hydra_cfg.runtime.choices))


def settle(job_return: JobReturn, outcome: Any) -> None:
    """The JobReturn train.py's job would give: the sweep metric, None (a folder another process holds), or the
    failure that stopped the job."""
    if isinstance(outcome, BaseException):
        job_return.status, job_return._return_value = JobStatus.FAILED, outcome
    elif outcome is None:
        job_return._return_value = None
    else:
        job_return._return_value = outcome.get("val/acc1", outcome["test/acc1"])
