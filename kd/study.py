"""The Optuna study of a search sweep (sweep=optuna_kd) lives in its sweep folder (`storage:
sqlite:///<sweep dir>/optuna.db`), so relaunching the same command continues it.

Left to itself, Hydra's Optuna sweeper (1.3) runs n_trials more trials at every launch, and its seeded sampler
draws the first launch's random trials again: a relaunch would re-run them (their finished folders answer at once)
and the study would hold each one twice. Before the sweeper starts, `continue_study` sets n_trials to the trials the
study still lacks (a finished search runs nothing; hydra.sweeper.n_trials=30 takes a search of 20 to 30) and offsets
the sampler's seed by the number of trials the study holds, so that its draws are new ones. A trial killed mid-run
stays RUNNING in the study and is not resumed: the search draws another in its place; its folder stays unfinished.
"""
import logging

from omegaconf import DictConfig, read_write

log = logging.getLogger(__name__)

OPTUNA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"


def continue_study(config: DictConfig) -> None:
    """Set hydra.sweeper.n_trials (and the sampler's seed) of an Optuna sweep whose storage holds its study."""
    sweeper = config.hydra.sweeper
    if sweeper.get("_target_") != OPTUNA_SWEEPER or not sweeper.get("storage") or not sweeper.get("study_name"):
        return  # a grid sweep, or a study kept nowhere (storage null) or under a new random name each launch
    states = trial_states(sweeper.storage, sweeper.study_name)
    if not states:
        return
    complete, running = states.count("COMPLETE"), states.count("RUNNING")
    wanted, seed = sweeper.n_trials, sweeper.sampler.get("seed")
    with read_write(sweeper):
        sweeper.n_trials = max(wanted - complete, 0)
        if seed is not None:
            sweeper.sampler.seed = seed + len(states)
    interrupted = f" ({running} interrupted, not resumed)" if running else ""
    plan = f"running {sweeper.n_trials} more" if sweeper.n_trials else "nothing to run (a larger n_trials runs more)"
    log.info("continuing study %s in %s: %d trials complete%s, hydra.sweeper.n_trials=%d: %s", sweeper.study_name,
             sweeper.storage, complete, interrupted, wanted, plan)


def trial_states(storage: str, study_name: str) -> list[str]:
    """The state of each trial of the stored study (COMPLETE, RUNNING, FAIL, ...); empty when there is none yet."""
    import optuna  # only for Optuna sweeps: its import takes a second

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # no study of that name yet: the first launch
        return []
    return [trial.state.name for trial in study.get_trials(deepcopy=False)]
