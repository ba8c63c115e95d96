"""Every notebook runs top to bottom, as a real process, on a checkpoint and a sweep made in the test."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddpmlab.evaluation import evaluate
from ddpmlab.training import train
from tests.conftest import ROOT, compose_config
from tests.test_evaluate import compose_eval

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# What each notebook must print: proof that it ran on the test's own checkpoint or sweep.
MARKERS = {
    "01_forward_process.ipynb": ["test images; T = 1000", "cosine"],
    "02_sampling.ipynb": ["T=50", "NLL ", "samplers: ancestral, respaced, ddim, dpm_solver"],
    "04_paper_figures.ipynb": ["T=50, prediction=eps", "Fig. 6: progressive generation", "Fig. 7: shared latents at t = "
                               "[50, 38, 25, 12]", "Figs. 8 and 9", "rate + distortion = bound"],
    "03_sweep_results.ipynb": ["2 runs, varying ['schedule']", "nll_estimate (bits/dim)", "wandb: not logged in",
                               # one run's two sampling settings, each in a column of its own
                               "fid (ddim, 3 steps, inception-2015-12-05)",
                               "fid (dpm_solver, 3 steps, inception-2015-12-05)"],
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A smoke checkpoint, and a two-schedule sweep whose runs were each evaluated into <run>/eval.

    Run 0 also has FID for two samplers in <run>/eval_fid, against a data root whose Fashion-MNIST is the
    smoke run's (linked), so that the Inception weights and statistics are written under the test's folder.
    """
    root = tmp_path_factory.mktemp("notebooks")
    train(compose_config("experiment=smoke", output_dir=root / "run"))
    sweep = root / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "experiment=smoke", "schedule=linear,cosine",
                             "trainer.max_steps=4", "callbacks.sample_grid.every_n_steps=0",
                             f"hydra.sweep.dir={sweep}"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    for run in ("0", "1"):
        evaluate(compose_eval(f"ckpt={sweep / run / 'checkpoints' / 'last.ckpt'}", "metrics=[nll_estimate]",
                              "nll_estimate.num_images=4", "nll_estimate.timesteps=2", output_dir=sweep / run / "eval"))
    data = root / "data"
    data.mkdir()
    (data / "FashionMNIST").symlink_to(Path(compose_config("experiment=smoke").data.root) / "FashionMNIST")
    evaluate(compose_eval(f"ckpt={sweep / '0' / 'checkpoints' / 'last.ckpt'}", f"data_root={data}", "metrics=[fid]",
                          "feature_extractor=inception", "inception_weights=fid-helper", "num_samples=8",
                          "reference_images=8", "sampler=[ddim,dpm_solver]", "sampling_steps=3",
                          output_dir=sweep / "0" / "eval_fid"))
    return {"ckpt": root / "run" / "checkpoints" / "last.ckpt", "sweep": sweep, "home": root / "home"}


def test_every_notebook_has_its_checks():
    assert [p.name for p in NOTEBOOKS] == sorted(MARKERS)


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(notebook, made):
    cells = json.loads(notebook.read_text())["cells"]
    assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code"), "outputs are stripped in git"
    code = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "DDPMLAB_CKPT": str(made["ckpt"]), "DDPMLAB_SWEEP": str(made["sweep"]), "HOME": str(made["home"])}
    env.pop("WANDB_API_KEY", None)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "notebooks", env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for marker in MARKERS[notebook.name]:
        assert marker in result.stdout, (marker, result.stdout[-2000:])
