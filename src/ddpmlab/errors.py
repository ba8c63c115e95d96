"""The errors that entry points turn into a single line and an exit code, never a traceback."""

import argparse


class ConfigError(ValueError):
    """A user-facing mistake in a config value, a data folder or a checkpoint (exit code 2).

    The message names the problem and the fix in one line; `train.py` and
    `evaluate.py` print it without a traceback.
    """


class NonFiniteLoss(RuntimeError):
    """Training met a NaN or Inf loss or gradient under `optim.on_nonfinite=stop` (exit code 3).

    The message names the first bad step; no checkpoint after it is written.
    """


class Preempted(RuntimeError):
    """SIGTERM or SIGINT stopped training after a checkpoint of the current step was saved.

    `train.py` exits with 128 + the signal number, the shell's convention for a run ended by that signal.
    """

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class OneLineParser(argparse.ArgumentParser):
    """argparse for the `python -m ddpmlab.*` tools: a bad argument is one line `error: ...` and exit code 2, like
    every other bad input (argparse's own prints its usage block first). Subcommands' parsers are the same class."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")
