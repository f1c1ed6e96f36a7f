"""Fused-linear preference losses with their gradients made in the forward, a group of whole pairs at a time.

Every preference loss of ``objectives.preference_loss`` (DPO and its variants, SimPO, ALLO's token-dropped DPO) is a
mean over the B pairs of a ``[chosen; rejected]`` batch of a term that depends only on that pair's own per-token
log-probs (its kept-token sums; the percentile mask of ``mask_scope="sequence"`` ranks inside one sequence):

    L = (1 / B) sum_b l_b(logp[b], logp[B + b])

So the gradient of a pair's tokens is known as soon as that pair is scored. Here each chunk holds whole pairs (as
many as fit the chunk budget), and its logits become dZ right after its log-probs, as in ``fused_linear_ce``:

    forward:   group g = pairs b0..b1-1, rows R_g = the valid rows of their chosen and rejected sequences
               Z_g = H_g W^T + b                        [|R_g|, V] in the chunk buffer
               logp_g, lse_g from Z_g
               G_g = d [(P / B) * loss(pairs b0..b1-1)] / d logp     autograd on the group's [2P, T] log-probs
               the rows with G != 0 (an ALLO mask drops the others; one host sync per group):
                   dZ = G / T * (onehot - softmax(Z / T)) in place, dH, dW += dZ^T H, db
               loss and metrics: the unchanged batch path on all log-probs
    backward:  dH, dW, db times the upstream gradient (a scalar; no multiply when it is 1)

Three GEMMs per kept row, one for a dropped one; no recompute and nothing retained (the token op recomputes every row
it did not retain). The loss value and the metrics are exactly those of the token op's path (the same functions on
the same log-probs); the gradient is the sum of the groups' gradients, equal to it up to fp32 rounding.

``pair_plan`` says when this path applies; ``preference_loss`` takes the token op's otherwise: a pair whose valid rows
exceed the chunk rows (a smaller ``chunk_size``, or long sequences with a large vocabulary), ``mask_scope="batch"``
with tokens dropped (the mask couples every pair), fp16 (the loss scale must reach dZ, as in ``fused_linear_ce``), or
no gradient to make (``torch.no_grad()``, nothing requiring grad).

Memory: the chunk buffer (at most the chunk budget, sized to the largest group) + the gradients, which live from the
forward to the backward ([N, H] for hidden, fp32 [V, H] for a trained weight, fp32 [V] for a trained bias).
Partitioned weights (ZeRO-3): as ``fused_linear_ce``. One backward per call (a second one raises).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .fused_linear import (
    _chunk_gradients,
    _Chunks,
    _compact_rows,
    _gradient_buffers,
    _Options,
    _scatter_rows,
    _score_chunk,
    auto_chunk_size,
)
from .fused_linear_ce import hand_over_gradients, keep_for_backward


@dataclass(frozen=True)
class PairPlan:
    """The groups of whole pairs, each at most ``chunk_rows`` valid rows, over a flattened [2B, T] batch."""

    n_pairs: int
    seq_len: int
    rows: torch.Tensor  # flat indices of the valid rows, in sequence order
    row_offsets: list[int]  # rows[row_offsets[s]:row_offsets[s + 1]] are sequence s's valid rows
    groups: list[tuple[int, int]]  # pairs b0..b1-1
    max_rows: int  # valid rows of the largest group

    def group_rows(self, b0: int, b1: int) -> torch.Tensor:
        """The flat indices of group b0..b1-1's valid rows: its chosen sequences', then its rejected sequences'."""
        off, B = self.row_offsets, self.n_pairs
        return torch.cat((self.rows[off[b0] : off[b1]], self.rows[off[B + b0] : off[B + b1]]))

    def group_positions(self, b0: int, b1: int, index: torch.Tensor) -> torch.Tensor:
        """Where the flat rows ``index`` of group b0..b1-1 sit in its [2P, T] log-probs (chosen P rows, rejected P)."""
        B, T, P = self.n_pairs, self.seq_len, b1 - b0
        chosen = self.row_offsets[b1] - self.row_offsets[b0]
        shift = torch.full_like(index, -b0 * T)
        shift[chosen:] = (P - B - b0) * T
        return index + shift


def pair_plan(labels: torch.Tensor, opts: _Options, vocab: int, hidden_size: int) -> PairPlan | None:
    """Group the pairs of ``labels`` [2B, T] (``[chosen; rejected]``) into chunks of whole pairs; None when a pair's
    valid rows exceed the chunk rows (``opts.chunk_size``, else ``auto_chunk_size``). Two host syncs."""
    n_seq, T = labels.shape
    B = n_seq // 2
    valid = labels != opts.ignore_index
    counts = valid.sum(1).tolist()
    n_valid = sum(counts)
    if opts.chunk_size is not None:
        chunk_rows = opts.chunk_size
    else:
        torch_path = not opts.use_triton
        chunk_rows = auto_chunk_size(
            max(n_valid, 1), vocab, hidden_size, opts.compute_dtype, labels.device, torch_path=torch_path
        )
    pair_rows = [counts[b] + counts[B + b] for b in range(B)]
    if B == 0 or max(pair_rows) > chunk_rows:
        return None
    groups, start, rows = [], 0, 0
    for b, r in enumerate(pair_rows):
        if rows + r > chunk_rows:
            groups.append((start, b))
            start, rows = b, 0
        rows += r
    groups.append((start, B))
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    max_rows = max(sum(pair_rows[b0:b1]) for b0, b1 in groups)
    return PairPlan(B, T, valid.reshape(-1).nonzero()[:, 0], offsets, groups, max_rows)


@dataclass(frozen=True)
class PairLoss:
    """What the Function needs of the loss on top: ``group`` (log-probs [2P, T] of pairs b0..b1-1, chosen rows first;
    b0; b1) -> that group's mean loss, differentiable; ``batch`` (log-probs [2B, T]) -> (loss, metrics) of the whole
    batch; ``metrics`` receives the batch's metrics."""

    plan: PairPlan
    group: Callable[[torch.Tensor, int, int], torch.Tensor]
    batch: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    metrics: dict[str, torch.Tensor]


class FusedLinearPairLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts: _Options, loss: PairLoss, grad_mode: bool):  # type: ignore[override]
        # grad_mode: whether grad mode was on at the call (inside forward it is always off)
        need_h, need_w, need_b = (grad_mode and need for need in ctx.needs_input_grad[:3])
        grads = _gradient_buffers(hidden, weight, bias, need_h, need_w, need_b)
        plan = loss.plan
        logp = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        B, T = plan.n_pairs, plan.seq_len
        if plan.max_rows:
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                # The buffer holds the largest group: its size is the plan's, not the free memory's now (on CUDA
                # the gradient buffers above have taken some since the plan was made).
                sized = dataclasses.replace(opts, chunk_size=plan.max_rows)
                chunks = _Chunks(sized, weight.shape[0], hidden.shape[1], plan.max_rows, hidden.device)
                chunks.bind(weight, bias)
                for b0, b1 in plan.groups:
                    index = plan.group_rows(b0, b1)
                    if index.numel() == 0:
                        continue
                    h, lab = hidden.index_select(0, index), labels[index]
                    z = chunks.logits(h)
                    logp_c, lse_c, row_sum = _score_chunk(opts, z, lab)
                    _scatter_rows(logp, index, logp_c)
                    # d L / d logp of the group's tokens: the group's mean loss weighted by its share of the pairs.
                    seqs = torch.arange(b0, B + b1, device=hidden.device)
                    seqs = torch.cat((seqs[: b1 - b0], seqs[B:]))  # chosen b0..b1-1, rejected B+b0..B+b1-1
                    with torch.enable_grad():
                        group_logp = logp.view(-1, T).index_select(0, seqs).requires_grad_()
                        group_loss = loss.group(group_logp, b0, b1) * ((b1 - b0) / B)
                        (g_group,) = torch.autograd.grad(group_loss, group_logp, allow_unused=True)
                    if g_group is None:  # a loss that does not read these log-probs
                        g_group = torch.zeros_like(group_logp)
                    g = g_group.reshape(-1)[plan.group_positions(b0, b1, index)]
                    # Only rows with a gradient enter the GEMMs (a host sync): ALLO's masks drop most rejected tokens.
                    keep = (g != 0).nonzero()[:, 0]
                    if keep.numel() < index.numel():
                        _compact_rows(z, keep)
                        z = z[: keep.numel()]
                        index, h, lab, g, lse_c = (t.index_select(0, keep) for t in (index, h, lab, g, lse_c))
                        row_sum = None if row_sum is None else row_sum.index_select(0, keep)
                    if keep.numel():
                        _chunk_gradients(chunks, z, h, index, lab, g, lse_c, row_sum, grads)
                    del z, h  # the buffer is freed with ``chunks`` below
                del chunks
        value, metrics = loss.batch(logp.view(-1, T))
        loss.metrics.update(metrics)
        op_name = "preference_loss (fused-linear, gradients made in the forward)"
        keep_for_backward(ctx, grads, weight, bias, opts.gather, op_name)
        return value

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        grad_h, grad_w, grad_b = hand_over_gradients(ctx, grad_loss)
        return grad_h, grad_w, grad_b, None, None, None, None


def fused_linear_pair_loss(
    hidden: torch.Tensor, weight: torch.Tensor, bias, labels: torch.Tensor, opts: _Options, loss: PairLoss
) -> torch.Tensor:
    """The loss of ``loss`` over hidden [2B * T, H] (flat rows, stride 1 in H) x ``weight`` (+ ``bias``), labels
    [2B * T]; inputs checked by the caller, ``loss.plan`` from ``pair_plan``. Metrics land in ``loss.metrics``."""
    with opts.gather.gathered(weight, bias):  # before apply: autograd records the full parameter shapes
        return FusedLinearPairLossFunction.apply(hidden, weight, bias, labels, opts, loss, torch.is_grad_enabled())
