"""What a run tells the person who launched it, where no progress bar is seen (SLURM, nohup, joblib workers): the
start line (what is trained, where), plain progress lines with img/s and the run's ETA, how far an interrupted run
got, and the summary at the end of a multirun (counts, best configuration, the report command)."""
import fcntl
import logging
import os
import shlex
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from hydra.types import RunMode
from omegaconf import DictConfig

from kd import fileio, records
from kd.config import Phase

if TYPE_CHECKING:
    from kd.loop import Job  # kd.loop imports this module

log = logging.getLogger(__name__)

# Launchers that run the jobs in this process: they see this command's argv.
IN_PROCESS_LAUNCHERS = ("hydra._internal.core_plugins.basic_launcher.BasicLauncher",
                        "hydra_plugins.kd_fused_launcher.FusedLauncher")
MAX_BEST_LINES = 3  # best configurations tied at the tables' precision shown at the end of a sweep


class Progress:
    """One plain line every `every_s` seconds of training (0: every step): epoch, step, img/s and the whole run's
    ETA. It reads the clock and the batch sizes (Python ints) only, never a tensor: no host sync on the step."""

    def __init__(self, every_s: float, epochs: int):
        self.every_s, self.epochs = every_s, epochs
        self.last_line: Optional[float] = None  # when the last line was logged; the first epoch's start before one
        self.epoch_s: Optional[float] = None  # the last whole epoch's wall time (training and evaluation)
        self.epoch, self.steps, self.started, self.images = 0, 0, 0.0, 0

    def start(self, epoch: int, steps: int) -> None:
        self.epoch, self.steps, self.started, self.images = epoch, steps, time.perf_counter(), 0
        if self.last_line is None:
            self.last_line = self.started

    def step(self, step: int, images: int) -> None:
        """After training step `step` (counted from 1) of the epoch, on `images` images (the global batch)."""
        self.images += images
        now = time.perf_counter()
        if now - self.last_line >= self.every_s:
            self.last_line = now
            log.info(self.line(step, now - self.started))

    def line(self, step: int, elapsed: float) -> str:
        """The ETA: this epoch's steps left at this epoch's pace, then each later epoch as long as the last whole one
        (its evaluation included), or, before one has ended, as long as this one's training."""
        per_step = elapsed / step
        per_epoch = self.epoch_s if self.epoch_s is not None else per_step * self.steps
        eta = (self.steps - step) * per_step + (self.epochs - self.epoch) * per_epoch
        rate = self.images / elapsed if elapsed > 0 else 0.0
        return (f"epoch {self.epoch}/{self.epochs} step {step}/{self.steps} | {rate:.0f} img/s | "
                f"ETA {timedelta(seconds=round(eta))}")


def start_line(cfg: DictConfig, job: "Job", precision: str, out_dir: Path) -> str:
    """One line saying what this run trains: the pair (the model, for a teacher; the student alone, without one), the
    method, the data, the epochs, the device, the precision and the run folder."""
    from kd.report.keys import method_name, model_label  # here: kd.report's package imports matplotlib

    config = records.plain_config(cfg)
    teacher, student = model_label(config["teacher"]), model_label(config["student"])
    if Phase(cfg.phase) is Phase.teacher:
        what = f"teacher {teacher}"
    else:
        what = f"student {teacher} -> {student}" if job.teacher is not None else f"student {student}"
    return (f"training {what} | method {method_name(config)} | data {cfg.dataset.name} ({job.data.num_train} "
            f"training images) | {cfg.epochs} epochs | device {job.data.device} | precision {precision} | "
            f"run folder {out_dir}")


def checkpoint_epoch(out_dir: Path) -> int:
    """The last epoch out_dir's last.pt holds (0 without one, or in an init stage): where a rerun goes on from."""
    path = Path(out_dir) / "last.pt"
    if not path.is_file():
        return 0
    try:  # memory-mapped: only the few bytes of "epoch" are read, not the weights
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an unreadable last.pt: the rerun names it (kd.engine.last_checkpoint)
        return 0
    return int(checkpoint.get("epoch", 0)) if checkpoint.get("stage", "main") == "main" else 0


def interrupted_line(out_dir: Path, epochs: int, command: str, sweep: bool = False) -> str:
    """The one line a run stopped by Ctrl-C ends with: how far it got and the command that resumes it (for a job of a
    sweep, the command that relaunches the sweep: it resumes the job and runs the rest)."""
    done = checkpoint_epoch(out_dir)
    where = f"after epoch {done} of {epochs}" if done else f"before epoch 1 of {epochs} ended"
    if sweep:
        return f"interrupted job {Path(out_dir).name} {where}: the sweep stopped; relaunch it with: {command}"
    return f"interrupted {where}; resume with: {command}"


def resume_command(cfg: DictConfig, hydra_cfg: DictConfig) -> str:
    """The command that resumes this run (a sweep's job: relaunches the sweep) where it stopped: this command, plus
    the folder when its name came from the time (run_name, hydra.run.dir or hydra.sweep.dir gives a lasting one)."""
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    key, folder = ("hydra.sweep.dir", hydra_cfg.sweep.dir) if multirun else ("hydra.run.dir", hydra_cfg.run.dir)
    given = {o.split("=", 1)[0].lstrip("+~") for o in [*hydra_cfg.overrides.hydra, *hydra_cfg.overrides.task]}
    named = [] if cfg.run_name or key in given else [f"{key}={folder}"]
    if multirun and hydra_cfg.launcher._target_ not in IN_PROCESS_LAUNCHERS:  # a worker: argv is the launcher's
        return f"the sweep's command{' with ' + named[0] if named else ''}"
    return shell_command(["python", *sys.argv, *named])


def shell_command(argv: list[str]) -> str:
    """argv as one line a shell runs as it is (each argument quoted where it needs it)."""
    return " ".join(shlex.quote(str(argument)) for argument in argv)


# ---------------------------------------------------------------------------------------------------------------
# the end of a multirun


def lock_held(folder: Path) -> bool:
    """Whether a live process holds the folder's run lock (kd.fileio.folder_lock) now; nothing is written."""
    try:
        fd = os.open(Path(folder) / ".lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the shared lock it may have taken
    return False


def job_states(sweep_dir: Path) -> dict[str, int]:
    """The sweep's jobs by state: finished (a result kd.report tables), skipped (another process holds the folder:
    the same sweep launched twice), failed (a folder without such a result), not run (asked by sweep.json's grid,
    no folder)."""
    from kd.report.collect import expected_jobs, result_damage  # here: kd.report's package imports matplotlib

    counts = {"finished": 0, "failed": 0, "not run": 0, "skipped": 0}
    folders = [p for p in Path(sweep_dir).iterdir() if p.is_dir()] if Path(sweep_dir).is_dir() else []
    for folder in folders:
        counts[folder_state(folder, result_damage)] += 1
    counts["not run"] = max(0, len(expected_jobs(sweep_dir) or []) - len(folders))
    return counts


def folder_state(folder: Path, damage: Callable[[dict[str, Any]], str]) -> str:
    """finished, skipped or failed (see job_states); `damage`: kd.report's check of a result.json."""
    try:
        result = fileio.read_json(folder / "result.json", "")
        if not damage(result):
            return "finished"
    except (OSError, fileio.CorruptRecord):
        pass
    return "skipped" if lock_held(folder) else "failed"


def best_configurations(sweep_dir: Path) -> list[str]:
    """The best configuration by kd.report's rows (mean over seeds) of the sweep metric, the one train.py returns to
    the sweeper: val/acc1 when the runs have a validation split, else test/acc1; as the overrides that tell it from
    the sweep's other jobs (several lines for a tie at the tables' precision)."""
    from kd.report.aggregate import best_of, group_runs, recorded_metrics, summarize
    from kd.report.collect import expected_jobs, load_runs, swept_overrides
    from kd.report.keys import metric_key

    runs = [run for run in load_runs([sweep_dir]) if run.result is not None]
    if not runs:
        return []
    metric = "val/acc1" if "val/acc1" in recorded_metrics(runs) else "last"
    rows = summarize(group_runs(runs, [sweep_dir]), [metric] if metric == "val/acc1" else [])
    students = [row for row in rows if row.group.key.get("phase") != "teacher"] or rows  # as kd.report's best_rows
    jobs = [job_setting(job) for job in [*(expected_jobs(sweep_dir) or []), *(run.overrides for run in runs)]]
    lines = []
    for row in sorted((row for row in students if row.index in best_of(students, metric)), key=lambda r: r.index):
        setting = " ".join(swept_overrides(job_setting(row.group.runs[0].overrides), jobs))
        lines.append(f"best: {setting or 'the sweep has one configuration'} ({metric_key(metric)} "
                     f"{row.stats[metric][0]:.2f}, mean of {row.n} run{'s' if row.n > 1 else ''})")
    return lines[:MAX_BEST_LINES]


def job_setting(overrides: Any) -> tuple[str, ...]:
    """A job's overrides without its seed and the settings that change no result (kd.report's seedless)."""
    from kd.report.collect import normalize, seedless

    return tuple(f"{key}={value}" for key, value in sorted(seedless(normalize(overrides))))


def sweep_summary(sweep_dir: Path) -> list[str]:
    """The lines a multirun ends with: its jobs' counts, the best configuration, the report command."""
    counts = job_states(sweep_dir)
    shown = ", ".join(f"{n} {state}" for state, n in counts.items() if n or state == "finished")
    if counts["skipped"]:  # last of the counts
        shown += ": another process runs them, relaunch once it has ended"
    lines = [f"sweep {sweep_dir}: {shown}"]
    lines += best_configurations(Path(sweep_dir))
    lines.append(f"report: {shell_command(['python', '-m', 'kd.report', str(sweep_dir)])}")
    return lines
