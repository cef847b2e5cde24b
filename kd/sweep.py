"""Hydra multirun hook: before any job starts, check the sweep's teacher once (or train it once)."""
import logging
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from kd import engine, teachers
from kd.config import Phase

log = logging.getLogger(__name__)

# Config heads that can change which teacher a student job needs.
TEACHER_HEADS = set(teachers.IDENTITY_KEYS) | {"teacher_seed", "teacher_store", "experiment", "sweep"}


class TeacherPreflight(Callback):
    """A student sweep whose jobs share one teacher finds it here, or fails here once with the command
    that trains it (or, with train_missing_teacher=true, trains it here once, before the jobs)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if Phase(config.phase) is not Phase.student or config.teacher_checkpoint != "auto":
            return
        swept, fixed = split_overrides(config)
        heads = TEACHER_HEADS | ({"seed"} if OmegaConf.is_interpolation(config, "teacher_seed") else set())
        if any(_head(key) in heads for key in swept):
            return  # several teachers: each job finds (or trains, under a lock) its own
        cfg = config.copy()
        with open_dict(cfg):
            cfg.pop("hydra")
        needs_teacher = instantiate(cfg.loss).needs_teacher or any(_head(k) == "loss" for k in swept)
        try:
            engine.find_or_train_teacher(cfg, needs_teacher, fixed)
        except teachers.MissingTeacher as missing:
            # Hydra turns a callback's exceptions into warnings; SystemExit stops the sweep before its jobs.
            log.error("%s", missing)
            raise SystemExit(1) from None


def split_overrides(config: DictConfig) -> tuple[set[str], list[str]]:
    """The keys the sweep varies (command line and hydra.sweeper.params) and the fixed overrides."""
    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    swept |= set((config.hydra.sweeper.get("params") or {}).keys())
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    return swept, fixed


def _head(key: str) -> str:
    """`loss.alpha` -> loss, `model@student` -> student, `+model@teacher=x` -> teacher."""
    key = key.lstrip("+~")
    return (key.split("@", 1)[1] if "@" in key else key).split(".", 1)[0]
