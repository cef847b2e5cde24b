"""RKD (kd/methods/rkd.py) against loop-by-loop distances and angles, and the rkd option's weights."""
import pytest
import torch

from kd.methods.rkd import rkd_angle_loss, rkd_distance_loss, rkd_loss
from support.criteria import preset, randn

# Tiny tensors: one thread is faster, and keeps these tests quick when the CPU is shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def huber(x: float) -> float:  # smooth L1 with beta 1
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def ref_rkd(fs: torch.Tensor, ft: torch.Tensor) -> tuple[float, float]:
    """(distance loss, angle loss) of Park et al.: psi_D = |x_i - x_j| / mu, psi_A = cos of the angle at x_j."""
    b = fs.shape[0]
    xs, xt = fs.reshape(b, -1), ft.reshape(b, -1)

    def distances(x):
        d = [[float((x[i] - x[j]).norm()) for j in range(b)] for i in range(b)]
        mu = sum(d[i][j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        return [[v / mu for v in row] for row in d]

    def angles(x):
        def unit(v):
            n = float(v.norm())
            return v / n if n > 0 else v * 0

        return [float(unit(x[i] - x[j]) @ unit(x[k] - x[j])) for j in range(b) for i in range(b) for k in range(b)]

    ds, dt = distances(xs), distances(xt)
    distance = sum(huber(ds[i][j] - dt[i][j]) for i in range(b) for j in range(b)) / b**2
    angle = sum(huber(a - c) for a, c in zip(angles(xs), angles(xt))) / b**3
    return distance, angle


def test_rkd_losses_match_the_formula():
    fs, ft = randn(5, 4, seed=1), randn(5, 6, seed=2)
    distance, angle = ref_rkd(fs, ft)
    assert rkd_distance_loss(fs, ft).item() == pytest.approx(distance, rel=1e-9)
    assert rkd_angle_loss(fs, ft).item() == pytest.approx(angle, rel=1e-9)
    assert rkd_loss(fs, ft, 25.0, 50.0).item() == pytest.approx(25 * distance + 50 * angle, rel=1e-9)
    assert rkd_loss(fs, ft, 2.0, 3.0).item() == pytest.approx(2 * distance + 3 * angle, rel=1e-9)


def test_rkd_preset_weights():
    method = preset("rkd").terms["rkd"]
    assert (method.distance_weight, method.angle_weight) == (25.0, 50.0)
