"""Rows -> tables: the cells (mean ± std, n, Δ), the main table's columns, pivot tables, and each table as Markdown,
aligned text (the terminal), LaTeX (pandas' Styler) and CSV."""
import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from kd import fileio
from kd.report.aggregate import Group, Panel, Row, best_rows, key_columns, varying_keys
from kd.report.keys import (
    METHOD,
    METRICS,
    MISSING,
    PAIR,
    SEED_KEY,
    TEACHER_SHA,
    fmt_value,
    is_number,
    metric_column,
    short_names,
)

# The main table's number columns, by their --columns name: header, LaTeX header, Row.numbers key, decimals.
NUMBER_COLUMNS = {
    "params": ("params", "Params", "params", 0),
    "flops": ("FLOPs (M)", "FLOPs (M)", "flops_m", 2),
    "teacher": ("teacher top-1", r"Teacher top-1 (\%)", "teacher_acc1", 2),
    "latency": ("latency (ms)", "Latency (ms)", "latency_ms", 2),
}
COLUMN_NAMES = ("metric", "n", *NUMBER_COLUMNS, "delta")  # --columns' names besides config keys, method and pair
# LaTeX headers for config keys that have a usual symbol; other keys show their last dotted part.
READABLE = {METHOD: "Method", PAIR: r"Teacher $\to$ student", "loss.alpha": r"$\alpha$", "loss.temperature": "$T$",
            "loss.beta": r"$\beta$", TEACHER_SHA: "Teacher"}


@dataclass
class Table:
    """A table as text cells, with the cells set in bold (line, column), its LaTeX headers and its number columns."""

    header: list[str]
    cells: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)
    latex_header: Optional[list[str]] = None  # None: the header, escaped
    numeric: set[int] = field(default_factory=set)  # right-aligned in LaTeX


@dataclass
class Column:
    """One column of the main table: how it is headed and how a row fills it; `metric` marks the best rows."""

    header: str
    latex: str
    cell: Callable[[Row], str]
    numeric: bool = True
    metric: Optional[str] = None


# ---------------------------------------------------------------- cells


def fmt_stat(stat: tuple[float, float]) -> str:
    """mean ± std to two decimals; the mean alone when there is no std (n=1)."""
    mean, std = stat
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def fmt_metric(row: Row, metric: str) -> str:
    """A row's mean ± std of a metric, with how many runs recorded it when fewer than the row has."""
    short = row.counts.get(metric, row.n) < row.n and not math.isnan(row.stats[metric][0])
    return fmt_stat(row.stats[metric]) + (f" (n={row.counts[metric]})" if short else "")


def fmt_n(group: Group) -> str:
    """n, `n of N` when the sweeps asked for N, and a warning when a seed repeats."""
    n = len(group.runs)
    text = str(n) if n == group.expected else f"{n} of {group.expected}"
    return text + (" (repeated seeds)" if len({run.seed for run in group.runs}) < n else "")


def fmt_number(value: Optional[float], digits: int = 2) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if digits == 0 else f"{value:.{digits}f}"


def fmt_delta(row: Row, metric: str) -> str:
    delta = row.delta(metric)
    return "" if delta is None else f"{delta:+.2f} (vs #{row.baseline.index})"


def metric_label(metric: str) -> str:
    return f"test top-1 {metric} (%)" if metric in METRICS else metric


# ---------------------------------------------------------------- the main table


def default_columns(rows: Sequence[Row]) -> list[str]:
    """The key columns (key_columns), the metric, n, size, the teacher, Δ, and the latency when it was measured."""
    measured = ["latency"] if any("latency_ms" in row.numbers for row in rows) else []
    return [*key_columns(rows), "metric", "n", "params", "flops", "teacher", "delta", *measured]


def check_columns(rows: Sequence[Row], columns: Sequence[str], latency: bool) -> None:
    """Reject a --columns name that is neither a key of some group nor one of COLUMN_NAMES."""
    known = sorted({k for row in rows for k in row.group.key})
    for name in columns:
        if name not in known and name not in COLUMN_NAMES:
            raise ValueError(f"--columns {name}: no such column or config key; columns: {', '.join(COLUMN_NAMES)}; "
                             f"keys: {', '.join(known)}")
    if "latency" in columns and not latency:
        raise ValueError("--columns latency: no latency is measured without --latency (a quiet benchmark of each "
                         "model): add --latency.")


def table(rows: Sequence[Row], metrics: Sequence[str], columns: Sequence[str]) -> Table:
    """The main table: #, then the named columns in order (the metric last when not named); the best mean of each
    metric column in bold (best_rows)."""
    names = [*columns, *([] if "metric" in columns else ["metric"])]
    # Headers name a model by its node (student), not by its `_target_` key.
    shorts = short_names([name.removesuffix("._target_") for name in names if name not in COLUMN_NAMES])
    spec = [Column("#", r"\#", lambda row: str(row.index))]
    for name in names:
        spec += column(name, metrics, shorts)
    cells = [[col.cell(row) for col in spec] for row in rows]
    bold = set()
    for j, col in enumerate(spec):
        best = best_rows(rows, col.metric) if col.metric else set()
        bold |= {(i, j) for i, row in enumerate(rows) if row.index in best}
    return Table([c.header for c in spec], cells, bold, [c.latex for c in spec],
                 {j for j, c in enumerate(spec) if c.numeric})


def column(name: str, metrics: Sequence[str], shorts: dict[str, str]) -> list[Column]:
    """The columns one --columns name stands for (metric and delta: one per metric shown)."""
    if name == "metric":
        return [Column(metric_label(m), latex_metric(m), lambda row, m=m: fmt_metric(row, m), metric=m)
                for m in metrics]
    if name == "delta":
        return [Column(f"Δ {m}", rf"$\Delta$ {latex_escape(m)}", lambda row, m=m: fmt_delta(row, m)) for m in metrics]
    if name == "n":
        return [Column("n", "$n$", lambda row: fmt_n(row.group))]
    if name in NUMBER_COLUMNS:
        header, latex, key, digits = NUMBER_COLUMNS[name]
        return [Column(header, latex, lambda row: fmt_number(row.numbers.get(key), digits))]
    short = shorts[name.removesuffix("._target_")]
    latex = READABLE.get(name) or latex_escape(short.replace("_", " ").strip().capitalize())
    return [Column(name, latex, lambda row: fmt_value(row.group.key.get(name, MISSING), name), numeric=False)]


def latex_metric(metric: str) -> str:
    return rf"Top-1 {metric} (\%)" if metric in METRICS else latex_escape(metric)


# ---------------------------------------------------------------- pivots


def pivot_table(panel: Panel, row_key: str, col_key: str, metric: str) -> Table:
    """A panel as mean ± std cells (with n when it is 1 or short of the sweep's); the panel's best mean in bold."""
    header = [f"{row_key} \\ {col_key}", *[fmt_value(c) for c in panel.col_values]]
    best = best_rows(list(panel.cells.values()), metric)
    cells, bold = [], set()
    for i, r in enumerate(panel.row_values):
        line = [fmt_value(r)]
        for j, c in enumerate(panel.col_values, start=1):
            row = panel.cells.get((fmt_value(r), fmt_value(c)))
            line.append("" if row is None else fmt_metric(row, metric) + pivot_n(row.group))
            if row is not None and row.index in best:
                bold.add((i, j))
        cells.append(line)
    corner = f"{latex_key(row_key)} $\\backslash$ {latex_key(col_key)}"
    latex = [corner, *[latex_escape(h) for h in header[1:]]]
    return Table(header, cells, bold, latex, set(range(1, len(header))))


def latex_key(key: str) -> str:
    return READABLE.get(key) or latex_escape(key)


def pivot_n(group: Group) -> str:
    if len(group.runs) != group.expected:
        return f" (n={len(group.runs)} of {group.expected})"
    return " (n=1)" if len(group.runs) == 1 else ""


# ---------------------------------------------------------------- Markdown, text, LaTeX


def markdown_lines(table_: Table) -> list[list[str]]:
    """The header, the rule and the cells as Markdown text: bold cells as **text**, | escaped."""
    cells = [[f"**{c}**" if (i, j) in table_.bold and c else c for j, c in enumerate(line)]
             for i, line in enumerate(table_.cells)]
    lines = [table_.header, ["---"] * len(table_.header), *cells]
    return [[c.replace("|", "\\|") for c in line] for line in lines]


def markdown_table(table_: Table) -> str:
    return "\n".join("| " + " | ".join(line) + " |" for line in markdown_lines(table_)) + "\n"


def aligned_table(table_: Table) -> str:
    """The Markdown table with padded columns, for a terminal."""
    lines = markdown_lines(table_)
    widths = [max(len(line[j]) for line in lines) for j in range(len(lines[0]))]
    lines[1] = ["-" * w for w in widths]
    return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines) + "\n"


def latex_escape(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                          ("_", r"\_"), ("{", r"\{"), ("}", r"\}")):
        text = text.replace(char, escaped)
    return latex_symbols(text.replace(r"\textbackslash\{\}", r"\textbackslash{}"))


def latex_symbols(text: str) -> str:
    """The report's non-ASCII signs as LaTeX (after escaping): ±, Δ, the missing-value dash, a pair's arrow."""
    for char, latex in (("±", r"$\pm$"), ("Δ", r"$\Delta$"), (MISSING, "--"), (" -> ", r" $\to$ ")):
        text = text.replace(char, latex)
    return text


def latex_table(table_: Table) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}) rendered by pandas' Styler: text left, numbers right
    (two decimals each, so they align), bold cells in \\textbf."""
    import pandas as pd  # only here: a report without --latex does not need pandas

    frame = pd.DataFrame(table_.cells, columns=range(len(table_.header)), dtype=object)
    headers = table_.latex_header or [latex_escape(h) for h in table_.header]
    styler = frame.style.hide(axis="index").format(latex_symbols, escape="latex")
    styler = styler.format_index(lambda j: headers[j], axis=1)
    styler = styler.apply(lambda _: pd.DataFrame(
        [["textbf:--rwrap;" if (i, j) in table_.bold else "" for j in frame.columns] for i in frame.index],
        index=frame.index, columns=frame.columns), axis=None)
    align = "".join("r" if j in table_.numeric else "l" for j in range(len(table_.header)))
    return styler.to_latex(column_format=align, hrules=True)


# ---------------------------------------------------------------- CSV


def csv_records(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The table with full-precision numbers and every varying key (the Markdown table leaves out those a method or a
    pair determines), one dict per row (std empty for n=1, Δ empty without baseline)."""
    keys = [METHOD] + [k for k in varying_keys([row.group.key for row in rows]) if k != METHOD]
    records = []
    for row in rows:
        record = {"row": row.index, **{k: row.group.key.get(k, MISSING) for k in keys}}
        for name, (mean, std) in row.stats.items():
            column_ = metric_column(name)
            record[f"{column_}_mean"], record[f"{column_}_std"] = csv_value(mean), csv_value(std)
            if name not in METRICS:
                record[f"{column_}_n"] = row.counts[name]
        record.update(n=row.n, n_expected=row.group.expected, seeds=" ".join(str(r.seed) for r in row.group.runs))
        record["best_selected_by"] = " ".join(sorted({str(r.result.get("best_selected_by")) for r in row.group.runs}))
        record.update({k: csv_value(v) for k, v in row.numbers.items()})
        for name in row.stats:
            record[f"delta_{name}" if name in METRICS else f"delta_{metric_column(name)}"] = csv_value(row.delta(name))
        record["baseline_row"] = row.baseline.index if row.baseline else ""
        records.append(record)
    return records


def run_records(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """runs.csv: one record per finished run (its row, job folder, seed, the config keys that make its experiment)
    and every number its result.json holds, then run_info.json's (run_info/...: speed measured inside the job)."""
    records = []
    for row in rows:
        for run in row.group.runs:
            job = str(run.path.relative_to(run.sweep_dir))
            record = {"row": row.index, "sweep_dir": str(run.sweep_dir), "job": job, SEED_KEY: run.seed, **run.key}
            record.update({k: v for k, v in sorted(run.result.items()) if is_number(v) and k not in record})
            record.update({f"run_info/{k}": v for k, v in sorted(run.info.items()) if is_number(v)})
            records.append(record)
    return records


def pivot_records(panels: Sequence[Panel], row_key: str, col_key: str, metric: str) -> list[dict[str, Any]]:
    """Pivot cells in long form with full-precision numbers."""
    records = []
    for panel in panels:
        for (r, c), row in panel.cells.items():
            (mean, std), name = row.stats[metric], metric_column(metric)
            records.append({"panel": panel.title, row_key: r, col_key: c, "row": row.index,
                            f"{name}_mean": csv_value(mean), f"{name}_std": csv_value(std),
                            "n": row.n, "n_expected": row.group.expected})
    return records


def csv_value(value: Optional[float]) -> Any:
    """A number for a CSV cell: empty for None and nan."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def write_csv(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """The records as a CSV file, written atomically (a reader sees the old file or the new one)."""
    names = list(dict.fromkeys(k for record in records for k in record))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=names)
    writer.writeheader()
    writer.writerows(records)
    fileio.atomic_write_bytes(path, text.getvalue().encode())
