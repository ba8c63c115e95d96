"""EDM (Karras et al. 2022, arXiv 2206.00364): a denoiser D(x; sigma) trained in sigma space over the same U-Net.

The data is noised as x = x_0 + sigma eps (no scaling: EDM's s(t) = 1, sigma(t) = t), and the network F is wrapped
by the preconditioning of Table 1 (eq. 7):

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)      c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in = 1 / sqrt(sigma^2 + sigma_data^2)                c_noise = ln(sigma) / 4

trained with lambda(sigma) ||D(x_0 + sigma eps; sigma) - x_0||^2, lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
(eq. 2 and Table 1; lambda c_out^2 = 1, so the network's own target has unit weight, eq. 8), ln sigma ~
N(P_mean, P_std^2).

It takes the place of GaussianDiffusion in the LightningModule, so its methods have the same names and shapes:
`num_timesteps` is the number N of equal-probability strata of the training noise distribution that the timestep
sampler draws from (a uniform t and a uniform offset inside its stratum give exactly the log-normal, by the
inverse CDF; the importance sampler weights strata as it weights t), and the bound (`estimate_bpd`,
`bound_from_draws`) is the continuous-time variational bound of the reverse SDE (Kingma et al. 2021, "VDM",
arXiv 2107.00630, eq. 17 and appendix; Song et al. 2021, arXiv 2101.09258, Theorem 1) in bits/dim, so val/bpd and
`nll_estimate` exist for EDM runs too. The samplers (ddpmlab.diffusion.karras) and the exact likelihood
(ddpmlab.diffusion.likelihood) reach the network through `denoise`.
"""

import math

import torch
from torch import Tensor, nn

from ddpmlab.diffusion.guidance import drop_labels
from ddpmlab.diffusion.losses import discretized_gaussian_log_likelihood
from ddpmlab.diffusion.noise import Generator, randint, randn
from ddpmlab.errors import ConfigError


def uniform(shape: tuple[int, ...], generator: Generator = None, device=None) -> Tensor:
    """Uniforms in (0, 1) of `shape` (examples along the LAST dimension, as noise.randint), float64: 24-bit
    midpoints (k + 1/2) / 2^24, from torch's generator or an ExampleNoise's per-example stream."""
    return (randint(2**24, shape, generator, device).double() + 0.5) / 2**24


class EDMDiffusion(nn.Module):
    """EDM's preconditioning, training loss and noise distribution (Karras et al. 2022, Table 1, "Ours").

    Args:
        sigma_data: the data's standard deviation the preconditioning assumes (EDM: 0.5).
        P_mean, P_std: ln sigma ~ N(P_mean, P_std^2) in training (EDM: -1.2, 1.2).
        sigma_min, sigma_max: the noise levels the model is defined on: the samplers' range and the bound's and
            the likelihood's ends (EDM: 0.002, 80).
        strata: N, the equal-probability strata of the training noise distribution the timestep sampler draws
            (`num_timesteps`); the distribution itself is exactly log-normal for any N.
        cond_drop_prob: a class-conditional network's label dropout to "no class" (as GaussianDiffusion's).
    """

    def __init__(self, sigma_data: float = 0.5, P_mean: float = -1.2, P_std: float = 1.2, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, strata: int = 1000, cond_drop_prob: float = 0.0):
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ConfigError(f"diffusion.sigma_min={sigma_min} must be positive and below diffusion.sigma_max="
                              f"{sigma_max}: EDM uses 0.002 and 80")
        for key, value in (("sigma_data", sigma_data), ("P_std", P_std)):
            if not value > 0:
                raise ConfigError(f"diffusion.{key} must be positive, got {value}")
        self.sigma_data, self.P_mean, self.P_std = sigma_data, P_mean, P_std
        self.sigma_min, self.sigma_max, self.num_timesteps = sigma_min, sigma_max, strata
        if not (isinstance(cond_drop_prob, (int, float)) and 0 <= cond_drop_prob < 1):
            raise ConfigError(f"diffusion.cond_drop_prob must be in [0, 1), got {cond_drop_prob!r}: Ho & Salimans "
                              "use 0.1 or 0.2")
        self.cond_drop_prob = cond_drop_prob
        # follows .to(device) as GaussianDiffusion's tables do: a sampler draws its first noise where this is
        self.register_buffer("sigma_range", torch.tensor([sigma_min, sigma_max]), persistent=False)

    def drop_labels(self, y: Tensor | None, null_label: int) -> Tensor | None:
        """Label dropout at cond_drop_prob (ddpmlab.diffusion.guidance.drop_labels)."""
        return drop_labels(y, null_label, self.cond_drop_prob)

    def output_channels(self, channels: int) -> int:
        """The network outputs F, one value per pixel."""
        return channels

    # ---- the preconditioned denoiser (Table 1, eq. 7) ----------------------------------------------------

    def preconditioning(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) at sigma (B,): the first three shaped (B, 1, 1, 1), c_noise (B,)."""
        s2, d2 = sigma.double() ** 2, self.sigma_data**2
        view = (-1, 1, 1, 1)
        c_skip = (d2 / (s2 + d2)).view(view)
        c_out = (sigma.double() * self.sigma_data / (s2 + d2).sqrt()).view(view)
        c_in = (1.0 / (s2 + d2).sqrt()).view(view)
        return c_skip.float(), c_out.float(), c_in.float(), (sigma.double().log() / 4).float()

    def denoise(self, model, x: Tensor, sigma: Tensor, clip_denoised: bool = False,
                **model_kwargs) -> tuple[Tensor, Tensor]:
        """(D(x; sigma), (x - D) / sigma): the denoised image and the noise it implies (eq. 7), for sigma (B,).

        Extra keyword arguments go to the network unchanged (a class label). With clip_denoised, D is clipped to
        the data range [-1, 1] (as the DDPM samplers here clip x_0)."""
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        x_0 = c_skip * x + c_out * model(c_in * x, c_noise, **model_kwargs).float()
        if clip_denoised:
            x_0 = x_0.clamp(-1.0, 1.0)
        return x_0, (x - x_0) / sigma.view(-1, 1, 1, 1)

    # ---- training (eq. 2, Table 1) ---------------------------------------------------------------------------

    def sigma_from_strata(self, t: Tensor, offset: Tensor) -> Tensor:
        """sigma = exp(P_mean + P_std Phi^-1((t + offset) / N)), t in {0..N-1} and offset in [0, 1): the log-normal
        by its inverse CDF, t picking one of N equal-probability strata. (B,) float32."""
        u = ((t.double() + offset.double()) / self.num_timesteps).clamp(1e-12, 1 - 1e-12)
        return (self.P_mean + self.P_std * torch.special.ndtri(u)).exp().float()

    def lognormal_density(self, sigma: Tensor) -> Tensor:
        """The training distribution's density of ln sigma: N(ln sigma; P_mean, P_std^2). (B,)"""
        z = (sigma.double().log() - self.P_mean) / self.P_std
        return (torch.exp(-0.5 * z**2) / (self.P_std * math.sqrt(2 * math.pi))).float()

    def training_losses(self, model, x_0: Tensor, t: Tensor, eps: Tensor, **model_kwargs) -> dict[str, Tensor]:
        """EDM's loss per example, (B,) each: `loss` = `mse` = lambda(sigma) ||D(x_0 + sigma eps; sigma) - x_0||^2
        averaged over pixels (eq. 2 with Table 1's lambda), sigma from stratum t (an offset from the global RNG);
        `vb`, the continuous bound's diffusion term from this one draw (see bound_from_draws), detached."""
        sigma = self.sigma_from_strata(t, torch.rand(t.shape, device=t.device, dtype=torch.float64))
        x_0_hat, _ = self.denoise(model, x_0 + sigma.view(-1, 1, 1, 1) * eps, sigma, **model_kwargs)
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        error = (x_0_hat - x_0).pow(2).flatten(1)
        mse = weight * error.mean(1)
        return {"loss": mse, "mse": mse.detach(), "vb": self._diffusion_term(error.detach().sum(1), sigma, x_0)}

    # ---- the continuous-time bound, in bits/dim ----------------------------------------------------------------

    def _diffusion_term(self, error: Tensor, sigma: Tensor, x_0: Tensor) -> Tensor:
        """||D - x_0||^2 / sigma^2 over the training density of ln sigma, in bits/dim: one draw's unbiased estimate
        of the bound's diffusion term (below), zero outside [sigma_min, sigma_max]. (B,)"""
        inside = (sigma >= self.sigma_min) & (sigma <= self.sigma_max)
        value = error / sigma**2 / self.lognormal_density(sigma)
        return torch.where(inside, value, torch.zeros_like(value)) / (x_0[0].numel() * math.log(2.0))

    def prior_bpd(self, x_0: Tensor) -> Tensor:
        """KL(N(x_0, sigma_max^2 I) || N(0, sigma_max^2 I)) = ||x_0||^2 / (2 sigma_max^2), in bits/dim. (B,)"""
        return x_0.pow(2).flatten(1).mean(1) / (2 * self.sigma_max**2 * math.log(2.0))

    def decoder_bpd(self, model, x_0: Tensor, eps: Tensor, clip_denoised: bool = True) -> Tensor:
        """-log p(x_0 | z_0) at z_0 = x_0 + sigma_min eps in bits/dim: the discretized Gaussian of Ho et al. eq. 13
        (256 bins, open edge bins) with mean D(z_0; sigma_min) and standard deviation sigma_min. (B,)"""
        sigma = torch.full((len(x_0),), self.sigma_min, device=x_0.device)
        mean, _ = self.denoise(model, x_0 + self.sigma_min * eps, sigma, clip_denoised)
        log_scale = torch.full_like(mean, math.log(self.sigma_min))
        return -discretized_gaussian_log_likelihood(x_0, mean, log_scale).flatten(1).mean(1) / math.log(2.0)

    @torch.no_grad()
    def estimate_bpd(self, model, x_0: Tensor, num_timesteps: int, generator: Generator = None,
                     clip_denoised: bool = True) -> Tensor:
        """Each example's continuous-time bound on -log2 P(x_0) per dim, estimated from K = num_timesteps noise
        levels: prior + decoder + diffusion term, with (VDM eq. 17 in sigma: SNR = 1 / sigma^2)

            diffusion term = int_{sigma_min}^{sigma_max} E_eps ||D(x_0 + sigma eps; sigma) - x_0||^2 / sigma^3 d sigma
                           = int E_eps ||D - x_0||^2 / sigma^2 d ln sigma,

        the integral over ln sigma split into K equal strata, one ln sigma drawn uniformly in each and weighted by
        the stratum's width: unbiased. Prior and decoder (one network call) are exact given their noise; K + 1
        network calls per example. The bound of the reverse SDE (the limit of EDM's stochastic sampler), as
        Ho et al.'s is of their T-step chain, so the two compare. Shape (B,)."""
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        width = (hi - lo) / num_timesteps
        decoder = self.decoder_bpd(model, x_0, randn(x_0.shape, generator, x_0.device), clip_denoised)
        offsets = uniform((num_timesteps, x_0.shape[0]), generator, x_0.device)  # (K, B)
        total = self.prior_bpd(x_0) + decoder
        for k in range(num_timesteps):
            sigma = (lo + (k + offsets[k]) * width).exp().float()
            noisy = x_0 + sigma.view(-1, 1, 1, 1) * randn(x_0.shape, generator, x_0.device)
            x_0_hat, _ = self.denoise(model, noisy, sigma, clip_denoised)
            error = (x_0_hat - x_0).pow(2).flatten(1).sum(1)
            total = total + width * error / sigma**2 / (x_0[0].numel() * math.log(2.0))
        return total

    def bound_from_draws(self, model, x_0: Tensor, eps: Tensor, t: Tensor, weights: Tensor, vb: Tensor) -> Tensor:
        """Each example's bound from a training batch's draws, bits/dim: prior + decoder (exact, one more network call
        at the batch's eps, no gradient) + w_t vb, vb the diffusion term of its one sigma over that sigma's training
        density (training_losses) and w_t the timestep sampler's weight: an unbiased estimate (heavy-tailed: a
        sigma far below P_mean has a small density and a large term). (B,)"""
        with torch.no_grad():
            exact = self.prior_bpd(x_0) + self.decoder_bpd(model, x_0, eps, clip_denoised=False)
        return exact + weights * vb.detach()
