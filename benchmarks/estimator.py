"""The bound's K-timestep estimate against the full bound, before and after issue 18, on one checkpoint.

    python benchmarks/estimator.py --ckpt PATH [--images 16] [--runs 40] [--timesteps 10] [--out FILE]

On the checkpoint's first N test images (EMA weights, clip_denoised, as evaluate.py): the full bound
(calc_bpd_loop with seed 0, evaluate.py's `nll`) and its stderr over the images; then R estimates of it with
K timesteps per image by each method below; run r draws from ExampleNoise seed 1 + r, so run 0 of
`log strata` is evaluate.py's `nll_estimate` with seed 0.

- before: the old estimate_bpd, t uniform over all T steps: L_T + (T / K) sum_k L_{t_k}; L_0 is one of the T.
- log strata: L_T + L_0 exact, strata evenly spaced in log t (estimate_bpd, the method now used).
- equal strata: L_T + L_0 exact, one index in each of K equal strata of the KL terms.
- uniform: L_T + L_0 exact, K indices uniform over the T - 1 KL terms, each weighted (T - 1) / K.

Per method: the median, range and mean of the R estimates of the mean bound, how often mean +- 2 stderr covers
the full bound, and the per-image standard deviation over the R runs (root mean square over the images).
"""

import argparse
import math
import time
from pathlib import Path

import torch

from ddpmlab.data import to_model_range
from ddpmlab.diffusion.gaussian import log_strata
from ddpmlab.diffusion.noise import ExampleNoise, randint, randn
from ddpmlab.evaluation import load_run
from ddpmlab.training import build


def before(diffusion, model, x_0, k, noise):
    t = randint(diffusion.num_timesteps, (k, x_0.shape[0]), noise)  # (K, B), L_0 at t = 0
    terms = sum(diffusion.vb_terms_bpd(model, x_0, diffusion.q_sample(x_0, t_k, randn(x_0.shape, noise)), t_k)
                for t_k in t)
    return diffusion.prior_bpd(x_0) + diffusion.num_timesteps / k * terms


def uniform(diffusion, model, x_0, k, noise):
    n = diffusion.num_timesteps - 1
    t = 1 + randint(n, (k, x_0.shape[0]), noise)  # (K, B), KL indices only
    terms = sum(diffusion.vb_terms_bpd(model, x_0, diffusion.q_sample(x_0, t_k, randn(x_0.shape, noise)), t_k)
                for t_k in t)
    return diffusion.prior_bpd(x_0) + diffusion.decoder_bpd(model, x_0, randn(x_0.shape, noise)) + n / k * terms


def equal_strata(diffusion, model, x_0, k, noise):
    n = diffusion.num_timesteps - 1
    return diffusion.stratified_bpd(model, x_0, [i * n // min(k, n) for i in range(min(k, n) + 1)], noise)


def log_strata_estimate(diffusion, model, x_0, k, noise):
    return diffusion.estimate_bpd(model, x_0, k, noise)


METHODS = {"before": before, "log strata": log_strata_estimate, "equal strata": equal_strata, "uniform": uniform}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a run's checkpoints/last.ckpt (`python train.py`: the default run)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--timesteps", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "estimator.md"))
    args = parser.parse_args()

    model, diffusion, train_cfg = load_run(args.ckpt, use_ema=True)
    data = build(train_cfg.data)
    data.setup("test")
    idx = list(range(args.images))
    x_0 = to_model_range(data.test_images[idx])
    start = time.perf_counter()
    full = diffusion.calc_bpd_loop(model, x_0, ExampleNoise(idx, 0))
    full_seconds = time.perf_counter() - start
    bound, n = full["total"], args.images
    lines = [
        f"Checkpoint `{args.ckpt}` (step {torch.load(args.ckpt, map_location='cpu', weights_only=False)['global_step']},"
        f" T = {diffusion.num_timesteps}), first {n} test images; `python benchmarks/estimator.py --ckpt ... --images {n} "
        f"--runs {args.runs} --timesteps {args.timesteps}`.",
        "",
        f"Full bound: **{bound.mean():.3f} ± {bound.std() / math.sqrt(n):.3f}** bits/dim (± stderr over images): "
        f"L_0 {full['terms'][:, 0].mean():.3f}, sum of L_(t-1) {full['terms'][:, 1:].sum(1).mean():.3f}, "
        f"L_T {full['prior'].mean():.1e}; {full_seconds:.0f} s.",
        "",
        f"{args.runs} estimates, K = {args.timesteps} (coverage: of the {args.runs} intervals mean ± 2 stderr):",
        "",
        "| method | median | range | mean | ±2 SE covers the full bound | per-image sd | s per estimate |",
        "|---|---|---|---|---|---|---|",
    ]
    print(*lines, sep="\n", flush=True)
    for name, method in METHODS.items():
        start = time.perf_counter()
        runs = torch.stack([method(diffusion, model, x_0, args.timesteps, ExampleNoise(idx, 1 + r))
                            for r in range(args.runs)])  # (R, N)
        seconds = (time.perf_counter() - start) / args.runs
        means, stderrs = runs.mean(1), runs.std(1) / math.sqrt(n)
        covered = ((means - bound.mean()).abs() <= 2 * stderrs).float().mean()
        per_image_sd = runs.std(0).pow(2).mean().sqrt()
        lines.append(f"| {name} | {means.median():.3f} | {means.min():.2f} – {means.max():.2f} | {means.mean():.3f} | "
                     f"{covered:.0%} | {per_image_sd:.3f} | {seconds:.1f} |")
        print(lines[-1], flush=True)
        Path(args.out).write_text("\n".join(["# The bound's K-timestep estimate", "", *lines, ""]))


if __name__ == "__main__":
    main()
