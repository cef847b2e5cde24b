"""Hydra multirun hook: before any job starts, check the sweep folder and the sweep's teacher once.

1. The sweep folder: a relaunch into a folder that holds a sweep (its `sweep.json`) may resume it or add jobs (more
   values of the keys it sweeps), nothing else; anything else, or a sweep.json that cannot be read, is refused
   before Hydra rewrites a file there. So are the sweep's constant settings that kd.config.check_config refuses.
2. Job folders are named by the swept keys only (`loss.alpha=0.9,seed=1`), so a job keeps its folder when a
   relaunch adds values; the constant overrides live in sweep.json and multirun.yaml. Long names are cut and
   completed with a hash (kd.records.bounded_name).
3. The cost: the number of runs, the teachers to train first and the estimated GPU-hours (kd.sweep_cost), logged.
4. The teacher: a student sweep whose jobs share one teacher finds it here, or fails here once with the command
   that trains it (or, with train_missing_teacher=true, trains it here once, before the jobs).
5. An Optuna search whose study its sweep folder holds continues it (kd.study).
6. The end: a few lines with the jobs finished, failed, skipped (another process runs them) and not run, the best
   configuration, and the kd.report command (kd.feedback.sweep_summary).

A single run's hook refuses a student run of a sweep preset without -m (it would train one job, varying nothing), and
creates the run's folder before Hydra does, so that a read-only outputs/ is one line, not a traceback.
"""
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

import kd.config  # noqa: F401  (registers the kd_job_dir resolver, also in launcher worker processes)
from hydra_plugins.kd_grid_sweeper import check_exclude, is_excluded
from kd import engine, feedback, fileio, records, stages, study, sweep_cost, teachers
from kd.config import Phase, check_config

log = logging.getLogger(__name__)

# Config heads that can change which teacher a student job needs.
TEACHER_HEADS = set(teachers.IDENTITY_KEYS) | {"teacher_seed", "teacher_store", "experiment", "sweep"}
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
GRID_SWEEPER = "hydra_plugins.kd_grid_sweeper.GridSweeper"  # the basic sweeper less its `exclude` jobs


class SweepChecks(Callback):
    """Checks the sweep folder, names the job folders by the swept keys, records the sweep, finds its teacher; sums
    the sweep up at its end."""

    def __init__(self) -> None:
        self.jobs_left: Optional[int] = None  # the grid's jobs still to end in this process (the basic launcher's)
        self.pid, self.summarized = os.getpid(), False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        self.pid, self.summarized = os.getpid(), False
        try:
            record = sweep_record(config)
            refusal = check_sweep_folder(sweep_dir, record) or settings_refusal(config)
            if refusal is None:
                log_cost(config, record)
                refusal = teacher_preflight(config)
        except Exception as error:  # Hydra would turn it into a warning and run the sweep unchecked
            refusal = f"the sweep's checks failed before any job ({type(error).__name__}: {error})"
        if refusal is not None:
            # Hydra turns a callback's exceptions into warnings; SystemExit stops the sweep before its jobs.
            log.error("%s", refusal)
            raise SystemExit(1)
        name_jobs_by_swept_keys(config, record)
        try:
            fileio.write_json(sweep_dir / "sweep.json", record)
        except fileio.CannotWrite as error:  # a read-only or full sweep folder: one line, before any job
            log.error("%s", error)
            raise SystemExit(1) from None
        study.continue_study(config)
        self.jobs_left = len(record["grid"]) if record["grid"] is not None else None

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """The basic sweeper raises a failed job's error once its jobs have run, and on_multirun_end never comes: the
        sweep is summed up when the last of its jobs run in this process ends."""
        if self.jobs_left is None or os.getpid() != self.pid or config.hydra.mode != RunMode.MULTIRUN:
            return
        self.jobs_left -= 1
        if self.jobs_left == 0:
            self.summarize(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.summarize(Path(config.hydra.sweep.dir))

    def summarize(self, sweep_dir: Path) -> None:
        """Log the sweep's summary once (kd.feedback.sweep_summary)."""
        if self.summarized:
            return
        self.summarized = True
        for line in feedback.sweep_summary(sweep_dir):
            log.info("%s", line)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A single run: create its folder before Hydra does, so that an unwritable parent (a read-only outputs/) is
        one line naming it, not Hydra's traceback; with HYDRA_FULL_ERROR=1, Hydra's mkdir fails with the traceback."""
        refusal = single_run_of_a_sweep(config)
        if refusal is not None:
            print(f"Error: {refusal}", file=sys.stderr)
            raise SystemExit(1)
        run_dir = Path(config.hydra.run.dir)  # the path Hydra creates next: ${now:...} resolves once per config
        fix = "Make the folder it is in writable, or give this run another folder (hydra.run.dir=...)."
        try:
            with fileio.writing(run_dir, fix):
                run_dir.mkdir(parents=True, exist_ok=True)
        except fileio.CannotWrite as error:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                return
            print(f"Error: {error}", file=sys.stderr)  # as train.py prints a refused run
            raise SystemExit(1) from None


def single_run_of_a_sweep(config: DictConfig) -> Optional[str]:
    """Why a single run (no -m) of a student sweep is refused: Hydra would run one job, with none of the keys of
    hydra.sweeper.params varied. A teacher run of a sweep preset is what the sweep's missing-teacher message asks for
    (the preset's dataset settings define the teacher), so it runs."""
    params = config.hydra.sweeper.get("params")
    if not params or Phase(config.phase) is not Phase.student:
        return None
    preset = config.hydra.runtime.choices.get("sweep")
    what = f"sweep={preset} is a sweep preset: its" if preset else "this command sets"
    return (f"{what} hydra.sweeper.params ({', '.join(params)}) vary only in a multirun, and without -m this would "
            "train one student with none of them varied. Add -m to the same command (python train.py -m ...).")


def sweep_record(config: DictConfig) -> dict[str, Any]:
    """The sweep as sweep.json records it: constant overrides, swept keys with their values, the jobs `exclude` leaves
    out of the grid (kd_grid_sweeper), the grid of jobs."""
    sweeper = OmegaConf.to_container(config.hydra.sweeper, resolve=False)
    params = {k: str(v) for k, v in (sweeper.get("params") or {}).items()}
    overrides = [str(o) for o in config.hydra.overrides.task]
    basic = sweeper.get("_target_") in (BASIC_SWEEPER, GRID_SWEEPER)
    exclude = check_exclude(sweeper.get("exclude"))
    fixed, swept = {}, {}
    arguments = [f"{k}={v}" for k, v in params.items()] + overrides
    for argument, override in zip(arguments, OverridesParser.create().parse_overrides(arguments), strict=True):
        key = override.get_key_element()
        if override.is_sweep_override():  # a later override of a key (the command line's) replaces the preset's
            # a search's distribution (optuna's interval(0, 1)) is recorded as written: it has no values to list
            swept[key] = list(override.sweep_string_iterator()) if basic else [argument.split("=", 1)[1]]
            fixed.pop(key, None)
        else:
            fixed[key] = override.get_value_element_as_str()
            swept.pop(key, None)
    grid = None
    if basic:
        grid = [list(job) for job in records.sweep_grid(params, overrides) if not is_excluded(job, exclude)]
    return {"sweeper": sweeper.get("_target_"), "fixed": fixed, "swept": swept, "exclude": exclude, "grid": grid}


def log_cost(config: DictConfig, record: dict[str, Any]) -> None:
    """Log the sweep's runs, the teachers it trains first and its estimated GPU-hours (kd.sweep_cost)."""
    grid = record["grid"]
    excluded = math.prod(len(values) for values in record["swept"].values()) - len(grid) if grid is not None else 0
    line = sweep_cost.describe(config, grid, excluded)
    if line is not None:
        log.info("%s: %s", config.hydra.sweep.dir, line)


def check_sweep_folder(sweep_dir: Path, new: dict[str, Any]) -> Optional[str]:
    """Why this sweep may not run in sweep_dir (None when it may): a folder holding another sweep, or a sweep.json
    that cannot be read (this sweep could not be checked against it), is refused."""
    fix = (f"Start a new sweep folder (hydra.sweep.dir={sweep_dir}_2, or any other), or delete {sweep_dir} to "
           "replace that sweep.")
    path = sweep_dir / "sweep.json"
    if not path.is_file():
        if sweep_dir.is_dir() and any(sweep_dir.iterdir()):
            return f"{sweep_dir} holds files but no sweep.json: it is not a sweep folder of this repository. {fix}"
        return None
    unchecked = f"This relaunch cannot be checked against the sweep it records, so no job was started. {fix}"
    try:
        old = fileio.read_json(path, unchecked)
    except OSError as error:
        return f"{path} cannot be read ({error.strerror or error}). {unchecked}"
    except fileio.CorruptRecord as error:
        return str(error)
    if not isinstance(old.get("fixed"), dict) or not isinstance(old.get("swept"), dict):
        return f"{path} is damaged (it holds no fixed and swept overrides). {unchecked}"
    differences = sweep_differences(old, new)
    if differences:
        return (f"{sweep_dir} holds another sweep ({'; '.join(differences)}). A relaunch into a sweep folder may "
                f"resume that sweep or add jobs (more values of the keys it sweeps), nothing else. {fix}")
    return None


def sweep_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """How `new` differs from `old` beyond resuming it or adding values to its swept keys."""
    problems = [] if old.get("sweeper") == new["sweeper"] else [f"sweeper: {old.get('sweeper')} -> {new['sweeper']}"]
    was, now = _relevant(old.get("fixed", {})), _relevant(new["fixed"])
    for key in sorted(was.keys() | now.keys()):
        if was.get(key) != now.get(key):
            problems.append(f"{key}: {was.get(key, 'not set')} -> {now.get(key, 'not set')}")
    added = [entry for entry in new.get("exclude", []) if entry not in old.get("exclude", [])]
    problems += [f"exclude: adds {entry} (drops jobs)" for entry in added]
    if set(old.get("swept", {})) != set(new["swept"]):
        problems.append(f"swept keys: {', '.join(sorted(old.get('swept', {})))} -> {', '.join(sorted(new['swept']))} "
                        "(job folders are named by them)")
        return problems
    for key, values in sorted(old["swept"].items()):
        dropped = [v for v in values if v not in new["swept"][key]]
        if dropped:
            problems.append(f"{key}: {','.join(values)} -> {','.join(new['swept'][key])} (drops {','.join(dropped)})")
    return problems


def _relevant(fixed: dict[str, str]) -> dict[str, str]:
    """The constant overrides that change a result (logger, device, threads, store paths ... may change)."""
    return {k: v for k, v in fixed.items() if not records.is_under(k.lstrip("+~"), records.RESULT_NEUTRAL)}


def name_jobs_by_swept_keys(config: DictConfig, record: dict[str, Any]) -> None:
    """Leave the constant overrides out of every job's folder name (hydra.job.override_dirname).

    Hydra composes each job's config from the sweep config's `hydra.overrides.hydra` plus the job's overrides
    (ConfigLoaderImpl.load_sweep_config), so one more Hydra override added here reaches every job, in any launcher.
    """
    parser = OverridesParser.create()
    fixed = parser.parse_overrides([f"{k}={v}" for k, v in record["fixed"].items()])
    constant = sorted({o.key_or_group for o in fixed})
    quoted = ",".join("'" + key.replace("\\", "\\\\").replace("'", "\\'") + "'" for key in constant)
    with read_write(config.hydra.overrides), open_dict(config.hydra.overrides):
        config.hydra.overrides.hydra.append(f"hydra.job.config.override_dirname.exclude_keys=[{quoted}]")


def settings_refusal(config: DictConfig) -> Optional[str]:
    """check_config's refusal of the sweep's settings (the swept values are checked by each job)."""
    cfg = _without_hydra(config)
    if set(OmegaConf.missing_keys(cfg)) & split_overrides(config)[0]:
        return None  # a swept value that no config option gives: only the jobs hold it, and each checks its own
    try:
        check_config(engine.phase_config(cfg))
    except ValueError as error:
        return str(error)
    return None


def teacher_preflight(config: DictConfig) -> Optional[str]:
    """Find (or train) a student sweep's one shared teacher now; the missing-teacher message when it cannot."""
    if Phase(config.phase) is not Phase.student or config.teacher_checkpoint != "auto":
        return None
    swept, fixed = split_overrides(config)
    heads = TEACHER_HEADS | ({"seed"} if OmegaConf.is_interpolation(config, "teacher_seed") else set())
    heads |= set(teachers.RECIPE_KEYS) if teachers.shared_recipe(config) else set()
    if any(_head(key) in heads for key in swept):
        return None  # several teachers: each job finds (or trains, under a lock) its own
    cfg = _without_hydra(config)
    needs_teacher = stages.needs_teacher(instantiate(cfg.loss)) or any(_head(k) == "loss" for k in swept)
    try:
        engine.find_or_train_teacher(cfg, engine.wants_teacher(cfg, needs_teacher), fixed)
    except (FileNotFoundError, ValueError, InstantiationException) as error:
        # a missing teacher, a teachers_dir without the pair's file, data a teacher trained here could not read
        return str(error)
    return None


def _without_hydra(config: DictConfig) -> DictConfig:
    """The sweep config as a job's config: a copy without its `hydra` node."""
    cfg = config.copy()
    with open_dict(cfg):
        cfg.pop("hydra")
    return cfg


def split_overrides(config: DictConfig) -> tuple[set[str], list[str]]:
    """The keys the sweep varies (command line and hydra.sweeper.params) and the fixed overrides."""
    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    swept |= set((config.hydra.sweeper.get("params") or {}).keys())
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    return swept, fixed


def _head(key: str) -> str:
    """`loss.alpha` -> loss, `model@student` -> student, `+model@teacher=x` -> teacher."""
    key = key.lstrip("+~")
    return (key.split("@", 1)[1] if "@" in key else key).split(".", 1)[0]
