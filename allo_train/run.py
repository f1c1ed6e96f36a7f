"""One run of allo-train: its config, rank and device, the output directory's lock, and which stages are finished.

A run holds ``<output_dir>/.allo-train.lock`` (see ``lock.py``) from start to end. A stage that (re)starts removes its
``<output_dir>/<stage>/stage_done.json``; a stage writes it again only after its output is complete and in place, so
a resumed pipeline skips exactly the stages that have it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint import CheckpointError
from .engine import init_distributed
from .files import write_durable
from .lock import hold_output_dir

if TYPE_CHECKING:
    from .config import TrainConfig

STAGE_DONE_FILE = "stage_done.json"


@dataclass
class Run:
    cfg: TrainConfig
    rank: int
    world_size: int
    device: torch.device
    # What each stage reports for the end-of-run summary (trainer.summary_table), by stage name.
    notes: dict[str, dict] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cfg.bf16 else torch.float32

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def say(self, message: str) -> None:
        if self.rank == 0:
            print(f"[allo-train] {message}", flush=True)


def start_run(cfg: TrainConfig) -> Run:
    rank, world, device = init_distributed()
    if rank != 0:  # data warnings and notes once per run, from rank 0
        logging.getLogger("allo_train").setLevel(logging.ERROR)
    return Run(cfg, rank, world, device)


def rank0_decides(run: Run, fn: Callable[[], object]) -> object:
    """``fn()`` on rank 0; its result, or the exception it raised, reaches every rank (so a decision that reads the
    disk is made once, and a refusal stops every rank instead of leaving the others waiting in a collective)."""
    out: list = [None]
    if run.rank == 0:
        try:
            out[0] = ("ok", fn())
        except Exception as e:
            out[0] = ("error", e)
    if run.world_size > 1:
        try:
            torch.distributed.broadcast_object_list(out, src=0)
        except Exception:  # an unpicklable exception on rank 0: send its text
            if run.rank == 0:
                out[0] = ("error", CheckpointError(f"{type(out[0][1]).__name__}: {out[0][1]}"))
            torch.distributed.broadcast_object_list(out, src=0)
    kind, value = out[0]
    if kind == "error":
        raise value
    return value


@contextmanager
def output_dir_lock(run: Run) -> Iterator[None]:
    """Rank 0 holds ``cfg.output_dir``'s lock for the block (one lock per run); every rank stops when it is taken."""
    with ExitStack() as stack:
        rank0_decides(run, lambda: stack.enter_context(hold_output_dir(run.cfg.output_dir)) and None)
        yield


def clear_stage_done(run: Run, stage: str) -> None:
    """A stage that (re)starts is not finished until it marks itself done again."""
    if run.rank == 0:
        (run.cfg.stage_dir(stage) / STAGE_DONE_FILE).unlink(missing_ok=True)
    run.barrier()


def mark_stage_done(cfg: TrainConfig, stage: str, output: Path, *, info: dict | None = None) -> None:
    """Written (atomically) after the stage's output is complete and in place; the output is named relative to the
    stage directory, so an output directory can be moved. ``info``: more JSON fields (a training stage: its
    ``trainable_state_bytes`` and, with masks, its ``sparsity``)."""
    done = cfg.stage_dir(stage) / STAGE_DONE_FILE
    tmp = done.with_name(f".{done.name}.tmp-{os.getpid()}")
    relative = os.path.relpath(output, done.parent)
    write_durable(tmp, json.dumps({"stage": stage, "output": relative, **(info or {})}).encode())
    os.replace(tmp, done)


def stage_done(cfg: TrainConfig, stage: str) -> Path | None:
    """The stage's output when the stage finished (its ``stage_done.json`` exists and the output is there)."""
    done = cfg.stage_dir(stage) / STAGE_DONE_FILE
    try:
        output = done.parent / json.loads(done.read_bytes())["output"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return output if output.exists() else None
