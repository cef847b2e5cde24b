"""What a run tells the person who launched it (issue 19, items 4-6): run_name gives a lasting folder, so rerunning
the same command resumes; a run logs the command that resumes it, and Ctrl-C ends it with one line naming that
command (exit status 130, last.pt intact); a missing teacher's message lists the stored teachers of its dataset and
model with the settings that differ and the overrides that select each; without a terminal, plain progress lines
with img/s and the ETA; a start line; the counts, best configuration and report command at the end of a multirun.

train.py runs in this process through runpy, as `python train.py ARGS` runs it (Hydra parses the arguments, runs the
callbacks, prints the errors); Ctrl-C is a KeyboardInterrupt raised from the training step, where the signal's
handler raises it in a real process (one subprocess test sends a real SIGINT).
"""
import json
import logging
import re
import shlex
import signal
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize
from hydra.utils import instantiate
from omegaconf import OmegaConf

import kd.config  # noqa: F401  (registers the schema)
from kd import engine, feedback, fileio, loop, records, teachers
from kd.config import Phase, check_config
from kd.methods.base import CELoss
from kd.sweep import SweepChecks
from support import tree_state
from support.runs import LABELS_ONLY as TINY
from support.runs import compose_cfg, train_in_process
from support.syncs import SyncCounter

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "train.py")
ARGS = [*TINY, "teacher_store=teachers", "epochs=2"]


def interrupt_at(monkeypatch, epoch: int, folders: dict) -> None:
    """Ctrl-C in the first training step of `epoch`: the folder's state at that moment goes into folders["state"]."""
    real_step = loop.train_step

    def step(job, context, batch):
        if context.epoch == epoch:
            folders["state"] = tree_state(folders["run"]())
            raise KeyboardInterrupt
        real_step(job, context, batch)

    monkeypatch.setattr(loop, "train_step", step)


def resumed_from(run: Path) -> int:
    return json.loads((run / "run_info.json").read_text())["resumed_from_epoch"]


def replay(command: str) -> int:
    """Run a printed `python train.py ...` command (in this process)."""
    python, script, *argv = shlex.split(command)
    assert (python, script) == ("python", TRAIN)
    return train_in_process(argv)


# ---------------------------------------------------------------------------------------------------------------
# 4. resume by rerunning the same command; Ctrl-C is one line


def test_run_name_gives_a_lasting_folder_and_ctrl_c_names_the_same_command_which_resumes(tmp_path, capsys,
                                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "outputs" / "runs" / "my_run"
    argv = [*ARGS, "run_name=my_run"]
    command = shlex.join(["python", TRAIN, *argv])
    at_interrupt = {"run": lambda: run}
    with monkeypatch.context() as patch:
        interrupt_at(patch, 2, at_interrupt)
        assert train_in_process(argv) == 130
    out, err = capsys.readouterr()
    assert f"resume with: {command}\n" in out  # on start
    assert err == f"interrupted after epoch 1 of 2; resume with: {command}\n"  # the one line, no traceback
    assert tree_state(run) == at_interrupt["state"]  # Ctrl-C wrote, changed and deleted nothing
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1 and not (run / "result.json").exists()
    assert replay(command) == 0
    assert resumed_from(run) == 1 and sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["runs"]


def test_ctrl_c_in_a_folder_named_by_the_time_names_it_in_the_command_that_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = lambda: [p for p in (tmp_path / "outputs" / "student").glob("*/*")]  # noqa: E731
    at_interrupt = {"run": lambda: runs()[0]}
    with monkeypatch.context() as patch:
        interrupt_at(patch, 2, at_interrupt)
        assert train_in_process(ARGS) == 130
    [run] = runs()
    folder = run.relative_to(tmp_path)
    command = shlex.join(["python", TRAIN, *ARGS, f"hydra.run.dir={folder}"])
    out, err = capsys.readouterr()
    assert f"resume with: {command}\n" in out
    assert err == f"interrupted after epoch 1 of 2; resume with: {command}\n"
    assert tree_state(run) == at_interrupt["state"]
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # keeps the traceback
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        interrupt_at(patch, 2, at_interrupt)
        replay(command)
    assert tree_state(run) == at_interrupt["state"] and len(runs()) == 1
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    assert replay(command) == 0 and resumed_from(run) == 1 and runs() == [run]


def test_ctrl_c_in_a_sweep_stops_it_with_one_line_and_the_relaunch_resumes_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["-m", *ARGS, "seed=0,1", "dataset.val_fraction=0.2"]
    sweeps = lambda: list((tmp_path / "outputs" / "multirun").glob("*/*"))  # noqa: E731
    at_interrupt = {"run": lambda: sweeps()[0]}
    with monkeypatch.context() as patch:
        interrupt_at(patch, 2, at_interrupt)
        assert train_in_process(argv) == 130
    [sweep] = sweeps()
    command = shlex.join(["python", TRAIN, *argv, f"hydra.sweep.dir={sweep.relative_to(tmp_path)}"])
    out, err = capsys.readouterr()
    assert err == f"interrupted job seed=0 after epoch 1 of 2: the sweep stopped; relaunch it with: {command}\n"
    assert tree_state(sweep) == at_interrupt["state"] and not (sweep / "seed=1").exists()  # job 1 never started
    assert replay(command) == 0
    assert resumed_from(sweep / "seed=0") == 1 and resumed_from(sweep / "seed=1") is None
    val = [json.loads((sweep / f"seed={s}" / "result.json").read_text())["val/acc1"] for s in (0, 1)]
    summary = [line.split(" - ", 1)[1] for line in capsys.readouterr().out.splitlines() if "[kd.sweep]" in line]
    assert summary == [f"sweep {sweep.relative_to(tmp_path)}: 2 finished",
                       f"best: the sweep has one configuration (val/acc1 {sum(val) / 2:.2f}, mean of 2 runs)",
                       f"report: python -m kd.report {sweep.relative_to(tmp_path)}"]


def test_ctrl_c_before_the_run_starts_is_one_line_too(tmp_path, capsys, monkeypatch):
    def interrupted(self, config, **kwargs):  # while Hydra starts the run, before train.py's main
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(SweepChecks, "on_run_start", interrupted)
    assert train_in_process(ARGS) == 130
    assert capsys.readouterr().err == "interrupted\n"


@pytest.mark.slow
def test_a_real_sigint_ends_the_run_with_one_line_and_status_130(tmp_path):
    """A subprocess: only a real process shows what the signal does wherever it lands (inside torch, a log write)."""
    args = [sys.executable, TRAIN, *TINY, f"teacher_store={tmp_path / 'teachers'}", "epochs=50",
            f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "epoch 2/50 |" in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    done = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"]
    command = shlex.join(["python", TRAIN, *args[2:]])
    assert (proc.returncode, err) == (130, f"interrupted after epoch {done} of 50; resume with: {command}\n")
    assert done >= 1 and not (tmp_path / "run" / "result.json").exists()


def test_run_name_names_the_folders_of_runs_and_sweeps_and_changes_no_result(tmp_path):
    with initialize(version_base="1.3", config_path="../conf"):
        named = compose("config", overrides=["run_name=table_3"], return_hydra_config=True)
        timed = compose("config", overrides=["phase=student"], return_hydra_config=True)
    assert (named.hydra.run.dir, named.hydra.sweep.dir) == ("outputs/runs/table_3", "outputs/multirun/table_3")
    assert re.fullmatch(r"outputs/student/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d_cifar100", timed.hydra.run.dir)
    assert re.fullmatch(r"outputs/multirun/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", timed.hydra.sweep.dir)
    # a run resumed with hydra.run.dir instead of run_name, or shown otherwise, is the same run
    assert records.config_differences({"run_name": "a", "progress_every_s": 5.0}, {"run_name": None},
                                      records.RESULT_NEUTRAL) == []


# ---------------------------------------------------------------------------------------------------------------
# 5. a teacher lookup that helps


def file_teacher(cfg, seed: int = 0) -> Path:
    """File an untrained teacher of cfg's identity (at `seed`) in the store, as a teacher phase would."""
    cfg = teachers.teacher_config(cfg)
    cfg.seed = seed
    data = SimpleNamespace(classes=[str(i) for i in range(10)], train_digest=lambda: "digest")
    result = {"test/acc1": 50.0 + seed}
    return teachers.save_to_store(cfg, instantiate(cfg.teacher), result, Path("run"), data)


def test_missing_teacher_lists_the_stored_teachers_that_differ_and_the_overrides_that_select_each(tmp_path):
    base = ["phase=student", "teacher_recipe=quickstart"]  # 12 epochs, SGD lr 0.05
    short = file_teacher(compose_cfg(tmp_path, *base, "teacher_recipe.epochs=3"))
    for seed in range(1, 7):
        file_teacher(compose_cfg(tmp_path, *base), seed)
    file_teacher(compose_cfg(tmp_path, *base, "model@teacher=resnet8"))  # another model: not listed
    asked = [*base, "teacher_recipe.optimizer.lr=0.1"]
    cfg = compose_cfg(tmp_path, *asked)
    store = tree_state(tmp_path)
    with pytest.raises(teachers.MissingTeacher) as missing:
        teachers.resolve(cfg, True, asked)
    lines = str(missing.value).splitlines()
    assert lines[3] == "The store holds 7 other teachers of simple_cnn on digits (closest first; add the overrides " \
                       "to use one):"
    assert lines[4:6] == [
        f"  {short.parent} (test/acc1 50.00): teacher_recipe.epochs: 3 stored, 12 asked; "
        "teacher_recipe.optimizer.lr: 0.05 stored, 0.1 asked",
        "    teacher_recipe.epochs=3 teacher_recipe.optimizer.lr=0.05"]
    assert lines[6].endswith("(test/acc1 51.00): seed: 1 stored, 0 asked; teacher_recipe.optimizer.lr: 0.05 stored, "
                             "0.1 asked")
    assert lines[7] == "    teacher_seed=1 teacher_recipe.optimizer.lr=0.05"
    assert len(lines) == 4 + 2 * teachers.MAX_ALTERNATIVES + 1  # bounded: 5 of the 7
    assert lines[-1] == f"  ... and 2 more in {tmp_path / 'teachers'}"
    assert tree_state(tmp_path) == store  # the lookup only read the store
    selected = compose_cfg(tmp_path, *asked, *lines[5].split())
    assert teachers.resolve(selected, True, []) == short  # the printed overrides select that teacher


def test_a_missing_teacher_with_nothing_of_its_model_stored_says_only_how_to_train_it(tmp_path):
    file_teacher(compose_cfg(tmp_path, "phase=student", "model@teacher=resnet8"))
    with pytest.raises(teachers.MissingTeacher) as missing:
        teachers.resolve(compose_cfg(tmp_path, "phase=student"), True, ["phase=student"])
    assert str(missing.value).splitlines()[-1] == ("or pass teacher_checkpoint=PATH, or train_missing_teacher=true to "
                                                   "train it on demand.")


@pytest.mark.parametrize("value, written", [
    (None, "null"), (True, "true"), (3, "3"), (1e-05, "1e-05"), ("resnet8", "resnet8"), ("true", "'true'"),
    ("a b", "'a b'"), ("it's", "'it\\'s'"), ([0.9, 0.999], "[0.9,0.999]"), ("kd.models.resnet8", "kd.models.resnet8"),
])
def test_stored_values_are_written_as_hydra_reads_them(value, written):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert teachers.override_value(value) == written
    parsed = OverridesParser.create().parse_override(f"key={written}").value()
    assert (list(parsed) if isinstance(parsed, list) else parsed) == value


# ---------------------------------------------------------------------------------------------------------------
# 6. feedback outside a terminal


def job_for(tmp_path: Path, *overrides: str) -> loop.Job:
    """A CE student job on 200 16x16 digits, batch 64: 4 steps an epoch."""
    cfg = compose_cfg(tmp_path, "phase=student", "loss=ce", "teacher_checkpoint=none", "batch_size=64", *overrides)
    data = engine.load_data(cfg.dataset, torch.device("cpu"))
    data.train = data.train.subset(torch.arange(200))
    return engine.build_job(cfg, Phase.student, CELoss(), data, torch.device("cpu"))


LINE = re.compile(r"epoch (\d)/3 step (\d)/4 \| \d+ img/s \| ETA \d+:\d\d:\d\d")


def test_without_a_terminal_a_progress_line_every_n_seconds_and_no_host_sync(tmp_path, caplog, one_thread):
    job = job_for(tmp_path, "epochs=3", "progress_every_s=0")  # stderr is pytest's, not a terminal: no bar
    assert job.progress is not None and not job.progress_bar
    with caplog.at_level(logging.INFO, logger="kd.feedback"):
        loop.run_epoch(job, 1)
    assert [LINE.fullmatch(r.message).groups() for r in caplog.records] == [("1", str(s)) for s in range(1, 5)]
    assert job.progress.epoch_s > 0  # the ETA's length of the epochs to come
    found = []
    for progress in (job.progress, None):  # the lines read no tensor: the same syncs with and without them
        job.progress = progress
        with SyncCounter() as syncs:
            loop.train_one_epoch(job, 2)
        found.append(syncs.found)
    assert found[0] == found[1]
    assert job_for(tmp_path, "progress_bar=true").progress is None  # a bar instead
    assert job_for(tmp_path, "progress_every_s=null").progress is None  # no lines
    with pytest.raises(ValueError, match=r"progress_every_s=-1.0: must be >= 0 seconds \(0: a line every step\)"):
        check_config(compose_cfg(tmp_path, "progress_every_s=-1"))


def test_progress_line_eta_counts_the_epochs_left_at_the_last_epochs_length(monkeypatch, caplog):
    clock = [0.0]
    monkeypatch.setattr(feedback.time, "perf_counter", lambda: clock[0])
    progress = feedback.Progress(every_s=10, epochs=3)
    with caplog.at_level(logging.INFO, logger="kd.feedback"):
        progress.start(1, steps=10)
        for step in range(1, 11):  # 1 s a step of 64 images: a line after 10 s
            clock[0] += 1
            progress.step(step, 64)
        progress.epoch_s = 12.0  # the epoch with its evaluation
        clock[0] = 12.0
        progress.start(2, steps=10)
        for step in range(1, 9):
            clock[0] += 1
            progress.step(step, 64)
    assert [r.message for r in caplog.records] == [
        "epoch 1/3 step 10/10 | 64 img/s | ETA 0:00:20",  # before an epoch ended: 2 epochs of 10 steps
        "epoch 2/3 step 8/10 | 64 img/s | ETA 0:00:14",  # 2 steps left, then one epoch as long as the last (12 s)
    ]


def test_start_line_says_what_is_trained_with_what_on_which_device_and_where(tmp_path):
    job = SimpleNamespace(teacher=object(), data=SimpleNamespace(num_train=1438, device=torch.device("cpu")))
    student = compose_cfg(tmp_path, "phase=student", "model@teacher=resnet8", "teacher.width=1", "epochs=3")
    assert feedback.start_line(student, job, "bf16", Path("out")) == (
        "training student resnet8 -> simple_cnn x0.25 | method KD | data digits (1438 training images) | 3 epochs | "
        "device cpu | precision bf16 | run folder out")
    teacher = engine.phase_config(compose_cfg(tmp_path, "phase=teacher", "teacher_recipe.epochs=4"))
    assert feedback.start_line(teacher, job, "fp32", Path("out")).startswith(
        "training teacher simple_cnn x0.25 | method teacher (CE) | data digits (1438 training images) | 4 epochs |")
    job.teacher = None
    baseline = compose_cfg(tmp_path, "phase=student", "loss=ce", "teacher_checkpoint=none")
    assert feedback.start_line(baseline, job, "fp32", Path("out")).startswith(
        "training student simple_cnn x0.25 | method CE (no teacher) |")


def test_a_multirun_ends_with_its_counts_its_best_configuration_and_the_report_command(tmp_path, capsys, caplog,
                                                                                      monkeypatch):
    sweep = tmp_path / "sweep"
    real_step, held, taken = loop.train_step, ExitStack(), []

    def step(job, context, batch):  # while job 0 trains, another process (this one) takes job 1's folder
        if not taken:
            taken.append(held.enter_context(fileio.folder_lock(sweep / "student.width=0.5")))
        real_step(job, context, batch)

    monkeypatch.setattr(loop, "train_step", step)
    with held:
        fixed = [a for a in ARGS if not a.startswith(("epochs=", "student.width="))]
        argv = ["-m", *fixed, "epochs=1", "student.width=0.25,0.5,-1", f"hydra.sweep.dir={sweep}"]
        assert train_in_process(argv) == 1  # the basic sweeper raises the failed job's error after the last job
        out, err = capsys.readouterr()
        acc1 = json.loads((sweep / "student.width=0.25" / "result.json").read_text())["test/acc1"]
        summary = [f"sweep {sweep}: 1 finished, 1 failed, 1 skipped: another process runs them, relaunch once it "
                   "has ended", f"best: student.width=0.25 (test/acc1 {acc1:.2f}, mean of 1 run)",
                   f"report: python -m kd.report {sweep}"]
        assert [line.split(" - ", 1)[1] for line in out.splitlines() if "[kd.sweep]" in line] == summary
        assert "student.width=-1.0: the width multiplier must be > 0" in err
        state = tree_state(sweep)
        assert feedback.sweep_summary(sweep) == summary  # the summary only reads
        assert tree_state(sweep) == state
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    with caplog.at_level(logging.INFO, logger="kd.sweep"):  # the other launchers' way, once the holder has ended
        SweepChecks().on_multirun_end(config=config)
    logged = [record.message for record in caplog.records if record.name == "kd.sweep"]
    assert logged == [f"sweep {sweep}: 1 finished, 2 failed", *summary[1:]] and tree_state(sweep) == state
