"""python -m tools.gpu_check on the CPU: the reduced form (--quick) runs every item that needs no CUDA, at a tiny size,
records the others as skipped with the reason, and writes one JSON; a failing item never stops the others."""
import json
import math
import time
import warnings
from pathlib import Path

import pytest
import torch

from kd import loop
from tools import bench, gpu_check

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_form_on_the_cpu_runs_what_it_can_and_says_why_it_skips_the_rest(tmp_path, monkeypatch):
    # Measuring the matmul ceiling takes about 20 s of this CPU, and tests/test_speed.py measures it already.
    monkeypatch.setattr(bench, "matmul_ceiling", lambda device, dtype: 1e9)
    out = tmp_path / "gpu_check.json"
    returned = gpu_check.main(["--quick", "--device", "cpu", "--out", str(out), "--work-dir", str(tmp_path / "work")])
    report = json.loads(out.read_text())
    items = report["items"]
    assert list(returned["items"]) == list(gpu_check.ITEMS) and set(items) == set(gpu_check.ITEMS)
    assert items["syncs"]["status"] == "skipped: no CUDA device"
    assert items["compile"]["status"].startswith("skipped: --quick without CUDA")
    fp16 = items["fp16"]
    assert fp16["status"] == "pass", fp16
    assert fp16["runs"]["fp16"]["initial_scale"] == 65536.0 and fp16["runs"]["fp32"]["final_scale"] is None
    assert fp16["relative_difference"] <= gpu_check.FP16_TOLERANCE
    for name in ("bench", "deterministic", "bf16_accuracy", "fused"):
        assert items[name]["status"] == "pass", items[name]
        assert items[name]["wall_s"] > 0 and items[name]["summary"]
    assert items["bench"]["bf16_peak"] == "skipped: no CUDA device"
    assert items["bench"]["figures"]["c_engine_cached"]["steps_per_s"] > 0
    fused = items["fused"]["figures"]["quickstart"]
    assert fused["jobs"] == 2 and fused["ratio"] == fused["fused_s"] / fused["sequential_s"] and fused["vmap_s"] > 0
    assert fused["plan"] == {"chunk": fused["plan"]["chunk"], "grouped": True}
    assert items["deterministic"]["differing"] == {} and items["deterministic"]["metrics"]["test/acc1"] >= 0
    bf16 = items["bf16_accuracy"]
    assert bf16["bf16_minus_fp32"]["student_acc1"] == pytest.approx(
        bf16["accuracy"]["bf16"]["student_acc1"] - bf16["accuracy"]["fp32"]["student_acc1"])
    assert report["environment"]["device"] == "cpu" and report["wall_s"] > 0


def test_compile_item_compares_a_compiled_run_with_an_eager_one(tmp_path, monkeypatch):
    """On a CPU inductor's first compile takes minutes: Dynamo's eager backend traces the same graphs in seconds."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real_compile(model, backend="eager"))
    check = gpu_check.Check(torch.device("cpu"), True, tmp_path / "none", tmp_path, 600.0, time.perf_counter())
    result = gpu_check.check_compile(check)
    assert result["status"] == "pass" and set(result["runs"]) == {"eager", "compiled"}
    assert result["reduce_overhead"] == "skipped: CUDA graphs need a CUDA device"
    for run in result["runs"].values():
        assert len(run["epoch_s"]) == 1 and run["epoch_s"][0] > 0
        assert run["steps_per_epoch"] == math.ceil(1438 / 64) and 0 < run["ms_per_step"] < 1000 * run["epoch_s"][0]
    assert result["loss_difference"] == result["runs"]["compiled"]["train/loss"] - result["runs"]["eager"]["train/loss"]


def test_a_failing_item_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    def broken(check):
        raise ValueError("broken on purpose")

    monkeypatch.setattr(gpu_check, "ITEMS", {"broken": broken, "fine": lambda check: {"status": "pass"}})
    out = tmp_path / "report.json"
    gpu_check.main(["--device", "cpu", "--out", str(out), "--items", "broken,fine", "--work-dir", str(tmp_path)])
    items = json.loads(out.read_text())["items"]
    assert items["broken"]["status"] == "fail" and items["broken"]["error"] == "ValueError: broken on purpose"
    assert "raise ValueError" in items["broken"]["traceback"]
    assert items["fine"]["status"] == "pass" and items["fine"]["wall_s"] >= 0


def test_no_item_starts_once_the_budget_is_spent(tmp_path):
    out = tmp_path / "report.json"
    gpu_check.main(["--device", "cpu", "--out", str(out), "--budget-s", "0", "--work-dir", str(tmp_path)])
    items = json.loads(out.read_text())["items"]
    assert set(items) == set(gpu_check.ITEMS)
    assert all(item["status"].startswith("skipped: the time budget") for item in items.values())


def test_unknown_items_are_refused():
    with pytest.raises(SystemExit):
        gpu_check.main(["--items", "syncs,nonsense"])


def test_the_sync_check_covers_every_loss_option():
    assert gpu_check.LOSSES == sorted(p.stem for p in (REPO / "conf" / "loss").glob("*.yaml"))
    assert len(gpu_check.LOSSES) >= 17 and {"kd", "crd", "reviewkd", "fsp"} <= set(gpu_check.LOSSES)


def test_sync_check_passes_clean_steps_and_locates_a_planted_sync(tmp_path, monkeypatch):
    """The syncs item without a GPU, on four of its losses (the others run as these do: tests/test_hot_path.py
    counts every loss's syncs on the CPU): torch.cuda's debug mode is stood in for, and a sync planted in CRD's steps
    raises under "error" and warns under "warn", as c10's check does. Cases: live for each loss, cached where the
    loss reads only the teacher's logits (KD), skipped where it reads features (CRD, AT), none without a teacher."""
    mode, planted = {"now": "default"}, {"on": False}
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda value: mode.update(now=value))
    monkeypatch.setattr(gpu_check, "LOSSES", ["at", "ce", "crd", "kd"])
    real_job, real_optimize = gpu_check.sync_job, loop.optimize
    monkeypatch.setattr(gpu_check, "sync_job", lambda check, loss, *extra: planted.update(on=loss == "crd") or
                        real_job(check, loss, *extra))

    def optimize_and_sync(job, loss):
        real_optimize(job, loss)
        if planted["on"] and mode["now"] == "error":
            raise RuntimeError("called a synchronizing CUDA operation")
        if planted["on"] and mode["now"] == "warn":
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)  # here: the place the check reports

    monkeypatch.setattr(loop, "optimize", optimize_and_sync)
    check = gpu_check.Check(torch.device("cpu"), True, tmp_path / "none", tmp_path, 600.0, time.perf_counter())
    result = gpu_check.check_syncs(check)
    cases = result["cases"]
    steps = math.ceil(gpu_check.QUICK_TRAIN / 64)  # --quick: 200 training images, batch 64
    assert set(cases) == {"at_live", "at_cached", "ce_live", "crd_live", "crd_cached", "kd_live", "kd_cached"}
    clean = {"status": "pass", "steps": steps, "syncs_per_step": 0}
    assert cases["kd_live"] == cases["kd_cached"] == cases["at_live"] == cases["ce_live"] == clean
    assert cases["at_cached"]["status"] == cases["crd_cached"]["status"] == (
        "skipped: the loss reads teacher features; the cache holds logits only")
    crd = cases["crd_live"]
    assert result["status"] == "fail" and crd["status"] == "fail" and crd["failed_step"] == 0
    assert "synchronizing" in crd["error"] and crd["where"].startswith("kd/loop.py:") and "train_step" in crd["where"]
    assert crd["steps"] == steps and crd["syncs_per_step"] == 1
    assert [place.rsplit(":", 1)[0] for place in crd["sync_places"]] == [__file__]
    assert "4 of 7 cases without a sync" in result["summary"] and "failed: crd_live" in result["summary"]
    assert loop.train_step.__module__ == "kd.loop" and mode["now"] == "default"  # put back
