"""val/bpd: the bound estimate on fixed test images, a function of the weights alone, and what train.py returns."""

import csv
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from ddpmlab.callbacks import ValidationBound
from ddpmlab.checkpoints import load_checkpoint
from ddpmlab.errors import ConfigError
from ddpmlab.evaluation import evaluate
from ddpmlab.module import METRICS
from ddpmlab.training import build, build_module, train
from tests.conftest import ROOT, compose_config
from tests.test_evaluate import compose_eval


def val_rows(run_dir) -> list[tuple[int, float]]:
    """(step, val/bpd) of each row of the run's metrics.csv that has one."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [(int(r["step"]), float(r["val/bpd"])) for r in csv.DictReader(f) if r.get("val/bpd")]


def train_losses(run_dir) -> list[str]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")]


def bpd_in_this_process(ckpt, **val) -> float:
    """val/bpd of a checkpoint's EMA weights computed by one process, with the run's val settings."""
    checkpoint = load_checkpoint(ckpt)
    cfg = OmegaConf.create(checkpoint["config"])
    module = build_module(cfg)
    module.load_state_dict(checkpoint["state_dict"])
    data = build(cfg.data)
    data.setup("test")
    return ValidationBound(data.test_images, **{**cfg.val, **val}).bpd(module)


def run_train_py_main(*overrides, output_dir):
    """train.py's @hydra.main function as Hydra calls it, in this process; returns what it returns."""
    spec = importlib.util.spec_from_file_location("train_entry", ROOT / "train.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.paths.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    try:
        with open_dict(cfg):
            del cfg["hydra"]  # as @hydra.main hands it over
        return entry.main(cfg)  # a DictConfig argument is passed straight through to the function
    finally:
        HydraConfig.instance().cfg = None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two smoke runs of the same seed: `every` also computes val/bpd at step 3, `plain` only at the end
    (through train.py's main function, which returns optimized_metric's value)."""
    root = tmp_path_factory.mktemp("val_bpd")
    every = train(compose_config("experiment=smoke", "val.every_n_steps=3", "val.batch_size=3",
                                 output_dir=root / "every"))
    returned = run_train_py_main("experiment=smoke", output_dir=root / "plain")
    return {"root": root, "every": every, "returned": returned}


def test_val_bpd_is_logged_and_train_py_returns_it(runs):
    plain = val_rows(runs["root"] / "plain")
    assert [step for step, _ in plain] == [6]
    assert runs["returned"] == plain[0][1], "optimized_metric defaults to val/bpd: train.py returns it"
    assert 0 < runs["returned"] < 16  # bits/dim of 8-bit images: a wrong scale (nats, sums) would leave this range


def test_the_same_weights_give_the_same_val_bpd_in_any_run(runs):
    """The run that also validated at step 3 (in batches of 3, not 64) trained the very same weights: computing
    val/bpd drew nothing from the training's random stream, and its value at the end is the other run's."""
    every, plain = runs["root"] / "every", runs["root"] / "plain"
    assert train_losses(every) == train_losses(plain)
    assert val_rows(every)[-1] == val_rows(plain)[-1]
    torch.manual_seed(12345)  # another global RNG state, another batch size: the same value
    assert bpd_in_this_process(every / "checkpoints" / "last.ckpt", batch_size=5) == val_rows(plain)[-1][1]


def test_val_bpd_changes_with_the_weights(runs):
    (step_3, at_3), (step_6, at_6) = val_rows(runs["root"] / "every")
    assert (step_3, step_6) == (3, 6) and at_3 != at_6


def test_every_metric_optimized_metric_may_name_is_returned(runs):
    assert set(METRICS) | {"val/bpd"} <= set(runs["every"])


def test_val_bpd_is_evaluate_nll_estimate_on_the_same_images_and_noise(runs, tmp_path):
    """evaluate.py's nll_estimate draws with its seed + 1: seed=0 there is val.seed=1, the default."""
    ckpt = runs["root"] / "plain" / "checkpoints" / "last.ckpt"
    record = evaluate(compose_eval(f"ckpt={ckpt}", "metrics=[nll_estimate]", "seed=0", "nll_estimate.num_images=8",
                                   "nll_estimate.timesteps=4", "batch_size=64", output_dir=tmp_path))
    assert record["results"][0]["value"] == val_rows(runs["root"] / "plain")[-1][1]


@pytest.mark.slow
def test_one_and_two_processes_give_the_same_val_bpd(tmp_path):
    """train.py on 2 gloo processes (val batches of 2 dealt to the ranks in turn) against one process on the
    weights it trained."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "experiment=smoke", "trainer=ddp",
                           "trainer.accelerator=cpu", "trainer.devices=2", "val.batch_size=2",
                           f"hydra.run.dir={tmp_path / 'ddp'}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [(step, two)] = val_rows(tmp_path / "ddp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each DDP process ran
    try:
        one = bpd_in_this_process(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    finally:
        torch.set_num_threads(threads)
    assert step == 6 and two == one


@pytest.mark.slow
def test_an_unknown_optimized_metric_is_one_line_and_exit_2_before_training(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "experiment=smoke", "optimized_metric=val/fid",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: optimized_metric='val/fid' is no metric this run logs: choose one of train/loss"), \
        done.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize(("overrides", "message"), [
    (["val.num_images=0"], r"optimized_metric='val/bpd' is no metric this run logs \(val.num_images=0 turns"),
    (["val.timesteps=0"], r"val.timesteps must be a whole number >= 1, got 0"),
])
def test_bad_val_settings_are_refused_before_training(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(compose_config("experiment=smoke", *overrides, output_dir=tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_a_test_split_under_num_images_is_used_whole():
    """A small held-out folder still gets its val/bpd: num_images caps the images, it does not demand them."""
    images = torch.zeros(3, 1, 28, 28, dtype=torch.uint8)
    assert len(ValidationBound(images, num_images=256).images) == 3
