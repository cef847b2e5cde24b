"""Where a student's teacher comes from: the store, keyed by the teacher's own recipe (never the student's); a
published checkpoint by path or from a teachers_dir in RepDistiller's / mdistiller's layout, in any accepted format,
loaded strictly; and the errors a wrong file gets."""
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize
from hydra.utils import instantiate
from omegaconf import OmegaConf

import kd.config  # noqa: F401  (registers the schema)
from kd import checkpoints, engine, fileio, records, teachers
from test_reliability import compose_cfg as tiny_cfg

REPO = Path(__file__).resolve().parents[1]
PAIRS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("crd_*.yaml"))
# Every teacher of the CRD paper's two CIFAR-100 tables, by our model names (which are RepDistiller's).
PUBLISHED_TEACHERS = ("resnet56", "resnet110", "resnet32x4", "wrn_40_2", "vgg13", "ResNet50")

pytestmark = pytest.mark.usefixtures("one_thread")


def compose_pair(*overrides: str):
    with initialize(version_base="1.3", config_path="../conf"):
        return compose("config", overrides=list(overrides))


def model_node(name: str, num_classes: int = 100, width: float = 1.0):
    node = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
    return OmegaConf.merge(node, {"num_classes": num_classes, "width": width})


def published_file(folder: Path, name: str, model: torch.nn.Module, accuracy: float) -> Path:
    """A checkpoint as RepDistiller's train_teacher.py saves it (and mdistiller's cifar_teachers.tar ships it)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    path = folder / teachers.PUBLISHED_LAYOUT.format(model=name)
    path.parent.mkdir(parents=True)
    torch.save({"epoch": 240, "model": model.state_dict(), "accuracy": torch.tensor(accuracy),
                "optimizer": optimizer.state_dict()}, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# the teacher's own recipe


def test_the_13_pairs_compose_and_pairs_of_one_teacher_model_share_its_store_entry():
    assert len(PAIRS) == 13
    entries: dict[str, set[Path]] = {}
    for pair in PAIRS:
        cfg = compose_pair(f"experiment={pair}", "phase=student")
        entries.setdefault(records.model_name(cfg.teacher), set()).add(teachers.entry_dir(cfg, cfg.teacher_seed))
        # The student's recipe is the student's alone: a quick, smaller-batch, other-lr student finds the same teacher.
        quick = compose_pair(f"experiment={pair}", "phase=student", "epochs=1", "batch_size=32", "optimizer.lr=0.2")
        assert teachers.entry_dir(quick, 0) == teachers.entry_dir(cfg, 0), pair
        assert OmegaConf.to_container(cfg.teacher_recipe, resolve=True)["optimizer"]["lr"] == 0.05  # CRD's teachers
    assert all(len(found) == 1 for found in entries.values()), entries
    assert {"vgg13", "ResNet50", "resnet32x4", "wrn_40_2"} <= {name for name in entries}
    students = {pair: compose_pair(f"experiment={pair}").optimizer.lr for pair in PAIRS}
    assert {pair for pair, lr in students.items() if lr == 0.01} == {
        "crd_vgg13_mobilenetv2", "crd_ResNet50_mobilenetv2", "crd_resnet32x4_shufflenetv1",
        "crd_resnet32x4_shufflenetv2", "crd_wrn_40_2_shufflenetv1"}


def test_the_teacher_phase_trains_with_teacher_recipe_and_refuses_the_students_recipe_on_its_command_line(tmp_path):
    cfg = tiny_cfg(tmp_path, "teacher_recipe=crd", "teacher_recipe.epochs=1", "epochs=7", "phase=teacher")
    result = engine.run(cfg, tmp_path / "teacher")
    assert result["epochs"] == 1 and result["config"]["epochs"] == 1  # the record shows the recipe that trained it
    with pytest.raises(ValueError, match=r"phase=teacher trains with teacher_recipe, and epochs=7 set the student's "
                                         r"recipe.*teacher_recipe\.epochs=.*teacher_recipe=student"):
        engine.run(cfg, tmp_path / "refused", overrides=["phase=teacher", "epochs=7"])
    student = engine.run(tiny_cfg(tmp_path, "teacher_recipe=crd", "teacher_recipe.epochs=1", "epochs=2",
                                  "phase=student"), tmp_path / "student")
    assert student["epochs"] == 2 and student["teacher_checkpoint"] == result["teacher_checkpoint"]


def test_the_missing_teacher_command_keeps_the_teachers_recipe_and_drops_the_students():
    cfg = compose_pair("experiment=crd_vgg13_mobilenetv2", "phase=student")
    overrides = ["experiment=crd_vgg13_mobilenetv2", "phase=student", "optimizer.lr=0.02", "epochs=5",
                 "teacher_recipe.epochs=30", "loss.alpha=0.5"]
    command = teachers.teacher_command(cfg, overrides)
    assert command == "python train.py phase=teacher seed=0 experiment=crd_vgg13_mobilenetv2 teacher_recipe.epochs=30"
    shared = compose_pair("experiment=crd_vgg13_mobilenetv2", "teacher_recipe=student")
    assert "epochs=5" in teachers.teacher_command(shared, [*overrides, "teacher_recipe=student"])


# ---------------------------------------------------------------------------------------------------------------
# published teachers: layout, formats, strict loading


def test_the_published_layout_loads_strictly_for_every_teacher_of_both_tables(tmp_path):
    for name in PUBLISHED_TEACHERS:
        model = instantiate(model_node(name))
        path = published_file(tmp_path, name, model, 72.34)
        assert teachers.published_teacher(tmp_path, name) == path
        teacher = checkpoints.read_teacher_file(path, model_node(name))
        assert (teacher.format, teacher.recorded_acc1) == ("repdistiller", pytest.approx(72.34))
        assert teacher.state_dict.keys() == model.state_dict().keys()
        teachers.build(teacher, model_node(name), torch.device("cpu"))  # load_state_dict(strict=True)


def test_every_accepted_format_reads_and_a_pickle_with_objects_is_refused_unrun(tmp_path):
    from safetensors.torch import save_file

    model = instantiate(model_node("resnet8", 10))
    state = model.state_dict()
    torch.save(state, tmp_path / "bare.pt")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "data_parallel.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "weights.safetensors"))
    for name, fmt in (("bare.pt", "state_dict"), ("data_parallel.pth", "state_dict"),
                      ("weights.safetensors", "safetensors")):
        teacher = checkpoints.read_teacher_file(tmp_path / name, model_node("resnet8", 10))
        assert teacher.format == fmt and all(torch.equal(teacher.state_dict[k], v) for k, v in state.items())
    marker = tmp_path / "ran"
    torch.save({"model": state, "accuracy": Opener(marker)}, tmp_path / "evil.pth")
    with pytest.raises(fileio.UnusableCheckpoint, match="holds objects other than tensors and plain values"):
        checkpoints.read_teacher_file(tmp_path / "evil.pth", model_node("resnet8", 10))
    assert not marker.exists()


class Opener:
    """Unpickling this would create a file: what a malicious checkpoint does."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.mark.parametrize("file_model, message", [
    (("resnet56", 10, 1.0), r"mis-shaped \(2\): fc\.weight \(10, 64\) in the file, \(100, 64\) in the model.*"
                            r"It fits: model@teacher=resnet56 teacher\.width=1 \(10 classes\)"),
    (("resnet56", 100, 0.5), r"mis-shaped \(\d+\): conv1\.weight \(8, 3, 3, 3\) in the file, \(16, 3, 3, 3\).*"
                             r"It fits: model@teacher=resnet56 teacher\.width=0\.5 \(100 classes\)"),
    (("resnet110", 100, 1.0), r"unexpected \(\d+\): layer1\.9\..*It fits: model@teacher=resnet110 teacher\.width=1"),
])
def test_a_file_that_does_not_fit_names_its_keys_and_the_option_that_would(tmp_path, file_model, message):
    torch.save(instantiate(model_node(*file_model)).state_dict(), tmp_path / "teacher.pt")
    with pytest.raises(ValueError, match=r"teacher checkpoint .*teacher\.pt \(state_dict format\) does not fit "
                                         r"model@teacher=resnet56 \(num_classes=100, width=1\): " + message):
        checkpoints.read_teacher_file(tmp_path / "teacher.pt", model_node("resnet56"))


def test_a_teachers_dir_without_the_pairs_teacher_names_the_file(tmp_path):
    published_file(tmp_path, "vgg13", instantiate(model_node("vgg13")), 74.64)
    with pytest.raises(FileNotFoundError, match=r"teachers_dir=.* has no teacher for model@teacher=resnet56: expected "
                                                r".*resnet56_vanilla/ckpt_epoch_240\.pth .*found: vgg13_vanilla"):
        teachers.published_teacher(tmp_path, "resnet56")


# ---------------------------------------------------------------------------------------------------------------
# a published teacher end to end


@pytest.fixture(scope="module")
def published_dir(tmp_path_factory) -> tuple[Path, float]:
    """A teachers_dir holding a digits teacher in RepDistiller's format (trained here, then saved their way)."""
    tmp = tmp_path_factory.mktemp("published")
    result = engine.run(tiny_cfg(tmp, "phase=teacher", "epochs=2"), tmp / "run")
    payload = torch.load(result["teacher_checkpoint"], weights_only=True)
    model = instantiate(payload["arch"])
    model.load_state_dict(payload["model"])
    published_file(tmp / "cifar_teachers", "simple_cnn", model, result["test/acc1"])
    return tmp / "cifar_teachers", result["test/acc1"]


def test_a_student_distils_from_a_published_teacher_and_records_it(published_dir, tmp_path):
    folder, accuracy = published_dir
    overrides = ["phase=student", "epochs=2", f"teachers_dir={folder}"]
    first = engine.run(tiny_cfg(tmp_path, *overrides), tmp_path / "first")
    path = folder / "simple_cnn_vanilla" / "ckpt_epoch_240.pth"
    assert first["teacher_checkpoint"] == str(path) and first["teacher/sha256"] == fileio.sha256_file(path)
    assert (first["teacher/source"], first["teacher/format"]) == ("teachers_dir", "repdistiller")
    assert first["teacher/acc1"] == pytest.approx(accuracy)
    assert first["teacher/recorded_acc1"] == pytest.approx(accuracy)
    engine.run(tiny_cfg(tmp_path, *overrides), tmp_path / "second")  # the teacher cache keys on the file's sha256
    assert json.loads((tmp_path / "second" / "run_info.json").read_text())["teacher_cache/hits"] == 2
    assert not list(folder.rglob("*cache*"))  # nothing is written beside a published teacher


def test_a_published_teacher_far_from_its_own_figure_is_warned_about(published_dir, tmp_path, caplog):
    folder, accuracy = published_dir
    payload = torch.load(folder / "simple_cnn_vanilla" / "ckpt_epoch_240.pth", weights_only=True)
    payload["accuracy"] = torch.tensor(accuracy + 20.0)
    torch.save(payload, tmp_path / "far.pth")
    result = engine.run(tiny_cfg(tmp_path, "phase=student", "epochs=1", f"teacher_checkpoint={tmp_path}/far.pth"),
                        tmp_path / "run")
    assert result["teacher/source"] == "file" and result["teacher/recorded_acc1"] == pytest.approx(accuracy + 20)
    assert any("in its file (more than teacher_acc_tolerance" in r.getMessage() for r in caplog.records)
