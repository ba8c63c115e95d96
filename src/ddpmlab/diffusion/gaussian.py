"""Gaussian diffusion: the forward process q, its posterior, the model's p, the training losses and the bound.

The math of Ho et al. 2020 (arXiv 2006.11239) and Nichol & Dhariwal 2021 (arXiv 2102.09672, "iDDPM") in the
papers' names. It knows nothing of the network: `model` is any callable `model(x_t, t) -> output`, with output
of x_t's shape, or twice its channels when the variance is learned (`output_channels`).
Timestep indices are 0-based: index i here is the paper's t = i + 1.
"""

import math

import torch
from torch import Tensor, nn
from ddpmlab.progress import track

from ddpmlab.diffusion.guidance import drop_labels
from ddpmlab.diffusion.losses import discretized_gaussian_log_likelihood, normal_kl
from ddpmlab.diffusion.noise import Generator, randint, randn
from ddpmlab.errors import ConfigError

PREDICTIONS = ("eps", "x0", "v", "mean")
VARIANCES = ("fixed_small", "fixed_large", "learned", "learned_range")
LOSSES = ("simple", "vlb", "hybrid")
LOSS_WEIGHTINGS = ("none", "min_snr")


def _gather(table: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """table[t] shaped to broadcast against x: (T,) gathered at (B,) -> (B, 1, ..., 1)."""
    return table[t].view(-1, *([1] * (x.dim() - 1)))


def log_strata(n: int, strata: int) -> list[int]:
    """Edges 0 = e_0 < e_1 < ... < e_K = n of K = min(strata, n) strata of [0, n), evenly spaced in log(1 + e).

    e_k = (n + 1)^(k/K) - 1, rounded, then moved just enough that every stratum holds at least one index.
    """
    strata = min(strata, n)
    edges = [0]
    for k in range(1, strata + 1):
        edges.append(min(max(round((n + 1) ** (k / strata)) - 1, edges[-1] + 1), n - strata + k))
    return edges


def posterior_mean_coefs(betas: Tensor) -> tuple[Tensor, Tensor]:
    """(coef1, coef2) of q(x_{t-1} | x_t, x_0)'s mean coef1_t x_0 + coef2_t x_t (Ho et al. eq. 7), float64 (T,) each."""
    alphas_cumprod = torch.cumprod(1.0 - betas, 0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return (betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod))


class GaussianDiffusion(nn.Module):
    """Diffusion tables for one beta schedule, held as float32 buffers computed in float64.

    Args:
        betas: (T,) float64 schedule beta_1..beta_T.
        prediction: what the network outputs: `eps` (Ho et al. eq. 11), `x0`, `v`
            (Salimans & Ho 2022, v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0), or `mean`, the posterior
            mean mu~_t(x_t, x_0) of eq. 7 itself (Ho et al. section 3.2, the baseline of their Table 2).
        variance: the reverse variance sigma_t^2: `fixed_small` = beta-tilde_t (eq. 7) or
            `fixed_large` = beta_t (section 3.2; at t=1 beta-tilde_2 is used, as in Nichol & Dhariwal 2021,
            so that the decoder's log-likelihood is not ruined by a tiny beta_1); or learned by extra output
            channels: `learned` (the log variance itself) or `learned_range` (iDDPM eq. 15, an interpolation
            between log beta_t and log beta-tilde_t).
        loss: `simple` (an unweighted MSE on the prediction target: Ho et al. eq. 14 for eps, Table 2's
            ||mu~ - mu~_theta||^2 for mean), `vlb` (the bound's terms, Ho et al. eq. 5, iDDPM's L_vlb) or
            `hybrid` = L_simple + vlb_weight * L_vlb with the mean frozen in L_vlb (iDDPM eq. 16).
        vlb_weight: lambda of the hybrid loss (iDDPM: 0.001).
        loss_weighting: `none`, or `min_snr` (Hang et al. 2023): the MSE at t weighted so that it equals
            min(SNR_t, gamma) times the x_0 error, whatever the prediction target.
        min_snr_gamma: gamma of min_snr (Hang et al.: 5).
        timestep_map: for a respaced diffusion, the original index of each kept step; the network is
            always called with original indices.
        network_betas: for a respaced diffusion, the original schedule: a `mean` network outputs the posterior
            mean of the original one-step chain at its original index, whatever chain samples with it.
        cond_drop_prob: for a class-conditional network, the share of training examples whose label is
            replaced by "no class" (`drop_labels`; Ho & Salimans 2022: 0.1 or 0.2), which trains the
            unconditional model that classifier-free guidance needs; unused without labels.
    """

    def __init__(
        self,
        betas: Tensor,
        prediction: str = "eps",
        variance: str = "fixed_large",
        loss: str = "simple",
        vlb_weight: float = 0.001,
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
        timestep_map: Tensor | None = None,
        network_betas: Tensor | None = None,
        cond_drop_prob: float = 0.0,
    ):
        super().__init__()
        self._validate(prediction, variance, loss, loss_weighting, min_snr_gamma)
        if not (isinstance(cond_drop_prob, (int, float)) and 0 <= cond_drop_prob < 1):
            raise ConfigError(f"diffusion.cond_drop_prob must be in [0, 1), got {cond_drop_prob!r}: Ho & Salimans "
                              "use 0.1 or 0.2")
        self.cond_drop_prob = cond_drop_prob
        self.prediction, self.variance, self.loss = prediction, variance, loss
        self.vlb_weight, self.loss_weighting, self.min_snr_gamma = vlb_weight, loss_weighting, min_snr_gamma
        self.learns_variance = variance.startswith("learned")
        betas = torch.as_tensor(betas, dtype=torch.float64)
        self.betas64 = betas  # kept in float64 (not a buffer) so respacing stays exact
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta-tilde_t I): Ho et al. eq. 6-7.
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # beta-tilde_1 = 0: its log is replaced by log beta-tilde_2 (only ever used at t=1 as a decoder scale);
        # a one-step chain (a sampler respaced to 1 step) has no beta-tilde_2 and takes beta_1.
        first = posterior_variance[1:2] if len(betas) > 1 else betas[:1]
        posterior_log_variance = torch.log(torch.cat([first, posterior_variance[1:]]))
        large_variance = torch.cat([first, betas[1:]])
        snr = alphas_cumprod / (1.0 - alphas_cumprod)
        posterior_mean_coef1, posterior_mean_coef2 = posterior_mean_coefs(betas)
        if timestep_map is None:
            timestep_map = torch.arange(self.num_timesteps)
        # The eq. 7 coefficients of the chain the network was trained on, at each step's original index (the
        # mean parameterisation's output is read with these; a respaced chain has its own posterior).
        self.network_betas64 = betas if network_betas is None else torch.as_tensor(network_betas, dtype=torch.float64)
        network_coef1, network_coef2 = (coef[timestep_map] for coef in posterior_mean_coefs(self.network_betas64))
        tables = {
            "betas": betas,
            "log_betas": betas.log(),
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_log_variance,
            "posterior_mean_coef1": posterior_mean_coef1,
            "posterior_mean_coef2": posterior_mean_coef2,
            "network_mean_coef1": network_coef1,
            "network_mean_coef2": network_coef2,
            "model_log_variance": posterior_log_variance if variance == "fixed_small" else large_variance.log(),
            "mse_weight": self._mse_weights(snr, posterior_mean_coef1),
        }
        for name, table in tables.items():
            self.register_buffer(name, table.float(), persistent=False)
        self.register_buffer("timestep_map", timestep_map.long(), persistent=False)

    @staticmethod
    def _validate(prediction: str, variance: str, loss: str, loss_weighting: str, min_snr_gamma: float) -> None:
        for key, value, allowed in (("prediction", prediction, PREDICTIONS), ("variance", variance, VARIANCES),
                                    ("loss", loss, LOSSES), ("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)):
            if value not in allowed:
                raise ConfigError(f"diffusion.{key}={value!r} is unknown: choose one of {', '.join(allowed)}")
        learned = variance.startswith("learned")
        if learned and loss == "simple":
            raise ConfigError(f"diffusion.variance={variance} is trained only by the bound, which loss=simple leaves "
                              "out: use diffusion.loss=hybrid (or vlb)")
        if not learned and loss == "hybrid":
            raise ConfigError(f"diffusion.loss=hybrid trains the variance (its L_vlb term sees a frozen mean), but "
                              f"variance={variance} is fixed: use diffusion.variance=learned_range, or loss=simple|vlb")
        if loss_weighting == "min_snr" and loss == "vlb":
            raise ConfigError("diffusion.loss_weighting=min_snr weights the MSE term, which loss=vlb has not: "
                              "use loss=simple or hybrid, or loss_weighting=none")
        if not min_snr_gamma > 0:
            raise ConfigError(f"diffusion.min_snr_gamma must be positive, got {min_snr_gamma}")

    def _mse_weights(self, snr: Tensor, coef1: Tensor) -> Tensor:
        """Per-t weight of the MSE: min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x0, and
        min(SNR, gamma) / (SNR + 1) for v (Hang et al. 2023, eq. 7 and section 3.4); for mean, whose error is
        coef1_t times the x_0 error (eq. 7), min(SNR, gamma) / coef1_t^2. Ones without weighting."""
        if self.loss_weighting == "none":
            return torch.ones_like(snr)
        clipped = snr.clamp(max=self.min_snr_gamma)
        return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1.0),
                "mean": clipped / coef1**2}[self.prediction]

    def output_channels(self, channels: int) -> int:
        """The network's output channels for images of `channels`: twice as many when it also outputs the variance."""
        return 2 * channels if self.learns_variance else channels

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

    def predict_x0_from_mean(self, x_t: Tensor, t: Tensor, mean: Tensor) -> Tensor:
        """x_0 = (mu~ - coef2_t x_t) / coef1_t, eq. 7's posterior mean solved for x_0, with the coefficients of
        the network's own chain (coef1_1 = 1, coef2_1 = 0: at t = 1 the mean is x_0)."""
        return (mean - _gather(self.network_mean_coef2, t, x_t) * x_t) / _gather(self.network_mean_coef1, t, x_t)

    def training_target(self, x_0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """What the network regresses onto for the configured prediction type."""
        if self.prediction == "eps":
            return eps
        if self.prediction == "x0":
            return x_0
        if self.prediction == "mean":  # mu~_t(x_t, x_0), eq. 7, at x_t = q_sample(x_0, t, eps)
            return self.q_posterior_mean_variance(x_0, self.q_sample(x_0, t, eps), t)[0]
        return _gather(self.sqrt_alphas_cumprod, t, x_0) * eps - _gather(self.sqrt_one_minus_alphas_cumprod, t, x_0) * x_0

    def model_x0_eps(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The network's output turned into its estimates of (x_0, eps)."""
        if self.prediction == "eps":
            return self.predict_x0_from_eps(x_t, t, model_output), model_output
        x_0 = {"x0": lambda: model_output, "v": lambda: self.predict_x0_from_v(x_t, t, model_output),
               "mean": lambda: self.predict_x0_from_mean(x_t, t, model_output)}[self.prediction]()
        return x_0, self.predict_eps_from_x0(x_t, t, x_0)

    # ---- reverse process ------------------------------------------------------------------------

    def split_output(self, output: Tensor) -> tuple[Tensor, Tensor | None]:
        """The network's output as (prediction, variance values): (B, 2C, H, W) -> 2 x (B, C, H, W) when learned."""
        if not self.learns_variance:
            return output, None
        return output.chunk(2, dim=1)

    def p_log_variance(self, var_output: Tensor | None, x_t: Tensor, t: Tensor) -> Tensor:
        """log sigma_t^2 of p(x_{t-1} | x_t): a fixed table, the network's value (`learned`), or iDDPM eq. 15
        (`learned_range`): v log beta_t + (1 - v) log beta-tilde_t with the output o in [-1, 1] mapped to v = (o + 1) / 2.
        """
        if self.variance == "learned":
            return var_output
        if self.variance == "learned_range":
            frac = (var_output + 1.0) / 2.0
            return frac * _gather(self.log_betas, t, x_t) + (1.0 - frac) * _gather(self.posterior_log_variance_clipped, t, x_t)
        return _gather(self.model_log_variance, t, x_t).expand_as(x_t)

    def denoise(self, model, x_t: Tensor, t: Tensor, clip_denoised: bool = True) -> tuple[Tensor, Tensor]:
        """The network's (x_0, eps) at x_t; with clip_denoised, x_0 is clipped to [-1, 1] and eps made consistent."""
        prediction, _ = self.split_output(model(x_t, self.timestep_map[t]))
        return self._x0_eps(prediction, x_t, t, clip_denoised)

    def _x0_eps(self, prediction: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool) -> tuple[Tensor, Tensor]:
        pred_x0, pred_eps = self.model_x0_eps(prediction, x_t, t)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
            pred_eps = self.predict_eps_from_x0(x_t, t, pred_x0)
        return pred_x0, pred_eps

    def p_mean_variance(self, model, x_t: Tensor, t: Tensor, clip_denoised: bool = True) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I): mu_theta is the posterior mean at the model's x_0 (eq. 6, 11).

        With clip_denoised the x_0 estimate is clipped to the data range [-1, 1] first, as in Ho et al.'s sampler.
        For the `mean` parameterisation this is the network's output itself (up to rounding) on its own chain
        without clipping; clipped, or on a respaced chain, it goes through the x_0 the output implies, as every
        other parameterisation does.
        """
        return self.p_from_output(model(x_t, self.timestep_map[t]), x_t, t, clip_denoised)

    def p_from_output(self, output: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = True) -> dict[str, Tensor]:
        """p_mean_variance for a network output already computed (the training losses call the network once)."""
        prediction, var_output = self.split_output(output.float())
        pred_x0, pred_eps = self._x0_eps(prediction, x_t, t, clip_denoised)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        log_variance = self.p_log_variance(var_output, x_t, t)
        return {"mean": mean, "variance": log_variance.exp(), "log_variance": log_variance,
                "pred_x0": pred_x0, "pred_eps": pred_eps}

    def p_sample(self, model, x_t: Tensor, t: Tensor, generator: Generator = None) -> Tensor:
        """One ancestral step x_{t-1} = mu_theta + sigma_t z, with no noise at the last step (Algorithm 2)."""
        return self.p_sample_x0(model, x_t, t, generator)[0]

    def p_sample_x0(self, model, x_t: Tensor, t: Tensor, generator: Generator = None) -> tuple[Tensor, Tensor]:
        """p_sample's x_{t-1}, and the (clipped) x_0 prediction it was drawn around: Ho et al. eq. 15's x^_0."""
        out = self.p_mean_variance(model, x_t, t)
        z = randn(x_t.shape, generator, x_t.device)
        nonzero = (t != 0).to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        return out["mean"] + nonzero * (0.5 * out["log_variance"]).exp() * z, out["pred_x0"]

    # ---- training -------------------------------------------------------------------------------

    def training_losses(self, model, x_0: Tensor, t: Tensor, eps: Tensor) -> dict[str, Tensor]:
        """The configured loss per example, with its parts; every value has shape (B,).

        mse: mean over pixels of w_t ||target - prediction||^2 (Ho et al. eq. 14 for eps; w_t = 1 unless min_snr).
        vb:  the bound's term L_{t-1} (L_0 at t=1) in bits/dim, from the same `vb_terms_from_output` as the NLL.
        loss: `simple` = mse; `vlb` = T * vb, an unbiased one-sample estimate of L_vlb - L_T in bits/dim;
              `hybrid` = mse + lambda T vb with the mean frozen in vb (iDDPM eq. 16, section 3.1), so the
              bound trains only the variance channels.
        The network is called once. vb is always returned (detached unless it is trained): the importance
        timestep sampler learns from it and the logs show it.
        """
        x_t = self.q_sample(x_0, t, eps)
        output = model(x_t, self.timestep_map[t]).float()
        prediction, var_output = self.split_output(output)
        target = self.training_target(x_0, t, eps)
        mse = (prediction - target).pow(2).flatten(1).mean(1) * self.mse_weight[t]
        if self.loss == "hybrid":
            output = torch.cat([prediction.detach(), var_output], dim=1)  # stop-gradient on the mean
        elif self.loss == "simple":
            output = output.detach()
        vb = self.vb_terms_from_output(output, x_0, x_t, t, clip_denoised=False)
        loss = {"simple": mse, "vlb": self.num_timesteps * vb,
                "hybrid": mse + self.vlb_weight * self.num_timesteps * vb}[self.loss]
        return {"loss": loss, "mse": mse.detach(), "vb": vb.detach()}

    def drop_labels(self, y: Tensor | None, null_label: int) -> Tensor | None:
        """Label dropout at cond_drop_prob (ddpmlab.diffusion.guidance.drop_labels)."""
        return drop_labels(y, null_label, self.cond_drop_prob)

    # ---- the variational bound (Ho et al. eq. 5), in bits per dimension -----------------------

    def prior_bpd(self, x_0: Tensor) -> Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)), per example, in bits/dim. Shape (B,)."""
        t = torch.full((x_0.shape[0],), self.num_timesteps - 1, device=x_0.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x_0, t)
        kl = normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(log_variance))
        return kl.flatten(1).mean(1) / math.log(2.0)

    def vb_terms_bpd(self, model, x_0: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = True) -> Tensor:
        """The bound's term at each example's t, in bits/dim, calling the network. Shape (B,)."""
        return self.vb_terms_from_output(model(x_t, self.timestep_map[t]), x_0, x_t, t, clip_denoised)

    def vb_terms_from_output(self, output: Tensor, x_0: Tensor, x_t: Tensor, t: Tensor,
                             clip_denoised: bool = True) -> Tensor:
        """The bound's term at each example's t, in bits/dim, from the network's output. Shape (B,).

        t > 0 (paper's t >= 2): L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)).
        t = 0 (paper's t = 1):  L_0 = -log p(x_0 | x_1), the discretized Gaussian decoder (eq. 13).
        """
        return self._vb_and_x0(output, x_0, x_t, t, clip_denoised)[0]

    def _vb_and_x0(self, output: Tensor, x_0: Tensor, x_t: Tensor, t: Tensor,
                   clip_denoised: bool) -> tuple[Tensor, Tensor]:
        """vb_terms_from_output's (B,) terms and the x_0 prediction (B, C, H, W) they were computed around."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_0, x_t, t)
        out = self.p_from_output(output, x_t, t, clip_denoised=clip_denoised)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]).flatten(1).mean(1)
        decoder_nll = -discretized_gaussian_log_likelihood(x_0, out["mean"], 0.5 * out["log_variance"]).flatten(1).mean(1)
        return torch.where(t == 0, decoder_nll, kl) / math.log(2.0), out["pred_x0"]

    @torch.no_grad()
    def calc_bpd_loop(self, model, x_0: Tensor, generator: Generator = None,
                      clip_denoised: bool = True, progress: bool = False, timesteps=None) -> dict[str, Tensor]:
        """The full bound L = L_T + sum_t L_{t-1} + L_0 for each example, in bits/dim, over every t (Ho et al. eq. 5).

        Returns total (B,), prior = L_T (B,), terms (B, T) with terms[:, 0] = L_0 and terms[:, i] = L_i, and
        x0_mse (B, T): x0_mse[:, i] = mean over pixels of (x^_0 - x_0)^2, x^_0 the network's (clipped, with
        clip_denoised) x_0 prediction from the very x_{i+1} ~ q(x_{i+1} | x_0) its term i was computed at (the
        same network call): the distortion of section 4.3's progressive code at the paper's t = i + 1.
        `timesteps` (default all, from T-1 down) limits the terms computed; the others stay 0 (the benchmark
        times part of the loop).
        """
        terms = torch.zeros(x_0.shape[0], self.num_timesteps, device=x_0.device)
        x0_mse = torch.zeros_like(terms)
        order = list(reversed(range(self.num_timesteps))) if timesteps is None else list(timesteps)
        for i in track(order, total=len(order), disable=not progress, desc="bound", leave=False):
            t = torch.full((x_0.shape[0],), i, device=x_0.device, dtype=torch.long)
            eps = randn(x_0.shape, generator, x_0.device)
            x_t = self.q_sample(x_0, t, eps)
            terms[:, i], pred_x0 = self._vb_and_x0(model(x_t, self.timestep_map[t]), x_0, x_t, t, clip_denoised)
            x0_mse[:, i] = (pred_x0 - x_0).pow(2).flatten(1).mean(1)
        prior = self.prior_bpd(x_0)
        return {"total": terms.sum(1) + prior, "prior": prior, "terms": terms, "x0_mse": x0_mse}

    def decoder_bpd(self, model, x_0: Tensor, eps: Tensor, clip_denoised: bool = True) -> Tensor:
        """L_0 = -log p(x_0 | x_1) at x_1 = q_sample(x_0, t=1, eps), in bits/dim (Ho et al. eq. 13). Shape (B,)."""
        t = torch.zeros(x_0.shape[0], device=x_0.device, dtype=torch.long)
        return self.vb_terms_bpd(model, x_0, self.q_sample(x_0, t, eps), t, clip_denoised)

    def bound_from_draws(self, model, x_0: Tensor, eps: Tensor, t: Tensor, weights: Tensor, vb: Tensor) -> Tensor:
        """Each example's bound from a training batch's draws, in bits/dim: L_T + L_0 + T w_t L_t 1{t >= 1}. (B,)

        t, weights and vb are the batch's timesteps, their weights w_t = 1 / (T p_t) and terms (training_losses);
        sum_{t>=1} L_t = T E[w_t L_t 1{t >= 1}], so the mean over a batch is unbiased for the bound (Ho et al.
        eq. 5). L_T and L_0 are exact, L_0 at x_1 from the batch's eps (one more network call, no gradient):
        a draw at t = 0, with probability 1/T, would leave L_0, about half the bound, out of most batches.
        """
        with torch.no_grad():
            exact = self.prior_bpd(x_0) + self.decoder_bpd(model, x_0, eps, clip_denoised=False)
        return exact + self.num_timesteps * weights * vb.detach() * (t > 0)

    @torch.no_grad()
    def estimate_bpd(self, model, x_0: Tensor, num_timesteps: int, generator: Generator = None,
                     clip_denoised: bool = True) -> Tensor:
        """Each example's bound L_T + L_0 + sum_{t=2..T} L_{t-1} (Ho et al. eq. 5; iDDPM eq. 4-6, L_vlb), estimated
        from K = num_timesteps of its T - 1 KL terms, in bits/dim. Shape (B,); their spread gives the stderr.

        L_T (analytic) and L_0 (one network call) are exact: L_0 is about half the bound, and a uniform draw
        over all T steps would see it with probability 1/T, weighted by T (an unbiased, very skewed estimate).
        The KL terms, indices 1..T-1 here, are split into K strata [1 + e_k, 1 + e_{k+1}) evenly spaced in log t
        (`log_strata`); each gets one index drawn uniformly from it, weighted by the stratum's size, so the sum
        is unbiased for the KL sum. Log spacing because the terms fall steeply with t: the first, largest
        terms are strata of their own, and each later stratum holds terms of similar size
        (benchmarks/results/estimator.md measures it against uniform draws and equal strata).
        K >= T - 1 takes every index once: the full bound. min(K, T - 1) + 1 network calls per example; T >= 2.
        """
        return self.stratified_bpd(model, x_0, log_strata(self.num_timesteps - 1, num_timesteps), generator,
                                   clip_denoised)

    @torch.no_grad()
    def stratified_bpd(self, model, x_0: Tensor, edges: list[int], generator: Generator = None,
                       clip_denoised: bool = True) -> Tensor:
        """L_T + L_0 + sum_k (e_{k+1} - e_k) L_{t_k} with t_k uniform in [1 + e_k, 1 + e_{k+1}), per example:
        estimate_bpd for any strata 0 = e_0 < ... < e_K = T - 1 of the KL indices. Shape (B,), bits/dim."""
        sizes = [hi - lo for lo, hi in zip(edges[:-1], edges[1:])]
        t = [1 + lo + randint(size, (x_0.shape[0],), generator, x_0.device) for lo, size in zip(edges, sizes)]
        decoder = self.decoder_bpd(model, x_0, randn(x_0.shape, generator, x_0.device), clip_denoised)
        kl = sum(size * self.vb_terms_bpd(model, x_0, self.q_sample(x_0, t_k, randn(x_0.shape, generator, x_0.device)),
                                          t_k, clip_denoised) for size, t_k in zip(sizes, t))
        return self.prior_bpd(x_0) + decoder + kl

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
            1.0 - alphas_cumprod / prev, self.prediction, self.variance, self.loss, self.vlb_weight,
            self.loss_weighting, self.min_snr_gamma, timestep_map=self.timestep_map.cpu()[kept],
            network_betas=self.network_betas64,
            cond_drop_prob=self.cond_drop_prob,
        )
        return respaced.to(self.betas.device)
