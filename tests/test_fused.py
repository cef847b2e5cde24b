"""Fused sweeps (kd.fused, hydra/launcher=fused): each member of a fused group trains as its lone run would, within
a stated float tolerance at fp32 (grouped convolutions and vmap sum in another order) and to the last bit at fp64,
through either way of stacking them (GroupedStudents, StackedStudents); its records have the lone
run's form; a finished member is not retrained, a killed group resumes to the same bits, a diverging member stops
alone, a refused member leaves its folder as it was.

In-process (tiny simple_cnn pair on digits, 16 px, a few steps or 2 epochs); the launcher itself is tested once
through a real multirun, the only place Hydra hands it a sweep.
"""
import copy
import itertools
import json
import logging
import re
import shlex
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize

import kd.config  # noqa: F401  (registers the schema)
from kd import engine, fused, loop
from support import tree_state, wandb_history, wandb_records, wandb_segments
from support.runs import LABELS_ONLY, REPO, TINY, compose_cfg, launch, report_text, train_in_process

# fp32: after the first step each parameter is within FP32_PARAMS of the lone run's (relative to the tensor's largest
# value), and the loss of each of the first 3 steps within FP32_LOSS (relative). fp64: within FP64 after 5 steps.
# A lone CPU run is channels-last (oneDNN's NHWC kernels) while vmap's batched convolutions sum in another order:
# by the third step DIST's Pearson terms have grown that difference to 3e-4 of the loss.
FP64 = 1e-12
FP32_PARAMS, FP32_LOSS = 1e-4, 1e-3
# Three members: two share seed 0 (one batch, one teacher pass), one has seed 1 (its own batches).
MEMBERS = {
    "kd": [["loss.alpha=0.5", "loss.temperature=2"], ["optimizer.lr=0.1"], ["seed=1", "optimizer.weight_decay=0"]],
    "dkd": [["loss.beta=2"], ["optimizer.lr=0.1", "loss.temperature=2"], ["seed=1"]],
    "dist": [["loss.beta=1"], ["optimizer.momentum=0"], ["seed=1", "loss.temperature=2"]],
    "kd_ls": [["loss.kd.weight=3"], ["optimizer.lr=0.1"], ["seed=1", "loss.kd.temperature=4"]],
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fused_teacher")
    return Path(engine.run(compose_cfg(tmp, "phase=teacher", "epochs=1"), tmp / "teacher")["teacher_checkpoint"])


def student(tmp: Path, teacher: Path, *overrides: str):
    return compose_cfg(tmp, "phase=student", "epochs=2", f"teacher_checkpoint={teacher}", *overrides)


def members(tmp: Path, teacher: Path, jobs: list[list[str]], *common: str) -> list[fused.Member]:
    return [fused.Member(student(tmp, teacher, *common, *job), tmp / f"job{i}") for i, job in enumerate(jobs)]


def first_steps(group: list[fused.Member], steps: int, stack=fused.stack_students) -> tuple[list, list]:
    """(lone, fused): per member, its losses over the first `steps` steps and its parameters after them, the
    members stacked by `stack`."""
    fused.set_up_members(group)
    data = group[0].job.data
    epoch = data.epoch
    data.epoch = lambda seed, n, batch_size: itertools.islice(epoch(seed, n, batch_size), steps)
    losses = {id(m.job.criterion): [] for m in group}
    for m in group:
        m.job.criterion.register_forward_hook(lambda mod, _, out: losses[id(mod)].append(sum(out.values()).item()))
    lone = []
    for m in group:
        job = copy.copy(m.job)
        job.model = job.forward = copy.deepcopy(m.job.model)
        job.optimizer = torch.optim.SGD(job.model.parameters(), **m.job.optimizer.defaults)
        loop.train_one_epoch(job, 1)
        lone.append((losses[id(m.job.criterion)][:], job.model.state_dict()))
    jobs = [m.job for m in group]
    students = stack(jobs)
    if stack is fused.stack_students:  # simple_cnn groups; 3 members at 16 px are one chunk
        assert [type(chunk) for chunk in students.stacks] == [fused.GroupedStudents]
    fused.fused_steps(jobs, students, 1, [loop.EpochSums(data.device) for _ in jobs])
    students.write_back(jobs)
    together = [(losses[id(m.job.criterion)][steps:], m.job.model.state_dict()) for m in group]
    return lone, together


def largest_difference(a: dict, b: dict) -> float:
    return max(((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp(min=1e-12)).item()
               for k in a)


@pytest.mark.parametrize("loss", sorted(MEMBERS))
def test_each_logit_method_fused_equals_its_lone_runs_first_steps_at_fp32(loss, teacher, tmp_path):
    lone, together = first_steps(members(tmp_path, teacher, MEMBERS[loss], f"loss={loss}"), 1)
    for (lone_losses, lone_params), (fused_losses, fused_params) in zip(lone, together):
        assert fused_losses == pytest.approx(lone_losses, rel=FP32_LOSS)
        assert largest_difference(lone_params, fused_params) < FP32_PARAMS
    lone, together = first_steps(members(tmp_path, teacher, MEMBERS[loss], f"loss={loss}"), 3)
    for (lone_losses, _), (fused_losses, _) in zip(lone, together):
        assert fused_losses == pytest.approx(lone_losses, rel=FP32_LOSS)


@pytest.mark.parametrize("stack", [fused.GroupedStudents, fused.StackedStudents,
                                   lambda jobs: fused.stack_students(jobs, fused.Plan(2, True))],
                         ids=["grouped", "vmap", "chunks"])
def test_members_of_different_seeds_equal_their_lone_runs_at_fp64(stack, teacher, tmp_path):
    """At fp64 five steps agree to 1e-12 (a last bit at most), so the fp32 differences above are the order of
    the stacked model's sums, not another computation."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        lone, together = first_steps(members(tmp_path, teacher, MEMBERS["kd"]), 5, stack)
    finally:
        torch.set_default_dtype(default)
    assert next(iter(together[0][1].values())).dtype == torch.float64
    for (lone_losses, lone_params), (fused_losses, fused_params) in zip(lone, together):
        assert fused_losses == pytest.approx(lone_losses, rel=FP64)
        assert largest_difference(lone_params, fused_params) < FP64


class ShuffledCNN(torch.nn.Module):
    """simple_cnn with its channels reversed after the first stage: right alone, wrong on grouped channels."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model.block3(self.model.block2(self.model.block1(x).flip(1)))
        return self.model.fc(torch.flatten(self.model.avgpool(x), 1))


def test_a_model_that_mixes_channels_is_stacked_through_vmap(teacher, tmp_path, caplog):
    group = members(tmp_path, teacher, MEMBERS["kd"])
    fused.set_up_members(group)
    jobs = [m.job for m in group]
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # as a bf16 run leaves them
    before = [copy.deepcopy(job.model.state_dict()) for job in jobs]
    try:  # the check turns them off while it runs, then back on
        assert fused.plan(jobs) == fused.Plan(fused.chunk_size(jobs[0]), True)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    # its train-mode forwards put every BatchNorm statistic back
    assert all(same_bits(b, job.model.state_dict()) for b, job in zip(before, jobs))
    for job in jobs:
        job.model = ShuffledCNN(job.model)
    fused.say_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="kd.fused"):
        how = fused.plan(jobs)
    assert not how.grouped
    assert [type(chunk) for chunk in fused.stack_students(jobs, how).stacks] == [fused.StackedStudents]
    assert "runs through vmap: the grouped model's logits differ" in caplog.text
    assert "member 0's depend on other members" in caplog.text


def test_a_model_with_a_layer_that_has_no_grouped_counterpart_is_stacked_through_vmap(teacher, tmp_path, caplog):
    group = members(tmp_path, teacher, MEMBERS["kd"])
    fused.set_up_members(group)
    jobs = [m.job for m in group]
    for job in jobs:
        job.model.block2[1] = torch.nn.GroupNorm(2, job.model.block2[1].num_features)
    fused.say_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="kd.fused"):
        assert not fused.plan(jobs).grouped
    assert "runs through vmap: block2.1 (GroupNorm) has no grouped counterpart" in caplog.text


def without_times(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if not k.startswith("time/")} for line in lines]


def weights(run: Path, name: str = "last.pt") -> dict:
    return torch.load(run / name, weights_only=False)["model"]


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Killed(BaseException):
    """Stands in for SIGKILL (an exception no handler of the group catches) right after an epoch's last.pt."""


@pytest.fixture(scope="module")
def fused_sweep(teacher, tmp_path_factory) -> Path:
    """A fused group of three KD members trained for 2 epochs."""
    tmp = tmp_path_factory.mktemp("fused_sweep")
    outcomes = fused.run_group(members(tmp, teacher, MEMBERS["kd"]))
    assert all(isinstance(outcome, dict) for outcome in outcomes), outcomes
    return tmp


def test_records_have_the_lone_runs_form_and_a_rerun_gives_the_same_bits(fused_sweep, teacher, tmp_path):
    """... and the teacher cache entry a lone run wrote serves the member of its seed in a fused group (the others
    run their teacher live), with the same bits."""
    lone = tmp_path / "lone"
    engine.run(student(tmp_path, teacher, *MEMBERS["kd"][2]), lone)  # its cache: tmp_path / "teacher_cache"
    run = fused_sweep / "job2"
    assert listing(run) == listing(lone)
    for name in ("result.json", "run_info.json", "run.json"):
        ours, theirs = (json.loads((r / name).read_text()).keys() for r in (run, lone))
        assert ours == theirs, name
    for name in ("last.pt", "best.pt"):
        ours, theirs = (torch.load(r / name, weights_only=False) for r in (run, lone))
        assert ours.keys() == theirs.keys()
        assert ours["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]
        assert ours["optimizer"]["state"].keys() == theirs["optimizer"]["state"].keys()
    assert [line.keys() for line in without_times(run)] == [line.keys() for line in without_times(lone)]
    assert "fused: trained in one process with the 2 other jobs" in (run / "train.log").read_text()
    again = tmp_path / "again"
    fused.run_group(members(again, teacher, MEMBERS["kd"], f"teacher_cache_dir={tmp_path / 'teacher_cache'}"))
    cache = [(info["teacher_cache/hits"], info["teacher_cache/misses"])
             for info in (json.loads((again / f"job{i}" / "run_info.json").read_text()) for i in range(3))]
    assert cache == [(0, 2), (0, 2), (2, 0)]  # seed 0's two members share one live pass; seed 1 reads lone's entry
    for i in range(3):
        assert same_bits(weights(fused_sweep / f"job{i}"), weights(again / f"job{i}"))
        assert without_times(fused_sweep / f"job{i}") == without_times(again / f"job{i}")


def test_a_killed_group_resumes_to_the_same_bits_and_finished_members_are_not_retrained(
    fused_sweep, teacher, tmp_path, monkeypatch
):
    save = engine.save_checkpoints

    def save_then_die(job, cfg, out_dir, metrics, best, teacher_facts):
        save(job, cfg, out_dir, metrics, best, teacher_facts)
        if out_dir.name == "job2" and metrics["epoch"] == 1:  # every member's epoch-1 last.pt has landed
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(engine, "save_checkpoints", save_then_die)
        with pytest.raises(Killed):
            fused.run_group(members(tmp_path, teacher, MEMBERS["kd"]))
    assert all(torch.load(tmp_path / f"job{i}/last.pt", weights_only=False)["epoch"] == 1 for i in range(3))
    assert not any((tmp_path / f"job{i}/result.json").exists() for i in range(3))
    fused.run_group(members(tmp_path, teacher, MEMBERS["kd"]))
    for i in range(3):
        assert same_bits(weights(fused_sweep / f"job{i}"), weights(tmp_path / f"job{i}"))
        assert without_times(fused_sweep / f"job{i}") == without_times(tmp_path / f"job{i}")
    finished = {i: state(tmp_path / f"job{i}") for i in range(3)}
    group = members(tmp_path, teacher, [*MEMBERS["kd"], ["seed=2"]])
    outcomes = fused.run_group(group)
    assert all(isinstance(outcome, dict) for outcome in outcomes)
    assert {i: state(tmp_path / f"job{i}") for i in range(3)} == finished  # returned, not trained again
    assert "fused: trained in one process with the 0 other jobs" in (tmp_path / "job3/train.log").read_text()


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def state(folder: Path) -> dict[str, str]:
    return {k: v for k, v in tree_state(folder).items() if Path(k).name != ".lock"}


def test_each_member_logs_its_epochs_to_its_own_wandb_run_as_a_lone_run_does(teacher, tmp_path):
    group = members(tmp_path, teacher, MEMBERS["kd"][:2], "logger.mode=offline")
    assert all(isinstance(outcome, dict) for outcome in fused.run_group(group))
    for member in group:
        [segment] = wandb_segments(member.out_dir)
        records = wandb_records(segment)
        history = [{k: v for k, v in row.items() if not k.startswith("_")} for row in wandb_history(segment)]
        assert history == [json.loads(line) for line in (member.out_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r.exit.exit_code for r in records if r.HasField("exit")] == [0]
        run_id = json.loads((member.out_dir / "run.json").read_text())["wandb_id"]
        assert [r.run.run_id for r in records if r.HasField("run")] == [run_id]


def test_a_diverging_member_stops_as_alone_and_its_group_goes_on(teacher, tmp_path):
    jobs = [[], ["optimizer.lr=1e30"], ["seed=1"]]
    with pytest.raises(FloatingPointError) as alone:
        engine.run(student(tmp_path, teacher, *jobs[1]), tmp_path / "alone")
    outcomes = fused.run_group(members(tmp_path, teacher, jobs))
    assert isinstance(outcomes[1], FloatingPointError) and str(outcomes[1]) == str(alone.value)
    assert "non-finite training loss at epoch 1" in str(outcomes[1])
    assert listing(tmp_path / "job1") == listing(tmp_path / "alone")  # no result.json, no last.pt: as alone
    assert str(alone.value) in (tmp_path / "job1/train.log").read_text()
    for i in (0, 2):
        assert outcomes[i]["epochs"] == 2 and (tmp_path / f"job{i}/result.json").is_file()


def test_a_refused_member_leaves_its_folder_as_it_was_and_the_others_train(teacher, tmp_path):
    engine.run(student(tmp_path, teacher, "loss.alpha=0.5"), tmp_path / "job0")  # another config's finished run
    before = state(tmp_path / "job0")
    outcomes = fused.run_group(members(tmp_path, teacher, [["loss.alpha=0.7"], ["seed=1"]]))
    assert isinstance(outcomes[0], ValueError)
    assert "run.json was written by another config (recorded -> now: loss.alpha: 0.5 -> 0.7)" in str(outcomes[0])
    assert state(tmp_path / "job0") == before
    assert outcomes[1]["epochs"] == 2


def test_grouping_keys_and_reasons(teacher, tmp_path):
    """TINY trains the teacher with the student's recipe (teacher_recipe=student), which names the store's teacher:
    with a recipe of its own, the student's learning rate no longer changes which teacher a job reads."""
    own = "teacher_recipe=quickstart"
    key = fused.group_key(student(tmp_path, teacher, own))
    fusable = (["seed=3"], ["optimizer.lr=0.2", "optimizer.weight_decay=0"], ["loss.alpha=0.5", "loss.temperature=2"])
    for same in fusable:
        assert fused.group_key(student(tmp_path, teacher, own, *same)) == key, same
    for other in (["epochs=3"], ["loss.alpha=0"], ["loss=dkd"], ["student.width=0.5"], ["batch_size=32"]):
        assert fused.group_key(student(tmp_path, teacher, own, *other)) != key, other
    recipe_shared = fused.group_key(student(tmp_path, teacher))
    assert fused.group_key(student(tmp_path, teacher, "optimizer.lr=0.2")) != recipe_shared
    assert fused.unfusable_reason(student(tmp_path, teacher)) is None
    assert "CRDLoss" in fused.unfusable_reason(student(tmp_path, teacher, "loss=crd"))
    assert "phase=teacher" in fused.unfusable_reason(compose_cfg(tmp_path, "phase=teacher"))
    assert "AdamW" in fused.unfusable_reason(student(tmp_path, teacher, "optimizer=adamw"))


def test_memory_cap_splits_a_group_by_the_estimate(teacher, tmp_path):
    group = members(tmp_path, teacher, [[], ["seed=1"], ["seed=2"]])
    fused.set_up_members(group[:1])
    job = group[0].job
    estimate = fused.member_bytes(job)
    assert estimate > 5 * sum(p.numel() * 4 for p in job.model.parameters())
    assert fused.group_size(job, None) >= 3
    assert fused.group_size(job, 2.5 * estimate / 1e9) == 2
    assert fused.group_size(job, 1e-12) == 1


@pytest.mark.slow
def test_the_fused_launcher_runs_a_sweep_that_kd_report_reads_as_a_lone_sweep(teacher, tmp_path):
    """A real multirun (only Hydra hands a launcher its jobs): its jobs train as one group, the sweep callback sums
    the sweep up once they have, and kd.report reads their records as those of separate runs."""
    sweep = tmp_path / "sweep"
    proc = launch(sweep, "hydra/launcher=fused", "phase=student", "epochs=1", f"teacher_checkpoint={teacher}",
                  "loss.alpha=0.5,0.9", "seed=0,1", multirun=True)
    assert proc.returncode == 0, proc.stdout
    assert "fused group of 4: #0, #1, #2, #3" in proc.stdout
    assert "fused group of 4: grouped convolutions, in stacks of 4" in proc.stdout
    assert "sweep " + str(sweep) + ": 4 finished" in proc.stdout
    for run in sweep.iterdir():
        if run.is_dir():
            assert (run / "result.json").is_file() and "fused: trained" in (run / "train.log").read_text()
    text = report_text(sweep, tmp_path / "report")
    assert re.search(r"\| KD +\| 0\.5 +\| [^|]+\| [^|]+\| 2 ", text) and re.search(r"\| KD +\| 0\.9 +\|", text), text


def test_the_launcher_groups_fusable_jobs_and_says_why_a_job_runs_alone(teacher, tmp_path, caplog):
    from hydra_plugins.kd_fused_launcher import FusedLauncher, Prepared

    jobs = [["loss.alpha=0.5"], ["seed=1"], ["loss=crd"], ["epochs=3"]]
    with initialize(version_base="1.3", config_path="../conf"):
        configs = [compose("config", return_hydra_config=True, overrides=[
            *TINY, f"teacher_store={tmp_path / 'teachers'}", "phase=student", "epochs=2",
            f"teacher_checkpoint={teacher}", *job]) for job in jobs]
    with caplog.at_level(logging.INFO):
        groups = FusedLauncher().groups([Prepared(i, c) for i, c in enumerate(configs)], fused)
    assert [[job.index for job in group] for group in groups] == [[0, 1], [2], [3]]
    assert "#2 runs alone: loss kd.methods.crd.CRDLoss reads features or keeps state (logit losses fuse)" in caplog.text


def test_ctrl_c_in_a_fused_group_prints_each_jobs_line_and_the_relaunch_resumes_them(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["-m", "hydra/launcher=fused", *LABELS_ONLY, "teacher_store=teachers", "epochs=2", "seed=0,1"]
    real_epoch = fused.fused_epoch

    def epoch(members, number, how):
        if number == 2:
            raise KeyboardInterrupt
        real_epoch(members, number, how)

    with monkeypatch.context() as patch:
        patch.setattr(fused, "fused_epoch", epoch)
        assert train_in_process(argv) == 130
    [sweep] = (tmp_path / "outputs" / "multirun").glob("*/*")
    command = shlex.join(["python", str(REPO / "train.py"), *argv, f"hydra.sweep.dir={sweep.relative_to(tmp_path)}"])
    relaunch = f"the sweep stopped; relaunch it with: {command}"
    assert capsys.readouterr().err == "".join(f"interrupted job seed={seed} after epoch 1 of 2: {relaunch}\n"
                                              for seed in (0, 1))
    assert train_in_process(shlex.split(command)[2:]) == 0
    for seed in (0, 1):
        info = json.loads((sweep / f"seed={seed}" / "run_info.json").read_text())
        assert info["resumed_from_epoch"] == 1
