"""Time to quality: `python -m ddpmlab.bench --time-to-quality [--minutes 10] [--samples 500]`.

What a CPU user gets from the same wall-clock budget: ddpmlab's default run, diffusers' train_unconditional
recipe and lucidrains' denoising-diffusion-pytorch README recipe (contenders.py says exactly what each runs and
why), trained one after another on the same Fashion-MNIST images, each in a process of its own, then sampled
with at most 50 network calls per image and scored by the same code against the same reference: the 2000
training images make eval compares with (data.evaluation_subset), under Inception and under the domain
classifier (ddpmlab.metrics.fidelity, as evaluate.py scores). Writes <out>.json, <out>.md and <out>.png (the
sample grids side by side).
"""

import json
import math
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from ddpmlab.bench.contenders import CONTENDERS, MODULES, training_images
from ddpmlab.errors import ConfigError

REFERENCE_IMAGES = 2000  # make eval's CPU reference (cpu_reference_images)


def check(args) -> list[str]:
    """The contenders to run, every one runnable: one line and exit 2 otherwise, before any training."""
    if not args.minutes > 0:
        raise ConfigError(f"--minutes={args.minutes:g} must be above 0: the training budget of each contender")
    if args.samples < 2:
        raise ConfigError(f"--samples={args.samples} must be at least 2 (FID and KID need two)")
    names = args.contenders.split(",")
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise ConfigError(f"--contenders names {', '.join(unknown)}: choose from {', '.join(CONTENDERS)}")
    used = [str(args.keep_runs / n) for n in names if args.keep_runs is not None and (args.keep_runs / n).exists()]
    if used:
        raise ConfigError(f"--keep-runs: {', '.join(used)} already exist(s): give another --keep-runs folder, so "
                          "that no earlier run is overwritten")
    import importlib.util

    missing = [f"{n} needs {MODULES[n]}" for n in names if n in MODULES and importlib.util.find_spec(MODULES[n]) is None]
    if missing:
        raise ConfigError(f"{'; '.join(missing)}: pip install -e '.[bench]' installs the peers")
    return names


def scorers(data_root: Path, device: torch.device):
    """The FID/KID computations of both feature extractors against the same 2000 training images."""
    from ddpmlab.data import evaluation_subset
    from ddpmlab.metrics.fidelity import FidelityMetrics, resolve_inception_weights
    from ddpmlab.models.classifier import ensure_classifier

    reference = evaluation_subset(training_images(str(data_root)), REFERENCE_IMAGES)
    cache = data_root / "fidelity" / "cache"
    return {"inception": FidelityMetrics(["fid", "kid"], "inception", resolve_inception_weights("auto", data_root / "fidelity"),
                                         reference, "fashion_mnist-train", cache, device),
            "classifier": FidelityMetrics(["fid", "kid"], "classifier", str(ensure_classifier("fashion_mnist", str(data_root), 28)),
                                          reference, "fashion_mnist-train", cache, device)}


def time_to_quality(args) -> dict:
    names = check(args)
    data_root = Path(args.data_root)
    training_images(str(data_root))  # unpacked before any clock starts
    score = scorers(data_root, torch.device("cpu"))
    results = {"command": "python -m ddpmlab.bench " + " ".join(args.argv),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "minutes": args.minutes,
               "samples": args.samples, "reference_images": len(score["inception"].reference),
               "threads": torch.get_num_threads(),
               "contenders": {}}
    samples = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            out = Path(args.keep_runs or tmp) / name  # --keep-runs: the trained runs stay, e.g. for evaluate.py
            out.mkdir(parents=True, exist_ok=args.keep_runs is None)
            job = {"name": name, "out": str(out), "seconds": args.minutes * 60, "samples": args.samples,
                   "data_root": str(data_root), "threads": torch.get_num_threads()}
            (out / "job.json").write_text(json.dumps(job))
            print(f"{name}: training for {args.minutes:g} min, then {args.samples} samples", flush=True)
            done = subprocess.run([sys.executable, "-m", "ddpmlab.bench.contenders", str(out / "job.json")])
            if done.returncode != 0:
                raise RuntimeError(f"the {name} contender failed (exit {done.returncode})")
            result = json.loads((out / "result.json").read_text())
            samples[name] = torch.load(out / "samples.pt", weights_only=True)
            for extractor, fidelity in score.items():
                for row in fidelity(samples[name]):
                    result[f"{row['metric']}_{extractor}"] = row["value"]
                    if row.get("se") is not None:  # KID's standard error (ddpmlab.metrics.fidelity.kid_standard_error)
                        result[f"{row['metric']}_{extractor}_se"] = row["se"]
            results["contenders"][name] = result
    if "ddpmlab" in results["contenders"]:
        ours = results["contenders"]["ddpmlab"]
        for name, result in results["contenders"].items():
            for extractor in score:
                result[f"kid_ratio_{extractor}"] = result[f"kid_{extractor}"] / ours[f"kid_{extractor}"]
    write(results, samples, Path(args.out))
    return results


def write(results: dict, samples: dict, out: Path) -> None:
    """<out>.json, the table as <out>.md (printed), and the sample grids side by side as <out>.png."""
    from ddpmlab.plots import _pyplot

    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"`{results['command']}` ({results['date']}, {results['threads']} threads): {results['minutes']:g} min of "
             f"training each, {results['samples']} samples each, scored against {results['reference_images']} "
             "Fashion-MNIST training images", "",
             "| contender | parameters | steps | images seen | sampler | FID (Inception) | KID (Inception) | "
             "FID (classifier) | KID (classifier) | KID / ours (Inception, classifier) |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    def kid(r, extractor):
        se = r.get(f"kid_{extractor}_se")
        return f"{r[f'kid_{extractor}']:.4f}" + (f" +- {se:.4f}" if se is not None else "")

    for name, r in results["contenders"].items():
        ratio = (f"{r['kid_ratio_inception']:.2f}, {r['kid_ratio_classifier']:.2f}" if "kid_ratio_inception" in r
                 else "-")
        lines.append(f"| {name} | {r['parameters'] / 1e6:.2f}M | {r['steps']} | {r['images_seen']} | {r['sampler']} | "
                     f"{r['fid_inception']:.1f} | {kid(r, 'inception')} | {r['fid_classifier']:.1f} | "
                     f"{kid(r, 'classifier')} | {ratio} |")
    lines += ["", "Recipes: " + "; ".join(f"{name}: {r['recipe']}" for name, r in results["contenders"].items()),
              "KID +- its standard error (10 disjoint blocks of samples and reference); KID / ours above 1: worse "
              "than ddpmlab's."]
    text = "\n".join(lines)
    print(text)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(text + "\n")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(samples), figsize=(3.2 * len(samples), 3.6))
    for ax, (name, images) in zip([axes] if len(samples) == 1 else axes, samples.items()):
        grid = images[:64]
        side = int(math.ceil(math.sqrt(len(grid))))
        canvas = torch.zeros(side * 28, side * 28, dtype=torch.uint8)
        for i, image in enumerate(grid):
            canvas[i // side * 28:(i // side + 1) * 28, i % side * 28:(i % side + 1) * 28] = image[0]
        ax.imshow(canvas.numpy(), cmap="gray", vmin=0, vmax=255)
        r = results["contenders"][name]
        ax.set_title(f"{name}: {r['steps']} steps\nKID {r['kid_classifier']:.3f} (classifier)", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)
