"""Speed switches applied to the U-Net, the same for training and evaluation (config block `performance`).

What each one gave on the benchmark (python -m ddpmlab.bench) is in benchmarks/README.md.
"""

import torch
from torch import nn

from ddpmlab.errors import ConfigError


def performance_settings(perf, on_gpu: bool) -> tuple[bool, bool]:
    """(channels_last, compile) from the config block `performance`, checked.

    channels_last is true, false or auto = on GPUs only. On the 2-core CPU (benchmarks/README.md) NHWC made the
    Fashion-MNIST U-Net 12% slower and the CIFAR-10 one 4% faster; cuDNN's tensor-core convolutions prefer
    NHWC, so auto turns it on there.
    """
    perf = perf or {}
    channels_last, compile = perf.get("channels_last", False), perf.get("compile", False)
    if channels_last not in (True, False, "auto"):
        raise ConfigError(f"performance.channels_last={channels_last!r} must be true, false or auto")
    if compile not in (True, False):
        raise ConfigError(f"performance.compile={compile!r} must be true or false")
    return (on_gpu if channels_last == "auto" else channels_last), compile


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
