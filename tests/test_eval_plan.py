"""evaluate.py says what it will do and what it will cost before it starts, shows every long phase's progress in its
log file, caps a CPU's reference pass, and `make eval` finds the newest train.py run."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddpmlab.evaluation import reference_count
from tests.conftest import ROOT
from tests.test_evaluate import compose_eval, trained  # noqa: F401 (the fixture)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.mark.slow
def test_plan_and_estimate_come_before_sampling_and_every_phase_is_in_the_log(trained, tmp_path):  # noqa: F811
    data = tmp_path / "data"  # a data root of its own: no cached reference features, so the reference pass runs
    shutil.copytree(Path(trained["data"]) / "FashionMNIST", data / "FashionMNIST")
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), f"ckpt={trained['ckpt']}", f"data_root={data}",
         "metrics=[nll_estimate,fid,kid]", "feature_extractor=classifier", "num_samples=6", "sampler=ddim",
         "sampling_steps=2", "nll_estimate.num_images=4", "nll_estimate.timesteps=2", "cpu_reference_images=50",
         "trainer.accelerator=cpu", f"hydra.run.dir={run}"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "evaluation plan:" in done.stdout and "estimate (" in done.stdout  # on the console
    log = (run / "evaluate.log").read_text().splitlines()

    def first(text: str) -> int:
        return next(i for i, line in enumerate(log) if text in line)

    plan = first("evaluation plan:")
    assert "samples: 6 x ddim, 2 steps (12 network calls)" in log[first("  samples:")]
    assert "50 of 200 training images at random (seed 0), capped on a CPU by cpu_reference_images=50" in log[
        first("reference:")]
    estimate = log[first("estimate (")]
    assert "ms per image per network call" in estimate and "features (reference) ~" in estimate
    # The plan and estimate come before any phase's work; each phase's progress reaches the log file.
    phases = ["NLL (estimate): 1/1", "sampling (ddim, 2 steps): 1/1", "features (samples): 1/1",
              "features (reference): 1/1"]
    assert plan < first("estimate (") < min(first(p) for p in phases)
    assert first("estimate after the first batch of sampling") < first("features (samples): 1/1")
    record = json.loads((run / "metrics.json").read_text())
    assert record["reference"]["images"] == 50 and "capped on a CPU" in record["reference"]["what"]
    assert {r["reference_images"] for r in record["results"] if r["metric"] in ("fid", "kid")} == {50}
    assert record["estimated_seconds"] > 0


def test_reference_images_auto_caps_a_cpu_but_not_a_gpu_and_a_number_wins(tmp_path):
    cfg = compose_eval("ckpt=x", output_dir=tmp_path)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert cfg.reference_images == "auto" and cfg.cpu_reference_images == 2000
    n, why = reference_count(cfg, 60000, cpu)
    assert n == 2000 and "capped on a CPU by cpu_reference_images=2000 (reference_images=null for all 60000)" == why
    assert reference_count(cfg, 60000, gpu) == (60000, "all of them")
    assert reference_count(cfg, 1500, cpu) == (1500, "all of them")  # a split under the cap is not capped
    assert reference_count(compose_eval("ckpt=x", "reference_images=null", output_dir=tmp_path), 60000, cpu)[0] == 60000
    assert reference_count(compose_eval("ckpt=x", "reference_images=5000", output_dir=tmp_path), 60000, cpu)[0] == 5000


def make_eval(log_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "-C", str(ROOT), "-o", ".venv/.installed-stamp", "eval",
                           f"ARGS=paths.log_dir={log_dir} hydra.run.dir={cwd / 'out'}"],
                          cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_make_eval_takes_the_newest_train_run(tmp_path):
    """`make eval` is ckpt=last over runs/train/*: the newer run's checkpoint (here unreadable, so the command ends
    at loading it, before any work) is the one it names; with no run it says to train first."""
    for name, age in (("older", 100), ("newer", 0)):
        ckpt = tmp_path / "logs" / "train" / name / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"not a checkpoint")
        os.utime(ckpt, (time.time() - age, time.time() - age))
    done = make_eval(tmp_path / "logs", tmp_path)
    assert done.returncode == 2 and "newer/checkpoints/last.ckpt" in done.stderr and "older" not in done.stderr, \
        done.stderr[-2000:]
    empty = make_eval(tmp_path / "nothing", tmp_path)
    assert empty.returncode == 2 and "ckpt=last: no run of task 'train' has a checkpoint" in empty.stderr


def test_the_ancestral_chain_is_one_point_of_a_sweep_over_steps():
    """sampler=[ancestral,heun] sampling_steps=[5,10]: the full chain once (all T), every other sampler at each count;
    a single count other than T still goes to check_steps, which refuses it for ancestral."""
    from omegaconf import OmegaConf

    from ddpmlab.eval_plan import sampling_settings

    sweep = OmegaConf.create({"sampler": ["ancestral", "heun"], "sampling_steps": [5, 10]})
    assert sampling_settings(sweep) == [("ancestral", None), ("heun", 5), ("heun", 10)]
    alone = OmegaConf.create({"sampler": ["ancestral", "heun"], "sampling_steps": 5})
    assert sampling_settings(alone) == [("ancestral", 5), ("heun", 5)]
