"""The report's Markdown around its tables: what it covers and how to read it, the method settings, teacher warnings,
the pivots, and the missing or failed runs."""
from pathlib import Path
from typing import Any, Sequence

from kd.records import is_under
from kd.report.aggregate import NAMED_BY, Row, key_columns, pivot_panels, settings_without_rows, varying_keys
from kd.report.collect import Problem, Run, expected_jobs
from kd.report.keys import METHOD, METRICS, PAIR, SEED_KEY, TEACHER_SHA, fmt_value, lower_is_better
from kd.report.render import fmt_n, latex_table, markdown_table, pivot_records, pivot_table


def intro(sweep_dirs: Sequence[Path], runs: Sequence[Run], rows: Sequence[Row], metrics: Sequence[str]) -> list[str]:
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
    return lines + ["", f"Fixed: {fixed}." if fixed else "", "", *reading(rows, metrics), ""]


def reading(rows: Sequence[Row], metrics: Sequence[str]) -> list[str]:
    """How to read the cells: the metric, n, last and best, bold, Δ."""
    others = [m for m in metrics if m not in METRICS]
    what = "test top-1 (%)" if not others else f"{', '.join(others)} (result.json; a row's runs without it left out)"
    lines = [f"Cells: {what}, mean ± sample std (ddof=1) over seeds; with n=1 the mean alone. n: finished seeds, "
             "written `n of N` when the sweep asked for N (the missing runs are listed below)."]
    if any(m in METRICS for m in metrics):
        selectors = sorted({str(r.result.get("best_selected_by")) for row in rows for r in row.group.runs})
        lines.append(f"**last** = the final epoch; **best** = test top-1 at the epoch selected by "
                     f"{' / '.join(selectors)}" + (" (the test split itself, so optimistic; dataset.val_fraction > 0 "
                                                   "selects on a validation split)" if "test/acc1" in selectors else "")
                     + ".")
    order = "lowest" if all(lower_is_better(m) for m in metrics) else "highest"
    lines.append(f"**Bold**: the best configuration for each teacher -> student pair, the {order} mean of each "
                 "metric column (and of each pivot panel), with every row equal to it at two decimals; teacher rows "
                 "compete only when there is no student row.")
    lines.append("Δ = this row's mean minus its baseline row's (`vs #k`): the same config with loss.alpha=0 "
                 "(same temperature when that group exists), else a CE student of the same config; blank without one.")
    return lines


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


def pivot_sections(
    rows: Sequence[Row], pivots: Sequence[tuple[str, str]], metric: str, latex_too: bool
) -> tuple[list[str], list[str], dict[str, list[dict[str, Any]]]]:
    """Markdown and LaTeX (with latex_too) for each --pivot, and pivot_<row>_<col>.csv's records by file name."""
    markdown, latex, csvs = [], [], {}
    title = f"test top-1 {metric}, %" if metric in METRICS else metric
    for row_key, col_key in pivots:
        panels = pivot_panels(rows, row_key, col_key)
        markdown.append(f"## Pivot: {row_key} × {col_key} ({title})\n")
        latex.append(f"% pivot: {row_key} x {col_key} ({'test top-1 ' + metric if metric in METRICS else metric})")
        for panel in panels:
            pivot = pivot_table(panel, row_key, col_key, metric)
            markdown += [f"{panel.title}:\n" if panel.title else "", markdown_table(pivot)]
            latex += [f"% {panel.title}" if panel.title else "", latex_table(pivot)] if latex_too else []
        csvs[f"pivot_{row_key}_{col_key}.csv"] = pivot_records(panels, row_key, col_key, metric)
    return markdown, latex, csvs


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
