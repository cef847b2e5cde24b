"""Everything only a GPU can show, in one command that writes one JSON and prints a short summary.

    python -m tools.gpu_check [--out gpu_check.json] [--data ../shared/data/cifar10] [--budget-s 300] [--quick]

Items, in the order they run; each records a status ("pass", "fail", or "skipped: <why>"), what it measured and its
wall time. A failing item is recorded (its error and traceback) and the next one runs; the JSON is rewritten after
every item, so a run cut short keeps what it finished. An item starts only while the time budget lasts.

  syncs          every training step of an epoch under torch.cuda.set_sync_debug_mode("error"), for every
                 conf/loss option (LOSSES), with the teacher live (recording its logits in the teacher cache) and
                 again reading them from the cache where the loss reads only logits: a step that makes the host wait
                 for the device fails its case, with the error and the line it came from; the failed epoch is then
                 run again under "warn" to count the syncs of each step. --quick: 200 training images per epoch.
  bench          tools.bench's variants (reference loop, engine, engine with a warm teacher cache, evaluation) in a
                 short configuration: images/s, steps/s, fractions of the matmul ceiling and, on CUDA, of the bf16 peak.
  deterministic  two train.py processes at once with deterministic=true (a teacher trained on demand, then a KD
                 student): passes when their result.json metrics are exactly equal.
  bf16_accuracy  resnet20 -> resnet8 on the CIFAR-10 JPEG folder (--data), 5 epochs for the teacher and 5 for the
                 KD student (teacher_recipe=student), in fp32 and in bf16 (two train.py processes at once): both
                 test accuracies of each and their differences.
  fp16           the same KD student epochs in fp32 and in fp16 with loss scaling (GradScaler): final training
                 losses within 5% of each other, and the loss scale the scaler ends at.
  compile        one short KD student run eager, one with compile=true and, on CUDA, one with
                 compile_mode=reduce-overhead (CUDA graphs): losses, accuracies, seconds per epoch (the first includes
                 the compilation) and milliseconds per training step.
  fused          tools.bench --fused: a 16-job sweep trained as fused groups (kd.fused) against the same jobs one
                 after another, on the quickstart pair and resnet56 -> resnet20 at CIFAR shapes (--quick: 2 jobs).

Without CUDA, syncs and the bench's bf16 peak are "skipped: no CUDA device". --quick shrinks every run to seconds on
a CPU (quarter-width CNNs on 16x16 digits, 1 epoch, one-step bench windows); compile is then skipped on the CPU,
where inductor's first compile alone takes minutes.

Never run on a GPU yet (written on a CPU-only machine, their logic tested there with CUDA stood in for): the syncs
cases beyond KD and CRD (every loss, live and cached), fp16, compile's reduce_overhead run, and fused.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

if __package__ in (None, ""):  # python tools/gpu_check.py: kd and tools import from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kd.config  # noqa: F401  (registers the typed root schema)
from kd import engine, fileio, hardware, loop, records
from kd.config import Phase
from kd.methods.base import Step
from kd.teacher_cache import TeacherCache
from tools import bench, bench_fused

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10"

# Every run: no W&B, no per-run speed profile, no progress bar.
COMMON = ["logger.mode=disabled", "profile=false", "progress_bar=false"]
# The short runs (syncs, deterministic, compile): the quickstart pair, resnet20 -> half-width resnet8, on digits
# (offline, 1,438 training images), one recipe for both phases.
SHORT = ["experiment=quickstart", "teacher_recipe=student", "epochs=3"]
# --quick: quarter-width CNNs on 16x16 digits, 1 epoch, one CPU thread per run (runs go two at a time): seconds.
QUICK = ["experiment=quickstart", "teacher_recipe=student", "model@teacher=simple_cnn", "teacher.width=0.25",
         "model@student=simple_cnn", "student.width=0.25", "++dataset.source.image_size=16", "epochs=1", "threads=1"]
# bf16_accuracy: resnet20 -> resnet8 for 5 epochs each on the CIFAR-10 folder, cosine decay to the last epoch.
CIFAR = ["dataset=imagefolder", "model@teacher=resnet20", "model@student=resnet8", "teacher_recipe=student",
         "epochs=5", "scheduler=cosine"]
# tools.bench, short: its default pair and window length (100 steps on CUDA), 3 timed windows; --quick: one step.
BENCH = ["--windows", "3"]
# fused: the quickstart pair's 16-job sweep fused against its jobs one after another (the goal: 5x on a GPU).
FUSED_BENCH = ["--jobs", "16", "--pairs", "quickstart", "cifar_resnet56_resnet20"]
QUICK_FUSED_BENCH = ["++dataset.source.image_size=16", "student.width=0.25", "--jobs", "2", "--steps", "1",
                     "--windows", "1", "--pairs", "quickstart"]
QUICK_BENCH = ["--teacher", "resnet8", "--student", "resnet8", "--window-steps", "1", "--windows", "1",
               "--workers", "0", "--num-classes", "10"]


class Skipped(Exception):
    """An item that cannot run here; its message says why."""


@dataclass
class Check:
    """What every item reads: the device, the size of its runs, the CIFAR-10 folder, a scratch folder, the deadline."""

    device: torch.device
    quick: bool
    data: Path
    work: Path
    budget_s: float
    started: float  # time.perf_counter() at the start of the check

    def remaining(self) -> float:
        """Seconds of the budget left."""
        return self.started + self.budget_s - time.perf_counter()

    def runs(self) -> list[str]:
        """The overrides of the short runs: SHORT, or QUICK with --quick; on this check's device."""
        return [*COMMON, *(QUICK if self.quick else SHORT), f"device={self.device}"]


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    device = hardware.resolve_device(args.device)
    report = {"command": ["python", "-m", "tools.gpu_check", *(argv if argv is not None else sys.argv[1:])],
              "quick": args.quick, "budget_s": args.budget_s, "data": str(args.data),
              "environment": environment(device), "items": {}}
    with work_folder(args.work_dir) as work:
        check = Check(device, args.quick, args.data.resolve(), work, args.budget_s, started)
        for name in args.items:
            print(f"[gpu_check] {name} ...", flush=True)
            report["items"][name] = run_item(name, check)
            print(f"[gpu_check] {summary_line(name, report['items'][name])}", flush=True)
            report["wall_s"] = time.perf_counter() - started
            report["statuses"] = {name: item["status"].split(":")[0] for name, item in report["items"].items()}
            fileio.write_json(args.out, report)  # after every item: a run cut short keeps what it finished
    print_summary(report)
    return report


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON report")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="the CIFAR-10 image folder (train/<class>/*, test/<class>/*) of bf16_accuracy")
    parser.add_argument("--budget-s", type=float, default=300.0, help="no item starts after this many seconds")
    parser.add_argument("--quick", action="store_true", help="tiny runs (digits, 1 epoch): for the CPU and tests")
    parser.add_argument("--items", default=",".join(ITEMS), help=f"comma-separated subset of {','.join(ITEMS)}")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--work-dir", type=Path, help="keep the runs here (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    args.items = [name for name in args.items.split(",") if name]
    unknown = sorted(set(args.items) - set(ITEMS))
    if unknown or not args.items:
        parser.error(f"--items {','.join(unknown)}: choose from {','.join(ITEMS)}")
    return args


@contextmanager
def work_folder(path: Optional[Path]) -> Iterator[Path]:
    """The given folder (created, kept), or a temporary one removed at the end."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        yield Path(tmp)


def environment(device: torch.device) -> dict[str, Any]:
    """records.environment, plus on CUDA the GPU's memory, multiprocessors and the fp32 (TF32) settings."""
    env = records.environment(device)
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        env.update(gpu_memory_gib=properties.total_memory / 2**30, multiprocessors=properties.multi_processor_count,
                   cudnn=torch.backends.cudnn.version(), cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                   float32_matmul_precision=torch.get_float32_matmul_precision())
    return env


def run_item(name: str, check: Check) -> dict[str, Any]:
    """One item, timed; its skip reason or its error is recorded, never raised."""
    reason = skip_reason(name, check)
    if reason:
        return {"status": f"skipped: {reason}", "wall_s": 0.0}
    started = time.perf_counter()
    try:
        result = ITEMS[name](check)
    except Skipped as skipped:
        result = {"status": f"skipped: {skipped}"}
    except (Exception, SystemExit) as error:  # SystemExit: an argparse refusal inside tools.bench
        result = {"status": "fail", "error": f"{type(error).__name__}: {error}"[:4000],
                  "traceback": traceback.format_exc()[-6000:]}
    finally:
        if check.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    result["wall_s"] = time.perf_counter() - started
    return result


def skip_reason(name: str, check: Check) -> str:
    """Why `name` cannot run in this check ("" when it can)."""
    if check.remaining() <= 0:
        return f"the time budget (--budget-s {check.budget_s:g}) was spent before it started"
    if name in NEEDS_CUDA and check.device.type != "cuda":
        return "no CUDA device"
    if name == "compile" and check.quick and check.device.type != "cuda":
        return "--quick without CUDA (inductor's first compile takes minutes on a CPU; run without --quick)"
    return ""


# ---------------------------------------------------------------------------------------------------------------
# syncs


# Every conf/loss option, live and (where its teacher term reads only logits) from the teacher cache.
LOSSES = sorted(path.stem for path in (REPO / "conf" / "loss").glob("*.yaml"))
# FSP compares FSP matrices of equal sizes: its teacher is the student's model (quickstart: half-width resnet8).
LOSS_OVERRIDES = {"fsp": ["model@teacher=resnet8", "teacher.width=0.5"]}
QUICK_TRAIN = 200  # --quick: training images per checked epoch (3 full batches of 64 and a short last one)


def check_syncs(check: Check) -> dict[str, Any]:
    """Every training step of an epoch under sync debug mode "error", for every loss, live and cached."""
    cases: dict[str, dict[str, Any]] = {}
    for loss in LOSSES:
        cases.update(guarded_cases(loss, lambda loss=loss: loss_cases(check, loss)))
    failed = [name for name, case in cases.items() if case["status"] == "fail"]
    checked = [name for name, case in cases.items() if case["status"] == "pass"]
    summary = (f"{len(checked)} of {len(cases)} cases without a sync ({len(LOSSES)} losses, live and cached)"
               + (f"; failed: {', '.join(failed)}" if failed else ""))
    return {"status": "fail" if failed else "pass", "cases": cases, "summary": summary}


def guarded_cases(loss: str, cases: Callable[[], dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """A loss's cases, or one failure holding its error: one loss's error never hides the others' results."""
    try:
        return cases()
    except Exception as error:
        return {f"{loss}_live": {"status": "fail", "error": f"{type(error).__name__}: {error}"[:4000],
                                 "traceback": traceback.format_exc()[-6000:]}}


def loss_cases(check: Check, loss: str) -> dict[str, dict[str, Any]]:
    """A warm-up epoch unchecked (cuDNN autotuning, library handles), then one epoch checked with the teacher live
    (recording its logits in the cache, as a sweep's first job does, where the loss reads only logits), then that
    epoch again, checked, reading them from the cache."""
    job = sync_job(check, loss)
    loop.train_one_epoch(job, 1)
    cacheable = job.criterion.needs_teacher and not job.criterion.layers()[1]
    if cacheable:
        shape = (len(job.data.train), len(job.data.classes))
        job.cache = TeacherCache(check.work / "syncs_cache", {"gpu_check": loss}, shape, "float32", 1e12)
    cases = {f"{loss}_live": checked_epoch(job, 2)}
    if not job.criterion.needs_teacher:
        return cases
    if not cacheable:
        return {**cases, f"{loss}_cached": {"status": "skipped: the loss reads teacher features; the cache holds "
                                                      "logits only"}}
    cached = checked_epoch(job, 2)
    if job.cache.hits == 0:
        cached.update(status="fail", error="the checked epoch did not read the teacher cache")
    return {**cases, f"{loss}_cached": cached}


def sync_job(check: Check, loss: str, *extra: str) -> loop.Job:
    """A student job (as tests/test_hot_path.py builds one) with an untrained teacher: a step runs as in training.
    --quick trains on the first QUICK_TRAIN images only."""
    overrides = [] if check.quick else LOSS_OVERRIDES.get(loss, [])
    cfg = compose_config(*check.runs(), "phase=student", f"loss={loss}", f"teacher_store={check.work / 'teachers'}",
                         *overrides, *extra)
    hardware.configure_determinism(cfg.deterministic)
    data = engine.load_data(cfg.dataset, check.device, hardware.use_channels_last(cfg.channels_last, check.device))
    if check.quick:
        data.train = data.train.subset(torch.arange(min(QUICK_TRAIN, len(data.train))))
    torch.manual_seed(cfg.seed)  # the same untrained teacher in every job (fp16 compares two)
    teacher = instantiate(cfg.teacher)  # build_job freezes it
    return engine.build_job(cfg, Phase.student, instantiate(cfg.loss), data, check.device, teacher)


def checked_epoch(job: loop.Job, epoch: int) -> dict[str, Any]:
    """One epoch with every step under sync debug mode "error": pass, or fail with the error, where it came from,
    and (the epoch again under "warn") each step's syncs."""
    steps: list[list[str]] = []
    try:
        with steps_under_sync_debug("error", steps):
            loop.train_one_epoch(job, epoch)
        return {"status": "pass", "steps": len(steps), "syncs_per_step": 0}
    except RuntimeError as error:
        if "synchroniz" not in str(error):
            raise
        result = {"status": "fail", "error": str(error)[:2000], "failed_step": len(steps), "where": kd_frame(error)}
    counted: list[list[str]] = []
    with steps_under_sync_debug("warn", counted):
        loop.train_one_epoch(job, epoch)
    places = sorted({place for step in counted for place in step})
    result.update(steps=len(counted), syncs_per_step=max(len(step) for step in counted), sync_places=places)
    return result


@contextmanager
def steps_under_sync_debug(mode: str, found: list[list[str]]) -> Iterator[None]:
    """kd.loop.train_step run under torch.cuda.set_sync_debug_mode(mode); `found` gets, per finished step, the
    places (file:line) of the syncs it warned about ("warn"; "error" raises at the first one instead)."""
    real_step = loop.train_step

    def step(*args, **kwargs) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode(mode)
            try:
                real_step(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        found.append([f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)])

    # train_one_epoch calls the module's train_step: wrapping it checks the steps alone, not the epoch's edges,
    # which move the epoch's plan to the device and read its sums back once by design.
    loop.train_step = step
    try:
        yield
    finally:
        loop.train_step = real_step


def kd_frame(error: BaseException) -> str:
    """The innermost frame of this repository's code in the error's traceback, as file:line in function."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if str(REPO / "kd") in f.filename]
    return f"{Path(frames[-1].filename).relative_to(REPO)}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""


# ---------------------------------------------------------------------------------------------------------------
# bench


def check_bench(check: Check) -> dict[str, Any]:
    """tools.bench's variants, short; without CUDA the bf16 peak is skipped."""
    size = QUICK_BENCH if check.quick else BENCH
    figures = bench.main([*size, "--json", str(check.work / "bench.json"), f"device={check.device}"])
    result = {"status": "pass", "figures": figures}
    if check.device.type != "cuda":
        result["bf16_peak"] = "skipped: no CUDA device"
    b, c = figures["b_engine"], figures["c_engine_cached"]
    summary = f"(b) {b['speedup_vs_reference']:.2f}x (a), (c) {c['speedup_vs_reference']:.2f}x (a)"
    if "fraction_of_bf16_peak" in b:
        summary += f"; of the bf16 peak: (b) {b['fraction_of_bf16_peak']:.1%}, (c) {c['fraction_of_bf16_peak']:.1%}"
    return {**result, "summary": summary}


def check_fused(check: Check) -> dict[str, Any]:
    """tools.bench --fused: a fused sweep against the same jobs one after another, on each pair."""
    figures = bench_fused.main([f"device={check.device}", *(QUICK_FUSED_BENCH if check.quick else FUSED_BENCH)])
    figures = {pair: {k: (vars(v) if k == "plan" else v) for k, v in f.items()} for pair, f in figures.items()}
    summary = ", ".join(f"{pair} {f['jobs']} jobs x{1 / f['ratio']:.2f}" for pair, f in figures.items())
    return {"status": "pass", "figures": figures, "summary": summary}


# ---------------------------------------------------------------------------------------------------------------
# deterministic, bf16_accuracy: train.py processes


def check_deterministic(check: Check) -> dict[str, Any]:
    """Two processes with deterministic=true (teacher on demand, then a KD student): equal result.json metrics?"""
    overrides = [*check.runs(), "phase=student", "loss=kd", "train_missing_teacher=true", "deterministic=true"]
    first, second = train_runs(check, "deterministic", {"first": overrides, "second": overrides}).values()
    first, second = compared_metrics(first), compared_metrics(second)
    differing = {key: [first.get(key), second.get(key)] for key in sorted(first.keys() | second.keys())
                 if first.get(key) != second.get(key)}
    summary = f"{len(first)} metrics " + ("equal" if not differing else f"differ in {', '.join(differing)}")
    return {"status": "fail" if differing else "pass", "metrics": first, "differing": differing, "summary": summary}


def compared_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """What must repeat exactly: the student's and its teacher's metrics (the teacher file's hash covers its
    recorded epoch times, so it is left out)."""
    return {key: value for key, value in result.items()
            if key.startswith(("train/", "val/", "test/", "teacher/")) and key != "teacher/sha256"}


def check_bf16_accuracy(check: Check) -> dict[str, Any]:
    """Teacher and KD student in fp32 and in bf16: their test accuracies and the bf16 - fp32 differences."""
    if check.quick:
        overrides = check.runs()
    elif (check.data / "train").is_dir() and (check.data / "test").is_dir():
        overrides = [*COMMON, *CIFAR, f"dataset.source.root={check.data}", f"device={check.device}"]
    else:
        raise Skipped(f"no CIFAR-10 image folder at {check.data} (give --data)")
    common = [*overrides, "phase=student", "loss=kd", "train_missing_teacher=true"]
    runs = train_runs(check, "bf16_accuracy", {p: [*common, f"precision={p}"] for p in ("fp32", "bf16")})
    accuracy = {p: {"teacher_acc1": r["teacher/acc1"], "student_acc1": r["test/acc1"], "student_loss": r["train/loss"]}
                for p, r in runs.items()}
    difference = {key: accuracy["bf16"][key] - accuracy["fp32"][key] for key in ("teacher_acc1", "student_acc1")}
    summary = (f"teacher fp32 {accuracy['fp32']['teacher_acc1']:.2f} bf16 {accuracy['bf16']['teacher_acc1']:.2f}, "
               f"student fp32 {accuracy['fp32']['student_acc1']:.2f} bf16 {accuracy['bf16']['student_acc1']:.2f} "
               f"(bf16 - fp32: {difference['student_acc1']:+.2f})")
    return {"status": "pass", "accuracy": accuracy, "bf16_minus_fp32": difference,
            "epochs": runs["fp32"]["epochs"], "summary": summary}


def train_runs(check: Check, item: str, runs: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """train.py once per entry, all at the same time (each in its own folder and teacher store); their result.json.
    Raises with the end of each failed run's output."""
    started = {name: start_run(check.work / item / name, overrides) for name, overrides in runs.items()}
    failures, results = [], {}
    for name, (process, folder) in started.items():
        process.wait()  # the budget decides which items start, not when a started one ends
        result_file = folder / "run" / "result.json"
        if process.returncode != 0 or not result_file.is_file():
            output = (folder / "output.txt").read_text(errors="replace")
            failures.append(f"{name}: exit code {process.returncode}\n{output[-3000:]}")
            continue
        results[name] = json.loads(result_file.read_text())
    if failures:
        raise RuntimeError("train.py failed: " + "\n".join(failures))
    return results


def start_run(folder: Path, overrides: list[str]) -> tuple[subprocess.Popen, Path]:
    """Start train.py into folder/run, its teacher store in folder/teachers, its output in folder/output.txt."""
    folder.mkdir(parents=True)
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "WANDB_MODE": "disabled"}
    with (folder / "output.txt").open("w") as output:  # the child holds its own copy of the file
        process = subprocess.Popen([sys.executable, "train.py", f"hydra.run.dir={folder / 'run'}",
                                    f"teacher_store={folder / 'teachers'}", *overrides],
                                   cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
    return process, folder


# ---------------------------------------------------------------------------------------------------------------
# fp16


FP16_TOLERANCE = 0.02  # first-batch fp16 loss vs fp32, same weights (0.8% seen: KD at T=4, CPU fp16 autocast)


def check_fp16(check: Check) -> dict[str, Any]:
    """The same KD student job in fp32 and in fp16 with loss scaling (GradScaler): the first batch's loss on the
    same initial weights within FP16_TOLERANCE, finite training losses, and the loss scale the scaler ends at (it
    halves at each step whose gradients overflowed)."""
    runs = {precision: precision_run(check, precision) for precision in ("fp32", "fp16")}
    fp32, fp16 = runs["fp32"]["first_batch_loss"], runs["fp16"]["first_batch_loss"]
    difference = abs(fp16 - fp32) / abs(fp32)
    finite = all(math.isfinite(run["train/loss"]) for run in runs.values())
    summary = (f"first batch loss fp32 {fp32:.5f} fp16 {fp16:.5f} ({difference:.2%} apart, at most "
               f"{FP16_TOLERANCE:.0%}); train loss fp32 {runs['fp32']['train/loss']:.4f} fp16 "
               f"{runs['fp16']['train/loss']:.4f}; loss scale {runs['fp16']['initial_scale']:g} -> "
               f"{runs['fp16']['final_scale']:g}")
    return {"status": "pass" if finite and difference <= FP16_TOLERANCE else "fail", "runs": runs,
            "relative_difference": difference, "summary": summary}


def precision_run(check: Check, precision: str) -> dict[str, Any]:
    """A KD student job (untrained teacher) in `precision`: its first batch's loss before training, then its last
    epoch's metrics after the check's epochs, and the scaler's scale before and after."""
    job = sync_job(check, "kd", f"precision={precision}")
    first = first_batch_loss(job)
    initial = job.scaler.get_scale() if job.scaler.is_enabled() else None
    epochs = 1 if check.quick else 3
    metrics = [loop.run_epoch(job, epoch) for epoch in range(1, epochs + 1)][-1]
    return {"first_batch_loss": first, "train/loss": metrics["train/loss"], "test/acc1": metrics["test/acc1"],
            "epochs": epochs, "initial_scale": initial,
            "final_scale": job.scaler.get_scale() if initial is not None else None}


def first_batch_loss(job: loop.Job) -> float:
    """The criterion's summed terms on the first training batch, the model in eval mode (nothing updated)."""
    batch = next(iter(job.data.epoch(job.seed, 1, job.batch_size)))
    images = job.data.inputs(batch.views)
    job.model.eval()
    with torch.no_grad(), job.autocast():
        logits, teacher_logits = job.model(images), job.teacher(images).float()
        terms = job.criterion(Step(logits, batch.labels, teacher_logits, {}, {}, batch.index, 1, 0, job.seed,
                                   batch.size))
    job.model.train()
    return float(sum(terms.values()))


# ---------------------------------------------------------------------------------------------------------------
# compile


def check_compile(check: Check) -> dict[str, Any]:
    """The same short KD student eager, with compile=true, and (CUDA) with compile_mode=reduce-overhead (CUDA graphs),
    one teacher: losses, accuracies, seconds per epoch and milliseconds per training step."""
    store = f"teacher_store={check.work / 'compile' / 'teachers'}"
    # No teacher cache: the second run would read the first one's teacher outputs and look faster for it.
    overrides = [*check.runs(), "phase=student", "loss=kd", "train_missing_teacher=true", "teacher_cache=false", store]
    modes = {"eager": ["compile=false"], "compiled": ["compile=true"]}
    if check.device.type == "cuda":
        modes["reduce_overhead"] = ["compile=true", "compile_mode=reduce-overhead"]
    runs = {name: compile_run(check.work / "compile" / name, [*overrides, *flags]) for name, flags in modes.items()}
    eager, compiled = runs["eager"], runs["compiled"]
    result = {"status": "pass", "runs": runs, "loss_difference": compiled["train/loss"] - eager["train/loss"],
              "acc1_difference": compiled["test/acc1"] - eager["test/acc1"]}
    if "reduce_overhead" not in runs:
        result["reduce_overhead"] = "skipped: CUDA graphs need a CUDA device"
    summary = (f"train loss eager {eager['train/loss']:.4f} compiled {compiled['train/loss']:.4f}; test acc1 "
               f"{eager['test/acc1']:.2f} / {compiled['test/acc1']:.2f}; first epoch {eager['epoch_s'][0]:.1f} s / "
               f"{compiled['epoch_s'][0]:.1f} s; ms per step " + " / ".join(
                   f"{name} {run['ms_per_step']:.2f}" for name, run in runs.items()))
    if len(eager["epoch_s"]) > 1:  # the epochs after the first, without the compilation
        later = {name: statistics.median(run["epoch_s"][1:]) for name, run in runs.items()}
        result.update(later_epoch_s=later, later_epoch_speedup=later["eager"] / later["compiled"])
        summary += f"; later epochs {later['eager']:.2f} s / {later['compiled']:.2f} s"
    return {**result, "summary": summary}


def compile_run(out_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """One run through kd.engine.run: its final loss and accuracy, every epoch's seconds (train + evaluation), and
    milliseconds per training step (the median epoch after the first, which compiles; the first if it is alone)."""
    cfg = compose_config(*overrides)
    result = engine.run(cfg, out_dir)
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = math.ceil(engine.load_data(cfg.dataset, torch.device("cpu")).num_train / cfg.batch_size)
    train_s = [line["time/train_s"] for line in lines]
    return {"train/loss": result["train/loss"], "test/acc1": result["test/acc1"],
            "epoch_s": [line["time/epoch_s"] for line in lines], "steps_per_epoch": steps,
            "ms_per_step": 1000 * statistics.median(train_s[1:] or train_s) / steps}


# ---------------------------------------------------------------------------------------------------------------


def compose_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def summary_line(name: str, item: dict[str, Any]) -> str:
    """One line: name, status, wall time, and the item's summary (or the first line of its error)."""
    detail = item.get("summary") or (item.get("error") or "").split("\n")[0]
    return f"{name:<14}{item['wall_s']:>7.1f} s  {item['status']}" + (f": {detail}" if detail else "")


def print_summary(report: dict[str, Any]) -> None:
    env = report["environment"]
    print(f"\ngpu_check on {env['device']} ({env['device_name']}), torch {env['torch']}, "
          f"{'quick, ' if report['quick'] else ''}{report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget")
    for name, item in report["items"].items():
        print(summary_line(name, item))


ITEMS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "syncs": check_syncs, "bench": check_bench, "deterministic": check_deterministic,
    "bf16_accuracy": check_bf16_accuracy, "fp16": check_fp16, "compile": check_compile, "fused": check_fused,
}
NEEDS_CUDA = {"syncs"}


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    main()
