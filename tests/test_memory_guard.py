"""Memory (issue 14.4): a step that cannot fit is refused before anything is written, the bound never exceeds what
a real step takes, and an allocator's failure becomes one line."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ddpmlab import memory
from tests.conftest import ROOT, compose_config

GiB = 2**30

# Two real training steps (loss, backward, fused Adam, EMA) of cfg's network; prints (parameters, the process's
# peak resident bytes from just before the EMA copy and Adam, plus the weights already resident).
STEP = """
import json, sys, torch
from tests.conftest import compose_config
from ddpmlab.training import build_network
cfg = compose_config(*sys.argv[2:])
model, diffusion = build_network(cfg)
x_0 = torch.rand(int(sys.argv[1]), cfg.data.channels, cfg.data.image_size, cfg.data.image_size) * 2 - 1
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current size
before = status("VmRSS")
ema = [p.detach().clone() for p in model.parameters()]
adam = torch.optim.Adam(model.parameters(), fused=True)
for _ in range(2):
    t = torch.randint(0, diffusion.num_timesteps, (len(x_0),))
    diffusion.training_losses(model, x_0, t, torch.randn_like(x_0))["loss"].mean().backward()
    adam.step()
    adam.zero_grad(set_to_none=True)
    torch._foreach_lerp_(ema, list(model.parameters()), 0.001)
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps([sum(p.numel() for p in model.parameters()), status("VmHWM") - before + weights]))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset is Linux's")
@pytest.mark.parametrize(("overrides", "batch"), [(["experiment=smoke"], 16), (["experiment=ddpm_cifar10"], 2)])
def test_the_bound_never_exceeds_what_a_real_step_takes(overrides, batch):
    result = subprocess.run([sys.executable, "-c", STEP, str(batch), *overrides], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    params, peak = json.loads(result.stdout.splitlines()[-1])
    counted, per_param, per_image = memory.step_bytes(compose_config(*overrides))
    assert counted == params
    assert per_param * params + batch * per_image <= peak


def test_the_presets_fit_this_machine():
    """The default run, the smoke run and the paper's CIFAR-10 preset (batch 128: at least 6.8 GiB) are not refused."""
    if not torch.cuda.is_available() and (memory.host_available() or 0) < 8 * GiB:
        pytest.skip("the CIFAR-10 preset on a CPU needs a host with 8 GiB free or more")
    for overrides in ([], ["experiment=smoke"], ["experiment=ddpm_cifar10"]):
        memory.check_fits(compose_config(*overrides))


def test_half_precision_and_compile_lower_the_bound():
    _, per_param, per_image = memory.step_bytes(compose_config("experiment=ddpm_cifar10", "trainer.precision=32-true"))
    _, half_param, half_image = memory.step_bytes(compose_config("experiment=ddpm_cifar10", "trainer.precision=bf16-mixed",
                                                                 "performance.compile=true"))
    assert (half_param, half_image) == (per_param // 2, per_image // 4)


@pytest.mark.slow
def test_a_batch_that_cannot_fit_is_refused_in_one_line_before_anything_is_written(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "experiment=ddpm_cifar10", "data.batch_size=40000",
         f"hydra.run.dir={run}"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: data.batch_size=40000 needs at least "), result.stderr
    assert "35.7M parameters" in lines[0] and "set data.batch_size=" in lines[0]
    assert not run.exists()


def test_a_real_host_allocation_failure_gets_the_memory_line():
    """1 TiB at once: more than RAM and swap, which the kernel refuses outright (ENOMEM), with or without overcommit."""
    with pytest.raises(RuntimeError) as failed:
        torch.empty(2**40, dtype=torch.uint8)
    line = memory.out_of_memory_line(failed.value)
    assert line.startswith("out of host memory (RuntimeError, 1048576.0 MiB asked): lower data.batch_size")
    assert memory.out_of_memory_line(ValueError("not memory")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_real_cuda_allocation_failure_gets_the_memory_line():
    with pytest.raises(torch.OutOfMemoryError) as failed:
        torch.empty(2**50, dtype=torch.uint8, device="cuda")
    assert memory.out_of_memory_line(failed.value).startswith("out of GPU memory (OutOfMemoryError, ")
