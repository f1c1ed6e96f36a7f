"""Fused-linear cross-entropy: the SFT / Aligner loss from hidden states x lm_head, its gradients made in the forward.

    loss = -sum_n logp_n / n_valid     (reduction "mean"; "sum": no division)
    logp_n = log_softmax((h_n W^T + b) / T)[label_n],  over the n_valid rows whose label != ignore_index

Same value as ``losses.sft_loss(fused_linear_token_logprobs(hidden, weight, labels), labels != ignore_index)``, but
d loss / d logp_n = -1 / n_valid (or -1) is the same for every valid row and known before any logit is, so each
chunk's logits become dZ right after its log-probs, in the forward (what Liger's fused-linear cross-entropy does):

    forward:   rows R = {n : label_n != ignore_index}                (one host sync per call to count them)
               per chunk c of R:  Z_c = H_c W^T + b                   [C, V] in the chunk buffer
                                  logp_c, lse_c from Z_c
                                  dZ_c = g / T * (onehot - softmax(Z_c / T)), in place, g = -1 / n_valid (or -1)
                                  dH_c = dZ_c W; dW += dZ_c^T H_c; db += sum_rows dZ_c   (each only when needed)
    backward:  dH, dW, db times the upstream gradient (a scalar; no multiply when it is 1)

Three [C, H] x [H, V]-sized GEMMs per valid row, as the unfused path has, instead of the token op's three plus a
recomputed forward (or logits retained from the forward to the backward). Ignored rows cost nothing; a frozen weight
(``requires_grad`` False) gets no dW GEMM and no accumulator, a ``hidden`` that needs no gradient no dH GEMM. The
chunk work is the token op's own (``fused_linear._Chunks``, ``fused_linear._chunk_gradients``): the Triton kernels
on CUDA (and on CPU under ``TRITON_INTERPRET=1``), the in-place torch path on CPU.

Memory: the chunk buffer (as ``fused_linear_token_logprobs``, nothing retained) + the gradients, which now live from
the forward to the backward: [N, H] for hidden, fp32 [V, H] for the weight (the returned gradient itself for fp32
weights), fp32 [V] for the bias. The forward makes them only when grad mode is on and an input requires a gradient;
wrap evaluation in ``torch.no_grad()`` (or call ``.detach()``-ed inputs) or it pays for gradients it never uses.

The gradients are handed to autograd (no copy) by the first backward; a second backward through the same graph
(``retain_graph=True``) raises instead of returning them twice.

fp16 (inputs or autocast): the token op's path instead (``fused_linear_token_logprobs`` and the same reduction,
with its recompute), because fp16 training relies on the loss scale reaching dZ before dZ is rounded to fp16, and in
the forward that scale is not known yet; bf16 has fp32's range and needs no loss scale.

Partitioned weights (DeepSpeed ZeRO-3): gathered around the forward through the gather context as in the token op,
and gathered again for the backward only so that autograd and the framework's hooks see the full-shape gradient
against the full parameter (no GEMM reads it there).
"""

from __future__ import annotations

import torch

from .._backend import select_backend
from .._validate import check_choice
from ..integrations import ParamGather
from ..losses import sft_loss
from .fused_linear import (
    _active_rows,
    _chunk_gradients,
    _chunk_indices,
    _Chunks,
    _count,
    _fused_logprobs,
    _gradient_buffers,
    _Options,
    _score_chunk,
    _take,
    _validate_linear,
    compute_dtype,
)
from .token_logprobs import IGNORE_INDEX

REDUCTIONS = ("mean", "sum")


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts: _Options, reduction: str, grad_mode: bool):  # type: ignore[override]
        # grad_mode: whether grad mode was on at the call (inside forward it is always off)
        need_h, need_w, need_b = (grad_mode and need for need in ctx.needs_input_grad[:3])
        with_grads = need_h or need_w or need_b
        grads = _gradient_buffers(hidden, weight, bias, need_h, need_w, need_b)
        rows = _active_rows(labels != opts.ignore_index)
        n_rows = _count(rows)
        logp_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # d loss / d logp_n of every valid row: sft_loss's gradient, -(1 / count) with the count clamped to >= 1.
        g_row = -(1.0 / max(n_rows, 1)) if reduction == "mean" else -1.0
        if n_rows:
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                chunks = _Chunks(opts, weight.shape[0], hidden.shape[1], n_rows, hidden.device)
                chunks.bind(weight, bias)
                for _, index in _chunk_indices(rows, 0, n_rows, chunks.size):
                    h = _take(hidden, index)
                    z, lab = chunks.logits(h), labels[index]
                    logp_c, lse_c, row_sum = _score_chunk(opts, z, lab)
                    logp_sum += logp_c.sum()
                    if with_grads:
                        g = torch.full_like(logp_c, g_row)
                        _chunk_gradients(chunks, z, h, index, lab, g, lse_c, row_sum, grads)
                    del z, h  # the buffer is freed with ``chunks`` below
                del chunks
        loss = -logp_sum
        if reduction == "mean":
            loss = loss / max(n_rows, 1)
        keep_for_backward(ctx, grads, weight, bias, opts.gather, "fused_linear_cross_entropy")
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        grad_h, grad_w, grad_b = hand_over_gradients(ctx, grad_loss)
        return grad_h, grad_w, grad_b, None, None, None, None


def keep_for_backward(ctx, grads, weight, bias, gather: ParamGather, op_name: str) -> None:
    """What ``hand_over_gradients`` needs of a forward that made the gradients ``grads`` (all None: none wanted)."""
    ctx.grads = grads if any(g is not None for g in grads) else None
    ctx.op_name = op_name
    # weight/bias are kept as objects (not saved tensors): a partitioned weight is gathered again in the backward.
    ctx.weight, ctx.bias, ctx.gather = weight, bias, gather


def hand_over_gradients(ctx, grad_loss: torch.Tensor):
    """The backward of an op that made its gradients in the forward (``ctx.grads``; ``ctx.weight``, ``ctx.bias``,
    ``ctx.gather``, ``ctx.op_name``): (dH, dW, dB) times the upstream scalar, the parameter ones in their dtype."""
    if ctx.grads is None:
        raise RuntimeError(
            f"{ctx.op_name}: its gradients were already handed to an earlier backward through this graph (they are "
            "made in the forward and given once); call it again to backpropagate a second time"
        )
    (grad_h, grad_w, grad_b), ctx.grads = ctx.grads, None  # no reference left here: autograd may keep them as is
    weight, bias = ctx.weight, ctx.bias
    release = ctx.gather.gather_for_backward(weight, bias)  # the full parameter for autograd's shape check
    scale = float(grad_loss)  # one host sync per call
    out = []
    for grad, param in ((grad_h, None), (grad_w, weight), (grad_b, bias)):
        if grad is not None:
            if scale != 1.0:
                grad.mul_(scale)
            if param is not None:
                grad = grad.to(param.dtype)  # fp32 accumulators, rounded once
        out.append(grad)
    release()
    return tuple(out)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    gather: ParamGather | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` without the [N, V] logits or a recompute.

    Args:
        hidden: [..., H] (e.g. [B, T, H] final hidden states; pass ``hidden[:, :-1]`` with ``labels[:, 1:]``).
        weight: [V, H] lm_head weight (a partitioned one is gathered for the forward).
        labels: [...] ids in [0, V) or ``ignore_index`` (those rows count for nothing).
        bias: optional [V].
        temperature: the logits are divided by it before the softmax.
        reduction: "mean" (over the valid tokens of the whole batch, TRL/HF's token-level mean; 0 with zero
            gradients when no token is valid) or "sum".
        chunk_size: rows per chunk (None: chosen from V, H and free memory; see ``fused_linear.auto_chunk_size``).
        gather: as in ``fused_linear_token_logprobs``.

    Returns:
        the fp32 scalar loss, equal to ``losses.sft_loss(fused_linear_token_logprobs(...), labels != ignore_index)[0]``
        for "mean"; differentiable w.r.t. hidden, weight and bias (one backward per call, see the module docstring).
        Its gradients are computed in the forward when grad mode is on and an input requires a gradient.
    """
    hidden, weight, labels, bias, temperature, gather, _ = _validate_linear(
        hidden, weight, labels, bias, chunk_size, None, ignore_index, temperature, gather
    )
    reduction = check_choice("reduction", reduction, REDUCTIONS)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    use_triton = select_backend(hidden.device) == "triton"
    opts = _Options(ignore_index, temperature, chunk_size, use_triton, compute_dtype(h2, weight), 0, gather)
    if opts.compute_dtype == torch.float16:
        # fp16 training scales the loss so that small gradients survive fp16; dZ made in the forward would not have
        # that scale yet (g = -1 / n_valid times probabilities underflows). So the token op, whose backward has it.
        labels = labels.reshape(-1)
        logp = _fused_logprobs(h2, weight, labels, bias, ignore_index, temperature, chunk_size, gather, None)[0]
        if reduction == "mean":
            return sft_loss(logp, labels != ignore_index)[0]
        return -logp.sum()  # ignored rows are exactly 0
    # Gather partitioned parameters *before* apply, so autograd records the full parameter shapes.
    with gather.gathered(weight, bias):
        return FusedLinearCrossEntropyFunction.apply(
            h2, weight, bias, labels.reshape(-1).contiguous(), opts, reduction, torch.is_grad_enabled()
        )
