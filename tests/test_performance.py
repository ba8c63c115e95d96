"""The speed switches (config block `performance`, optim.fused, bf16-mixed) compute the same model, only faster."""

import copy
import os
import subprocess
import sys

import pytest
import torch

from ddpmlab.checkpoints import load_checkpoint
from ddpmlab.errors import ConfigError
from ddpmlab.evaluation import load_run
from ddpmlab.performance import optimize_network, performance_settings
from ddpmlab.training import build_module, train
from tests.conftest import ROOT, compose_config


def smoke(tmp_path, *overrides):
    return compose_config("experiment=smoke", "callbacks.sample_grid=null", "trainer.accelerator=cpu", *overrides,
                          output_dir=tmp_path / "run")


def test_channels_last_gives_the_same_outputs_and_gradients(tmp_path):
    plain = build_module(smoke(tmp_path, "performance.channels_last=false")).model
    fast = optimize_network(copy.deepcopy(plain), channels_last=True)
    assert fast.down[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)  # 32 input channels
    x, t = torch.randn(4, 1, 28, 28), torch.tensor([1, 10, 30, 49])
    for layer in (plain.conv_out, fast.conv_out):  # zero-initialised: give the output weights, the same in both
        torch.nn.init.constant_(layer.weight, 0.01)
    plain.eval(), fast.eval()  # no dropout: its masks are drawn in memory order, so they differ between layouts
    out_plain = plain(x, t)
    out_plain.square().mean().backward()
    out_fast = fast(x, t)
    out_fast.square().mean().backward()
    assert torch.allclose(out_plain, out_fast, atol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


def test_fused_adam_makes_the_same_updates(tmp_path):
    module = {fused: build_module(smoke(tmp_path, f"optim.fused={fused}")) for fused in (False, True)}
    module[True].model.load_state_dict(module[False].model.state_dict())
    optimizers = {fused: m.configure_optimizers()["optimizer"] for fused, m in module.items()}
    assert optimizers[True].defaults["fused"] and not optimizers[False].defaults["fused"]
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in module[False].model.parameters()]
        for fused, m in module.items():
            for p, grad in zip(m.model.parameters(), grads):
                p.grad = grad.clone()
            optimizers[fused].step()
    for p, q in zip(module[False].model.parameters(), module[True].model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_performance_switches_and_their_bad_values(tmp_path):
    # a conv with 32 input channels: a 1-channel weight is contiguous in both formats
    weight = lambda value: build_module(smoke(tmp_path, f"performance.channels_last={value}")).model.down[0].conv1.weight  # noqa: E731
    assert weight("true").is_contiguous(memory_format=torch.channels_last) and not weight("true").is_contiguous()
    assert weight("false").is_contiguous() and not weight("false").is_contiguous(memory_format=torch.channels_last)
    assert weight("auto").is_contiguous()  # auto: NHWC on GPUs only, and this test's trainer is on the CPU
    assert performance_settings({"channels_last": "auto"}, on_gpu=True) == (True, False)
    with pytest.raises(ConfigError, match="must be true, false or auto"):
        build_module(smoke(tmp_path, "performance.channels_last=yes"))
    with pytest.raises(ConfigError, match="performance.compile=.* must be true or false"):
        build_module(smoke(tmp_path, "performance.compile=maybe"))


def test_a_channels_last_run_trains_and_its_checkpoint_loads_anywhere(tmp_path):
    metrics = train(smoke(tmp_path, "performance.channels_last=true"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    model, _, _ = load_run(str(tmp_path / "run" / "checkpoints" / "last.ckpt"), use_ema=True)  # a plain NCHW model
    assert model.down[0].conv1.weight.is_contiguous()


def test_bf16_mixed_precision_trains_fp32_weights(tmp_path):
    metrics = train(smoke(tmp_path, "trainer.precision=bf16-mixed"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


@pytest.mark.slow
def test_compiled_training_keeps_the_checkpoint_format(tmp_path):
    """performance.compile=true compiles the U-Net in place: same parameter names, evaluation loads it. The U-Net
    has one level and no attention here: inductor's compile time grows with the graph, and any graph shows this."""
    one_level = ["model.ch_mult=[1]", "model.attn_resolutions=[]"]
    metrics = train(smoke(tmp_path, "performance.compile=true", "trainer.max_steps=2", *one_level))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["state_dict"]
    assert state.keys() == build_module(smoke(tmp_path, *one_level)).state_dict().keys()
    model, _, _ = load_run(str(tmp_path / "run" / "checkpoints" / "last.ckpt"), use_ema=True)
    assert model(torch.zeros(1, 1, 28, 28), torch.tensor([3])).shape == (1, 1, 28, 28)


@pytest.mark.slow
def test_the_ddp_preset_trains_what_plain_ddp_trains(tmp_path):
    """trainer=ddp (gradient_as_bucket_view, static_graph) on 2 gloo processes gives plain DDP's weights."""
    runs = {}
    for name, overrides in {"plain": ["trainer.strategy=ddp", "trainer.devices=2"], "preset": ["trainer=ddp"]}.items():
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
        done = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), "experiment=smoke", "trainer.accelerator=cpu", "trainer.max_steps=4",
             "callbacks.sample_grid=null", f"hydra.run.dir={tmp_path / name}", *overrides],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[name] = load_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt")["state_dict"]
    for key, value in runs["plain"].items():
        assert torch.allclose(value, runs["preset"][key], atol=1e-6), key
