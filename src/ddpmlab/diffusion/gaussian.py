"""Gaussian diffusion: the forward process q, its posterior, the model's p and the L_simple loss.

The math of Ho et al. 2020 (arXiv 2006.11239) in the paper's names. It knows nothing of the
network: `model` is any callable `model(x_t, t) -> output` with output of x_t's shape.
Timestep indices are 0-based: index i here is the paper's t = i + 1.
"""

import torch
from torch import Tensor, nn

from ddpmlab.errors import ConfigError

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large")


def _gather(table: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """table[t] shaped to broadcast against x: (T,) gathered at (B,) -> (B, 1, ..., 1)."""
    return table[t].view(-1, *([1] * (x.dim() - 1)))


class GaussianDiffusion(nn.Module):
    """Diffusion tables for one beta schedule, held as float32 buffers computed in float64.

    Args:
        betas: (T,) float64 schedule beta_1..beta_T.
        prediction: what the network outputs: `eps` (Ho et al. eq. 11), `x0`, or `v`
            (Salimans & Ho 2022, v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0).
        variance: the reverse variance sigma_t^2: `fixed_small` = beta-tilde_t (eq. 7) or
            `fixed_large` = beta_t (section 3.2; at t=1 beta-tilde_2 is used, as in Nichol & Dhariwal 2021,
            so that the decoder's log-likelihood is not ruined by a tiny beta_1).
        timestep_map: for a respaced diffusion, the original index of each kept step; the network is
            always called with original indices.
    """

    def __init__(
        self,
        betas: Tensor,
        prediction: str = "eps",
        variance: str = "fixed_large",
        timestep_map: Tensor | None = None,
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ConfigError(f"diffusion.prediction={prediction!r} is unknown: choose one of {', '.join(PREDICTIONS)}")
        if variance not in VARIANCES:
            raise ConfigError(f"diffusion.variance={variance!r} is unknown: choose one of {', '.join(VARIANCES)}")
        self.prediction = prediction
        self.variance = variance
        betas = torch.as_tensor(betas, dtype=torch.float64)
        self.betas64 = betas  # kept in float64 (not a buffer) so respacing stays exact
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta-tilde_t I): Ho et al. eq. 6-7.
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # beta-tilde_1 = 0: its log is replaced by log beta-tilde_2 (only ever used at t=1 as a decoder scale).
        posterior_log_variance = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        large_variance = torch.cat([posterior_variance[1:2], betas[1:]])
        tables = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_log_variance,
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
            "model_variance": posterior_variance if variance == "fixed_small" else large_variance,
            "model_log_variance": posterior_log_variance if variance == "fixed_small" else large_variance.log(),
        }
        for name, table in tables.items():
            self.register_buffer(name, table.float(), persistent=False)
        if timestep_map is None:
            timestep_map = torch.arange(self.num_timesteps)
        self.register_buffer("timestep_map", timestep_map.long(), persistent=False)

    # ---- forward process ------------------------------------------------------------------------

    def q_mean_variance(self, x_0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (eq. 4)."""
        mean = _gather(self.sqrt_alphas_cumprod, t, x_0) * x_0
        variance = _gather(1.0 - self.alphas_cumprod, t, x_0).expand_as(x_0)
        return mean, variance, variance.log()

    def q_sample(self, x_0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) as sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (eq. 4)."""
        return _gather(self.sqrt_alphas_cumprod, t, x_0) * x_0 + _gather(self.sqrt_one_minus_alphas_cumprod, t, x_0) * eps

    def q_posterior_mean_variance(self, x_0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (eq. 6-7)."""
        mean = _gather(self.posterior_mean_coef1, t, x_t) * x_0 + _gather(self.posterior_mean_coef2, t, x_t) * x_t
        variance = _gather(self.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = _gather(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ---- parameterisations ----------------------------------------------------------------------

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), eq. 4 solved for x_0."""
        return _gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x_0: Tensor) -> Tensor:
        """eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t), eq. 4 solved for eps."""
        return (x_t - _gather(self.sqrt_alphas_cumprod, t, x_t) * x_0) / _gather(self.sqrt_one_minus_alphas_cumprod, t, x_t)

    def predict_x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x_0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v (Salimans & Ho 2022, section 4)."""
        return _gather(self.sqrt_alphas_cumprod, t, x_t) * x_t - _gather(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v

    def training_target(self, x_0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """What the network regresses onto for the configured prediction type."""
        if self.prediction == "eps":
            return eps
        if self.prediction == "x0":
            return x_0
        return _gather(self.sqrt_alphas_cumprod, t, x_0) * eps - _gather(self.sqrt_one_minus_alphas_cumprod, t, x_0) * x_0

    def model_x0_eps(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The network's output turned into its estimates of (x_0, eps)."""
        if self.prediction == "eps":
            return self.predict_x0_from_eps(x_t, t, model_output), model_output
        x_0 = model_output if self.prediction == "x0" else self.predict_x0_from_v(x_t, t, model_output)
        return x_0, self.predict_eps_from_x0(x_t, t, x_0)

    # ---- reverse process ------------------------------------------------------------------------

    def p_mean_variance(self, model, x_t: Tensor, t: Tensor, clip_denoised: bool = True) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I): mu_theta is the posterior mean at the model's x_0 (eq. 6, 11).

        With clip_denoised the x_0 estimate is clipped to the data range [-1, 1] first, as in Ho et al.'s sampler.
        """
        model_output = model(x_t, self.timestep_map[t])
        pred_x0, pred_eps = self.model_x0_eps(model_output, x_t, t)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return {
            "mean": mean,
            "variance": _gather(self.model_variance, t, x_t).expand_as(x_t),
            "log_variance": _gather(self.model_log_variance, t, x_t).expand_as(x_t),
            "pred_x0": pred_x0,
            "pred_eps": pred_eps,
        }

    def p_sample(self, model, x_t: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One ancestral step x_{t-1} = mu_theta + sigma_t z, with no noise at the last step (Algorithm 2)."""
        out = self.p_mean_variance(model, x_t, t)
        z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        nonzero = (t != 0).to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        return out["mean"] + nonzero * (0.5 * out["log_variance"]).exp() * z

    # ---- training -------------------------------------------------------------------------------

    def training_losses(self, model, x_0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """L_simple per example: mean over pixels of ||target - model(x_t, t)||^2 (Ho et al. eq. 14).

        For prediction=eps this is exactly eq. 14; for x0 and v the same MSE on that target. Shape (B,).
        """
        x_t = self.q_sample(x_0, t, eps)
        model_output = model(x_t, self.timestep_map[t])
        target = self.training_target(x_0, t, eps)
        return (model_output.float() - target).pow(2).flatten(1).mean(1)

    # ---- respacing ------------------------------------------------------------------------------

    def respace(self, steps: int) -> "GaussianDiffusion":
        """A diffusion over `steps` evenly spaced of the T steps (Nichol & Dhariwal 2021, section 4).

        Keeps alpha_bar at the chosen steps S_1 < ... < S_K and sets beta_i = 1 - alpha_bar_{S_i} / alpha_bar_{S_{i-1}};
        the network still sees the original indices through timestep_map.
        """
        if not isinstance(steps, int) or not 1 <= steps <= self.num_timesteps:
            raise ConfigError(
                f"sampling_steps={steps!r} must be an integer between 1 and T={self.num_timesteps}"
            )
        kept = torch.linspace(0, self.num_timesteps - 1, steps, dtype=torch.float64).round().long()
        alphas_cumprod = torch.cumprod(1.0 - self.betas64, 0)[kept]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        respaced = GaussianDiffusion(
            1.0 - alphas_cumprod / prev, self.prediction, self.variance, timestep_map=self.timestep_map.cpu()[kept]
        )
        return respaced.to(self.betas.device)
