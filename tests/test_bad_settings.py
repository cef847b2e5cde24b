"""Bad input refused at the start, with a message that names the problem and the fix, and nothing on disk touched:
non-finite or non-numeric settings, a negative teacher_acc_tolerance, a W&B project name W&B would refuse, a teacher
file holding pickled objects, a sweep folder whose sweep.json cannot be read, and job folders another process of the
same sweep holds (issue 16). Every test compares the folders' state before and after (support.tree_state).

The multirun tests run Hydra in this process (train.main with a multirun command line): a job folder's lock held by
this process through another file descriptor is busy to the sweep just as another process's would be (flock).
"""
import argparse
import json
import logging
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

import kd.config  # noqa: F401  (registers the schema)
import train
from kd import checkpoints, engine, fileio
from kd.config import check_config
from kd.sweep import SweepChecks
from support import tree_state
from test_reliability import PLAIN, TINY, compose_cfg, no_data


def refused(cfg, tmp_path: Path, error=ValueError, locked: bool = False) -> str:
    """engine.run's refusal message; asserts that nothing under tmp_path was created, changed or deleted (locked: but
    the run folder and its .lock, for a refusal made while holding it: a teacher is read under the lock)."""
    before = tree_state(tmp_path)
    with pytest.raises(error) as refusal:
        engine.run(cfg, tmp_path / "run")
    after = tree_state(tmp_path)
    if locked:
        assert sorted(set(after) - set(before)) == ["run", "run/.lock"]
        after = {k: v for k, v in after.items() if k not in ("run", "run/.lock")}
    assert after == before
    return str(refusal.value)


# ---------------------------------------------------------------------------------------------------------------
# settings


def test_nan_and_inf_are_refused_in_every_group_in_one_message(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "load_data", no_data)
    named = ["loss.temperature=nan", "optimizer.weight_decay=inf", "scheduler.min_lr=-inf", "dataset.val_fraction=nan",
             "pair_hparams.dkd_beta=inf", "teacher_recipe.optimizer.momentum=nan", "teacher_lock_timeout_s=inf"]
    cfg = compose_cfg(tmp_path, *PLAIN, "loss=kd", "teacher_recipe=quickstart", *named)
    message = refused(cfg, tmp_path)
    assert message.startswith("invalid config: ") and message.count("invalid config") == 1
    assert message.endswith(": NaN and infinite values are refused (every float setting must be a finite number)")
    assert sorted(message.removeprefix("invalid config: ").split(": ")[0].split(", ")) == sorted(named)


@pytest.mark.parametrize("override, named", [
    ("optimizer.lr=fast", "optimizer.lr='fast': must be a number (torch.optim.SGD takes a number as lr)"),
    ("optimizer.momentum=true", "optimizer.momentum=True: must be a number (torch.optim.SGD takes a number as "
                                "momentum)"),
    ("scheduler.min_lr=low", "scheduler.min_lr='low': must be a number (kd.schedulers.cosine takes a number as "
                             "min_lr)"),
    ("loss.temperature=hot", "loss.temperature='hot': must be a number (kd.methods.kd.KDLoss takes a number as "
                             "temperature)"),
])
def test_strings_where_a_target_takes_a_number_are_refused_naming_the_key_and_type(tmp_path, override, named):
    message = refused(compose_cfg(tmp_path, *PLAIN, "loss=kd", "teacher_recipe=quickstart", override), tmp_path)
    assert message == f"invalid config: {named}"  # the teacher's recipe (quickstart) is its own: not named


def test_a_value_that_no_config_option_gives_is_refused_naming_it(tmp_path):
    """The schema holds no dataset's facts (kd.config.DatasetConfig): an option that leaves one out is refused."""
    options = tmp_path / "conf" / "dataset"
    options.mkdir(parents=True)
    digits = (Path(__file__).resolve().parents[1] / "conf" / "dataset" / "digits.yaml").read_text()
    (options / "no_flip_setting.yaml").write_text(digits.replace("hflip: false\n", ""))
    cfg = compose_cfg(tmp_path, *PLAIN, f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "dataset=no_flip_setting")
    message = refused(cfg, tmp_path)
    assert message == ("invalid config: dataset.hflip: no value given (???): set each on the command line "
                       "(dataset.hflip=...) or in the config option that should give it")


def test_a_setting_added_to_a_typed_node_with_plus_is_refused_naming_the_close_ones(tmp_path):
    """Hydra's + adds a key that the schema would refuse: a misspelt pair value would be read by nothing."""
    message = refused(compose_cfg(tmp_path, *PLAIN, "+pair_hparams.dkd_betta=2", "+seedd=1", "+loss.extra=1"),
                      tmp_path)
    assert message == (
        "invalid config: pair_hparams.dkd_betta: PairHparams has no such setting (it was added with +; close names: "
        "dkd_beta, dkd_ls_beta): set an existing one, without the +; seedd: Config has no such setting (it was added "
        "with +; close names: seed): set an existing one, without the +")  # loss is untyped: its targets check it


def test_a_sweep_over_a_value_no_config_option_gives_runs_and_one_that_leaves_it_out_stops(tmp_path, multirun):
    """Hydra leaves a swept value out of the sweep's own config (???): its jobs give it, and each checks its own."""
    options = tmp_path / "conf" / "dataset"
    options.mkdir(parents=True)
    digits = (Path(__file__).resolve().parents[1] / "conf" / "dataset" / "digits.yaml").read_text()
    (options / "no_flip_setting.yaml").write_text(digits.replace("hflip: false\n", ""))
    option = [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "dataset=no_flip_setting"]
    code, out = multirun(tmp_path / "sweep", *option, "dataset.hflip=true,false")
    assert code == 0, out
    assert sorted(p.parent.name for p in (tmp_path / "sweep").glob("*/result.json")) == [
        "dataset.hflip=False", "dataset.hflip=True"]
    code, out = multirun(tmp_path / "unswept", *option, "seed=0,1")
    assert code == 1 and "invalid config: dataset.hflip: no value given (???)" in out
    assert "#0 :" not in out and not (tmp_path / "unswept").exists()


def test_negative_teacher_acc_tolerance_is_refused(tmp_path):
    message = refused(compose_cfg(tmp_path, *PLAIN, "teacher_acc_tolerance=-1"), tmp_path)
    assert message == "invalid config: teacher_acc_tolerance=-1.0: must be >= 0 (percentage points)"
    check_config(compose_cfg(tmp_path, *PLAIN, "teacher_acc_tolerance=0"))  # exact agreement: allowed


def test_a_project_name_wandb_refuses_is_refused_before_run_json_even_with_wandb_disabled(tmp_path):
    assert "logger.mode=disabled" in TINY
    message = refused(compose_cfg(tmp_path, *PLAIN, f"logger.project={'p' * 129}"), tmp_path)
    assert message == ("invalid config: logger.project is 129 characters long: W&B allows at most 128, shorten it")
    message = refused(compose_cfg(tmp_path, *PLAIN, "logger.project='kd:cifar'"), tmp_path)
    assert message == "invalid config: logger.project=kd:cifar: W&B project names cannot hold :"
    check_config(compose_cfg(tmp_path, *PLAIN, f"logger.project={'p' * 128}"))


# ---------------------------------------------------------------------------------------------------------------
# a teacher file holding pickled objects


class WritesFile:
    """Unpickling this would create a file: the way to show that nothing of a checkpoint's own code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def repdistiller_last(tmp_path: Path, marker: Path) -> Path:
    """A teacher as RepDistiller's _last.pth holds it: the state_dict under `model`, the run's argparse.Namespace
    under `opt` (here also holding an object whose unpickling writes `marker`)."""
    teacher = instantiate(compose_cfg(tmp_path, *PLAIN).teacher)
    options = argparse.Namespace(model="simple_cnn", learning_rate=0.05, hook=WritesFile(marker))
    path = tmp_path / "teachers_dir" / "simple_cnn_last.pth"
    path.parent.mkdir()
    torch.save({"model": teacher.state_dict(), "opt": options, "epoch": 240, "accuracy": 72.3}, path)
    return path


def test_a_teacher_file_holding_a_namespace_names_the_key_and_reads_the_weights_alone_on_request(tmp_path):
    marker = tmp_path / "ran"
    path = repdistiller_last(tmp_path, marker)
    args = ["phase=student", "loss=kd", "epochs=1", f"teacher_checkpoint={path}"]
    message = refused(compose_cfg(tmp_path, *args), tmp_path, fileio.UnsafeCheckpoint, locked=True)
    assert message == (
        f"{path} holds objects other than tensors and plain values ('opt' holds argparse.Namespace), which are never "
        "unpickled: nothing from the file was run. Its weights under 'model' are tensors only: add "
        "teacher_checkpoint_key=model to read that key alone, weights-only (the other keys are never built).")
    before = tree_state(path.parent)
    result = engine.run(compose_cfg(tmp_path, *args, "teacher_checkpoint_key=model"), tmp_path / "run")
    assert result["teacher/format"] == "state_dict" and result["teacher/sha256"] == fileio.sha256_file(path)
    assert "teacher/recorded_acc1" not in result  # that key alone was read: not the file's `accuracy`
    assert tree_state(path.parent) == before and not marker.exists()


def test_teacher_checkpoint_key_refuses_a_missing_key_an_entry_without_weights_and_a_weights_only_format(tmp_path):
    from safetensors.torch import save_file

    marker = tmp_path / "ran"
    path, node = repdistiller_last(tmp_path, marker), compose_cfg(tmp_path, *PLAIN).teacher
    save_file({"w": torch.zeros(1)}, str(tmp_path / "weights.safetensors"))
    before = tree_state(tmp_path)
    for key, error, message in (
        ("state_dict", fileio.UnusableCheckpoint,
         f"{path} has no top-level key 'state_dict' (it holds ['accuracy', 'epoch', 'model', 'opt'])."),
        ("opt", fileio.UnsafeCheckpoint,
         f"{path} holds objects other than tensors and plain values ('opt' holds argparse.Namespace), which are never "
         "unpickled: nothing from the file was run."),
        ("epoch", fileio.UnusableCheckpoint, f"{path}: 'epoch' holds no state_dict (a dict of tensors), so "
                                              "teacher_checkpoint_key=epoch has no weights to read there."),
    ):
        with pytest.raises(error) as refusal:
            checkpoints.read_teacher_file(path, node, key)
        assert str(refusal.value) == message
    with pytest.raises(ValueError, match=r"teacher_checkpoint_key=model reads one key of a pickled checkpoint \(\.pt, "
                                         r"\.pth\), and .*weights\.safetensors holds weights alone: drop"):
        checkpoints.read_teacher_file(tmp_path / "weights.safetensors", node, "model")
    assert tree_state(tmp_path) == before and not marker.exists()


def test_unreadable_checkpoint_message_is_one_plain_line_without_torchs_advice(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"model": {}, "hook": WritesFile(tmp_path / "ran")}, path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint" * 8)
    before = tree_state(tmp_path)
    for file, reason in ((path, r"'hook' holds io\.open"), (garbage, r"not a readable checkpoint \(")):
        with pytest.raises(fileio.UnusableCheckpoint, match=reason) as refusal:
            fileio.load_checkpoint(file, ())
        text = str(refusal.value)
        assert "\x1b" not in text and "\n" not in text and "weights_only" not in text, text
    with pytest.raises(fileio.UnsafeCheckpoint, match=r"'hook' holds io\.open"):
        fileio.load_checkpoint_entry(path, "hook")
    assert fileio.load_checkpoint_entry(path, "model") == {}
    assert tree_state(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------
# sweeps, through Hydra in this process


@pytest.fixture
def multirun(tmp_path, monkeypatch, capsys):
    """Runs `train.py -m` in this process with TINY's plain student runs; returns (exit code, printed text)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # Hydra configures logging for its jobs: put it back after

    # Hydra finds conf/ beside the task function's file when its module is __main__, as under `python train.py`.
    monkeypatch.setattr(train.main.__wrapped__, "__module__", "__main__")

    def launch(sweep: Path, *overrides: str) -> tuple[int, str]:
        args = ["train.py", "-m", f"hydra.sweep.dir={sweep}", *TINY, *PLAIN, "epochs=1",
                f"teacher_store={tmp_path / 'teachers'}", *overrides]
        monkeypatch.setattr(sys, "argv", args)
        GlobalHydra.instance().clear()
        try:
            train.main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    yield launch
    GlobalHydra.instance().clear()
    root.handlers[:], root.level = handlers, level


def test_a_damaged_or_unreadable_sweep_json_stops_the_sweep_before_any_job(tmp_path, multirun, monkeypatch):
    sweep = tmp_path / "sweep"
    (sweep / "seed=0").mkdir(parents=True)
    (sweep / "seed=0" / "result.json").write_text('{"test/acc1": 50.0}\n')
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / "sweep.json").write_text('{"sweeper": "hydra._internal')  # cut short
    before = tree_state(tmp_path)
    code, out = multirun(sweep, "seed=0,1")
    assert code == 1, out
    assert f"{sweep / 'sweep.json'} is damaged (not valid JSON: " in out
    assert ("This relaunch cannot be checked against the sweep it records, so no job was started. Start a new sweep "
            f"folder (hydra.sweep.dir={sweep}_2, or any other), or delete {sweep} to replace that sweep.") in out
    assert "Traceback" not in out and "UserWarning" not in out and "#0 :" not in out  # no job launched
    assert tree_state(tmp_path) == before  # multirun.yaml not rewritten, no job folder added

    (sweep / "sweep.json").write_text(json.dumps({"sweeper": "x"}))  # valid JSON, not a sweep record
    before = tree_state(tmp_path)
    code, out = multirun(sweep, "seed=0,1")
    assert code == 1 and f"{sweep / 'sweep.json'} is damaged (it holds no fixed and swept overrides)." in out
    assert tree_state(tmp_path) == before

    read_text = Path.read_text

    def permission_denied(self, *args, **kwargs):  # as for a file of another user (the tests may run as root)
        if self.name == "sweep.json":
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", permission_denied)
    code, out = multirun(sweep, "seed=0,1")
    assert code == 1 and f"{sweep / 'sweep.json'} cannot be read (Permission denied). This relaunch cannot" in out
    assert tree_state(tmp_path) == before


def test_a_sweep_with_a_bad_constant_setting_stops_before_any_job(tmp_path, multirun):
    code, out = multirun(tmp_path / "sweep", "seed=0,1", "optimizer.lr=fast")
    assert code == 1 and "invalid config: optimizer.lr='fast': must be a number" in out
    assert "#0 :" not in out and not (tmp_path / "sweep").exists()


def test_jobs_another_process_holds_are_skipped_with_one_line_each_and_the_sweep_ends_well(
    tmp_path, multirun, monkeypatch
):
    sweep, held, states = tmp_path / "sweep", ExitStack(), []
    checks = SweepChecks.on_multirun_start

    def then_hold(self, config, **kwargs):  # meanwhile, the same sweep launched a moment earlier takes job seed=1
        checks(self, config, **kwargs)
        held.enter_context(fileio.folder_lock(sweep / "seed=1"))
        states.append(tree_state(sweep / "seed=1"))

    monkeypatch.setattr(SweepChecks, "on_multirun_start", then_hold)
    with held:
        code, out = multirun(sweep, "seed=0,1")
        holder = (sweep / "seed=1" / ".lock").read_text().strip()
        assert tree_state(sweep / "seed=1") == states[0] and list(states[0]) == [".lock"]
    assert code == 0, out
    assert (f"skipped {sweep / 'seed=1'}: another process is running it ({holder}). Relaunch this sweep once that "
            "one has ended to run any job it did not finish.") in out
    assert out.count("skipped ") == 1 and "Traceback" not in out
    assert (sweep / "seed=0" / "result.json").is_file()  # the job this process could take, it finished
