"""Pretrained teachers from torchvision and timm (teacher_checkpoint=torchvision:<Weights> / timm:<name>): the weights
come from the library's own cache and are matched strictly against model@teacher; weights of another model, unknown
names and, offline, absent files are refused before any work, naming the file the library expects and where. A local
file of a torchvision model's state_dict loads like any teacher file.

Nothing here downloads: the torch.hub and Hugging Face caches are folders under tmp_path, torch.hub's download is
replaced by one that fails as an offline machine does (and records that it was asked), and the hub runs with
HF_HUB_OFFLINE. The cached "weights" are randomly initialised files saved under the libraries' own file names.
"""
import logging
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torchvision
from hydra import compose, initialize

import kd.config  # noqa: F401  (registers the schema)
from kd import checkpoints, engine, fileio, pretrained, teacher_checks, teachers
from test_reliability import compose_cfg as tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

RESNET18 = "torchvision:ResNet18_Weights.IMAGENET1K_V1"
RESNET18_FILE = "resnet18-f37072fd.pth"  # the file name in ResNet18_Weights.IMAGENET1K_V1.url
RESNET18_ACC1 = 69.758  # ResNet18_Weights.IMAGENET1K_V1.meta["_metrics"]["ImageNet-1K"]["acc@1"]
TIMM_WEIGHTS = "test_efficientnet.r160_in1k"  # timm's tiny test model (0.36M parameters), hosted on the hub
TIMM_REPO = f"timm/{TIMM_WEIGHTS}"


def student_cfg(*overrides: str):
    with initialize(version_base="1.3", config_path="../conf"):
        return compose("config", overrides=["phase=student", "dataset=digits", *overrides])


def torchvision_teacher(*overrides: str, classes: int = 1000):
    return student_cfg("model@teacher=torchvision", "teacher.name=resnet18", f"teacher.num_classes={classes}",
                       f"teacher_checkpoint={RESNET18}", *overrides)


@dataclass
class Hub:
    """torch.hub's checkpoints folder, and the (url, destination) of each download asked of it."""

    checkpoints: Path
    requested: list[tuple[str, str]]


@pytest.fixture
def torch_hub(tmp_path, monkeypatch) -> Hub:
    """torch.hub's cache under tmp_path; a download fails as on an offline machine."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    hub = Hub(tmp_path / "torch" / "hub" / "checkpoints", [])

    def offline(url, dst, *args, **kwargs):
        hub.requested.append((url, dst))
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return hub


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """The Hugging Face hub cache under tmp_path, with HF_HUB_OFFLINE (the hub makes no request at all)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf"


def cache_torchvision_file(checkpoints: Path, classes: int = 1000) -> tuple[Path, dict]:
    """A resnet18 state_dict where torchvision keeps ResNet18_Weights.IMAGENET1K_V1."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18(num_classes=classes).state_dict()
    checkpoints.mkdir(parents=True, exist_ok=True)
    torch.save(state, checkpoints / RESNET18_FILE)
    return checkpoints / RESNET18_FILE, state


def cache_hub_file(cache: Path, repo: str, state: dict, filename: str = "model.safetensors") -> Path:
    """A file in the Hugging Face cache layout: models--<org>--<name>/{refs/main, snapshots/<commit>/<file>}."""
    from safetensors.torch import save_file

    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    save_file(state, str(folder / "snapshots" / commit / filename))
    return folder / "snapshots" / commit / filename


def test_library_of_reads_the_prefix_only_for_the_two_libraries():
    assert pretrained.library_of(RESNET18) == "torchvision"
    assert pretrained.library_of("timm:resnet50.a1_in1k") == "timm"
    assert [pretrained.library_of(c) for c in ("auto", "none", "/ckpt/teacher.pt", "C:teacher.pt")] == [None] * 4


# ---------------------------------------------------------------------------------------------------------------
# torchvision


def test_cached_torchvision_weights_load_strictly_with_torchvisions_accuracy_and_no_download(torch_hub):
    path, state = cache_torchvision_file(torch_hub.checkpoints)
    cfg = torchvision_teacher()
    located = teachers.resolve(cfg, True, [])
    assert isinstance(located, pretrained.LibraryWeights) and located == path
    assert (located.library, located.weights) == ("torchvision", "ResNet18_Weights.IMAGENET1K_V1")
    teacher = teachers.read(located, cfg.teacher)
    assert teacher.format == "ResNet18_Weights.IMAGENET1K_V1" and teacher.recorded_acc1 == RESNET18_ACC1
    assert teacher.classes is None  # ImageNet's category names are not an image folder's wnids: not compared
    assert len(teacher.state_dict) == len(state)
    assert all(torch.equal(teacher.state_dict[k], v) for k, v in state.items())
    assert torch_hub.requested == []
    # .DEFAULT names the same weights, and is recorded by their own name.
    assert teachers.resolve(torchvision_teacher("teacher_checkpoint=torchvision:ResNet18_Weights.DEFAULT"), True,
                            []).weights == "ResNet18_Weights.IMAGENET1K_V1"


def test_absent_torchvision_weights_offline_name_the_file_and_url_before_any_work(torch_hub, tmp_path):
    cfg = tiny_cfg(tmp_path, "phase=student", "epochs=1", "model@teacher=torchvision", "teacher.name=resnet34",
                   "teacher.width=1", "teacher_checkpoint=torchvision:ResNet34_Weights.IMAGENET1K_V1")
    expected = torch_hub.checkpoints / "resnet34-b627a593.pth"
    url = "https://download.pytorch.org/models/resnet34-b627a593.pth"
    with pytest.raises(pretrained.MissingWeights) as refused:
        engine.run(cfg, tmp_path / "run")
    message = str(refused.value)
    assert message == (
        "teacher_checkpoint=torchvision:ResNet34_Weights.IMAGENET1K_V1: the weights are not in torchvision's cache "
        "and could not be downloaded (<urlopen error [Errno -2] Name or service not known>). torchvision reads them "
        f"from {expected}. On a machine with network, download {url} (e.g. `curl -L -o resnet34-b627a593.pth {url}`) "
        f"and put the file at {expected}, or set TORCH_HOME to a folder whose hub/checkpoints/ holds it "
        f"(torch.hub.get_dir() is {torch_hub.checkpoints.parent} here)."
    )
    # The library's own download was what ran (with network it fetches the file); offline it left nothing behind.
    assert [(u, Path(d).parent) for u, d in torch_hub.requested] == [(url, torch_hub.checkpoints)]
    assert list(torch_hub.checkpoints.iterdir()) == []
    assert not (tmp_path / "run" / "run.json").exists()


def test_torchvision_weights_of_another_model_are_refused_naming_both(torch_hub):
    with pytest.raises(ValueError, match=r"teacher_checkpoint=torchvision:ResNet34_Weights.IMAGENET1K_V1 holds the "
                                         r"weights of torchvision's resnet34, but model@teacher is "
                                         r"torchvision_model-resnet18: set model@teacher=torchvision "
                                         r"teacher.name=resnet34\."):
        teachers.resolve(torchvision_teacher("teacher_checkpoint=torchvision:ResNet34_Weights.IMAGENET1K_V1"), True, [])
    # A model of this repository's zoo is no torchvision model, even when it is a ResNet-50.
    zoo = student_cfg("model@teacher=ResNet50", "teacher_checkpoint=torchvision:ResNet50_Weights.IMAGENET1K_V2")
    with pytest.raises(ValueError, match=r"resnet50, but model@teacher is ResNet50: set model@teacher=torchvision "
                                         r"teacher.name=resnet50"):
        teachers.resolve(zoo, True, [])
    assert torch_hub.requested == []


def test_unknown_torchvision_weights_list_close_names():
    with pytest.raises(ValueError, match=r"torchvision:ResNet18_Weights.IMAGENET1K_V9: torchvision has no such "
                                         r"weights. Close names: ResNet18_Weights.IMAGENET1K_V1, "):
        teachers.resolve(torchvision_teacher("teacher_checkpoint=torchvision:ResNet18_Weights.IMAGENET1K_V9"), True, [])


def test_imagenet_weights_on_a_200_class_dataset_are_refused_by_the_strict_match(torch_hub):
    path, _ = cache_torchvision_file(torch_hub.checkpoints)
    cfg = torchvision_teacher(classes=200)
    with pytest.raises(ValueError) as refused:
        teachers.read(teachers.resolve(cfg, True, []), cfg.teacher)
    assert str(refused.value) == (
        f"teacher checkpoint {path} (torchvision weights ResNet18_Weights.IMAGENET1K_V1) does not fit "
        "model@teacher=torchvision_model-resnet18 (num_classes=200, width=1): mis-shaped (2): fc.weight (1000, 512) "
        "in the file, (200, 512) in the model, fc.bias (1000,) in the file, (200,) in the model. It fits: "
        "model@teacher=torchvision teacher.name=resnet18 teacher.width=1 (1000 classes)."
    )


def test_imagenet_weights_for_a_10_class_student_run_stop_it_before_any_work(torch_hub, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "fitting_options", lambda state, model_cfg: [])  # its hint is tested above
    cache_torchvision_file(torch_hub.checkpoints)
    cfg = tiny_cfg(tmp_path, "phase=student", "epochs=1", "model@teacher=torchvision", "teacher.name=resnet18",
                   "teacher.width=1", f"teacher_checkpoint={RESNET18}")
    with pytest.raises(ValueError, match=r"mis-shaped \(2\): fc.weight \(1000, 512\) in the file, \(10, 512\)"):
        engine.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "run.json").exists()


def test_a_student_distils_from_torchvision_weights_and_records_them(torch_hub, tmp_path, caplog):
    """A 10-class resnet18 filed under torchvision's name (no real weights here): read, measured and cited."""
    path, _ = cache_torchvision_file(torch_hub.checkpoints, classes=10)
    cfg = tiny_cfg(tmp_path, "phase=student", "epochs=1", "model@teacher=torchvision", "teacher.name=resnet18",
                   "teacher.width=1", f"teacher_checkpoint={RESNET18}")
    with caplog.at_level(logging.WARNING):
        result = engine.run(cfg, tmp_path / "run")
    assert result["teacher_checkpoint"] == str(path) and result["teacher/sha256"] == fileio.sha256_file(path)
    assert result["teacher/format"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert result["teacher/recorded_acc1"] == RESNET18_ACC1
    # An untrained teacher is far from torchvision's ImageNet figure: warned about, as any published file.
    assert any("but 69.76% in its file" in r.getMessage() for r in caplog.records)
    assert torch_hub.requested == []


def test_the_record_names_the_library_as_the_teachers_source(torch_hub, tmp_path):
    cache_torchvision_file(torch_hub.checkpoints, classes=10)
    cfg = tiny_cfg(tmp_path, "phase=student", "epochs=1", "model@teacher=torchvision", "teacher.name=resnet18",
                   "teacher.width=1", f"teacher_checkpoint={RESNET18}")
    located = teachers.resolve(cfg, True, [])
    assert teacher_checks.teacher_source(cfg, located) == "torchvision"


def test_densenets_published_key_names_are_renamed_as_torchvision_does():
    with torch.device("meta"):
        keys = list(torchvision.models.densenet121().state_dict())
    # The published files name a dense layer's modules "norm.1", "conv.2", ... (torchvision's names before "norm1").
    legacy = [k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2.") for k in keys]
    assert legacy != keys and "features.denseblock1.denselayer1.norm.1.weight" in legacy
    assert [pretrained._current_key(k) for k in legacy] == keys


# ---------------------------------------------------------------------------------------------------------------
# timm


def timm_teacher(*overrides: str, name: str = "test_efficientnet"):
    return student_cfg("model@teacher=timm", f"teacher.name={name}", "teacher.num_classes=1000",
                       f"teacher_checkpoint=timm:{TIMM_WEIGHTS}", *overrides)


def test_cached_timm_weights_are_read_by_timm_from_the_hub_cache(hf_cache):
    import timm

    torch.manual_seed(0)
    state = timm.create_model("test_efficientnet").state_dict()
    path = cache_hub_file(hf_cache, TIMM_REPO, state)
    cfg = timm_teacher()
    located = teachers.resolve(cfg, True, [])
    assert located == path and (located.library, located.weights) == ("timm", TIMM_WEIGHTS)
    teacher = teachers.read(located, cfg.teacher)
    assert teacher.format == TIMM_WEIGHTS and teacher.recorded_acc1 is None
    assert len(teacher.state_dict) == len(state)
    assert all(torch.equal(teacher.state_dict[k], v) for k, v in state.items())
    # A bare architecture means timm's default tag.
    assert teachers.resolve(timm_teacher("teacher_checkpoint=timm:test_efficientnet"), True, []).weights == TIMM_WEIGHTS


def test_absent_timm_weights_offline_name_the_repo_and_cache_folder(hf_cache):
    with pytest.raises(pretrained.MissingWeights) as refused:
        teachers.resolve(timm_teacher(), True, [])
    folder = hf_cache / "models--timm--test_efficientnet.r160_in1k"
    assert str(refused.value) == (
        f"teacher_checkpoint=timm:{TIMM_WEIGHTS}: the weights are not in the Hugging Face cache and could not be "
        "downloaded (the Hub could not be reached: no network, or HF_HUB_OFFLINE=1). timm reads them from the hub "
        f"repo {TIMM_REPO} (file model.safetensors), cached in {folder}. On a machine with network run `hf download "
        f"{TIMM_REPO} model.safetensors` (or `python -c \"import timm; timm.create_model('{TIMM_WEIGHTS}', "
        f"pretrained=True)\"`), then copy its whole cache folder {folder.name} into {hf_cache} here, or point "
        "HF_HUB_CACHE (or HF_HOME) at a cache that holds it. Set HF_HUB_OFFLINE=1 on machines without network, so "
        "the hub fails at once instead of retrying."
    )
    assert not hf_cache.exists() or not list(hf_cache.rglob("*.safetensors"))


def test_timm_weights_of_another_model_or_unknown_are_refused(hf_cache):
    with pytest.raises(ValueError, match=r"timm:resnet50.a1_in1k holds the weights of timm's resnet50, but "
                                         r"model@teacher is timm_model-test_efficientnet: set model@teacher=timm "
                                         r"teacher.name=resnet50\."):
        teachers.resolve(timm_teacher("teacher_checkpoint=timm:resnet50.a1_in1k"), True, [])
    with pytest.raises(ValueError, match=r"timm:test_efficientnet.in22k: timm has no such pretrained weights. "
                                         r"test_efficientnet's: test_efficientnet.r160_in1k\."):
        teachers.resolve(timm_teacher("teacher_checkpoint=timm:test_efficientnet.in22k"), True, [])
    with pytest.raises(ValueError, match=r"timm:test_efficientnt: timm has no model 'test_efficientnt'. Close names: "
                                         r"test_efficientnet.r160_in1k"):
        teachers.resolve(timm_teacher("teacher_checkpoint=timm:test_efficientnt"), True, [])


def test_an_unknown_timm_student_stops_the_run_before_any_work(tmp_path):
    cfg = tiny_cfg(tmp_path, *["phase=student", "loss=ce", "teacher_checkpoint=none", "epochs=1"],
                   "model@student=timm", "student.name=mobilenetv3_smal_100", "student.width=1")
    with pytest.raises(Exception, match=r"timm has no model 'mobilenetv3_smal_100'.*Close names: "
                                        r"mobilenetv3_small_100"):
        engine.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "run.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# a local file of a library model's weights: an ordinary teacher file


def test_a_saved_torchvision_state_dict_loads_strictly_and_another_models_is_refused(tmp_path, monkeypatch):
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, tmp_path / "resnet18.pth")
    cfg = torchvision_teacher(f"teacher_checkpoint={tmp_path / 'resnet18.pth'}")
    path = teachers.resolve(cfg, True, [])
    assert not isinstance(path, pretrained.LibraryWeights)
    teacher = teachers.read(path, cfg.teacher)
    assert teacher.format == "state_dict" and teacher.recorded_acc1 is None
    model = teachers.build(teacher, cfg.teacher, torch.device("cpu"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())

    with torch.device("meta"):
        other = torchvision.models.resnet34(weights=None).state_dict()
    torch.save({k: torch.zeros(v.shape) for k, v in other.items()}, tmp_path / "resnet34.pth")
    monkeypatch.setattr(checkpoints, "fitting_options", lambda state, model_cfg: [])  # slow, and tested above
    with pytest.raises(ValueError, match=r"resnet34.pth \(state_dict format\) does not fit model@teacher="
                                         r"torchvision_model-resnet18 \(num_classes=1000, width=1\): unexpected "
                                         r"\(\d+\): layer1.2.conv1.weight"):
        teachers.read(tmp_path / "resnet34.pth", cfg.teacher)
