"""The benchmark against diffusers: the peer is the same network, and `python -m ddpmlab.bench` runs end to end."""

import json
import subprocess
import sys

import pytest
import torch

import re

from ddpmlab.bench.contenders import CONTENDERS
from ddpmlab.bench.measure import count_flops, cpu_peak
from ddpmlab.bench.peer import Peer, unet_config
from ddpmlab.bench.report import gain, median_interval
from ddpmlab.bench.run import parse_args, peak_memory
from ddpmlab.errors import ConfigError
from ddpmlab.training import build_network, train
from tests.conftest import compose_config
from tests.test_data import write_mnist_like

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


def test_the_median_interval_is_the_order_statistic_one():
    """Known inputs: up to 8 values the range (its coverage 1 - 2 / 2^n), from 9 the 2nd to (n-1)th value."""
    assert median_interval([3.0, 1.0, 2.0, 4.0, 6.0, 5.0]) == (3.5, 1.0, 6.0, 1 - 2 / 2**6)
    assert median_interval(list(range(1, 9))) == (4.5, 1, 8, 1 - 2 / 2**8)
    assert median_interval(list(range(1, 10))) == (5, 2, 8, 1 - 2 * 10 / 2**9)
    median, low, high, coverage = median_interval(list(range(1, 21)))
    assert (median, low, high) == (10.5, 6, 15) and coverage == pytest.approx(0.9586, abs=1e-4)
    assert median_interval([1.0, 2.0]) == (1.5, 1.0, 2.0, 0.5)  # too few values for 95%: the range, and it says so


@pytest.mark.parametrize("ours, peer, median, interval, verdict", [
    ([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [0.9, 1.2, 1.1, 0.95, 1.3, 1.0], 1.05, [0.9, 1.3], "parity"),
    ([2.0, 2.0, 2.0, 2.0, 2.0, 2.0], [2.2, 2.4, 2.6, 2.8, 3.0, 2.0], 1.25, [1.0, 1.5], "parity"),  # 1.0 is inside
    ([1.0, 2.0, 1.0, 2.0, 1.0, 2.0], [1.1, 2.4, 1.2, 2.6, 1.5, 2.2], 1.2, [1.1, 1.5], "ddpmlab ahead"),
    ([4.0, 4.0, 4.0, 4.0, 4.0, 4.0], [3.0, 2.0, 3.6, 2.0, 1.0, 3.0], 0.625, [0.25, 0.9], "diffusers ahead"),
    ([2.0], [3.0], 1.5, None, "single run"),
])
def test_the_gain_points_up_and_calls_an_interval_holding_one_parity(ours, peer, median, interval, verdict):
    """Lower-is-better raw values (s, MiB) give diffusers / ddpmlab per round: above 1, ddpmlab is ahead."""
    g = gain({"ddpmlab": ours, "diffusers": peer}, "speed-up")
    assert g["median"] == pytest.approx(median) and g["verdict"] == verdict and g["rounds"] == len(ours)
    assert g["interval"] == (None if interval is None else pytest.approx(interval))


def test_the_peers_memory_process_holds_no_ddpmlab_network(monkeypatch):
    """The peer's sampling peak, in its own process, is one CIFAR-10 U-Net (136 MiB of fp32 weights) and a
    one-image step's work (201 MiB in all, measured), not that plus ddpmlab's network (334 MiB before the fix)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = parse_args(["--preset", "cifar10", "--device", "cpu", "--batch", "1", "--sample-steps", "1"])
    weights_mib = sum(p.numel() for p in build_network(compose_config("experiment=ddpm_cifar10"))[0].parameters()) \
        * 4 / 2**20
    peer_mib = peak_memory("cifar10", "diffusers", "sample", args)
    assert weights_mib < peer_mib < 2 * weights_mib, (peer_mib, weights_mib)  # one network's weights, not two


def bench(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "ddpmlab.bench", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=1200, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


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
    utilisation = {"training FLOP utilisation", "sampling FLOP utilisation"} if cpu_peak("32")[0] > 0 else set()
    assert set(rows) == {"training throughput", "training peak memory", "sampling throughput", "sampling compute",
                         "full sampler run (3 steps)", "sampling peak memory", "NLL throughput", "training compute",
                         *utilisation}
    if utilisation:  # both phases against the same peak (the threads used x FLOP per cycle x clock)
        assert 0 < rows["training FLOP utilisation"]["ddpmlab"] <= 100
        assert rows["training FLOP utilisation"]["ddpmlab"] / rows["training compute"]["ddpmlab"] == pytest.approx(
            rows["sampling FLOP utilisation"]["ddpmlab"] / rows["sampling compute"]["ddpmlab"])
    raw = preset["raw_seconds"]
    assert len(raw["training_blocks"]["ddpmlab"]) == len(raw["training_blocks"]["diffusers"]) == 2
    for r in rows.values():
        assert r["ddpmlab"] > 0 and r["diffusers"] > 0
    full = rows["full sampler run (3 steps)"]["gain"]  # every gain points up: diffusers' time / ddpmlab's
    assert full["median"] == pytest.approx(raw["full_sampler"]["diffusers"][0] / raw["full_sampler"]["ddpmlab"][0])
    assert full["verdict"] == "single run" and full["interval"] is None
    sampling = raw["sampling_rounds"]  # the gain is the median of the rounds' paired ratios, with their range
    paired = sorted(p / o for o, p in zip(sampling["ddpmlab"], sampling["diffusers"]))
    assert rows["sampling throughput"]["gain"]["median"] == pytest.approx(sum(paired) / 2)
    assert rows["sampling throughput"]["gain"]["interval"] == pytest.approx(paired)
    memory = preset["raw_mib"]["sampling"]  # peak memory: 2 processes per side, the saving diffusers / ddpmlab
    saving = sorted(p / o for o, p in zip(memory["ddpmlab"], memory["diffusers"]))
    assert rows["sampling peak memory"]["gain"]["interval"] == pytest.approx(saving)
    assert all(r["gain"]["kind"] == "memory saving" for m, r in rows.items() if "memory" in m)
    assert rows["training compute"]["ddpmlab"] == pytest.approx(
        rows["training throughput"]["ddpmlab"] * preset["train_gflop_per_image"] / 1e3)
    table = out.with_suffix(".md").read_text()
    assert all(f"| fashion_mnist | {metric} |" in table for metric in rows)
    assert "| fashion_mnist | training throughput |" in done.stdout
    assert "| ddpmlab's gain (higher is better) | interval | verdict |" in table and "(paired)" not in table
    loader = preset["loader"]  # the streaming loader (data=shards) against the in-memory path, in the same rounds
    assert len(loader["raw_seconds"]["shards"]) == len(loader["raw_seconds"]["in memory"]) == 2
    assert loader["shards"] > 0 and loader["in memory"] > 0 and loader["ratio"]["rounds"] == 2
    assert "| fashion_mnist | training throughput, streamed from shards | images/s |" in table


def test_stored_results_are_recomputed_from_their_raw_numbers(tmp_path):
    """`--recompute` rebuilds the table of an older results file (its ddpmlab / diffusers ratios) from the raw
    rounds: gains pointing up with their interval and verdict; a row without raw numbers leaves the table but
    stays in the file."""
    old = {"command": "python -m ddpmlab.bench", "date": "2026-11-29T10:18:25+00:00", "device": "cpu", "threads": 2,
           "versions": {"torch": torch.__version__}, "presets": {"tiny": {
               "rows": [{"metric": "sampling throughput", "unit": "images x steps/s", "ddpmlab": 10.0,
                         "diffusers": 10.0, "ratio": 1.05, "better": "higher", "note": ""},
                        {"metric": "full sampler run (100 steps)", "unit": "s", "ddpmlab": 7.0, "diffusers": 9.8,
                         "ratio": 0.71, "better": "lower", "note": ""},
                        {"metric": "sampling peak memory", "unit": "MiB", "ddpmlab": 348.0, "diffusers": 594.0,
                         "ratio": 0.59, "better": "lower", "note": ""}],
               "raw_seconds": {"sampling_rounds": {"ddpmlab": [1.0] * 6, "diffusers": [0.9, 1.2, 1.1, 0.95, 1.3, 1.0]},
                               "full_sampler": {"ddpmlab": [7.0], "diffusers": [9.8]}}}}}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    done = bench(tmp_path, "--recompute", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    line = ("| tiny | sampling throughput | images x steps/s | 10 | 10 | higher | 1.05x speed-up | 0.90-1.30 (97%) "
            "| parity |")
    assert line in done.stdout and line in path.with_suffix(".md").read_text()
    assert "| full sampler run (100 steps) | s | 7 | 9.8 | lower | 1.40x speed-up | - | single run |" in done.stdout
    new = json.loads(path.read_text())
    rows = new["presets"]["tiny"]["rows"]
    assert [r["metric"] for r in rows] == ["sampling throughput", "full sampler run (100 steps)"]
    assert all("ratio" not in r for r in rows) and rows[1]["gain"]["median"] == pytest.approx(1.4)
    assert new["recomputed"]["dropped_rows"] == {"tiny": [old["presets"]["tiny"]["rows"][2]]}
    assert new["presets"]["tiny"]["raw_seconds"] == old["presets"]["tiny"]["raw_seconds"]


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "error: --batch must be at least 1"),
    (["--preset", "fashion_mnist", "--", "model=nope"], "error: the overrides ['model=nope'] do not compose"),
    (["--preset", "imagenet"], "error: argument --preset: invalid choice"),
    (["--recompute", "missing.json"], "error: --recompute missing.json: not a readable results JSON"),
    (["--time-to-quality", "--minutes", "0"], "error: --minutes=0 must be above 0"),
    (["--time-to-quality", "--contenders", "ddpmlab,k-diffusion"], "error: --contenders names k-diffusion: choose from"),
])
def test_bad_benchmark_arguments_fail_in_one_line(args, message, tmp_path):
    done = bench(tmp_path, "--out", str(tmp_path / "x.json"), *args)
    assert done.returncode == 2
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_time_to_quality_trains_every_contender_and_scores_them_alike(tmp_path):
    """Every contender (ours, its fp32, bf16 and EDM variants, diffusers' and lucidrains' recipes) trains for the budget
    in a process of its own on the same images, samples at no more than 50 network calls, and is scored by the same
    two feature extractors against the same reference, KID with its standard error; the table, JSON and grids."""
    root = tmp_path / "data"
    write_mnist_like(root / "FashionMNIST" / "raw", n_train=64, n_test=8)
    out = tmp_path / "ttq" / "ttq.json"
    done = bench(tmp_path, "--time-to-quality", "--minutes", "0.05", "--samples", "20", "--contenders",
                 ",".join(CONTENDERS), "--data-root", str(root), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert list(results["contenders"]) == list(CONTENDERS) and results["reference_images"] == 64  # all, below 2000
    for name, r in results["contenders"].items():
        assert r["steps"] >= 1 and r["images_seen"] >= r["steps"], name
        calls = int(re.search(r"\((\d+) network calls\)", r["sampler"]).group(1))
        assert 0 < calls <= 50, (name, r["sampler"])
        for extractor in ("inception", "classifier"):
            assert r[f"fid_{extractor}"] > 0 and r[f"kid_{extractor}_se"] > 0, (name, extractor)
            ours = results["contenders"]["ddpmlab"][f"kid_{extractor}"]
            assert r[f"kid_ratio_{extractor}"] == pytest.approx(r[f"kid_{extractor}"] / ours)
    assert "bf16" in results["contenders"]["ddpmlab-bf16"]["recipe"]
    assert "fp32" in results["contenders"]["ddpmlab-fp32"]["recipe"]
    assert results["contenders"]["ddpmlab-edm"]["sampler"].startswith("Heun")
    table = out.with_suffix(".md").read_text()
    assert all(f"| {name} |" in table for name in CONTENDERS) and out.with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
def test_precision_ab_times_both_precisions_on_our_path_and_the_bounds_difference(tmp_path):
    """--precision-ab: our real training and sampling in 32-true and bf16-mixed from the same weights, in ABBA
    rounds, each row the paired ratio's median within its rounds; with --weights, the bound in both precisions."""
    run = tmp_path / "run"
    train(compose_config("trainer.max_steps=2", "data.batch_size=4", "callbacks.sample_grid=null", "val.num_images=0",
                         "optimized_metric=null", output_dir=run))
    out = tmp_path / "ab.json"
    done = bench(tmp_path, "--precision-ab", "--preset", "fashion_mnist", "--batch", "2", "--rounds", "2", "--warmup",
                 "1", "--block", "1", "--sample-steps", "2", "--weights", str(run / "checkpoints" / "last.ckpt"),
                 "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())["presets"]["fashion_mnist"]["precision"]
    rows = {r["metric"]: r for r in result["rows"]}
    assert set(rows) == {"training throughput", "sampling throughput"}
    for r in rows.values():
        assert len(r["raw_seconds"]["fp32"]) == len(r["raw_seconds"]["bf16"]) == 2
        ratios = sorted(f / b for f, b in zip(r["raw_seconds"]["fp32"], r["raw_seconds"]["bf16"]))
        assert ratios[0] <= r["ratio"]["median"] <= ratios[-1] and r["fp32"] > 0 and r["bf16"] > 0
    bound = result["bound"]
    assert 0 < bound["fp32_bpd"] < 100 and bound["max_abs_difference_bpd"] >= bound["mean_abs_difference_bpd"] >= 0
    report = out.with_suffix(".md").read_text()
    assert "| fashion_mnist | training throughput | images/s |" in report
    assert "ddpmlab's gain" not in report  # no empty table of the peer it did not time
