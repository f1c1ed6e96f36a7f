"""token_logprobs: per-token log-probabilities ``log_softmax(logits / T)[label]`` in one pass over the logits.

Math (per row n, vocabulary v, temperature T, upstream gradient g_n = dL/dlogp_n):

    x_v    = logits_v / T
    lse    = log sum_v exp(x_v)                       (online over vocab blocks, fp32)
    logp   = x_label - lse
    dlogp / dlogits_v = (1/T) * (1[v == label] - softmax(x)_v),   softmax(x)_v = exp(x_v - lse)
    grad_logits_v     = g_n / T * (1[v == label] - exp(x_v - lse))

Forward: one program per row reads the row once, keeps a running max ``m`` and a running sum ``s`` of
``exp(x - m)`` (rescaled whenever ``m`` grows), gathers the label's logit in the same pass and stores only the
per-row ``lse`` (4 bytes per token) for the backward.
Backward: one program per row reads the row once and writes the gradient once (optionally into the logits
buffer itself, so no second [N, V] buffer exists). Rows whose label is ``ignore_index`` or whose upstream gradient is
exactly zero (masked tokens) skip the read and only write zeros; in the forward they skip the vocabulary entirely.
So an ignored row is 0.0 with a zero gradient whatever its logits hold (-inf, NaN); the torch reference matches that.

Rows may be strided (``logits[:, :-1]`` of a [B, T, V] tensor): the kernels address row ``r`` as
``(r // n_inner) * stride_outer + (r % n_inner) * stride_inner``, so no copy is made as long as the leading
dimensions fold into at most two strided groups and the vocabulary dimension is contiguous.

Odd vocabularies (V not a multiple of 8 for 16-bit logits, of 4 for fp32, e.g. 32001 or 50257) put every row at a
different offset modulo a 16-byte vector. Each row is therefore read as a head of < VEC elements, whole aligned
vectors (the main loop: 128-bit loads), and a tail of < VEC elements; head and tail cost one extra small masked access
per row (about 2 * VEC elements of ~V), and nothing when V and the row strides are multiples of VEC. The forward is
fully vectorized for any V. The backward aligns to the gradient rows (128-bit stores); its loads are 128-bit too when
the logits rows have the same alignment (in place, contiguous logits, or V a multiple of VEC) and otherwise, for an odd
V on strided ``logits[:, :-1]``, scalar (coalesced 16/32-bit) loads. The logits base pointer itself must be 16-byte
aligned for any vector access (``logits[:, 1:]`` of an odd V is not). benchmarks/results/codegen-sm90.md lists what
the compiler makes of each case.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._backend import select_backend, triton_available
from .._validate import (
    FLOAT_DTYPES,
    INT_DTYPES,
    check_inplace_backward,
    check_labels,
    check_positive,
    check_same_device,
    check_tensor,
    describe,
)

if triton_available():
    import triton
    import triton.language as tl

    from .._triton_rounding import to_rne
else:  # pragma: no cover
    triton = None
    tl = None

# The label value that marks a position without a target (prompt, padding): such a row's log-prob is 0 and it gets no
# gradient. The default ``ignore_index`` of every op and loss, and the value allo_train's collators pad labels with.
IGNORE_INDEX = -100

# Largest vocabulary block one program loads at a time. Tests shrink it (monkeypatch) to exercise the multi-block loop
# and the masked tail on small vocabularies under the interpreter.
MAX_BLOCK_V = 4096


def _launch_config(vocab_size: int) -> tuple[int, int]:
    block = min(MAX_BLOCK_V, triton.next_power_of_2(max(vocab_size, 1)))
    num_warps = 8 if block >= 2048 else (4 if block >= 512 else 2)
    return block, num_warps


def _vector_elems(t: torch.Tensor) -> int:
    """Elements of ``t`` in one 16-byte (128-bit) vector."""
    return 16 // t.element_size()


def _same_phase(a: RowLayout, b: RowLayout, vec: int) -> bool:
    """Whether every row of layout ``a`` starts at the same offset modulo ``vec`` as the same row of layout ``b``."""
    if a == b:
        return True
    return all(x % vec == 0 for x in (a.stride_outer, a.stride_inner, b.stride_outer, b.stride_inner))


# ----------------------------------------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _aligned_span(row_off, V, VEC: tl.constexpr):
        """(head, n_main): row elements [head, head + n_main) start on a VEC-element (16-byte) boundary of a 16-byte
        aligned base and are whole vectors; the head before them and the tail after them are < VEC elements each."""
        head = tl.minimum((VEC - (row_off % VEC).to(tl.int32)) % VEC, V)  # 32-bit column math (V < 2**31)
        return head, (V - head) // VEC * VEC

    @triton.jit
    def _edge_cols(head, n_main, VEC: tl.constexpr):
        """Columns of the head [0, head) and the tail [head + n_main, V) together in one 2*VEC block."""
        e = tl.arange(0, 2 * VEC)
        return tl.where(e < VEC, e, head + n_main + e - VEC)

    @triton.jit
    def _edge_mask(cols, head, V, VEC: tl.constexpr):
        """Which of the ``_edge_cols`` lie in the head [0, head) or the tail (< V); head = V = 0 masks them all."""
        e = tl.arange(0, 2 * VEC)
        return ((e < VEC) & (e < head)) | ((e >= VEC) & (cols < V))

    @triton.jit
    def _token_logprobs_fwd_kernel(
        logits_ptr,
        labels_ptr,
        logp_ptr,
        lse_ptr,
        n_inner,
        stride_outer,
        stride_inner,
        V,
        inv_temp,
        ignore_index,
        BLOCK_V: tl.constexpr,
        VEC: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(labels_ptr + row).to(tl.int64)
        ignored = label == ignore_index
        row_off = (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
        row_ptr = logits_ptr + row_off
        # The main loop reads whole aligned vectors (128-bit loads, whatever V and the row strides are); the few
        # elements before and after it are read once at the end. Ignored rows run zero iterations: no vocabulary work.
        head, n_main = _aligned_span(row_off, V, VEC)
        n_edge = tl.where(ignored, 0, V - n_main)
        n_main = tl.where(ignored, 0, n_main)
        main_ptr = logits_ptr + tl.multiple_of(row_off + head, VEC)
        offs = tl.arange(0, BLOCK_V)
        m = float("-inf")
        s = 0.0
        for start in range(0, n_main, BLOCK_V):
            cols = start + offs
            x = tl.load(main_ptr + cols, mask=cols < n_main, other=float("-inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        if n_edge > 0:
            cols = _edge_cols(head, n_main, VEC)
            x = tl.load(row_ptr + cols, mask=_edge_mask(cols, head, V, VEC), other=float("-inf"))
            x = x.to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(tl.where(ignored, 1.0, s))
        safe_label = tl.where(ignored, 0, label)
        target = tl.load(row_ptr + safe_label, mask=label != ignore_index, other=0.0).to(tl.float32) * inv_temp
        tl.store(logp_ptr + row, tl.where(ignored, 0.0, target - lse))
        tl.store(lse_ptr + row, tl.where(ignored, 0.0, lse))

    @triton.jit
    def _token_logprobs_bwd_kernel(
        logits_ptr,
        grad_ptr,
        labels_ptr,
        lse_ptr,
        grad_logp_ptr,
        n_inner,
        stride_outer,
        stride_inner,
        g_n_inner,
        g_stride_outer,
        g_stride_inner,
        V,
        inv_temp,
        ignore_index,
        BLOCK_V: tl.constexpr,
        VEC: tl.constexpr,
        SAME_PHASE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(labels_ptr + row).to(tl.int64)
        g = tl.load(grad_logp_ptr + row).to(tl.float32)
        lse = tl.load(lse_ptr + row)
        # Ignored rows and rows with a zero upstream gradient (masked tokens) never read the logits.
        active = (label != ignore_index) & (g != 0.0)
        scale = g * inv_temp
        x_off = (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
        g_off = (row // g_n_inner) * g_stride_outer + (row % g_n_inner) * g_stride_inner
        # Aligned to the gradient row (vector stores). The loads are vectors too when every logits row sits at the
        # same offset modulo VEC as its gradient row (SAME_PHASE: in place, or both layouts' strides multiples of VEC).
        head, n_main = _aligned_span(g_off, V, VEC)
        g_main = grad_ptr + tl.multiple_of(g_off + head, VEC)
        if SAME_PHASE:
            x_main = logits_ptr + tl.multiple_of(x_off + head, VEC)
        else:
            x_main = logits_ptr + x_off + head
        # The < VEC elements before the first and after the last aligned vector (none when rows are aligned),
        # first, so that nothing they need stays live through the main loop.
        if n_main < V:
            cols = _edge_cols(head, n_main, VEC)
            read = _edge_mask(cols, tl.where(active, head, 0), tl.where(active, V, 0), VEC)
            x = tl.load(logits_ptr + x_off + cols, mask=read, other=0.0).to(tl.float32) * inv_temp
            grad = scale * (tl.where(cols == label, 1.0, 0.0) - tl.exp(x - lse))
            grad = tl.where(active, grad, 0.0)
            tl.store(
                grad_ptr + g_off + cols, to_rne(grad, grad_ptr.dtype.element_ty), mask=_edge_mask(cols, head, V, VEC)
            )
        label_col = (label - head).to(tl.int32)  # labels are checked to be in [0, V) or ignore_index on the host
        n_read = tl.where(active, n_main, 0)  # reads are predicated off for inactive rows
        offs = tl.arange(0, BLOCK_V)
        for start in range(0, n_main, BLOCK_V):
            cols = start + offs
            x = tl.load(x_main + cols, mask=cols < n_read, other=0.0).to(tl.float32) * inv_temp
            grad = scale * (tl.where(cols == label_col, 1.0, 0.0) - tl.exp(x - lse))
            grad = tl.where(active, grad, 0.0)
            tl.store(g_main + cols, to_rne(grad, grad_ptr.dtype.element_ty), mask=cols < n_main)


# ------------------------------------------------------------------------------------------------------ row layouts
@dataclass(frozen=True)
class RowLayout:
    """How row r of a [..., V] tensor is addressed: (r // n_inner) * stride_outer + (r % n_inner) * stride_inner."""

    n_rows: int
    n_inner: int
    stride_outer: int
    stride_inner: int


def row_layout(t: torch.Tensor) -> RowLayout | None:
    """Fold the leading dimensions of ``t`` into at most two strided groups; None if that is impossible."""
    shape, strides = t.shape[:-1], t.stride()[:-1]
    groups: list[list[int]] = []  # [size, stride], outermost first
    for size, stride in zip(shape, strides):
        if size == 1:
            continue
        if groups and groups[-1][1] == size * stride:
            groups[-1] = [groups[-1][0] * size, stride]
        else:
            groups.append([size, stride])
    n_rows = 1
    for size in shape:
        n_rows *= size
    if not groups:
        return RowLayout(n_rows, 1, 0, 0)
    if len(groups) == 1:
        return RowLayout(n_rows, groups[0][0], 0, groups[0][1])
    if len(groups) == 2:
        return RowLayout(n_rows, groups[1][0], groups[0][1], groups[1][1])
    return None


def as_row_addressable(logits: torch.Tensor) -> tuple[torch.Tensor, RowLayout]:
    """Return ``logits`` (or, only when unavoidable, a contiguous copy) and its row layout."""
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    layout = row_layout(logits)
    if layout is None:
        logits = logits.contiguous()
        layout = row_layout(logits)
        assert layout is not None
    return logits, layout


# --------------------------------------------------------------------------------------------------- launch wrappers
def logprobs_forward(
    logits: torch.Tensor, layout: RowLayout, labels: torch.Tensor, *, ignore_index: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward over rows of ``logits``; ``labels`` flat [N]. Returns fp32 (logp [N], lse [N])."""
    n, vocab = layout.n_rows, logits.shape[-1]
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return logp, lse
    block, num_warps = _launch_config(vocab)
    _token_logprobs_fwd_kernel[(n,)](
        logits,
        labels,
        logp,
        lse,
        layout.n_inner,
        layout.stride_outer,
        layout.stride_inner,
        vocab,
        1.0 / temperature,
        ignore_index,
        BLOCK_V=block,
        VEC=_vector_elems(logits),
        num_warps=num_warps,
    )
    return logp, lse


def logprobs_backward(
    logits: torch.Tensor,
    layout: RowLayout,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    *,
    ignore_index: int,
    temperature: float,
    inplace: bool,
) -> torch.Tensor:
    """Triton backward. Returns grad w.r.t. ``logits`` (written into ``logits`` itself when ``inplace``)."""
    n, vocab = layout.n_rows, logits.shape[-1]
    if inplace:
        grad, g_layout = logits, layout
    else:
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        g_layout = row_layout(grad)
    if n == 0:
        return grad
    block, num_warps = _launch_config(vocab)
    grad_logp = grad_logp.reshape(-1).to(torch.float32).contiguous()
    _token_logprobs_bwd_kernel[(n,)](
        logits,
        grad,
        labels,
        lse,
        grad_logp,
        layout.n_inner,
        layout.stride_outer,
        layout.stride_inner,
        g_layout.n_inner,
        g_layout.stride_outer,
        g_layout.stride_inner,
        vocab,
        1.0 / temperature,
        ignore_index,
        BLOCK_V=block,
        VEC=_vector_elems(logits),
        SAME_PHASE=_same_phase(layout, g_layout, _vector_elems(logits)),
        num_warps=num_warps,
    )
    return grad


@dataclass(frozen=True)
class _Options:
    layout: RowLayout
    ignore_index: int
    temperature: float
    inplace_backward: bool


class TokenLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels; labels and options carry no gradient."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, opts: _Options) -> torch.Tensor:  # type: ignore[override]
        logp, lse = logprobs_forward(
            logits, opts.layout, labels, ignore_index=opts.ignore_index, temperature=opts.temperature
        )
        ctx.save_for_backward(logits, labels, lse)
        ctx.opts = opts
        return logp.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor):  # type: ignore[override]
        logits, labels, lse = ctx.saved_tensors
        opts: _Options = ctx.opts
        grad = logprobs_backward(
            logits,
            opts.layout,
            labels,
            lse,
            grad_logp,
            ignore_index=opts.ignore_index,
            temperature=opts.temperature,
            inplace=opts.inplace_backward,
        )
        if opts.inplace_backward:
            # The kernel wrote through a raw pointer; bump the version counter as an in-place torch op would, so any
            # other autograd node that saved these logits (or a second backward) raises instead of reading gradients.
            torch.autograd.graph.increment_version(logits)
        return grad, None, None


# ------------------------------------------------------------------------------------------------- torch reference
def token_logprobs_reference(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX, temperature: float = 1.0
) -> torch.Tensor:
    """Plain-torch ground truth (and CPU fallback): fp32 log-softmax, gather, zeros at ignored positions.

    Like the kernels, an ignored row gives exactly 0.0 and a zero gradient whatever its logits hold.
    """
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logp_all = torch.log_softmax(x, dim=-1)
    # log_softmax's backward is grad - exp(out) * sum(grad): an ignored row (grad 0) still gets 0 * NaN = NaN when its
    # out holds a NaN (logits NaN, all -inf, or +inf). A NaN anywhere in a row makes the row's sum of exponentials
    # NaN, hence the whole row of out, position 0 included; so checking N values of out (not another [N, V] pass)
    # finds every such row. Only then are the ignored rows zeroed and log_softmax run again (the rare case pays).
    if bool((~valid & ~torch.isfinite(logp_all[..., 0])).any()):
        logp_all = torch.log_softmax(x.masked_fill(~valid.unsqueeze(-1), 0.0), dim=-1)
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logp, torch.zeros_like(logp))


# ------------------------------------------------------------------------------------------------------- public API
def validate_logits_labels(
    logits: object, labels: object, *, ignore_index: object, temperature: object
) -> tuple[torch.Tensor, torch.Tensor, float]:
    logits = check_tensor("logits", logits, dtypes=FLOAT_DTYPES, min_ndim=1)
    labels = check_tensor("labels", labels, dtypes=INT_DTYPES)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {describe(ignore_index)}")
    temperature = check_positive("temperature", temperature)
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels must have the shape of logits without its last (vocabulary) dimension "
            f"{tuple(logits.shape[:-1])}, got {describe(labels)}"
        )
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dimension, got {describe(logits)}")
    check_same_device(logits=logits, labels=labels)
    labels = check_labels("labels", labels, logits.shape[-1], ignore_index)  # narrow dtypes widened to int64
    return logits, labels, temperature


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Per-token ``log_softmax(logits / temperature)[label]`` as fp32, exactly 0.0 where ``label == ignore_index``.

    Args:
        logits: [..., V] fp16/bf16/fp32. Rows may be strided (``logits[:, :-1]``); the vocabulary dimension should
            be contiguous, otherwise a copy is made.
        labels: [...] integer ids in [0, V) or ``ignore_index``, any of int8/int16/int32/int64/uint8 (compared
            exactly, in int64). No shifting happens here: pass ``logits[:, :-1]`` with ``labels[:, 1:]``.
        inplace_backward: opt-in for the Triton path: the backward writes the gradient into the logits buffer
            itself instead of a new [N, V] buffer. Only safe when nothing else needs those logits afterwards
            (the usual case: logits that exist only to feed this loss, e.g. an lm_head output). Refused with a
            ValueError on every backend when the logits are a leaf that requires grad or a view of one (its data
            would be replaced by its gradient) or when their elements may overlap (expanded, stride 0: gradient rows
            would collide); refused rather than silently given a separate buffer, because a caller who opts in is
            counting on the memory saved. After the write, autograd sees the logits as modified in place, so another
            node that saved them raises instead of reading gradients. Logits whose vocabulary dimension is not
            contiguous are copied, and then the gradient goes to a separate buffer. The torch reference computes no
            in-place gradient (but checks the same).

    Returns:
        fp32 tensor of shape ``labels.shape``, differentiable w.r.t. ``logits``.
    """
    logits, labels, temperature = validate_logits_labels(
        logits, labels, ignore_index=ignore_index, temperature=temperature
    )
    inplace_backward = check_inplace_backward(inplace_backward, logits)
    if select_backend(logits.device) != "triton":
        return token_logprobs_reference(logits, labels, ignore_index=ignore_index, temperature=temperature)
    logits_rows, layout = as_row_addressable(logits)
    opts = _Options(layout, ignore_index, temperature, inplace_backward and logits_rows is logits)
    flat_labels = labels.reshape(-1).contiguous()
    return TokenLogprobsFunction.apply(logits_rows, flat_labels, opts).view(labels.shape)
