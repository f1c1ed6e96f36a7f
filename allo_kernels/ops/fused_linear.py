"""Fused-linear token log-probs: ``token_logprobs(hidden @ weight.T + bias, labels)`` without the [N, V] logits.

The tokens are processed in chunks of C rows (chunked along tokens, not only along the batch):

    forward, per chunk c:   Z_c = H_c W^T + b           [C, V] in the input dtype (the only V-sized buffer)
                            logp_c, lse_c = token_logprobs kernel over Z_c
                            keep lse [N] (4 bytes per token); Z_c is dropped
    backward, per chunk c:  Z_c recomputed (one more GEMM), then the token_logprobs backward kernel turns it
                            *in place* into dZ_c = g_c / T * (onehot - softmax(Z_c / T))
                            dH_c  = dZ_c W                 [C, H]
                            dW   += dZ_c^T H_c             fp32 accumulator [V, H]
                            db   += sum_rows dZ_c          fp32 accumulator [V]

Why recompute instead of "gradient in forward" (what Liger's fused losses do): the gradient of a general alignment
loss w.r.t. logp_t is known only after every token of the batch was scored (DPO's sigmoid couples all tokens of a
pair, the percentile mask couples a whole sequence), so computing dZ in the forward would have to fix the loss
inside the kernel. Recomputing costs one extra [C, H] x [H, V] GEMM per chunk (a third more matmul FLOPs than
unfused) and keeps every loss in ``allo_kernels.losses`` usable unchanged on top, with per-token weights, masks and
precomputed reference log-probs. Peak memory is one chunk of logits plus the fp32 weight-gradient accumulator.

DeepSpeed ZeRO-3: when ``weight`` (and ``bias``) are ZeRO-3 partitions (empty local shards), they are gathered for
the forward and again for the backward, and released afterwards, through the ``all_gather``/``partition`` methods
DeepSpeed attaches to its parameters (no deepspeed import here). The full-size gradient is returned to autograd,
where DeepSpeed's own hooks reduce-scatter it as for any ZeRO-3 parameter.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .._backend import select_backend
from .._validate import FLOAT_DTYPES, check_same_device, check_tensor, describe
from .token_logprobs import logprobs_backward, logprobs_forward, row_layout, validate_logits_labels
from .token_scores import TokenScores, scores_from_logprobs, validate_score_options

# Budget for one chunk of logits when chunk_size is None.
MAX_CHUNK_BYTES_CUDA = 1 << 30
MAX_CHUNK_BYTES_CPU = 256 << 20


def auto_chunk_size(n_rows: int, vocab_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk: the chunk's [C, V] logits (plus fp32 scratch of the torch path) fit a memory budget.

    On CUDA the budget is min(1 GiB, free memory / 8); on CPU 256 MiB. Larger chunks make larger GEMMs (better
    tensor-core use) and fewer launches; beyond ~1 GiB of logits there is nothing left to gain.
    """
    elem = torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(MAX_CHUNK_BYTES_CUDA, free // 8)
    else:
        budget = MAX_CHUNK_BYTES_CPU
        elem += 8  # the torch path materialises fp32 copies of the chunk
    rows = max(1, budget // max(1, vocab_size * elem))
    if rows >= 256:
        rows = rows // 128 * 128  # GEMM-friendly
    return int(max(1, min(n_rows, rows)))


# ---------------------------------------------------------------------------------------------------- DeepSpeed ZeRO-3
def _is_zero3_partitioned(p: torch.Tensor | None) -> bool:
    status = getattr(p, "ds_status", None)
    return status is not None and getattr(status, "name", str(status)) == "NOT_AVAILABLE"


@contextlib.contextmanager
def gathered(*params: torch.Tensor | None):
    """Gather ZeRO-3-partitioned params for the duration of the block (no-op for ordinary tensors)."""
    todo = [p for p in params if _is_zero3_partitioned(p)]
    for p in todo:
        p.all_gather()
    try:
        yield
    finally:
        for p in todo:
            p.partition()


def _gather_for_backward(*params: torch.Tensor | None) -> list[torch.Tensor]:
    """Gather ZeRO-3 partitions for the backward and release them only after autograd accumulated their gradient.

    Autograd checks the returned gradient against the parameter's full shape when it accumulates it, and DeepSpeed's
    reduce hook (registered at initialize, so it runs first) reads it there; our own post-hook on the same
    AccumulateGrad node then partitions the parameter again. Returns the parameters without a gradient (frozen),
    which the caller releases itself when the backward is done.
    """
    release_now = []
    for p in params:
        if not _is_zero3_partitioned(p):
            continue
        p.all_gather()
        if not p.requires_grad:
            release_now.append(p)
            continue
        if getattr(p, "_allo_grad_acc", None) is None:
            with torch.enable_grad():  # backward runs with grad mode off; the node lookup needs a graph
                acc = p.expand_as(p).grad_fn.next_functions[0][0]

            def release(*_unused, p=p):
                if getattr(p, "_allo_release_pending", False):
                    p._allo_release_pending = False
                    p.partition()

            acc.register_hook(release)
            p._allo_grad_acc = acc  # keep the node (and its hook) alive, as DeepSpeed does for its own hooks
        p._allo_release_pending = True
    return release_now


# --------------------------------------------------------------------------------------------------------- the chunks
def _chunk_logits(hidden_c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        return hidden_c @ weight.t()
    return torch.addmm(bias, hidden_c, weight.t())


def _chunk_forward_torch(z: torch.Tensor, labels: torch.Tensor, ignore_index: int, temperature: float):
    x = z.float() / temperature
    valid = labels != ignore_index
    lse = torch.logsumexp(x, dim=-1)
    target = x.gather(-1, torch.where(valid, labels, 0).long()[:, None])[:, 0]
    zero = torch.zeros_like(lse)
    return torch.where(valid, target - lse, zero), torch.where(valid, lse, zero)


def _chunk_backward_torch(z, labels, lse, g, ignore_index: int, temperature: float) -> torch.Tensor:
    valid = labels != ignore_index
    # Ignored rows store lse = 0: exp(z - 0) would overflow for logits > ~88 and inf * 0 is NaN, so their
    # probabilities are zeroed before the exp rather than after.
    x = torch.where(valid[:, None], z.float() / temperature - lse[:, None], float("-inf"))
    p = torch.exp(x)
    grad = -p
    rows = torch.arange(z.shape[0], device=z.device)
    grad[rows, torch.where(valid, labels, 0).long()] += 1.0
    scale = torch.where(valid, g / temperature, torch.zeros_like(g))
    return (grad * scale[:, None]).to(z.dtype)


def _accumulate_weight_grad(acc: torch.Tensor, dz: torch.Tensor, h: torch.Tensor) -> None:
    """acc[V, H] (fp32) += dz^T h, accumulating the products in fp32 even for bf16/fp16 inputs."""
    if dz.dtype == torch.float32:
        acc.addmm_(dz.t(), h.float() if h.dtype != torch.float32 else h)
        return
    if dz.is_cuda:
        try:
            acc.add_(torch.mm(dz.t(), h, out_dtype=torch.float32))
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    acc.add_((dz.t() @ h).float())


@dataclass(frozen=True)
class _Options:
    ignore_index: int
    temperature: float
    chunk_size: int
    use_triton: bool
    compute_dtype: torch.dtype  # the logits' dtype: autocast's when it is on, else the inputs'


@contextlib.contextmanager
def _compute_in(dtype: torch.dtype, device: torch.device, weight: torch.Tensor, bias: torch.Tensor | None):
    """Autocast off (our ops run in ``dtype`` explicitly) and weight/bias cast to ``dtype`` for the block.

    Under ``torch.autocast`` the unfused ``linear(hidden, weight, bias)`` casts all three to the autocast dtype, so
    that is the dtype the logits are computed (and recomputed) in, in the forward and in the backward, wherever the
    backward runs. Without the explicit cast, a backward outside the autocast region would recompute the logits in
    fp32 against an lse taken from bf16 logits.
    """
    with torch.autocast(device_type=device.type, enabled=False):
        yield weight.to(dtype), None if bias is None else bias.to(dtype)


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the logits are computed in: autocast's when autocast is on for this device, else the inputs'."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return weight.dtype


class FusedLinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts: _Options):  # type: ignore[override]
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        with _compute_in(opts.compute_dtype, hidden.device, weight, bias) as (w, b):
            for start in range(0, n, opts.chunk_size):
                stop = min(n, start + opts.chunk_size)
                z = _chunk_logits(hidden[start:stop].to(opts.compute_dtype), w, b)
                lab = labels[start:stop]
                if opts.use_triton:
                    logp[start:stop], lse[start:stop] = logprobs_forward(
                        z, row_layout(z), lab, ignore_index=opts.ignore_index, temperature=opts.temperature
                    )
                else:
                    logp[start:stop], lse[start:stop] = _chunk_forward_torch(
                        z, lab, opts.ignore_index, opts.temperature
                    )
                del z
        ctx.save_for_backward(hidden, labels, lse)
        # weight/bias are kept as objects, not saved tensors: under ZeRO-3 their storage is released after the
        # forward and gathered again in the backward, so only the parameter objects themselves stay valid.
        ctx.weight, ctx.bias = weight, bias
        ctx.opts = opts
        return logp

    @staticmethod
    def backward(ctx, grad_logp):  # type: ignore[override]
        hidden, labels, lse = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias
        opts: _Options = ctx.opts
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_logp = grad_logp.reshape(-1).to(torch.float32).contiguous()
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        release = _gather_for_backward(weight, bias)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        with _compute_in(opts.compute_dtype, hidden.device, weight, bias) as (w, b):
            for start in range(0, n, opts.chunk_size):
                stop = min(n, start + opts.chunk_size)
                h = hidden[start:stop].to(opts.compute_dtype)
                z = _chunk_logits(h, w, b)
                lab, g = labels[start:stop], grad_logp[start:stop]
                if opts.use_triton:
                    dz = logprobs_backward(
                        z,
                        row_layout(z),
                        lab,
                        lse[start:stop],
                        g,
                        ignore_index=opts.ignore_index,
                        temperature=opts.temperature,
                        inplace=True,
                    )
                else:
                    dz = _chunk_backward_torch(z, lab, lse[start:stop], g, opts.ignore_index, opts.temperature)
                if grad_h is not None:
                    grad_h[start:stop] = dz @ w
                if grad_w is not None:
                    _accumulate_weight_grad(grad_w, dz, h)
                if grad_b is not None:
                    grad_b += dz.float().sum(0)
                del z, dz
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        for p in release:
            p.partition()
        return grad_h, grad_w, grad_b, None, None


# ------------------------------------------------------------------------------------------------------- public API
def _validate_linear(hidden, weight, labels, bias, chunk_size, *, ignore_index, temperature):
    hidden = check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, min_ndim=1)
    weight = check_tensor("weight", weight, dtypes=FLOAT_DTYPES)
    labels = check_tensor("labels", labels)
    if bias is not None:
        bias = check_tensor("bias", bias, dtypes=FLOAT_DTYPES)
    check_same_device(hidden=hidden, weight=weight, bias=bias)
    # A ZeRO-3 partition holds an empty local shard; its real shape is ds_shape.
    full_shape = (
        tuple(getattr(weight, "ds_shape", weight.shape)) if _is_zero3_partitioned(weight) else tuple(weight.shape)
    )
    if len(full_shape) != 2:
        raise ValueError(f"weight must have 2 dimensions [V, H], got {describe(weight)}")
    vocab, width = full_shape
    if hidden.shape[-1] != width:
        raise ValueError(
            f"hidden's last dimension must equal weight's second dimension {width} (weight is [V, H]), "
            f"got {describe(hidden)}"
        )
    bias_shape = (
        tuple(getattr(bias, "ds_shape", ())) if _is_zero3_partitioned(bias) else tuple(getattr(bias, "shape", ()))
    )
    if bias is not None and bias_shape != (vocab,):
        raise ValueError(f"bias must have shape ({vocab},) (one entry per vocabulary row), got {describe(bias)}")
    if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise TypeError(f"hidden and weight must share a dtype, got hidden {hidden.dtype} and weight {weight.dtype}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    # Reuse the log-prob checks (labels shape/range, temperature) on a zero-stride stand-in for the logits.
    standin = hidden.new_empty(()).expand(*hidden.shape[:-1], vocab)
    _, labels, temperature = validate_logits_labels(standin, labels, ignore_index=ignore_index, temperature=temperature)
    return hidden, weight, labels, bias, temperature, vocab


def _fused_logprobs(hidden, weight, labels, bias, ignore_index, temperature, chunk_size, vocab):
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    n = h2.shape[0]
    if chunk_size is None:
        chunk_size = auto_chunk_size(n, vocab, h2.shape[1], h2.dtype, h2.device)
    use_triton = select_backend(hidden.device) == "triton"
    opts = _Options(
        ignore_index, temperature, max(1, min(chunk_size, max(n, 1))), use_triton, compute_dtype(h2, weight)
    )
    # Gather ZeRO-3 partitions *before* apply, so autograd records the full parameter shapes.
    with gathered(weight, bias):
        logp = FusedLinearLogprobsFunction.apply(h2, weight, bias, labels.reshape(-1).contiguous(), opts)
    return logp.view(lead), use_triton


def fused_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``token_logprobs(hidden @ weight.T (+ bias), labels)`` without ever holding the full [N, V] logits.

    Args:
        hidden: [..., H] (e.g. [B, T, H] final hidden states; pass ``hidden[:, :-1]`` with ``labels[:, 1:]``).
        weight: [V, H] lm_head weight (ZeRO-3 partitions are gathered for the call).
        labels: [...] ids in [0, V) or ``ignore_index``.
        bias: optional [V].
        chunk_size: rows per chunk (None: chosen from V, H and free memory; see ``auto_chunk_size``).

    Returns:
        fp32 [...] log-probs, differentiable w.r.t. hidden, weight and bias (weight/bias gradients accumulated in fp32).

    Under ``torch.autocast`` the logits are computed in the autocast dtype, as an ``nn.Linear`` lm_head would compute
    them (hidden and weight may then differ in dtype), and recomputed in it in the backward wherever that runs.
    """
    hidden, weight, labels, bias, temperature, vocab = _validate_linear(
        hidden, weight, labels, bias, chunk_size, ignore_index=ignore_index, temperature=temperature
    )
    return _fused_logprobs(hidden, weight, labels, bias, ignore_index, temperature, chunk_size, vocab)[0]


def fused_linear_token_scores(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    beta: float = 0.1,
    mask_fraction: float = 0.0,
    mask_by: str = "highest",
    mask_scope: str = "sequence",
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> TokenScores:
    """The fused-linear twin of ``token_scores``: same options, same ``TokenScores``, from hidden [B, T, H]."""
    hidden, weight, labels, bias, temperature, vocab = _validate_linear(
        hidden, weight, labels, bias, chunk_size, ignore_index=ignore_index, temperature=temperature
    )
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H] (3 dimensions), got {describe(hidden)}")
    ref, w, beta, mask_fraction = validate_score_options(
        labels, ref_logprobs, weights, beta=beta, mask_fraction=mask_fraction, mask_by=mask_by, mask_scope=mask_scope
    )
    logprobs, use_triton = _fused_logprobs(hidden, weight, labels, bias, ignore_index, temperature, chunk_size, vocab)
    return scores_from_logprobs(
        logprobs,
        labels,
        ref,
        w,
        beta=beta,
        mask_fraction=mask_fraction,
        mask_by=mask_by,
        mask_scope=mask_scope,
        ignore_index=ignore_index,
        use_triton=use_triton,
    )
