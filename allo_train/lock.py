"""One run per output directory: an exclusive ``flock`` on ``<output_dir>/.allo-train.lock``.

The lock is an advisory ``fcntl.flock(LOCK_EX | LOCK_NB)`` on an open file, so the operating system releases it when
the holding process ends in any way (``kill -9`` included): there is no stale lock to clean up by hand. The holder
writes who it is (pid, host, start time, command line) into the file; a second run that cannot take the lock stops
with an :class:`OutputDirInUseError` quoting that. The file itself stays after the run (removing it would let two
runs lock two different files of the same name).

Multi-process runs take one lock per run: rank 0 holds it and tells the other ranks whether it got it (see
``stages.output_dir_lock``), so every rank of a second run stops at once. The lock works wherever ``flock`` does
(local file systems; NFS with lock support).

Nested use in one process (a pipeline that runs its stages) is counted, not re-locked: ``flock`` locks belong to an
open file, so a second open of the same file in the same process would block against the first.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shlex
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import AlloTrainError

LOCK_FILE = ".allo-train.lock"


class OutputDirInUseError(AlloTrainError):
    """Another process holds the output directory's lock."""


def _holder_info() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.orig_argv[0]), *sys.orig_argv[1:]]),
    }


def describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}, command: {info['command']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown (the lock file names nobody)"


class OutputDirLock:
    """``acquire()`` takes the lock or raises :class:`OutputDirInUseError`; ``release()`` (or process exit) frees it."""

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> OutputDirLock:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 1 << 16, 0).decode("utf-8", errors="replace")
            os.close(fd)
            raise OutputDirInUseError(
                f"output_dir {self.output_dir} is in use by another allo-train run ({describe_holder(holder)}; "
                f"lock file {self.path}): wait for it to finish, or choose another output_dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder_info()) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


_held: dict[str, list] = {}  # realpath -> [lock, nesting count]


@contextmanager
def hold_output_dir(output_dir: str | Path) -> Iterator[OutputDirLock]:
    """Hold ``output_dir``'s lock for the ``with`` block (re-entrant within one process)."""
    key = os.path.realpath(output_dir)
    if key in _held:
        _held[key][1] += 1
        try:
            yield _held[key][0]
        finally:
            _held[key][1] -= 1
        return
    lock = OutputDirLock(output_dir).acquire()
    _held[key] = [lock, 1]
    try:
        yield lock
    finally:
        del _held[key]
        lock.release()
