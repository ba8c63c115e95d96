"""diffusers folders on disk and on the Hugging Face Hub: read a pipeline or bare UNet2DModel folder, write one.

A DDPMPipeline folder is model_index.json, unet/ (config.json and diffusion_pytorch_model.safetensors or .bin)
and scheduler/scheduler_config.json; a bare UNet2DModel folder is the unet/ part alone.
"""

import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ddpmlab.errors import ConfigError

# huggingface_hub reads these when imported: a machine without network fails in seconds, never hangs
os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")

WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass
class Source:
    where: str                     # as the user named it
    unet_config: dict | None       # None: a weights file in the DDPM port's names
    scheduler_config: dict | None  # None: a bare UNet2DModel folder
    weights: dict                  # names -> tensors


def read_source(src: str) -> Source:
    """A local folder, or hf://owner/name fetched into huggingface_hub's cache, or a weights file of the DDPM port."""
    folder = fetch(src.removeprefix("hf://")) if src.startswith("hf://") else Path(src)
    if folder.is_file():
        return Source(src, None, None, _read_weights(folder))
    if not folder.is_dir():
        raise ConfigError(f"{src} does not exist: pass a diffusers folder (DDPMPipeline or UNet2DModel), hf://owner/name "
                          "or a DDPM weights file")
    unet = folder / "unet" if (folder / "unet").is_dir() else folder
    scheduler = folder / "scheduler" / "scheduler_config.json"
    if unet != folder and not scheduler.is_file():
        raise ConfigError(f"{src} has unet/ but no scheduler/scheduler_config.json: copy the whole pipeline folder")
    return Source(src, _json(unet / "config.json", src), _json(scheduler, src) if unet != folder else None,
                  _weights(unet, src))


def _json(path: Path, src: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path} is missing, so {src} is no diffusers folder: pass a DDPMPipeline folder (unet/ and "
                          "scheduler/) or a UNet2DModel folder (config.json and its weights)")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err}): copy the folder again") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} holds no JSON object: copy the folder again")
    return config


def _weights(unet: Path, src: str) -> dict:
    found = [unet / name for name in WEIGHTS if (unet / name).is_file()]
    if not found:
        raise ConfigError(f"{src} has no {' or '.join(WEIGHTS)} beside its config.json: copy the weights too")
    return _read_weights(found[0])


def _read_weights(path: Path) -> dict:
    read = safetensors_torch().load_file if path.suffix == ".safetensors" else functools.partial(
        torch.load, map_location="cpu", weights_only=True)
    try:
        weights = read(path)
    except Exception as err:  # noqa: BLE001 - a corrupt file can fail in any of the readers' ways
        raise ConfigError(f"{path} cannot be read ({first_line(err)}): it is corrupt or truncated; copy it again") from None
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise ConfigError(f"{path} holds no state dict (names -> tensors): it is not a UNet2DModel's weights file")
    return weights


def safetensors_torch():
    """safetensors' torch API (installed with diffusers by `make`, the [bench] extra), or one line saying so."""
    try:
        import safetensors.torch
    except ImportError:
        raise ConfigError("python -m ddpmlab.hub needs safetensors and huggingface_hub: pip install -e '.[bench]' "
                          "(diffusers brings both)") from None
    return safetensors.torch


def first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:160]


def fetch(repo_id: str) -> Path:
    """The repository's configs and weights (safetensors, else bin) in huggingface_hub's cache."""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
        if not any((folder / sub / WEIGHTS[0]).is_file() for sub in ("unet", ".")):
            folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.bin"]))
        return folder
    except Exception as err:  # noqa: BLE001 - offline, no such repository, gated, a timeout: all end the same way
        raise ConfigError(
            f"cannot fetch hf://{repo_id} ({type(err).__name__}: {first_line(err)}): on a machine without the Hub, copy the "
            f"folder from one that has it (hf download {repo_id} --local-dir {repo_id.split('/')[-1]}) and pass "
            "its path instead") from None


def write_pipeline(out: Path, unet_config: dict, weights: dict, scheduler_config: dict) -> None:
    """A DDPMPipeline folder at `out`, made beside it and renamed into place: a failure leaves no half folder."""
    save_file = safetensors_torch().save_file
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        (tmp / "unet").mkdir(parents=True)
        (tmp / "scheduler").mkdir()
        save_file(weights, tmp / "unet" / WEIGHTS[0], metadata={"format": "pt"})
        (tmp / "unet" / "config.json").write_text(json.dumps(unet_config, indent=2) + "\n")
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2) + "\n")
        index = {"_class_name": "DDPMPipeline", "_diffusers_version": unet_config["_diffusers_version"],
                 "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, out)
    except OSError as err:
        raise ConfigError(f"cannot write {out} ({err.strerror or err}): choose a writable --out with room") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_hub(repo_id: str) -> None:
    """Create the Hub repository (or find it) before anything is written: offline, this is the one line."""
    try:
        from huggingface_hub import HfApi

        HfApi().create_repo(repo_id, exist_ok=True)
    except Exception as err:  # noqa: BLE001 - offline, not logged in, no rights: all end the same way
        raise ConfigError(f"cannot reach hf://{repo_id} ({type(err).__name__}: {first_line(err)}): export without "
                          "--push-to-hub here and upload the folder from a machine online (hf auth login first)") from None


def push(folder: Path, repo_id: str) -> None:
    from huggingface_hub import HfApi

    try:
        HfApi().upload_folder(folder_path=str(folder), repo_id=repo_id)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"{folder} is written but its upload to hf://{repo_id} failed ({first_line(err)}): upload it "
                          f"again with hf upload {repo_id} {folder}") from None
