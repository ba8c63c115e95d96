"""diffusers' DDPMPipeline folders (and the Hugging Face Hub) in, our checkpoints out, and back.

`import_checkpoint`: a UNet2DModel + DDPMScheduler folder (or a state dict in the names of the PyTorch port of
the authors' TensorFlow checkpoints: temb.dense.0, down.{i}.block.{j}, mid.attn_1, ...) -> an ordinary ddpmlab checkpoint whose stored config
is derived from the source (evaluate.py scores it; train.py init_from=... fine-tunes it), the weights in both the
raw and the EMA slots. `export_pipeline`: a ddpmlab checkpoint -> a folder DDPMPipeline.from_pretrained loads.
Conversion is exact or refused in one line naming the field (convert.py holds the field and weight-name tables).
The command line is `python -m ddpmlab.hub import|export` (__main__.py).
"""

import os
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from ddpmlab.errors import ConfigError
from ddpmlab.hub.convert import (CLASS_NAMES, DDPM, DIFFUSERS, diffusion_from_ddpm, diffusion_from_scheduler,
                                 model_from_ddpm, model_from_unet, refuse, scheduler_from_diffusion, tensor_table,
                                 unet_from_model, weights_to_diffusers, weights_to_ours)
from ddpmlab.hub.folders import check_hub, push, read_source, write_pipeline

ROOT = Path(__file__).resolve().parents[3]
# The data group an imported network's images default to, by (channels, size): the paper's CIFAR-10, our
# default Fashion-MNIST; any other shape reads an image folder.
DATA_BY_SHAPE = {(3, 32): "cifar10", (1, 28): "fashion_mnist"}


def import_checkpoint(src: str, out: Path, data: str | None = None, data_root: str | None = None,
                      image_size: int | None = None, variance: str | None = None,
                      num_classes: int | None = None) -> dict:
    """Convert the diffusers folder `src` (or hf://owner/name) into the checkpoint `out`; returns its config.
    `src` may also be a weights file in the original DDPM port's names, which needs `image_size` and `variance`;
    a UNet2DModel folder without scheduler/ needs `variance` (its schedule is Ho et al.'s); `num_classes`: a class
    embedding ddpmlab did not export has that many classes and then "no class" (convert.classes_from_unet)."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out {out} exists: choose a new file name (nothing is overwritten)")
    source = read_source(src)
    if source.unet_config is None:
        model, names = model_from_ddpm(source.weights, image_size), DDPM
        schedule, diffusion = diffusion_from_ddpm(variance)
    elif image_size or (variance and source.scheduler_config is not None):
        raise ConfigError(f"--image-size and --variance are for a DDPM weights file (--variance also for a bare "
                          f"UNet2DModel folder): {src}'s own configs say them")
    else:
        model, names = model_from_unet(source.unet_config, num_classes), DIFFUSERS
        # a bare UNet2DModel folder: DDPMScheduler's defaults are Ho et al.'s schedule, but its variance
        # (fixed_small) is not that of every release (google/ddpm-cifar10-32 is fixed_large), so it is asked for
        schedule, diffusion = (diffusion_from_scheduler(source.scheduler_config) if source.scheduler_config is not None
                               else diffusion_from_ddpm(variance, f"{src}, a UNet2DModel folder without scheduler/,"))
    wanted = model["in_channels"] * (2 if diffusion["variance"] == "learned_range" else 1)
    if model["out_channels"] != wanted:
        raise refuse("out_channels", model["out_channels"], f"variance {diffusion['variance']} with "
                     f"{model['in_channels']} image channels needs {wanted} outputs")
    class_names = (source.unet_config or {}).get(CLASS_NAMES)
    cfg = _train_config(model, schedule, diffusion, out, data, data_root, Path(src.removeprefix("hf://")).name,
                        class_names)
    # Lightning, and Hydra above, load only once the source is read: a refused one is answered in a second
    import lightning

    from ddpmlab.checkpoints import AtomicCheckpointIO
    from ddpmlab.training import build_network

    network, _ = build_network(cfg)
    weights = weights_to_ours(source.weights, tensor_table(model, names), network.state_dict())
    network.load_state_dict(weights)  # strict: every tensor of the network came from the source
    state = {f"{slot}.{name}": tensor for slot in ("model", "ema_model") for name, tensor in weights.items()}
    config = OmegaConf.to_container(cfg, resolve=True)
    AtomicCheckpointIO().save_checkpoint({"state_dict": state, "config": config, "global_step": 0, "epoch": 0,
                                          "pytorch-lightning_version": lightning.__version__,
                                          "hub_source": src}, out)
    return config


def _train_config(model: dict, schedule: dict, diffusion: dict, out: Path, data, data_root, name: str,
                  class_names: list[str] | None = None):
    """conf/config.yaml composed as train.py would, with the source's network, schedule and diffusion (and a
    conditional network's class names, when the source says them)."""
    shape = (model["in_channels"], model["image_size"])
    data = data or DATA_BY_SHAPE.get(shape, "image_folder")
    learned = diffusion["variance"] == "learned_range"
    overrides = [f"data={data}", "model=unet", "diffusion=" + ("iddpm" if learned else "ddpm")]
    from hydra import compose, initialize_config_dir

    os.environ.setdefault("DDPMLAB_ROOT", str(ROOT))
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except Exception as err:  # noqa: BLE001 - Hydra's errors for an unknown data option
        raise ConfigError(f"--data {data} does not compose ({str(err).splitlines()[0]}): name a conf/data option") from None
    with open_dict(cfg):
        cfg.task_name = "import"
        cfg.paths.output_dir = str(out.parent.resolve())
        cfg.data.image_size, cfg.data.channels = model["image_size"], model["in_channels"]
        if data_root or data == "image_folder":
            cfg.data.root = data_root or f"{cfg.paths.data_dir}/{name}"
        for key, value in model.items():
            if key not in ("image_size", "in_channels", "out_channels"):  # the data's, and the diffusion's
                cfg.model[key] = value
        cfg.schedule = schedule
        cfg.diffusion.prediction, cfg.diffusion.variance = diffusion["prediction"], diffusion["variance"]
        if class_names:
            cfg.data.class_names = list(class_names)
    return cfg


def export_pipeline(ckpt: str, out: Path, use_ema: bool = True, push_to: str | None = None) -> int:
    """Write the checkpoint's network (EMA weights unless use_ema=False) and schedule as a DDPMPipeline folder;
    returns its T. The pipeline samples as our ancestral sampler only with num_inference_steps=T (its default,
    1000, skips steps of a longer schedule and fails on a shorter one)."""
    from ddpmlab.evaluation import load_run

    out = Path(out)
    if any(out.iterdir()) if out.is_dir() else out.exists():
        raise ConfigError(f"--out {out} exists and is not an empty folder: choose a new one (nothing is overwritten)")
    network, diffusion, train_cfg = load_run(ckpt, use_ema)
    model = OmegaConf.to_container(train_cfg.model, resolve=True)
    if "betas" not in train_cfg.diffusion:  # diffusion=edm: a preconditioned denoiser in continuous sigma
        raise refuse("diffusion._target_", train_cfg.diffusion.get("_target_"), "an EDM network has no DDPMScheduler "
                     "(it is trained on a continuous sigma with EDM's preconditioning)")
    if model.get("_target_") != "ddpmlab.models.UNet":
        raise refuse("model._target_", model.get("_target_"), "only our U-Net has a diffusers equivalent")
    unet_config = unet_from_model(model, network.conv_out.out_channels, train_cfg.data.get("class_names"))
    scheduler_config = scheduler_from_diffusion(OmegaConf.to_container(train_cfg.diffusion.betas),
                                                OmegaConf.to_container(train_cfg.diffusion), diffusion.betas64)
    table = tensor_table(model)
    left = sorted(network.state_dict().keys() - {row[0] for row in table})
    if left:
        raise refuse("model", left[0], "this tensor of the network has no diffusers name")
    if push_to:
        check_hub(push_to)
    if out.is_dir():
        out.rmdir()  # empty (checked above): replaced by the finished folder in one rename
    write_pipeline(out, unet_config, weights_to_diffusers(network.state_dict(), table), scheduler_config)
    if push_to:
        push(out, push_to)
    return diffusion.num_timesteps
