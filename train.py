"""Train a DDPM: `python train.py [group=option ...] [key=value ...]` (see conf/config.yaml)."""

import os
import shutil
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("DDPMLAB_ROOT", str(Path(__file__).resolve().parent))

from ddpmlab.errors import ConfigError  # noqa: E402
from ddpmlab.training import train  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    output_dir = Path(cfg.paths.output_dir)
    # Hydra has just made this folder with .hydra/ and a log; anything else belongs to an earlier run.
    fresh = all(p.name == ".hydra" or p.suffix == ".log" for p in output_dir.iterdir()) if output_dir.is_dir() else True
    try:
        metrics = train(cfg)
    except ConfigError as err:
        if fresh:
            shutil.rmtree(output_dir, ignore_errors=True)  # nothing but Hydra's own files of this failed run
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"run folder: {output_dir}")
    return metrics.get("train/loss")


if __name__ == "__main__":
    main()
