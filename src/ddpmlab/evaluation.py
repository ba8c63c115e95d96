"""evaluate.py's work: rebuild a run from its checkpoint, then NLL bits/dim and sample metrics, on 1..N processes.

Every example (test image for the NLL, generated sample) has its own noise seeded by its index, and each
process takes the indices rank, rank + N, ...; results are gathered by index, so any N gives the same numbers.
A class-conditional checkpoint (model.num_classes) is sampled per class (`labels`) at each guidance scale
(`guidance_scale`), its samples also scored per class (class_report), and its NLL given the true labels and
given "no class".
"""

import hashlib
import inspect
import json
import os
import pickle
import sys
import time
from pathlib import Path

import torch
import torchvision
from lightning.fabric import Fabric
from omegaconf import DictConfig, OmegaConf

from ddpmlab.checkpoints import load_checkpoint
from ddpmlab.class_report import ClassCheck, class_check, per_class_table, plot_guidance, save_class_grid
from ddpmlab.data import NO_HELD_OUT, evaluation_subset, to_model_range, to_uint8
from ddpmlab.diffusion import get_sampler
from ddpmlab.diffusion.denoisers import as_denoiser
from ddpmlab.diffusion.edm import EDMDiffusion
from ddpmlab.diffusion.guidance import conditioned, guided, sample_labels
from ddpmlab.diffusion.likelihood import bits_per_dim, cost_per_image, dequantize, ode_log_likelihood
from ddpmlab.diffusion.samplers import EDM_SAMPLERS, SAMPLERS, check_sampler, network_calls
from ddpmlab.diffusion.noise import ExampleNoise
from ddpmlab.errors import ConfigError
from ddpmlab.eval_plan import Estimate, guidance_scales, nll_conditions, plan, sampling_phase, sampling_settings
from ddpmlab.figures import FIGURES, PAPER
from ddpmlab.paper import check_figures, figure_calls, figure_jobs, rate_distortion
from ddpmlab.performance import cpu_bf16, optimize_network, performance_settings
from ddpmlab.plots import plot_image_grid, plot_rate_distortion
from ddpmlab.progress import track
from ddpmlab.resume import check_matches, resolve_last
from ddpmlab.schema import check_conditioning
from ddpmlab.training import build, build_network

METRICS = ("nll", "nll_estimate", "nll_ode", "fid", "is", "kid", "rate_distortion")
SAMPLE_METRICS = ("fid", "is", "kid")
TEST_METRICS = ("nll", "nll_estimate", "nll_ode", "rate_distortion")  # measured on the test split
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
    terms, in bits/dim, and from the same pass the progressive code's rate and distortion (ddpmlab.paper); given
    `test_labels` (the split's, aligned by the same subset), a conditional model's."""
    labels = None if test_labels is None else evaluation_subset(test_labels, cfg.nll.num_images)
    test_images = evaluation_subset(test_images, cfg.nll.num_images)
    n, T = len(test_images), diffusion.num_timesteps

    def bound(idx):  # -> (B, 1 + 2T): L_T, then terms[:, 0] = L_0, terms[:, t] = L_t, then x0_mse[:, t]
        x_0 = to_model_range(test_images[idx].to(fabric.device))
        out = diffusion.calc_bpd_loop(_given(model, labels, idx, fabric.device), x_0,
                                      ExampleNoise(idx, cfg.seed, fabric.device),
                                      clip_denoised=cfg.nll.clip_denoised, progress=fabric.global_rank == 0)
        return torch.cat([out["prior"][:, None], out["terms"], out["x0_mse"]], 1)

    rows = _per_example(fabric, n, cfg.batch_size, phase, bound, (1 + 2 * T,), calls=T, cost=cost)
    prior, per_t, x0_mse = rows[:, 0], rows[:, 1:1 + T], rows[:, 1 + T:]
    total = prior + per_t.sum(1)
    terms_bpd = per_t.mean(0).tolist()  # the decoder's entry is L_0 itself (one reduction, not two)
    return {"bpd": total.mean().item(), "stderr": (total.std() / n**0.5).item() if n > 1 else None,
            "prior_bpd": prior.mean().item(), "decoder_bpd": terms_bpd[0], "terms_bpd": terms_bpd,
            "num_images": n, "rate_distortion": rate_distortion(prior, per_t, x0_mse)}


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


def sampling_bf16(cfg, device: torch.device) -> bool:
    """Whether the samples for FID/KID/IS are drawn with the network under bf16 autocast (`precision`): bf16, or
    auto on a CPU with native bf16 (ddpmlab.performance.cpu_bf16). The NLL metrics always run in fp32: a bound in
    bits/dim sums T terms and the decoder's discretized likelihood, where bf16's 8-bit mantissa would show
    (`python -m ddpmlab.bench --precision-ab --weights CKPT` measures the difference)."""
    precision = cfg.get("precision", "fp32")
    return precision == "bf16" or (precision == "auto" and device.type == "cpu" and cpu_bf16() == "native")


def sampling_autocast(cfg, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=sampling_bf16(cfg, device))


def compute_nll_ode(fabric, cfg, model, diffusion, test_images: torch.Tensor, cost=None, test_labels=None,
                    phase: str = "NLL (ODE)") -> dict:
    """The exact likelihood through the probability-flow ODE (ddpmlab.diffusion.likelihood) of cfg.nll_ode.num_images
    test images (data.evaluation_subset), each dequantised uniformly in its pixels' bins, in bits/dim with its
    stderr and the network calls it took. Image i's dequantisation and probes come from (cfg.seed + 2, i) alone and
    its adaptive steps from its own error, so any batch size and process count give the same numbers; given
    `test_labels`, as compute_nll."""
    labels = None if test_labels is None else evaluation_subset(test_labels, cfg.nll_ode.num_images)
    test_images = evaluation_subset(test_images, cfg.nll_ode.num_images)
    n, settings = len(test_images), cfg.nll_ode
    denoiser = as_denoiser(model, diffusion, clip_denoised=False)  # the ODE of the network itself

    def likelihood(idx):  # -> (B, 2): bits/dim, network calls
        noise = ExampleNoise(idx, cfg.seed + 2, fabric.device)
        x = dequantize(test_images[idx].to(fabric.device), noise)
        given = as_denoiser(_given(model, labels, idx, fabric.device), diffusion, clip_denoised=False)
        log_p, calls = ode_log_likelihood(given, x, noise, settings.rtol, settings.atol, settings.probes,
                                          settings.probe)
        return torch.stack([bits_per_dim(log_p, x[0].numel()), calls.double()], 1)

    rows = _per_example(fabric, n, cfg.batch_size, phase, likelihood, (2,), torch.float64,
                        calls=cost_per_image(denoiser, settings.probes), cost=cost)
    values, calls = rows[:, 0], rows[:, 1]
    return {"bpd": values.mean().item(), "stderr": (values.std() / n**0.5).item() if n > 1 else None,
            "num_images": n, "network_calls": int(calls.sum()), "network_calls_per_image": calls.mean().item(),
            "backward_passes_per_call": settings.probes, "rtol": settings.rtol, "atol": settings.atol,
            "probe": settings.probe, "sigma_min": denoiser.sigma_min, "sigma_max": denoiser.sigma_max,
            "prior_variance": denoiser.prior_variance}


def sampler_options(cfg, name: str) -> dict:
    """The eval config's settings for sampler `name`: DDIM's eta, EDM's samplers' edm.* block."""
    if name == "ddim":
        return {"eta": cfg.eta}
    if name in EDM_SAMPLERS:
        takes = inspect.signature(SAMPLERS[name]).parameters
        return {key: value for key, value in cfg.edm.items() if key in takes}
    return {}


def make_figure(fabric, cfg, model, diffusion, test_images, name: str, stem: str, kwargs: dict, cost=None) -> dict:
    """One of the paper's figures (ddpmlab.figures) with its rows shared among the processes (each row's noise is a
    function of (seed, row) alone, so any process count draws the same figure). Returns its images as numpy
    (rows, columns, C, H, W) in [-1, 1] with the labels, on every rank."""
    fn = FIGURES[name]
    layout = fn(model, diffusion, test_images, rows=[], device=fabric.device, **kwargs)
    n = len(layout.row_labels)
    rows_per_batch = cfg.batch_size if name == "progressive" else 1  # progressive: a batch of chains at once

    def rows(idx):
        return fn(model, diffusion, test_images, rows=idx, seed=cfg.seed, device=fabric.device,
                  progress=fabric.global_rank == 0 and name != "progressive", **kwargs).images

    images = _per_example(fabric, n, rows_per_batch, f"figure {stem}", rows, tuple(layout.images.shape[1:]),
                          calls=figure_calls(name, kwargs, diffusion.num_timesteps) // n, cost=cost)
    return {"name": name, "stem": stem, "images": images.cpu().numpy(), "row_labels": layout.row_labels,
            "column_labels": layout.column_labels, "title": layout.title, "settings": kwargs}


def generate(fabric, cfg, model, diffusion, shape: tuple[int, int, int], name: str, steps, cost=None,
             labels: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """cfg.num_samples images as uint8 (N, C, H, W), sample i always from the noise of seed (cfg.seed, i); for a
    conditional model, of class labels[i], with classifier-free guidance of scale w (guided: 2 images a call)."""
    sampler = get_sampler(name, **sampler_options(cfg, name))

    def sample(idx):
        noise = ExampleNoise(idx, cfg.seed, fabric.device)
        net = model if labels is None else guided(model, labels[idx].to(fabric.device), scale or 0.0)
        with sampling_autocast(cfg, fabric.device):
            return to_uint8(sampler(net, diffusion, (len(idx), *shape), noise, steps=steps))

    calls = network_calls(name, steps, diffusion.num_timesteps) * (2 if scale else 1)
    return _per_example(fabric, cfg.num_samples, cfg.batch_size, sampling_phase(name, steps, scale), sample, shape,
                        torch.uint8, calls=calls, cost=cost).cpu()


def _run(fabric: Fabric, cfg: DictConfig, run=None, fidelity=None, cost: Estimate | None = None,
         classes: ClassCheck | None = None, handoff: Path | None = None) -> dict | None:
    """One process's part; rank 0 returns the results, or pickles them to `handoff` (spawned processes).
    `run`: the loaded (model, diffusion, train config), if any; `fidelity`: the FID/IS/KID computation (rank 0's,
    after sampling); `cost`: the estimate, said again as each phase's first batch is timed; `classes`: a
    conditional checkpoint's class accuracy (rank 0's)."""
    torch.set_num_threads(max(1, torch.get_num_threads() // fabric.world_size))
    model, diffusion, train_cfg = run or load_run(cfg.ckpt, cfg.use_ema)
    model, diffusion = model.to(fabric.device), diffusion.to(fabric.device)
    optimize_network(model, *performance_settings(cfg.get("performance"), fabric.device.type == "cuda"))
    data = build_data(train_cfg, cfg)
    results, timings = {"settings": [], "figures": []}, {}
    if set(TEST_METRICS) & set(cfg.metrics) or cfg.figures:
        data.setup("test")
    for metric, fn in (("nll", compute_nll), ("nll_estimate", compute_nll_estimate), ("nll_ode", compute_nll_ode)):
        asked = metric in cfg.metrics or (metric == "nll" and "rate_distortion" in cfg.metrics)
        for given, key, phase in nll_conditions(metric, model.num_classes) if asked else ():
            start = time.perf_counter()
            labels = data.test_labels if given == "true labels" else None
            measured = {**fn(fabric, cfg, model, diffusion, data.test_images, cost, labels, phase), "given": given}
            code = measured.pop("rate_distortion", None)  # the full bound's pass gives the rate/distortion too
            seconds = time.perf_counter() - start
            if metric in cfg.metrics:
                results[key], timings[key] = measured, seconds
            if code is not None and "rate_distortion" in cfg.metrics and "rate_distortion" not in results:
                results["rate_distortion"], timings["rate_distortion"] = code, seconds  # given the true labels
    for name, stem, kwargs in figure_jobs(cfg, diffusion.num_timesteps):
        start = time.perf_counter()
        results["figures"].append(make_figure(fabric, cfg, model, diffusion, data.test_images, name, stem, kwargs,
                                              cost))
        timings[f"figure {stem}"] = time.perf_counter() - start
    if fidelity is not None:
        shape = (data.channels, data.image_size, data.image_size)
        labels = sample_labels(range(cfg.num_samples), cfg.labels, model.num_classes, cfg.num_samples)
        for name, steps in sampling_settings(cfg):
            for scale in guidance_scales(cfg, model.num_classes):
                start = time.perf_counter()
                samples = generate(fabric, cfg, model, diffusion, shape, name, steps, cost, labels, scale)
                results["settings"].append({
                    "sampler": name, "sampling_steps": steps, "guidance_scale": scale, "samples": samples,
                    "sampling_seconds": time.perf_counter() - start,
                    "labels": None if labels is None else labels.tolist(),
                    "precision": "bf16" if sampling_bf16(cfg, fabric.device) else "fp32",
                    "network_calls": network_calls(name, steps, diffusion.num_timesteps) * (2 if scale else 1)})
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
    if handoff is not None:
        handoff.write_bytes(pickle.dumps(results))
        return None
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
    """Run the configured metrics and figures; write metrics.json, samples.png, nll_per_t.png, rate_distortion.png
    and the figures' PNGs to cfg.paths.output_dir.

    Before the first long phase it says what it will do and an estimate of the time (ddpmlab.eval_plan)."""
    return evaluate_prepared(*prepare(cfg))


def prepare(cfg: DictConfig) -> tuple[DictConfig, tuple, object]:
    """(cfg as plain values, the loaded run (model, diffusion, train config), its datamodule): every check that
    needs the checkpoint or the data, in this process, before any process starts or any network call."""
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
    _check_applies(cfg, run[1])
    if cfg.figures:
        data.setup("test")
        check_figures(cfg, run[1].num_timesteps, len(data.test_images))
    if set(SAMPLE_METRICS) & set(cfg.metrics) or "progressive" in cfg.figures:
        for name, steps in sampling_settings(cfg):
            check_sampler(name, steps, run[1], sampler_options(cfg, name))
    return cfg, run, data


def evaluate_prepared(cfg: DictConfig, run: tuple, data) -> dict:
    """evaluate() of what prepare() checked and loaded."""
    devices = cfg.trainer.devices
    strategy = "ddp_spawn" if devices not in (1, "1", "auto") else "auto"
    fabric = Fabric(accelerator=cfg.trainer.accelerator, devices=devices, strategy=strategy)
    fidelity, reference = (fidelity_for(cfg, run[2], data, fabric.device) if set(SAMPLE_METRICS) & set(cfg.metrics)
                           else (None, None))
    classes = (class_check(run[2].data.dataset, str(cfg.data_root or run[2].data.root), data)
               if fidelity is not None and run[0].num_classes is not None else None)
    cost = plan(cfg, run, data, fidelity, reference, fabric)
    wall = time.perf_counter()
    if strategy == "ddp_spawn":
        # Spawned processes load the run themselves (a model is cheaper to rebuild than to pickle across). Rank 0's
        # results come back in a file: Lightning returns them through a pipe its parent reads only once every
        # process has ended, so a result larger than the pipe's buffer (64 KiB: 84 Fashion-MNIST samples) left
        # rank 0 blocked in the write and the evaluation hung.
        handoff = Path(cfg.paths.output_dir) / f".results_{os.getpid()}.pkl"
        handoff.parent.mkdir(parents=True, exist_ok=True)
        fabric.launch(_run, cfg, None, fidelity, cost, classes, handoff)
        results = pickle.loads(handoff.read_bytes())  # our own file, written just now by rank 0
        handoff.unlink()
    else:
        results = _run(fabric, cfg, run, fidelity, cost, classes)
    results["class_names"] = data.class_names
    results["estimated_seconds"] = cost.seconds
    results["reference"] = fidelity and {"images": len(fidelity.reference), "what": reference}
    results["wall_seconds"] = time.perf_counter() - wall
    return write_results(cfg, results)


def _check_applies(cfg, diffusion) -> None:
    """What an EDM checkpoint has not: the full bound over T discrete steps (its bound is nll_estimate's continuous
    one); and what the ODE needs (a prediction readable between trained steps)."""
    if "nll" in cfg.metrics and isinstance(diffusion, EDMDiffusion):
        raise ConfigError("metrics=[nll] is the bound over the T steps of a discrete-time checkpoint, and this is an EDM "
                          "checkpoint (a continuous sigma): use metrics=[nll_estimate] (its continuous-time bound) or "
                          "metrics=[nll_ode] (the exact likelihood)")
    if "nll_ode" in cfg.metrics:
        as_denoiser(None, diffusion, clip_denoised=False).check_between_levels()


def _check_counts(cfg, data) -> None:
    """Sample and image counts that cannot be honoured fail here, in the main process, before any work."""
    if not (isinstance(cfg.num_samples, int) and cfg.num_samples > 0):
        raise ConfigError(f"num_samples must be a positive integer, got {cfg.num_samples!r}")
    asked = {*cfg.metrics, *(["nll"] if "rate_distortion" in cfg.metrics else [])}  # rate_distortion: the NLL's pass
    wanted = {key: cfg[key].num_images for key in ("nll", "nll_estimate", "nll_ode")
              if key in asked and cfg[key].num_images}
    if wanted:
        data.setup("test")
        for key, n in wanted.items():
            if not 0 < n <= len(data.test_images):
                raise ConfigError(f"{key}.num_images={n} is outside 1..{len(data.test_images)} (the test split): "
                                  f"use {key}.num_images=null for all of it")


def _nll_keys(results: dict) -> list[tuple[str | None, str]]:
    """(given, key) of the NLL results present: "nll", or "nll given true labels" ... for a conditional run."""
    num_classes = results["train_cfg"]["model"].get("num_classes")
    return [(given, key) for metric in ("nll", "nll_estimate", "nll_ode")
            for given, key, _ in nll_conditions(metric, num_classes)
            if key in results]


def _rows(cfg, results: dict, split: str) -> list[dict]:
    rows = []
    for given, key in _nll_keys(results):
        r = results[key]
        rows.append({"metric": f"{key} (bits/dim)", "value": r["bpd"], "std": r["stderr"], "test_images": r["num_images"],
                     "split": split, **({"given": given} if given else {}), "seconds": results["timings"][key],
                     **({"network_calls": r["network_calls"]} if "network_calls" in r else {})})
    if "rate_distortion" in results:  # Ho et al. Table 1's split of the codelength, and the RMSE at t = 1
        code = results["rate_distortion"]
        common = {"std": None, "test_images": code["num_images"], "split": split,
                  "seconds": results["timings"]["rate_distortion"]}
        rows += [{"metric": metric, "value": code[key], **common} for metric, key in (
            ("rate (bits/dim)", "rate_bpd"), ("distortion (bits/dim)", "distortion_bpd"),
            ("distortion RMSE t=1", "rmse_at_t1"))]
    for setting in results["settings"]:
        common = {"samples": cfg.num_samples, "sampler": setting["sampler"], "sampling_steps": setting["sampling_steps"],
                  "sampling_precision": setting.get("precision", "fp32"), "network_calls": setting["network_calls"]}
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
        name = key.replace(" ", "_")
        if key.startswith("nll_ode"):  # beside the bound: the exact likelihood of the same model through its ODE
            record[name] = {**results[key], "split": split}
        elif not key.startswith("nll_estimate"):  # "nll", or a conditional run's "nll given true labels", ...
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
    images = {}
    if len({s["guidance_scale"] for s in settings}) > 1:
        plot_guidance(rows, out / "guidance.png")
        images["guidance"] = out / "guidance.png"
    if any("class" in row for row in rows):
        record["class_names"] = results["class_names"]
        table = per_class_table(rows, results["class_names"])
        (out / "per_class.md").write_text(table.lstrip() + "\n")
    if "rate_distortion" in results:
        record["rate_distortion"] = {**results["rate_distortion"], "split": split}
        plot_rate_distortion(results["rate_distortion"], out / "rate_distortion.png")
        images["rate_distortion"] = out / "rate_distortion.png"
    for figure in results["figures"]:  # each figure's PNG, named by the figure (ddpmlab.figures)
        images[figure["stem"]] = out / f"{figure['stem']}.png"
        grid = torch.from_numpy(figure["images"])
        plot_image_grid(grid, figure["row_labels"], figure["column_labels"], figure["title"], images[figure["stem"]])
        torch.save(grid, out / f"{figure['stem']}.pt")  # (rows, columns, C, H, W) in [-1, 1]
        record.setdefault("figures", {})[figure["stem"]] = {
            "figure": PAPER[figure["name"]], "file": images[figure["stem"]].name, "rows": figure["row_labels"],
            "columns": figure["column_labels"], "settings": figure["settings"]}
    (out / "metrics.json").write_text(json.dumps(record, indent=2))
    _print_table(overall)
    if any("class" in row for row in rows):
        print(table)
    for name, path in images.items():
        print(f"{name}: {path}")
    _log(cfg, rows, images)
    return record


def _log(cfg: DictConfig, rows: list[dict], images: dict[str, Path]) -> None:
    """The numbers and the figures to the configured loggers (for wandb, the last logged values are the run's
    summary)."""
    from ddpmlab.loggers import finish_wandb, log_image

    numbers = {f"eval/{row['metric']}" + (f"/w={row['guidance_scale']:g}" if "guidance_scale" in row else "")
               + (f"/class={row['class']}" if "class" in row else ""): row["value"]
               for row in rows if row["value"] is not None}
    for node in (cfg.get("logger") or {}).values():
        logger = build(node)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        logger.log_metrics(numbers)
        for name, path in images.items():
            log_image(logger, f"eval/{name}", path, 0)
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
    """FID (and each other sample metric) against the network calls per sample, one line per sampler: the steps
    themselves for the DDPM samplers, 2N - 1 for EDM's N-step Heun samplers, T for the full ancestral chain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("fid", "kid", "is") if any(r["metric"] == m and r["value"] is not None for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for sampler in dict.fromkeys(r["sampler"] for r in rows if "sampler" in r):
            points = sorted((r["network_calls"], r["value"]) for r in rows
                            if r["metric"] == metric and r.get("sampler") == sampler and r["value"] is not None)
            ax.plot(*zip(*points), marker="o", label=sampler)
        ax.set_xscale("log")
        calls = sorted({r["network_calls"] for r in rows if r["metric"] == metric})
        ticks = [c for i, c in enumerate(calls) if i == 0 or c > 1.2 * calls[i - 1]]  # 9 and 10: one label
        ax.set_xticks(ticks, [str(c) for c in ticks])
        ax.minorticks_off()
        ax.set_xlabel("network calls per sample")
        ax.set_ylabel(metric.upper())
        ax.legend()
    fig.suptitle(f"{rows[-1]['samples']} samples per point; features: {rows[-1].get('feature_extractor', '')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_table(rows: list[dict]) -> None:
    print(f"\n{'metric':<22}{'value':>12}{'± error':>10}  {'details'} (error: the NLL's and KID's standard error, "
          "IS's std over splits)")
    for row in rows:
        value = "n/a" if row["value"] is None else f"{row['value']:.4f}"
        error = row.get("se", row.get("std"))
        std = "" if error is None else f"{error:.4f}"
        details = row.get("unavailable") or ", ".join(
            f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
            for k in ("test_images", "split", "given", "samples", "reference_images", "sampler", "sampling_steps",
                      "network_calls", "guidance_scale", "labels", "ceiling", "feature_extractor", "classifier")
            if k in row)
        print(f"{row['metric']:<22}{value:>12}{std:>10}  {details}, {row['seconds']:.1f}s")
    if any(row.get("split") == NO_HELD_OUT for row in rows):
        print("warning: the NLL above is on training images (the data has no held-out split), so it cannot show "
              "overfitting: give data.root a test/ folder, or train with data.test_fraction=0.1", file=sys.stderr)
