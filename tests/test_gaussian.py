import math

import pytest
import torch

from ddpmlab.diffusion import GaussianDiffusion, get_sampler
from ddpmlab.diffusion.schedules import cosine_betas, linear_betas
from ddpmlab.errors import ConfigError


def gaussian_oracle(diffusion: GaussianDiffusion, mu: float, s: float, prediction: str = "eps",
                    variance_output: float | None = None):
    """The exact denoiser for data x_0 ~ N(mu, s^2 I): E[x_0 | x_t] and E[eps | x_t] are linear in x_t.

    x_t = a x_0 + b eps with a = sqrt(alpha_bar_t), b = sqrt(1 - alpha_bar_t), so
    E[x_0 | x_t] = mu + a s^2 / (a^2 s^2 + b^2) (x_t - a mu) and E[eps | x_t] = (x_t - a E[x_0 | x_t]) / b.
    Returns eps, x0, v = a eps - b x_0 or the posterior mean coef1 x_0 + coef2 x_t of the network's own
    (unrespaced) chain (eq. 7) as `prediction` says; with `variance_output`, that constant is appended
    as the learned-variance channels. Computed here from the schedule in float64, independently of the
    diffusion's own tables.
    """
    betas = diffusion.betas64
    alpha_bar = torch.cumprod(1 - betas, 0)
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])

    def model(x_t, t_original):
        column = lambda table: table[t_original].view(-1, 1, 1, 1)  # noqa: E731
        a, b = column(alpha_bar).sqrt(), column(1 - alpha_bar).sqrt()
        x0 = mu + a * s**2 / (a**2 * s**2 + b**2) * (x_t.double() - a * mu)
        eps = (x_t - a * x0) / b
        mean = (column(alpha_bar_prev).sqrt() * column(betas) * x0
                + column(1 - betas).sqrt() * column(1 - alpha_bar_prev) * x_t) / column(1 - alpha_bar)
        out = {"eps": eps, "x0": x0, "v": a * eps - b * x0, "mean": mean}[prediction].to(x_t.dtype)
        return out if variance_output is None else torch.cat([out, torch.full_like(out, variance_output)], 1)

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


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "mean"])
def test_each_parameterisation_recovers_x0_and_eps_and_zero_loss(prediction):
    diffusion = GaussianDiffusion(linear_betas(1000), prediction=prediction)
    x_0, eps = torch.rand(8, 1, 4, 4) * 2 - 1, torch.randn(8, 1, 4, 4)
    t = torch.randint(0, 1000, (8,))
    x_t = diffusion.q_sample(x_0, t, eps)
    target = diffusion.training_target(x_0, t, eps)
    pred_x0, pred_eps = diffusion.model_x0_eps(target, x_t, t)
    assert torch.allclose(pred_x0, x_0, atol=2e-3) and torch.allclose(pred_eps, eps, atol=2e-3)
    oracle = lambda x, t_: diffusion.training_target(x_0, t_, diffusion.predict_eps_from_x0(x, t_, x_0))  # noqa: E731
    assert diffusion.training_losses(oracle, x_0, t, eps)["loss"].max().item() < 1e-6
    assert diffusion.training_losses(lambda x, t_: torch.zeros_like(x), x_0, t, eps)["loss"].min().item() > 1e-3


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


def test_the_mean_target_is_the_posterior_mean_and_its_simple_loss_the_unweighted_mean_mse():
    """Ho et al. section 3.2 / Table 2: the network outputs mu~_t(x_t, x_0) (eq. 7) and loss=simple is
    ||mu~ - mu~_theta||^2, unweighted (here its mean over pixels); the coefficients computed here in float64."""
    betas = linear_betas(100, beta_end=0.2)
    diffusion = GaussianDiffusion(betas, prediction="mean")
    g = torch.Generator().manual_seed(0)
    x_0, eps = torch.rand(8, 1, 4, 4, generator=g) * 2 - 1, torch.randn(8, 1, 4, 4, generator=g)
    t = torch.tensor([0, 1, 2, 10, 50, 97, 98, 99])
    alpha_bar = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    col = lambda v: v[t].view(-1, 1, 1, 1)  # noqa: E731
    x_t = col(alpha_bar).sqrt() * x_0 + col(1 - alpha_bar).sqrt() * eps
    mean = (col(prev).sqrt() * col(betas) * x_0 + col(1 - betas).sqrt() * col(1 - prev) * x_t) / col(1 - alpha_bar)
    assert torch.allclose(diffusion.training_target(x_0, t, eps).double(), mean, atol=1e-6)
    assert torch.allclose(diffusion.training_target(x_0[:1], t[:1], eps[:1]), x_0[:1], atol=1e-6)  # at t = 1: x_0
    output = torch.randn(8, 1, 4, 4, generator=g)
    loss = diffusion.training_losses(lambda x, t_: output, x_0, t, eps)["loss"]
    assert torch.allclose(loss.double(), (mean - output).pow(2).flatten(1).mean(1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("variance", ["fixed_large", "learned"])
def test_the_mean_parameterisation_has_the_bound_of_the_eps_network_it_is_mapped_from(variance):
    """Table 2's two parameterisations are one model when their outputs are mapped into each other: an eps output e
    means mu = coef1 x^_0(e) + coef2 x_t (eq. 7 at eq. 15's x^_0; the map computed here in float64). Every term of
    the bound, and the full bound, agree to float precision, both ways, for any output (here random)."""
    betas = linear_betas(200, beta_end=0.05)
    loss = "vlb"
    eps_diffusion = GaussianDiffusion(betas, prediction="eps", variance=variance, loss=loss)
    mean_diffusion = GaussianDiffusion(betas, prediction="mean", variance=variance, loss=loss)
    alpha_bar = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    coef1, coef2 = prev.sqrt() * betas / (1 - alpha_bar), (1 - betas).sqrt() * (1 - prev) / (1 - alpha_bar)
    channels = 2 if variance == "learned" else 1
    outputs = torch.randn(200, 4, channels, 4, 4, generator=torch.Generator().manual_seed(0))

    def eps_net(x_t, t):
        return outputs[t, torch.arange(len(t))]

    def mean_net(x_t, t):  # eps -> mean; the log-variance channels as they are
        e = eps_net(x_t, t).double()
        col = lambda v: v[t].view(-1, 1, 1, 1)  # noqa: E731
        x0 = (x_t.double() - col(1 - alpha_bar).sqrt() * e[:, :1]) / col(alpha_bar).sqrt()
        return torch.cat([col(coef1) * x0 + col(coef2) * x_t.double(), e[:, 1:]], 1).float()

    x_0 = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    by_eps = eps_diffusion.calc_bpd_loop(eps_net, x_0, torch.Generator().manual_seed(2), clip_denoised=False)
    by_mean = mean_diffusion.calc_bpd_loop(mean_net, x_0, torch.Generator().manual_seed(2), clip_denoised=False)
    assert torch.allclose(by_mean["terms"], by_eps["terms"], rtol=1e-4, atol=1e-5)
    assert torch.allclose(by_mean["total"], by_eps["total"], rtol=1e-5)
    # ... and back: the mean diffusion's own eps of a mean output is the eps network's output
    x_t = torch.randn(4, 1, 4, 4)
    t = torch.tensor([0, 5, 100, 199])
    _, eps_back = mean_diffusion.model_x0_eps(mean_net(x_t, t)[:, :1], x_t, t)
    assert torch.allclose(eps_back[1:], eps_net(x_t, t)[1:, :1], atol=2e-3)  # t = 1: eps is undetermined (coef1 = 1)
