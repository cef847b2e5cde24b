"""Weights & Biases: one run per job, offline by default so no account or network is needed."""
from pathlib import Path

import wandb
from omegaconf import DictConfig

from kd.config import Phase
from kd.records import model_name, plain_config

MODES = ("online", "offline", "disabled")


def run_tags(cfg: DictConfig) -> list[str]:
    """Tags that let a sweep's runs be filtered by dataset, pair and loss."""
    loss = cfg.loss._target_.rsplit(".", 1)[-1]
    auto = [f"dataset:{cfg.dataset.name}", f"teacher:{model_name(cfg.teacher)}", f"loss:{loss}"]
    auto.append(f"student:{model_name(cfg.student)}")
    return auto + list(cfg.logger.tags)


def start(cfg: DictConfig, out_dir: Path):
    """Start the job's W&B run (mode from logger.mode, which defaults to $WANDB_MODE, then offline)."""
    mode = cfg.logger.mode
    if mode not in MODES:
        raise ValueError(f"logger.mode={mode!r} is not one of {MODES}.")
    return wandb.init(
        mode=mode,
        dir=str(out_dir),
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group,
        name=cfg.logger.name or out_dir.name,
        job_type=Phase(cfg.phase).value,
        tags=run_tags(cfg),
        config=plain_config(cfg),
        settings=wandb.Settings(console="off"),
    )
