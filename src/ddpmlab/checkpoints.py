"""Checkpoint files: loaded without running pickled code, and checked against the model before use."""

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from ddpmlab.errors import ConfigError


def load_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint as a dict, through `torch.load(weights_only=True)`: tensors and plain data only."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist: pass the path of a .ckpt file (runs/.../checkpoints/last.ckpt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise ConfigError(
            f"checkpoint {path} cannot be loaded safely ({reason[:200]}): it is corrupt, truncated or not a "
            "ddpmlab checkpoint; pick another file"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"checkpoint {path} holds no state_dict: it is not a Lightning checkpoint of this project")
    return checkpoint


def check_matches(model: nn.Module, checkpoint: dict, path: str | Path) -> None:
    """Raise one clear line when the checkpoint's weights do not fit `model`'s parameter names and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    if missing or unexpected or wrong:
        detail = (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of another shape"
                  + (f" (e.g. {wrong[0]}: {found[wrong[0]]} vs {expected[wrong[0]]})" if wrong else "")
                  + (f" (e.g. missing {missing[0]})" if missing and not wrong else ""))
        raise ConfigError(
            f"checkpoint {path} does not match the model ({detail}): use the model config of the run that wrote it "
            "(its .hydra/config.yaml, or the 'config' stored in the checkpoint)"
        )
