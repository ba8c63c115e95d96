"""Did the samples get the class they were asked for? The domain classifier's accuracy on class-conditional samples.

Samples generated for class c are classified by the project's own classifier of the dataset (models/classifier.py,
the one behind classifier FID/IS); the share it assigns to c, per class and overall, is the class accuracy.
The classifier's accuracy on the real test images of each class is the ceiling next to it: a sample accuracy at
the ceiling says the samples are as recognisable as real images are to this classifier.
"""

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor

from ddpmlab.data import to_model_range
from ddpmlab.models.classifier import load_classifier
from ddpmlab.progress import track


@torch.no_grad()
def predict(classifier, images, batch_size: int = 500, desc: str = "classifying") -> Tensor:
    """The classifier's class for each uint8 image (N, C, H, W) (a tensor or ShardImages): (N,) int64."""
    starts = range(0, len(images), batch_size)
    return torch.cat([classifier(to_model_range(images[s:s + batch_size])).argmax(1)
                      for s in track(starts, total=len(starts), desc=desc, leave=False)])


def accuracy(predictions: Tensor, labels: Tensor, num_classes: int) -> dict:
    """{"overall": share of predictions equal to labels, "per_class": [share within each class, None where the class
    has no example], "counts": [examples per class]}."""
    hits = (predictions == labels).float()
    counts = torch.bincount(labels, minlength=num_classes)
    correct = torch.zeros(num_classes).index_add_(0, labels, hits)
    return {"overall": hits.mean().item(),
            "per_class": [(c / n).item() if n else None for c, n in zip(correct, counts)],
            "counts": counts.tolist()}


def classifier_ceiling(weights: str | Path, test_images, test_labels: Tensor, num_classes: int) -> dict:
    """The classifier's accuracy on the real test images (`accuracy`'s dict), cached beside its weights under the
    weights' sha256 (one pass over a 10k test split is about a minute on a CPU core)."""
    weights = Path(weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    cache = weights.with_name(f"{weights.stem}.ceiling.json")
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("sha256") == digest and saved.get("images") == len(test_images):
            return saved["accuracy"]
    classifier, _ = load_classifier(weights)
    result = accuracy(predict(classifier, test_images, desc="classifier on the test split"), test_labels[:],
                      num_classes)
    cache.write_text(json.dumps({"sha256": digest, "images": len(test_images), "accuracy": result}))
    return result
