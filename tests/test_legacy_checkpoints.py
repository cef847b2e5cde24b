"""Teacher files in the layouts older code wrote: without BatchNorm's num_batches_tracked (PyTorch < 0.4.1, the
0.4.0 that RepDistiller was tested on), with nn.DataParallel's `module.` prefixes, and as RepDistiller's checkpoint
dicts. Each test writes its file in that exact layout, in the legacy (pre-1.6, non-zip) serialisation where the
files of that time used it, and checks the teacher loads strictly and computes what the saved model computed."""
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from kd import checkpoints, teachers
from support import tree_state

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def model_node(name: str, num_classes: int = 100):
    return OmegaConf.merge(OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml"),
                           {"num_classes": num_classes, "width": 1.0})


def trained(name: str) -> nn.Module:
    """A model whose BatchNorm running statistics are not their initial values (a few train-mode batches), in eval
    mode: outputs that a lost or zeroed statistic would change."""
    torch.manual_seed(0)
    model = instantiate(model_node(name))
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32) * 2 + 0.5)
    return model.eval()


def repdistiller_dict(model: nn.Module, state: dict, accuracy_key: str = "accuracy") -> dict:
    """What RepDistiller's train_teacher.py saves every save_freq epochs (`ckpt_epoch_<n>.pth`, accuracy_key
    `accuracy`) or at a new best (`<model>_best.pth`, `best_acc`); under 0.4.0 the accuracy is a 1-element tensor."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()  # momentum buffers, as a real optimizer state holds
    model.eval()
    return {"epoch": 240, "model": state, accuracy_key: torch.tensor([70.1]), "optimizer": optimizer.state_dict()}


def without_batch_counts(model: nn.Module) -> OrderedDict:
    """The state_dict as PyTorch 0.4.0 wrote it: no num_batches_tracked, and no _metadata (no version numbers)."""
    return OrderedDict((k, v.clone()) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked"))


def outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1"])
def test_a_file_without_num_batches_tracked_loads_strictly_and_gives_the_same_outputs(tmp_path, name):
    model = trained(name)
    images = torch.randn(6, 3, 32, 32)
    expected = outputs(model, images)
    state = without_batch_counts(model)
    assert not any("num_batches_tracked" in k for k in state) and not hasattr(state, "_metadata")
    path = tmp_path / teachers.PUBLISHED_LAYOUT.format(model=name)
    path.parent.mkdir()
    payload = repdistiller_dict(instantiate(model_node(name)), state)
    torch.save(payload, path, _use_new_zipfile_serialization=False)
    # PyTorch's own strict load accepts such a file (BatchNorm fills the count for unversioned state_dicts) ...
    instantiate(model_node(name)).load_state_dict(torch.load(path, weights_only=True)["model"])
    # ... and so does ours, through the teachers_dir layout, strictly, with the file's own figure.
    teacher_file = teachers.read(teachers.published_teacher(tmp_path, name), model_node(name))
    assert (teacher_file.format, teacher_file.recorded_acc1) == ("repdistiller", pytest.approx(70.1))
    assert teacher_file.state_dict.keys() == model.state_dict().keys()
    assert all(int(v) == 0 for k, v in teacher_file.state_dict.items() if k.endswith("num_batches_tracked"))
    teacher = teachers.build(teacher_file, model_node(name), torch.device("cpu"))  # load_state_dict(strict=True)
    assert torch.equal(outputs(teacher, images), expected)


def test_a_file_missing_only_some_batch_counts_is_damaged_and_refused(tmp_path):
    state = without_batch_counts(trained("resnet8"))
    state["bn1.num_batches_tracked"] = torch.tensor(5)  # one count present: not a pre-0.4.1 file
    torch.save(state, tmp_path / "damaged.pth")
    before = tree_state(tmp_path)
    with pytest.raises(ValueError, match=r"does not fit model@teacher=resnet8 .*missing \(\d+\): "
                                         r"layer1\.0\.bn1\.num_batches_tracked"):
        checkpoints.read_teacher_file(tmp_path / "damaged.pth", model_node("resnet8"))
    assert tree_state(tmp_path) == before


def test_a_pre_0_4_1_file_of_another_model_names_the_option_it_fits(tmp_path):
    torch.save(without_batch_counts(trained("resnet8")), tmp_path / "resnet8.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"does not fit model@teacher=resnet14.*It fits: model@teacher=resnet8 "
                                         r"teacher\.width=1 \(100 classes\)"):
        checkpoints.read_teacher_file(tmp_path / "resnet8.pth", model_node("resnet14"))


@pytest.mark.parametrize("layout", ["bare", "repdistiller"])
def test_data_parallel_files_load_without_the_module_prefix(tmp_path, layout):
    model = trained("resnet8")
    images = torch.randn(6, 3, 32, 32)
    state = nn.DataParallel(model).state_dict()  # what a multi-GPU run saves: every key `module.`-prefixed
    assert all(k.startswith("module.") for k in state)
    payload = state if layout == "bare" else repdistiller_dict(instantiate(model_node("resnet8")), state)
    torch.save(payload, tmp_path / "teacher.pth")
    teacher_file = checkpoints.read_teacher_file(tmp_path / "teacher.pth", model_node("resnet8"))
    assert teacher_file.format == ("state_dict" if layout == "bare" else "repdistiller")
    teacher = teachers.build(teacher_file, model_node("resnet8"), torch.device("cpu"))
    assert torch.equal(outputs(teacher, images), outputs(model, images))


@pytest.mark.parametrize("file_name, accuracy_key", [("ckpt_epoch_240.pth", "accuracy"),
                                                     ("resnet8_best.pth", "best_acc")])
def test_repdistillers_checkpoint_dicts_load_with_their_own_figure(tmp_path, file_name, accuracy_key):
    model = trained("resnet8")
    payload = repdistiller_dict(instantiate(model_node("resnet8")), model.state_dict(), accuracy_key)
    assert sorted(payload) == sorted(["epoch", "model", accuracy_key, "optimizer"])
    torch.save(payload, tmp_path / file_name)
    teacher_file = checkpoints.read_teacher_file(tmp_path / file_name, model_node("resnet8"))
    assert (teacher_file.format, teacher_file.recorded_acc1) == ("repdistiller", pytest.approx(70.1))
    images = torch.randn(6, 3, 32, 32)
    teacher = teachers.build(teacher_file, model_node("resnet8"), torch.device("cpu"))
    assert torch.equal(outputs(teacher, images), outputs(model, images))
