"""Logger construction that must decide something at run time (wandb online or offline), and what the
loggers take differently: images, and the final numbers beside the hyperparameters."""

import csv
import netrc
import os
import sys
from pathlib import Path


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(Path.home() / ".netrc").authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def csv_logger(save_dir: str, name: str = "csv", version: str = "", **kwargs):
    """Lightning's CSVLogger (conf/logger/csv.yaml), except that a run continued in its own folder (ckpt_path=last,
    a requeued job) appends to its csv/metrics.csv: Lightning's writer deletes the file it finds there, and with
    it every step logged before the resume. lightning is imported here, after the config check."""
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class AppendingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:  # Lightning's removes an earlier metrics.csv here
            pass

        def __init__(self, log_dir: str):
            super().__init__(log_dir)
            if self._fs.isfile(self.metrics_file_path):  # its columns go on: rows are appended below them
                with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                    self.metrics_keys = next(csv.reader(f), [])

    class AppendingCSVLogger(CSVLogger):
        @property
        def experiment(self):
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = AppendingWriter(log_dir=self.log_dir)
            return self._experiment

    return AppendingCSVLogger(save_dir=save_dir, name=name, version=version, **kwargs)


def wandb_logger(save_dir: str, project: str, offline: bool | None = None, group: str | None = None, **kwargs):
    """Lightning's WandbLogger that never prompts: with no credentials (and no WANDB_MODE) it runs offline.

    Offline runs are written under `save_dir/wandb/offline-run-*`; `wandb sync` uploads them later.
    `group=None` groups the runs of one multirun by their sweep folder's name (a dashboard panel per sweep).
    wandb is imported here, so runs that do not use it never import it.
    """
    from lightning.pytorch.loggers import WandbLogger

    if group is None:
        group = _sweep_name()
    if offline is None:
        offline = os.environ.get("WANDB_MODE") == "offline" or (
            "WANDB_MODE" not in os.environ and not _has_wandb_credentials()
        )
    if offline and kwargs.get("log_model"):
        from ddpmlab.errors import ConfigError

        raise ConfigError("logger.wandb.log_model uploads checkpoints as artifacts, which an offline run cannot: "
                          "log in with `wandb login` (or set WANDB_API_KEY), or set logger.wandb.log_model=false")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(save_dir=save_dir, project=project, offline=offline, group=group, **kwargs)


def log_image(logger, key: str, path: Path, step: int) -> None:
    """A PNG of the run folder (a sample grid) to a dashboard: wandb takes the file, TensorBoard the pixels;
    loggers without images (CSV) get nothing."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if isinstance(logger, TensorBoardLogger):
        from torchvision.io import read_image

        logger.experiment.add_image(key, read_image(str(path)), step)  # (C, H, W) uint8
    elif hasattr(logger, "log_image"):
        logger.log_image(key, [str(path)], step=step)


def log_final(loggers, config: dict, metrics: dict[str, float], step: int) -> None:
    """A run's final numbers (val/bpd). TensorBoard files them with the config as hyperparameters too, so that its
    HParams tab compares runs by them (conf/logger/tensorboard.yaml turns off the placeholder hp_metric)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(config, metrics, step)  # also logs the metrics as scalars at `step`
        else:
            logger.log_metrics(metrics, step)


def _sweep_name() -> str | None:
    """The sweep folder's name inside a Hydra multirun job, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir).name


def finish_wandb() -> None:
    """End the wandb run, if this process started one: Hydra's multirun trains its jobs in one process,
    and each job must get its own wandb run rather than append to the previous one."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
