"""Train a teacher (phase=teacher) or distill a student from it (phase=student). See README.md."""
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import NoReturn, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import kd.config  # noqa: F401  (registers the typed root schema)
from kd import completion, distributed, engine, feedback
from kd.fileio import CannotWrite, FolderBusy

log = logging.getLogger(__name__)
completion.install()  # tab completion of model@student= and of the Enum keys' values (-sc install=bash)

# What the checks raise for bad input, with a message naming the problem and the fix; and CannotWrite, which the few
# write points (kd.records) raise for a read-only folder or a full disk. Not OSError at large: that would print a bug
# or a failing disk as one line, without the traceback that locates it.
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, TimeoutError, FolderBusy, CannotWrite)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    distributed.init_from_env()  # under torchrun: join the process group
    if distributed.world_size() > 1:
        out_dir = shared_run_dir(out_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun:
        # One W&B group per sweep, named after its folder; cores shared out between parallel jobs.
        cfg.logger.group = cfg.logger.group or "/".join(Path(hydra_cfg.sweep.dir).parts[-2:])
        if cfg.threads is None:
            cfg.threads = threads_per_job(hydra_cfg.launcher)
    try:
        choices = dict(hydra_cfg.runtime.choices)  # which option of each config group (loss=kd): W&B tags
        result = engine.run(cfg, out_dir, overrides=list(hydra_cfg.overrides.task), choices=choices,
                            resume_with="" if multirun else feedback.resume_command(cfg, hydra_cfg))
    except KeyboardInterrupt:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        stop_interrupted(cfg, out_dir, hydra_cfg)
    except USER_ERRORS as error:
        # A refused input, a busy or unwritable folder: its message says what is wrong and how to fix it, so a single
        # run prints that alone (HYDRA_FULL_ERROR=1 shows the traceback); a multirun job raises it to its launcher as
        # any error, except a job whose folder another process holds: that one is left to it.
        if multirun and isinstance(error, FolderBusy):
            return skip_busy_job(out_dir, error)
        if multirun or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"Error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    # The sweep metric: validation accuracy when a validation split exists, so searches never see test.
    return result.get("val/acc1", result["test/acc1"])


def stop_interrupted(cfg: DictConfig, out_dir: Path, hydra_cfg: DictConfig) -> NoReturn:
    """Ctrl-C: one line (how far the run got, the command that resumes it) and the exit status a shell gives SIGINT;
    a sweep's job stops the sweep with it. last.pt is written atomically, so it holds the last whole epoch."""
    if distributed.is_main():
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        epochs = engine.phase_config(cfg).epochs
        command = feedback.resume_command(cfg, hydra_cfg)
        print(feedback.interrupted_line(out_dir, epochs, command, multirun), file=sys.stderr)
    raise SystemExit(130) from None


def skip_busy_job(out_dir: Path, busy: FolderBusy) -> None:
    """A sweep job whose folder another process holds (the same sweep launched twice): that process runs it, and this
    sweep goes on with its next job. Returns None, not a metric, so a search (optuna) records a failed trial, never
    a finished one; the basic sweeper ignores it."""
    log.warning("skipped %s: another process is running it (%s). Relaunch this sweep once that one has ended to run "
                "any job it did not finish.", out_dir, busy.holder or "its lock is held")


def shared_run_dir(out_dir: Path) -> Path:
    """Under torchrun every rank works in rank 0's run folder (their timestamps may differ by a second); a rank's
    own Hydra folder, if different, held only its copy of the config and log and is removed."""
    shared = Path(distributed.broadcast_object(str(out_dir)))
    if shared != out_dir:
        shutil.rmtree(out_dir, ignore_errors=True)
    return shared


def threads_per_job(launcher: DictConfig) -> int | None:
    """CPU threads for one job: the launcher's cpus_per_task (submitit), or the cores split over n_jobs (joblib)."""
    if launcher.get("cpus_per_task"):
        return int(launcher.cpus_per_task)
    n_jobs, cores = launcher.get("n_jobs"), os.cpu_count() or 1
    if not n_jobs or n_jobs == 1:
        return None
    parallel = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib: -1 = all cores, -2 = all but one
    return max(1, cores // parallel)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # outside a run (Hydra starting, a launcher waiting for its workers): one line too
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
