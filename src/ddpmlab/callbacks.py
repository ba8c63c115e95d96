"""Callbacks: sample grids from the EMA weights, plots of the run, and last.ckpt where training stops."""

import os
import shlex
import signal
import threading
import time
import traceback
from pathlib import Path

import lightning as L
import torch
import torchvision

from ddpmlab.data import evaluation_subset, to_model_range
from ddpmlab.diffusion import get_sampler
from ddpmlab.diffusion.edm import EDMDiffusion
from ddpmlab.diffusion.samplers import default_steps
from ddpmlab.diffusion.guidance import conditioned, guided, sample_labels
from ddpmlab.diffusion.noise import ExampleNoise
from ddpmlab.errors import ConfigError, NonFiniteLoss, Preempted
from ddpmlab.loggers import log_final, log_image
from ddpmlab.plots import plot_loss_curves, plot_noise_distribution, plot_schedule, read_curves
from ddpmlab.progress import in_terminal


class SampleGrid(L.Callback):
    """Every `every_n_steps` optimizer steps and at the end of training, sample from the EMA weights.

    The grid is drawn from fixed per-image noise (ExampleNoise, seeded with `seed`), so grids of successive steps
    show the same noise turning into images. Under DDP each rank samples every world_size-th image and rank 0
    gathers and writes them: the grid one process would draw, in 1 / world_size of the time.
    The default sampler is respaced ancestral sampling over `sampling_steps` of the T steps (Nichol & Dhariwal
    2021, section 4); `sampler=ancestral sampling_steps=null` is the paper's full chain.

    Args:
        dirpath: folder for `step_0001000.png` ... and `final.png`.
        every_n_steps: 0 for only the final grid.
        num_samples: images per grid (a square number gives a square grid).
        sampler, sampling_steps: which sampler and how many steps.
        seed: the grid's noise seed.
        strip_rows, strip_columns: the denoising strip `denoising_<name>.png`: the first rows samples, each
            at columns evenly spaced points of the chain, noise on the left, image on the right.
        labels, guidance_scale: a class-conditional model's grid. labels null or `all`: one row per class, of
            num_samples // classes images each; a list: the classes of the images in turn. guidance_scale w:
            classifier-free guidance (ddpmlab.diffusion.guidance.guided); null is 0, the conditional model.
    """

    def __init__(self, dirpath: str, every_n_steps: int = 1000, num_samples: int = 64, sampler: str = "respaced",
                 sampling_steps: int | None = 100, seed: int = 0, strip_rows: int = 4, strip_columns: int = 8,
                 labels=None, guidance_scale: float | None = None):
        self.dirpath = Path(dirpath)
        self.strip_rows, self.strip_columns = strip_rows, strip_columns
        self.every_n_steps, self.num_samples = every_n_steps, num_samples
        self.sampler, self.sampling_steps, self.seed = get_sampler(sampler), sampling_steps, seed
        self.sampler_name = sampler
        self.labels, self.guidance_scale = labels, guidance_scale or 0.0

    def layout(self, num_classes: int | None) -> tuple[int, int]:
        """(images, images per row) of the grid: one row per class for a conditional model's labels=null/all."""
        if num_classes is None or self.labels not in (None, "all"):
            return self.num_samples, max(1, round(self.num_samples**0.5))
        columns = max(1, self.num_samples // num_classes)
        return num_classes * columns, columns

    def sample(self, pl_module, shape: tuple[int, ...], rank: int = 0, world_size: int = 1,
               progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """One rank's share of a grid of `shape` (num_samples, C, H, W), in [-1, 1]: images rank, rank + world_size,
        ... as (n, C, H, W), and the denoising strip of those among the first `strip_rows`, (rows, columns, C, H, W).
        Every rank draws the same n = ceil(num_samples / world_size) images, so they gather evenly."""
        n = -(-shape[0] // world_size)
        indices = range(rank, rank + n * world_size, world_size)
        noise = ExampleNoise(indices, self.seed, pl_module.device)
        net = pl_module.ema_model
        labels = sample_labels(indices, self.labels, net.num_classes, shape[0], pl_module.device)
        model = guided(net, labels, self.guidance_scale)
        rows = min(n, -(-self.strip_rows // world_size))
        steps = self.sampling_steps or default_steps(self.sampler_name, pl_module.diffusion.num_timesteps)
        keep = {round(j * (steps - 1) / max(1, self.strip_columns - 1)) for j in range(self.strip_columns)}
        frames = []

        def record(i, x, x_0=None):
            if i in keep:
                frames.append(x[:rows].clamp(-1, 1))

        x = self.sampler(model, pl_module.diffusion, (n, *shape[1:]), noise, steps=self.sampling_steps,
                         progress=progress, on_step=record)
        return x, torch.stack(frames, 1) if frames else x[:0, None]

    def save(self, trainer, pl_module, name: str) -> Path:
        data = trainer.datamodule
        total, nrow = self.layout(pl_module.ema_model.num_classes)
        shape = (total, data.channels, data.image_size, data.image_size)
        images, strip = self.sample(pl_module, shape, trainer.global_rank, trainer.world_size, trainer.is_global_zero)
        if trainer.world_size > 1:  # (world, n, ...) -> (n * world, ...): image j of rank r is image j * world + r
            images, strip = (trainer.strategy.all_gather(t).transpose(0, 1).flatten(0, 1) if t.numel() else t
                             for t in (images, strip))
        path = self.dirpath / name
        if not trainer.is_global_zero:
            return path
        images = (images[:total].cpu() + 1.0) / 2.0  # [-1, 1] -> [0, 1] for save_image
        strip = (strip[: min(self.strip_rows, total)].cpu() + 1.0) / 2.0
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torchvision.utils.save_image(images, path, nrow=nrow, padding=2)
        strip_path = self.dirpath / f"denoising_{name}"
        if len(strip):  # (rows, columns, ...) -> rows of columns
            torchvision.utils.save_image(strip.flatten(0, 1), strip_path, nrow=strip.shape[1])
        for logger in trainer.loggers:  # the grid and the strip as images, at this step (wandb, TensorBoard)
            log_image(logger, "samples", path, trainer.global_step)
            if len(strip):
                log_image(logger, "denoising", strip_path, trainer.global_step)
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        before_end = trainer.max_steps < 0 or step < trainer.max_steps  # the last step gets final.png instead
        if self.every_n_steps and step % self.every_n_steps == 0 and before_end:
            self.save(trainer, pl_module, f"step_{step:07d}.png")

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer, pl_module, "final.png")


class ValidationBound(L.Callback):
    """`val/bpd`: the bound L = L_T + sum_t L_{t-1} + L_0 in bits/dim (Ho et al. 2020, eq. 5) of the EMA weights on
    fixed test images, estimated from K = `timesteps` of the KL terms per image (GaussianDiffusion.estimate_bpd:
    L_T and L_0 exact, the KL terms from K log-spaced strata; K + 1 network calls per image).

    Image i's timesteps and noise come from ExampleNoise(i, seed) alone, never from the global RNG: the same
    weights give the same value in any run, and computing it leaves the training's random stream untouched.
    The images go in batches of `batch_size`, dealt to the DDP ranks in turn; each rank sends its batches' values
    to all, in index order, so every rank averages the same numbers in the order one process would: 1 and N
    processes agree. Logged at the end of training and, with `every_n_steps`, every that many steps.

    Args:
        images: the test split, uint8 (N, C, H, W), of which `num_images` are used (all, if fewer), as
            evaluate.py's NLL takes them (data.evaluation_subset).
        labels: their class labels (N,), for a class-conditional model: the bound given the true labels.
        split: what the images are (DiffusionDataModule.test_split), in the printed line.
        num_images, timesteps, every_n_steps, batch_size, seed: see `val` in conf/config.yaml.
    """

    name = "val/bpd"

    def __init__(self, images: torch.Tensor, num_images: int = 256, timesteps: int = 10,
                 every_n_steps: int | None = None, batch_size: int = 64, seed: int = 1, split: str = "test",
                 labels: torch.Tensor | None = None):
        for key, value in (("num_images", num_images), ("timesteps", timesteps), ("batch_size", batch_size),
                           ("every_n_steps", every_n_steps or 1)):
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"val.{key} must be a whole number >= 1, got {value!r}")
        self.images, self.timesteps, self.every_n_steps = evaluation_subset(images, num_images), timesteps, every_n_steps
        self.seed, self.batch_size, self.split = seed, batch_size, split
        self.labels = None if labels is None else evaluation_subset(labels, num_images)  # aligned with the images

    @torch.no_grad()
    def bpd(self, pl_module, rank: int = 0, world_size: int = 1, all_gather=None) -> float:
        """The mean over the images of each one's bound estimate, the same on every rank."""
        n, size, device = len(self.images), self.batch_size, pl_module.device
        batches = [range(start, min(start + size, n)) for start in range(0, n, size)]
        mine = batches[rank::world_size]
        local = torch.full((-(-len(batches) // world_size), size), float("nan"), device=device)  # (my batches, B)
        for k, idx in enumerate(mine):
            x_0 = to_model_range(self.images[idx.start:idx.stop].to(device))
            labels = None if self.labels is None else self.labels[idx.start:idx.stop].to(device)
            local[k, :len(idx)] = pl_module.diffusion.estimate_bpd(
                conditioned(pl_module.ema_model, labels), x_0, self.timesteps, ExampleNoise(idx, self.seed, device))
        if world_size > 1:  # (world, my batches, B) -> (my batches, world, B): batch j is rank j % world's
            local = all_gather(local).transpose(0, 1)
        return local.flatten()[:n].mean().item()

    def report(self, trainer, pl_module, final: bool = False) -> None:
        value = self.bpd(pl_module, trainer.global_rank, trainer.world_size, trainer.strategy.all_gather)
        trainer.callback_metrics[self.name] = torch.tensor(value)  # what train() returns
        if final:  # TensorBoard also files it beside the config (HParams)
            log_final(trainer.loggers, pl_module.config or {}, {self.name: value}, trainer.global_step)
        else:
            for logger in trainer.loggers:
                logger.log_metrics({self.name: value}, step=trainer.global_step)
        if trainer.is_global_zero:
            given = "" if self.labels is None else ", given their true labels"
            print(f"{self.name} = {value:.4f} at step {trainer.global_step} (EMA weights, {len(self.images)} images"
                  f"{given}, split: {self.split}, K={self.timesteps})")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        before_end = trainer.max_steps < 0 or step < trainer.max_steps  # the last step is on_train_end's
        if self.every_n_steps and step % self.every_n_steps == 0 and before_end:
            self.report(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.report(trainer, pl_module, final=True)


class LastCheckpoint(L.Callback):
    """`checkpoints/last.ckpt` at the step where training stops, whatever stops it.

    At the end of training, when ModelCheckpoint's interval did not land on the final step. On SIGTERM
    (SLURM, cloud preemption) or SIGINT (Ctrl-C): the current optimizer step finishes, last.ckpt is saved at
    that step (atomically), and training stops with `Preempted`, whose message says how to continue
    (`python train.py ckpt_path=last`). On SIGUSR2, which submitit's SLURM jobs get `signal_delay_s` before their
    time limit (hydra/launcher=slurm_ddp), the same, then submitit's own handler requeues the job; the requeued
    job continues from this last.ckpt (ddpmlab.resume.requeued_job).

    The handlers only set a flag, so a signal never interrupts a step or a checkpoint write half-way. Under
    DDP the flag is OR-reduced across ranks every `check_every_n_steps` steps (a collective is a host sync,
    so not every step), and all ranks save and stop at the same step; a single process checks every step.

    On any other error after the first step (a bug, running out of memory, a failed sample grid), last.ckpt is
    saved where that is safe (on_exception) and the error's line says where it is.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)
    REQUEUE = signal.SIGUSR2  # submitit's time-limit signal, its handler kept to requeue once last.ckpt is saved

    def __init__(self, dirpath: str, check_every_n_steps: int = 10):
        if not (isinstance(check_every_n_steps, int) and check_every_n_steps >= 1):
            raise ConfigError(f"callbacks.last_checkpoint.check_every_n_steps must be a whole number >= 1, "
                              f"got {check_every_n_steps!r}")
        self.dirpath = Path(dirpath)
        self.check_every_n_steps = check_every_n_steps
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a process forked from training (torch.compile's workers): not ours to save
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        self.received, self._pid = None, os.getpid()
        if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.world_size == 1:
            if self.received is None:
                return
        elif trainer.global_step % self.check_every_n_steps or not trainer.strategy.reduce_boolean_decision(
                self.received is not None, all=False):
            return
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        signum = self.received or signal.SIGTERM  # another rank's signal
        if signum == self.REQUEUE and callable(self._previous.get(signum)):
            self._previous[signum](signum, None)  # submitit's: rank 0 requeues the job and exits; the others return
            # ...and wait for SLURM to end them: a task that exits first can make srun (KillOnBadExit) kill rank 0
            # before its requeue goes through (submitit's own handler says not to exit there)
            while True:
                time.sleep(60)
        raise Preempted(signum, f"{signal.Signals(signum).name} at step {trainer.global_step}: saved {path}; "
                                f"{resume_hint(path)}")

    def on_train_end(self, trainer, pl_module) -> None:
        saved = getattr(trainer.checkpoint_callback, "_last_global_step_saved", None)
        if saved != trainer.global_step:
            trainer.save_checkpoint(self.dirpath / "last.ckpt")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Save last.ckpt at the last complete step unless that is unsafe, and say which in a note the error
        carries to its line (ddpmlab.cli; a traceback prints it last). Not after Preempted (saved already), a
        NaN/Inf (no checkpoint after it) or a failed checkpoint write (it would fail again)."""
        failed_write = any(f.name == "save_checkpoint" for f in traceback.extract_tb(exception.__traceback__))
        if (not isinstance(exception, Exception) or isinstance(exception, (Preempted, NonFiniteLoss))
                or failed_write or trainer.global_step == 0):
            return
        path = self.dirpath / "last.ckpt"
        why = self._unsafe(trainer, pl_module)
        if why is None:
            try:
                trainer.save_checkpoint(path)
            except Exception as err:  # noqa: BLE001 - the first error is the one to report; this one joins it
                why = f"the write failed: {(str(err).strip().splitlines() or [type(err).__name__])[0]}"
        if why is None:
            exception.add_note(f"saved {path} at step {trainer.global_step}; {resume_hint(path)}")
        else:
            kept = f"; the last checkpoint is {path}" if path.exists() else ""
            exception.add_note(f"no checkpoint saved at step {trainer.global_step} ({why}){kept}")

    @staticmethod
    def _unsafe(trainer, pl_module) -> str | None:
        """Why the state at this moment must not become a checkpoint, or None."""
        if trainer.world_size > 1:
            return "a DDP run saves only at its checkpoint steps: a save waits for every rank"
        if getattr(pl_module, "updating", False):
            return "the error came inside an optimizer step, where weights, Adam and the EMA disagree"
        if not all(torch.isfinite(p).all() for p in pl_module.parameters()):
            return "the weights are not finite"
        return None

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def resume_hint(last: Path) -> str:
    """The command that continues this run in its own folder from `last`: its overrides (a multirun's: this job's
    own), the checkpoint by its path, and the run folder; ckpt_path=last would take the newest run, maybe another."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except ValueError:  # no Hydra app: train() called directly
        task = None
    kept = [o for o in task or [] if o.split("=", 1)[0].lstrip("+~") not in ("ckpt_path", "init_from")]
    command = ["python", "train.py", *kept, f"ckpt_path={last}", f"hydra.run.dir={last.parent.parent}"]
    return (f"continue this run with: {shlex.join(command)}"
            + (" (and the overrides it ran with)" if task is None else ""))


class RunPlots(L.Callback):
    """`schedule.png` (alpha-bar and SNR of the run's betas; for diffusion=edm, its training noise distribution and
    loss weight) when training starts, and `loss_curve.png` from the CSV log when it ends, in the run folder: what a
    user without wandb looks at first."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            diffusion = pl_module.diffusion
            if isinstance(diffusion, EDMDiffusion):
                plot_noise_distribution(diffusion, self.dirpath / "schedule.png")
            else:
                plot_schedule(diffusion.betas64, self.dirpath / "schedule.png",
                              f"beta schedule, T={diffusion.num_timesteps}")

    def on_train_end(self, trainer, pl_module) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, L.pytorch.loggers.CSVLogger) and trainer.is_global_zero:
                logger.save()  # flush what is buffered before reading it back
                curve = read_curves(Path(logger.log_dir) / "metrics.csv").get("train/loss", [])
                plot_loss_curves({"train/loss": curve}, self.dirpath / "loss_curve.png",
                                 f"{trainer.global_step} steps")


def progress_bar(refresh_rate: int = 1) -> L.Callback:
    """Lightning's training bar: Rich in a terminal, tqdm in logs and pipes (see ddpmlab.progress).

    Each refresh reads the logged loss back to the host (a device sync on a GPU): raise `refresh_rate` there.
    """
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    return RichProgressBar(refresh_rate=refresh_rate) if in_terminal() else TQDMProgressBar(refresh_rate=refresh_rate)
