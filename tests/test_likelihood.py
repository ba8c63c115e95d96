"""The exact likelihood through the probability-flow ODE: the batched solver against scipy's RK45, and the
log-likelihood of Gaussian data (full covariance, and through a DDPM schedule's sigma-space view) against its
closed form."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from ddpmlab.diffusion import GaussianDiffusion
from ddpmlab.diffusion.denoisers import DiscreteDenoiser
from ddpmlab.diffusion.likelihood import bits_per_dim, dequantize, ode_log_likelihood, solve_dopri5
from ddpmlab.diffusion.noise import ExampleNoise
from ddpmlab.diffusion.schedules import linear_betas
from tests.test_karras import MU, S, continuous_oracle

RATES = torch.tensor([0.5, 2.0, 5.0], dtype=torch.float64)


def forced(t, y, rows):
    """A nonlinear ODE whose forcing differs per example: y' = -y^3 + k sin(3t)."""
    return -y**3 + torch.sin(3 * t)[:, None] * RATES[rows][:, None]


def test_the_batched_solver_is_scipys_rk45_example_by_example():
    y0 = torch.tensor([[1.0, 0.2], [0.3, -1.0], [2.0, 0.5]], dtype=torch.float64)
    y, calls = solve_dopri5(forced, y0, 0.0, 4.0, rtol=1e-6, atol=1e-8)
    for b in range(3):
        k = RATES[b].item()
        reference = solve_ivp(lambda t, u: -u**3 + np.sin(3 * t) * k, (0.0, 4.0), y0[b].numpy(), method="RK45",
                              rtol=1e-6, atol=1e-8)
        assert y[b].numpy() == pytest.approx(reference.y[:, -1], rel=1e-10, abs=1e-12)
        assert calls[b].item() == reference.nfev  # the same steps, accepted and rejected alike
    assert len(set(calls.tolist())) == 3  # each example took its own number of steps
    alone, calls_alone = solve_dopri5(lambda t, u, rows: forced(t, u, rows + 1), y0[1:2], 0.0, 4.0, 1e-6, 1e-8)
    assert torch.equal(alone[0], y[1]) and calls_alone[0] == calls[1]  # its batch does not change its result


def gaussian_model(mean: torch.Tensor, cov: torch.Tensor, sigma_min: float, sigma_max: float, prior_variance: float):
    """The exact denoiser of N(mean, cov) data, D = mean + cov (cov + sigma^2 I)^-1 (x - mean), as a denoiser."""
    n = len(mean)

    class Gaussian:
        def __init__(self):
            self.sigma_min, self.sigma_max, self.prior_variance = sigma_min, sigma_max, prior_variance

        def __call__(self, x, sigma):
            flat = x.reshape(len(x), n).double()
            gain = cov @ torch.linalg.inv(cov + sigma.double().view(-1, 1, 1) ** 2 * torch.eye(n, dtype=torch.float64))
            return (mean + ((flat - mean)[:, None, :] @ gain.transpose(1, 2))[:, 0]).to(x.dtype).view(x.shape)

    return Gaussian()


def exact_log_likelihood(x: torch.Tensor, mean, cov, sigma_min: float, sigma_max: float, prior_variance: float):
    """The model's log p(x) in closed form: the exact flow is x(sigma) - mean = (cov + sigma^2)^(1/2)
    (cov + sigma_min^2)^(-1/2) (x - mean), its divergence integral sum_j 1/2 ln((l_j + sigma_max^2) / (l_j + sigma_min^2))
    over cov's eigenvalues l_j, and the prior N(0, prior_variance I) at sigma_max."""
    values, vectors = torch.linalg.eigh(cov)
    flow = vectors @ torch.diag(((values + sigma_max**2) / (values + sigma_min**2)).sqrt()) @ vectors.T
    end = mean + (x - mean) @ flow.T
    n = len(mean)
    prior = -0.5 * (end.pow(2).sum(1) / prior_variance + n * math.log(2 * math.pi * prior_variance))
    return prior + 0.5 * torch.log((values + sigma_max**2) / (values + sigma_min**2)).sum()


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_the_log_likelihood_of_correlated_gaussian_data_is_its_closed_form(probe):
    """A full covariance: the Jacobian is not diagonal, so the Hutchinson estimate is noisy per image and the mean
    over images must match within its standard error; with 4 probes it is tighter."""
    torch.manual_seed(0)
    n, batch = 4, 48
    a = torch.randn(n, n, dtype=torch.float64)
    cov = a @ a.T / n + 0.05 * torch.eye(n, dtype=torch.float64)
    mean = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64)
    x = mean + torch.randn(batch, n, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    model = gaussian_model(mean, cov, 0.01, 80.0, 80.0**2)
    exact = exact_log_likelihood(x, mean, cov, 0.01, 80.0, 80.0**2)
    spreads = []
    for probes in (1, 4):
        log_p, calls = ode_log_likelihood(model, x.view(batch, 1, 2, 2), ExampleNoise(range(batch), 5), 1e-6, 1e-6,
                                          probes, probe)
        error = log_p - exact
        spreads.append(error.std().item())
        assert error.mean().item() == pytest.approx(0.0, abs=4 * error.std().item() / math.sqrt(batch))
        assert bool((calls > 50).all())
    assert spreads[1] < spreads[0]  # more probes, less spread: the estimator is Hutchinson's, and it is tested
    assert spreads[0] > 0.05  # ...and noisy: a test that a silently exact trace would not pass unchanged


def test_through_a_ddpm_schedule_the_vp_sde_gives_the_closed_form_likelihood():
    """A discrete linear schedule (T = 1000) in sigma space, the exact network of N(MU, S^2) data at every (also
    fractional) t: its ODE from sigma_1 to sigma_T with the VP prior N(0, 1 + sigma_T^2) in x = x_T / sqrt(alpha_bar_T)
    (N(0, I) in x_T). An isotropic Jacobian: Rademacher's estimate of its trace is exact, so only the solver's
    tolerance is left. Close to the data's own density convolved with sigma_1's noise."""
    diffusion = GaussianDiffusion(linear_betas(1000))
    denoiser = DiscreteDenoiser(continuous_oracle(diffusion), diffusion, clip_denoised=False)
    n, batch = 4, 6
    x = MU + S * torch.randn(batch, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    log_p, calls = ode_log_likelihood(denoiser, x.view(batch, 1, 2, 2), ExampleNoise(range(batch), 0), 1e-6, 1e-6)
    cov, mean = S**2 * torch.eye(n, dtype=torch.float64), torch.full((n,), MU, dtype=torch.float64)
    exact = exact_log_likelihood(x, mean, cov, denoiser.sigma_min, denoiser.sigma_max, 1 + denoiser.sigma_max**2)
    assert log_p.numpy() == pytest.approx(exact.numpy(), abs=2e-3)
    data = -0.5 * ((x - MU).pow(2).sum(1) / (S**2 + denoiser.sigma_min**2) + n * math.log(2 * math.pi * (S**2 + 1e-4)))
    assert log_p.numpy() == pytest.approx(data.numpy(), abs=0.01)  # the prior's mismatch is small at sigma_T = 157


def test_dequantisation_fills_each_pixels_bin_and_the_bits_count_the_bin():
    images = torch.tensor([0, 1, 128, 255], dtype=torch.uint8).view(1, 1, 2, 2).expand(500, 1, 2, 2)
    y = dequantize(images, ExampleNoise(range(500), 0))
    centre = images.double() / 127.5 - 1
    assert bool(((y - centre).abs() <= 1 / 255).all())
    assert (y - centre).abs().max().item() > 0.99 / 255  # it reaches the bin's edges
    assert (y - centre).mean().item() == pytest.approx(0.0, abs=1e-4)
    # a density uniform over every bin, 1 / (2 + 2/255)^n: each of the 256^n images gets 256^-n, 8 bits/dim
    uniform = torch.full((1,), -4 * math.log(2 + 2 / 255), dtype=torch.float64)
    assert bits_per_dim(uniform, 4).item() == pytest.approx(8.0, abs=1e-12)
