"""Train a DDPM: `python train.py [group=option ...] [key=value ...]` (see conf/config.yaml)."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("DDPMLAB_ROOT", str(Path(__file__).resolve().parent))

from ddpmlab import cli, schema  # noqa: E402


def run_training(cfg: DictConfig) -> float | None:
    from ddpmlab.training import objective, train  # after the check: a refused value never waits for torch

    metrics = train(cfg)
    print(f"run folder: {cfg.paths.output_dir}")
    return objective(cfg, metrics)  # optimized_metric's value, for a sweeper


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    # the config is checked first; in a multirun a failed run is recorded and None returned
    return cli.guarded(cfg, schema.check_train, run_training)


if __name__ == "__main__":
    cli.run(main)
