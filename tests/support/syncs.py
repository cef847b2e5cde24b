"""Counting, on the CPU, the operations that would make a CUDA host wait for the device inside a training step.

A GPU is fast for small models only while the CPU queues work ahead of it. These operations end that: reading a
tensor's value on the host (.item(), bool(), int(), float(): aten._local_scalar_dense; torch.equal), results whose
shape depends on the data (nonzero, masked_select, boolean-mask indexing and assignment, unique, bincount,
repeat_interleave by a tensor), multinomial sampling (its CUDA kernel reads a count), and a copy to another device
(a pageable host tensor copied to the GPU waits for it). TorchDispatchMode sees every aten call a step makes, on any
device, so the count is the same here as on a GPU.

On the CPU the host is the device, so a host-to-device copy is no aten call at all: what is counted instead is where
such a copy starts, a tensor made from host data inside the step (torch.tensor, torch.as_tensor, torch.from_numpy:
aten.lift_fresh). On a GPU that tensor lives in pageable host memory, and its copy to the device waits for the copy.
"""
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING = {"aten._local_scalar_dense", "aten.equal", "aten.nonzero", "aten.nonzero_static", "aten.masked_select",
           "aten._unique2", "aten.unique_dim", "aten.unique_consecutive", "aten.bincount", "aten.multinomial",
           "aten.repeat_interleave"}

# A tensor made from Python or numpy data: in host memory, pageable (kd's hot path builds tensors on the device).
HOST_DATA = {"aten.lift_fresh", "aten.lift_fresh_copy", "aten.lift"}


class SyncCounter(TorchDispatchMode):
    """`with SyncCounter() as syncs: ...` then `syncs.found`: {op name: times} of the syncing ops the body ran."""

    def __init__(self):
        super().__init__()
        self.found: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        if name in SYNCING:
            self.found[name] += 1
        elif name in ("aten.index", "aten.index_put", "aten.index_put_") and _has_bool_index(args):
            self.found[f"{name} (boolean mask)"] += 1
        elif name == "aten._to_copy" and "device" in kwargs and kwargs["device"] != args[0].device:
            self.found["aten._to_copy (to another device)"] += 1
        elif name == "aten.copy_" and args[1].device != args[0].device:
            self.found["aten.copy_ (from another device)"] += 1
        elif name in HOST_DATA:
            self.found[f"{name} (a tensor from host data)"] += 1
        return func(*args, **kwargs)


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or [])
