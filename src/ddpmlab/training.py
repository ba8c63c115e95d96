"""Build everything a run needs from the composed config, and train."""

import logging
import warnings
from pathlib import Path

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ddpmlab.callbacks import ValidationBound
from ddpmlab.checkpoints import AtomicCheckpointIO
from ddpmlab.data import NO_HELD_OUT
from ddpmlab.errors import ConfigError
from ddpmlab.loggers import finish_wandb
from ddpmlab.module import EVERY_STEP, METRICS, DiffusionModule
from ddpmlab.performance import optimize_network, performance_settings, trainer_precision, uses_gpu
from ddpmlab.resume import ApplyOptimChanges, start
from ddpmlab.schema import DATASET_SIZES, check_batch_fits

# The EMA copy is in eval mode on purpose (no dropout when sampling from it).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
log = logging.getLogger(__name__)


def build(node, **kwargs):
    """hydra.utils.instantiate, but a ConfigError raised inside comes out as itself, not wrapped by Hydra."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def build_network(cfg: DictConfig):
    """(model, diffusion) from a run config; the diffusion says how many output channels the network needs."""
    diffusion = build(cfg.diffusion)
    model = build(cfg.model, out_channels=diffusion.output_channels(cfg.data.channels))
    return model, diffusion


def build_module(cfg: DictConfig) -> DiffusionModule:
    """U-Net + diffusion + timestep sampler + optimisation settings -> the LightningModule (the config rides along)."""
    model, diffusion = build_network(cfg)
    channels_last, compile = performance_settings(cfg.get("performance"), uses_gpu(cfg.trainer))
    optimize_network(model, channels_last=channels_last)  # before the EMA copy: it inherits the memory format
    timestep_sampler = build(cfg.timestep_sampler, num_timesteps=diffusion.num_timesteps)
    config = OmegaConf.to_container(cfg, resolve=True)
    module = DiffusionModule(model, diffusion, timestep_sampler, config=config, seed=cfg.seed, **cfg.optim)
    # after the EMA copy (a deep copy of a compiled module would call the original); the EMA samples uncompiled
    optimize_network(module.model, compile=compile)
    return module


def print_config_tree(cfg: DictConfig) -> None:
    """The resolved config as a tree, one branch per group, so a run's log starts with what it runs."""
    from rich import print as rich_print
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    for key, value in cfg.items():
        if OmegaConf.is_config(value):
            text = OmegaConf.to_yaml(value, resolve=True).rstrip()
            tree.add(str(key)).add(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
        else:
            tree.add(f"{key}: {value}")
    rich_print(tree)


class RunRecord(L.Callback):
    """What a run records once: config_resolved.yaml in the run folder, and the config tree and resume notes
    in the log. Under DDP every process runs train(), and only in `setup`, after the strategy has launched
    them, is the rank known: there global rank 0 alone writes and prints."""

    def __init__(self, cfg: DictConfig, notes: list[str]):
        self.cfg, self.notes = cfg, notes

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        output_dir = Path(self.cfg.paths.output_dir)
        saved = output_dir / "config_resolved.yaml"
        for n in range(1, 10_000):  # a run continued in place keeps the config of each part
            if not saved.exists():
                break
            saved = output_dir / f"config_resolved_{n}.yaml"
        OmegaConf.save(self.cfg, saved, resolve=True)
        print_config_tree(self.cfg)
        for note in self.notes:
            log.warning(note)


def check_optimized_metric(cfg: DictConfig, start_step: int = 0) -> None:
    """optimized_metric must name a metric the run will log: refused before training, not after.

    Every metric but train/loss and val/bpd is logged on logging steps only (DiffusionModule.logs_this_step:
    optimizer step s + 1 a multiple of trainer.log_every_n_steps), so a run from `start_step` to max_steps that
    holds no such step would train to the end and then have no value to return.
    """
    name, known = cfg.optimized_metric, (*METRICS, *([ValidationBound.name] if cfg.val.num_images else []))
    if name is not None and name not in known:
        hint = " (val.num_images=0 turns val/bpd off)" if name == ValidationBound.name else ""
        raise ConfigError(f"optimized_metric={name!r} is no metric this run logs{hint}: choose one of "
                          f"{', '.join(known)}, or null")
    every, last = cfg.trainer.log_every_n_steps, cfg.trainer.max_steps
    if name in (None, *EVERY_STEP, ValidationBound.name) or last == -1 or last // every > start_step // every:
        return
    steps = f"steps {start_step + 1} to {last}" if start_step else f"its {last} steps"
    raise ConfigError(f"optimized_metric={name} is logged every trainer.log_every_n_steps={every} steps, and "
                      f"{steps} hold no logging step: set trainer.log_every_n_steps={last - start_step} or less, "
                      "or optimized_metric=train/loss or val/bpd")


def objective(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value train.py returns to a sweeper: the metric optimized_metric names, as last logged."""
    name = cfg.optimized_metric
    if name is not None and name not in metrics:
        raise ConfigError(f"optimized_metric={name} was never logged by this run (it trained no step, or logged "
                          "none): lower trainer.log_every_n_steps, or raise trainer.max_steps")
    return None if name is None else metrics[name]


def train(cfg: DictConfig) -> dict[str, float]:
    """Train as `cfg` says; returns the last logged metrics. Raises ConfigError on bad input, before training.

    Where the run goes and what it continues (ckpt_path, ckpt_path=last, a requeued job, init_from, the resume
    rules) is ddpmlab.resume.start's: cfg is updated to say so.
    """
    check_optimized_metric(cfg)
    with open_dict(cfg):  # trainer.precision=auto: what this machine runs best; stored so in every checkpoint
        cfg.trainer.precision = trainer_precision(cfg.trainer)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build(cfg.data, num_classes=cfg.model.get("num_classes"))  # labels only for a conditional model
    module, begin = start(cfg, build_module)  # where the run goes and what it continues: ddpmlab.resume
    check_optimized_metric(cfg, begin.step)
    output_dir, changed, notes = Path(cfg.paths.output_dir), begin.changed, begin.notes
    if begin.fit_from is not None:  # a resume trains on the classes its label embedding indexes
        datamodule.class_names = begin.class_names
    datamodule.setup("fit")  # missing or unreadable data fails here, before any file is written
    if cfg.data.dataset not in DATASET_SIZES:  # an image folder's or the shards' size, known once read
        fraction = cfg.data.get("test_fraction")  # image folders only
        held_out = f" (after data.test_fraction={fraction})" if fraction else ""
        check_batch_fits(cfg, len(datamodule.train_images), f"{cfg.data.dataset} {datamodule.source}{held_out}")
    if datamodule.class_names is not None:  # the checkpoint's config says which label is which class
        module.config["data"]["class_names"] = datamodule.class_names

    callbacks = [build(c) for c in cfg.callbacks.values() if c is not None] + [RunRecord(cfg, notes)]
    if cfg.val.num_images:
        datamodule.setup("test")
        if datamodule.test_split == NO_HELD_OUT:
            notes.append(f"val/bpd is measured on training images: {datamodule.source} has no held-out split, so it "
                         "cannot show overfitting; give it a test/ folder, or set data.test_fraction=0.1")
        callbacks.append(ValidationBound(datamodule.test_images, labels=datamodule.test_labels,
                                         split=datamodule.test_split, **cfg.val))
    if any(key.startswith("optim.") for key in changed):
        callbacks.append(ApplyOptimChanges())
    loggers = [build(c) for c in (cfg.logger or {}).values() if c is not None]
    trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers, default_root_dir=str(output_dir),
                    plugins=[AtomicCheckpointIO()])

    output_dir.mkdir(parents=True, exist_ok=True)
    for logger in loggers:
        logger.log_hyperparams(module.config)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=begin.fit_from)
    finally:
        finish_wandb()
    return {name: float(value) for name, value in trainer.callback_metrics.items()}
