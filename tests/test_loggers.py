"""wandb through Lightning's WandbLogger, really running, offline: no account, no prompt, files to sync later;
and TensorBoard's event files, read back with TensorBoard's own reader."""

import pytest

from ddpmlab.training import train
from tests.conftest import compose_config, wandb_record


def test_wandb_without_credentials_logs_offline_into_the_run_folder(tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: no credentials
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_config("experiment=smoke", "logger=wandb", output_dir=tmp_path / "run")
    train(cfg)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "expected one offline run under the run folder"
    run = runs[0]
    # The run's record, which `wandb sync` uploads: protobuf records, strings stored as-is.
    keys = (b"train/loss", b"train/loss_q3", b"train/grad_norm", b"train/images_per_s", b"train/vlb_bpd",
            b"lr-Adam", b"samples", b"denoising", b"ddpmlab.diffusion.schedules.linear_betas", b"smoke")
    record = wandb_record(run, *keys)
    for key in keys:
        assert key in record, f"{key!r} did not reach wandb"
    images = list((run / "files" / "media" / "images").glob("samples_*.png"))
    assert len(images) == 2, "the step-3 grid and the final grid are logged as images"
    strips = list((run / "files" / "media" / "images").glob("denoising_*.png"))
    assert len(strips) == 2, "and a denoising strip with each"
    from PIL import Image

    with Image.open(strips[0]) as strip:  # 4 samples x 5 points of the 5-step chain (8 asked, 5 exist)
        assert strip.size[0] > strip.size[1] > 28


def test_two_runs_in_one_process_get_two_wandb_runs(tmp_path, monkeypatch):
    """Hydra's multirun runs its jobs in one process: each must be its own wandb run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("a", "b"):
        train(compose_config("experiment=smoke", "logger=wandb", "trainer.max_steps=2", output_dir=tmp_path / name))
    ids = [next((tmp_path / n / "wandb").glob("offline-run-*")).name.rsplit("-", 1)[1] for n in ("a", "b")]
    assert ids[0] != ids[1]



def test_model_artifacts_offline_are_refused_with_the_fix(tmp_path, monkeypatch):
    """Checkpoints as wandb artifacts need an online run (Lightning refuses log_model offline): one clear line."""
    import pytest

    from ddpmlab.errors import ConfigError

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config("experiment=smoke", "logger=wandb", "logger.wandb.log_model=true", output_dir=tmp_path)
    with pytest.raises(ConfigError, match="log in with `wandb login`"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()  # refused before training


def test_tensorboard_event_file_holds_the_scalars_grids_and_hyperparameters(tmp_path):
    """logger=tensorboard, a real run: its event file, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    cfg = compose_config("experiment=smoke", "logger=tensorboard", output_dir=tmp_path / "run")
    metrics = train(cfg)
    [event_file] = (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    for key in ("train/loss", "train/vlb_bpd", "train/loss_q3", "train/grad_norm", "lr-Adam", "val/bpd"):
        assert key in tags["scalars"], f"{key} did not reach TensorBoard"
    assert [e.step for e in events.Scalars("train/loss")] == [1, 3, 5]  # every log_every_n_steps=2 steps
    [val] = events.Scalars("val/bpd")
    assert (val.step, val.value) == (6, pytest.approx(metrics["val/bpd"]))
    assert [e.step for e in events.Images("samples")] == [3, 6] and len(events.Images("denoising")) == 2
    assert events.Images("samples")[-1].width > 28  # a grid of 4 samples, not one image
    # The HParams tab: the config's flattened keys, with val/bpd as the metric to compare runs by.
    content = events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["optim/lr"].number_value == 1e-3 and start.hparams["task_name"].string_value == "smoke"
    content = events.SummaryMetadata("_hparams_/experiment").plugin_data.content
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["val/bpd"]
