"""Progress bars: Rich in a terminal, tqdm in logs and pipes (a line per update that `tail -f` can follow).

Rich allows one live display at a time: a bar started while another is live (the sample grid's chain under the
training bar) falls back to tqdm, whose lines Rich prints above its own bar.
"""

import sys

from tqdm.auto import tqdm


def in_terminal() -> bool:
    return sys.stderr.isatty()


def track(iterable, total: int | None = None, desc: str = "", disable: bool = False, leave: bool = True):
    """Iterate with a progress bar titled `desc`."""
    if disable:
        yield from iterable
        return
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
