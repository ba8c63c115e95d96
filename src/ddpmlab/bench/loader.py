"""The streaming loader (data=shards) against the in-memory path: ddpmlab's training throughput fed from each.

Both feed the same module the same images: args.batch x 8 random uint8 images, held as the in-memory path's
tensor or written as shards the way `python -m ddpmlab.prepare` writes them. Each round trains args.warmup
untimed and args.block timed steps from each source, the sources in ABBA order; the row gives each side's
median throughput and the median over rounds of the paired ratio shards / in memory, with its interval
(report.median_interval). The target: at least 0.95, within 5% of the in-memory path.
"""

import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from ddpmlab.bench.measure import synchronize
from ddpmlab.bench.report import median_interval
from ddpmlab.prepare import FromTensor
from ddpmlab.progress import track
from ddpmlab.shards import TRAIN, litdata
from ddpmlab.training import build

SOURCES = ("in memory", "shards")


class StepsTimer(L.Callback):
    """Seconds from the start of step `warmup` to the end of training: the timed steps, their batches' loading too."""

    def __init__(self, device, warmup: int):
        self.device, self.warmup, self.seconds = device, warmup, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            synchronize(self.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self.start


def loader_rows(cfg, module, args, fit) -> dict:
    """The streaming-against-in-memory row of one preset; `fit` is run.fit (ddpmlab's real Trainer.fit)."""
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    images = torch.randint(0, 256, (args.batch * 8, *shape), dtype=torch.uint8)
    times = {source: [] for source in SOURCES}
    with tempfile.TemporaryDirectory() as tmp:
        litdata().optimize(fn=FromTensor(images, shape[1], shape[0]), inputs=list(range(len(images))),
                           output_dir=str(Path(tmp) / TRAIN), chunk_bytes="64MB", num_workers=1, keep_data_ordered=True,
                           verbose=False)
        for r in track(range(args.rounds), total=args.rounds, desc="training, shards against in memory"):
            for source in SOURCES if r % 2 == 0 else reversed(SOURCES):
                data = build(cfg.data, dataset="shards", path=tmp) if source == "shards" else None
                timer = StepsTimer(args.device, args.warmup)
                fit(cfg, module, args, args.warmup + args.block, [timer], data=data, images=images)
                times[source].append(timer.seconds)
    ratios = [memory / shards for memory, shards in zip(times["in memory"], times["shards"])]
    median, low, high, coverage = median_interval(ratios)
    work = args.batch * args.block
    return {"metric": "training throughput, streamed from shards", "unit": "images/s",
            "in memory": work / statistics.median(times["in memory"]), "shards": work / statistics.median(times["shards"]),
            "ratio": {"median": median, "interval": [low, high], "coverage": coverage, "rounds": len(ratios)},
            "raw_seconds": times}


def loader_table(results: dict) -> str:
    """The loader rows as a Markdown table after the main one (empty when none was measured)."""
    rows = [(preset, r["loader"]) for preset, r in results["presets"].items() if "loader" in r]
    if not rows:
        return ""
    lines = ["", "", "| preset | metric | unit | in memory | shards | shards / in memory | interval |",
             "|---|---|---|---:|---:|---:|---|"]
    for preset, r in rows:
        g = r["ratio"]
        lines.append(f"| {preset} | {r['metric']} | {r['unit']} | {r['in memory']:.4g} | {r['shards']:.4g} | "
                     f"{g['median']:.3f} | {g['interval'][0]:.2f}-{g['interval'][1]:.2f} "
                     f"({100 * g['coverage']:.0f}%) |")
    lines.append("- shards / in memory: the median over rounds of the paired throughput ratio (in-memory time / "
                 "streaming time of the same round); the target is at least 0.95")
    return "\n".join(lines)
