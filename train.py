"""Train a teacher (phase=teacher) or distill a student from it (phase=student). See README.md."""
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import kd.config  # noqa: F401  (registers the typed root schema)
from kd import engine


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    result = engine.run(cfg, Path(hydra_cfg.runtime.output_dir), overrides=list(hydra_cfg.overrides.task))
    # The sweep metric: validation accuracy when a validation split exists, so searches never see test.
    return result.get("val/acc1", result["test/acc1"])


if __name__ == "__main__":
    main()
