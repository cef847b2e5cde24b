"""Student-phase training throughput on this device, in one run: a reference loop vs this repository's engine.

    python -m tools.bench [--teacher resnet56 --student resnet20 --batch-size 64] [--json PATH] [--sweep-jobs 8]
    python -m tools.bench --data --folder DIR [--make-from IMAGE_FOLDER]   # decode speed: tools/bench_data.py
    python -m tools.bench --topk TEACHER.pt [overrides]   # the top-k teacher cache's error: tools/bench_topk.py
    python -m tools.bench --scan --folder DIR [--make N] [--evict]   # the pre-flight scan's speed: tools/bench_scan.py
    python -m tools.bench --fused [--jobs 8] [overrides]   # a fused sweep vs its jobs in turn: tools/bench_fused.py

(a) reference: the loop the seed document and the common KD repositories write: a CIFAR-style torchvision
    dataset (uint8 array -> PIL image -> RandomCrop/Flip/ToTensor/Normalize per image) in a DataLoader, eager
    fp32, NCHW, teacher under no_grad, SGD.
(b) engine: this repository's training epoch with its defaults (batched augmentation on the device,
    channels_last, precision=auto, teacher under inference_mode), the teacher run live. The teacher cache's
    recording is off: a run's first job writes each epoch's file once, after the epoch, and that disk write is no
    part of training throughput, so no window holds it.
(c) engine with a warm teacher cache: the same epochs, the teacher's logits read from the cache. Each window holds
    what a cached epoch costs: reading its file (checksum verified), one copy to the device, the training steps.
    The cache is filled by an untimed pass over every epoch before the timed rounds, so no window writes a file.
(d) engine evaluation: what every epoch does with its test split (kd.loop.predict: the student in eval mode, forward
    only, eval_batch_size per batch) over the window's images; its images/s is given as a multiple of (b)'s.

Each variant trains on the same random 32x32 images (speed does not depend on their content) for a warm-up
window, then for several timed windows, the variants taking turns window by window (so a slow spell of a shared
machine falls on all of them); each variant's median window gives its images/s and steps/s. A window is one epoch
of --window-steps steps: 10 on the CPU, 100 on CUDA (where a step takes milliseconds, so a window lasts long
enough to time with the host clock). The device is synchronised only at the edges of a window. The matmul ceiling
is the rate of a large matrix product measured here, in the engine's precision, and achieved GFLOP/s counts the
convolutions and matmuls a step really performs: 3x the student's forward (forward + backward) plus the teacher's
forward. On CUDA each variant is also given as a fraction of the device's bf16 matmul peak, measured in the same run.
--sweep-jobs N also times N short student runs of train.py (experiment=quickstart, a multirun over N
temperatures sharing one teacher) with and without the teacher cache, and prints the ratio of their wall times.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

if __package__ in (None, ""):  # python tools/bench.py: kd and tools import from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kd.config  # noqa: F401  (registers the typed root schema)
from kd import datapath, engine, fileio, hardware, loop, profiling, records
from kd.config import Phase
from kd.data import Split
from kd.teacher_cache import TeacherCache
from tools import bench_data, bench_fused, bench_scan, bench_topk

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--data"]:  # decode speed: tools/bench_data.py
        return bench_data.main(argv[1:])
    if argv[:1] == ["--scan"]:  # the pre-flight scan's speed: tools/bench_scan.py
        return bench_scan.main(argv[1:])
    if argv[:1] == ["--topk"]:  # what teacher_cache_topk costs the KD term: tools/bench_topk.py
        return bench_topk.main(argv[1:])
    if argv[:1] == ["--fused"]:  # a fused sweep against its jobs one after another: tools/bench_fused.py
        return bench_fused.main(argv[1:])
    args = parse_args(argv)
    cfg = compose_config(args)
    device = hardware.resolve_device(cfg.device)
    args.window_steps = args.window_steps or WINDOW_STEPS["cuda" if device.type == "cuda" else "cpu"]
    torch.backends.cudnn.benchmark = True
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    images = torch.randint(0, 256, (args.batch_size * args.window_steps, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, args.num_classes, (len(images),), generator=torch.Generator().manual_seed(1))
    amp_dtype = hardware.resolve_precision(cfg.precision, device)
    flops = {role: profiling.forward_flops(instantiate(cfg[role]).to(device), (3, 32, 32), device)
             for role in ("teacher", "student")}
    ceilings = measured_ceilings(device, amp_dtype)
    results = {"device": records.environment(device), "config": {**vars(args), "precision": str(amp_dtype),
                                                                      "eval_batch_size": cfg.eval_batch_size},
               **{f"{name}_gflops": rate / 1e9 for name, rate in ceilings.items()},
               "forward_gflop_per_image": {role: value / 1e9 for role, value in flops.items()}}
    step_flops = {"full": args.batch_size * (3 * flops["student"] + flops["teacher"]),
                  "cached": args.batch_size * 3 * flops["student"], "forward": args.batch_size * flops["student"]}
    seconds = time_variants(cfg, args, images, labels, device)
    for name, flop_kind in VARIANT_FLOPS.items():
        results[name] = variant_figures(statistics.median(seconds[name]) / args.window_steps, args.batch_size,
                                        step_flops[flop_kind], ceilings)
    for name in ("b_engine", "c_engine_cached"):
        results[name]["speedup_vs_reference"] = results[name]["images_per_s"] / results["a_reference"]["images_per_s"]
    results["d_engine_eval"]["vs_training"] = results["d_engine_eval"]["images_per_s"] / results["b_engine"][
        "images_per_s"]
    if args.sweep_jobs:
        results["sweep"] = sweep_ratio(args)
    print_table(results)
    if args.json:
        fileio.write_json(Path(args.json), results)
    return results


# Each timed variant and the FLOPs an image costs it: teacher forward + 3x the student's (forward and backward),
# the student's 3x alone (teacher from the cache), or the student's forward alone (evaluation).
VARIANT_FLOPS = {"a_reference": "full", "b_engine": "full", "c_engine_cached": "cached", "d_engine_eval": "forward"}
# Default steps per timed window (one epoch), on the CPU and on CUDA: a CUDA step takes milliseconds, and a window
# of 100 lasts long enough that the host clock and the synchronisation at its edges are a small part of it.
WINDOW_STEPS = {"cpu": 10, "cuda": 100}


def time_variants(cfg, args, images, labels, device) -> dict[str, list[float]]:
    """Seconds of each variant's timed windows; (c)'s cache is filled by an untimed pass before the first round."""
    with tempfile.TemporaryDirectory() as cache_root:
        live = engine_job(cfg, args, images, labels, device, None)
        variants = {
            "a_reference": reference_window(cfg, args, images, labels, device),
            "b_engine": lambda window: loop.train_one_epoch(live, epoch=window + 1),
            "c_engine_cached": engine_window(engine_job(cfg, args, images, labels, device, Path(cache_root))),
            "d_engine_eval": evaluation_window(live, cfg.eval_batch_size),
        }
        for window in range(args.windows + 1):  # live epochs that store what (c)'s windows will read
            variants["c_engine_cached"](window)
        return timed_rounds(variants, args.windows, device)


def measured_ceilings(device: torch.device, amp_dtype: torch.dtype | None) -> dict[str, float]:
    """FLOP/s ceilings measured here: the matmul rate in the engine's precision, and on CUDA the bf16 matmul peak."""
    ceilings = {"matmul_ceiling": matmul_ceiling(device, amp_dtype or torch.float32)}
    if device.type == "cuda":
        same = amp_dtype == torch.bfloat16
        ceilings["bf16_peak"] = ceilings["matmul_ceiling"] if same else matmul_ceiling(device, torch.bfloat16)
    return ceilings


def variant_figures(step_seconds: float, batch_size: int, step_flops: float, ceilings: dict[str, float]) -> dict:
    """A variant's rates from its median step time: images/s, steps/s, GFLOP/s and fractions of the ceilings."""
    rate = step_flops / step_seconds
    figures = {"images_per_s": batch_size / step_seconds, "steps_per_s": 1 / step_seconds, "gflops": rate / 1e9,
               "fraction_of_ceiling": rate / ceilings["matmul_ceiling"]}
    if "bf16_peak" in ceilings:
        figures["fraction_of_bf16_peak"] = rate / ceilings["bf16_peak"]
    return figures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--window-steps", type=int, help="training steps per timed window (default: 10 on the CPU, "
                        "100 on CUDA)")
    parser.add_argument("--windows", type=int, default=7, help="timed windows (after one warm-up window)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference loop")
    parser.add_argument("--sweep-jobs", type=int, default=0, help="also time an N-job sweep with and without cache")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("overrides", nargs="*", help="config overrides for the engine, e.g. precision=fp32 device=cpu")
    args = parser.parse_args(argv)
    for name in ("batch_size", "window_steps", "windows", "num_classes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def compose_config(args: argparse.Namespace):
    overrides = [f"model@teacher={args.teacher}", f"model@student={args.student}", "phase=student",
                 f"batch_size={args.batch_size}", f"dataset.num_classes={args.num_classes}", *args.overrides]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def timed_rounds(variants: dict[str, Callable[[int], None]], windows: int, device: torch.device) -> dict:
    """Seconds of each variant's timed windows, run in rounds (a, b, c, a, b, c, ...) after one untimed warm-up
    round, so a slow spell of a shared machine falls on every variant alike."""
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for window in range(windows + 1):
        for name, run_window in variants.items():
            profiling.synchronize(device)
            start = time.perf_counter()
            run_window(window)
            profiling.synchronize(device)
            if window > 0:
                seconds[name].append(time.perf_counter() - start)
    return seconds


class ArrayImages(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: a uint8 HWC array -> PIL image -> transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable):
        self.images = images.permute(0, 2, 3, 1).numpy()
        self.labels, self.transform = labels.tolist(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def reference_window(cfg, args, images, labels, device) -> Callable[[int], None]:
    """(a) The usual loop: PIL transforms in a DataLoader, eager fp32 NCHW, teacher under no_grad."""
    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
    loader = DataLoader(ArrayImages(images, labels, transform), batch_size=args.batch_size, shuffle=True,
                        num_workers=args.workers, pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=args.workers > 0)
    torch.manual_seed(0)
    student, teacher = instantiate(cfg.student).to(device), instantiate(cfg.teacher).to(device).eval()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    alpha, temperature = 0.9, 4.0

    def window(_: int) -> None:
        student.train()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.no_grad():
                teacher_logits = teacher(x)
            logits = student(x)
            kl = F.kl_div(F.log_softmax(logits / temperature, 1), F.softmax(teacher_logits / temperature, 1),
                          reduction="batchmean")
            loss = (1 - alpha) * F.cross_entropy(logits, y) + alpha * temperature**2 * kl
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return window


def engine_job(cfg, args, images, labels, device, cache_root: Path | None) -> loop.Job:
    """(b)/(c) The engine's student job with its config's defaults; the images are its training and test splits.
    With cache_root (c), the teacher cache lives there: an epoch's first call stores its teacher logits, later calls
    read them; without it (b), the teacher runs live and nothing is recorded."""
    data = datapath.InMemoryData(Split(images.to(device), labels.to(device)), None,
                                 Split(images, labels).to(device),
                                 *[torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (MEAN, STD)],
                                 crop_padding=4, hflip=True,
                                 channels_last=hardware.use_channels_last(cfg.channels_last, device))
    teacher = instantiate(cfg.teacher)  # build_job freezes it
    job = engine.build_job(cfg, Phase.student, instantiate(cfg.loss), data, device, teacher)
    job.progress_bar = False
    if cfg.teacher_cache and cache_root is not None:
        key = {"bench": [args.teacher, args.student, args.batch_size, args.num_classes, str(job.amp_dtype)]}
        job.cache = TeacherCache(cache_root, key, (len(images), args.num_classes), cfg.teacher_cache_dtype, 1e12)
    return job


def engine_window(job: loop.Job) -> Callable[[int], None]:
    """One training epoch of `job` per window."""
    return lambda window: loop.train_one_epoch(job, epoch=window + 1)


def evaluation_window(job: loop.Job, eval_batch_size: int) -> Callable[[int], None]:
    """(d) The engine's evaluation of the student (loop.predict: forward only, eval mode, eval_batch_size) over the
    window's images, as every epoch evaluates its test split."""
    return lambda window: loop.predict(job.model, job.data, "test", eval_batch_size, job.amp_dtype)


def matmul_ceiling(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large matrix product on this device, the faster of two libraries: torch.mm (BLAS: MKL on the
    CPU, cuBLAS on CUDA) and the same product as a 1x1 convolution (oneDNN on the CPU, cuDNN on CUDA). On this
    repository's AMD test CPU MKL's sgemm reaches only about 60% of what oneDNN's does. On CUDA the product is
    8192 x 8192 (a smaller one leaves an H100-class GPU short of its peak), on random data (zeros run faster), 20
    times per window so that a window lasts tens of milliseconds."""
    n, repeats = (8192, 20) if device.type == "cuda" else (2048, 5)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    rates = [2 * n**3 * repeats / min(timed_rounds({"mm": repeated(lambda: a @ b, repeats)}, 3, device)["mm"])]
    # A (64 * 32 * 32, 512) @ (512, 512) product, written as a 1x1 convolution in NHWC.
    channels = 512
    x = torch.randn(64, channels, 32, 32, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(channels, channels, 1, 1, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    conv_flops = 2 * x.numel() * channels
    conv = {"conv": repeated(lambda: F.conv2d(x, w), repeats)}
    rates.append(conv_flops * repeats / min(timed_rounds(conv, 3, device)["conv"]))
    return max(rates)


def repeated(operation: Callable[[], Any], times: int) -> Callable[[int], None]:
    """A timed window that runs `operation` `times` times."""

    def window(_: int) -> None:
        for _ in range(times):
            operation()

    return window


def sweep_ratio(args: argparse.Namespace) -> dict[str, Any]:
    """Wall time of an N-job train.py multirun (alpha x T, shared teacher) with the teacher cache vs without."""
    temperatures = ",".join(str(t) for t in range(1, args.sweep_jobs + 1))
    with tempfile.TemporaryDirectory() as tmp:
        common = ["experiment=quickstart", f"teacher_store={tmp}/teachers", "logger.mode=disabled", "profile=false"]
        _run(sys.executable, "train.py", *common, "phase=teacher", f"hydra.run.dir={tmp}/teacher")
        wall = {}
        for cache in ("true", "false"):
            start = time.perf_counter()
            _run(sys.executable, "train.py", "-m", *common, "phase=student", "loss.alpha=0.9",
                 f"loss.temperature={temperatures}", f"teacher_cache={cache}",
                 f"teacher_cache_dir={tmp}/cache_{cache}", f"hydra.sweep.dir={tmp}/sweep_{cache}")
            wall[cache] = time.perf_counter() - start
    return {"jobs": args.sweep_jobs, "wall_s_with_cache": wall["true"], "wall_s_without_cache": wall["false"],
            "ratio": wall["true"] / wall["false"]}


def _run(*args: str) -> None:
    proc = subprocess.run([*args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def print_table(results: dict[str, Any]) -> None:
    config = results["config"]
    print(f"{config['teacher']} -> {config['student']}, batch {config['batch_size']}, {config['num_classes']} classes, "
          f"{results['device']['device']} ({results['device']['device_name']}), {results['device']['cpu_threads']} "
          f"threads, engine precision {config['precision']}, {config['window_steps']} steps per window")
    peak = "bf16_peak_gflops" in results
    print(f"matmul ceiling: {results['matmul_ceiling_gflops']:.1f} GFLOP/s"
          + (f", bf16 matmul peak: {results['bf16_peak_gflops']:.1f} GFLOP/s" if peak else ""))
    print(f"{'variant':<18}{'images/s':>10}{'steps/s':>9}{'vs (a)':>8}{'GFLOP/s':>10}{'of ceiling':>12}"
          + (f"{'of bf16 peak':>14}" if peak else ""))
    for name in ("a_reference", "b_engine", "c_engine_cached"):
        r = results[name]
        ratio = r.get("speedup_vs_reference", 1.0)
        line = (f"{name:<18}{r['images_per_s']:>10.1f}{r['steps_per_s']:>9.1f}{ratio:>7.2f}x{r['gflops']:>10.1f}"
                f"{r['fraction_of_ceiling']:>11.0%}")
        print(line + (f"{r['fraction_of_bf16_peak']:>13.1%}" if peak else ""))
    r = results["d_engine_eval"]
    print(f"evaluation (forward only, eval batch {config['eval_batch_size']}): {r['images_per_s']:.1f} images/s, "
          f"{r['vs_training']:.2f}x the engine's training images/s (b)")
    if "sweep" in results:
        s = results["sweep"]
        print(f"sweep of {s['jobs']} students: {s['wall_s_with_cache']:.1f} s with the teacher cache, "
              f"{s['wall_s_without_cache']:.1f} s without: ratio {s['ratio']:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    main()
