"""Hydra multiruns: sweep presets and launchers compose, a parallel sweep ends with its summary, and a failed run
is recorded without ending the sweep."""

import csv
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ddpmlab.plots import read_curves
from ddpmlab.sweeps import record_status, summarise
from tests.conftest import REFUSALS, ROOT, refusal_cases, wandb_record


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
    assert [(r["run"], r["schedule"], r["steps"], r["checkpoint"], r["status"], r["exit"]) for r in rows] == [
        ("0", "linear", "4", "yes", "ok", "0"), ("1", "cosine", "4", "yes", "ok", "0")]
    assert all(0 < float(r["train/loss (last)"]) < 10 for r in rows)
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


def test_summary_gives_each_runs_last_logged_values_and_its_outcome(tmp_path):
    """Three run folders as a multirun leaves them: finished, failed (status.json says why), killed (no status)."""
    for run, lr, exit_code in (("0", "1e-3", 0), ("1", "1e5", 3), ("2", "3e-4", None)):
        (tmp_path / run / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create([f"optim.lr={lr}"]), tmp_path / run / ".hydra" / "overrides.yaml")
        (tmp_path / run / "csv").mkdir()
        (tmp_path / run / "csv" / "metrics.csv").write_text(
            "epoch,step,train/loss\n" + "".join(f"0,{s},{v}\n" for s, v in enumerate([4.0, 3.0, 2.0, 1.0, 0.5, 0.25])))
        if exit_code is not None:
            record_status(tmp_path / run, exit_code, "" if exit_code == 0 else "error: NaN at step 3 | say why")
    rows = summarise(tmp_path)
    assert [(r["run"], r["optim.lr"], r["status"], r["exit"]) for r in rows] == [
        ("0", "1e-3", "ok", 0), ("1", "1e5", "failed", 3), ("2", "3e-4", "unknown", "")]
    assert rows[1]["reason"] == "error: NaN at step 3 | say why" and "killed" in rows[2]["reason"]
    assert all(r["train/loss (last)"] == 0.25 and r["steps"] == 6 for r in rows)  # the last point, not a mean


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "local_parallel"])
def test_runs_refused_or_failed_are_recorded_and_the_sweep_goes_on(tmp_path, launcher):
    """One run per refusal class before training (schema value, rule between keys, memory check, unwritable
    folder), one that diverges (exit 3 alone) and one that trains: every run runs, the summary says which failed
    and why, and the multirun exits 4 with one line. Every launcher runs a job through the same train.py task."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "experiment=smoke", f"+case={','.join(REFUSALS)}",
         refusal_cases(tmp_path / "conf"), "trainer.max_steps=4", "callbacks.sample_grid.every_n_steps=0",
         f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 4, result.stderr[-2000:]
    failed = ", ".join(f"run {n} (exit {3 if name == 'diverges' else 2})"
                       for n, name in enumerate(REFUSALS) if name != "ok")
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: 5 of 6 runs failed, {failed}: {sweep / 'summary.md'} says why")
    with open(sweep / "summary.csv", newline="") as f:
        rows = {row["+case"]: row for row in csv.DictReader(f)}
    assert list(rows) == list(REFUSALS)
    for name, (_, reason) in REFUSALS.items():
        row = rows[name]
        if name == "ok":
            assert (row["status"], row["exit"], row["reason"], row["steps"], row["checkpoint"]) == ("ok", "0", "", "4", "yes")
            continue
        assert (row["status"], row["exit"], row["checkpoint"]) == ("failed", "3" if name == "diverges" else "2", "no")
        assert row["reason"].startswith(reason), (name, row["reason"])
    last_loss = read_curves(sweep / "5" / "csv" / "metrics.csv")["train/loss"][-1][1]
    assert float(rows["ok"]["train/loss (last)"]) == last_loss
    assert "| 4 | diverges | 2 |" in (sweep / "summary.md").read_text() and (sweep / "loss_curves.png").is_file()
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_ddp_sweep_runs_each_job_once_in_its_own_folder(tmp_path):
    """Lightning starts DDP rank 1 with the parent's argv: in a multirun that was the whole sweep again."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "experiment=smoke", "schedule=linear,cosine",
         "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=2",
         "callbacks.sample_grid.every_n_steps=0", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0", "1"]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "outputs").exists()  # no stray default run folder
    for run, schedule in (("0", "linear"), ("1", "cosine")):
        assert (tmp_path / "sweep" / run / "checkpoints" / "last.ckpt").is_file()
        assert f"schedule={schedule}" in (tmp_path / "sweep" / run / ".hydra" / "overrides.yaml").read_text()
    assert result.stdout.count("sweep summary") == 1  # rank 1 ran one job, not a sweep of its own
