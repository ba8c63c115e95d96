"""The benchmark against diffusers: the peer is the same network, and `python -m ddpmlab.bench` runs end to end."""

import json
import subprocess
import sys

import pytest
import torch

from ddpmlab.bench.measure import count_flops
from ddpmlab.bench.peer import Peer, unet_config
from ddpmlab.errors import ConfigError
from ddpmlab.training import build_network
from tests.conftest import compose_config

diffusers = pytest.importorskip("diffusers", reason="the benchmark extra: pip install -e .[bench]")


def layers(model: torch.nn.Module) -> dict[str, list]:
    """What a network is made of, whatever its names: its parameter shapes (a 1x1 convolution counted as the
    matrix it is, ddpmlab's joint q/k/v projection as the three diffusers has), its GroupNorms (groups,
    channels, eps) and its dropout rates (the no-op p=0 ones left out), each sorted."""
    shapes = []
    for name, p in model.named_parameters():
        shape = tuple(p.shape[:2]) if p.dim() == 4 and p.shape[2:] == (1, 1) else tuple(p.shape)
        parts = 3 if name.split(".")[-2] == "qkv" else 1
        shapes += [(shape[0] // parts, *shape[1:])] * parts
    norms = [(m.num_groups, m.num_channels, m.eps) for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    return {"parameters": sorted(shapes), "group_norms": sorted(norms), "dropouts": sorted(dropouts)}


@pytest.mark.parametrize("experiment", ["ddpm_cifar10", "smoke", None])
def test_the_peer_is_the_same_network(experiment, tmp_path):
    """The same parameter tensors, norms and dropouts, and the same FLOPs per forward."""
    cfg = compose_config(*([f"experiment={experiment}"] if experiment else []), output_dir=tmp_path)
    ours, diffusion = build_network(cfg)
    size, channels = cfg.data.image_size, cfg.data.channels
    peer = diffusers.UNet2DModel(**unet_config(cfg.model, size, channels, diffusion.output_channels(channels)))
    assert layers(peer) == layers(ours)
    x, t = torch.randn(1, channels, size, size), torch.tensor([7])
    with torch.no_grad():
        assert count_flops(lambda: peer(x, t)) == count_flops(lambda: ours(x, t))


def test_what_the_peer_cannot_match_is_refused(tmp_path):
    cfg = compose_config("experiment=iddpm_cifar10", output_dir=tmp_path)  # scale-shift norm
    with pytest.raises(ConfigError, match="no equal of model.scale_shift_norm=true"):
        unet_config(cfg.model, 32, 3, 6)
    cfg = compose_config("experiment=iddpm_fashion_mnist", output_dir=tmp_path)  # learned variances, hybrid loss
    _, diffusion = build_network(cfg)
    with pytest.raises(ConfigError, match="diffusion.variance, diffusion.loss differ"):
        Peer(cfg, diffusion, torch.device("cpu"), "32")


def bench(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "ddpmlab.bench", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


@pytest.mark.slow
def test_the_benchmark_runs_both_sides_and_writes_its_table(tmp_path):
    out = tmp_path / "results" / "cpu.json"
    done = bench(tmp_path, "--preset", "fashion_mnist", "--batch", "4", "--rounds", "2", "--warmup", "1",
                 "--sample-steps", "2", "--nll-terms", "2", "--full-steps", "3", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["command"].startswith("python -m ddpmlab.bench --preset fashion_mnist")
    assert results["precision"] == "32" and results["batch"] == 4 and results["threads"] == 1
    assert results["versions"]["torch"] == torch.__version__ and results["versions"]["diffusers"]
    preset = results["presets"]["fashion_mnist"]
    assert preset["parameters"]["ddpmlab"] == preset["parameters"]["diffusers"]
    rows = {r["metric"]: r for r in preset["rows"]}
    assert set(rows) == {"training throughput", "training peak memory", "sampling throughput",
                         "full sampler run (3 steps)", "sampling peak memory", "NLL throughput", "training compute"}
    raw = preset["raw_seconds"]
    assert len(raw["training_blocks"]["ddpmlab"]) == len(raw["training_blocks"]["diffusers"]) == 2
    for r in rows.values():
        assert r["ddpmlab"] > 0 and r["diffusers"] > 0
    full = rows["full sampler run (3 steps)"]
    assert full["ratio"] == pytest.approx(full["ddpmlab"] / full["diffusers"])
    sampling = raw["sampling_rounds"]  # the ratio is the median of the rounds' paired ratios
    paired = sorted(p / o for o, p in zip(sampling["ddpmlab"], sampling["diffusers"]))
    assert rows["sampling throughput"]["ratio"] == pytest.approx(sum(paired) / 2)
    assert rows["training compute"]["ddpmlab"] == pytest.approx(
        rows["training throughput"]["ddpmlab"] * preset["train_gflop_per_image"] / 1e3)
    table = out.with_suffix(".md").read_text()
    assert all(f"| fashion_mnist | {metric} |" in table for metric in rows)
    assert "| fashion_mnist | training throughput |" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "error: --batch must be at least 1"),
    (["--preset", "fashion_mnist", "--", "model=nope"], "error: the overrides ['model=nope'] do not compose"),
    (["--preset", "imagenet"], "error: argument --preset: invalid choice"),
])
def test_bad_benchmark_arguments_fail_in_one_line(args, message, tmp_path):
    done = bench(tmp_path, "--out", str(tmp_path / "x.json"), *args)
    assert done.returncode == 2
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "x.json").exists()
