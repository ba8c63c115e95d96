"""The LightningModule: the diffusion loss, timestep sampling, Adam with warm-up, gradient clipping and EMA weights."""

import copy
import time

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ddpmlab.diffusion import GaussianDiffusion
from ddpmlab.diffusion.guidance import conditioned
from ddpmlab.diffusion.timesteps import UniformTimesteps
from ddpmlab.errors import ConfigError, NonFiniteLoss

NONFINITE_POLICIES = ("stop", "skip")
# What every training run logs: the names optimized_metric may give, with val/bpd (ddpmlab.callbacks).
METRICS = ("train/loss", "train/mse", "train/vlb_bpd", "train/grad_norm", "train/images_per_s",
           *(f"train/loss_q{q}" for q in range(4)))
EVERY_STEP = ("train/loss",)  # logged on every step; the others on logging steps only (logs_this_step)
# fp16's smallest normal number: below it most scaled gradients underflow to 0, and only ~30 overflows in a row
# from GradScaler's initial 2**16 get the scale there; no probe for a larger scale does.
MIN_LOSS_SCALE = torch.finfo(torch.float16).tiny


class DiffusionModule(L.LightningModule):
    """Trains `model` on `diffusion`'s loss and keeps an exponential moving average of its weights.

    Args:
        model: the network, `model(x_t, t)`, or `model(x_t, t, y)` for a class-conditional one (batches (x, y)).
        diffusion: the GaussianDiffusion that defines q, p and the loss.
        timestep_sampler: draws each example's t and its loss weight (default: uniform); its state, if any,
            is part of the module's state and so of every checkpoint.
        lr: Adam's learning rate (Ho et al.: 2e-4 for CIFAR-10).
        warmup_steps: steps of linear learning-rate warm-up from 0 (Ho et al.: 5000).
        ema_decay: EMA decay per optimizer step (Ho et al.: 0.9999).
        ema_warmup: use min(ema_decay, (1 + step) / (10 + step)) so short runs get a useful average early.
        adam_betas, weight_decay: the rest of Adam's settings (the paper uses PyTorch's defaults, no decay).
        fused: use Adam's fused implementation (same update, one kernel over all parameters); not under
            16-mixed precision, where Lightning leaves a fused optimizer's gradients scaled for the clipping.
        on_nonfinite: what a NaN/Inf loss or gradient does. `stop`: it is recorded on the device (no host
            sync per step), checked every `log_every_n_steps` and before every checkpoint write, and training
            stops with NonFiniteLoss naming the first bad step; no checkpoint after it is written.
            `skip`: that step leaves no trace in the weights, Adam, the EMA, the timestep sampler or the warm-up
            (one scalar host sync per step to decide) and is counted in `train/skipped_steps`. Under 16-mixed,
            the GradScaler handles overflowing gradients itself; a collapsed loss scale stops the run.
        config: the resolved run config, stored in every checkpoint under "config".
        seed: the run's seed; under DDP, rank r > 0 draws from rank_seed(seed, r) (see `setup`).
    """

    def __init__(
        self,
        model: nn.Module,
        diffusion: GaussianDiffusion,
        timestep_sampler: UniformTimesteps | None = None,
        lr: float = 2e-4,
        warmup_steps: int = 5000,
        ema_decay: float = 0.9999,
        ema_warmup: bool = False,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        on_nonfinite: str = "stop",
        fused: bool = False,
        config: dict | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ConfigError(f"optim.lr must be a positive number, got {lr!r}: the paper uses optim.lr=2e-4")
        if not (isinstance(ema_decay, (int, float)) and 0 <= ema_decay < 1):
            raise ConfigError(f"optim.ema_decay must be in [0, 1), got {ema_decay!r}: the paper uses 0.9999")
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"optim.on_nonfinite={on_nonfinite!r} is unknown: choose one of "
                              f"{', '.join(NONFINITE_POLICIES)}")
        self.model = model
        self.ema_model = copy.deepcopy(model).requires_grad_(False).eval()
        self.diffusion = diffusion
        self.timestep_sampler = timestep_sampler or UniformTimesteps(diffusion.num_timesteps)
        self.lr, self.warmup_steps, self.adam_betas, self.weight_decay = lr, warmup_steps, tuple(adam_betas), weight_decay
        self.ema_decay, self.ema_warmup = ema_decay, ema_warmup
        self.config, self.on_nonfinite, self.fused, self.seed = config, on_nonfinite, fused, seed
        self.register_buffer("first_nonfinite_step", torch.tensor(-1), persistent=False)
        self.register_buffer("skipped_steps", torch.tensor(0), persistent=False)
        self._loss_finite: Tensor | None = None
        self._sampled: list[tuple[Tensor, Tensor]] = []  # this step's (t, L_t) pairs, (B,) each
        self._skipped = False
        self._step_start: float | None = None
        self._ema_pairs: tuple[list[Tensor], list[Tensor]] | None = None
        self.updating = False  # between the gradients and the EMA: weights, Adam and EMA may disagree
        self.restarted: list[str] = []  # parts whose checkpointed state a resume replaces (ddpmlab.resume.RESTARTED)

    def train(self, mode: bool = True) -> "DiffusionModule":
        """Lightning puts the whole module in train mode; the EMA copy stays in eval (no dropout when sampling)."""
        super().train(mode)
        self.ema_model.eval()
        return self

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.model(x_t, t) if y is None else self.model(x_t, t, y)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x_0, y = batch if isinstance(batch, (tuple, list)) else (batch, None)  # images, or (images, labels)
        t, weights = self.timestep_sampler.sample(x_0.shape[0], x_0.device)
        eps = torch.randn_like(x_0)
        if y is not None:  # label dropout: some labels become "no class" (Ho & Salimans 2022, Algorithm 1)
            y = self.diffusion.drop_labels(y, self.model.num_classes)
        model = conditioned(self.model, y)
        terms = self.diffusion.training_losses(model, x_0, t, eps)  # each (B,)
        self._sampled.append((t, terms["vb"].detach()))  # the sampler learns from them once the step is taken
        losses = terms["loss"] * weights
        loss = losses.mean()
        finite = torch.isfinite(loss)  # over all micro-batches of the step under gradient accumulation
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        self.log("train/loss", loss, prog_bar=True)  # every step: the progress bar shows it
        if not self.logs_this_step():
            return loss
        self.log("train/mse", terms["mse"].mean())
        # The bound in bits/dim, whatever the loss trained: L_T and L_0 exact (one more network call, on logging
        # steps only), the KL terms estimated from this batch's t >= 1 (unbiased; see bound_from_draws).
        self.log("train/vlb_bpd", self.diffusion.bound_from_draws(model, x_0, eps, t, weights, terms["vb"]).mean())
        # The loss by quarter of the t range: where the network still has most to learn.
        quarter = (t * 4) // self.diffusion.num_timesteps
        sums = torch.zeros(4, device=x_0.device).index_add_(0, quarter, losses.detach())
        counts = torch.zeros(4, device=x_0.device).index_add_(0, quarter, torch.ones_like(losses))  # bincount syncs
        by_quarter = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))
        for q in range(4):
            self.log(f"train/loss_q{q}", by_quarter[q])
        return loss

    def logs_this_step(self) -> bool:
        """Whether Lightning writes this step's values to the loggers (every trainer.log_every_n_steps steps).

        Lightning's self.log costs about 2 ms of host time per call; the values of other steps are dropped, so
        only the progress bar's loss is logged on them (this halved the default run's step overhead).
        """
        every = self.trainer.log_every_n_steps
        return every > 0 and ((self.global_step + 1) % every == 0 or self.trainer.should_stop)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip the gradients, log their global norm before clipping, and catch NaN/Inf.

        `norm` clips the global norm (Ho et al.: 1.0); `value` clamps each element to [-val, val].
        Runs after backward and before Adam's update, so a skipped step is one whose gradients are removed:
        Adam leaves parameters without a gradient untouched (weights, moments and its step count).
        Under 16-mixed precision the GradScaler overflows by design when it probes a larger scale, then skips
        that step and halves the scale: non-finite gradients are its to handle, a non-finite loss stays ours.
        """
        clip = float(gradient_clip_val) if gradient_clip_val else None
        by_value = clip is not None and gradient_clip_algorithm == "value"
        # max_norm=inf measures the norm without clipping: for the log and the NaN/Inf check in every mode
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf") if by_value or not clip else clip)
        if by_value:
            torch.nn.utils.clip_grad_value_(self.model.parameters(), clip)
        if self.logs_this_step():
            self.log("train/grad_norm", norm)
        bad = ~self._loss_finite if self.grad_scaler() else ~(torch.isfinite(norm) & self._loss_finite)
        self._loss_finite = None
        if self.on_nonfinite == "skip":
            self._skipped = bool(bad.item())  # the one host sync of this policy
            if self._skipped:
                optimizer.zero_grad(set_to_none=True)
                self.skipped_steps += 1
            if self.logs_this_step():
                self.log("train/skipped_steps", self.skipped_steps.float())
        else:
            first = self.first_nonfinite_step
            first.copy_(torch.where(bad & (first < 0), torch.full_like(first, self.global_step), first))

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """The GradScaler of Lightning's 16-mixed precision plugin, if one is active."""
        scaler = getattr(self._trainer and self._trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def check_finite(self) -> None:
        """Raise NonFiniteLoss if any step so far had a NaN/Inf loss or gradient, or the 16-mixed loss scale
        collapsed (host syncs: called rarely)."""
        step = int(self.first_nonfinite_step)
        if step >= 0:
            raise NonFiniteLoss(
                f"the loss or its gradient became NaN/Inf at step {step + 1}: training stopped and no checkpoint "
                "after it was written; resume from the last checkpoint with a lower optim.lr, or set "
                "optim.on_nonfinite=skip to skip such steps"
            )
        scaler = self.grad_scaler()
        if scaler is not None and scaler.get_scale() < MIN_LOSS_SCALE:
            raise NonFiniteLoss(
                f"the 16-mixed loss scale fell to {scaler.get_scale():.3g} by step {self.global_step}: the gradients "
                "overflow at every scale, which the GradScaler cannot absorb; resume from the last checkpoint with "
                "a lower optim.lr, or train with trainer.precision=bf16-mixed or 32-true"
            )

    def setup(self, stage: str) -> None:
        """Every DDP process is seeded alike (so all build the same initial weights); from here on rank r > 0 draws
        from its own stream, rank_seed(seed, r), so the ranks' t, eps, dropout masks and flips differ: otherwise N
        ranks would give N images the same N draws. Rank 0 keeps the stream a single process draws."""
        if stage == "fit" and self.trainer.global_rank > 0:
            torch.manual_seed(rank_seed(self.seed, self.trainer.global_rank))

    def on_fit_start(self) -> None:
        self._ema_pairs = None  # the module may have moved device since the last fit

    def on_train_batch_start(self, batch: Tensor, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def on_before_optimizer_step(self, optimizer) -> None:
        self.updating = True  # an error from here until optimizer_step ends leaves no checkpoint (LastCheckpoint)

    def optimizer_step(self, *args, **kwargs) -> None:
        """Adam's step, then the EMA update: both before any callback's on_train_batch_end, so a checkpoint
        written there (ModelCheckpoint, LastCheckpoint) holds the EMA of the same step as the weights.
        Also logs the throughput: images of all ranks over the host time of forward, backward, step and EMA."""
        super().optimizer_step(*args, **kwargs)
        sampled, self._sampled = self._sampled, []
        if not self._skipped:  # a skipped step leaves no trace: neither the sampler nor the EMA learns from it
            for t, vb in sampled:
                self.timestep_sampler.update(t, vb)
            self.update_ema()
        if self._step_start is not None and self.logs_this_step():
            images = self.trainer.datamodule.batch_size * self.trainer.world_size if self.trainer.datamodule else 0
            self.log("train/images_per_s", images / max(time.perf_counter() - self._step_start, 1e-9))
        self.updating = False

    def lr_scheduler_step(self, scheduler, metric) -> None:
        if not self._skipped:  # nor does the warm-up advance on it
            scheduler.step()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.check_finite()

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- decay * ema + (1 - decay) * weights, for every parameter and buffer at once."""
        step = self.global_step
        decay = min(self.ema_decay, (1 + step) / (10 + step)) if self.ema_warmup else self.ema_decay
        if self._ema_pairs is None:  # paired once per fit (on_fit_start resets), not every step
            ema = list(self.ema_model.parameters()) + list(self.ema_model.buffers())
            live = list(self.model.parameters()) + list(self.model.buffers())
            floats = [(e, p) for e, p in zip(ema, live) if e.is_floating_point()]
            self._ema_pairs = ([e for e, _ in floats], [p for _, p in floats])
        torch._foreach_lerp_(*self._ema_pairs, 1.0 - decay)

    def configure_optimizers(self):
        fused = self.fused and not (self._trainer is not None and self.trainer.precision == "16-mixed")
        optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr, betas=self.adam_betas,
                                     weight_decay=self.weight_decay, fused=fused or None)
        warmup = max(1, self.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()  # a checkpoint of NaN weights is never written over the last good one
        if self.config is not None:
            checkpoint["config"] = self.config
        # The global RNG draws t, eps, dropout and flips: every rank's state is saved so that a resumed run continues
        # each rank's stream. "torch" and "cuda" are rank 0's (a single process's), "other_ranks" those of ranks 1...
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        mine = {"torch": torch.get_rng_state(), "cuda": cuda}
        states = [mine]
        if self._trainer is not None and self.trainer.world_size > 1:  # every rank saves (Lightning's rule): all meet
            states = [None] * self.trainer.world_size
            dist.all_gather_object(states, mine)
        checkpoint["rng_states"] = {**states[0], "other_ranks": states[1:]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.restarted:  # before Lightning loads the state dict: these parts keep the state they were built with
            from ddpmlab.resume import with_fresh_state

            checkpoint["state_dict"] = with_fresh_state(checkpoint["state_dict"], self, self.restarted)
        states = checkpoint.get("rng_states")
        rank = self.trainer.global_rank if self._trainer is not None else 0
        ranks = [states, *states.get("other_ranks", [])] if states else []
        if rank >= len(ranks):  # a rank the saved run did not have keeps its own stream from `setup`
            return
        torch.set_rng_state(ranks[rank]["torch"])
        cuda = ranks[rank]["cuda"]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of DDP rank `rank`'s global RNG: a 64-bit hash of (seed, rank) by numpy's SeedSequence, so that no
    rank's stream is a shifted copy of another's, nor of a run with another seed."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0])
