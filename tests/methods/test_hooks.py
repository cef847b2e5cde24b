"""Feature capture by module name: the tensors a manual forward gives, ":in", clear errors, no hooks left behind,
in-place safety, probing, and default layers for every model of the zoo, for a plain torchvision ResNet and for timm
models (their feature_info)."""

from pathlib import Path

import pytest
import torch
import torchvision
from hydra.utils import get_method
from omegaconf import OmegaConf
from torch import nn
from torch.testing import assert_close

from kd.methods.at import ATLoss
from kd.methods.base import Step
from kd.methods.fitnet import FitNetLoss
from kd.methods.hooks import capture, default_layers, probe_shapes
from kd.models.cifar_resnet import resnet8
from kd.models.torchvision_models import torchvision_model
from kd.models.vgg import vgg8
from kd.models.wrn import wrn_16_1

CONF = Path(__file__).resolve().parents[2] / "conf"
MODEL_OPTIONS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
# Stage outputs RepDistiller's is_feat=True returns between the stem and the embedding, per model family.
STAGE_COUNTS = {"vgg": 4, "mobilenetv2": 4, "tv_resnet18": 4, "ResNet": 4, "mobilenetv1": 4,
                # The library options' default models: torchvision's resnet18, timm's mobilenetv3_small_100.
                "torchvision": 4, "timm": 4}


# Tiny tensors: one thread is faster, and keeps these tests quick when the CPU is shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def reference_features(model: nn.Module, names: list[str], x: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Each layer's value copied the moment it is computed (own hooks), and the logits."""
    copies, handles = {}, []
    for name in names:
        path, is_input = (name[:-3], True) if name.endswith(":in") else (name, False)
        module = model.get_submodule(path)
        if is_input:
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: copies.__setitem__(n, a[0].clone())))
        else:
            handles.append(module.register_forward_hook(lambda m, a, o, n=name: copies.__setitem__(n, o.clone())))
    logits = model(x)
    for handle in handles:
        handle.remove()
    return copies, logits


# ---------------------------------------------------------------------------------------------------------------
# capture


def test_capture_gives_the_tensors_of_a_manual_forward():
    torch.manual_seed(0)
    model = resnet8(num_classes=10, width=0.5).eval()
    x = images()
    with torch.no_grad():
        stem = model.relu(model.bn1(model.conv1(x)))
        layer2 = model.layer2(model.layer1(stem))
        pooled = model.layer3(layer2).mean((2, 3))
        manual_logits = model.fc(pooled)
        with capture(model, ["layer2", "fc:in", "fc"]) as features:
            logits = model(x)
    assert_close(features["layer2"], layer2)
    assert_close(features["fc:in"], pooled)  # ":in": the classifier's input, the pooled embedding
    assert_close(features["fc"], manual_logits)
    assert_close(logits, manual_logits)


def test_captured_student_features_carry_the_graph():
    torch.manual_seed(0)
    model = resnet8(num_classes=10, width=0.5)
    with capture(model, ["layer2"]) as features:
        model(images())
    features["layer2"].pow(2).sum().backward()
    assert model.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert model.layer3[0].conv1.weight.grad is None  # after the hooked layer: untouched by this loss


def test_capture_holds_the_last_forward_only():
    torch.manual_seed(0)
    model = resnet8(num_classes=10, width=0.5).eval()
    with torch.no_grad(), capture(model, ["fc:in"]) as features:
        model(images(seed=1))
        first = features["fc:in"]
        model(images(seed=2))
        second = features["fc:in"]
        reference, _ = reference_features(model, ["fc:in"], images(seed=2))
    assert not torch.equal(first, second)
    assert_close(second, reference["fc:in"])


def test_unknown_layer_names_the_top_level_modules():
    model = resnet8(num_classes=10, width=0.5)
    with pytest.raises(ValueError) as error:
        with capture(model, ["layer2", "layer9.0"]):
            pass
    message = str(error.value)
    assert "'layer9.0'" in message and "CifarResNet" in message
    assert "conv1, bn1, relu, layer1, layer2, layer3, avgpool, fc" in message
    assert "student_layers" in message
    assert hook_count(model) == 0  # names are checked before any hook is registered


def test_hooks_are_removed_on_exit_and_on_error():
    model = resnet8(num_classes=10, width=0.5)
    with capture(model, ["layer1", "fc:in"]):
        assert hook_count(model) > 0
    assert hook_count(model) == 0
    with pytest.raises(ZeroDivisionError):
        with capture(model, ["layer1", "fc:in"]):
            raise ZeroDivisionError  # an error inside the block
    assert hook_count(model) == 0
    with pytest.raises(RuntimeError):  # a failing forward inside the block
        with capture(model, ["layer1"]):
            model(torch.randn(2, 5, 32, 32))
    assert hook_count(model) == 0


def conv_bn_relu() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True)).eval()


@pytest.mark.parametrize("name", ["1", "2:in"])  # BN's output = the ReLU's input, which the ReLU overwrites
def test_a_feature_modified_in_place_later_is_refused(name):
    model = conv_bn_relu()
    with pytest.raises(RuntimeError, match=f"'{name}' was modified in place"):
        with capture(model, [name]):
            model(images())
    with torch.no_grad(), capture(model, ["2"]) as features:  # the in-place ReLU's own output is safe
        model(images())
    assert (features["2"] >= 0).all()


def test_under_inference_mode_the_feature_is_copied_before_in_place_ops():
    model = conv_bn_relu()
    x = images()
    with torch.no_grad():
        pre_relu = model[1](model[0](x))
    with torch.inference_mode(), capture(model, ["1"]) as features:
        model(x)
    assert (pre_relu < 0).any()
    assert_close(features["1"], pre_relu)


def test_a_layer_that_is_not_called_is_reported():
    class Skipping(nn.Module):  # like VGG, which skips pool3 on 32x32 inputs
        def __init__(self):
            super().__init__()
            self.used, self.skipped = nn.Linear(3, 3), nn.Identity()

        def forward(self, x):
            return self.used(x)

    model = Skipping()
    with pytest.raises(RuntimeError, match=r"\['skipped'\] of Skipping were not called"):
        with capture(model, ["used", "skipped"]):
            model(torch.randn(2, 3))


def test_a_sum_name_captures_the_sum_of_its_parts_with_their_graph():
    """"a+b": a value no module outputs, such as a residual block's sum before its final ReLU (AB's features)."""
    torch.manual_seed(0)
    model, x = resnet8(num_classes=10, width=0.5).train(), images()
    name = "layer2.0.bn2+layer2.0.downsample"
    with capture(model, [name, "layer2"]) as features:
        model(x)
    assert_close(features[name], features["layer2.0.bn2"] + features["layer2.0.downsample"], rtol=0, atol=0)
    assert_close(torch.relu(features[name]), features["layer2"])  # the block's output is the ReLU of that sum
    assert features[name].requires_grad
    with torch.inference_mode(), capture(model.eval(), [name]) as frozen:
        model(x)
        block, block_input = model.layer2[0], model.layer1(model.relu(model.bn1(model.conv1(x))))
        residual = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(block_input)))))
        assert_close(frozen[name], residual + block.downsample(block_input))
    with pytest.raises(RuntimeError, match=r"layer 'layer1\+layer2' sums features of different shapes \[\(2, 8, 32, "
                                           r"32\), \(2, 16, 16, 16\)\]"):
        with capture(model, ["layer1+layer2"]):
            model(x)


@pytest.mark.parametrize("make, stem", [
    (resnet8, lambda m, x: m.relu(m.bn1(m.conv1(x)))),  # RepDistiller resnet.py: f0 after conv1, bn1, relu
    (wrn_16_1, lambda m, x: m.conv1(x)),  # wrn.py: f0 = conv1(x)
    (vgg8, lambda m, x: torch.relu(m.block0(x))),  # vgg.py: f0 = relu(block0(x))
])
def test_the_declared_stem_is_repdistillers_first_feature(make, stem):
    torch.manual_seed(0)
    model, x = make(num_classes=10, width=0.25).eval(), images()
    name = default_layers(model)["stem"]
    with torch.no_grad(), capture(model, [name]) as features:
        model(x)
        expected = stem(model, x)
    assert_close(features[name], expected)


def test_probe_shapes_leaves_modes_and_batch_norm_statistics_alone():
    torch.manual_seed(0)
    model = resnet8(num_classes=10, width=0.5).train()
    model.layer2.eval()  # a mixed state must come back as it was
    state = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = probe_shapes(model, ["layer1", "layer3", "fc:in"], images(batch=3))
    assert shapes == {"layer1": (3, 8, 32, 32), "layer3": (3, 32, 8, 8), "fc:in": (3, 32)}
    assert model.training and not model.layer2.training and not model.layer2[0].training and model.layer3.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


# ---------------------------------------------------------------------------------------------------------------
# default layers


def build_option(name: str) -> nn.Module:
    node = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    if "name" in node:  # torchvision / timm by name: their widths are in their names
        return get_method(node._target_)(node.name, num_classes=10)
    # Narrow widths keep the whole zoo fast; module names do not depend on the width.
    return get_method(node._target_)(num_classes=10, width=0.25)


@pytest.mark.parametrize("name", MODEL_OPTIONS)
def test_default_layers_of_every_zoo_model(name):
    torch.manual_seed(0)
    model = build_option(name).train()
    layers = default_layers(model)
    stages, embedding = layers["stages"], layers["embedding"]
    family = next((k for k in STAGE_COUNTS if name.startswith(k)), None)
    assert len(stages) == STAGE_COUNTS.get(family, 3), stages
    names = stages + [embedding]
    x = images(batch=2)
    reference, reference_logits = reference_features(model, names, x)
    with capture(model, names) as features:
        logits = model(x)
    # The captured tensors are the layers' values (nothing overwrote them later) and hooks change no output.
    for n in names:
        assert_close(features[n], reference[n], msg=n)
    assert_close(logits, reference_logits)
    shapes = [features[n].shape for n in stages]
    assert all(len(s) == 4 for s in shapes), shapes
    sizes = [s[-1] for s in shapes]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < 32, sizes
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert features[embedding].shape == (2, classifier.in_features)


def test_default_layers_of_a_plain_torchvision_resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    layers = default_layers(model)
    assert layers == {"stages": ["layer1", "layer2", "layer3", "layer4"], "embedding": "fc:in"}
    shapes = probe_shapes(model, layers["stages"] + ["fc:in"], images(size=32))
    assert shapes["layer4"] == (2, 512, 1, 1) and shapes["fc:in"] == (2, 512)


def test_default_layers_of_a_timm_model_are_its_feature_info_from_stride_4_and_its_classifier_input():
    from kd.models.timm_models import timm_model  # here: importing timm takes seconds

    model = timm_model("mobilenetv3_small_100", num_classes=10)
    layers = default_layers(model)
    # feature_info lists bn1 (the stem, stride 2), blocks.0, blocks.1, blocks.3, blocks.5 (strides 4..32).
    assert [entry["module"] for entry in model.feature_info][0] == "bn1"
    assert layers == {"stages": ["blocks.0", "blocks.1", "blocks.3", "blocks.5"], "embedding": "classifier:in"}
    shapes = probe_shapes(model, layers["stages"] + ["classifier:in"], images(size=64))
    assert [tuple(shapes[s])[1:] for s in layers["stages"]] == [(16, 16, 16), (24, 8, 8), (48, 4, 4), (576, 2, 2)]
    assert shapes["classifier:in"] == (2, 1024)


def test_default_layers_of_an_unknown_model_say_what_to_set():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(ValueError, match="no default feature layers for Sequential.*student_layers / teacher_layers"):
        default_layers(model)


@pytest.mark.parametrize("criterion", [ATLoss(weight=1.0, p=2.0), FitNetLoss(weight=1.0)], ids=["at", "fitnet"])
def test_a_feature_method_binds_a_torchvision_teacher_to_a_timm_student_by_default_layers(criterion):
    """ImageNet-style models from both libraries pair stage by stage (strides 4..32) with no layer names set."""
    from kd.models.timm_models import timm_model  # here: importing timm takes seconds

    torch.manual_seed(0)
    teacher = torchvision_model("resnet18", num_classes=10).eval().requires_grad_(False)
    student = timm_model("mobilenetv3_small_100", num_classes=10).train()
    x, labels = images(batch=4, size=64), torch.arange(4)
    criterion.bind(student, teacher, x[:2], labels)
    student_layers, teacher_layers = criterion.layers()
    stages = ["layer1", "layer2", "layer3", "layer4"]
    assert teacher_layers == (["layer2"] if isinstance(criterion, FitNetLoss) else stages)
    with capture(student, student_layers) as student_features:
        student_logits = student(x)
    with torch.inference_mode(), capture(teacher, teacher_layers) as teacher_features:
        teacher_logits = teacher(x)
    step = Step(student_logits, labels, teacher_logits.clone(), dict(student_features),
                {k: v.clone() for k, v in teacher_features.items()}, torch.arange(4))
    (loss,) = criterion(step).values()
    assert loss.shape == () and torch.isfinite(loss) and loss > 0
    loss.backward()
    gradients = [p.grad for p in student.parameters() if p.grad is not None]
    assert gradients and all(torch.isfinite(g).all() for g in gradients)
    assert all(p.grad is None for p in teacher.parameters())
