"""The errors a run stops with when its user has something to fix (the CLI prints them on one line, exit 2)."""

from collections.abc import Iterator
from contextlib import contextmanager


class AlloTrainError(RuntimeError):
    """A run stopped for a reason its user can act on; the message names the file / directory and what is wrong.

    Subclasses: :class:`InputError`, ``checkpoint.CheckpointError``, ``lock.OutputDirInUseError``,
    ``config.ConfigChangedError``, ``files.DiskFullError``. The library's own functions raise ``ValueError`` /
    ``TypeError`` for bad data and config values; a run turns those about its inputs into :class:`InputError`."""


class InputError(AlloTrainError, ValueError):
    """A model directory, data file or masks file a run reads is missing or malformed (also a ``ValueError``)."""


@contextmanager
def input_errors() -> Iterator[None]:
    """A ``ValueError`` raised inside (the readers name the file, line or parameter) becomes an :class:`InputError`."""
    try:
        yield
    except AlloTrainError:
        raise
    except ValueError as e:
        raise InputError(str(e)) from e
