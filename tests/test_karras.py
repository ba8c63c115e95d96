"""EDM's samplers and the sigma-space view of a checkpoint, against the exact denoiser of Gaussian data.

For data N(mu, s^2) the exact denoiser is D(x; sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2): affine in x, so each
Heun step is affine and Algorithm 2 adds Gaussian noise, and the moments of the samples follow from a scalar
recursion computed here in float64 from the algorithms' definitions. The network is the exact eps-, x0- or
v-predictor of the discrete schedule (tests/test_gaussian.py), or a continuous-time one written here.
"""

import math

import numpy as np
import pytest
import torch

from ddpmlab.diffusion import GaussianDiffusion, get_sampler
from ddpmlab.diffusion.denoisers import DiscreteDenoiser, as_denoiser
from ddpmlab.diffusion.edm import EDMDiffusion
from ddpmlab.diffusion.karras import karras_sigmas, noise_levels
from ddpmlab.diffusion.samplers import check_sampler, network_calls
from ddpmlab.diffusion.schedules import cosine_betas, linear_betas
from ddpmlab.errors import ConfigError
from tests.test_gaussian import gaussian_oracle

MU, S = 0.3, 0.2


def exact_denoiser(x: float, sigma: float) -> float:
    return (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)


def continuous_oracle(diffusion: GaussianDiffusion, prediction: str = "eps"):
    """The exact network of N(MU, S^2) data at any real t, for the VP SDE whose -log alpha_bar is linear in t between
    the schedule's points (numpy's interp, independent of the adapter's own interpolation)."""
    table = -np.log(np.cumprod(1 - diffusion.betas64.numpy()))

    def model(x_t, t):
        alpha_bar = torch.from_numpy(np.exp(-np.interp(t.double().numpy(), np.arange(len(table)), table)))
        a, b = alpha_bar.sqrt().view(-1, 1, 1, 1), (1 - alpha_bar).sqrt().view(-1, 1, 1, 1)
        x_t = x_t.double()
        x0 = MU + a * S**2 / (a**2 * S**2 + b**2) * (x_t - a * MU)
        eps = (x_t - a * x0) / b
        return {"eps": eps, "x0": x0, "v": a * eps - b * x0}[prediction].float()

    return model


def exact_network(diffusion: EDMDiffusion):
    """The network F whose preconditioned D (Karras et al. eq. 7) is the exact denoiser: F = (D - c_skip x) / c_out,
    from EDM's Table 1 written out here."""
    d2 = diffusion.sigma_data**2

    def model(scaled, c_noise, **kwargs):
        sigma = (4 * c_noise.double()).exp().view(-1, 1, 1, 1)
        x = scaled.double() * (sigma**2 + d2).sqrt()
        denoised = (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)
        c_skip, c_out = d2 / (sigma**2 + d2), sigma * diffusion.sigma_data / (sigma**2 + d2).sqrt()
        return ((denoised - c_skip * x) / c_out).float()

    return model


def heun_moments(sigmas: list[float], churned=None, S_noise: float = 1.0) -> tuple[float, float]:
    """Mean and variance of Algorithm 1's (or, with churned[i] = sigma_hat_i, Algorithm 2's) output with the exact
    denoiser, from x_0 ~ N(0, sigmas[0]^2): every map is x -> A x + c, churn adds (sigma_hat^2 - sigma^2) S_noise^2."""
    m, v = 0.0, sigmas[0] ** 2
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        hat = churned[i] if churned else sigma
        v += (hat**2 - sigma**2) * S_noise**2
        a = S**2 / (S**2 + hat**2)  # D(x) = a x + (1 - a) MU
        h = sigma_next - hat
        slope, offset = 1 + h * (1 - a) / hat, -h * (1 - a) * MU / hat  # Euler
        if sigma_next > 0:
            a2 = S**2 / (S**2 + sigma_next**2)
            # d' = ((1 - a2) (slope x + offset) - (1 - a2) MU) / sigma_next; x_new = x + h (d + d') / 2
            d_slope, d_offset = (1 - a) / hat, -(1 - a) * MU / hat
            d2_slope, d2_offset = (1 - a2) * slope / sigma_next, (1 - a2) * (offset - MU) / sigma_next
            slope, offset = 1 + h * (d_slope + d2_slope) / 2, h * (d_offset + d2_offset) / 2
        m, v = slope * m + offset, slope**2 * v
    return m, v


@pytest.mark.parametrize(("prediction", "variance"), [("eps", "fixed_large"), ("x0", "fixed_large"),
                                                      ("v", "fixed_large"), ("eps", "learned_range")])
def test_the_adapter_is_the_exact_denoiser_at_every_trained_level(prediction, variance):
    """Also for an iDDPM network, whose extra output channels (the variance) the denoiser leaves aside."""
    learned = variance == "learned_range"
    diffusion = GaussianDiffusion(cosine_betas(200), prediction=prediction, variance=variance,
                                  loss="hybrid" if learned else "simple")
    model = gaussian_oracle(diffusion, MU, S, prediction, variance_output=0.3 if learned else None)
    denoiser = DiscreteDenoiser(model, diffusion, clip_denoised=False)
    alpha_bar = torch.cumprod(1 - diffusion.betas64, 0)
    x = torch.linspace(-3, 3, 7).view(7, 1, 1, 1)
    for i in (0, 1, 57, 150, 185):  # (at 199, sigma = 2e4: float32 cancellation in x_t's own eps -> x_0)
        sigma = math.sqrt((1 - alpha_bar[i].item()) / alpha_bar[i].item())  # x = x_t / sqrt(alpha_bar_t)
        assert denoiser.sigmas[i].item() == pytest.approx(sigma, rel=1e-12)
        got = denoiser(x * sigma, denoiser.sigmas[i].item())  # a trained level: diffusion.denoise at t = i
        expected = torch.tensor([exact_denoiser(v * sigma, sigma) for v in x.flatten().tolist()], dtype=torch.float64)
        assert torch.allclose(got.flatten().double(), expected, rtol=1e-4, atol=1e-5), i


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_between_trained_levels_the_network_runs_at_the_vp_sdes_fractional_t(prediction):
    """sigma between two trained levels: the network at the t where log(1 + sigma^2) interpolates the schedule
    (the continuous oracle is exact there), read with that alpha_bar: the exact denoiser at any sigma. At a trained
    level the same path (a tensor sigma) gives what diffusion.denoise gives."""
    diffusion = GaussianDiffusion(linear_betas(100, beta_end=0.05), prediction=prediction)
    denoiser = DiscreteDenoiser(continuous_oracle(diffusion, prediction), diffusion, clip_denoised=False)
    sigmas = torch.tensor([0.02, 0.3, 1.7, 3.0], dtype=torch.float64)  # sigma_max = 3.4
    assert not any(s in denoiser.level_of for s in sigmas.tolist())
    x = torch.tensor([-0.5, 0.1, 2.0, 9.0]).view(4, 1, 1, 1)
    got = denoiser(x, sigmas).flatten().double()
    expected = torch.tensor([exact_denoiser(v, s) for v, s in zip(x.flatten().tolist(), sigmas.tolist())],
                            dtype=torch.float64)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    t = denoiser.t_of(sigmas)
    assert bool(((t > 0) & (t < 99) & (t != t.round())).all())
    levels = denoiser.sigmas[[3, 40, 90]]
    discrete = DiscreteDenoiser(gaussian_oracle(diffusion, MU, S, prediction), diffusion, clip_denoised=False)
    on_levels = torch.stack([discrete(x[:1], s) for s in levels.tolist()]).flatten()
    assert torch.allclose(denoiser(x[:1].expand(3, 1, 1, 1), levels).flatten(), on_levels, rtol=1e-4, atol=1e-5)


def test_a_sigma_between_levels_rounds_to_the_nearest_in_log_sigma_and_schedules_use_only_trained_levels():
    diffusion = GaussianDiffusion(linear_betas(1000))
    denoiser = as_denoiser(None, diffusion)
    levels = denoiser.sigmas
    for i in (0, 10, 500, 998):
        mid = math.sqrt(levels[i].item() * levels[i + 1].item())  # the geometric mean: equal in log sigma
        assert denoiser.round_sigma(mid * (1 - 1e-9)) == levels[i].item()
        assert denoiser.round_sigma(mid * (1 + 1e-9)) == levels[i + 1].item()
    assert denoiser.round_sigma(1e-6) == levels[0].item() and denoiser.round_sigma(1e6) == levels[-1].item()
    for steps in (1, 2, 18, 100):
        sigmas = noise_levels(denoiser, steps, 7.0, 0.002, 80.0)
        assert len(sigmas) == steps + 1 and sigmas[-1] == 0.0
        assert all(s in denoiser.level_of for s in sigmas[:-1])
        assert all(a >= b for a, b in zip(sigmas, sigmas[1:]))
    # the range: sigma_min = max(0.002, the checkpoint's smallest), sigma_max = the level nearest 80
    sigmas = noise_levels(denoiser, 18, 7.0, 0.002, 80.0)
    assert sigmas[-2] == levels[0].item() and abs(math.log(sigmas[0] / 80.0)) < 0.01


def test_karras_sigmas_are_eq_5():
    sigmas = karras_sigmas(5, 0.002, 80.0, 7.0)
    assert sigmas[0] == pytest.approx(80.0) and sigmas[4] == pytest.approx(0.002) and sigmas[5] == 0.0
    hi, lo = 80.0 ** (1 / 7), 0.002 ** (1 / 7)
    assert sigmas[2] == pytest.approx((hi + 0.5 * (lo - hi)) ** 7)


@pytest.mark.parametrize("steps", [18, 40])
def test_heun_on_a_ddpm_checkpoint_matches_its_exact_moments(steps):
    n = 20_000
    diffusion = GaussianDiffusion(linear_betas(1000))
    x = get_sampler("heun")(gaussian_oracle(diffusion, MU, S), diffusion, (n, 1, 1, 1),
                            torch.Generator().manual_seed(0), steps=steps)
    m, v = heun_moments(noise_levels(as_denoiser(None, diffusion), steps, 7.0, 0.002, 80.0))
    assert x.mean().item() == pytest.approx(m, abs=4 * math.sqrt(v / n))
    assert x.var().item() == pytest.approx(v, abs=4 * v * math.sqrt(2 / n))


def test_heun_reaches_the_data_distribution_as_steps_grow():
    """The exact moments of Heun's output with the exact denoiser: the error in mean and variance shrinks with N
    (second order), to the prior's mismatch (N(0, sigma_max^2) for data + sigma_max noise: a few 1e-3 of mu at
    sigma_max = 80) and the last level's leftover noise (sigma_min = 0.01 on the linear schedule)."""
    denoiser = as_denoiser(None, GaussianDiffusion(linear_betas(1000)))
    errors = []
    for steps in (4, 8, 16, 32, 64):
        m, v = heun_moments(noise_levels(denoiser, steps, 7.0, 0.002, 80.0))
        errors.append((abs(m - MU), abs(v - S**2)))
    assert all(b[1] < a[1] for a, b in zip(errors, errors[1:])), errors
    assert errors[-1][1] < 0.01 * S**2 and errors[-1][0] < 0.002
    assert errors[0][1] > 0.2 * S**2  # 4 steps are far off: the test sees the convergence


def test_edm_sampler_matches_its_exact_moments_and_without_churn_is_heun():
    n, steps = 20_000, 12
    diffusion = GaussianDiffusion(linear_betas(1000))
    denoiser = as_denoiser(None, diffusion)
    model = gaussian_oracle(diffusion, MU, S)
    shape, options = (n, 1, 1, 1), {"S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.003}
    x = get_sampler("edm", **options)(model, diffusion, shape, torch.Generator().manual_seed(1), steps=steps)
    sigmas = noise_levels(denoiser, steps, 7.0, 0.002, 80.0)
    gamma = min(40.0 / steps, math.sqrt(2) - 1)
    churned = [denoiser.round_sigma(s * (1 + gamma)) if 0.05 <= s <= 50.0 else s for s in sigmas[:-1]]
    assert any(h > s for h, s in zip(churned, sigmas))
    m, v = heun_moments(sigmas, churned, 1.003)
    assert x.mean().item() == pytest.approx(m, abs=4 * math.sqrt(v / n))
    assert x.var().item() == pytest.approx(v, abs=4 * v * math.sqrt(2 / n))
    no_churn = get_sampler("edm", S_churn=0.0)(model, diffusion, (64, 1, 2, 2), torch.Generator().manual_seed(2), steps=7)
    heun = get_sampler("heun")(model, diffusion, (64, 1, 2, 2), torch.Generator().manual_seed(2), steps=7)
    assert torch.equal(no_churn, heun)


def test_an_edm_checkpoint_samples_the_data_distribution_with_heun_and_its_moments_with_churn():
    """An EDM checkpoint: the preconditioned D of the exact network F is the exact denoiser at every sigma, so Heun's
    samples have the data's moments; Algorithm 2's have those of its recursion (its churn, at the maximum gamma here,
    converges only once N > S_churn / (sqrt(2) - 1))."""
    n, steps = 20_000, 32
    diffusion = EDMDiffusion()
    network = exact_network(diffusion)
    x = get_sampler("heun")(network, diffusion, (n, 1, 1, 1), torch.Generator().manual_seed(3), steps=steps)
    assert x.mean().item() == pytest.approx(MU, abs=4 * S / math.sqrt(n) + 0.002)
    assert x.var().item() == pytest.approx(S**2, abs=4 * S**2 * math.sqrt(2 / n) + 0.01 * S**2)
    x = get_sampler("edm")(network, diffusion, (n, 1, 1, 1), torch.Generator().manual_seed(4), steps=steps)
    sigmas = karras_sigmas(steps, 0.002, 80.0, 7.0)
    gamma = min(30.0 / steps, math.sqrt(2) - 1)  # the defaults: S_churn 30, S_tmin 0.01, S_tmax 1, S_noise 1.007
    m, v = heun_moments(sigmas, [s * (1 + gamma) if 0.01 <= s <= 1.0 else s for s in sigmas[:-1]], 1.007)
    assert x.mean().item() == pytest.approx(m, abs=4 * math.sqrt(v / n))
    assert x.var().item() == pytest.approx(v, abs=4 * v * math.sqrt(2 / n))
    sigma = torch.tensor([0.002, 0.1, 3.0, 80.0])
    values = torch.tensor([0.25, -1.0, 4.0, 100.0]).view(4, 1, 1, 1)
    got = diffusion.denoise(network, values, sigma)[0].flatten()
    expected = [exact_denoiser(v, s) for v, s in zip(values.flatten().tolist(), sigma.tolist())]
    assert got.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(("sampler", "steps"), [("heun", 1), ("heun", 6), ("edm", 6), ("heun", None),
                                                ("ddim", 9), ("dpm_solver", 9), ("ancestral", None)])
def test_network_calls_counts_what_a_sampler_calls(sampler, steps):
    diffusion = GaussianDiffusion(linear_betas(50, beta_end=0.3))
    oracle, calls = gaussian_oracle(diffusion, MU, S), []

    def counting(x_t, t):
        calls.append(1)
        return oracle(x_t, t)

    get_sampler(sampler)(counting, diffusion, (2, 1, 1, 1), torch.Generator().manual_seed(0), steps=steps)
    assert len(calls) == network_calls(sampler, steps, 50)
    assert network_calls("heun", 18, 1000) == 35 and network_calls("heun", None, 1000) == 35


def test_samplers_report_each_step_with_its_x0():
    diffusion = GaussianDiffusion(linear_betas(50, beta_end=0.3))
    seen = []
    get_sampler("heun")(gaussian_oracle(diffusion, MU, S), diffusion, (3, 1, 1, 1), steps=5,
                        on_step=lambda i, x, x_0: seen.append((i, x.shape, x_0.shape)))
    assert [i for i, _, _ in seen] == [4, 3, 2, 1, 0] and all(a == b == (3, 1, 1, 1) for _, a, b in seen)


@pytest.mark.parametrize(("options", "steps", "message"), [
    ({"S_churn": -1.0}, 10, "edm.S_churn=-1.0 must be >= 0"),
    ({"S_noise": 0.0}, 10, "edm.S_noise=0.0 must be positive"),
    ({"rho": 0.0}, 10, "edm.rho=0.0 must be positive"),
    ({"sigma_min": 5.0, "sigma_max": 1.0}, 10, "edm.sigma_min=5.0 must be in"),
    ({}, 0, "sampling_steps=0 must be a positive integer"),
    ({"sigma_min": 200.0, "sigma_max": 300.0}, 10, "lie outside the sampler's edm.sigma_min=200"),
])
def test_edm_settings_out_of_range_are_refused_before_any_network_call(options, steps, message):
    diffusion = GaussianDiffusion(linear_betas(1000))

    def never(x_t, t):
        raise AssertionError("the network was called")

    with pytest.raises(ConfigError, match=message):
        check_sampler("edm", steps, diffusion, options)
    with pytest.raises(ConfigError, match=message):
        get_sampler("edm", **options)(never, diffusion, (2, 1, 1, 1), steps=steps)


def test_a_ddpm_sampler_on_an_edm_checkpoint_is_refused():
    for name in ("ancestral", "respaced", "ddim", "dpm_solver"):
        with pytest.raises(ConfigError, match=f"sampler={name} is a discrete-time DDPM sampler"):
            check_sampler(name, 10, EDMDiffusion())
    check_sampler("heun", 10, EDMDiffusion())
    check_sampler("edm", None, EDMDiffusion())
