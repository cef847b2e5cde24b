"""CRD (kd/methods/crd.py): NCE against its formula, the criterion against its definition sample by sample,
Z fixed after the first batch, the memory banks, the negatives' distribution and keys, the ImageNet-size path (its
draws, gathered scores, in-place banks and peak memory at the real sizes), and the crd_kd option."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from kd.methods import crd
from kd.methods.base import Step
from kd.methods.crd import (
    CRDLoss,
    gathered_dots,
    momentum_update,
    momentum_update_,
    nce_loss,
    negative_pool,
    sample_negatives,
    step_generator,
)
from support.criteria import F64, LABELS, bind, configured, forward_step, preset, randn
from support.syncs import SyncCounter

# Tiny tensors: one thread is faster, and keeps these tests quick when the CPU is shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def ref_nce(probabilities: torch.Tensor, num_data: int, eps: float = 1e-7) -> float:
    b, k = probabilities.shape[0], probabilities.shape[1] - 1
    total = 0.0
    for i in range(b):
        p = float(probabilities[i, 0])
        total += math.log(p / (p + k / num_data + eps))
        for j in range(1, k + 1):
            total += math.log((k / num_data) / (float(probabilities[i, j]) + k / num_data + eps))
    return -total / b


def test_nce_loss_matches_the_formula():
    probabilities = torch.rand(3, 6, generator=torch.Generator().manual_seed(0), dtype=F64) * 1e-3
    assert nce_loss(probabilities, num_data=50).item() == pytest.approx(ref_nce(probabilities, 50), rel=1e-12)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def large(monkeypatch):
    """The ImageNet-size path (drawn negatives, gathered scores, banks in place) at the tiny sizes of these tests."""
    monkeypatch.setattr(crd, "LARGE_DATA", 0)
    monkeypatch.setattr(crd, "DRAWN_RATIO", 1)


@pytest.fixture(params=["below LARGE_DATA", "at or above LARGE_DATA"])
def size(request):
    """Both paths of CRDLoss: the CIFAR-size one and the ImageNet-size one (the `large` fixture)."""
    if request.param != "below LARGE_DATA":
        request.getfixturevalue("large")
    return request.param


def test_negatives_come_from_other_classes_without_replacement_when_possible():
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 3)
    anchors = torch.tensor([0, 1, 2, 2, 0])
    negatives = sample_negatives(negative_pool(labels, 8), anchors, generator(0))
    assert negatives.shape == (5, 8) and negatives.dtype == torch.long
    assert (labels[negatives] != anchors[:, None]).all()
    assert all(len(set(row.tolist())) == 8 for row in negatives)  # distinct: 13 or 20 other-class samples
    pool = negative_pool(labels, 15)  # classes 0 and 1 have 13 negatives: drawn with replacement
    assert pool.distinct.tolist() == [False, False, True] and pool.draws == (True, True)
    for seed in range(20):
        negatives = sample_negatives(pool, anchors, generator(seed))
        assert (labels[negatives] != anchors[:, None]).all()
        assert all(len(set(row.tolist())) == 15 for row, a in zip(negatives, anchors) if a == 2)
    assert negative_pool(labels, 21).draws == (False, True) and negative_pool(labels, 3).draws == (True, False)
    first = sample_negatives(pool, anchors, generator(1))
    assert torch.equal(sample_negatives(pool, anchors, generator(1)), first)  # the generator decides
    assert not torch.equal(sample_negatives(pool, anchors, generator(2)), first)
    with pytest.raises(ValueError, match="one class"):
        negative_pool(torch.zeros(5, dtype=torch.long), 3)


CHI2_999 = {5: 20.52, 6: 22.46, 34: 65.25}  # the chi-square distribution's 0.999 quantiles, by degrees of freedom


def chi_square(counts: torch.Tensor) -> float:
    """Pearson's statistic of counts against equal expected counts."""
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


def test_distinct_negatives_are_a_uniform_subset_of_the_other_classes():
    """Without replacement: k distinct positions, every allowed one equally likely; over 4000 draws of 3 of the 7
    other-class samples, the 35 subsets are equally frequent too (chi-square below its 0.999 quantile)."""
    labels = torch.tensor([0] * 3 + [1] * 4 + [2] * 3)  # anchor class 0: the 7 samples 3..9 are allowed
    pool, draws = negative_pool(labels, 3), 4000
    anchors = torch.zeros(draws, dtype=torch.long)
    negatives = sample_negatives(pool, anchors, generator(0))
    assert (negatives >= 3).all() and all(len(set(row)) == 3 for row in negatives.tolist())
    positions = torch.bincount(negatives.flatten(), minlength=10)[3:].double()
    assert chi_square(positions) < CHI2_999[6]
    subsets = torch.tensor([sum(1 << p for p in row) for row in negatives.tolist()])
    frequencies = torch.unique(subsets, return_counts=True)[1].double()
    assert len(frequencies) == 35 and chi_square(frequencies) < CHI2_999[34]


def test_repeated_negatives_are_uniform_over_the_other_classes():
    """With replacement (k above the other-class count): each draw uniform over the other classes' samples,
    whichever block of the class-ordered layout the anchor's class occupies."""
    labels = torch.tensor([1, 0, 2, 1, 0, 2, 2, 1, 0, 2])  # classes 0 and 1 have 7 others, class 2 has 6
    pool = negative_pool(labels, 8)
    assert pool.draws == (False, True)
    for anchor in range(3):
        negatives = sample_negatives(pool, torch.full((500,), anchor), generator(anchor))
        allowed = (labels != anchor).nonzero().flatten()
        counts = torch.bincount(negatives.flatten(), minlength=10).double()
        assert counts[labels == anchor].sum() == 0
        assert chi_square(counts[allowed]) < CHI2_999[len(allowed) - 1]


def test_a_share_of_a_batch_gets_its_rows_of_the_whole_batch_draw():
    """The draws are made for the global batch and sliced: rows [2:5] of a batch of 7, drawn alone, are rows 2..4 of
    the draw for all 7, in both modes (tests/test_distributed.py checks it with 2 real ranks)."""
    labels = torch.arange(30) % 3
    anchors = torch.tensor([0, 1, 2, 2, 0, 1, 1])
    for k in (5, 25):  # without and with replacement
        pool = negative_pool(labels, k)
        whole = sample_negatives(pool, anchors, generator(3))
        assert torch.equal(sample_negatives(pool, anchors[2:5], generator(3), 7, slice(2, 5)), whole[2:5])


def test_sampling_reads_nothing_back_to_the_host():
    """Both modes in one batch: no sync (no .item(), no boolean mask, no multinomial), and the global RNG untouched."""
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 3)
    pool = negative_pool(labels, 15)
    anchors, state = torch.tensor([0, 1, 2, 2, 0]), torch.get_rng_state()  # made outside the counted block
    with SyncCounter() as syncs:
        sample_negatives(pool, anchors, generator(0))
    assert dict(syncs.found) == {} and torch.equal(torch.get_rng_state(), state)


def test_the_drawn_path_is_taken_at_imagenet_size_only():
    """From LARGE_DATA samples on, where every class has DRAWN_RATIO * K others: ImageNet with K = 16384 (1088 spare
    draws, against 105 repeats expected); below it, or with K too large for the smallest class's others, the keys."""
    assert negative_pool(torch.arange(1_281_167) % 1000, 16384).spare == 16384 // 16 + 64 == 1088
    assert negative_pool(torch.arange(crd.LARGE_DATA) % 1000, 4000).spare == 4000 // 16 + 64
    assert negative_pool(torch.arange(crd.LARGE_DATA - 1) % 1000, 4000).spare == 0  # the size: CIFAR's path
    assert negative_pool(torch.arange(crd.LARGE_DATA) % 1000, 4100).spare == 0  # 262 k others < 64 * 4100


def test_drawn_negatives_are_a_uniform_subset_of_the_other_classes(large):
    """The drawn path's law is the keys' law: k distinct positions, every allowed one and (over 4000 draws of 3 of
    the 7 other-class samples) every one of the 35 subsets equally frequent (chi-square below its 0.999 quantile)."""
    labels = torch.tensor([0] * 3 + [1] * 4 + [2] * 3)
    pool, draws = negative_pool(labels, 3), 4000
    assert pool.spare == 3 // 16 + 64 and pool.draws == (True, False)
    negatives = sample_negatives(pool, torch.zeros(draws, dtype=torch.long), generator(0))
    assert negatives.shape == (draws, 3) and (negatives >= 3).all()
    assert all(len(set(row)) == 3 for row in negatives.tolist())
    assert chi_square(torch.bincount(negatives.flatten(), minlength=10)[3:].double()) < CHI2_999[6]
    subsets = torch.tensor([sum(1 << p for p in row) for row in negatives.tolist()])
    frequencies = torch.unique(subsets, return_counts=True)[1].double()
    assert len(frequencies) == 35 and chi_square(frequencies) < CHI2_999[34]


def test_drawn_negatives_fill_a_short_row_with_other_class_samples(large):
    """Where k + spare draws hold fewer than k distinct values, the row is completed by its first draws: still
    other-class samples, never the anchor's class and never an unwritten value."""
    labels = torch.tensor([0] * 3 + [1] * 4 + [2] * 3)
    pool = negative_pool(labels, 7)._replace(spare=1)  # 8 draws of the 7 others: most rows miss one
    negatives = sample_negatives(pool, torch.zeros(200, dtype=torch.long), generator(1))
    assert ((negatives >= 3) & (negatives < 10)).all()
    distinct = [len(set(row)) for row in negatives.tolist()]
    assert min(distinct) < 7 and max(distinct) == 7  # short rows were filled; full ones are subsets


def test_drawn_negatives_are_the_whole_batch_draw_and_read_nothing_back(large):
    """Rows [2:5] of a batch of 7 drawn alone are rows 2..4 of the whole draw; no host read, the global RNG alone."""
    labels = torch.arange(30) % 3
    anchors = torch.tensor([0, 1, 2, 2, 0, 1, 1])
    pool = negative_pool(labels, 5)
    whole = sample_negatives(pool, anchors, generator(3))
    state = torch.get_rng_state()
    with SyncCounter() as syncs:
        share = sample_negatives(pool, anchors[2:5], generator(3), 7, slice(2, 5))
    assert dict(syncs.found) == {} and torch.equal(torch.get_rng_state(), state)
    assert torch.equal(share, whole[2:5]) and (labels[whole] != anchors[:, None]).all()


def test_gathered_dots_are_the_products_and_their_gradient_survives_the_in_place_update(monkeypatch):
    """gathered_dots in chunks of one row equals the (b, N) product's picks, and its gradient equals the product's
    from the banks before the update, though the update overwrote rows (repeated ones too) before backward; without
    naming those rows the gradient would be wrong. No host read, forward or backward."""
    monkeypatch.setattr(crd, "GATHER_BYTES", 1)
    memory = torch.nn.functional.normalize(randn(30, 4, seed=1), dim=1)
    anchor = randn(5, 4, seed=2).requires_grad_(True)
    index = torch.randint(0, 30, (5, 7), generator=generator(3))
    changing = torch.tensor([3, 8, 3, 11, 20])
    index[:, 0], index[0, 1:3] = changing, torch.tensor([8, 11])  # the positives, and a negative among them
    weights = randn(5, 7, seed=4)
    expected = (anchor @ memory.t()).gather(1, index)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), anchor)
    with SyncCounter() as syncs:
        dots = gathered_dots(anchor, memory, index, changing)
        stale = gathered_dots(anchor, memory, index)
        momentum_update_(memory, changing, randn(5, 4, seed=5), 0.5)
        (grad,) = torch.autograd.grad((dots * weights).sum(), anchor)
        (stale_grad,) = torch.autograd.grad((stale * weights).sum(), anchor)
    assert dict(syncs.found) == {}
    assert_close(dots, expected, rtol=1e-12, atol=1e-12)
    assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(stale_grad, expected_grad)


def test_one_crd_step_at_imagenet_size_stays_within_its_memory_bound():
    """One training step (sampling, scores, loss, backward, banks' update) at ImageNet's sizes: N = 1,281,167,
    K = 16384, batch 256, feat_dim 128. A subprocess, because a process's peak resident memory (VmHWM) is the one
    measure that sees torch's CPU allocator. Measured on this repository's 2-core machine: 0.37 GB above the 1.9 GB
    the process held before the step (the two banks 1.31 GB of it), 7 s forward and 5 s backward under load; the
    (B, N) keys and products of the CIFAR-size path would take 2.6 GB and 1.3 GB there, and the sampling alone 29 s."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident memory")
    script = Path(__file__).resolve().parents[1] / "support" / "crd_scale.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    step_bytes = found["peak_bytes"] - found["before_bytes"]
    print(f"one CRD step at ImageNet size: {step_bytes / 1e9:.2f} GB above the {found['before_bytes'] / 1e9:.2f} GB "
          f"before it (banks {found['banks_bytes'] / 1e9:.2f} GB); {found['forward_s']:.1f} s forward, "
          f"{found['backward_s']:.1f} s backward")
    assert found["banks_bytes"] == 2 * 1_281_167 * 128 * 4
    assert step_bytes < 0.75e9, f"one CRD step took {step_bytes / 1e9:.2f} GB beyond the banks (bound 0.75 GB)"
    assert found["in_place"] and found["grad_finite"] and math.isfinite(found["loss"])


def test_step_generator_is_keyed_by_seed_epoch_step_and_stream():
    def draw(stream: str = "crd", **key) -> torch.Tensor:
        step = Step(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), **{"seed": 1, "epoch": 2, "step": 3, **key})
        return torch.rand(4, generator=step_generator(step, stream, torch.device("cpu")))

    base = draw()
    assert torch.equal(draw(), base)
    for other in (draw(seed=2), draw(epoch=3), draw(step=4), draw("another")):
        assert not torch.equal(other, base)


def test_momentum_update_mixes_and_renormalises_only_the_batch_rows():
    memory = torch.nn.functional.normalize(randn(6, 3, seed=1), dim=1)
    values = torch.nn.functional.normalize(randn(2, 3, seed=2), dim=1)
    index = torch.tensor([4, 1])
    updated = momentum_update(memory, index, values, momentum=0.5)
    for row, value in zip(index.tolist(), values):
        mixed = 0.5 * memory[row] + 0.5 * value
        assert_close(updated[row], mixed / mixed.norm())
    for row in (0, 2, 3, 5):
        assert torch.equal(updated[row], memory[row])
    assert not torch.equal(updated, memory)  # a new tensor; the input is left as it was
    in_place = memory.clone()
    assert momentum_update_(in_place, index, values, momentum=0.5) is in_place and torch.equal(in_place, updated)


def bound_crd(k: int = 5) -> CRDLoss:
    criterion = configured(CRDLoss, weight=0.8, feat_dim=6, num_negatives=k)
    bind(criterion)
    return criterion.double()


def crd_step(student_dim: int, teacher_dim: int, index: torch.Tensor, seed: int = 0, step: int = 0) -> Step:
    b = len(index)
    features_s = {"fc:in": randn(b, student_dim, seed=seed)}
    features_t = {"fc:in": randn(b, teacher_dim, seed=seed + 1)}
    return Step(torch.zeros(b, 4, dtype=F64), LABELS[index], None, features_s, features_t, index=index, step=step)


def crd_negatives(step: Step, k: int = 5) -> torch.Tensor:
    """The negatives CRDLoss draws for this step: keyed by (seed, epoch, step), independent of the global RNG."""
    generator = step_generator(step, "crd", torch.device("cpu"))
    return sample_negatives(negative_pool(LABELS, k), LABELS[step.index], generator)


def ref_crd(criterion: CRDLoss, step: Step, negatives: torch.Tensor, fixed_z=None) -> tuple[float, list[float]]:
    """CRD from its definition, sample by sample: the weighted loss, and the two Z (this batch's, or fixed_z)."""
    n, temperature = len(LABELS), criterion.temperature

    def embed(linear, x):
        v = (linear.weight @ x + linear.bias).detach()
        return v / v.norm()

    sides = [
        (criterion.embed_student, step.student_features["fc:in"], criterion.memory_teacher),
        (criterion.embed_teacher, step.teacher_features["fc:in"], criterion.memory_student),
    ]
    total, normalizers = 0.0, []
    for side, (linear, features, memory) in enumerate(sides):
        scores = []
        for i, sample in enumerate(step.index.tolist()):
            v = embed(linear, features[i])
            candidates = [sample] + negatives[i].tolist()
            scores.append([math.exp(float(memory[j] @ v) / temperature) for j in candidates])
        z = sum(map(sum, scores)) / sum(map(len, scores)) * n if fixed_z is None else fixed_z[side]
        normalizers.append(z)
        total += ref_nce(torch.tensor(scores, dtype=F64) / z, n)
    return criterion.weight * total, normalizers


def test_crd_matches_its_definition_and_fixes_z_after_the_first_batch(size):
    criterion = bound_crd()
    index = torch.tensor([3, 8, 13, 22])
    step = crd_step(criterion.embed_student.in_features, criterion.embed_teacher.in_features, index)
    negatives = crd_negatives(step)
    expected, normalizers = ref_crd(criterion, step, negatives)  # before the call updates the memory
    terms = criterion(step)
    assert list(terms) == ["loss_crd"]
    assert terms["loss_crd"].item() == pytest.approx(expected, rel=1e-9)
    assert criterion.normalizers.tolist() == pytest.approx(normalizers, rel=1e-12)
    # The second batch is normalised by the first batch's Z.
    step = crd_step(criterion.embed_student.in_features, criterion.embed_teacher.in_features, index, seed=4, step=1)
    negatives = crd_negatives(step)
    expected_second, _ = ref_crd(criterion, step, negatives, fixed_z=normalizers)
    re_estimated, second_normalizers = ref_crd(criterion, step, negatives)
    value = criterion(step)["loss_crd"].item()
    assert criterion.normalizers.tolist() == pytest.approx(normalizers, rel=1e-12)
    assert value == pytest.approx(expected_second, rel=1e-9)
    assert second_normalizers != pytest.approx(normalizers) and value != pytest.approx(re_estimated)


def test_crd_updates_its_memory_banks_in_training_only(size):
    """Below LARGE_DATA the banks are new tensors (the (b, N) products keep the old ones for backward); from it on
    they are updated in place, and backward still runs (gathered_dots kept the rows the update overwrote)."""
    criterion = bound_crd()
    index = torch.tensor([1, 6])
    step = crd_step(criterion.embed_student.in_features, criterion.embed_teacher.in_features, index)
    before = criterion.memory_student.clone(), criterion.memory_teacher.clone()
    storage = criterion.memory_student.data_ptr(), criterion.memory_teacher.data_ptr()
    step.student_features["fc:in"].requires_grad_(True)
    criterion(step)["loss_crd"].backward()
    assert torch.isfinite(step.student_features["fc:in"].grad).all()
    in_place = storage == (criterion.memory_student.data_ptr(), criterion.memory_teacher.data_ptr())
    assert in_place == (size == "at or above LARGE_DATA")
    with torch.no_grad():
        anchors = [
            torch.nn.functional.normalize(criterion.embed_student(step.student_features["fc:in"]), dim=1),
            torch.nn.functional.normalize(criterion.embed_teacher(step.teacher_features["fc:in"]), dim=1),
        ]
    for memory, old, anchor in zip((criterion.memory_student, criterion.memory_teacher), before, anchors):
        mixed = 0.5 * old[index] + 0.5 * anchor
        assert_close(memory[index], mixed / mixed.norm(dim=1, keepdim=True))
        assert_close(memory[index].norm(dim=1), torch.ones(2, dtype=F64))
        untouched = torch.ones(len(LABELS), dtype=torch.bool)
        untouched[index] = False
        assert torch.equal(memory[untouched], old[untouched])
    criterion.eval()
    frozen = criterion.memory_student.clone()
    criterion(step)
    assert torch.equal(criterion.memory_student, frozen)


def test_crd_state_is_in_its_state_dict_and_restores():
    criterion = bound_crd()
    assert criterion.memory_student.shape == criterion.memory_teacher.shape == (len(LABELS), 6)
    index = torch.tensor([0, 9])
    step = crd_step(criterion.embed_student.in_features, criterion.embed_teacher.in_features, index)
    criterion(step)
    state = criterion.state_dict()
    buffers_and_embeddings = {"memory_student", "memory_teacher", "normalizers", "embed_student.weight"}
    assert buffers_and_embeddings <= state.keys()
    assert "train_labels" not in state  # the data's, passed to bind again on resume
    restored = bound_crd()
    restored.load_state_dict(state)
    torch.manual_seed(3)  # the global RNG plays no part: the step's key draws the negatives
    expected = criterion(step)["loss_crd"]
    torch.manual_seed(4)
    assert torch.equal(restored(step)["loss_crd"], expected)


def test_crd_leaves_the_global_rng_alone_and_draws_by_the_step_key():
    criterion = bound_crd()
    index = torch.tensor([2, 7, 11])
    step = crd_step(criterion.embed_student.in_features, criterion.embed_teacher.in_features, index)
    state = torch.get_rng_state()
    first = criterion.eval()(step)["loss_crd"]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(criterion(step)["loss_crd"], first)  # eval: the banks are as they were
    step.step = 1
    assert not torch.equal(criterion(step)["loss_crd"], first)  # another step, other negatives


def test_crd_checks_the_rows_against_the_global_batch():
    criterion = bound_crd()
    step = crd_step(criterion.embed_student.in_features, criterion.embed_teacher.in_features, torch.tensor([1, 2]))
    step.batch_size = 3  # one process holds the whole batch: 3 rows, not 2
    with pytest.raises(ValueError, match="share of a batch of 3"):
        criterion(step)
    step.batch_size = 2
    assert torch.isfinite(criterion(step)["loss_crd"])


def test_crd_needs_the_sample_index():
    criterion = bound_crd()
    step = crd_step(criterion.embed_student.in_features, criterion.embed_teacher.in_features, torch.tensor([0]))
    step.index = None
    with pytest.raises(ValueError, match="step.index"):
        criterion(step)


def test_crd_kd_preset_is_repdistillers_crd_plus_kd():
    criterion = preset("crd_kd")
    ce, kd, crd = criterion.terms["ce"], criterion.terms["kd"], criterion.terms["crd"]
    assert (ce.weight, kd.weight, kd.temperature, crd.weight) == (1.0, 1.0, 4.0, 0.8)  # -r 1 -a 1 -b 0.8, kd_T 4
    student, teacher = bind(criterion)
    _, terms = forward_step(criterion, student, teacher)
    assert sorted(terms) == ["loss_ce", "loss_crd", "loss_kd"]
    assert torch.isfinite(sum(terms.values()))
