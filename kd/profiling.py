"""What a model costs: its parameters, its forward FLOPs per image, and its measured eval-mode speed on a device
(batch-1 latency, throughput), with the device synchronised around every timing."""
import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, image_shape: tuple[int, ...], device: torch.device) -> int:
    """Forward FLOPs for one image (torch.utils.flop_counter counts a multiply-add as 2 FLOPs), eval mode."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, *image_shape, device=device))
    model.train(was_training)
    return counter.get_total_flops()


def profile_model(
    model: nn.Module, image_shape: tuple[int, ...], batch_size: int, device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> dict:
    """Eval-mode forward speed on this device in the run's precision: median batch-1 latency and throughput at
    batch_size."""
    was_training = model.training
    model.eval()
    profile = {}
    for batch, name in ((1, "latency_ms"), (batch_size, "throughput_img_s")):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            seconds = _median_forward_seconds(model, torch.zeros(batch, *image_shape, device=device))
        profile[name] = seconds * 1e3 if batch == 1 else batch / seconds
    model.train(was_training)
    return profile


@torch.inference_mode()
def _median_forward_seconds(model: nn.Module, inputs: torch.Tensor, budget_s: float = 0.5) -> float:
    """Median of timed forwards after two warm-up ones; at least 3 and at most 50, within about budget_s."""
    for _ in range(2):
        model(inputs)
    times: list[float] = []
    while len(times) < 3 or (sum(times) < budget_s and len(times) < 50):
        synchronize(inputs.device)
        start = time.perf_counter()
        model(inputs)
        synchronize(inputs.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA; the CPU runs eagerly), so the host clock measures it: every timing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
