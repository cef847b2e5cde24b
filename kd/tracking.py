"""Weights & Biases: one run per job, offline by default so no account or network is needed."""
import logging
import secrets
import string
from pathlib import Path
from typing import Any, Optional

import wandb
from omegaconf import DictConfig

from kd import distributed
from kd.config import Phase
from kd.records import model_name, plain_config

log = logging.getLogger(__name__)


def run_tags(cfg: DictConfig) -> list[str]:
    """Tags that let a sweep's runs be filtered by dataset, pair and loss."""
    loss = cfg.loss._target_.rsplit(".", 1)[-1]
    auto = [f"dataset:{cfg.dataset.name}", f"teacher:{model_name(cfg.teacher)}", f"loss:{loss}"]
    auto.append(f"student:{model_name(cfg.student)}")
    return auto + list(cfg.logger.tags)


def new_run_id() -> str:
    """A W&B run id, chosen when a run folder is first used and kept in its run.json: every process that works in
    the folder (a resume, a rerun after a kill) logs into this one W&B run."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's own form


def start(cfg: DictConfig, out_dir: Path, run_id: str, extra: Optional[dict[str, Any]] = None):
    """Start (or continue) the folder's W&B run `run_id`; mode from logger.mode, which defaults to $WANDB_MODE, then
    offline. `extra` joins the config (the teacher's sha256 and source).

    An online start that fails (no credentials, no network: bounded by logger.init_timeout_s) warns once and
    logs offline instead, so a W&B outage never costs a training run.
    """
    if not distributed.is_main():  # under torchrun, rank 0 alone logs
        return _init(cfg, out_dir, "disabled", run_id, extra)
    try:
        return _init(cfg, out_dir, cfg.logger.mode, run_id, extra)
    except Exception as error:  # wandb raises UsageError, CommError, or its own timeouts
        if cfg.logger.mode != "online":
            raise
        reason = (str(error).strip().splitlines() or [""])[0]
        log.warning(
            "W&B online start failed (%s: %s); logging offline instead (raise logger.init_timeout_s=%g if the network "
            "is just slow). Upload later with `wandb sync %s/wandb/offline-run-*`.",
            type(error).__name__, reason, cfg.logger.init_timeout_s, out_dir,
        )
        wandb.teardown()  # the failed start keeps the run id registered in W&B's service process: end it first
        return _init(cfg, out_dir, "offline", run_id, extra)


def _init(cfg: DictConfig, out_dir: Path, mode: str, run_id: str, extra: Optional[dict[str, Any]]):
    return wandb.init(
        mode=mode,
        dir=str(out_dir),
        id=run_id,
        resume="allow",  # the same W&B run continues when a run folder resumes
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group,
        name=cfg.logger.name or out_dir.name,
        job_type=Phase(cfg.phase).value,
        tags=run_tags(cfg),
        config={**plain_config(cfg), **(extra or {})},
        settings=wandb.Settings(console="off", init_timeout=cfg.logger.init_timeout_s),
    )
