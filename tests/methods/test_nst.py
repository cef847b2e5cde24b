"""NST (kd/methods/nst.py) against a loop-by-loop MMD of the channel maps."""
import math

import pytest
import torch

from kd.methods.nst import nst_loss
from support.criteria import randn, ref_average_pool

# Tiny tensors: one thread is faster, and keeps these tests quick when the CPU is shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def ref_pool_to(f: torch.Tensor, size: int) -> torch.Tensor:
    return f if f.shape[2] == size else ref_average_pool(f, f.shape[2] // size)


def ref_nst(fs: torch.Tensor, ft: torch.Tensor) -> float:
    """Huang & Wang: per sample MMD^2 of the channel sets under k(x, y) = (x.y)^2, x the unit-norm channel maps."""
    size = min(fs.shape[2], ft.shape[2])
    fs, ft = ref_pool_to(fs, size), ref_pool_to(ft, size)

    def channels(f, i):
        rows = [[float(v) for v in f[i, k].flatten()] for k in range(f.shape[1])]
        return [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in rows]

    def mean_kernel(a, b):
        return sum(sum(x * y for x, y in zip(u, v)) ** 2 for u in a for v in b) / (len(a) * len(b))

    total = 0.0
    for i in range(fs.shape[0]):
        s, t = channels(fs, i), channels(ft, i)
        total += mean_kernel(t, t) + mean_kernel(s, s) - 2 * mean_kernel(s, t)
    return total / fs.shape[0]


@pytest.mark.parametrize("student_size, teacher_size", [(4, 4), (8, 4), (4, 8)])
def test_nst_loss_matches_the_mmd_formula(student_size, teacher_size):
    fs, ft = randn(2, 3, student_size, student_size, seed=1), randn(2, 5, teacher_size, teacher_size, seed=2)
    assert nst_loss(fs, ft).item() == pytest.approx(ref_nst(fs, ft), rel=1e-10)
