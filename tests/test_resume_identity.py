"""A resumed run keeps the teacher and the training images its last.pt was trained with, and the teacher store never
serves a teacher trained on other images (issue 16).

In-process: an interrupted run is a real run stopped by an exception right after an epoch's last.pt landed (what
SIGKILL at that point leaves: tests/test_reliability.py checks that with real processes). Each refusal is checked
for the message a user sees and for leaving every folder as it was (support.tree_state; run-folder .lock files,
rewritten with their holder's name by every run that takes them, aside).
"""
import json
import logging
import shutil
import stat
from pathlib import Path

import pytest
import torch

import kd.config  # noqa: F401  (registers the schema)
from kd import engine, fileio, teachers
from support import tree_state
from test_records import CLASSES, FOLDER, trained, write_folder
from test_reliability import compose_cfg

# The teacher trains with the student's recipe (TINY): the same epochs, or it would be another teacher.
STUDENT = ["phase=student", "epochs=2"]
TEACHER = ["phase=teacher", "epochs=2"]


class Killed(Exception):
    """Stands in for SIGKILL right after an epoch's last.pt landed."""


def interrupt(monkeypatch, cfg, run: Path, after_epoch: int = 1) -> None:
    """Run cfg into `run` and stop it right after epoch `after_epoch`'s last.pt is written."""
    save = engine.save_checkpoints

    def save_then_die(job, cfg, out_dir, metrics, best, teacher):
        save(job, cfg, out_dir, metrics, best, teacher)
        if metrics["epoch"] == after_epoch:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(engine, "save_checkpoints", save_then_die)
        with pytest.raises(Killed):
            engine.run(cfg, run)
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == after_epoch
    assert not (run / "result.json").exists()


def state(folder: Path) -> dict[str, str]:
    return {k: v for k, v in tree_state(folder).items() if Path(k).name != ".lock"}


def sha(path: Path) -> str:
    return fileio.sha256_file(path)


def stored_teacher(tmp_path: Path, folder: str, *overrides: str) -> Path:
    return Path(engine.run(compose_cfg(tmp_path, *TEACHER, *overrides), tmp_path / folder)["teacher_checkpoint"])


def edit_manifest(version: Path, change) -> None:
    """Rewrite a (read-only) stored manifest as `change` leaves its JSON, and make it read-only again."""
    path = version / "manifest.json"
    path.chmod(path.stat().st_mode | stat.S_IWUSR)
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    path.chmod(path.stat().st_mode & ~stat.S_IWUSR)


def image_folder(tmp_path: Path, *extra: str) -> list[str]:
    """Overrides for a 2-class image folder at tmp_path/images (written on first use); no decode cache."""
    root = tmp_path / "images"
    if not root.exists():
        write_folder(root, seed=0)
    return [*FOLDER, f"dataset.source.root={root}", "dataset.source.cache_dir=null", *extra]


# ---------------------------------------------------------------------------------------------------------------
# the teacher


def test_a_resumed_student_goes_on_with_its_teacher_after_a_retrain_filed_a_newer_version(tmp_path, monkeypatch,
                                                                                           caplog):
    v1 = stored_teacher(tmp_path, "teacher_1")
    run = tmp_path / "student"
    interrupt(monkeypatch, compose_cfg(tmp_path, *STUDENT), run)
    last = torch.load(run / "last.pt", weights_only=True)
    assert (last["teacher_sha256"], last["teacher_checkpoint"]) == (sha(v1), str(v1))
    v2 = stored_teacher(tmp_path, "teacher_2", "retrain_teacher=true")
    assert v2 == v1.parent.parent / "v2" / "teacher.pt" and sha(v2) != sha(v1)

    with caplog.at_level(logging.INFO, logger="kd.teacher_checks"):
        resumed = engine.run(compose_cfg(tmp_path, *STUDENT), run)
    assert f"resuming with {v1.parent}, the teacher {run / 'last.pt'} was trained with" in caplog.text
    assert (resumed["teacher_checkpoint"], resumed["teacher/sha256"]) == (str(v1), sha(v1))
    whole = engine.run(compose_cfg(tmp_path, *STUDENT, f"teacher_checkpoint={v1}"), tmp_path / "with_v1")
    assert trained(resumed) == trained(whole)  # as if it had never stopped
    fresh = engine.run(compose_cfg(tmp_path, *STUDENT), tmp_path / "fresh")
    assert fresh["teacher/sha256"] == sha(v2)  # a new run takes the newest version


def test_a_resume_whose_teacher_is_gone_or_another_file_is_refused_naming_both(tmp_path, monkeypatch):
    v1 = stored_teacher(tmp_path, "teacher_1")
    old = sha(v1)
    run = tmp_path / "student"
    interrupt(monkeypatch, compose_cfg(tmp_path, *STUDENT), run)
    kept = Path(shutil.move(v1.parent, tmp_path / "kept_v1")) / "teacher.pt"  # out of the store, by hand
    new = stored_teacher(tmp_path, "teacher_2", "retrain_teacher=true")  # the entry has no version now: a new v1
    assert new == v1 and sha(new) != old
    before = state(tmp_path)

    recorded = f"cannot resume {run / 'last.pt'}: it was trained with teacher {v1} \\(sha256 {old[:12]}\\)"
    with pytest.raises(ValueError, match=(
            f"{recorded} \\(the store no longer holds it in {v1.parent.parent}\\), and would go on with {new} "
            f"\\(sha256 {sha(new)[:12]}\\). A resumed run keeps its teacher: start over in a new run folder "
            f"\\(hydra.run.dir=...\\), or resume with teacher_checkpoint=PATH naming that teacher \\(a file of "
            f"sha256 {old}\\)")):
        engine.run(compose_cfg(tmp_path, *STUDENT), run)
    with pytest.raises(ValueError, match=f"{recorded}, and would go on with {new} \\(sha256 {sha(new)[:12]}\\)"):
        engine.run(compose_cfg(tmp_path, *STUDENT, f"teacher_checkpoint={new}"), run)
    assert state(tmp_path) == before

    resumed = engine.run(compose_cfg(tmp_path, *STUDENT, f"teacher_checkpoint={kept}"), run)  # the fix
    assert (resumed["teacher/sha256"], resumed["epochs"]) == (old, 2)


# ---------------------------------------------------------------------------------------------------------------
# the training images


def test_a_resume_on_other_training_images_is_refused_naming_the_folder(tmp_path, monkeypatch):
    plain = ["phase=student", "loss=ce", "teacher_checkpoint=none", "epochs=2"]
    cfg = compose_cfg(tmp_path, *plain, *image_folder(tmp_path))
    run, root = tmp_path / "student", tmp_path / "images"
    interrupt(monkeypatch, cfg, run)
    recorded = torch.load(run / "last.pt", weights_only=True)["train_digest"]
    write_folder(root, seed=1, parts=("train",))  # the same names, other pixels
    before = state(tmp_path)

    with pytest.raises(ValueError, match=(
            f"cannot resume {run / 'last.pt'}: the training images in {root} are not those it was trained on "
            f"\\(digest {recorded[:12]} when trained, [0-9a-f]{{12}} now: images added, removed or replaced\\). A "
            "resumed run keeps its data: put those images back, or start over in a new run folder")):
        engine.run(cfg, run)
    assert state(tmp_path) == before
    write_folder(root, seed=0, parts=("train",))  # the images it was trained on, back
    assert engine.run(cfg, run)["epochs"] == 2


def test_a_teacher_phase_on_changed_images_files_a_new_version_and_each_student_gets_its_images_teacher(
        tmp_path, monkeypatch):
    folder = image_folder(tmp_path)
    v1 = stored_teacher(tmp_path, "teacher_1", *folder)
    v1_state = state(v1.parent)
    extra = tmp_path / "images" / "train" / CLASSES[0] / "added.bmp"
    shutil.copy(extra.parent / "000.bmp", extra)  # one image added to the folder

    loads = []
    load_data = engine.load_data
    monkeypatch.setattr(engine, "load_data", lambda *a, **k: loads.append(1) or load_data(*a, **k))
    v2 = stored_teacher(tmp_path, "teacher_2", *folder)  # no retrain_teacher: v1 was trained on other images
    assert v2 == v1.parent.parent / "v2" / "teacher.pt" and len(loads) == 1  # the data decoded once
    assert state(v1.parent) == v1_state  # v1 as it was
    digests = [teachers.read_manifest(v.parent)["train_digest"] for v in (v1, v2)]
    assert digests[0] != digests[1]

    student = [*STUDENT, *folder]
    assert engine.run(compose_cfg(tmp_path, *student), tmp_path / "student_new")["teacher/sha256"] == sha(v2)
    extra.unlink()  # the images v1 was trained on: v1 serves them, although v2 is newer
    assert engine.run(compose_cfg(tmp_path, *student), tmp_path / "student_old")["teacher/sha256"] == sha(v1)
    monkeypatch.setattr(engine, "fit", lambda *a, **k: pytest.fail("the stored teacher was trained again"))
    assert stored_teacher(tmp_path, "teacher_3", *folder) == v1


def test_a_student_whose_store_holds_its_teacher_only_for_other_images_is_refused_with_the_command(tmp_path):
    folder = image_folder(tmp_path)
    v1 = stored_teacher(tmp_path, "teacher_1", *folder)
    write_folder(tmp_path / "images", seed=1, parts=("train",))  # replaced images
    before = state(tmp_path)
    with pytest.raises(teachers.MissingTeacher, match=(
            "no trained teacher for this config trained on these training images \\(the stored versions were "
            f"trained on other images\\) in {v1.parent.parent}. Train it first:\n  python train.py phase=teacher")):
        engine.run(compose_cfg(tmp_path, *STUDENT, *folder), tmp_path / "student")
    assert state(tmp_path) == {**before, "student": state(tmp_path)["student"]}  # a folder holding only its .lock
    assert not [p for p in (tmp_path / "student").iterdir() if p.name != ".lock"]


# ---------------------------------------------------------------------------------------------------------------
# damaged and earlier records


def test_a_stored_manifest_without_config_is_refused_naming_it(tmp_path):
    v1 = stored_teacher(tmp_path, "teacher_1")
    edit_manifest(v1.parent, lambda manifest: manifest.pop("config"))
    before = state(tmp_path)
    message = (f"{v1.parent / 'manifest.json'} is damaged \\(it holds no config\\). Delete the version folder "
               f"{v1.parent} to train that teacher again.")
    for phase, folder in ((TEACHER, "teacher_2"), (STUDENT, "student")):
        with pytest.raises(fileio.CorruptRecord, match=message):
            engine.run(compose_cfg(tmp_path, *phase), tmp_path / folder)
        assert not [p for p in (tmp_path / folder).iterdir() if p.name != ".lock"]
    assert {k: v for k, v in state(tmp_path).items() if k not in ("teacher_2", "student")} == before


def test_a_last_pt_of_an_earlier_version_resumes_unless_the_store_holds_several_versions(tmp_path, monkeypatch,
                                                                                        caplog):
    v1 = stored_teacher(tmp_path, "teacher_1")
    run = tmp_path / "student"
    with caplog.at_level(logging.INFO, logger="kd.teacher_checks"):  # train.py logs INFO lines into train.log
        interrupt(monkeypatch, compose_cfg(tmp_path, *STUDENT), run)
    last = torch.load(run / "last.pt", weights_only=True)
    for key in ("teacher_sha256", "teacher_checkpoint", "train_digest"):  # as the previous code wrote it
        del last[key]
    torch.save(last, run / "last.pt")
    copy = Path(shutil.copytree(run, tmp_path / "student_copy"))

    with caplog.at_level(logging.WARNING, logger="kd.engine"):
        resumed = engine.run(compose_cfg(tmp_path, *STUDENT), run)  # one version: the one it was trained with
    assert "records neither its teacher's sha256 nor its training images' digest" in caplog.text
    assert (resumed["teacher/sha256"], resumed["epochs"]) == (sha(v1), 2)

    stored_teacher(tmp_path, "teacher_2", "retrain_teacher=true")
    before = state(tmp_path)
    with pytest.raises(ValueError, match=(
            f"cannot resume {copy / 'last.pt'}: it records no teacher sha256 .* the store holds 2 versions of its "
            f"teacher in {v1.parent.parent} \\(v1, v2\\): which one it was trained with cannot be told here \\(its "
            "train.log names it.*Resume with teacher_checkpoint=<that teacher.pt>, or start over")):
        engine.run(compose_cfg(tmp_path, *STUDENT), copy)
    assert state(tmp_path) == before
    assert f"teacher {v1} (kd)" in (copy / "train.log").read_text()  # where the message sends the user
    resumed = engine.run(compose_cfg(tmp_path, *STUDENT, f"teacher_checkpoint={v1}"), copy)
    assert (resumed["teacher/sha256"], resumed["epochs"]) == (sha(v1), 2)


def test_a_stored_teacher_whose_manifest_predates_data_digests_is_still_served(tmp_path, monkeypatch, caplog):
    v1 = stored_teacher(tmp_path, "teacher_1")
    edit_manifest(v1.parent, lambda manifest: manifest.pop("train_digest"))  # as the previous code filed it
    monkeypatch.setattr(engine, "fit", lambda *a, **k: pytest.fail("the stored teacher was trained again"))
    with caplog.at_level(logging.WARNING, logger="kd.teachers"):
        assert stored_teacher(tmp_path, "teacher_2") == v1
    assert f"{v1.parent} records no digest of the images it was trained on" in caplog.text
    monkeypatch.undo()
    assert engine.run(compose_cfg(tmp_path, *STUDENT), tmp_path / "student")["teacher/sha256"] == sha(v1)
