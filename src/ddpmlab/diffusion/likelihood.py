"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, arXiv 2011.13456, section 4.3 and
appendix D), for any denoiser D(x; sigma) (ddpmlab.diffusion.denoisers): DDPM/iDDPM checkpoints as the VP SDE of
their schedule, EDM ones as they are.

In sigma space the ODE is dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, eq. 1), and by the
instantaneous change of variables (Chen et al. 2018, Theorem 1)

    log p_{sigma_min}(x) = log p_{sigma_max}(x(sigma_max)) + int_{sigma_min}^{sigma_max} div_x dx/dsigma dsigma.

It is integrated in s = ln sigma, where both parts are O(1): dx/ds = x - D(x; e^s) and the divergence term is
d/ds = n - tr(dD/dx), n the number of dimensions. The trace is Hutchinson-Skilling's estimate (Hutchinson 1990,
Skilling 1989): tr J ~ mean over probes e of e^T J e, with Rademacher or Gaussian probes fixed for the whole solve
(FFJORD's choice: a smooth integrand for the adaptive solver), e^T J by one backward pass each.

The solver is Dormand & Prince's 5(4) pair with the step-size control of Hairer, Norsett & Wanner (Solving ODEs I,
II.4), the method scipy.integrate.solve_ivp calls RK45, written for a batch: each example has its own step size,
accepted or rejected by its own error norm, so its result does not depend on which examples share its batch (a
batch integrated as one system would share one step sequence).
"""

import math

import torch
from torch import Tensor

from ddpmlab.diffusion.edm import uniform
from ddpmlab.diffusion.noise import Generator, randint, randn
from ddpmlab.errors import ConfigError

# Dormand & Prince 1980, RK5(4)7M: nodes C, stages A, 5th-order weights B, and E = (5th - 4th order) incl. FSAL stage.
C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
A = ((),
     (1 / 5,),
     (3 / 40, 9 / 40),
     (44 / 45, -56 / 15, 32 / 9),
     (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
     (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656))
B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
E = (-71 / 57600, 0.0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40)
SAFETY, MIN_FACTOR, MAX_FACTOR = 0.9, 0.2, 10.0
PROBES = ("rademacher", "gaussian")


def cost_per_image(denoiser, probes: int) -> int:
    """Network passes an image costs, for evaluate.py's estimate before a batch has timed itself: the denoiser's
    typical function evaluations at rtol = atol = 1e-5, each one forward pass and `probes` backward passes of about
    two forward passes' work."""
    return denoiser.typical_ode_evaluations * (1 + 2 * probes)


def _rms(x: Tensor) -> Tensor:
    return x.pow(2).mean(1).sqrt()


def solve_dopri5(f, y0: Tensor, t0: float, t1: float, rtol: float, atol: float,
                 max_evaluations: int = 100_000) -> tuple[Tensor, Tensor]:
    """Integrate dy/dt = f(t, y) from t0 to t1 > t0 for a batch y0 (B, n), every example with its own adaptive steps.

    f(t (b,), y (b, n), rows (b,)) -> (b, n) is called on the examples still running, `rows` their positions in the
    batch. Error control as scipy's RK45: the RMS
    norm of the error estimate over atol + rtol max(|y|, |y_new|), a step accepted below 1, the next step size
    h min(10, 0.9 norm^(-1/5)) (after a rejection in the same step at most h), a rejected one shrunk by
    max(0.2, 0.9 norm^(-1/5)); the first step by Hairer et al.'s rule (one more evaluation).
    Returns (y at t1 (B, n), function evaluations per example (B,))."""
    y0 = y0.double()
    batch = len(y0)
    t = torch.full((batch,), t0, dtype=torch.float64, device=y0.device)
    everyone = torch.arange(batch, device=y0.device)
    y, k1 = y0.clone(), f(t, y0, everyone)
    calls = torch.ones(batch, dtype=torch.long, device=y0.device)
    # initial step (Hairer, Norsett & Wanner, II.4): from the sizes of y0, f0 and f's change over a tiny step
    scale = atol + y0.abs() * rtol
    d0, d1 = _rms(y0 / scale), _rms(k1 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1).clamp(max=t1 - t0)
    f1 = f(t + h0, y0 + h0[:, None] * k1, everyone)
    calls += 1
    d2 = _rms((f1 - k1) / scale) / h0
    h1 = torch.where((d1 <= 1e-15) & (d2 <= 1e-15), (h0 * 1e-3).clamp(min=1e-6),
                     (0.01 / torch.maximum(d1, d2)) ** (1 / 5))
    h = torch.minimum(torch.minimum(100 * h0, h1), torch.full_like(h0, t1 - t0))
    rejected = torch.zeros(batch, dtype=torch.bool, device=y0.device)
    while True:
        active = (t < t1).nonzero().flatten()
        if not len(active):
            return y, calls
        if int(calls.max()) > max_evaluations:
            raise ConfigError(f"the probability-flow ODE needed more than {max_evaluations} network calls for one "
                              "image: raise nll_ode.rtol and nll_ode.atol")
        ta, ya, ha = t[active], y[active], h[active]
        min_step = 10 * (torch.nextafter(ta, torch.full_like(ta, math.inf)) - ta)
        if bool((ha < min_step).any()):
            raise ConfigError("the probability-flow ODE's step size fell below the float64 resolution of its time: "
                              "the network's output is not smooth enough at this tolerance; raise nll_ode.rtol")
        t_new = torch.minimum(ta + ha, torch.full_like(ta, t1))
        ha = t_new - ta
        stages = [k1[active]]
        for c, a in zip(C[1:], A[1:]):
            dy = sum(w * k for w, k in zip(a, stages))
            stages.append(f(ta + c * ha, ya + ha[:, None] * dy, active))
        y_new = ya + ha[:, None] * sum(w * k for w, k in zip(B, stages))
        k_new = f(t_new, y_new, active)
        calls[active] += 6
        error = ha[:, None] * sum(w * k for w, k in zip(E, [*stages, k_new]))
        norm = _rms(error / (atol + torch.maximum(ya.abs(), y_new.abs()) * rtol))
        accept = norm < 1
        factor = torch.where(norm == 0, torch.full_like(norm, MAX_FACTOR),
                             (SAFETY * norm.pow(-1 / 5)).clamp(max=MAX_FACTOR))
        grow = torch.where(rejected[active], factor.clamp(max=1.0), factor)
        shrink = (SAFETY * norm.pow(-1 / 5)).clamp(min=MIN_FACTOR)
        h[active] = ha * torch.where(accept, grow, shrink)
        rejected[active] = ~accept
        done = active[accept]
        t[done], y[done], k1[done] = t_new[accept], y_new[accept], k_new[accept]


def dequantize(images: Tensor, generator: Generator = None) -> Tensor:
    """8-bit images (B, C, H, W) -> continuous points in the model's range, uniform in each pixel's bin: value k
    (k / 127.5 - 1, as data.to_model_range gives the network) becomes k / 127.5 - 1 + (u - 1/2) 2/255, u ~ U(0, 1).

    Song et al. 2021's uniform dequantisation (appendix D) on this project's grid: the bins are those of the
    discretized decoder of Ho et al.'s bound (eq. 13), so the ODE's likelihood and the bound price the same
    discretisation; their (k + u) / 256 is the same on their own grid."""
    u = uniform((images[0].numel(), images.shape[0]), generator, images.device).T.reshape(images.shape)
    return (images.double() + u - 0.5) / 127.5 - 1.0


def bits_per_dim(log_likelihood: Tensor, dims: int) -> Tensor:
    """-log P of the 8-bit image per dimension in bits, from the density of its dequantised point (nats): each bin
    has width 2/255, so P(k) >= p(y) (2/255)^n (Jensen, over the uniform noise: an upper bound on bits/dim)."""
    return -log_likelihood / (dims * math.log(2.0)) + math.log2(255 / 2)


@torch.enable_grad()
def _rates(denoiser, x: Tensor, sigma: Tensor, probes: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """(dx/ds, d/ds of the divergence integral) at x (b, n) and sigma (b,): x - D and n - tr(dD/dx), the trace by
    Hutchinson-Skilling over the K probes (K, b, n), one backward pass each."""
    inputs = x.detach().float().requires_grad_(True)
    x_0 = denoiser(inputs.view(-1, *shape), sigma).reshape(inputs.shape)
    traces = []
    for k, e in enumerate(probes):
        (vjp,) = torch.autograd.grad(x_0, inputs, e.float(), retain_graph=k < len(probes) - 1)  # e^T dD/dx
        traces.append((vjp.double() * e).sum(1))
    return x - x_0.detach().double(), x.shape[1] - torch.stack(traces).mean(0)


def ode_log_likelihood(denoiser, x: Tensor, generator: Generator = None, rtol: float = 1e-5, atol: float = 1e-5,
                       probes: int = 1, probe: str = "rademacher") -> tuple[Tensor, Tensor]:
    """log p(x) in nats of the model's density at sigma_min, for continuous points x (B, C, H, W), by the
    probability-flow ODE from sigma = denoiser.sigma_min to sigma_max and the denoiser's prior
    N(0, prior_variance I) there. Returns (log-likelihoods (B,), network calls per example (B,): forward passes,
    each with `probes` backward passes). Probes come from `generator` (per example with an ExampleNoise)."""
    if probe not in PROBES:
        raise ConfigError(f"nll_ode.probe={probe!r} is unknown: choose one of {', '.join(PROBES)}")
    batch, shape, n = x.shape[0], tuple(x.shape[1:]), x[0].numel()
    e = randn((batch, probes * n), generator, x.device) if probe == "gaussian" else \
        (randint(2, (probes * n, batch), generator, x.device).T * 2 - 1).float()
    e = e.reshape(batch, probes, n).transpose(0, 1).double()  # (K, B, n), fixed for the whole solve

    def f(s: Tensor, y: Tensor, rows: Tensor) -> Tensor:  # y (b, n + 1): the image, then the divergence integral
        dx, ddiv = _rates(denoiser, y[:, :n], s.exp(), e[:, rows], shape)
        return torch.cat([dx, ddiv[:, None]], 1)

    y0 = torch.cat([x.reshape(batch, n).double(), torch.zeros(batch, 1, dtype=torch.float64, device=x.device)], 1)
    y, calls = solve_dopri5(f, y0, math.log(denoiser.sigma_min), math.log(denoiser.sigma_max), rtol, atol)
    x_end, divergence = y[:, :n], y[:, n]
    variance = denoiser.prior_variance
    prior = -0.5 * (x_end.pow(2).sum(1) / variance + n * math.log(2 * math.pi * variance))
    return prior + divergence, calls
