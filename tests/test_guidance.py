"""Classifier-free guidance against the closed form of class-conditional Gaussian data.

Class c's data is x_0 ~ N(mu_c, s_c^2) per pixel, with prior pi_c. Then x_t | c ~ N(a mu_c, a^2 s_c^2 + b^2) (a, b:
sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)), and the exact networks are eps(x_t, c) = -b d/dx log p(x_t | c) and
eps(x_t, none) = -b d/dx log p(x_t), p(x_t) the mixture. Ho & Salimans (2022, section 3.2) derive eq. 6 as the
score of p(x_t | c) p(c | x_t)^w: eps~ = -b d/dx [log p(x_t | c) + w log p(c | x_t)]. That is computed here by
autograd from the log-densities in float64, independently of the wrapper's arithmetic.
"""

import math

import pytest
import torch

from ddpmlab.diffusion import GaussianDiffusion, get_sampler
from ddpmlab.diffusion.guidance import conditioned, guided, sample_labels
from ddpmlab.diffusion.schedules import linear_betas
from ddpmlab.models import UNet
from tests.test_samplers import exact_sample_moments

MU, S, PRIOR = torch.tensor([-0.6, 0.1, 0.5], dtype=torch.float64), torch.tensor([0.15, 0.3, 0.2], dtype=torch.float64), \
    torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
NULL = 3


def log_densities(x_t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log p(x_t | c) for every class, (..., 3), elementwise (float64)."""
    var = a[..., None] ** 2 * S**2 + b[..., None] ** 2
    return -0.5 * (x_t[..., None] - a[..., None] * MU) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)


def mixture_oracle(diffusion: GaussianDiffusion, prediction: str = "eps", variance_channel: bool = False):
    """The exact class-conditional network net(x_t, t, y) of the Gaussian classes (y = NULL: the mixture), as
    `prediction` says; with `variance_channel`, a second channel holding the label (to see which branch it is from)."""
    alpha_bar = torch.cumprod(1 - diffusion.betas64, 0)

    @torch.enable_grad()  # the samplers run under no_grad
    def net(x_t, t, y):
        x = x_t.double().requires_grad_(True)
        a = alpha_bar[t].sqrt().view(-1, 1, 1, 1).expand_as(x)
        b = (1 - alpha_bar[t]).sqrt().view(-1, 1, 1, 1).expand_as(x)
        logs = log_densities(x, a, b)  # (B, C, H, W, 3)
        cls = y.clamp(max=NULL - 1).view(-1, 1, 1, 1, 1).expand(*x.shape, 1)
        log_p = torch.where((y == NULL).view(-1, 1, 1, 1), torch.logsumexp(logs + PRIOR.log(), -1),
                            logs.gather(-1, cls)[..., 0])
        (score,) = torch.autograd.grad(log_p.sum(), x)
        eps = -b * score
        x0 = (x - b * eps) / a
        out = {"eps": eps, "x0": x0, "v": a * eps - b * x0}[prediction].detach().float()
        return torch.cat([out, y.float().view(-1, 1, 1, 1).expand_as(out)], 1) if variance_channel else out

    return net


def guided_eps_closed_form(diffusion, x_t, t, y, w) -> torch.Tensor:
    """-b d/dx [log p(x_t | c) + w log p(c | x_t)], p(c | x_t) by Bayes' rule over the classes."""
    alpha_bar = torch.cumprod(1 - diffusion.betas64, 0)
    x = x_t.double().requires_grad_(True)
    a = alpha_bar[t].sqrt().view(-1, 1, 1, 1).expand_as(x)
    b = (1 - alpha_bar[t]).sqrt().view(-1, 1, 1, 1).expand_as(x)
    logs = log_densities(x, a, b)
    joint = logs + PRIOR.log()
    log_posterior = joint - torch.logsumexp(joint, -1, keepdim=True)  # log p(c | x_t)
    cls = y.view(-1, 1, 1, 1, 1).expand(*x.shape, 1)
    target = logs.gather(-1, cls)[..., 0] + w * log_posterior.gather(-1, cls)[..., 0]
    (grad,) = torch.autograd.grad(target.sum(), x)
    return -b * grad


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("w", [0.0, 0.5, 3.0])
def test_guided_prediction_is_the_score_of_p_x_given_c_times_p_c_given_x_to_the_w(prediction, w):
    """Whatever the network predicts, its guided output converted to eps is Ho & Salimans' eps~ (eq. 6)."""
    diffusion = GaussianDiffusion(linear_betas(1000), prediction=prediction)
    torch.manual_seed(0)
    x_t, t, y = torch.randn(12, 1, 2, 2) * 1.3, torch.randint(0, 1000, (12,)), torch.arange(12) % 3
    output = guided(mixture_oracle(diffusion, prediction), y, w, null_label=NULL)(x_t, t)
    _, eps = diffusion.model_x0_eps(output, x_t, t)
    assert torch.allclose(eps.double(), guided_eps_closed_form(diffusion, x_t, t, y, w), atol=2e-4)


def test_the_two_branches_are_one_network_call_and_variances_come_from_the_conditional_branch():
    diffusion = GaussianDiffusion(linear_betas(100), variance="learned_range", loss="hybrid")
    oracle = mixture_oracle(diffusion, variance_channel=True)
    calls = []

    def net(x_t, t, y):
        calls.append((len(x_t), y.tolist()))
        return oracle(x_t, t, y)

    y = torch.tensor([2, 0, 1])
    out = guided(net, y, 2.0, null_label=NULL)(torch.randn(3, 1, 2, 2), torch.tensor([5, 50, 99]))
    assert calls == [(6, [2, 0, 1, NULL, NULL, NULL])]  # [x_t; x_t] with [c; none], once
    assert out.shape == (3, 2, 2, 2) and torch.equal(out[:, 1], y.float().view(-1, 1, 1).expand(3, 2, 2))
    calls.clear()
    guided(net, y, 0.0, null_label=NULL)(torch.randn(3, 1, 2, 2), torch.tensor([5, 50, 99]))
    assert calls == [(3, [2, 0, 1])]  # w = 0: the conditional model, one call on the batch


@pytest.mark.parametrize(("sampler", "steps"), [("ancestral", None), ("respaced", 40), ("ddim", 40), ("dpm_solver", 20)])
def test_every_sampler_takes_the_wrapper_unchanged(sampler, steps):
    """With w = 0 the wrapper is the class-conditional model: ancestral sampling of class c gives class c's exact
    moments (the moment recursion of tests/test_samplers.py at mu_c, s_c). For every sampler, guidance moves the
    samples of class 2 away from the other classes (its mean rises past mu_2 and their mixture's mean)."""
    diffusion = GaussianDiffusion(linear_betas(400, beta_end=0.04), variance="fixed_small")
    n = 6000
    labels = torch.full((n,), 2)
    run = get_sampler(sampler)
    net = mixture_oracle(diffusion)
    plain = run(guided(net, labels, 0.0, NULL), diffusion, (n, 1, 1, 1), torch.Generator().manual_seed(1), steps=steps)
    strong = run(guided(net, labels, 4.0, NULL), diffusion, (n, 1, 1, 1), torch.Generator().manual_seed(1), steps=steps)
    if sampler == "ancestral":
        m, v = exact_sample_moments(torch.cumprod(1 - diffusion.betas64, 0), "fixed_small", MU[2].item(), S[2].item())
        assert plain.mean().item() == pytest.approx(m, abs=4 * math.sqrt(v / n))
        assert plain.var().item() == pytest.approx(v, abs=4 * v * math.sqrt(2 / n))
    assert plain.mean().item() == pytest.approx(MU[2].item(), abs=0.02)
    assert strong.mean().item() > plain.mean().item() + 0.02


def test_a_conditional_unet_without_labels_is_its_no_class_model():
    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(), num_classes=4).eval()
    for layer in net.modules():  # zero-initialised output layers: give them weights so the label reaches the output
        if getattr(layer, "zero_init", False):
            torch.nn.init.normal_(layer.weight, std=0.1)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 20, 300])
    assert torch.equal(net(x, t), net(x, t, torch.full((3,), 4)))
    assert not torch.allclose(net(x, t, torch.tensor([0, 1, 2])), net(x, t), atol=1e-4)
    assert torch.equal(conditioned(net, torch.tensor([0, 1, 2]))(x, t), net(x, t, torch.tensor([0, 1, 2])))
    assert sum(p.numel() for p in net.label_emb.parameters()) == 5 * 4 * 32  # (N + 1) x 4 ch


def test_sample_labels_give_every_class_in_blocks_or_cycle_a_list():
    assert sample_labels(range(10), None, 5, 10).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert sample_labels(range(1, 10, 2), "all", 5, 10).tolist() == [0, 1, 2, 3, 4]  # a rank's share: same classes
    assert sample_labels(range(7), "all", 3, 7).tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert sample_labels(range(5), [4, 1], 5, 5).tolist() == [4, 1, 4, 1, 4]
    assert sample_labels(range(5), None, None, 5) is None


@pytest.mark.parametrize(("overrides", "unconditional"), [([], 1_112_801), (["experiment=ddpm_cifar10"], 35_746_307)])
def test_the_class_embedding_adds_n_plus_one_rows_of_4_ch_to_every_preset(overrides, unconditional, tmp_path):
    """docs/conditioning.md's parameter counts: the default U-Net and Ho et al.'s CIFAR-10 one, with 10 classes."""
    from ddpmlab.training import build_network
    from tests.conftest import compose_config

    count = lambda *o: sum(p.numel() for p in build_network(compose_config(*overrides, *o, f"data.root={tmp_path}"))[0].parameters())  # noqa: E731
    ch = compose_config(*overrides, f"data.root={tmp_path}").model.ch
    assert count() == unconditional and count("model.num_classes=10") == unconditional + 11 * 4 * ch
