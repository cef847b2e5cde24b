"""Optuna searches (sweep=optuna_kd) get the checks of a grid sweep: the missing-teacher preflight, sweep.json, job
folders named by the swept keys; their study lives in the sweep folder and a relaunch continues it; the preset
without -m is refused. The multiruns go through processes of their own (only Hydra's own multirun runs its sweeper and
callbacks); the study's continuation and the single-run refusal are checked in-process."""
import json
import subprocess
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize

import kd.config  # noqa: F401  (registers the schema)
from kd import study
from kd.sweep import SweepChecks
from support import forked
from support.runs import TINY

REPO = Path(__file__).resolve().parents[1]
STUDY = "kd_alpha_temperature"


def search(tmp: Path, *overrides: str) -> subprocess.CompletedProcess:
    """train.py -m of the preset in a process of its own (support.forked); stdout and stderr together."""
    args = ["train.py", "-m", "sweep=optuna_kd", *TINY, "epochs=1", f"teacher_store={tmp / 'teachers'}",
            f"hydra.sweep.dir={tmp / 'sweep'}", *overrides]
    return forked.run(args, REPO)


def stored_trials(sweep: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{sweep / 'optuna.db'}").trials


@pytest.mark.slow
def test_a_search_without_its_teacher_stops_once_before_any_trial(tmp_path):
    proc = search(tmp_path, "hydra.sweeper.n_trials=2")
    assert proc.returncode != 0
    assert proc.stdout.count("no trained teacher for this config") == 1, proc.stdout
    assert "python train.py phase=teacher seed=0 sweep=optuna_kd experiment=quickstart" in proc.stdout
    assert "Traceback" not in proc.stdout and "Launching" not in proc.stdout  # no trial started
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_a_relaunched_search_continues_its_study(tmp_path):
    first = search(tmp_path, "hydra.sweeper.n_trials=2", "train_missing_teacher=true")
    assert first.returncode == 0, first.stdout
    sweep = tmp_path / "sweep"
    record = json.loads((sweep / "sweep.json").read_text())
    assert record["swept"] == {"loss.alpha": ["interval(0.0, 1.0)"], "loss.temperature": ["interval(1.0, 10.0)"]}
    assert record["fixed"]["sweep"] == "optuna_kd" and record["grid"] is None
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2 and all(name.startswith("loss.alpha=") and ",loss.temperature=" in name for name in jobs)
    assert all(name.count("=") == 2 for name in jobs)  # named by the swept keys only
    # The same command with a larger n_trials: the folder's checks pass and the study gets the one trial it lacks.
    again = search(tmp_path, "hydra.sweeper.n_trials=3", "train_missing_teacher=true")
    assert again.returncode == 0, again.stdout
    assert "continuing study kd_alpha_temperature" in again.stdout and "2 trials complete" in again.stdout
    trials = stored_trials(sweep)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 3  # no trial of the first launch drawn again
    assert len([p for p in sweep.iterdir() if p.is_dir()]) == 3


def searched(tmp: Path, *overrides: str):
    with initialize(version_base="1.3", config_path="../conf"):
        return compose("config", overrides=["sweep=optuna_kd", f"hydra.sweep.dir={tmp}", *overrides],
                       return_hydra_config=True)


def test_continuing_a_study_runs_only_the_trials_it_lacks_with_new_draws(tmp_path):
    first = searched(tmp_path)
    study.continue_study(first)  # the first launch: no study yet, nothing changes
    assert first.hydra.sweeper.n_trials == 20 and first.hydra.sweeper.sampler.seed == 0
    stored = optuna.create_study(study_name=STUDY, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    for _ in range(2):
        trial = stored.ask()
        stored.tell(trial, trial.suggest_float("loss.alpha", 0.0, 1.0))
    stored.ask()  # a trial killed mid-run: RUNNING for ever
    relaunch = searched(tmp_path)
    study.continue_study(relaunch)
    assert relaunch.hydra.sweeper.n_trials == 18 and relaunch.hydra.sweeper.sampler.seed == 3
    finished = searched(tmp_path, "hydra.sweeper.n_trials=2")
    study.continue_study(finished)
    assert finished.hydra.sweeper.n_trials == 0
    kept_nowhere = searched(tmp_path, "hydra.sweeper.storage=null")
    study.continue_study(kept_nowhere)
    assert kept_nowhere.hydra.sweeper.n_trials == 20


@pytest.mark.parametrize("phase, refused", [("student", True), ("teacher", False)])
def test_a_student_run_of_a_sweep_preset_needs_m(phase, refused, tmp_path, capsys):
    with initialize(version_base="1.3", config_path="../conf"):
        config = compose("config", overrides=["sweep=optuna_kd", f"phase={phase}", f"hydra.run.dir={tmp_path / 'run'}"],
                         return_hydra_config=True)
    if not refused:  # the teacher its missing-teacher message asks for: a teacher run with the preset's data settings
        SweepChecks().on_run_start(config=config)
        assert (tmp_path / "run").is_dir()
        return
    with pytest.raises(SystemExit):
        SweepChecks().on_run_start(config=config)
    assert capsys.readouterr().err == (
        "Error: sweep=optuna_kd is a sweep preset: its hydra.sweeper.params (loss.alpha, loss.temperature) vary only "
        "in a multirun, and without -m this would train one student with none of them varied. Add -m to the same "
        "command (python train.py -m ...).\n")
    assert not (tmp_path / "run").exists()
