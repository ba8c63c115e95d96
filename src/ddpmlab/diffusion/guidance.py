"""Class conditioning and classifier-free guidance as wrappers of the network.

Samplers, the bound and the grids call a model as `model(x_t, t)`; a class-conditional network is
`net(x_t, t, y=labels)` (a keyword, which a wrapper such as a preconditioning can pass on to the network it wraps). `conditioned(net, y)` and `guided(net, y, w)` turn the second into the first, so every
sampler guides without a change of its own. Labels are indices in [0, N) for N classes, and N itself is
"no class" (models.UNet's extra embedding row), the unconditional model of Ho & Salimans 2022 (arXiv 2207.12598).
"""

import torch
from torch import Tensor


def drop_labels(y: Tensor | None, null_label: int, p: float) -> Tensor | None:
    """Each label replaced by `null_label` ("no class") with probability p, independently per example (Ho &
    Salimans 2022, Algorithm 1: c <- none with probability p_uncond). Drawn from the global RNG, as t and eps are:
    per DDP rank, and restored on resume. No labels, or p = 0: no draw."""
    if y is None or not p:
        return y
    return torch.where(torch.rand(y.shape, device=y.device) < p, torch.full_like(y, null_label), y)


def conditioned(net, labels: Tensor | None):
    """`net` as a callable (x_t, t) -> output that conditions every call on `labels` (B,); None: `net` itself."""
    if labels is None:
        return net
    return lambda x_t, t: net(x_t, t, y=labels)


def guided(net, labels: Tensor | None, scale: float, null_label: int | None = None):
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): a callable (x_t, t) -> output whose prediction is

        eps~(x_t, c) = (1 + w) eps(x_t, c) - w eps(x_t, none)

    for w = `scale` >= 0, from ONE network call on the batch [x_t; x_t] with labels [c; none] (B -> 2B).
    w = 0 is the conditional model alone (one call on B); the unconditional model is `conditioned(net, none)`.
    diffusers' pipelines write the same rule as uncond + s (cond - uncond), so their guidance_scale s = 1 + w.
    `null_label` ("no class") defaults to net.num_classes (models.UNet).

    The raw outputs are combined as they are, whatever the network predicts. At a fixed x_t and t, each of the
    targets is an affine function of eps with coefficients that depend on t alone, not on the label:
        x_0  = (x_t - sqrt(1 - abar) eps) / sqrt(abar)                      (Ho et al. 2020, eq. 4)
        v    = sqrt(abar) eps - sqrt(1 - abar) x_0 = (eps - sqrt(1 - abar) x_t) / sqrt(abar)   (Salimans & Ho 2022)
        mean = coef1 x_0 + coef2 x_t, the posterior mean at that x_0          (Ho et al. eq. 7)
    and EDM's raw F_theta, with D = c_skip x + c_out F and eps = (x - D) / sigma, is one too. For any
    f(eps) = A x_t + B eps, since the weights (1 + w) and -w sum to 1,
        (1 + w) f(eps_c) - w f(eps_u) = (1 + w - w) A x_t + B ((1 + w) eps_c - w eps_u) = f(eps~),
    so guiding the raw output is guiding eps and then converting. Channels beyond x_t's (learned variances,
    iDDPM) are not a function of eps: they are taken from the conditional branch.
    """
    if labels is None or scale == 0:
        return conditioned(net, labels)
    null = net.num_classes if null_label is None else null_label

    def model(x_t: Tensor, t: Tensor) -> Tensor:
        channels = x_t.shape[1]
        out = net(torch.cat([x_t, x_t]), torch.cat([t, t]), y=torch.cat([labels, torch.full_like(labels, null)]))
        cond, uncond = out.chunk(2)  # (2B, C', H, W) -> 2 x (B, C', H, W)
        prediction = (1 + scale) * cond[:, :channels] - scale * uncond[:, :channels]
        return torch.cat([prediction, cond[:, channels:]], 1)

    return model


def sample_labels(indices, labels, num_classes: int | None, total: int, device=None) -> Tensor | None:
    """The class of each sample `indices` (of `total` samples), as the `labels` setting says:
    None or "all": every class equally, in blocks (sample i is class i * N // total: with total = N x k, row c of
    a k-column grid is class c); a list: sample i is class labels[i mod len(labels)]. None for an unconditional
    model (num_classes None)."""
    if num_classes is None:
        return None
    index = torch.as_tensor(list(indices), dtype=torch.long)
    if labels is None or labels == "all":
        classes = (index * num_classes // total).clamp(max=num_classes - 1)  # indices past total: a rank's padding
    else:
        classes = torch.as_tensor(list(labels), dtype=torch.long)[index % len(labels)]
    return classes.to(device)
