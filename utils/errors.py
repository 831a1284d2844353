"""Errors that mean "this input is wrong", not "this code is wrong".

Each message names the file, row or key at fault and what to do, so the scripts print it as
one ``error:`` line instead of a traceback (``exit_on_input_error``).
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager


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


@contextmanager
def exit_on_input_error() -> Iterator[None]:
    """For command-line scripts: bad input or a file that cannot be read or written ends the process
    with a one-line ``error: ...`` (exit status 1), Ctrl-C with ``interrupted`` (130); real bugs
    keep their traceback."""
    try:
        yield
    except (InputError, OSError) as err:  # OSError: missing, unreadable or unwritable files, full disks
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        logging.getLogger(__name__).warning("interrupted")
        sys.exit(130)
