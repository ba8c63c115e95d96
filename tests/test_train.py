"""Training through the real config, Lightning and Fashion-MNIST data: fit, resume, loggers."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torchvision
from omegaconf import open_dict
from PIL import Image

from ddpmlab.checkpoints import load_checkpoint
from ddpmlab.errors import ConfigError
from ddpmlab.training import build, build_module, check_optimized_metric, train
from tests.conftest import ROOT, compose_config
from tests.test_data import write_cifar10


def test_smoke_fit_on_real_fashion_mnist_writes_checkpoint_samples_and_metrics(cfg_smoke):
    metrics = train(cfg_smoke)
    run = cfg_smoke.paths.output_dir
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    checkpoint = load_checkpoint(f"{run}/checkpoints/last.ckpt")
    assert checkpoint["global_step"] == cfg_smoke.trainer.max_steps
    assert checkpoint["config"]["task_name"] == "smoke"  # the resolved config rides in the checkpoint
    ema = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("ema_model.")}
    live = {k.replace("ema_model.", "model.", 1): v for k, v in ema.items()}
    assert ema and any(not torch.equal(v, checkpoint["state_dict"][k]) for k, v in live.items())
    with Image.open(f"{run}/samples/final.png") as grid, Image.open(f"{run}/samples/step_0000003.png"):
        assert grid.size[0] > 28  # a grid of several images
    header = open(f"{run}/csv/metrics.csv").readline()
    for column in ("train/loss", "train/loss_q0", "train/loss_q3", "train/grad_norm", "lr-Adam"):
        assert column in header
    assert (cfg_smoke.paths.output_dir and os.path.isfile(f"{run}/config_resolved.yaml"))
    for plot in ("schedule.png", "loss_curve.png"):  # what a user without wandb looks at
        with Image.open(f"{run}/{plot}") as image:
            assert image.size[0] > 500


class RecordStart(L.Callback):
    """Remembers the step and EMA weights each fit starts from (class-level: train() builds the instance)."""

    starts: list = []

    def on_train_start(self, trainer, pl_module):
        ema = {k: v.clone() for k, v in pl_module.ema_model.state_dict().items()}
        RecordStart.starts.append((trainer.global_step, ema))


def test_resume_continues_the_step_count_and_keeps_the_ema(tmp_path):
    first = compose_config("experiment=smoke", output_dir=tmp_path / "first")
    train(first)
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    saved = load_checkpoint(last)["state_dict"]

    resumed = compose_config("experiment=smoke", "trainer.max_steps=9", f"ckpt_path={last}",
                             output_dir=tmp_path / "second")
    with open_dict(resumed):
        resumed.callbacks.recorder = {"_target_": f"{__name__}.RecordStart"}
    RecordStart.starts.clear()
    train(resumed)
    step, ema = RecordStart.starts[0]
    assert step == 6
    for k, v in ema.items():
        assert torch.equal(v, saved[f"ema_model.{k}"])
    after = load_checkpoint(tmp_path / "second" / "checkpoints" / "last.ckpt")
    assert after["global_step"] == 9
    assert any(not torch.equal(after["state_dict"][f"ema_model.{k}"], v) for k, v in ema.items())


class RecordSampler(L.Callback):
    """Remembers the importance sampler's state each fit starts from."""

    starts: list = []

    def on_train_start(self, trainer, pl_module):
        RecordSampler.starts.append({k: v.clone() for k, v in pl_module.timestep_sampler.state_dict().items()})


def test_importance_sampler_state_round_trips_through_a_checkpoint(tmp_path):
    first = compose_config("experiment=smoke", "timestep_sampler=importance", output_dir=tmp_path / "first")
    train(first)
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    saved = load_checkpoint(last)["state_dict"]
    assert saved["timestep_sampler.loss_counts"].sum() == 6 * 8  # every example of the 6 steps recorded
    assert saved["timestep_sampler.loss_history"].abs().sum() > 0

    resumed = compose_config("experiment=smoke", "timestep_sampler=importance", "trainer.max_steps=9",
                             f"ckpt_path={last}", output_dir=tmp_path / "second")
    with open_dict(resumed):
        resumed.callbacks.recorder = {"_target_": f"{__name__}.RecordSampler"}
    RecordSampler.starts.clear()
    train(resumed)
    for key, value in RecordSampler.starts[0].items():
        assert torch.equal(value, saved[f"timestep_sampler.{key}"])
    after = load_checkpoint(tmp_path / "second" / "checkpoints" / "last.ckpt")["state_dict"]
    assert after["timestep_sampler.loss_counts"].sum() == 9 * 8


SHRINK = ["trainer.max_steps=2", "data.batch_size=2", "trainer.log_every_n_steps=1",
          "callbacks.sample_grid.num_samples=1", "callbacks.sample_grid.sampling_steps=2",
          "callbacks.checkpoint.every_n_train_steps=2"]


@pytest.mark.parametrize("experiment", ["ddpm_cifar10", "iddpm_cifar10", "iddpm_fashion_mnist"])
def test_every_preset_trains_a_few_steps_on_cpu(experiment, tmp_path):
    """Each preset at its real network size, two optimizer steps (CIFAR-10 files written in the real format)."""
    extra = []
    if "cifar10" in experiment:
        write_cifar10(tmp_path / "data" / "cifar-10-batches-py", per_batch=2)
        extra = [f"data.root={tmp_path / 'data'}", "data.verify_checksums=false"]
    cfg = compose_config(f"experiment={experiment}", *SHRINK, *extra, output_dir=tmp_path / "run")
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and "train/vlb_bpd" in metrics
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 2 and checkpoint["config"]["task_name"] == experiment


class CountSampledImages(L.Callback):
    """How many images this rank puts through the EMA network (only the sample grids use it), written at the
    end to $SAMPLED_DIR/rank_<global rank>."""

    def on_train_start(self, trainer, pl_module):
        self.count = 0

        def count(module, args):
            self.count += args[0].shape[0]

        pl_module.ema_model.register_forward_pre_hook(count)

    def teardown(self, trainer, pl_module, stage):
        (Path(os.environ["SAMPLED_DIR"]) / f"rank_{trainer.global_rank}").write_text(str(self.count))


@pytest.mark.slow
def test_ddp_records_the_config_once_and_splits_the_grid_into_the_one_process_grid(tmp_path):
    """trainer.devices=2 over gloo: one config_resolved.yaml and one config tree (rank 0's); each rank samples
    half of each grid, and rank 0 writes it once, pixel for pixel the grid one process draws from the same EMA."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT),
           "SAMPLED_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "experiment=smoke", "trainer.accelerator=cpu",
                           "trainer.devices=2", "trainer.strategy=ddp", f"hydra.run.dir={run}",
                           "val.num_images=0", "optimized_metric=null",  # val/bpd's EMA calls would count too
                           f"+callbacks.count._target_={__name__}.CountSampledImages"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in run.glob("config_resolved*")) == ["config_resolved.yaml"]
    assert (done.stdout + done.stderr).count("── optim\n") == 1  # the tree's optim branch, printed by rank 0 alone
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "denoising_final.png", "denoising_step_0000003.png", "final.png", "step_0000003.png"]
    # 2 grids (step 3, final) x 5 sampling steps x 4 images, half on each rank
    assert [(tmp_path / f"rank_{r}").read_text() for r in (0, 1)] == ["20", "20"]

    cfg = compose_config("experiment=smoke", output_dir=tmp_path / "one")
    module = build_module(cfg)
    module.load_state_dict(load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"])  # the EMA of final.png
    images, strip = build(cfg.callbacks.sample_grid).sample(module, (4, 1, 28, 28))  # one process: all 4 images
    torchvision.utils.save_image((images + 1) / 2, tmp_path / "final.png", nrow=2, padding=2)
    torchvision.utils.save_image((strip.flatten(0, 1) + 1) / 2, tmp_path / "strip.png", nrow=strip.shape[1])
    for one, ddp in [("final.png", "final.png"), ("strip.png", "denoising_final.png")]:
        with Image.open(tmp_path / one) as expected, Image.open(run / "samples" / ddp) as written:
            assert expected.size == written.size and expected.tobytes() == written.tobytes(), ddp


def test_a_metric_of_logging_steps_only_is_refused_when_the_steps_left_hold_none():
    """train/vlb_bpd is logged when step s + 1 is a multiple of log_every_n_steps: from 0 to max_steps=6 with
    every 10 there is none, nor from a resume at step 20 to 29; train/loss and val/bpd are logged regardless."""
    cfg = compose_config("experiment=smoke", "optimized_metric=train/vlb_bpd", "trainer.log_every_n_steps=10")
    with pytest.raises(ConfigError, match=r"its 6 steps hold no logging step: set trainer.log_every_n_steps=6 or less"):
        check_optimized_metric(cfg)
    with open_dict(cfg):
        cfg.trainer.max_steps = 29
    check_optimized_metric(cfg)  # step 10 logs
    with pytest.raises(ConfigError, match=r"steps 21 to 29 hold no logging step: set trainer.log_every_n_steps=9"):
        check_optimized_metric(cfg, start_step=20)
    check_optimized_metric(compose_config("experiment=smoke", "trainer.log_every_n_steps=10"), start_step=20)  # val/bpd


@pytest.mark.slow
def test_a_wall_clock_budget_stops_training_and_a_resume_continues_the_same_budget(tmp_path):
    """trainer.max_time with max_steps=-1 trains until the budget; the elapsed time is in the checkpoint, so a
    resume with the same budget is refused before it loads anything (none is left) and one with a longer budget
    trains on to it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def run(*overrides):
        return subprocess.run([sys.executable, str(ROOT / "train.py"), "experiment=smoke", "trainer.max_steps=-1",
                               "callbacks.sample_grid=null", "val.num_images=0", "optimized_metric=train/loss",
                               f"hydra.run.dir={tmp_path / 'run'}", *overrides],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert run("trainer.max_time=00:00:00:08").returncode == 0
    first = load_checkpoint(ckpt)
    spent = first["callbacks"]["Timer"]["time_elapsed"]["train"]
    assert first["global_step"] > 0 and spent >= 8
    same = run("trainer.max_time=00:00:00:08", f"ckpt_path={ckpt}")
    assert same.returncode == 2 and same.stderr.strip().splitlines()[-1].startswith(
        f"error: ckpt_path={ckpt} has trained {spent:.0f} s, all of trainer.max_time=00:00:00:08")
    assert run("trainer.max_time=00:00:00:16", f"ckpt_path={ckpt}").returncode == 0
    longer = load_checkpoint(ckpt)
    assert longer["global_step"] > first["global_step"] and longer["callbacks"]["Timer"]["time_elapsed"]["train"] >= 16


def test_precision_auto_is_bf16_on_a_cpu_with_native_bf16_and_fp32_elsewhere(tmp_path):
    """What this CPU does with bf16, as torch and oneDNN report it, decides; the run stores what it used."""
    from ddpmlab.performance import cpu_bf16, resolved_precision

    assert resolved_precision("auto", on_gpu=True) == "32-true"
    assert resolved_precision("bf16-mixed", on_gpu=False) == "bf16-mixed" and resolved_precision("32-true", False) == "32-true"
    expected = "bf16-mixed" if cpu_bf16() == "native" else "32-true"
    assert resolved_precision("auto", on_gpu=False) == expected
    cfg = compose_config("experiment=smoke", "trainer.precision=auto", "trainer.max_steps=1", "callbacks.sample_grid=null",
                         "val.num_images=0", "optimized_metric=null", "trainer.accelerator=cpu", output_dir=tmp_path)
    train(cfg)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["config"]["trainer"]["precision"] == expected


def test_lightnings_short_precision_names_resolve_to_its_full_ones_and_fp16_is_refused_on_a_cpu():
    """trainer.precision=16 is Lightning's 16-mixed: refused on a CPU in one line like the full name, not let
    through because its spelling differs; every short name resolves to the name Lightning's Trainer reports."""
    from omegaconf import OmegaConf

    from ddpmlab.errors import ConfigError
    from ddpmlab.performance import resolved_precision
    from ddpmlab.schema import check_machine

    assert [resolved_precision(p, on_gpu=False) for p in (64, 32, 16, "64", "32", "16", "bf16")] == [
        "64-true", "32-true", "16-mixed", "64-true", "32-true", "16-mixed", "bf16-mixed"]
    for precision in (16, "16", "16-mixed"):
        with pytest.raises(ConfigError, match="fp16 mixed precision needs a GPU"):
            check_machine(OmegaConf.create({"accelerator": "cpu", "devices": 1, "precision": precision}))
