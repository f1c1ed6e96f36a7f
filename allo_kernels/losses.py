"""Preference, unlearning and SFT losses over per-sequence or per-token log-probabilities (pure torch).

Every function takes tensors positionally and options keyword-only, and returns ``(loss, metrics)``:

* ``loss`` is a 0-d tensor (fp32, or fp64 when an input is fp64; fp16/bf16 inputs are upcast to fp32 first),
  differentiable w.r.t. the policy log-probs (and, where it makes sense, the reference log-probs; token weights and
  masks are constants for autograd, as in the official ALLO code).
* ``metrics`` is a plain ``dict`` of **detached 0-d tensors** on the inputs' device, keyed by TRL's metric names
  (``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``,
  ``logps/rejected``, ...). They stay tensors so that computing them never forces a device->host sync; call
  ``{k: v.item() for k, v in metrics.items()}`` when logging. A mean over zero elements is reported as 0.

Notation: ``pc, pr`` policy log-probs of the chosen / rejected responses, ``rc, rr`` the reference model's,
``b`` = beta, ``e`` = label_smoothing, ``D = (pc - rc) - (pr - rr)``, ``logsig`` = log-sigmoid.

=======================  =============================================================================================
``dpo_loss``             sigmoid: ``-(1-e) logsig(bD) - e logsig(-bD)``; robust:
                         ``(-(1-e) logsig(bD) + e logsig(-bD)) / (1-2e)``; hinge: ``relu(1 - bD)``;
                         ipo: ``(D - 1/(2b))^2``. Mean over the batch.
``kept_token_dpo_loss``  ALLO's improving stage: sigmoid DPO on per-sequence sums over the kept tokens, after
                         ``token_scores`` dropped the others (see its docstring; earlier name ``masked_dpo_loss``).
``npo_loss``             ``-(2/b) logsig(-b (s - s_ref))``, mean over sequences (NPO, Zhang et al. 2024).
``token_npo_loss``       ALLO's forgetting stage: ``sum_bt -w_bt logsig(-b (logp_bt - ref_bt)) / #{w_bt != 0}``.
``simpo_loss``           ``-(1-e) logsig(z) - e logsig(-z)``, ``z = b (avg_c - avg_r) - gamma`` on length-averaged
                         logps.
``orpo_loss``            ``nll - b * mean(logsig(log_odds))``, ``log_odds = log(p_c/(1-p_c)) - log(p_r/(1-p_r))``
                         on length-averaged logps (``p = exp(avg logp)``).
``kto_loss``             ``mean(cat(wd (1 - sig(b (lr_c - z0))), wu (1 - sig(b (z0 - lr_r)))))``,
                         ``z0 = clamp(mean(policy_kl - ref_kl), 0)`` detached.
``sft_loss``             mean negative log-prob over the valid tokens.
=======================  =============================================================================================

Defined edge cases (no NaN anywhere): a sequence or batch with no valid tokens sums to 0; ``token_npo_loss`` with
all weights 0 and ``sft_loss`` with no valid token return exactly 0 with exactly zero gradients; a zero-weight
(or invalid) token contributes nothing even when its policy log-prob is ``-inf``.

Validation: tensors are checked for type, floating dtype, matching shapes and one device (no host sync); reference
log-probs, token weights and lengths are checked for NaN/inf (and weights/lengths for negative values) with one
batched host sync per call. Bad options (unknown ``loss_type``, ``beta <= 0``, ``label_smoothing`` outside
[0, 0.5), ...) raise ``ValueError`` naming the argument.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import (
    FLOAT_DTYPES,
    INT_DTYPES,
    check_choice,
    check_positive,
    check_same_device,
    check_shape,
    check_tensor,
    describe,
)

__all__ = [
    "DPO_LOSS_TYPES",
    "dpo_loss",
    "kept_token_dpo_loss",
    "kto_loss",
    "masked_dpo_loss",
    "npo_loss",
    "orpo_loss",
    "sft_loss",
    "simpo_loss",
    "token_npo_loss",
]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")

# fp64 is accepted so that torch.autograd.gradcheck can run on the losses.
_LOSS_DTYPES = (*FLOAT_DTYPES, torch.float64)


# ----------------------------------------------------------------------------------------------------------- checks
def _check_beta(beta: object) -> float:
    return check_positive("beta", beta)


def _check_label_smoothing(label_smoothing: object) -> float:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a number, got {describe(label_smoothing)}")
    value = float(label_smoothing)
    if not 0.0 <= value < 0.5:  # also rejects NaN
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {value!r}")
    return value


def _check_group(named: dict[str, object], **dims) -> list[torch.Tensor]:
    """Float tensors of one shape on one device (``dims``: ndim=... or min_ndim=... for check_tensor)."""
    items = list(named.items())
    for name, t in items:
        check_tensor(name, t, dtypes=_LOSS_DTYPES, **dims)
    first_name, first = items[0]
    for name, t in items[1:]:
        check_shape(name, t, tuple(first.shape), like=first_name)
    check_same_device(**named)
    return [t for _, t in items]  # type: ignore[misc]


def _check_sequences(**named: object) -> list[torch.Tensor]:
    """1-D float tensors [B] of one shape on one device, B >= 1 (a mean over no pairs is undefined)."""
    tensors = _check_group(named, ndim=1)
    if tensors[0].shape[0] == 0:
        raise ValueError(f"{next(iter(named))} must hold at least one sequence, got {describe(tensors[0])}")
    return tensors


def _check_tokens(**named: object) -> list[torch.Tensor]:
    """Float tensors of one shape (typically [B, T]) on one device."""
    return _check_group(named, min_ndim=1)


def _check_values(finite: dict[str, torch.Tensor], nonnegative: tuple[str, ...] = ()) -> None:
    """NaN/inf (and, for the names in ``nonnegative``, negative values) -> ValueError naming the tensor.

    All conditions are reduced on the device and read back with a single host sync; the slower path that counts
    the offending values only runs when something is wrong.
    """
    if not finite:
        return
    flags = [torch.isfinite(t).all() for t in finite.values()]
    flags += [(finite[name] >= 0).all() for name in nonnegative]
    ok = torch.stack(flags).tolist()
    names = list(finite)
    for name, good in zip(names, ok[: len(names)]):
        if not good:
            t = finite[name]
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{name} must be finite, got {bad} NaN/inf value(s) in {describe(t)}")
    for name, good in zip(nonnegative, ok[len(names) :]):
        if not good:
            t = finite[name]
            bad = int((t < 0).sum())
            raise ValueError(
                f"{name} must be >= 0, got {bad} negative value(s) (min {float(t.min())}) in {describe(t)}"
            )


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32  # fp16/bf16 inputs are upcast: the log-sigmoids and sums run in fp32 at least
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _mean(x: torch.Tensor) -> torch.Tensor:
    """Mean that is 0 (not NaN) over zero elements."""
    return x.mean() if x.numel() > 0 else x.new_zeros(())


def _detached(metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in metrics.items()}


def _preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> dict[str, torch.Tensor]:
    return _detached(
        {
            "rewards/chosen": _mean(chosen_rewards),
            "rewards/rejected": _mean(rejected_rewards),
            "rewards/margins": _mean(chosen_rewards - rejected_rewards),
            "rewards/accuracies": _mean((chosen_rewards > rejected_rewards).to(chosen_rewards.dtype)),
            "logps/chosen": _mean(chosen_logps),
            "logps/rejected": _mean(rejected_logps),
        }
    )


def _smoothed_sigmoid_loss(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    # -(1-e) logsig(z) - e logsig(-z); the e-term is skipped when e == 0 so that z = +inf cannot give 0 * -inf.
    losses = -F.logsigmoid(z)
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-z)
    return losses


# ------------------------------------------------------------------------------------------------------------- DPO
def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO and its pairwise variants on per-sequence log-probs, as in TRL's ``DPOTrainer``.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: [B] per-sequence log-probs (sums over the
            response tokens). For ``loss_type="ipo"`` pass length-*averaged* log-probs instead: TRL's IPO uses
            length-normalised log-probs, and this function takes whatever per-sequence values it is given.
        beta: > 0.
        loss_type: "sigmoid" (DPO; with ``label_smoothing``: conservative DPO), "robust" (rDPO), "hinge" (SLiC),
            "ipo".
        label_smoothing: in [0, 0.5); only "sigmoid" and "robust" use it, any other loss_type requires 0.

    Returns:
        ``(loss, metrics)``: loss = mean over the B pairs; metrics rewards/{chosen,rejected,margins,accuracies}
        (reward = beta * (policy - ref)) and logps/{chosen,rejected} (batch means of the policy inputs).
    """
    check_choice("loss_type", loss_type, DPO_LOSS_TYPES)
    beta = _check_beta(beta)
    e = _check_label_smoothing(label_smoothing)
    if e and loss_type not in ("sigmoid", "robust"):
        raise ValueError(
            f"label_smoothing is only used by loss_type 'sigmoid' and 'robust'; got {e!r} with {loss_type!r}"
        )
    pc, pr, rc, rr = _check_sequences(
        policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected
    )
    _check_values({"ref_chosen": rc, "ref_rejected": rr})
    dtype = _compute_dtype(pc, pr, rc, rr)
    pc, pr, rc, rr = (t.to(dtype) for t in (pc, pr, rc, rr))

    chosen_logratios = pc - rc
    rejected_logratios = pr - rr
    d = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid_loss(beta * d, e)
    elif loss_type == "robust":
        losses = (-(1.0 - e) * F.logsigmoid(beta * d) + e * F.logsigmoid(-beta * d)) / (1.0 - 2.0 * e)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * d)
    else:  # ipo
        losses = (d - 1.0 / (2.0 * beta)) ** 2
    metrics = _preference_metrics(beta * chosen_logratios, beta * rejected_logratios, pc, pr)
    return losses.mean(), metrics


def kept_token_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ALLO's improving stage: sigmoid DPO on per-sequence sums over the *kept* tokens only.

    The official code (RUCAIBox/ALLO ``train_improving.py``) sums the chosen log-ratio ``logp - ref`` over all
    response tokens, and for the rejected response keeps only the ``k = floor(eps * T)`` tokens with the LOWEST
    per-token log-ratio (eps = 0.1; the tokens the policy already disprefers most), then applies sigmoid DPO to
    the sums. This function is that last step: it drops nothing itself; ``allo_kernels.token_scores`` drops the
    tokens upstream and returns the sums over the kept ones directly::

        c = ak.token_scores(chosen_logits, chosen_labels, ref_logprobs=chosen_ref, beta=beta)   # keep all tokens
        r = ak.token_scores(rejected_logits, rejected_labels, ref_logprobs=rejected_ref, beta=beta,
                            mask_fraction=1 - eps, mask_by="highest")                           # keep the lowest
        loss, metrics = ak.losses.kept_token_dpo_loss(
            c.seq_logprobs, r.seq_logprobs, c.seq_ref_logprobs, r.seq_ref_logprobs, beta=beta,
            chosen_tokens=c.n_tokens, rejected_tokens=r.n_tokens)

    (``reward_t = beta * (logp_t - ref_t)`` ranks tokens exactly like the log-ratio.) Differences to the official
    code, all deliberate: token_scores counts the *valid* tokens ``n`` (the official code uses the padded length
    and drops tokens whose log-ratio is exactly 0), masks ``floor((1 - eps) n)`` tokens (so it keeps
    ``ceil(eps n)``) and breaks ties by position (the official threshold may keep extra tied tokens).

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: [B] per-sequence sums over the kept tokens
            (``seq_logprobs`` / ``seq_ref_logprobs`` of the two TokenScores).
        beta: > 0. label_smoothing: in [0, 0.5) (conservative DPO; 0 in ALLO).
        chosen_tokens, rejected_tokens: optional [B] kept-token counts (``n_tokens``), only for the metrics
            ``tokens/chosen`` and ``tokens/rejected`` (batch means).

    Returns:
        ``(loss, metrics)`` exactly as ``dpo_loss(..., loss_type="sigmoid")``, plus the token-count metrics.
    """
    loss, metrics = dpo_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        beta=beta,
        loss_type="sigmoid",
        label_smoothing=label_smoothing,
    )
    for name, counts in (("chosen_tokens", chosen_tokens), ("rejected_tokens", rejected_tokens)):
        if counts is None:
            continue
        check_tensor(name, counts, dtypes=(*_LOSS_DTYPES, *INT_DTYPES), ndim=1)
        check_shape(name, counts, tuple(policy_chosen.shape), like="policy_chosen")
        check_same_device(policy_chosen=policy_chosen, **{name: counts})
        metrics[f"tokens/{name.split('_')[0]}"] = counts.detach().to(loss.dtype).mean()
    return loss, metrics


masked_dpo_loss = kept_token_dpo_loss  # its earlier name (it masks nothing: token_scores drops the tokens upstream)


# ------------------------------------------------------------------------------------------------------------- NPO
def npo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sequence-level NPO on the responses to forget: mean over B of ``-(2/beta) logsig(-beta (s - s_ref))``.

    Args:
        policy_logps, ref_logps: [B] per-sequence log-probs (sums) of the forget responses.
        beta: > 0.

    Returns:
        ``(loss, metrics)``; the forget responses play the "rejected" role: rewards/rejected
        (mean ``beta * (s - s_ref)``) and logps/rejected (mean ``s``).
    """
    beta = _check_beta(beta)
    s, s_ref = _check_sequences(policy_logps=policy_logps, ref_logps=ref_logps)
    _check_values({"ref_logps": s_ref})
    dtype = _compute_dtype(s, s_ref)
    s, s_ref = s.to(dtype), s_ref.to(dtype)
    log_ratio = s - s_ref
    losses = -(2.0 / beta) * F.logsigmoid(-beta * log_ratio)
    metrics = _detached({"rewards/rejected": (beta * log_ratio).mean(), "logps/rejected": s.mean()})
    return losses.mean(), metrics


def token_npo_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    weights: torch.Tensor,
    *,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ALLO's forgetting stage: token-weighted NPO, normalised by the number of non-zero weights.

    ``loss = sum_{b,t} -w_bt * logsig(-beta * (logp_bt - ref_bt)) / #{w_bt != 0}``, exactly the official code
    (RUCAIBox/ALLO ``train_forgetting.py``, which hard-codes beta = 0.1 and takes w = the per-token reward, e.g. the
    RLMEC rewriting model's copy probability), summed and counted over the whole batch (not per sequence). Note the
    absence of NPO's ``2/beta`` factor, as in the official code.

    Args:
        logprobs: [B, T] (any shape) per-token policy log-probs, e.g. ``ak.token_logprobs`` (0 at ignored labels).
        ref_logprobs: same shape, reference per-token log-probs; must be finite everywhere.
        weights: same shape, per-token weights >= 0 and finite; 0 marks tokens that do not take part (padding,
            prompt, tokens without a reward). A constant for autograd (detached).
        beta: > 0.

    Returns:
        ``(loss, metrics)``. With all weights 0 the loss is exactly 0 and every gradient exactly 0 (not NaN).
        Metrics, over the tokens with a non-zero weight (0 when there are none): rewards/rejected (mean
        ``beta * (logp - ref)``), logps/rejected (mean ``logp``), weights/mean, num_tokens (their count).
    """
    beta = _check_beta(beta)
    lp, ref, w = _check_tokens(logprobs=logprobs, ref_logprobs=ref_logprobs, weights=weights)
    _check_values({"ref_logprobs": ref, "weights": w}, nonnegative=("weights",))
    dtype = _compute_dtype(lp, ref, w)
    lp, ref, w = lp.to(dtype), ref.to(dtype), w.detach().to(dtype)

    active = w != 0
    log_ratio = lp - ref
    # torch.where (not a multiply by w) so that a zero-weight token contributes exactly 0 to the value and the
    # gradient even where its log-prob is -inf.
    per_token = torch.where(
        active, -w * F.logsigmoid(-beta * log_ratio), torch.zeros((), dtype=dtype, device=lp.device)
    )
    count = active.sum().to(dtype)
    denom = count.clamp(min=1.0)
    loss = per_token.sum() / denom

    with torch.no_grad():
        zero = torch.zeros((), dtype=dtype, device=lp.device)
        metrics = {
            "rewards/rejected": torch.where(active, beta * log_ratio, zero).sum() / denom,
            "logps/rejected": torch.where(active, lp, zero).sum() / denom,
            "weights/mean": w.sum() / denom,
            "num_tokens": count,
        }
    return loss, _detached(metrics)


# ----------------------------------------------------------------------------------------------------------- SimPO
def _length_average(sums: torch.Tensor, lengths: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    lengths = lengths.to(dtype)
    positive = lengths > 0
    safe = torch.where(positive, lengths, torch.ones_like(lengths))  # no 0/0 even in the unselected branch
    return torch.where(positive, sums / safe, torch.zeros_like(sums))


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO (reference-free, length-normalised, with a target margin), as TRL's ``CPOTrainer(loss_type="simpo")``.

    ``z = beta * (avg_c - avg_r) - gamma``; ``loss = mean(-(1-e) logsig(z) - e logsig(-z))``.

    Args:
        chosen_logps, rejected_logps: [B]. Without lengths: length-*averaged* per-sequence log-probs. With
            ``chosen_lengths``/``rejected_lengths`` (both or neither): per-sequence *sums*, divided here by the
            lengths (a sequence of length 0 averages to 0).
        chosen_lengths, rejected_lengths: [B] token counts (int or float, >= 0).
        beta: > 0 (SimPO paper default 2.0). gamma: target reward margin >= 0 (TRL's ``simpo_gamma``; the paper's
            gamma/beta ratio 0.5 gives the default 1.0). label_smoothing: in [0, 0.5).

    Returns:
        ``(loss, metrics)``: rewards/* with reward = beta * avg logp, logps/{chosen,rejected} = mean avg logp.
    """
    beta = _check_beta(beta)
    gamma = check_positive("gamma", gamma, allow_zero=True)
    e = _check_label_smoothing(label_smoothing)
    c, r = _check_sequences(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError(
            "chosen_lengths and rejected_lengths must be given together (logps are sums) or both omitted "
            f"(logps are averages); got chosen_lengths={describe(chosen_lengths)}, "
            f"rejected_lengths={describe(rejected_lengths)}"
        )
    dtype = _compute_dtype(c, r)
    c, r = c.to(dtype), r.to(dtype)
    if chosen_lengths is not None:
        lengths = {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
        for name, t in lengths.items():
            check_tensor(name, t, dtypes=(*_LOSS_DTYPES, *INT_DTYPES), ndim=1)
            check_shape(name, t, tuple(c.shape), like="chosen_logps")
        check_same_device(chosen_logps=c, **lengths)
        _check_values(lengths, nonnegative=tuple(lengths))  # type: ignore[arg-type]
        c = _length_average(c, chosen_lengths, dtype)  # type: ignore[arg-type]
        r = _length_average(r, rejected_lengths, dtype)  # type: ignore[arg-type]

    losses = _smoothed_sigmoid_loss(beta * (c - r) - gamma, e)
    metrics = _preference_metrics(beta * c, beta * r, c, r)
    return losses.mean(), metrics


# ------------------------------------------------------------------------------------------------------------ ORPO
def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0 without cancellation (Maechler 2012); both branches are finite for x < 0."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    nll_loss: torch.Tensor,
    *,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO (odds-ratio preference optimisation), as TRL's ``ORPOTrainer``: ``nll_loss - beta * mean(logsig(lo))``.

    ``lo = (avg_c - avg_r) - (log(1 - exp(avg_c)) - log(1 - exp(avg_r)))`` is the log odds ratio of the
    length-averaged log-probs.

    Args:
        chosen_logps, rejected_logps: [B] length-*averaged* per-sequence log-probs (<= 0). Values are clamped to
            ``-tiny`` below 0 so that an all-masked sequence (average 0) gives a large finite log-odds, not inf/NaN.
        nll_loss: 0-d tensor, the SFT term on the chosen responses (TRL: cross-entropy averaged over all chosen
            tokens of the batch), e.g. ``sft_loss(chosen_token_logprobs, chosen_valid_mask)[0]``.
        beta: > 0 (TRL's ORPO lambda).

    Returns:
        ``(loss, metrics)``: rewards/* with reward = beta * avg logp, logps/{chosen,rejected}, nll_loss,
        log_odds_ratio (mean ``logsig(lo)``), log_odds_chosen (mean ``lo``).
    """
    beta = _check_beta(beta)
    c, r = _check_sequences(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    check_tensor("nll_loss", nll_loss, dtypes=_LOSS_DTYPES, ndim=0)
    check_same_device(chosen_logps=c, nll_loss=nll_loss)
    dtype = _compute_dtype(c, r, nll_loss)
    c, r, nll = c.to(dtype), r.to(dtype), nll_loss.to(dtype)
    below_zero = -torch.finfo(dtype).tiny
    c_safe, r_safe = c.clamp(max=below_zero), r.clamp(max=below_zero)
    log_odds = (c_safe - r_safe) - (_log1mexp(c_safe) - _log1mexp(r_safe))
    ratio = F.logsigmoid(log_odds)
    loss = nll - beta * ratio.mean()
    metrics = _preference_metrics(beta * c, beta * r, c, r)
    metrics.update(_detached({"nll_loss": nll, "log_odds_ratio": ratio.mean(), "log_odds_chosen": log_odds.mean()}))
    return loss, metrics


# ------------------------------------------------------------------------------------------------------------- KTO
def kto_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    policy_kl: torch.Tensor | None = None,
    ref_kl: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO on unpaired examples, as TRL's ``KTOTrainer(loss_type="kto")``.

    ``z0 = clamp(mean(policy_kl - ref_kl), min=0)`` (detached; 0 when no KL tensors are given), then
    chosen: ``1 - sigmoid(beta (lr - z0))``, rejected: ``1 - sigmoid(beta (z0 - lr))`` with ``lr = policy - ref``,
    weighted by desirable_weight / undesirable_weight and averaged over all Bc + Br examples together.

    Args:
        policy_chosen, ref_chosen: [Bc] per-sequence log-probs (sums) of the desirable examples (Bc may be 0).
        policy_rejected, ref_rejected: [Br] the same for the undesirable examples (Br may be 0; Bc + Br >= 1).
        policy_kl, ref_kl: optional [Bk] log-probs of *mismatched* (prompt, completion) pairs, both or neither.
            The KL estimate is local to this call: under data parallelism, average it across ranks upstream.
        beta, desirable_weight, undesirable_weight: > 0.

    Returns:
        ``(loss, metrics)``: kl (z0), rewards/{chosen,rejected,margins} (reward = beta * lr; a side with no
        examples reports 0), logps/{chosen,rejected}, count/{chosen,rejected}.
    """
    beta = _check_beta(beta)
    wd = check_positive("desirable_weight", desirable_weight)
    wu = check_positive("undesirable_weight", undesirable_weight)
    pc, rc = _check_ragged(policy_chosen=policy_chosen, ref_chosen=ref_chosen)
    pr, rr = _check_ragged(policy_rejected=policy_rejected, ref_rejected=ref_rejected)
    check_same_device(policy_chosen=pc, policy_rejected=pr)
    if pc.numel() + pr.numel() == 0:
        raise ValueError("policy_chosen and policy_rejected are both empty; KTO needs at least one example")
    if (policy_kl is None) != (ref_kl is None):
        raise ValueError(
            f"policy_kl and ref_kl must be given together or both omitted; got policy_kl={describe(policy_kl)}, "
            f"ref_kl={describe(ref_kl)}"
        )
    constants = {"ref_chosen": rc, "ref_rejected": rr}
    kl_pair: list[torch.Tensor] = []
    if policy_kl is not None:
        kl_pair = _check_sequences(policy_kl=policy_kl, ref_kl=ref_kl)
        check_same_device(policy_chosen=pc, policy_kl=kl_pair[0])
        constants["ref_kl"] = kl_pair[1]
    _check_values(constants)
    dtype = _compute_dtype(pc, rc, pr, rr, *kl_pair)
    pc, rc, pr, rr = (t.to(dtype) for t in (pc, rc, pr, rr))
    if kl_pair:
        kl = (kl_pair[0].to(dtype) - kl_pair[1].to(dtype)).mean().detach().clamp(min=0)
    else:
        kl = torch.zeros((), dtype=dtype, device=pc.device)

    chosen_logratios = pc - rc
    rejected_logratios = pr - rr
    chosen_losses = 1.0 - torch.sigmoid(beta * (chosen_logratios - kl))
    rejected_losses = 1.0 - torch.sigmoid(beta * (kl - rejected_logratios))
    loss = torch.cat((wd * chosen_losses, wu * rejected_losses)).mean()

    chosen_rewards = _mean(beta * chosen_logratios)
    rejected_rewards = _mean(beta * rejected_logratios)
    metrics = _detached(
        {
            "kl": kl,
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": _mean(pc),
            "logps/rejected": _mean(pr),
            "count/chosen": torch.tensor(float(pc.numel()), dtype=dtype, device=pc.device),
            "count/rejected": torch.tensor(float(pr.numel()), dtype=dtype, device=pc.device),
        }
    )
    return loss, metrics


def _check_ragged(**named: object) -> list[torch.Tensor]:
    """Like _check_sequences but the batch may be empty (one side of an unpaired KTO batch)."""
    return _check_group(named, ndim=1)


# ------------------------------------------------------------------------------------------------------------- SFT
def sft_loss(
    logprobs: torch.Tensor,
    valid_mask: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy: mean of ``-logp`` over the valid tokens of the whole batch (TRL/HF token-level mean).

    Args:
        logprobs: [B, T] (any shape) per-token log-probs of the target tokens, e.g. ``ak.token_logprobs``.
        valid_mask: bool, same shape; True for tokens that count (labels != ignore_index).

    Returns:
        ``(loss, metrics)``; with no valid token the loss is exactly 0 with zero gradient. Invalid positions never
        contribute, even when they hold -inf/NaN. metrics: num_tokens (the count of valid tokens).
    """
    (lp,) = _check_tokens(logprobs=logprobs)
    check_tensor("valid_mask", valid_mask, dtypes=(torch.bool,))
    check_shape("valid_mask", valid_mask, tuple(lp.shape), like="logprobs")
    check_same_device(logprobs=lp, valid_mask=valid_mask)
    dtype = _compute_dtype(lp)
    lp = lp.to(dtype)
    nll = torch.where(valid_mask, -lp, torch.zeros((), dtype=dtype, device=lp.device))
    count = valid_mask.sum().to(dtype)
    loss = nll.sum() / count.clamp(min=1.0)
    return loss, _detached({"num_tokens": count})
