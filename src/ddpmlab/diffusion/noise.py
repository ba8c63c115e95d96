"""Gaussian noise from one generator, or from one generator per example.

Per-example generators (seeded by each example's index) make sampling and the NLL independent of how
examples are batched or split across DDP ranks: example i sees the same noise on any number of processes.
"""

import torch
from torch import Tensor

Generator = torch.Generator | list[torch.Generator] | None


def per_example_generators(indices, seed: int, device) -> list[torch.Generator]:
    """One generator per example, seeded from (seed, example index)."""
    return [torch.Generator(device=device).manual_seed(seed * 1_000_003 + int(i)) for i in indices]


def randn(shape: tuple[int, ...], generator: Generator = None, device=None) -> Tensor:
    """torch.randn(shape); with a list of generators, row i is drawn from generator i."""
    if isinstance(generator, list):
        return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in generator])
    return torch.randn(shape, generator=generator, device=device)


def randint(high: int, shape: tuple[int, ...], generator: Generator = None, device=None) -> Tensor:
    """torch.randint(0, high, shape) with the examples along the last dimension; per-example generators as in randn."""
    if isinstance(generator, list):
        return torch.stack([torch.randint(0, high, shape[:-1], generator=g, device=device) for g in generator], -1)
    return torch.randint(0, high, shape, generator=generator, device=device)
