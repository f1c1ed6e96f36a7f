"""Atomic, crash-safe checkpoint directories.

A checkpoint is a directory ``<root>/checkpoint-<step>`` holding:

* ``trainer_state.json``: step, stage, data-order state (e.g. ``ResumableSampler.state_dict()``) and any extra
  JSON-able info the caller passes;
* ``rng_state_<rank>.pt``: python, numpy, torch CPU (and CUDA, when present) RNG states of each rank;
* ``<name>.pt`` for each state dict the caller passes (``state_dicts={"model": ..., "optimizer": ...}``);
* whatever the caller's ``write_fn(tmp_dir)`` writes, e.g. ``lambda d: engine.save_checkpoint(d)`` for DeepSpeed;
* ``COMPLETE``, written last.

Commit protocol: everything is written into ``<root>/.tmp-checkpoint-<step>`` (same parent, so the rename cannot
cross file systems), every file and directory is fsync'ed, ``COMPLETE`` is written and fsync'ed, then the directory is
renamed to its final name and the parent fsync'ed. A crash at any point leaves either a ``.tmp-*`` directory (ignored,
removed by the next save) or a complete checkpoint. Loading accepts only directories named ``checkpoint-<int>`` that
contain ``COMPLETE``; old checkpoints beyond ``save_total_limit`` are renamed to ``.tmp-delete-*`` before removal so
a half-deleted directory never looks complete either.

Several ranks (DeepSpeed): every rank calls :meth:`CheckpointManager.save` with the same step and a ``barrier``
(e.g. ``torch.distributed.barrier``); only ``is_main`` creates, commits and prunes directories; all ranks run
``write_fn`` (``engine.save_checkpoint`` is collective) and save their own RNG state. The directory must be on a file
system all ranks see.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


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
        return torch.load(file, map_location=map_location, weights_only=True)

    def restore_rng(self, rank: int | None = None) -> None:
        rank = _rank() if rank is None else rank
        file = self.path / f"rng_state_{rank}.pt"
        if not file.is_file():
            raise ValueError(f"checkpoint {self.path} has no RNG state for rank {rank} ({file.name} is missing)")
        set_rng_state(torch.load(file, map_location="cpu", weights_only=True))


def is_complete(path: str | Path) -> bool:
    path = Path(path)
    return bool(_CKPT_RE.match(path.name)) and (path / COMPLETE_MARKER).is_file()


class CheckpointManager:
    """Saves checkpoints under ``root`` atomically and keeps the newest ``save_total_limit`` (None: all)."""

    def __init__(self, root: str | Path, *, save_total_limit: int | None = None) -> None:
        if save_total_limit is not None and save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 or None, got {save_total_limit!r}")
        self.root = Path(root)
        self.save_total_limit = save_total_limit

    # ---- reading -----------------------------------------------------------------------------------------------

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoint directories, oldest step first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _CKPT_RE.match(p.name)) and is_complete(p)]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def load(
        self, path: str | Path | None = None, *, restore_rng: bool = True, rank: int | None = None
    ) -> Checkpoint | None:
        """Open ``path`` (must be complete) or, when None, the latest complete checkpoint (None if there is none).
        Restores this rank's RNG states unless ``restore_rng=False``."""
        if path is None:
            path = self.latest()
            if path is None:
                return None
        path = Path(path)
        if not is_complete(path):
            raise ValueError(
                f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker or not named checkpoint-<step>)"
            )
        info = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        ckpt = Checkpoint(
            path=path,
            step=int(info["step"]),
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
        tmp = self.root / f"{_TMP_PREFIX}checkpoint-{step}"

        if is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_stale_tmp()
            tmp.mkdir()
        sync()

        _torch_save(tmp / f"rng_state_{rank}.pt", get_rng_state())
        if write_fn is not None:
            write_fn(tmp)
        sync()

        if is_main:
            for name, sd in (state_dicts or {}).items():
                _torch_save(tmp / f"{name}.pt", sd)
            info = {
                "step": step,
                "stage": stage,
                "data_state": data_state,
                "extra": dict(extra or {}),
                "time": time.time(),
            }
            _write_file(tmp / STATE_FILE, json.dumps(info, indent=2).encode())
            _fsync_tree(tmp)
            _write_file(tmp / COMPLETE_MARKER, b"")
            _fsync_path(tmp)
            if final.exists():  # re-saving a step: move the old one out of the way first
                self._discard(final)
            os.replace(tmp, final)
            _fsync_path(self.root)
            self._prune()
        sync()
        return final

    def _discard(self, path: Path) -> None:
        doomed = self.root / f"{_TMP_PREFIX}delete-{path.name}-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def _remove_stale_tmp(self) -> None:
        # Leftovers of crashed saves or deletions; one trainer owns this directory.
        for p in self.root.iterdir():
            if p.name.startswith(_TMP_PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    def _prune(self) -> None:
        if self.save_total_limit is None:
            return
        done = self.complete_checkpoints()
        for p in done[: max(0, len(done) - self.save_total_limit)]:
            self._discard(p)


def _torch_save(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
