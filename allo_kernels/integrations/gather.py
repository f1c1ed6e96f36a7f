"""Gather contexts: how an op that reads a whole weight reaches its full value when a framework partitions it.

The fused-linear ops read the whole lm_head weight [V, H] in the forward and again in the backward. A training
framework may hold only a shard of it on each rank (DeepSpeed ZeRO-3), with the full tensor materialised on demand.
The op does not know any framework: it asks a :class:`ParamGather` for the full shape, for the full values during the
forward (:meth:`ParamGather.gathered`) and again for the backward (:meth:`ParamGather.gather_for_backward`).

This base class is the context for tensors that hold their full value (plain PyTorch, ZeRO 0-2): every method does
nothing. ``allo_kernels.integrations.deepspeed.ZeRO3Gather`` gathers ZeRO-3 partitions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


class ParamGather:
    """A gather context for tensors that are always whole (no framework): nothing to gather or release."""

    def full_shape(self, p: torch.Tensor) -> tuple[int, ...]:
        """The shape of ``p``'s full value (a partitioned parameter's local tensor may be empty)."""
        return tuple(p.shape)

    @contextlib.contextmanager
    def gathered(self, *params: torch.Tensor | None) -> Iterator[None]:
        """The full values of ``params`` inside the block (the forward); released again after it."""
        yield

    def gather_for_backward(self, *params: torch.Tensor | None) -> Callable[[], None]:
        """Gather ``params`` for a backward that reads them; returns what the backward calls when it is done with
        them. A parameter whose gradient autograd still has to accumulate is released after that accumulation (the
        framework's gradient hooks read the full gradient against the full parameter), not by the returned call."""
        return _nothing


def _nothing() -> None:
    pass
