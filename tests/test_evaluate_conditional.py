"""evaluate.py on a class-conditional checkpoint: the guidance sweep, the class accuracy of the samples against the
classifier's ceiling, FID/KID per class, the NLL given the true labels and given "no class", the same numbers
from 1 and 2 processes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmlab.data import DiffusionDataModule, evaluation_subset
from ddpmlab.errors import ConfigError
from ddpmlab.evaluation import evaluate
from ddpmlab.metrics.fidelity import fidelity_metrics
from ddpmlab.models.classifier import classifier_path, load_classifier
from ddpmlab.training import train
from tests.conftest import compose_config
from tests.test_data import write_idx, write_mnist_like
from tests.test_evaluate import compose_eval

CLASSES = 10


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A conditional smoke checkpoint (T=50, 6 steps, 10 classes, label dropout 0.2) and a small data root in
    Fashion-MNIST's format (300 train, 60 test images) whose classes differ in brightness, so that the domain
    classifier trained on it has a ceiling well above chance."""
    root = tmp_path_factory.mktemp("evaluate_conditional")
    raw = root / "data" / "FashionMNIST" / "raw"
    write_mnist_like(raw, n_train=300, n_test=60)
    rng = np.random.default_rng(0)
    for split, n in (("train", 300), ("t10k", 60)):
        labels = np.arange(n) % CLASSES
        images = (rng.integers(0, 30, (n, 28, 28)) + labels[:, None, None] * 24).astype(np.uint8)
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
    train(compose_config("experiment=smoke", "model.num_classes=10", "diffusion.cond_drop_prob=0.2",
                         f"data.root={root / 'data'}", output_dir=root / "run"))
    return {"ckpt": str(root / "run" / "checkpoints" / "last.ckpt"), "data": str(root / "data"), "root": root}


def sweep(trained, out, *extra, metrics="[fid,kid,is]", num_samples=30):
    return evaluate(compose_eval(f"ckpt={trained['ckpt']}", f"data_root={trained['data']}", f"metrics={metrics}",
                                 "feature_extractor=classifier", f"num_samples={num_samples}", "sampler=ddim",
                                 "sampling_steps=3", "reference_images=200", *extra, output_dir=out))


def test_a_guidance_sweep_gives_every_metric_per_w_the_per_class_table_and_the_trade_off_plot(trained, tmp_path):
    record = sweep(trained, tmp_path, "guidance_scale=[0,1,4]")
    rows = record["results"]
    overall = {(r["metric"], r["guidance_scale"]): r for r in rows if "class" not in r}
    assert set(overall) == {(m, w) for m in ("fid", "kid", "is", "class_accuracy") for w in (0.0, 1.0, 4.0)}
    assert all(r["labels"] == "all" and r["samples"] == 30 for r in overall.values())
    per_class = [r for r in rows if isinstance(r.get("class"), int)]
    assert {(r["metric"], r["class"]) for r in per_class} == {(m, c) for m in ("fid", "kid", "class_accuracy")
                                                              for c in range(CLASSES)}
    assert all(r["samples_of_class"] == 3 for r in per_class)  # 30 samples, every class equally
    means = {(r["metric"], r["guidance_scale"]): r for r in rows if r.get("class") == "mean"}
    for w in (0.0, 1.0, 4.0):
        fids = [r["value"] for r in per_class if r["metric"] == "fid" and r["guidance_scale"] == w]
        assert means["fid", w]["value"] == pytest.approx(sum(fids) / CLASSES)
    # guidance changes the samples (w = 0 is the conditional model alone, same noise for every w)
    samples = {w: torch.load(tmp_path / f"samples_ddim_3_w{w}.pt") for w in (0, 1, 4)}
    assert not torch.equal(samples[0], samples[4])
    assert torch.load(tmp_path / "labels_ddim_3_w0.pt").tolist() == [i * CLASSES // 30 for i in range(30)]
    for name in ("guidance.png", "samples_by_class_ddim_3_w1.png", "per_class.md"):
        assert (tmp_path / name).stat().st_size > 500, name
    table = (tmp_path / "per_class.md").read_text()
    assert "| 9 Ankle boot |" in table and "guidance w=4" in table and "| mean of classes |" in table
    assert json.loads((tmp_path / "metrics.json").read_text())["class_names"][0] == "T-shirt/top"


def test_class_accuracy_is_the_classifiers_verdict_on_each_sample_with_its_test_accuracy_as_ceiling(trained, tmp_path):
    record = sweep(trained, tmp_path, "guidance_scale=2", "labels=[3,7]")
    rows = [r for r in record["results"] if r["metric"] == "class_accuracy"]
    classifier, _ = load_classifier(classifier_path(trained["data"], "fashion_mnist", 28))
    samples, labels = torch.load(tmp_path / "samples.pt"), torch.load(tmp_path / "labels.pt")
    assert labels.tolist() == [3, 7] * 15  # the list, in turn
    with torch.no_grad():
        predicted = classifier(samples.float() / 127.5 - 1).argmax(1)
    overall = next(r for r in rows if "class" not in r)
    assert overall["value"] == pytest.approx((predicted == labels).float().mean().item())
    for c in (3, 7):
        row = next(r for r in rows if r.get("class") == c)
        assert row["value"] == pytest.approx((predicted[labels == c] == c).float().mean().item())
    data = DiffusionDataModule("fashion_mnist", trained["data"], 28, 1, num_classes=CLASSES)
    data.setup("test")
    with torch.no_grad():
        test_predicted = classifier(data.test_images.float() / 127.5 - 1).argmax(1)
    ceiling = (test_predicted == data.test_labels).float()
    assert overall["ceiling"] == pytest.approx(ceiling.mean().item())
    assert next(r for r in rows if r.get("class") == 3)["ceiling"] == pytest.approx(
        ceiling[data.test_labels == 3].mean().item())
    assert next(r for r in rows if r.get("class") == 0)["value"] is None  # no sample of class 0 was asked for


def test_per_class_fid_is_the_fid_of_that_class_samples_against_that_class_reference(trained, tmp_path):
    """Computed here from the images themselves: the class's samples against the class's reference images, found
    through the data's own labels (so a reference whose labels were misaligned with its images would fail)."""
    record = sweep(trained, tmp_path, "guidance_scale=0")
    samples, labels = torch.load(tmp_path / "samples.pt"), torch.load(tmp_path / "labels.pt")
    data = DiffusionDataModule("fashion_mnist", trained["data"], 28, 1, num_classes=CLASSES)
    data.setup("fit")
    reference, reference_labels = evaluation_subset(data.train_images, 200), evaluation_subset(data.train_labels, 200)
    weights = str(classifier_path(trained["data"], "fashion_mnist", 28))
    for c in (0, 5):
        expected = {r["metric"]: r["value"] for r in fidelity_metrics(
            samples[labels == c], reference[reference_labels == c], ["fid", "kid"], "classifier", weights,
            tmp_path / "cache", f"class-{c}")}
        got = {r["metric"]: r["value"] for r in record["results"] if r.get("class") == c and r["metric"] != "class_accuracy"}
        assert got["fid"] == pytest.approx(expected["fid"], rel=1e-4)
        assert got["kid"] == pytest.approx(expected["kid"], rel=1e-3, abs=1e-6)


def test_the_nll_of_a_conditional_model_is_given_the_true_labels_and_given_no_class(trained, tmp_path):
    record = evaluate(compose_eval(f"ckpt={trained['ckpt']}", f"data_root={trained['data']}", "metrics=[nll,nll_estimate]",
                                   "nll.num_images=4", "nll_estimate.num_images=8", "nll_estimate.timesteps=3",
                                   output_dir=tmp_path))
    rows = {r["metric"]: r for r in record["results"]}
    assert set(rows) == {f"{m} given {g} (bits/dim)" for m in ("nll", "nll_estimate") for g in ("true labels", "no class")}
    assert rows["nll given true labels (bits/dim)"]["given"] == "true labels"
    assert record["nll_given_true_labels"]["bpd"] != record["nll_given_no_class"]["bpd"]
    assert len(record["nll_given_no_class"]["terms_bpd"]) == 50 and (tmp_path / "nll_per_t.png").is_file()


def test_val_bpd_of_a_conditional_run_is_evaluates_estimate_given_the_true_labels(tmp_path):
    """val/bpd during training is the bound given the test images' true labels, the same images and noise as
    evaluate.py's nll_estimate with seed = val.seed - 1; the run's guided grid has one row per class."""
    metrics = train(compose_config("experiment=smoke", "model.num_classes=10", "callbacks.sample_grid.num_samples=20",
                                   "callbacks.sample_grid.guidance_scale=1", output_dir=tmp_path / "run"))
    # the training grid: one row per class, 20 // 10 = 2 images each (28 + 2 pixels of padding a cell)
    assert Image.open(tmp_path / "run" / "samples" / "final.png").size == (2 * 30 + 2, 10 * 30 + 2)
    record = evaluate(compose_eval(f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", "metrics=[nll_estimate]",
                                   "nll_estimate.num_images=8", "nll_estimate.timesteps=4", "seed=0",
                                   output_dir=tmp_path / "eval"))
    rows = {r["metric"]: r["value"] for r in record["results"]}
    assert metrics["val/bpd"] == pytest.approx(rows["nll_estimate given true labels (bits/dim)"], abs=1e-4)
    assert metrics["val/bpd"] != pytest.approx(rows["nll_estimate given no class (bits/dim)"], abs=1e-4)


def test_one_and_two_processes_give_the_same_conditional_numbers(trained, tmp_path):
    common = ["nll_estimate.num_images=6", "nll_estimate.timesteps=2", "guidance_scale=[0,2]", "trainer.accelerator=cpu"]
    kwargs = {"metrics": "[nll_estimate,fid,kid]", "num_samples": 21}
    one = sweep(trained, tmp_path / "one", *common, "trainer.devices=1", **kwargs)
    two = sweep(trained, tmp_path / "two", *common, "trainer.devices=2", **kwargs)
    assert len(one["results"]) == len(two["results"]) > 40
    for a, b in zip(one["results"], two["results"]):
        assert (a["metric"], a.get("class"), a.get("guidance_scale")) == (b["metric"], b.get("class"), b.get("guidance_scale"))
        assert (a["value"] is None and b["value"] is None) or a["value"] == pytest.approx(b["value"], abs=1e-5), a
    for w in (0, 2):
        assert torch.equal(torch.load(tmp_path / "one" / f"samples_ddim_3_w{w}.pt"),
                           torch.load(tmp_path / "two" / f"samples_ddim_3_w{w}.pt"))


def test_labels_and_guidance_are_refused_before_any_network_call(trained, tmp_path):
    with pytest.raises(ConfigError, match=r"labels must be all or classes in 0..9 \(the 10 classes of checkpoint .*\), "
                                          r"got \[3, 10\]: e.g. labels=\[0,9\], or labels=all"):
        sweep(trained, tmp_path / "a", "labels=[3,10]")
    assert not (tmp_path / "a").exists()
