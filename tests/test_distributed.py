"""torchrun data parallelism on the CPU (gloo, 2 processes): the test set counted once, rank 0 alone writing,
and a killed DDP run resuming to the same bits."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize

import kd.config  # noqa: F401  (registers the schema)
from kd import distributed, engine, loop, teachers
from kd.methods import crd as crd_module
from kd.methods.base import Step
from kd.methods.crd import CRDLoss, negative_pool, sample_negatives, step_generator
from support import forked

REPO = Path(__file__).resolve().parents[1]
# 16x16 digits and quarter-width CNNs with BatchNorm: what DDP synchronises (gradients, buffers, CRD's banks) at the
# smallest size; threads are OMP_NUM_THREADS=2 per rank, as a real CPU run has.
TINY = ["experiment=quickstart", "teacher_recipe=student", "model@teacher=simple_cnn", "teacher.width=0.25",
        "model@student=simple_cnn", "student.width=0.25", "++dataset.source.image_size=16", "epochs=2",
        "profile=false"]


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("n", [0, 1, 7, 10, 359])
def test_shards_of_all_ranks_cover_every_item_once(monkeypatch, world, n):
    covered = []
    for rank in range(world):
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        share = list(range(n))[distributed.shard(n)]
        assert distributed.shard_sizes(n)[rank] == len(share)  # every rank knows every rank's share size
        covered += share
    assert covered == list(range(n))


def torchrun(tmp_path: Path, run_dir: str, *overrides: str, runner: str = "train.py", env=None):
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", runner, *TINY,
            f"teacher_store={tmp_path / 'teachers'}", f"hydra.run.dir={tmp_path / run_dir}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}  # 2 threads per rank: as a real CPU run has
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def ddp_teacher(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp")
    proc = torchrun(tmp, "teacher", "phase=teacher", "logger.mode=offline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


@pytest.mark.slow
def test_ddp_run_counts_the_test_set_once_and_rank0_alone_writes(ddp_teacher):
    run = ddp_teacher / "teacher"
    result = json.loads((run / "result.json").read_text())
    assert result["world_size"] == 2 and result["epochs"] == 2
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert len(list(run.glob("wandb/offline-run-*"))) == 1  # rank 1 logs nothing
    # The recorded test accuracy is the single-process accuracy of the saved weights over the whole test set.
    with initialize(version_base="1.3", config_path="../conf"):
        cfg = compose("config", overrides=[*TINY, "phase=teacher"])
    data = engine.load_data(cfg.dataset, torch.device("cpu"), channels_last=False)  # as CPU DDP runs (NCHW)
    model = teachers.build(teachers.read(run / "last.pt", cfg.teacher), cfg.teacher, torch.device("cpu"))
    logits = loop.predict(model, data, "test", 512)
    assert len(logits) == len(data.test) == 359
    assert loop.score(logits, data.test.labels, None)["acc1"] == pytest.approx(result["test/acc1"], abs=1e-9)
    # And the store filed it once, with a manifest.
    assert len(list((ddp_teacher / "teachers").glob("*/v*/manifest.json"))) == 1


@pytest.mark.slow
def test_killed_ddp_student_with_crd_and_kd_resumes_to_the_same_bits(ddp_teacher):
    """CE + KD + CRD under torchrun (hooks, adapters with averaged gradients, CRD's shared memory banks), killed after
    its first checkpoint, resumes to the uninterrupted run's bits: CRD's negatives come from the (seed, epoch, step)
    key, not from a global RNG only rank 0's state of is saved."""
    # 2048 negatives, more than any digit's ~1,300 other-class samples: drawn with replacement, as the default 16384
    # are here, at an eighth of their cost.
    student = ["phase=student", "logger.mode=disabled", "loss=crd_kd", "loss.crd.num_negatives=2048"]
    whole = torchrun(ddp_teacher, "whole", *student)
    assert whole.returncode == 0, whole.stderr[-3000:]
    result = json.loads((ddp_teacher / "whole" / "result.json").read_text())
    assert result["world_size"] == 2 and result["adapter_params"] > 0
    assert all(math.isfinite(result[f"train/loss_{term}"]) for term in ("ce", "kd", "crd"))
    killed = torchrun(ddp_teacher, "resumed", *student, runner="tests/support/kill_runner.py",
                      env={"KD_KILL_AT": "after:last.pt:1"})
    assert killed.returncode != 0
    assert not (ddp_teacher / "resumed" / "result.json").exists()
    resumed = torchrun(ddp_teacher, "resumed", *student)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((ddp_teacher / "resumed" / "run_info.json").read_text())["resumed_from_epoch"] == 1
    records = [(ddp_teacher / run / "result.json").read_bytes() for run in ("resumed", "whole")]
    assert records[0] == records[1]


@pytest.mark.slow
def test_ddp_refuses_to_train_a_missing_teacher(tmp_path):
    proc = torchrun(tmp_path, "student", "phase=student", "logger.mode=disabled", "train_missing_teacher=true")
    assert proc.returncode != 0
    assert "does not work under torchrun: train the teacher first" in proc.stderr
    assert not (tmp_path / "student" / "result.json").exists()


@pytest.mark.slow
def test_submitit_job_with_two_tasks_trains_data_parallel(tmp_path):
    """The SLURM path, one task per GPU, run by submitit's local executor: the tasks form one process group."""
    args = ["train.py", "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", *TINY, "epochs=1",
            "phase=teacher", "logger.mode=disabled", f"teacher_store={tmp_path / 'teachers'}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = forked.run(args, REPO)  # train.py -m; submitit starts the two tasks as processes of their own
    assert proc.returncode == 0, proc.stdout[-3000:]
    (result_file,) = (tmp_path / "sweep").glob("*/result.json")
    result = json.loads(result_file.read_text())
    assert result["world_size"] == 2 and result["epochs"] == 1


def crd_after_one_step(rank: int, world: int, out: Path, large: bool = False) -> None:
    """One CRD training step on rank `rank`'s share of a batch of 7 (all of it when world == 1), through the
    criterion as the loop calls it, and sample_negatives alone on a pool with both draw modes; `large`: on CRD's
    ImageNet-size path (drawn negatives, gathered scores, banks updated in place), at these tiny sizes."""
    if large:
        crd_module.LARGE_DATA, crd_module.DRAWN_RATIO = 0, 1
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same embeddings and initial banks on every rank
    crd = CRDLoss(weight=0.8, feat_dim=4, num_negatives=5, temperature=0.07, momentum=0.5)
    train_labels = torch.arange(20) % 4
    crd.build([torch.Size([1, 3])], [torch.Size([1, 5])], torch.zeros(1), train_labels)
    crd.bound_layers = (["s"], ["t"])
    generator = torch.Generator().manual_seed(1)
    index = torch.randperm(20, generator=generator)[:7]
    student, teacher = torch.randn(7, 3, generator=generator), torch.randn(7, 5, generator=generator)
    share = distributed.shard(7)  # 3 rows on rank 0, 4 on rank 1
    step = Step(torch.zeros(7, 4)[share], train_labels[index][share], None, {"s": student[share]},
                {"t": teacher[share]}, index[share], epoch=2, step=3, seed=4, batch_size=7)
    crd(step)
    # Classes 1 and 2 have 16 other-class samples (k = 10 drawn without replacement), class 0 has 8 (with).
    labels = torch.tensor([0] * 12 + [1] * 4 + [2] * 4)
    anchors = labels[torch.randperm(20, generator=generator)[:7]]
    key = step_generator(step, "crd", torch.device("cpu"))
    pool = negative_pool(labels, 5 if large else 10)  # k = 5: every class drawn (spare > 0) on the large path
    assert (pool.spare > 0) == large
    negatives = sample_negatives(pool, anchors[share], key, 7, share)
    state = {k: v for k, v in crd.state_dict().items() if "memory" in k or "normalizers" in k}
    torch.save({**state, "negatives": negatives}, out / f"rank{rank}_of{world}.pt")
    if world > 1:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=["CIFAR-size path", "ImageNet-size path"])
def crd_runs(tmp_path_factory, request) -> tuple[list[dict], dict]:
    """crd_after_one_step on 2 gloo ranks, and on one process: (the ranks' results, the single one's). Spawned,
    not torchrun: the two tests below need only the criterion, no training run."""
    out, large = tmp_path_factory.mktemp("crd"), request.param == "ImageNet-size path"
    torch.multiprocessing.spawn(crd_after_one_step, args=(2, out, large), nprocs=2)
    previous = crd_module.LARGE_DATA, crd_module.DRAWN_RATIO
    try:
        crd_after_one_step(0, 1, out, large)
    finally:
        crd_module.LARGE_DATA, crd_module.DRAWN_RATIO = previous
    ranks = [torch.load(out / f"rank{r}_of2.pt", weights_only=True) for r in range(2)]
    return ranks, torch.load(out / "rank0_of1.pt", weights_only=True)


@pytest.mark.slow  # two spawned processes: ~10 s on 2 CPU cores
def test_crd_memory_banks_stay_identical_across_ranks(crd_runs):
    """Every rank applies the whole batch's rows to CRD's banks: the same banks on all ranks, those of one process
    on the full batch, and one normaliser Z for all ranks, the one-process Z (up to rounding: the embeddings of 3 or
    4 rows and the sums of the ranks' scores are not computed in the one process's order)."""
    ranks, single = crd_runs
    for key in ("memory_student", "memory_teacher"):
        assert torch.equal(ranks[0][key], ranks[1][key])
        torch.testing.assert_close(ranks[0][key], single[key])
    assert torch.equal(ranks[0]["normalizers"], ranks[1]["normalizers"]) and (ranks[0]["normalizers"] > 0).all()
    torch.testing.assert_close(ranks[0]["normalizers"], single["normalizers"])


@pytest.mark.slow  # two spawned processes: ~10 s on 2 CPU cores
def test_crd_negatives_of_two_ranks_are_the_one_process_draw(crd_runs):
    """Each rank draws the global batch's random numbers from the (seed, epoch, step) key and keeps its rows: the
    ranks' negatives, concatenated, are exactly those one process draws for the whole batch."""
    ranks, single = crd_runs
    assert [len(r["negatives"]) for r in ranks] == [3, 4]
    assert torch.equal(torch.cat([r["negatives"] for r in ranks]), single["negatives"])
