"""Samplers: plain functions of (model, diffusion, shape, generator) that return x_0 in [-1, 1].

`get_sampler(name, **options)` maps the names used by configs (`sampler=...`) to the functions.
`generator` is one torch.Generator, or one per example (see noise.py) for batch-independent results.
"""

import functools

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ddpmlab.diffusion.gaussian import GaussianDiffusion, _gather
from ddpmlab.diffusion.noise import Generator, randn
from ddpmlab.errors import ConfigError


def _timesteps(diffusion: GaussianDiffusion, shape, progress: bool):
    """(i, t) from the last step down to 0, with t a (B,) tensor, under a progress bar."""
    device = diffusion.betas.device
    for i in tqdm(reversed(range(diffusion.num_timesteps)), total=diffusion.num_timesteps, disable=not progress,
                  desc="sampling", leave=False):
        yield torch.full((shape[0],), i, device=device, dtype=torch.long)


@torch.no_grad()
def ancestral(model, diffusion: GaussianDiffusion, shape: tuple[int, ...], generator: Generator = None,
              steps: int | None = None, progress: bool = False) -> Tensor:
    """Ancestral sampling over every step of `diffusion`, x_T ~ N(0, I) down to x_0 (Ho et al. Algorithm 2).

    `steps` is accepted for a uniform interface and must be None or T.
    """
    if steps not in (None, diffusion.num_timesteps):
        raise ConfigError(
            f"the ancestral sampler runs all T={diffusion.num_timesteps} steps, got sampling_steps={steps}: "
            "use sampler=respaced or sampler=ddim for fewer steps"
        )
    x = randn(shape, generator, diffusion.betas.device)
    for t in _timesteps(diffusion, shape, progress):
        x = diffusion.p_sample(model, x, t, generator)
    return x.clamp(-1.0, 1.0)


def respaced(model, diffusion: GaussianDiffusion, shape: tuple[int, ...], generator: Generator = None,
             steps: int | None = None, progress: bool = False) -> Tensor:
    """Ancestral sampling over `steps` evenly spaced steps of the T (Nichol & Dhariwal 2021, section 4)."""
    steps = diffusion.num_timesteps if steps is None else steps
    return ancestral(model, diffusion.respace(steps), shape, generator, progress=progress)


@torch.no_grad()
def ddim(model, diffusion: GaussianDiffusion, shape: tuple[int, ...], generator: Generator = None,
         steps: int | None = None, progress: bool = False, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2020, eq. 12) over `steps` evenly spaced steps, stochasticity eta.

    x_{t-1} = sqrt(a_{t-1}) x0 + sqrt(1 - a_{t-1} - sigma_t^2) eps + sigma_t z, with
    sigma_t = eta sqrt((1 - a_{t-1}) / (1 - a_t)) sqrt(1 - a_t / a_{t-1}) and a = alpha_bar.
    eta = 0 is the deterministic DDIM; eta = 1 over all T steps is DDPM's ancestral step with sigma_t^2 = beta-tilde_t.
    """
    if eta < 0:
        raise ConfigError(f"ddim needs eta >= 0, got {eta}")
    spaced = diffusion.respace(diffusion.num_timesteps if steps is None else steps)
    x = randn(shape, generator, spaced.betas.device)
    for t in _timesteps(spaced, shape, progress):
        x_0, eps = spaced.denoise(model, x, t)
        a, a_prev = _gather(spaced.alphas_cumprod, t, x), _gather(spaced.alphas_cumprod_prev, t, x)
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        x = a_prev.sqrt() * x_0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x = x + sigma * randn(shape, generator, x.device)
    return x.clamp(-1.0, 1.0)


SAMPLERS = {"ancestral": ancestral, "respaced": respaced, "ddim": ddim}


def get_sampler(name: str, **options):
    """The sampler registered under `name`, with options (DDIM's `eta`) bound."""
    if name not in SAMPLERS:
        raise ConfigError(f"sampler={name!r} is unknown: choose one of {', '.join(SAMPLERS)}")
    return functools.partial(SAMPLERS[name], **options) if options else SAMPLERS[name]
