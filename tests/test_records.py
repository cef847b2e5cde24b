"""Records that cannot lie: content-addressed and verified caches, one writer per run folder, refused runs and
sweeps that change nothing on disk, an immutable teacher store, bounded job folder names, and errors that name the
file and the fix. The seven numbered tests are the seven cases of the issue, each of which gave a wrong or misleading
record silently before.
"""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kd.config  # noqa: F401  (registers the schema)
import kd.models
from kd import data, engine, fileio, records, report, teacher_cache, teachers
from support import forked
from support.folders import CLASSES, FOLDER, TRAIN_PER_CLASS, write_folder
from support.jobs import fake_config, fake_job
from support.runs import KILL_RUNNER, REPO, TINY, compose_cfg, launch, no_data, report_text, trained


def folder_overrides(tmp: Path, root: Path, *extra: str) -> list[str]:
    return [*FOLDER, f"dataset.source.root={root}", f"dataset.source.cache_dir={tmp / 'decode_cache'}", *extra]


def info(run: Path) -> dict:
    return json.loads((run / "run_info.json").read_text())


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder and its bytes (the run folders' .lock, which names its last holder, aside)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


# ---------------------------------------------------------------------------------------------------------------
# 1. stale teacher outputs


def test_1_new_image_content_under_old_names_sizes_and_mtimes_is_never_served_stale(tmp_path):
    root = tmp_path / "images"
    write_folder(root, seed=0)
    common = ["phase=student", "epochs=3", *folder_overrides(tmp_path, root), "teacher_acc_tolerance=100"]
    teacher = ["phase=teacher", "epochs=3", *folder_overrides(tmp_path, root)]
    stored = engine.run(compose_cfg(tmp_path, *teacher), tmp_path / "teacher")["teacher_checkpoint"]
    # By path: the store serves a teacher only for the images it was trained on (tests/test_resume_identity.py).
    common.append(f"teacher_checkpoint={stored}")
    first = engine.run(compose_cfg(tmp_path, *common), tmp_path / "student_1")  # fills both caches
    assert info(tmp_path / "student_1")["teacher_cache/misses"] == 3

    stats = {p: p.stat() for p in (root / "train").rglob("*.bmp")}
    write_folder(root, seed=1, parts=("train",))  # new pixels, same names, count and sizes
    for path, stat in stats.items():
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert path.stat().st_size == stat.st_size
    again = engine.run(compose_cfg(tmp_path, *common), tmp_path / "student_2")
    truth = engine.run(compose_cfg(tmp_path, *common, "teacher_cache=false", "dataset.source.cache_dir=null"),
                       tmp_path / "student_truth")  # decodes every image and runs the teacher live
    assert trained(again) == trained(truth) != trained(first)
    assert info(tmp_path / "student_2")["teacher_cache/hits"] == 0  # another training set: another entry


# ---------------------------------------------------------------------------------------------------------------
# 2. tampered cache entries


def test_2_tampered_cache_entries_are_deleted_recomputed_and_never_used(tmp_path, caplog):
    engine.run(compose_cfg(tmp_path, "phase=teacher", "epochs=3"), tmp_path / "teacher")
    student = ["phase=student", "epochs=3"]
    live = engine.run(compose_cfg(tmp_path, *student, "teacher_cache=false"), tmp_path / "live")
    engine.run(compose_cfg(tmp_path, *student), tmp_path / "writer")
    entry = Path(info(tmp_path / "writer")["teacher_cache/dir"])
    key = json.loads((entry / "key.json").read_text())
    assert key["model_code"]["modules"] == ["kd.models", "kd.models.simple_cnn"]  # the teacher's own model code
    files = [entry / f"epoch_{epoch:04d}.pt" for epoch in (1, 2, 3)]
    shape = torch.load(files[0], weights_only=True)["logits"].shape
    shutil.copy(files[0], files[2])  # a valid file of another epoch, under this epoch's name
    torch.save(torch.randn(shape), files[0])  # random logits of the right shape
    forged = torch.load(files[1], weights_only=True)
    forged["logits"] = torch.randn(shape)  # random rows under the old checksum
    torch.save(forged, files[1])
    reader = engine.run(compose_cfg(tmp_path, *student), tmp_path / "reader")
    assert trained(reader) == trained(live)
    assert (info(tmp_path / "reader")["teacher_cache/rejected"], info(tmp_path / "reader")["teacher_cache/hits"]) == (
        3, 0)
    warnings = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert [w.split("rejected (")[1].split(")")[0] for w in warnings] == [
        "not an epoch file of this cache", "its checksum does not match its rows",
        f"written for entry {entry.name} epoch 1"]
    again = engine.run(compose_cfg(tmp_path, *student), tmp_path / "again")  # recomputed, stored, verified
    assert trained(again) == trained(live) and info(tmp_path / "again")["teacher_cache/hits"] == 3


def test_decode_cache_checksum_is_verified_and_a_bad_file_rebuilt(tmp_path, caplog):
    root, cache = tmp_path / "images", tmp_path / "cache"
    write_folder(root, seed=0)
    first = data.image_folder(str(root), 16, cache_dir=str(cache))
    (path,) = cache.glob("*.pt")
    stored = torch.load(path, weights_only=True)
    stored["train"][0][0] = 255 - stored["train"][0][0]  # one image changed, checksum kept
    torch.save(stored, path)
    again = data.image_folder(str(root), 16, cache_dir=str(cache))
    assert torch.equal(again.train.images, first.train.images)
    assert any("decode cache file" in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records)
    assert torch.load(path, weights_only=True)["checksum"] == stored["checksum"]  # rewritten from the images


# ---------------------------------------------------------------------------------------------------------------
# 3. refused reruns change nothing on disk


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory) -> Path:
    """A finished 2-job student sweep (its teacher trained on demand first), through train.py -m."""
    tmp = tmp_path_factory.mktemp("sweep")
    proc = launch(tmp / "sweep", "phase=student", "epochs=1", "loss.alpha=0,0.9", "train_missing_teacher=true",
                  multirun=True)
    assert proc.returncode == 0, proc.stdout
    return tmp / "sweep"


@pytest.mark.slow
def test_3_refused_reruns_of_a_job_and_of_a_sweep_leave_every_record_as_it_was(finished_sweep, tmp_path):
    sweep = Path(shutil.copytree(finished_sweep, tmp_path / "sweep"))
    before = snapshot(sweep)
    assert "None: every expected job has a result.json." in report_text(sweep, tmp_path / "r0")
    job = sweep / "loss.alpha=0.9"
    rerun = launch(job, "phase=student", "epochs=1", "loss.alpha=0.5")  # one job's folder, another alpha
    assert rerun.returncode != 0 and "run.json was written by another config" in rerun.stdout
    assert "loss.alpha: 0.9 -> 0.5" in rerun.stdout
    other_teacher = launch(sweep, "phase=student", "epochs=1", "loss.alpha=0,0.9", "train_missing_teacher=true",
                           f"teacher_checkpoint={tmp_path / 'elsewhere.pt'}", multirun=True)
    assert other_teacher.returncode != 0
    assert "holds another sweep (teacher_checkpoint: not set ->" in other_teacher.stdout
    assert snapshot(sweep) == before  # run.json, result.json, train.log, multirun.yaml, sweep.json: all as they were
    markdown = report_text(sweep, tmp_path / "r1")
    assert "None: every expected job has a result.json." in markdown and "2 jobs in sweep.json's grid" in markdown


# ---------------------------------------------------------------------------------------------------------------
# 4. one writer per run folder


@pytest.mark.slow
def test_4_a_second_process_in_a_busy_run_folder_is_refused_and_a_dead_holders_lock_taken_over(tmp_path):
    run, pause = tmp_path / "run", tmp_path / "pause"
    pause.mkdir()
    args = ["phase=student", "loss=ce", "teacher_checkpoint=none", "epochs=2", "logger.mode=offline"]
    env = {**os.environ, "KD_KILL_AT": "pause:2:0", "KD_PAUSE_DIR": str(pause)}
    holder = forked.start([KILL_RUNNER, f"hydra.run.dir={run}", *TINY, f"teacher_store={tmp_path}/t", *args], REPO, env)
    try:
        forked.wait_for(pause / "paused", holder)  # the holder is inside epoch 2, its lock held
        second = launch(run, *args)
        assert second.returncode != 0, second.stdout
        assert f"is in use by another run (pid {holder.pid} on " in second.stdout and ", started 20" in second.stdout
    finally:
        holder.kill()  # SIGKILL: the holder dies with the lock held
    assert holder.wait(timeout=60).returncode == -signal.SIGKILL
    third = launch(run, *args)  # the OS released the dead holder's lock: the next run takes it over and resumes
    assert third.returncode == 0, third.stdout
    assert "resuming" in third.stdout and f"pid {holder.pid}" not in (run / ".lock").read_text()
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    wandb_id = json.loads((run / "run.json").read_text())["wandb_id"]
    assert {p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")} == {wandb_id}


def test_run_lock_names_its_holder_and_is_released_after_the_run(tmp_path):
    with fileio.folder_lock(tmp_path / "run"):
        holder = (tmp_path / "run" / ".lock").read_text()
        assert holder.startswith(f"pid {os.getpid()} on ")
        script = tmp_path / "probe.py"  # another process asks for the same lock
        script.write_text("import sys\nfrom pathlib import Path\nfrom kd import fileio\n"
                          "with fileio.folder_lock(Path(sys.argv[1])):\n    pass\n")
        probe = forked.run([str(script), str(tmp_path / "run")], REPO, timeout=120)
        assert probe.returncode != 0 and f"in use by another run ({holder.strip()})" in probe.stdout
    with fileio.folder_lock(tmp_path / "run"):  # released: taken again
        pass


# ---------------------------------------------------------------------------------------------------------------
# 5. another sweep into a sweep folder


@pytest.mark.slow
def test_5_a_sweep_folder_takes_its_own_sweep_resumed_or_extended_and_refuses_others(finished_sweep, tmp_path):
    sweep = Path(shutil.copytree(finished_sweep, tmp_path / "sweep"))
    before = snapshot(sweep)
    base = ["phase=student", "epochs=1", "train_missing_teacher=true"]
    for overrides, named in (
        (["loss.alpha=0,0.9", "loss.temperature=2"], "loss.temperature: not set -> 2"),
        (["loss.alpha=0,0.5"], "loss.alpha: 0,0.9 -> 0,0.5 (drops 0.9)"),
        (["loss.alpha=0,0.9", "seed=0,1"], "swept keys: loss.alpha -> loss.alpha, seed"),
    ):
        proc = launch(sweep, *base, *overrides, multirun=True)
        assert proc.returncode != 0 and named in proc.stdout, proc.stdout
        assert f"hydra.sweep.dir={sweep}_2" in proc.stdout
    assert snapshot(sweep) == before
    extended = launch(sweep, *base, "loss.alpha=0,0.5,0.9", multirun=True)  # adds one job
    assert extended.returncode == 0, extended.stdout
    assert extended.stdout.count("already holds this run's result.json") == 2
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [f"loss.alpha={a}" for a in ("0", "0.5", "0.9")]
    assert all(snapshot(sweep)[name] == content for name, content in before.items()
               if not name.endswith(("sweep.json", "multirun.yaml")))
    assert len(json.loads((sweep / "sweep.json").read_text())["grid"]) == 3


# ---------------------------------------------------------------------------------------------------------------
# 6. an immutable teacher store


def test_6_a_stored_teacher_is_returned_not_retrained_and_retraining_files_a_new_version(tmp_path, monkeypatch):
    first = engine.run(compose_cfg(tmp_path, "phase=teacher", "epochs=2"), tmp_path / "teacher_1")
    v1 = Path(first["teacher_checkpoint"])
    stat, content = v1.stat(), v1.read_bytes()
    assert not stat.st_mode & 0o222 and not (v1.parent / "manifest.json").stat().st_mode & 0o222  # read-only

    def no_training(*args, **kwargs):
        raise AssertionError("the stored teacher was trained again")

    monkeypatch.setattr(engine, "fit", no_training)
    again = engine.run(compose_cfg(tmp_path, "phase=teacher", "epochs=2", "logger.mode=offline"),
                       tmp_path / "teacher_2")
    assert again["teacher_checkpoint"] == str(v1) and trained(again) == trained(first)
    assert json.loads((tmp_path / "teacher_2" / "result.json").read_text())["teacher_checkpoint"] == str(v1)
    with pytest.raises(ValueError, match=r"manifest\.json was written by another config \(recorded -> now: "
                                         r"precision: 'auto' -> 'bf16'\).*retrain_teacher=true"):
        engine.run(compose_cfg(tmp_path, "phase=teacher", "epochs=2", "precision=bf16"), tmp_path / "teacher_3")
    monkeypatch.undo()

    retrained = engine.run(compose_cfg(tmp_path, "phase=teacher", "epochs=2", "retrain_teacher=true"),
                           tmp_path / "teacher_4")
    v2 = Path(retrained["teacher_checkpoint"])
    assert v2 == v1.parent.parent / "v2" / "teacher.pt" and v1.read_bytes() == content
    assert (v1.stat().st_mtime_ns, v1.stat().st_ino) == (stat.st_mtime_ns, stat.st_ino)
    student = engine.run(compose_cfg(tmp_path, "phase=student", "epochs=2"), tmp_path / "student")
    assert student["teacher_checkpoint"] == str(v2)  # students use the newest version
    assert student["teacher/sha256"] == fileio.sha256_file(v2) and student["teacher/source"] == "store"


def test_report_flags_rows_of_one_pair_that_used_different_teachers(tmp_path, capsys):
    for number, (alpha, sha) in enumerate(((0.9, "a" * 64), (0.5, "b" * 64))):
        config = fake_config({"_target_": "kd.methods.kd.KDLoss", "alpha": alpha}, 1.0, 0,
                             teacher={"_target_": "kd.models.cifar_resnet.resnet56"})
        fake_job(tmp_path / f"job{number}", [f"loss.alpha={alpha}"], config,
                 **{"test/acc1": 60.0, "test/acc1_best": 60.0, "teacher/sha256": sha})
    assert report.main([str(tmp_path)]) == 0
    line = "**Different teachers for resnet56 -> simple_cnn**: aaaaaaaaaaaa (rows #1); bbbbbbbbbbbb (rows #2)"
    assert line in (tmp_path / "report.md").read_text() and "Different teachers" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# 7. long sweep command lines


@pytest.mark.slow
def test_7_a_sweep_with_fifteen_long_overrides_runs_in_bounded_folders(tmp_path):
    root = tmp_path / ("a_data_folder_with_a_long_name_" * 4) / "images"
    write_folder(root, seed=0)
    long_name = "run_named_at_length_" * 14  # 280 characters: a folder name of its own would be too long
    overrides = [  # 15 on the command line, each long enough to matter, two of them swept
        *folder_overrides(tmp_path, root), "dataset.source.max_per_class=8", "model@teacher=simple_cnn",
        "model@student=simple_cnn", "student.width=0.25", "epochs=1", "optimizer.lr=0.0500000000",
        "optimizer.weight_decay=0.0005000000", "scheduler=multistep", "scheduler.milestones=[150,180,210]",
        "phase=student", "loss.temperature=4.000000000", "train_missing_teacher=true",
        f"logger.name={long_name}A,{long_name}B",
    ]
    proc = launch(tmp_path / "sweep", *overrides, multirun=True)
    assert proc.returncode == 0, proc.stdout
    names = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert len(names) == 2 and all(len(n.encode()) <= 200 and n.startswith("logger.name=run_named_at") for n in names)
    assert names[0] != names[1] and all((tmp_path / "sweep" / n / "result.json").is_file() for n in names)
    assert records.bounded_name("a/b") == "a%2Fb" and len(records.bounded_name("é" * 300).encode()) <= 200


# ---------------------------------------------------------------------------------------------------------------
# caches keyed by their code, exact under every precision


def test_the_code_behind_cached_teacher_outputs_matches_its_recorded_version():
    digest = teacher_cache.output_code_digest()
    newest = teacher_cache.OUTPUT_CODE_VERSION
    assert teacher_cache.OUTPUT_CODE_VERSIONS[newest] == digest, (
        "the code that computes cached teacher outputs changed (teacher_cache.OUTPUT_CODE): add "
        f"{newest + 1}: {digest!r} to OUTPUT_CODE_VERSIONS in kd/teacher_cache.py, so no output of the old code is "
        "read again"
    )


NEW_MODEL = """from torch import nn

from kd.models import GlobalAvgPool


def new_net(num_classes: int, width: float = 1.0) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, num_classes, 1), GlobalAvgPool(), nn.Flatten())
"""


def test_a_teachers_cache_key_covers_its_own_model_code_and_no_other_model_file(tmp_path, monkeypatch):
    """A new model file (imported, as the zoo's are) changes no existing key and needs no version bump; editing another
    model's file leaves the key; editing the teacher's own file, or its library's version, changes it."""
    import torchvision

    from kd.models import cifar_resnet, vgg
    from kd.models.torchvision_models import torchvision_model

    teacher = cifar_resnet.resnet8(10, width=0.25)
    key = lambda: teacher_cache.model_code(teacher, "kd.models.cifar_resnet.resnet8")  # noqa: E731
    before, digest = key(), teacher_cache.output_code_digest()
    assert (before["modules"], before["libraries"]) == (["kd.models", "kd.models.cifar_resnet"], {})
    (tmp_path / "new_net.py").write_text(NEW_MODEL)
    spec = importlib.util.spec_from_file_location("kd.models.new_net", tmp_path / "new_net.py")
    new_net = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "kd.models.new_net", new_net)
    spec.loader.exec_module(new_net)
    monkeypatch.setattr(kd.models, "new_net", new_net, raising=False)
    assert key() == before and teacher_cache.output_code_digest() == digest
    assert teacher_cache.model_code(new_net.new_net(10), "kd.models.new_net.new_net")["modules"] == [
        "kd.models", "kd.models.new_net"]

    def edit(module) -> None:  # the module's file, as it reads after an edit
        copy = tmp_path / Path(module.__file__).name
        copy.write_text(Path(module.__file__).read_text() + "\n# an edit\n")
        monkeypatch.setattr(module, "__file__", str(copy))

    edit(vgg)  # another model's file
    assert key() == before
    edit(cifar_resnet)  # the teacher's own
    assert key()["sha256"] != before["sha256"]
    library = lambda: teacher_cache.model_code(  # noqa: E731
        torchvision_model("resnet18", 10), "kd.models.torchvision_models.torchvision_model")
    assert library()["libraries"] == {"torchvision": torchvision.__version__}
    old = library()
    monkeypatch.setattr(torchvision, "__version__", "0.0.1")
    assert library()["libraries"] == {"torchvision": "0.0.1"} and library()["sha256"] == old["sha256"]


def test_cached_teacher_equals_the_live_one_under_bf16_autocast(tmp_path):
    engine.run(compose_cfg(tmp_path, "phase=teacher", "epochs=2"), tmp_path / "teacher")
    student = ["phase=student", "precision=bf16", "teacher_acc_tolerance=100", "epochs=2"]
    live = engine.run(compose_cfg(tmp_path, *student, "teacher_cache=false"), tmp_path / "live")
    for dtype in ("float32", "bfloat16"):  # bf16 storage holds bf16 logits exactly
        cfg = compose_cfg(tmp_path, *student, f"teacher_cache_dtype={dtype}")
        engine.run(cfg, tmp_path / f"writer_{dtype}")
        reader = engine.run(cfg, tmp_path / f"reader_{dtype}")
        assert info(tmp_path / f"reader_{dtype}")["teacher_cache/hits"] == 2
        assert trained(reader) == trained(live)


# ---------------------------------------------------------------------------------------------------------------
# errors that name the file and the fix


def test_truncated_image_is_named(tmp_path):
    root = tmp_path / "images"
    write_folder(root, seed=0)
    bad = root / "train" / "dog" / "003.bmp"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{bad} cannot be decoded as an image .*truncated or corrupt. Replace"):
        data.image_folder(str(root), 16, scan=False)  # past the pre-flight scan, which lists it first


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    levels = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(levels).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert data.read_image(tmp_path / "deep.png", 3)[0, :, 0].tolist() == [0, 100, 255]


def test_unwritable_decode_cache_is_skipped_with_one_warning(tmp_path, caplog):
    root = tmp_path / "images"
    write_folder(root, seed=0)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    for _ in range(2):
        splits = data.image_folder(str(root), 16, cache_dir=str(blocker / "cache"))
        assert len(splits.train) == 2 * TRAIN_PER_CLASS
    assert sum("cannot be written" in r.getMessage() for r in caplog.records) == 1


def test_damaged_records_name_the_file_and_the_way_out(tmp_path):
    cfg = compose_cfg(tmp_path, "phase=teacher", "epochs=2")
    result = engine.run(cfg, tmp_path / "run")
    (tmp_path / "run" / "result.json").write_text('{"config": {"seed": 0}, "test/acc')  # cut short
    with pytest.raises(fileio.CorruptRecord, match=r"run/result\.json is damaged \(not valid JSON.*Delete .*run to "
                                                    r"start this run over"):
        engine.run(cfg, tmp_path / "run")
    manifest = Path(result["teacher_checkpoint"]).parent / "manifest.json"
    manifest.chmod(0o644)
    manifest.write_text("[]")
    student = compose_cfg(tmp_path, "phase=student", "epochs=2")
    with pytest.raises(fileio.CorruptRecord, match=rf"{manifest} is damaged \(a JSON list.*Delete the version folder"):
        engine.run(student, tmp_path / "student")


def test_unwritable_teacher_store_is_refused_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(engine, "load_data", no_data)
    for phase in (["phase=teacher"], ["phase=student", "train_missing_teacher=true"]):
        cfg = compose_cfg(tmp_path, *phase, f"teacher_store={blocker / 'teachers'}")
        with pytest.raises(PermissionError, match=r"teacher_store=.*file/teachers cannot be written .*writable"):
            engine.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "run.json").exists()


def test_teacher_of_other_classes_or_another_class_order_is_refused(tmp_path):
    root = tmp_path / "images"
    write_folder(root, seed=0)
    teacher = engine.run(compose_cfg(tmp_path, "phase=teacher", "epochs=1", *folder_overrides(tmp_path, root)),
                         tmp_path / "t")
    payload = torch.load(teacher["teacher_checkpoint"], weights_only=True)
    assert payload["classes"] == list(CLASSES)
    for name, classes, what in (("swapped", ["dog", "cat"], "the same classes in another order"),
                                ("other", ["car", "dog"], r"other classes \(only the teacher's: \['car'\]")):
        torch.save({**payload, "classes": classes}, tmp_path / f"{name}.pt")
        cfg = compose_cfg(tmp_path, "phase=student", "epochs=1", *folder_overrides(tmp_path, root),
                          "teacher_acc_tolerance=100", f"teacher_checkpoint={tmp_path / name}.pt")
        with pytest.raises(ValueError, match=rf"was trained on {what}.* than this dataset"):
            engine.run(cfg, tmp_path / f"student_{name}")
        assert not (tmp_path / f"student_{name}" / "run.json").exists()


@pytest.mark.parametrize("overrides, message", [
    (["dataset.val_fraction=0.9999"], r"dataset\.val_fraction=0\.9999 leaves no training image of 1438"),
    (["dataset.crop_padding=20"], r"dataset\.crop_padding=20 is larger than the 16-pixel images"),
])
def test_data_dependent_settings_are_refused_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        engine.run(compose_cfg(tmp_path, "phase=teacher", *overrides), tmp_path / "run")
    assert not (tmp_path / "run" / "run.json").exists() and not (tmp_path / "run" / "train.log").exists()


# ---------------------------------------------------------------------------------------------------------------
# fault injection: SIGKILL at 20 points of a run's life, then the same command again


# A student that trains its teacher on demand, on an image folder with the decode cache and the teacher cache: every
# kind of record is written in one command. Relative paths, run from a folder of its own: the records are the same
# bytes in every folder, so runs can be compared file for file (and run two at a time).
STUDENT_RUN = [*FOLDER, "dataset.source.root=images", "dataset.source.cache_dir=decode_cache", "experiment=quickstart",
               "teacher_recipe=student",
               "model@teacher=simple_cnn", "teacher.width=0.25", "model@student=simple_cnn", "student.width=0.25",
               "epochs=2", "batch_size=16", "threads=1", "profile=false", "logger.mode=offline",
               "teacher_store=teachers", "phase=student", "train_missing_teacher=true", "hydra.run.dir=student"]
STUDENT_ONLY = ("phase=student", "train_missing_teacher=true", "hydra.run.dir=student")
TEACHER_RUN = [o for o in STUDENT_RUN if o not in STUDENT_ONLY] + ["phase=teacher", "hydra.run.dir=teacher"]
# Process epochs 1-2 train the teacher, 3-4 the student; three steps an epoch; N counts a file name's writes.
STUDENT_FAULTS = [
    "decode:10", "write:images_*.pt:1", "after:images_*.pt:1",  # data loading: decoding, the decode cache
    "step:1:1", "write:last.pt:1", "after:last.pt:1", "step:2:2", "write:last.pt:2",  # the teacher's epochs
    "write:teacher.pt:1", "write:manifest.json:1", "after:manifest.json:1", "write:result.json:1",  # its filing
    "write:run.json:2", "step:3:0", "step:3:2", "write:epoch_0001.pt:1", "write:last.pt:3",  # the student
    "write:epoch_0002.pt:1", "step:4:1", "write:last.pt:4", "write:run_info.json:2", "write:result.json:2",
]
TEACHER_FAULTS = ["write:teacher.pt:1", "write:manifest.json:1"]  # a teacher phase killed while filing itself


def run_in(folder: Path, args: list[str], kill_at: str = "") -> subprocess.CompletedProcess:
    script = REPO / (KILL_RUNNER if kill_at else "train.py")
    env = {**os.environ, "KD_KILL_AT": kill_at} if kill_at else dict(os.environ)
    return forked.run([str(script), *args], folder, env, timeout=600)


def check_nothing_half_written(folder: Path) -> None:
    """No store version, cache entry or run folder holds a file a later run could read half-written."""
    (entry,) = (folder / "teachers").iterdir()
    assert [v.name for v in teachers.versions(entry)] == ["v1"]
    manifest = json.loads((entry / "v1" / "manifest.json").read_text())
    assert manifest["sha256"] == fileio.sha256_file(entry / "v1" / "teacher.pt")
    for path in (folder / "teacher_cache").glob("*/epoch_*.pt"):
        stored = torch.load(path, weights_only=True)
        assert stored["sha256"] == teacher_cache._checksum(path.parent.name, stored["epoch"], stored["logits"])
    for path in (folder / "decode_cache").glob("*.pt"):
        stored = torch.load(path, weights_only=True)
        assert stored["checksum"] == fileio.sha256_tensors(*stored["train"], *stored["test"])
    for run in [p.parent for p in folder.rglob("run.json")]:
        for path in run.glob("*.json"):
            json.loads(path.read_text())
        for path in run.glob("*.pt"):
            torch.load(path, weights_only=True)
        wandb_id = json.loads((run / "run.json").read_text())["wandb_id"]
        assert {p.name.rsplit("-", 1)[1] for p in run.glob("wandb/offline-run-*")} <= {wandb_id}  # one W&B run
    # A killed write's temporary file is never read; the next holder of the folder's lock deletes it.
    assert not list((entry / "v1").glob(".*.tmp")) and not list((folder / "student").glob(".*.tmp"))


def killed_and_rerun(template: Path, folder: Path, args: list[str], kill_at: str, result: str) -> bytes:
    shutil.copytree(template, folder)
    killed = run_in(folder, args, kill_at)
    assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stdout[-3000:])
    rerun = run_in(folder, args)
    assert rerun.returncode == 0, (kill_at, rerun.stdout[-3000:])
    check_nothing_half_written(folder)
    return (folder / result / "result.json").read_bytes()


@pytest.mark.slow
def test_a_run_killed_at_any_of_20_points_and_rerun_ends_with_the_same_result_and_nothing_half_written(tmp_path):
    """The suite's longest test (about 10 minutes of a shared 2-core machine, run first): 50 train.py processes, 2
    references then each of the 24 faults killed and rerun, two at a time. Only a real process killed by SIGKILL shows
    what each point leaves on disk; support.forked spares each its interpreter's imports."""
    from concurrent.futures import ThreadPoolExecutor

    template = tmp_path / "template"
    write_folder(template / "images", seed=0)
    reference = {}
    for name, args in (("student", STUDENT_RUN), ("teacher", TEACHER_RUN)):
        shutil.copytree(template, tmp_path / f"reference_{name}")
        done = run_in(tmp_path / f"reference_{name}", args)
        assert done.returncode == 0, done.stdout[-3000:]
        reference[name] = (tmp_path / f"reference_{name}" / name / "result.json").read_bytes()
    trials = [("student", STUDENT_RUN, fault) for fault in STUDENT_FAULTS]
    trials += [("teacher", TEACHER_RUN, fault) for fault in TEACHER_FAULTS]
    with ThreadPoolExecutor(max_workers=2) as pool:  # two at a time: the records do not depend on the folder
        results = list(pool.map(lambda t: killed_and_rerun(template, tmp_path / f"{t[0]}_{t[2]}".replace(":", "_"),
                                                           t[1], t[2], t[0]), trials))
    for (name, _, fault), result in zip(trials, results):
        assert result == reference[name], fault


def test_a_run_recorded_before_the_methods_moved_is_returned_and_grouped_as_one_recorded_now(tmp_path):
    """Records of runs made while the criteria lived in kd.losses / kd.feature_losses / kd.review_kd name them there:
    a rerun returns such a run instead of refusing it as another config, and the report groups it with new runs."""
    cfg = compose_cfg(tmp_path, "phase=student", "loss=ce", "teacher_checkpoint=none", "epochs=1")
    run = tmp_path / "run"
    result = engine.run(cfg, run)
    for name in ("run.json", "result.json"):
        record = json.loads((run / name).read_text())
        assert record["config"]["loss"]["_target_"] == "kd.methods.base.CELoss"
        record["config"]["loss"]["_target_"] = "kd.losses.CELoss"
        (run / name).write_text(json.dumps(record))
    before = snapshot(run)
    assert engine.run(cfg, run)["test/acc1"] == result["test/acc1"]  # returned, not refused, not retrained
    assert snapshot(run) == before
    old = json.loads((run / "result.json").read_text())
    assert report.group_key(old) == report.group_key(result)
    unknown = records.plain_config(cfg)
    unknown["loss"]["_target_"] = "kd.losses.NotACriterion"  # only the classes that moved are renamed
    assert [d.split(":")[0] for d in records.config_differences(unknown, records.plain_config(cfg), ())] == [
        "loss._target_"]
