"""Hydra multiruns: sweep presets and launchers compose, and a parallel sweep ends with its summary."""

import csv
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import ROOT, wandb_record


def compose_with_hydra(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def test_sweep_presets_and_launchers_compose():
    grid = compose_with_hydra("sweep=schedule_loss_lr").hydra.sweeper.params
    assert dict(grid) == {"schedule": "linear,cosine", "diffusion": "ddpm,iddpm", "optim.lr": "1e-3,3e-4"}
    local = compose_with_hydra("hydra/launcher=local_parallel").hydra.launcher
    assert local._target_.endswith("JoblibLauncher") and local.n_jobs == 2
    slurm = compose_with_hydra("hydra/launcher=slurm").hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.timeout_min == 1440 and slurm.gpus_per_node == 1
    assert slurm.signal_delay_s == 120  # SLURM's SIGTERM arrives early enough for the preemption checkpoint
    assert compose_with_hydra().hydra.callbacks.sweep_summary._target_ == "ddpmlab.sweeps.SweepSummary"


def protobuf_string(field: int, text: str) -> bytes:
    """A protobuf string field as it is stored: tag (field number, wire type 2), length, bytes."""
    return bytes([field << 3 | 2, len(text)]) + text.encode()


@pytest.mark.slow
def test_parallel_sweep_over_two_schedules_runs_and_writes_its_summary(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "experiment=smoke", "schedule=linear,cosine",
         "hydra/launcher=local_parallel", "trainer.max_steps=4", "callbacks.sample_grid.every_n_steps=0",
         "logger=[csv,wandb]", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    sweep = tmp_path / "sweep"
    for run in ("0", "1"):
        assert (sweep / run / "checkpoints" / "last.ckpt").is_file()
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["schedule"], r["steps"], r["checkpoint"]) for r in rows] == [
        ("0", "linear", "4", "yes"), ("1", "cosine", "4", "yes")]
    assert all(0 < float(r["train/loss"]) < 10 for r in rows)
    assert "| 1 | cosine | 4 |" in (sweep / "summary.md").read_text()
    assert (sweep / "loss_curves.png").stat().st_size > 5000
    assert "sweep summary" in result.stdout
    # wandb: each run's record holds its run fields group = the sweep folder's name and tags = [experiment].
    from wandb.proto.wandb_internal_pb2 import RunRecord

    fields = RunRecord.DESCRIPTOR.fields_by_name
    for run in ("0", "1"):
        record = wandb_record(next((sweep / run / "wandb").glob("offline-run-*")), b"train/loss")
        assert protobuf_string(fields["run_group"].number, "sweep") in record
        assert protobuf_string(fields["tags"].number, "smoke") in record
