"""The peer: Hugging Face diffusers' UNet2DModel and DDPMScheduler, configured to the same network and diffusion.

Its training step is that of diffusers' own example (examples/unconditional_image_generation/
train_unconditional.py) without accelerate: DDPMScheduler.add_noise, the UNet2DModel, the MSE loss, backward,
clipping at 1, Adam, the learning-rate warm-up and EMAModel.step, all at diffusers' and torch's defaults
(NCHW memory format, EMAModel without foreach). Sampling is DDPMPipeline. diffusers is a benchmark-only extra
(pip install -e .[bench]).
"""

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ddpmlab.errors import ConfigError

PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def import_diffusers():
    """diffusers, or one line saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise ConfigError("the benchmark's peer needs diffusers: pip install -e '.[bench]'") from None
    return diffusers


def unet_config(model_cfg: DictConfig, image_size: int, in_channels: int, out_channels: int) -> dict:
    """UNet2DModel's arguments for the ddpmlab U-Net `model_cfg` (models/unet.py): the same layers and parameters.

    One DownBlock2D/UpBlock2D per resolution level ("Attn" where ddpmlab has attention), ch * ch_mult channels,
    num_res_blocks resnets per down block (one more per up block), the sinusoidal embedding [sin, cos] with
    frequencies 10000^(-i / (half - 1)) (flip_sin_to_cos=False, freq_shift=1), GroupNorm(norm_groups).
    """
    ch, mult = model_cfg.ch, list(model_cfg.ch_mult)
    heads = model_cfg.get("num_heads", 1)
    down, res, attn_channels = [], image_size, [ch * mult[-1]]  # the middle block always has attention
    for level, m in enumerate(mult):
        attn = res in model_cfg.attn_resolutions
        down.append("AttnDownBlock2D" if attn else "DownBlock2D")
        attn_channels += [ch * m] if attn else []
        res //= 2 if level != len(mult) - 1 else 1
    if model_cfg.get("scale_shift_norm", False):
        # with resnet_time_scale_shift="scale_shift" diffusers drops the middle attention's GroupNorm
        raise ConfigError("diffusers' UNet2DModel has no equal of model.scale_shift_norm=true (its middle attention "
                          "loses its GroupNorm): benchmark a model with scale_shift_norm=false")
    head_dims = {c // heads for c in attn_channels}
    if heads > 1 and len(head_dims) > 1:
        raise ConfigError(f"diffusers' UNet2DModel has one attention_head_dim; model.num_heads={heads} gives "
                          f"{sorted(head_dims)} across levels: benchmark a model with one head or equal widths")
    return dict(
        sample_size=image_size, in_channels=in_channels, out_channels=out_channels,
        block_out_channels=tuple(ch * m for m in mult), layers_per_block=model_cfg.num_res_blocks,
        down_block_types=tuple(down), up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
        dropout=model_cfg.dropout, norm_num_groups=model_cfg.norm_groups, norm_eps=1e-5,
        attention_head_dim=None if heads == 1 else head_dims.pop(),
        time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1,
    )


class Peer:
    """diffusers' network, scheduler, optimizer and EMA for one run config; `train_step` and `sample` run them."""

    def __init__(self, cfg: DictConfig, diffusion, device: torch.device, precision: str, training: bool = True,
                 channels_last: bool = False):
        diffusers = import_diffusers()
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        differs = {"diffusion.variance": diffusion.variance not in ("fixed_large", "fixed_small"),
                   "diffusion.loss": diffusion.loss != "simple", "diffusion.loss_weighting": diffusion.loss_weighting != "none",
                   "timestep_sampler": "Uniform" not in cfg.timestep_sampler._target_}
        if any(differs.values()):
            raise ConfigError(f"the peer trains DDPM's L_simple with fixed variances and uniform t; "
                              f"{', '.join(k for k, v in differs.items() if v)} differ: benchmark a DDPM config")
        channels, size = cfg.data.channels, cfg.data.image_size
        self.device, self.precision = device, precision
        self.unet = diffusers.UNet2DModel(
            **unet_config(cfg.model, size, channels, diffusion.output_channels(channels))).to(device)
        if channels_last:  # --peer-channels-last: diffusers in NHWC too, for comparison
            self.unet.to(memory_format=torch.channels_last)
        self.scheduler = diffusers.DDPMScheduler(
            num_train_timesteps=diffusion.num_timesteps, trained_betas=diffusion.betas64.numpy(),
            variance_type=diffusion.variance, prediction_type=PREDICTION_TYPES[diffusion.prediction], clip_sample=True)
        self.pipeline = diffusers.DDPMPipeline(unet=self.unet, scheduler=self.scheduler)
        self.pipeline.set_progress_bar_config(disable=True)
        if not training:  # sampling only: no optimizer, no EMA copy
            return
        self.optimizer = torch.optim.Adam(self.unet.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.adam_betas),
                                          weight_decay=cfg.optim.weight_decay)
        self.lr_schedule = get_scheduler("constant_with_warmup", self.optimizer,
                                         num_warmup_steps=cfg.optim.warmup_steps)
        self.ema = EMAModel(self.unet.parameters(), decay=cfg.optim.ema_decay)
        self.clip = cfg.trainer.gradient_clip_val

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def network(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The UNet2DModel as a function `model(x_t, t)`, as ddpmlab's bound calls its own network."""
        return self.unet(x_t, t).sample

    def train_step(self, x_0: torch.Tensor) -> None:
        """One optimizer step on the batch x_0 in [-1, 1], EMA update included."""
        self.unet.train()
        noise = torch.randn_like(x_0)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x_0.shape[0],), device=x_0.device)
        x_t = self.scheduler.add_noise(x_0, noise, t)
        with self.autocast():
            prediction = self.unet(x_t, t).sample
        target = {"epsilon": noise, "sample": x_0,
                  "v_prediction": self.scheduler.get_velocity(x_0, noise, t)}[self.scheduler.config.prediction_type]
        loss = F.mse_loss(prediction.float(), target)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.clip)
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.unet.parameters())

    def sample(self, batch_size: int, steps: int, seed: int = 0) -> torch.Tensor:
        """DDPMPipeline: ancestral sampling over `steps` of the T steps, images in [0, 1] as a tensor."""
        self.unet.eval()
        with self.autocast():
            return self.pipeline(batch_size=batch_size, num_inference_steps=steps, output_type="pt",
                                 generator=torch.Generator(self.device).manual_seed(seed)).images
