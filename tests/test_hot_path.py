"""The training step never makes the host wait for the device: no value read back, no data-dependent shape, no copy
from host memory (nor a tensor made from host data, where such a copy starts), for every method, with the teacher
live or read from the cache (tests/support/syncs.py counts them)."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

import kd.config  # noqa: F401  (registers the schema)
from kd import engine, loop, teacher_checks
from kd.config import Phase
from kd.teacher_cache import TeacherCache
from support.runs import compose_cfg
from support.syncs import SyncCounter

REPO = Path(__file__).resolve().parents[1]
LOSSES = sorted(p.stem for p in (REPO / "conf" / "loss").glob("*.yaml"))
# FSP compares FSP matrices of equal sizes: its teacher is the student's model (tests/test_stages.py checks its init
# stage's steps, and AB's and FT's).
OPTION_OVERRIDES = {"fsp": ["model@teacher=simple_cnn"]}

pytestmark = pytest.mark.usefixtures("one_thread")


def job_for(tmp_path: Path, loss: str, *overrides: str) -> loop.Job:
    """A student job on 16x16 digits (a few hundred training images, batch 64) with an untrained resnet8 teacher."""
    cfg = compose_cfg(tmp_path, "phase=student", f"loss={loss}", "model@teacher=resnet8", "batch_size=64", *overrides)
    device = torch.device("cpu")
    data = engine.load_data(cfg.dataset, device, channels_last=True)
    data.train = data.train.subset(torch.arange(200))  # 4 steps: 3 full batches and a short last one
    teacher = instantiate(cfg.teacher)  # build_job freezes it
    return engine.build_job(cfg, Phase.student, instantiate(cfg.loss), data, device, teacher)


def syncs_per_step(job: loop.Job, epoch: int, monkeypatch) -> list:
    """Run one epoch and return, for each of its training steps, the syncing operations it ran."""
    found, real_step = [], loop.train_step

    def counted(*args, **kwargs):
        with SyncCounter() as syncs:
            real_step(*args, **kwargs)
        found.append(dict(syncs.found))

    monkeypatch.setattr(loop, "train_step", counted)
    loop.train_one_epoch(job, epoch)
    monkeypatch.setattr(loop, "train_step", real_step)
    return found


@pytest.mark.parametrize("loss", LOSSES)
def test_a_training_step_never_waits_for_the_device(loss, tmp_path, monkeypatch):
    job = job_for(tmp_path, loss, *OPTION_OVERRIDES.get(loss, []))
    steps = syncs_per_step(job, 1, monkeypatch)
    assert len(steps) == 4 and steps == [{}] * 4, steps
    if job.criterion.needs_teacher and not job.criterion.layers()[1]:  # the teacher's logits from the cache
        for top_k in (None, 3):  # every logit, or each view's 3 largest (expanded per step)
            shape = (job.data.num_train, 10)
            job.cache = TeacherCache(tmp_path / "cache", {"loss": loss}, shape, "float32", 1e9, top_k)
            loop.train_one_epoch(job, 2)  # stores epoch 2
            cached = syncs_per_step(job, 2, monkeypatch)
            assert job.cache.hits == 1 and cached == [{}] * 4, (top_k, cached)


def test_the_counter_sees_what_would_sync(monkeypatch, tmp_path):
    """The test above cannot pass by counting nothing: an .item() put back into the step is found."""
    job = job_for(tmp_path, "kd")
    real_optimize = loop.optimize

    def optimize_and_read(job, loss):
        real_optimize(job, loss)
        loss.item()

    monkeypatch.setattr(loop, "optimize", optimize_and_read)
    assert syncs_per_step(job, 1, monkeypatch) == [{"aten._local_scalar_dense": 1}] * 4


def test_the_counter_sees_a_tensor_made_from_host_data(monkeypatch, tmp_path):
    """On the CPU the host is the device: a host-to-device copy is seen where it starts, a tensor made from host data
    in the step (on a GPU it sits in pageable memory and its copy waits for the device)."""
    job = job_for(tmp_path, "kd")
    real_optimize = loop.optimize

    def optimize_with_host_data(job, loss):
        real_optimize(job, loss)
        loss + torch.tensor([1.0, 2.0], device=job.data.device)  # what a per-step label smoothing table might do
        loss + torch.as_tensor(np.zeros(2, dtype=np.float32)).to(job.data.device)

    monkeypatch.setattr(loop, "optimize", optimize_with_host_data)
    assert syncs_per_step(job, 1, monkeypatch) == [{"aten.lift_fresh (a tensor from host data)": 2}] * 4


def test_a_crd_training_epoch_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    """CRD's negatives come from a generator keyed by (seed, epoch, step) and no model of the zoo has dropout: the
    global RNG, of which a checkpoint restores only rank 0's CUDA state, plays no part in a training step."""
    job = job_for(tmp_path, "crd_kd")
    state = torch.get_rng_state()
    loop.train_one_epoch(job, 1)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_frozen_teacher_computes_what_the_model_does_in_eval_mode(tmp_path):
    """teacher_checks.freeze_teacher, which engine.build_job applies to every teacher (set_up's, tools/' and
    job_for's): the data's memory format, eval mode, no gradients, and every BatchNorm of resnet8 (each after a
    convolution) folded, with the outputs unchanged."""
    cfg = compose_cfg(tmp_path, "phase=student", "model@teacher=resnet8")
    data = engine.load_data(cfg.dataset, torch.device("cpu"), channels_last=True)
    torch.manual_seed(0)
    model = instantiate(cfg.teacher)
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # statistics that change the outputs
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    expected = copy.deepcopy(model).eval()(data.sample_inputs(16))
    teacher = teacher_checks.freeze_teacher(model, data)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())
    convolutions = [m.weight for m in teacher.modules() if isinstance(m, nn.Conv2d)]
    assert convolutions and all(w.is_contiguous(memory_format=torch.channels_last) for w in convolutions)
    with torch.inference_mode():
        torch.testing.assert_close(teacher(data.sample_inputs(16)), expected, rtol=1e-4, atol=1e-4)
