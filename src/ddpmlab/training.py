"""Build everything a run needs from the composed config, and train."""

import logging
import os
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ddpmlab.callbacks import ValidationBound
from ddpmlab.checkpoints import AtomicCheckpointIO, check_matches, load_checkpoint
from ddpmlab.data import NO_HELD_OUT
from ddpmlab.errors import ConfigError
from ddpmlab.loggers import finish_wandb
from ddpmlab.module import EVERY_STEP, METRICS, DiffusionModule
from ddpmlab.performance import optimize_network, performance_settings
from ddpmlab.resume import ApplyOptimChanges, check_resume, init_weights, restarted_state, with_fresh_state
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
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    channels_last, compile = performance_settings(cfg.get("performance"), on_gpu)
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


def resolve_last(cfg: DictConfig, task_name: str | None = None, key: str = "ckpt_path") -> Path:
    """`ckpt_path=last` (evaluate.py: `ckpt=last`, task train): the newest checkpoints/last.ckpt among a task's run
    folders, single runs' (runs/<task_name>/<run>) and multiruns' (runs/<task_name>/<multirun>/<N>) alike; this
    run's task unless `task_name` is given."""
    task_name = task_name or cfg.task_name
    task_dir = Path(cfg.paths.log_dir) / task_name
    found = sorted([*task_dir.glob("*/checkpoints/last.ckpt"), *task_dir.glob("*/*/checkpoints/last.ckpt")],
                   key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError(f"{key}=last: no run of task {task_name!r} has a checkpoint under {task_dir}: "
                          f"train first, or pass {key}=PATH/last.ckpt")
    return found[-1]


def requeued_job() -> bool:
    """Whether this process is a job that SLURM restarted (SLURM_RESTART_COUNT: after preemption or `scontrol
    requeue`) or that submitit runs (its requeue after a time-limit signal keeps the job's run folder, as SLURM's
    does). Such a job whose run folder holds last.ckpt continues from it, as with ckpt_path=last."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0 or "SUBMITIT_EXECUTOR" in os.environ


def _check_output_dir(output_dir: Path) -> None:
    """Refuse to write into a run folder that already holds an earlier run's checkpoints."""
    ckpts = output_dir / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
        raise ConfigError(
            f"{output_dir} already holds checkpoints of an earlier run: choose another hydra.run.dir, "
            f"or resume with ckpt_path={ckpts / 'last.ckpt'}"
        )


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

    With ckpt_path=last the newest run of this task continues in its own folder (cfg is updated to say so).
    A resume keeps what defines the training (ddpmlab.resume) unless resume.allow_changes names the key;
    init_from=PATH starts a new run from a checkpoint's weights.
    """
    check_optimized_metric(cfg)
    if cfg.ckpt_path is not None and cfg.init_from is not None:
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} and init_from={cfg.init_from} are both set: ckpt_path "
                          "continues a run, init_from starts a new one from a checkpoint's weights; drop one")
    if cfg.ckpt_path == "last":
        last = resolve_last(cfg)
        with open_dict(cfg):
            cfg.ckpt_path, cfg.paths.output_dir = str(last), str(last.parent.parent)
    output_dir = Path(cfg.paths.output_dir)
    own_last = output_dir / "checkpoints" / "last.ckpt"
    if own_last.is_file() and requeued_job():  # whatever it started from, the job goes on from its own last step
        log.warning(f"requeued job: continuing from {own_last}")
        with open_dict(cfg):
            cfg.ckpt_path, cfg.init_from = str(own_last), None
    if cfg.ckpt_path is None or Path(cfg.ckpt_path).resolve().parent != (output_dir / "checkpoints").resolve():
        _check_output_dir(output_dir)  # a run continued in place may of course hold its own checkpoints
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = build(cfg.data, num_classes=cfg.model.get("num_classes"))  # labels only for a conditional model
    module = build_module(cfg)
    checkpoint = load_checkpoint(cfg.ckpt_path) if cfg.ckpt_path is not None else {}
    fit_from, changed, notes = cfg.ckpt_path, [], []
    if checkpoint and "optimizer_states" not in checkpoint:
        # Weights only (python -m ddpmlab.hub import): nothing of a training run to continue, so it starts one at
        # step 0 from the weights, as init_from does, whatever recipe this run has
        init_weights(module, cfg.ckpt_path, checkpoint)
        fit_from = None
        notes.append(f"{cfg.ckpt_path} holds weights only: training starts at step 0 from them, with a fresh optimizer")
    elif checkpoint:
        changed, notes = check_resume(checkpoint.get("config"), module.config, cfg, cfg.ckpt_path)
        module.restarted = restarted_state(changed)  # replaced again when Lightning loads the file (on_load_checkpoint)
        notes += [f"{part} changed: its state starts afresh (e.g. the importance sampler's loss history)"
                  for part in module.restarted]
        check_matches(module, {"state_dict": with_fresh_state(checkpoint["state_dict"], module, module.restarted)},
                      cfg.ckpt_path)
        check_optimized_metric(cfg, int(checkpoint.get("global_step", 0)))
        # a resume trains on the classes its label embedding indexes: the data's must be the checkpoint's
        datamodule.class_names = ((checkpoint.get("config") or {}).get("data") or {}).get("class_names")
    else:
        check_resume(None, module.config, cfg, None)  # resume.allow_changes names real keys even when unused
    if cfg.init_from is not None:
        init_weights(module, cfg.init_from)
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
        trainer.fit(module, datamodule=datamodule, ckpt_path=fit_from)
    finally:
        finish_wandb()
    return {name: float(value) for name, value in trainer.callback_metrics.items()}
