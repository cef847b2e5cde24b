"""Runs -> groups (same config but the seed) -> rows (mean ± std over seeds, the baseline each is compared with) and
pivot panels, as data: nothing here formats or writes."""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from kd.records import is_under
from kd.report.collect import Problem, Run, normalize, read_jsonl, seedless, sweep_jobs
from kd.report.keys import (
    BASELINE,
    METHOD,
    METRICS,
    MISSING,
    PAIR,
    TEACHER_SHA,
    fmt_value,
    is_ignored,
    is_number,
    lower_is_better,
    metric_key,
)

SHOWN_DECIMALS = 2  # the tables' precision: means equal at it tie for the best
SORT_BY_METRIC = "metric"  # --sort's name for the table's metric


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
    stats: dict[str, tuple[float, float]]  # "last"/"best"/a result.json key -> (mean, sample std; nan for n=1)
    numbers: dict[str, Optional[float]]  # params, flops_m, teacher_acc1; latency_ms when measured (kd.report.latency)
    baseline: Optional["Row"] = None
    counts: dict[str, int] = field(default_factory=dict)  # per stats name: the runs that recorded it

    @property
    def n(self) -> int:
        return len(self.group.runs)

    def delta(self, metric: str) -> Optional[float]:
        if self.baseline is None:
            return None
        return self.stats[metric][0] - self.baseline.stats[metric][0]


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


def summarize(groups: Sequence[Group], metrics: Sequence[str] = (), sort: Sequence[str] = ()) -> list[Row]:
    """One row per group with mean ± std over seeds of METRICS and of `metrics` (result.json keys), ordered by the
    varying keys and then by `sort` (sort_rows), numbered from 1, each with the baseline it is compared with."""
    keys = varying_keys([group.key for group in groups])
    ordered = sorted(groups, key=lambda group: [sort_value(group.key.get(k, MISSING)) for k in keys])
    rows = sort_rows([summary_row(group, [*METRICS, *metrics]) for group in ordered], sort)
    for index, row in enumerate(rows, start=1):
        row.index = index
    for row in rows:
        row.baseline = find_baseline(row, rows)
    return rows


def summary_row(group: Group, metrics: Sequence[str]) -> Row:
    """A group's statistics (unnumbered): each metric over the runs that recorded it, and the model's size."""
    stats, counts = {}, {}
    for name in dict.fromkeys(metrics):
        values = [value for value in (run.result.get(metric_key(name)) for run in group.runs) if is_number(value)]
        stats[name], counts[name] = mean_std(values), len(values)
    numbers = {"params": mean_of_present(group.runs, "params"),
               "flops_m": mean_of_present(group.runs, "flops_per_image", 1e6),
               "teacher_acc1": mean_of_present(group.runs, "teacher/acc1")}
    return Row(0, group, stats, numbers, counts=counts)


def sort_rows(rows: Sequence[Row], sort: Sequence[str]) -> list[Row]:
    """The rows ordered by the --sort names, the first the most significant: a group key, or a metric's mean
    (SORT_BY_METRIC is resolved by the caller); "-name" descends; rows without a value come last either way."""
    known = {k for row in rows for k in (*row.group.key, *row.stats)}
    ordered = list(rows)
    for name in reversed(sort):
        key, descending = name.lstrip("-"), name.startswith("-")
        if key not in known:
            raise ValueError(f"--sort {name}: no such config key or metric; known: {', '.join(sorted(known))} "
                             f"(or {SORT_BY_METRIC}, the table's metric; -NAME sorts descending)")
        present = [row for row in ordered if sort_field(row, key) != MISSING]
        present.sort(key=lambda row: sort_value(sort_field(row, key)), reverse=descending)
        ordered = present + [row for row in ordered if sort_field(row, key) == MISSING]
    return ordered


def sort_field(row: Row, key: str) -> Any:
    """What --sort compares: a metric's mean (MISSING when no run recorded it), else the group key's value."""
    if key in row.stats:
        return MISSING if math.isnan(row.stats[key][0]) else row.stats[key][0]
    return row.group.key.get(key, MISSING)


def best_rows(rows: Sequence[Row], metric: str) -> set[int]:
    """The indices of the best configuration's rows for each pair (rows of other students do not compete): the
    highest mean of `metric` (the lowest for a loss), with every row equal to it at SHOWN_DECIMALS (a tie the reader
    sees is marked as one). Teacher rows compete only in a table without students."""
    competing = [row for row in rows if row.group.key.get("phase") != "teacher"] or list(rows)
    by_pair: dict[str, list[Row]] = {}
    for row in competing:
        by_pair.setdefault(str(row.group.key.get(PAIR)), []).append(row)
    return {index for members in by_pair.values() for index in best_of(members, metric)}


def best_of(rows: Sequence[Row], metric: str) -> set[int]:
    """The indices of the rows whose mean, at SHOWN_DECIMALS, is the best (none when no row has a mean)."""
    means = {row.index: float(f"{row.stats[metric][0]:.{SHOWN_DECIMALS}f}") for row in rows
             if not math.isnan(row.stats[metric][0])}
    if not means:
        return set()
    best = (min if lower_is_better(metric) else max)(means.values())
    return {index for index, mean in means.items() if mean == best}


def recorded_metrics(runs: Sequence[Run]) -> list[str]:
    """The result.json keys that hold a number in some finished run and name a metric (namespaced: val/acc1)."""
    return sorted({k for run in runs if run.result for k, v in run.result.items() if "/" in k and is_number(v)})


def check_metric(runs: Sequence[Run], metric: str) -> None:
    """Reject a --metric no finished run recorded, naming those that were."""
    if metric in (*METRICS, "both") or metric in recorded_metrics(runs):
        return
    raise ValueError(f"--metric {metric}: no finished run recorded it in result.json; recorded: "
                     f"{', '.join(recorded_metrics(runs)) or 'none'} (or last, best, both: test top-1)")


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


# Keys a baseline may differ in, most to least specific: alpha alone (same T), any loss setting, then a CE run of
# the same student (the teacher is not used by a baseline). The method always differs (a baseline is named BASELINE),
# and so may the teacher's weights (a baseline records them only when it found its teacher).
BASELINE_TIERS = (("loss.alpha", METHOD, TEACHER_SHA), ("loss", METHOD, TEACHER_SHA),
                  ("loss", METHOD, PAIR, "teacher", "teacher_seed", TEACHER_SHA))


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


# Config subtrees that a pseudo-key already names, when their keys follow it (a method's weights, a pair's models).
NAMED_BY = {METHOD: ("loss",), PAIR: ("teacher", "student", "pair_hparams")}


def key_columns(rows: Sequence[Row]) -> list[str]:
    """The method column, then the pair and the config keys that vary between the groups, without the keys the
    method or the pair already determine."""
    varying = [k for k in varying_keys([row.group.key for row in rows]) if k != METHOD]
    named = [k for k in varying for pseudo, roots in NAMED_BY.items()
             if pseudo in varying + [METHOD] and is_under(k, roots) and follows(rows, k, (pseudo,))]
    return [METHOD] + [k for k in varying if k not in named]


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
