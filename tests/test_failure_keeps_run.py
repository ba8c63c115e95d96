"""An error after the first step keeps the run: its folder, its logged steps and a last.ckpt at the step it reached,
named on the error's last line (issue 14.3). Real train.py processes; each error comes from a real input."""

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from ddpmlab.checkpoints import load_checkpoint
from ddpmlab.plots import read_curves
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

# The smoke run's address space peaks at about 4.0 GiB here (mapped libraries included): 6 GiB leaves it 2 GiB, and
# a step-3 sample grid of 100000 images asks for 9.4 GiB in one piece, so the allocator fails (no OOM killer).
ADDRESS_SPACE = 6 * 2**30


def train(cwd: Path, *overrides: str, address_space: int | None = None) -> subprocess.CompletedProcess:
    """`python train.py experiment=smoke ...` on the CPU, under `ulimit -v` when address_space is given."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "experiment=smoke", "trainer.accelerator=cpu", f"paths.log_dir={cwd}",
         *overrides], cwd=cwd, env=env, preexec_fn=limit if address_space else None, capture_output=True, text=True,
        timeout=600)


def last_line(result: subprocess.CompletedProcess) -> str:
    return [line for line in result.stderr.splitlines() if line.strip()][-1]


def assert_run_kept_at_step_3(run: Path) -> Path:
    """The run folder holds its logged steps and a loadable last.ckpt of step 3 (the smoke run checkpoints at step
    3 only after its sample grid, so this one is the error path's)."""
    ckpt = run / "checkpoints" / "last.ckpt"
    assert load_checkpoint(ckpt)["global_step"] == 3
    logged = (run / "csv" / "metrics.csv").read_text().splitlines()
    assert "train/loss" in logged[0] and len(logged) > 1
    return ckpt


def test_out_of_host_memory_mid_training_saves_the_step_and_names_it_in_one_line(tmp_path):
    result = train(tmp_path, "callbacks.sample_grid.num_samples=100000", address_space=ADDRESS_SPACE)
    run = next((tmp_path / "smoke").iterdir())
    ckpt = assert_run_kept_at_step_3(run)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = last_line(result)
    assert line.startswith("error: out of host memory (RuntimeError, ") and "lower data.batch_size" in line, line
    assert f"saved {ckpt} at step 3; continue this run with: python train.py experiment=smoke " in line
    assert line.endswith(f" callbacks.sample_grid.num_samples=100000 ckpt_path={ckpt} hydra.run.dir={run}")

    resumed = train(tmp_path, "ckpt_path=last")  # the saved state is a consistent one: the run continues from it
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(ckpt)["global_step"] == 6
    # ...in its own folder, where metrics.csv goes on below the steps logged before the error (Lightning's own
    # CSVLogger deleted them): the smoke run logs every 2nd step.
    curves = read_curves(run / "csv" / "metrics.csv")
    assert [step for step, _ in curves["train/loss"]] == [2, 4, 6]
    assert [step for step, _ in curves["val/bpd"]] == [6]


def test_a_bug_mid_training_keeps_its_traceback_and_saves_the_step(tmp_path):
    """A sample-grid folder that is a file fails at the first grid (step 3): an unexpected error, exit 1."""
    not_a_folder = tmp_path / "grids"
    not_a_folder.write_text("")
    result = train(tmp_path, f"callbacks.sample_grid.dirpath={not_a_folder}")
    run = next((tmp_path / "smoke").iterdir())
    ckpt = assert_run_kept_at_step_3(run)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "FileExistsError" in result.stderr
    assert f"saved {ckpt} at step 3" in result.stderr
