"""Gaussian noise from one torch generator, or per example from a counter-based generator.

`ExampleNoise` makes sampling and the NLL independent of how examples are batched or split across DDP
ranks: the d-th draw of example i is a function of (seed, i, d) alone. It is counter-based (Salmon et al.
2011, "Parallel random numbers: as easy as 1, 2, 3"): every value is a hash of its coordinates (SplitMix64's
finaliser, Steele et al. 2014), so a whole batch is drawn with a few tensor ops on its device, with no loop
over examples and no host synchronisation. Normals come from two 24-bit uniforms by Box-Muller.
"""

import math

import torch
from torch import Tensor


def _int64(value: int) -> int:
    """A 64-bit constant as the signed int64 torch stores (tensor arithmetic wraps modulo 2^64)."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _int64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: SplitMix64's counter increment
_MIX1, _MIX2 = _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _shift_right(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic: it copies the sign bit)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: Tensor) -> Tensor:
    """SplitMix64's finaliser: a bijection of 64-bit integers whose every output bit depends on every input bit."""
    z = z ^ _shift_right(z, 30)  # the first step copies: the input is left alone; the rest work in place
    z *= _MIX1
    z ^= _shift_right(z, 27)
    z *= _MIX2
    z ^= _shift_right(z, 31)
    return z


class ExampleNoise:
    """Per-example random streams for the examples `indices` of a run seeded with `seed`.

    The d-th call of `bits(n)` (d = 1, 2, ...) returns (B, n) random 64-bit integers, row i a function of
    (seed, indices[i], d, element) only. `indices` are the examples' positions in the whole evaluation.
    """

    def __init__(self, indices, seed: int, device=None):
        index = torch.as_tensor(list(indices) if not isinstance(indices, Tensor) else indices, dtype=torch.long,
                                device=device)
        seed_key = _mix(torch.tensor(seed, dtype=torch.long, device=index.device) + _GOLDEN)
        self.keys = _mix(seed_key + index * _GOLDEN)  # (B,)
        self.device = index.device
        self.draws = 0

    def __len__(self) -> int:
        return len(self.keys)

    def bits(self, n: int) -> Tensor:
        """(B, n) random int64 for this draw; the next call gets the next draw."""
        self.draws += 1
        stream = _mix(self.keys + _int64(self.draws * _MIX1 % (1 << 64)))  # (B,) a fresh stream per (example, draw)
        element = torch.arange(n, device=self.device, dtype=torch.long)
        return _mix(stream[:, None] + element[None] * _GOLDEN)

    def randn(self, shape: tuple[int, ...]) -> Tensor:
        """Standard normals of `shape` (shape[0] = number of examples), float32, by Box-Muller: two 24-bit
        uniforms from each 64-bit value give a radius and an angle, and so two independent normals (r cos, r sin);
        the uniforms' 24 bits bound |x| by 5.8, as in torch's own float normals on a CPU."""
        n = math.prod(shape[1:])
        z = self.bits((n + 1) // 2)
        u1 = (_shift_right(z, 40) + 1).float().mul_(2.0**-24)  # k / 2^24, k in 1..2^24 (exact in float32): in (0, 1]
        angle = (z & 0xFFFFFF).float().mul_(2 * math.pi * 2.0**-24)
        radius = u1.log_().mul_(-2.0).sqrt_()
        return torch.cat([radius * angle.cos(), radius.mul_(angle.sin_())], dim=1)[:, :n].reshape(shape)

    def randint(self, high: int, count: int) -> Tensor:
        """(count, B) integers uniform in [0, high), from 53 random bits each."""
        u = _shift_right(self.bits(count), 11).double() * 2.0**-53
        return (u * high).long().clamp(max=high - 1).T


Generator = torch.Generator | ExampleNoise | None


def randn(shape: tuple[int, ...], generator: Generator = None, device=None) -> Tensor:
    """torch.randn(shape); with ExampleNoise, row i comes from example i's stream."""
    if isinstance(generator, ExampleNoise):
        return generator.randn(shape)
    return torch.randn(shape, generator=generator, device=device)


def randint(high: int, shape: tuple[int, ...], generator: Generator = None, device=None) -> Tensor:
    """torch.randint(0, high, shape) with the examples along the last dimension; ExampleNoise as in randn."""
    if isinstance(generator, ExampleNoise):
        return generator.randint(high, math.prod(shape[:-1]) if len(shape) > 1 else 1).reshape(shape)
    return torch.randint(0, high, shape, generator=generator, device=device)
