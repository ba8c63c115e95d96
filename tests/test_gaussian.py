import math

import pytest
import torch

from ddpmlab.diffusion import GaussianDiffusion, get_sampler
from ddpmlab.diffusion.schedules import cosine_betas, linear_betas
from ddpmlab.errors import ConfigError


def gaussian_oracle(diffusion: GaussianDiffusion, mu: float, s: float):
    """The exact eps-predictor for data x_0 ~ N(mu, s^2 I): E[eps | x_t] is linear in x_t.

    x_t = a x_0 + b eps with a = sqrt(alpha_bar_t), b = sqrt(1 - alpha_bar_t), so
    E[x_0 | x_t] = mu + a s^2 / (a^2 s^2 + b^2) (x_t - a mu) and E[eps | x_t] = (x_t - a E[x_0 | x_t]) / b.
    Computed here from the schedule in float64, independently of the diffusion's own tables.
    """
    alpha_bar = torch.cumprod(1 - diffusion.betas64, 0)

    def model(x_t, t_original):
        a = alpha_bar[t_original].sqrt().view(-1, 1, 1, 1).to(x_t)
        b = (1 - alpha_bar[t_original]).sqrt().view(-1, 1, 1, 1).to(x_t)
        x0 = mu + a * s**2 / (a**2 * s**2 + b**2) * (x_t - a * mu)
        return (x_t - a * x0) / b

    return model


def test_q_sample_has_the_forward_marginal_moments():
    diffusion = GaussianDiffusion(linear_betas(1000))
    x_0 = torch.full((200_000, 1, 1, 1), 0.7)
    for i in (0, 250, 999):
        t = torch.full((len(x_0),), i)
        x_t = diffusion.q_sample(x_0, t, torch.randn_like(x_0))
        alpha_bar = torch.cumprod(1 - linear_betas(1000), 0)[i].item()
        assert x_t.mean().item() == pytest.approx(math.sqrt(alpha_bar) * 0.7, abs=0.01)
        assert x_t.var().item() == pytest.approx(1 - alpha_bar, rel=0.02, abs=1e-5)


def test_posterior_matches_bayes_rule():
    """q(x_{t-1} | x_t, x_0) is proportional to q(x_t | x_{t-1}) q(x_{t-1} | x_0): a product of Gaussians in x_{t-1}."""
    betas = cosine_betas(200)
    diffusion = GaussianDiffusion(betas)
    alpha_bar = torch.cumprod(1 - betas, 0)
    x_0, x_t = torch.tensor(0.3), torch.tensor(-0.8)
    for i in (1, 17, 100, 199):
        prev_ab, beta, alpha = alpha_bar[i - 1], betas[i], 1 - betas[i]
        # N(x_{t-1}; sqrt(prev_ab) x_0, 1 - prev_ab) * N(x_t; sqrt(alpha) x_{t-1}, beta), completed square:
        precision = 1 / (1 - prev_ab) + alpha / beta
        mean = (prev_ab.sqrt() * x_0 / (1 - prev_ab) + alpha.sqrt() * x_t / beta) / precision
        t = torch.tensor([i])
        got_mean, got_var, got_log_var = diffusion.q_posterior_mean_variance(x_0.view(1, 1), x_t.view(1, 1), t)
        assert got_mean.item() == pytest.approx(mean.item(), rel=1e-5, abs=1e-6)
        assert got_var.item() == pytest.approx((1 / precision).item(), rel=1e-5)
        assert got_log_var.item() == pytest.approx(math.log((1 / precision).item()), rel=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_each_parameterisation_recovers_x0_and_eps_and_zero_loss(prediction):
    diffusion = GaussianDiffusion(linear_betas(1000), prediction=prediction)
    x_0, eps = torch.rand(8, 1, 4, 4) * 2 - 1, torch.randn(8, 1, 4, 4)
    t = torch.randint(0, 1000, (8,))
    x_t = diffusion.q_sample(x_0, t, eps)
    target = diffusion.training_target(x_0, t, eps)
    pred_x0, pred_eps = diffusion.model_x0_eps(target, x_t, t)
    assert torch.allclose(pred_x0, x_0, atol=2e-3) and torch.allclose(pred_eps, eps, atol=2e-3)
    oracle = lambda x, t_: diffusion.training_target(x_0, t_, diffusion.predict_eps_from_x0(x, t_, x_0))  # noqa: E731
    assert diffusion.training_losses(oracle, x_0, t, eps).max().item() < 1e-6
    assert diffusion.training_losses(lambda x, t_: torch.zeros_like(x), x_0, t, eps).min().item() > 1e-3


def test_reverse_variances_are_beta_tilde_or_beta():
    betas = linear_betas(1000)
    small = GaussianDiffusion(betas, variance="fixed_small")
    large = GaussianDiffusion(betas, variance="fixed_large")
    x = torch.zeros(3, 1, 2, 2)
    t = torch.tensor([1, 500, 999])
    zero_model = lambda x_t, t_: torch.zeros_like(x_t)  # noqa: E731
    alpha_bar = torch.cumprod(1 - betas, 0)
    beta_tilde = betas[t] * (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t])
    assert torch.allclose(small.p_mean_variance(zero_model, x, t)["variance"][:, 0, 0, 0], beta_tilde.float())
    assert torch.allclose(large.p_mean_variance(zero_model, x, t)["variance"][:, 0, 0, 0], betas[t].float())


def test_unknown_prediction_or_variance_is_refused():
    with pytest.raises(ConfigError, match="diffusion.prediction"):
        GaussianDiffusion(linear_betas(10), prediction="score")
    with pytest.raises(ConfigError, match="diffusion.variance"):
        GaussianDiffusion(linear_betas(10), variance="learned_wrong")


def test_respaced_alpha_bar_equals_original_at_kept_steps():
    diffusion = GaussianDiffusion(cosine_betas(1000))
    respaced = diffusion.respace(50)
    kept = respaced.timestep_map
    assert len(kept) == 50 and kept[0] == 0 and kept[-1] == 999 and (kept.diff() > 0).all()
    assert torch.allclose(respaced.alphas_cumprod, diffusion.alphas_cumprod[kept], rtol=1e-5)
    assert torch.equal(diffusion.respace(1000).timestep_map, torch.arange(1000))


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
def test_sampler_with_exact_denoiser_matches_its_exact_moments(sampler, steps, variance):
    mu, s, n = 0.3, 0.2, 20_000
    diffusion = GaussianDiffusion(linear_betas(1000), variance=variance)
    generator = torch.Generator().manual_seed(0)
    x = get_sampler(sampler)(gaussian_oracle(diffusion, mu, s), diffusion, (n, 1, 1, 1), generator, steps=steps)
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


def test_per_example_generators_make_samples_independent_of_batching():
    from ddpmlab.diffusion.noise import per_example_generators

    diffusion = GaussianDiffusion(linear_betas(50, beta_end=0.3))
    model = gaussian_oracle(diffusion, 0.0, 0.5)
    whole = get_sampler("ancestral")(model, diffusion, (6, 1, 2, 2), per_example_generators(range(6), 7, "cpu"))
    halves = [get_sampler("ancestral")(model, diffusion, (3, 1, 2, 2), per_example_generators(idx, 7, "cpu"))
              for idx in (range(3), range(3, 6))]
    assert torch.allclose(whole, torch.cat(halves), atol=1e-6)
