"""Evaluate a checkpoint: `python evaluate.py ckpt=PATH [metrics=[nll,fid]] ...` (see conf/eval.yaml)."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("DDPMLAB_ROOT", str(Path(__file__).resolve().parent))

from ddpmlab import cli, schema  # noqa: E402


def run_evaluation(cfg: DictConfig) -> None:
    if cfg.sweep_dir is not None:  # every run of a sweep, laid out as the paper's table (ddpmlab.table2)
        from ddpmlab.table2 import evaluate_sweep

        evaluate_sweep(cfg)
        return
    from ddpmlab.evaluation import evaluate  # after the check: a refused value never waits for torch

    evaluate(cfg)
    print(f"results: {Path(cfg.paths.output_dir) / 'metrics.json'}")


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    # the config is checked first; in a multirun a failed run is recorded and the sweep goes on
    cli.guarded(cfg, schema.check_eval, run_evaluation)


if __name__ == "__main__":
    cli.run(main)
