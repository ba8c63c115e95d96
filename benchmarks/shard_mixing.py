"""How well training batches mix a class-sorted source: data=shards against data=image_folder (in memory).

    python benchmarks/shard_mixing.py [--classes 10] [--per-class 300] [--batch 32] [--epochs 2] [--workers 0 2]

Writes --classes folders of --per-class 16x16 RGB images laid out as ImageNet's `train/<class>/` (the class is
the red channel's value, class x 25, so it survives the round trip exactly), writes them as shards with the
README's command (`python -m ddpmlab.prepare SRC --out DIR --image-size 16`, which keeps the sorted path order),
then reads --epochs epochs of training batches from the DiffusionDataModule of each source and counts the
distinct classes in each batch. A batch drawn uniformly at random from the whole set holds, on average,
K (1 - C(N - N/K, B) / C(N, B)) classes (K classes of N/K images, batch B): printed beside the measurements.
Also the loader's own speed (images/s, the batches alone, no network) per source and worker count.
Results: benchmarks/results/shard-mixing.{json,md}.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SIZE, STEP = 16, 25  # image side; class c has red value c * STEP


def write_sorted_classes(root: Path, classes: int, per_class: int) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            pixels[..., 0] = c * STEP
            Image.fromarray(pixels).save(folder / f"{c:02d}_{i:05d}.png")


def expected_classes(classes: int, per_class: int, batch: int) -> float:
    n = classes * per_class
    return classes * (1 - math.comb(n - per_class, batch) / math.comb(n, batch))


def measure(source: str, images: Path, shards: Path, batch: int, epochs: int, workers: int) -> dict:
    from ddpmlab.data import DiffusionDataModule

    dm = DiffusionDataModule(source, str(images / "train"), SIZE, 3, batch_size=batch, num_workers=workers, seed=0,
                             path=str(shards))
    dm.setup("fit")
    counts, seen, start = [], 0, time.perf_counter()
    for _ in range(epochs):
        for x in dm.train_dataloader():  # uint8 (B, 3, S, S): the transfer hook is not called without a Trainer
            counts.append(len(set((x[:, 0, 0, 0] // STEP).tolist())))
            seen += len(x)
    seconds = time.perf_counter() - start
    return {"source": source, "workers": workers, "batches": len(counts), "mean_classes": float(np.mean(counts)),
            "min_classes": int(min(counts)), "max_classes": int(max(counts)), "images_per_s": seen / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--label", default="", help="a note for the results (e.g. the commit measured)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images, shards = Path(tmp) / "images", Path(tmp) / "shards"
        write_sorted_classes(images, args.classes, args.per_class)
        subprocess.run([sys.executable, "-m", "ddpmlab.prepare", str(images / "train"), "--out", str(shards),
                        "--image-size", str(SIZE), "--workers", "2"], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        for workers in args.workers:
            for source in ("image_folder", "shards"):
                rows.append(measure(source, images, shards, args.batch, args.epochs, workers))
                print(rows[-1], flush=True)
    expected = expected_classes(args.classes, args.per_class, args.batch)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "label": args.label,
              "classes": args.classes, "per_class": args.per_class, "batch": args.batch, "epochs": args.epochs,
              "expected_uniform": expected, "rows": rows}
    out = ROOT / "benchmarks" / "results"
    (out / "shard-mixing.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Classes per training batch, class-sorted source ({result['date']}{', ' + args.label if args.label else ''})",
             "", f"{args.classes} classes x {args.per_class} images in `train/<class>/` order, batches of {args.batch}, "
             f"{args.epochs} epochs; a uniformly random batch holds {expected:.2f} classes on average.", "",
             "| source | workers | batches | classes per batch (mean) | min | max | loader images/s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['source']} | {r['workers']} | {r['batches']} | {r['mean_classes']:.2f} | {r['min_classes']} | "
              f"{r['max_classes']} | {r['images_per_s']:.0f} |" for r in rows]
    (out / "shard-mixing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
