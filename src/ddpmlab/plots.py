"""Plots a person would rather look at than read, saved as PNG next to the results (no wandb needed)."""

import csv
import math
import textwrap
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


def plot_rate_distortion(code: dict, path: Path) -> None:
    """Ho et al. 2020 Fig. 5: the progressive code's distortion (RMSE, [0, 255]) and rate (bits/dim) against the
    reverse-process steps T - t, and distortion against rate (ddpmlab.paper.rate_distortion's lists, t = 1..T)."""
    plt = _pyplot()
    rate, distortion = code["rate_per_t"], code["distortion_rmse_per_t"]
    T = len(rate)
    steps = [T - t for t in range(1, T + 1)]  # the receiver holds x_t after T - t reverse steps
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, (x, y, xlabel, ylabel) in zip(axes, (
            (steps, distortion, "reverse process steps (T - t)", "distortion (RMSE, [0, 255])"),
            (steps, rate, "reverse process steps (T - t)", "rate (bits/dim)"),
            (rate, distortion, "rate (bits/dim)", "distortion (RMSE, [0, 255])"))):
        ax.plot(x, y, lw=1.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    fig.suptitle(f"progressive coding (Ho et al. Fig. 5): rate {code['rate_bpd']:.3f} + distortion "
                 f"{code['distortion_bpd']:.3f} = {code['bpd']:.3f} bits/dim, RMSE {code['rmse_at_t1']:.2f} at t=1; "
                 f"{code['num_images']} test images", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_image_grid(images: "torch.Tensor", row_labels: list[str], column_labels: list[str], title: str,
                    path: Path) -> None:
    """A (rows, columns, C, H, W) grid of images in [-1, 1] with its rows and columns labelled (the paper's figures)."""
    import torchvision  # here: see plot_schedule

    rows, columns, _, height, width = images.shape
    grid = torchvision.utils.make_grid(((images.flatten(0, 1) + 1) / 2).clamp(0, 1), nrow=columns, padding=2,
                                       pad_value=1.0)  # (3, H', W')
    plt = _pyplot()
    scale = max(1.0, 48 / height)  # small images drawn larger, so that labels stay readable
    size = (max(4.0, columns * width * scale / 60 + 1.5), rows * height * scale / 60 + 1.0)
    fig, ax = plt.subplots(figsize=size)
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([2 + (width + 2) * j + width / 2 for j in range(columns)], column_labels, fontsize=7, rotation=30)
    ax.set_yticks([2 + (height + 2) * i + height / 2 for i in range(rows)], row_labels[:rows], fontsize=7)
    ax.tick_params(length=0)
    ax.xaxis.tick_top()
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(textwrap.fill(title, int(size[0] * 13)), fontsize=8, pad=28)  # ~13 characters an inch at 8 pt
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the title above rotated column labels: tight_layout clipped it
    plt.close(fig)


def plot_table_samples(panels: list, path: Path, title: str) -> None:
    """Ho et al. Table 2's cells as panels, three per row in the table's order: (title, uint8 samples (N, C, H, W) or
    None, what to write where there are none)."""
    import torchvision  # here: see plot_schedule

    plt = _pyplot()
    rows = -(-len(panels) // 3)
    fig, axes = plt.subplots(rows, 3, figsize=(10, 3.6 * rows), squeeze=False)
    for ax, (name, images, said) in zip(axes.flat, panels):
        if images is not None:
            grid = torchvision.utils.make_grid(images.float() / 255, nrow=max(1, round(len(images) ** 0.5)),
                                               pad_value=1.0)
            ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        else:
            ax.text(0.5, 0.5, said, ha="center", va="center", fontsize=11)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
