"""Argument checks shared by the ops, losses and optimizer.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind, wrong value) with a message that
names the argument and says what was received, so a user can fix the call without reading our source.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"Tensor(shape={tuple(t.shape)}, dtype={t.dtype}, device={t.device})"
    return f"{type(t).__name__} {t!r}"


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Iterable[torch.dtype] | None = None,
    ndim: int | Iterable[int] | None = None,
    min_ndim: int | None = None,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {describe(t)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {describe(t)}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, got {describe(t)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got {describe(t)}")
    return t


def check_same_device(**tensors: torch.Tensor | None) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; put them on one device")


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], *, like: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of {like} {tuple(shape)}, got {describe(t)}")


def check_positive(name: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {describe(value)}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return value


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def check_labels(name: str, labels: torch.Tensor, vocab_size: int, ignore_index: int) -> torch.Tensor:
    """Labels must be in [0, vocab_size) or equal to ignore_index (one reduction, one host sync).

    Any integer dtype of ``INT_DTYPES`` is accepted and compared in int64: a Python int compared with a uint8/int8/int16
    tensor is cast to that dtype and wraps (uint8 156 would equal -100; int16 50 would not be below 40000). Returns the
    labels as int32/int64 (narrower dtypes widened to int64, an [N]-sized copy), so the kernels and every later
    ``labels != ignore_index`` see exact values.
    """
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if labels.dtype not in (torch.int32, torch.int64):
        labels = labels.to(torch.int64)
    wide = labels.to(torch.int64)  # int32 too: ignore_index may lie outside int32
    bad = ((wide < 0) | (wide >= vocab_size)) & (wide != ignore_index)
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        value = wide[tuple(idx)].item()
        raise ValueError(
            f"{name} must be in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"got {value} at index {tuple(idx)} ({int(bad.sum())} invalid label(s))"
        )
    return labels


def may_overlap(t: torch.Tensor) -> bool:
    """True unless the elements of ``t`` provably occupy distinct memory (a stride-0 / expanded dimension, or strides
    that interleave). Sufficient test: ordered by stride, each dimension must step past everything the smaller ones
    cover; rare exotic non-overlapping layouts are reported as overlapping (callers refuse or copy, never corrupt)."""
    if t.numel() <= 1:
        return False
    covered = 1  # elements spanned by the dimensions seen so far
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride < covered:
            return True
        covered = stride * (size - 1) + covered
    return False


def check_inplace_backward(inplace_backward: object, logits: torch.Tensor, *, name: str = "logits") -> bool:
    """Validate ``inplace_backward=True`` (the backward writes the gradient into ``logits``' own memory).

    Refused with a ValueError (on every backend, so code that passes on CPU also runs on GPU), because they would
    silently destroy data or give wrong gradients: a leaf that requires grad, or a view of one (a parameter's or an
    input's data would be replaced by its gradient), and logits whose elements may share memory (an expanded /
    stride-0 dimension: every row's gradient would land on the same address). Logits that need no gradient are never
    written, so nothing is checked for them. Returns the option as a bool.
    """
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {describe(inplace_backward)}")
    if not inplace_backward or not logits.requires_grad:
        return inplace_backward
    base = logits._base
    if logits.is_leaf or (base is not None and base.is_leaf and base.requires_grad):
        what = "a leaf" if logits.is_leaf else "a view of a leaf"
        raise ValueError(
            f"inplace_backward=True would overwrite {name} with its gradient, but {name} is {what} tensor that "
            f"requires grad ({describe(logits)}): its data belong to a parameter or input. Pass logits computed by an "
            "op (e.g. an lm_head output) or use inplace_backward=False"
        )
    if may_overlap(logits):
        raise ValueError(
            f"inplace_backward=True needs {name} whose elements have their own memory, but {name} may overlap "
            f"itself (shape {tuple(logits.shape)}, stride {tuple(logits.stride())}, e.g. expanded): several gradient "
            "rows would be written to one address. Use inplace_backward=False"
        )
    return True
