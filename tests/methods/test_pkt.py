"""PKT (kd/methods/pkt.py) against a loop-by-loop computation of the cosine-kernel distributions."""
import math

import pytest
import torch

from kd.methods.pkt import pkt_loss
from support.criteria import randn

# Tiny tensors: one thread is faster, and keeps these tests quick when the CPU is shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def ref_pkt_loss(fs: torch.Tensor, ft: torch.Tensor, eps: float = 1e-7) -> float:
    b = fs.shape[0]

    def probabilities(f):
        f = f.reshape(b, -1)
        cos = [[float(f[i] @ f[j]) / ((float(f[i].norm()) + eps) * (float(f[j].norm()) + eps)) for j in range(b)]
               for i in range(b)]
        kernel = [[(v + 1) / 2 for v in row] for row in cos]
        return [[v / sum(row) for v in row] for row in kernel]

    p, q = probabilities(fs), probabilities(ft)
    return sum(q[i][j] * math.log((q[i][j] + eps) / (p[i][j] + eps)) for i in range(b) for j in range(b)) / b**2


def test_pkt_loss_matches_the_formula():
    fs, ft = randn(6, 4, seed=1), randn(6, 9, seed=2)
    assert pkt_loss(fs, ft).item() == pytest.approx(ref_pkt_loss(fs, ft), rel=1e-9)
