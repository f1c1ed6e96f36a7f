"""token_scores: per-token log-probs, rewards, weights and a top-percentile token mask, with per-sequence sums.

This is what ALLO's two training stages consume. Words: the tokens the percentile rule removes from the sums are
*dropped* (``TokenScores.dropped``); the options keep their published names (``mask_fraction`` = the fraction dropped,
``mask_by``, ``mask_scope``). *Select* and *masks* mean neurons elsewhere (locate, SparseAdamW), never tokens.

    logp_t   = log_softmax(logits_t / T)[label_t]                   (the token_logprobs kernel: one read of [B,T,V])
    reward_t = beta * (logp_t - ref_t)                               (detached)
    dropped_t = t is among the floor(f * n) valid tokens of its scope with the highest (or lowest) reward,
                ties going to the earlier position; n = #valid tokens in the scope (a sequence, or the whole batch)
    keep_t   = valid_t and not dropped_t
    seq_logprobs_b     = sum_t keep_t * w_t * logp_t                 (differentiable)
    seq_ref_logprobs_b = sum_t keep_t * w_t * ref_t
    n_tokens_b         = sum_t keep_t

Selection and weights are constants for autograd (as in the official ALLO code), so the gradient reaching the
log-prob kernel is simply dL/dlogp_t = g_b * keep_t * w_t (+ any direct use of ``logprobs``): one backward read of
the logits, and dropped tokens (zero gradient) do not even read their row.

The selection needs no host sync and no Python loop: one stable sort per scope orders the valid tokens by

    sort key = (class, key, position),   key = +reward ("highest") or -reward ("lowest"), descending
    class    = 0 for a valid token with a number as reward (+-inf included), 1 for a valid NaN reward, 2 for ignored
    dropped_i = rank_i < k_scope         (k <= n, so only valid tokens are ever dropped)

so exactly k = floor(f * n) tokens are dropped, ties go to the earlier position, and a NaN reward ranks after every
number whichever ``mask_by``: it is dropped only when k exceeds the number of valid non-NaN tokens of its scope (and
stays in the loss, where the NaN shows, rather than being hidden by the drop). -0.0 and +0.0 tie.
On the Triton path one elementwise kernel computes the rewards and packs the sort key into an int64
(``class << 32 | order-preserving bits of the fp32 key``); ``torch.sort(stable=True)`` (a segmented radix sort on the
GPU) and one scatter give the mask: O(L log L) per scope of length L, where counting ranks pairwise costs O(L^2)
(~1e9 comparisons for a 32k-token batch scope). The torch reference implements the same order with two stable float
sorts. k = floor(f * n) is computed in float64 by torch on the device, identically for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._backend import select_backend, triton_available
from .._validate import (
    FLOAT_DTYPES,
    check_choice,
    check_inplace_backward,
    check_positive,
    check_shape,
    check_tensor,
    describe,
)
from .token_logprobs import (
    IGNORE_INDEX,
    TokenLogprobsFunction,
    _Options,
    as_row_addressable,
    token_logprobs_reference,
    validate_logits_labels,
)

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover
    triton = None
    tl = None

MASK_BY = ("highest", "lowest")
MASK_SCOPES = ("sequence", "batch")


@dataclass
class TokenScores:
    """Per-token and per-sequence quantities for token-weighted / token-masked alignment losses.

    Attributes:
        logprobs: [B, T] fp32 per-token log-probs (differentiable); 0 at ignored positions.
        rewards: [B, T] fp32 ``beta * (logprobs - ref_logprobs)`` (detached); 0 at ignored positions.
        keep: [B, T] bool: valid (label != ignore_index) and not dropped.
        dropped: [B, T] bool: valid tokens dropped by the top-percentile rule (``mask_fraction``, ``mask_by``,
            ``mask_scope``). Also readable as ``masked``, its earlier name.
        seq_logprobs: [B] ``sum_t keep * w * logp`` (differentiable).
        seq_ref_logprobs: [B] ``sum_t keep * w * ref``.
        n_tokens: [B] float ``sum_t keep``.
        weights: [B, T] fp32 ``keep * w``: the per-token coefficients the sums use.
    """

    logprobs: torch.Tensor
    rewards: torch.Tensor
    keep: torch.Tensor
    dropped: torch.Tensor
    seq_logprobs: torch.Tensor
    seq_ref_logprobs: torch.Tensor
    n_tokens: torch.Tensor
    weights: torch.Tensor

    @property
    def masked(self) -> torch.Tensor:
        """``dropped`` under its earlier name (kept for existing code; "mask" now means selected neurons only)."""
        return self.dropped


# ----------------------------------------------------------------------------------------------------------- kernels
# Elements per program of the reward / sort-key kernel.
SELECT_BLOCK = 1024

if triton is not None:

    @triton.jit
    def _select_key_kernel(
        logp_ptr,
        ref_ptr,
        labels_ptr,
        rewards_ptr,
        sort_key_ptr,
        n,
        beta,
        ignore_index,
        HIGHEST: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Rewards and the int64 sort key (ascending = dropping order) of n tokens (flat, contiguous)."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_n = i < n
        valid = tl.load(labels_ptr + i, mask=in_n, other=ignore_index) != ignore_index
        logp = tl.load(logp_ptr + i, mask=in_n, other=0.0)
        ref = tl.load(ref_ptr + i, mask=in_n, other=0.0)
        reward = tl.where(valid, beta * (logp - ref), 0.0)
        tl.store(rewards_ptr + i, reward, mask=in_n)
        if HIGHEST:
            key = reward + 0.0  # + 0.0 turns -0.0 into +0.0: zeros of either sign tie
        else:
            key = 0.0 - reward
        # fp32 bits -> an unsigned integer of the same order (negative: flip all bits; positive: flip the sign bit),
        # inverted so that ascending integers are descending keys.
        bits = key.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) | -2147483648)
        descending = (~ordered).to(tl.uint32, bitcast=True).to(tl.int64)
        is_nan = key != key
        cls = tl.where(valid, tl.where(is_nan, 1, 0), 2).to(tl.int64)
        sort_key = (cls << 32) | tl.where(valid & ~is_nan, descending, 0)
        tl.store(sort_key_ptr + i, sort_key, mask=in_n)


def _select_triton(
    logp: torch.Tensor,
    ref: torch.Tensor,
    labels: torch.Tensor,
    k: torch.Tensor,
    *,
    beta: float,
    ignore_index: int,
    highest: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logp/ref/labels contiguous [S, L], k [S] int64. Returns (rewards fp32 [S, L], dropped bool [S, L])."""
    S, L = logp.shape
    rewards = torch.empty_like(logp)
    masked = torch.zeros((S, L), dtype=torch.bool, device=logp.device)
    if S * L == 0:
        return rewards, masked
    sort_key = torch.empty((S, L), dtype=torch.int64, device=logp.device)
    _select_key_kernel[(triton.cdiv(S * L, SELECT_BLOCK),)](
        logp,
        ref,
        labels,
        rewards,
        sort_key,
        S * L,
        beta,
        ignore_index,
        HIGHEST=highest,
        BLOCK=SELECT_BLOCK,
        num_warps=4,
    )
    order = torch.sort(sort_key, dim=-1, stable=True).indices
    position = torch.arange(L, device=logp.device)
    masked.scatter_(-1, order, position < k[:, None])
    return rewards, masked


def _select_reference(
    logp: torch.Tensor,
    ref: torch.Tensor,
    labels: torch.Tensor,
    k: torch.Tensor,
    *,
    beta: float,
    ignore_index: int,
    highest: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as _select_triton, written with float keys and two stable sorts (equal keys keep their order)."""
    valid = labels != ignore_index
    rewards = torch.where(valid, beta * (logp - ref), torch.zeros_like(logp))
    key = rewards if highest else -rewards
    number = valid & ~torch.isnan(key)
    key = torch.where(number, key + 0.0, torch.zeros_like(key))  # + 0.0: -0.0 becomes +0.0, so zeros tie
    by_key = torch.sort(key, dim=-1, descending=True, stable=True).indices
    cls = torch.where(valid, torch.where(number, 0, 1), 2)  # numbers, then NaN rewards, then ignored tokens
    order = by_key.gather(-1, torch.sort(cls.gather(-1, by_key), dim=-1, stable=True).indices)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(key.shape[-1], device=key.device).expand_as(order).contiguous())
    masked = valid & (rank < k[:, None])
    return rewards, masked


# ------------------------------------------------------------------------------------------------------- the epilogue
def validate_score_options(
    labels: torch.Tensor,
    ref_logprobs: object,
    weights: object,
    *,
    beta: object,
    mask_fraction: object,
    mask_by: object,
    mask_scope: object,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Check the token_scores options; return fp32 (ref, weights) tensors (zeros / ones when None)."""
    beta = check_positive("beta", beta)
    if isinstance(mask_fraction, bool) or not isinstance(mask_fraction, (int, float)):
        raise TypeError(f"mask_fraction must be a float in [0, 1), got {describe(mask_fraction)}")
    mask_fraction = float(mask_fraction)
    if not 0.0 <= mask_fraction < 1.0:
        raise ValueError(f"mask_fraction must be in [0, 1), got {mask_fraction!r}")
    check_choice("mask_by", mask_by, MASK_BY)
    check_choice("mask_scope", mask_scope, MASK_SCOPES)
    tensors = {}
    for name, value, default in (("ref_logprobs", ref_logprobs, 0.0), ("weights", weights, 1.0)):
        if value is None:
            tensors[name] = torch.full(labels.shape, default, dtype=torch.float32, device=labels.device)
            continue
        value = check_tensor(name, value, dtypes=FLOAT_DTYPES + (torch.float64,))
        check_shape(name, value, tuple(labels.shape), like="labels")
        if value.device != labels.device:
            raise ValueError(f"{name} is on {value.device} but labels is on {labels.device}; put them on one device")
        tensors[name] = value.to(torch.float32)
    ref, w = tensors["ref_logprobs"], tensors["weights"]
    finite = torch.stack([torch.isfinite(ref).all(), torch.isfinite(w).all()]).tolist()  # one host sync
    for name, ok in zip(("ref_logprobs", "weights"), finite):
        if not ok:
            bad = int((~torch.isfinite(tensors[name])).sum())
            raise ValueError(f"{name} must be finite, got {bad} NaN/inf value(s) in {describe(tensors[name])}")
    return ref, w, beta, mask_fraction


def scores_from_logprobs(
    logprobs: torch.Tensor,
    labels: torch.Tensor,
    ref: torch.Tensor,
    weights: torch.Tensor,
    *,
    beta: float,
    mask_fraction: float,
    mask_by: str,
    mask_scope: str,
    ignore_index: int,
    use_triton: bool,
) -> TokenScores:
    """Light epilogue on [B, T] tensors shared by token_scores and its fused-linear twin (inputs already checked)."""
    B, T = labels.shape
    valid = labels != ignore_index
    logp_const = logprobs.detach()
    if mask_scope == "sequence":
        shape = (B, T)
    else:
        shape = (1, B * T)
    n_valid = valid.reshape(shape).sum(-1)
    k = torch.floor(mask_fraction * n_valid.to(torch.float64)).to(torch.int64)  # on device, no sync
    select = _select_triton if use_triton else _select_reference
    rewards, masked = select(
        logp_const.reshape(shape).contiguous(),
        ref.reshape(shape).contiguous(),
        labels.reshape(shape).contiguous(),
        k,
        beta=beta,
        ignore_index=ignore_index,
        highest=(mask_by == "highest"),
    )
    rewards, masked = rewards.view(B, T), masked.view(B, T)
    keep = valid & ~masked
    coef = torch.where(keep, weights, torch.zeros_like(weights))
    return TokenScores(
        logprobs=logprobs,
        rewards=rewards,
        keep=keep,
        dropped=masked,
        seq_logprobs=(logprobs * coef).sum(-1),
        seq_ref_logprobs=(ref * coef).sum(-1),
        n_tokens=keep.sum(-1).to(torch.float32),
        weights=coef,
    )


# ------------------------------------------------------------------------------------------------------- public API
def token_scores(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    beta: float = 0.1,
    mask_fraction: float = 0.0,
    mask_by: str = "highest",
    mask_scope: str = "sequence",
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    inplace_backward: bool = False,
) -> TokenScores:
    """Per-token log-probs, rewards and a top-percentile token mask with per-sequence sums, in one pass over logits.

    Args:
        logits: [B, T, V] fp16/bf16/fp32 (rows may be strided, e.g. ``logits[:, :-1]``).
        labels: [B, T] integer ids, ``ignore_index`` where no loss applies.
        ref_logprobs: [B, T] per-token reference log-probs (None: 0).
        weights: [B, T] per-token weights (None: 1). Constants for autograd.
        beta: reward scale, ``reward = beta * (logp - ref)``.
        mask_fraction: f in [0, 1): exactly ``floor(f * n)`` of the n valid tokens of each scope are dropped.
        mask_by: the tokens with the "highest" or "lowest" reward are dropped; ties go to the earlier position.
        mask_scope: "sequence" (per row) or "batch" (all rows together).
        inplace_backward: write the logits gradient into the logits buffer (see ``token_logprobs``).

    Returns:
        TokenScores (see its docstring).
    """
    logits, labels, temperature = validate_logits_labels(
        logits, labels, ignore_index=ignore_index, temperature=temperature
    )
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V] (3 dimensions), got {describe(logits)}")
    inplace_backward = check_inplace_backward(inplace_backward, logits)
    ref, w, beta, mask_fraction = validate_score_options(
        labels, ref_logprobs, weights, beta=beta, mask_fraction=mask_fraction, mask_by=mask_by, mask_scope=mask_scope
    )
    use_triton = select_backend(logits.device) == "triton"
    if use_triton:
        rows, layout = as_row_addressable(logits)
        opts = _Options(layout, ignore_index, temperature, bool(inplace_backward) and rows is logits)
        logprobs = TokenLogprobsFunction.apply(rows, labels.reshape(-1).contiguous(), opts).view(labels.shape)
    else:
        logprobs = token_logprobs_reference(logits, labels, ignore_index=ignore_index, temperature=temperature)
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
