"""Progress bars: Rich in a terminal, tqdm in logs and pipes (a line per update that `tail -f` can follow).

Rich allows one live display at a time: a bar started while another is live (the sample grid's chain under the
training bar) falls back to tqdm, whose lines Rich prints above its own bar.

Every bar also writes a line to the run's log file (Hydra's `<run>/<job>.log`) after its first step, then every
LOG_EVERY seconds and at its end: the bar itself goes to the terminal or stderr only.
"""

import logging
import sys
import time

from tqdm.auto import tqdm

log = logging.getLogger(__name__)
LOG_EVERY = 10.0  # seconds between a bar's lines in the log file


def in_terminal() -> bool:
    return sys.stderr.isatty()


def _log_files() -> list[logging.FileHandler]:
    """The run's log files: Hydra's job log is a FileHandler on the root logger (none outside Hydra)."""
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def to_log_files(line: str) -> None:
    """`line` into the run's log files only, where the console already shows it (as a bar)."""
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, line, None, None)
    for handler in _log_files():
        handler.handle(record)


def say(line: str) -> None:
    """`line` to the console and the run's log file: logged where Hydra set up logging, else printed."""
    if logging.getLogger().handlers:
        log.info(line)
    else:
        print(line, flush=True)


def duration(seconds: float) -> str:
    """4s, 3m 05s, 2h 10m."""
    minutes, seconds = divmod(round(seconds), 60)
    if minutes >= 60:
        return f"{minutes // 60}h {minutes % 60:02d}m"
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


def _timed(iterable, total: int | None, desc: str, first_done):
    """Yield from `iterable`; after the first item, first_done(seconds it took); log lines into the log files."""
    start = last = time.perf_counter()
    files = bool(_log_files())
    for done, item in enumerate(iterable, 1):
        yield item  # the caller's work on `item` happens here
        now = time.perf_counter()
        if done == 1 and first_done is not None:
            first_done(now - start)
        if files and (done in (1, total) or now - last >= LOG_EVERY):
            last = now
            left = f", ~{duration((now - start) / done * (total - done))} left" if total else ""
            to_log_files(f"{desc}: {done}/{total or '?'} ({duration(now - start)}{left})")


def track(iterable, total: int | None = None, desc: str = "", disable: bool = False, leave: bool = True,
          first_done=None):
    """Iterate with a progress bar titled `desc`; first_done(seconds), if given, when the first item is done."""
    if disable:
        yield from iterable
        return
    iterable = _timed(iterable, total, desc, first_done)
    if in_terminal():
        from rich.errors import LiveError
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(), transient=not leave)
        try:
            progress.start()
        except LiveError:
            progress = None
        if progress is not None:
            try:
                task = progress.add_task(desc, total=total)
                for item in iterable:
                    yield item
                    progress.advance(task)
            finally:
                progress.stop()
            return
    yield from tqdm(iterable, total=total, desc=desc, leave=leave)
