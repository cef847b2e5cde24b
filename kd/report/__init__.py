"""Tables and plots from Hydra multirun sweeps: `python -m kd.report SWEEP_DIR [SWEEP_DIR ...]`.

Flow: job folders (run.json, result.json, run_info.json, metrics.jsonl) -> runs -> groups (same config but the
seed, same teacher weights) -> summary rows (mean ± std over seeds, Δ to the baseline) -> report.md, report.csv,
report.tex, PNG plots. The jobs a sweep should have are its sweep.json grid (written before any job, refused when a
relaunch would change it), and the jobs it has are the folders whose run.json a run wrote after passing its
checks: a missing or failed job is listed, never silently averaged away, and a refused rerun changes neither.

Modules, each importing only those above it: keys (what makes an experiment, names), collect (job folders -> runs,
problems), aggregate (groups, rows, baselines, pivots as data), render (Markdown, LaTeX, CSV), paper (beside a
paper's figures), sections (the report's prose), latency (a quiet benchmark), plots and figures (PNG), cli (the
command line, write_report, load).
"""
from kd.report.cli import Options, load, main, write_report
from kd.report.collect import expected_jobs, normalize
from kd.report.keys import BASELINE, METRICS, group_key, method_name

__all__ = ["BASELINE", "METRICS", "Options", "expected_jobs", "group_key", "load", "main", "method_name", "normalize",
           "write_report"]
