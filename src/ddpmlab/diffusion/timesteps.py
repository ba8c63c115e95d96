"""Timestep samplers for training: which t each example of a batch is noised to, and its loss weight.

`uniform` draws t ~ U{0..T-1} (Ho et al. Algorithm 1). `importance` is iDDPM's loss-aware sampler (Nichol &
Dhariwal 2021, section 3.3): p_t proportional to sqrt(E[L_t^2]) estimated from the last `history` values of each
t's bound term, each example weighted by 1 / (T p_t) so the weighted loss stays an unbiased estimate of L_vlb.
Both are modules: the importance sampler's history is a buffer, so it is saved in and restored from checkpoints.
"""

import torch
import torch.distributed as dist
from torch import Tensor, nn


class UniformTimesteps(nn.Module):
    """t ~ U{0, ..., T-1} with weight 1 for every example."""

    def __init__(self, num_timesteps: int):
        super().__init__()
        self.num_timesteps = num_timesteps

    def probabilities(self) -> Tensor:
        """(T,) the distribution t is drawn from."""
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps)

    def sample(self, batch_size: int, device) -> tuple[Tensor, Tensor]:
        """(t, weights), both (B,): t drawn from `probabilities`, weights 1 / (T p_t) (here all 1)."""
        t = torch.randint(0, self.num_timesteps, (batch_size,), device=device)
        return t, torch.ones(batch_size, device=device)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Learn from this step's per-example bound terms (the uniform sampler needs nothing)."""


class ImportanceTimesteps(UniformTimesteps):
    """iDDPM's loss-aware sampler: uniform until every t has `history` recorded losses, then p_t ~ sqrt(mean L_t^2).

    Args:
        num_timesteps: T.
        history: values of L_t kept per t (iDDPM: 10).
        uniform_prob: mass spread uniformly over all t after the warm-up so none becomes unreachable
            (the iDDPM reference code's 0.001).

    Under DDP, `update` gathers every rank's (t, loss) first, so all ranks hold the same history and the same p.
    The update is on the device, with no host synchronisation.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.history_size, self.uniform_prob = history, uniform_prob
        self.register_buffer("loss_history", torch.zeros(num_timesteps, history))
        self.register_buffer("loss_counts", torch.zeros(num_timesteps, dtype=torch.long))

    def warmed_up(self) -> Tensor:
        """A 0-d bool tensor: every t has its full history."""
        return (self.loss_counts >= self.history_size).all()

    def sample(self, batch_size: int, device) -> tuple[Tensor, Tensor]:
        p = self.probabilities().to(device)
        t = torch.multinomial(p, batch_size, replacement=True)
        return t, 1.0 / (self.num_timesteps * p[t])

    def probabilities(self) -> Tensor:
        uniform = torch.full_like(self.loss_history[:, 0], 1.0 / self.num_timesteps)
        rms = self.loss_history.pow(2).mean(1).sqrt()
        p = rms / rms.sum().clamp(min=torch.finfo(rms.dtype).tiny)
        p = p * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        return torch.where(self.warmed_up(), p, uniform)  # chosen on the device: no sync to test the warm-up

    @torch.no_grad()
    def update(self, t: Tensor, losses: Tensor) -> None:
        """Append each example's loss to its t's ring buffer (in batch order; later values win within a batch).

        A batch holding a NaN/Inf loss leaves the history as it was: one such value would make every p_t NaN.
        """
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t, losses = _all_gather(t), _all_gather(losses.float())
        t, losses = t.to(self.loss_counts.device), losses.to(self.loss_history)
        order = torch.sort(t, stable=True).indices
        t, losses = t[order], losses[order]
        # rank of each example among those of the same t in this batch; only the last `history` of a t survive
        first = torch.searchsorted(t, t)
        rank = torch.arange(len(t), device=t.device) - first
        in_batch = torch.bincount(t, minlength=self.num_timesteps)
        finite = torch.isfinite(losses).all()  # 0-d: decided on the device, no sync
        keep = (rank >= in_batch[t] - self.history_size) & finite
        slot = (self.loss_counts[t] + rank) % self.history_size
        self.loss_history[t[keep], slot[keep]] = losses[keep]
        self.loss_counts += in_batch * finite


def _all_gather(x: Tensor) -> Tensor:
    """Every rank's (B,) tensor concatenated in rank order (ranks have equal batch sizes: drop_last)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)
