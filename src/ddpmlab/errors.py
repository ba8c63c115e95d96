"""The one error type that entry points turn into a single line and exit code 2."""


class ConfigError(ValueError):
    """A user-facing mistake in a config value, a data folder or a checkpoint.

    The message names the problem and the fix in one line; `train.py` and
    `evaluate.py` print it without a traceback.
    """
