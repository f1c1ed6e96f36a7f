"""One call from a policy batch to (loss, metrics): the convenience layer for users' own training loops.

A preference batch is laid out as ``[chosen; rejected]``: rows ``0..B-1`` are the chosen responses, rows ``B..2B-1``
the rejected ones (the layout TRL's DPOTrainer uses for its concatenated forward). The policy output is either
logits [2B, T, V] or, with ``lm_head_weight``, final hidden states [2B, T, H] that go through the fused-linear
kernels (the [2B, T, V] logits are never built). Labels are already aligned with the positions (no shifting here:
pass ``logits[:, :-1]`` / ``hidden[:, :-1]`` with ``labels[:, 1:]``).

    loss, metrics = ak.preference_loss(logits, labels, ref_logprobs=ref, beta=0.1,
                                       mask_fraction=0.9, mask_by="highest")   # ALLO improving stage
    loss, metrics = ak.forgetting_loss(logits, labels, ref_logprobs=ref, weights=w)  # ALLO forgetting stage
"""

from __future__ import annotations

import functools

import torch

from . import losses
from ._backend import select_backend
from ._validate import check_choice, check_tensor, describe
from .integrations.gather import ParamGather
from .ops.fused_linear import _fused_logprobs, _Options, _validate_linear, compute_dtype
from .ops.fused_linear_pairs import PairLoss, fused_linear_pair_loss, pair_plan
from .ops.token_logprobs import IGNORE_INDEX, token_logprobs
from .ops.token_scores import TokenScores, scores_from_logprobs, token_scores, validate_score_options

PREFERENCE_LOSS_TYPES = (*losses.DPO_LOSS_TYPES, "simpo")
MASK_SIDES = ("rejected", "chosen", "both", "none")


def _side_options(labels: torch.Tensor, sides, common: dict) -> list[tuple[torch.Tensor, torch.Tensor, float, float]]:
    """The checked (ref, weights, beta, mask_fraction) of the chosen and the rejected half of a [2B, T] batch."""
    half = labels.shape[0] // 2
    return [
        validate_score_options(
            labels[rows],
            side["ref_logprobs"],
            side["weights"],
            beta=common["beta"],
            mask_fraction=side["mask_fraction"],
            mask_by=common["mask_by"],
            mask_scope=common["mask_scope"],
        )
        for rows, side in zip((slice(None, half), slice(half, None)), sides)
    ]


def _pair_scores(logprobs, labels, checked, common: dict, use_triton: bool, pairs: slice | None = None):
    """TokenScores of the chosen and the rejected half of ``logprobs`` [2P, T]: pairs ``pairs`` (default: all) of
    the batch whose labels are ``labels`` [2B, T], chosen rows first."""
    half = labels.shape[0] // 2
    pairs = pairs or slice(0, half)
    n = pairs.stop - pairs.start
    return [
        scores_from_logprobs(
            logprobs[side * n : (side + 1) * n],
            labels[side * half + pairs.start : side * half + pairs.stop],
            ref[pairs],
            w[pairs],
            beta=beta,
            mask_fraction=fraction,
            mask_by=common["mask_by"],
            mask_scope=common["mask_scope"],
            ignore_index=common["ignore_index"],
            use_triton=use_triton,
        )
        for side, (ref, w, beta, fraction) in enumerate(checked)
    ]


def _fused_preference_loss(
    policy, labels, lm_head_weight, lm_head_bias, sides, loss_of, *, chunk_size, retain_logits_bytes, gather, **common
):
    """preference_loss from hidden states: where ``fused_linear_pairs`` applies, its gradients are made in the forward,
    a group of whole pairs at a time (no recompute); otherwise ONE token-op call over all rows of the batch (one chunk
    loop, one retained block, one cast of the lm_head), its log-probs split into the two halves afterwards."""
    hidden, weight, labels, bias, temperature, gather, vocab = _validate_linear(
        policy,
        lm_head_weight,
        labels,
        lm_head_bias,
        chunk_size,
        retain_logits_bytes,
        common["ignore_index"],
        common["temperature"],
        gather,
    )
    checked = _side_options(labels, sides, common)
    use_triton = select_backend(hidden.device) == "triton"
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    dtype = compute_dtype(h2, weight)
    opts = _Options(common["ignore_index"], temperature, chunk_size, use_triton, dtype, 0, gather)
    needs_grad = h2.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    # The batch-wide percentile mask couples every pair; fp16 needs the loss scale in dZ (see fused_linear_pairs).
    coupled = common["mask_scope"] == "batch" and any(fraction > 0 for *_, fraction in checked)
    plan = None
    if torch.is_grad_enabled() and needs_grad and not coupled and opts.compute_dtype != torch.float16:
        plan = pair_plan(labels, opts, vocab, hidden.shape[-1])
    if plan is None:
        logprobs = _fused_logprobs(
            hidden,
            weight,
            labels,
            bias,
            common["ignore_index"],
            temperature,
            chunk_size,
            gather,
            retain_logits_bytes,
        )[0]
        return loss_of(*_pair_scores(logprobs, labels, checked, common, use_triton))

    def group_loss(logprobs: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
        return loss_of(*_pair_scores(logprobs, labels, checked, common, use_triton, slice(b0, b1)))[0]

    def batch_loss(logprobs: torch.Tensor):
        return loss_of(*_pair_scores(logprobs, labels, checked, common, use_triton))

    metrics: dict[str, torch.Tensor] = {}
    pair_loss = PairLoss(plan, group_loss, batch_loss, metrics)
    loss = fused_linear_pair_loss(h2, weight, bias, labels.reshape(-1).contiguous(), opts, pair_loss)
    return loss, metrics


def _pair_loss(
    c: TokenScores, r: TokenScores, *, loss_type: str, beta: float, label_smoothing: float, simpo_gamma: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The preference loss of ``loss_type`` on the chosen and rejected scores of the same pairs."""
    if loss_type == "simpo":
        loss, metrics = losses.simpo_loss(
            c.seq_logprobs,
            r.seq_logprobs,
            chosen_lengths=c.n_tokens,
            rejected_lengths=r.n_tokens,
            beta=beta,
            gamma=simpo_gamma,
            label_smoothing=label_smoothing,
        )
    elif loss_type == "ipo":

        def avg(s: TokenScores, x: torch.Tensor) -> torch.Tensor:
            return x / s.n_tokens.clamp(min=1.0)

        loss, metrics = losses.dpo_loss(
            avg(c, c.seq_logprobs),
            avg(r, r.seq_logprobs),
            avg(c, c.seq_ref_logprobs),
            avg(r, r.seq_ref_logprobs),
            beta=beta,
            loss_type="ipo",
        )
    elif loss_type == "sigmoid":
        loss, metrics = losses.kept_token_dpo_loss(
            c.seq_logprobs,
            r.seq_logprobs,
            c.seq_ref_logprobs,
            r.seq_ref_logprobs,
            beta=beta,
            label_smoothing=label_smoothing,
            chosen_tokens=c.n_tokens,
            rejected_tokens=r.n_tokens,
        )
    else:
        loss, metrics = losses.dpo_loss(
            c.seq_logprobs,
            r.seq_logprobs,
            c.seq_ref_logprobs,
            r.seq_ref_logprobs,
            beta=beta,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
        )
    metrics.setdefault("tokens/chosen", c.n_tokens.mean().detach())
    metrics.setdefault("tokens/rejected", r.n_tokens.mean().detach())
    return loss, metrics


def _halves(name: str, t: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if t is None:
        return None, None
    if t.shape[0] % 2:
        raise ValueError(f"{name} must hold [chosen; rejected] rows (an even first dimension), got {describe(t)}")
    half = t.shape[0] // 2
    return t[:half], t[half:]


def preference_loss(
    policy: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None,
    weights: torch.Tensor | None = None,
    lm_head_weight: torch.Tensor | None = None,
    lm_head_bias: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 1.0,
    mask_fraction: float = 0.0,
    mask_by: str = "highest",
    mask_scope: str = "sequence",
    mask_side: str = "rejected",
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    retain_logits_bytes: int | None = None,
    gather: ParamGather | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO-family loss (optionally ALLO's DPO with tokens dropped) for a ``[chosen; rejected]`` batch.

    Args:
        policy: logits [2B, T, V], or hidden states [2B, T, H] when ``lm_head_weight`` [V, H] is given.
        labels: [2B, T].
        ref_logprobs: [2B, T] per-token reference log-probs (required except for ``loss_type="simpo"``).
        weights: optional [2B, T] per-token weights.
        loss_type: "sigmoid" (DPO), "ipo", "hinge", "robust" or "simpo" (reference-free).
            ipo and simpo use length-averaged log-probs over the kept tokens, as TRL does.
        mask_fraction, mask_by, mask_scope: the token drop of ``token_scores``; ``mask_side`` says which responses
            it applies to ("rejected" is ALLO's improving stage: use ``mask_fraction = 1 - eps``,
            ``mask_by="highest"`` to keep the ``eps`` lowest-reward rejected tokens).
        chunk_size, retain_logits_bytes, gather: with ``lm_head_weight``, the options of
            ``fused_linear_token_logprobs`` (rows per chunk, the budget of logits retained from the forward for the
            backward, the gather context of a partitioned lm_head); unused without it.

    With ``lm_head_weight`` the gradients are made in the forward, a chunk of whole pairs at a time (no logits
    recomputed, nothing retained; ``ops/fused_linear_pairs.py``), so the loss takes one backward (a second one through
    the same graph raises). Where that does not
    apply (a pair with more valid tokens than the chunk rows, ``mask_scope="batch"`` with tokens dropped, fp16, or no
    gradient wanted) the token op's path runs, where ``retain_logits_bytes`` applies. Same loss and metrics either way.

    Returns:
        ``(loss, metrics)`` with TRL's metric names (plus ``tokens/chosen`` and ``tokens/rejected``).
    """
    check_tensor("policy", policy, ndim=3)
    check_tensor("labels", labels, ndim=2)
    check_choice("loss_type", loss_type, PREFERENCE_LOSS_TYPES)
    check_choice("mask_side", mask_side, MASK_SIDES)
    if ref_logprobs is None and loss_type != "simpo":
        raise ValueError(f"ref_logprobs is required for loss_type={loss_type!r} (only 'simpo' is reference-free)")
    policy_c, policy_r = _halves("policy", policy)
    labels_c, labels_r = _halves("labels", labels)
    ref_c, ref_r = _halves("ref_logprobs", ref_logprobs)
    w_c, w_r = _halves("weights", weights)
    common = dict(beta=beta, mask_by=mask_by, mask_scope=mask_scope, ignore_index=ignore_index, temperature=temperature)
    frac_c = mask_fraction if mask_side in ("chosen", "both") else 0.0
    frac_r = mask_fraction if mask_side in ("rejected", "both") else 0.0
    sides = (
        dict(ref_logprobs=ref_c, weights=w_c, mask_fraction=frac_c),
        dict(ref_logprobs=ref_r, weights=w_r, mask_fraction=frac_r),
    )
    loss_of = functools.partial(
        _pair_loss, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma
    )
    if lm_head_weight is not None:
        fused = dict(chunk_size=chunk_size, retain_logits_bytes=retain_logits_bytes, gather=gather)
        return _fused_preference_loss(policy, labels, lm_head_weight, lm_head_bias, sides, loss_of, **fused, **common)
    if lm_head_bias is not None:
        raise ValueError("lm_head_bias was given without lm_head_weight")
    c, r = (
        token_scores(p, lab, **side, **common)
        for p, lab, side in zip((policy_c, policy_r), (labels_c, labels_r), sides)
    )
    return loss_of(c, r)


def forgetting_loss(
    policy: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor,
    weights: torch.Tensor,
    lm_head_weight: torch.Tensor | None = None,
    lm_head_bias: torch.Tensor | None = None,
    beta: float = 0.1,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    retain_logits_bytes: int | None = None,
    gather: ParamGather | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ALLO's forgetting stage on a batch of responses to forget: token-weighted NPO.

    ``loss = sum_bt -w_bt * logsigmoid(-beta * (logp_bt - ref_bt)) / #{w_bt != 0}`` (0 when all weights are 0);
    ignored positions (label == ignore_index) get weight 0 whatever ``weights`` says. ``chunk_size``,
    ``retain_logits_bytes`` and ``gather`` as in :func:`preference_loss`.

    With ``lm_head_weight``, a token of weight 0 is scored as an ignored position: it adds exactly 0 to the loss, its
    gradient and every metric, so its row gets no logits GEMM and no vocabulary pass, in the forward as in the backward
    (ALLO weights only the unaligned tokens: most of a forgetting batch costs nothing).
    """
    if lm_head_weight is None:
        if lm_head_bias is not None:
            raise ValueError("lm_head_bias was given without lm_head_weight")
        logprobs = token_logprobs(policy, labels, ignore_index=ignore_index, temperature=temperature)  # checks labels
        labels = labels.to(torch.int64)  # compared exactly below (a narrow dtype would wrap ignore_index)
    else:
        hidden, weight, labels, bias, temperature, gather, _ = _validate_linear(
            policy,
            lm_head_weight,
            labels,
            lm_head_bias,
            chunk_size,
            retain_logits_bytes,
            ignore_index,
            temperature,
            gather,
        )
    ref, w, beta, _ = validate_score_options(
        labels, ref_logprobs, weights, beta=beta, mask_fraction=0.0, mask_by="highest", mask_scope="sequence"
    )
    if lm_head_weight is not None:
        labels = labels.masked_fill(w == 0, ignore_index)  # checked as given above: a bad label is refused anywhere
        logprobs = _fused_logprobs(
            hidden, weight, labels, bias, ignore_index, temperature, chunk_size, gather, retain_logits_bytes
        )[0]
    kept = labels != ignore_index
    zero = torch.zeros((), dtype=torch.float32, device=labels.device)
    return losses.token_npo_loss(logprobs, torch.where(kept, ref, zero), torch.where(kept, w, zero), beta=beta)
