"""Timestep samplers: uniform, and iDDPM's loss-aware importance sampling (Nichol & Dhariwal 2021, section 3.3)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddpmlab.diffusion.timesteps import ImportanceTimesteps, UniformTimesteps

T = 20


def frequencies(sampler, n=200_000) -> torch.Tensor:
    torch.manual_seed(0)
    t, _ = sampler.sample(n, "cpu")
    return torch.bincount(t, minlength=sampler.num_timesteps).double() / n


def fill(sampler, losses_of_t, rounds=None):
    """Feed every t its loss `rounds` times (default: until the history is full), one batch per round."""
    t = torch.arange(sampler.num_timesteps)
    for _ in range(rounds or sampler.history_size):
        sampler.update(t, losses_of_t(t))


def assert_follows(freq: torch.Tensor, p: torch.Tensor, n=200_000):
    stderr = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * stderr + 1e-12).all()


def test_uniform_sampler_is_uniform_with_unit_weights():
    sampler = UniformTimesteps(T)
    assert_follows(frequencies(sampler), torch.full((T,), 1 / T, dtype=torch.float64))
    assert torch.equal(sampler.sample(64, "cpu")[1], torch.ones(64))


def test_importance_sampler_is_uniform_until_every_t_has_its_history():
    sampler = ImportanceTimesteps(T, history=10)
    fill(sampler, lambda t: (t + 1.0) ** 2, rounds=9)  # every t has 9 of 10 values
    sampler.update(torch.arange(T - 1), torch.ones(T - 1))  # the last t still has only 9
    assert not sampler.warmed_up()
    assert_follows(frequencies(sampler), torch.full((T,), 1 / T, dtype=torch.float64))
    assert torch.equal(sampler.sample(64, "cpu")[1], torch.ones(64))


def test_importance_sampler_then_follows_the_root_mean_square_loss():
    sampler = ImportanceTimesteps(T, history=10, uniform_prob=0.01)
    fill(sampler, lambda t: (t + 1.0) ** 2)
    assert sampler.warmed_up()
    rms = torch.arange(1, T + 1, dtype=torch.float64) ** 2  # a constant history: its rms is the value
    p = 0.99 * rms / rms.sum() + 0.01 / T
    assert torch.allclose(sampler.probabilities().double(), p, atol=1e-6)
    assert_follows(frequencies(sampler), p)
    t, weights = sampler.sample(1000, "cpu")
    assert torch.allclose(weights.double(), 1 / (T * p[t]), rtol=1e-5)


def test_importance_weights_keep_the_loss_an_unbiased_estimate_of_the_uniform_mean():
    """E_{t ~ p}[L_t / (T p_t)] = (1 / T) sum_t L_t, which is what makes the weighted loss an estimate of L_vlb."""
    sampler = ImportanceTimesteps(T, history=2)
    loss = torch.linspace(0.1, 5.0, T) ** 3
    fill(sampler, lambda t: loss[t] * (1 + 0.5 * torch.randn(len(t))).abs())
    torch.manual_seed(1)
    t, weights = sampler.sample(400_000, "cpu")
    assert (loss[t] * weights).mean().item() == pytest.approx(loss.mean().item(), rel=0.01)


def reference_update(history: torch.Tensor, counts: torch.Tensor, t, losses) -> None:
    """The ring buffer written example by example, in order: the definition the vectorised update must match."""
    size = history.shape[1]
    for ti, li in zip(t.tolist(), losses.tolist()):
        history[ti, counts[ti] % size] = li
        counts[ti] += 1


def test_history_keeps_the_last_values_of_each_t_even_with_repeats_in_a_batch():
    sampler = ImportanceTimesteps(5, history=3)
    history, counts = torch.zeros(5, 3), torch.zeros(5, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    for size in (4, 17, 1, 30, 9):  # batches with many repeats of the same t, some longer than the history
        t, losses = torch.randint(0, 5, (size,), generator=g), torch.rand(size, generator=g)
        sampler.update(t, losses)
        reference_update(history, counts, t, losses)
        assert torch.equal(sampler.loss_counts, counts)
        assert torch.equal(sampler.loss_history, history)


def _ddp_rank(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sampler = ImportanceTimesteps(T, history=4)
        for step in range(8):
            g = torch.Generator().manual_seed(100 * step + rank)  # each rank its own batch
            sampler.update(torch.randint(0, T, (12,), generator=g), torch.rand(12, generator=g))
        out[rank] = (sampler.loss_history.clone(), sampler.loss_counts.clone())
    finally:
        dist.destroy_process_group()


def test_importance_state_is_the_same_on_every_ddp_rank_and_equals_one_process_on_all_batches():
    port = 29500 + os.getpid() % 1000
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_rank, args=(2, port, out), nprocs=2, join=True)
        states = dict(out)
    single = ImportanceTimesteps(T, history=4)
    for step in range(8):
        batches = [torch.Generator().manual_seed(100 * step + rank) for rank in range(2)]
        drawn = [(torch.randint(0, T, (12,), generator=g), torch.rand(12, generator=g)) for g in batches]
        single.update(torch.cat([d[0] for d in drawn]), torch.cat([d[1] for d in drawn]))
    for history, counts in states.values():
        assert torch.equal(history, single.loss_history) and torch.equal(counts, single.loss_counts)
