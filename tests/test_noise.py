"""The counter-based per-example noise: normal, independent across examples and draws, and batch-free."""

import math

import pytest
import torch

from ddpmlab.diffusion.noise import _MIX1, _MIX2, _mix, ExampleNoise


def test_mix_is_splitmix64s_finaliser_modulo_2_64():
    mask = (1 << 64) - 1

    def reference(z: int) -> int:  # SplitMix64 (Steele et al. 2014) on Python's unbounded integers
        z = ((z ^ (z >> 30)) * (_MIX1 & mask)) & mask
        z = ((z ^ (z >> 27)) * (_MIX2 & mask)) & mask
        return z ^ (z >> 31)

    values = [int(v) for v in torch.randint(-2**63, 2**63 - 1, (2000,), generator=torch.Generator().manual_seed(0))]
    values += [0, 1, -1, 2**63 - 1, -2**63]
    mixed = _mix(torch.tensor(values)).tolist()
    assert [m & mask for m in mixed] == [reference(v & mask) for v in values]


def test_draws_are_standard_normal():
    x = ExampleNoise(range(256), 5).randn((256, 4096)).double().flatten()
    n = x.numel()
    assert abs(x.mean()) < 4 / math.sqrt(n)
    assert abs(x.var() - 1) < 4 * math.sqrt(2 / n)
    assert abs((x**3).mean()) < 4 * math.sqrt(15 / n)
    assert abs((x**4).mean() - 3) < 4 * math.sqrt(96 / n)
    # Kolmogorov-Smirnov distance to N(0, 1); the 0.1% critical value is 1.95 / sqrt(n)
    cdf = 0.5 * (1 + torch.erf(x.sort().values / math.sqrt(2)))
    ks = ((torch.arange(1, n + 1, dtype=torch.float64) / n) - cdf).abs().max()
    assert ks < 1.95 / math.sqrt(n)


def test_examples_draws_and_seeds_are_independent_streams():
    noise = ExampleNoise(range(512), 1)
    first, second = noise.randn((512, 1024)), noise.randn((512, 1024))
    other_seed = ExampleNoise(range(512), 2).randn((512, 1024))
    cos_half, sin_half = first[:, :512], first[:, 512:]  # the two normals of each Box-Muller pair
    pairs = [(first, second), (first, other_seed), (first[:-1], first[1:]), (first[:, :-1], first[:, 1:]),
             (cos_half, sin_half), (cos_half.square() - 1, sin_half.square() - 1)]
    for a, b in pairs:
        correlation = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
        assert abs(correlation) < 4 / math.sqrt(a.numel()), correlation
    bits = torch.cat([noise.bits(1024).flatten() for _ in range(4)])  # 2M 64-bit values of 2048 streams
    assert bits.unique().numel() == bits.numel()  # no repeats: no two streams overlap


def test_example_i_gets_its_own_noise_whatever_the_batch():
    whole = ExampleNoise(range(10), 3)
    part = ExampleNoise([7, 2], 3)
    for _ in range(3):  # successive draws too
        a, b = whole.randn((10, 3, 4, 4)), part.randn((2, 3, 4, 4))
        assert torch.equal(a[[7, 2]], b)


def test_randint_is_uniform_and_per_example():
    t = ExampleNoise(range(4000), 0).randint(10, 25)  # (25, 4000)
    assert t.shape == (25, 4000) and t.min() == 0 and t.max() == 9
    counts = torch.bincount(t.flatten(), minlength=10).double()
    expected = t.numel() / 10
    assert ((counts - expected) ** 2 / expected).sum() < 27.9  # chi-square, 9 degrees of freedom, p = 0.001
    assert torch.equal(ExampleNoise([5], 0).randint(10, 25)[:, 0], t[:, 5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_same_noise_on_the_gpu():
    cpu = ExampleNoise(range(8), 4).randn((8, 3, 8, 8))
    gpu = ExampleNoise(range(8), 4, "cuda").randn((8, 3, 8, 8)).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-5)
