"""The domain classifier: flips only where a mirror image is a valid sample, and its recipe stored with it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ddpmlab.data import to_model_range
from ddpmlab.models.classifier import (EPOCHS, Classifier, classifier_path, ensure_classifier, labelled_split,
                                       load_classifier)
from tests.conftest import ROOT
from tests.test_data import write_idx


def write_mirror_classes(raw_dir, n_train=768, n_test=128) -> None:
    """IDX files whose two classes are mirror images: brightness rising left to right (0) or falling (1)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, 28)[None, None, :]  # (1, 1, W)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 2, n)
        images = np.where(labels[:, None, None] == 0, ramp, ramp[..., ::-1]) + rng.integers(0, 50, (n, 28, 28))
        write_idx(raw_dir / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", labels)


def true_class_probability(path, dataset: str, root) -> float:
    """The classifier's mean softmax probability of each test image's class.

    Trained with flips, each ramp direction came with either label half the time, so the best it can say is
    1/2 (its argmax, and so its accuracy, then hangs on noise); trained without, it is sure.
    """
    net, _ = load_classifier(path)
    images, labels = labelled_split(dataset, str(root), train=False)
    with torch.no_grad():
        return net(to_model_range(images)).softmax(1).gather(1, labels[:, None]).mean().item()


@pytest.mark.slow
def test_mnist_classifier_trains_without_flips_and_stores_its_recipe(tmp_path):
    write_mirror_classes(tmp_path / "MNIST" / "raw", n_train=1536)  # 24 steps: enough to be sure without flips
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "ddpmlab.models.classifier", "--dataset", "mnist", "--root",
                             str(tmp_path), "--epochs", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    path = classifier_path(tmp_path, "mnist", 28)
    _, saved = load_classifier(path)
    assert saved["recipe"] == {"epochs": 2, "flip": False, "batch_size": 128, "seed": 0}
    assert json.loads(path.with_suffix(".json").read_text())["flip"] is False
    # A mirrored digit is not a digit: only a classifier that never saw flips tells these classes apart.
    assert saved["test_accuracy"] > 0.9 and true_class_probability(path, "mnist", tmp_path) > 0.8


def test_fashion_mnist_classifier_trains_with_flips_and_replaces_one_without_a_recipe(tmp_path):
    path = classifier_path(tmp_path, "fashion_mnist", 28)
    path.parent.mkdir(parents=True)
    old = Classifier(1, 2)  # as written before recipes were recorded
    torch.save({"state_dict": old.state_dict(), "in_channels": 1, "num_classes": 2, "width": old.width,
                "test_accuracy": 0.5}, path)
    write_mirror_classes(tmp_path / "FashionMNIST" / "raw")
    assert ensure_classifier("fashion_mnist", str(tmp_path), 28) == path
    _, saved = load_classifier(path)
    assert saved["recipe"]["flip"] is True and saved["recipe"]["epochs"] == EPOCHS
    assert true_class_probability(path, "fashion_mnist", tmp_path) < 0.65  # flipped, the two classes look alike


def test_a_split_smaller_than_one_batch_trains_and_bad_epochs_are_one_line(tmp_path):
    write_mirror_classes(tmp_path / "MNIST" / "raw", n_train=40, n_test=16)  # under the batch of 128
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "ddpmlab.models.classifier", "--dataset", "mnist", "--root", str(tmp_path)]
    result = subprocess.run(command + ["--epochs", "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert load_classifier(classifier_path(tmp_path, "mnist", 28))[1]["recipe"]["batch_size"] == 40
    for bad in (["--epochs", "0"], ["--epochs", "two"], ["--dataset", "imagenet"], ["--root", str(tmp_path / "missing")]):
        result = subprocess.run(command + bad, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
