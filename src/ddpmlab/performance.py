"""Speed switches applied to the U-Net, the same for training and evaluation (config block `performance`).

What each one gave on the benchmark (python -m ddpmlab.bench) is in benchmarks/README.md.
"""

import torch
from torch import nn

from ddpmlab.errors import ConfigError


def wants_channels_last(setting, on_gpu: bool) -> bool:
    """`performance.channels_last`: true, false, or auto = on GPUs only.

    Measured on the 2-core CPU (benchmarks/README.md): NHWC made the Fashion-MNIST U-Net 12% slower and the
    CIFAR-10 one 4% faster, within noise; cuDNN's tensor-core convolutions prefer NHWC, so auto turns it on there.
    """
    if setting == "auto":
        return on_gpu
    if not isinstance(setting, bool):
        raise ConfigError(f"performance.channels_last={setting!r} must be true, false or auto")
    return setting


def optimize_network(model: nn.Module, channels_last: bool = False, compile: bool = False) -> nn.Module:
    """Put `model` in the NHWC memory format (cuDNN's fast convolution layout) and/or compile it.

    `compile` uses nn.Module.compile (torch.compile in place), so parameter names and checkpoints are unchanged;
    the first calls take minutes while it compiles. Returns the same module.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()
    return model
