"""Which PNG plots a sweep gets (kd.report.plots draws them): a heatmap over alpha × temperature, top-1 against
model size, training curves."""
from pathlib import Path
from typing import Sequence

import numpy as np

from kd.report import plots
from kd.report.aggregate import Row, epoch_curve, is_baseline, key_columns, pivot_panels
from kd.report.keys import METHOD, MISSING, PAIR, fmt_value, short_names
from kd.report.render import metric_label

MAX_CURVES_PER_PLOT = 8


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
    plots.heatmaps(panels, *keys, out_dir / name, label=metric_label(metric))
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
    plots.lines(series, xlabel + " (log scale)", metric_label(metric), out_dir / name, log_x=True)
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
