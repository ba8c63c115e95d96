"""The rules of every config key a user may set (type, range, choices, null), checked before anything is built.

The YAML files under conf/ stay the only home of defaults: this file holds rules, never values to use.
train.py and evaluate.py call `check(cfg, TRAIN)` / `check(cfg, EVAL)` before torch is even imported (a bad
value exits in about a second), then `check_machine(cfg)`: the precision, accelerator and device count this
machine has. A failure is one line, `key must be <rule>, got <value>: <fix>` (ConfigError, exit code 2).

ADDING A KEY: one line in TRAIN (conf/config.yaml and its groups) or EVAL (conf/eval.yaml), in its group's block:

    "data.batch_size": integer(1),                        an int >= 1 (a count: 0 is refused, never "all")
    "val.every_n_steps": integer(1, null=True),            ... or null
    "optim.lr": number(0, above=True),                     an int or float > 0 (above/below: open bounds)
    "optim.ema_decay": number(0, 1, below=True),           in [0, 1)
    "diffusion.prediction": choice("eps", "x0", "v"),
    "optim.fused": flag(),                                 true or false
    "data.root": path(),   "task_name": text(),            a string (path(): a folder or file name)
    "optim.adam_betas": list_of(number(0, 1, below=True), length=2),
    "trainer.devices": either(integer(1), choice("auto")),
    "diffusion.betas": alias("${schedule}"),               must stay this interpolation
    fix="..." on any rule replaces the default hint (the YAML's own value for the key, e.g. "schedule.timesteps=1000").

`*` in a key stands for one level (`logger.*._target_`). A key with no rule is refused at run time, except below
`trainer.`, `callbacks.` and `logger.`, whose extra keys (Lightning's own arguments) go to their class, which
checks them (its error is one line naming the key: ddpmlab.cli). Every key the YAML files compose must have a
rule: tests/test_config_schema.py::test_every_composed_key_has_a_rule fails otherwise, and its generated sweep
tries a value of the wrong type and one out of range for each, as processes.

Rules between keys: a function `(cfg) -> None` raising `problem(key, value, rule, fix)`, listed in
TRAIN_CROSS or EVAL_CROSS.
"""

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ddpmlab.errors import ConfigError

OPEN = ("trainer.", "callbacks.", "logger.")  # extra keys go to Lightning's classes, which check them
# ddpmlab.diffusion.samplers.SAMPLERS (tested equal)
SAMPLERS = ("ancestral", "respaced", "ddim", "dpm_solver", "heun", "edm")
EDM_SAMPLERS = ("heun", "edm")  # ddpmlab.diffusion.samplers.EDM_SAMPLERS: the only ones a diffusion=edm run has
EDM_TARGET = "ddpmlab.diffusion.edm.EDMDiffusion"  # conf/diffusion/edm.yaml
METRICS = ("nll", "nll_estimate", "nll_ode", "fid", "is", "kid", "rate_distortion")  # ddpmlab.evaluation.METRICS (tested equal)
FIGURES = ("progressive", "shared_latent", "interpolation", "coarse_to_fine")  # ddpmlab.figures.FIGURES (tested equal)
TABLES = ("paper_table2",)  # ddpmlab.table2.TABLES (tested equal)
# Training images of the built-in datasets: a batch larger than its dataset is refused (the sampler would
# silently shrink it to the dataset).
DATASET_SIZES = {"fashion_mnist": 60_000, "mnist": 60_000, "cifar10": 50_000}
PRECISIONS = ("auto", "64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", 64, 32, 16, "64", "32",
              "16", "bf16")  # auto: ddpmlab.performance.resolved_precision
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


@dataclass(frozen=True)
class Rule:
    """What a key's value may be: `test(value)` for a value that is not null, `text` says it in words."""

    test: Callable[[object], bool]
    text: str
    null: bool = False
    fix: str = ""
    choices: tuple = ()

    def accepts(self, value) -> bool:
        return self.null if value is None else self.test(value)

    def words(self) -> str:
        return f"{self.text} or null" if self.null else self.text


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None, null: bool = False, fix: str = "") -> Rule:
    text = ("an integer" if lo is None and hi is None else "a positive integer" if (lo, hi) == (1, None)
            else f"an integer >= {lo}" if hi is None else f"an integer <= {hi}" if lo is None
            else f"an integer in [{lo}, {hi}]")
    return Rule(lambda v: _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi), text, null, fix)


def number(lo: float | None = None, hi: float | None = None, above: bool = False, below: bool = False,
           null: bool = False, fix: str = "") -> Rule:
    """A finite int or float in the interval from lo to hi; `above`/`below`: lo/hi themselves excluded."""
    if lo is not None and hi is not None:
        text = f"in {'(' if above else '['}{lo:g}, {hi:g}{')' if below else ']'}"
    elif lo is not None:
        text = "a positive number" if (lo, above) == (0, True) else f"a number {'>' if above else '>='} {lo:g}"
    else:
        text = "a number" if hi is None else f"a number {'<' if below else '<='} {hi:g}"

    def test(v) -> bool:
        return _is_number(v) and (lo is None or (v > lo if above else v >= lo)) and (
            hi is None or (v < hi if below else v <= hi))

    return Rule(test, text, null, fix)


def flag(null: bool = False, fix: str = "") -> Rule:
    return Rule(lambda v: isinstance(v, bool), "true or false", null, fix)


def choice(*options, null: bool = False, fix: str = "") -> Rule:
    return Rule(lambda v: any(v == o and type(v) is type(o) for o in options),
                f"one of {', '.join(map(str, options))}", null, fix, options)


def text(null: bool = False, fix: str = "", empty: bool = False) -> Rule:
    return Rule(lambda v: isinstance(v, str) and (empty or v != ""), "a string" if empty else "a non-empty string",
                null, fix)


def path(null: bool = False, fix: str = "") -> Rule:
    return Rule(lambda v: isinstance(v, str) and v != "", "a path (a string; quote a number: '5')", null, fix)


def list_of(item: Rule, length: int | None = None, min_length: int = 0, null: bool = False, fix: str = "") -> Rule:
    size = f"{length} values" if length is not None else "one or more values" if min_length else "values"

    def test(v) -> bool:
        return (isinstance(v, (list, tuple)) and all(item.accepts(x) and x is not None for x in v)
                and (length is None or len(v) == length) and len(v) >= min_length)

    return Rule(test, f"a list of {size}, each {item.text}", null, fix)


def either(*rules: Rule, null: bool = False, fix: str = "") -> Rule:
    return Rule(lambda v: any(r.test(v) for r in rules), " or ".join(r.text for r in rules), null, fix)


def duration(null: bool = False, fix: str = "") -> Rule:
    """Lightning's max_time string DD:HH:MM:SS, above zero."""
    def test(v) -> bool:
        parts = v.split(":") if isinstance(v, str) else []
        return (len(parts) == 4 and all(p.isdigit() for p in parts) and all(len(p) == 2 for p in parts[1:])
                and int(parts[1]) < 24 and int(parts[2]) < 60 and int(parts[3]) < 60 and any(map(int, parts)))

    return Rule(test, "a duration DD:HH:MM:SS above zero (00:00:10:00: ten minutes)", null, fix)


def alias(interpolation: str) -> Rule:
    """The key must stay the interpolation (checked on the unresolved value): its value is set at the source."""
    source = interpolation.strip("${}")
    return Rule(lambda v: v == interpolation, interpolation, fix=f"set {source} instead; this key follows it")


# The keys of train.py's config (conf/config.yaml and every group option). One line per key.
TRAIN: dict[str, Rule] = {
    "task_name": text(),
    "seed": integer(0),
    "ckpt_path": path(null=True),
    "init_from": path(null=True),
    "resume.allow_changes": list_of(text(), fix="name keys as a list, e.g. resume.allow_changes=[optim.lr]"),
    "optimized_metric": text(null=True),
    # optim: DiffusionModule's arguments
    "optim.lr": number(0, above=True, fix="the paper uses optim.lr=2e-4"),
    "optim.warmup_steps": integer(0),
    "optim.ema_decay": number(0, 1, below=True, fix="the paper uses 0.9999"),
    "optim.ema_warmup": flag(),
    "optim.adam_betas": list_of(number(0, 1, below=True), length=2),
    "optim.weight_decay": number(0),
    "optim.on_nonfinite": choice("stop", "skip"),
    "optim.fused": flag(),
    "performance.channels_last": either(flag(), choice("auto")),
    "performance.compile": flag(),
    # val/bpd during training (ddpmlab.callbacks.ValidationBound)
    "val.num_images": integer(0, fix="0 turns val/bpd off"),
    "val.timesteps": integer(1),
    "val.every_n_steps": integer(1, null=True, fix="null: at the end of training only"),
    "val.batch_size": integer(1),
    "val.seed": integer(0),
    # data: DiffusionDataModule
    "data._target_": text(),
    "data.dataset": choice("fashion_mnist", "mnist", "cifar10", "image_folder", "shards"),
    "data.root": path(),
    "data.path": path(fix="the folder `python -m ddpmlab.prepare` wrote"),
    "data.image_size": integer(1),
    "data.channels": choice(1, 3),
    "data.batch_size": integer(1),
    "data.num_workers": integer(0, 4 * (os.cpu_count() or 1)),  # more than cores helps slow disks; not 1000s
    "data.random_flip": flag(),
    "data.download": flag(),
    "data.verify_checksums": flag(),
    "data.seed": integer(0),
    "data.test_fraction": number(0, 1, below=True, fix="0.1 holds out a tenth"),
    "data.split_seed": integer(0),
    "data.background": text(null=True, fix="a colour name (white), #rrggbb, or null to refuse transparency"),
    # model: the U-Net (its shape rules between keys: UNet._validate, at build time, before any file)
    "model._target_": text(),
    "model.image_size": integer(1),
    "model.in_channels": integer(1),
    "model.ch": integer(1),
    "model.ch_mult": list_of(integer(1), min_length=1),
    "model.num_res_blocks": integer(1),
    "model.attn_resolutions": list_of(integer(1)),
    "model.dropout": number(0, 1, below=True),
    "model.norm_groups": integer(1),
    "model.num_heads": integer(1),
    "model.scale_shift_norm": flag(),
    "model.norm_eps": number(0, above=True),
    "model.downsample_padding": choice("symmetric", "same"),
    "model.flip_sin_to_cos": flag(),
    "model.freq_shift": number(),
    "model.num_classes": integer(1, null=True, fix="null: unconditional; N: conditional on N classes (10 for "
                                 "Fashion-MNIST)"),
    # schedule: one of ddpmlab.diffusion.schedules' functions
    "schedule._target_": text(),
    "schedule.timesteps": integer(1, fix="set schedule.timesteps=1000 (the DDPM paper's T)"),
    "schedule.beta_start": number(0, 1, above=True, below=True),
    "schedule.beta_end": number(0, 1, above=True, below=True),
    "schedule.s": number(0),
    "schedule.max_beta": number(0, 1, above=True, below=True),
    "schedule.start": number(),
    "schedule.end": number(),
    "schedule.tau": number(0, above=True),
    "schedule.betas": list_of(number(0, 1, above=True, below=True), min_length=1,
                              fix="set schedule.betas=[beta_1,...,beta_T] (python -m ddpmlab.hub import prints them)"),
    # diffusion: GaussianDiffusion
    "diffusion._target_": text(),
    "diffusion.betas": alias("${schedule}"),
    "diffusion.prediction": choice("eps", "x0", "v", "mean"),
    "diffusion.variance": choice("fixed_large", "fixed_small", "learned", "learned_range"),
    "diffusion.loss": choice("simple", "vlb", "hybrid"),
    "diffusion.vlb_weight": number(0, above=True),
    "diffusion.loss_weighting": choice("none", "min_snr"),
    "diffusion.min_snr_gamma": number(0, above=True),
    "diffusion.sigma_data": number(0, above=True, fix="EDM uses 0.5"),  # diffusion=edm (EDMDiffusion)
    "diffusion.P_mean": number(),
    "diffusion.P_std": number(0, above=True, fix="EDM uses 1.2"),
    "diffusion.sigma_min": number(0, above=True, fix="EDM uses 0.002"),
    "diffusion.sigma_max": number(0, above=True, fix="EDM uses 80"),
    "diffusion.strata": integer(1),
    "diffusion.cond_drop_prob": number(0, 1, below=True, fix="Ho & Salimans use 0.1 or 0.2"),
    "timestep_sampler._target_": text(),
    "timestep_sampler.history": integer(1),
    "timestep_sampler.uniform_prob": number(0, 1),
    # trainer: Lightning's Trainer (other Trainer arguments go through to it)
    "trainer._target_": text(),
    "trainer.accelerator": choice(*ACCELERATORS),
    "trainer.devices": either(integer(1), choice("auto"), list_of(integer(0), min_length=1)),
    "trainer.num_nodes": integer(1),
    "trainer.strategy": text(),
    "trainer.strategy._target_": text(),
    "trainer.strategy.gradient_as_bucket_view": flag(),
    "trainer.strategy.static_graph": flag(),
    "trainer.precision": choice(*PRECISIONS),
    "trainer.max_steps": either(integer(1), choice(-1), fix="-1: no limit, with trainer.max_epochs set"),
    "trainer.max_epochs": either(integer(1), choice(-1), fix="-1: no limit, with trainer.max_steps set"),
    "trainer.max_time": duration(null=True, fix="e.g. trainer.max_time=00:00:10:00 (ten minutes), or null"),
    "trainer.gradient_clip_val": number(0, above=True, null=True, fix="null: no clipping"),
    "trainer.gradient_clip_algorithm": choice("norm", "value", null=True),
    "trainer.accumulate_grad_batches": integer(1),
    "trainer.log_every_n_steps": integer(1),
    "trainer.limit_val_batches": either(integer(0), number(0, 1)),
    "trainer.num_sanity_val_steps": integer(-1),
    "trainer.deterministic": either(flag(), choice("warn")),
    "trainer.use_distributed_sampler": flag(),
    # callbacks (each may be null: callbacks.sample_grid=null)
    "callbacks.*._target_": text(),
    "callbacks.*.dirpath": path(),
    "callbacks.checkpoint.every_n_train_steps": integer(1, null=True, fix="null: only last.ckpt at the end"),
    "callbacks.checkpoint.save_top_k": integer(-1),
    "callbacks.checkpoint.save_last": flag(),
    "callbacks.checkpoint.enable_version_counter": flag(),
    "callbacks.sample_grid.every_n_steps": integer(0, fix="0: the final grid only"),
    "callbacks.sample_grid.num_samples": integer(1),
    "callbacks.sample_grid.sampler": choice(*SAMPLERS),
    "callbacks.sample_grid.sampling_steps": integer(1, null=True, fix="null: all T steps"),
    "callbacks.sample_grid.seed": integer(0),
    "callbacks.sample_grid.labels": either(choice("all"), list_of(integer(0), min_length=1), null=True,
                                           fix="all (one row per class) or a list of classes, e.g. [0,3]"),
    "callbacks.sample_grid.guidance_scale": number(0, null=True, fix="null or 0: no guidance; e.g. 1"),
    "callbacks.lr_monitor.logging_interval": choice("step", "epoch", null=True),
    "callbacks.last_checkpoint.check_every_n_steps": integer(1),
    "callbacks.progress_bar.refresh_rate": integer(1),
    # loggers (logger=null: none)
    "logger.*._target_": text(),
    "logger.*.save_dir": path(),
    "logger.*.name": text(),
    "logger.*.version": either(text(empty=True), integer(0), null=True),
    "logger.tensorboard.default_hp_metric": flag(),
    "logger.wandb.project": text(),
    "logger.wandb.tags": list_of(text()),
    "logger.wandb.group": text(null=True),
    "logger.wandb.log_model": either(flag(), choice("all")),
    "logger.wandb.offline": flag(null=True),
    "paths.root_dir": path(),
    "paths.data_dir": path(),
    "paths.log_dir": path(),
    "paths.output_dir": path(),
}

CKPT_FIX = "pass ckpt=runs/<task>/<run>/checkpoints/last.ckpt, or ckpt=last for the newest training run"
# The keys of evaluate.py's config (conf/eval.yaml); the model, diffusion and data come from the checkpoint.
EVAL: dict[str, Rule] = {
    **{key: rule for key, rule in TRAIN.items() if key.startswith(("paths.", "logger.", "performance."))},
    "task_name": text(),
    "ckpt": path(null=True, fix=CKPT_FIX),
    "use_ema": flag(),
    "metrics": list_of(choice(*METRICS), fix=f"choose from {', '.join(METRICS)}; [] for figures alone"),
    "seed": integer(0),
    "batch_size": integer(1),
    "data_root": path(null=True),
    "num_samples": integer(1),
    "sampler": either(choice(*SAMPLERS), list_of(choice(*SAMPLERS), min_length=1)),
    "sampling_steps": either(integer(1), list_of(integer(1), min_length=1), null=True, fix="null: all T steps"),
    "eta": number(0, 1),  # 0: deterministic DDIM, 1: DDPM's stochasticity
    "precision": choice("auto", "fp32", "bf16"),
    "edm.rho": number(0, above=True, fix="EDM uses 7"),  # sampler=heun and edm (Karras et al. 2022)
    "edm.sigma_min": number(0, above=True, fix="EDM uses 0.002"),
    "edm.sigma_max": number(0, above=True, fix="EDM uses 80"),
    "edm.S_churn": number(0, fix="0 is deterministic (Algorithm 1); EDM's VP setting is 30"),
    "edm.S_tmin": number(0),
    "edm.S_tmax": number(0),
    "edm.S_noise": number(0, above=True, fix="EDM uses 1.003 to 1.007"),
    "labels": either(choice("all"), list_of(integer(0), min_length=1), null=True,
                     fix="all (every class equally) or a list of classes, e.g. [0,3]"),
    "guidance_scale": either(number(0), list_of(number(0), min_length=1), null=True,
                             fix="a w >= 0 or a list, e.g. [0,0.5,1,2,4]; null for an unconditional checkpoint"),
    "nll.num_images": integer(1, null=True, fix="null: the whole test split"),
    "nll.clip_denoised": flag(),
    "nll_estimate.num_images": integer(1, null=True, fix="null: the whole test split"),
    "nll_estimate.timesteps": integer(1),
    "nll_ode.num_images": integer(1, null=True, fix="null: the whole test split"),
    "nll_ode.rtol": number(0, above=True, fix="Song et al. use 1e-5"),
    "nll_ode.atol": number(0, above=True, fix="Song et al. use 1e-5"),
    "nll_ode.probes": integer(1),
    "nll_ode.probe": choice("rademacher", "gaussian"),
    "feature_extractor": choice("inception", "classifier"),
    "inception_weights": path(fix="auto, fid-helper, download or a .pth path"),
    "kid_subset_size": integer(2),
    "reference_images": either(integer(1), choice("auto"), null=True,
                               fix="auto: all on a GPU, cpu_reference_images on a CPU; null: the whole split"),
    "cpu_reference_images": integer(1),
    "trainer.accelerator": TRAIN["trainer.accelerator"],
    "trainer.devices": either(integer(1), choice("auto")),
    # Ho et al. 2020's figures (ddpmlab.figures) and Table 2 (ddpmlab.table2); a t is the paper's, 1..T (checked
    # against the checkpoint's T once it is read)
    "figures": list_of(choice(*FIGURES), fix=f"choose from {', '.join(FIGURES)}"),
    "progressive.rows": integer(1),
    "progressive.columns": integer(1),
    "shared_latent.images": integer(1),
    "shared_latent.t": list_of(integer(1), min_length=1, null=True, fix="null: T, 3T/4, T/2, T/4 (the paper's)"),
    "shared_latent.samples": integer(1),
    "interpolation.pairs": integer(1),
    "interpolation.t": integer(1, null=True, fix="null: T/2 (the paper's 500 of 1000)"),
    "interpolation.lambdas": list_of(number(0, 1), min_length=1, fix="mixing weights in [0, 1], e.g. [0, 0.5, 1]"),
    "coarse_to_fine.t": list_of(integer(1), min_length=1, null=True, fix="null: T, 7T/8, ..., T/8 (the paper's)"),
    "sweep_dir": path(null=True, fix="the folder of `python train.py -m sweep=paper_table2`"),
    "table": choice(*TABLES, null=True),
}


class _Missing:
    def __repr__(self) -> str:
        return "???"


MISSING = _Missing()


def problem(key: str, value, rule: Rule | str, fix: str = "") -> ConfigError:
    """The one-line error for `key`: its value, the rule it breaks and the fix."""
    if value is MISSING:
        return ConfigError(f"{key} is required and has no value: {fix or f'set {key}=...'}")
    if isinstance(rule, Rule) and rule.choices and value is not None and not isinstance(value, (list, dict)):
        return ConfigError(f"{key}={value!r} is unknown: choose one of {', '.join(map(str, rule.choices))}"
                           + (f" ({fix})" if fix else ""))
    words = rule.words() if isinstance(rule, Rule) else rule
    return ConfigError(f"{key} must be {words}, got {value!r}" + (f": {fix}" if fix else ""))


def leaves(cfg: DictConfig, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted key, value) of every setting below `cfg`, interpolations resolved; a null group yields (key, None),
    an unset one `MISSING`, and a key whose interpolation cannot be resolved raises its one line."""
    for key in cfg.keys():
        full = f"{prefix}{key}"
        node = cfg._get_node(key)
        if OmegaConf.is_dict(node) and not node._is_none() and not node._is_interpolation():
            yield from leaves(node, f"{full}.")
            continue
        if OmegaConf.is_missing(cfg, key):
            yield full, MISSING
            continue
        try:
            value = cfg[key]
        except OmegaConfBaseException as err:
            raise ConfigError(f"{full}={node._value()} cannot be resolved ({str(err).splitlines()[0]}): "
                              "fix or drop that override") from None
        if isinstance(value, DictConfig):
            yield full, node._value()  # a group borrowed whole (diffusion.betas: ${schedule}): its source is checked
        else:
            yield full, OmegaConf.to_container(value, resolve=True) if isinstance(value, ListConfig) else value


def _borrowed(cfg: DictConfig, key: str) -> bool:
    parent, _, name = key.rpartition(".")
    return OmegaConf.is_interpolation(OmegaConf.select(cfg, parent) if parent else cfg, name)


def rule_for(rules: dict[str, Rule], key: str) -> Rule | None:
    return rules.get(key) or next((r for pattern, r in rules.items() if "*" in pattern and fnmatchcase(key, pattern)
                                   and pattern.count(".") == key.count(".")), None)


def _yaml_value(key: str):
    """The YAML's value for `key` under this run's group choices (experiment=... included), for the fix; None
    outside a Hydra app."""
    try:
        from hydra import compose
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get()
        groups = [f"{g}={o}" for g, o in hydra.runtime.choices.items() if o is not None and not g.startswith("hydra")]
        value = OmegaConf.select(compose(hydra.job.config_name, overrides=groups), key,
                                 throw_on_resolution_failure=False)
        return OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
    except Exception:  # no Hydra app (a test calling check), or a config that does not compose: no hint
        return None


def _fix(key: str, rule: Rule) -> str:
    if rule.fix:
        return rule.fix
    default = _yaml_value(key)
    if default is None or not rule.accepts(default):
        return ""
    return f"e.g. {key}={_as_override(default)} (its default)"


def _as_override(value) -> str:
    """A value as an override writes it: true, null, '', [0.9, 0.999]."""
    if isinstance(value, list):
        return f"[{', '.join(map(_as_override, value))}]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else "''" if value == "" else str(value)


def check_train(cfg: DictConfig) -> None:
    """train.py's config: its keys, the rules between them, then this machine (which imports torch)."""
    check(cfg, TRAIN, TRAIN_CROSS)
    check_machine(cfg.trainer)
    from ddpmlab.memory import check_fits  # builds the U-Net on the meta device: once the values are known good

    check_fits(cfg)


def check_eval(cfg: DictConfig) -> None:
    """evaluate.py's config, before the checkpoint is read (its T and data are checked once it is loaded)."""
    check(cfg, EVAL, EVAL_CROSS)
    check_machine(cfg.trainer)
    if cfg.get("precision") == "bf16":
        check_bf16(cfg.trainer, "precision", "fp32")


def check(cfg: DictConfig, rules: dict[str, Rule], cross=()) -> None:
    """Every key of `cfg` against its rule, then the rules between keys; raises the first failure's line.
    Keys set by value go first, so that a bad value is named where it was set, not where it is borrowed
    (`data.root: ${paths.data_dir}`)."""
    for key, value in sorted(leaves(cfg), key=lambda item: _borrowed(cfg, item[0])):
        rule = rule_for(rules, key)
        if rule is None:
            if key.startswith(OPEN) or (key == "logger" and value is None):  # logger=null: no logger
                continue
            raise ConfigError(f"{key} is no setting of this project (value {value!r}): remove it, or, for a new "
                              "key, add its rule to src/ddpmlab/schema.py")
        if value is MISSING:
            raise problem(key, value, rule, rule.fix)
        if not rule.accepts(value):
            raise problem(key, value, rule, _fix(key, rule))
    for rule in cross:
        rule(cfg)


def _sample_grid_steps(cfg) -> None:
    """Sampler steps <= T for the sample grid: found at the first grid, after hours of training, otherwise."""
    grid = OmegaConf.select(cfg, "callbacks.sample_grid")
    if not grid:
        return
    T, steps = cfg.schedule.timesteps, grid.sampling_steps
    key = "callbacks.sample_grid.sampling_steps"
    if grid.sampler == "ancestral" and steps not in (None, T):
        raise problem(key, steps, f"null or T={T} for the ancestral sampler (it runs every step)",
                      f"set {key}=null, or callbacks.sample_grid.sampler=respaced for fewer steps")
    if steps is not None and steps > T and grid.sampler not in EDM_SAMPLERS:  # theirs may repeat a level
        raise problem(key, steps, f"at most schedule.timesteps={T}",
                      f"set {key}={T} (or fewer), or {key}=null for all T steps")


def _model_follows_data(cfg) -> None:
    for key, source in (("model.image_size", "data.image_size"), ("model.in_channels", "data.channels")):
        if OmegaConf.select(cfg, key) != OmegaConf.select(cfg, source):
            raise problem(key, OmegaConf.select(cfg, key), f"{source}={OmegaConf.select(cfg, source)}",
                          f"set {source} instead; the model follows the data")


def check_batch_fits(cfg, size: int, what: str) -> None:
    """data.batch_size x processes at most the `size` training images (`what` they are): a larger batch would be
    silently shrunk to the dataset (StepBatchSampler) while train/images_per_s counted the configured one."""
    devices = cfg.trainer.get("devices", 1)
    processes = (devices if isinstance(devices, int) else len(devices) if OmegaConf.is_list(devices) else 1) * \
        cfg.trainer.get("num_nodes", 1)
    if cfg.data.batch_size * processes > size:
        raise problem("data.batch_size", cfg.data.batch_size, f"at most the {size} training images of {what}"
                      + (f" over {processes} processes" if processes > 1 else ""),
                      f"set data.batch_size={max(1, size // processes)} or less" if size >= processes else
                      "add training images, or train on fewer processes")


def _batch_fits_dataset(cfg) -> None:
    """The built-in datasets' sizes are known before any is read; an image folder's and shards' once read
    (ddpmlab.training.train, before step 1)."""
    size = DATASET_SIZES.get(cfg.data.dataset)
    if size is not None:
        check_batch_fits(cfg, size, cfg.data.dataset)


def _training_stops(cfg) -> None:
    if (cfg.trainer.get("max_steps", -1) == -1 and cfg.trainer.get("max_epochs", -1) == -1
            and cfg.trainer.get("max_time") is None):
        raise problem("trainer.max_steps", -1, "a positive step count when trainer.max_epochs=-1 and "
                      "trainer.max_time=null (else training never ends)",
                      "set trainer.max_steps=1500, trainer.max_epochs or trainer.max_time=00:00:10:00")


def _sample_metrics_need_samples(cfg) -> None:
    wanted = sorted({"fid", "is", "kid"} & set(cfg.metrics))
    if wanted and cfg.num_samples < 2:
        raise problem("num_samples", cfg.num_samples, f"at least 2 for {wanted}", "set num_samples=50000 (the "
                      "papers' count) or fewer for a quick look")


def _edm_noise_range(cfg) -> None:
    """EDM's noise levels (a diffusion=edm run's, evaluate.py's EDM samplers') go from sigma_min up to sigma_max."""
    for prefix in ("diffusion", "edm"):
        low, high = OmegaConf.select(cfg, f"{prefix}.sigma_min"), OmegaConf.select(cfg, f"{prefix}.sigma_max")
        if low is not None and high is not None and not low < high:
            raise problem(f"{prefix}.sigma_min", low, f"below {prefix}.sigma_max={high}",
                          f"EDM uses {prefix}.sigma_min=0.002 {prefix}.sigma_max=80")
    low, high = OmegaConf.select(cfg, "edm.S_tmin"), OmegaConf.select(cfg, "edm.S_tmax")
    if low is not None and high is not None and not low <= high:
        raise problem("edm.S_tmin", low, f"at most edm.S_tmax={high}", "churn acts on sigma in [S_tmin, S_tmax]")


def _edm_grid_sampler(cfg) -> None:
    """An EDM run's sample grid needs one of EDM's samplers: found at the first grid, after training, otherwise."""
    grid = OmegaConf.select(cfg, "callbacks.sample_grid")
    if grid and cfg.diffusion.get("_target_") == EDM_TARGET and grid.sampler not in EDM_SAMPLERS:
        raise problem("callbacks.sample_grid.sampler", grid.sampler, f"one of {', '.join(EDM_SAMPLERS)} for "
                      "diffusion=edm (a continuous sigma has no DDPM steps)",
                      "add callbacks.sample_grid.sampler=heun callbacks.sample_grid.sampling_steps=18, or train "
                      "experiment=edm_fashion_mnist")


def _one_checkpoint_or_a_sweep(cfg) -> None:
    """evaluate.py measures one checkpoint (ckpt), or every run of a sweep laid out as a table (sweep_dir, table)."""
    ckpt, sweep, table = cfg.get("ckpt"), cfg.get("sweep_dir"), cfg.get("table")
    if ckpt is None and sweep is None:
        raise problem("ckpt", MISSING, EVAL["ckpt"], f"{CKPT_FIX} (or sweep_dir=<a sweep folder> table={TABLES[0]})")
    if sweep is None and table is not None:
        raise problem("sweep_dir", None, f"a sweep folder for table={table}", "set sweep_dir=<the folder of python "
                      "train.py -m sweep=paper_table2>")
    if sweep is not None and table is None:
        raise problem("table", None, f"a table to lay out the runs of sweep_dir={sweep} in",
                      f"set table={TABLES[0]}")
    if sweep is not None and ckpt is not None:
        raise problem("ckpt", ckpt, f"unset when sweep_dir is set (every run of {sweep} is evaluated)",
                      "drop ckpt=..., or drop sweep_dir and table")


def _something_to_do(cfg) -> None:
    if not cfg.metrics and not cfg.get("figures"):
        raise problem("metrics", [], "one metric or more when figures=[] (nothing to do)",
                      f"name metrics from {', '.join(METRICS)}, or figures from {', '.join(FIGURES)}")


def check_conditioning(labels, guidance_scale, num_classes: int | None, cond_drop_prob: float, prefix: str,
                       model: str, verb: str = "train with") -> None:
    """`labels` and `guidance_scale` (one w or a list) against the model they sample (`model`, in words): labels
    and guidance need a class-conditional model, labels lie in [0, num_classes), and guidance (w > 0) needs the
    "no class" label trained (diffusion.cond_drop_prob > 0). `verb`: how the fix gets such a model ("set" in a run)."""
    scales = [w for w in (guidance_scale if isinstance(guidance_scale, (list, ListConfig)) else [guidance_scale])
              if w is not None]
    if num_classes is None:
        for key, value in ((f"{prefix}labels", labels), (f"{prefix}guidance_scale", guidance_scale)):
            if value is not None:
                raise problem(key, value, f"null for {model}, which is unconditional (model.num_classes=null)",
                              f"drop {key}, or {verb} model.num_classes=N")
        return
    if isinstance(labels, (list, ListConfig)) and any(not 0 <= c < num_classes for c in labels):
        raise problem(f"{prefix}labels", list(labels), f"all or classes in 0..{num_classes - 1} (the {num_classes} "
                      f"classes of {model})", f"e.g. {prefix}labels=[0,{num_classes - 1}], or {prefix}labels=all")
    if not cond_drop_prob and any(scales):
        raise problem(f"{prefix}guidance_scale", guidance_scale, f"0 for {model}, whose \"no class\" label was never "
                      "trained (diffusion.cond_drop_prob=0)", f"set {prefix}guidance_scale=0, or {verb} "
                      "diffusion.cond_drop_prob=0.1")


def _sample_grid_conditioning(cfg) -> None:
    grid = OmegaConf.select(cfg, "callbacks.sample_grid")
    if grid:
        check_conditioning(grid.get("labels"), grid.get("guidance_scale"), cfg.model.get("num_classes"),
                           cfg.diffusion.get("cond_drop_prob", 0.0), "callbacks.sample_grid.", "this run", verb="set")


TRAIN_CROSS = (_edm_grid_sampler, _sample_grid_steps, _model_follows_data, _batch_fits_dataset, _training_stops,
               _edm_noise_range, _sample_grid_conditioning)
EVAL_CROSS = (_sample_metrics_need_samples, _edm_noise_range, _one_checkpoint_or_a_sweep, _something_to_do)


def check_machine(trainer: DictConfig, key: str = "trainer") -> None:
    """The accelerator, device count and precision `trainer` asks for exist on this machine (imports torch)."""
    import torch

    from ddpmlab.performance import resolved_precision, uses_gpu

    accelerator, devices = trainer.get("accelerator", "auto"), trainer.get("devices", 1)
    cuda = torch.cuda.is_available()
    if accelerator in ("gpu", "cuda") and not cuda:
        raise problem(f"{key}.accelerator", accelerator, "an accelerator this machine has (it has no CUDA GPU)",
                      f"set {key}.accelerator=cpu (or auto)")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise problem(f"{key}.accelerator", accelerator, "an accelerator this machine has (it has no MPS)",
                      f"set {key}.accelerator=cpu (or auto)")
    on_gpu = uses_gpu(trainer)
    available = torch.cuda.device_count() if on_gpu else os.cpu_count() or 1
    wanted = devices if isinstance(devices, int) else max(devices) + 1 if OmegaConf.is_list(devices) else 0
    if wanted > available:
        what = f"{available} GPU(s)" if on_gpu else f"{available} CPU core(s)"
        raise problem(f"{key}.devices", devices, f"at most the {what} this machine has",
                      f"set {key}.devices={available} or fewer")
    precision = resolved_precision(trainer.get("precision", "32-true"), on_gpu)
    if precision == "16-mixed" and not on_gpu:
        raise problem(f"{key}.precision", trainer.precision, "a precision the CPU runs (fp16 mixed precision needs "
                      "a GPU)", f"set {key}.precision=bf16-mixed or 32-true")
    if precision.startswith("bf16"):
        check_bf16(trainer, f"{key}.precision", "32-true")


def check_bf16(trainer: DictConfig, key: str, fp32: str) -> None:
    """bfloat16 exists on the device `trainer` runs on: a GPU that has it, a CPU for which oneDNN has kernels."""
    import torch

    from ddpmlab.performance import cpu_bf16, uses_gpu

    if uses_gpu(trainer) and not torch.cuda.is_bf16_supported():
        raise problem(key, OmegaConf.select(trainer, "precision") if key.endswith("trainer.precision") else "bf16",
                      "a precision this GPU runs (it has no bfloat16)", f"set {key}={fp32} (or 16-mixed in training)")
    if not uses_gpu(trainer) and cpu_bf16() == "none":
        raise problem(key, "bf16", "a precision this CPU runs (oneDNN has no bfloat16 kernels for it)",
                      f"set {key}={fp32} (or auto)")
