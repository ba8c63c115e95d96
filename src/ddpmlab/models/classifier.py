"""A small CNN classifier of the training data: domain features for FID and logits for IS on small images.

ImageNet's Inception says little about 28x28 grayscale clothing and costs much on a CPU; a classifier trained
on the dataset itself gives features that separate its classes. Its metrics are named "classifier" so they
are never confused with Inception FID. `python -m ddpmlab.models.classifier --dataset fashion_mnist` trains
it once and caches it next to the data, with its recipe and test accuracy.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ddpmlab.data import READERS, labels_of, to_model_range
from ddpmlab.errors import ConfigError, OneLineParser

EPOCHS = 3
# Train with random horizontal flips only where a mirrored image is still a sample of the dataset (as Ho et al.
# flip CIFAR-10): a mirrored digit is no digit, so MNIST features must tell one apart. image_folder has no
# labels, hence no classifier (its FID uses Inception).
FLIP = {"fashion_mnist": True, "cifar10": True, "mnist": False}


class Classifier(nn.Module):
    """Three conv blocks -> global average pool (the `features`, 256-d) -> linear logits.

    Input: images in [-1, 1], (B, C, S, S).
    """

    def __init__(self, in_channels: int, num_classes: int = 10, width: int = 64):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.body = nn.Sequential(block(in_channels, width), nn.MaxPool2d(2), block(width, 2 * width), nn.MaxPool2d(2),
                                  block(2 * width, 4 * width))
        self.head = nn.Linear(4 * width, num_classes)
        self.in_channels, self.num_classes, self.width = in_channels, num_classes, width

    def features(self, x: Tensor) -> Tensor:
        return self.body(x).mean((2, 3))  # (B, C, S, S) -> (B, 4 width)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def classifier_path(root: str | Path, dataset: str, image_size: int) -> Path:
    """Where the cached classifier of a dataset lives: next to the data."""
    return Path(root) / "classifiers" / f"{dataset}_{image_size}.pt"


def train_classifier(train_images: Tensor, train_labels: Tensor, test_images: Tensor, test_labels: Tensor,
                     out: Path, flip: bool, epochs: int = EPOCHS, batch_size: int = 128, seed: int = 0) -> float:
    """Train on uint8 (N, C, S, S) images, with random flips if `flip`; save it and its recipe to `out` atomically.

    Returns the test accuracy. A split smaller than `batch_size` trains in one batch of all its images per step
    (the recipe records the batch size used).
    """
    if len(train_images) == 0 or epochs < 1:
        raise ConfigError(f"the classifier needs training images and epochs >= 1 (got {len(train_images)} images, "
                          f"epochs={epochs}): check the data root and --epochs")
    batch_size = min(batch_size, len(train_images))
    torch.manual_seed(seed)
    model = Classifier(train_images.shape[1], int(train_labels.max()) + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * (len(train_images) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    model.train()
    with tqdm(total=steps, desc="classifier") as bar:
        for _ in range(epochs):
            order = torch.randperm(len(train_images))
            for i in range(len(train_images) // batch_size):
                idx = order[i * batch_size:(i + 1) * batch_size]
                x = to_model_range(train_images[idx])
                if flip:
                    x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(-1), x)
                loss = F.cross_entropy(model(x), train_labels[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(to_model_range(test_images[i:i + 512])).argmax(1)
                                 for i in range(0, len(test_images), 512)])
    accuracy = (predictions == test_labels).float().mean().item()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.partial")
    recipe = {"epochs": epochs, "flip": flip, "batch_size": batch_size, "seed": seed}
    torch.save({"state_dict": model.state_dict(), "in_channels": model.in_channels, "num_classes": model.num_classes,
                "width": model.width, "test_accuracy": accuracy, "recipe": recipe}, tmp)
    tmp.rename(out)
    out.with_suffix(".json").write_text(json.dumps({"test_accuracy": accuracy, **recipe}))
    return accuracy


def load_classifier(path: str | Path) -> tuple[Classifier, dict]:
    """The cached classifier (eval mode) and what it records: test_accuracy and recipe.

    recipe (epochs, flip, batch_size, seed) is None in a file written before recipes were recorded.
    """
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = Classifier(saved["in_channels"], saved["num_classes"], saved["width"])
    model.load_state_dict(saved["state_dict"])
    return model.eval().requires_grad_(False), {"test_accuracy": saved["test_accuracy"], "recipe": saved.get("recipe")}


def labelled_split(dataset: str, root: str, train: bool) -> tuple[Tensor, Tensor]:
    """uint8 images and int64 labels of a torchvision dataset split, through the project's readers."""
    return READERS[dataset](Path(root), train=train), labels_of(dataset, Path(root), train)


def ensure_classifier(dataset: str, root: str, image_size: int) -> Path:
    """Train and cache the classifier for `dataset` unless it is cached with its recipe; returns its path.

    A file without a recorded recipe was trained with flips on every dataset (MNIST too), so it is retrained.
    """
    path = classifier_path(root, dataset, image_size)
    if not path.is_file() or load_classifier(path)[1]["recipe"] is None:
        print(f"training the {dataset} classifier once for the domain metrics (cached at {path})")
        accuracy = train_classifier(*labelled_split(dataset, root, True), *labelled_split(dataset, root, False), path,
                                    flip=FLIP[dataset])
        print(f"{dataset} classifier: test accuracy {accuracy:.4f}")
    return path


def main() -> None:
    parser = OneLineParser(prog="python -m ddpmlab.models.classifier",
                           description="Train the domain classifier used for classifier FID/IS/KID.")
    parser.add_argument("--dataset", default="fashion_mnist", choices=list(FLIP))
    parser.add_argument("--root", default="data", help="the data root (data.root)")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error(f"--epochs {args.epochs}: the classifier trains for at least 1 epoch")
    image_size = 32 if args.dataset == "cifar10" else 28
    path = classifier_path(args.root, args.dataset, image_size)
    try:
        accuracy = train_classifier(*labelled_split(args.dataset, args.root, True),
                                    *labelled_split(args.dataset, args.root, False), path, flip=FLIP[args.dataset],
                                    epochs=args.epochs)
    except ConfigError as err:  # missing data or an empty split: one line, exit 2 (bad input)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.dataset} classifier: test accuracy {accuracy:.4f}, saved to {path}")


if __name__ == "__main__":
    main()
