"""preference_loss from hidden states with its gradients made in the forward, a group of whole pairs at a time
(ops/fused_linear_pairs.py), against the token op's path (today's: per-token log-probs, recomputed backward; fp32
<= 1e-6 relative), an unfused fp32 reference in bf16, and the conditions under which the token op's path is kept."""

import pytest
import torch
from test_fused_linear import TOL, count_gemm_rows, leaves, make_zero3

import allo_kernels as ak
from allo_kernels import objectives
from allo_kernels.ops import fused_linear_pairs as pairs_op
from allo_kernels.ops import token_logprobs as logprob_op


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(logprob_op, "MAX_BLOCK_V", 64)


def batch(B=3, T=10, V=70, H=12, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(2 * B, T, H, generator=g) * 0.7).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :3] = -100  # prompt
    labels[1, -4:] = -100  # padding
    labels[B + 1, -2:] = -100
    ref = torch.randn(2 * B, T, generator=g) - 4.0
    weights = torch.rand(2 * B, T, generator=g) + 0.5
    return hidden, weight, bias, labels, ref, weights


def run(hidden, weight, bias, labels, scale=1.0, token_path=False, **kw):
    """(loss, metrics, grads of hidden/weight/bias) of preference_loss on hidden states; ``token_path``: today's."""
    with pytest.MonkeyPatch.context() as m:
        if token_path:
            m.setattr(objectives, "pair_plan", lambda *a, **k: None)
        h, w, b = leaves(hidden, weight, bias)
        loss, metrics = ak.preference_loss(h, labels, lm_head_weight=w, lm_head_bias=b, **kw)
        (loss * scale).backward()
    return loss.detach(), metrics, [h.grad, w.grad, None if b is None else b.grad]


def close_fp32(got, want):
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


OPTIONS = {
    "dpo": dict(),
    "allo_improving": dict(mask_fraction=0.9, mask_by="highest"),
    "both_sides_lowest_weighted": dict(mask_fraction=0.5, mask_by="lowest", mask_side="both", weighted=True),
    "ipo": dict(loss_type="ipo"),
    "hinge_temperature": dict(loss_type="hinge", temperature=0.7),
    "robust": dict(loss_type="robust", label_smoothing=0.2),
    "simpo": dict(loss_type="simpo", reference_free=True, simpo_gamma=0.5),
    "batch_scope_nothing_dropped": dict(mask_scope="batch"),
}


# chunk 14 rows: one pair per group here; None: every pair in one group (the Triton path's one-group runs are the
# tests below, under the slow interpreter once is enough)
@pytest.mark.parametrize(("backend_name", "chunk_size"), [("torch", None), ("torch", 14), ("triton", 14)])
@pytest.mark.parametrize("case", list(OPTIONS))
def test_fp32_matches_the_token_op_path(case, chunk_size, backend_name, backend, monkeypatch):
    backend(backend_name)
    hidden, weight, bias, labels, ref, weights = batch(seed=len(case))
    kw = dict(OPTIONS[case])
    kw["weights"] = weights if kw.pop("weighted", False) else None
    kw["ref_logprobs"] = None if kw.pop("reference_free", False) else ref
    seen = count_gemm_rows(monkeypatch)
    loss, metrics, grads = run(hidden, weight, bias, labels, scale=-1.5, chunk_size=chunk_size, beta=0.3, **kw)
    n_valid = int((labels != -100).sum())
    assert sum(seen["logits"]) == n_valid  # the forward's GEMM rows only: nothing recomputed
    loss0, metrics0, grads0 = run(hidden, weight, bias, labels, scale=-1.5, token_path=True, beta=0.3, **kw)
    assert loss0 != 0 and metrics.keys() == metrics0.keys()
    close_fp32(loss, loss0)
    for k in metrics:
        close_fp32(metrics[k], metrics0[k])
    for got, want in zip(grads, grads0):
        assert want.abs().max() > 0
        close_fp32(got, want)


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_dropped_tokens_enter_no_gradient_gemm(backend_name, backend, monkeypatch):
    """ALLO's improving stage drops 90% of each rejected response: those rows get their forward GEMM (their rewards
    decide the mask) and nothing else."""
    backend(backend_name)
    hidden, weight, bias, labels, ref, _ = batch(B=2, T=24)
    seen = count_gemm_rows(monkeypatch)
    _, metrics, grads = run(hidden, weight, bias, labels, ref_logprobs=ref, mask_fraction=0.9)
    kept = int((2 * (metrics["tokens/chosen"] + metrics["tokens/rejected"])).item())  # means over B=2 pairs
    n_valid = int((labels != -100).sum())
    assert sum(seen["logits"]) == n_valid and sum(seen["weight_grad"]) == kept < n_valid
    want = run(hidden, weight, bias, labels, token_path=True, ref_logprobs=ref, mask_fraction=0.9)
    for got, expect in zip(grads, want[2]):
        close_fp32(got, expect)


def test_groups_hold_whole_pairs_up_to_the_chunk_rows():
    labels = torch.zeros(8, 5, dtype=torch.long)  # B=4 pairs, T=5
    labels[0, :2] = -100  # pair 0: 3 + 5 valid rows
    labels[5, :] = -100  # pair 1: 5 + 0
    # pairs 2 and 3: 5 + 5 each

    def plan(chunk_rows):
        opts = pairs_op._Options(-100, 1.0, chunk_rows, False, torch.float32, 0, None)
        return pairs_op.pair_plan(labels, opts, 10, 4)

    p = plan(13)
    assert p.groups == [(0, 2), (2, 3), (3, 4)] and p.max_rows == 13  # 8 + 5 | 10 | 10 rows
    rows = p.group_rows(0, 2)  # chosen sequences 0 and 1, then rejected 4 (5 has no valid row)
    assert rows.tolist() == [2, 3, 4, *range(5, 10), *range(20, 25)]
    assert p.group_positions(0, 2, rows).tolist() == [2, 3, 4, *range(5, 10), *range(10, 15)]  # in [4, 5]
    rows = p.group_rows(3, 4)
    assert rows.tolist() == [*range(15, 20), *range(35, 40)]
    assert p.group_positions(3, 4, rows).tolist() == list(range(10))  # in [2, 5]
    assert plan(10).groups == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert plan(9) is None  # pairs 2 and 3 have 10 valid rows


@pytest.mark.parametrize(
    "why",
    ["chunk_smaller_than_a_pair", "batch_scope_with_drops", "no_grad", "nothing_requires_grad", "fp16"],
)
def test_the_token_op_path_where_gradients_cannot_be_made_per_pair(why, backend, monkeypatch):
    backend("torch")
    hidden, weight, bias, labels, ref, _ = batch(B=2)
    kw = dict(ref_logprobs=ref, chunk_size=None)
    if why == "chunk_smaller_than_a_pair":
        kw["chunk_size"] = 6
    if why == "batch_scope_with_drops":
        kw.update(mask_fraction=0.5, mask_scope="batch")
    if why == "fp16":
        hidden, weight, bias = hidden.half(), weight.half(), bias.half()
    calls = []
    monkeypatch.setattr(objectives, "fused_linear_pair_loss", lambda *a, **k: calls.append(1))
    h, w, b = (hidden, weight, bias) if why == "nothing_requires_grad" else leaves(hidden, weight, bias)
    with torch.set_grad_enabled(why != "no_grad"):
        loss, _ = ak.preference_loss(h, labels, lm_head_weight=w, lm_head_bias=b, **kw)
    assert calls == [] and torch.isfinite(loss)


def test_bf16_matches_an_unfused_fp32_reference(backend):
    backend("triton")
    hidden, weight, bias, labels, ref, _ = batch(seed=7, dtype=torch.bfloat16)
    loss, _, grads = run(hidden, weight, bias, labels, ref_logprobs=ref, mask_fraction=0.9)
    h, w, b = leaves(hidden.float(), weight.float(), bias.float())
    want, _ = ak.preference_loss(h @ w.t() + b, labels, ref_logprobs=ref, mask_fraction=0.9)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), **TOL[torch.bfloat16])
    for got, expect in zip(grads, (h.grad, w.grad, b.grad)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expect, **TOL[torch.bfloat16])


def test_frozen_weight_and_a_pair_without_valid_tokens(backend, monkeypatch):
    backend("torch")
    hidden, weight, _, labels, ref, _ = batch()
    labels[0] = -100  # pair 0's chosen response is empty
    labels[3] = -100  # and its rejected one
    seen = count_gemm_rows(monkeypatch)
    h = hidden.clone().requires_grad_()
    loss, _ = ak.preference_loss(h, labels, lm_head_weight=weight, ref_logprobs=ref)
    loss.backward()
    assert seen["weight_grad"] == [] and h.grad[0].abs().max() == 0 and h.grad[3].abs().max() == 0
    h0 = hidden.clone().requires_grad_()
    monkeypatch.setattr(objectives, "pair_plan", lambda *a, **k: None)
    loss0, _ = ak.preference_loss(h0, labels, lm_head_weight=weight, ref_logprobs=ref)
    loss0.backward()
    close_fp32(loss.detach(), loss0.detach())
    close_fp32(h.grad, h0.grad)


def test_zero3_partitioned_weight_is_gathered_for_the_forward(backend):
    backend("triton")
    hidden, weight, bias, labels, ref, _ = batch()
    w, b = make_zero3(weight), make_zero3(bias)
    h = hidden.clone().requires_grad_()
    loss, _ = ak.preference_loss(h, labels, lm_head_weight=w, lm_head_bias=b, ref_logprobs=ref, mask_fraction=0.5)
    assert w.numel() == 0 and w.gathers == 1  # released again after the forward
    loss.backward()
    assert w.gathers == 2 and w.numel() == 0  # gathered again only for autograd's shape check
    h2, w2, b2 = leaves(hidden, weight, bias)
    want, _ = ak.preference_loss(h2 @ w2.t() + b2, labels, ref_logprobs=ref, mask_fraction=0.5)
    want.backward()
    for got, expect in zip((loss, h.grad, w.grad, b.grad), (want.detach(), h2.grad, w2.grad, b2.grad)):
        torch.testing.assert_close(got, expect, **TOL[torch.float32])


def test_a_second_backward_through_the_graph_is_an_error(backend):
    backend("torch")
    hidden, weight, _, labels, ref, _ = batch()
    h, w = leaves(hidden, weight)
    loss, _ = ak.preference_loss(h, labels, lm_head_weight=w, ref_logprobs=ref)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"preference_loss.*already handed"):
        loss.backward()


@pytest.mark.filterwarnings("error")  # a GEMM whose out= rows are too few resizes them with a warning
def test_the_buffer_holds_the_planned_group_when_free_memory_shrinks(backend, monkeypatch):
    """On CUDA the chunk budget follows free memory, which the gradient buffers take some of after the plan is made:
    the buffer must still hold the largest planned group."""
    from allo_kernels.ops import fused_linear as fl

    backend("torch")
    hidden, weight, bias, labels, ref, _ = batch()
    budgets = iter([1 << 20])  # the plan's call; every later one: room for a single row
    monkeypatch.setattr(fl, "chunk_budget_bytes", lambda device: next(budgets, 70 * 4))
    seen = count_gemm_rows(monkeypatch)
    loss, _, grads = run(hidden, weight, bias, labels, ref_logprobs=ref)
    assert seen["logits"] == [int((labels != -100).sum())]  # one group: every pair in one chunk
    monkeypatch.undo()
    loss0, _, grads0 = run(hidden, weight, bias, labels, token_path=True, ref_logprobs=ref)
    close_fp32(loss, loss0)
    for got, want in zip(grads, grads0):
        close_fp32(got, want)
