"""Under DDP each rank draws its own t, eps and dropout masks, and a resumed 2-process run continues every rank's
stream exactly: real 2-process runs of train.py over gloo."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from ddpmlab.checkpoints import load_checkpoint
from tests.conftest import ROOT

DDP = ["experiment=smoke", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
       "trainer.deterministic=true", "callbacks.sample_grid=null", f"+callbacks.draws._target_={__name__}.RecordDraws"]


class RecordDraws(L.Callback):
    """Per step, the t and eps of the training loss as the network saw them: t from its first call in the step, eps
    recovered from that call's x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Ho et al. eq. 4).
    Saved at the end to $DRAWS_DIR/rank_<global rank>.pt."""

    def on_train_start(self, trainer, pl_module):
        self.draws, self.x_0 = [], None
        diffusion = pl_module.diffusion

        def record(module, args):
            if self.x_0 is None:  # a later call in the step (the logged bound) draws nothing new
                return
            x_t, t = args
            a, s = diffusion.sqrt_alphas_cumprod[t], diffusion.sqrt_one_minus_alphas_cumprod[t]
            eps = (x_t - a[:, None, None, None] * self.x_0) / s[:, None, None, None]
            self.draws.append({"step": trainer.global_step, "t": t.clone(), "eps": eps.detach().clone()})
            self.x_0 = None

        pl_module.model.register_forward_pre_hook(record)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.x_0 = batch.clone()

    def teardown(self, trainer, pl_module, stage):
        torch.save(self.draws, Path(os.environ["DRAWS_DIR"]) / f"rank_{trainer.global_rank}.pt")


def run(folder: Path, *overrides: str) -> dict:
    """train.py on 2 CPU processes over gloo; returns the final checkpoint and each rank's draws."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT),
           "DRAWS_DIR": str(folder)}
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *DDP, f"hydra.run.dir={folder / 'run'}",
                           *overrides], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"checkpoint": load_checkpoint(folder / "run" / "checkpoints" / "last.ckpt"),
            "draws": [torch.load(folder / f"rank_{r}.pt") for r in (0, 1)]}


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """6 steps in one go, a checkpoint at step 3."""
    return run(tmp_path_factory.mktemp("whole"), "trainer.max_steps=6", "callbacks.checkpoint.every_n_train_steps=3")


@pytest.mark.slow
def test_the_two_ranks_draw_different_t_and_eps(whole):
    rank_0, rank_1 = whole["draws"]
    assert [d["step"] for d in rank_0] == [d["step"] for d in rank_1] == list(range(6))
    for mine, theirs in zip(rank_0, rank_1):
        assert not torch.equal(mine["t"], theirs["t"]), mine["step"]
        assert not torch.allclose(mine["eps"], theirs["eps"], atol=1e-3), mine["step"]
    rng = whole["checkpoint"]["rng_states"]
    assert len(rng["other_ranks"]) == 1 and not torch.equal(rng["torch"], rng["other_ranks"][0]["torch"])


@pytest.mark.slow
def test_a_resumed_2_process_run_is_the_uninterrupted_one_bit_for_bit(whole, tmp_path):
    """3 steps, stop, resume for 3 == 6 in one go: weights, EMA, Adam, and each rank's draws after the resume."""
    half = run(tmp_path / "half", "trainer.max_steps=3")
    resumed = run(tmp_path / "resumed", "trainer.max_steps=6",
                  f"ckpt_path={tmp_path / 'half' / 'run' / 'checkpoints' / 'last.ckpt'}")
    assert half["checkpoint"]["global_step"] == 3 and resumed["checkpoint"]["global_step"] == 6
    for rank in (0, 1):
        after = [d for d in whole["draws"][rank] if d["step"] >= 3]
        assert [d["step"] for d in resumed["draws"][rank]] == [3, 4, 5]
        for expected, got in zip(after, resumed["draws"][rank]):
            assert torch.equal(expected["t"], got["t"]) and torch.equal(expected["eps"], got["eps"]), (rank, got["step"])
    expected, got = whole["checkpoint"], resumed["checkpoint"]
    for key, value in expected["state_dict"].items():  # model and EMA
        assert torch.equal(value, got["state_dict"][key]), key
    for index, state in expected["optimizer_states"][0]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, got["optimizer_states"][0]["state"][index][name]), (index, name)
    assert torch.equal(expected["rng_states"]["torch"], got["rng_states"]["torch"])
    assert torch.equal(expected["rng_states"]["other_ranks"][0]["torch"], got["rng_states"]["other_ranks"][0]["torch"])
