"""Multiruns of train.py -m, each in a process of its own (support.forked): the teacher preflight, and the joblib,
submitit_local and optuna plugins, whose workers are processes of their own as on a real machine."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize
from omegaconf import OmegaConf

import kd.config  # noqa: F401  (registers the schema)
from support import forked
from support.runs import TINY
from train import threads_per_job

REPO = Path(__file__).resolve().parents[1]
# TINY's runs without threads=1: train.py shares the cores out between a launcher's parallel jobs.
SWEEP = [o for o in TINY if o != "threads=1"] + ["epochs=1"]

pytestmark = pytest.mark.slow


def multirun(tmp: Path, *overrides: str, store: Path | None = None, fresh: bool = False) -> subprocess.CompletedProcess:
    """train.py -m of SWEEP's runs, forked (support.forked) or by a fresh interpreter; stdout and stderr together."""
    args = ["train.py", "-m", *SWEEP, f"teacher_store={store or tmp / 'teachers'}", f"hydra.sweep.dir={tmp / 'sweep'}",
            *overrides]
    if not fresh:
        return forked.run(args, REPO)
    return subprocess.run([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)


def results(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("*/result.json"))]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One teacher for the sweeps below, trained through a student sweep that asks for it."""
    tmp = tmp_path_factory.mktemp("store")
    proc = multirun(tmp, "phase=student", "loss.alpha=0.9", "train_missing_teacher=true")
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.count("training the missing teacher") == 1
    return tmp / "teachers"


def test_sweep_without_its_teacher_stops_once_before_any_job(tmp_path):
    proc = multirun(tmp_path, "phase=student", "loss.alpha=0.5,0.9", "seed=0,1")
    assert proc.returncode != 0
    assert proc.stdout.count("no trained teacher for this config") == 1
    assert "python train.py phase=teacher seed=0 experiment=quickstart" in proc.stdout
    assert not (tmp_path / "sweep").exists()  # no job started


def test_sweep_that_would_train_its_teacher_on_unreadable_data_stops_once_before_any_job(tmp_path):
    proc = multirun(tmp_path, "phase=student", "loss.alpha=0.5,0.9", "train_missing_teacher=true",
                    "dataset=imagefolder", f"dataset.source.root={tmp_path / 'nowhere'}")
    assert proc.returncode != 0
    assert proc.stdout.count(f"{tmp_path / 'nowhere' / 'train'} does not exist") == 1
    assert not (tmp_path / "sweep").exists()  # no job started


def test_joblib_runs_jobs_in_parallel_with_the_cores_split(tmp_path, store):
    """Three fresh interpreters (train.py -m and joblib's two loky workers): about 20 CPU s of imports on 2 cores.
    Its train.py is not forked: loky's results never reach a parent forked from support.forked's server (its
    workers finish their jobs, and the launcher waits for ever)."""
    proc = multirun(tmp_path, "phase=student", "loss.alpha=0,0.9", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                    store=store, fresh=True)
    assert proc.returncode == 0, proc.stdout
    runs = results(tmp_path / "sweep")
    assert sorted(r["config"]["loss"]["alpha"] for r in runs) == [0.0, 0.9]
    expected_threads = threads_per_job(OmegaConf.create({"n_jobs": 2}))
    infos = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/run_info.json"))]
    assert all(r["config"]["threads"] == expected_threads for r in runs)
    assert len(infos) == 2 and all(info["env"]["cpu_threads"] == expected_threads for info in infos)
    # One W&B group for the sweep, tags naming dataset, pair and loss.
    assert len({r["config"]["logger"]["group"] for r in runs}) == 1
    folders = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert folders == ["loss.alpha=0", "loss.alpha=0.9"]  # named by the swept key alone, also in joblib's workers


def test_submitit_local_launcher(tmp_path, store):
    overrides = ["hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10"]
    proc = multirun(tmp_path, "phase=student", "seed=0,1", *overrides, store=store)
    assert proc.returncode == 0, proc.stdout
    runs = results(tmp_path / "sweep")
    assert sorted(r["config"]["seed"] for r in runs) == [0, 1] and all(r["config"]["threads"] == 1 for r in runs)
    assert all("teacher/acc1" in r for r in runs)


def test_optuna_search_maximises_validation_accuracy(tmp_path, store):
    # The teacher of a search is trained with the same held-out validation split, so train it on demand.
    proc = multirun(tmp_path, "sweep=optuna_kd", "hydra.sweeper.n_trials=3", "train_missing_teacher=true", store=store)
    assert proc.returncode == 0, proc.stdout
    runs = results(tmp_path / "sweep")
    assert len(runs) == 3 and all(r["best_selected_by"] == "val/acc1" for r in runs)
    assert len({(r["config"]["loss"]["alpha"], r["config"]["loss"]["temperature"]) for r in runs}) == 3
    best = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")
    assert best.best_value == pytest.approx(max(r["val/acc1"] for r in runs))


def test_the_grid_sweeper_runs_the_grid_less_its_excluded_jobs_and_logs_the_cost_first(tmp_path, store):
    """hydra/sweeper=grid in a real multirun (Hydra finds and instantiates the sweeper plugin only there): the
    excluded job never starts, sweep.json's grid leaves it out, and the cost line comes before the first job."""
    exclude = "hydra.sweeper.exclude=[{loss.alpha:0.9,seed:1}]"
    proc = multirun(tmp_path, "phase=student", "hydra/sweeper=grid", "loss.alpha=0,0.9", "seed=0,1", exclude,
                    store=store)
    assert proc.returncode == 0, proc.stdout
    runs = results(tmp_path / "sweep")
    assert sorted((r["config"]["loss"]["alpha"], r["config"]["seed"]) for r in runs) == [(0, 0), (0, 1), (0.9, 0)]
    grid = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["grid"]
    assert len(grid) == 3 and not any({"loss.alpha=0.9", "seed=1"} <= set(job) for job in grid)
    cost = proc.stdout.index("3 runs (1 excluded by hydra.sweeper.exclude), 0 teachers to train first: about ")
    assert cost < proc.stdout.index("Launching 3 jobs locally")


def test_threads_per_job():
    assert threads_per_job(OmegaConf.create({"n_jobs": 1})) is None
    assert threads_per_job(OmegaConf.create({"cpus_per_task": 3, "n_jobs": 8})) == 3
    assert threads_per_job(OmegaConf.create({"n_jobs": -1})) == 1  # one thread for each of all the cores
    assert threads_per_job(OmegaConf.create({"n_jobs": 10_000})) == 1


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "conf" / "sweep").glob("*.yaml")))
def test_sweep_presets_compose(name):
    with initialize(version_base="1.3", config_path="../conf"):
        cfg = compose("config", overrides=[f"sweep={name}"], return_hydra_config=True)
    assert cfg.phase.value == "student" and cfg.hydra.sweeper.params
    if name.startswith("crd_table"):  # one table, one folder, every row as a loss (tests/test_tables.py)
        assert cfg.train_missing_teacher and set(cfg.hydra.sweeper.params) == {"experiment", "loss", "seed"}
        assert cfg.hydra.sweep.dir == f"outputs/tables/{name}"


def test_slurm_launcher_config(monkeypatch):
    monkeypatch.setenv("SLURM_PARTITION", "gpu")
    monkeypatch.delenv("SLURM_ACCOUNT", raising=False)
    with initialize(version_base="1.3", config_path="../conf"):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu" and launcher.account is None
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.cpus_per_task) == (1, 1, 8)
    assert threads_per_job(launcher) == 8
