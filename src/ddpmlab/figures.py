"""The figures of Ho et al. 2020 (arXiv 2006.11239), section 4.3-4.4, as functions that evaluate.py calls by name.

Each takes the network (`model(x_t, t)`), its diffusion and the test split (uint8 (N, C, H, W); test images are
taken in data.evaluation_subset's fixed random order) and returns a Grid: images (rows, columns, C, H, W) in
[-1, 1] with its row and column labels. `rows` picks which rows to compute (default all; [] only the labels), so
that processes can share a figure: row r's noise is a function of (seed, r) alone (ExampleNoise), and any split
of the rows over processes gives the same figure. `t` is the paper's 1-based timestep throughout (x_t after t
forward steps, t in [1, T]); the diffusion's own indices are t - 1.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from ddpmlab.data import evaluation_subset, to_model_range
from ddpmlab.diffusion import get_sampler
from ddpmlab.diffusion.noise import ExampleNoise
from ddpmlab.progress import track


@dataclass
class Grid:
    images: Tensor            # (rows, columns, C, H, W) in [-1, 1]: the rows asked for
    row_labels: list[str]     # every row's
    column_labels: list[str]
    title: str


def default_t(name: str, T: int) -> list[int]:
    """The paper's timesteps for T = 1000, scaled to this T: shared_latent 1000, 750, 500, 250 (Fig. 7);
    interpolation 500 (Fig. 8); coarse_to_fine 1000, 875, ..., 125 (Fig. 9)."""
    parts = {"shared_latent": 4, "interpolation": 2, "coarse_to_fine": 8}[name]
    fractions = [1 / 2] if name == "interpolation" else [k / parts for k in range(parts, 0, -1)]
    return list(dict.fromkeys(max(1, round(T * f)) for f in fractions))


@torch.no_grad()
def reverse_from(model, diffusion, x_t: Tensor, t: int, generator, progress: bool = False) -> Tensor:
    """x_0 ~ p_theta(x_0 | x_t): Algorithm 2's loop started at step t instead of T (the reverse process p, eq. 1).
    (B, C, H, W) -> (B, C, H, W) in [-1, 1]."""
    x = x_t
    for i in track(reversed(range(t)), total=t, desc=f"reverse process from t={t}", disable=not progress, leave=False):
        x = diffusion.p_sample(model, x, torch.full((len(x),), i, device=x.device, dtype=torch.long), generator)
    return x.clamp(-1.0, 1.0)


def encode(diffusion, x_0: Tensor, t: int, eps: Tensor) -> Tensor:
    """x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) with the noise eps (eq. 4): q as a
    stochastic encoder (section 4.4)."""
    return diffusion.q_sample(x_0, torch.full((len(x_0),), t - 1, device=x_0.device, dtype=torch.long), eps)


def _rows(rows, total: int) -> list[int]:
    return list(range(total)) if rows is None else list(rows)


def _empty(columns: int, images: Tensor, device) -> Tensor:
    return torch.zeros((0, columns, *images.shape[1:]), device=device)


@torch.no_grad()
def progressive(model, diffusion, images: Tensor, rows=None, seed: int = 0, num_rows: int = 8, columns: int = 10,
                sampler: str = "ancestral", steps: int | None = None, eta: float = 0.0, progress: bool = False,
                device=None) -> Grid:
    """Progressive generation, Ho et al. Fig. 6 (section 4.3): x^_0, the network's prediction of x_0 (eq. 15), along
    one reverse chain, at `columns` steps evenly spaced from the chain's first step to its last; one row per
    sample, from the same noise as evaluate.py's sample r (so the last column is that sample). Any sampler: the
    x_0 its on_step reports at each step (eq. 15's x^_0 for the ancestral one)."""
    wanted = _rows(rows, num_rows)
    K = steps or diffusion.num_timesteps
    keep = [round(j * (K - 1) / max(1, columns - 1)) for j in reversed(range(columns))]  # step indices, K-1 .. 0
    labels = ([f"sample {r}" for r in range(num_rows)], [f"{K - i} of {K}" for i in keep],
              f"progressive generation (Ho et al. Fig. 6): x0 predicted along the chain, {sampler}, {K} steps")
    if not wanted:
        return Grid(_empty(columns, images, device), *labels)
    frames = {}

    def record(i, x, x_0):
        if i in keep:
            frames[i] = x_0

    sample = get_sampler(sampler, **({"eta": eta} if sampler == "ddim" else {}))
    sample(model, diffusion, (len(wanted), *images.shape[1:]), ExampleNoise(wanted, seed, device), steps=steps,
           progress=progress, on_step=record)
    return Grid(torch.stack([frames[i] for i in keep], 1).clamp(-1.0, 1.0), *labels)


@torch.no_grad()
def shared_latent(model, diffusion, images: Tensor, rows=None, seed: int = 0, num_images: int = 1,
                  t: list[int] | None = None, samples: int = 6, progress: bool = False, device=None) -> Grid:
    """Samples that share a latent, Ho et al. Fig. 7 (section 4.3): a test image x_0 noised to x_t ~ q(x_t | x_0)
    (eq. 4), then `samples` draws of x_0 ~ p_theta(x_0 | x_t), the reverse process from that x_t. Small t keeps all
    but fine details, large t only the coarse layout. One row per (image, t): the image, x_t, the samples."""
    ts = t or default_t("shared_latent", diffusion.num_timesteps)
    wanted = _rows(rows, num_images * len(ts))
    labels = ([f"image {k}, t={s}" for k in range(num_images) for s in ts],
              ["x_0", "x_t", *(f"sample {j}" for j in range(samples))],
              "shared latents (Ho et al. Fig. 7): samples of p(x_0 | x_t) from one x_t ~ q(x_t | x_0)")
    if not wanted:
        return Grid(_empty(2 + samples, images, device), *labels)
    chosen = evaluation_subset(images, num_images)
    out = []
    for r in wanted:
        x_0 = to_model_range(chosen[r // len(ts)][None].to(device))
        step = ts[r % len(ts)]
        x_t = encode(diffusion, x_0, step, ExampleNoise([r], seed, device).randn(x_0.shape))
        decoded = reverse_from(model, diffusion, x_t.expand(samples, *x_t.shape[1:]), step,
                               ExampleNoise(range(r * samples, (r + 1) * samples), seed + 1, device), progress)
        out.append(torch.cat([x_0, x_t.clamp(-1.0, 1.0), decoded]))
    return Grid(torch.stack(out), *labels)


def _interpolate(model, diffusion, pair: Tensor, step: int, lambdas: list[float], encode_noise, decode_noise,
                 progress: bool) -> Tensor:
    """One row of Fig. 8/9: the pair (2, C, H, W) encoded to x_t, x'_t by q, each mix (1 - lambda) x_t + lambda x'_t
    decoded by p with the same noise for every lambda; the sources at both ends. -> (2 + L, C, H, W)."""
    x_t = encode(diffusion, pair, step, encode_noise.randn(pair.shape))
    lam = torch.tensor(lambdas, device=pair.device).view(-1, 1, 1, 1)
    mixed = (1 - lam) * x_t[:1] + lam * x_t[1:]  # (L, C, H, W)
    decoded = reverse_from(model, diffusion, mixed, step, decode_noise, progress)
    return torch.cat([pair[:1], decoded, pair[1:]])


@torch.no_grad()
def interpolation(model, diffusion, images: Tensor, rows=None, seed: int = 0, pairs: int = 4, t: int | None = None,
                  lambdas: list[float] = (0.0, 0.5, 1.0), progress: bool = False, device=None) -> Grid:
    """Interpolation, Ho et al. Fig. 8 (section 4.4): two test images x_0, x'_0 encoded with q as a stochastic encoder,
    x_t, x'_t ~ q(x_t | x_0) (the paper: t = 500 of 1000), the latents mixed linearly, x-bar_t = (1 - lambda) x_t +
    lambda x'_t, and each mix decoded by the reverse process, x-bar_0 ~ p(x_0 | x-bar_t), with the same noise for
    every lambda: lambda = 0 and 1 are the two images' own reconstructions. One row per pair of test images."""
    step = t or default_t("interpolation", diffusion.num_timesteps)[0]
    wanted = _rows(rows, pairs)
    labels = ([f"pair {r}, t={step}" for r in range(pairs)],
              ["x_0", *(f"lambda={lam:g}" for lam in lambdas), "x'_0"],
              f"interpolation (Ho et al. Fig. 8): latents mixed at t={step}, decoded by p")
    if not wanted:
        return Grid(_empty(len(lambdas) + 2, images, device), *labels)
    chosen = evaluation_subset(images, 2 * pairs)
    out = [_interpolate(model, diffusion, to_model_range(chosen[2 * r:2 * r + 2].to(device)), step, list(lambdas),
                        ExampleNoise([2 * r, 2 * r + 1], seed, device),
                        ExampleNoise([r] * len(lambdas), seed + 1, device), progress) for r in wanted]
    return Grid(torch.stack(out), *labels)


@torch.no_grad()
def coarse_to_fine(model, diffusion, images: Tensor, rows=None, seed: int = 0, t: list[int] | None = None,
                   lambdas: list[float] = (0.0, 0.5, 1.0), progress: bool = False, device=None) -> Grid:
    """Coarse-to-fine interpolation, Ho et al. Fig. 9 (section 4.4): interpolation's first pair, mixed after t
    forward steps for several t (the paper: 1000, 875, ..., 125 of 1000): a larger t gives coarser, more varied
    interpolations, novel samples at t = T. The encoding and decoding noise is interpolation's first row's at
    every t. One row per t."""
    ts = t or default_t("coarse_to_fine", diffusion.num_timesteps)
    wanted = _rows(rows, len(ts))
    labels = ([f"t={s}" for s in ts], ["x_0", *(f"lambda={lam:g}" for lam in lambdas), "x'_0"],
              "coarse-to-fine interpolation (Ho et al. Fig. 9): the same pair mixed at each t")
    if not wanted:
        return Grid(_empty(len(lambdas) + 2, images, device), *labels)
    pair = to_model_range(evaluation_subset(images, 2)[:2].to(device))
    out = [_interpolate(model, diffusion, pair, ts[r], list(lambdas), ExampleNoise([0, 1], seed, device),
                        ExampleNoise([0] * len(lambdas), seed + 1, device), progress) for r in wanted]
    return Grid(torch.stack(out), *labels)


FIGURES = {"progressive": progressive, "shared_latent": shared_latent, "interpolation": interpolation,
           "coarse_to_fine": coarse_to_fine}
PAPER = {"progressive": "Fig. 6", "shared_latent": "Fig. 7", "interpolation": "Fig. 8", "coarse_to_fine": "Fig. 9"}
