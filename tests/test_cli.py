"""`python train.py ...` as a user types it: real processes, real exit codes and messages."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def run_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_multirun_sweeps_schedules_into_one_folder_each(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train(str(ROOT / "train.py"), "-m", "experiment=smoke", "schedule=linear,cosine",
                       "trainer.max_steps=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0", "1"]
    for run, schedule in zip(runs, ("linear_betas", "cosine_betas")):
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert schedule in (run / "config_resolved.yaml").read_text()
        assert (run / "samples" / "final.png").is_file()


def test_smoke_run_without_wandb_never_imports_it(tmp_path):
    result = run_train("-X", "importtime", str(ROOT / "train.py"), "experiment=smoke", f"paths.log_dir={tmp_path}",
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "lightning" in result.stderr and "| wandb" not in result.stderr
    assert "├── data" in result.stdout and "dataset: fashion_mnist" in result.stdout  # the config tree
    run = next((tmp_path / "smoke").iterdir())
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / ".hydra" / "config.yaml").is_file()


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    return lines[-1]


@pytest.mark.parametrize(("override", "message"), [
    ("schedule.timesteps=0", "error: schedule.timesteps must be a positive integer"),
    ("data.image_size=27", "error: model: image size 27 cannot be halved"),
    ("data=mnist data.root=/nonexistent/folder", "error: data.root=/nonexistent/folder does not exist"),
    ("ckpt_path=/nonexistent/last.ckpt", "error: checkpoint /nonexistent/last.ckpt does not exist"),
])
def test_bad_config_values_end_with_one_line_and_exit_2(tmp_path, override, message):
    result = run_train(str(ROOT / "train.py"), "experiment=smoke", f"paths.log_dir={tmp_path}", *override.split(),
                       cwd=tmp_path)
    assert result.returncode == 2
    assert error_line(result).startswith(message), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "smoke").exists() or not any((tmp_path / "smoke").iterdir())  # no junk run folder


@pytest.mark.parametrize("users_file", ["experiments_2025.log", None])
def test_a_refused_start_never_removes_a_folder_it_did_not_create(tmp_path, users_file):
    """hydra.run.dir= an existing folder (the user's, holding their own .log file, or empty) and a bad value."""
    mine = tmp_path / "mine"
    mine.mkdir()
    if users_file:
        (mine / users_file).write_text("the user's notes\n")
    result = run_train(str(ROOT / "train.py"), "experiment=smoke", f"hydra.run.dir={mine}", "data.batch_size=0",
                       cwd=tmp_path)
    assert result.returncode == 2 and error_line(result).startswith("error: data.batch_size must be a positive integer")
    assert mine.is_dir()
    if users_file:
        assert (mine / users_file).read_text() == "the user's notes\n"


def test_unknown_group_option_names_the_choices(tmp_path):
    result = run_train(str(ROOT / "train.py"), "model=transformer", f"paths.log_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode != 0
    assert "Could not find 'model/transformer'" in result.stderr and "unet_cifar10" in result.stderr


def test_unreadable_image_and_mismatched_checkpoint_are_refused_and_nothing_is_overwritten(tmp_path):
    first = run_train(str(ROOT / "train.py"), "experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    digest = hashlib.sha256(last.read_bytes()).hexdigest()

    # Resuming with another model is refused by the stored-config check, naming the key;
    # starting afresh from those weights (init_from) by the weights' own shapes.
    resumed = run_train(str(ROOT / "train.py"), "experiment=smoke", "model.ch=64", f"ckpt_path={last}",
                        f"paths.log_dir={tmp_path / 'logs'}", cwd=tmp_path)
    assert resumed.returncode == 2 and "model.ch" in error_line(resumed), resumed.stderr[-2000:]
    mismatched = run_train(str(ROOT / "train.py"), "experiment=smoke", "model.ch=64", f"init_from={last}",
                           f"paths.log_dir={tmp_path / 'logs'}", cwd=tmp_path)
    assert mismatched.returncode == 2 and "does not match the model" in error_line(mismatched)

    same_folder = run_train(str(ROOT / "train.py"), "experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}",
                            cwd=tmp_path)
    assert same_folder.returncode == 2 and "already holds checkpoints of an earlier run" in error_line(same_folder)

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32)).save(images / "ok.png")
    (images / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    unreadable = run_train(str(ROOT / "train.py"), "experiment=ddpm_cifar10", "data=image_folder",
                           f"data.root={images}", f"paths.log_dir={tmp_path / 'logs'}", cwd=tmp_path)
    assert unreadable.returncode == 2 and "cannot read image" in error_line(unreadable)
    assert "truncated.jpg" in error_line(unreadable)

    assert hashlib.sha256(last.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["last.ckpt"]
