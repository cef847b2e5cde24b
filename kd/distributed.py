"""Data-parallel training under torchrun: process-group set-up and the few collectives the engine needs.

`torchrun --standalone --nproc_per_node=N train.py ...` starts N processes with RANK, WORLD_SIZE and LOCAL_RANK
set; without torchrun every function here is the single-process identity.
"""
import logging
import os
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger(__name__)


def init_from_env() -> None:
    """Join the process group of torchrun, or of a submitit job with several tasks (the SLURM launcher with
    tasks_per_node > 1: one task per GPU); NCCL on GPUs, gloo on CPUs. Nothing for a single process."""
    if dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ and _submitit_tasks() > 1:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)  # RANK, WORLD_SIZE, MASTER_* ...
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device_index())
    # Both backends when there is a GPU: NCCL for CUDA tensors, gloo for the CPU ones (broadcast_object, ...).
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    if rank() != 0:  # one copy of the log: the other ranks only warn
        logging.getLogger().setLevel(logging.WARNING)


def _submitit_tasks() -> int:
    """The number of tasks of the submitit job this process runs in (0 outside submitit)."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return 0
    import submitit

    return submitit.JobEnvironment().num_tasks


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_device_index() -> int:
    """This process's GPU: its local rank modulo the visible GPUs (SLURM's one-GPU-per-task binding shows each task
    one GPU, numbered 0, whatever its local rank)."""
    return local_rank() % max(1, torch.cuda.device_count())


def is_main() -> bool:
    """Rank 0 (or the only process): the one that logs to W&B and writes records."""
    return rank() == 0


def shard(n: int) -> slice:
    """This rank's contiguous share of n items (the shares of all ranks cover each item exactly once)."""
    size, r = world_size(), rank()
    return slice(n * r // size, n * (r + 1) // size)


def shard_sizes(n: int) -> list[int]:
    """The length of every rank's share of n items, in rank order: known on every rank without asking the others."""
    size = world_size()
    return [n * (r + 1) // size - n * r // size for r in range(size)]


def sum_(tensor: Tensor) -> Tensor:
    """Sum over ranks (in place); the identity on one process."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def min_(tensor: Tensor) -> Tensor:
    """Minimum over ranks (in place); the identity on one process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def mean_(tensor: Tensor) -> Tensor:
    """Mean over ranks (in place); the identity on one process."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def gather_rows(*tensors: Tensor, sizes: Sequence[int]) -> tuple[Tensor, ...]:
    """Each tensor's rows from every rank, concatenated in rank order; sizes[r] is rank r's row count (shard_sizes).

    The sizes are passed, not exchanged: reading another rank's count would make the host wait for the device.
    Shares may differ in length, so each is padded to the longest for all_gather and cut back after.
    """
    if not dist.is_initialized():
        return tensors
    if len(sizes) != dist.get_world_size() or len(tensors[0]) != sizes[dist.get_rank()]:
        raise ValueError(f"gather_rows: this rank holds {len(tensors[0])} rows; sizes {list(sizes)} say otherwise.")
    longest = max(sizes)
    gathered = []
    for tensor in tensors:
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([part[:size] for part, size in zip(parts, sizes)]))
    return tuple(gathered)


def broadcast_object(value: Any) -> Any:
    """Rank 0's value, on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics): DDP broadcasts them before each training
    forward, so after the last step each rank holds its own; evaluation must use the saved model's."""
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
