"""File-system steps every output of a run goes through: durable writes, directory swaps, named write errors.

* :func:`fsync_path` / :func:`fsync_tree`: push a file or a whole directory to disk before it is published.
* :func:`new_temp_dir`: a private ``.tmp-<name>-<pid>-<ns>`` directory beside the final one (same file system, so the
  final rename cannot cross devices), created with the process umask (``tempfile.mkdtemp`` would make it 0700, and
  the rename would keep that mode); :func:`apply_umask` gives files the umask's mode too (safetensors writes 0600).
* :func:`write_atomic`: one file written beside its final name and renamed onto it.
* :func:`swap_in_dir`: publish a finished directory under its final name without a moment where neither the old nor
  the new one is complete: old -> backup, new -> final, fsync the parent, delete the backup.
* :func:`naming_write_errors`: a write that fails because the file system is full becomes :class:`DiskFullError`,
  which says "no space left on device" and names the path (DeepSpeed's ``torch.save`` reports a full disk as
  ``RuntimeError: basic_ios::clear``, without errno or path).
* :func:`crash_point`: a test hook; ``ALLO_TRAIN_CRASH_AT=<name>`` makes the process hard-exit (like a kill) at the
  named step, so tests can check what a crash between two file operations leaves behind.

Every name starting with ``.tmp-`` inside an output directory belongs to allo-train and may be deleted by it.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import AlloTrainError

TMP_PREFIX = ".tmp-"
CRASH_POINT_ENV = "ALLO_TRAIN_CRASH_AT"  # test hook: "<point>" -> os._exit(17) when the run reaches that point
CRASH_EXIT_CODE = 17
# A write that fails while the file system has less than this free is reported as a full disk.
DISK_FULL_BYTES = 1 << 20


class DiskFullError(AlloTrainError):
    """A write failed because the file system holding the named path is full."""

    errno = errno.ENOSPC


def crash_point(name: str) -> None:
    """Hard-exit (no cleanup, like ``kill -9``) when ``$ALLO_TRAIN_CRASH_AT`` equals ``name``; tests only."""
    if os.environ.get(CRASH_POINT_ENV) == name:
        os._exit(CRASH_EXIT_CODE)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it; a full disk is a :class:`DiskFullError` naming ``path``."""
    with naming_write_errors(path), open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` into ``.<name>.tmp-<pid>`` beside ``path``, give it the umask's mode, then rename it to ``path``:
    ``path`` is the old file or the complete new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with naming_write_errors(tmp):
        write(tmp)
    apply_umask(tmp)
    os.replace(tmp, path)
    return path


def new_temp_dir(parent: Path, name: str) -> Path:
    """``parent/.tmp-<name>-<pid>-<ns>``, created now with mode 0777 & ~umask (like any ``mkdir``)."""
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f"{TMP_PREFIX}{name}-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    return path


def current_umask() -> int:
    try:  # Linux: read it without changing it (os.umask can only set, and setting races with other threads)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """chmod ``root`` (a file, or a directory and everything in it) to what a plain create gives under the umask:
    files 0666 & ~umask, directories 0777 & ~umask."""
    mask = current_umask()
    if root.is_file():
        os.chmod(root, 0o666 & ~mask)
        return
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            os.chmod(Path(dirpath) / name, 0o666 & ~mask)


def swap_in_dir(new: Path, final: Path) -> Path:
    """Rename the complete directory ``new`` to ``final``, replacing an existing ``final`` without deleting it first.

    Steps: ``final -> .tmp-old-<name>-...`` (if it exists), ``new -> final``, fsync the parent, delete the backup. A
    crash after the first rename leaves no ``final`` (never a half-deleted one) and a backup; a crash after the second
    leaves the new ``final`` complete. The next swap to the same name removes what crashed swaps and writes left
    (``.tmp-old-<name>-*``, ``.tmp-<name>-*``): the output-directory lock makes this process their only owner.
    """
    parent = final.parent
    for pattern in (f"{TMP_PREFIX}old-{final.name}-*", f"{TMP_PREFIX}{final.name}-*"):
        for stale in parent.glob(pattern):
            if stale != new:
                shutil.rmtree(stale, ignore_errors=True)
    backup = None
    if final.exists():
        backup = parent / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(final, backup)
        crash_point("swap:old-moved-aside")
    try:
        os.replace(new, final)
    except BaseException:
        if backup is not None:
            os.replace(backup, final)  # put the old one back rather than leave nothing
        raise
    fsync_path(parent)
    crash_point("swap:new-in-place")
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return final


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged write may still use on ``path``'s file system (None if that cannot be told)."""
    for p in (path, *path.parents):
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


def is_disk_full(path: Path, exc: BaseException) -> bool:
    """Whether ``exc``, raised while writing under ``path``, means the file system is full: errno ENOSPC/EDQUOT, the
    system's text for them (safetensors' Rust writer raises ``SafetensorError: ... No space left on device``), or a
    write error without errno (C++ streams: ``basic_ios::clear``) while less than ``DISK_FULL_BYTES`` is free."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    if os.strerror(errno.ENOSPC) in text or os.strerror(errno.EDQUOT) in text:
        return True
    if isinstance(exc, (OSError, RuntimeError)):
        free = free_bytes(path)
        return free is not None and free < DISK_FULL_BYTES
    return False


def disk_full_error(path: Path, exc: BaseException, what: str = "writing") -> DiskFullError:
    free = free_bytes(path)
    left = "" if free is None else f", {free} bytes free"
    return DiskFullError(f"no space left on device while {what} {path} ({type(exc).__name__}: {exc}{left})")


@contextmanager
def naming_write_errors(path: Path, what: str = "writing") -> Iterator[None]:
    """Re-raise a write failure caused by a full file system as :class:`DiskFullError` naming ``path``."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if is_disk_full(Path(path), exc):
            raise disk_full_error(Path(path), exc, what) from exc
        raise
