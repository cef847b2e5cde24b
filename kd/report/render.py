"""Rows -> text: the cells (mean ± std, n, Δ), the Markdown, LaTeX and CSV tables, and the report's sections."""
import csv
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from kd.records import is_under
from kd.report.aggregate import (
    EXTRA_COLUMNS, NAMED_BY, Group, Panel, Row, key_columns, pivot_panels, settings_without_rows, varying_keys,
)
from kd.report.collect import Problem, Run, expected_jobs
from kd.report.keys import METHOD, MISSING, PAIR, SEED_KEY, TEACHER_SHA, fmt_value


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
