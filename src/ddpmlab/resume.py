"""What a resumed run may change: the checkpoint's stored config against this run's, key by key.

A checkpoint's weights, EMA, Adam moments and step count belong to the settings they were trained with. A
resume that quietly trains something else (another schedule, prediction or data set) writes the new settings
into its next checkpoint, and evaluate.py then rebuilds a diffusion the weights were mostly not trained on. So
every key that defines what is trained must match; `resume.allow_changes` lets named keys change (fine-tuning),
and `init_from=PATH` starts a new run from a checkpoint's weights instead.
"""

import logging
import re

import lightning as L
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ddpmlab.checkpoints import check_matches, load_checkpoint
from ddpmlab.errors import ConfigError

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
    return let_through, notes


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
