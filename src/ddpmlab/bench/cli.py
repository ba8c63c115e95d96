"""`python -m ddpmlab.bench`: its arguments, read and checked before the benchmark's own imports.

Lightning, diffusers and the U-Nets cost seconds to import; a bad argument is refused in one line, exit 2,
without them (the benchmark itself: run.py; time to quality: quality.py)."""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, open_dict

from ddpmlab.bench.contenders import CONTENDERS, DEFAULT_CONTENDERS
from ddpmlab.errors import ConfigError, OneLineParser

ROOT = Path(__file__).resolve().parents[3]
PRESETS = {"cifar10": ["experiment=ddpm_cifar10"], "fashion_mnist": []}  # the default run is Fashion-MNIST's
DESCRIPTION = "The benchmark: ddpmlab against diffusers at the same network, batch and precision, in one process."


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m ddpmlab.bench", description=DESCRIPTION)
    parser.add_argument("--preset", choices=[*PRESETS, "all"], default="all")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--precision", choices=["32", "bf16"], default="32")
    parser.add_argument("--batch", type=int, help="images per step (default 16 on a CPU, 128 on a GPU)")
    parser.add_argument("--rounds", type=int, help="alternating rounds per measurement (default 5 CPU, 10 GPU)")
    parser.add_argument("--block", type=int, help="training steps per timed block (default 1 CPU, 10 GPU)")
    parser.add_argument("--warmup", type=int, help="untimed training steps first, at least 1 (default 2 CPU, 10 GPU)")
    parser.add_argument("--sample-steps", type=int, default=10, help="sampler steps per round of the throughput")
    parser.add_argument("--full-steps", type=int, help="steps of the full sampler run (default T; 100 on a CPU)")
    parser.add_argument("--nll-terms", type=int, default=10, help="terms of the T-term bound timed per round")
    parser.add_argument("--peer-channels-last", action="store_true", help="give diffusers the NHWC format too")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the peak-memory rows (unlike the timings, not sensitive to a busy machine)")
    parser.add_argument("--loader-only", action="store_true",
                        help="only the row of the streaming loader (data=shards) against the in-memory path")
    parser.add_argument("--precision-ab", action="store_true",
                        help="only ddpmlab in bf16-mixed against ddpmlab in 32-true: training and sampling throughput, "
                             "and with --weights the bound's difference")
    parser.add_argument("--time-to-quality", action="store_true",
                        help="train ddpmlab's default run and the peers' recipes for the same wall-clock budget, then "
                             "score 500 samples of each (bench/quality.py)")
    parser.add_argument("--minutes", type=float, default=10.0, help="--time-to-quality: each contender's budget")
    parser.add_argument("--samples", type=int, default=500, help="--time-to-quality: samples scored per contender")
    parser.add_argument("--contenders", default=DEFAULT_CONTENDERS,
                        help="--time-to-quality: which, comma-separated, of " + ", ".join(CONTENDERS) +
                             " (ddpmlab-fp32, ddpmlab-bf16: that precision; ddpmlab-edm: experiment=edm_fashion_mnist)")
    parser.add_argument("--keep-runs", type=Path, metavar="DIR",
                        help="--time-to-quality: keep each contender's training folder under DIR/<contender>/ "
                             "(ddpmlab's: run/checkpoints/last.ckpt, for evaluate.py)")
    parser.add_argument("--data-root", default=str(ROOT / "data"),
                        help="--time-to-quality: Fashion-MNIST's folder (data.root) and the FID cache")
    parser.add_argument("--weights", type=Path, metavar="CKPT", help="--precision-ab: start from this checkpoint's "
                        "network (a trained run: the same config's), for the bound's difference")
    parser.add_argument("--recompute", type=Path, metavar="FILE.json",
                        help="measure nothing: rebuild the table of stored results from their raw numbers, in place")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/<device>-<precision>.json)")
    parser.add_argument("overrides", nargs="*", help="ddpmlab config overrides for both presets, after --")
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu")
    args.device = device
    gpu = device.type == "cuda"
    for name, cpu_value, gpu_value in [("batch", 16, 128), ("rounds", 5, 10), ("block", 1, 10), ("warmup", 2, 10)]:
        if getattr(args, name) is None:
            setattr(args, name, gpu_value if gpu else cpu_value)
    for name in ("batch", "rounds", "block", "warmup", "sample_steps", "nll_terms"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.out is None and args.time_to_quality:
        args.out = ROOT / "benchmarks" / "results" / "time-to-quality.json"
    if args.out is None:
        kind = "cpu" if not gpu else torch.cuda.get_device_name(device).lower().replace(" ", "-")
        which = "bf16-vs-fp32" if args.precision_ab else "fp32" if args.precision == "32" else "bf16"
        args.out = ROOT / "benchmarks" / "results" / f"{kind}-{which}.json"
    return args


def preset_config(preset: str, args: argparse.Namespace) -> DictConfig:
    """The preset's training config, as train.py would compose it, at the benchmark's batch and precision."""
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=PRESETS[preset] + list(args.overrides))
    except HydraException as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"the overrides {list(args.overrides)} do not compose ({first}): fix them") from None
    with open_dict(cfg):
        cfg.paths.output_dir = tempfile.gettempdir()  # nothing is written there: no logger, no checkpoint
        cfg.logger = None
        cfg.data.batch_size = args.batch
        cfg.trainer.accelerator = args.device.type  # so performance.channels_last=auto follows --device
        cfg.trainer.precision = "bf16-mixed" if args.precision == "bf16" else "32-true"
    return cfg


def check(args: argparse.Namespace) -> None:
    """What can be refused before the benchmark's imports: the contenders of --time-to-quality, and the presets'
    configs with the overrides (composed again, cheaply, where they are used)."""
    if args.recompute:
        read_results(args.recompute)
        return
    if args.time_to_quality:
        from ddpmlab.bench.quality import check as check_contenders

        check_contenders(args)
        return
    for preset in (list(PRESETS) if args.preset == "all" else [args.preset]):
        preset_config(preset, args)


def read_results(path: Path) -> dict:
    """A results JSON the benchmark wrote, for --recompute."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"--recompute {path}: not a readable results JSON ({err}): give one the benchmark wrote")


def cli() -> None:
    """Entry point: bad input ends in one line and exit code 2, before the benchmark's imports."""
    argv = sys.argv[1:]
    try:
        args = parse_args(argv)
        check(args)
        from ddpmlab.bench.run import main

        sys.exit(main(argv, args))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
