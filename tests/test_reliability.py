"""Reliability: a killed run resumes to the same bits, a finished run or sweep job is not redone, corrupt and
unsafe checkpoints are refused, parallel jobs train a missing teacher once, bad input fails before any work, a
W&B outage never stops training, and deterministic=true keeps results repeatable.

The process tests (marked slow) kill real processes with SIGKILL through tests/support/kill_runner.py; support.forked
forks them from a server that imported torch, Hydra, W&B and kd once.
"""
import ast
import json
import os
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from filelock import FileLock
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf.errors import OmegaConfBaseException

import kd.config  # noqa: F401  (registers the schema)
from kd import engine, fileio, hardware, records, teachers
from support import forked, wandb_history, wandb_segments
from support.runs import PLAIN, REPO, command, compose_cfg, epochs_logged, launch, no_data, outcome

# ---------------------------------------------------------------------------------------------------------------
# exact resume (processes killed with SIGKILL)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = launch(run, *PLAIN)
    assert proc.returncode == 0, proc.stdout
    return run


# KD_KILL_AT for tests/support/kill_runner.py -> (epoch of last.pt when killed, epochs in metrics.jsonl when killed)
KILL_POINTS = {
    "mid-epoch": ("step:2:5", 1, [1]),  # before step 5 of epoch 2
    "after-checkpoint": ("after:last.pt:2", 2, [1, 2]),  # right after epoch 2's last.pt landed
    "before-checkpoint": ("before:last.pt:2", 1, [1, 2]),  # epoch 2 logged, its last.pt not written: a line to drop
}


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_run_resumes_to_the_same_bits(point, uninterrupted, tmp_path):
    kill_at, saved_epoch, logged = KILL_POINTS[point]
    run, overrides = tmp_path / "run", [*PLAIN, "logger.mode=offline"]
    killed = launch(run, *overrides, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stdout
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == saved_epoch and epochs_logged(run) == logged
    assert not (run / "result.json").exists()

    resumed = launch(run, *overrides)
    assert resumed.returncode == 0, resumed.stdout
    assert f"resuming {run} after epoch {saved_epoch} of 3" in resumed.stdout
    assert outcome(run) == outcome(uninterrupted)  # bit for bit: floats compared exactly
    resumed, whole = (json.loads((r / "result.json").read_text()) for r in (run, uninterrupted))
    # Only settings that change no result differ (the killed run logs offline, to check its W&B run; store paths).
    assert records.config_differences(resumed.pop("config"), whole.pop("config"), records.RESULT_NEUTRAL) == []
    assert resumed == whole
    assert json.loads((run / "run_info.json").read_text())["resumed_from_epoch"] == saved_epoch
    # The resumed process logged into the same W&B run: every offline run folder carries run.json's id.
    runs = sorted((run / "wandb").glob("offline-run-*"))
    wandb_id = json.loads((run / "run.json").read_text())["wandb_id"]
    assert len(runs) == 2 and {p.name.rsplit("-", 1)[1] for p in runs} == {wandb_id}
    # Its newest segment logged the epochs before the kill again: a sync of the segments gives the whole history.
    assert [row["_step"] for row in wandb_history(wandb_segments(run)[-1])] == [1, 2, 3]


@pytest.mark.slow
def test_relaunched_sweep_skips_finished_jobs_resumes_the_killed_one_and_runs_the_rest(tmp_path):
    sweep, args = tmp_path / "sweep", [*PLAIN, "epochs=2", "seed=0,1,2"]
    # The basic launcher runs the jobs one after another in one process: its 4th epoch is job 1's second.
    killed = launch(sweep, *args, multirun=True, kill_at="step:4:3")
    assert killed.returncode == -signal.SIGKILL, killed.stdout
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2 and (jobs[0] / "result.json").is_file() and not (jobs[1] / "result.json").exists()
    first_result = (jobs[0] / "result.json").read_bytes()

    relaunched = launch(sweep, *args, multirun=True)
    assert relaunched.returncode == 0, relaunched.stdout
    assert relaunched.stdout.count("already holds this run's result.json") == 1  # job 0
    assert relaunched.stdout.count("after epoch 1 of 2") == 1  # job 1
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())  # Hydra names job folders the same on every launch
    assert [json.loads((job / "result.json").read_text())["config"]["seed"] for job in jobs] == [0, 1, 2]
    assert (jobs[0] / "result.json").read_bytes() == first_result
    assert all(epochs_logged(job) == [1, 2] for job in jobs)


# ---------------------------------------------------------------------------------------------------------------
# finished runs, other configs, corrupt checkpoints (in-process)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("finished")
    engine.run(compose_cfg(tmp, *PLAIN, "epochs=2"), tmp / "run")
    return tmp / "run"


def copy_run(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


def test_finished_run_is_returned_without_training(finished, tmp_path, monkeypatch):
    run = copy_run(finished, tmp_path)
    monkeypatch.setattr(engine, "load_data", no_data)
    # Settings that change nothing a run computes may differ (here the store, logger, device, eval batch).
    cfg = compose_cfg(tmp_path, *PLAIN, "epochs=2", "logger.mode=offline", "device=cpu", "eval_batch_size=7")
    assert engine.run(cfg, run) == json.loads((run / "result.json").read_text())
    assert (run / "result.json").read_bytes() == (finished / "result.json").read_bytes()


def test_run_folder_of_another_config_is_refused(finished, tmp_path, monkeypatch):
    run = copy_run(finished, tmp_path)
    monkeypatch.setattr(engine, "load_data", no_data)
    cfg = compose_cfg(tmp_path, *PLAIN, "epochs=2", "seed=1", "optimizer.lr=0.1")
    named = (r"written by another config \(recorded -> now: optimizer.lr: 0.05 -> 0.1; seed: 0 -> 1; "
             r"teacher_recipe.optimizer.lr: 0.05 -> 0.1\)")  # the teacher shares the student's recipe (TINY)
    with pytest.raises(ValueError, match=r"run\.json was " + named):
        engine.run(cfg, run)
    (run / "run.json").unlink()  # as a run of an earlier version left it: result.json decides
    with pytest.raises(ValueError, match=r"result\.json was " + named):
        engine.run(cfg, run)
    (run / "result.json").unlink()  # an interrupted run: last.pt decides
    with pytest.raises(ValueError, match=r"last\.pt was " + named):
        engine.run(cfg, run)
    assert (run / "last.pt").read_bytes() == (finished / "last.pt").read_bytes()


def test_truncated_or_incomplete_last_pt_is_refused_not_loaded(finished, tmp_path, monkeypatch):
    run = copy_run(finished, tmp_path)
    (run / "result.json").unlink()
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(engine, "load_data", no_data)
    cfg = compose_cfg(tmp_path, *PLAIN, "epochs=2")
    with pytest.raises(fileio.UnusableCheckpoint, match=r"cannot resume: .*last\.pt is not a readable checkpoint"
                       r".*truncated, corrupt.*Delete it to start this run over"):
        engine.run(cfg, run)
    assert (run / "last.pt").read_bytes() == data[: len(data) // 2]  # left as it was, for inspection
    assert epochs_logged(run) == [1, 2]
    payload = torch.load(finished / "last.pt", weights_only=True)
    del payload["rng"]  # e.g. written by an older version of this repository
    torch.save(payload, run / "last.pt")
    with pytest.raises(fileio.UnusableCheckpoint, match=r"last\.pt lacks rng"):
        engine.run(cfg, run)


# ---------------------------------------------------------------------------------------------------------------
# concurrency


@pytest.mark.slow
def test_parallel_students_train_their_missing_teacher_once(tmp_path):
    store = tmp_path / "teachers"
    # A wider teacher trains for a few seconds: long enough for the second job to find it in training.
    overrides = ["phase=student", "loss=kd", "epochs=3", "teacher.width=1", "train_missing_teacher=true"]
    procs = [forked.start(command(tmp_path / name, *overrides), REPO) for name in ("a", "b")]
    done = [proc.wait(timeout=300) for proc in procs]
    outputs = [proc.stdout for proc in done]
    assert [proc.returncode for proc in done] == [0, 0], outputs
    trained = [out.count("training the missing teacher") for out in outputs]
    assert sorted(trained) == [0, 1]
    assert "another job is training or filing this teacher" in outputs[trained.index(0)]  # it waited on the lock
    (entry,) = [p for p in store.iterdir() if p.is_dir()]
    assert sorted(p.name for p in entry.iterdir()) == [".lock", "v1"]
    assert sorted(p.name for p in (entry / "v1").iterdir()) == ["manifest.json", "run", "teacher.pt"]
    results = [json.loads((tmp_path / name / "result.json").read_text()) for name in ("a", "b")]
    assert {r["teacher_checkpoint"] for r in results} == {str(entry / "v1" / "teacher.pt")}
    # The two students train side by side: which of the teacher's epochs the second finds stored by the first depends
    # on timing, and the bits do not (each epoch is read from the cache or computed by the teacher, never both).
    infos = [json.loads((tmp_path / name / "run_info.json").read_text()) for name in ("a", "b")]
    assert [info["teacher_cache/hits"] + info["teacher_cache/misses"] for info in infos] == [3, 3]
    assert results[0]["test/acc1"] == results[1]["test/acc1"] and results[0]["train/loss"] == results[1]["train/loss"]
    # A later student of the same teacher reads every epoch the two stored.
    later = launch(tmp_path / "c", *overrides)
    assert later.returncode == 0 and "training the missing teacher" not in later.stdout, later.stdout
    assert json.loads((tmp_path / "c" / "run_info.json").read_text())["teacher_cache/hits"] == 3


def test_teacher_phase_files_into_the_store_under_its_lock(tmp_path):
    cfg = compose_cfg(tmp_path, "phase=teacher", "teacher_lock_timeout_s=0.2")
    entry, model, metrics = teachers.entry_dir(cfg, cfg.seed), instantiate(cfg.teacher), {"test/acc1": 0.0}
    data = SimpleNamespace(classes=["a", "b"], train_digest=lambda: "0" * 64)  # what the manifest records of the data
    entry.mkdir(parents=True)
    with FileLock(entry / ".lock"):  # as if another job were filing this teacher
        with pytest.raises(TimeoutError, match="another job is still training this teacher"):
            teachers.save_to_store(cfg, model, metrics, tmp_path, data)
    assert teachers.newest_complete(entry) is None
    with teachers.store_lock(entry, 0.2):  # the on-demand path holds the lock already: no wait on itself
        teachers.save_to_store(cfg, model, metrics, tmp_path, data)
    assert (entry / "v1" / "manifest.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# bad input: refused before any work, with a message naming the problem, nothing half-written


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, str]:
    """Teacher checkpoints and image folders that are wrong in one way each."""
    tmp = tmp_path_factory.mktemp("bad")
    for name, arch in {
        "other_arch": {"_target_": "kd.models.cifar_resnet.resnet8", "num_classes": 10, "width": 1.0},
        "other_classes": {"_target_": "kd.models.simple_cnn.simple_cnn", "num_classes": 100, "width": 0.25},
    }.items():
        payload = {"model": instantiate(arch).state_dict(), "arch": arch, "metrics": {"test/acc1": 50.0}}
        torch.save(payload, tmp / f"{name}.pt")
    data = (tmp / "other_arch.pt").read_bytes()
    (tmp / "truncated.pt").write_bytes(data[: len(data) // 3])
    (tmp / "empty_root").mkdir()
    for part, classes in (("train", "ab"), ("test", "ac")):
        for name in classes:
            (tmp / "classes_differ" / part / name).mkdir(parents=True)
    return {"tmp": str(tmp)}


STUDENT = ["phase=student", "loss=kd"]
IMAGEFOLDER = ["dataset=imagefolder", "dataset.source.max_per_class=2"]
# (overrides, message pattern, refused before any data is loaded)
BAD_RUNS = {
    "alpha-above-1": ([*STUDENT, "loss.alpha=1.5"], r"loss\.alpha=1\.5 is outside \[0, 1\]", True),
    "alpha-negative": ([*STUDENT, "loss.alpha=-0.1"], r"loss\.alpha=-0\.1 is outside \[0, 1\]", True),
    "temperature-zero": ([*STUDENT, "loss.temperature=0"], r"loss\.temperature=0 must be > 0", True),
    "temperature-negative": ([*STUDENT, "loss.temperature=-2"], r"loss\.temperature=-2 must be > 0", True),
    "student-width-zero": (["student.width=0"], r"student\.width=0\.0: the width multiplier must be > 0", True),
    "teacher-width-negative": (["teacher.width=-1"], r"teacher\.width=-1\.0: the width multiplier must be > 0", True),
    "width-nan": (["student.width=nan"], r"student\.width=nan: NaN and infinite values are refused", True),
    "epochs-zero": (["epochs=0"], r"epochs=0: need at least 1", True),
    "batch-size-zero": (["batch_size=0"], r"batch_size=0, eval_batch_size=512: need at least 1", True),
    "eval-batch-size-zero": (["eval_batch_size=0"], r"eval_batch_size=0: need at least 1", True),
    "val-fraction-one": (["dataset.val_fraction=1.0"], r"dataset\.val_fraction=1\.0: must be in \[0, 1\)", True),
    "wandb-timeout": (["logger.init_timeout_s=0"], r"logger\.init_timeout_s=0\.0: must be > 0", True),
    "teacher-cache-dtype": (
        ["teacher_cache_dtype=float64"], r"teacher_cache_dtype=float64: must be one of float32, bfloat16, float16", True
    ),
    "dkd-beta-negative": (
        [*STUDENT, "loss=dkd", "loss.beta=-1"], r"loss\.beta=-1 is negative: loss weights must be >= 0", True
    ),
    "crd-no-negatives": ([*STUDENT, "loss=crd", "loss.crd.num_negatives=0"], r"num_negatives=0 must be >= 1", True),
    "missing-teacher-file": ([*STUDENT, "teacher_checkpoint={tmp}/nowhere.pt"], r"nowhere\.pt: no such file", True),
    "teacher-of-another-architecture": (
        [*STUDENT, "teacher_checkpoint={tmp}/other_arch.pt"],
        r"does not match the teacher config \(_target_: checkpoint 'kd\.models\.cifar_resnet\.resnet8' vs config "
        r"'kd\.models\.simple_cnn\.simple_cnn'", True,
    ),
    "teacher-of-another-class-count": (
        [*STUDENT, "teacher_checkpoint={tmp}/other_classes.pt"],
        r"does not match the teacher config \(num_classes: checkpoint 100 vs config 10\)", True,
    ),
    "truncated-teacher": (
        [*STUDENT, "teacher_checkpoint={tmp}/truncated.pt"], r"truncated\.pt is not a readable checkpoint", True
    ),
    "kd-without-teacher": ([*STUDENT, "teacher_checkpoint=none"], r"needs a teacher but teacher_checkpoint=none", True),
    "teacher-not-in-store": (STUDENT, r"no trained teacher for this config .*Train it first", True),
    "dataset-root-missing": (
        [*IMAGEFOLDER, "dataset.source.root={tmp}/nowhere"],
        r"nowhere/train does not exist: dataset\.source\.root must hold train/<class>/", False,
    ),
    "dataset-root-empty": ([*IMAGEFOLDER, "dataset.source.root={tmp}/empty_root"], r"empty_root/train does not", False),
    "imagefolder-classes-differ": (
        [*IMAGEFOLDER, "dataset.source.root={tmp}/classes_differ"],
        r"train and test hold different classes \(only in train: \['b'\], only in test: \['c'\]\)", False,
    ),
    "num-classes-wrong": (["dataset.num_classes=5"], r"data has 10 classes: set dataset\.num_classes=10", False),
    "loss-diverges": (
        ["optimizer.lr=1e30"],
        r"non-finite training loss at epoch 1, step \d+: stopped; no checkpoint was written", False,
    ),
}
# Refused by Hydra and the typed schema at composition: (override, words the message must contain)
BAD_COMPOSITIONS = {
    "unknown-model": ("model@student=resnet9000", ["Could not find 'model/resnet9000'", "\tresnet20\n", "\twrn_40_2"]),
    "unknown-dataset": ("dataset=mnist", ["Could not find 'dataset/mnist'", "\tdigits\n", "\timagefolder"]),
    "unknown-loss": ("loss=hkd", ["Could not find 'loss/hkd'", "Available options in 'loss':", "\tce\n", "\tkd\n"]),
    "unknown-optimizer": ("optimizer=adam", ["Could not find 'optimizer/adam'", "\tadamw\n\tsgd"]),
    "unknown-scheduler": ("scheduler=step", ["Could not find 'scheduler/step'", "\tcosine\n\tmultistep\n\tnone"]),
    "misspelt-key": ("epoch=3", ["Could not override 'epoch'"]),
    "wrong-type": ("epochs=abc", ["epochs=abc", "Value 'abc' of type 'str' could not be converted to Integer"]),
    "unknown-phase": ("phase=distill", ["Invalid value 'distill', expected one of [teacher, student]"]),
    "logger-mode": ("logger.mode=loud", ["Invalid value 'loud', expected one of [online, offline, disabled]"]),
    "precision": ("precision=fp8", ["Invalid value 'fp8', expected one of [auto, fp32, bf16, fp16]"]),
}


@pytest.mark.parametrize("case", [*BAD_RUNS, *BAD_COMPOSITIONS])
def test_bad_input_is_refused_before_any_work(case, bad_files, tmp_path, monkeypatch):
    if case in BAD_COMPOSITIONS:
        override, words = BAD_COMPOSITIONS[case]
        with pytest.raises((HydraException, OmegaConfBaseException)) as error:
            compose_cfg(tmp_path, override)
        message = f"{error.value}\n{error.value.__cause__}"
        assert all(word in message for word in words), message
        return
    overrides, pattern, before_data = BAD_RUNS[case]
    if before_data:
        monkeypatch.setattr(engine, "load_data", no_data)
    cfg = compose_cfg(tmp_path, *[o.format(**bad_files) for o in overrides])
    with pytest.raises(Exception, match=pattern):
        engine.run(cfg, tmp_path / "run")
    written = {p.name for p in (tmp_path / "run").glob("*")}
    assert not written & {"result.json", "last.pt", "best.pt", "metrics.jsonl"}, written
    assert not list((tmp_path / "teachers").glob("*/manifest.json"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # A fine first epoch, then the schedule multiplies the lr by 1e30: the loss diverges in epoch 2.
    diverging = ["scheduler=multistep", "scheduler.milestones=[1]", "scheduler.gamma=1e30"]
    cfg = compose_cfg(tmp_path, *PLAIN, *diverging)
    with pytest.raises(FloatingPointError, match=r"at epoch 2, step \d+: stopped; the last checkpoint is from epoch 1"):
        engine.run(cfg, tmp_path / "run")
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1
    assert epochs_logged(tmp_path / "run") == [1] and not (tmp_path / "run" / "result.json").exists()


@pytest.mark.slow
def test_command_line_lists_the_valid_options_of_an_unknown_name(tmp_path):
    proc = launch(tmp_path / "run", "model@student=resnet9000")
    assert proc.returncode != 0
    assert "Could not find 'model/resnet9000'" in proc.stdout and "\tresnet20\n" in proc.stdout
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------
# security


class WritesMarker:
    """Unpickling this runs open(marker, "w"): what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_checkpoint_that_runs_code_when_unpickled_is_refused(tmp_path, monkeypatch):
    probe, marker = tmp_path / "probe", tmp_path / "pwned"
    torch.save({"model": WritesMarker(probe)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.exists()  # the crafted file really does run code under a plain torch.load
    evil = tmp_path / "evil.pt"
    torch.save({"model": WritesMarker(marker), "arch": {}, "metrics": {}}, evil)
    monkeypatch.setattr(engine, "load_data", no_data)
    cfg = compose_cfg(tmp_path, "phase=student", f"teacher_checkpoint={evil}")
    with pytest.raises(fileio.UnusableCheckpoint, match="holds objects other than tensors and plain values"):
        engine.run(cfg, tmp_path / "run")
    (tmp_path / "resume").mkdir()
    shutil.copy(evil, tmp_path / "resume" / "last.pt")
    with pytest.raises(fileio.UnusableCheckpoint, match="cannot resume"):
        engine.run(compose_cfg(tmp_path, *PLAIN), tmp_path / "resume")
    assert not marker.exists()


SOURCES = [REPO / "train.py", *sorted((REPO / "kd").rglob("*.py"))]


def calls(path: Path) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)]


def test_every_torch_load_is_weights_only():
    loads = [(path, call) for path in SOURCES for call in calls(path) if ast.unparse(call.func) == "torch.load"]
    assert loads
    for path, call in loads:
        assert any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in call.keywords), path


def test_no_config_value_reaches_a_shell():
    for path in SOURCES:
        for call in calls(path):
            name = ast.unparse(call.func)
            assert name not in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"), path
            if name.startswith("subprocess."):
                assert not any(k.arg == "shell" for k in call.keywords), path
                assert isinstance(call.args[0], ast.List), f"{path}: a command string instead of an argument list"


# ---------------------------------------------------------------------------------------------------------------
# W&B outages


@pytest.mark.slow
@pytest.mark.parametrize("api_key", [None, "local-" + "0" * 40], ids=["no-credentials", "unreachable-server"])
def test_wandb_online_outage_falls_back_to_offline(api_key, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    home = tmp_path / "home"  # no ~/.netrc, no stored W&B settings
    env.update(HOME=str(home), WANDB_CONFIG_DIR=str(home / ".config" / "wandb"), WANDB_BASE_URL="http://127.0.0.1:9")
    if api_key:
        env["WANDB_API_KEY"] = api_key
    started = time.monotonic()
    proc = launch(tmp_path / "run", *PLAIN, "epochs=1", "logger.mode=online", "logger.init_timeout_s=3", env=env)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.count("W&B online start failed") == 1 and "logging offline instead" in proc.stdout
    assert (tmp_path / "run" / "result.json").is_file() and list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert elapsed < 60, elapsed


# ---------------------------------------------------------------------------------------------------------------
# determinism


def test_deterministic_flag_sets_the_switches_and_changes_no_cpu_result(tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        strict = engine.run(compose_cfg(tmp_path, *PLAIN, "epochs=1", "deterministic=true"), tmp_path / "strict")
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()  # a missing kernel raises, never warns
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        default = engine.run(compose_cfg(tmp_path, *PLAIN, "epochs=1"), tmp_path / "default")
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    finally:
        hardware.configure_determinism(False)
        torch.backends.cudnn.benchmark = False
    keys = [k for k in strict if k.startswith(("train/", "test/"))]
    assert keys and {k: strict[k] for k in keys} == {k: default[k] for k in keys}
