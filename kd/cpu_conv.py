"""Channels-last on the CPU without torch 2.14's crashing kernel: strided 1x1 convolutions routed around it.

torch 2.14.1's CPU (oneDNN) channels-last backward of a 1x1 convolution with stride > 1 writes past its buffer: the
heap is corrupted (`free(): invalid next size`, SIGSEGV/SIGABRT) for few input channels (2 to 12) at 56 px and up,
and, at 96 px and up, for wider outputs too; 3x3 convolutions, 1x1 stride-1 ones and NCHW tensors ran clean
(tools/conv_scan.py scans the shapes, each in its own process). A write out of bounds need not crash, so every CPU
1x1 convolution with stride > 1 and no padding is routed, whatever its channels and size: a 1x1 stride-s
convolution of x equals a stride-1 1x1 convolution of x[..., ::s, ::s]: the same products, the same sums. Results
agree to float32 rounding (about 2e-6 of the largest value; bit for bit where oneDNN runs the same kernel for both,
as for 32+ channels: tests/test_cpu_conv.py).

The route is a class swap (`route_strided_pointwise`): the module keeps its parameters, their names and its
state_dict, and on a CUDA tensor it runs the plain convolution.
"""
import torch.nn.functional as F
from torch import Tensor, nn


class SubsampledPointwiseConv2d(nn.Conv2d):
    """A 1x1, stride-s, unpadded Conv2d that on the CPU convolves x[..., ::s, ::s] with stride 1 (the same result)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        sh, sw = self.stride
        return F.conv2d(x[..., ::sh, ::sw], self.weight, self.bias, 1, 0, self.dilation, self.groups)


def is_strided_pointwise(module: nn.Module) -> bool:
    """A plain Conv2d that the broken kernel would run: 1x1 kernel, stride > 1, no padding, zeros padding mode."""
    return (type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.stride != (1, 1)
            and module.padding in ((0, 0), "valid") and module.padding_mode == "zeros")


def route_strided_pointwise(model: nn.Module) -> int:
    """Swap every strided 1x1 Conv2d of `model` to SubsampledPointwiseConv2d, in place; returns how many."""
    routed = [module for module in model.modules() if is_strided_pointwise(module)]
    for module in routed:
        module.__class__ = SubsampledPointwiseConv2d  # same instance: parameters, hooks and names unchanged
    return len(routed)


def prepare(model: nn.Module, device_type: str, channels_last: bool) -> nn.Module:
    """`model` routed where it will run channels-last on the CPU (the case that crashes); unchanged otherwise."""
    if device_type == "cpu" and channels_last:
        route_strided_pointwise(model)
    return model
