"""Job folders -> runs and problems: what a sweep has (run.json, result.json, run_info.json, metrics.jsonl) and what
it should have (sweep.json's grid); a missing, unfinished or damaged job is a Problem, never a row."""
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser

from kd import fileio
from kd.report.keys import METRICS, SEED_KEY, group_key, is_ignored


@dataclass
class Run:
    """One job folder: its overrides, and its result.json (None when the job failed or never finished)."""

    path: Path
    sweep_dir: Path
    overrides: tuple[str, ...]
    result: Optional[dict[str, Any]]
    key: dict[str, Any] = field(default_factory=dict)  # flattened config minus seed and IGNORED_KEYS, plus method
    problem: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # run_info.json: speed and other per-execution facts

    @property
    def seed(self) -> Any:
        return (self.result or {}).get("config", {}).get(SEED_KEY)


@dataclass
class Problem:
    """An expected job without a result: missing (no folder), failed/unfinished (folder, no result.json) or damaged
    (a result.json kd.report cannot table)."""

    sweep_dir: Path
    overrides: tuple[str, ...]
    status: str
    path: Optional[Path] = None
    swept: tuple[str, ...] = ()  # the overrides that tell this job from the sweep's others

    def line(self) -> str:
        where = f"`{self.path.relative_to(self.sweep_dir)}`" if self.path else "no job folder"
        return f"{self.status}: {' '.join(self.swept or self.overrides)} ({where} in `{self.sweep_dir}`)"


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Folders under sweep_dir (or sweep_dir itself) whose run passed its checks (they hold run.json)."""
    sweep_dir = Path(sweep_dir)
    if (sweep_dir / "run.json").is_file():
        return [sweep_dir]
    return sorted(p.parent for p in sweep_dir.rglob("run.json"))


def load_run(path: Path, sweep_dir: Path) -> Run:
    """Read one job folder; a missing, unreadable or damaged result.json (result_damage) marks it as a problem."""
    try:
        record = fileio.read_json(path / "run.json", "")
    except fileio.CorruptRecord as error:
        return Run(path, Path(sweep_dir), (), None, problem=str(error))
    run = Run(path, Path(sweep_dir), tuple(str(o) for o in record.get("overrides", [])), None)
    try:
        run.result = fileio.read_json(path / "result.json", "")
    except FileNotFoundError:
        run.problem = "failed or unfinished (no result.json" + _progress(path) + ")"
        return run
    except fileio.CorruptRecord as error:
        run.problem = f"unreadable result.json ({error})"
        return run
    damage = result_damage(run.result)
    if damage:  # listed as a problem, never tabled
        run.problem, run.result = f"damaged result.json ({path / 'result.json'}: {damage})", None
        return run
    try:
        run.info = fileio.read_json(path / "run_info.json", "")
    except (FileNotFoundError, fileio.CorruptRecord):
        run.info = {}
    run.key = group_key(run.result, set(record.get("seed_linked", [])))
    return run


def result_damage(result: dict[str, Any]) -> str:
    """What keeps a result.json out of the table ("" when nothing): a config that is not an object, or a metric of
    METRICS that is missing or not a finite number (a finished run of this repository writes both)."""
    config = result.get("config")
    if not isinstance(config, dict):
        return "no config" if config is None else f"its config is a JSON {type(config).__name__}, not an object"
    for metric in METRICS.values():
        value = result.get(metric)
        if value is None:
            return f"no {metric}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{metric} is {json.dumps(value)}, not a finite number"
    return ""


def load_runs(sweep_dirs: Sequence[Path]) -> list[Run]:
    """Every job folder of the sweeps, finished or not, each once: a job under two of the folders given (one inside
    the other) belongs to the innermost."""
    owner: dict[Path, tuple[Path, Path]] = {}
    for sweep_dir in map(Path, sweep_dirs):
        for path in job_dirs(sweep_dir):
            known = owner.get(path.resolve())
            if known is None or len(sweep_dir.resolve().parts) > len(known[1].resolve().parts):
                owner[path.resolve()] = (path, sweep_dir)
    return [load_run(path, sweep_dir) for path, sweep_dir in owner.values()]


def check_repeated_runs(runs: Sequence[Run]) -> None:
    """Refuse runs of one experiment and seed in two of the folders reported together (a sweep repeated into
    another folder): each run is counted once, and which copy counts is the user's choice. ValueError naming them."""
    first: dict[tuple[str, str], Run] = {}
    repeated = []
    for run in runs:
        if run.result is None:
            continue
        key = (json.dumps(run.key, sort_keys=True, default=str), json.dumps(run.seed))
        other = first.setdefault(key, run)
        if other is not run and other.sweep_dir != run.sweep_dir:
            repeated.append(f"{other.path} and {run.path} (seed {run.seed})")
    if repeated:
        more = f"; and {len(repeated) - 3} more" if len(repeated) > 3 else ""
        raise ValueError(
            f"Runs of one config and seed are in two of the folders given: {'; '.join(repeated[:3])}{more}. Each "
            "run is counted once: report those folders apart, or move one copy of each out of the folders you report "
            "(a sweep relaunched into a new folder repeats the jobs the old one finished).")


def _progress(path: Path) -> str:
    """How far a job without result.json got, from its metrics.jsonl."""
    epochs = [record.get("epoch") for record in read_jsonl(path / "metrics.jsonl")]
    return f"; last epoch logged: {epochs[-1]}" if epochs else "; no epoch logged"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a missing file or a truncated last line gives what is readable."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


# ---------------------------------------------------------------- expected jobs


def expected_jobs(sweep_dir: Path) -> Optional[list[tuple[str, ...]]]:
    """The jobs sweep.json's grid asks for (the basic sweeper's cartesian product); None when it cannot say."""
    path = Path(sweep_dir) / "sweep.json"
    if not path.is_file():
        return None
    grid = fileio.read_json(path, f"Delete {path} to report on the job folders alone.").get("grid")
    return None if grid is None else [tuple(job) for job in grid]


def normalize(overrides: Sequence[str]) -> frozenset[tuple[str, str]]:
    """Overrides as (key, value) pairs, parsed by Hydra, so that equal overrides compare equal."""
    return frozenset(parse_override(o) for o in overrides)


@functools.lru_cache(maxsize=100_000)
def parse_override(override: str) -> tuple[str, str]:
    """One override as (key, value); cached, as a table's hundreds of jobs share a few dozen overrides and Hydra's
    parser takes milliseconds for each."""
    try:
        (parsed,) = OverridesParser.create().parse_overrides([override])
    except Exception:  # an override Hydra cannot parse here still matches itself
        return override, ""
    return parsed.get_key_element(), parsed.get_value_element_as_str()


def seedless(job: frozenset[tuple[str, str]]) -> frozenset[tuple[str, str]]:
    """A job's overrides without the seed and the keys that do not change the experiment."""
    return frozenset((k, v) for k, v in job if not is_ignored(k.lstrip("+~")))


def sweep_jobs(sweep_dir: Path, runs: Sequence[Run]) -> set[frozenset[tuple[str, str]]]:
    """Every job of a sweep: the expanded grid, plus any job folder the grid does not name."""
    jobs = {normalize(job) for job in expected_jobs(sweep_dir) or []}
    return jobs | {normalize(run.overrides) for run in runs if run.sweep_dir == Path(sweep_dir)}


def find_problems(sweep_dirs: Sequence[Path], runs: Sequence[Run]) -> list[Problem]:
    """Expected jobs without a folder (missing) and folders without a readable, undamaged result.json (failed)."""
    problems = []
    for sweep_dir in map(Path, sweep_dirs):
        mine = [run for run in runs if run.sweep_dir == sweep_dir]
        finished = {normalize(run.overrides) for run in mine if run.result is not None}
        present = {normalize(run.overrides) for run in mine}
        grid = expected_jobs(sweep_dir) or []
        for number, job in enumerate(grid):
            if normalize(job) not in present:
                problems.append(Problem(sweep_dir, job, f"missing (job {number})"))
        for run in mine:
            if run.result is None and normalize(run.overrides) not in finished:  # a finished rerun supersedes
                problems.append(Problem(sweep_dir, run.overrides, run.problem, run.path))
        for problem in problems:
            if problem.sweep_dir == sweep_dir:
                problem.swept = swept_overrides(problem.overrides, [*grid, *(run.overrides for run in mine)])
    return problems


def swept_overrides(job: Sequence[str], jobs: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """The overrides of `job` that not every job of the sweep shares (the swept values)."""
    common = set.intersection(*(set(other) for other in jobs)) if jobs else set()
    return tuple(o for o in job if o not in common)
