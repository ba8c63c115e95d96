"""Networks that map (x_t, t) to the diffusion's prediction target."""

from ddpmlab.models.unet import UNet

__all__ = ["UNet"]
