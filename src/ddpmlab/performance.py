"""Speed switches applied to the U-Net, the same for training and evaluation (config block `performance`), and
the rule behind `trainer.precision=auto`.

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


def uses_gpu(trainer) -> bool:
    """Whether the `trainer` config block runs on a GPU: accelerator gpu/cuda, or auto with CUDA present."""
    accelerator = str(trainer.get("accelerator", "auto"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def cpu_bf16() -> str:
    """How this CPU runs bfloat16 convolutions and matrix products, as torch and oneDNN report it (not the CPU's
    name): "native" with bf16 dot-product instructions (AVX512_BF16) or AMX tiles, "emulated" where oneDNN
    converts to fp32 inside its kernels (AVX-512 without them: slower than fp32), "none" where oneDNN has no bf16."""
    native = [getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(native):
        return "native"
    return "emulated" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "none"


# Lightning's short names of its precisions (trainer.precision=32 is 32-true), as its Trainer reports them.
PRECISION_NAMES = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def resolved_precision(precision, on_gpu: bool) -> str:
    """`trainer.precision` as Lightning takes it, under Lightning's full name (PRECISION_NAMES): `auto` (the
    default) is bf16-mixed on a CPU with native bf16 (cpu_bf16), where it trains faster at the same quality
    (docs/benchmarks.md, "bf16 on a CPU that has it"), and 32-true elsewhere (GPUs included: their bf16 runs are
    not measured here); any other value is itself."""
    if str(precision) != "auto":
        return PRECISION_NAMES.get(str(precision), str(precision))
    return "bf16-mixed" if not on_gpu and cpu_bf16() == "native" else "32-true"


def trainer_precision(trainer) -> str:
    """The precision the config block `trainer` trains in on this machine (resolved_precision of its `precision`,
    32-true when unset): what Lightning's Trainer is built with, since Lightning has no `auto`."""
    return resolved_precision(trainer.get("precision", "32-true"), uses_gpu(trainer))
