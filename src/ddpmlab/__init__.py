"""ddpmlab: Denoising Diffusion Probabilistic Models on PyTorch Lightning and Hydra."""

from ddpmlab.errors import ConfigError

__all__ = ["ConfigError"]
