"""Atomic, crash-safe, verified checkpoint directories.

A checkpoint is a directory ``<root>/checkpoint-<step>`` holding:

* ``trainer_state.json``: step, stage, data-order state (e.g. ``ResumableSampler.state_dict()``) and any extra
  JSON-able info the caller passes (allo_train stores the run's config and training settings there);
* ``rng_state_<rank>.pt``: python, numpy, torch CPU (and CUDA, when present) RNG states of each rank;
* ``<name>.pt`` for each state dict the caller passes (``state_dicts={"model": ..., "optimizer": ...}``);
* whatever the caller's ``write_fn(tmp_dir)`` writes, e.g. ``lambda d: engine.save_checkpoint(d)`` for DeepSpeed;
* ``MANIFEST.json``: size and sha256 of every other file, written after all of them;
* ``COMPLETE``, written last.

Commit protocol: everything is written into ``<root>/.tmp-checkpoint-<step>`` (same parent, so the rename cannot
cross file systems), every file and directory is fsync'ed, the manifest is written and fsync'ed, then ``COMPLETE``,
then the directory is renamed to its final name and the parent fsync'ed. A crash at any point leaves either a
``.tmp-*`` directory (ignored, removed by the next save) or a complete checkpoint. Old checkpoints beyond
``save_total_limit`` are renamed to ``.tmp-delete-*`` before removal so a half-deleted directory never looks complete.
A save that fails because the disk is full raises ``files.DiskFullError`` naming the path ("no space left on
device") and removes its partial directory.

Loading (:meth:`CheckpointManager.load`, :meth:`CheckpointManager.select`) accepts only directories named
``checkpoint-<int>`` that contain ``COMPLETE`` and whose files match the manifest (sizes first, then sha256, streamed
in 4 MiB blocks by a few threads; hashlib releases the GIL, so large checkpoints hash at disk speed). A checkpoint
that fails is reported with the file and what is wrong (missing, size, checksum); without an explicit path the newest
checkpoint that verifies is used and each newer one that did not is named; when checkpoints exist and none verifies,
:class:`CheckpointError` lists them all. A checkpoint without a manifest (written by an older allo) does not verify.

Several ranks (DeepSpeed): every rank calls :meth:`CheckpointManager.save` with the same step and a ``barrier``
(e.g. ``torch.distributed.barrier``); only ``is_main`` creates, hashes, commits and prunes directories; all ranks run
``write_fn`` (``engine.save_checkpoint`` is collective) and save their own RNG state. The directory must be on a file
system all ranks see. Verify on one rank and share the choice (``stages.py`` does): every rank hashing the same files
would read them once per rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import AlloTrainError
from .files import (
    TMP_PREFIX,
    disk_full_error,
    fsync_path,
    fsync_tree,
    is_disk_full,
    naming_write_errors,
    write_durable,
)

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "MANIFEST.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_HASH_BLOCK = 4 << 20
_HASH_THREADS = min(8, os.cpu_count() or 1)


class CheckpointError(AlloTrainError):
    """A checkpoint cannot be used: the message names the checkpoint, the file and what is wrong."""


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


# ----------------------------------------------------------------------------------------------------- manifest
def file_sha256(path: Path) -> str:
    """sha256 of a file, read in ``_HASH_BLOCK`` pieces (never whole)."""
    h = hashlib.sha256()
    buf = bytearray(_HASH_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _files_of(root: Path) -> list[str]:
    """Relative paths of every file under ``root`` except the manifest and the marker, sorted."""
    out = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel not in (MANIFEST_FILE, COMPLETE_MARKER):
                out.append(rel)
    return sorted(out)


def write_manifest(root: Path) -> dict:
    """Write ``root/MANIFEST.json``: ``{"algorithm": "sha256", "files": {relpath: {"size", "sha256"}}}``."""
    names = _files_of(root)
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        digests = list(pool.map(lambda rel: file_sha256(root / rel), names))
    files = {rel: {"size": (root / rel).stat().st_size, "sha256": d} for rel, d in zip(names, digests)}
    manifest = {"algorithm": "sha256", "files": files}
    write_durable(root / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
    return manifest


def verify_manifest(root: Path) -> list[str]:
    """What is wrong with ``root`` against its manifest: one line per bad file (empty list: it verifies).

    Sizes are compared for every file first (cheap, and a truncated or emptied file shows there), checksums only
    when all sizes match. Files that are not in the manifest are not read by a resume and are not checked."""
    path = root / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_bytes())
        files = manifest["files"]
        entries = [(rel, int(e["size"]), str(e["sha256"])) for rel, e in files.items()]
    except FileNotFoundError:
        return [f"{MANIFEST_FILE} is missing (the checkpoint was written by an older allo or not by allo)"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"{MANIFEST_FILE} is unreadable ({type(e).__name__}: {e})"]
    problems = []
    for rel, size, _ in entries:
        f = root / rel
        if not f.is_file():
            problems.append(f"{rel}: missing (the manifest lists {size} bytes)")
        elif f.stat().st_size != size:
            problems.append(f"{rel}: {f.stat().st_size} bytes, the manifest says {size} (truncated or changed)")
    if problems:
        return problems
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        digests = list(pool.map(lambda e: file_sha256(root / e[0]), entries))
    return [
        f"{rel}: sha256 differs from the manifest (the bytes changed after the save)"
        for (rel, _, want), got in zip(entries, digests)
        if got != want
    ]


# ----------------------------------------------------------------------------------------------------- RNG
def get_rng_state() -> dict[str, Any]:
    """Python, numpy (if installed), torch CPU and CUDA RNG states, in a form ``torch.load(weights_only=True)``
    reads."""
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {"python": [py_version, list(py_state), py_gauss], "torch": torch.get_rng_state()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_load(file: Path, what: str, map_location: Any = "cpu") -> Any:
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError / EOFError / UnpicklingError / OSError for broken files
        raise CheckpointError(f"{file}: cannot read the {what} ({type(e).__name__}: {e})") from e


@dataclass
class Checkpoint:
    """A complete checkpoint found on disk. ``state_dict(name)`` loads ``<name>.pt``; for DeepSpeed, call
    ``engine.load_checkpoint(str(ckpt.path))`` with the directory."""

    path: Path
    step: int
    stage: str | None
    data_state: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def state_dict(self, name: str, *, map_location: Any = "cpu") -> Any:
        file = self.path / f"{name}.pt"
        if not file.is_file():
            raise ValueError(f"checkpoint {self.path} has no state dict {name!r} ({file.name} is missing)")
        return _torch_load(file, f"state dict {name!r}", map_location)

    def restore_rng(self, rank: int | None = None) -> None:
        rank = _rank() if rank is None else rank
        file = self.path / f"rng_state_{rank}.pt"
        if not file.is_file():
            raise ValueError(f"checkpoint {self.path} has no RNG state for rank {rank} ({file.name} is missing)")
        set_rng_state(_torch_load(file, f"RNG state of rank {rank}"))


def is_complete(path: str | Path) -> bool:
    path = Path(path)
    return bool(_CKPT_RE.match(path.name)) and (path / COMPLETE_MARKER).is_file()


def _check_complete(path: Path) -> None:
    if not is_complete(path):
        raise ValueError(
            f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker or not named checkpoint-<step>)"
        )


@dataclass
class Selection:
    """The checkpoint to resume from (None: there is no complete checkpoint) and the newer ones that failed
    verification, each with its problems."""

    path: Path | None
    rejected: list[tuple[Path, list[str]]] = field(default_factory=list)

    def describe_rejected(self) -> str:
        return "; ".join(f"{p.name}: {', '.join(problems)}" for p, problems in self.rejected)


class CheckpointManager:
    """Saves checkpoints under ``root`` atomically and keeps the newest ``save_total_limit`` (None: all)."""

    def __init__(self, root: str | Path, *, save_total_limit: int | None = None) -> None:
        if save_total_limit is not None and save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 or None, got {save_total_limit!r}")
        self.root = Path(root)
        self.save_total_limit = save_total_limit

    # ---- reading -----------------------------------------------------------------------------------------------

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoint directories (``COMPLETE`` present; not verified), oldest step first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _CKPT_RE.match(p.name)) and is_complete(p)]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def select(self, path: str | Path | None = None) -> Selection:
        """The checkpoint to resume from, verified against its manifest.

        ``path`` given: that one, or :class:`CheckpointError` naming what is wrong. None: the newest complete
        checkpoint that verifies (``Selection.rejected`` lists the newer ones that did not), ``Selection(None)``
        when there is no complete checkpoint, :class:`CheckpointError` when there are some and none verifies."""
        if path is not None:
            path = Path(path)
            _check_complete(path)
            problems = verify_manifest(path)
            if problems:
                raise CheckpointError(f"checkpoint {path} fails verification: {'; '.join(problems)}")
            return Selection(path)
        rejected: list[tuple[Path, list[str]]] = []
        for candidate in reversed(self.complete_checkpoints()):
            problems = verify_manifest(candidate)
            if not problems:
                return Selection(candidate, rejected)
            rejected.append((candidate, problems))
        if rejected:
            found = Selection(None, rejected).describe_rejected()
            raise CheckpointError(
                f"no checkpoint in {self.root} verifies, so the run cannot resume: {found} (delete the broken "
                "checkpoints to start over from step 0)"
            )
        return Selection(None)

    def load(
        self, path: str | Path | None = None, *, restore_rng: bool = True, rank: int | None = None, verify: bool = True
    ) -> Checkpoint | None:
        """Open ``path`` (must be complete) or, when None, the newest complete checkpoint that verifies (None if there
        is no complete checkpoint). ``verify=False`` skips the manifest check (when the caller has just run
        :meth:`select`). Restores this rank's RNG states unless ``restore_rng=False``."""
        if verify:
            path = self.select(path).path
            if path is None:
                return None
        elif path is None:
            path = self.latest()
            if path is None:
                return None
        path = Path(path)
        _check_complete(path)
        state_file = path / STATE_FILE
        try:
            info = json.loads(state_file.read_bytes())
            step = int(info["step"])
        except FileNotFoundError:
            raise CheckpointError(f"{state_file}: missing") from None
        except (ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise CheckpointError(f"{state_file}: not a trainer state ({type(e).__name__}: {e})") from None
        ckpt = Checkpoint(
            path=path,
            step=step,
            stage=info.get("stage"),
            data_state=info.get("data_state"),
            extra=info.get("extra") or {},
        )
        if restore_rng:
            ckpt.restore_rng(rank)
        return ckpt

    # ---- writing -----------------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        stage: str | None = None,
        state_dicts: Mapping[str, Any] | None = None,
        write_fn: Callable[[Path], None] | None = None,
        data_state: Any = None,
        extra: Mapping[str, Any] | None = None,
        is_main: bool = True,
        barrier: Callable[[], None] | None = None,
        rank: int | None = None,
    ) -> Path:
        """Write checkpoint ``step`` and return its final path. ``state_dicts`` are torch.save'd by the main rank;
        ``write_fn(tmp_dir)`` runs on every rank before the commit; ``data_state`` and ``extra`` must be JSON-able."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        sync = barrier or (lambda: None)
        rank = _rank() if rank is None else rank
        final = self.root / f"checkpoint-{step}"
        tmp = self.root / f"{TMP_PREFIX}checkpoint-{step}"

        if is_main:
            with naming_write_errors(self.root, "creating a checkpoint in"):
                self.root.mkdir(parents=True, exist_ok=True)
                self._remove_stale_tmp()
                tmp.mkdir()
        sync()

        try:
            _torch_save(tmp / f"rng_state_{rank}.pt", get_rng_state())
            if write_fn is not None:
                write_fn(tmp)
        except Exception as e:
            if is_disk_full(tmp, e):
                if is_main:
                    shutil.rmtree(tmp, ignore_errors=True)  # ours and incomplete; give the space back
                raise disk_full_error(tmp, e, f"writing checkpoint {step} into") from e
            raise
        sync()

        if is_main:
            try:
                for name, sd in (state_dicts or {}).items():
                    _torch_save(tmp / f"{name}.pt", sd)
                info = {
                    "step": step,
                    "stage": stage,
                    "data_state": data_state,
                    "extra": dict(extra or {}),
                    "time": time.time(),
                }
                write_durable(tmp / STATE_FILE, json.dumps(info, indent=2).encode())
                fsync_tree(tmp)
                write_manifest(tmp)
                write_durable(tmp / COMPLETE_MARKER, b"")
            except AlloTrainError:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            fsync_path(tmp)
            if final.exists():  # re-saving a step: move the old one out of the way first
                self._discard(final)
            os.replace(tmp, final)
            fsync_path(self.root)
            self._prune()
        sync()
        return final

    def _discard(self, path: Path) -> None:
        doomed = self.root / f"{TMP_PREFIX}delete-{path.name}-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def _remove_stale_tmp(self) -> None:
        # Leftovers of crashed saves or deletions; the output-directory lock makes this process their only owner.
        for p in self.root.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    def _prune(self) -> None:
        if self.save_total_limit is None:
            return
        done = self.complete_checkpoints()
        for p in done[: max(0, len(done) - self.save_total_limit)]:
            self._discard(p)


def _torch_save(path: Path, obj: Any) -> None:
    with naming_write_errors(path), open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
