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


def cpu_flags() -> tuple[str, set[str]]:
    """(vendor, flags) of this CPU from /proc/cpuinfo; ("", set()) where there is none."""
    vendor, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return vendor, flags


def cpu_clock_hz() -> tuple[float, str]:
    """The clock the peak assumes: the highest the kernel reports (cpufreq's maximum, else /proc/cpuinfo's MHz)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            return int(f.read()) * 1e3, "cpufreq's cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            mhz = max(float(line.split(":")[1]) for line in f if line.startswith("cpu MHz"))
        return mhz * 1e6, "/proc/cpuinfo's cpu MHz (a virtual machine reports its nominal clock; turbo is not counted)"
    except (OSError, ValueError):
        return 0.0, "no clock reported"


def cpu_peak(precision: str) -> tuple[float, str]:
    """This CPU's peak FLOP/s for matrix work in `precision` ("32" or "bf16") and the assumption behind it, in
    words: cores x FLOP per cycle per core x clock, the FLOP per cycle from the instruction sets the CPU reports.

    fp32: FMA lanes (16 with AVX-512, 8 with AVX2) x 2 FLOP x FMA units (2 on Intel server cores; AMD's Zen 4 runs
    AVX-512 on two 256-bit units, so 1 unit of 16 lanes). bf16: AMX tiles 1024 FLOP per cycle (TDPBF16PS:
    16 x 16 x 32 multiply-adds per 16 cycles); AVX512_BF16's VDPBF16PS twice fp32's (two products per lane);
    without either, oneDNN converts to fp32: fp32's peak."""
    vendor, flags = cpu_flags()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = min(cores, torch.get_num_threads())  # the peak of the cores the measurement uses
    clock, clock_from = cpu_clock_hz()
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    units = 1 if vendor == "AuthenticAMD" and lanes == 16 else 2
    fp32 = lanes * 2 * units
    how = f"fp32: {lanes} lanes x 2 FLOP (FMA) x {units} unit(s) = {fp32} FLOP/cycle"
    per_cycle = fp32
    if precision == "bf16":
        if "amx_bf16" in flags:
            per_cycle, how = 1024, "bf16: AMX tiles, 1024 FLOP/cycle (TDPBF16PS)"
        elif "avx512_bf16" in flags:
            per_cycle, how = 2 * fp32, f"bf16: AVX512_BF16 dot products, 2 x fp32's {fp32} FLOP/cycle"
        else:
            how = f"bf16 emulated in fp32 by oneDNN: {how}"
    assumption = (f"{cores} core(s) in use x {per_cycle} FLOP/cycle ({how}) x {clock / 1e9:.2f} GHz ({clock_from}); "
                  f"{vendor or 'unknown vendor'}")
    return cores * per_cycle * clock, assumption


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
