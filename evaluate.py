"""Evaluate a checkpoint: `python evaluate.py ckpt=PATH [metrics=[nll,fid]] ...` (see conf/eval.yaml)."""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("DDPMLAB_ROOT", str(Path(__file__).resolve().parent))

from ddpmlab.errors import ConfigError  # noqa: E402
from ddpmlab.evaluation import evaluate  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"results: {Path(cfg.paths.output_dir) / 'metrics.json'}")


if __name__ == "__main__":
    main()
