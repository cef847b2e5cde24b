"""`python -m kd.eval`: a trained run scored again gives the figures the run recorded, exactly, with its teacher's
agreement and a confusion matrix; a store's teacher.pt scores as its manifest says; bad input is one line and writes
nothing. In-process (kd.eval.main) on a tiny digits run."""
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from kd import engine, fileio
from kd.eval import main
from support import tree_state
from support.runs import compose_cfg

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A KD student of two epochs on digits, with the teacher it trains first (both tiny)."""
    tmp = tmp_path_factory.mktemp("eval")
    cfg = compose_cfg(tmp, "phase=student", "loss=kd", "epochs=2", "train_missing_teacher=true")
    engine.run(cfg, tmp / "run")
    return tmp / "run"


def scored(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_run_scored_again_gives_its_own_last_epoch_figures_exactly(run, capsys):
    code, out, err = scored(capsys, run)
    assert code == 0, err
    evaluated = json.loads((run / "eval" / "last_test" / "eval.json").read_text())
    result = json.loads((run / "result.json").read_text())
    for key in ("test/loss", "test/acc1", "test/acc5", "test/agreement"):
        assert evaluated[key] == result[key], key  # the same checkpoint, data, precision: the same floats
    assert evaluated["teacher/test/acc1"] == result["teacher/acc1"]
    assert evaluated["teacher/sha256"] == result["teacher/sha256"] and evaluated["epoch"] == result["epochs"] == 2
    matrix = torch.tensor(evaluated["confusion"])
    assert matrix.shape == (10, 10) and matrix.sum() == evaluated["images"] == 359
    assert matrix.diag().sum().item() / 359 * 100 == pytest.approx(evaluated["test/acc1"])
    assert (run / "eval" / "last_test" / "confusion.png").read_bytes().startswith(PNG_MAGIC)
    assert out.count("\n") == 1 and f"top-1 {result['test/acc1']:.2f}" in out and "agreement" in out


def test_best_checkpoint_and_another_split_go_to_their_own_folder(run, capsys):
    records_before = {name: (run / name).read_bytes() for name in ("run.json", "result.json", "metrics.jsonl")}
    code, _, err = scored(capsys, run, "--checkpoint", "best", "--split", "train", "eval_batch_size=100")
    assert code == 0, err
    evaluated = json.loads((run / "eval" / "best_train" / "eval.json").read_text())
    result = json.loads((run / "result.json").read_text())
    assert evaluated["epoch"] == result["best_epoch"] and evaluated["images"] == 1438  # digits: 1797 - 359
    assert evaluated["checkpoint"] == str(run / "best.pt") and evaluated["overrides"] == ["eval_batch_size=100"]
    assert evaluated["config"]["eval_batch_size"] == 100
    assert {name: (run / name).read_bytes() for name in records_before} == records_before  # the run's own records


def test_a_store_teacher_scores_what_its_manifest_records(run, tmp_path, capsys):
    (teacher,) = run.parent.glob("teachers/*/v1/teacher.pt")
    code, _, err = scored(capsys, teacher, "--out", tmp_path / "teacher_eval")
    assert code == 0, err
    manifest = json.loads((teacher.parent / "manifest.json").read_text())
    evaluated = json.loads((tmp_path / "teacher_eval" / "eval.json").read_text())
    assert evaluated["test/acc1"] == manifest["result"]["test/acc1"] and "test/agreement" not in evaluated


def test_a_teacher_that_moved_is_named_and_taken_from_teacher(run, tmp_path, capsys):
    checkpoint = torch.load(run / "last.pt", weights_only=True)
    checkpoint["teacher_checkpoint"] = str(tmp_path / "gone" / "teacher.pt")
    fileio.save_checkpoint(tmp_path / "moved" / "last.pt", checkpoint)
    before = tree_state(tmp_path)
    code, _, err = scored(capsys, tmp_path / "moved")
    assert code == 1 and err.count("\n") == 1
    assert f"Error: teacher {tmp_path / 'gone' / 'teacher.pt'}, which the run was trained with, is not there" in err
    assert "Pass --teacher PATH naming a copy of that teacher" in err and tree_state(tmp_path) == before
    copy = shutil.copy(checkpoint_teacher(run), tmp_path / "copy.pt")
    code, _, err = scored(capsys, tmp_path / "moved", "--teacher", copy)
    assert code == 0, err
    moved = json.loads((tmp_path / "moved" / "eval" / "last_test" / "eval.json").read_text())
    assert moved["test/agreement"] == json.loads((run / "result.json").read_text())["test/agreement"]


def checkpoint_teacher(run: Path) -> Path:
    return Path(json.loads((run / "result.json").read_text())["teacher_checkpoint"])


# (arguments: {run}, {tmp} are filled in; what the one line says)
BAD_INPUTS = {
    "folder-without-a-run": (["{tmp}/empty"], "{tmp}/empty holds no last.pt (it holds no run.json either): not a run "
                                              "folder of this repository"),
    "no-such-path": (["{tmp}/nowhere"], "{tmp}/nowhere: no such file or folder. kd.eval reads a run folder"),
    "foreign-file": (["{tmp}/notes.txt"], "{tmp}/notes.txt is not a readable checkpoint"),
    "bare-state-dict": (["{tmp}/weights.pt"], "{tmp}/weights.pt lacks model, arch, config: not a complete checkpoint "
                                              "of this repository. kd.eval reads"),
    "no-validation-split": (["{run}", "--split", "val"], "was trained without a validation split "
                                                         "(dataset.val_fraction=0): score --split test"),
    "another-teacher": (["{run}", "--teacher", "{tmp}/weights.pt"], "is not the one the run was trained with"),
    "unknown-key": (["{run}", "eval_bach_size=8"], "eval_bach_size=8: the run's config has no key eval_bach_size"),
    "not-key-value": (["{run}", "eval_batch_size=8,16"], "eval_batch_size=8,16: a change of the run's config is one "
                                                          "KEY=VALUE"),
    "store-version": (["{teacher}"], "a version of the teacher store, which is never written after it is filed: give "
                                     "--out DIR"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_writes_nothing(case, run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "weights.pt")
    (teacher,) = run.parent.glob("teachers/*/v1/teacher.pt")
    places = {"run": run, "tmp": tmp_path, "teacher": teacher}
    arguments, message = BAD_INPUTS[case]
    before = (tree_state(tmp_path), tree_state(run.parent))
    code, out, err = scored(capsys, *[a.format(**places) for a in arguments])
    assert code == 1 and out == "" and err.startswith("Error: ") and err.count("\n") == 1, err
    assert message.format(**places) in err
    assert (tree_state(tmp_path), tree_state(run.parent)) == before


@pytest.mark.slow
def test_pip_install_e_gives_kd_report_and_kd_eval_in_any_folder(run, tmp_path):
    """A real `pip install -e .` into a throwaway venv (its packages are this one's, through a .pth file: nothing is
    downloaded, --no-index), then kd.report and kd.eval run as processes from a folder outside the checkout."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    (site,) = venv.glob("lib/python3*/site-packages")
    (site / "this_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--no-build-isolation",
               "-e", REPO]
    installed = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0 and "Successfully installed kd-" in installed.stdout, installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def module(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([python, "-m", *map(str, args)], cwd=elsewhere, capture_output=True, text=True,
                              timeout=300)

    report = module("kd.report", run, "--out", "report")  # --out relative to the current folder, like SWEEP_DIR
    assert report.returncode == 0, report.stderr
    assert (elsewhere / "report" / "report.md").is_file()
    evaluated = module("kd.eval", run, "--out", "eval")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((elsewhere / "eval" / "eval.json").read_text())["test/acc1"] == json.loads(
        (run / "result.json").read_text())["test/acc1"]
    assert not list(REPO.glob("*.egg-info"))  # the editable build leaves nothing in the checkout
