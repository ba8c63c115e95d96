"""Gaussian diffusion: the forward process q, its posterior, the model's p and the L_simple loss.

The math of Ho et al. 2020 (arXiv 2006.11239) in the paper's names. It knows nothing of the
network: `model` is any callable `model(x_t, t) -> output` with output of x_t's shape.
Timestep indices are 0-based: index i here is the paper's t = i + 1.
"""

import math

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ddpmlab.diffusion.losses import discretized_gaussian_log_likelihood, normal_kl
from ddpmlab.diffusion.noise import Generator, randint, randn
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

    def denoise(self, model, x_t: Tensor, t: Tensor, clip_denoised: bool = True) -> tuple[Tensor, Tensor]:
        """The network's (x_0, eps) at x_t; with clip_denoised, x_0 is clipped to [-1, 1] and eps made consistent."""
        pred_x0, pred_eps = self.model_x0_eps(model(x_t, self.timestep_map[t]), x_t, t)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
            pred_eps = self.predict_eps_from_x0(x_t, t, pred_x0)
        return pred_x0, pred_eps

    def p_mean_variance(self, model, x_t: Tensor, t: Tensor, clip_denoised: bool = True) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I): mu_theta is the posterior mean at the model's x_0 (eq. 6, 11).

        With clip_denoised the x_0 estimate is clipped to the data range [-1, 1] first, as in Ho et al.'s sampler.
        """
        pred_x0, pred_eps = self.denoise(model, x_t, t, clip_denoised)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return {
            "mean": mean,
            "variance": _gather(self.model_variance, t, x_t).expand_as(x_t),
            "log_variance": _gather(self.model_log_variance, t, x_t).expand_as(x_t),
            "pred_x0": pred_x0,
            "pred_eps": pred_eps,
        }

    def p_sample(self, model, x_t: Tensor, t: Tensor, generator: Generator = None) -> Tensor:
        """One ancestral step x_{t-1} = mu_theta + sigma_t z, with no noise at the last step (Algorithm 2)."""
        out = self.p_mean_variance(model, x_t, t)
        z = randn(x_t.shape, generator, x_t.device)
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

    # ---- the variational bound (Ho et al. eq. 5), in bits per dimension -----------------------

    def prior_bpd(self, x_0: Tensor) -> Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)), per example, in bits/dim. Shape (B,)."""
        t = torch.full((x_0.shape[0],), self.num_timesteps - 1, device=x_0.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x_0, t)
        kl = normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(log_variance))
        return kl.flatten(1).mean(1) / math.log(2.0)

    def vb_terms_bpd(self, model, x_0: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = True) -> Tensor:
        """The bound's term at each example's t, in bits/dim. Shape (B,).

        t > 0 (paper's t >= 2): L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)).
        t = 0 (paper's t = 1):  L_0 = -log p(x_0 | x_1), the discretized Gaussian decoder (eq. 13).
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_0, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]).flatten(1).mean(1)
        decoder_nll = -discretized_gaussian_log_likelihood(x_0, out["mean"], 0.5 * out["log_variance"]).flatten(1).mean(1)
        return torch.where(t == 0, decoder_nll, kl) / math.log(2.0)

    @torch.no_grad()
    def calc_bpd_loop(self, model, x_0: Tensor, generator: Generator = None,
                      clip_denoised: bool = True, progress: bool = False) -> dict[str, Tensor]:
        """The full bound L = L_T + sum_t L_{t-1} + L_0 for each example, in bits/dim, over every t.

        Returns total (B,), prior = L_T (B,), and terms (B, T) with terms[:, 0] = L_0 and terms[:, i] = L_i.
        """
        terms = torch.zeros(x_0.shape[0], self.num_timesteps, device=x_0.device)
        for i in tqdm(reversed(range(self.num_timesteps)), total=self.num_timesteps, disable=not progress,
                      desc="bound", leave=False):
            t = torch.full((x_0.shape[0],), i, device=x_0.device, dtype=torch.long)
            eps = randn(x_0.shape, generator, x_0.device)
            terms[:, i] = self.vb_terms_bpd(model, x_0, self.q_sample(x_0, t, eps), t, clip_denoised)
        prior = self.prior_bpd(x_0)
        return {"total": terms.sum(1) + prior, "prior": prior, "terms": terms}

    @torch.no_grad()
    def estimate_bpd(self, model, x_0: Tensor, num_timesteps: int, generator: Generator = None,
                     clip_denoised: bool = True) -> Tensor:
        """An unbiased estimate of each example's bound from K timesteps drawn uniformly: L_T + T mean_k L_{t_k}.

        Shape (B,), bits/dim. Its mean over examples estimates the NLL bound; their spread gives the standard error.
        """
        t = randint(self.num_timesteps, (num_timesteps, x_0.shape[0]), generator, x_0.device)  # (K, B)
        terms = torch.stack([
            self.vb_terms_bpd(model, x_0, self.q_sample(x_0, t_k, randn(x_0.shape, generator, x_0.device)), t_k,
                              clip_denoised)
            for t_k in t
        ])  # (K, B)
        return self.prior_bpd(x_0) + self.num_timesteps * terms.mean(0)

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
