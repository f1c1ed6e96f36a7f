import math

import pytest
import torch
import torch.nn.functional as F
from test_fused_linear import count_gemm_rows

import allo_kernels as ak
from allo_kernels.ops import token_logprobs as logprob_op
from allo_kernels.ops.token_logprobs import token_logprobs_reference


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(logprob_op, "MAX_BLOCK_V", 64)


def batch(B=2, T=9, V=80, H=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :2] = -100  # prompt
    labels[1, -2:] = -100  # padding
    ref = torch.randn(2 * B, T, generator=g) - 4.0
    return hidden, weight, labels, ref


def official_allo_improving(logp, ref, labels, beta, eps):
    """The official improving-stage loss, written out: chosen log-ratio summed over all response tokens; rejected
    keeps only its ceil(eps * n) lowest-log-ratio tokens (token_scores' count, see masked_dpo_loss's docstring)."""
    B = logp.shape[0] // 2
    valid = labels != -100
    ratio = torch.where(valid, logp - ref, torch.zeros_like(logp))
    losses = []
    for b in range(B):
        chosen = ratio[b][valid[b]].sum()
        rej = ratio[B + b][valid[B + b]]
        k = rej.numel() - math.floor((1 - eps) * rej.numel())
        kept = torch.sort(rej, stable=True).values[:k].sum()
        losses.append(-F.logsigmoid(beta * (chosen - kept)))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@pytest.mark.parametrize("fused", [False, True])
def test_allo_improving_matches_official_formula(backend_name, fused, backend):
    backend(backend_name)
    hidden, weight, labels, ref = batch()
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    if fused:
        loss, metrics = ak.preference_loss(
            h, labels, lm_head_weight=w, ref_logprobs=ref, beta=0.2, mask_fraction=0.9, mask_by="highest", chunk_size=7
        )
    else:
        loss, metrics = ak.preference_loss(
            h @ w.t(), labels, ref_logprobs=ref, beta=0.2, mask_fraction=0.9, mask_by="highest"
        )
    loss.backward()
    h2 = hidden.clone().requires_grad_()
    w2 = weight.clone().requires_grad_()
    logp = token_logprobs_reference(h2 @ w2.t(), labels)
    expect = official_allo_improving(logp, ref, labels, 0.2, 0.1)
    expect.backward()
    torch.testing.assert_close(loss.detach(), expect.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-5)
    n_rej = (labels[2:] != -100).sum(-1).float()
    expected_kept = n_rej - torch.floor(0.9 * n_rej)
    torch.testing.assert_close(metrics["tokens/rejected"], expected_kept.mean())
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"} <= set(
        metrics
    )


def test_plain_dpo_and_ipo_without_mask(backend):
    backend("triton")
    hidden, weight, labels, ref = batch()
    logits = hidden @ weight.t()
    logp = token_logprobs_reference(logits, labels)
    valid = labels != -100
    s, s_ref, n = logp.sum(-1), (ref * valid).sum(-1), valid.sum(-1).float()
    loss, _ = ak.preference_loss(logits, labels, ref_logprobs=ref, beta=0.1)
    d = (s[:2] - s_ref[:2]) - (s[2:] - s_ref[2:])
    torch.testing.assert_close(loss, -F.logsigmoid(0.1 * d).mean(), atol=1e-5, rtol=1e-5)
    loss, _ = ak.preference_loss(logits, labels, ref_logprobs=ref, beta=0.1, loss_type="ipo")
    a, a_ref = s / n, s_ref / n
    d = (a[:2] - a_ref[:2]) - (a[2:] - a_ref[2:])
    torch.testing.assert_close(loss, ((d - 1 / (2 * 0.1)) ** 2).mean(), atol=1e-5, rtol=1e-5)
    loss, _ = ak.preference_loss(logits, labels, ref_logprobs=None, beta=2.0, loss_type="simpo", simpo_gamma=0.5)
    torch.testing.assert_close(loss, -F.logsigmoid(2.0 * (a[:2] - a[2:]) - 0.5).mean(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_forgetting_matches_official_formula(fused, backend):
    backend("triton")
    hidden, weight, labels, ref = batch(seed=3)
    g = torch.Generator().manual_seed(5)
    w_tok = (torch.rand(labels.shape, generator=g) > 0.5).float() * torch.rand(labels.shape, generator=g)
    h = hidden.clone().requires_grad_()
    if fused:
        loss, _metrics = ak.forgetting_loss(
            h, labels, lm_head_weight=weight, ref_logprobs=ref, weights=w_tok, beta=0.1, chunk_size=5
        )
    else:
        loss, _metrics = ak.forgetting_loss(h @ weight.t(), labels, ref_logprobs=ref, weights=w_tok, beta=0.1)
    loss.backward()
    # Official train_forgetting.py: logits.float() -> CE(reduction="none") -> sum(-r * logsig(-beta*(logp-ref))) / #r!=0
    h2 = hidden.clone().requires_grad_()
    logits = (h2 @ weight.t()).float()
    logp = -F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    r = torch.where(labels != -100, w_tok, torch.zeros_like(w_tok))
    expect = (-r * F.logsigmoid(-0.1 * (logp - ref))).sum() / (r != 0).sum()
    expect.backward()
    torch.testing.assert_close(loss.detach(), expect.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-5, rtol=1e-5)


def test_forgetting_all_zero_weights_is_zero(backend):
    backend("triton")
    hidden, weight, labels, ref = batch()
    h = hidden.clone().requires_grad_()
    loss, _ = ak.forgetting_loss(h @ weight.t(), labels, ref_logprobs=ref, weights=torch.zeros(labels.shape))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(h.grad) == 0


def test_bad_inputs():
    hidden, weight, labels, ref = batch()
    logits = hidden @ weight.t()
    with pytest.raises(ValueError, match="even first dimension"):
        ak.preference_loss(logits[:3], labels[:3], ref_logprobs=ref[:3])
    with pytest.raises(ValueError, match="ref_logprobs is required"):
        ak.preference_loss(logits, labels, ref_logprobs=None)
    with pytest.raises(ValueError, match="loss_type"):
        ak.preference_loss(logits, labels, ref_logprobs=ref, loss_type="kto")
    with pytest.raises(ValueError, match="mask_side"):
        ak.preference_loss(logits, labels, ref_logprobs=ref, mask_side="left")
    with pytest.raises(ValueError, match="lm_head_bias was given without lm_head_weight"):
        ak.preference_loss(logits, labels, ref_logprobs=ref, lm_head_bias=torch.zeros(80))
    with pytest.raises(ValueError, match="weights"):
        ak.forgetting_loss(logits, labels, ref_logprobs=ref, weights=-torch.ones(labels.shape))


# retain_logits_bytes: 0 recomputes every row's logits in the backward; None (the default) retains them all here.
@pytest.mark.parametrize("retain", [0, None])
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_preference_loss_backward_computes_only_kept_tokens(backend_name, retain, backend, monkeypatch):
    """ALLO's improving stage drops 90% of each rejected response: those tokens (and the prompt rows) must not enter
    the fused-linear backward at all, end to end through token_scores and the DPO loss."""
    backend(backend_name)
    hidden, weight, labels, ref = batch(B=2, T=20)
    seen = count_gemm_rows(monkeypatch)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = ak.preference_loss(
        h,
        labels,
        lm_head_weight=w,
        ref_logprobs=ref,
        mask_fraction=0.9,
        mask_by="highest",
        chunk_size=4,
        retain_logits_bytes=retain,
    )
    loss.backward()
    kept = int((2 * (metrics["tokens/chosen"] + metrics["tokens/rejected"])).item())  # means over B=2 pairs
    n_valid = int((labels != -100).sum())
    assert sum(seen["weight_grad"]) == kept < n_valid
    assert sum(seen["logits"]) == n_valid + (kept if retain == 0 else 0)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ak.preference_loss(h2 @ w2.t(), labels, ref_logprobs=ref, mask_fraction=0.9, mask_by="highest")[0].backward()
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("retain", [0, None])
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_forgetting_loss_backward_computes_only_weighted_tokens(backend_name, retain, backend, monkeypatch):
    backend(backend_name)
    hidden, weight, labels, ref = batch(T=20, seed=2)
    g = torch.Generator().manual_seed(9)
    w_tok = torch.rand(labels.shape, generator=g) * (torch.rand(labels.shape, generator=g) < 0.2)
    seen = count_gemm_rows(monkeypatch)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = ak.forgetting_loss(
        h, labels, lm_head_weight=w, ref_logprobs=ref, weights=w_tok, chunk_size=4, retain_logits_bytes=retain
    )
    loss.backward()
    weighted = int(((w_tok != 0) & (labels != -100)).sum())
    assert 0 < weighted < int((labels != -100).sum())
    # A weight-0 token is not scored at all: no logits GEMM row in the forward either.
    assert sum(seen["weight_grad"]) == weighted
    assert sum(seen["logits"]) == weighted * (2 if retain == 0 else 1)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ak.forgetting_loss(h2 @ w2.t(), labels, ref_logprobs=ref, weights=w_tok)[0].backward()
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_forgetting_loss_equals_scoring_every_token(fused, backend_name, backend):
    """Scoring weight-0 tokens as ignored changes nothing: loss, metrics and gradients equal token_npo_loss on the
    scores of every valid token (the path before weight-0 tokens were skipped), fp32, 1e-6 relative."""
    backend(backend_name)
    hidden, weight, labels, ref = batch(T=20, seed=4)
    g = torch.Generator().manual_seed(11)
    w_tok = torch.rand(labels.shape, generator=g) * (torch.rand(labels.shape, generator=g) < 0.3)

    def run(skip_weight_zero):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if skip_weight_zero:
            policy, head = (h, w) if fused else (h @ w.t(), None)
            loss, metrics = ak.forgetting_loss(
                policy, labels, lm_head_weight=head, ref_logprobs=ref, weights=w_tok, chunk_size=4 if fused else None
            )
        else:
            if fused:
                s = ak.fused_linear_token_scores(h, w, labels, ref_logprobs=ref, weights=w_tok, chunk_size=4)
            else:
                s = ak.token_scores(h @ w.t(), labels, ref_logprobs=ref, weights=w_tok)
            masked_ref = torch.where(s.keep, ref, torch.zeros_like(ref))
            loss, metrics = ak.losses.token_npo_loss(s.logprobs, masked_ref, s.weights, beta=0.1)
        loss.backward()
        return loss.detach(), metrics, h.grad, w.grad

    loss, metrics, h_grad, w_grad = run(True)
    loss0, metrics0, h_grad0, w_grad0 = run(False)
    assert loss0 != 0 and metrics0.keys() == metrics.keys()
    pairs = [(loss, loss0), (h_grad, h_grad0), (w_grad, w_grad0), *((metrics[k], metrics0[k]) for k in metrics)]
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("fused", [False, True])
def test_forgetting_loss_refuses_a_bad_label_at_a_weight_zero_token(fused):
    hidden, weight, labels, ref = batch()
    labels[0, 5] = 80  # == V: out of range
    w_tok = torch.ones(labels.shape)
    w_tok[0, 5] = 0.0
    policy, head = (hidden, weight) if fused else (hidden @ weight.t(), None)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 80\).*got 80 at index \(0, 5\)"):
        ak.forgetting_loss(policy, labels, lm_head_weight=head, ref_logprobs=ref, weights=w_tok)
