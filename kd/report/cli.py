"""Tables and plots from Hydra multirun sweeps: `python -m kd.report SWEEP_DIR [SWEEP_DIR ...]`.

The command line, and write_report, which runs collect -> aggregate -> render (and paper, figures) into one
folder.
"""
import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from kd import published, records
from kd.report.aggregate import check_pivots, group_runs, summarize
from kd.report.collect import find_problems, job_dirs, load_runs
from kd.report.figures import write_plots
from kd.report.keys import METHOD
from kd.report.paper import paper_section
from kd.report.render import (
    csv_records, intro, markdown_table, latex_table, method_settings, pivot_sections, problem_section, table,
    teacher_warnings, write_csv,
)


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
