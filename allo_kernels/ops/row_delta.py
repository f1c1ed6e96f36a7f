"""Row deltas: a frozen ``nn.Linear`` weight W plus a compact trainable delta D on selected rows (or columns).

Axis 0 (rows R = r_1 < ... < r_k are output neurons; W [out, in], D [k, in]):

    W_eff = W with rows R replaced by round(W[R] + D)     the sum in fp32 (fp64 for fp64 tensors), rounded once
    y     = x W_eff^T + b                                   = x W^T + b with y[..., R] += x D^T, up to that rounding
    dx    = dy W_eff                                        one full GEMM
    dD    = dy[..., R]^T x                                  [k, N] @ [N, in]: k/out of a weight-gradient GEMM
    dW    = none: W is a constant for autograd, its weight-gradient GEMM is never computed
    db    = sum_tokens dy                                   only when the bias is trainable

Axis 1 (columns C are input neurons, e.g. an MLP's down projection, where neuron i is column i; D [out, k]):

    W_eff = W with columns C replaced by round(W[:, C] + D);  y = x W_eff^T + b;  dx = dy W_eff;  dD = dy^T x[..., C]

Two forms compute this, chosen per call by cost (``form=`` overrides):

* ``"effective_weight"``: form W_eff and run one GEMM forward and 1 + k/out GEMMs backward, against (1, 2) for a
  dense trainable layer. W_eff is formed in W's own storage for the GEMM (the k selected rows swapped in and back,
  bit for bit: ``effective_weight_in_place``), or as a cast copy under autocast; it is formed again in the backward,
  not saved: nothing W-sized outlives a call. Its selected rows are exactly what ``merge`` writes (fp32 sum, rounded
  once to W's dtype), so the merged model computes the very same logits as the model in training (bit for bit, in
  fp32 and in bf16), and a bf16 W with an fp32 delta behaves like bf16 weights with fp32 master rows.
* ``"additive"``: y = x W^T + b, then y[..., R] += x D^T (columns: y += x[..., C] D^T); backward
  dx = dy W + dy[..., R] D (columns: dx[..., C] += dy D). No copy of W, but two skinny GEMMs of 2 N k in FLOPs each,
  and skinny GEMMs run well below a square GEMM's speed. Equal to the first form up to rounding (it rounds x W^T and
  x D^T separately: with an fp32 delta on a bf16 W it is the more precise of the two).

Costs beyond the two full GEMMs: W_eff formed in place moves ~3 k in elements (read the selected rows, write
round(W[R] + D), write the old rows back; a cast copy under autocast moves all of W instead), the additive form runs
~4 N k in FLOPs of skinny GEMMs, which run well below a square GEMM's speed. So with W_eff in place the additive form
wins below a number of tokens, whatever k: N < ~0.75 x element bytes x (FLOP/s / memory bytes/s) x (skinny GEMM
efficiency); with a cast copy it wins while N k < B out. Measured on our CPU (benchmarks/bench_row_delta.py --save,
layer section, fp32, k/out = 0.1, one thread, CPU time against a dense trainable layer, the three layer shapes):
N = 64: W_eff in place 0.81-0.82x, additive 0.79-0.82x (within the run's noise of each other); N = 256: W_eff
0.74-0.77x, additive 0.79-0.85x; N = 1024: W_eff 0.72-0.74x, additive 0.73-0.85x, a frozen layer without delta (the
floor) 0.65-0.68x. (With W_eff as a fresh copy of W, before: N = 64 1.03-1.23x, N = 1024 0.74-0.76x.) So on CPU the
additive form runs below N = 64 (``ADDITIVE_BELOW_TOKENS``); with a cast copy the earlier measurement put the
crossing near N k = 25 out. CUDA is unmeasured: an H100's roofline (bf16 ~990 TFLOP/s over 3.35 TB/s, skinny GEMMs
at about half speed) puts the in-place crossing near N = 256 and the cast-copy one near N k = 600 out; the
benchmark's layer section measures it when a GPU is available.

Under ``torch.autocast`` the layer computes in the autocast dtype, like ``nn.Linear``. Under DeepSpeed ZeRO-3 the
parameters are gathered by DeepSpeed's module hooks before the forward and the backward (both are registered on the
``nn.Linear`` module that holds W and D), as for a plain linear layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

AXES = (0, 1)
FORMS = ("effective_weight", "additive")
# When the additive form runs (see the module docstring): W_eff formed in place costs a few selected rows, so the
# additive form wins below a number of tokens (ADDITIVE_BELOW_TOKENS[device]); a cast copy of W (autocast) costs all
# of W, so there it wins while tokens x selected rows < ADDITIVE_BELOW[device] x the weight's size along the axis.
ADDITIVE_BELOW_TOKENS = {"cpu": 64, "cuda": 256}
ADDITIVE_BELOW = {"cpu": 25, "cuda": 600}


def accumulate_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32, or fp64 when any input is fp64: the precision in which W[R] + D is summed before its one rounding."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def merged_slices(selected: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """round(W[R] + D) in ``dtype``, from ``selected`` = W.index_select(axis, R): the selected rows (columns) of the
    effective weight, summed in ``accumulate_dtype`` and rounded once."""
    acc = accumulate_dtype(selected.dtype, delta.dtype)
    return (selected.to(acc) + delta.to(acc)).to(dtype)


def effective_weight(
    weight: torch.Tensor, delta: torch.Tensor, index: torch.Tensor, axis: int, dtype: torch.dtype
) -> torch.Tensor:
    """A fresh W_eff in ``dtype``: W with its selected rows (columns) replaced by round(W[R] + D)."""
    w_eff = weight.to(dtype=dtype, copy=True)
    if index.numel():
        w_eff.index_copy_(axis, index, merged_slices(weight.index_select(axis, index), delta, dtype))
    return w_eff


@contextlib.contextmanager
def effective_weight_in_place(
    weight: torch.Tensor, delta: torch.Tensor, index: torch.Tensor, axis: int, dtype: torch.dtype
) -> Iterator[torch.Tensor]:
    """W_eff for one GEMM. When W is already in ``dtype``, W's own storage holds W_eff for the duration: only its k
    selected rows (columns) are saved, overwritten with round(W[R] + D) and written back bit for bit on exit, even
    on an error. That moves 2 k/out of W's bytes per call instead of copying all of W into a fresh W-sized
    allocation (whose new pages the OS also has to zero), the copy being the part of this form's cost that a frozen
    layer does not pay. The writes go through ``.data``: the net change is nil, so autograd's version counter,
    which guards tensors saved for a backward, is left alone. What the GEMM reads is therefore the same W_eff as
    :func:`effective_weight` builds; nothing else may read W while the GEMM runs (no other thread does in a training
    step; a kernel queued on the same CUDA stream runs in order). Other dtypes (autocast) get a fresh cast copy."""
    if not index.numel():
        yield weight.to(dtype)
        return
    if weight.dtype != dtype:
        yield effective_weight(weight, delta, index, axis, dtype)
        return
    storage = weight.data
    saved = storage.index_select(axis, index)
    storage.index_copy_(axis, index, merged_slices(saved, delta, dtype))
    try:
        yield storage
    finally:
        storage.index_copy_(axis, index, saved)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """W's dtype, or the autocast dtype inside ``torch.autocast`` (nn.Linear's behaviour)."""
    device_type = x.device.type
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: per-device functions
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return weight.dtype


def choose_form(n_tokens: int, weight: torch.Tensor, index: torch.Tensor, axis: int, dtype: torch.dtype) -> str:
    """The cheaper form for this call, computing in ``dtype`` (see the module docstring)."""
    device = weight.device.type if weight.device.type in ADDITIVE_BELOW else "cuda"
    if weight.dtype == dtype:  # W_eff formed in place
        return "additive" if n_tokens < ADDITIVE_BELOW_TOKENS[device] else "effective_weight"
    return "additive" if n_tokens * index.numel() < ADDITIVE_BELOW[device] * weight.shape[axis] else "effective_weight"


class RowDeltaLinearFunction(torch.autograd.Function):
    """y = x W_eff^T + b with gradients for x, D and b only (see the module docstring for the math)."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, index, axis, form):
        dtype = _compute_dtype(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            x_c = x.to(dtype)
            b_c = None if bias is None else bias.to(dtype)
            if form == "effective_weight":
                with effective_weight_in_place(weight, delta, index, axis, dtype) as w_eff:
                    y = F.linear(x_c, w_eff, b_c)
            else:
                y = F.linear(x_c, weight.to(dtype), b_c)
                if axis == 0:
                    y.index_add_(-1, index, F.linear(x_c, delta.to(dtype)))
                else:
                    y.add_(F.linear(x_c.index_select(-1, index), delta.to(dtype)))
        # x in the compute dtype is what dD needs; W, D and the index are the parameters themselves (no copies).
        ctx.save_for_backward(x_c if ctx.needs_input_grad[3] else None, weight, delta, index)
        ctx.axis, ctx.dtype, ctx.form = axis, dtype, form
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x_c, weight, delta, index = ctx.saved_tensors
        axis, dtype = ctx.axis, ctx.dtype
        need_x, _, need_b, need_d = ctx.needs_input_grad[:4]
        dy = dy.to(dtype)
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dd = db = None
        if need_x:
            if ctx.form == "effective_weight":
                with effective_weight_in_place(weight, delta, index, axis, dtype) as w_eff:
                    dx = dy2 @ w_eff
            else:
                dx = dy2 @ weight.to(dtype)
                if axis == 0:  # + dy[..., R] D (out of place: small N only, and visible to FLOP counters)
                    dx = torch.addmm(dx, dy2.index_select(1, index), delta.to(dtype))
                else:
                    dx.index_add_(1, index, dy2 @ delta.to(dtype))  # dx[..., C] += dy D
            dx = dx.view(*dy.shape[:-1], -1).to(ctx.x_dtype)
        if need_d:
            x2 = x_c.reshape(-1, x_c.shape[-1])
            if axis == 0:
                dd = dy2.index_select(1, index).t() @ x2  # [k, N] @ [N, in]
            else:
                dd = dy2.t() @ x2.index_select(1, index)  # [out, N] @ [N, k]
            dd = dd.to(delta.dtype)
        if need_b:
            db = dy2.sum(0).to(ctx.bias_dtype)
        return dx, None, db, dd, None, None, None


def row_delta_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    delta: torch.Tensor,
    index: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    axis: int = 0,
    form: str | None = None,
) -> torch.Tensor:
    """``F.linear(x, W_eff, bias)`` where W_eff = W with ``index`` rows (axis 0) or columns (axis 1) plus ``delta``.

    No gradient is computed for ``weight``; ``delta`` gets dD. ``index`` is a sorted int64 tensor without repeats
    (attach_row_deltas builds it from a bool mask); it is not validated here, on every call. ``form``:
    ``"effective_weight"``, ``"additive"`` or None (the cheaper one for this many tokens; see the module docstring).
    """
    if form is None:
        form = choose_form(x.numel() // max(1, x.shape[-1]), weight, index, axis, _compute_dtype(x, weight))
    elif form not in FORMS:
        raise ValueError(f"form must be one of {FORMS} or None, got {form!r}")
    return RowDeltaLinearFunction.apply(x, weight, bias, delta, index, axis, form)


class RowDeltaLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is frozen and whose selected rows (axis 0) or columns (axis 1) carry a trainable
    delta ``weight_delta`` (index buffer ``weight_delta_index``).

    Made only by ``attach(linear, ...)``, which changes the class of an existing ``nn.Linear`` object in place: the
    module stays where it is and ``weight``/``bias`` keep their names (checkpoints, optimizers and DeepSpeed hooks see
    the same objects); ``merge()`` writes W[R] += D and turns the object back into a plain ``nn.Linear``.
    """

    weight_delta: nn.Parameter
    weight_delta_index: torch.Tensor
    delta_axis: int
    weight_requires_grad_before_attach: bool

    @classmethod
    def attach(cls, linear: nn.Linear, index: torch.Tensor, *, axis: int, dtype: torch.dtype) -> RowDeltaLinear:
        """Freeze ``linear.weight`` and give it a zero delta on ``index`` (sorted, unique, on any device)."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"RowDeltaLinear.attach needs a torch.nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        index = index.to(device=weight.device, dtype=torch.long)
        shape = list(weight.shape)
        shape[axis] = int(index.numel())
        requires_grad = weight.requires_grad
        weight.requires_grad_(False)
        linear.__class__ = cls
        linear.weight_requires_grad_before_attach = requires_grad
        linear.delta_axis = axis
        linear.register_buffer("weight_delta_index", index)
        linear.weight_delta = nn.Parameter(torch.zeros(shape, dtype=dtype, device=weight.device))
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            raise RuntimeError(
                "a RowDeltaLinear's weight must stay frozen (requires_grad=False): only weight_delta is trained; "
                "call allo_kernels.merge_row_deltas(model) before training the full weight again"
            )
        return row_delta_linear(
            x, self.weight, self.weight_delta, self.weight_delta_index, bias=self.bias, axis=self.delta_axis
        )

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """W[R] = round(W[R] + D) in place (fp32 sum, one rounding to W's dtype); back to a plain ``nn.Linear``.

        Only the selected rows (columns) of W are written: every other element keeps its bits.
        """
        weight, index, axis = self.weight, self.weight_delta_index, self.delta_axis
        if index.numel():
            merged = merged_slices(weight.index_select(axis, index), self.weight_delta, weight.dtype)
            weight.index_copy_(axis, index, merged)
        requires_grad = self.weight_requires_grad_before_attach
        del self.weight_delta
        del self.weight_delta_index
        del self.delta_axis
        del self.weight_requires_grad_before_attach
        self.__class__ = nn.Linear
        weight.requires_grad_(requires_grad)
        return self

    def extra_repr(self) -> str:
        what = "rows" if self.delta_axis == 0 else "columns"
        return f"{super().extra_repr()}, delta_{what}={self.weight_delta_index.numel()}"
