"""What a run may continue as, and from where: the resume rules in one room. `start(cfg, build_module)` is the
entry point training calls; ddpmlab.checkpoints only reads and writes the files.

A checkpoint's weights, EMA, Adam moments and step count belong to the settings they were trained with. A
resume that quietly trains something else (another schedule, prediction or data set) writes the new settings
into its next checkpoint, and evaluate.py then rebuilds a diffusion the weights were mostly not trained on. So
every key that defines what is trained must match; `resume.allow_changes` lets named keys change (fine-tuning),
and `init_from=PATH` starts a new run from a checkpoint's weights instead.
"""

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from ddpmlab.checkpoints import load_checkpoint
from ddpmlab.errors import ConfigError
from ddpmlab.performance import trainer_precision

log = logging.getLogger(__name__)

# Free to change, but the batches from the checkpoint on are no longer the uninterrupted run's (the global
# batch is data.batch_size x devices x num_nodes, its order a function of data.seed): the log says so.
INEXACT = ("data.batch_size", "data.seed", "trainer.devices", "trainer.num_nodes", "trainer.accumulate_grad_batches")
# What a run trains: the network, the forward process and its schedule, the loss and its timestep sampling,
# the data's identity and preprocessing, and the optimisation recipe (Adam, warm-up, EMA, clipping). A key is
# defining when it is one of these or lies below one, so a key added to these groups later is defining too.
DEFINING = ("model", "diffusion", "schedule", "timestep_sampler", "data", "optim",
            "trainer.gradient_clip_val", "trainer.gradient_clip_algorithm")
# ...except where the data is read from (it may have moved to another machine) and how fast, what a non-finite
# step does, and Adam's kernel (the same update): they change how the run goes, not what it learns.
FREE = INEXACT + ("data.root", "data.path", "data.download", "data.verify_checksums", "data.num_workers",
                  "optim.on_nonfinite", "optim.fused")


def _leaves(tree: dict, prefix: str = "") -> dict:
    """{dotted key: value} of a nested dict; a list is one value."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _under(key: str, entries) -> bool:
    return any(key == entry or key.startswith(f"{entry}.") for entry in entries)


def _defining(key: str) -> bool:
    return _under(key, DEFINING) and not _under(key, FREE)


def _aliases(cfg: DictConfig) -> list[str]:
    """Keys whose value is `${other.key}` of a defining key (diffusion.betas: ${schedule}, model.image_size:
    ${data.image_size}): a change is named, and allowed, at its source alone."""
    raw = _leaves(OmegaConf.to_container(cfg, resolve=False))
    found = [(key, re.fullmatch(r"\$\{([\w][\w.]*)\}", value)) for key, value in raw.items() if isinstance(value, str)]
    return [key for key, match in found if match and _defining(match.group(1))]


def check_resume(stored: dict | None, config: dict, cfg: DictConfig, path) -> tuple[list[str], list[str]]:
    """Refuse, in one line, a resume whose resolved `config` differs from the checkpoint's `stored` one in a
    defining key that `cfg.resume.allow_changes` does not name. Keys missing from either side (a checkpoint of
    an older version) are not compared. Returns (the changed keys let through, lines for the log)."""
    allowed = cfg.resume.allow_changes
    allowed = [allowed] if isinstance(allowed, str) else list(allowed or [])
    new = _leaves(config)
    for entry in allowed:
        if not any(_under(key, [entry]) for key in new):
            raise ConfigError(f"resume.allow_changes names {entry!r}, which is no key of the config: name keys as "
                              "the config spells them, e.g. resume.allow_changes=[optim.lr]")
    if not stored:
        return [], []
    old, aliases = _leaves(stored), _aliases(cfg)
    changed = [key for key in new if key in old and old[key] != new[key] and not _under(key, aliases)]
    refused = [key for key in changed if _defining(key) and not _under(key, allowed)]
    shown = {key: f"{key} {old[key]} -> {new[key]}" for key in changed}
    if refused:
        raise ConfigError(
            f"resuming {path} would change what it was trained as: {', '.join(shown[k] for k in refused)}: "
            f"drop these overrides to continue that run, fine-tune with resume.allow_changes=[{','.join(refused)}], "
            f"or start a new run from its weights with init_from={path}")
    let_through = [key for key in changed if _defining(key)]
    notes = [f"resuming {path} with {shown[key]} (resume.allow_changes)" for key in let_through]
    inexact = [shown[key] for key in changed if _under(key, INEXACT)]
    if inexact:
        notes.append(f"resuming {path} with {', '.join(inexact)}: the batches from here on are not those of the "
                     "uninterrupted run, so exact resume no longer holds")
    precisions = _precisions(old, new)
    if precisions:
        notes.append(f"resuming {path} in {precisions[1]}: its steps so far were trained in {precisions[0]}, so the "
                     f"steps from here on are rounded differently; trainer.precision={precisions[0]} keeps it")
    return let_through, notes


def _precisions(old: dict, new: dict) -> tuple[str, str] | None:
    """(the precision the checkpoint's steps were trained in, the one this resume trains in), each as this machine
    resolves it (performance.trainer_precision: `auto` is bf16-mixed on a CPU with native bf16), where the two
    differ; None when they agree or the checkpoint does not record one. A run trained in 32-true before `auto`
    became the default resumes in bf16-mixed on such a CPU unless told otherwise: the log says so."""
    if "trainer.precision" not in old:
        return None
    pair = tuple(trainer_precision({"precision": leaves.get("trainer.precision", "32-true"),
                                    "accelerator": leaves.get("trainer.accelerator", "auto")}) for leaves in (old, new))
    return pair if pair[0] != pair[1] else None


# Module state that an allowed change of its config starts afresh instead of loading (the importance sampler's
# loss history belongs to the sampler that gathered it, and uniform sampling keeps none).
RESTARTED = ("timestep_sampler",)


def restarted_state(changed: list[str]) -> list[str]:
    """The RESTARTED parts whose config a resume changes (resume.allow_changes let it through)."""
    return [part for part in RESTARTED if any(_under(key, [part]) for key in changed)]


def with_fresh_state(state_dict: dict, module: nn.Module, parts: list[str]) -> dict:
    """`state_dict` (a checkpoint's) with each of `parts` replaced by the module's own, freshly built state."""
    kept = {k: v for k, v in state_dict.items() if not _under(k, parts)}
    fresh = {f"{part}.{k}": v for part in parts for k, v in getattr(module, part).state_dict().items()}
    return {**kept, **fresh}


@dataclass
class Start:
    """Where a run starts: the checkpoint Lightning restores (None: a new run, step 0), the step it starts at,
    the defining keys resume.allow_changes let through, lines for the run's log, and a resumed class-conditional
    run's class names (its label embedding indexes them: the data's must be the checkpoint's)."""

    fit_from: str | None = None
    step: int = 0
    changed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    class_names: list[str] | None = None


def start(cfg: DictConfig, build_module) -> tuple:
    """The one entry point of the resume rules: where this run goes and what it continues, before anything is
    written. Returns (the LightningModule `build_module(cfg)` makes, its Start).

    - ckpt_path and init_from exclude each other; ckpt_path=last continues the newest run of this task in its own
      folder (resolve_last); a requeued SLURM or submitit job continues from its own folder's last.ckpt whatever
      it started from; a new run never writes into a folder that holds an earlier run's checkpoints.
    - A weights-only checkpoint (python -m ddpmlab.hub import) starts a new run at step 0 from its weights.
    - A resume keeps what defines the training (check_resume) unless resume.allow_changes names the key; a
      changed timestep sampler starts its state afresh (RESTARTED); the checkpoint's tensors must fit the
      network (check_matches); it must have steps or time left to train (check_left_to_train).
    - init_from=PATH: a new run from a checkpoint's network and EMA weights (init_weights).
    cfg is updated to say where the run goes (ckpt_path, paths.output_dir).
    """
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
    module = build_module(cfg)
    checkpoint = load_checkpoint(cfg.ckpt_path) if cfg.ckpt_path is not None else {}
    begin = Start(fit_from=cfg.ckpt_path)
    if checkpoint and "optimizer_states" not in checkpoint:
        # Weights only (python -m ddpmlab.hub import): nothing of a training run to continue, so it starts one at
        # step 0 from the weights, as init_from does, whatever recipe this run has
        init_weights(module, cfg.ckpt_path, checkpoint)
        begin.fit_from = None
        begin.notes.append(f"{cfg.ckpt_path} holds weights only: training starts at step 0 from them, with a fresh "
                           "optimizer")
    elif checkpoint:
        begin.changed, begin.notes = check_resume(checkpoint.get("config"), module.config, cfg, cfg.ckpt_path)
        module.restarted = restarted_state(begin.changed)  # replaced again when Lightning loads the file
        begin.notes += [f"{part} changed: its state starts afresh (e.g. the importance sampler's loss history)"
                        for part in module.restarted]
        check_matches(module, {"state_dict": with_fresh_state(checkpoint["state_dict"], module, module.restarted)},
                      cfg.ckpt_path)
        begin.step = int(checkpoint.get("global_step", 0))
        check_left_to_train(cfg, checkpoint)
        begin.class_names = ((checkpoint.get("config") or {}).get("data") or {}).get("class_names")
    else:
        check_resume(None, module.config, cfg, None)  # resume.allow_changes names real keys even when unused
    if cfg.init_from is not None:
        init_weights(module, cfg.init_from)
    return module, begin


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


def check_left_to_train(cfg: DictConfig, checkpoint: dict) -> None:
    """A resume must have steps or time left to train: one whose trainer.max_steps or trainer.max_time the
    checkpoint has already reached would load, train nothing and end without the metric a sweep waits for."""
    step = int(checkpoint.get("global_step", 0))
    if cfg.trainer.max_steps != -1 and step >= cfg.trainer.max_steps:
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} is at step {step} and trainer.max_steps={cfg.trainer.max_steps}: "
                          f"nothing is left to train; raise trainer.max_steps above {step}")
    budget = cfg.trainer.get("max_time")
    spent = ((checkpoint.get("callbacks") or {}).get("Timer") or {}).get("time_elapsed", {}).get("train", 0.0)
    if budget is not None:
        days, hours, minutes, seconds = map(int, budget.split(":"))
        if spent >= ((days * 24 + hours) * 60 + minutes) * 60 + seconds:
            raise ConfigError(f"ckpt_path={cfg.ckpt_path} has trained {spent:.0f} s, all of trainer.max_time={budget}: "
                              "nothing is left to train; raise trainer.max_time (the resumed run continues its budget)")


def check_matches(model: nn.Module, checkpoint: dict, path: str | Path) -> None:
    """Raise one clear line when the checkpoint's weights do not fit `model`'s parameter names and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    if missing or unexpected or wrong:
        def listed(keys, show=lambda k: k):
            return ", ".join(show(k) for k in keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")

        parts = ([f"missing {listed(missing)}"] if missing else []) + \
                ([f"unexpected {listed(unexpected)}"] if unexpected else []) + \
                ([f"other shape {listed(wrong, lambda k: f'{k} {found[k]} vs {expected[k]}')}"] if wrong else [])
        raise ConfigError(
            f"checkpoint {path} does not match the model ({'; '.join(parts)}): use the model config of the run "
            "that wrote it (its .hydra/config.yaml, or the 'config' stored in the checkpoint)"
        )


class ApplyOptimChanges(L.Callback):
    """Resuming restores Adam's param groups (lr, betas, weight decay) and the warm-up's base rate from the
    checkpoint, which would quietly undo an optim.* change let through by resume.allow_changes. At the start of
    training they are set to this run's values, the learning rate at the warm-up's current position."""

    def on_train_start(self, trainer, pl_module) -> None:
        optimizer = trainer.optimizers[0]
        warmup = trainer.lr_scheduler_configs[0].scheduler  # DiffusionModule.configure_optimizers' LambdaLR
        warmup.base_lrs = [pl_module.lr for _ in optimizer.param_groups]
        for group, factor in zip(optimizer.param_groups, warmup.lr_lambdas):
            group.update(initial_lr=pl_module.lr, lr=pl_module.lr * factor(warmup.last_epoch),
                         betas=pl_module.adam_betas, weight_decay=pl_module.weight_decay)


# Settings of the network that leave every tensor's shape alone but change its outputs: a state dict loads into
# a network that differs in these, and computes something else.
SAME_SHAPES = ("num_heads", "norm_eps", "downsample_padding", "flip_sin_to_cos", "freq_shift")


def init_weights(module: nn.Module, path, checkpoint: dict | None = None) -> None:
    """`init_from=PATH` (or `ckpt_path` of a weights-only checkpoint, as `python -m ddpmlab.hub import` writes):
    the network and its EMA from a checkpoint; optimizer, step count and RNG start fresh. The shapes must match,
    and so must the network settings that shapes do not show (SAME_SHAPES), where the checkpoint stores them."""
    checkpoint = checkpoint or load_checkpoint(path)
    stored = (checkpoint.get("config") or {}).get("model") or {}
    ours = (module.config or {}).get("model") or {}
    differ = [f"model.{key}={stored[key]}" for key in SAME_SHAPES if key in stored and key in ours
              and stored[key] != ours[key]]
    if differ:
        raise ConfigError(f"{path}'s network was built with {' '.join(differ)}, which this run's differs from: the "
                          f"weights would compute something else; add the override(s) {' '.join(differ)}")
    networks = nn.ModuleDict({"model": module.model, "ema_model": module.ema_model})
    weights = {k: v for k, v in checkpoint["state_dict"].items() if k.split(".", 1)[0] in networks}
    check_matches(networks, {"state_dict": weights}, path)
    networks.load_state_dict(weights)
