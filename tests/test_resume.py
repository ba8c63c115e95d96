"""A resume trains what its checkpoint was trained as: a change of what defines the training is refused in one
line, a change named in resume.allow_changes takes effect, free settings pass (with a note when the batches no
longer follow the uninterrupted run), and init_from starts a new run from a checkpoint's weights."""

import hashlib
import logging
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from ddpmlab.checkpoints import load_checkpoint
from ddpmlab.errors import ConfigError
from ddpmlab.training import train
from tests.conftest import ROOT, compose_config


@pytest.fixture(scope="module")
def last(tmp_path_factory):
    """checkpoints/last.ckpt of a 6-step smoke run (eps prediction, linear schedule, lr 1e-3, batch 8)."""
    run = tmp_path_factory.mktemp("resume") / "first"
    train(compose_config("experiment=smoke", "callbacks.sample_grid=null", output_dir=run))
    return run / "checkpoints" / "last.ckpt"


def _resume(last, output_dir, *overrides):
    return compose_config("experiment=smoke", "callbacks.sample_grid=null", f"ckpt_path={last}", *overrides,
                          output_dir=output_dir)


def _fingerprint(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_resuming_with_another_schedule_and_prediction_is_refused_in_one_line(last, tmp_path):
    """The issue's case as a command: one line naming each changed key old -> new and the fix, exit 2, the run
    folder and its checkpoint untouched, no folder left behind."""
    run = last.parent.parent
    before = _fingerprint(run)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "experiment=smoke", f"paths.log_dir={tmp_path}",
                             f"ckpt_path={last}", "schedule=cosine", "diffusion.prediction=v"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.stderr[-2000:]
    assert lines[-1].startswith(f"error: resuming {last} would change what it was trained as: ")
    assert ("schedule._target_ ddpmlab.diffusion.schedules.linear_betas -> ddpmlab.diffusion.schedules.cosine_betas"
            in lines[-1])
    assert "diffusion.prediction eps -> v" in lines[-1]
    assert "diffusion.betas" not in lines[-1]  # an interpolation of schedule: named at its source alone
    assert "resume.allow_changes=[schedule._target_,diffusion.prediction]" in lines[-1]
    assert "Traceback" not in result.stderr
    assert _fingerprint(run) == before
    assert not [p for p in tmp_path.rglob("*") if p.is_dir() and p.parent.name == "smoke"]


def test_allow_changes_switches_the_timestep_sampler_with_a_fresh_state_both_ways(last, tmp_path):
    """uniform -> importance: the importance sampler's loss history starts empty and fills from the resumed
    steps (it had refused the checkpoint, which has none); importance -> uniform: the history is dropped."""
    train(_resume(last, tmp_path / "importance", "timestep_sampler=importance", "trainer.max_steps=9",
                  "resume.allow_changes=[timestep_sampler]"))
    after = load_checkpoint(tmp_path / "importance" / "checkpoints" / "last.ckpt")
    assert after["global_step"] == 9 and after["config"]["timestep_sampler"]["_target_"].endswith("ImportanceTimesteps")
    assert after["state_dict"]["timestep_sampler.loss_counts"].sum() == 3 * 8  # steps 7-9 of batch 8 only
    train(_resume(tmp_path / "importance" / "checkpoints" / "last.ckpt", tmp_path / "uniform", "trainer.max_steps=10",
                  "resume.allow_changes=[timestep_sampler]"))
    again = load_checkpoint(tmp_path / "uniform" / "checkpoints" / "last.ckpt")
    assert again["global_step"] == 10 and not any(k.startswith("timestep_sampler.") for k in again["state_dict"])


def test_allow_changes_lets_the_learning_rate_change_and_the_new_rate_trains(last, tmp_path):
    with pytest.raises(ConfigError, match=r"would change what it was trained as: optim.lr 0.001 -> 0.0005: "):
        train(_resume(last, tmp_path / "refused", "optim.lr=5e-4"))
    with pytest.raises(ConfigError, match=r"resume.allow_changes names 'optim.lrr', which is no key of the config"):
        train(_resume(last, tmp_path / "typo", "optim.lr=5e-4", "resume.allow_changes=[optim.lrr]"))
    assert not (tmp_path / "refused").exists() and not (tmp_path / "typo").exists()

    train(_resume(last, tmp_path / "tuned", "optim.lr=5e-4", "resume.allow_changes=[optim.lr]", "trainer.max_steps=8"))
    after = load_checkpoint(tmp_path / "tuned" / "checkpoints" / "last.ckpt")
    assert after["global_step"] == 8 and after["config"]["optim"]["lr"] == 5e-4
    # Adam and the warm-up (2 steps, long done) were restored with lr 1e-3: the allowed change must still hold
    group = after["optimizer_states"][0]["param_groups"][0]
    assert group["lr"] == group["initial_lr"] == 5e-4
    assert after["lr_schedulers"][0]["base_lrs"] == [5e-4]


def test_free_settings_and_keys_an_older_checkpoint_lacks_resume_without_a_word(last, tmp_path, caplog):
    """More steps, the data moved to another folder, no sample grids, another NaN policy; and a checkpoint
    written before some keys existed (they are unknown, not changed)."""
    old = torch.load(last, map_location="cpu", weights_only=True)
    del old["config"]["diffusion"]["loss_weighting"], old["config"]["performance"]
    torch.save(old, tmp_path / "older.ckpt")
    moved = tmp_path / "data_elsewhere"
    moved.symlink_to(ROOT / "data")
    with caplog.at_level(logging.INFO, logger="ddpmlab"):
        train(_resume(tmp_path / "older.ckpt", tmp_path / "more", "trainer.max_steps=8", f"data.root={moved}",
                      "optim.on_nonfinite=skip", "trainer.log_every_n_steps=1"))
    assert load_checkpoint(tmp_path / "more" / "checkpoints" / "last.ckpt")["global_step"] == 8
    assert not [r for r in caplog.records if r.name.startswith("ddpmlab")]


def test_a_batch_size_change_resumes_and_says_exact_resume_no_longer_holds(last, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ddpmlab"):
        train(_resume(last, tmp_path / "smaller", "data.batch_size=4", "trainer.max_steps=8"))
    assert load_checkpoint(tmp_path / "smaller" / "checkpoints" / "last.ckpt")["global_step"] == 8
    notes = [r.getMessage() for r in caplog.records if r.name.startswith("ddpmlab")]
    assert len(notes) == 1 and "data.batch_size 8 -> 4" in notes[0], notes
    assert "exact resume no longer holds" in notes[0]


class RecordStart(L.Callback):
    """The step and the weights each fit starts from (class-level: train() builds the instance)."""

    starts: list = []

    def on_train_start(self, trainer, pl_module):
        RecordStart.starts.append((trainer.global_step, {k: v.clone() for k, v in pl_module.state_dict().items()}))


def test_init_from_starts_a_new_run_from_the_weights_with_other_settings(last, tmp_path):
    with pytest.raises(ConfigError, match="are both set: ckpt_path continues a run, init_from starts a new one"):
        train(_resume(last, tmp_path / "both", f"init_from={last}"))
    cfg = compose_config("experiment=smoke", "callbacks.sample_grid=null", "schedule=cosine", "diffusion.prediction=v",
                         f"init_from={last}", "trainer.max_steps=2", output_dir=tmp_path / "new")
    with open_dict(cfg):
        cfg.callbacks.recorder = {"_target_": f"{__name__}.RecordStart"}
    RecordStart.starts.clear()
    train(cfg)
    step, weights = RecordStart.starts[0]
    saved = load_checkpoint(last)["state_dict"]
    assert step == 0
    for key, value in weights.items():  # the network and its EMA, from the checkpoint
        if key.startswith(("model.", "ema_model.")):
            assert torch.equal(value, saved[key]), key
    after = load_checkpoint(tmp_path / "new" / "checkpoints" / "last.ckpt")
    assert after["global_step"] == 2 and after["config"]["diffusion"]["prediction"] == "v"
    assert after["optimizer_states"][0]["state"][0]["step"] == 2  # Adam's moments started afresh


def test_a_resume_in_another_precision_says_so_in_one_note(tmp_path):
    """A checkpoint trained in 32-true resumed in bf16-mixed (what `auto` now means on a CPU with native bf16) is
    let through with one note naming both and the override that keeps fp32; Lightning's short names and an `auto`
    that resolves to the checkpoint's own precision on this machine are the same precision: no note."""
    from ddpmlab.performance import trainer_precision
    from ddpmlab.resume import check_resume

    cfg = compose_config("experiment=smoke", output_dir=tmp_path)
    stored = OmegaConf.to_container(cfg, resolve=True)

    def resumed(before, after):
        old = {**stored, "trainer": {**stored["trainer"], "precision": before}}
        new = {**stored, "trainer": {**stored["trainer"], "precision": after}}
        return check_resume(old, new, cfg, "last.ckpt")

    changed, notes = resumed("32-true", "bf16-mixed")
    assert changed == [] and len(notes) == 1, notes
    assert "in bf16-mixed" in notes[0] and "trained in 32-true" in notes[0]
    assert "trainer.precision=32-true keeps it" in notes[0]
    assert resumed(32, "32-true") == resumed("bf16", "bf16-mixed") == ([], [])
    auto = trainer_precision({**stored["trainer"], "precision": "auto"})
    assert resumed(auto, "auto") == ([], [])
    other = "32-true" if auto == "bf16-mixed" else "bf16-mixed"
    assert len(resumed(other, "auto")[1]) == 1
