"""Checkpoint files: written atomically and loaded without running pickled code (what one may continue as:
ddpmlab.resume)."""

import os
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from ddpmlab.errors import ConfigError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made crash-safe: each checkpoint goes to a temporary file in the same
    folder, is flushed to disk, then renamed over the old one (an atomic replace on POSIX). A kill at any
    moment leaves the previous complete file or the new complete file, never a torn one. A failed write, known
    by the write itself failing whatever it raises (a full disk gives OSError from Python's file, or RuntimeError
    "unexpected pos" from torch's zip writer), removes its temporary file, keeps the previous checkpoint and says so
    in one line.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-write
                if stale != tmp:
                    stale.unlink(missing_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)  # the rename itself reaches the disk
            finally:
                os.close(directory)
        except Exception as err:  # noqa: BLE001 - a full disk raises OSError or, from torch's zip writer, RuntimeError
            tmp.unlink(missing_ok=True)
            reason = getattr(err, "strerror", None) or (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(
                f"cannot write checkpoint {path} ({reason}): the previous checkpoint is kept; "
                "free disk space or set paths.output_dir to a writable folder with room"
            ) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def load_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint as a dict, through `torch.load(weights_only=True)`: tensors and plain data only."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p.relative_to(path) for p in path.rglob("*.ckpt"))
        inside = (f"the .ckpt files in it: {', '.join(map(str, found[:5]))}{' ...' if len(found) > 5 else ''}"
                  if found else "it holds no .ckpt file")
        raise ConfigError(f"checkpoint {path} is a folder, not a checkpoint file ({inside}): pass the path of one, "
                          f"e.g. {path / (found[-1] if found else 'checkpoints/last.ckpt')}")
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist: pass the path of a .ckpt file (runs/.../checkpoints/last.ckpt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - arbitrary bytes can break the unpickler in any way (IndexError, ...)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise ConfigError(
            f"checkpoint {path} cannot be loaded safely ({reason[:200]}): it is corrupt, truncated or not a "
            "ddpmlab checkpoint; pick another file"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"checkpoint {path} holds no state_dict: it is not a Lightning checkpoint of this project")
    return checkpoint
