"""What teacher_cache_topk costs a KD run: the KD term from the k largest teacher logits (the rest given zero
probability, the k renormalised, as the cache stores them) against the term from the full logits, on real images.

    python -m tools.bench --topk TEACHER.pt [overrides ...] [--student STUDENT.pt] [--k 1 2 5] [--temperature 1 4]

The overrides compose the run's config (the teacher and student nodes, the dataset), as train.py would. The split is
the test split's evaluation views. Printed per (T, k): the teacher probability mass at T that lies outside the top k
(what renormalisation moves onto the k), and the KD term T^2 KL(p_t || q_s) averaged over the split, with its
relative error against the full logits. Without --student, the student is the student node freshly initialised (the
start of training, where the KD term is largest).
"""
import argparse
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import kd.config  # noqa: F401  (registers the typed root schema)
from kd import engine, hardware, loop, teachers
from kd.methods.kd import kd_divergence
from kd.teacher_cache import EpochOutputs

REPO = Path(__file__).resolve().parent.parent


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m tools.bench --topk", description=__doc__.split("\n\n")[0])
    parser.add_argument("teacher", type=Path, help="the teacher's checkpoint (any format kd.teachers reads)")
    parser.add_argument("--student", type=Path, help="a student checkpoint (default: a fresh student)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 5])
    parser.add_argument("--temperature", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. experiment=quickstart")
    args = parser.parse_args(argv)
    if min(args.k) < 1:
        parser.error(f"--k {min(args.k)}: k must be at least 1")  # before any model or image is loaded
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["phase=student", *args.overrides])
    device = hardware.resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    data = engine.load_data(cfg.dataset, device)
    teacher = teachers.build(teachers.read(args.teacher, cfg.teacher), cfg.teacher, device)
    student = (teachers.build(teachers.read(args.student, cfg.student), cfg.student, device) if args.student
               else instantiate(cfg.student).to(device))
    with torch.inference_mode():
        teacher_logits = loop.predict(teacher, data, "test", cfg.eval_batch_size)
        student_logits = loop.predict(student, data, "test", cfg.eval_batch_size)
    n, classes = teacher_logits.shape
    rows = []
    for temperature in args.temperature:
        full = kd_divergence(student_logits, teacher_logits, temperature).item()
        for k in sorted(set(args.k)):
            if k > classes:
                parser.error(f"--k {k}: must be at most the {classes} classes")
            stored = EpochOutputs.empty(n, classes, k, device)
            stored.write(slice(0, n), teacher_logits)
            approx = stored.rows(slice(0, n))
            probs = torch.softmax(teacher_logits / temperature, dim=1)
            outside = 1 - probs.topk(k, dim=1).values.sum(1).mean().item()
            term = kd_divergence(student_logits, approx, temperature).item()
            rows.append({"T": temperature, "k": k, "mass_outside_top_k": outside, "kd_full": full,
                         "kd_top_k": term, "relative_error": abs(term - full) / full})
    print(f"{n} test images, {classes} classes; KD term T^2 KL(p_t || q_s), batch mean")
    print("| T | k | teacher mass outside top k | KD term, full logits | KD term, top k | relative error |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['T']:g} | {r['k']} | {r['mass_outside_top_k']:.4f} | {r['kd_full']:.4f} | {r['kd_top_k']:.4f} | "
              f"{100 * r['relative_error']:.2f}% |")
    return {"images": n, "classes": classes, "rows": rows}
