"""evaluate.py's work: rebuild a run from its checkpoint, then NLL bits/dim and sample metrics, on 1..N processes.

Every example (test image for the NLL, generated sample) has its own noise seeded by its index, and each
process takes the indices rank, rank + N, ...; results are gathered by index, so any N gives the same numbers.
A class-conditional checkpoint (model.num_classes) is sampled per class (`labels`) at each guidance scale
(`guidance_scale`), its samples also scored per class (class_report), and its NLL given the true labels and
given "no class".
"""

import hashlib
import json
import sys
import time
from pathlib import Path

import torch
import torchvision
from lightning.fabric import Fabric
from omegaconf import DictConfig, OmegaConf

from ddpmlab.checkpoints import check_matches, load_checkpoint
from ddpmlab.class_report import ClassCheck, class_check, per_class_table, plot_guidance, save_class_grid
from ddpmlab.data import NO_HELD_OUT, evaluation_subset, to_model_range, to_uint8
from ddpmlab.diffusion import get_sampler
from ddpmlab.diffusion.guidance import conditioned, guided, sample_labels
from ddpmlab.diffusion.samplers import check_steps
from ddpmlab.diffusion.noise import ExampleNoise
from ddpmlab.errors import ConfigError
from ddpmlab.eval_plan import Estimate, guidance_scales, nll_conditions, plan, sampling_phase, sampling_settings
from ddpmlab.performance import optimize_network, performance_settings
from ddpmlab.progress import track
from ddpmlab.schema import check_conditioning
from ddpmlab.training import build, build_network, resolve_last

METRICS = ("nll", "nll_estimate", "fid", "is", "kid")
SAMPLE_METRICS = ("fid", "is", "kid")
TRAIN_TASK = "train"  # ckpt=last: the newest run of train.py's default task (runs/train/*, as `make train` writes)


def load_run(ckpt_path: str, use_ema: bool):
    """(model, diffusion, train config) rebuilt from the config stored in the checkpoint, with its weights."""
    checkpoint = load_checkpoint(ckpt_path)
    if "config" not in checkpoint:
        raise ConfigError(f"checkpoint {ckpt_path} holds no ddpmlab config: it was not written by train.py")
    train_cfg = OmegaConf.create(checkpoint["config"])
    try:
        model, diffusion = build_network(train_cfg)
    except Exception as err:  # a config from another version or project
        raise ConfigError(f"checkpoint {ckpt_path} has a config this version cannot build ({err})") from None
    prefix = "ema_model." if use_ema else "model."
    weights = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    check_matches(model, {"state_dict": weights}, ckpt_path)
    model.load_state_dict(weights)
    return model.eval().requires_grad_(False), diffusion, train_cfg


def _gather(fabric: Fabric, local: torch.Tensor, total: int) -> torch.Tensor:
    """Rows computed for indices rank, rank + N, ... -> all `total` rows in index order (on every rank)."""
    per_rank = -(-total // fabric.world_size)
    padded = torch.zeros((per_rank, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    gathered = fabric.all_gather(padded) if fabric.world_size > 1 else padded[None]  # (N, per_rank, ...)
    return gathered.transpose(0, 1).reshape(-1, *local.shape[1:])[:total]


def _my_indices(fabric: Fabric, total: int) -> list[int]:
    return list(range(fabric.global_rank, total, fabric.world_size))


def _per_example(fabric, total: int, batch_size: int, desc: str, fn, row_shape=(), dtype=torch.float32,
                 calls: int = 1, cost: Estimate | None = None):
    """fn(indices) -> rows of `row_shape` for those examples, over this rank's share in batches.

    Returns all `total` rows in index order, on every rank (a rank with no examples contributes none).
    `calls`: network calls per example, for the `cost` estimate that rank 0 updates after its first batch.
    """
    indices = _my_indices(fabric, total)
    first = None if cost is None else (
        lambda seconds: cost.first_batch(desc, min(batch_size, len(indices)) * calls, seconds))
    parts = [fn(indices[start:start + batch_size])
             for start in track(range(0, len(indices), batch_size), total=-(-len(indices) // batch_size), desc=desc,
                                disable=bool(fabric.global_rank), first_done=first)]
    local = torch.cat(parts) if parts else torch.zeros((0, *row_shape), dtype=dtype, device=fabric.device)
    return _gather(fabric, local, total)


def _given(model, labels, idx, device):
    """The network conditioned on the labels of examples `idx` (labels: a split's, or None: unconditional)."""
    return conditioned(model, None if labels is None else labels[idx].to(device))


def compute_nll(fabric, cfg, model, diffusion, test_images: torch.Tensor, cost=None, test_labels=None,
                phase: str = "NLL (full bound)") -> dict:
    """The full bound on cfg.nll.num_images test images (data.evaluation_subset): total, L_T, L_0, and the per-t
    terms, in bits/dim; given `test_labels` (the split's, aligned by the same subset), a conditional model's."""
    labels = None if test_labels is None else evaluation_subset(test_labels, cfg.nll.num_images)
    test_images = evaluation_subset(test_images, cfg.nll.num_images)
    n = len(test_images)

    def bound(idx):  # -> (B, 1 + T): L_T, then terms[:, 0] = L_0, terms[:, t] = L_t
        x_0 = to_model_range(test_images[idx].to(fabric.device))
        out = diffusion.calc_bpd_loop(_given(model, labels, idx, fabric.device), x_0,
                                      ExampleNoise(idx, cfg.seed, fabric.device),
                                      clip_denoised=cfg.nll.clip_denoised, progress=fabric.global_rank == 0)
        return torch.cat([out["prior"][:, None], out["terms"]], 1)

    rows = _per_example(fabric, n, cfg.batch_size, phase, bound, (1 + diffusion.num_timesteps,),
                        calls=diffusion.num_timesteps, cost=cost)
    prior, per_t = rows[:, 0], rows[:, 1:]
    total = prior + per_t.sum(1)
    terms_bpd = per_t.mean(0).tolist()  # the decoder's entry is L_0 itself (one reduction, not two)
    return {"bpd": total.mean().item(), "stderr": (total.std() / n**0.5).item() if n > 1 else None,
            "prior_bpd": prior.mean().item(), "decoder_bpd": terms_bpd[0], "terms_bpd": terms_bpd,
            "num_images": n}


def compute_nll_estimate(fabric, cfg, model, diffusion, test_images: torch.Tensor, cost=None, test_labels=None,
                         phase: str = "NLL (estimate)") -> dict:
    """The bound on cfg.nll_estimate.num_images test images (data.evaluation_subset), with its stderr, from
    K = nll_estimate.timesteps timesteps per image (estimate_bpd: L_T and L_0 exact, the KL terms from K strata;
    K + 1 network calls); given `test_labels`, as compute_nll."""
    labels = None if test_labels is None else evaluation_subset(test_labels, cfg.nll_estimate.num_images)
    test_images = evaluation_subset(test_images, cfg.nll_estimate.num_images)
    n = len(test_images)

    def estimate(idx):
        x_0 = to_model_range(test_images[idx].to(fabric.device))
        return diffusion.estimate_bpd(_given(model, labels, idx, fabric.device), x_0, cfg.nll_estimate.timesteps,
                                      ExampleNoise(idx, cfg.seed + 1, fabric.device),
                                      clip_denoised=cfg.nll.clip_denoised)

    values = _per_example(fabric, n, cfg.batch_size, phase, estimate, calls=cfg.nll_estimate.timesteps + 1,
                          cost=cost)
    return {"bpd": values.mean().item(), "stderr": (values.std() / n**0.5).item() if n > 1 else None,
            "num_images": n, "timesteps_per_image": cfg.nll_estimate.timesteps}


def generate(fabric, cfg, model, diffusion, shape: tuple[int, int, int], name: str, steps, cost=None,
             labels: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """cfg.num_samples images as uint8 (N, C, H, W), sample i always from the noise of seed (cfg.seed, i); for a
    conditional model, of class labels[i], with classifier-free guidance of scale w (guided: 2 images a call)."""
    sampler = get_sampler(name, **({"eta": cfg.eta} if name == "ddim" else {}))

    def sample(idx):
        noise = ExampleNoise(idx, cfg.seed, fabric.device)
        net = model if labels is None else guided(model, labels[idx].to(fabric.device), scale or 0.0)
        return to_uint8(sampler(net, diffusion, (len(idx), *shape), noise, steps=steps))

    calls = (steps or diffusion.num_timesteps) * (2 if scale else 1)
    return _per_example(fabric, cfg.num_samples, cfg.batch_size, sampling_phase(name, steps, scale), sample, shape,
                        torch.uint8, calls=calls, cost=cost).cpu()


def _run(fabric: Fabric, cfg: DictConfig, run=None, fidelity=None, cost: Estimate | None = None,
         classes: ClassCheck | None = None) -> dict | None:
    """One process's part; rank 0 returns the results. `run`: the loaded (model, diffusion, train config), if any;
    `fidelity`: the FID/IS/KID computation (rank 0's, after sampling); `cost`: the estimate, said again as each
    phase's first batch is timed; `classes`: a conditional checkpoint's class accuracy (rank 0's)."""
    torch.set_num_threads(max(1, torch.get_num_threads() // fabric.world_size))
    model, diffusion, train_cfg = run or load_run(cfg.ckpt, cfg.use_ema)
    model, diffusion = model.to(fabric.device), diffusion.to(fabric.device)
    optimize_network(model, *performance_settings(cfg.get("performance"), fabric.device.type == "cuda"))
    data = build_data(train_cfg, cfg)
    results, timings = {"settings": []}, {}
    if {"nll", "nll_estimate"} & set(cfg.metrics):
        data.setup("test")
        for metric, fn in (("nll", compute_nll), ("nll_estimate", compute_nll_estimate)):
            for given, key, phase in nll_conditions(metric, model.num_classes) if metric in cfg.metrics else ():
                start = time.perf_counter()
                labels = data.test_labels if given == "true labels" else None
                results[key] = {**fn(fabric, cfg, model, diffusion, data.test_images, cost, labels, phase),
                                "given": given}
                timings[key] = time.perf_counter() - start
    if fidelity is not None:
        shape = (data.channels, data.image_size, data.image_size)
        labels = sample_labels(range(cfg.num_samples), cfg.labels, model.num_classes, cfg.num_samples)
        for name, steps in sampling_settings(cfg):
            for scale in guidance_scales(cfg, model.num_classes):
                start = time.perf_counter()
                samples = generate(fabric, cfg, model, diffusion, shape, name, steps, cost, labels, scale)
                results["settings"].append({"sampler": name, "sampling_steps": steps, "guidance_scale": scale,
                                            "samples": samples, "sampling_seconds": time.perf_counter() - start,
                                            "labels": None if labels is None else labels.tolist()})
    if fabric.global_rank != 0:
        return None
    results["timings"], results["train_cfg"] = timings, OmegaConf.to_container(train_cfg)
    for setting in results["settings"]:
        start = time.perf_counter()
        labels = None if setting["labels"] is None else torch.tensor(setting["labels"])
        setting["rows"] = fidelity(setting["samples"], on_first_batch=cost.first_batch if cost else None,
                                   labels=labels, reference_labels=fidelity.reference_labels)
        for row in setting["rows"]:
            row["seconds"], row["reference_images"] = time.perf_counter() - start, len(fidelity.reference)
        if labels is not None:  # did each sample get its class? (after the features: its own time)
            start = time.perf_counter()
            setting["rows"] += [{**row, "seconds": time.perf_counter() - start}
                                for row in classes.rows(setting["samples"], labels)]
        # Returned across processes by pickling: numpy goes by value, a torch tensor by a shared-memory handle
        # that dies with this process.
        setting["samples"] = setting["samples"].numpy()
    return results


def build_data(train_cfg, cfg):
    """The run's datamodule (data_root, if given, for its root); with the labels of a conditional run."""
    return build(train_cfg.data, num_classes=train_cfg.model.get("num_classes"),
                 **({"root": cfg.data_root} if cfg.data_root else {}))


def reference_count(cfg, available: int, device: torch.device) -> tuple[int, str]:
    """How many training images FID/KID compare with, and why: `reference_images` auto caps a CPU's reference
    pass at cpu_reference_images (the whole 60k split is hours of Inception on a CPU), null takes all, N takes N
    (data.evaluation_subset: a fixed random subset, not the first N in storage order)."""
    setting = cfg.reference_images
    if setting == "auto" and device.type != "cuda":
        n = min(cfg.cpu_reference_images, available)
        return n, (f"capped on a CPU by cpu_reference_images={cfg.cpu_reference_images} "
                   f"(reference_images=null for all {available})" if n < available else "all of them")
    if setting in ("auto", None):
        return available, "all of them"
    return min(setting, available), f"reference_images={setting}"  # its range: ddpmlab.schema


def fidelity_for(cfg, train_cfg, data, device: torch.device):
    """(the FID/IS/KID computation, what its reference is): the feature extractor's weights (the classifier trained,
    or the Inception converted, once) and the reference images, before any sampling."""
    from ddpmlab.metrics.fidelity import FidelityMetrics, resolve_inception_weights
    from ddpmlab.models.classifier import ensure_classifier

    data.setup("fit")
    n, why = reference_count(cfg, len(data.train_images), device)
    root = Path(cfg.data_root or train_cfg.data.root)
    if cfg.feature_extractor == "classifier":
        weights = str(ensure_classifier(train_cfg.data.dataset, str(root), data.image_size))
    else:
        weights = resolve_inception_weights(cfg.inception_weights, root / "fidelity")
    fidelity = FidelityMetrics(list(cfg.metrics), cfg.feature_extractor, weights,
                               evaluation_subset(data.train_images, n),  # shards: a view, read image by image
                               f"{train_cfg.data.dataset}-train", root / "fidelity" / "cache", device,
                               kid_subset_size=cfg.kid_subset_size,
                               # a conditional run's: the reference's labels, for FID/KID per class
                               reference_labels=None if data.train_labels is None else
                               evaluation_subset(data.train_labels, n)[:])
    total = len(data.train_images)
    return fidelity, (f"all {total} training images" if n == total
                      else f"{n} of {total} training images at random (seed 0), {why}")


def evaluate(cfg: DictConfig) -> dict:
    """Run the configured metrics; write metrics.json, samples.png and nll_per_t.png to cfg.paths.output_dir.

    Before the first long phase it says what it will do and an estimate of the time (ddpmlab.eval_plan)."""
    # Plain values from here on: spawned processes get this config, and `${hydra:...}` (paths.output_dir)
    # resolves only in Hydra's own process.
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    unknown = set(cfg.metrics) - set(METRICS)
    if unknown:
        raise ConfigError(f"metrics={list(cfg.metrics)} has unknown {sorted(unknown)}: choose from {', '.join(METRICS)}")
    if set(SAMPLE_METRICS) & set(cfg.metrics) and cfg.num_samples < 2:
        raise ConfigError(f"num_samples={cfg.num_samples} is too few for {sorted(set(SAMPLE_METRICS) & set(cfg.metrics))}")
    if cfg.ckpt == "last":  # the newest train.py run's checkpoint (make eval)
        cfg.ckpt = str(resolve_last(cfg, task_name=TRAIN_TASK, key="ckpt"))
    run = load_run(cfg.ckpt, cfg.use_ema)  # bad checkpoints fail here, before any process starts
    num_classes = run[0].num_classes
    check_conditioning(cfg.labels, cfg.guidance_scale, num_classes, run[2].diffusion.get("cond_drop_prob", 0.0), "",
                       f"checkpoint {cfg.ckpt}")
    data = build_data(run[2], cfg)
    _check_counts(cfg, data)
    if set(SAMPLE_METRICS) & set(cfg.metrics):
        for name, steps in sampling_settings(cfg):
            get_sampler(name)
            check_steps(name, steps, run[1].num_timesteps)
    devices = cfg.trainer.devices
    strategy = "ddp_spawn" if devices not in (1, "1", "auto") else "auto"
    fabric = Fabric(accelerator=cfg.trainer.accelerator, devices=devices, strategy=strategy)
    fidelity, reference = (fidelity_for(cfg, run[2], data, fabric.device) if set(SAMPLE_METRICS) & set(cfg.metrics)
                           else (None, None))
    classes = (class_check(run[2].data.dataset, str(cfg.data_root or run[2].data.root), data)
               if fidelity is not None and num_classes is not None else None)
    cost = plan(cfg, run, data, fidelity, reference, fabric)
    wall = time.perf_counter()
    # Spawned processes load the run themselves (a model is cheaper to rebuild than to pickle across).
    results = (fabric.launch(_run, cfg, None, fidelity, cost, classes) if strategy == "ddp_spawn"
               else _run(fabric, cfg, run, fidelity, cost, classes))
    results["class_names"] = data.class_names
    results["estimated_seconds"] = cost.seconds
    results["reference"] = fidelity and {"images": len(fidelity.reference), "what": reference}
    results["wall_seconds"] = time.perf_counter() - wall
    return write_results(cfg, results)


def _check_counts(cfg, data) -> None:
    """Sample and image counts that cannot be honoured fail here, in the main process, before any work."""
    if not (isinstance(cfg.num_samples, int) and cfg.num_samples > 0):
        raise ConfigError(f"num_samples must be a positive integer, got {cfg.num_samples!r}")
    wanted = {key: cfg[key].num_images for key in ("nll", "nll_estimate") if key in cfg.metrics and cfg[key].num_images}
    if wanted:
        data.setup("test")
        for key, n in wanted.items():
            if not 0 < n <= len(data.test_images):
                raise ConfigError(f"{key}.num_images={n} is outside 1..{len(data.test_images)} (the test split): "
                                  f"use {key}.num_images=null for all of it")


def _nll_keys(results: dict) -> list[tuple[str | None, str]]:
    """(given, key) of the NLL results present: "nll", or "nll given true labels" ... for a conditional run."""
    num_classes = results["train_cfg"]["model"].get("num_classes")
    return [(given, key) for metric in ("nll", "nll_estimate") for given, key, _ in nll_conditions(metric, num_classes)
            if key in results]


def _rows(cfg, results: dict, split: str) -> list[dict]:
    rows = []
    for given, key in _nll_keys(results):
        r = results[key]
        rows.append({"metric": f"{key} (bits/dim)", "value": r["bpd"], "std": r["stderr"], "test_images": r["num_images"],
                     "split": split, **({"given": given} if given else {}), "seconds": results["timings"][key]})
    for setting in results["settings"]:
        common = {"samples": cfg.num_samples, "sampler": setting["sampler"], "sampling_steps": setting["sampling_steps"]}
        if setting["guidance_scale"] is not None:  # a conditional checkpoint's
            common.update(guidance_scale=setting["guidance_scale"],
                          labels=list(cfg.labels) if OmegaConf.is_list(cfg.labels) else cfg.labels or "all")
        rows += [{**row, **common, "seconds": row["seconds"] + setting["sampling_seconds"]} for row in setting["rows"]]
    return rows


def write_results(cfg: DictConfig, results: dict) -> dict:
    """The JSON record (one row per metric and sampling setting), sample grids, the plots and the printed table."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # What the NLL's images are (a held-out split, or the training images), as the run's datamodule says.
    data_cfg = {**results["train_cfg"]["data"], **({"root": cfg.data_root} if cfg.data_root else {})}
    split = build(data_cfg).test_split
    rows = _rows(cfg, results, split)
    record = {
        "checkpoint": str(cfg.ckpt), "checkpoint_sha256": hashlib.sha256(Path(cfg.ckpt).read_bytes()).hexdigest(),
        "use_ema": cfg.use_ema, "seed": cfg.seed, "devices": cfg.trainer.devices, "results": rows,
        "wall_seconds": results["wall_seconds"], "estimated_seconds": results["estimated_seconds"],
        "timings": results["timings"], "reference": results["reference"],
    }
    for given, key in _nll_keys(results):
        if not key.startswith("nll_estimate"):  # "nll", or a conditional run's "nll given true labels", ...
            name = key.replace(" ", "_")
            record[name] = {k: results[key][k] for k in ("bpd", "stderr", "prior_bpd", "decoder_bpd", "num_images")}
            record[name].update(terms_bpd=results[key]["terms_bpd"], split=split, **({"given": given} if given else {}))
            if given in (None, "true labels"):
                _plot_terms(results[key], out / "nll_per_t.png")
    settings = results["settings"]
    for setting in settings:
        # one setting: samples.png / samples.pt; a sweep: samples_<sampler>_<steps>[_w<w>].png / .pt per setting
        w = setting["guidance_scale"]
        suffix = (f"_{setting['sampler']}_{setting['sampling_steps'] or 'all'}{'' if w is None else f'_w{w:g}'}"
                  if len(settings) > 1 else "")
        samples = torch.from_numpy(setting["samples"])
        torchvision.utils.save_image(samples[:64].float() / 255, out / f"samples{suffix}.png",
                                     nrow=max(1, round(min(64, len(samples)) ** 0.5)))
        torch.save(samples, out / f"samples{suffix}.pt")  # every generated image, uint8 (N, C, H, W)
        if setting["labels"] is not None:  # one row per class; and the class of each image
            labels = torch.tensor(setting["labels"])
            save_class_grid(samples, labels, len(results["class_names"]), out / f"samples_by_class{suffix}.png")
            torch.save(labels, out / f"labels{suffix}.pt")
    overall = [row for row in rows if "class" not in row]
    first_w = settings[0]["guidance_scale"] if settings else None
    if len({(s["sampler"], s["sampling_steps"]) for s in settings}) > 1:
        _plot_against_steps([r for r in overall if r.get("guidance_scale") == first_w], out / "metrics_vs_steps.png")
    if len({s["guidance_scale"] for s in settings}) > 1:
        plot_guidance(rows, out / "guidance.png")
    if any("class" in row for row in rows):
        record["class_names"] = results["class_names"]
        table = per_class_table(rows, results["class_names"])
        (out / "per_class.md").write_text(table.lstrip() + "\n")
    (out / "metrics.json").write_text(json.dumps(record, indent=2))
    _print_table(overall)
    if any("class" in row for row in rows):
        print(table)
    _log(cfg, rows)
    return record


def _log(cfg: DictConfig, rows: list[dict]) -> None:
    """The numbers to the configured loggers (for wandb, the last logged values are the run's summary)."""
    from ddpmlab.loggers import finish_wandb

    numbers = {f"eval/{row['metric']}" + (f"/w={row['guidance_scale']:g}" if "guidance_scale" in row else "")
               + (f"/class={row['class']}" if "class" in row else ""): row["value"]
               for row in rows if row["value"] is not None}
    for node in (cfg.get("logger") or {}).values():
        logger = build(node)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        logger.log_metrics(numbers)
        logger.save()
        if hasattr(logger.experiment, "finish"):  # a wandb run: flush and close it now
            logger.experiment.finish()
    finish_wandb()


def _plot_terms(nll: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = nll["terms_bpd"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.semilogy(range(1, len(terms) + 1), terms, lw=1)
    ax.set_xlabel("t")
    ax.set_ylabel("bits/dim")
    ax.set_title(f"bound terms: L_0 at t=1, L_(t-1) after; total {nll['bpd']:.3f} bits/dim "
                 f"({nll['num_images']} images)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_against_steps(rows: list[dict], path: Path) -> None:
    """FID (and each other sample metric) against the number of sampling steps, one line per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("fid", "kid", "is") if any(r["metric"] == m and r["value"] is not None for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for sampler in dict.fromkeys(r["sampler"] for r in rows if "sampler" in r):
            points = sorted((r["sampling_steps"] or 0, r["value"]) for r in rows
                            if r["metric"] == metric and r.get("sampler") == sampler and r["value"] is not None)
            ax.plot(*zip(*points), marker="o", label=sampler)
        ax.set_xscale("log")
        steps = sorted({r["sampling_steps"] or 0 for r in rows if r["metric"] == metric})
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.minorticks_off()
        ax.set_xlabel("sampling steps (network evaluations)")
        ax.set_ylabel(metric.upper())
        ax.legend()
    fig.suptitle(f"{rows[-1]['samples']} samples per point; features: {rows[-1].get('feature_extractor', '')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_table(rows: list[dict]) -> None:
    print(f"\n{'metric':<22}{'value':>12}{'± std':>10}  {'details'}")
    for row in rows:
        value = "n/a" if row["value"] is None else f"{row['value']:.4f}"
        std = "" if row.get("std") is None else f"{row['std']:.4f}"
        details = row.get("unavailable") or ", ".join(
            f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
            for k in ("test_images", "split", "given", "samples", "reference_images", "sampler", "sampling_steps",
                      "guidance_scale", "labels", "ceiling", "feature_extractor", "classifier")
            if k in row)
        print(f"{row['metric']:<22}{value:>12}{std:>10}  {details}, {row['seconds']:.1f}s")
    if any(row.get("split") == NO_HELD_OUT for row in rows):
        print("warning: the NLL above is on training images (the data has no held-out split), so it cannot show "
              "overfitting: give data.root a test/ folder, or train with data.test_fraction=0.1", file=sys.stderr)
