"""W&B: runs tagged and named by method, pair and loss option; teacher artifacts that students use; W&B's sweep agent
(its run id, project and the sweep YAML's command); one console line of ours instead of W&B's banners; a resumed
run's newest W&B segment holding every epoch. Checked in the offline run files (tests/support: wandb_records)."""
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import wandb
from hydra import compose, initialize
from omegaconf import OmegaConf
from wandb.sdk.launch.sweeps import utils as sweep_utils

import kd.config  # registers the schema; TAG_MAX_CHARS
import kd.loop
from kd import engine, fileio, teachers, tracking
from support import tree_state, wandb_history, wandb_records, wandb_segments

REPO = Path(__file__).resolve().parents[1]
# Tiny and fast: 16x16 digits, quarter-width CNNs, one thread, one epoch; the teacher trains with the student's
# recipe. A student of width 0.5 makes a second pair.
TINY = ["experiment=quickstart", "teacher_recipe=student", "model@teacher=simple_cnn", "teacher.width=0.25",
        "model@student=simple_cnn", "student.width=0.25", "++dataset.source.image_size=16", "threads=1",
        "profile=false", "epochs=1"]
PLAIN = ["phase=student", "loss=ce", "teacher_checkpoint=none"]  # no teacher: the cheapest complete run
AGENT = {"WANDB_SWEEP_ID": "sweep123", "WANDB_RUN_ID": "agentrun1", "WANDB_PROJECT": "kd-sweep",
         "WANDB_ENTITY": "lab"}


def compose_cfg(tmp: Path, *overrides: str):
    with initialize(version_base="1.3", config_path="../conf"):
        return compose("config", overrides=[*TINY, f"teacher_store={tmp / 'teachers'}", *overrides])


def run_record(segment: Path):
    (record,) = [r.run for r in wandb_records(segment) if r.HasField("run")]
    return record


def artifacts(segment: Path) -> list:
    return [r.artifact for r in wandb_records(segment) if r.HasField("artifact")]


class Lines(logging.Handler):
    """Collects the messages of kd.tracking's logger."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def offline_sweep(tmp_path_factory):
    """A teacher run, then three student jobs of a sweep folder (offline W&B): KD and FitNet from the store's teacher,
    and KD of a wider student from a copy of that teacher outside the store (a teacher from elsewhere)."""
    tmp = tmp_path_factory.mktemp("offline_sweep")
    lines, logger = Lines(), logging.getLogger("kd.tracking")
    level = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        on = ["logger.mode=offline"]
        teacher = engine.run(compose_cfg(tmp, "phase=teacher", *on), tmp / "teacher", choices={"loss": "kd"})
        foreign = tmp / "elsewhere" / "teacher.pt"
        foreign.parent.mkdir()
        shutil.copyfile(teacher["teacher_checkpoint"], foreign)
        sweep = tmp / "sweep"
        sweep.mkdir()
        (sweep / "sweep.json").write_text("{}")  # what kd.sweep.SweepChecks writes before a sweep's first job
        jobs = {"loss=kd,student.width=0.25": ("kd", []), "loss=fitnet,student.width=0.25": ("fitnet", []),
                "loss=kd,student.width=0.5": ("kd", ["student.width=0.5", f"teacher_checkpoint={foreign}"])}
        for folder, (loss, extra) in jobs.items():
            cfg = compose_cfg(tmp, "phase=student", f"loss={loss}", *on, *extra)
            engine.run(cfg, sweep / folder, choices={"loss": loss})
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    return tmp, Path(teacher["teacher_checkpoint"]), foreign, lines.lines


def test_sweep_runs_carry_distinct_method_and_pair_tags(offline_sweep):
    tmp, _, _, _ = offline_sweep
    runs = {job.name: run_record(wandb_segments(job)[-1]) for job in (tmp / "sweep").iterdir() if job.is_dir()}
    tags = {name: set(run.tags) for name, run in runs.items()}
    assert tags["loss=kd,student.width=0.25"] >= {"method:KD", "pair:simple_cnn x0.25 -> simple_cnn x0.25",
                                                  "loss:kd", "phase:student", "dataset:digits"}
    assert tags["loss=fitnet,student.width=0.25"] >= {"method:FitNet", "pair:simple_cnn x0.25 -> simple_cnn x0.25",
                                                      "loss:fitnet"}
    assert tags["loss=kd,student.width=0.5"] >= {"method:KD", "pair:simple_cnn x0.25 -> simple_cnn x0.5", "loss:kd"}
    # Named by method, pair and seed, then the keys the sweep varies (its job folder's name).
    assert runs["loss=fitnet,student.width=0.25"].display_name == (
        "FitNet simple_cnn x0.25 -> simple_cnn x0.25 s0 loss=fitnet,student.width=0.25")
    teacher = run_record(wandb_segments(tmp / "teacher")[-1])
    assert set(teacher.tags) == {"dataset:digits", "phase:teacher", "method:teacher (CE)", "teacher:simple_cnn"}
    assert teacher.display_name == "teacher (CE) simple_cnn x0.25 s0" and teacher.job_type == "teacher"


def test_student_runs_use_their_teachers_artifact(offline_sweep):
    """The teacher run logs its stored weights as a model artifact (a reference to the file, not a copy); a student
    of the store's teacher declares that same artifact (same name and digest) as its input, and a student of a
    teacher from elsewhere one named by that file's sha256."""
    tmp, stored, foreign, _ = offline_sweep
    (logged,) = artifacts(wandb_segments(tmp / "teacher")[-1])
    sha256 = teachers.read_manifest(stored.parent)["sha256"]
    assert (logged.name, logged.type, logged.use_after_commit) == (stored.parent.parent.name, "model", False)
    assert [(e.path, e.ref) for e in logged.manifest.contents] == [("teacher.pt", stored.resolve().as_uri())]
    assert json.loads(logged.metadata) == {"sha256": sha256, "source": "store", "path": str(stored.resolve()),
                                           "store_version": "v1"}
    for job in ("loss=kd,student.width=0.25", "loss=fitnet,student.width=0.25"):
        (used,) = artifacts(wandb_segments(tmp / "sweep" / job)[-1])
        assert (used.name, used.digest, used.type) == (logged.name, logged.digest, "model")
        assert used.use_after_commit and used.user_created  # what run.use_artifact records, written offline
    (used,) = artifacts(wandb_segments(tmp / "sweep" / "loss=kd,student.width=0.5")[-1])
    foreign_sha256 = fileio.sha256_file(foreign)
    assert used.name == f"teacher-simple_cnn-x0.25-{foreign_sha256[:12]}" and used.use_after_commit
    assert [e.ref for e in used.manifest.contents] == [foreign.resolve().as_uri()]
    assert json.loads(used.metadata)["sha256"] == foreign_sha256


def test_one_console_line_per_run_and_one_per_offline_sweep(offline_sweep):
    tmp, _, _, lines = offline_sweep
    assert lines == [
        f"W&B offline run 'teacher (CE) simple_cnn x0.25 s0': upload it with `wandb sync {tmp / 'teacher'}/wandb/"
        "offline-run-*`",
        f"W&B offline runs, one per job: upload the sweep's with `wandb sync {tmp / 'sweep'}/*/wandb/offline-run-*`",
    ]


def test_resumed_run_newest_wandb_segment_holds_every_epoch(tmp_path, monkeypatch, capfd):
    """A run stopped in epoch 2 and rerun: its W&B run has two offline segments, and the newest logs epoch 1 again
    (from metrics.jsonl) before epoch 2, so `wandb sync` of the segments gives the whole history. W&B prints nothing:
    the console gets one line of ours per process."""
    class Stop(Exception):
        pass

    def stop_in_epoch_2(job, context, batch, _real=kd.loop.train_step):
        if context.epoch == 2:
            raise Stop
        return _real(job, context, batch)

    cfg, run = compose_cfg(tmp_path, *PLAIN, "epochs=2", "logger.mode=offline"), tmp_path / "run"
    monkeypatch.setattr(kd.loop, "train_step", stop_in_epoch_2)
    with pytest.raises(Stop):
        engine.run(cfg, run)
    monkeypatch.undo()
    time.sleep(max(0.0, 1.05 - time.time() % 1))  # a segment's folder is named by the second it starts in
    engine.run(cfg, run)
    first, newest = wandb_segments(run)
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["_step"] for row in wandb_history(first)] == [1]
    history = wandb_history(newest)
    assert [row["_step"] for row in history] == [1, 2]
    for key in ("train/loss", "test/acc1", "lr"):
        assert [row[key] for row in history] == [m[key] for m in epochs]
    printed = capfd.readouterr()
    assert "wandb:" not in printed.out + printed.err


@pytest.fixture
def agent_env(monkeypatch):
    """The variables `wandb agent` sets for a run it starts; W&B's process-wide state, which reads them when W&B
    first starts in a process, is reset before and after."""
    wandb.teardown()
    for name, value in AGENT.items():
        monkeypatch.setenv(name, value)
    yield AGENT
    wandb.teardown()


def test_a_run_started_by_the_sweep_agent_logs_under_its_run_id_and_project(tmp_path, agent_env):
    run = tmp_path / "run"
    engine.run(compose_cfg(tmp_path, *PLAIN, "logger.mode=offline", "logger.project=ours"), run)
    assert json.loads((run / "run.json").read_text())["wandb_id"] == agent_env["WANDB_RUN_ID"]
    (segment,) = wandb_segments(run)
    assert segment.parent.name.endswith(f"-{agent_env['WANDB_RUN_ID']}")
    record = run_record(segment)
    assert (record.run_id, record.project, record.entity) == ("agentrun1", "kd-sweep", "lab")


def agent_command(sweep_yaml: Path, values: dict) -> list[str]:
    """The command `wandb agent` runs for a run with these values, built by W&B's own functions as the agent does."""
    config = sweep_utils.load_sweep_config(str(sweep_yaml))
    command = sweep_utils.create_sweep_command(config["command"])
    macros = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    macros.update(env=["/usr/bin/env"], interpreter=["python"], program=[config["program"]])
    return [part for item in command for part in (macros[item[2:-1]] if item in {f"${{{k}}}" for k in macros}
                                                   else [item])]


def test_the_wandb_sweep_yaml_runs_train_py_with_hydra_overrides_in_a_folder_per_agent_run(monkeypatch):
    for name, value in AGENT.items():
        monkeypatch.setenv(name, value)
    command = agent_command(REPO / "wandb_sweep.yaml", {"loss": "fitnet", "seed": 1})
    assert command[:3] == ["/usr/bin/env", "python", "train.py"] and command[-2:] == ["loss=fitnet", "seed=1"]
    with initialize(version_base="1.3", config_path="../conf"):
        cfg = compose("config", overrides=command[3:], return_hydra_config=True)
    assert cfg.hydra.run.dir == "outputs/wandb_sweep/sweep123/agentrun1"
    assert (cfg.phase.value, cfg.seed, cfg.loss.fitnet._target_) == ("student", 1, "kd.methods.fitnet.FitNetLoss")
    assert (cfg.logger.mode, cfg.dataset.val_fraction, cfg.train_missing_teacher) == ("online", 0.1, True)


@pytest.mark.slow
def test_train_py_under_the_agents_command_and_variables_logs_to_the_agents_run(tmp_path):
    """A real process, as `wandb agent` starts it: W&B reads the agent's variables when it starts in a process, so
    only a fresh one shows what an agent's run gets. The YAML's command (offline here), tiny, from tmp_path."""
    command = agent_command(REPO / "wandb_sweep.yaml", {"loss": "kd", "seed": 0})
    command = [sys.executable, str(REPO / "train.py"), *[a for a in command[3:] if not a.startswith("logger.mode=")]]
    command += [*TINY, "logger.mode=offline"]
    proc = subprocess.run(command, cwd=tmp_path, env={**os.environ, **AGENT}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "outputs" / "wandb_sweep" / "sweep123" / "agentrun1"
    assert json.loads((run / "run.json").read_text())["wandb_id"] == "agentrun1"
    (segment,) = wandb_segments(run)
    record = run_record(segment)
    assert (record.run_id, record.project, record.sweep_id) == ("agentrun1", "kd-sweep", "sweep123")
    assert {"method:KD", "loss:kd", "phase:student"} <= set(record.tags)
    assert "wandb:" not in proc.stdout + proc.stderr


def test_tags_fit_wandbs_limit_and_names_follow_the_job(tmp_path):
    long = "vit_base_patch16_224.augreg2_in21k_ft_in1k_and_a_long_suffix"
    cfgs = [compose_cfg(tmp_path, "phase=student", "model@teacher=timm", f"teacher.name={long}{i}") for i in (1, 2)]
    tags = [tracking.run_tags(cfg, {"loss": "kd"}) for cfg in cfgs]
    assert all(1 <= len(tag) <= kd.config.TAG_MAX_CHARS for tag in tags[0] + tags[1])
    pairs = [next(tag for tag in run if tag.startswith("pair:")) for run in tags]
    assert pairs[0] != pairs[1]  # cut to 64 characters, still distinct (a hash of the whole)
    cfg = compose_cfg(tmp_path, "phase=student", "student.width=0.5", "seed=3")
    assert tracking.run_name(cfg, tmp_path / "12-00-00_digits") == "KD simple_cnn x0.25 -> simple_cnn x0.5 s3"
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "sweep.json").write_text("{}")
    job = tmp_path / "sweep" / "loss.alpha=0.5,seed=3"
    assert tracking.run_name(cfg, job) == "KD simple_cnn x0.25 -> simple_cnn x0.5 s3 loss.alpha=0.5"
    named = compose_cfg(tmp_path, "phase=student", "logger.name=mine")
    assert tracking.run_name(named, job) == "mine"


def test_every_loss_option_tags_its_own_method(tmp_path):
    """The W&B tags of the conf/loss options: each its own method (12 of 17 were `loss:Combined` once) and its name."""
    options = sorted(path.stem for path in (REPO / "conf" / "loss").glob("*.yaml"))
    methods = set()
    with initialize(version_base="1.3", config_path="../conf"):
        for option in options:
            tags = tracking.run_tags(compose("config", overrides=["phase=student", f"loss={option}"]), {"loss": option})
            assert f"loss:{option}" in tags
            methods.add(next(tag for tag in tags if tag.startswith("method:")))
    assert len(methods) == len(options)


def test_a_tag_wandb_would_refuse_is_refused_before_any_work(tmp_path):
    tag = "x" * 65
    cfg = compose_cfg(tmp_path, *PLAIN, "logger.mode=disabled", f"logger.tags=[ok,{tag}]")
    before = tree_state(tmp_path)
    with pytest.raises(ValueError, match=rf"logger.tags has '{tag}', 65 characters: W&B takes tags of 1 to 64"):
        engine.run(cfg, tmp_path / "run")
    assert tree_state(tmp_path) == before and not (tmp_path / "run").exists()
    assert OmegaConf.to_container(cfg.logger.tags) == ["ok", tag]
