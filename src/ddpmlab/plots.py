"""Plots a person would rather look at than read, saved as PNG next to the results (no wandb needed)."""

import csv
import math
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_curves(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """Lightning's CSVLogger file as {metric: [(steps done, value), ...]}.

    Lightning logs a training step's values (train/*) at the step's index from 0, and values measured between
    steps (val/bpd, as Lightning's own validation) at the number of steps done.
    """
    curves: dict[str, list[tuple[int, float]]] = {}
    if not Path(metrics_csv).is_file():
        return curves
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    done = int(row["step"]) + key.startswith("train/")
                    curves.setdefault(key, []).append((done, float(value)))
    return curves


def plot_loss_curves(curves: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    """One train/loss curve per label, log scale."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, points in curves.items():
        if points:
            ax.plot(*zip(*points), label=label, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("train/loss")
    if sum(1 for points in curves.values() if points) > 1:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_schedule(betas: "torch.Tensor", path: Path, title: str) -> None:
    """alpha-bar and the SNR (log scale) of one beta schedule against t."""
    import torch  # here, not at the top: cli imports this module, and a refused config exits before torch loads

    plt = _pyplot()
    alpha_bar = torch.cumprod(1 - betas.double(), 0)
    t = range(1, len(betas) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(t, alpha_bar)
    left.set_xlabel("t")
    left.set_ylabel("alpha-bar")
    right.semilogy(t, alpha_bar / (1 - alpha_bar))
    right.set_xlabel("t")
    right.set_ylabel("SNR")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_objective(points: list[tuple[int, float]], direction: str, path: Path, metric: str, title: str) -> None:
    """A search's objective per trial (points) and the best so far (a step line); `direction`: minimize | maximize."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    points = sorted(points)
    if points:
        trials, values = zip(*points)
        pick = min if direction == "minimize" else max
        best = [pick(values[: i + 1]) for i in range(len(values))]
        ax.plot(trials, values, "o", label="trial")
        ax.step(trials, best, where="post", label=f"best so far ({direction})")
        ax.legend(fontsize=8)
        if min(values) > 0 and max(values) > 10 * min(values):  # a diverged trial would flatten the others
            ax.set_yscale("log")
    ax.xaxis.get_major_locator().set_params(integer=True)  # trials are whole numbers
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_noise_distribution(diffusion, path: Path) -> None:
    """An EDM run's training noise: the density of ln sigma ~ N(P_mean, P_std^2) against sigma, with the loss weight
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Karras et al. 2022, Table 1) and the samplers'
    range [sigma_min, sigma_max]."""
    import torch

    plt = _pyplot()
    sigma = torch.logspace(math.log10(diffusion.sigma_min) - 0.5, math.log10(diffusion.sigma_max) + 0.5, 400)
    weight = (sigma**2 + diffusion.sigma_data**2) / (sigma * diffusion.sigma_data) ** 2
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.semilogx(sigma, diffusion.lognormal_density(sigma))
    left.set_xlabel("sigma")
    left.set_ylabel("density of ln sigma")
    right.loglog(sigma, weight)
    right.set_xlabel("sigma")
    right.set_ylabel("loss weight lambda(sigma)")
    for ax in (left, right):
        ax.axvspan(diffusion.sigma_min, diffusion.sigma_max, color="0.9", zorder=0)
    fig.suptitle(f"EDM: ln sigma ~ N({diffusion.P_mean:g}, {diffusion.P_std:g}^2), sigma_data = "
                 f"{diffusion.sigma_data:g}; shaded: sigma_min..sigma_max", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
