"""Channels-last on the CPU (kd/cpu_conv.py): strided 1x1 convolutions routed around torch 2.14's heap-corrupting
NHWC backward give the plain convolution's results, keep the checkpoint's names, and do not crash."""
import copy

import pytest
import torch
from torch import nn

from kd import cpu_conv, distributed, engine, hardware, loop, records
from kd.config import Phase
from kd.methods.base import CELoss
from kd.models.cifar_resnet import resnet8
from support.runs import compose_cfg
from tools import conv_scan

pytestmark = pytest.mark.usefixtures("one_thread")

# Shapes that crashed torch 2.14.1's plain NHWC backward here (python -m tools.conv_scan): 1x1, stride 2 or 3, few
# input channels, 56 px and up. The machine and build where the plain kernel crashes on them:
CRASHED_ON = ("2.14.1+cu130", "AMD EPYC")
CRASHING = [conv_scan.Shape(4, 8, 1, 2, 64), conv_scan.Shape(8, 16, 1, 2, 64), conv_scan.Shape(2, 8, 1, 3, 96)]


def forward_backward(conv: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    """The output and the gradients of the input and of every parameter."""
    x = x.clone().requires_grad_()
    conv.zero_grad(set_to_none=True)
    output = conv(x)
    output.backward(grad)
    return [output.detach(), x.grad, *(p.grad for p in conv.parameters())]


@pytest.mark.parametrize("cin, cout, size, stride, batch", [(16, 32, 32, 2, 8), (4, 8, 32, 2, 8), (32, 64, 8, 2, 64),
                                                            (16, 16, 30, 3, 8), (3, 8, 17, 2, 8)])
def test_the_routed_convolution_gives_the_plain_ones_results(cin, cout, size, stride, batch):
    """The same products summed over the same input channels: the output and every gradient equal the plain
    convolution's to float32 rounding (at most 1e-5 of the tensor's largest magnitude; about 2e-6 is seen). Bits
    differ where oneDNN picks another kernel for the plain strided convolution (few channels, a bias)."""
    plain = nn.Conv2d(cin, cout, 1, stride).to(memory_format=torch.channels_last)
    routed = copy.deepcopy(plain)
    assert cpu_conv.route_strided_pointwise(routed) == 1 and type(routed) is cpu_conv.SubsampledPointwiseConv2d
    x = torch.randn(batch, cin, size, size).contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(plain(x))
    got, expected = forward_backward(routed, x, grad), forward_backward(plain, x, grad)
    assert [t.shape for t in got] == [t.shape for t in expected] and len(got) == 4
    for value, want in zip(got, expected):
        assert (value - want).abs().max() <= 1e-5 * want.abs().max()
    assert got[0].is_contiguous(memory_format=torch.channels_last)


def test_only_strided_unpadded_1x1_convolutions_are_routed_and_the_state_dict_keeps_its_names():
    model = resnet8(10)
    names = {name: type(m) for name, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    assert cpu_conv.prepare(model, "cuda", True) is model and not any(  # CUDA keeps the plain convolution
        type(m) is cpu_conv.SubsampledPointwiseConv2d for m in model.modules())
    cpu_conv.prepare(model, "cpu", False)  # NCHW: nothing to route around
    assert {name: type(m) for name, m in model.named_modules()} == names
    cpu_conv.prepare(model, "cpu", True)
    routed = [name for name, m in model.named_modules() if type(m) is cpu_conv.SubsampledPointwiseConv2d]
    assert routed and all(names[name] is nn.Conv2d for name in routed)
    assert not [m for m in model.modules() if cpu_conv.is_strided_pointwise(m)]
    assert list(model.state_dict()) == list(state) and all(torch.equal(model.state_dict()[k], v)
                                                             for k, v in state.items())
    model.load_state_dict(state)  # a checkpoint of the plain model loads into the routed one


def test_a_cpu_job_trains_channels_last_with_its_strided_convolutions_routed(tmp_path):
    cfg = compose_cfg(tmp_path, "phase=teacher", "model@teacher=resnet8", "channels_last=true")
    data = engine.load_data(cfg.dataset, torch.device("cpu"), hardware.use_channels_last(True, torch.device("cpu")))
    job = engine.build_job(cfg, Phase.teacher, CELoss(), data, torch.device("cpu"))
    assert data.channels_last and data.sample_inputs(2).is_contiguous(memory_format=torch.channels_last)
    assert sum(type(m) is cpu_conv.SubsampledPointwiseConv2d for m in job.model.modules()) == 2


def test_cpu_data_parallel_runs_keep_nchw(monkeypatch):
    """gloo DDP with NHWC gradients and several CPU threads corrupted the heap too: those runs stay NCHW."""
    assert hardware.use_channels_last(True, torch.device("cpu"))
    assert not hardware.use_channels_last(False, torch.device("cpu"))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    assert not hardware.use_channels_last(True, torch.device("cpu"))
    assert hardware.use_channels_last(True, torch.device("cuda"))


def test_the_crashing_shapes_run_clean_when_routed():
    """A subprocess (tools.conv_scan's child): the plain kernel corrupts the heap, which must never happen in the
    test process. Where the plain kernel crashes (CRASHED_ON), the scan sees the unrouted shape crash its child."""
    assert conv_scan.scan(CRASHING, routed=True) == {}
    if (torch.__version__, records.cpu_name()) == CRASHED_ON:
        crashed = conv_scan.scan(CRASHING[:1], routed=False)
        assert list(crashed) == CRASHING[:1] and "exit code -" in crashed[CRASHING[0]]


def test_a_routed_model_still_folds_its_batchnorms_for_evaluation():
    """torch.fx would trace into the routed convolution's device branch and give up folding the whole model: its
    tracer keeps every Conv2d a leaf, so evaluation (loop.folded) and the frozen teacher fold it as before."""
    torch.manual_seed(0)
    model = cpu_conv.prepare(resnet8(10).to(memory_format=torch.channels_last), "cpu", True).eval()
    evaluated = loop.folded(model)
    assert evaluated is not model and not any(isinstance(m, nn.BatchNorm2d) for m in evaluated.modules())
    assert sum(type(m) is cpu_conv.SubsampledPointwiseConv2d for m in evaluated.modules()) == 2
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(evaluated(x), model(x), rtol=1e-4, atol=1e-4)
