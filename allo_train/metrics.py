"""Metrics: a rank-0 JSONL logger (optionally mirrored to TensorBoard) and per-stage loss-curve plots.

Each ``log`` call appends one line ``{"stage": ..., "step": ..., "time": ..., "<metric>": value, ...}`` to
``metrics.jsonl`` and flushes it, so a crashed run keeps its curve. Tensors and numpy scalars become floats. Metric
names follow TRL (``loss``, ``grad_norm``, ``learning_rate``, ``rewards/chosen``, ``logps/rejected``, ...); a
``split`` key (``"train"``/``"eval"``) is up to the caller, e.g. ``eval/loss``.

A run that starts (or resumes) at step N opens the logger with ``start_step=N``: the file is first cut back to its
complete records with ``step <= N`` (:func:`truncate_metrics`), so a torn last line of a crashed run (a kill, a full
disk) and the records a crashed run wrote after its last checkpoint do not stay in the file, and no step appears twice.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .files import naming_write_errors

METRICS_FILE = "metrics.jsonl"


def is_main_process() -> bool:
    """Rank 0 of an initialised torch.distributed group, else ``$RANK`` (unset: True)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0")) == 0


def _scalar(name: str, value: Any) -> float | int | str | None:
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return value
    if hasattr(value, "item"):  # torch / numpy scalars
        if getattr(value, "numel", lambda: 1)() != 1:
            raise ValueError(f"metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, (int, float)):
        return value
    raise ValueError(f"metric {name!r} must be a number or string, got {type(value).__name__}")


class MetricsLogger:
    """Appends metrics to ``<output_dir>/metrics.jsonl`` on the main process only (others are no-ops).

    ``tensorboard=True`` also writes TensorBoard events under ``<output_dir>/tensorboard`` when
    ``torch.utils.tensorboard`` can be imported (it needs the ``tensorboard`` package); otherwise it is skipped with a
    note in ``self.tensorboard_error``."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        stage: str | None = None,
        enabled: bool | None = None,
        tensorboard: bool = False,
        start_step: int | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.stage = stage
        self.enabled = is_main_process() if enabled is None else enabled
        self.path = self.output_dir / METRICS_FILE
        self._file = None
        self._tb = None
        self.tensorboard_error: str | None = None
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if start_step is not None:
            truncate_metrics(self.path, start_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (held open until close())
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))
            except ImportError as e:  # tensorboard not installed
                self.tensorboard_error = str(e)

    def log(self, step: int, metrics: Mapping[str, Any], *, stage: str | None = None) -> dict | None:
        """Write one record; returns it (None on non-main processes)."""
        if not self.enabled:
            return None
        stage = stage if stage is not None else self.stage
        record: dict[str, Any] = {"stage": stage, "step": int(step), "time": time.time()}
        for name, value in metrics.items():
            record[name] = _scalar(name, value)
        with naming_write_errors(self.path):
            self._file.write(json.dumps(record, allow_nan=True) + "\n")
            self._file.flush()
        if self._tb is not None:
            for name, value in record.items():
                if name in ("step", "time", "stage") or isinstance(value, (str, bool)) or value is None:
                    continue
                self._tb.add_scalar(f"{stage}/{name}" if stage else name, value, int(step))
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def truncate_metrics(path: str | Path, step: int) -> int:
    """Cut ``path`` back to its complete records with ``step <= step`` (a torn last line is dropped; an invalid line
    elsewhere is a ValueError naming it). Rewrites the file only when something goes; returns the records kept."""
    path = Path(path)
    if not path.is_file():
        return 0
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    keep: list[bytes] = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record_step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            if i == len(lines):  # no newline after it: the torn last write of a crashed run
                break
            raise ValueError(f"{path}:{i}: not a metrics record (invalid JSON or no integer 'step')") from None
        if record_step <= step:
            keep.append(line)
    text = b"".join(line + b"\n" for line in keep)
    if text != raw:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with naming_write_errors(tmp):
            tmp.write_bytes(text)
        os.replace(tmp, path)
    return len(keep)


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file (or of ``<dir>/metrics.jsonl``); a torn last line (crash) is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines):
                break
            raise ValueError(f"{path}:{i}: invalid JSON in metrics file") from None
    return records


def plot_loss_curves(
    metrics_path: str | Path,
    out_dir: str | Path,
    *,
    keys: tuple[str, ...] = ("loss", "eval/loss"),
) -> list[Path]:
    """One PNG per stage, ``<out_dir>/loss_<stage>.png``, plotting each of ``keys`` present against step.
    Returns the written paths (stages without any of the keys get no file)."""
    from matplotlib.figure import Figure

    by_stage: dict[str, dict[str, tuple[list, list]]] = {}
    for rec in read_metrics(metrics_path):
        stage = rec.get("stage") or "train"
        for key in keys:
            value = rec.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                xs, ys = by_stage.setdefault(stage, {}).setdefault(key, ([], []))
                xs.append(rec["step"])
                ys.append(value)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stage, series in by_stage.items():
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot(1, 1, 1)
        for key, (xs, ys) in series.items():
            ax.plot(xs, ys, label=key, marker="." if len(xs) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("value")
        ax.set_title(f"{stage}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"loss_{stage}.png"
        with naming_write_errors(path):
            fig.savefig(path, format="png", dpi=100)
        written.append(path)
    return written
