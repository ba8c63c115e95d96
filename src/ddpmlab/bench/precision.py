"""bf16 against fp32 on ddpmlab's own path: `python -m ddpmlab.bench --precision-ab`.

Training: each round trains the preset's real run (Lightning's Trainer.fit of the DiffusionModule) for
args.warmup untimed and args.block timed steps under trainer.precision=32-true and under bf16-mixed, in ABBA
order, on the same images and the same starting weights. Sampling: args.sample_steps respaced ancestral steps of
args.batch images, fp32 and under bf16 autocast, alternating. The rows give each side's median throughput and
the median over rounds of the paired ratio bf16 / fp32 with its interval (report.median_interval).

The bound (with --weights CKPT, a trained run's network): the same images' bound estimate (10 terms, the same
noise) from the same weights in fp32 and under bf16 autocast, its difference in bits/dim: why evaluate.py keeps
the NLL in fp32.
"""

import copy
import statistics

import torch

from ddpmlab.bench.loader import StepsTimer
from ddpmlab.bench.measure import timed
from ddpmlab.bench.report import median_interval
from ddpmlab.data import to_uint8
from ddpmlab.diffusion.noise import ExampleNoise
from ddpmlab.diffusion.samplers import get_sampler
from ddpmlab.progress import track
from ddpmlab.resume import init_weights

PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}


def ratio_row(metric: str, unit: str, work: float, times: dict[str, list[float]]) -> dict:
    """Throughput of each precision (work / median seconds) and the paired ratio bf16 / fp32 (fp32 time / bf16)."""
    ratios = [fp32 / bf16 for fp32, bf16 in zip(times["fp32"], times["bf16"])]
    median, low, high, coverage = median_interval(ratios)
    return {"metric": metric, "unit": unit, "fp32": work / statistics.median(times["fp32"]),
            "bf16": work / statistics.median(times["bf16"]),
            "ratio": {"median": median, "interval": [low, high], "coverage": coverage, "rounds": len(ratios)},
            "raw_seconds": times}


def precision_rows(cfg, module, args, fit) -> dict:
    """The bf16-against-fp32 rows of one preset; `fit` is run.fit (ddpmlab's real Trainer.fit)."""
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    images = torch.randint(0, 256, (args.batch * 8, *shape), dtype=torch.uint8)
    if args.weights is not None:  # a trained run's network: the bound's difference means something only there
        init_weights(module, args.weights)
    start = copy.deepcopy(module.state_dict())
    training = {"fp32": [], "bf16": []}
    for r in track(range(args.rounds), total=args.rounds, desc="training, bf16 against fp32"):
        for name in PRECISIONS if r % 2 == 0 else reversed(PRECISIONS):
            module.load_state_dict(start)
            timer = StepsTimer(args.device, args.warmup)
            fit(cfg, module, args, args.warmup + args.block, [timer], images=images, precision=PRECISIONS[name])
            training[name].append(timer.seconds)
    module.load_state_dict(start)
    network, diffusion = module.ema_model.to(args.device).eval(), module.diffusion.to(args.device)

    def sample(bf16: bool):
        noise = ExampleNoise(range(args.batch), 0, args.device)
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=bf16):
            return to_uint8(get_sampler("respaced")(network, diffusion, (args.batch, *shape), noise,
                                                    steps=args.sample_steps))

    sample(False), sample(True)
    sampling = {"fp32": [], "bf16": []}
    for r in track(range(args.rounds), total=args.rounds, desc="sampling, bf16 against fp32"):
        for name in PRECISIONS if r % 2 == 0 else reversed(PRECISIONS):
            with timed(args.device, sampling[name]):
                sample(name == "bf16")
    rows = [ratio_row("training throughput", "images/s", args.batch * args.block, training),
            ratio_row("sampling throughput", "images x steps/s", args.batch * args.sample_steps, sampling)]
    if args.weights is None:  # an untrained U-Net's last layer is zero: it outputs 0 in any precision
        return {"rows": rows}
    x_0 = images[: args.batch].to(args.device).float() / 127.5 - 1
    T = diffusion.num_timesteps
    bounds = {}
    for name in PRECISIONS:
        with torch.no_grad(), torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=name == "bf16"):
            bounds[name] = diffusion.estimate_bpd(network, x_0, 10, ExampleNoise(range(args.batch), 1, args.device))
    difference = (bounds["bf16"].float() - bounds["fp32"]).abs()
    return {"rows": rows,
            "bound": {"fp32_bpd": bounds["fp32"].mean().item(), "bf16_bpd": bounds["bf16"].float().mean().item(),
                      "mean_abs_difference_bpd": difference.mean().item(),
                      "max_abs_difference_bpd": difference.max().item(), "images": args.batch, "terms": 10, "T": T}}


def precision_table(results: dict) -> str:
    """The bf16-against-fp32 rows as a Markdown table (empty when none was measured)."""
    rows = [(preset, r) for preset, result in results["presets"].items() for r in result.get("precision", {}).get("rows", [])]
    if not rows:
        return ""
    lines = ["", "", "| preset | metric | unit | fp32 | bf16 | bf16 / fp32 | interval |", "|---|---|---|---:|---:|---:|---|"]
    for preset, r in rows:
        ratio = r["ratio"]
        lines.append(f"| {preset} | {r['metric']} | {r['unit']} | {r['fp32']:.4g} | {r['bf16']:.4g} | "
                     f"{ratio['median']:.3f} | {ratio['interval'][0]:.2f}-{ratio['interval'][1]:.2f} "
                     f"({ratio['coverage']:.0%}, {ratio['rounds']} rounds) |")
    for preset, result in results["presets"].items():
        bound = result.get("precision", {}).get("bound")
        if bound:
            lines.append(f"\n- {preset}, the bound (estimate, {bound['terms']} terms, {bound['images']} images, same "
                         f"noise): fp32 {bound['fp32_bpd']:.4f}, under bf16 autocast {bound['bf16_bpd']:.4f} bits/dim; "
                         f"per image |difference| mean {bound['mean_abs_difference_bpd']:.4f}, largest "
                         f"{bound['max_abs_difference_bpd']:.4f}")
    lines.append("- bf16 / fp32: the median over rounds of the paired throughput ratio (fp32 time / bf16 time of the "
                 "same round); above 1, bf16 is faster")
    return "\n".join(lines)
