"""Every notebook runs top to bottom, as a real process, on a checkpoint trained in the test."""

import json
import os
import subprocess
import sys

import pytest

from ddpmlab.training import train
from tests.conftest import ROOT, compose_config

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(notebook, tmp_path):
    train(compose_config("experiment=smoke", output_dir=tmp_path / "run"))
    cells = json.loads(notebook.read_text())["cells"]
    code = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "DDPMLAB_CKPT": str(tmp_path / "run" / "checkpoints" / "last.ckpt")}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "notebooks", env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "T=50" in result.stdout  # the smoke checkpoint was the one explored
