"""Tables and plots from Hydra multirun sweeps: `python -m kd.report SWEEP_DIR [SWEEP_DIR ...]`.

The command line; write_report, which runs collect -> aggregate -> render (and paper, figures, latency) and then
writes every file into one folder; load, the same runs as a pandas DataFrame for notebooks.
"""
import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from kd import fileio, published
from kd.report import latency
from kd.report.aggregate import SORT_BY_METRIC, Row, check_metric, check_pivots, group_runs, summarize
from kd.report.collect import Problem, Run, check_repeated_runs, find_problems, job_dirs, load_runs
from kd.report.figures import write_plots
from kd.report.keys import METHOD, METRICS, metric_name
from kd.report.paper import paper_section
from kd.report.render import (
    COLUMN_NAMES,
    Table,
    aligned_table,
    check_columns,
    csv_records,
    default_columns,
    latex_table,
    markdown_table,
    run_records,
    table,
    write_csv,
)
from kd.report.sections import intro, method_settings, pivot_sections, problem_section, teacher_warnings

if TYPE_CHECKING:
    import pandas


@dataclass
class Options:
    """What a report shows, from the command line's options."""

    pivots: Sequence[tuple[str, str]] = ()
    latex: bool = False
    metric: str = "both"  # last, best, both, or a result.json key
    paper: Optional[str] = None
    columns: Sequence[str] = ()  # empty: render.default_columns
    sort: Sequence[str] = ()
    latency: Optional[str] = None  # a device to time each model on (kd.report.latency), or None

    @property
    def metrics(self) -> list[str]:
        return list(METRICS) if self.metric == "both" else [metric_name(self.metric)]

    @property
    def primary(self) -> str:
        """The metric of pivots, plots, bold in pivots and --sort metric: the first shown."""
        return self.metrics[0]


@dataclass
class Report:
    """Everything a report writes, computed before the first file is written."""

    rows: list[Row]
    markdown: list[str]
    main: Table
    latex: list[str]
    csvs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # also on stderr


def tabulate(sweep_dirs: Sequence[Path], runs: Sequence[Run], options: Options) -> list[Row]:
    """The rows, after the checks of the options that need them (ValueError naming the problem and the fix)."""
    check_repeated_runs(runs)
    check_metric(runs, metric_name(options.metric))
    sort = [name.replace(SORT_BY_METRIC, options.primary) if name.lstrip("-") == SORT_BY_METRIC else name
            for name in options.sort]
    extra = [m for m in options.metrics if m not in METRICS]
    rows = summarize(group_runs(runs, sweep_dirs), extra, sort)
    check_pivots(rows, options.pivots)
    check_columns(rows, options.columns, options.latency is not None)
    if options.latency is not None:
        latency.check_device(options.latency)
    return rows


def compose(sweep_dirs: Sequence[Path], runs: Sequence[Run], problems: Sequence[Problem], options: Options) -> Report:
    """The report's text and CSV records; every ValueError (a bad option, a pivot cell of two rows) comes before the
    latency is measured and before any file is written."""
    rows = tabulate(sweep_dirs, runs, options)
    pivot_md, pivot_tex, csvs = pivot_sections(rows, options.pivots, options.primary, options.latex)
    paper_md, paper_csvs = paper_section(rows, options.paper) if options.paper else ([], {})
    speed = latency.measure(rows, options.latency) if options.latency else []
    main = table(rows, options.metrics, options.columns or default_columns(rows))
    markdown = [*intro(sweep_dirs, runs, rows, options.metrics), *teacher_warnings(rows), *method_settings(rows),
                *speed, markdown_table(main), *pivot_md, *paper_md, *problem_section(problems, rows, sweep_dirs)]
    csvs = {"report.csv": csv_records(rows), "runs.csv": run_records(rows), **csvs, **paper_csvs}
    warnings = [problem.line() for problem in problems] + [line for line in teacher_warnings(rows) if line]
    warnings += [line for line in speed if line.startswith(latency.BUSY)]
    latex = [latex_table(main), *pivot_tex] if options.latex else []
    return Report(rows, markdown, main, latex, csvs, warnings)


def write_report(sweep_dirs: Sequence[Path], out_dir: Optional[Path] = None, options: Optional[Options] = None) -> Path:
    """Write report.md, report.csv, runs.csv (and report.tex, pivot CSVs, the paper comparison, PNGs) into out_dir,
    print the main table; return report.md's path."""
    options = options or Options()
    sweep_dirs = [Path(d) for d in sweep_dirs]
    out_dir = Path(out_dir or sweep_dirs[0])
    fileio.check_writable(out_dir, "Write the report into another folder: --out DIR.")  # before any file is written
    runs = load_runs(sweep_dirs)
    report = compose(sweep_dirs, runs, find_problems(sweep_dirs, runs), options)
    for name, csv_rows in report.csvs.items():
        write_csv(out_dir / name, csv_rows)
    plot_lines = write_plots(report.rows, out_dir, options.primary)
    markdown = "\n".join([*report.markdown, "## Plots", "", *[f"{x}\n" for x in plot_lines]])
    fileio.atomic_write_bytes(out_dir / "report.md", markdown.encode())
    if options.latex:
        fileio.atomic_write_bytes(out_dir / "report.tex", "\n".join(report.latex).encode())
    print(aligned_table(report.main))
    for line in report.warnings:
        print(f"kd.report: {line}", file=sys.stderr)
    return out_dir / "report.md"


def load(sweep_dir: Path | str, *more: Path | str) -> "pandas.DataFrame":
    """The finished runs of the sweeps as a pandas DataFrame, one row per run: runs.csv's columns (row, job, seed,
    config keys, every number of result.json, run_info/...), for notebooks."""
    import pandas as pd  # only here: the command line does not need pandas

    sweep_dirs = [Path(sweep_dir), *map(Path, more)]
    missing = [str(d) for d in sweep_dirs if not d.is_dir()]
    if missing:
        raise FileNotFoundError(f"kd.report.load: no such folder: {', '.join(missing)}")
    runs = load_runs(sweep_dirs)
    check_repeated_runs(runs)
    return pd.DataFrame.from_records(run_records(summarize(group_runs(runs, sweep_dirs))))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kd.report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dirs", nargs="+", type=Path, help="Hydra multirun folders (or single run folders)")
    parser.add_argument("--pivot", nargs=2, action="append", default=[], metavar=("ROW", "COL"),
                        help="also a ROW x COL table of mean ± std, e.g. loss.alpha loss.temperature; "
                             f"a dotted config key or `{METHOD}` (repeatable)")
    parser.add_argument("--latex", action="store_true", help="also write report.tex (booktabs; needs pandas)")
    parser.add_argument("--metric", default="both", metavar="METRIC",
                        help="what the tables show: last or best (test top-1 at the last or the best epoch), both "
                             "(default), or any number result.json records (val/acc1, test/acc5, test/agreement)")
    parser.add_argument("--columns", type=names, default=(), metavar="NAME,...",
                        help="the main table's columns, in order, after #: config keys, method, pair, and "
                             f"{', '.join(COLUMN_NAMES)} (metric last when not named); default: the keys that vary, "
                             "metric, n, params, flops, teacher, delta (and latency with --latency)")
    parser.add_argument("--sort", type=names, default=(), metavar="NAME,...",
                        help=f"order the rows by these config keys or `{SORT_BY_METRIC}` (the table's metric), the "
                             "first the most significant; -NAME descends (write --sort=-metric); rows are numbered "
                             "after sorting")
    parser.add_argument("--latency", action="store_true",
                        help="time each distinct model once here (batch 1, torch.utils.benchmark) and show it as a "
                             "column; run it on a quiet machine (the latency a job records as it trains is not shown)")
    parser.add_argument("--latency-device", default="cpu", metavar="DEVICE", help="where --latency runs (default cpu)")
    parser.add_argument("--out", type=Path, help="output folder (default: the first sweep folder)")
    parser.add_argument("--paper", choices=published.names(),
                        help="also a method x pair table of ours beside that paper's published figures")
    return parser.parse_args(argv)


def names(text: str) -> list[str]:
    """A comma-separated list of names."""
    return [name.strip() for name in text.split(",") if name.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; 1 when the folders hold no job at all, an option names what does not exist or the output
    folder cannot be written."""
    args = parse_args(argv)
    missing = [d for d in args.sweep_dirs if not d.is_dir()]
    if missing:
        print(f"kd.report: no such folder: {', '.join(map(str, missing))}", file=sys.stderr)
        return 1
    if not any(job_dirs(d) for d in args.sweep_dirs):
        print("kd.report: no job folders (with a run.json) found", file=sys.stderr)
        return 1
    options = Options([tuple(p) for p in args.pivot], args.latex, args.metric, args.paper, args.columns, args.sort,
                      args.latency_device if args.latency else None)
    try:
        path = write_report(args.sweep_dirs, args.out, options)
    except (ValueError, fileio.CannotWrite) as err:
        print(f"kd.report: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0
