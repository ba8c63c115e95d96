"""EDM's samplers (Karras et al. 2022, arXiv 2206.00364): Heun's method on the probability-flow ODE (Algorithm 1)
and its stochastic variant with "churn" (Algorithm 2), over any denoiser D(x; sigma) (ddpmlab.diffusion.denoisers),
so over every checkpoint: EDM-trained ones and discrete-time DDPM/iDDPM ones alike.

In sigma space (sigma(t) = t, s(t) = 1) the probability-flow ODE is dx/dsigma = (x - D(x; sigma)) / sigma (eq. 1
with eq. 3). The noise levels are EDM's (eq. 5):

    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i < N;  sigma_N = 0,

each rounded to a level the denoiser was trained at (a DDPM's sigma_t; EDM's own are continuous), as Karras et al.
round them for their discrete-time baselines, and sigma_min/sigma_max clamped into the checkpoint's own range (as
their generate.py does). N steps cost 2N - 1 network calls: the last step, to sigma = 0, is Euler's.
"""

import math

import torch
from torch import Tensor

from ddpmlab.diffusion.denoisers import as_denoiser
from ddpmlab.diffusion.noise import Generator, randn
from ddpmlab.errors import ConfigError
from ddpmlab.progress import track

DEFAULT_STEPS = 18  # Karras et al.'s CIFAR-10 setting: 35 network calls


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """sigma_0 > ... > sigma_{N-1} of eq. 5, then sigma_N = 0: N + 1 floats. N = 1 takes sigma_max alone."""
    if steps == 1:
        return [sigma_max, 0.0]
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(hi + i / (steps - 1) * (lo - hi)) ** rho for i in range(steps)] + [0.0]


def check_options(steps, rho: float, sigma_min: float, sigma_max: float, S_churn: float = 0.0, S_tmin: float = 0.0,
                  S_tmax: float = math.inf, S_noise: float = 1.0) -> None:
    """One line for a setting out of its range (the keys are evaluate.py's `edm.*`)."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"sampling_steps={steps!r} must be a positive integer for EDM's samplers (18: 35 calls)")
    for key, value, ok, rule in (("rho", rho, rho > 0, "positive (EDM: 7)"),
                                 ("sigma_min", sigma_min, 0 < sigma_min < sigma_max, "in (0, edm.sigma_max)"),
                                 ("S_churn", S_churn, S_churn >= 0, ">= 0 (0: deterministic)"),
                                 ("S_tmin", S_tmin, 0 <= S_tmin <= S_tmax, "in [0, edm.S_tmax]"),
                                 ("S_noise", S_noise, S_noise > 0, "positive (EDM: 1.003 to 1.007)")):
        if not ok:
            raise ConfigError(f"edm.{key}={value} must be {rule}")


def noise_levels(denoiser, steps: int, rho: float, sigma_min: float, sigma_max: float) -> list[float]:
    """The schedule on this denoiser: eq. 5 between sigma_min and sigma_max clamped into its range, each level
    rounded to one it was trained at. A requested range that holds none of its levels is refused."""
    lo, hi = max(sigma_min, denoiser.sigma_min), min(sigma_max, denoiser.sigma_max)
    if lo > hi:
        raise ConfigError(
            f"the checkpoint's noise levels sigma in [{denoiser.sigma_min:.4g}, {denoiser.sigma_max:.4g}] lie outside "
            f"the sampler's edm.sigma_min={sigma_min:g} .. edm.sigma_max={sigma_max:g}: set edm.sigma_min and "
            "edm.sigma_max to overlap them")
    return [denoiser.round_sigma(s) for s in karras_sigmas(steps, lo, hi, rho)[:-1]] + [0.0]


def _steps(sigmas: list[float], progress: bool):
    """(i, sigma_i, sigma_{i+1}) with i counting down N-1 .. 0 (the on_step convention), under a progress bar."""
    n = len(sigmas) - 1
    for j in track(range(n), total=n, disable=not progress, desc="sampling", leave=False):
        yield n - 1 - j, sigmas[j], sigmas[j + 1]


def heun_step(denoiser, x: Tensor, sigma: float, sigma_next: float) -> tuple[Tensor, Tensor]:
    """One step of Algorithm 1 from sigma to sigma_next: Euler with the slope d = (x - D(x; sigma)) / sigma, then,
    unless sigma_next = 0, Heun's correction with the mean of d and the slope at the Euler point. Returns (x at
    sigma_next, D(x; sigma))."""
    x_0 = denoiser(x, sigma)
    d = (x - x_0) / sigma
    x_next = x + (sigma_next - sigma) * d
    if sigma_next > 0:
        d_next = (x_next - denoiser(x_next, sigma_next)) / sigma_next
        x_next = x + (sigma_next - sigma) * (0.5 * d + 0.5 * d_next)
    return x_next, x_0


def sample_heun(denoiser, x: Tensor, sigmas: list[float], progress: bool = False, on_step=None) -> Tensor:
    """Algorithm 1 (sigma(t) = t, s(t) = 1) from x at sigmas[0], one heun_step per pair of levels."""
    for i, sigma, sigma_next in _steps(sigmas, progress):
        x, x_0 = heun_step(denoiser, x, sigma, sigma_next)
        if on_step is not None:
            on_step(i, x, x_0)
    return x


def sample_stochastic(denoiser, x: Tensor, sigmas: list[float], generator: Generator = None, S_churn: float = 0.0,
                      S_tmin: float = 0.0, S_tmax: float = math.inf, S_noise: float = 1.0, progress: bool = False,
                      on_step=None) -> Tensor:
    """Algorithm 2: at each sigma_i in [S_tmin, S_tmax], noise is added to raise it to
    sigma_hat = sigma_i (1 + gamma), gamma = min(S_churn / N, sqrt(2) - 1) (rounded to a trained level, as the
    schedule is), x_hat = x + sqrt(sigma_hat^2 - sigma_i^2) S_noise z, then one Heun step from sigma_hat.
    S_churn = 0 is Algorithm 1."""
    gamma = min(S_churn / (len(sigmas) - 1), math.sqrt(2.0) - 1.0)
    for i, sigma, sigma_next in _steps(sigmas, progress):
        z = randn(x.shape, generator, x.device)  # drawn at every step, so a step's noise is the same for any S_tmin
        sigma_hat = denoiser.round_sigma(sigma * (1 + gamma)) if S_tmin <= sigma <= S_tmax and gamma > 0 else sigma
        if sigma_hat > sigma:
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * S_noise * z
        x, x_0 = heun_step(denoiser, x, sigma_hat, sigma_next)
        if on_step is not None:
            on_step(i, x, x_0)
    return x


@torch.no_grad()
def heun(model, diffusion, shape: tuple[int, ...], generator: Generator = None, steps: int | None = None,
         progress: bool = False, on_step=None, rho: float = 7.0, sigma_min: float = 0.002,
         sigma_max: float = 80.0) -> Tensor:
    """EDM's deterministic sampler (Algorithm 1) on any checkpoint: N = steps (default 18) noise levels of eq. 5,
    2N - 1 network calls; x_0 ~ N(0, sigma_0^2 I) from `generator`. Returns x_0 clipped to [-1, 1]."""
    steps = DEFAULT_STEPS if steps is None else steps
    check_options(steps, rho, sigma_min, sigma_max)
    denoiser = as_denoiser(model, diffusion)
    sigmas = noise_levels(denoiser, steps, rho, sigma_min, sigma_max)
    x = randn(shape, generator, _device(diffusion)) * sigmas[0]
    return sample_heun(denoiser, x, sigmas, progress, on_step).clamp(-1.0, 1.0)


@torch.no_grad()
def edm(model, diffusion, shape: tuple[int, ...], generator: Generator = None, steps: int | None = None,
        progress: bool = False, on_step=None, rho: float = 7.0, sigma_min: float = 0.002, sigma_max: float = 80.0,
        S_churn: float = 30.0, S_tmin: float = 0.01, S_tmax: float = 1.0, S_noise: float = 1.007) -> Tensor:
    """EDM's stochastic sampler (Algorithm 2) on any checkpoint, with the churn settings Karras et al. found best
    for the pre-trained VP model (their Table 5: S_churn 30, S_tmin 0.01, S_tmax 1, S_noise 1.007); 2N - 1 network
    calls. Returns x_0 clipped to [-1, 1]."""
    steps = DEFAULT_STEPS if steps is None else steps
    check_options(steps, rho, sigma_min, sigma_max, S_churn, S_tmin, S_tmax, S_noise)
    denoiser = as_denoiser(model, diffusion)
    sigmas = noise_levels(denoiser, steps, rho, sigma_min, sigma_max)
    x = randn(shape, generator, _device(diffusion)) * sigmas[0]
    return sample_stochastic(denoiser, x, sigmas, generator, S_churn, S_tmin, S_tmax, S_noise, progress,
                             on_step).clamp(-1.0, 1.0)


def _device(diffusion) -> torch.device:
    """Where to draw the first noise: the diffusion's tables' device (GaussianDiffusion's, EDMDiffusion's range)."""
    return next(diffusion.buffers()).device
