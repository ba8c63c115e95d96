"""EDM training (diffusion=edm): Table 1's preconditioning, loss and noise distribution, its continuous-time bound
against a quadrature of the closed form for Gaussian data, and a run through train.py's whole path."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import integrate, stats

from ddpmlab.checkpoints import load_checkpoint
from ddpmlab.diffusion.edm import EDMDiffusion
from ddpmlab.diffusion.noise import ExampleNoise
from ddpmlab.errors import ConfigError
from ddpmlab.evaluation import load_run
from ddpmlab.hub import export_pipeline
from ddpmlab.memory import step_bytes
from ddpmlab.schema import TRAIN, TRAIN_CROSS, check
from ddpmlab.training import train
from tests.conftest import ROOT, compose_config
from tests.test_karras import MU, S, exact_network

EDM_SMOKE = ("experiment=smoke", "diffusion=edm", "callbacks.sample_grid.sampler=heun")


def test_preconditioning_is_table_1():
    diffusion = EDMDiffusion(sigma_data=0.5)
    sigma = torch.tensor([0.002, 0.5, 3.0, 80.0])
    c_skip, c_out, c_in, c_noise = (c.flatten().double() for c in diffusion.preconditioning(sigma))
    for i, s in enumerate(sigma.tolist()):
        assert c_skip[i].item() == pytest.approx(0.25 / (s**2 + 0.25), rel=1e-6)
        assert c_out[i].item() == pytest.approx(s * 0.5 / math.sqrt(s**2 + 0.25), rel=1e-6)
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(s**2 + 0.25), rel=1e-6)
        assert c_noise[i].item() == pytest.approx(math.log(s) / 4, rel=1e-6)
        weight = (s**2 + 0.25) / (s * 0.5) ** 2  # lambda(sigma): the effective target has unit weight (eq. 8)
        assert weight * c_out[i].item() ** 2 == pytest.approx(1.0, rel=1e-6)


def test_strata_and_offsets_give_exactly_the_lognormal():
    diffusion = EDMDiffusion(P_mean=-1.2, P_std=1.2, strata=1000)
    generator = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (200_000,), generator=generator)
    sigma = diffusion.sigma_from_strata(t, torch.rand(200_000, generator=generator, dtype=torch.float64))
    assert stats.kstest(sigma.double().log().numpy(), "norm", args=(-1.2, 1.2)).pvalue > 0.01
    coarse = EDMDiffusion(strata=4)  # any count: stratum 0 is the lowest quarter of the distribution
    low = coarse.sigma_from_strata(torch.zeros(50_000, dtype=torch.long), torch.rand(50_000, generator=generator))
    assert float(low.log().max()) <= -1.2 + 1.2 * stats.norm.ppf(0.25) + 1e-5


def test_the_loss_is_lambda_times_the_denoising_error():
    """With F = 0 the denoiser is c_skip x, so the loss of each example is lambda(sigma) ||c_skip x - x_0||^2 / n."""
    diffusion = EDMDiffusion()
    torch.manual_seed(0)
    x_0, eps = torch.rand(6, 1, 4, 4) * 2 - 1, torch.randn(6, 1, 4, 4)
    t = torch.arange(0, 1000, 170)
    torch.manual_seed(1)
    terms = diffusion.training_losses(lambda x, c_noise: torch.zeros_like(x), x_0, t, eps)
    torch.manual_seed(1)  # the same offsets: the same sigmas
    sigma = diffusion.sigma_from_strata(t, torch.rand(t.shape, dtype=torch.float64)).double().view(-1, 1, 1, 1)
    x = x_0.double() + sigma * eps.double()
    expected = (sigma**2 + 0.25) / (sigma * 0.5) ** 2 * (0.25 / (sigma**2 + 0.25) * x - x_0.double()) ** 2
    assert terms["loss"].double().numpy() == pytest.approx(expected.flatten(1).mean(1).numpy(), rel=1e-4)


def exact_bound_bits(x_0: np.ndarray, diffusion: EDMDiffusion) -> float:
    """The continuous-time bound of the exact denoiser for N(MU, S^2) data at the pixels x_0, bits/dim, computed
    independently: the prior's KL, the diffusion term int E||D - x_0||^2 / sigma^3 dsigma with
    E_eps (D(x_0 + sigma eps) - x_0)^2 = (sigma^4 (MU - x_0)^2 + S^4 sigma^2) / (S^2 + sigma^2)^2 per pixel (by quad), and
    the discretized decoder's expected -log mass at mean D(x_0 + sigma_min eps) (Gauss-Hermite over eps)."""
    lo, hi = diffusion.sigma_min, diffusion.sigma_max
    nats = 0.0
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()
    for x in x_0:
        nats += x**2 / (2 * hi**2)
        term = lambda s: (s**4 * (MU - x) ** 2 + S**4 * s**2) / (S**2 + s**2) ** 2 / s**3  # noqa: E731
        nats += integrate.quad(term, lo, hi, limit=200, points=[0.01, 0.1, 1.0])[0]
        mean = (S**2 * (x + lo * nodes) + lo**2 * MU) / (S**2 + lo**2)
        upper, lower = (x + 1 / 255 - mean) / lo, (x - 1 / 255 - mean) / lo
        # log(Phi(upper) - Phi(lower)), from the tail away from the mean so that it does not round to log(0)
        with np.errstate(divide="ignore"):  # np.where evaluates the side it does not pick too
            left = stats.norm.logcdf(upper) + np.log1p(-np.exp(stats.norm.logcdf(lower) - stats.norm.logcdf(upper)))
            right = stats.norm.logsf(lower) + np.log1p(-np.exp(stats.norm.logsf(upper) - stats.norm.logsf(lower)))
        log_mass = np.where(lower > 0, right, left)
        if x > 0.999:  # the edge bins are open
            log_mass = stats.norm.logsf(lower)
        nats += -(weights * log_mass).sum()
    return nats / (len(x_0) * math.log(2))


def test_the_continuous_bound_estimate_is_unbiased_for_gaussian_data():
    diffusion = EDMDiffusion()
    pixels = np.array([64, 128, 166, 255])
    x_0 = pixels / 127.5 - 1
    batch = torch.tensor(x_0, dtype=torch.float32).view(1, 1, 2, 2).expand(4000, 1, 2, 2)
    values = diffusion.estimate_bpd(exact_network(diffusion), batch, 8, ExampleNoise(range(4000), 0),
                                    clip_denoised=False)
    mean, se = values.double().mean().item(), values.double().std().item() / math.sqrt(4000)
    expected = exact_bound_bits(x_0, diffusion)
    assert mean == pytest.approx(expected, abs=4 * se)
    assert se < 0.02 * expected  # the test can tell: the estimate is precise


def test_an_edm_run_has_a_grid_of_its_own_samplers(tmp_path):
    with pytest.raises(ConfigError, match=r"callbacks.sample_grid.sampler must be one of heun, edm for diffusion=edm "
                                          r"\(a continuous sigma has no DDPM steps\), got 'respaced': add "):
        check(compose_config("experiment=smoke", "diffusion=edm", output_dir=tmp_path), TRAIN, TRAIN_CROSS)
    with pytest.raises(ConfigError, match="diffusion.sigma_min must be below diffusion.sigma_max=80.0, got 100"):
        check(compose_config(*EDM_SMOKE, "diffusion.sigma_min=100", output_dir=tmp_path), TRAIN, TRAIN_CROSS)
    check(compose_config("experiment=edm_fashion_mnist", output_dir=tmp_path), TRAIN, TRAIN_CROSS)


def test_the_schemas_edm_names_are_the_codes():
    from ddpmlab import schema
    from ddpmlab.diffusion.samplers import EDM_SAMPLERS

    assert schema.EDM_SAMPLERS == EDM_SAMPLERS
    assert schema.EDM_TARGET == f"{EDMDiffusion.__module__}.{EDMDiffusion.__qualname__}"
    assert compose_config("diffusion=edm").diffusion._target_ == schema.EDM_TARGET


def test_the_memory_check_measures_an_edm_step():
    edm, ddpm = step_bytes(compose_config("diffusion=edm")), step_bytes(compose_config())
    assert edm == ddpm  # the same U-Net, the same tensors per image: EDM changes the loss, not the network


def test_an_edm_run_trains_logs_its_bound_resumes_and_its_checkpoint_rebuilds(tmp_path):
    metrics = train(compose_config(*EDM_SMOKE, output_dir=tmp_path / "run"))
    assert all(math.isfinite(metrics[k]) for k in ("train/loss", "train/vlb_bpd", "val/bpd", "train/loss_q3"))
    assert (tmp_path / "run" / "samples" / "final.png").is_file() and (tmp_path / "run" / "schedule.png").is_file()
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint(ckpt)
    assert checkpoint["config"]["diffusion"]["_target_"] == "ddpmlab.diffusion.edm.EDMDiffusion"
    model, diffusion, _ = load_run(str(ckpt), use_ema=True)
    assert isinstance(diffusion, EDMDiffusion) and diffusion.sigma_data == 0.5
    with pytest.raises(ConfigError, match="an EDM network has no DDPMScheduler"):
        export_pipeline(str(ckpt), tmp_path / "pipeline")
    cfg = compose_config(*EDM_SMOKE, f"ckpt_path={ckpt}", "trainer.max_steps=8", output_dir=tmp_path / "run")
    train(cfg)
    assert load_checkpoint(ckpt)["global_step"] == 8
    other = compose_config("experiment=smoke", f"ckpt_path={ckpt}", "trainer.max_steps=10", output_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="would change what it was trained as: diffusion._target_"):
        train(other)


@pytest.mark.slow
def test_an_optuna_search_varies_edms_keys_and_its_best_command_repeats_an_edm_run(tmp_path):
    """hparams_search=optuna_edm: 2 trials of the smoke run; each trial's overrides hold diffusion=edm and the
    searched EDM keys, and the best run's printed command composes an EDM run with its values."""
    argv = [sys.executable, str(ROOT / "train.py"), "-m", "hparams_search=optuna_edm", "experiment=smoke",
            "trainer.max_steps=2", "val.num_images=8", "val.batch_size=8", "callbacks.sample_grid.num_samples=2",
            "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for run in ("0", "1"):
        overrides = OmegaConf.load(tmp_path / "sweep" / run / ".hydra" / "overrides.yaml")
        assert "diffusion=edm" in overrides and any(o.startswith("diffusion.P_mean=") for o in overrides)
        assert load_checkpoint(tmp_path / "sweep" / run / "checkpoints" / "last.ckpt")["config"]["diffusion"][
            "_target_"] == "ddpmlab.diffusion.edm.EDMDiffusion"
    command = next(line.strip() for line in done.stdout.splitlines() if line.strip().startswith("python train.py"))
    cfg = compose_config(*command.split()[2:])
    p_mean = float(next(o for o in command.split() if o.startswith("diffusion.P_mean=")).split("=")[1])
    assert cfg.diffusion._target_.endswith("EDMDiffusion") and cfg.diffusion.P_mean == p_mean
