"""The variational bound in bits/dim (Ho et al. eq. 5): its terms, their sum, and its cheap estimate."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ddpmlab.diffusion import GaussianDiffusion
from ddpmlab.diffusion.losses import discretized_gaussian_log_likelihood, normal_kl
from ddpmlab.diffusion.schedules import linear_betas
from ddpmlab.models import UNet
from tests.test_gaussian import gaussian_oracle


def levels(n: int, shape=(1, 4, 4), seed=0) -> torch.Tensor:
    """n images with pixels uniform over the 256 levels, scaled to [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g).float() / 127.5 - 1


def test_normal_kl_matches_torch_distributions():
    m1, m2, lv1, lv2 = torch.randn(4, 100).unbind()
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), expected, atol=1e-5)


@pytest.mark.parametrize(("mean", "scale"), [(0.0, 0.01), (0.99, 0.002), (-0.3, 0.5), (2.0, 1e-4)])
def test_decoder_is_a_distribution_over_the_256_levels(mean, scale):
    x = torch.arange(256).float() / 127.5 - 1
    log_p = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, math.log(scale)))
    assert log_p.double().exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    assert (log_p <= 0).all()


def test_each_kl_term_matches_a_direct_gaussian_kl():
    """L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), with both Gaussians built here from alpha_bar."""
    betas = linear_betas(100, beta_end=0.2)
    diffusion = GaussianDiffusion(betas, variance="fixed_large")
    mu, s = 0.1, 0.4
    model = gaussian_oracle(diffusion, mu, s)
    alpha_bar = torch.cumprod(1 - betas, 0)
    x_0 = levels(6)
    for i in (1, 10, 50, 99):
        t = torch.full((6,), i)
        x_t = diffusion.q_sample(x_0, t, torch.randn_like(x_0))
        ab, ab_prev, beta = alpha_bar[i], alpha_bar[i - 1], betas[i]
        coef1, coef2 = ab_prev.sqrt() * beta / (1 - ab), (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
        true = Normal(coef1 * x_0.double() + coef2 * x_t.double(), ((1 - ab_prev) / (1 - ab) * beta).sqrt())
        x0_hat = (x_t.double() - (1 - ab).sqrt() * model(x_t, t).double()) / ab.sqrt()
        model_dist = Normal(coef1 * x0_hat.clamp(-1, 1) + coef2 * x_t.double(), beta.sqrt())
        expected = kl_divergence(true, model_dist).flatten(1).mean(1) / math.log(2)
        got = diffusion.vb_terms_bpd(model, x_0, x_t, t)
        assert torch.allclose(got.double(), expected, rtol=1e-3, atol=1e-6)


def test_full_bound_total_is_the_sum_of_its_terms():
    diffusion = GaussianDiffusion(linear_betas(40, beta_end=0.3))
    out = diffusion.calc_bpd_loop(gaussian_oracle(diffusion, 0.0, 0.5), levels(5), torch.Generator().manual_seed(1))
    assert out["terms"].shape == (5, 40)
    assert torch.allclose(out["total"], out["prior"] + out["terms"].sum(1))
    assert (out["terms"][:, 1:] >= 0).all() and (out["prior"] >= 0).all()  # KLs are never negative


def test_untrained_model_on_uniform_levels_needs_about_8_bits_per_dim():
    """Uniform data over 256 levels has entropy 8 bits/dim: no model's bound can be below it on average."""
    diffusion = GaussianDiffusion(linear_betas(100, beta_end=0.2), variance="fixed_small")
    model = UNet(image_size=8, in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=()).eval()
    out = diffusion.calc_bpd_loop(model, levels(16, (1, 8, 8)), torch.Generator().manual_seed(0))
    assert out["total"].mean().item() >= 7.9


def test_k_timestep_estimate_is_unbiased_for_the_full_bound():
    diffusion = GaussianDiffusion(linear_betas(30, beta_end=0.4))
    model = gaussian_oracle(diffusion, 0.0, 0.5)
    x_0 = levels(1).expand(4000, 1, 4, 4)
    full = diffusion.calc_bpd_loop(model, x_0[:200], torch.Generator().manual_seed(0))["total"].mean().item()
    estimates = diffusion.estimate_bpd(model, x_0, num_timesteps=3, generator=torch.Generator().manual_seed(1))
    standard_error = estimates.std().item() / math.sqrt(len(estimates))
    assert estimates.mean().item() == pytest.approx(full, abs=4 * standard_error + 0.01)
