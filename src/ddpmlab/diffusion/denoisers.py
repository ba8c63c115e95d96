"""Any checkpoint as a denoiser D(x; sigma) in sigma space: the one interface of EDM's samplers and the ODE likelihood.

In sigma space the data is noised as x = x_0 + sigma eps (Karras et al. 2022, arXiv 2206.00364, section 2). A
discrete-time DDPM/iDDPM diffusion is the same process scaled (their Table 1, VP column): its x_t = sqrt(alpha_bar_t)
x_0 + sqrt(1 - alpha_bar_t) eps is sqrt(alpha_bar_t) (x_0 + sigma_t eps) with

    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t),   so x = x_t / sqrt(alpha_bar_t) and alpha_bar = 1 / (1 + sigma^2),

and D(x; sigma_t) is the network's x_0 estimate at x_t = sqrt(alpha_bar_t) x and its own t. A denoiser has:
    __call__(x, sigma) -> D           sigma a float (every example) or a (B,) tensor
    sigma_min, sigma_max               the noise levels it is defined on
    round_sigma(sigma) -> sigma        the nearest level it was trained at (identity for a continuous model)
    check_between_levels()             one line if it cannot be called between those levels (the ODE needs it)
    prior_variance                     the variance of its prior at sigma_max, per pixel
    typical_ode_evaluations            about how many evaluations the ODE likelihood takes an image (for estimates)
"""

import math

import torch
from torch import Tensor

from ddpmlab.errors import ConfigError


# x_0 from a network's output at x_t, for any alpha_bar (B, 1, 1, 1): GaussianDiffusion's formulas (eq. 4 solved for
# x_0; Salimans & Ho 2022 for v) where alpha_bar is not one of its table's entries.
X0_FROM_OUTPUT = {
    "eps": lambda output, x_t, alpha_bar: (x_t - (1 - alpha_bar).sqrt() * output) / alpha_bar.sqrt(),
    "x0": lambda output, x_t, alpha_bar: output,
    "v": lambda output, x_t, alpha_bar: alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * output,
}


class DiscreteDenoiser:
    """A GaussianDiffusion and its network `model(x_t, t)` as D(x; sigma).

    Trained levels: sigma_t for t = 0..T-1 (0-based), increasing. At a trained level, D is exactly the network at
    that t, through `diffusion.denoise` (every prediction type, learned variances, clipping as configured).

    Between two trained levels (the ODE likelihood's adaptive solver goes anywhere): the t of sigma is read off
    the schedule with -log alpha_bar = log(1 + sigma^2) linear in t between trained points, which is the VP SDE
    whose beta(s) is piecewise constant, T (-log(1 - beta_i)) on the i-th of T equal intervals of s in [0, 1] and
    so matches alpha_bar at every trained t. The network is called at that fractional t (its sinusoidal
    embedding takes any real t, as Song et al. 2021 feed 999 s to their discrete DDPM networks) and its output
    read with that alpha_bar. A sampler never goes there: its schedule is `round_sigma`ed first, so each step
    uses exactly a sigma the network was trained at.

    `round_sigma`: the nearest trained level in log sigma (ties to the lower one).
    """

    # Between its trained t the network varies at its time embedding's highest frequency (a radian per step of t):
    # 839 evaluations an image at rtol = atol = 1e-5 on an early default-recipe network (docs/likelihood.md).
    typical_ode_evaluations = 800

    def __init__(self, model, diffusion, clip_denoised: bool = True):
        alpha_bar = torch.cumprod(1.0 - diffusion.betas64, 0)
        self.model, self.diffusion, self.clip_denoised = model, diffusion, clip_denoised
        self.sigmas = ((1.0 - alpha_bar) / alpha_bar).sqrt()  # (T,) float64, increasing
        if not bool(torch.isfinite(self.sigmas).all()) or not bool((self.sigmas > 0).all()):
            raise ConfigError("the checkpoint's noise levels sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) are not "
                              "all finite and positive: its schedule cannot be mapped to sigma")
        self.log_sigmas = self.sigmas.log()
        self.level_of = {s: i for i, s in enumerate(self.sigmas.tolist())}
        self.sigma_min, self.sigma_max = self.sigmas[0].item(), self.sigmas[-1].item()
        self.prior_variance = 1.0 + self.sigma_max**2  # the VP prior N(0, I) at x_T, in x = x_T / sqrt(alpha_bar_T)

    def check_between_levels(self) -> None:
        """Refuse, in one line, a network whose output has no x_0 between its trained noise levels."""
        if self.diffusion.prediction not in X0_FROM_OUTPUT:
            raise ConfigError(f"diffusion.prediction={self.diffusion.prediction} has no x_0 between the trained "
                              f"steps (only {', '.join(X0_FROM_OUTPUT)} do), which the ODE needs: evaluate it with "
                              "the bound (metrics=[nll]) and the samplers, which stay on trained noise levels")

    def round_sigma(self, sigma: float) -> float:
        """The trained level nearest to sigma in log sigma."""
        i = int(torch.searchsorted(self.log_sigmas, torch.tensor(math.log(sigma), dtype=torch.float64)))
        below, above = max(i - 1, 0), min(i, len(self.sigmas) - 1)
        pick = below if math.log(sigma) - self.log_sigmas[below] <= self.log_sigmas[above] - math.log(sigma) else above
        return self.sigmas[pick].item()

    def t_of(self, sigma: Tensor) -> Tensor:
        """The fractional 0-based t of each sigma (B,) (float64, clamped to the trained range): log(1 + sigma^2)
        interpolated linearly between the trained t."""
        g = torch.log1p(sigma.double().clamp(self.sigma_min, self.sigma_max) ** 2).cpu()
        table = torch.log1p(self.sigmas**2)
        if len(table) == 1:
            return torch.zeros_like(g)
        i = torch.searchsorted(table, g).clamp(1, len(table) - 1)
        return (i - 1) + (g - table[i - 1]) / (table[i] - table[i - 1])

    def __call__(self, x: Tensor, sigma) -> Tensor:
        if not isinstance(sigma, Tensor) and sigma in self.level_of:  # a trained level: the diffusion's own path
            t = torch.full((x.shape[0],), self.level_of[sigma], device=x.device, dtype=torch.long)
            x_t = x * (1.0 / math.sqrt(1.0 + sigma**2))
            return self.diffusion.denoise(self.model, x_t, t, self.clip_denoised)[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0]).clamp(self.sigma_min, self.sigma_max)
        t = self.t_of(sigma)
        mapped = self.diffusion.timestep_map.cpu().double()
        lower = t.floor().long().clamp(max=len(mapped) - 1)
        upper = (lower + 1).clamp(max=len(mapped) - 1)
        t_network = mapped[lower] + (t - lower) * (mapped[upper] - mapped[lower])  # respaced: original indices
        alpha_bar = (1.0 / (1.0 + sigma**2)).view(-1, 1, 1, 1).to(x.device)
        x_t = x.double() * alpha_bar.sqrt()
        output, _ = self.diffusion.split_output(self.model(x_t.float(), t_network.float().to(x.device)).float())
        self.check_between_levels()
        x_0 = X0_FROM_OUTPUT[self.diffusion.prediction](output.double(), x_t, alpha_bar).to(x.dtype)
        return x_0.clamp(-1.0, 1.0) if self.clip_denoised else x_0


class EDMDenoiser:
    """An EDMDiffusion and its network as D(x; sigma): the preconditioned network itself (eq. 7), at any sigma in
    [diffusion.sigma_min, diffusion.sigma_max]; the prior is EDM's N(0, sigma_max^2 I)."""

    typical_ode_evaluations = 150  # smooth in sigma by construction (c_noise = ln(sigma) / 4): 137 measured

    def __init__(self, model, diffusion, clip_denoised: bool = True):
        self.model, self.diffusion, self.clip_denoised = model, diffusion, clip_denoised
        self.sigma_min, self.sigma_max = diffusion.sigma_min, diffusion.sigma_max
        self.prior_variance = self.sigma_max**2

    def check_between_levels(self) -> None:
        """Every sigma is one it was trained at."""

    def round_sigma(self, sigma: float) -> float:
        return sigma

    def __call__(self, x: Tensor, sigma) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        return self.diffusion.denoise(self.model, x, sigma, self.clip_denoised)[0]


def as_denoiser(model, diffusion, clip_denoised: bool = True):
    """The sigma-space view of any checkpoint's (network, diffusion)."""
    from ddpmlab.diffusion.edm import EDMDiffusion

    kind = EDMDenoiser if isinstance(diffusion, EDMDiffusion) else DiscreteDenoiser
    return kind(model, diffusion, clip_denoised)
