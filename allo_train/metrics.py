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
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .files import naming_write_errors

METRICS_FILE = "metrics.jsonl"


def progress_bars() -> bool:
    """tqdm bars only on a terminal: when stdout or stderr (the bar's stream) goes to a file or a pipe (a log file,
    a launcher), a bar is a stream of carriage returns, so the loop prints a log line every ``logging_steps``
    instead (:func:`progress_line`)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def quiet_library_progress_bars() -> None:
    """Without a terminal (:func:`progress_bars`), the Hugging Face libraries' bars ("Loading weights", "Writing model
    shards") are turned off too, so a log file holds no carriage-return bars. The environment variable is read when
    transformers is imported (a value the user set stays); an already imported transformers is told directly."""
    if progress_bars():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


# Metrics a progress line shows when they were logged (TRL names), besides the loss, and how.
PROGRESS_METRICS = {"rewards/margins": ".4f", "rewards/accuracies": ".2f", "grad_norm": ".3g", "learning_rate": ".2e"}


def progress_line(stage: str, step: int, total: int, metrics: Mapping[str, Any], *, elapsed: float, done: int) -> str:
    """``improve: step 20/240 (8%) loss 0.6931 rewards/margins 0.0123 ... 12 s, about 2 min 10 s left``; ``done``:
    the steps this process ran in ``elapsed`` seconds (a resumed run starts past 0)."""
    parts = [f"{stage}: step {step}/{total} ({100 * step / max(total, 1):.0f}%)"]
    for key, fmt in {"loss": ".4f", **PROGRESS_METRICS}.items():
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{key} {value:{fmt}}")
    left = elapsed / max(done, 1) * (total - step)
    parts.append(format_seconds(elapsed) + (f", about {format_seconds(left)} left" if step < total else ""))
    return " ".join(parts)


class ProgressLines:
    """Progress as log lines, for when there is no terminal to draw a bar on: at a logging step once a tenth of the
    stage's steps or a minute has passed since the last line, and at the last step."""

    def __init__(self, stage: str, total: int, start_step: int, say) -> None:
        self.stage, self.total, self.start_step, self.say = stage, total, start_step, say
        self.started = self.last_time = time.perf_counter()
        self.last_step = start_step

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        now = time.perf_counter()
        if step < self.total and step - self.last_step < self.total / 10 and now - self.last_time < 60:
            return
        done = step - self.start_step
        self.say(progress_line(self.stage, step, self.total, metrics, elapsed=now - self.started, done=done))
        self.last_time, self.last_step = now, step


def format_seconds(seconds: float) -> str:
    """``8.1 s``, ``42 s``, ``3 min 12 s``, ``2 h 05 min``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


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


# How a curve is called in a plot's legend.
SERIES_LABELS = {"loss": "train", "eval/loss": "held-out"}


def plot_loss_curves(
    metrics_path: str | Path,
    out_dir: str | Path,
    *,
    keys: tuple[str, ...] = ("loss", "eval/loss"),
    loss_name: str | None = None,
) -> list[Path]:
    """One PNG per stage, ``<out_dir>/loss_<stage>.png``, plotting each of ``keys`` present against step.
    ``loss_name``: what the loss is (e.g. "token-weighted NPO"), in the title.
    Returns the written paths (stages without any of the keys get no file)."""
    by_stage = read_curves(metrics_path, keys)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stage, series in by_stage.items():
        fig = loss_curve_figure(stage, series, loss_name=loss_name)
        path = out_dir / f"loss_{stage}.png"
        with naming_write_errors(path):
            fig.savefig(path, format="png", dpi=100)
        written.append(path)
    return written


def read_curves(metrics_path: str | Path, keys: tuple[str, ...]) -> dict[str, dict[str, tuple[list, list]]]:
    """``{stage: {key: (steps, values)}}`` of the finite values of ``keys`` in a metrics.jsonl."""
    by_stage: dict[str, dict[str, tuple[list, list]]] = {}
    for rec in read_metrics(metrics_path):
        stage = rec.get("stage") or "train"
        for key in keys:
            value = rec.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                xs, ys = by_stage.setdefault(stage, {}).setdefault(key, ([], []))
                xs.append(rec["step"])
                ys.append(value)
    return by_stage


def draw_loss_curves(ax, series: Mapping[str, tuple[list, list]], *, title: str) -> None:
    """Curves of one run on ``ax`` (train, held-out): the title (which should say which loss), step and loss axes."""
    for key, (xs, ys) in series.items():
        ax.plot(xs, ys, label=SERIES_LABELS.get(key, key), marker="." if len(xs) < 50 else None)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def loss_curve_figure(stage: str, series: Mapping[str, tuple[list, list]], *, loss_name: str | None = None):
    """The figure of :func:`plot_loss_curves` for one stage (a matplotlib Figure, no pyplot)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    draw_loss_curves(ax, series, title=f"{stage}: {loss_name}" if loss_name else stage)
    fig.tight_layout()
    return fig
