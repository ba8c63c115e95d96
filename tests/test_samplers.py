"""Samplers with the exact denoiser of Gaussian data: each one's output moments against an independent computation.

For data N(mu, s^2) the optimal network is linear in x_t (tests/test_gaussian.py's oracle), so every sampler step
is affine-Gaussian and the moments of its samples follow from a scalar recursion computed here in float64.
"""

import math

import pytest
import torch

from ddpmlab.diffusion import GaussianDiffusion, get_sampler
from ddpmlab.diffusion.schedules import cosine_betas, linear_betas
from ddpmlab.errors import ConfigError
from tests.test_gaussian import gaussian_oracle


def exact_sample_moments(alpha_bar_kept, variance: str, mu: float, s: float) -> tuple[float, float]:
    """Mean and variance of x_0 from ancestral sampling with the exact denoiser, by moment recursion in float64.

    Each step is linear-Gaussian, x_{t-1} = A x_t + c + sigma_t z, so from x_T ~ N(0, 1):
    m <- A m + c and v <- A^2 v + sigma_t^2, with A and c from eq. 7's posterior mean at E[x_0 | x_t].
    """
    m, v = 0.0, 1.0
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar_kept[:-1]])
    betas = 1 - alpha_bar_kept / prev
    tilde = betas * (1 - prev) / (1 - alpha_bar_kept)
    for i in reversed(range(len(alpha_bar_kept))):
        ab, ab_prev, beta = alpha_bar_kept[i].item(), prev[i].item(), betas[i].item()
        a, b2 = math.sqrt(ab), 1 - ab
        k = a * s**2 / (a**2 * s**2 + b2)  # E[x_0 | x_t] = mu + k (x_t - a mu)
        coef1, coef2 = math.sqrt(ab_prev) * beta / (1 - ab), math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
        A, c = coef1 * k + coef2, coef1 * (mu - k * a * mu)
        sigma2 = 0.0 if i == 0 else (tilde[i].item() if variance == "fixed_small" else beta)
        m, v = A * m + c, A**2 * v + sigma2
    return m, v


@pytest.mark.parametrize(("sampler", "steps"), [("ancestral", None), ("respaced", 50)])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction", ["eps", "mean"])
def test_sampler_with_exact_denoiser_matches_its_exact_moments(sampler, steps, variance, prediction):
    """With `mean` the network outputs its own T-step chain's posterior mean; a respaced chain reads it as such."""
    mu, s, n = 0.3, 0.2, 20_000
    diffusion = GaussianDiffusion(linear_betas(1000), prediction=prediction, variance=variance)
    generator = torch.Generator().manual_seed(0)
    x = get_sampler(sampler)(gaussian_oracle(diffusion, mu, s, prediction), diffusion, (n, 1, 1, 1), generator,
                             steps=steps)
    kept = diffusion.respace(steps).timestep_map if steps else torch.arange(1000)
    m, v = exact_sample_moments(torch.cumprod(1 - diffusion.betas64, 0)[kept], variance, mu, s)
    # Within 4 standard errors: sd(mean) = sqrt(v / n), sd(var) ~ v sqrt(2 / n).
    assert x.mean().item() == pytest.approx(m, abs=4 * math.sqrt(v / n))
    assert x.var().item() == pytest.approx(v, abs=4 * v * math.sqrt(2 / n))
    if steps is None:  # all T steps: the data distribution itself, up to the fixed variances' small bias
        assert m == pytest.approx(mu, abs=1e-3) and v == pytest.approx(s**2, rel=0.05)


def test_ddim_with_eta_one_over_all_steps_is_ddpm_ancestral_with_beta_tilde():
    """Song et al. 2020, section 4.1: eta = 1 makes the forward process Markovian and the sampler DDPM's."""
    diffusion = GaussianDiffusion(linear_betas(200, beta_end=0.1), variance="fixed_small")
    model = gaussian_oracle(diffusion, 0.2, 0.3)
    shape = (64, 1, 2, 2)
    ddpm = get_sampler("ancestral")(model, diffusion, shape, torch.Generator().manual_seed(5))
    ddim = get_sampler("ddim", eta=1.0)(model, diffusion, shape, torch.Generator().manual_seed(5))
    assert torch.allclose(ddim, ddpm, atol=1e-4)
    # With eta = 0 the same noise gives another, deterministic answer.
    ddim0 = get_sampler("ddim", eta=0.0)(model, diffusion, shape, torch.Generator().manual_seed(5))
    assert not torch.allclose(ddim0, ddpm, atol=1e-2)


def exact_ddim_moments(alpha_bar_kept, mu: float, s: float) -> tuple[float, float]:
    """Mean and variance of deterministic DDIM's x_0 with the exact denoiser, by the same moment recursion.

    x_{t-1} = sqrt(a_{t-1}) x0(x_t) + sqrt(1 - a_{t-1}) eps(x_t), both linear in x_t (Song et al. eq. 12, eta = 0).
    """
    m, v = 0.0, 1.0
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar_kept[:-1]])
    for i in reversed(range(len(alpha_bar_kept))):
        a, a_prev = alpha_bar_kept[i].item(), prev[i].item()
        k = math.sqrt(a) * s**2 / (a * s**2 + 1 - a)
        x0_slope, x0_offset = k, mu - k * math.sqrt(a) * mu
        eps_slope = (1 - math.sqrt(a) * x0_slope) / math.sqrt(1 - a)
        eps_offset = -math.sqrt(a) * x0_offset / math.sqrt(1 - a)
        A = math.sqrt(a_prev) * x0_slope + math.sqrt(1 - a_prev) * eps_slope
        c = math.sqrt(a_prev) * x0_offset + math.sqrt(1 - a_prev) * eps_offset
        m, v = A * m + c, A**2 * v
    return m, v


@pytest.mark.parametrize("steps", [50, 1000])
def test_deterministic_ddim_with_exact_denoiser_matches_its_exact_moments(steps):
    mu, s, n = 0.3, 0.2, 20_000
    diffusion = GaussianDiffusion(linear_betas(1000))
    x = get_sampler("ddim", eta=0.0)(gaussian_oracle(diffusion, mu, s), diffusion, (n, 1, 1, 1),
                                     torch.Generator().manual_seed(0), steps=steps)
    kept = diffusion.respace(steps).timestep_map
    m, v = exact_ddim_moments(torch.cumprod(1 - diffusion.betas64, 0)[kept], mu, s)
    assert x.mean().item() == pytest.approx(m, abs=4 * math.sqrt(v / n))
    assert x.var().item() == pytest.approx(v, abs=4 * v * math.sqrt(2 / n))
    if steps == 1000:  # the ODE over all steps carries N(0, 1) to the data distribution
        assert v == pytest.approx(s**2, rel=0.03)


def test_example_noise_makes_samples_independent_of_batching():
    from ddpmlab.diffusion.noise import ExampleNoise

    diffusion = GaussianDiffusion(linear_betas(50, beta_end=0.3))
    model = gaussian_oracle(diffusion, 0.0, 0.5)
    whole = get_sampler("ancestral")(model, diffusion, (6, 1, 2, 2), ExampleNoise(range(6), 7, "cpu"))
    halves = [get_sampler("ancestral")(model, diffusion, (3, 1, 2, 2), ExampleNoise(idx, 7, "cpu"))
              for idx in (range(3), range(3, 6))]
    assert torch.allclose(whole, torch.cat(halves), atol=1e-6)


def exact_dpm_solver_moments(alpha_bar_kept, mu: float, s: float) -> tuple[float, float]:
    """Mean and variance of DPM-Solver++(2M)'s output with the exact x_0-predictor, from Lu et al. 2022's
    Algorithm 2 written out on scalars: every iterate is affine in x_T, x = g x_T + c, so x_0 ~ N(c, g^2)."""
    alpha, sigma = alpha_bar_kept.sqrt(), (1 - alpha_bar_kept).sqrt()
    lam = (alpha / sigma).log()
    g, c, previous, prev_h = 1.0, 0.0, None, None
    for i in reversed(range(len(alpha_bar_kept))):
        a, sg = alpha[i].item(), sigma[i].item()
        k = a * s**2 / (a**2 * s**2 + sg**2)
        x0 = (k * g, mu + k * (c - a * mu))  # E[x_0 | x_t] as (slope, offset) in x_T
        if i == 0:
            return x0[1], x0[0] ** 2
        h = (lam[i - 1] - lam[i]).item()
        d = x0 if previous is None else tuple((1 + h / (2 * prev_h)) * u - h / (2 * prev_h) * w
                                              for u, w in zip(x0, previous))
        ratio, coef = sigma[i - 1].item() / sg, alpha[i - 1].item() * (math.exp(-h) - 1)
        g, c = ratio * g - coef * d[0], ratio * c - coef * d[1]
        previous, prev_h = x0, h


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "mean"])
@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_with_exact_denoiser_matches_its_exact_moments(prediction, steps):
    mu, s, n = 0.3, 0.2, 20_000
    diffusion = GaussianDiffusion(cosine_betas(1000), prediction=prediction)
    x = get_sampler("dpm_solver")(gaussian_oracle(diffusion, mu, s, prediction), diffusion, (n, 1, 1, 1),
                                  torch.Generator().manual_seed(0), steps=steps)
    kept = diffusion.respace(steps).timestep_map
    m, v = exact_dpm_solver_moments(torch.cumprod(1 - diffusion.betas64, 0)[kept], mu, s)
    assert x.mean().item() == pytest.approx(m, abs=4 * math.sqrt(v / n))
    assert x.var().item() == pytest.approx(v, abs=4 * v * math.sqrt(2 / n))


@pytest.mark.parametrize(("sampler", "options", "steps", "variance"), [
    ("ancestral", {}, None, "fixed_small"),
    ("respaced", {}, 1000, "fixed_small"),
    ("ddim", {"eta": 0.0}, 1000, "fixed_small"),
    ("ddim", {"eta": 1.0}, None, "fixed_small"),
    ("dpm_solver", {}, 200, "fixed_small"),
    ("ancestral", {}, None, "learned_range"),
    ("dpm_solver", {}, 200, "learned_range"),
])
def test_every_sampler_with_exact_denoiser_returns_the_data_distribution(sampler, options, steps, variance):
    """With enough steps each sampler carries N(0, I) to N(mu, s^2): mean and variance within sampling error
    (4 standard errors) plus a 3% allowance for the discretisation of the fixed-variance chain."""
    mu, s, n = 0.3, 0.2, 20_000
    diffusion = GaussianDiffusion(linear_betas(1000), variance=variance,
                                  loss="hybrid" if variance.startswith("learned") else "simple")
    model = gaussian_oracle(diffusion, mu, s, variance_output=-1.0 if variance == "learned_range" else None)
    x = get_sampler(sampler, **options)(model, diffusion, (n, 1, 1, 1), torch.Generator().manual_seed(1), steps=steps)
    assert x.mean().item() == pytest.approx(mu, abs=4 * s / math.sqrt(n))
    assert x.var().item() == pytest.approx(s**2, abs=4 * s**2 * math.sqrt(2 / n) + 0.03 * s**2)


@pytest.mark.parametrize(("v", "fixed"), [(-1.0, "fixed_small"), (1.0, "fixed_large")])
def test_learned_range_at_its_ends_samples_like_the_fixed_variances(v, fixed):
    """iDDPM eq. 15: v = -1 gives beta-tilde_t, v = +1 gives beta_t, so ancestral samples agree noise for noise."""
    learned = GaussianDiffusion(linear_betas(100, beta_end=0.1), variance="learned_range", loss="hybrid")
    reference = GaussianDiffusion(linear_betas(100, beta_end=0.1), variance=fixed)
    shape = (32, 1, 2, 2)
    for sampler, steps in (("ancestral", None), ("respaced", 20)):
        got = get_sampler(sampler)(gaussian_oracle(learned, 0.2, 0.3, variance_output=v), learned, shape,
                                   torch.Generator().manual_seed(3), steps=steps)
        expected = get_sampler(sampler)(gaussian_oracle(reference, 0.2, 0.3), reference, shape,
                                        torch.Generator().manual_seed(3), steps=steps)
        assert torch.allclose(got, expected, atol=1e-5)


def test_sampler_steps_out_of_range_are_refused():
    diffusion = GaussianDiffusion(linear_betas(50))
    model = gaussian_oracle(diffusion, 0.0, 0.5)
    for sampler, steps in (("dpm_solver", 0), ("ddim", 51), ("respaced", 2.5), ("ancestral", 10)):
        with pytest.raises(ConfigError, match="sampling_steps"):
            get_sampler(sampler)(model, diffusion, (2, 1, 1, 1), torch.Generator(), steps=steps)
    with pytest.raises(ConfigError, match="unknown"):
        get_sampler("euler")


@pytest.mark.parametrize("sampler", ["respaced", "ddim", "dpm_solver"])
@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_one_step_samplers_run(sampler, variance):
    """A chain respaced to a single step has no beta-tilde_2 to stand in for beta-tilde_1 (it crashed)."""
    diffusion = GaussianDiffusion(linear_betas(50, beta_end=0.3), variance=variance)
    x = get_sampler(sampler)(gaussian_oracle(diffusion, 0.0, 0.5), diffusion, (4, 1, 2, 2), steps=1)
    assert x.shape == (4, 1, 2, 2) and torch.isfinite(x).all()


@pytest.mark.parametrize(("sampler", "steps"), [("ancestral", None), ("respaced", 7), ("ddim", 7), ("dpm_solver", 7)])
def test_every_sampler_reports_each_step_with_its_x0_prediction(sampler, steps):
    """on_step(i, x, x_0) for i = K-1 .. 0 in order; x_0 is the model's prediction at that step: E[x_0 | x_t] of the
    exact denoiser (clipped to [-1, 1]), near mu at the first step (x_T carries almost nothing of x_0), and the
    sample itself at the last."""
    mu, s = 0.3, 0.2
    diffusion = GaussianDiffusion(linear_betas(50, beta_end=0.5))
    seen = []
    x = get_sampler(sampler)(gaussian_oracle(diffusion, mu, s), diffusion, (256, 1, 1, 1),
                             torch.Generator().manual_seed(0), steps=steps,
                             on_step=lambda i, x_i, x_0: seen.append((i, x_i.clone(), x_0.clone())))
    assert [i for i, _, _ in seen] == list(reversed(range(steps or 50)))
    first_x0 = seen[0][2]
    assert first_x0.mean().item() == pytest.approx(mu, abs=0.01) and first_x0.std().item() < 0.05
    assert torch.allclose(seen[-1][2], x, atol=1e-6)
