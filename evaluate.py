"""Evaluate a checkpoint: `python evaluate.py ckpt=PATH [metrics=[nll,fid]] ...` (see conf/eval.yaml)."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("DDPMLAB_ROOT", str(Path(__file__).resolve().parent))

from ddpmlab import cli  # noqa: E402
from ddpmlab.evaluation import evaluate  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    with cli.reported_errors(cfg):  # in a multirun a failed run is recorded and the block left
        evaluate(cfg)
        print(f"results: {Path(cfg.paths.output_dir) / 'metrics.json'}")


if __name__ == "__main__":
    cli.run(main)
