"""Samplers: plain functions of (model, diffusion, shape, generator) that return x_0 in [-1, 1].

`get_sampler(name, **options)` maps the names used by configs (`sampler=...`) to the functions.
`generator` is one torch.Generator, or an ExampleNoise (noise.py): per-example streams, for batch-independent results.
`heun` and `edm` are Karras et al. 2022's samplers (ddpmlab.diffusion.karras); they alone apply to an EDM checkpoint,
and `network_calls` says what each sampler costs.
`on_step(i, x, x_0)`, if given, sees after each step i = K-1 .. 0 the state x and the model's x_0 prediction at
that step (None where a sampler has none): a denoising strip, Ho et al.'s progressive generation (Fig. 6).
"""

import functools
import inspect
import math

import torch
from torch import Tensor
from ddpmlab.progress import track

from ddpmlab.diffusion import karras
from ddpmlab.diffusion.gaussian import GaussianDiffusion, _gather
from ddpmlab.diffusion.noise import Generator, randn
from ddpmlab.errors import ConfigError


def _timesteps(diffusion: GaussianDiffusion, shape, progress: bool):
    """(i, t) from the last step down to 0, with t a (B,) tensor, under a progress bar."""
    device = diffusion.betas.device
    for i in track(reversed(range(diffusion.num_timesteps)), total=diffusion.num_timesteps, disable=not progress,
                   desc="sampling", leave=False):
        yield torch.full((shape[0],), i, device=device, dtype=torch.long)


@torch.no_grad()
def ancestral(model, diffusion: GaussianDiffusion, shape: tuple[int, ...], generator: Generator = None,
              steps: int | None = None, progress: bool = False, on_step=None) -> Tensor:
    """Ancestral sampling over every step of `diffusion`, x_T ~ N(0, I) down to x_0 (Ho et al. Algorithm 2).

    `steps` is accepted for a uniform interface and must be None or T.
    """
    check_steps("ancestral", steps, diffusion.num_timesteps)
    x = randn(shape, generator, diffusion.betas.device)
    for t in _timesteps(diffusion, shape, progress):
        x, x_0 = diffusion.p_sample_x0(model, x, t, generator)
        if on_step is not None:
            on_step(int(t[0]), x, x_0)
    return x.clamp(-1.0, 1.0)


def respaced(model, diffusion: GaussianDiffusion, shape: tuple[int, ...], generator: Generator = None,
             steps: int | None = None, progress: bool = False, on_step=None) -> Tensor:
    """Ancestral sampling over `steps` evenly spaced steps of the T (Nichol & Dhariwal 2021, section 4)."""
    steps = diffusion.num_timesteps if steps is None else steps
    return ancestral(model, diffusion.respace(steps), shape, generator, progress=progress, on_step=on_step)


@torch.no_grad()
def ddim(model, diffusion: GaussianDiffusion, shape: tuple[int, ...], generator: Generator = None,
         steps: int | None = None, progress: bool = False, eta: float = 0.0, on_step=None) -> Tensor:
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
        if on_step is not None:
            on_step(int(t[0]), x, x_0)
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def dpm_solver(model, diffusion: GaussianDiffusion, shape: tuple[int, ...], generator: Generator = None,
               steps: int | None = None, progress: bool = False, on_step=None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Algorithm 2): the probability-flow ODE solved in
    lambda = log(alpha / sigma) with the data prediction x_theta and a second-order multistep correction.

    One network call per step, at `steps` evenly spaced timesteps t_1 > ... > t_K (alpha_t = sqrt(alpha_bar_t),
    sigma_t = sqrt(1 - alpha_bar_t)). With h_i = lambda_{t_i} - lambda_{t_(i-1)} and r_i = h_(i-1) / h_i:
        D_i = (1 + 1 / (2 r_i)) x_theta(t_(i-1)) - 1 / (2 r_i) x_theta(t_(i-2))   (D_1 = x_theta(t_0): first order)
        x_{t_i} = (sigma_{t_i} / sigma_{t_(i-1)}) x_{t_(i-1)} - alpha_{t_i} (exp(-h_i) - 1) D_i
    The last step goes to sigma = 0, where this is x_theta itself (first order, as "lower_order_final" does).
    Deterministic: `generator` only draws x_T. Works with any prediction and variance: only x_0 is used.
    """
    spaced = diffusion.respace(diffusion.num_timesteps if steps is None else steps)
    # float64 on the host: the step coefficients are Python floats, so reading them never syncs the device
    alpha_bar = torch.cumprod(1.0 - spaced.betas64, 0)
    alpha, sigma = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
    lam = (alpha / sigma).log()  # (K,) lambda at each kept step
    x = randn(shape, generator, spaced.betas.device)
    prev_x0, prev_h = None, None
    for t in _timesteps(spaced, shape, progress):
        i = int(t[0])
        x_0, _ = spaced.denoise(model, x, t)
        if i == 0:
            if on_step is not None:
                on_step(0, x_0, x_0)
            return x_0.clamp(-1.0, 1.0)
        h = (lam[i - 1] - lam[i]).item()
        half_inv_r = 0.0 if prev_h is None else h / (2 * prev_h)  # 1 / (2 r_i)
        d = x_0 if prev_x0 is None else (1 + half_inv_r) * x_0 - half_inv_r * prev_x0
        x = (sigma[i - 1] / sigma[i]).item() * x - (alpha[i - 1] * math.expm1(-h)).item() * d
        prev_x0, prev_h = x_0, h
        if on_step is not None:
            on_step(i, x, x_0)
    return x.clamp(-1.0, 1.0)


SAMPLERS = {"ancestral": ancestral, "respaced": respaced, "ddim": ddim, "dpm_solver": dpm_solver,
            "heun": karras.heun, "edm": karras.edm}
EDM_SAMPLERS = ("heun", "edm")  # the samplers of a continuous sigma: the only ones an EDM checkpoint has


def check_steps(name: str, steps, num_timesteps: int) -> None:
    """Raise one clear line when sampler `name` cannot run `steps` steps of a T-step diffusion (None: all T)."""
    if name == "ancestral" and steps not in (None, num_timesteps):
        raise ConfigError(
            f"the ancestral sampler runs all T={num_timesteps} steps, got sampling_steps={steps}: "
            "use sampler=respaced, ddim or dpm_solver for fewer steps"
        )
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_timesteps):
        raise ConfigError(f"sampling_steps={steps!r} must be an integer between 1 and T={num_timesteps}")


def default_steps(name: str, T: int) -> int:
    """The steps sampler `name` takes for sampling_steps=null: all T, or Karras et al.'s 18 for EDM's."""
    return karras.DEFAULT_STEPS if name in EDM_SAMPLERS else T


def network_calls(name: str, steps: int | None, T: int | None) -> int:
    """Network evaluations per sample of sampler `name` with `steps` (None: its default) on a T-step diffusion:
    T for the full chain, K for the K-step DDPM samplers, 2N - 1 for EDM's N-step Heun samplers (the last step,
    to sigma = 0, is a single Euler evaluation)."""
    steps = default_steps(name, T) if steps is None or name == "ancestral" else steps
    return 2 * steps - 1 if name in EDM_SAMPLERS else steps


def check_sampler(name: str, steps, diffusion, options: dict | None = None) -> None:
    """Raise one clear line, before any network call, when sampler `name` cannot run `steps` (with `options`)
    on `diffusion`: an unknown name, a DDPM sampler on an EDM checkpoint, steps or an option out of range, or a
    checkpoint whose noise levels an EDM sampler cannot map."""
    from ddpmlab.diffusion.denoisers import as_denoiser
    from ddpmlab.diffusion.edm import EDMDiffusion

    get_sampler(name)
    if isinstance(diffusion, EDMDiffusion) and name not in EDM_SAMPLERS:
        raise ConfigError(f"sampler={name} is a discrete-time DDPM sampler, and this is an EDM checkpoint (diffusion="
                          "edm, a continuous sigma): use sampler=heun or sampler=edm")
    if name not in EDM_SAMPLERS:
        check_steps(name, steps, diffusion.num_timesteps)
        return
    parameters = inspect.signature(SAMPLERS[name]).parameters
    settings = {k: p.default for k, p in parameters.items() if p.default is not inspect.Parameter.empty}
    settings = {**settings, **{k: v for k, v in (options or {}).items() if k in parameters}}
    settings = {k: v for k, v in settings.items() if k in inspect.signature(karras.check_options).parameters
                and k != "steps"}
    karras.check_options(steps, **settings)
    karras.noise_levels(as_denoiser(None, diffusion), 1, settings["rho"], settings["sigma_min"], settings["sigma_max"])


def get_sampler(name: str, **options):
    """The sampler registered under `name`, with options (DDIM's `eta`) bound."""
    if name not in SAMPLERS:
        raise ConfigError(f"sampler={name!r} is unknown: choose one of {', '.join(SAMPLERS)}")
    return functools.partial(SAMPLERS[name], **options) if options else SAMPLERS[name]
