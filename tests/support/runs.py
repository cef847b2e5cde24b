"""Tiny runs for the tests: composed in this process (compose_cfg, for kd.engine.run), train.py run in this process
(train_in_process) or launched as train.py processes (launch: forked by support.forked, stdout and stderr together),
and what they left (outcome)."""
import json
import logging
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Optional
from unittest import mock

from hydra import compose, initialize

import kd.config  # noqa: F401  (registers the schema)
from support import forked

REPO = Path(__file__).resolve().parents[2]
# Tiny and fast: 16x16 digits, quarter-width CNNs, one thread (the 2 cores are shared), no profiling, no W&B; the
# teacher trains with the student's recipe (epochs=N sets both).
TINY = [
    "experiment=quickstart", "teacher_recipe=student", "model@teacher=simple_cnn", "teacher.width=0.25",
    "model@student=simple_cnn", "student.width=0.25", "++dataset.source.image_size=16", "threads=1", "profile=false",
    "logger.mode=disabled",
]
# Tiny and fast: 16x16 digits, a quarter-width CNN trained on the labels alone (no teacher), one thread, no W&B.
LABELS_ONLY = ["experiment=quickstart", "model@student=simple_cnn", "student.width=0.25",
               "++dataset.source.image_size=16", "threads=1", "profile=false", "logger.mode=disabled",
               "phase=student", "loss=ce", "teacher_checkpoint=none"]
# A student trained on the labels alone needs no teacher: the cheapest complete run.
PLAIN = ["phase=student", "loss=ce", "teacher_checkpoint=none", "epochs=3"]
KILL_RUNNER = "tests/support/kill_runner.py"


def compose_cfg(tmp: Path, *overrides: str):
    """TINY's config with the teacher store under tmp, composed in this process."""
    with initialize(version_base="1.3", config_path="../../conf"):
        return compose("config", overrides=[*TINY, f"teacher_store={tmp / 'teachers'}", *overrides])


def command(out: Path, *overrides: str, multirun: bool = False, kill_at: Optional[str] = None) -> list[str]:
    """train.py (or support/kill_runner.py when kill_at is set) into run folder `out` (or sweep folder, multirun)."""
    script = KILL_RUNNER if kill_at else "train.py"
    # Quoted: job folder names hold = and , (loss.alpha=0.9,seed=1).
    where = ["-m", f"hydra.sweep.dir='{out}'"] if multirun else [f"hydra.run.dir='{out}'"]
    return [script, *where, *TINY, f"teacher_store={out.parent / 'teachers'}", *overrides]


def launch(out: Path, *overrides: str, multirun: bool = False, kill_at: Optional[str] = None,
           env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run `command` to its end in a process of its own; stdout and stderr together in .stdout."""
    env = {**(env or os.environ), **({"KD_KILL_AT": kill_at} if kill_at else {})}
    return forked.run(command(out, *overrides, multirun=multirun, kill_at=kill_at), REPO, env, timeout=300)


def outcome(run: Path) -> tuple[dict, list[dict]]:
    """A run's final train/test metrics and its metrics.jsonl lines, without the wall-clock times."""
    result = json.loads((run / "result.json").read_text())
    final = {k: v for k, v in result.items() if k.startswith(("train/", "test/")) or k in ("epochs", "best_epoch")}
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return final, [{k: v for k, v in line.items() if not k.startswith("time/")} for line in lines]


def trained(result: dict) -> dict:
    """A result's train/ and test/ metrics: what a run learnt, without its times or its config."""
    return {k: v for k, v in result.items() if k.startswith(("train/", "test/"))}


def epochs_logged(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def no_data(*args, **kwargs):
    raise AssertionError("the run loaded data: it did work it should not have")


def report_text(sweep: Path, out: Path) -> str:
    """kd.report's report.md for a sweep folder, written into out."""
    from kd import report  # here, not at the top: most users of this module never make a report

    assert report.main([str(sweep), "--out", str(out)]) == 0
    return (out / "report.md").read_text()


def train_in_process(argv: list[str]) -> int:
    """Run train.py in this process with these arguments, as `python train.py ARGV` does; its exit code."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # Hydra configures the root logger: give it back as it was
    try:
        with mock.patch.object(sys, "argv", [str(REPO / "train.py"), *argv]):
            runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    except SystemExit as exit:
        return exit.code
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return 0
