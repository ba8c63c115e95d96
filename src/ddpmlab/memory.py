"""Memory: a lower bound of what one training step needs, checked before anything is written, and the one line
an out-of-memory failure ends with.

The bound is what a step cannot do without, so a config that fits is never refused:
  16 bytes per parameter: the fp32 weights, their EMA copy and Adam's two moments (the gradients are freed
  between steps and the activations during backward, so they are not added), plus
  per image of data.batch_size, the tensors autograd keeps from the U-Net's forward pass for its backward,
  counted by running the network once on the meta device (shapes only: no memory, no compute).
Half precision halves both terms and torch.compile (which recomputes cheap tensors instead of keeping them)
halves the second. On this machine's CPU the measured peak of a step was 1.12x (iDDPM CIFAR-10) to 1.57x (smoke)
of the bound. It is compared with what the step's device has free: CUDA's free memory, or on the host
MemAvailable capped by the cgroup's limit and `ulimit -v`. What the bound leaves out (sample grids, evaluation,
other processes) can still run out: out_of_memory_line turns the allocator's error into one line.
"""

import os
import re
import resource
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.overrides import TorchFunctionMode

from ddpmlab.errors import ConfigError
from ddpmlab.performance import trainer_precision

GiB = 2**30


class _SavedForBackward(TorchFunctionMode):
    """Bytes of the tensors autograd saves for backward, each storage once, parameters excluded.

    Attention is counted as a fused kernel (flash or memory-efficient, which CPU and CUDA pick) keeps it: q, k, v
    and the output, O(HW) per head. The meta device's math fallback would keep the HW x HW weights no real run
    stores."""

    def __init__(self, params):
        super().__init__()
        self.params, self.saved, self.attention = {id(p) for p in params}, {}, 0
        self.in_attention = False

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if not self.in_attention and id(base) not in self.params:
            self.saved[id(base)] = base  # held, so that no id is reused
        return t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.in_attention = True
        try:
            out = func(*args, **kwargs)
        finally:
            self.in_attention = False
        self.attention += sum(t.numel() * t.element_size() for t in (*args[:3], out))
        return out

    def bytes(self) -> int:
        return self.attention + sum(t.numel() * t.element_size() for t in self.saved.values())


def step_bytes(cfg: DictConfig) -> tuple[int, int, int]:
    """(parameters, bytes per parameter kept across steps, bytes autograd keeps per image) of cfg's U-Net."""
    from ddpmlab.training import build  # the network is built as training builds it, on the meta device

    diffusion = build(cfg.diffusion)
    with torch.device("meta"):
        model = build(cfg.model, out_channels=diffusion.output_channels(cfg.data.channels))
        x_t = torch.empty(1, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        t = torch.zeros(1, dtype=torch.long)
    saved = _SavedForBackward(model.parameters())
    with saved, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        model(x_t, t)
    half = "16" in str(trainer_precision(cfg.trainer))
    compiled = bool((cfg.get("performance") or {}).get("compile", False))
    per_param = 8 if half else 16
    per_image = saved.bytes() // (2 if half else 1) // (2 if compiled else 1)
    return sum(p.numel() for p in model.parameters()), per_param, per_image


def host_available() -> int | None:
    """Bytes this process may still take on the host: MemAvailable, capped by its cgroup's memory.max (a container,
    a SLURM job) and by RLIMIT_AS (`ulimit -v`); None where /proc/meminfo is missing (not Linux)."""
    try:
        found = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        return None
    if found is None:
        return None
    free = int(found[1]) * 1024
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):  # cgroup v2
            folder = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
            try:
                limit, used = (folder / "memory.max").read_text().strip(), (folder / "memory.current").read_text()
            except OSError:
                break
            if limit != "max":
                free = min(free, int(limit) - int(used))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        size = re.search(r"^VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        free = min(free, soft - int(size[1]) * 1024)
    return free


def _devices(trainer) -> tuple[str | None, list[int]]:
    """('cuda' | 'cpu' | None for an accelerator not checked, the device indices (cuda) or [one per process])."""
    accelerator, devices = str(trainer.get("accelerator", "auto")), trainer.get("devices", 1)
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    count = len(devices) if not isinstance(devices, (int, str)) else int(devices) if str(devices).isdigit() else 1
    indices = list(devices) if not isinstance(devices, (int, str)) else list(range(max(count, 1)))
    # a fork-based strategy refuses a CUDA context made before the fork, and mem_get_info makes one
    forks = any(word in str(trainer.get("strategy", "")) for word in ("fork", "notebook"))
    if accelerator in ("gpu", "cuda") and not forks:
        return "cuda", indices
    return ("cpu", indices) if accelerator == "cpu" else (None, [])


def check_fits(cfg: DictConfig) -> None:
    """Refuse, before anything is written, a config whose training step cannot fit in the memory of its device."""
    kind, indices = _devices(cfg.trainer)
    if kind is None or os.environ.get("LOCAL_RANK", "0") != "0":  # DDP's ranks > 0: the launching process checked
        return
    params, per_param, per_image = step_bytes(cfg)
    batch = cfg.data.batch_size
    if kind == "cuda":  # a context on every GPU would hold memory there: the first, which rank 0 uses anyway
        free = torch.cuda.mem_get_info(indices[0])[0]
        where, processes = "free on the GPU", 1
    else:
        free = host_available()
        where, processes = "available on the host", len(indices)  # CPU DDP: every process on this host
        if free is None:
            return
    fixed = processes * params * per_param
    need = fixed + processes * batch * per_image
    if need <= free:
        return
    fits = (free - fixed) // (processes * per_image)
    fix = (f"set data.batch_size={fits} or less (trainer.accumulate_grad_batches keeps the batch the step averages)"
           if fits >= 1 else "choose a smaller model (model.ch, model.ch_mult, model.num_res_blocks)")
    raise ConfigError(
        f"data.batch_size={batch} needs at least {need / GiB:.1f} GiB for one training step ({params / 1e6:.1f}M "
        f"parameters: weights, EMA and Adam {fixed / GiB:.2f} GiB; activations {per_image / 2**20:.1f} MiB per "
        f"image) but {free / GiB:.1f} GiB is {where}: {fix}"
    )


def out_of_memory_line(err: BaseException) -> str | None:
    """The one line for an allocator's failure, CUDA's or the host's; None for any other error."""
    host = isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and any(
        words in str(err) for words in ("DefaultCPUAllocator: can't allocate memory", "Cannot allocate memory")))
    if not (host or isinstance(err, torch.OutOfMemoryError)):
        return None
    # torch's host allocator: "... you tried to allocate 19267584 bytes"; CUDA's: "Tried to allocate 2.00 GiB"
    size = re.search(r"allocate (\d+) bytes|allocate ([\d.]+ [KMGT]iB)", str(err))
    asked = f", {int(size[1]) / 2**20:.1f} MiB asked" if size and size[1] else f", {size[2]} asked" if size else ""
    return (f"out of {'host' if host else 'GPU'} memory ({type(err).__name__}{asked}): lower data.batch_size, "
            "callbacks.sample_grid.num_samples (evaluate.py: batch_size) or the model's size (model.ch)")
