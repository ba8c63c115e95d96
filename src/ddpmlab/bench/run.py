"""The benchmark: ddpmlab against diffusers at the same network, batch and precision, in one process.

    python -m ddpmlab.bench                                   # both presets on this machine's device, fp32
    python -m ddpmlab.bench --preset cifar10 --precision bf16 --out benchmarks/results/h200-bf16.json
    python -m ddpmlab.bench --preset cifar10 -- performance.channels_last=false   # ddpmlab config overrides

Each measurement alternates the two in rounds (ddpmlab then diffusers in even rounds, diffusers first in odd
ones), so drift of a shared machine falls on both. The table gives each side's median and ddpmlab's gain over
diffusers with its interval over rounds (report.py). Peak memory: --rounds processes per side, alternating.
ddpmlab trains through its real path (Lightning Trainer.fit of the DiffusionModule built from the preset's
config: loss, clipping, fused Adam, EMA, logging); the peer's steps run inside that fit, between ddpmlab's
blocks of steps, on ddpmlab's batches (the block's own when it goes second, the previous block's when it goes
first); see peer.py.
"""

import argparse
import json
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from ddpmlab.bench.cli import PRESETS, parse_args, preset_config, read_results  # noqa: F401 (parse_args: tests)
from ddpmlab.bench.loader import loader_rows, loader_table
from ddpmlab.bench.measure import bf16_peak, count_flops, cpu_peak, describe, synchronize, timed
from ddpmlab.bench.peer import Peer, import_diffusers
from ddpmlab.bench.precision import precision_rows, precision_table
from ddpmlab.bench.quality import time_to_quality
from ddpmlab.bench.report import SIDES, add_gains, table
from ddpmlab.data import to_uint8
from ddpmlab.diffusion.noise import ExampleNoise
from ddpmlab.diffusion.samplers import get_sampler
from ddpmlab.performance import optimize_network
from ddpmlab.progress import track
from ddpmlab.training import build, build_module


class Alternate(L.Callback):
    """Times ddpmlab's training in blocks of steps and runs the peer's steps between them on the same batches."""

    def __init__(self, peer: Peer, args: argparse.Namespace):
        self.peer, self.args, self.device = peer, args, args.device
        self.times = {"ddpmlab": [], "diffusers": []}
        self.batches, self.previous = [], []

    def _peer_block(self, batches) -> None:
        with timed(self.device, self.times["diffusers"]):
            for x_0 in batches:
                self.peer.train_step(x_0)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        k = trainer.global_step - self.args.warmup
        if k >= 0 and k % self.args.block == 0:
            if (k // self.args.block) % 2 == 1:  # odd rounds: the peer first
                self._peer_block(self.previous)
            synchronize(self.device)
            self._start = time.perf_counter()
        self.batches.append(batch)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        k = trainer.global_step - self.args.warmup
        if k <= 0:  # warm-up: the peer warms up on the same batch, untimed
            self.peer.train_step(batch)
            self.batches = []
            return
        if k % self.args.block == 0:
            synchronize(self.device)
            self.times["ddpmlab"].append(time.perf_counter() - self._start)
            if (k // self.args.block) % 2 == 1:  # even rounds (k counts the finished block): the peer second
                self._peer_block(self.batches)
            self.previous, self.batches = self.batches, []
            print(f"  train round {len(self.times['ddpmlab'])}/{self.args.rounds}: "
                  f"ddpmlab {self.times['ddpmlab'][-1]:.2f} s, diffusers {self.times['diffusers'][-1]:.2f} s "
                  f"per {self.args.block} step(s)", flush=True)


def fit(cfg: DictConfig, module, args: argparse.Namespace, steps: int, callbacks=(), data=None, images=None,
        precision: str | None = None) -> None:
    """ddpmlab's Trainer.fit for `steps` steps (no logger, no checkpoint) from `data`, by default the in-memory
    path's uint8 `images` (random ones if None), in the config's precision unless `precision` is given."""
    if data is None:
        data = build(cfg.data)
        data.train_images = images if images is not None else torch.randint(
            0, 256, (args.batch * 8, cfg.data.channels, cfg.data.image_size, cfg.data.image_size), dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(cfg.trainer, max_steps=steps, logger=False, callbacks=list(callbacks),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator=args.device.type, devices=1, default_root_dir=tmp,
                        precision=precision or cfg.trainer.precision)
        trainer.fit(module, datamodule=data)


def sampler(network, diffusion, shape: tuple[int, ...], args: argparse.Namespace):
    """ddpmlab's sampling as evaluate.py runs it: respaced ancestral steps, per-example noise, uint8 out."""
    def sample(steps: int) -> torch.Tensor:
        noise = ExampleNoise(range(args.batch), 0, args.device)
        return to_uint8(get_sampler("respaced")(network, diffusion, (args.batch, *shape), noise, steps=steps))
    return sample


def peak_memory(preset: str, side: str, phase: str, args: argparse.Namespace) -> float:
    """Peak memory in MiB of one side's training steps or sampler run, in its own process (memory.py)."""
    job = {"preset": preset, "side": side, "phase": phase, "batch": args.batch, "precision": args.precision,
           "device": str(args.device), "overrides": list(args.overrides), "sample_steps": args.sample_steps,
           "peer_channels_last": args.peer_channels_last}
    done = subprocess.run([sys.executable, "-m", "ddpmlab.bench.memory", json.dumps(job)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the memory measurement of {side} {phase} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"] / 2.0**20


def memory_rows(preset: str, args: argparse.Namespace) -> dict:
    """The peak-memory rows of one preset: args.rounds processes per side and phase, the sides in ABBA order."""
    raw = {"training": {"ddpmlab": [], "diffusers": []}, "sampling": {"ddpmlab": [], "diffusers": []}}
    for (phase, runs), job_phase in zip(raw.items(), ("train", "sample")):
        for r in track(range(args.rounds), total=args.rounds, desc=f"{preset}: {phase} peak memory"):
            for side in SIDES if r % 2 == 0 else reversed(SIDES):
                runs[side].append(peak_memory(preset, side, job_phase, args))
    med = statistics.median
    return {"rows": [
        row("training peak memory", "MiB", med(raw["training"]["ddpmlab"]), med(raw["training"]["diffusers"]),
            False, "3 steps in a process of their own: weights, gradients, Adam, EMA, activations (RSS on a CPU)"),
        row("sampling peak memory", "MiB", med(raw["sampling"]["ddpmlab"]), med(raw["sampling"]["diffusers"]),
            False, "one network sampling, in a process of its own")], "raw_mib": raw}


def alternate_rounds(args, desc: str, ours, peer) -> dict[str, list[float]]:
    """`ours()` and `peer()` timed in args.rounds rounds, in ABBA order, after one untimed call of each."""
    times = {"ddpmlab": [], "diffusers": []}
    ours(), peer()
    for r in track(range(args.rounds), total=args.rounds, desc=desc):
        order = [("ddpmlab", ours), ("diffusers", peer)]
        for name, fn in order if r % 2 == 0 else reversed(order):
            with timed(args.device, times[name]):
                fn()
    return times


def row(metric: str, unit: str, ours: float, peer: float, higher_is_better: bool, note: str = "") -> dict:
    """One table row; its gain over rounds is added from the raw series (report.add_gains)."""
    return {"metric": metric, "unit": unit, "ddpmlab": ours, "diffusers": peer,
            "better": "higher" if higher_is_better else "lower", "note": note}


def throughput_row(metric: str, unit: str, work: float, times: dict[str, list[float]], note: str) -> dict:
    """Throughput = work / median time (the gain pairs the rounds: a machine that slows down for a while slows
    both sides of a round and leaves that round's ratio alone)."""
    med = statistics.median
    return row(metric, unit, work / med(times["ddpmlab"]), work / med(times["diffusers"]), True, note)


def bench_preset(preset: str, args: argparse.Namespace) -> dict:
    """Every row of the table for one preset."""
    cfg = preset_config(preset, args)
    device, batch = args.device, args.batch
    L.seed_everything(0, verbose=False)
    module = build_module(cfg)
    diffusion = module.diffusion.to(device)
    peer = Peer(cfg, diffusion, device, args.precision, channels_last=args.peer_channels_last)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in (("ddpmlab", module.model),
                                                                            ("diffusers", peer.unet))}
    print(f"{preset}: {params['ddpmlab'] / 1e6:.2f}M parameters (diffusers {params['diffusers'] / 1e6:.2f}M), "
          f"batch {batch}, {args.precision}, {describe(device)}", flush=True)

    training = Alternate(peer, args)
    fit(cfg, module, args, args.warmup + args.rounds * args.block, [training])
    module.to(device)  # the fit's teardown moved the module, its EMA copy and its diffusion back to the CPU
    ema, diffusion = module.ema_model, module.diffusion
    optimize_network(ema, compile=cfg.performance.compile)  # as evaluate.py prepares its network
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    autocast = peer.autocast  # both sides sample and score under the same autocast
    T = diffusion.num_timesteps

    sample = sampler(ema, diffusion, shape, args)

    def ours_sample(steps):
        with autocast():
            return sample(steps)

    sampling = alternate_rounds(args, f"sampling, {args.sample_steps} steps", lambda: ours_sample(args.sample_steps),
                                lambda: peer.sample(batch, args.sample_steps))
    full_steps = args.full_steps or (T if device.type == "cuda" else min(T, 100))
    full = {"ddpmlab": [], "diffusers": []}
    with timed(device, full["ddpmlab"]):
        ours_sample(full_steps)
    with timed(device, full["diffusers"]):
        peer.sample(batch, full_steps)

    x_0 = torch.rand(batch, *shape, device=device) * 2 - 1
    terms = range(T - 1, T - 1 - min(args.nll_terms, T), -1)

    def bound(network):
        with autocast():
            return diffusion.calc_bpd_loop(network, x_0, ExampleNoise(range(batch), 0, device), timesteps=terms)

    peer.unet.eval()
    nll = alternate_rounds(args, f"NLL, {len(terms)} of {T} terms", lambda: bound(ema), lambda: bound(peer.network))

    # FLOPs per image of one training step (forward and backward) and of one sampling step (forward)
    x = torch.randn(batch, *shape, device=device)
    t = torch.randint(0, T, (batch,), device=device)
    with autocast():
        # .forward: the uncompiled network (counting through torch.compile would compile it again)
        train_flops = count_flops(lambda: module.model.forward(x, t).float().square().mean().backward()) / batch
        sample_flops = count_flops(lambda: ema.forward(x, t)) / batch
    module.model.zero_grad(set_to_none=True)

    rows = [
        throughput_row("training throughput", "images/s", batch * args.block, training.times,
                       "full optimizer step: loss, backward, clipping, Adam, EMA"),
        throughput_row("sampling throughput", "images x steps/s", batch * args.sample_steps, sampling,
                       f"{args.sample_steps} ancestral steps per round, one network evaluation each"),
        row(f"full sampler run ({full_steps} steps)", "s", full["ddpmlab"][0], full["diffusers"][0], False,
            f"{batch} images, one run each"),
        throughput_row("NLL throughput", "images/s", batch / (T / len(terms)), nll,
                       f"the full {T}-term bound, timed over {len(terms)} terms; diffusers' network in "
                       "ddpmlab's bound (diffusers has none)"),
    ]
    train = {side: rows[0][side] for side in SIDES}
    achieved = {side: train[side] * train_flops for side in SIDES}
    rows.append(row("training compute", "TFLOP/s", achieved["ddpmlab"] / 1e12, achieved["diffusers"] / 1e12, True,
                    f"{train_flops / 1e9:.2f} GFLOP per image (forward + backward, torch.utils.flop_counter)"))
    sampled = {side: rows[1][side] * sample_flops for side in SIDES}  # images x steps/s x FLOP per forward
    rows.append(row("sampling compute", "TFLOP/s", sampled["ddpmlab"] / 1e12, sampled["diffusers"] / 1e12, True,
                    f"{sample_flops / 1e9:.3f} GFLOP per image and step (forward, torch.utils.flop_counter)"))
    peak, assumption = (bf16_peak(device), "the data sheet's dense bf16 peak") if device.type == "cuda" else \
        cpu_peak(args.precision)
    if peak and (device.type == "cpu" or args.precision == "bf16"):
        for phase, flops in (("training", achieved), ("sampling", sampled)):
            rows.append(row(f"{phase} FLOP utilisation", "%", 100 * flops["ddpmlab"] / peak,
                            100 * flops["diffusers"] / peak, True,
                            f"of the {peak / 1e12:.3g} TFLOP/s {'bf16' if args.precision == 'bf16' else 'fp32'} "
                            f"peak: {assumption}"))
    memory = memory_rows(preset, args)
    return {"parameters": params, "train_gflop_per_image": train_flops / 1e9,
            "sample_gflop_per_image": sample_flops / 1e9, "full_sampler_steps": full_steps,
            "nll_terms_timed": len(terms), "rows": rows + memory["rows"], "loader": loader_rows(cfg, module, args, fit),
            "raw_seconds": {"training_blocks": training.times, "sampling_rounds": sampling,
                            "full_sampler": full, "nll_rounds": nll}, "raw_mib": memory["raw_mib"]}


def main(argv: list[str], args: argparse.Namespace | None = None) -> int:
    """The benchmark of argv (parsed and checked by cli.py when args is given)."""
    args = parse_args(argv) if args is None else args
    if args.recompute:
        return recompute(args.recompute)
    if args.time_to_quality:
        args.argv = argv
        time_to_quality(args)
        return 0
    diffusers = import_diffusers()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32 on both
    presets = list(PRESETS) if args.preset == "all" else [args.preset]
    results = {
        "command": "python -m ddpmlab.bench " + shlex.join(argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": describe(args.device), "threads": torch.get_num_threads(), "precision": args.precision,
        "batch": args.batch, "rounds": args.rounds, "block": args.block, "warmup": args.warmup,
        "sample_steps": args.sample_steps, "peer_channels_last": args.peer_channels_last,
        "overrides": list(args.overrides), "memory_only": args.memory_only, "loader_only": args.loader_only,
        "precision_ab": args.precision_ab,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "lightning": L.__version__,
                     "python": platform.python_version()},
        "presets": {},
    }
    for preset in presets:
        if args.loader_only:
            cfg = preset_config(preset, args)
            results["presets"][preset] = {"rows": [], "loader": loader_rows(cfg, build_module(cfg), args, fit)}
        elif args.precision_ab:
            cfg = preset_config(preset, args)
            L.seed_everything(0, verbose=False)
            results["presets"][preset] = {"rows": [], "precision": precision_rows(cfg, build_module(cfg), args, fit)}
        else:
            results["presets"][preset] = memory_rows(preset, args) if args.memory_only else bench_preset(preset, args)
        add_gains(results["presets"][preset])
    write(results, args.out)
    return 0


def recompute(path: Path) -> int:
    """Stored results' table rebuilt from their raw numbers with today's statistic; rows without raw numbers are
    dropped from the table and kept, as they were, under "recomputed"."""
    results = read_results(path)
    dropped = results.get("recomputed", {}).get("dropped_rows", {})  # an earlier recomputation's, kept
    for preset, result in results["presets"].items():
        before = {r["metric"]: dict(r) for r in result["rows"]}
        dropped.setdefault(preset, []).extend(before[metric] for metric in add_gains(result))
    results["recomputed"] = {"command": f"python -m ddpmlab.bench --recompute {path}",
                             "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "dropped_rows": {preset: rows for preset, rows in dropped.items() if rows}}
    write(results, path)
    return 0


def write(results: dict, out: Path) -> None:
    """The JSON (raw numbers included) and the table as Markdown beside it; the table printed."""
    text = table(results) + loader_table(results) + precision_table(results)
    print(text)
    header = (f"`{results['command']}`\n\n{results['device']}, {results['threads']} threads, "
              f"torch {results['versions']['torch']}, {results['date']}\n\n")
    if "recomputed" in results:
        dropped = [f"{preset} {r['metric']}" for preset, rows in results["recomputed"]["dropped_rows"].items()
                   for r in rows]
        header += f"Table recomputed from the raw numbers: `{results['recomputed']['command']}`, " \
                  f"{results['recomputed']['date']}. Rows without raw numbers, left out (kept in the JSON under " \
                  f"recomputed.dropped_rows): {', '.join(dropped) or 'none'}\n\n"
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"{header}{text}\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")

