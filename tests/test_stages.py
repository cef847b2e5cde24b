"""The init stage (kd/stages.py) that AB, FSP and FT train before epoch 1: what it trains and records, its optimizer,
exact resume of a run interrupted in it or after it (one real SIGKILL), its refusals with nothing on disk changed,
and a step that never waits for the device. Tiny runs on 16x16 digits (test_reliability.TINY)."""
import json
import logging
import signal
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

import kd.config  # noqa: F401  (registers the schema)
from kd import engine, records, stages
from kd.config import Phase
from support import tree_state
from syncs import SyncCounter
from test_reliability import compose_cfg, launch

pytestmark = pytest.mark.usefixtures("one_thread")

# AB and FT map a resnet8 teacher's stages onto the simple_cnn student's (connectors, translator); FSP needs equal
# widths, so it keeps TINY's simple_cnn teacher.
TEACHERS = {"ab": "model@teacher=resnet8", "ft": "model@teacher=resnet8", "fsp": "model@teacher=simple_cnn"}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """Each teacher model trained for one epoch, by its model option."""
    tmp = tmp_path_factory.mktemp("teachers")
    paths = {}
    for option in sorted(set(TEACHERS.values())):
        result = engine.run(compose_cfg(tmp, "phase=teacher", "epochs=1", option), tmp / option)
        paths[option] = Path(result["teacher_checkpoint"])
    return paths


def student_overrides(teachers: dict[str, Path], loss: str) -> list[str]:
    """One epoch after a 2-epoch init stage, with the loss's teacher."""
    option = TEACHERS[loss]
    return ["phase=student", option, f"teacher_checkpoint={teachers[option]}", f"loss={loss}", "epochs=1",
            f"loss.{loss}.init_epochs=2"]


def student_cfg(tmp: Path, teachers: dict[str, Path], loss: str, *overrides: str):
    return compose_cfg(tmp, *student_overrides(teachers, loss), *overrides)


def lines(path: Path) -> list[dict]:
    """A .jsonl file's records without their wall-clock times."""
    records_ = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records_]


def built_job(tmp_path: Path, loss: str):
    """The job of a student run of `loss` on 200 training images, with an untrained frozen teacher."""
    cfg = compose_cfg(tmp_path, "phase=student", TEACHERS[loss], f"loss={loss}", f"loss.{loss}.init_epochs=2")
    device = torch.device("cpu")
    data = engine.load_data(cfg.dataset, device)
    data.train = data.train.subset(torch.arange(200))
    teacher = instantiate(cfg.teacher)  # build_job freezes it
    return cfg, engine.build_job(cfg, Phase.student, instantiate(cfg.loss), data, device, teacher)


def states(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module, prefix: str = "") -> bool:
    return any(not torch.equal(v, before[k]) for k, v in module.state_dict().items() if k.startswith(prefix))


# (trains the student, the criterion's modules it trains, those it leaves alone, the stage's lr, its term)
TRAINED = {"ab": (True, ["terms.ab.connectors"], [], 0.05, "loss_ab"), "fsp": (True, [], [], 0.05, "loss_fsp"),
           "ft": (False, ["terms.ft.encoder", "terms.ft.decoder"], ["terms.ft.translator"], 0.01,
                  "loss_ft_reconstruction")}


@pytest.mark.parametrize("loss", TRAINED)
def test_the_init_stage_trains_what_its_criterion_names_and_checkpoints_itself(loss, tmp_path):
    cfg, job = built_job(tmp_path, loss)
    trains_student, trained, untouched, lr, term = TRAINED[loss]
    student, criterion, teacher = states(job.model), states(job.criterion), states(job.teacher)
    stages.run_init_stage(job, cfg, tmp_path, None, lambda: engine.checkpoint_payload(job, cfg, None, None, {}))
    assert changed(student, job.model) == trains_student  # BatchNorm statistics too: an FT student does not run
    assert all(changed(criterion, job.criterion, name) for name in trained)
    assert not any(changed(criterion, job.criterion, name) for name in untouched)
    assert not changed(teacher, job.teacher)
    assert job.optimizer.state_dict()["state"] == {}  # the main optimizer is untouched: the stage has its own
    records_ = lines(tmp_path / "init.jsonl")
    assert [r["epoch"] for r in records_] == [1, 2] and all(r["lr"] == lr for r in records_)
    assert all(set(r) == {"epoch", "lr", "init/loss", f"init/{term}"} for r in records_)
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (checkpoint["stage"], checkpoint["epoch"], checkpoint["init"]["epoch"]) == ("init", 0, 2)
    assert checkpoint["init"]["optimizer"]["param_groups"][0]["lr"] == lr


def test_a_run_records_its_init_epochs_apart_and_needs_no_teacher_after_them(teachers, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kd.stages")
    result = engine.run(student_cfg(tmp_path, teachers, "ab"), tmp_path / "run")
    run = tmp_path / "run"
    assert [(r["epoch"], sorted(r)) for r in lines(run / "init.jsonl")] == [
        (e, ["epoch", "init/loss", "init/loss_ab", "lr"]) for e in (1, 2)]
    assert [r["epoch"] for r in lines(run / "metrics.jsonl")] == [1]  # the evaluated epochs alone
    assert "train/loss_ab" not in result and result["train/loss"] == result["train/loss_ce"]  # then CE alone
    assert "teacher/acc1" in result  # the teacher is still checked, and agreement measured
    assert "teacher_cache/hits" not in json.loads((run / "run_info.json").read_text())  # no cache: features
    assert torch.load(run / "last.pt", weights_only=True)["stage"] == "main"
    assert "init epoch 2/2 | loss " in caplog.text


@pytest.fixture(scope="module")
def whole(teachers, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs of AB and FT."""
    tmp = tmp_path_factory.mktemp("whole")
    for loss in ("ab", "ft"):
        engine.run(student_cfg(tmp, teachers, loss), tmp / loss)
    return {loss: tmp / loss for loss in ("ab", "ft")}


# (loss, the function that stops, the call it stops at, the init epochs in last.pt then)
INTERRUPTIONS = {"ft, during its init stage": ("ft", (stages, "train_init_epoch"), 2, 1),
                 "ab, after its init stage": ("ab", (engine, "run_epoch"), 1, 2)}


@pytest.mark.parametrize("case", INTERRUPTIONS)
def test_a_run_interrupted_in_or_after_its_init_stage_resumes_to_the_same_bits(case, teachers, whole, tmp_path,
                                                                            monkeypatch):
    loss, (module, name), stop_at, saved = INTERRUPTIONS[case]
    real = getattr(module, name)

    def stop(job, *args):
        if args[-1] == stop_at:
            raise KeyboardInterrupt
        return real(job, *args)

    monkeypatch.setattr(module, name, stop)
    with pytest.raises(KeyboardInterrupt):
        engine.run(student_cfg(tmp_path, teachers, loss), tmp_path / "run")
    monkeypatch.setattr(module, name, real)
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert (checkpoint["stage"], checkpoint["init"]["epoch"], checkpoint["epoch"]) == ("init", saved, 0)
    torch.manual_seed(12345)  # the resumed run must not depend on the RNG state it starts in
    engine.run(student_cfg(tmp_path, teachers, loss), tmp_path / "run")
    assert same_outcome(tmp_path / "run", whole[loss])


def same_outcome(run: Path, reference: Path) -> bool:
    """result.json equal but for settings that change no result (the teacher store's path), and the same init.jsonl
    and metrics.jsonl lines but for their wall-clock times: floats compared exactly."""
    result, expected = (json.loads((r / "result.json").read_text()) for r in (run, reference))
    assert records.config_differences(result.pop("config"), expected.pop("config"), records.RESULT_NEUTRAL) == []
    assert result == expected
    return all(lines(run / name) == lines(reference / name) for name in ("init.jsonl", "metrics.jsonl"))


@pytest.mark.slow
def test_a_run_killed_in_its_init_stage_resumes_to_the_same_bits(teachers, whole, tmp_path):
    """A real SIGKILL (tests/kill_runner.py) after init epoch 2 was logged and before its last.pt landed: the resumed
    run drops that line, trains init epoch 2 again, then its epoch. A subprocess, as only a killed process shows
    what a kill leaves on disk."""
    killed = launch(tmp_path / "run", *student_overrides(teachers, "ab"), kill_at="before:last.pt:2")
    assert killed.returncode == -signal.SIGKILL, killed.stdout
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert (checkpoint["stage"], checkpoint["init"]["epoch"]) == ("init", 1)
    assert [r["epoch"] for r in lines(tmp_path / "run" / "init.jsonl")] == [1, 2]  # the second line has no last.pt
    engine.run(student_cfg(tmp_path, teachers, "ab"), tmp_path / "run")
    assert same_outcome(tmp_path / "run", whole["ab"])


def refused(cfg, tmp_path: Path, error=ValueError) -> str:
    """engine.run's refusal; nothing under tmp_path changed but the run folder and its lock."""
    def state() -> dict[str, str]:
        return {k: v for k, v in tree_state(tmp_path).items() if k not in ("run", "run/.lock")}

    before = state()
    with pytest.raises(error) as refusal:
        engine.run(cfg, tmp_path / "run")
    assert state() == before and not [p.name for p in (tmp_path / "run").iterdir() if p.name != ".lock"]
    return str(refusal.value)


def test_fsp_with_a_narrower_student_is_refused_before_any_work(teachers, tmp_path):
    message = refused(student_cfg(tmp_path, teachers, "fsp", "student.width=0.125"), tmp_path)
    assert message.startswith("FSP compares the FSP matrices of consecutive layers") and "Use a pair of" in message


def test_init_stage_settings_are_refused_before_any_work(teachers, tmp_path):
    message = refused(student_cfg(tmp_path, teachers, "ab", "loss.ab.init_epochs=0"), tmp_path, Exception)
    assert "AB: init_epochs=0 must be >= 1 (it distils in that stage alone)" in message
    message = refused(student_cfg(tmp_path, teachers, "ft", "loss.ft.init_lr=-1"), tmp_path, Exception)
    assert "FT: init_lr=-1 must be > 0, or null for the optimizer's lr" in message
    message = refused(student_cfg(tmp_path, teachers, "ab", "teacher_checkpoint=none"), tmp_path)
    assert message.startswith("the loss needs a teacher but teacher_checkpoint=none")  # the init stage reads it


def test_a_diverging_init_stage_stops_without_a_checkpoint(teachers, tmp_path):
    cfg = student_cfg(tmp_path, teachers, "fsp", "loss.fsp.init_lr=1e30")
    with pytest.raises(FloatingPointError, match=r"non-finite init-stage loss at init epoch 1, step \d+: stopped; no "
                                                 r"checkpoint was written\. Lower the stage's learning rate"):
        engine.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "init.jsonl").exists()


@pytest.mark.parametrize("loss", ["ab", "ft"])
def test_an_init_step_never_waits_for_the_device(loss, tmp_path, monkeypatch):
    cfg, job = built_job(tmp_path, loss)
    found, real = [], stages.init_step

    def counted(*args):
        with SyncCounter() as syncs:
            result = real(*args)
        found.append(dict(syncs.found))
        return result

    monkeypatch.setattr(stages, "init_step", counted)
    init = stages.InitRun(job.criterion.init_stage(), *stages.init_optimizer(job, cfg, job.criterion.init_stage()))
    stages.train_init_epoch(job, init, 1)
    assert found == [{}] * 4, found  # 200 images: 3 batches of 64 and a short one
