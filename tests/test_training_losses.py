"""The training objectives: L_simple, L_vlb and iDDPM's hybrid, with learned variances and min-SNR weighting."""

import pytest
import torch

from ddpmlab.diffusion import GaussianDiffusion
from ddpmlab.diffusion.schedules import cosine_betas, linear_betas
from ddpmlab.errors import ConfigError


def fixed_output(shape, seed=0):
    """A stand-in network whose output is one leaf tensor, so gradients per output channel can be read off."""
    output = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).mul_(0.5).requires_grad_(True)
    return output, (lambda x_t, t: output)


def batch(n=16, channels=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    x_0 = torch.rand(n, channels, 4, 4, generator=g) * 2 - 1
    return x_0, torch.randint(0, 100, (n,), generator=g), torch.randn(n, channels, 4, 4, generator=g)


def test_hybrid_bound_term_trains_only_the_variance_channels():
    """iDDPM section 3.1: L_vlb sees a stop-gradient on the mean, so L_simple alone trains the eps channels."""
    diffusion = GaussianDiffusion(linear_betas(100, beta_end=0.2), variance="learned_range", loss="hybrid")
    x_0, t, eps = batch()
    output, model = fixed_output((16, 2, 4, 4))
    terms = diffusion.training_losses(model, x_0, t, eps)
    grad = torch.autograd.grad(terms["loss"].sum(), output)[0]
    mse_grad = 2 * (output[:, :1] - eps) / 16  # d/d(out) of the per-example mean over 16 pixels
    assert torch.allclose(grad[:, :1], mse_grad.detach(), atol=1e-6)  # the bound adds nothing to the mean
    assert grad[:, 1:].abs().sum() > 0  # ... and is what trains the variance channels
    # Without the stop-gradient (loss=vlb) the bound does reach the mean channels.
    vlb = GaussianDiffusion(linear_betas(100, beta_end=0.2), variance="learned_range", loss="vlb")
    vlb_grad = torch.autograd.grad(vlb.training_losses(model, x_0, t, eps)["loss"].sum(), output)[0]
    assert vlb_grad[:, :1].abs().sum() > 0 and vlb_grad[:, 1:].abs().sum() > 0


@pytest.mark.parametrize("variance", ["fixed_large", "learned", "learned_range"])
def test_vlb_loss_is_T_times_the_bound_term_that_the_nll_uses(variance):
    diffusion = GaussianDiffusion(cosine_betas(100), variance=variance, loss="vlb")
    x_0, t, eps = batch()
    _, model = fixed_output((16, diffusion.output_channels(1), 4, 4))
    terms = diffusion.training_losses(model, x_0, t, eps)
    x_t = diffusion.q_sample(x_0, t, eps)
    bound = diffusion.vb_terms_bpd(model, x_0, x_t, t, clip_denoised=False)
    assert torch.allclose(terms["loss"], 100 * bound) and torch.allclose(terms["vb"], bound)
    hybrid = GaussianDiffusion(cosine_betas(100), variance="learned_range", loss="hybrid")
    if variance == "learned_range":
        parts = hybrid.training_losses(model, x_0, t, eps)
        assert torch.allclose(parts["loss"], parts["mse"] + 0.001 * 100 * bound, atol=1e-6)


def test_learned_variance_is_the_network_log_variance_or_the_eq_15_interpolation():
    betas = linear_betas(100, beta_end=0.2)
    x_t, t = torch.zeros(3, 1, 2, 2), torch.tensor([0, 40, 99])
    v = torch.tensor([-0.5, 0.2, 0.9]).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    alpha_bar = torch.cumprod(1 - betas, 0)
    tilde = betas[1:] * (1 - alpha_bar[:-1]) / (1 - alpha_bar[1:])
    log_tilde = torch.cat([tilde[:1], tilde]).log()  # beta-tilde_1 = 0 is replaced by beta-tilde_2
    frac = (v[:, 0, 0, 0].double() + 1) / 2
    expected = frac * betas[t].log() + (1 - frac) * log_tilde[t]
    ranged = GaussianDiffusion(betas, variance="learned_range", loss="hybrid").p_log_variance(v, x_t, t)
    assert torch.allclose(ranged[:, 0, 0, 0].double(), expected, atol=1e-5)
    direct = GaussianDiffusion(betas, variance="learned", loss="hybrid").p_log_variance(v, x_t, t)
    assert torch.equal(direct, v)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weighting_is_min_snr_gamma_times_the_x0_error_for_every_target(gamma):
    """Hang et al. 2023: whatever the network predicts, the weighted loss is min(SNR_t, gamma) ||x0_hat - x_0||^2."""
    betas = cosine_betas(100)
    x_0, t, eps = batch()
    wrong_x0 = (x_0 * 0.7 + 0.1).clamp(-1, 1)  # some imperfect denoiser's x_0
    alpha_bar = torch.cumprod(1 - betas, 0)[t].float().view(-1, 1, 1, 1)
    snr = alpha_bar / (1 - alpha_bar)
    expected = snr.clamp(max=gamma).flatten() * (wrong_x0 - x_0).pow(2).flatten(1).mean(1)
    for prediction in ("eps", "x0", "v", "mean"):
        diffusion = GaussianDiffusion(betas, prediction=prediction, loss_weighting="min_snr", min_snr_gamma=gamma)

        def model(x_t, t_):
            wrong_eps = diffusion.predict_eps_from_x0(x_t, t_, wrong_x0)
            return diffusion.training_target(wrong_x0, t_, wrong_eps)

        got = diffusion.training_losses(model, x_0, t, eps)["loss"]
        assert torch.allclose(got, expected, rtol=1e-3, atol=1e-6), prediction


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(variance="learned_range", loss="simple"), "use diffusion.loss=hybrid"),
    (dict(variance="fixed_large", loss="hybrid"), "use diffusion.variance=learned_range"),
    (dict(loss="vlb", loss_weighting="min_snr"), "weights the MSE term"),
    (dict(loss="l1"), "diffusion.loss='l1' is unknown"),
    (dict(loss_weighting="p2"), "diffusion.loss_weighting='p2' is unknown"),
    (dict(loss_weighting="min_snr", min_snr_gamma=0.0), "min_snr_gamma must be positive"),
])
def test_inconsistent_objectives_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GaussianDiffusion(linear_betas(10), **kwargs)
