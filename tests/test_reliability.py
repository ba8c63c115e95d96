"""Runs that survive kills and preemption, resume exactly, and stop cleanly on NaN: each property done for real."""

import copy
import hashlib
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from omegaconf import open_dict

from ddpmlab.checkpoints import load_checkpoint
from ddpmlab.errors import NonFiniteLoss
from ddpmlab.training import train
from tests.conftest import COLLECTIVE_TIMEOUT_S, ROOT, compose_config

DATA = ROOT / "data"


class RecordBatches(L.Callback):
    """The checksum of every training batch, in order (class-level: train() builds the instance)."""

    seen: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        RecordBatches.seen.append(hashlib.sha256(batch.cpu().numpy().tobytes()).hexdigest())


def _with_callback(cfg, name: str, target: str):
    with open_dict(cfg):
        cfg.callbacks[name] = {"_target_": target}
    return cfg


def test_stopping_and_resuming_gives_the_uninterrupted_run_bit_for_bit(tmp_path):
    """8 steps in one go == 4 steps, stop, resume for 4: weights, EMA, Adam, importance sampler, data, step."""
    common = ["experiment=smoke", "timestep_sampler=importance", "data.random_flip=true", "trainer.deterministic=true",
              "callbacks.checkpoint.every_n_train_steps=4", "data.batch_size=4"]

    def run(name, *extra):
        cfg = compose_config(*common, *extra, output_dir=tmp_path / name)
        train(_with_callback(cfg, "batches", f"{__name__}.RecordBatches"))
        return tmp_path / name / "checkpoints" / "last.ckpt"

    RecordBatches.seen = []
    whole = load_checkpoint(run("whole", "trainer.max_steps=8"))
    uninterrupted = RecordBatches.seen
    RecordBatches.seen = []
    half = run("half", "trainer.max_steps=4")
    resumed = load_checkpoint(run("resumed", "trainer.max_steps=8", f"ckpt_path={half}"))
    assert RecordBatches.seen == uninterrupted and len(set(uninterrupted)) == 8  # the same 8 batches, in order
    assert resumed["global_step"] == whole["global_step"] == 8
    assert whole["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in whole["state_dict"].items():  # model, ema_model, timestep_sampler
        assert torch.equal(value, resumed["state_dict"][key]), key
    adam_whole, adam_resumed = whole["optimizer_states"][0]["state"], resumed["optimizer_states"][0]["state"]
    for index, state in adam_whole.items():
        for name, tensor in state.items():
            assert torch.equal(tensor, adam_resumed[index][name]), (index, name)
    assert torch.equal(whole["rng_states"]["torch"], resumed["rng_states"]["torch"])


class InjectNaN(L.Callback):
    """Turns the third training batch into NaN: the loss and every gradient of step 3 become NaN."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            batch.fill_(float("nan"))


# importance sampling past its warm-up (T=4, 2 values per t): the NaN step must not make the next draw fail first
@pytest.mark.parametrize("sampler", [[], ["timestep_sampler=importance", "timestep_sampler.history=2",
                                          "schedule.timesteps=4", "callbacks.sample_grid=null"]])
def test_nan_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, sampler):
    cfg = compose_config("experiment=smoke", "callbacks.checkpoint.every_n_train_steps=2", *sampler, output_dir=tmp_path)
    with pytest.raises(NonFiniteLoss, match="at step 3"):
        train(_with_callback(cfg, "nan", f"{__name__}.InjectNaN"))
    last = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2  # the step-4 checkpoint was refused, the step-2 one is intact
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_nan_step_is_skipped_and_counted_under_the_skip_policy(tmp_path):
    cfg = compose_config("experiment=smoke", "optim.on_nonfinite=skip", output_dir=tmp_path)
    metrics = train(_with_callback(cfg, "nan", f"{__name__}.InjectNaN"))
    assert metrics["train/skipped_steps"] == 1
    last = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


class SnapshotAroundNaN(L.Callback):
    """All training state just before and just after InjectNaN's step 3: weights, EMA, sampler, Adam, warm-up."""

    states: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            SnapshotAroundNaN.states.append(_training_state(trainer, pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            SnapshotAroundNaN.states.append(_training_state(trainer, pl_module))


def _training_state(trainer, module) -> dict:
    return {"module": {k: v.clone() for k, v in module.state_dict().items()},  # model, ema_model, timestep_sampler
            "adam": copy.deepcopy(trainer.optimizers[0].state_dict()),
            "scheduler": copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.state_dict()),
            "warmed_up": bool(module.timestep_sampler.warmed_up())}


def test_a_skipped_nan_step_leaves_no_trace_in_the_importance_sampler_ema_adam_or_warm_up(tmp_path):
    """T=4 with 2 values per t: the sampler is past its warm-up when step 3's batch turns NaN, so one NaN in
    its history would make p NaN and the next draw fail."""
    cfg = compose_config("experiment=smoke", "optim.on_nonfinite=skip", "timestep_sampler=importance",
                         "timestep_sampler.history=2", "schedule.timesteps=4", "callbacks.sample_grid=null",
                         output_dir=tmp_path)
    SnapshotAroundNaN.states = []
    _with_callback(cfg, "nan", f"{__name__}.InjectNaN")
    metrics = train(_with_callback(cfg, "snapshot", f"{__name__}.SnapshotAroundNaN"))
    assert metrics["train/skipped_steps"] == 1
    before, after = SnapshotAroundNaN.states
    assert before["warmed_up"]
    for key, value in before["module"].items():
        assert torch.equal(value, after["module"][key]), key
    for index, state in before["adam"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, after["adam"]["state"][index][name]), (index, name)
    assert before["scheduler"] == after["scheduler"]
    last = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 6  # it went on after the skipped step
    assert torch.isfinite(last["state_dict"]["timestep_sampler.loss_history"]).all()
    assert last["state_dict"]["timestep_sampler.loss_counts"].sum() == 5 * 8  # the 5 steps taken, 8 examples each


class ClippedGradients(L.Callback):
    """Every parameter's gradient just before the clipping and just after Adam's update (which leaves it as is)."""

    before: list = []
    after: list = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        ClippedGradients.before.append([p.grad.clone() for p in pl_module.model.parameters()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ClippedGradients.after.append([p.grad.clone() for p in pl_module.model.parameters()])


def test_value_clipping_clamps_each_gradient_element_instead_of_scaling_the_norm(tmp_path):
    clip = 1e-3
    cfg = compose_config("experiment=smoke", "callbacks.sample_grid=null", "trainer.max_steps=2",
                         "+trainer.gradient_clip_algorithm=value", f"trainer.gradient_clip_val={clip}",
                         output_dir=tmp_path)
    ClippedGradients.before, ClippedGradients.after = [], []
    train(_with_callback(cfg, "grads", f"{__name__}.ClippedGradients"))
    assert len(ClippedGradients.before) == len(ClippedGradients.after) == 2
    for before, after in zip(ClippedGradients.before, ClippedGradients.after):
        grads = torch.cat([g.flatten() for g in before]).abs()
        assert (grads > clip).any() and (grads[grads > 0] < clip).any()  # both sides of the clip value occur
        for b, a in zip(before, after):
            assert torch.equal(a, b.clamp(-clip, clip))  # elements under the clip value are untouched


class Fp16Plugin(L.Callback):
    """Lightning's own 16-mixed plugin (on a CPU, trainer.precision=16-mixed becomes bf16-mixed) with a GradScaler
    that doubles its scale every step: it overflows by design, as any GradScaler does every 2000 steps."""

    scales: list = []

    def __init__(self, init_scale: float = 2.0**16):
        self.init_scale = init_scale

    def setup(self, trainer, pl_module, stage):
        scaler = torch.amp.GradScaler("cpu", init_scale=self.init_scale, growth_interval=1)
        trainer.strategy.precision_plugin = MixedPrecision("16-mixed", "cpu", scaler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        Fp16Plugin.scales.append(trainer.precision_plugin.scaler.get_scale())


class InfGradient(L.Callback):
    """An infinite gradient on every step while the loss stays finite: no loss scale can absorb it."""

    def on_after_backward(self, trainer, pl_module):
        next(pl_module.model.parameters()).grad.fill_(float("inf"))


def _fp16(tmp_path, init_scale: float = 2.0**16):
    cfg = compose_config("experiment=smoke", "callbacks.sample_grid=null", "trainer.accelerator=cpu", "model.ch=8",
                         "model.norm_groups=8", "data.batch_size=2", output_dir=tmp_path)  # CPU fp16 is slow
    with open_dict(cfg):
        cfg.callbacks["fp16"] = {"_target_": f"{__name__}.Fp16Plugin", "init_scale": init_scale}
    return cfg


def test_16_mixed_overflows_are_skipped_by_the_grad_scaler_without_stopping_training(tmp_path):
    Fp16Plugin.scales = []
    train(_fp16(tmp_path))
    scales = Fp16Plugin.scales
    assert len(scales) == 6 and any(b < a for a, b in zip(scales, scales[1:]))  # it overflowed and backed off
    last = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize("fault, init_scale, message", [
    ("InjectNaN", 2.0**16, "became NaN/Inf at step 3"),  # a NaN loss: no scale helps
    ("InfGradient", 2.0**-13, "loss scale fell to"),  # two overflows take the scale below fp16's smallest normal
])
def test_16_mixed_still_stops_on_a_nan_loss_or_a_collapsed_loss_scale(tmp_path, fault, init_scale, message):
    with pytest.raises(NonFiniteLoss, match=message):
        train(_with_callback(_fp16(tmp_path, init_scale), "fault", f"{__name__}.{fault}"))


# ---- real processes: SIGKILL, SIGTERM, SIGINT ---------------------------------------------------------------

def _start(tmp_path: Path, *overrides: str, multirun: bool = False) -> subprocess.Popen:
    """train.py as a process with its own runs/ under tmp_path; its output (progress bar, errors) goes to tmp_path/stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DDPMLAB_ROOT": str(tmp_path)}
    with open(tmp_path / "stderr", "w") as err:
        return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *(["-m"] if multirun else []),
                                 "experiment=smoke", f"paths.data_dir={DATA}",
                                 "callbacks.sample_grid.every_n_steps=0", *overrides],
                                cwd=tmp_path, env=env, stdout=err, stderr=subprocess.STDOUT)


def _finish(process: subprocess.Popen, tmp_path: Path) -> str:
    process.wait(timeout=300)
    return (tmp_path / "stderr").read_text()


def _training(tmp_path: Path) -> bool:
    """The progress bar shows steps: the process is past start-up, in the training loop."""
    return "it/s" in (tmp_path / "stderr").read_text()


def _wait_for(predicate, timeout: float = 120.0, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll)


def _checkpoints(tmp_path: Path) -> Path:
    """The run's checkpoint folder (a resumed process's own Hydra folder holds only its log)."""
    found = list((tmp_path / "runs" / "smoke").glob("*/checkpoints"))
    return found[0] if found else tmp_path / "runs" / "smoke" / "none"


@pytest.mark.slow
def test_sigkill_at_any_moment_never_leaves_a_checkpoint_that_fails_to_load(tmp_path):
    """Killed 4 times (once exactly while a checkpoint is being written); last.ckpt always loads and resumes."""
    rng = random.Random(0)
    steps = ["trainer.max_steps=100000", "callbacks.checkpoint.every_n_train_steps=1"]
    process = _start(tmp_path, *steps)
    _wait_for(lambda: (tmp_path / "runs" / "smoke").is_dir() and (_checkpoints(tmp_path) / "last.ckpt").is_file())
    _wait_for(lambda: _training(tmp_path))
    folder = _checkpoints(tmp_path)
    mid_write = False
    for kill in range(4):
        if kill:
            process = _start(tmp_path, *steps, "ckpt_path=last")
            _wait_for(lambda: _training(tmp_path))
        before = load_checkpoint(folder / "last.ckpt")["global_step"]
        if kill == 0:  # wait for a temporary checkpoint file to appear, then kill while it is being written
            _wait_for(lambda: any(folder.glob(".last.ckpt.*.tmp")), poll=0.0005)
        else:
            time.sleep(rng.uniform(0.5, 3.0))
        process.kill()
        process.wait()
        mid_write |= any(folder.glob(".last.ckpt.*.tmp"))
        after = load_checkpoint(folder / "last.ckpt")  # never torn
        assert after["global_step"] >= before and after["state_dict"]
    assert mid_write, "no kill landed during a checkpoint write"
    step = load_checkpoint(folder / "last.ckpt")["global_step"]
    process = _start(tmp_path, f"trainer.max_steps={step + 3}", "ckpt_path=last")
    err = _finish(process, tmp_path)
    assert process.returncode == 0, err[-2000:]
    assert load_checkpoint(folder / "last.ckpt")["global_step"] == step + 3
    assert not list(folder.glob(".last.ckpt.*.tmp"))  # stale temporary files are cleaned up by the next write


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_preemption_saves_the_current_step_and_ckpt_path_last_continues_the_run(tmp_path, signum):
    process = _start(tmp_path, "trainer.max_steps=100000", "callbacks.checkpoint.every_n_train_steps=1000")
    _wait_for(lambda: _training(tmp_path))
    time.sleep(1)
    process.send_signal(signum)
    err = _finish(process, tmp_path)
    assert process.returncode == 128 + signum, err[-2000:]
    message = next(line for line in err.splitlines() if line.startswith("preempted: "))
    assert message.startswith(f"preempted: {signal.Signals(signum).name} at step ")
    step = int(message.split(" at step ")[1].split(":")[0])
    folder = _checkpoints(tmp_path)
    assert load_checkpoint(folder / "last.ckpt")["global_step"] == step > 0
    assert message.endswith(f" ckpt_path={folder / 'last.ckpt'} hydra.run.dir={folder.parent}")
    process = _start(tmp_path, f"trainer.max_steps={step + 2}", "ckpt_path=last")
    err = _finish(process, tmp_path)
    assert process.returncode == 0, err[-2000:]
    assert load_checkpoint(folder / "last.ckpt")["global_step"] == step + 2  # the same run folder, continued
    assert (folder.parent / "config_resolved_1.yaml").is_file()  # the first part's config is kept


def _hinted(message: str, *changes: str) -> list[str]:
    """The command a preemption line says continues the run, as argv, with `changes` replacing its overrides."""
    command = shlex.split(message.split("continue this run with: ", 1)[1])
    assert command[:2] == ["python", "train.py"]
    replaced = {change.split("=", 1)[0] for change in changes}
    return [sys.executable, str(ROOT / "train.py"),
            *(arg for arg in command[2:] if arg.split("=", 1)[0] not in replaced), *changes]


@pytest.mark.slow
def test_a_preempted_multirun_job_is_continued_by_its_hint_and_found_by_ckpt_path_last(tmp_path):
    """SIGTERM during job 0 of a multirun: the line names that job's checkpoint and overrides exactly; that command
    continues it in its own folder, and ckpt_path=last (which looked one folder deep) finds it too."""
    process = _start(tmp_path, "optim.lr=1e-3,2e-3", "trainer.max_steps=100000",
                     "callbacks.checkpoint.every_n_train_steps=1000", multirun=True)
    _wait_for(lambda: _training(tmp_path))
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    err = _finish(process, tmp_path)
    assert process.returncode == 143, err[-2000:]
    message = next(line for line in err.splitlines() if line.startswith("preempted: "))
    step = int(message.split(" at step ")[1].split(":")[0])
    [run] = list((tmp_path / "runs" / "smoke").glob("multirun_*/0"))
    assert " optim.lr=0.001 trainer.max_steps=100000 " in message  # this job's own overrides (Hydra writes 1e-3 so)
    assert message.endswith(f" ckpt_path={run / 'checkpoints' / 'last.ckpt'} hydra.run.dir={run}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DDPMLAB_ROOT": str(tmp_path)}
    continued = subprocess.run(_hinted(message, f"trainer.max_steps={step + 2}"), cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300)
    assert continued.returncode == 0, continued.stderr[-2000:]
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == step + 2
    process = _start(tmp_path, "optim.lr=1e-3", f"trainer.max_steps={step + 4}", "ckpt_path=last")
    err = _finish(process, tmp_path)
    assert process.returncode == 0, err[-2000:]
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == step + 4


# ---- a full disk at the second checkpoint: one line, exit 2, the run folder and its first checkpoint kept ------

class FullDiskAfterFirstCheckpoint(L.Callback):
    """From step 4 the checkpoint writer's temporary file is /dev/full (every write fails with ENOSPC): the smoke
    run's first checkpoint (step 3) is written, its second (step 6) meets a full disk."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 4:
            folder = Path(trainer.default_root_dir) / "checkpoints"
            (folder / f".last.ckpt.{os.getpid()}.tmp").symlink_to("/dev/full")


@pytest.fixture
def small_disk(tmp_path):
    """An 18 MiB tmpfs: the smoke run's first checkpoint (11.4 MB) fits, a second one written beside it does not."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the /dev/full test covers the failed write")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=18m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the /dev/full test covers the failed write")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def _run_to_a_full_disk(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "experiment=smoke", f"hydra.run.dir={run_dir}",
                           "callbacks.sample_grid.every_n_steps=0", *overrides],
                          cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=300)


def _assert_first_checkpoint_kept(result: subprocess.CompletedProcess, run_dir: Path, reason: str) -> None:
    last = run_dir / "checkpoints" / "last.ckpt"
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot write checkpoint {last} ({reason}")
    assert "the previous checkpoint is kept" in errors[0]
    assert load_checkpoint(last)["global_step"] == 3
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "csv" / "metrics.csv").is_file()
    assert not list(last.parent.glob(".last.ckpt.*.tmp"))


@pytest.mark.slow
def test_a_full_disk_at_the_second_checkpoint_keeps_the_run_folder_and_the_first(tmp_path):
    run_dir = tmp_path / "run"
    result = _run_to_a_full_disk(run_dir, f"+callbacks.full_disk._target_={__name__}.FullDiskAfterFirstCheckpoint")
    _assert_first_checkpoint_kept(result, run_dir, "No space left on device")


@pytest.mark.slow
def test_a_really_full_filesystem_at_the_second_checkpoint_keeps_the_run_folder_and_the_first(small_disk):
    """On a real full filesystem torch's zip writer raises RuntimeError ("unexpected pos ..."), not OSError."""
    run_dir = small_disk / "run"
    result = _run_to_a_full_disk(run_dir)
    _assert_first_checkpoint_kept(result, run_dir, "")


class FailOnRank(L.Callback):
    """Raises on rank $FAIL_ON_RANK at the third step, as a bug or a bad node would."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == int(os.environ.get("FAIL_ON_RANK", "1")) and trainer.global_step == 2:
            raise RuntimeError(f"injected fault on rank {trainer.global_rank}")


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 0])
def test_a_rank_that_raises_ends_the_whole_ddp_job_long_before_the_collective_timeout(tmp_path, rank):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT),
           "FAIL_ON_RANK": str(rank)}
    result = subprocess.run(  # a hung job fails the test with TimeoutExpired
        [sys.executable, str(ROOT / "train.py"), "experiment=smoke", "trainer.max_steps=100000",
         "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", f"paths.log_dir={tmp_path}",
         f"+callbacks.fault._target_={__name__}.FailOnRank"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=COLLECTIVE_TIMEOUT_S // 3)
    assert result.returncode != 0 and f"injected fault on rank {rank}" in result.stderr, result.stderr[-2000:]
