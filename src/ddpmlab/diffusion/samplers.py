"""Samplers: plain functions of (model, diffusion, shape, generator) that return x_0 in [-1, 1].

`SAMPLERS` maps the names used by configs (`sampler=...`) to the functions.
"""

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ddpmlab.diffusion.gaussian import GaussianDiffusion
from ddpmlab.errors import ConfigError


@torch.no_grad()
def ancestral(
    model,
    diffusion: GaussianDiffusion,
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    steps: int | None = None,
    progress: bool = False,
) -> Tensor:
    """Ancestral sampling over every step of `diffusion`, x_T ~ N(0, I) down to x_0 (Ho et al. Algorithm 2).

    `steps` is accepted for a uniform interface and must be None or T.
    """
    if steps not in (None, diffusion.num_timesteps):
        raise ConfigError(
            f"the ancestral sampler runs all T={diffusion.num_timesteps} steps, got sampling_steps={steps}: "
            "use sampler=respaced for fewer steps"
        )
    device = diffusion.betas.device
    x = torch.randn(shape, generator=generator, device=device)
    for i in tqdm(reversed(range(diffusion.num_timesteps)), total=diffusion.num_timesteps, disable=not progress,
                  desc="sampling", leave=False):
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        x = diffusion.p_sample(model, x, t, generator)
    return x.clamp(-1.0, 1.0)


def respaced(
    model,
    diffusion: GaussianDiffusion,
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    steps: int | None = None,
    progress: bool = False,
) -> Tensor:
    """Ancestral sampling over `steps` evenly spaced steps of the T (Nichol & Dhariwal 2021, section 4)."""
    steps = diffusion.num_timesteps if steps is None else steps
    return ancestral(model, diffusion.respace(steps), shape, generator, progress=progress)


SAMPLERS = {"ancestral": ancestral, "respaced": respaced}


def get_sampler(name: str):
    """The sampler function registered under `name`."""
    if name not in SAMPLERS:
        raise ConfigError(f"sampler={name!r} is unknown: choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
