"""Damaged records and unwritable folders (issue 16): kd.report lists a damaged result.json as a problem naming the
file and never tables it; a read-only folder or a full disk is one line naming the path and the fix, and leaves every
file as it was (a full disk keeps the last checkpoint, so the rerun resumes).

train.py runs in this process through runpy, as `python train.py ARGS` runs it: Hydra parses the arguments, runs
the callbacks and prints the errors, so no subprocess is needed. Read-only folders are simulated by support.read_only
(root ignores chmod), a full disk by an os.write that fails with ENOSPC.
"""
import csv
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from kd import engine, fileio, report
from support import read_only, tree_state
from support.runs import LABELS_ONLY as TINY
from support.runs import train_in_process

REPO = Path(__file__).resolve().parents[1]
READ_ONLY = os.strerror(errno.EROFS)


def train_py(tmp: Path, *args: str) -> int:
    """Run train.py in this process as `python train.py [-m] TINY ARGS` does; its exit code (0 when it returns)."""
    flags, overrides = [a for a in args if a == "-m"], [a for a in args if a != "-m"]
    return train_in_process([*flags, *TINY, f"teacher_store={tmp / 'teachers'}", *overrides])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Two real one-epoch runs (seeds 0 and 1) in one folder, as kd.report reads a sweep."""
    tmp = tmp_path_factory.mktemp("io")
    for seed in (0, 1):
        assert train_py(tmp, "epochs=1", f"seed={seed}", f"hydra.run.dir={tmp / 'sweep' / f'seed_{seed}'}") == 0
    return tmp / "sweep"


def no_data(*args, **kwargs):
    raise AssertionError("the run loaded data: it did work it should not have")


# ---------------------------------------------------------------------------------------------------------------
# kd.report: a damaged result.json is a problem naming the file, never a row


@pytest.mark.parametrize("damage, what", [
    (lambda result: {}, "no config"),
    (lambda result: {**result, "test/acc1": "71.3"}, 'test/acc1 is "71.3", not a finite number'),
    (lambda result: {**result, "config": [result["config"]]}, "its config is a JSON list, not an object"),
], ids=["empty", "string-accuracy", "list-config"])
def test_report_lists_a_damaged_result_naming_its_file_and_never_tables_it(sweep, tmp_path, capsys, damage, what):
    copy = Path(shutil.copytree(sweep, tmp_path / "sweep"))
    damaged = copy / "seed_1" / "result.json"
    damaged.write_text(json.dumps(damage(json.loads(damaged.read_text()))))
    before = tree_state(copy)
    assert report.main([str(copy), "--out", str(tmp_path / "out")]) == 0
    problem = f"damaged result.json ({damaged}: {what})"
    assert f"kd.report: {problem}: seed=1 (`seed_1` in `{copy}`)" in capsys.readouterr().err.splitlines()
    assert f"- {problem}" in (tmp_path / "out" / "report.md").read_text()
    (row,) = report_rows(tmp_path / "out")  # one row: seed 0 alone, of the two seeds asked for
    assert (row["n"], row["n_expected"]) == ("1", "2")
    seed_0 = json.loads((copy / "seed_0" / "result.json").read_text())
    assert float(row["test_acc1_last_mean"]) == seed_0["test/acc1"]
    assert tree_state(copy) == before


def report_rows(out: Path) -> list[dict[str, str]]:
    with (out / "report.csv").open() as f:
        return list(csv.DictReader(f))


def test_report_into_a_read_only_sweep_folder_is_refused_and_suggests_out(sweep, tmp_path, capsys):
    copy = Path(shutil.copytree(sweep, tmp_path / "sweep"))
    before, sweep_before = tree_state(tmp_path), tree_state(copy)
    with read_only(copy):
        assert report.main([str(copy)]) == 1
    assert capsys.readouterr().err == (f"kd.report: {copy}: cannot be written ({READ_ONLY}). Write the report into "
                                       "another folder: --out DIR.\n")
    assert tree_state(tmp_path) == before  # nothing written anywhere
    with read_only(copy):  # the fix it names works
        assert report.main([str(copy), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.md").is_file() and tree_state(copy) == sweep_before


# ---------------------------------------------------------------------------------------------------------------
# train.py: read-only folders


def test_new_run_under_a_read_only_outputs_folder_is_one_line(tmp_path, capsys, monkeypatch):
    outputs = tmp_path / "outputs"
    (outputs / "old_run").mkdir(parents=True)
    before = tree_state(tmp_path)
    with read_only(outputs):
        assert train_py(tmp_path, "epochs=1", f"hydra.run.dir={outputs / 'run'}") == 1
    assert capsys.readouterr().err == (f"Error: {outputs / 'run'}: cannot be written ({READ_ONLY}). Make the folder "
                                       "it is in writable, or give this run another folder (hydra.run.dir=...).\n")
    assert tree_state(tmp_path) == before
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # keeps the traceback: Hydra's own mkdir raises
    with read_only(outputs), pytest.raises(OSError, match=READ_ONLY):
        train_py(tmp_path, "epochs=1", f"hydra.run.dir={outputs / 'run'}")
    assert tree_state(tmp_path) == before


def test_new_sweep_under_a_read_only_outputs_folder_is_one_line_before_any_job(tmp_path, capsys):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    before = tree_state(tmp_path)
    with read_only(outputs):
        assert train_py(tmp_path, "-m", "epochs=1", "seed=0,1", f"hydra.sweep.dir={outputs / 'sweep'}") == 1
    shown = "".join(capsys.readouterr())
    assert f"{outputs / 'sweep' / 'sweep.json'}: cannot be written ({READ_ONLY})." in shown
    assert "Traceback" not in shown and "Launching" not in shown  # no job started
    assert tree_state(tmp_path) == before


def test_finished_run_in_a_read_only_folder_is_returned_without_any_write(sweep, tmp_path, capsys, monkeypatch):
    run = Path(shutil.copytree(sweep / "seed_0", tmp_path / "run"))
    before = tree_state(tmp_path)
    monkeypatch.setattr(engine, "load_data", no_data)
    with read_only(run):  # no .lock taken, no train.log line: a finished run is only read
        assert train_py(tmp_path, "epochs=1", "seed=0", f"hydra.run.dir={run}") == 0
    assert capsys.readouterr().err == ""
    assert tree_state(tmp_path) == before


def test_interrupted_run_in_a_read_only_folder_is_refused_before_any_work(sweep, tmp_path, capsys, monkeypatch):
    run = Path(shutil.copytree(sweep / "seed_0", tmp_path / "run"))
    for name in ("result.json", "run_info.json"):  # killed after its last checkpoint: it would resume
        (run / name).unlink()
    before = tree_state(tmp_path)
    monkeypatch.setattr(engine, "load_data", no_data)
    with read_only(run):
        assert train_py(tmp_path, "epochs=1", "seed=0", f"hydra.run.dir={run}") == 1
    assert capsys.readouterr().err == (f"Error: {run}: cannot be written ({READ_ONLY}). Make {run} writable, or give "
                                       "this run another folder (hydra.run.dir=... / hydra.sweep.dir=...).\n")
    assert tree_state(tmp_path) == before
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with read_only(run), pytest.raises(fileio.CannotWrite):
        train_py(tmp_path, "epochs=1", "seed=0", f"hydra.run.dir={run}")
    assert tree_state(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------
# a full disk


def failing_write(monkeypatch, fails, error: int = errno.ENOSPC) -> dict:
    """os.write that writes half of its bytes and raises OSError(error) where fails(path) holds; the returned dict
    gets the folder's tree_state at that moment (without the half-written file), under "state"."""
    real_write, seen = os.write, {}

    def write(fd: int, data) -> int:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if not fails(path):
            return real_write(fd, data)
        real_write(fd, bytes(data[: len(data) // 2]))
        seen["state"] = {k: v for k, v in tree_state(path.parent).items() if k != path.name}
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "write", write)
    return seen


def test_full_disk_while_saving_a_checkpoint_is_one_line_and_the_rerun_resumes(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    args = ("epochs=2", f"hydra.run.dir={run}")
    with monkeypatch.context() as patch:  # the disk fills while epoch 2 saves last.pt
        at_failure = failing_write(patch, lambda p: p.name.startswith(".last.pt.") and (run / "last.pt").exists())
        assert train_py(tmp_path, *args) == 1
    assert capsys.readouterr().err == f"Error: {run / 'last.pt'}: cannot be written ({os.strerror(errno.ENOSPC)}). " \
                                      f"{fileio.FULL_DISK_FIX}\n"
    assert tree_state(run) == at_failure["state"]  # the half-written file is gone; epoch 1's last.pt is intact
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1 and not (run / "result.json").exists()
    assert train_py(tmp_path, *args) == 0
    assert json.loads((run / "run_info.json").read_text())["resumed_from_epoch"] == 1
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_full_disk_under_a_record_keeps_the_old_one_and_other_errors_pass_unchanged(tmp_path, monkeypatch):
    record, lines = tmp_path / "result.json", tmp_path / "metrics.jsonl"
    fileio.write_json(record, {"test/acc1": 1.0})
    fileio.append_jsonl(lines, {"epoch": 1})
    before = tree_state(tmp_path)
    failing_write(monkeypatch, lambda path: path.parent == tmp_path)
    full = f"cannot be written \\({os.strerror(errno.ENOSPC)}\\). Free space on that disk"
    with pytest.raises(fileio.CannotWrite, match=f"^{record}: {full}"):
        fileio.write_json(record, {"test/acc1": 2.0})
    with pytest.raises(fileio.CannotWrite, match=f"^{lines}: {full}"):
        fileio.append_jsonl(lines, {"epoch": 2})
    assert tree_state(tmp_path) == before  # no temporary file left, no half line appended
    monkeypatch.undo()
    failing_write(monkeypatch, lambda path: path.parent == tmp_path, errno.EIO)  # a failing disk: no fix to name
    with pytest.raises(OSError) as raised:
        fileio.write_json(record, {"test/acc1": 2.0})
    assert type(raised.value) is OSError and raised.value.errno == errno.EIO
    assert tree_state(tmp_path) == before
