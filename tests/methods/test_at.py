"""AT (kd/methods/at.py) against a loop-by-loop computation of the paper's attention maps."""
import math

import pytest
import torch

from kd.methods.at import attention_loss
from support.criteria import randn, ref_average_pool

# Tiny tensors: one thread is faster, and keeps these tests quick when the CPU is shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def ref_attention_map(f: torch.Tensor, p: float) -> list[list[float]]:
    """Per sample: a_hw = (1/C) sum_c f_chw^p, divided by sqrt(sum_hw a_hw^2)."""
    n, c, h, w = f.shape
    maps = []
    for i in range(n):
        a = [sum(float(f[i, k, y, x]) ** p for k in range(c)) / c for y in range(h) for x in range(w)]
        norm = math.sqrt(sum(v * v for v in a))
        maps.append([v / norm for v in a])
    return maps


def ref_attention_loss(fs: torch.Tensor, ft: torch.Tensor, p: float = 2.0) -> float:
    if fs.shape[2] > ft.shape[2]:
        fs = ref_average_pool(fs, fs.shape[2] // ft.shape[2])
    elif ft.shape[2] > fs.shape[2]:
        ft = ref_average_pool(ft, ft.shape[2] // fs.shape[2])
    ms, mt = ref_attention_map(fs, p), ref_attention_map(ft, p)
    squares = [(a - b) ** 2 for rs, rt in zip(ms, mt) for a, b in zip(rs, rt)]
    return sum(squares) / len(squares)


@pytest.mark.parametrize("student_size, teacher_size", [(4, 4), (8, 4), (4, 8)])
def test_attention_loss_matches_the_formula(student_size, teacher_size):
    fs, ft = randn(3, 5, student_size, student_size, seed=1), randn(3, 7, teacher_size, teacher_size, seed=2)
    assert attention_loss(fs, ft, 2.0).item() == pytest.approx(ref_attention_loss(fs, ft), rel=1e-10)


def test_attention_loss_with_p_4():
    fs, ft = randn(2, 3, 4, 4, seed=1), randn(2, 6, 4, 4, seed=2)
    assert attention_loss(fs, ft, p=4.0).item() == pytest.approx(ref_attention_loss(fs, ft, p=4.0), rel=1e-10)
