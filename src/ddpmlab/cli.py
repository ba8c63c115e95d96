"""What train.py and evaluate.py share: every expected failure becomes one line on stderr and an exit code.

| exit | meaning |
|---|---|
| 1 | a bug: an unexpected exception, with its traceback |
| 2 | bad input: a config value, an override Hydra cannot compose, data, a checkpoint, a full disk (ConfigError) |
| 2 | what a library raised while setting up, before the first step: one line naming the config key it came from |
| 2 | out of host or GPU memory, at any moment: one line naming what to lower (ddpmlab.memory) |
| 3 | training met NaN/Inf with optim.on_nonfinite=stop (NonFiniteLoss) |
| 4 | a multirun ended in which some runs failed: summary.md gives each run's exit code and reason |
| 128 + signal | preempted by SIGTERM (143) or SIGINT (130) after saving a checkpoint (Preempted) |

In a multirun (`-m`) a failed run is recorded in its folder and the sweep goes on with the next run, under any
launcher: the SystemExit that ends a run alone is a BaseException, which Hydra's job runner lets through and
which would end the whole sweep with no summary. A preempted run still ends the sweep: the signal was for the process.
"""

import os
import re
import sys
import traceback
from contextlib import suppress
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import OmegaConf

from ddpmlab.errors import ConfigError, NonFiniteLoss, Preempted
from ddpmlab.schema import leaves
from ddpmlab.sweeps import record_status, summarise

_task_started = False
_run_dir_existed: bool | None = None  # None: unknown (RunGuard not registered), so the folder is never removed
_multirun_failed = ""  # the final line of a multirun in which some runs failed
_environ_before_jobs: dict | None = None  # a multirun's environment before its first job (_start_multirun_job)


class RunGuard(Callback):
    """Hydra callback (conf/hydra/default.yaml) noting what only Hydra's side sees: whether the run folder
    existed before Hydra made it, and which runs of a multirun failed."""

    def on_run_start(self, config, **kwargs) -> None:
        global _run_dir_existed
        # run_job resolves hydra.run.dir from this same config after this call; its ${now:} is cached, so it is
        # the same folder
        _run_dir_existed = Path(config.hydra.run.dir).exists()

    def on_multirun_end(self, config, **kwargs) -> None:
        global _multirun_failed
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = summarise(sweep_dir) if sweep_dir.is_dir() else []
        failed = [f"run {r['run']} (exit {r['exit'] if r['exit'] != '' else '?'})" for r in rows if r["status"] != "ok"]
        if failed:
            _multirun_failed = (f"error: {len(failed)} of {len(rows)} runs failed, {', '.join(failed)}: "
                                f"{sweep_dir / 'summary.md'} says why")


def guarded(cfg, check, work):
    """An entry point's task: `check(cfg)` (ddpmlab.schema's rules) and that cfg.paths.output_dir is writable,
    then `work(cfg)`; returns what work returned. Every error, the check's included, becomes its line and exit
    code (table above).

    A run alone that fails on bad input removes its run folder only when this process made it and, at that
    moment, it holds nothing but the files Hydra wrote. In a multirun every outcome is recorded in the run's
    folder (ddpmlab.sweeps.record_status) and a failure returns None, so that the sweep goes on with the next run
    (a sweeper told None records a failed trial).
    """
    global _task_started
    _task_started = True
    hydra = HydraConfig.get()
    run_dir = Path(hydra.runtime.output_dir)
    multirun = hydra.mode == RunMode.MULTIRUN
    if multirun:
        _start_multirun_job(hydra)
    if isinstance(sys.stderr, _HeldStderr):
        sys.stderr = sys.stderr.release()
    try:
        if check is not None:
            check(cfg)  # before anything is written: paths.output_dir itself may be the bad value
        _check_writable(Path(cfg.paths.output_dir))
        result = work(cfg)
    except Exception as err:
        code, line = _outcome(err, cfg)
        line += "".join(f"; {note}" for note in getattr(err, "__notes__", ()))  # e.g. the checkpoint saved
        if not multirun:
            if code == 1:
                raise
            if code == 2:
                _remove_failed_start(hydra, run_dir)
            _exit(line, code)
        if code == 1:
            traceback.print_exc()  # a bug: its traceback belongs in the run's log
        record_status(run_dir, code, line)
        print(line, file=sys.stderr)
        if isinstance(err, Preempted):
            sys.exit(code)
        return None
    if multirun:
        record_status(run_dir, 0, "")
    return result


def run(hydra_main) -> None:
    """Call a @hydra.main function. Hydra reports a config it cannot compose (an unknown key or option, a
    malformed override) in its own words, several lines, and exits 1 before the task starts: that is bad input,
    so its report becomes one line and exit 2 (HYDRA_FULL_ERROR=1: Hydra's own report, untouched).
    A multirun in which some runs failed ends with one line naming them and exit 4."""
    if os.environ.get("HYDRA_FULL_ERROR") != "1":
        sys.stderr = _HeldStderr(sys.stderr)
    try:
        hydra_main()
    except SystemExit as exit_:
        if exit_.code == 1 and not _task_started:
            if isinstance(sys.stderr, _HeldStderr):
                report = sys.stderr.text()
                sys.stderr = sys.stderr.real
                _exit(f"error: {_one_line(report) or 'the config cannot be composed'}", 2)
            raise SystemExit(2) from None
        raise
    finally:
        if isinstance(sys.stderr, _HeldStderr):
            sys.stderr = sys.stderr.release()
    if _multirun_failed:
        _exit(_multirun_failed, 4)


def _start_multirun_job(hydra) -> None:
    """Make this multirun job run like a run alone under DDP.

    Lightning starts ranks 1..N-1 as `python <script> <sys.argv[1:]> hydra.run.dir=<hydra.run.dir>`: in a multirun
    that would be the whole sweep again (`-m` and every value), in the default run folder, so point it at this
    job (its own overrides, its folder). And the previous job of this process left its process group and the
    environment Lightning set (LOCAL_RANK makes Lightning believe the ranks already exist): both go.
    """
    global _environ_before_jobs
    if _environ_before_jobs is None:
        _environ_before_jobs = dict(os.environ)
    else:
        os.environ.clear()
        os.environ.update(_environ_before_jobs)
    dist = sys.modules.get("torch.distributed")  # imported only if a job used it
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.argv[1:] = list(hydra.overrides.task)
    OmegaConf.set_readonly(hydra, False)
    hydra.run.dir = hydra.runtime.output_dir
    OmegaConf.set_readonly(hydra, True)


class _HeldStderr:
    """stderr held back until the task starts, so that Hydra's report of a config it cannot compose can be
    turned into one line; released unchanged (and written through from then on) when the task starts."""

    def __init__(self, real):
        self.real, self.held = real, []

    def write(self, text: str) -> int:
        if self.held is None:
            return self.real.write(text)
        self.held.append(text)
        return len(text)

    def text(self) -> str:
        return "".join(self.held or [])

    def release(self):
        """Write what was held; returns the real stream."""
        if self.held is not None:
            self.real.write(self.text())
            self.held = None
        return self.real

    def __getattr__(self, name):
        return getattr(self.real, name)


def _one_line(report: str) -> str:
    """Hydra's report as one line: its hint about HYDRA_FULL_ERROR, indented details (full_key, object_type) and
    the config search path dropped, a list of options joined ("Available options in 'model': unet, unet_cifar10").
    A ConfigError raised in a Hydra plugin (the search's sweeper) comes as a traceback: its message alone."""
    report = report.split("Config search path:")[0]
    if "ddpmlab.errors.ConfigError: " in report:
        return report.rsplit("ddpmlab.errors.ConfigError: ", 1)[1].strip()
    parts = []
    for line in report.splitlines():
        if not line.strip() or line.startswith(("Set the environment variable HYDRA_FULL_ERROR", " ")):
            continue
        if line.startswith("\t") and parts and parts[-1].endswith((":", ",")):
            parts[-1] += f" {line.strip()},"
        else:
            parts.append(line.strip())
    return " ".join(p.rstrip(",") for p in parts)


# Where a traceback shows that the work had begun (a training step, evaluation's metrics): an error there is not
# a setup error. Lightning's fit loop runs the epochs in `advance` and the final callbacks in `on_run_end`.
_WORK = {("fit_loop.py", "advance"), ("fit_loop.py", "on_advance_end"), ("fit_loop.py", "on_run_end"),
         ("evaluation.py", "_per_example"), ("evaluation.py", "sample_metrics"), ("evaluation.py", "write_results")}


def _in_setup(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return not any((Path(f.filename).name, f.name) in _WORK for f in frames)


def _setup_line(err: BaseException, cfg) -> str:
    """One line for what a library (Hydra's instantiate, Lightning, torch, a reader) raised during setup: the
    config key it came from (Hydra names the node it instantiated; within it, a key the message names), and what
    it said."""
    within = ""
    if isinstance(err, InstantiationException):
        found = re.search(r"full_key: (\S+)", str(err))
        within = found.group(1) if found else ""
        err = err.__cause__ or err
    said = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"
    named = {k: v for k, v in leaves(cfg) if (not within or k.startswith(f"{within}."))
             and re.search(rf"\b{re.escape(k.split('.')[-1])}\b", said)}
    key = max(named, key=len) if named else within or "the config"
    named = f"{key}={named[key]}" if named else key
    return (f"{named} failed while setting up, before the first step: {said}: fix {key} "
            "(HYDRA_FULL_ERROR=1 shows the trace)")


def _outcome(err: Exception, cfg=None) -> tuple[int, str]:
    """An error's exit code and line (table above)."""
    if isinstance(err, ConfigError):
        return 2, f"error: {err}"
    if isinstance(err, NonFiniteLoss):
        return 3, f"error: {err}"
    if isinstance(err, Preempted):
        return 128 + err.signum, f"preempted: {err}"
    from ddpmlab.memory import out_of_memory_line  # imports torch: not before the config's check

    if (memory := out_of_memory_line(err)) is not None:
        return 2, f"error: {memory}"
    if cfg is not None and _in_setup(err) and os.environ.get("HYDRA_FULL_ERROR") != "1":
        return 2, f"error: {_setup_line(err, cfg)}"
    return 1, f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def _remove_failed_start(hydra, run_dir: Path) -> None:
    """Remove the run folder of a start refused on bad input, only when this process made it (RunGuard) and it
    now holds nothing but Hydra's files (.hydra/config.yaml, hydra.yaml, overrides.yaml, the job's log) and empty
    folders. A user's folder, a checkpoint, a logged step or a sample grid is never removed."""
    if _run_dir_existed is not False or not run_dir.is_dir():
        return
    hydra_files = {run_dir / str(hydra.output_subdir) / name for name in ("config.yaml", "hydra.yaml", "overrides.yaml")}
    log = OmegaConf.select(hydra.job_logging, "handlers.file.filename", default=None)
    hydra_files |= {Path(log)} if log else set()
    found = list(run_dir.rglob("*"))
    files = [p for p in found if not p.is_dir()]
    if any(p not in hydra_files for p in files):
        return
    for p in files:
        p.unlink()
    for folder in sorted((p for p in found if p.is_dir()), key=lambda p: len(p.parts), reverse=True) + [run_dir]:
        with suppress(OSError):  # something appeared meanwhile: it stays
            folder.rmdir()


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
