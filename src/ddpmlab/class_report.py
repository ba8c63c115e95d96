"""What evaluate.py reports of a class-conditional checkpoint beyond FID/IS/KID: whether the samples are of the
class asked for (the domain classifier's class accuracy, next to its own accuracy on real images as the ceiling),
the per-class table, the grid with one row per class, and the guidance trade-off plot (Ho & Salimans 2022,
arXiv 2207.12598, Figure 4: FID against IS as the guidance scale w grows).
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

from ddpmlab.metrics.classes import accuracy, classifier_ceiling, predict
from ddpmlab.models.classifier import FLIP, ensure_classifier, load_classifier


@dataclass
class ClassCheck:
    """The class accuracy of a conditional checkpoint's samples: the classifier's weights and its ceiling (accuracy
    on the real test images, overall and per class), or why there is none."""

    names: list[str]
    weights: str | None = None
    ceiling: dict | None = None
    described: str = ""
    unavailable: str | None = None

    def rows(self, samples: torch.Tensor, labels: torch.Tensor) -> list[dict]:
        """class_accuracy rows of uint8 `samples` generated for `labels`: overall, then one per class."""
        if self.weights is None:
            return [{"metric": "class_accuracy", "value": None, "unavailable": self.unavailable}]
        classifier, _ = load_classifier(self.weights)
        got = accuracy(predict(classifier, samples, desc="classifying samples"), labels, len(self.names))
        common = {"metric": "class_accuracy", "classifier": self.described}
        return [{**common, "value": got["overall"], "ceiling": self.ceiling["overall"]}] + [
            {**common, "class": c, "value": got["per_class"][c], "ceiling": self.ceiling["per_class"][c],
             "samples_of_class": got["counts"][c]} for c in range(len(self.names))]


def class_check(dataset: str, root: str, data) -> ClassCheck:
    """The ClassCheck of a conditional run on `dataset` (data: its datamodule, built with its labels): the domain
    classifier, trained once and cached under root as for classifier FID, and its ceiling on the test split."""
    data.setup("fit")
    names = data.class_names
    if dataset not in FLIP:
        return ClassCheck(names, unavailable=f"no domain classifier for {dataset} (there is one for "
                                             f"{', '.join(FLIP)}): no class accuracy")
    weights = ensure_classifier(dataset, root, data.image_size)
    data.setup("test")
    ceiling = classifier_ceiling(weights, data.test_images, data.test_labels, len(names))
    _, saved = load_classifier(weights)
    described = f"{dataset} classifier ({saved['recipe']['epochs']} epochs, test accuracy {ceiling['overall']:.4f})"
    return ClassCheck(names, str(weights), ceiling, described)


def class_name(names: list[str] | None, c) -> str:
    return str(c) if names is None or not isinstance(c, int) else f"{c} {names[c]}"


def per_class_table(rows: list[dict], names: list[str] | None) -> str:
    """Markdown: one table per sampling setting, a row per class with its sample accuracy (ceiling), FID and KID."""
    out = []
    for setting in dict.fromkeys((r.get("sampler"), r.get("sampling_steps"), r.get("guidance_scale")) for r in rows
                                 if "class" in r):
        mine = [r for r in rows if (r.get("sampler"), r.get("sampling_steps"), r.get("guidance_scale")) == setting]
        cell = {(r["metric"], r["class"]): r for r in mine if "class" in r}
        overall = {r["metric"]: r for r in mine if "class" not in r}
        sampler, steps, scale = setting
        out += [f"\n{sampler}, {steps or 'all'} steps, guidance w={scale:g}\n",
                "| class | accuracy (ceiling) | FID | KID |", "|---|---|---|---|"]

        def value(metric, c, digits):
            row = cell.get((metric, c)) if c is not None else overall.get(metric)
            return _number(row and row["value"], digits)

        for c in [*range(len(names or [])), "mean", None]:
            acc = cell.get(("class_accuracy", c)) if c is not None else overall.get("class_accuracy")
            acc_text = "" if c == "mean" else f"{_number(acc and acc['value'], 3)} ({_number(acc and acc['ceiling'], 3)})"
            label = "all" if c is None else "mean of classes" if c == "mean" else class_name(names, c)
            out.append(f"| {label} | {acc_text} | {value('fid', c, 2)} | {value('kid', c, 4)} |")
    return "\n".join(out)


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def save_class_grid(samples: torch.Tensor, labels: torch.Tensor, num_classes: int, path: Path, columns: int = 10) -> None:
    """uint8 samples as a grid with one row per class: the first `columns` samples of each class (at most as many as
    the most frequent class has; black where a class has fewer)."""
    columns = min(columns, int(torch.bincount(labels, minlength=num_classes).max()))
    rows = []
    for c in range(num_classes):
        mine = samples[labels == c][:columns]
        rows.append(torch.cat([mine, torch.zeros((columns - len(mine), *samples.shape[1:]), dtype=samples.dtype)]))
    torchvision.utils.save_image(torch.cat(rows).float() / 255, path, nrow=columns)


def plot_guidance(rows: list[dict], path: Path) -> None:
    """Ho & Salimans' Figure 4 in this evaluation's numbers: FID against IS (class accuracy where IS is not
    available) with a point per guidance scale w, and FID, KID and class accuracy against w; one line per sampler
    and steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overall = [r for r in rows if "class" not in r and r.get("guidance_scale") is not None and r["value"] is not None]
    values = {}
    for r in overall:
        values.setdefault((r["sampler"], r["sampling_steps"]), {}).setdefault(r["guidance_scale"], {})[r["metric"]] = r["value"]
    x_metric = "is" if any(r["metric"] == "is" for r in overall) else "class_accuracy"
    against = [m for m in ("fid", "kid", "class_accuracy") if any(r["metric"] == m for r in overall)]
    fig, axes = plt.subplots(1, 1 + len(against), figsize=(4.5 * (1 + len(against)), 3.6), squeeze=False)
    for (sampler, steps), by_w in values.items():
        label = f"{sampler}, {steps or 'all'} steps"
        ws = sorted(by_w)
        points = [(by_w[w].get(x_metric), by_w[w].get("fid"), w) for w in ws]
        points = [p for p in points if None not in p]
        if points:
            axes[0, 0].plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            for x, y, w in points:
                axes[0, 0].annotate(f"w={w:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for ax, metric in zip(axes[0, 1:], against):
            ax.plot([w for w in ws if metric in by_w[w]], [by_w[w][metric] for w in ws if metric in by_w[w]],
                    marker="o", label=label)
    axes[0, 0].set_xlabel("IS" if x_metric == "is" else "class accuracy")
    axes[0, 0].set_ylabel("FID")
    axes[0, 0].set_title("trade-off: one point per guidance scale", fontsize=9)
    for ax, metric in zip(axes[0, 1:], against):
        ax.set_xlabel("guidance scale w")
        ax.set_ylabel(metric.upper() if metric != "class_accuracy" else "class accuracy")
    for ax in axes[0]:
        ax.legend(fontsize=8)
    samples = next((r.get("samples") for r in overall if r.get("samples")), "")
    features = next((r.get("feature_extractor") for r in overall if r.get("feature_extractor")), "")
    fig.suptitle(f"{samples} samples per point; features: {features}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
