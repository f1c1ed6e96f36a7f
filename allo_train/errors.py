"""The one error type a run stops with when its user has something to fix (the CLI prints it on one line, exit 2)."""


class AlloTrainError(RuntimeError):
    """A run stopped for a reason its user can act on; the message names the file / directory and what is wrong.

    Subclasses: ``checkpoint.CheckpointError``, ``lock.OutputDirInUseError``, ``config.ConfigChangedError``,
    ``files.DiskFullError``. Bad input data and config values stay ``ValueError`` / ``TypeError``."""
