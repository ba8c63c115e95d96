"""Beta schedules beta_1..beta_T, always in float64.

Each schedule is a pure function `(timesteps, **params) -> betas` of shape (T,).
Configs under `conf/schedule/` name one of them with `_target_`.
"""

import math
from collections.abc import Callable

import torch

from ddpmlab.errors import ConfigError


def _check_timesteps(timesteps: int) -> None:
    if not isinstance(timesteps, int) or isinstance(timesteps, bool) or timesteps <= 0:
        raise ConfigError(
            f"schedule.timesteps must be a positive integer, got {timesteps!r}: "
            "set schedule.timesteps=1000 (the DDPM paper's T)"
        )


def betas_from_alpha_bar(
    alpha_bar: Callable[[torch.Tensor], torch.Tensor], timesteps: int, max_beta: float = 0.999
) -> torch.Tensor:
    """Discretise a continuous alpha-bar(s), s in [0, 1], into T betas.

    beta_t = min(1 - alpha_bar(t / T) / alpha_bar((t - 1) / T), max_beta)
    (Nichol & Dhariwal 2021, eq. 17 and the clipping at 0.999 that follows it).
    """
    s = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    a = alpha_bar(s)
    return (1.0 - a[1:] / a[:-1]).clamp(max=max_beta)


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Linear betas from beta_start to beta_end (Ho et al. 2020, section 4: 1e-4 to 0.02, T=1000)."""
    _check_timesteps(timesteps)
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ConfigError(
            f"schedule needs 0 < beta_start <= beta_end < 1, got {beta_start} and {beta_end}: "
            "the paper uses beta_start=1e-4 beta_end=0.02"
        )
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def given_betas(betas: list[float], timesteps: int | None = None) -> torch.Tensor:
    """Betas listed one by one (a schedule imported from another format, e.g. diffusers' trained_betas);
    `timesteps`, when set, is T and must be their count."""
    betas = torch.as_tensor(list(betas), dtype=torch.float64)
    if betas.ndim != 1 or not len(betas) or not bool(((betas > 0) & (betas < 1)).all()):
        raise ConfigError("schedule.betas must be a non-empty list of numbers in (0, 1)")
    if timesteps is not None and timesteps != len(betas):
        raise ConfigError(f"schedule.timesteps={timesteps} but schedule.betas lists {len(betas)} betas: set "
                          f"schedule.timesteps={len(betas)}")
    return betas


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule: alpha_bar(u) = f(u) / f(0), f(u) = cos((u + s) / (1 + s) * pi / 2)^2.

    Nichol & Dhariwal 2021, eq. 17, with s = 0.008 and betas clipped at 0.999.
    """
    _check_timesteps(timesteps)

    def f(u: torch.Tensor) -> torch.Tensor:
        return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return betas_from_alpha_bar(lambda u: f(u) / f(torch.zeros((), dtype=torch.float64)), timesteps, max_beta)


def sigmoid_betas(
    timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = 0.999
) -> torch.Tensor:
    """Sigmoid schedule: alpha_bar(u) = (sig(end/tau) - sig((u (end - start) + start)/tau)) / (sig(end/tau) - sig(start/tau)).

    Jabri et al. 2022 (arXiv 2212.11972), Algorithm 1, as studied by Chen 2023 (arXiv 2301.10972);
    defaults start=-3, end=3, tau=1. alpha_bar(0) = 1 and alpha_bar(1) = 0; the last beta is clipped.
    """
    _check_timesteps(timesteps)
    if not end > start or tau <= 0:
        raise ConfigError(f"sigmoid schedule needs end > start and tau > 0, got start={start} end={end} tau={tau}")
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))

    def alpha_bar(u: torch.Tensor) -> torch.Tensor:
        return (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)

    return betas_from_alpha_bar(alpha_bar, timesteps, max_beta)
