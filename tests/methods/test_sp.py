"""SP (kd/methods/sp.py) against a loop-by-loop computation of the normalised batch similarities."""
import math

import pytest
import torch

from kd.methods.sp import similarity_loss
from support.criteria import randn

# Tiny tensors: one thread is faster, and keeps these tests quick when the CPU is shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def ref_similarity_loss(fs: torch.Tensor, ft: torch.Tensor) -> float:
    b = fs.shape[0]

    def gram(f):
        rows = [[float((f[i].flatten() * f[j].flatten()).sum()) for j in range(b)] for i in range(b)]
        return [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in rows]

    gs, gt = gram(fs), gram(ft)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def test_similarity_loss_matches_the_formula():
    fs, ft = randn(5, 3, 2, 2, seed=1), randn(5, 8, 1, 1, seed=2)  # any widths: only b x b matrices are compared
    assert similarity_loss(fs, ft).item() == pytest.approx(ref_similarity_loss(fs, ft), rel=1e-10)
