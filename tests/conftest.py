"""Shared fixtures: the real Hydra config, composed once per test and shrunk to run in seconds."""

import os
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DDPMLAB_ROOT", str(ROOT))
if "PYTEST_XDIST_WORKER" in os.environ:  # `make test`: 2 workers on the CI machine's 2 cores, one thread each
    os.environ["OMP_NUM_THREADS"] = "1"  # (two processes that each take both cores run several times slower)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)

# torch's collective timeout (torch.distributed.constants.default_pg_timeout, Lightning's too): a DDP rank left
# waiting in a collective for one that died would hang this long. Tests that a job ends bound it at a third of
# this, not at a wall-clock figure this machine's load can exceed (90 s failed at 98 and 106 s under load).
COLLECTIVE_TIMEOUT_S = 1800


def compose_config(*overrides: str, output_dir: Path | None = None) -> DictConfig:
    """conf/config.yaml with `overrides`, as `python train.py overrides...` would see it."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture(autouse=True)
def _process_state_as_it_was():
    """Every test leaves os.environ and Lightning's process rank as it found them. Libraries set both as a side
    effect: Lightning's SLURM environment writes MASTER_ADDR=<first SLURM node> (inherited by a later test's DDP
    processes, their rendezvous waited on a host that does not exist until the timeout), seeding writes
    PL_GLOBAL_SEED, and a Trainer built with rank 13 leaves rank_zero_only.rank = 13, after which every later
    in-process run believed it was not rank 0 and its CSV logger wrote nothing."""
    before = dict(os.environ)
    rank_zero = sys.modules.get("lightning_utilities.core.rank_zero")
    rank = getattr(rank_zero.rank_zero_only, "rank", None) if rank_zero else None
    yield
    if os.environ != before:
        os.environ.clear()
        os.environ.update(before)
    if rank_zero is None:
        rank_zero = sys.modules.get("lightning_utilities.core.rank_zero")
    if rank_zero is not None:
        rank_zero.rank_zero_only.rank = 0 if rank is None else rank  # 0: the pytest process is one process


@pytest.fixture
def cfg_smoke(tmp_path) -> DictConfig:
    """The smoke experiment writing into tmp_path/run, on the real Fashion-MNIST data."""
    return compose_config("experiment=smoke", output_dir=tmp_path / "run")


def wandb_record(run_dir: Path, *keys: bytes, timeout: float = 30.0) -> bytes:
    """The offline run's `.wandb` record (protobuf, strings stored as-is) once it holds every key.

    wandb's service process writes the record in the background, so it is polled for up to `timeout` s.
    """
    record_file = next(Path(run_dir).glob("run-*.wandb"))
    deadline = time.monotonic() + timeout
    while not all(k in record_file.read_bytes() for k in keys) and time.monotonic() < deadline:
        time.sleep(0.5)
    return record_file.read_bytes()


# One of each refusal a run meets before training (a schema value, a rule between keys, the memory check, an
# unwritable folder), a run that diverges (exit 3) and one that trains: as config options `+case=NAME` composes
# from the folder refusal_cases() writes (hydra.searchpath), so one multirun or search meets each.
REFUSALS = {
    "schema": ("data:\n  batch_size: 0\n", "error: data.batch_size must be a positive integer, got 0"),
    "cross": ("callbacks:\n  sample_grid:\n    sampling_steps: 100000\n",
              "error: callbacks.sample_grid.sampling_steps must be at most schedule.timesteps"),
    "memory": ("data:\n  batch_size: 50000\n", "error: data.batch_size=50000 needs at least"),
    "unwritable": ("paths:\n  output_dir: /proc/ddpmlab-unwritable\n", "error: cannot write to /proc/ddpmlab-unwritable"),
    "diverges": ("optim:\n  lr: 1.0e5\n", "error: the loss or its gradient became NaN/Inf at step"),
    "ok": ("", ""),
}


def refusal_cases(folder: Path) -> str:
    """Writes folder/case/<name>.yaml for each of REFUSALS; returns the hydra.searchpath override that finds them."""
    (folder / "case").mkdir(parents=True)
    for name, (body, _) in REFUSALS.items():
        (folder / "case" / f"{name}.yaml").write_text(f"# @package _global_\n{body}")
    return f"hydra.searchpath=[file://{folder}]"
