"""The diffusion math: schedules, the Gaussian process and its samplers (no Lightning, no network)."""

from ddpmlab.diffusion.gaussian import GaussianDiffusion
from ddpmlab.diffusion.samplers import SAMPLERS, get_sampler

__all__ = ["GaussianDiffusion", "SAMPLERS", "get_sampler"]
