"""Cached FID/KID reference statistics are reused only for the same images, extractor weights and code."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpmlab.data import read_image_folder
from ddpmlab.evaluation import evaluate
from ddpmlab.metrics.fidelity import fidelity_metrics, resolve_inception_weights
from tests.conftest import ROOT
from tests.test_evaluate import compose_eval, trained  # noqa: F401 (the fixture)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


def fid(record: dict) -> float:
    return next(r["value"] for r in record["results"] if r["metric"] == "fid")


@pytest.mark.slow
def test_a_classifier_retrained_into_the_same_file_gets_fresh_reference_statistics(trained, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    shutil.copytree(Path(trained["data"]) / "FashionMNIST", data / "FashionMNIST")
    overrides = [f"ckpt={trained['ckpt']}", f"data_root={data}", "metrics=[fid]", "feature_extractor=classifier",
                 "num_samples=12", "sampler=ddim", "sampling_steps=4"]
    first = evaluate(compose_eval(*overrides, output_dir=tmp_path / "a"))  # trains classifier A, caches its stats
    # The README's command retrains the classifier into the file evaluate.py uses.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    retrain = subprocess.run([sys.executable, "-m", "ddpmlab.models.classifier", "--dataset", "fashion_mnist",
                              "--root", str(data), "--epochs", "2"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    assert retrain.returncode == 0, retrain.stderr[-2000:]
    after = evaluate(compose_eval(*overrides, output_dir=tmp_path / "b"))
    shutil.rmtree(data / "fidelity" / "cache")
    fresh = evaluate(compose_eval(*overrides, output_dir=tmp_path / "c"))
    assert fid(after) == pytest.approx(fid(fresh), rel=1e-6)
    assert fid(after) != pytest.approx(fid(first), rel=1e-3)  # the classifier did change
    assert after["results"][0]["feature_extractor"] != first["results"][0]["feature_extractor"]  # its hash


def test_grayscale_and_rgb_references_of_one_folder_never_share_statistics(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    gray, rgb = (read_image_folder(tmp_path / "images", True, image_size=32, channels=c) for c in (1, 3))
    weights = resolve_inception_weights("fid-helper", tmp_path / "weights")

    def rgb_fid(reference, cache):  # the same generated images (the RGB folder) against `reference`
        rows = fidelity_metrics(rgb, reference, ["fid"], "inception", weights, tmp_path / cache, "image_folder-train")
        return rows[0]["value"]

    against_gray = rgb_fid(gray, "shared")
    against_rgb = rgb_fid(rgb, "shared")  # same name, same size and count: only the channels differ
    assert against_rgb == pytest.approx(rgb_fid(rgb, "fresh"), rel=1e-6, abs=1e-6)
    assert against_gray > against_rgb + 1  # so reusing the grayscale statistics would have been wrong
