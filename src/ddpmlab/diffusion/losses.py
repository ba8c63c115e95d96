"""The two densities the variational bound is made of: Gaussian KL and the discretized Gaussian decoder."""

import torch
from torch import Tensor


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats (the L_{t-1} and L_T terms, eq. 5)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log p(x) per element for 8-bit data scaled to [-1, 1] under N(mean, e^{2 log_scale}) (Ho et al. eq. 13).

    Each of the 256 levels owns the bin [x - 1/255, x + 1/255]; the edge bins are open (to -inf at x = -1,
    to +inf at x = 1). Computed in float64 with the exact normal CDF, and the bin mass taken on the tail
    side of the mean so it does not cancel away.
    """
    x, mean, inv_std = x.double(), mean.double(), torch.exp(-log_scale.double())
    upper = inv_std * (x - mean + 1.0 / 255.0)
    lower = inv_std * (x - mean - 1.0 / 255.0)
    # P(lower < z < upper) = Phi(upper) - Phi(lower) = Phi(-lower) - Phi(-upper): use the side away from 1 - tiny.
    mass = torch.where(lower > 0, torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
                       torch.special.ndtr(upper) - torch.special.ndtr(lower))
    log_prob = torch.where(
        x < -0.999,
        torch.special.log_ndtr(upper),  # the bottom bin: (-inf, -1 + 1/255]
        torch.where(x > 0.999, torch.special.log_ndtr(-lower), torch.log(mass.clamp(min=1e-300))),
    )
    return log_prob.float()
