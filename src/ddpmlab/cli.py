"""What train.py and evaluate.py share: every expected failure becomes one line on stderr and an exit code.

| exit | meaning |
|---|---|
| 2 | bad input: a config value, an override Hydra cannot compose, data, a checkpoint, a full disk (ConfigError) |
| 3 | training met NaN/Inf with optim.on_nonfinite=stop (NonFiniteLoss) |
| 128 + signal | preempted by SIGTERM (143) or SIGINT (130) after saving a checkpoint (Preempted) |
"""

import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from ddpmlab.errors import ConfigError, NonFiniteLoss, Preempted

_task_started = False


@contextmanager
def reported_errors(cfg):
    """Around an entry point's work: check that cfg.paths.output_dir is writable, then turn our errors into
    their line and exit code.

    On bad input the run folder Hydra has just made is removed again when it holds nothing but Hydra's own
    files (.hydra/, the log), so a mistake leaves no junk folder; a folder with anything else is left alone.
    """
    from hydra.core.hydra_config import HydraConfig

    global _task_started
    _task_started = True
    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    fresh = not hydra_dir.is_dir() or all(p.name == ".hydra" or p.suffix == ".log" for p in hydra_dir.iterdir())
    try:
        _check_writable(Path(cfg.paths.output_dir))
        yield
    except ConfigError as err:
        if fresh:
            shutil.rmtree(hydra_dir, ignore_errors=True)
        _exit(f"error: {err}", 2)
    except NonFiniteLoss as err:
        _exit(f"error: {err}", 3)
    except Preempted as err:
        _exit(f"preempted: {err}", 128 + err.signum)


def run(hydra_main) -> None:
    """Call a @hydra.main function. Hydra reports a config it cannot compose (an unknown key or option, a
    malformed override) in its own words and exits 1 before the task starts: that is bad input, so exit 2."""
    try:
        hydra_main()
    except SystemExit as exit_:
        if exit_.code == 1 and not _task_started:
            raise SystemExit(2) from None
        raise


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write to {folder} ({err.strerror or err}): set hydra.run.dir (or "
                          "paths.output_dir) to a writable folder") from None


def _exit(line: str, code: int) -> None:
    print(line, file=sys.stderr)
    sys.exit(code)
