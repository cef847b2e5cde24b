"""Where and how a run computes: its device (device=auto: this rank's GPU, else the CPU), its autocast precision (a
resumed run keeps the one its last.pt was trained in), fp32 that is IEEE fp32 on GPUs too, its memory format, and
whether its kernels are deterministic."""
import logging
import os
from typing import Optional

import torch

from kd import distributed
from kd.datapath import DataPath

log = logging.getLogger(__name__)


def configure_determinism(deterministic: bool) -> None:
    """deterministic=true: repeatable kernels (errors where none exists), no cuDNN autotuning; false: autotuning."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts, so before CUDA work
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic  # autotuning picks the fastest kernels, not the same ones


def resolve_device(name: str) -> torch.device:
    """device=auto picks CUDA when present (this rank's GPU under torchrun), else the CPU; a named one must exist."""
    if name == "auto":
        return torch.device(f"cuda:{distributed.local_device_index()}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but no CUDA device is visible: use device=auto or device=cpu.")
    return device


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_name(dtype: Optional[torch.dtype]) -> str:
    return next(name for name, value in PRECISIONS.items() if value == dtype)


def job_precision(name: str, device: torch.device, resumed: Optional[str]) -> Optional[torch.dtype]:
    """The run's autocast dtype. A resumed run keeps the precision its last.pt was trained in: with precision=auto
    (which may resolve otherwise on another device) it takes that one; an explicit other precision is refused."""
    resolved = resolve_precision(name, device)
    if resumed is None or precision_name(resolved) == resumed:
        return resolved
    if name == "auto":
        log.info("resuming in %s, the precision last.pt was trained in (precision=auto is %s on %s)", resumed,
                 precision_name(resolved), device)
        return PRECISIONS[resumed]
    raise ValueError(f"last.pt was trained in {resumed}, and precision={name} would go on in another precision: "
                     f"resume with precision={resumed} (or auto), or start over in another run folder.")


def resolve_precision(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype: precision=auto is bf16 on GPUs of compute capability 8.0 and up (A100, H100: native bf16,
    no loss scaling), fp16 with loss scaling below (V100, T4: bf16 there is emulated, slow, and cuDNN may lack bf16
    convolutions), fp32 on the CPU."""
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    if name not in PRECISIONS:
        raise ValueError(f"precision={name}: must be auto, {', '.join(PRECISIONS)}.")
    return PRECISIONS[name]


# torch's TF32 settings as this module found them (by default: TF32 for cuDNN convolutions, IEEE fp32 for matmuls).
TORCH_TF32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)


def set_tf32(amp_dtype: Optional[torch.dtype]) -> None:
    """fp32 runs (amp_dtype None) compute in IEEE fp32 on GPUs too: by default torch lets cuDNN convolutions use TF32
    (a 10-bit mantissa) on Ampere and newer GPUs, so precision=fp32, the paper presets' setting, would not be the
    papers' fp32. bf16/fp16 runs get torch's settings (TORCH_TF32). Set for every job, as a multirun's jobs share one
    process: an fp32 job does not leave TF32 off for the bf16 job after it."""
    # Never run on a GPU here: a CPU test checks the flags, not what a GPU computes with them.
    fp32 = amp_dtype is None
    torch.backends.cudnn.allow_tf32 = False if fp32 else TORCH_TF32[0]
    torch.backends.cuda.matmul.allow_tf32 = False if fp32 else TORCH_TF32[1]


def use_channels_last(channels_last: bool, device: torch.device) -> bool:
    """NHWC where asked, except for data-parallel CPU runs. torch 2.14's CPU NHWC backward of a strided 1x1
    convolution corrupts the heap (kd/cpu_conv.py: build_job routes those around it); gloo DDP with NHWC gradients
    and several CPU threads corrupted the heap too (reproduced with torchrun and OMP_NUM_THREADS=2), so CPU DDP
    keeps NCHW."""
    return channels_last and not (device.type == "cpu" and distributed.world_size() > 1)


def memory_format(data: DataPath) -> torch.memory_format:
    return torch.channels_last if data.channels_last else torch.contiguous_format
