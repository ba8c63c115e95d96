"""What the benchmark measures with: device-synchronised timers, peak memory, FLOP counts and the device's peak."""

import os
import re
import threading
import time
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, for the model FLOP utilisation.
BF16_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "RTX 4090": 165e12}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    """The process's resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory while the block runs, above the level at its start: torch's peak allocation on a GPU; on a
    CPU the resident set, polled every millisecond (meant for a fresh process, whose allocator holds no
    memory freed by earlier work)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_bytes = device, 0
        self._done = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._max = rss_bytes()
            self._poller = threading.Thread(target=self._poll, daemon=True)
            self._poller.start()
        return self

    def _poll(self) -> None:
        while not self._done.wait(0.001):
            self._max = max(self._max, rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._done.set()
            self._poller.join()
            self.peak_bytes = max(self._max, rss_bytes()) - self._base


@contextmanager
def timed(device: torch.device, record: list):
    """Append the wall time of the block, the device's work included, to `record`."""
    synchronize(device)
    start = time.perf_counter()
    yield
    synchronize(device)
    record.append(time.perf_counter() - start)


def count_flops(fn) -> int:
    """FLOPs of `fn()` as torch.utils.flop_counter counts them (matmuls and convolutions, forward and backward)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def bf16_peak(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, if it is one we know (GPUs only)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)  # e.g. "NVIDIA H200"; "A10" must not match an A10G
    return next((peak for key, peak in BF16_PEAK_FLOPS.items() if re.search(rf"\b{key}\b", name)), None)


def describe(device: torch.device) -> str:
    """The device in words: the GPU's name, or the CPU model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} cores)"
