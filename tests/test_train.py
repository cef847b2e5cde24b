"""End to end: teacher then student through train.py and through kd.engine.run, on real (tiny) data."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize
from hydra.utils import instantiate

import kd.config  # noqa: F401  (registers the schema)
from kd import engine, fileio, loop, teachers
from support import wandb_history, wandb_records, wandb_segments

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10"
# Small models keep the suite fast; the pipeline is the same for every pair.
TINY = ["experiment=quickstart", "teacher_recipe=student", "model@teacher=resnet8", "model@student=simple_cnn",
        "student.width=0.25"]


def compose_cfg(tmp_path: Path, *overrides: str):
    store = f"teacher_store={tmp_path / 'teachers'}"
    with initialize(version_base="1.3", config_path="../conf"):
        return compose("config", overrides=[*TINY, "epochs=2", "logger.mode=disabled", store, *overrides])


def train_py(tmp_path: Path, run_dir: str, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "train.py", *TINY, "epochs=2", f"teacher_store={tmp_path / 'teachers'}"]
    args += [f"hydra.run.dir={tmp_path / run_dir}", *overrides]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A real teacher run, then a student run from the store, through train.py (W&B offline)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    teacher = train_py(tmp, "teacher", "phase=teacher", "logger.mode=offline")
    assert teacher.returncode == 0, teacher.stderr
    student = train_py(tmp, "student", "phase=student", "logger.mode=offline")
    assert student.returncode == 0, student.stderr
    return tmp


def test_teacher_run_records_and_store(pipeline):
    result = json.loads((pipeline / "teacher" / "result.json").read_text())
    assert result["phase"] == "teacher" and result["epochs"] == 2
    (entry,) = (pipeline / "teachers").iterdir()
    (version,) = teachers.versions(entry)
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["sha256"] == fileio.sha256_file(version / "teacher.pt")
    assert manifest["result"]["test/acc1"] == result["test/acc1"]
    assert manifest["identity"]["teacher"]["_target_"].endswith(".resnet8")
    assert manifest["classes"] == [str(d) for d in range(10)]
    assert result["teacher_checkpoint"] == str(version / "teacher.pt")


def test_student_run_records(pipeline):
    run = pipeline / "student"
    result = json.loads((run / "result.json").read_text())
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in epochs] == [1, 2]
    for key in ("train/loss", "train/loss_ce", "train/loss_kd", "test/acc1", "test/acc5", "test/agreement", "lr"):
        assert all(key in m for m in epochs), key
    for m in epochs:
        assert m["train/loss"] == pytest.approx(m["train/loss_ce"] + m["train/loss_kd"], rel=1e-5)
    assert result["test/acc1"] == epochs[-1]["test/acc1"]
    best = max(epochs, key=lambda m: m["test/acc1"])
    assert (result["best_epoch"], result["test/acc1_best"]) == (best["epoch"], best["test/acc1"])
    teacher_result = json.loads((pipeline / "teacher" / "result.json").read_text())
    assert result["teacher/acc1"] == pytest.approx(teacher_result["test/acc1"])
    student = instantiate(json_cfg(result)["student"])
    assert result["params"] == sum(p.numel() for p in student.parameters())
    assert result["flops_per_image"] > 0 and result["config"]["loss"]["alpha"] == 0.9
    (entry,) = (pipeline / "teachers").iterdir()
    assert result["teacher/sha256"] == fileio.sha256_file(entry / "v1" / "teacher.pt")
    assert result["teacher/source"] == "store"
    info = json.loads((run / "run_info.json").read_text())
    assert info["wall_time_s"] > 0 and info["env"]["torch"] == torch.__version__
    record = json.loads((run / "run.json").read_text())
    assert record["config"] == result["config"] and "phase=student" in record["overrides"]
    assert not (run / ".hydra").exists()  # Hydra's copies are off: run.json is the record
    assert "epoch 2/2" in (run / "train.log").read_text()


def json_cfg(result: dict):
    from omegaconf import OmegaConf

    return OmegaConf.create(result["config"])


def test_checkpoints_carry_weights_and_config(pipeline):
    for name in ("last.pt", "best.pt"):
        payload = torch.load(pipeline / "student" / name, weights_only=True)
        assert payload["arch"]["_target_"].endswith(".simple_cnn") and payload["config"]["phase"] == "student"
        model = instantiate(payload["arch"])
        model.load_state_dict(payload["model"])
    assert torch.load(pipeline / "student" / "last.pt", weights_only=True)["epoch"] == 2


def test_wandb_offline_run_read_back(pipeline):
    """The metrics logged to W&B, read back from the offline run files, are the ones in metrics.jsonl."""
    run = pipeline / "student"
    (segment,) = wandb_segments(run)
    logged, history = wandb_records(segment), wandb_history(segment)
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["test/acc1"] for h in history] == pytest.approx([m["test/acc1"] for m in epochs])
    assert [h["train/loss_kd"] for h in history] == pytest.approx([m["train/loss_kd"] for m in epochs])
    (run_record,) = [r.run for r in logged if r.HasField("run")]
    assert run_record.job_type == "student" and {"loss:kd", "method:KD"} <= set(run_record.tags)
    config = {i.key: json.loads(i.value_json) for i in run_record.config.update}
    assert config["loss"]["alpha"] == 0.9 and config["student"]["width"] == 0.25
    result = json.loads((run / "result.json").read_text())
    assert config["teacher/sha256"] == result["teacher/sha256"] and config["teacher/source"] == "store"
    assert run_record.run_id == json.loads((run / "run.json").read_text())["wandb_id"]


def test_missing_teacher_names_the_command(tmp_path):
    proc = train_py(tmp_path, "student", "phase=student", "logger.mode=disabled", "loss.alpha=0.5")
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error: no trained teacher") and "Traceback" not in proc.stderr  # the message alone
    command = proc.stderr.split("Train it first:\n", 1)[1].splitlines()[0].strip()
    assert command.startswith("python train.py phase=teacher seed=0 experiment=quickstart")
    assert "loss.alpha" not in command and "student.width" not in command
    assert not (tmp_path / "student" / "result.json").exists()
    # The printed command really trains the teacher the student needs.
    argv = [sys.executable, *command.split()[1:], f"hydra.run.dir={tmp_path / 'teacher'}", "logger.mode=disabled"]
    assert subprocess.run(argv, cwd=REPO, capture_output=True, timeout=300).returncode == 0
    proc = train_py(tmp_path, "student2", "phase=student", "logger.mode=disabled", "loss.alpha=0.5")
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    result = engine.run(compose_cfg(tmp, "phase=teacher"), tmp / "run")
    return Path(result["teacher_checkpoint"])


def test_teacher_gets_no_gradients_and_stays_frozen(teacher_ckpt, tmp_path):
    cfg = compose_cfg(tmp_path, "phase=student", f"teacher_checkpoint={teacher_ckpt}")
    data = engine.load_data(cfg.dataset, torch.device("cpu"))
    teacher = teachers.build(teachers.read(teacher_ckpt, cfg.teacher), cfg.teacher, torch.device("cpu"))
    job = engine.build_job(cfg, kd.config.Phase.student, instantiate(cfg.loss), data, torch.device("cpu"), teacher)
    before = {k: v.clone() for k, v in job.teacher.state_dict().items()}
    student_before = [p.clone() for p in job.model.parameters()]
    loop.train_one_epoch(job, epoch=1)
    assert all(p.grad is None and not p.requires_grad for p in job.teacher.parameters())
    assert not job.teacher.training
    assert all(torch.equal(before[k], v) for k, v in job.teacher.state_dict().items())  # BN stats too
    assert any(not torch.equal(a, b) for a, b in zip(student_before, job.model.parameters()))


def test_student_without_teacher_and_determinism(tmp_path):
    cfg = compose_cfg(tmp_path, "phase=student", "loss=ce", "teacher_checkpoint=none")
    first = engine.run(cfg, tmp_path / "a")
    second = engine.run(cfg, tmp_path / "b")
    assert "teacher/acc1" not in first and "test/agreement" not in first
    keys = [k for k in first if k.startswith(("train/", "test/"))]
    assert {k: first[k] for k in keys} == {k: second[k] for k in keys}


def test_teacher_checkpoint_of_another_architecture_is_refused(teacher_ckpt, tmp_path):
    cfg = compose_cfg(tmp_path, "phase=student", f"teacher_checkpoint={teacher_ckpt}", "model@teacher=resnet14")
    with pytest.raises(ValueError, match=r"does not match the teacher config \(_target_: checkpoint .*resnet8"):
        engine.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "result.json").exists()


def test_teacher_whose_accuracy_disagrees_with_its_record_is_refused(teacher_ckpt, tmp_path):
    payload = torch.load(teacher_ckpt, weights_only=True)
    payload["metrics"]["test/acc1"] += 5.0  # as if trained on other data or with another normalization
    moved = tmp_path / "teacher.pt"
    torch.save(payload, moved)
    cfg = compose_cfg(tmp_path, "phase=student", f"teacher_checkpoint={moved}")
    with pytest.raises(ValueError, match="wrong checkpoint, dataset or normalization"):
        engine.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "result.json").exists()


def test_validation_split_selects_the_best_epoch(tmp_path):
    cfg = compose_cfg(tmp_path, "phase=teacher", "dataset.val_fraction=0.2")
    result = engine.run(cfg, tmp_path / "run")
    assert result["best_selected_by"] == "val/acc1" and "val/acc1_best" in result
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best = max(epochs, key=lambda m: m["val/acc1"])
    assert result["test/acc1_best"] == best["test/acc1"]


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason="../shared/data/cifar10 is not here")
def test_imagefolder_run_on_a_slice_of_cifar10(tmp_path):
    cfg = compose_cfg(
        tmp_path, "phase=teacher", "dataset=imagefolder", f"dataset.source.root={SHARED_CIFAR10}",
        "dataset.source.max_per_class=20", "epochs=1",
    )
    result = engine.run(cfg, tmp_path / "run")
    assert result["config"]["dataset"]["name"] == "imagefolder" and 0 <= result["test/acc1"] <= 100
    assert (tmp_path / "run" / "result.json").is_file()


def test_trained_student_serves_as_teacher_by_path(pipeline, tmp_path):
    """Teacher-assistant chains: a student's checkpoint is a teacher when the teacher node names its model."""
    student_ckpt = pipeline / "student" / "last.pt"
    cfg = compose_cfg(
        tmp_path, "phase=student", f"teacher_checkpoint={student_ckpt}", "model@teacher=simple_cnn",
        "teacher.width=0.25", "model@student=resnet8", "student.width=0.25", "epochs=1",
    )
    result = engine.run(cfg, tmp_path / "run")
    recorded = torch.load(student_ckpt, weights_only=True)["metrics"]["test/acc1"]
    assert result["teacher/acc1"] == pytest.approx(recorded) and "test/agreement" in result


LOSS_OPTIONS = sorted(p.stem for p in (REPO / "conf" / "loss").glob("*.yaml"))
# The methods with an init stage (kd.stages) train one init epoch of their 30 here; FSP compares FSP matrices, so its
# student is as wide as the teacher.
OPTION_OVERRIDES = {"ab": ["loss.ab.init_epochs=1"], "ft": ["loss.ft.init_epochs=1"],
                    "fsp": ["loss.fsp.init_epochs=1", "student.width=1"]}


@pytest.mark.parametrize("loss", LOSS_OPTIONS)
def test_every_method_trains_a_student_end_to_end(teacher_ckpt, tmp_path, loss):
    """One short student run per loss option on digits: finite terms, logged separately, summing to the loss."""
    cfg = compose_cfg(tmp_path, "phase=student", f"teacher_checkpoint={teacher_ckpt}", f"loss={loss}", "epochs=1",
                      "model@student=resnet8", "student.width=0.25", "profile=false", "threads=1",
                      *OPTION_OVERRIDES.get(loss, []))
    result = engine.run(cfg, tmp_path / "run")
    terms = {k: v for k, v in result.items() if k.startswith("train/loss_")}
    assert terms and all(math.isfinite(v) for v in terms.values())
    assert sum(terms.values()) == pytest.approx(result["train/loss"], rel=1e-5)
    assert 0 <= result["test/acc1"] <= 100
    criterion = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["criterion"]
    buffers = ("memory_student", "memory_teacher", "normalizers", "running_mean", "running_var", "num_batches_tracked")
    adapters = sum(v.numel() for k, v in criterion.items() if not k.endswith(buffers))
    assert result["adapter_params"] == adapters  # regressors and embeddings, counted and checkpointed


@pytest.mark.parametrize("loss", ["fitnet", "crd_kd", "reviewkd"])
def test_interrupted_feature_method_resumes_to_the_same_bits(teacher_ckpt, tmp_path, monkeypatch, loss):
    """Adapters (with ReviewKD's BatchNorm statistics), their optimizer state and CRD's memory banks come back from
    last.pt; CRD's negatives are keyed by (seed, epoch, step), so the resumed epochs draw the same ones."""
    overrides = ["phase=student", f"teacher_checkpoint={teacher_ckpt}", f"loss={loss}", "epochs=2",
                 "model@student=resnet8", "student.width=0.25", "profile=false", "threads=1"]
    engine.run(compose_cfg(tmp_path, *overrides), tmp_path / "whole")
    real_run_epoch = engine.run_epoch

    def stop_at_epoch_two(job, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_run_epoch(job, epoch)

    monkeypatch.setattr(engine, "run_epoch", stop_at_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        engine.run(compose_cfg(tmp_path, *overrides), tmp_path / "resumed")
    monkeypatch.setattr(engine, "run_epoch", real_run_epoch)
    torch.manual_seed(12345)  # the resumed run must not depend on the RNG state it starts in
    engine.run(compose_cfg(tmp_path, *overrides), tmp_path / "resumed")
    assert json.loads((tmp_path / "resumed" / "run_info.json").read_text())["resumed_from_epoch"] == 1
    # result.json is a function of config, code and data alone: the same bytes, interrupted or not.
    assert (tmp_path / "resumed" / "result.json").read_bytes() == (tmp_path / "whole" / "result.json").read_bytes()
