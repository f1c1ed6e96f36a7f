"""Compact layouts: which elements of a (flat) parameter SparseAdamW updates, and where their state lives.

A layout describes one parameter tensor as seen by the optimizer (a model weight, or under ZeRO one flat fp32
partition) as a list of *segments*: runs of consecutive elements of the flattened parameter that are selected.
Segment ``s`` covers param elements ``[seg_param[s], seg_param[s] + seg_len[s])`` and compact state elements
``[seg_state[s], seg_state[s] + seg_len[s])``; the compact state is the concatenation of all segments, in parameter
order. Selected rows of a row mask that are adjacent merge into one segment, so a dense parameter is one segment.

An optional ``elem_mask`` (bool, one entry per compact element) says which compact elements are really updated:
element masks keep state for every row that contains a selected element and update only the selected elements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .._validate import describe


@dataclass
class Layout:
    numel: int  # elements of the flattened parameter
    seg_param: torch.Tensor  # int64 [S], on the parameter's device
    seg_state: torch.Tensor  # int64 [S]
    seg_len: torch.Tensor  # int64 [S]
    n_compact: int  # sum(seg_len): elements of each state tensor
    state_shape: tuple[int, ...]  # shape of exp_avg & co ((k, C) for row layouts, p.shape when dense, (n,) else)
    elem_mask: torch.Tensor | None = None  # bool [n_compact] or None (all compact elements are updated)
    dense: bool = False  # one segment covering the whole parameter, no element mask
    # Tables derived from the segments, built on first use and kept with the layout: the native kernel's CPU copies,
    # the Triton kernel's block tables (on the layout's device) and alignment.
    _derived: dict = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return self.seg_param.device

    def cpu_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Contiguous CPU copies of the segment tables (and the element mask as uint8) for the native kernel."""
        if "cpu_tables" not in self._derived:
            em = None
            if self.elem_mask is not None:
                em = self.elem_mask.to("cpu", torch.uint8).contiguous()
            self._derived["cpu_tables"] = (
                self.seg_param.to("cpu").contiguous(),
                self.seg_state.to("cpu").contiguous(),
                self.seg_len.to("cpu").contiguous(),
                em,
            )
        return self._derived["cpu_tables"]

    def flat_index(self) -> torch.Tensor:
        """int64 [n_compact]: the flat parameter element of every compact element (built on demand, not cached)."""
        if self.n_compact == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        starts = torch.repeat_interleave(self.seg_param - self.seg_state, self.seg_len, output_size=self.n_compact)
        return starts + torch.arange(self.n_compact, device=self.device)

    def same_as(self, other: Layout) -> bool:
        if self.numel != other.numel or self.n_compact != other.n_compact:
            return False
        if self.seg_param.numel() != other.seg_param.numel():
            return False
        dev = self.device
        if not (
            torch.equal(self.seg_param, other.seg_param.to(dev)) and torch.equal(self.seg_len, other.seg_len.to(dev))
        ):
            return False
        if (self.elem_mask is None) != (other.elem_mask is None):
            return False
        return self.elem_mask is None or torch.equal(self.elem_mask, other.elem_mask.to(dev))

    def to_dict(self) -> dict:
        """CPU description that state_dict stores: exactly which parameter elements the state belongs to (enough to
        check it against the current parameter and migrate it onto another layout)."""
        return {
            "numel": self.numel,
            "seg_param": self.seg_param.cpu(),
            "seg_len": self.seg_len.cpu(),
            "elem_mask": None if self.elem_mask is None else self.elem_mask.cpu(),
            "state_shape": tuple(self.state_shape),
        }

    @staticmethod
    def from_dict(d: dict, device: torch.device, *, what: str = "saved layout") -> Layout:
        """Inverse of ``to_dict``; a malformed description (wrong types, segments out of range, unsorted or
        overlapping, an element mask of the wrong length) is a ValueError starting with ``what``."""
        try:
            numel = int(d["numel"])
            seg_param, seg_len, elem_mask = d["seg_param"], d["seg_len"], d["elem_mask"]
            state_shape = tuple(int(x) for x in d["state_shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{what} is malformed ({type(e).__name__}: {e}), not SparseAdamW.state_dict()'s") from e
        tables_ok = (
            all(
                isinstance(t, torch.Tensor) and t.dim() == 1 and not t.is_floating_point() for t in (seg_param, seg_len)
            )
            and seg_param.numel() == seg_len.numel()
        )
        if not tables_ok:
            raise ValueError(f"{what} has malformed segment tables: seg_param {seg_param!r}, seg_len {seg_len!r}")
        start, length = seg_param.to(torch.int64).cpu(), seg_len.to(torch.int64).cpu()
        end = start + length
        if bool((start < 0).any() | (length < 0).any() | (end > numel).any()) or bool((start[1:] < end[:-1]).any()):
            raise ValueError(f"{what} has segments outside [0, {numel}) or out of order")
        n = int(length.sum()) if length.numel() else 0
        if elem_mask is not None and (not isinstance(elem_mask, torch.Tensor) or elem_mask.numel() != n):
            raise ValueError(f"{what} has an element mask {describe(elem_mask)} for {n} state elements")
        if math.prod(state_shape) != n:
            raise ValueError(f"{what} has state shape {state_shape} for {n} state elements")
        return make_layout(
            numel,
            start.to(device),
            length.to(device),
            elem_mask=None if elem_mask is None else elem_mask.to(device),
            state_shape=state_shape,
        )


def make_layout(
    numel: int,
    seg_param: torch.Tensor,
    seg_len: torch.Tensor,
    *,
    elem_mask: torch.Tensor | None = None,
    state_shape: tuple[int, ...] | None = None,
    param_shape: tuple[int, ...] | None = None,
) -> Layout:
    seg_param = seg_param.to(torch.int64).contiguous()
    seg_len = seg_len.to(torch.int64).contiguous()
    keep = seg_len > 0
    if not bool(keep.all()):  # zero-length segments own no compact elements: dropping them changes nothing else
        seg_param, seg_len = seg_param[keep], seg_len[keep]
    seg_state = torch.cumsum(seg_len, 0) - seg_len
    n = int(seg_len.sum().item()) if seg_len.numel() else 0
    if elem_mask is not None:
        elem_mask = elem_mask.to(torch.bool).reshape(-1).contiguous()
        if elem_mask.numel() != n:
            raise ValueError(f"internal: element mask has {elem_mask.numel()} entries for {n} compact elements")
        if bool(elem_mask.all()):
            elem_mask = None
    dense = elem_mask is None and seg_len.numel() == 1 and int(seg_param[0]) == 0 and n == numel
    if state_shape is None:
        state_shape = tuple(param_shape) if (dense and param_shape is not None) else (n,)
    return Layout(
        numel=numel,
        seg_param=seg_param,
        seg_state=seg_state,
        seg_len=seg_len,
        n_compact=n,
        state_shape=tuple(state_shape),
        elem_mask=elem_mask,
        dense=dense,
    )


def runs_of(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Start index and length of every run of True in a 1-D bool tensor."""
    sel = selected.to(torch.int8)
    if sel.numel() == 0:
        e = torch.empty(0, dtype=torch.int64, device=selected.device)
        return e, e
    pad = torch.zeros(1, dtype=torch.int8, device=sel.device)
    diff = torch.diff(torch.cat([pad, sel, pad]))
    starts = torch.nonzero(diff == 1).flatten()
    ends = torch.nonzero(diff == -1).flatten()
    return starts, ends - starts


def dense_layout(p: torch.Tensor) -> Layout:
    n = p.numel()
    dev = p.device
    return make_layout(
        n,
        torch.zeros(1, dtype=torch.int64, device=dev),
        torch.full((1,), n, dtype=torch.int64, device=dev),
        param_shape=tuple(p.shape),
    )


def mask_layout(p: torch.Tensor, mask: torch.Tensor) -> Layout:
    """Layout of a parameter under a row mask ([p.shape[0]]) or an element mask (p.shape)."""
    n = p.numel()
    n_rows = p.shape[0] if p.dim() >= 1 else 1
    row_size = n // n_rows if n_rows else 0
    if mask.dim() == 1 and mask.shape[0] == n_rows and p.dim() >= 1:
        row_sel = mask
        elem = None
    else:
        elem = mask.reshape(n_rows, row_size)
        row_sel = elem.any(dim=1)
    rows = torch.nonzero(row_sel).flatten()
    starts, lens = runs_of(row_sel)
    elem_mask = None if elem is None else elem.index_select(0, rows).reshape(-1)
    return make_layout(
        n, starts * row_size, lens * row_size, elem_mask=elem_mask, state_shape=(int(rows.numel()), row_size)
    )


def migrate_tensor(
    old: torch.Tensor, old_layout: Layout, new_layout: Layout, *, fill: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """Carry compact state from one layout to another: elements kept in both keep their values, new ones get ``fill``
    (a scalar, or a tensor [new n_compact] to take values from)."""
    dev = new_layout.device
    old = old.to(dev).reshape(-1)
    old_idx = old_layout.flat_index().to(dev)
    new_idx = new_layout.flat_index()
    if isinstance(fill, torch.Tensor):
        out = fill.to(device=dev, dtype=old.dtype).reshape(-1).clone()
    else:
        out = torch.full((new_layout.n_compact,), fill, dtype=old.dtype, device=dev)
    if old_idx.numel() and new_idx.numel():
        pos = torch.searchsorted(old_idx, new_idx).clamp_(max=old_idx.numel() - 1)
        kept = old_idx[pos] == new_idx
        out[kept] = old[pos[kept]]
    return out.reshape(new_layout.state_shape)
