"""Fused sweeps' speed (kd.fused), in one run on this device: an N-job alpha x temperature KD sweep trained as one
fused group against the same N jobs one after another, on the quickstart pair (digits, resnet20 -> resnet8 x0.5)
and on resnet56 -> resnet20 at CIFAR shapes (random 32x32 images, 100 classes).

    python -m tools.bench --fused [--jobs 8] [--steps 10] [--windows 3] [--pairs quickstart ...] [overrides]

A window is `--steps` training steps of every job: one after another, each job's the lone engine's
(kd.loop.train_one_epoch, its teacher run live), or all jobs at once (kd.fused.fused_steps, one batch and one
teacher pass shared, as the jobs share their seed); the fused window includes stacking the members and writing them
back, which a fused epoch does once. The two take turns window by window after a warm-up window of each, and each
one's median window is compared; the fused jobs are also timed through vmap (kd.fused.StackedStudents) in the
same stacks. The lone jobs' teacher pass is also timed alone: a sweep whose teacher cache is
warm skips it, so the ratio against the jobs with that pass taken out of all but one job is printed beside it.
"""
import argparse
import itertools
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import kd.config  # noqa: F401  (registers the typed root schema)
from kd import datapath, engine, fused, hardware, loop, teacher_checks
from kd.config import Phase
from kd.data import Split

REPO = Path(__file__).resolve().parents[1]
PAIRS = {
    "quickstart": ["experiment=quickstart"],
    "cifar_resnet56_resnet20": ["model@teacher=resnet56", "model@student=resnet20", "dataset=cifar100"],
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results = {}
    for name in args.pairs:
        results[name] = figures = fused_ratio(PAIRS[name], args)
        how = figures["plan"]
        print(f"{name}: {args.jobs} jobs, {args.steps} steps, {figures['device']}: sequential "
              f"{figures['sequential_s']:.3f}s, fused {figures['fused_s']:.3f}s "
              f"({'grouped' if how.grouped else 'vmap'}, stacks of {min(how.chunk, args.jobs)}), ratio "
              f"{figures['ratio']:.3f} (x{1 / figures['ratio']:.2f}); through vmap {figures['vmap_s']:.3f}s, ratio "
              f"{figures['vmap_s'] / figures['sequential_s']:.3f}; teacher pass {figures['teacher_s']:.3f}s per job, "
              f"ratio against the jobs with it counted once {figures['ratio_teacher_once']:.3f}", flush=True)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.bench --fused", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=8, help="jobs of the sweep (alpha 0.5, 0.9 x jobs/2 temperatures)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per window")
    parser.add_argument("--windows", type=int, default=3, help="timed windows of each (after one warm-up window)")
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=list(PAIRS), help="which pairs")
    parser.add_argument("overrides", nargs="*", help="config overrides for every job, e.g. precision=fp32")
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    if args.jobs < 2 or args.jobs % 2 or args.steps < 1 or args.windows < 1:
        parser.error("--jobs must be even and at least 2, --steps and --windows at least 1")
    return args


def sweep_configs(pair: list[str], args: argparse.Namespace) -> list:
    """The sweep's job configs: alpha 0.5 and 0.9 x temperatures 1 .. jobs/2, one seed."""
    common = ["phase=student", "teacher_checkpoint=none", "logger.mode=disabled", "profile=false", *pair,
              *args.overrides]
    grid = itertools.product((0.5, 0.9), range(1, args.jobs // 2 + 1))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return [compose("config", overrides=[*common, f"loss.alpha={a}", f"loss.temperature={t}"]) for a, t in grid]


def bench_data(cfg, device: torch.device, images: int) -> datapath.DataPath:
    """The quickstart's digits as a run loads them; CIFAR shapes: random 32x32 images (speed ignores content)."""
    if cfg.dataset.name == "digits":
        return engine.load_data(cfg.dataset, device)
    generator = torch.Generator().manual_seed(0)
    views = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, cfg.dataset.num_classes, (images,), generator=generator)
    stats = [torch.tensor(list(v), device=device).view(1, -1, 1, 1) for v in (cfg.dataset.mean, cfg.dataset.std)]
    return datapath.InMemoryData(Split(views, labels).to(device), None, Split(views[:8], labels[:8]).to(device),
                                 *stats, crop_padding=4, hflip=True)


def fused_ratio(pair: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Median seconds of a window of the jobs one after another, and of the jobs fused; their ratio."""
    configs = sweep_configs(pair, args)
    device = hardware.resolve_device(configs[0].device)
    data = bench_data(configs[0], device, configs[0].batch_size * args.steps)
    epoch = data.epoch
    data.epoch = lambda seed, n, batch_size: itertools.islice(epoch(seed, n, batch_size), args.steps)
    teacher = teacher_checks.freeze_teacher(instantiate(configs[0].teacher), data)
    jobs = [engine.build_job(cfg, Phase.student, instantiate(cfg.loss), data, device, teacher) for cfg in configs]
    for job in jobs:
        job.progress_bar = False
    how = fused.plan(jobs)  # once per group, as kd.fused.train_fused
    windows = {"sequential": lambda n: [loop.train_one_epoch(job, n + 1) for job in jobs],
               "fused": lambda n: fused_window(jobs, how, n + 1),
               "vmap": lambda n: fused_window(jobs, fused.Plan(how.chunk, grouped=False), n + 1),
               "teacher": lambda n: teacher_window(jobs[0], n + 1)}
    seconds = {name: statistics.median(times) for name, times in timed(windows, args.windows, device).items()}
    once = seconds["sequential"] - (len(jobs) - 1) * seconds["teacher"]
    return {"device": str(device), "jobs": len(jobs), "steps": args.steps, "sequential_s": seconds["sequential"],
            "fused_s": seconds["fused"], "vmap_s": seconds["vmap"], "plan": how, "teacher_s": seconds["teacher"],
            "ratio": seconds["fused"] / seconds["sequential"], "ratio_teacher_once": seconds["fused"] / once}


def fused_window(jobs: list, how: fused.Plan, epoch: int) -> None:
    students = fused.stack_students(jobs, how)
    fused.fused_steps(jobs, students, epoch, [loop.EpochSums(jobs[0].data.device) for _ in jobs])
    students.write_back(jobs)


def teacher_window(job, epoch: int) -> None:
    teacher = loop.EpochTeacher(job, epoch)  # live: the bench's jobs have no cache
    for batch in job.data.epoch(job.seed, epoch, job.batch_size):
        with job.autocast():
            teacher(job.data.inputs(batch.views), batch.rows)


def timed(windows: dict[str, Callable[[int], Any]], rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each window, in turns after one untimed warm-up turn (tools.bench.timed_rounds)."""
    from tools.bench import timed_rounds  # here: tools.bench imports this module

    return timed_rounds(windows, rounds, device)


if __name__ == "__main__":
    main()
