"""Training through the real config, Lightning and Fashion-MNIST data: fit, resume, loggers."""

import os

import lightning as L
import torch
from omegaconf import open_dict
from PIL import Image

from ddpmlab.checkpoints import load_checkpoint
from ddpmlab.training import train
from tests.conftest import compose_config


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
