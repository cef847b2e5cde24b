"""Weights & Biases: one run per job, offline by default so no account or network is needed."""
import logging
from pathlib import Path
from typing import Optional

import wandb
from omegaconf import DictConfig

from kd import distributed
from kd.config import Phase
from kd.records import model_name, plain_config

log = logging.getLogger(__name__)

MODES = ("online", "offline", "disabled")


def run_tags(cfg: DictConfig) -> list[str]:
    """Tags that let a sweep's runs be filtered by dataset, pair and loss."""
    loss = cfg.loss._target_.rsplit(".", 1)[-1]
    auto = [f"dataset:{cfg.dataset.name}", f"teacher:{model_name(cfg.teacher)}", f"loss:{loss}"]
    auto.append(f"student:{model_name(cfg.student)}")
    return auto + list(cfg.logger.tags)


def start(cfg: DictConfig, out_dir: Path, run_id: Optional[str] = None):
    """Start the job's W&B run, or resume run_id (mode from logger.mode, which defaults to $WANDB_MODE, then offline).

    An online start that fails (no credentials, no network: bounded by logger.init_timeout_s) warns once and
    logs offline instead, so a W&B outage never costs a training run.
    """
    if not distributed.is_main():  # under torchrun, rank 0 alone logs
        return _init(cfg, out_dir, "disabled", run_id)
    try:
        return _init(cfg, out_dir, cfg.logger.mode, run_id)
    except Exception as error:  # wandb raises UsageError, CommError, or its own timeouts
        if cfg.logger.mode != "online":
            raise
        reason = (str(error).strip().splitlines() or [""])[0]
        log.warning(
            "W&B online start failed (%s: %s); logging offline instead (raise logger.init_timeout_s=%g if the network "
            "is just slow). Upload later with `wandb sync %s/wandb/offline-run-*`.",
            type(error).__name__, reason, cfg.logger.init_timeout_s, out_dir,
        )
        return _init(cfg, out_dir, "offline", run_id)


def _init(cfg: DictConfig, out_dir: Path, mode: str, run_id: Optional[str]):
    return wandb.init(
        mode=mode,
        dir=str(out_dir),
        id=run_id,
        resume="allow" if run_id else None,  # the same W&B run continues when a run folder resumes
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group,
        name=cfg.logger.name or out_dir.name,
        job_type=Phase(cfg.phase).value,
        tags=run_tags(cfg),
        config=plain_config(cfg),
        settings=wandb.Settings(console="off", init_timeout=cfg.logger.init_timeout_s),
    )
