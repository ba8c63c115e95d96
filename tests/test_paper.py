"""Ho et al. 2020's analyses: the progressive code's rate and distortion (section 4.3), the figures (Figs. 6-9) and
Table 2 from a sweep, each against its definition: closed forms where the data is Gaussian (the exact denoiser of
tests/test_gaussian.py), the real evaluate.py and train.py otherwise."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ddpmlab.data import evaluation_subset, to_model_range
from ddpmlab.diffusion import GaussianDiffusion, get_sampler
from ddpmlab.diffusion.noise import ExampleNoise
from ddpmlab.diffusion.schedules import linear_betas
from ddpmlab.evaluation import evaluate
from ddpmlab.figures import FIGURES, coarse_to_fine, default_t, encode, interpolation, progressive, reverse_from, \
    shared_latent
from ddpmlab.paper import rate_distortion
from ddpmlab.training import train
from tests.conftest import ROOT, compose_config
from tests.test_data import write_mnist_like
from tests.test_evaluate import compose_eval
from tests.test_gaussian import gaussian_oracle

MU, S = 0.1, 0.3  # the Gaussian data's per-pixel mean and standard deviation, in the model's range [-1, 1]


def gaussian_images(n: int, seed: int = 0, shape=(1, 8, 8)) -> torch.Tensor:
    """uint8 test images whose pixels are N(MU, S^2) in [-1, 1], rounded to the 256 levels."""
    x = MU + S * torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def posterior_std(diffusion: GaussianDiffusion, t: int) -> float:
    """sd(x_0 | x_t) for N(MU, S^2) data: sqrt(S^2 b^2 / (a^2 S^2 + b^2)), a^2 = alpha_bar_t, b^2 = 1 - a^2."""
    alpha_bar = torch.cumprod(1 - diffusion.betas64, 0)[t - 1].item()
    return math.sqrt(S**2 * (1 - alpha_bar) / (alpha_bar * S**2 + 1 - alpha_bar))


# ---- rate and distortion (section 4.3, Algorithm 3, Figure 5, Table 1) ------------------------------------------

def test_the_distortion_at_each_t_is_the_posterior_error_of_gaussian_data():
    """With the exact denoiser, x^_0 = E[x_0 | x_t], so the mean squared error at t is Var[x_0 | x_t] (closed form)."""
    diffusion = GaussianDiffusion(linear_betas(40, beta_end=0.2))
    x_0 = MU + S * torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = diffusion.calc_bpd_loop(gaussian_oracle(diffusion, MU, S), x_0, torch.Generator().manual_seed(1),
                                  clip_denoised=False)
    expected = torch.tensor([posterior_std(diffusion, t) ** 2 for t in range(1, 41)], dtype=torch.float64)
    # 16384 pixels per t: the mean of squared N(0, v) errors is within 4 sqrt(2 / n) v of v
    assert torch.allclose(out["x0_mse"].mean(0).double(), expected, rtol=4 * math.sqrt(2 / 16384))


def test_rate_is_what_algorithm_3_has_sent_when_the_receiver_holds_x_t():
    """rate(t) = L_T + sum_{s=t}^{T-1} L_s: L_T alone at t = T; Table 1's rate L_1 + ... + L_T at t = 1, which with
    the distortion L_0 is the bound; the distortion an RMSE on [0, 255]."""
    g = torch.Generator().manual_seed(0)
    prior, terms, mse = torch.rand(5, generator=g), torch.rand(5, 6, generator=g), torch.rand(5, 6, generator=g) * 1e-2
    code = rate_distortion(prior, terms, mse)
    assert len(code["rate_per_t"]) == 6 and code["rate_per_t"][-1] == pytest.approx(prior.mean().item())
    for t in range(1, 7):
        assert code["rate_per_t"][t - 1] == pytest.approx((prior + terms[:, t:].sum(1)).mean().item())
    assert code["rate_bpd"] + code["distortion_bpd"] == pytest.approx((prior + terms.sum(1)).mean().item(), rel=1e-6)
    assert code["distortion_bpd"] == pytest.approx(terms[:, 0].mean().item())
    assert code["rmse_at_t1"] == pytest.approx((mse[:, 0].sqrt() * 127.5).mean().item())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A smoke checkpoint (T=50) and a small Fashion-MNIST-format data root (256 train, 16 test images)."""
    root = tmp_path_factory.mktemp("paper")
    write_mnist_like(root / "data" / "FashionMNIST" / "raw", n_train=256, n_test=16)
    train(compose_config("experiment=smoke", output_dir=root / "run"))
    return {"ckpt": str(root / "run" / "checkpoints" / "last.ckpt"), "data": str(root / "data"), "root": root}


def test_rate_plus_distortion_is_the_nll_bound_on_the_same_images(run, tmp_path):
    """metrics=[rate_distortion] and metrics=[nll] as two evaluations: Table 1's rate + distortion is the bound."""
    common = [f"ckpt={run['ckpt']}", f"data_root={run['data']}", "nll.num_images=3"]
    nll = evaluate(compose_eval(*common, "metrics=[nll]", output_dir=tmp_path / "nll"))["nll"]
    record = evaluate(compose_eval(*common, "metrics=[rate_distortion]", output_dir=tmp_path / "rd"))
    code = record["rate_distortion"]
    assert code["rate_bpd"] + code["distortion_bpd"] == pytest.approx(nll["bpd"], rel=1e-6)
    assert code["distortion_bpd"] == pytest.approx(nll["decoder_bpd"], rel=1e-6)
    assert code["rate_per_t"][-1] == pytest.approx(nll["prior_bpd"], rel=1e-6)
    assert all(a >= b for a, b in zip(code["rate_per_t"], code["rate_per_t"][1:]))  # fewer bits sent at larger t
    assert code["num_images"] == 3 and len(code["distortion_rmse_per_t"]) == 50 and "nll" not in record
    assert {r["metric"] for r in record["results"]} == {"rate (bits/dim)", "distortion (bits/dim)",
                                                         "distortion RMSE t=1"}
    assert (tmp_path / "rd" / "rate_distortion.png").stat().st_size > 10_000


# ---- the figures (Figs. 6-9) -------------------------------------------------------------------------------------

def test_the_default_timesteps_are_the_papers_at_t_1000():
    assert default_t("shared_latent", 1000) == [1000, 750, 500, 250]
    assert default_t("interpolation", 1000) == [500]
    assert default_t("coarse_to_fine", 1000) == [1000, 875, 750, 625, 500, 375, 250, 125]
    assert default_t("shared_latent", 2) == [2, 1]  # never 0, never repeated


def test_shared_latent_samples_from_t_1_stay_within_a_few_posterior_stds_of_the_image():
    """Fig. 7 at t = 1: x_1 ~ q(x_1 | x_0), then p(x_0 | x_1), which (no noise at the last step, Algorithm 2) is the
    denoiser's E[x_0 | x_1]; for Gaussian data its error has the posterior's sd: within 5 of them everywhere, with
    a spread of one. At larger t the samples of one x_t differ more (less of x_0 is kept)."""
    diffusion = GaussianDiffusion(linear_betas(60, beta_start=1e-4, beta_end=0.3))
    images = gaussian_images(4)
    grid = shared_latent(gaussian_oracle(diffusion, MU, S), diffusion, images, num_images=4, t=[1, 15, 60], samples=8)
    assert grid.images.shape == (12, 10, 1, 8, 8) and grid.row_labels[1] == "image 0, t=15"
    at_1 = grid.images[0::3]  # (4 images, columns, ...)
    x_0 = to_model_range(evaluation_subset(images, 4))
    assert torch.equal(at_1[:, 0], x_0)
    error = (at_1[:, 2:] - x_0[:, None]) / posterior_std(diffusion, 1)
    assert error.abs().max() < 5 and 0.8 < error.std().item() < 1.2
    spread = [grid.images[k::3, 2:].std(1).mean().item() for k in range(3)]  # across one x_t's samples
    assert spread[0] < 1e-6 < spread[1] < spread[2]


def test_interpolation_at_lambda_0_and_1_reproduces_the_two_encoded_images_reconstructions():
    """Fig. 8: the mixes (1 - lambda) x_t + lambda x'_t of the pair's latents, decoded with one noise for all lambdas:
    the ends are each image encoded to x_t by q and decoded by p with that noise, and the middle neither."""
    diffusion = GaussianDiffusion(linear_betas(60, beta_end=0.3))
    model = gaussian_oracle(diffusion, MU, S)
    images = gaussian_images(8)
    grid = interpolation(model, diffusion, images, pairs=3, t=20, lambdas=[0.0, 0.5, 1.0], seed=4)
    assert grid.images.shape == (3, 5, 1, 8, 8)
    pairs = to_model_range(evaluation_subset(images, 6))
    for r in range(3):
        for side, column in ((0, 1), (1, 3)):
            x_t = encode(diffusion, pairs[2 * r + side][None], 20, ExampleNoise([2 * r + side], 4).randn((1, 1, 8, 8)))
            own = reverse_from(model, diffusion, x_t, 20, ExampleNoise([r], 5))
            assert torch.allclose(grid.images[r, column], own[0], atol=1e-6)
        assert torch.equal(grid.images[r, 0], pairs[2 * r]) and torch.equal(grid.images[r, 4], pairs[2 * r + 1])
        assert not torch.allclose(grid.images[r, 2], grid.images[r, 1], atol=1e-2)
    # Fig. 9 is that pair at several t: at interpolation's t its row is interpolation's first
    coarse = coarse_to_fine(model, diffusion, images, t=[60, 20, 5], lambdas=[0.0, 0.5, 1.0], seed=4)
    assert coarse.row_labels == ["t=60", "t=20", "t=5"] and torch.allclose(coarse.images[1], grid.images[0])


@pytest.mark.parametrize(("sampler", "steps"), [("ancestral", None), ("ddim", 10), ("dpm_solver", 10)])
def test_progressive_generation_ends_in_the_sample_and_any_split_of_its_rows_draws_the_same(sampler, steps):
    """Fig. 6: row r is x^_0 along sample r's chain (the noise of evaluate.py's sample r), first near E[x_0] = MU,
    last the sample; rows computed apart (as processes do) are the rows computed together."""
    diffusion = GaussianDiffusion(linear_betas(50, beta_end=0.3))
    model = gaussian_oracle(diffusion, MU, S)
    images = gaussian_images(1)
    grid = progressive(model, diffusion, images, num_rows=4, columns=5, sampler=sampler, steps=steps, seed=3)
    assert grid.images.shape == (4, 5, 1, 8, 8) and grid.column_labels[-1] == f"{steps or 50} of {steps or 50}"
    sample = get_sampler(sampler)(model, diffusion, (4, 1, 8, 8), ExampleNoise(range(4), 3), steps=steps)
    assert torch.allclose(grid.images[:, -1], sample, atol=1e-6)
    assert (grid.images[:, 0] - MU).abs().max() < 0.05
    apart = [progressive(model, diffusion, images, rows=rows, num_rows=4, columns=5, sampler=sampler, steps=steps,
                         seed=3).images for rows in ([0, 1], [2], [3])]
    assert torch.allclose(torch.cat(apart), grid.images, atol=1e-6)


def test_figures_from_evaluate_py_on_one_process_and_two_are_the_same(run, tmp_path):
    """`figures=[...]` writes each figure's PNG (and its grid as .pt) and lists them in metrics.json; two processes
    share the rows and draw the same figures (their 125 KB of results once hung rank 0 in Lightning's return pipe)."""
    args = [f"ckpt={run['ckpt']}", f"data_root={run['data']}", "metrics=[]", f"figures=[{','.join(FIGURES)}]",
            "progressive.rows=3", "progressive.columns=4", "sampler=ddim", "sampling_steps=5",
            "shared_latent.t=[30,3]", "shared_latent.samples=2", "interpolation.pairs=2", "interpolation.t=10",
            "interpolation.lambdas=[0,0.5,1]", "coarse_to_fine.t=[20,5]"]
    one = evaluate(compose_eval(*args, output_dir=tmp_path / "one"))
    two = evaluate(compose_eval(*args, "trainer.devices=2", "trainer.accelerator=cpu", output_dir=tmp_path / "two"))
    assert list(one["figures"]) == list(FIGURES) and one["figures"]["shared_latent"]["figure"] == "Fig. 7"
    shapes = {"progressive": (3, 4), "shared_latent": (2, 4), "interpolation": (2, 5), "coarse_to_fine": (2, 5)}
    for name, (rows, columns) in shapes.items():
        assert (tmp_path / "one" / f"{name}.png").stat().st_size > 5_000
        grid = torch.load(tmp_path / "one" / f"{name}.pt")
        assert grid.shape == (rows, columns, 1, 28, 28), name
        assert torch.allclose(torch.load(tmp_path / "two" / f"{name}.pt"), grid, atol=1e-5), name
    assert json.loads((tmp_path / "one" / "metrics.json").read_text())["figures"]["interpolation"]["columns"][1] == \
        "lambda=0"


# ---- Table 2 (section 4.2) ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_table2_evaluates_every_run_of_a_sweep_alike_and_records_a_diverged_one_as_unstable(run, tmp_path):
    """`train.py -m sweep=paper_table2` with the mean-prediction bound cell twice, once at a learning rate that
    diverges (NaN: exit 3, the sweep goes on), then `evaluate.py sweep_dir=... table=paper_table2`: the table in the
    paper's layout with both runs under their cell, "unstable" for the diverged one, and the cells not swept."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    sweep = tmp_path / "sweep"
    trained = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "sweep=paper_table2", "experiment=smoke",
                              "diffusion.prediction=mean", "diffusion=vlb", "optim.lr=1e-3,1e30",
                              "trainer.max_steps=4", "callbacks.sample_grid=null", f"hydra.sweep.dir={sweep}",
                              f"paths.log_dir={tmp_path / 'logs'}"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
    assert trained.returncode == 4 and "run 1 (exit 3)" in trained.stderr, trained.stderr[-2000:]
    evaluated = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), f"sweep_dir={sweep}", "table=paper_table2",
                                f"data_root={run['data']}", "metrics=[nll_estimate,fid,kid,is]",
                                "feature_extractor=classifier", "num_samples=6", "sampler=ddim", "sampling_steps=3",
                                "nll_estimate.num_images=4", "nll_estimate.timesteps=2", "reference_images=16",
                                f"hydra.run.dir={tmp_path / 'table'}"], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    table = json.loads((tmp_path / "table" / "table2.json").read_text())
    rows = table["rows"]
    assert [r["objective"] for r in rows] == ["L, learned diagonal Σ", "L, fixed isotropic Σ", "L, fixed isotropic Σ",
                                              "‖μ̃ − μ̃_θ‖²", "L, learned diagonal Σ", "L, fixed isotropic Σ",
                                              "‖ε̃ − ε_θ‖² (L_simple)"]
    ok, unstable = rows[1], rows[2]
    assert (ok["run"], ok["outcome"], unstable["run"], unstable["outcome"]) == ("0", "evaluated", "1", "unstable")
    assert ok["fid"] > 0 and ok["is"] >= 1 and ok["bound_bpd"] > 0 and unstable.get("fid") is None
    assert (ok["paper_is"], ok["paper_fid"]) == (8.06, 13.22) and rows[-1]["paper_fid"] == 3.17
    assert {r["outcome"] for r in rows[:1] + rows[3:]} == {"not in this sweep"}
    assert "6 samples (ddim, 3 steps" in table["protocol"]
    markdown = (tmp_path / "table" / "table2.md").read_text()
    assert "| L, fixed isotropic Σ | 8.06 ± 0.09 | 13.22 | 1 (fixed_large, " in markdown and "| unstable |" in markdown
    assert (tmp_path / "table" / "run_0" / "metrics.json").is_file() and not (tmp_path / "table" / "run_1").exists()
    assert (tmp_path / "table" / "table2_samples.png").stat().st_size > 10_000
    assert "‖ε̃ − ε_θ‖² (L_simple) | 9.46 ± 0.11 | 3.17 |" in evaluated.stdout
