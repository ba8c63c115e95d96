import math

import pytest
import torch

from ddpmlab.diffusion.schedules import cosine_betas, linear_betas, sigmoid_betas
from ddpmlab.errors import ConfigError


def test_linear_schedule_is_the_papers():
    betas = linear_betas(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))


def test_cosine_alpha_bar_matches_closed_form():
    T, s = 1000, 0.008
    alpha_bar = torch.cumprod(1 - cosine_betas(T, s=s), 0)
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = torch.tensor([f(t / T) / f(0) for t in range(1, T + 1)], dtype=torch.float64)
    # Clipping at 0.999 only touches the last few steps, where alpha_bar is ~0 anyway.
    unclipped = cosine_betas(T, s=s) < 0.999
    assert unclipped[: T - 5].all()
    assert torch.allclose(alpha_bar[unclipped], expected[unclipped], rtol=1e-10, atol=1e-12)
    assert cosine_betas(T).max().item() == pytest.approx(0.999)


def test_sigmoid_alpha_bar_matches_closed_form_and_decreases():
    T, start, end, tau = 500, -3.0, 3.0, 1.0
    betas = sigmoid_betas(T, start=start, end=end, tau=tau)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    gamma = lambda u: (sig(end / tau) - sig((u * (end - start) + start) / tau)) / (sig(end / tau) - sig(start / tau))  # noqa: E731
    alpha_bar = torch.cumprod(1 - betas, 0)
    expected = torch.tensor([gamma(t / T) for t in range(1, T)], dtype=torch.float64)
    assert torch.allclose(alpha_bar[:-1], expected, rtol=1e-9)
    assert (alpha_bar.diff() < 0).all() and (betas > 0).all() and (betas <= 0.999).all()


@pytest.mark.parametrize("schedule", [linear_betas, cosine_betas, sigmoid_betas])
@pytest.mark.parametrize("timesteps", [0, -5, 2.5])
def test_non_positive_or_fractional_timesteps_are_refused(schedule, timesteps):
    with pytest.raises(ConfigError, match="schedule.timesteps must be a positive integer"):
        schedule(timesteps)
