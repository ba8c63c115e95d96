"""The contenders of the time-to-quality benchmark (three by default), each trained in a process of its own for a
wall-clock budget on the same Fashion-MNIST training images, then sampled with at most 50 network calls per image.

    python -m ddpmlab.bench.contenders JOB.json    (run by ddpmlab.bench.quality; writes JOB's out folder)

- ddpmlab: the default run (conf/config.yaml) through `python train.py` with trainer.max_time set and
  trainer.max_steps=-1, in its default precision (auto: bf16-mixed on a CPU with native bf16, else fp32); sampled
  with DPM-Solver++(2M), 50 steps (evaluate.py's sampler=dpm_solver).
  Variants of it, not in the default set: ddpmlab-fp32 and ddpmlab-bf16 (trainer.precision=32-true or bf16-mixed:
  what each precision buys in the same minutes), ddpmlab-edm (experiment=edm_fashion_mnist, EDM's recipe at the
  same budget, sampled with EDM's Heun at 25 steps = 49 network calls), and ddpmlab-cfg
  (experiment=cfg_fashion_mnist: the default run made class-conditional; its samples a balanced set of the 10
  classes with classifier-free guidance w = 1 by DPM-Solver++ at 25 steps, each a batched call of the conditional
  and the "no class" branch: 50 network calls).
- diffusers: the recipe of diffusers' examples/unconditional_image_generation/train_unconditional.py, as its
  README runs it (--train_batch_size=16 --learning_rate=1e-4 --lr_warmup_steps=500 --use_ema --random_flip,
  the script's defaults for the rest: AdamW betas (0.95, 0.999), weight decay 1e-6, eps 1e-8, a cosine learning
  rate after the warm-up, EMAModel with warm-up (inv_gamma 1, power 3/4, max decay 0.9999), DDPMScheduler with
  1000 linear steps, epsilon prediction, gradient clipping at 1), on a UNet2DModel of the script's layout (two
  resnets per block, attention at the second-lowest resolution) sized to ours: blocks (32, 32, 64), 1.11M
  parameters for our 1.11M. The cosine schedule needs the run's length, which a time budget does not give: it
  spans the steps that 10 untimed probe steps say fit the budget. Sampled with DPMSolverMultistepScheduler
  (diffusers' fast solver, DPM-Solver++ of order 2), 50 steps.
- lucidrains: denoising-diffusion-pytorch's README recipe (Unet(dim, dim_mults), GaussianDiffusion with its
  defaults: v prediction, sigmoid schedule, 1000 steps; Trainer(train_batch_size=32, train_lr=8e-5,
  gradient_accumulate_every=2, ema_decay=0.995), whose loop is: two accumulated half-losses, clipping at 1,
  Adam betas (0.9, 0.99), EMA every 10 steps, horizontal flips), run as that loop for the budget (its Trainer
  has no time limit), sized for a CPU and our images: dim 24, dim_mults (1, 2, 4) (28 -> 14 -> 7), 1.52M
  parameters, in fp32 (the README's amp=True is fp16 autocast, a GPU's). Sampled with its DDIM (eta 0), as the
  README samples, at sampling_timesteps=50, the shared budget, instead of the README's 250.
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from ddpmlab.progress import track

ROOT = Path(__file__).resolve().parents[3]
SAMPLING_CALLS = 50  # network calls per image for every contender's sampler
CONTENDERS = ("ddpmlab", "diffusers", "lucidrains", "ddpmlab-fp32", "ddpmlab-bf16", "ddpmlab-edm",
              "ddpmlab-cfg")
DEFAULT_CONTENDERS = "ddpmlab,diffusers,lucidrains"
# ddpmlab's runs: (train.py overrides, sampler, its steps, what the recipe is)
DEFAULT_RECIPE = ("the default run (conf/config.yaml): Adam lr 1e-3, warm-up 100, EMA 0.999 with warm-up, batch 32, "
                  "linear betas, eps prediction, L_simple")
OURS = {"ddpmlab": ([], "dpm_solver", SAMPLING_CALLS,
                    DEFAULT_RECIPE + ", trainer.precision=auto (bf16-mixed on a CPU with native bf16)"),
        "ddpmlab-fp32": (["trainer.precision=32-true"], "dpm_solver", SAMPLING_CALLS, DEFAULT_RECIPE + ", fp32"),
        "ddpmlab-bf16": (["trainer.precision=bf16-mixed"], "dpm_solver", SAMPLING_CALLS,
                         DEFAULT_RECIPE + ", bf16 autocast"),
        "ddpmlab-edm": (["experiment=edm_fashion_mnist"], "heun", (SAMPLING_CALLS + 1) // 2,
                        "experiment=edm_fashion_mnist: the default run's network, data and optimiser with EDM's "
                        "preconditioning, loss and log-normal noise (Karras et al. 2022)"),
        "ddpmlab-cfg": (["experiment=cfg_fashion_mnist"], "dpm_solver", SAMPLING_CALLS // 2,
                        "experiment=cfg_fashion_mnist: the default run with 10 class labels, 10% dropped to 'no class'")}
GUIDANCE = {"ddpmlab-cfg": 1.0}  # classifier-free guidance w of a conditional contender's samples
MODULES = {"diffusers": "diffusers", "lucidrains": "denoising_diffusion_pytorch"}  # what each peer needs installed


def training_images(data_root: str) -> torch.Tensor:
    """Fashion-MNIST's 60,000 training images, uint8 (N, 1, 28, 28), as the default run reads them."""
    from ddpmlab.data import read_fashion_mnist

    return read_fashion_mnist(Path(data_root), train=True)


class Budget:
    """Wall-clock seconds from the first training step; `left()` is checked after each optimizer step, as
    Lightning's Timer (trainer.max_time) checks after each of ours."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, None

    def begin(self) -> None:
        self.start = time.monotonic()

    def left(self) -> bool:
        return time.monotonic() - self.start < self.seconds

    def spent(self) -> float:
        return time.monotonic() - self.start


def batches(images: torch.Tensor, batch: int, flip: bool, generator: torch.Generator):
    """Endless shuffled batches in [-1, 1], (B, 1, H, W), each image flipped left-right with probability 1/2."""
    while True:
        order = torch.randperm(len(images), generator=generator)
        for k in range(0, len(order) - batch + 1, batch):
            x = images[order[k:k + batch]].float() / 127.5 - 1
            if flip:
                mask = torch.rand(batch, generator=generator) < 0.5
                x = torch.where(mask[:, None, None, None], x.flip(-1), x)
            yield x


def run_ddpmlab(job: dict) -> dict:
    """`python train.py` (the default run, or a variant: OURS) for the budget, then its sampler from the EMA
    weights at no more than 50 network calls."""
    from ddpmlab.diffusion.guidance import guided, sample_labels
    from ddpmlab.diffusion.noise import ExampleNoise
    from ddpmlab.diffusion.samplers import get_sampler, network_calls
    from ddpmlab.evaluation import load_run

    overrides, sampler_name, sampler_steps, recipe = OURS[job["name"]]

    out = Path(job["out"])
    seconds = int(round(job["seconds"]))
    max_time = f"{seconds // 86400:02d}:{seconds // 3600 % 24:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    command = [sys.executable, str(ROOT / "train.py"), f"trainer.max_time={max_time}", "trainer.max_steps=-1",
               "val.num_images=0", "optimized_metric=null", "callbacks.sample_grid=null",
               f"paths.data_dir={job['data_root']}", f"hydra.run.dir={out / 'run'}", *overrides,
               *job.get("overrides", [])]
    done = subprocess.run(command, cwd=out, capture_output=True, text=True)
    (out / "train.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"ddpmlab's training failed (exit {done.returncode}): {done.stderr[-2000:]}")
    checkpoint = torch.load(out / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    model, diffusion, cfg = load_run(str(out / "run" / "checkpoints" / "last.ckpt"), use_ema=True)
    sampler = get_sampler(sampler_name)
    scale = GUIDANCE.get(job["name"])
    calls = network_calls(sampler_name, sampler_steps, diffusion.num_timesteps) * (2 if scale else 1)
    start, parts = time.perf_counter(), []
    for k in track(range(0, job["samples"], 100), total=math.ceil(job["samples"] / 100), desc=f"{job['name']}: sampling"):
        idx = range(k, min(k + 100, job["samples"]))
        net = model if scale is None else guided(  # a balanced set of classes, guided
            model, sample_labels(idx, None, model.num_classes, job["samples"]), scale)
        x = sampler(net, diffusion, (len(idx), 1, 28, 28), ExampleNoise(idx, 0, torch.device("cpu")),
                    steps=sampler_steps)
        parts.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    timer = checkpoint["callbacks"]["Timer"]["time_elapsed"]["train"]
    steps = int(checkpoint["global_step"])
    return {"samples": torch.cat(parts), "steps": steps, "images_seen": steps * cfg.data.batch_size,
            "training_seconds": timer, "sampling_seconds": time.perf_counter() - start,
            "parameters": sum(p.numel() for p in model.parameters()),
            "recipe": recipe + (f"; sampled at classifier-free guidance w = {scale:g}" if scale else ""),
            "sampler": f"{'DPM-Solver++(2M)' if sampler_name == 'dpm_solver' else 'Heun (EDM Algorithm 1)'}, "
                       f"{sampler_steps} steps{f', guidance w={scale:g}' if scale else ''} ({calls} network calls)"}


def run_diffusers(job: dict) -> dict:
    """diffusers' train_unconditional.py recipe (module docstring) for the budget, then DPM-Solver++ 50 steps."""
    import torch.nn.functional as F
    from diffusers import DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    blocks = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D")
    unet = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, layers_per_block=2,
                       block_out_channels=(32, 32, 64), down_block_types=blocks,
                       up_block_types=tuple(b.replace("Down", "Up") for b in reversed(blocks)))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                   model_cls=UNet2DModel, model_config=unet.config)
    images = training_images(job["data_root"])
    data = batches(images, 16, flip=True, generator=torch.Generator().manual_seed(0))

    def step(model, opt, lr_schedule=None) -> None:
        x_0 = next(data)
        noise = torch.randn_like(x_0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x_0.shape[0],))
        loss = F.mse_loss(model(scheduler.add_noise(x_0, noise, t), t).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if lr_schedule is not None:
            lr_schedule.step()
        opt.zero_grad()

    probe = UNet2DModel.from_config(unet.config)  # the run's length, for the cosine schedule: untimed
    probe_opt = torch.optim.AdamW(probe.parameters(), lr=1e-4)
    step(probe, probe_opt)
    start = time.perf_counter()
    for _ in range(10):
        step(probe, probe_opt)
    total = max(1, int(job["seconds"] / ((time.perf_counter() - start) / 10)))
    del probe, probe_opt
    lr_schedule = get_scheduler("cosine", optimizer, num_warmup_steps=500, num_training_steps=total)
    budget, steps = Budget(job["seconds"]), 0
    budget.begin()
    unet.train()
    while budget.left() and steps < total:
        step(unet, optimizer, lr_schedule)
        ema.step(unet.parameters())
        steps += 1
    trained = budget.spent()
    ema.copy_to(unet.parameters())
    unet.eval()
    solver = DPMSolverMultistepScheduler.from_config(scheduler.config)
    pipeline = DDPMPipeline(unet=unet, scheduler=solver)
    pipeline.set_progress_bar_config(disable=True)
    start, parts = time.perf_counter(), []
    for k in track(range(0, job["samples"], 100), total=math.ceil(job["samples"] / 100), desc="diffusers: sampling"):
        n = min(100, job["samples"] - k)
        x = pipeline(batch_size=n, num_inference_steps=SAMPLING_CALLS, output_type="pt",
                     generator=torch.Generator().manual_seed(k)).images  # (n, H, W, C) in [0, 1]
        x = torch.as_tensor(x)
        x = x.permute(0, 3, 1, 2) if x.shape[-1] == 1 else x
        parts.append((x * 255).round().clamp(0, 255).to(torch.uint8))
    return {"samples": torch.cat(parts), "steps": steps, "images_seen": steps * 16, "training_seconds": trained,
            "sampling_seconds": time.perf_counter() - start, "parameters": sum(p.numel() for p in unet.parameters()),
            "planned_steps": total,
            "recipe": "train_unconditional.py: AdamW lr 1e-4 (0.95, 0.999), wd 1e-6, cosine after 500 warm-up, "
                      "EMA 0.9999 with warm-up, batch 16, flips, linear betas, eps prediction",
            "sampler": f"DPMSolverMultistepScheduler, {SAMPLING_CALLS} steps ({SAMPLING_CALLS} network calls)"}


def run_lucidrains(job: dict) -> dict:
    """denoising-diffusion-pytorch's README recipe (module docstring) for the budget, then its DDIM, 50 steps."""
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    from ema_pytorch import EMA

    torch.manual_seed(0)
    model = Unet(dim=24, dim_mults=(1, 2, 4), channels=1, flash_attn=False)
    diffusion = GaussianDiffusion(model, image_size=28, timesteps=1000, sampling_timesteps=SAMPLING_CALLS)
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=8e-5, betas=(0.9, 0.99))
    ema = EMA(diffusion, beta=0.995, update_every=10)
    images = training_images(job["data_root"])
    data = batches(images, 32, flip=True, generator=torch.Generator().manual_seed(0))
    budget, steps = Budget(job["seconds"]), 0
    budget.begin()
    diffusion.train()
    while budget.left():
        for _ in range(2):  # gradient_accumulate_every=2
            loss = diffusion((next(data) + 1) / 2) / 2  # its GaussianDiffusion takes images in [0, 1]
            loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        steps += 1
    trained = budget.spent()
    ema.ema_model.eval()
    start, parts = time.perf_counter(), []
    for k in track(range(0, job["samples"], 100), total=math.ceil(job["samples"] / 100), desc="lucidrains: sampling"):
        torch.manual_seed(k)
        with torch.no_grad():
            x = ema.ema_model.sample(batch_size=min(100, job["samples"] - k))  # [0, 1]
        parts.append((x * 255).round().clamp(0, 255).to(torch.uint8))
    return {"samples": torch.cat(parts), "steps": steps, "images_seen": steps * 64, "training_seconds": trained,
            "sampling_seconds": time.perf_counter() - start, "parameters": sum(p.numel() for p in model.parameters()),
            "recipe": "README: Adam lr 8e-5 (0.9, 0.99), batch 32 x 2 accumulated, EMA 0.995 every 10 steps, flips, "
                      "sigmoid betas, v prediction",
            "sampler": f"DDIM (eta 0), {SAMPLING_CALLS} steps ({SAMPLING_CALLS} network calls)"}


RUN = {"diffusers": run_diffusers, "lucidrains": run_lucidrains, **{name: run_ddpmlab for name in OURS}}


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(job.get("threads") or torch.get_num_threads())
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    result = RUN[job["name"]](job)
    out = Path(job["out"])
    torch.save(result.pop("samples"), out / "samples.pt")
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
