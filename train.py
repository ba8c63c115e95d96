"""Train a DDPM: `python train.py [group=option ...] [key=value ...]` (see conf/config.yaml)."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("DDPMLAB_ROOT", str(Path(__file__).resolve().parent))

from ddpmlab import cli, schema  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    # the config is checked first; in a multirun a failed run is recorded and the block left: None
    with cli.reported_errors(cfg, schema.check_train):
        from ddpmlab.training import objective, train  # after the check: a refused value never waits for torch

        metrics = train(cfg)
        print(f"run folder: {cfg.paths.output_dir}")
        return objective(cfg, metrics)  # optimized_metric's value, for a sweeper


if __name__ == "__main__":
    cli.run(main)
