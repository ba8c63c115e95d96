"""Multi-node training through SLURM: the launcher's job and Lightning's ranks agree, and a job stopped by its
time-limit signal saves, is requeued and continues where it stopped."""

import os
import signal
import subprocess
import sys

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf

from ddpmlab.checkpoints import load_checkpoint
from ddpmlab.errors import ConfigError
from ddpmlab.performance import trainer_precision
from ddpmlab.training import train
from tests.conftest import ROOT, compose_config

# What SLURM sets for task 13 of a 4-node x 8-task job (srun, one task per GPU): node 1, its 6th task.
SLURM_TASK_13 = {"SLURM_NTASKS": "32", "SLURM_NTASKS_PER_NODE": "8", "SLURM_NNODES": "4", "SLURM_NODEID": "1",
                 "SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train",
                 "SLURM_NODELIST": "gpu[01-04]"}


def compose_job(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=["hydra/launcher=slurm_ddp", "trainer=ddp", *overrides],
                       return_hydra_config=True)


def test_slurm_ddp_asks_for_n_nodes_of_g_gpus_with_a_task_each_and_lightning_reads_the_same_ranks(monkeypatch):
    cfg = compose_job("trainer.num_nodes=4", "trainer.devices=8")
    params = instantiate(cfg.hydra.launcher).params  # the submitit plugin's SlurmLauncher: what goes to sbatch
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (4, 8, 8)
    assert params["max_num_timeout"] >= 1 and params["additional_parameters"] == {"requeue": True}

    for key, value in SLURM_TASK_13.items():
        monkeypatch.setenv(key, value)
    for key in ("MASTER_ADDR", "MASTER_PORT"):  # absent, as under srun; Lightning writes both into os.environ
        monkeypatch.delenv(key, raising=False)
    trainer = instantiate(cfg.trainer, accelerator="cpu", logger=False, enable_checkpointing=False,
                          precision=trainer_precision(cfg.trainer))
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (4, 8, 32)
    assert (trainer.global_rank, trainer.node_rank, trainer.local_rank) == (13, 1, 5)
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert trainer.strategy.cluster_environment.main_address == "gpu01"


def test_slurm_ddp_follows_other_sizes_and_a_single_node_stays_the_default():
    cfg = compose_job("trainer.num_nodes=2", "trainer.devices=4")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)
    assert compose_job().trainer.num_nodes == 1


class PreemptOnce(L.Callback):
    """Sends this process SIGUSR2, the signal a SLURM job under submitit gets before its time limit, after step 3 of
    a run that did not resume (the requeued part runs to the end)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3 and trainer.ckpt_path is None:
            os.kill(os.getpid(), signal.SIGUSR2)


@pytest.mark.slow
def test_a_submitit_job_saves_on_its_time_limit_signal_is_requeued_and_continues_in_its_folder(tmp_path):
    """submitit's local executor runs the job as SLURM would (the same signal handler, requeue on its exit code):
    SIGUSR2 -> last.ckpt at the next step -> submitit requeues -> the job resumes from it and finishes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    sweep = tmp_path / "sweep"
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local",
                           "experiment=smoke", "trainer.max_steps=8", "callbacks.checkpoint.every_n_train_steps=100",
                           "callbacks.sample_grid=null", f"hydra.sweep.dir={sweep}",
                           f"+callbacks.preempt._target_={__name__}.PreemptOnce"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    job_logs = "".join(p.read_text() for p in sorted(sweep.glob(".submitit/*/*_log.*")))
    assert done.returncode == 0, done.stderr[-2000:] + job_logs[-3000:]
    assert "Caught signal SIGUSR2" in job_logs and "Requeued job" in job_logs, job_logs[-3000:]
    run = sweep / "0"
    last = run / "checkpoints" / "last.ckpt"  # no periodic checkpoint before step 100: the signal's save
    assert f"requeued job: continuing from {last}" in job_logs and f"Restored all states from the checkpoint at {last}" \
        in job_logs, job_logs[-3000:]
    assert load_checkpoint(last)["global_step"] == 8
    assert (run / "config_resolved_1.yaml").is_file()  # the second part ran in the same folder


def test_a_job_slurm_requeued_continues_from_its_folder_and_a_fresh_start_there_is_still_refused(tmp_path,
                                                                                               monkeypatch):
    """After preemption SLURM itself requeues the job (--requeue): the same command in the same folder, with
    SLURM_RESTART_COUNT set. Without it a start in a folder holding checkpoints is refused, as before."""
    def smoke(max_steps):
        return compose_config("experiment=smoke", f"trainer.max_steps={max_steps}", "callbacks.sample_grid=null",
                              "++val.num_images=0", "++optimized_metric=null", output_dir=tmp_path / "run")

    train(smoke(3))
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(smoke(6))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    train(smoke(6))
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 6


def test_a_requeued_resume_continues_from_its_own_folder_not_from_where_it_started(tmp_path, monkeypatch):
    """A job started as `ckpt_path=OTHER` and requeued after saving its own steps goes on from its own last.ckpt
    (the first start's checkpoint is behind it; a start in a folder with checkpoints would be refused)."""
    def smoke(max_steps, folder, *extra):
        return compose_config("experiment=smoke", f"trainer.max_steps={max_steps}", "callbacks.sample_grid=null",
                              "++val.num_images=0", "++optimized_metric=null", *extra, output_dir=tmp_path / folder)

    train(smoke(3, "first"))
    started = f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}"
    train(smoke(4, "job", started))  # the job's first part, stopped at step 4
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    train(smoke(6, "job", started))
    assert load_checkpoint(tmp_path / "job" / "checkpoints" / "last.ckpt")["global_step"] == 6
