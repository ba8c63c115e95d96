"""Resident memory of one training process (one DDP rank) as the dataset grows: data=shards against in memory.

    python benchmarks/shards_memory.py [--sizes 2000 20000] [--image-size 64] [--batches 300]

For each size N, N random 64x64 RGB images are written as shards (litdata's optimize, as ddpmlab.prepare
writes them), then each source is read in a fresh process of its own: the DiffusionDataModule's training
loader for `--batches` batches of 64 (several epochs of the smaller set, about one of the larger) and, for the
in-memory path, the same number of images held as the uint8 tensor that path reads every split into. Each
process reports its peak resident set (VmHWM), how far its anonymous and its file-backed resident memory rose
while reading (RssAnon, RssFile, sampled after every batch), and its RSS after the import of torch, Lightning and ddpmlab,
so the table shows what the data itself costs. Results: benchmarks/results/shards-memory.{json,md}.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# RssAnon: memory the process owns (the in-memory path's tensor); RssFile: pages of files it maps (litdata reads
# local chunks through mmap), the kernel's page cache, shared and dropped under memory pressure.
FIELDS = ("RssAnon", "RssFile")
LABELS = {"shards": "shards (streamed)", "image_folder": "in memory"}


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident set (VmRSS) or its peak (VmHWM), in MiB. Not ru_maxrss: Linux carries that over
    exec from the forked parent, here the process that wrote the shards."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:")) / 1024


def child(source: str, path: str, n: int, size: int, batches: int) -> None:
    """One measurement, in this process: print {"baseline_mib", "peak_mib", "after_mib"} as JSON."""
    import torch

    from ddpmlab.data import DiffusionDataModule

    baseline = {field: rss_mib(field) for field in ("VmRSS", *FIELDS)}
    peak = dict(baseline)
    dm = DiffusionDataModule(source, path, size, 3, batch_size=64, seed=0, path=path)
    if source == "shards":
        dm.setup("fit")
    else:  # what every reader of the in-memory path returns: the whole split as one uint8 tensor
        dm.train_images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    loader, seen = dm.train_dataloader(), 0
    while seen < batches:
        for batch in loader:
            seen += 1
            peak = {field: max(peak[field], rss_mib(field)) for field in FIELDS}
            if seen == batches:
                break
    print(json.dumps({"baseline_mib": baseline["VmRSS"], "peak_mib": rss_mib("VmHWM"), "after_mib": rss_mib(),
                      "anon_growth_mib": peak["RssAnon"] - baseline["RssAnon"],
                      "file_growth_mib": peak["RssFile"] - baseline["RssFile"]}))


def write_shards(out: Path, n: int, size: int) -> None:
    import torch

    from ddpmlab.prepare import FromTensor
    from ddpmlab.shards import litdata

    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    litdata().optimize(fn=FromTensor(images, size, 3), inputs=list(range(n)), output_dir=str(out / "train"),
                       chunk_bytes="64MB", num_workers=1, keep_data_ordered=True, verbose=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        source, path, n, size, batches = args.child
        return child(source, path, int(n), int(size), int(batches))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            write_shards(Path(tmp) / str(n), n, args.image_size)
            for source in ("shards", "image_folder"):
                done = subprocess.run([sys.executable, __file__, "--child", source, str(Path(tmp) / str(n)), str(n),
                                       str(args.image_size), str(args.batches)],
                                      capture_output=True, text=True, check=True)
                rows.append({"images": n, "source": LABELS[source], **json.loads(done.stdout.strip().splitlines()[-1])})
                print(rows[-1], flush=True)
    out = ROOT / "benchmarks" / "results" / "shards-memory"
    record = {"command": "python benchmarks/shards_memory.py " + " ".join(sys.argv[1:]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "image_size": args.image_size,
              "batches": args.batches, "batch_size": 64, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"`{record['command']}` ({record['date']}): one process, {args.batches} batches of 64 "
             f"{args.image_size}x{args.image_size} RGB images", "",
             "| images | source | RSS after imports (MiB) | peak RSS (MiB) | peak - imports (MiB) | anonymous growth (MiB) "
             "| file-mapped growth (MiB) |", "|---:|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['images']} | {r['source']} | {r['baseline_mib']:.0f} | {r['peak_mib']:.0f} | "
              f"{r['peak_mib'] - r['baseline_mib']:.0f} | {r['anon_growth_mib']:.0f} | {r['file_growth_mib']:.0f} |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
