"""Tables and plots from Hydra multirun sweeps: `python -m kd.report SWEEP_DIR [SWEEP_DIR ...]`.

Flow: job folders (run.json, result.json, run_info.json, metrics.jsonl) -> runs -> groups (same config but the
seed, same teacher weights) -> summary rows (mean ± std over seeds, Δ to the baseline) -> report.md, report.csv,
report.tex, PNG plots. The jobs a sweep should have are its sweep.json grid (written before any job, refused when a
relaunch would change it), and the jobs it has are the folders whose run.json a run wrote after passing its
checks: a missing or failed job is listed, never silently averaged away, and a refused rerun changes neither.
"""
import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from hydra.core.override_parser.overrides_parser import OverridesParser

from kd import plots, published, records
from kd.records import RESULT_NEUTRAL, is_under

# Config keys (and their subtrees) that do not change the experiment: runs differing only here are one group.
# What a resumed run may change, plus the teacher's path: a teacher is identified by its weights (TEACHER_SHA, from
# result.json), so the same teacher found by `auto` on one machine and given by path on another is one experiment.
IGNORED_KEYS = RESULT_NEUTRAL + ("teacher_checkpoint", "teachers_dir")
TEACHER_SHA = "teacher/sha256"  # a group key from result.json: runs with other teacher weights are other groups
# What a phase never reads: a teacher run trains with cross-entropy and has no student or teacher_seed.
UNUSED_BY_PHASE = {"teacher": ("student", "loss", "teacher_seed")}
SEED_KEY = "seed"
METHOD = "method"  # the pseudo-key naming the loss (KD, CE, DKD, FitNet, KD+CRD); pivots may use it
PAIR = "pair"  # the pseudo-key naming a student run's teacher -> student pair; pivots may use it
MISSING = "–"  # shown for a key a group's config does not have (e.g. loss.alpha of a CE run)
METRICS = {"last": "test/acc1", "best": "test/acc1_best"}
# Optional per-run numbers shown as extra columns when some run has them (later versions of result.json).
EXTRA_COLUMNS = {"latency_ms": ("latency (ms)", 2), "throughput_img_s": ("throughput (img/s)", 0)}
MAX_CURVES_PER_PLOT = 8


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
class Group:
    """Finished runs whose configs differ only in the seed (and in IGNORED_KEYS)."""

    key: dict[str, Any]
    runs: list[Run]
    expected: int = 0  # how many seeds the sweeps asked for (>= len(runs))


@dataclass
class Row:
    """One line of the table: a group's statistics over seeds."""

    index: int
    group: Group
    stats: dict[str, tuple[float, float]]  # "last"/"best" -> (mean, sample std; nan for n=1)
    numbers: dict[str, Optional[float]]  # params, flops_m, teacher_acc1; EXTRA_COLUMNS keys when present
    baseline: Optional["Row"] = None

    @property
    def n(self) -> int:
        return len(self.group.runs)

    def delta(self, metric: str) -> Optional[float]:
        if self.baseline is None:
            return None
        return self.stats[metric][0] - self.baseline.stats[metric][0]


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


# ---------------------------------------------------------------- loading


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Folders under sweep_dir (or sweep_dir itself) whose run passed its checks (they hold run.json)."""
    sweep_dir = Path(sweep_dir)
    if (sweep_dir / "run.json").is_file():
        return [sweep_dir]
    return sorted(p.parent for p in sweep_dir.rglob("run.json"))


def load_run(path: Path, sweep_dir: Path) -> Run:
    """Read one job folder; a missing, unreadable or damaged result.json (result_damage) marks it as a problem."""
    try:
        record = records.read_json(path / "run.json", "")
    except records.CorruptRecord as error:
        return Run(path, Path(sweep_dir), (), None, problem=str(error))
    run = Run(path, Path(sweep_dir), tuple(str(o) for o in record.get("overrides", [])), None)
    try:
        run.result = records.read_json(path / "result.json", "")
    except FileNotFoundError:
        run.problem = "failed or unfinished (no result.json" + _progress(path) + ")"
        return run
    except records.CorruptRecord as error:
        run.problem = f"unreadable result.json ({error})"
        return run
    damage = result_damage(run.result)
    if damage:  # listed as a problem, never tabled
        run.problem, run.result = f"damaged result.json ({path / 'result.json'}: {damage})", None
        return run
    try:
        run.info = records.read_json(path / "run_info.json", "")
    except (FileNotFoundError, records.CorruptRecord):
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
    """Every job folder of the sweeps, finished or not."""
    return [load_run(path, Path(d)) for d in sweep_dirs for path in job_dirs(Path(d))]


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


def flatten(tree: Any) -> dict[str, Any]:
    """The config as dotted keys (records.flatten_config), lists and empty dicts as JSON text so values are hashable."""
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in records.flatten_config(tree).items()}


def is_ignored(key: str) -> bool:
    return is_under(key, (SEED_KEY, *IGNORED_KEYS))


def group_key(result: dict[str, Any], linked: set[str] = frozenset()) -> dict[str, Any]:
    """The experiment a run belongs to: its flattened config minus the seed, IGNORED_KEYS and what its phase
    never reads, plus method, pair and the teacher's weights (their sha256; "${seed}" when each seed has its own
    teacher). `linked`: the keys whose unresolved value is `${seed}` (run.json's seed_linked): they follow the seed."""
    config = result.get("config", {})
    unused = UNUSED_BY_PHASE.get(str(config.get("phase")), ())
    flat = {k: v for k, v in flatten(config).items() if not is_ignored(k) and not is_under(k, unused)}
    flat.update({k: "${" + SEED_KEY + "}" for k in linked if k in flat})
    pseudo = {METHOD: method_name(config)}
    if config.get("phase") == "student" and "teacher" in config and "student" in config:
        pseudo[PAIR] = f"{model_label(config['teacher'])} -> {model_label(config['student'])}"
    if result.get(TEACHER_SHA):
        pseudo[TEACHER_SHA] = "${" + SEED_KEY + "}" if "teacher_seed" in linked else result[TEACHER_SHA]
    return {**pseudo, **flat}


def model_label(node: dict[str, Any]) -> str:
    """A model as a pair names it: its factory (resnet20), or for a library option the model's name (resnet34);
    with its width when not 1."""
    name = node.get("name") or str(node.get("_target_", "?")).rsplit(".", 1)[-1]
    return name if node.get("width", 1.0) == 1.0 else f"{name} x{node['width']:g}"


# Short names of criteria whose class name is not "<name>Loss".
CRITERION_NAMES = {"SoftTargets": "KD", "Combined": ""}


BASELINE = "CE (no teacher)"  # the papers' "Student" row: the student trained on the labels alone


def method_name(config: dict[str, Any]) -> str:
    """The loss as the papers' tables name it: the criterion class without "Loss" (KD, DKD), "-LS" with logit
    standardisation, and for a combination its terms but CE joined by "+" (FitNet, KD+CRD); the baseline (CE alone,
    or KD with alpha 0, which is the same training) is BASELINE; the teacher phase always trains with cross-entropy."""
    if config.get("phase") == "teacher":
        return "teacher (CE)"
    loss = config.get("loss", {})
    if str(loss.get("_target_", "")).endswith(".Combined"):
        terms = [criterion_name(term) for term in loss.values() if isinstance(term, dict)]
        name = "+".join(name for name in terms if name != "CE") or "CE"
    else:
        name = criterion_name(loss)
    return BASELINE if name == "CE" or (name == "KD" and loss.get("alpha") == 0) else name


def criterion_name(node: dict[str, Any]) -> str:
    name = str(node.get("_target_", "?")).rsplit(".", 1)[-1]
    name = CRITERION_NAMES.get(name, name[: -len("Loss")] if name.endswith("Loss") and name != "Loss" else name)
    return name + ("-LS" if node.get("standardize") else "")


# ---------------------------------------------------------------- expected jobs


def expected_jobs(sweep_dir: Path) -> Optional[list[tuple[str, ...]]]:
    """The jobs sweep.json's grid asks for (the basic sweeper's cartesian product); None when it cannot say."""
    path = Path(sweep_dir) / "sweep.json"
    if not path.is_file():
        return None
    grid = records.read_json(path, f"Delete {path} to report on the job folders alone.").get("grid")
    return None if grid is None else [tuple(job) for job in grid]


def normalize(overrides: Sequence[str]) -> frozenset[tuple[str, str]]:
    """Overrides as (key, value) pairs, parsed by Hydra, so that equal overrides compare equal."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # an override Hydra cannot parse here still matches itself
        return frozenset((o, "") for o in overrides)
    return frozenset((o.get_key_element(), o.get_value_element_as_str()) for o in parsed)


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


# ---------------------------------------------------------------- groups and statistics


def group_runs(runs: Sequence[Run], sweep_dirs: Sequence[Path] = ()) -> list[Group]:
    """Finished runs grouped by config minus the seed; `expected` counts the seeds the sweeps asked for."""
    groups: dict[str, Group] = {}
    for run in runs:
        if run.result is not None:
            signature = json.dumps(run.key, sort_keys=True, default=str)
            groups.setdefault(signature, Group(run.key, [])).runs.append(run)
    jobs = {Path(d): [seedless(job) for job in sweep_jobs(Path(d), runs)] for d in sweep_dirs}
    for group in groups.values():
        signatures = {(run.sweep_dir, seedless(normalize(run.overrides))) for run in group.runs}
        asked = sum(jobs.get(d, []).count(signature) for d, signature in signatures)
        group.expected = max(asked, len(group.runs))
    return list(groups.values())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; nan for one value)."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else math.nan


def mean_of_present(runs: Sequence[Run], key: str, scale: float = 1.0) -> Optional[float]:
    """Mean of a result.json (or run_info.json) number over the runs that have it; None when none has it."""
    found = (run.result.get(key, run.info.get(key)) for run in runs)
    values = [value for value in found if isinstance(value, (int, float))]
    return float(np.mean(values)) / scale if values else None


def summarize(groups: Sequence[Group]) -> list[Row]:
    """One row per group, sorted by its varying keys, with mean ± std over seeds and the baseline to compare."""
    keys = varying_keys([group.key for group in groups])
    ordered = sorted(groups, key=lambda group: [sort_value(group.key.get(k, MISSING)) for k in keys])
    rows = []
    for index, group in enumerate(ordered, start=1):
        stats = {}
        for name, metric in METRICS.items():
            values = [run.result.get(metric) for run in group.runs]
            stats[name] = mean_std([math.nan if v is None else v for v in values])
        numbers = {"params": mean_of_present(group.runs, "params"),
                   "flops_m": mean_of_present(group.runs, "flops_per_image", 1e6),
                   "teacher_acc1": mean_of_present(group.runs, "teacher/acc1")}
        extras = {key: mean_of_present(group.runs, key) for key in EXTRA_COLUMNS}
        numbers.update({key: value for key, value in extras.items() if value is not None})
        rows.append(Row(index, group, stats, numbers))
    for row in rows:
        row.baseline = find_baseline(row, rows)
    return rows


def varying_keys(keys: Sequence[dict[str, Any]]) -> list[str]:
    """Keys whose value differs between groups (in config order), without loss._target_ (method says it)."""
    names = list(dict.fromkeys(k for key in keys for k in key))
    varying = [k for k in names if len({json.dumps(key.get(k, MISSING), default=str) for key in keys}) > 1]
    return [k for k in varying if k != "loss._target_"]


def sort_value(value: Any) -> tuple:
    """Numbers before text, missing values last, so that 0.5 < 4 < 16 and not "16" < "4"."""
    if value == MISSING:
        return (2, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value))


def is_baseline(key: dict[str, Any]) -> bool:
    """A student trained without the teacher's soft targets: CE, or KD with alpha = 0."""
    return key.get("phase") == "student" and key[METHOD] == BASELINE


# Keys a baseline may differ in, most to least specific: alpha alone (same T), any loss setting of the
# same method, then a CE run of the same student (the teacher is not used by a baseline).
BASELINE_TIERS = (("loss.alpha",), ("loss",), ("loss", METHOD, PAIR, "teacher", "teacher_seed", TEACHER_SHA))


def find_baseline(row: Row, rows: Sequence[Row]) -> Optional[Row]:
    """The baseline row with the same config except the fewest loss keys; None for baselines and teachers."""
    if row.group.key.get("phase") != "student" or is_baseline(row.group.key):
        return None
    candidates = [other for other in rows if is_baseline(other.group.key)]
    for allowed in BASELINE_TIERS:
        matches = [other for other in candidates if same_except(row.group.key, other.group.key, allowed)]
        if matches:
            return matches[0]
    return None


def same_except(a: dict[str, Any], b: dict[str, Any], allowed: Sequence[str]) -> bool:
    """Whether two group keys agree on every key outside the `allowed` subtrees."""
    for key in set(a) | set(b):
        if not is_under(key, allowed) and a.get(key, MISSING) != b.get(key, MISSING):
            return False
    return True


def epoch_curve(group: Group, metric: str = "test/acc1") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, mean and sample std (nan for one run) of a per-epoch metric over the group's runs."""
    series = []
    for run in group.runs:
        by_epoch = {r["epoch"]: r[metric] for r in read_jsonl(run.path / "metrics.jsonl") if metric in r}
        series.append(by_epoch)
    epochs = sorted(set.intersection(*(set(s) for s in series))) if series else []
    stats = [mean_std([s[e] for s in series]) for e in epochs]
    return np.array(epochs), np.array([m for m, _ in stats]), np.array([s for _, s in stats])


# ---------------------------------------------------------------- tables


def fmt_value(value: Any, key: str = "") -> str:
    """A config value as a table shows it: 0.9, 4, 0.25; a `_target_` by its last name (resnet8); a sha256 by its
    first 12 digits."""
    if isinstance(value, float):
        return f"{value:g}"
    if key == TEACHER_SHA and isinstance(value, str):
        return value[:12]
    if key.endswith("_target_") and isinstance(value, str):
        return value.rsplit(".", 1)[-1]
    return str(value)


def fmt_stat(stat: tuple[float, float]) -> str:
    """mean ± std to two decimals; the mean alone when there is no std (n=1)."""
    mean, std = stat
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def fmt_n(group: Group) -> str:
    """n, `n of N` when the sweeps asked for N, and a warning when a seed repeats."""
    n = len(group.runs)
    text = str(n) if n == group.expected else f"{n} of {group.expected}"
    return text + (" (repeated seeds)" if len({run.seed for run in group.runs}) < n else "")


def fmt_number(value: Optional[float], digits: int = 2) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if digits == 0 else f"{value:.{digits}f}"


# Config subtrees that a pseudo-key already names, when their keys follow it (a method's weights, a pair's models).
NAMED_BY = {METHOD: ("loss",), PAIR: ("teacher", "student", "pair_hparams")}


def key_columns(rows: Sequence[Row]) -> list[str]:
    """The method column, then the pair and the config keys that vary between the groups, without the keys the
    method or the pair already determine."""
    varying = [k for k in varying_keys([row.group.key for row in rows]) if k != METHOD]
    named = [k for k in varying for pseudo, roots in NAMED_BY.items()
             if pseudo in varying + [METHOD] and is_under(k, roots) and follows(rows, k, (pseudo,))]
    return [METHOD] + [k for k in varying if k not in named]


def method_settings(rows: Sequence[Row]) -> list[str]:
    """The loss settings the table leaves out because its method determines them, per method: `KD: loss.alpha=0.9`."""
    shown = set(key_columns(rows))
    varying = varying_keys([row.group.key for row in rows])
    hidden = [k for k in varying if is_under(k, NAMED_BY[METHOD]) and k not in shown]
    settings: dict[str, str] = {}
    for row in rows:
        values = [f"{k}={fmt_value(row.group.key[k], k)}" for k in hidden if k in row.group.key]
        if values:
            settings.setdefault(str(row.group.key[METHOD]), ", ".join(values))
    return [f"Method settings: {'; '.join(f'{m}: {v}' for m, v in settings.items())}.", ""] if settings else []


def table(rows: Sequence[Row], metrics: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """The main table as header and text cells."""
    keys = key_columns(rows)
    extras = [k for k in EXTRA_COLUMNS if any(k in row.numbers for row in rows)]
    header = ["#", *keys, *[f"test top-1 {m} (%)" for m in metrics], "n", "params", "FLOPs (M)", "teacher top-1"]
    header += [f"Δ {m}" for m in metrics] + [EXTRA_COLUMNS[k][0] for k in extras]
    cells = []
    for row in rows:
        line = [str(row.index), *[fmt_value(row.group.key.get(k, MISSING), k) for k in keys]]
        line += [fmt_stat(row.stats[m]) for m in metrics] + [fmt_n(row.group)]
        line += [fmt_number(row.numbers["params"], 0), fmt_number(row.numbers["flops_m"]),
                 fmt_number(row.numbers["teacher_acc1"])]
        line += [fmt_delta(row, m) for m in metrics]
        line += [fmt_number(row.numbers.get(k), EXTRA_COLUMNS[k][1]) for k in extras]
        cells.append(line)
    return header, cells


def fmt_delta(row: Row, metric: str) -> str:
    delta = row.delta(metric)
    return "" if delta is None else f"{delta:+.2f} (vs #{row.baseline.index})"


def markdown_table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    lines = [header, ["---"] * len(header), *cells]
    return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in lines) + "\n"


def latex_escape(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                          ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("±", r"$\pm$"), ("Δ", r"$\Delta$"),
                          (MISSING, "--")):
        text = text.replace(char, escaped)
    return text.replace(r"\textbackslash\{\}", r"\textbackslash{}")


def latex_table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs})."""
    lines = [r"\begin{tabular}{" + "l" * len(header) + "}", r"\toprule"]
    lines.append(" & ".join(latex_escape(h) for h in header) + r" \\")
    lines.append(r"\midrule")
    lines += [" & ".join(latex_escape(c) for c in line) + r" \\" for line in cells]
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"]) + "\n"


def csv_records(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The table with full-precision numbers and every varying key (the Markdown table leaves out those a method or a
    pair determines), one dict per row (std empty for n=1, Δ empty without baseline)."""
    keys = [METHOD] + [k for k in varying_keys([row.group.key for row in rows]) if k != METHOD]
    records = []
    for row in rows:
        record = {"row": row.index, **{k: row.group.key.get(k, MISSING) for k in keys}}
        for name, (mean, std) in row.stats.items():
            record[f"test_acc1_{name}_mean"], record[f"test_acc1_{name}_std"] = _num(mean), _num(std)
        record.update(n=row.n, n_expected=row.group.expected, seeds=" ".join(str(r.seed) for r in row.group.runs))
        record["best_selected_by"] = " ".join(sorted({str(r.result.get("best_selected_by")) for r in row.group.runs}))
        record.update({k: _num(v) for k, v in row.numbers.items()})
        for name in row.stats:
            record[f"delta_{name}"] = _num(row.delta(name))
        record["baseline_row"] = row.baseline.index if row.baseline else ""
        records.append(record)
    return records


def _num(value: Optional[float]) -> Any:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def write_csv(path: Path, records: Sequence[dict[str, Any]]) -> None:
    names = list(dict.fromkeys(k for record in records for k in record))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(records)


# ---------------------------------------------------------------- pivots


@dataclass
class Panel:
    """One pivot table: the rows with the same values of every varying key but the two pivoted ones."""

    title: str
    row_values: list[Any]
    col_values: list[Any]
    cells: dict[tuple[str, str], Row]


def pivot_panels(rows: Sequence[Row], row_key: str, col_key: str) -> list[Panel]:
    """Rows arranged as row_key × col_key, one panel per combination of the other varying keys."""
    others = [k for k in key_columns(rows) if k not in (row_key, col_key)]
    # A key that follows the pivoted ones (a method's loss settings, a pair's models) does not split the panels.
    others = [k for k in others if not follows(rows, k, (row_key, col_key))]
    panels: dict[tuple, list[Row]] = {}
    for row in rows:
        panels.setdefault(tuple(fmt_value(row.group.key.get(k, MISSING)) for k in others), []).append(row)
    result = []
    for values, members in panels.items():
        cells: dict[tuple[str, str], Row] = {}
        for m in members:
            cell = (fmt_value(m.group.key.get(row_key, MISSING)), fmt_value(m.group.key.get(col_key, MISSING)))
            if cell in cells:
                raise ValueError(f"--pivot {row_key} {col_key}: rows #{cells[cell].index} and #{m.index} fall in one "
                                 f"cell ({row_key}={cell[0]}, {col_key}={cell[1]}): pivot on keys that tell them "
                                 "apart.")
            cells[cell] = m
        title = ", ".join(f"{k}={v}" for k, v in zip(others, values))
        result.append(Panel(title, distinct_values(members, row_key), distinct_values(members, col_key), cells))
    return result


def follows(rows: Sequence[Row], key: str, by: Sequence[str]) -> bool:
    """Whether `key` has one value among the rows that share their values of the `by` keys."""
    seen: dict[tuple, str] = {}
    for row in rows:
        cell = tuple(json.dumps(row.group.key.get(k, MISSING), default=str) for k in by)
        value = json.dumps(row.group.key.get(key, MISSING), default=str)
        if seen.setdefault(cell, value) != value:
            return False
    return True


def distinct_values(rows: Sequence[Row], key: str) -> list[Any]:
    """The values of `key` among the rows, sorted (numbers first, missing last)."""
    return sorted({row.group.key.get(key, MISSING) for row in rows}, key=sort_value)


def pivot_table(panel: Panel, row_key: str, col_key: str, metric: str) -> tuple[list[str], list[list[str]]]:
    """A panel as header and text cells of mean ± std (with n when it is 1 or short of the sweep's)."""
    header = [f"{row_key} \\ {col_key}", *[fmt_value(c) for c in panel.col_values]]
    cells = []
    for r in panel.row_values:
        line = [fmt_value(r)]
        for c in panel.col_values:
            row = panel.cells.get((fmt_value(r), fmt_value(c)))
            line.append("" if row is None else fmt_stat(row.stats[metric]) + pivot_n(row.group))
        cells.append(line)
    return header, cells


def pivot_n(group: Group) -> str:
    if len(group.runs) != group.expected:
        return f" (n={len(group.runs)} of {group.expected})"
    return " (n=1)" if len(group.runs) == 1 else ""


def pivot_records(panels: Sequence[Panel], row_key: str, col_key: str, metric: str) -> list[dict[str, Any]]:
    """Pivot cells in long form with full-precision numbers."""
    records = []
    for panel in panels:
        for (r, c), row in panel.cells.items():
            mean, std = row.stats[metric]
            records.append({"panel": panel.title, row_key: r, col_key: c, "row": row.index,
                            f"test_acc1_{metric}_mean": _num(mean), f"test_acc1_{metric}_std": _num(std),
                            "n": row.n, "n_expected": row.group.expected})
    return records


# ---------------------------------------------------------------- plots


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each key's last dotted part (alpha, width) unless two keys share it."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: s if last.count(s) == 1 else k for k, s in zip(keys, last)}


def row_label(row: Row, keys: Sequence[str]) -> str:
    """A legend label: the method, then key=value for the other given keys."""
    names = short_names([k for k in keys if k != METHOD])
    parts = [str(row.group.key[METHOD])] + [f"{names[k]}={fmt_value(row.group.key.get(k, MISSING), k)}" for k in names]
    return " ".join(parts) + (" (baseline)" if is_baseline(row.group.key) else "")


def plot_heatmap(rows: Sequence[Row], out_dir: Path, metric: str) -> str:
    """heatmap_alpha_temperature.png, one panel per combination of the other varying keys."""
    keys, name = ("loss.alpha", "loss.temperature"), "heatmap_alpha_temperature.png"
    kd_rows = [row for row in rows if all(k in row.group.key for k in keys)]
    if any(len({row.group.key[k] for row in kd_rows}) < 2 for k in keys):
        return f"{name} skipped: loss.alpha and loss.temperature do not both vary."
    panels = []
    for panel in pivot_panels(kd_rows, *keys):
        labels = [fmt_value(v) for v in panel.row_values], [fmt_value(v) for v in panel.col_values]
        values = np.array([[panel.cells[(r, c)].stats[metric][0] if (r, c) in panel.cells else np.nan
                            for c in labels[1]] for r in labels[0]])
        panels.append(plots.Heatmap(panel.title, *labels, values))
    plots.heatmaps(panels, *keys, out_dir / name)
    return f"![{name}]({name})"


SIZE_PLOTS = {"params": ("acc_vs_params.png", "parameters"), "flops_m": ("acc_vs_flops.png", "FLOPs / image (M)")}


def plot_vs_size(rows: Sequence[Row], out_dir: Path, metric: str, number: str) -> str:
    """acc_vs_params.png / acc_vs_flops.png: one line per setting of the keys that are not the model's."""
    name, xlabel = SIZE_PLOTS[number]
    if len({row.numbers[number] for row in rows}) < 2 or any(row.numbers[number] is None for row in rows):
        return f"{name} skipped: the runs do not vary in {xlabel}."
    # The student's keys (and the pair, which names the student) are the x axis; the teacher stays a line's key.
    keys = [k for k in key_columns(rows) if k != PAIR and not k.startswith(("student.", "teacher."))]
    teachers = {str(row.group.key.get(PAIR, "")).split(" -> ")[0] for row in rows}
    lines: dict[str, list[Row]] = {}
    for row in rows:
        teacher = str(row.group.key.get(PAIR, "")).split(" -> ")[0]
        lines.setdefault(row_label(row, keys) + (f" teacher={teacher}" if len(teachers) > 1 else ""), []).append(row)
    series = []
    for label, members in lines.items():
        members.sort(key=lambda row: row.numbers[number])
        x = np.array([row.numbers[number] for row in members])
        y, spread = (np.array([row.stats[metric][i] for row in members]) for i in (0, 1))
        series.append(plots.Series(label, x, y, spread, dashed=is_baseline(members[0].group.key)))
    plots.lines(series, xlabel + " (log scale)", f"test top-1 {metric} (%)", out_dir / name, log_x=True)
    return f"![{name}]({name})"


def plot_curves(rows: Sequence[Row], out_dir: Path) -> list[str]:
    """curves.png (curves_1.png, ... beyond MAX_CURVES_PER_PLOT groups): test top-1 per epoch, mean ± std."""
    keys = key_columns(rows)
    chunks = [rows[i : i + MAX_CURVES_PER_PLOT] for i in range(0, len(rows), MAX_CURVES_PER_PLOT)]
    notes = []
    for number, chunk in enumerate(chunks, start=1):
        name = "curves.png" if len(chunks) == 1 else f"curves_{number}.png"
        series = [plots.Series(f"#{row.index} {row_label(row, keys)}", *epoch_curve(row.group),
                               dashed=is_baseline(row.group.key)) for row in chunk]
        series = [s for s in series if s.x.size]
        if not series:
            notes.append(f"{name} skipped: no metrics.jsonl with test/acc1.")
            continue
        plots.bands(series, "epoch", "test top-1 (%)", out_dir / name)
        notes.append(f"![{name}]({name})")
    return notes


def write_plots(rows: Sequence[Row], out_dir: Path, metric: str) -> list[str]:
    """Every plot the sweep supports; returns Markdown lines (an image, or why a plot was skipped)."""
    if not rows:
        return ["No plots: no finished run."]
    notes = [plot_heatmap(rows, out_dir, metric)]
    notes += [plot_vs_size(rows, out_dir, metric, number) for number in SIZE_PLOTS]
    return notes + plot_curves(rows, out_dir)


# ---------------------------------------------------------------- the report


def intro(sweep_dirs: Sequence[Path], runs: Sequence[Run], rows: Sequence[Row]) -> list[str]:
    """What the report covers and how to read its cells."""
    lines = ["# Sweep report", ""]
    for d in sweep_dirs:
        mine = [run for run in runs if run.sweep_dir == d]
        grid = expected_jobs(d)
        asked = f"{len(grid)} jobs in sweep.json's grid" if grid is not None else "no sweep.json grid"
        lines.append(f"- `{d}`: {asked}, {len(mine)} job folders, {sum(r.result is not None for r in mine)} finished")
    varying = varying_keys([row.group.key for row in rows])
    constant = [k for k in ("phase", "dataset.name", "teacher._target_", "student._target_", "epochs")
                if rows and k not in varying and k in rows[0].group.key]
    fixed = ", ".join(f"{k}={fmt_value(rows[0].group.key[k], k)}" for k in constant)
    selectors = sorted({str(r.result.get("best_selected_by")) for row in rows for r in row.group.runs})
    lines += ["", f"Fixed: {fixed}." if fixed else "", "",
              "Cells: test top-1 (%), mean ± sample std (ddof=1) over seeds; with n=1 the mean alone. "
              "n: finished seeds, written `n of N` when the sweep asked for N (the missing runs are listed below).",
              f"**last** = the final epoch; **best** = test top-1 at the epoch selected by {' / '.join(selectors)}"
              + (" (the test split itself, so optimistic; dataset.val_fraction > 0 selects on a validation split)"
                 if "test/acc1" in selectors else "") + ".",
              "Δ = this row's mean minus its baseline row's (`vs #k`): the same config with loss.alpha=0 "
              "(same temperature when that group exists), else a CE student of the same config; blank without one.",
              ""]
    return lines


def pivot_sections(
    rows: Sequence[Row], pivots: Sequence[tuple[str, str]], metric: str, out_dir: Path
) -> tuple[list[str], list[str]]:
    """Markdown and LaTeX for each --pivot, and pivot_<row>_<col>.csv next to the report."""
    markdown, latex = [], []
    for row_key, col_key in pivots:
        panels = pivot_panels(rows, row_key, col_key)
        markdown.append(f"## Pivot: {row_key} × {col_key} (test top-1 {metric}, %)\n")
        latex.append(f"% pivot: {row_key} x {col_key} (test top-1 {metric})")
        for panel in panels:
            header, cells = pivot_table(panel, row_key, col_key, metric)
            markdown += [f"{panel.title}:\n" if panel.title else "", markdown_table(header, cells)]
            latex += [f"% {panel.title}" if panel.title else "", latex_table(header, cells)]
        write_csv(out_dir / f"pivot_{row_key}_{col_key}.csv", pivot_records(panels, row_key, col_key, metric))
    return markdown, latex


def teacher_warnings(rows: Sequence[Row]) -> list[str]:
    """A warning for each pair whose rows used different teacher weights (a retrained or replaced teacher)."""
    by_pair: dict[str, dict[str, list[str]]] = {}
    for row in rows:
        sha, pair = row.group.key.get(TEACHER_SHA), row.group.key.get(PAIR)
        if sha is not None and pair is not None and sha != "${" + SEED_KEY + "}":
            by_pair.setdefault(pair, {}).setdefault(sha, []).append(f"#{row.index}")
    lines = []
    for pair, shas in by_pair.items():
        if len(shas) > 1:
            used = "; ".join(f"{sha[:12]} (rows {', '.join(indices)})" for sha, indices in shas.items())
            lines.append(f"**Different teachers for {pair}**: {used}. Rows of one pair are only comparable with one "
                         "teacher: rerun the rows of the teacher you do not want, or report them apart.")
    return lines + [""] if lines else []


def paper_section(rows: Sequence[Row], name: str, out_dir: Path) -> list[str]:
    """"Ours beside the paper": a method × pair table whose cells hold our mean ± std at the paper's convention
    (its last or best epoch), the published figure and our difference; the teachers' row compares their accuracy.
    Also paper_<name>.csv. Figures and their sources: kd.published."""
    paper = published.load(name)
    student_rows = [row for row in rows if PAIR in row.group.key]
    if not student_rows:
        return [f"## Beside {paper.short}\n", "No student runs: nothing to compare.", ""]
    lines = [f"## Beside {paper.short}: ours / paper (ours − paper), test top-1 %\n"]
    records, conventions = [], set()
    for panel in pivot_panels(student_rows, METHOD, PAIR):
        header = [f"{METHOD} \\ {PAIR}", *[fmt_value(c) for c in panel.col_values]]
        cells = [["teacher", *[paper_cell(panel_teacher(panel, pair), paper, "teacher", pair, records, conventions)
                               for pair in panel.col_values]]]
        for method in panel.row_values:
            cells.append([fmt_value(method)] + [
                paper_cell(panel.cells.get((fmt_value(method), fmt_value(pair))), paper, method, pair, records,
                           conventions) for pair in panel.col_values])
        lines += [f"{panel.title}:\n" if panel.title else "", markdown_table(header, cells)]
    write_csv(out_dir / f"paper_{name}.csv", records)
    sides = "; ".join(f"`{c}` = {'the final epoch (test/acc1)' if c == 'last' else 'the best epoch (test/acc1_best)'}"
                      for c in sorted(conventions))
    sources = sorted({record["paper_source"] for record in records if record["paper_source"]})
    return lines + [
        f"{paper.citation}. The paper reports the **{paper.convention}** epoch ({paper.convention_evidence}) Each of "
        f"our cells is taken at the convention of the figure beside it ({sides}; marked when it is not the paper's). "
        f"{paper.statistic}", "", "Sources: " + "; ".join(sources) + ".", ""]


def panel_teacher(panel: "Panel", pair: Any) -> Optional[tuple[float, float]]:
    """The mean and spread of the teachers' measured accuracy over a pair's rows in a panel (None without one)."""
    values = [run.result["teacher/acc1"] for (_, c), row in panel.cells.items() if c == fmt_value(pair)
              for run in row.group.runs if isinstance(run.result.get("teacher/acc1"), (int, float))]
    return mean_std(values) if values else None


def paper_cell(ours: Any, paper: "published.Paper", method: Any, pair: Any, records: list, conventions: set) -> str:
    """One cell: ours at the figure's convention, the figure, and the difference; ours alone without a figure."""
    figure = published.figure(paper, str(method), str(pair))
    convention = figure.convention if figure else paper.convention
    stat = ours.stats[convention] if isinstance(ours, Row) else ours  # a Row, or the teacher's (mean, std)
    if stat is None and figure is None:
        return ""
    text = "–" if stat is None else fmt_stat(stat)
    mark = "" if convention == paper.convention else f" ({convention} epoch)"
    if figure is not None:
        delta = "" if stat is None or math.isnan(stat[0]) else f" ({stat[0] - figure.top1:+.2f})"
        text = f"{text}{mark} / {figure.top1:.2f}{delta}"
        conventions.add(convention)
    records.append({"method": method, "pair": pair, "ours_mean": _num(stat[0]) if stat else "",
                    "ours_std": _num(stat[1]) if stat else "", "ours_epoch": convention,
                    "n": ours.n if isinstance(ours, Row) else "", "paper": figure.top1 if figure else "",
                    "paper_source": f"{figure.table}: {figure.source}" if figure else "",
                    "delta": _num(stat[0] - figure.top1) if figure and stat else ""})
    return text


def problem_section(problems: Sequence[Problem], rows: Sequence[Row], sweep_dirs: Sequence[Path]) -> list[str]:
    """The "Missing or failed runs" section: each job, then the table rows and settings they affect."""
    lines = ["## Missing or failed runs", ""]
    if not problems:
        lines.append("None: every expected job has a result.json.")
    ungridded = [f"`{d}`" for d in sweep_dirs if expected_jobs(d) is None]
    if ungridded:
        lines += ["", f"No basic-sweeper sweep.json in {', '.join(ungridded)}: only its job folders were checked."]
    lines += [f"- {p.line()}" for p in problems]
    absent = settings_without_rows(problems, [run for row in rows for run in row.group.runs])
    if absent:
        lines += ["", "Settings with no finished run (no row in the table): " + "; ".join(absent) + "."]
    short = [f"#{row.index} ({fmt_n(row.group)})" for row in rows if row.n < row.group.expected]
    if short:
        lines += ["", "Groups with fewer seeds than asked for: " + ", ".join(short) + "."]
    repeated = [f"#{row.index}" for row in rows if len({r.seed for r in row.group.runs}) < row.n]
    if repeated:
        lines += ["", "Groups with the same seed more than once (all counted): " + ", ".join(repeated) + "."]
    return lines + [""]


def settings_without_rows(problems: Sequence[Problem], finished: Sequence[Run]) -> list[str]:
    """The swept settings (seed aside) of problem jobs that no finished run of their sweep shares."""
    have = {(run.sweep_dir, seedless(normalize(run.overrides))) for run in finished}
    absent = {}
    for problem in problems:
        if (problem.sweep_dir, seedless(normalize(problem.overrides))) not in have:
            setting = [o for o in problem.swept if not is_ignored(o.split("=", 1)[0].lstrip("+~"))]
            absent.setdefault(" ".join(setting), None)
    return list(absent)


def check_pivots(rows: Sequence[Row], pivots: Sequence[tuple[str, str]]) -> None:
    """Reject a pivot on a key no group has, naming the keys that exist."""
    known = sorted({k for row in rows for k in row.group.key})
    for key in (k for pivot in pivots for k in pivot):
        if key not in known:
            raise ValueError(f"--pivot {key}: no such config key; keys: {', '.join(known)}")


def write_report(
    sweep_dirs: Sequence[Path], out_dir: Optional[Path] = None, pivots: Sequence[tuple[str, str]] = (),
    latex: bool = False, metric: str = "both", paper: Optional[str] = None,
) -> Path:
    """Write report.md, report.csv (and report.tex, pivot CSVs, the paper comparison, PNGs) into out_dir; return
    report.md's path."""
    sweep_dirs = [Path(d) for d in sweep_dirs]
    out_dir = Path(out_dir or sweep_dirs[0])
    records.check_writable(out_dir, "Write the report into another folder: --out DIR.")  # before any file is written
    runs = load_runs(sweep_dirs)
    problems = find_problems(sweep_dirs, runs)
    rows = summarize(group_runs(runs, sweep_dirs))
    check_pivots(rows, pivots)
    metrics = ["last", "best"] if metric == "both" else [metric]
    primary = "best" if metric == "best" else "last"
    header, cells = table(rows, metrics)
    write_csv(out_dir / "report.csv", csv_records(rows))
    pivot_md, pivot_tex = pivot_sections(rows, pivots, primary, out_dir)
    pivot_md += paper_section(rows, paper, out_dir) if paper else []
    plot_lines = write_plots(rows, out_dir, primary)
    markdown = [*intro(sweep_dirs, runs, rows), *teacher_warnings(rows), *method_settings(rows),
                markdown_table(header, cells), *pivot_md,
                *problem_section(problems, rows, sweep_dirs), "## Plots", "", *[f"{line}\n" for line in plot_lines]]
    (out_dir / "report.md").write_text("\n".join(markdown))
    if latex:
        (out_dir / "report.tex").write_text("\n".join([latex_table(header, cells), *pivot_tex]))
    for problem in problems:
        print(f"kd.report: {problem.line()}", file=sys.stderr)
    for line in filter(None, teacher_warnings(rows)):
        print(f"kd.report: {line}", file=sys.stderr)
    return out_dir / "report.md"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kd.report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dirs", nargs="+", type=Path, help="Hydra multirun folders (or single run folders)")
    parser.add_argument("--pivot", nargs=2, action="append", default=[], metavar=("ROW", "COL"),
                        help="also a ROW x COL table of mean ± std, e.g. loss.alpha loss.temperature; "
                             f"a dotted config key or `{METHOD}` (repeatable)")
    parser.add_argument("--latex", action="store_true", help="also write report.tex (booktabs)")
    parser.add_argument("--metric", choices=("last", "best", "both"), default="both",
                        help="which test top-1 the tables show: last epoch, best epoch, or both")
    parser.add_argument("--out", type=Path, help="output folder (default: the first sweep folder)")
    parser.add_argument("--paper", choices=published.names(),
                        help="also a method x pair table of ours beside that paper's published figures")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; 1 when the folders hold no job at all, a pivot key does not exist or the output folder
    cannot be written."""
    args = parse_args(argv)
    missing = [d for d in args.sweep_dirs if not d.is_dir()]
    if missing:
        print(f"kd.report: no such folder: {', '.join(map(str, missing))}", file=sys.stderr)
        return 1
    if not any(job_dirs(d) for d in args.sweep_dirs):
        print("kd.report: no job folders (with a run.json) found", file=sys.stderr)
        return 1
    try:
        path = write_report(args.sweep_dirs, args.out, [tuple(p) for p in args.pivot], args.latex, args.metric,
                            args.paper)
    except (ValueError, records.CannotWrite) as err:
        print(f"kd.report: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
