"""The variational bound in bits/dim (Ho et al. eq. 5): its terms, their sum, and its cheap estimate."""

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.distributions import Normal, kl_divergence
from torch.utils.data import DataLoader

from ddpmlab.diffusion import GaussianDiffusion
from ddpmlab.diffusion.losses import discretized_gaussian_log_likelihood, normal_kl
from ddpmlab.diffusion.noise import ExampleNoise
from ddpmlab.diffusion.schedules import linear_betas
from ddpmlab.diffusion.timesteps import ImportanceTimesteps
from ddpmlab.models import UNet
from ddpmlab.module import DiffusionModule
from tests.test_gaussian import gaussian_oracle


def levels(n: int, shape=(1, 4, 4), seed=0) -> torch.Tensor:
    """n images with pixels uniform over the 256 levels, scaled to [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g).float() / 127.5 - 1


def gaussian_levels(n: int, shape=(1, 4, 4), s=0.5, seed=0) -> torch.Tensor:
    """n images with pixels N(0, s^2) rounded to the 256 levels: the data gaussian_oracle(diffusion, 0, s) models."""
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn((n, *shape), generator=g) * s).clamp(-1, 1) * 127.5 + 127.5).round() / 127.5 - 1


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


def test_k_timestep_estimate_has_its_median_and_interval_at_the_full_bound():
    """40 seeded K=4 estimates on 16 images, as evaluate.py computes them: their median is within 2 standard
    errors of the full bound and the +-2 SE interval covers it nearly as often as it should (95%).
    (L_0 is 30% of this bound; drawn with the KL terms, 1 in 200 per draw, 62-75% of intervals covered it.)"""
    diffusion = GaussianDiffusion(linear_betas(200, beta_end=0.1))
    model, x_0, n = gaussian_oracle(diffusion, 0.0, 0.5), gaussian_levels(16), 16
    full = diffusion.calc_bpd_loop(model, x_0, ExampleNoise(range(n), 0))["total"].mean()
    estimates = torch.stack([diffusion.estimate_bpd(model, x_0, 4, ExampleNoise(range(n), 1000 + seed))
                             for seed in range(40)])  # (runs, images)
    means, stderrs = estimates.mean(1), estimates.std(1) / math.sqrt(n)
    assert (means.median() - full).abs() <= 2 * stderrs.median()
    assert ((means - full).abs() <= 2 * stderrs).float().mean() >= 0.85


@pytest.mark.parametrize("num_timesteps", [29, 100])
def test_estimate_with_every_kl_term_is_the_full_bound(num_timesteps):
    """K >= T - 1 strata hold one t each, so the estimate is the full bound; the oracle for a point mass makes
    every term independent of the noise, so the two agree exactly."""
    diffusion = GaussianDiffusion(linear_betas(30, beta_end=0.3))
    level = 64 / 127.5 - 1
    model, x_0 = gaussian_oracle(diffusion, level, 0.0), torch.full((3, 1, 4, 4), level)
    full = diffusion.calc_bpd_loop(model, x_0, torch.Generator().manual_seed(0))["total"]
    estimate = diffusion.estimate_bpd(model, x_0, num_timesteps, torch.Generator().manual_seed(1))
    assert torch.allclose(estimate, full, rtol=1e-5)


class OracleNetwork(nn.Module):
    """gaussian_oracle as a network Lightning can train: one parameter that the output does not depend on."""

    def __init__(self, diffusion: GaussianDiffusion):
        super().__init__()
        self.oracle = gaussian_oracle(diffusion, 0.0, 0.5)
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t):
        return self.oracle(x_t, t) + 0 * self.unused


def test_logged_training_bound_is_unbiased_for_the_full_bound(tmp_path):
    """train/vlb_bpd over 100 steps of one fixed batch (importance-sampled t, so weights != 1) averages to
    the full bound of that batch, L_T included (0.79 of its 8.2 bits/dim here)."""
    L.seed_everything(0)
    diffusion = GaussianDiffusion(linear_betas(20, beta_end=0.02))
    sampler = ImportanceTimesteps(20, history=1)
    sampler.update(torch.arange(20), torch.linspace(2.0, 1.0, 20))  # warmed up: p_t from 0.067 down to 0.033
    module = DiffusionModule(OracleNetwork(diffusion), diffusion, sampler, warmup_steps=1)
    x_0, steps = gaussian_levels(4).repeat(16, 1, 1, 1), 100
    trainer = L.Trainer(max_steps=steps, log_every_n_steps=1, logger=CSVLogger(tmp_path), accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(x_0.repeat(steps, 1, 1, 1), batch_size=len(x_0)))
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        logged = torch.tensor([float(row["train/vlb_bpd"]) for row in csv.DictReader(f) if row["train/vlb_bpd"]])
    full = diffusion.calc_bpd_loop(module.model, x_0.repeat(50, 1, 1, 1), clip_denoised=False)["total"]
    assert len(logged) == steps
    standard_error = math.hypot(logged.std().item() / math.sqrt(steps), full.std().item() / math.sqrt(len(full)))
    assert logged.mean().item() == pytest.approx(full.mean().item(), abs=4 * standard_error)
