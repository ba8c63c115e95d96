"""What evaluate.py is about to do and what it will cost, said before the first long phase.

A phase costs units x seconds per unit: one unit is one image through the diffusion network once (sampling with
S steps: S units per image; the full bound: T; the bound estimate: K + 1), or one image through the feature
extractor. Seconds per unit come first from a probe (one network call at the evaluation's batch size, one small
batch through the extractor), then from each phase's own first batch, when the estimate is said again.
"""

import time
from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf

from ddpmlab.diffusion.denoisers import as_denoiser
from ddpmlab.diffusion.likelihood import cost_per_image
from ddpmlab.diffusion.samplers import default_steps, network_calls
from ddpmlab.progress import duration, say


@dataclass
class Phase:
    name: str
    units: int
    kind: str                 # "network" or "features": one speed per kind until a phase times its own batch
    share: int = 1            # processes that split its units (on devices of their own)
    seconds_per_unit: float = 0.0
    timed: bool = False       # from its own first batch

    @property
    def seconds(self) -> float:
        return self.units * self.seconds_per_unit / self.share


@dataclass
class Estimate:
    phases: list[Phase] = field(default_factory=list)

    def add(self, name: str, units: int, kind: str, share: int = 1) -> None:
        self.phases.append(Phase(name, units, kind, share))

    def set_speed(self, kind: str, seconds_per_unit: float) -> None:
        for phase in self.phases:
            if phase.kind == kind and not phase.timed:
                phase.seconds_per_unit = seconds_per_unit

    @property
    def seconds(self) -> float:
        return sum(phase.seconds for phase in self.phases)

    def summary(self) -> str:
        parts = ", ".join(f"{p.name} ~{duration(p.seconds)}" for p in self.phases if p.units)
        return f"{parts}; in all ~{duration(self.seconds)}"

    def first_batch(self, name: str, units: int, seconds: float) -> None:
        """The first batch of phase `name` (`units` of its work) took `seconds`: re-estimate it and say so."""
        phase = next((p for p in self.phases if p.name == name), None)
        if phase is None or phase.timed:
            return
        phase.seconds_per_unit, phase.timed = seconds / units, True
        self.set_speed(phase.kind, seconds / units)
        say(f"estimate after the first batch of {name} ({seconds:.1f}s): {self.summary()}")


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def probe_network(model, shape: tuple[int, int, int], batch: int, device) -> float:
    """Seconds per image of one network call at batch size `batch` (after a warm-up call)."""
    x = torch.zeros((batch, *shape), device=device)
    t = torch.zeros(batch, dtype=torch.long, device=device)
    model(x[:2], t[:2])
    return _seconds(lambda: model(x, t)) / batch


@torch.no_grad()
def probe_features(fidelity, shape: tuple[int, int, int], batch: int = 4) -> float:
    """Seconds per image through the feature extractor, on a small batch (after a one-image warm-up)."""
    net = fidelity.network()
    images = torch.zeros((batch, 3, *shape[1:]), dtype=torch.uint8, device=fidelity.device)
    net(images[:1])
    return _seconds(lambda: net(images)) / batch


def sampling_settings(cfg) -> list[tuple[str, int | None]]:
    """(sampler, steps) pairs to evaluate: `sampler` and `sampling_steps` may each be one value or a list.

    The ancestral sampler runs all T steps: in a sweep over several step counts it is one setting, all T (the
    full chain's point of FID against network calls); given one other count alone, it is refused (check_steps)."""
    as_list = lambda v: list(v) if OmegaConf.is_list(v) or isinstance(v, (list, tuple)) else [v]  # noqa: E731
    steps = as_list(cfg.sampling_steps)
    pairs = [(name, None if name == "ancestral" and len(steps) > 1 else count)
             for name in as_list(cfg.sampler) for count in steps]
    return list(dict.fromkeys(pairs))


def guidance_scales(cfg, num_classes: int | None) -> list[float | None]:
    """The guidance scales w to sample at: [None] for an unconditional model; `guidance_scale` (one w or a list)
    for a conditional one, [0.0] (the conditional model) when it is null."""
    if num_classes is None:
        return [None]
    scales = cfg.guidance_scale
    return [0.0] if scales is None else [float(w) for w in (scales if OmegaConf.is_list(scales) or
                                                            isinstance(scales, (list, tuple)) else [scales])]


def nll_conditions(metric: str, num_classes: int | None) -> list[tuple[str | None, str, str]]:
    """(what the model is given, the results' key, the phase's name) of each pass of NLL `metric`: one, as it is,
    for an unconditional model; given the true labels and given "no class" for a conditional one."""
    name = {"nll": "NLL (full bound)", "nll_estimate": "NLL (estimate)", "nll_ode": "NLL (ODE)"}[metric]
    if num_classes is None:
        return [(None, metric, name)]
    return [(given, f"{metric} given {given}", f"{name[:-1]}, given {given})") for given in ("true labels", "no class")]


def sampling_phase(name: str, steps, scale: float | None = None) -> str:
    return f"sampling ({name}, {steps or 'all'} steps{'' if scale is None else f', w={scale:g}'})"


def plan(cfg, run, data, fidelity, reference: str | None, fabric) -> Estimate:
    """Say what this evaluation will do and how long it should take (from probes); return the estimate.

    run: (model, diffusion, train config); data: its datamodule (test split set up when an NLL is asked for);
    fidelity: the FidelityMetrics (None without FID/IS/KID) and `reference`, what its reference set is.
    """
    model, diffusion, _ = run
    device, T = fabric.device, diffusion.num_timesteps
    share = fabric.world_size if device.type == "cuda" else 1  # CPU processes share the same cores
    cost, lines, images = Estimate(), [], [0]
    num_classes = model.num_classes
    counts = {"nll": (T, f"all {T} t"),
              "nll_estimate": (cfg.nll_estimate.timesteps + 1, f"K = {cfg.nll_estimate.timesteps}")}
    if "nll_ode" in cfg.metrics:
        ode = as_denoiser(None, diffusion)
        counts["nll_ode"] = (cost_per_image(ode, cfg.nll_ode.probes),
                             f"adaptive RK45 at rtol {cfg.nll_ode.rtol:g}, atol {cfg.nll_ode.atol:g}: about "
                             f"{ode.typical_ode_evaluations} forward passes with {cfg.nll_ode.probes} backward each, "
                             "counted as it runs")
    asked = {*cfg.metrics, *(["nll"] if "rate_distortion" in cfg.metrics else [])}  # one pass gives both
    for key, (calls, how) in counts.items():
        for given, _, name in nll_conditions(key, num_classes) if key in asked else ():
            data.setup("test")
            n = min(cfg[key].num_images or len(data.test_images), len(data.test_images))
            images.append(n)
            cost.add(name, n * calls, "network", share)
            lines.append(f"{key}: {n} test images x {calls} network calls ({how}){f', given {given}' if given else ''}")
    from ddpmlab.paper import figure_calls, figure_jobs  # the paper's figures (Ho et al. Figs. 6-9)

    for figure, stem, kwargs in figure_jobs(cfg, T):
        calls = figure_calls(figure, kwargs, T)
        cost.add(f"figure {stem}", calls, "network", share)
        lines.append(f"figure {stem}: {calls:,} network calls")
    if fidelity is not None:
        images.append(cfg.num_samples)
        for name, steps in sampling_settings(cfg):
            for scale in guidance_scales(cfg, num_classes):
                calls = network_calls(name, steps, T) * (2 if scale else 1)  # guided: conditional and "no class"
                cost.add(sampling_phase(name, steps, scale), cfg.num_samples * calls, "network", share)
                cost.add("features (samples)", cfg.num_samples if fidelity.wanted else 0, "features")
                guidance = "" if scale is None else f", guidance w={scale:g}{' (2 images a call)' if scale else ''}"
                lines.append(f"samples: {cfg.num_samples} x {name}, {steps or default_steps(name, T)} steps{guidance} "
                             f"({cfg.num_samples * calls:,} network calls), then their features")
        cached = fidelity.reference_cached
        if fidelity.reference_layers and not cached:
            cost.add("features (reference)", len(fidelity.reference), "features")
        wanted = ", ".join(fidelity.wanted) or "none"
        lines.append(f"{wanted} with {fidelity.described}; reference: {reference}, "
                     f"{'features cached' if cached else 'features extracted once, then cached'}")
    say(f"evaluation plan: {cfg.ckpt} ({'EMA' if cfg.use_ema else 'raw'} weights), {fabric.world_size} "
        f"process(es) on {device.type}, batch {cfg.batch_size}")
    for line in lines:
        say(f"  {line}")
    probes = []
    if any(p.kind == "network" for p in cost.phases):
        batch = max(2, min(cfg.batch_size, max(images)))  # the phases' own batch size
        per_call = probe_network(model.to(device), (data.channels, data.image_size, data.image_size), batch, device)
        cost.set_speed("network", per_call)
        probes.append(f"{per_call * 1e3:.2f} ms per image per network call")
    if any(p.kind == "features" and p.units for p in cost.phases):
        per_image = probe_features(fidelity, (3, data.image_size, data.image_size))
        cost.set_speed("features", per_image)
        probes.append(f"{per_image * 1e3:.0f} ms per image through the extractor")
    say(f"estimate ({'; '.join(probes) or 'nothing to time'}): {cost.summary()}")
    return cost
