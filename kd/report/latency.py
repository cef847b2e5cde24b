"""Batch-1 latency measured in a separate, quiet step: `python -m kd.report SWEEP --latency` times each distinct model
once, in the report process, with torch.utils.benchmark.

The latency_ms a job records (run_info.json) is measured inside the job, while its own data loading and any other
jobs share the machine: rows of one model differed 300x (1.49 ms and 483.95 ms). The tables show only this
measurement; the in-job figures stay in each job's run_info.json and in runs.csv (run_info/latency_ms)."""
import json
import os
from typing import Any, Sequence

import torch
from hydra.utils import instantiate

from kd.report.aggregate import Row

MIN_RUN_TIME_S = 1.0  # blocked_autorange's measuring time per model (after one warm-up forward)
THREADS = 1  # on the CPU: one thread gives the figure least dependent on what else runs
DEFAULT_IMAGE_SIZE = 32  # digits' and CIFAR's, when the dataset's source sets no image_size
BUSY = "**Busy machine**"
BUSY_LOAD = 1.0  # a 1-minute load average above this (before measuring) is reported as a busy machine


def model_input(config: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """The trained model's config node and its input shape (C, H, W): channels from dataset.mean, size from
    dataset.source.image_size (DEFAULT_IMAGE_SIZE when unset)."""
    node = config["teacher"] if config.get("phase") == "teacher" else config["student"]
    dataset = config.get("dataset") or {}
    size = (dataset.get("source") or {}).get("image_size", DEFAULT_IMAGE_SIZE)
    return node, (len(dataset.get("mean", (0, 0, 0))), size, size)


def time_model(node: dict[str, Any], shape: tuple[int, int, int], device: torch.device) -> tuple[float, float]:
    """Median and interquartile range (ms) of a batch-1 eval-mode forward under inference_mode: blocked_autorange,
    which synchronises CUDA around each block."""
    from torch.utils import benchmark  # here: importing it warns about CUDA on a machine without, on every report

    model = build(node).to(device).eval()
    inputs = torch.zeros(1, *shape, device=device)
    timer = benchmark.Timer("model(inputs)", globals={"model": model, "inputs": inputs}, num_threads=THREADS)
    with torch.inference_mode():
        model(inputs)  # lazy initialisation and the allocator's first blocks are not the model's speed
        measurement = timer.blocked_autorange(min_run_time=MIN_RUN_TIME_S)
    return measurement.median * 1e3, measurement.iqr * 1e3


def build(node: dict[str, Any]) -> torch.nn.Module:
    """The model of a recorded config node; one that cannot be built any more is an error that says so."""
    try:
        return instantiate(node)
    except Exception as error:  # Hydra wraps whatever the factory raised
        raise ValueError(f"--latency: cannot build the model {node.get('_target_')} recorded in result.json ({error}). "
                         "Report without --latency, or with this repository's version that trained it.") from None


def check_device(device: str) -> None:
    """Reject a --latency-device torch cannot use here, before any work."""
    try:
        where = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--latency-device {device}: not a device ({error}); e.g. cpu, cuda, cuda:1.") from None
    if where.type == "cuda" and (where.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--latency-device {device}: this machine has {torch.cuda.device_count()} CUDA devices; "
                         "time on cpu, or run the report where the GPU is.")


def measure(rows: Sequence[Row], device: str) -> list[str]:
    """Each row's latency_ms and latency_iqr_ms (Row.numbers), each distinct model and input timed once; returns the
    report's note on how, and a warning when the machine was busy."""
    load = os.getloadavg()[0]  # before timing: the report's own work is not what makes a machine busy
    timed: dict[str, tuple[float, float]] = {}
    for row in rows:
        node, shape = model_input(row.group.runs[0].result["config"])
        key = json.dumps([node, shape], sort_keys=True, default=str)
        if key not in timed:
            timed[key] = time_model(node, shape, torch.device(device))
        row.numbers["latency_ms"], row.numbers["latency_iqr_ms"] = timed[key]
    busy = [] if load <= BUSY_LOAD else [f"{BUSY}: the load average was {load:.2f} when the latency was "
                                         "measured; rerun `--latency` on a quiet machine for figures to publish."]
    return [note(device, len(timed), load), *busy, ""]


def note(device: str, models: int, load: float) -> str:
    """How the latency column was measured, for the report."""
    where = torch.device(device)
    where_text = f"{device} ({torch.cuda.get_device_name(where)})" if where.type == "cuda" else f"cpu, {THREADS} thread"
    return (f"Latency (ms): batch-1 forward in eval mode, the median of torch.utils.benchmark's blocked_autorange "
            f"(at least {MIN_RUN_TIME_S:g} s per model; the interquartile range is in report.csv), measured by "
            f"kd.report on {where_text}, {models} distinct model{'s' if models > 1 else ''}, each once, 1-minute "
            f"load average {load:.2f} on {os.cpu_count()} cores. The latency a job records while it trains is not "
            "shown.")
