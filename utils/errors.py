"""Errors that mean "this input is wrong", not "this code is wrong".

Each message names the file, row or key at fault and what to do, so the scripts print it as
one ``error:`` line instead of a traceback (``utils.cli.exit_on_input_error``).
"""

from __future__ import annotations


class InputError(ValueError):
    """Unusable user input: a config, a dataset file or a checkpoint."""


class ConfigError(InputError):
    """A config that cannot be used; the message names the offending key."""


class DatasetError(InputError):
    """A dataset file (captions CSV, table, feature store) that cannot be used; the message names it."""


class AudioError(DatasetError):
    """An audio file that cannot be turned into features; the message names the file."""


class CheckpointError(InputError):
    """Weights that do not fit the model they are loaded into, or a file that holds no weights."""
