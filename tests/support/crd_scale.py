"""One CRD training step at ImageNet size, its peak memory measured: run as a script by tests/methods/test_crd.py.

N = 1,281,167 training samples in 1000 classes, K = 16384 negatives, batch 256, feat_dim 128: the sampling, the
scores, the loss, its backward and the banks' update. Prints one JSON line: the banks' bytes, the resident memory
before the step, its peak during the step (VmHWM, reset by /proc/self/clear_refs; the CPU allocator of torch keeps
no statistics and tracemalloc does not see it) and the seconds each half took.
"""
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from kd.methods.base import Step  # noqa: E402
from kd.methods.crd import CRDLoss  # noqa: E402

N, K, BATCH, FEAT_DIM, CLASSES, WIDTH = 1_281_167, 16384, 256, 128, 1000, 512


def status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def main() -> None:
    torch.manual_seed(0)
    labels = torch.arange(N) % CLASSES
    criterion = CRDLoss(weight=0.8, feat_dim=FEAT_DIM, num_negatives=K, temperature=0.07, momentum=0.5)
    criterion.bound_layers = (["student"], ["teacher"])
    criterion.build([torch.Size([BATCH, WIDTH])], [torch.Size([BATCH, WIDTH])], torch.zeros(1), labels)
    index = torch.randperm(N)[:BATCH]
    student = torch.randn(BATCH, WIDTH, requires_grad=True)
    step = Step(torch.zeros(BATCH, CLASSES), labels[index], None, {"student": student},
                {"teacher": torch.randn(BATCH, WIDTH)}, index=index)
    memory = criterion.memory_student.data_ptr(), criterion.memory_teacher.data_ptr()
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
    started = time.perf_counter()
    loss = criterion(step)["loss_crd"]
    forward = time.perf_counter()
    loss.backward()
    finished = time.perf_counter()
    banks = 2 * criterion.memory_student.nbytes
    in_place = memory == (criterion.memory_student.data_ptr(), criterion.memory_teacher.data_ptr())
    print(json.dumps({"banks_bytes": banks, "before_bytes": before, "peak_bytes": status("VmHWM"),
                      "forward_s": forward - started, "backward_s": finished - forward, "in_place": in_place,
                      "loss": loss.item(), "grad_finite": bool(student.grad.isfinite().all())}))


if __name__ == "__main__":
    main()
