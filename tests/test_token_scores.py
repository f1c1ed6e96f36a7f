import math

import pytest
import torch
from conftest import tolerances

import allo_kernels as ak
from allo_kernels.ops import token_logprobs as logprob_op
from allo_kernels.ops.token_scores import _select_reference, _select_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(logprob_op, "MAX_BLOCK_V", 64)


def brute_force_masked(rewards, valid, fraction, *, highest, scope):
    """Direct transcription of the contract: per scope, floor(f*n) valid tokens with the highest (lowest) reward,
    ties to the earlier position; NaN rewards rank after every number (either mask_by), earlier NaN first."""
    B, T = rewards.shape
    masked = torch.zeros(B, T, dtype=torch.bool)
    scopes = (
        [[(b, t) for t in range(T)] for b in range(B)]
        if scope == "sequence"
        else [[(b, t) for b in range(B) for t in range(T)]]
    )
    for positions in scopes:
        cand = [(b, t) for (b, t) in positions if valid[b, t]]
        k = math.floor(fraction * len(cand))
        sign = -1.0 if highest else 1.0
        values = [float(rewards[c]) for c in cand]
        order = sorted(
            range(len(cand)), key=lambda i: (1, 0.0, i) if math.isnan(values[i]) else (0, sign * values[i], i)
        )
        for i in order[:k]:
            masked[cand[i]] = True
    return masked


def make_case(dtype, B=3, T=12, V=130, seed=0, strided=True):
    g = torch.Generator().manual_seed(seed)
    full = (torch.randn(B, T + 1, V, generator=g) * 3).to(dtype)
    logits = full[:, :-1] if strided else full[:, 1:].contiguous()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = -100  # prompt
    labels[1, -3:] = -100  # padding
    ref = torch.randn(B, T, generator=g) * 2
    weights = torch.rand(B, T, generator=g)
    weights[-1, min(5, T - 1)] = 0.0
    return logits, labels, ref, weights


def run_scores(logits, labels, backend_name, backend, **kw):
    backend(backend_name)
    x = logits.detach().clone().requires_grad_()
    s = ak.token_scores(x, labels, **kw)
    g_seq = torch.linspace(-1, 1, labels.shape[0])
    g_tok = torch.linspace(0.5, -0.5, labels.numel()).view(labels.shape)
    ((s.seq_logprobs * g_seq).sum() + (s.logprobs * g_tok).sum()).backward()
    return s, x.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scope", ["sequence", "batch"])
@pytest.mark.parametrize("mask_by", ["highest", "lowest"])
def test_matches_reference(dtype, scope, mask_by, backend):
    logits, labels, ref, w = make_case(dtype)
    kw = dict(ref_logprobs=ref, weights=w, beta=0.5, mask_fraction=0.3, mask_by=mask_by, mask_scope=scope)
    ours, grad = run_scores(logits, labels, "triton", backend, **kw)
    expect, grad_ref = run_scores(logits, labels, "torch", backend, **kw)
    torch.testing.assert_close(ours.logprobs.detach(), expect.logprobs.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.rewards, expect.rewards, atol=1e-5, rtol=1e-5)
    # The selection is exact given the rewards: compare against a brute-force transcription of the contract.
    valid = labels != -100
    masked = brute_force_masked(ours.rewards, valid, 0.3, highest=(mask_by == "highest"), scope=scope)
    assert torch.equal(ours.masked, masked)
    assert torch.equal(ours.keep, valid & ~masked)
    coef = ours.keep * w
    torch.testing.assert_close(ours.seq_logprobs.detach(), (ours.logprobs.detach() * coef).sum(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.seq_ref_logprobs, (ref * coef).sum(-1), atol=1e-5, rtol=0)
    assert torch.equal(ours.n_tokens, ours.keep.sum(-1).float())
    # These inputs have no near-ties, so both sides select the same tokens and the gradients must agree.
    assert torch.equal(ours.keep, expect.keep)
    torch.testing.assert_close(grad.float(), grad_ref.float(), **tolerances(dtype))


def test_exact_counts_and_ties(backend):
    # Rewards with many exact ties: the reference log-probs make every reward one of three values.
    logits = torch.zeros(2, 10, 8)  # uniform: logp = -log(8) everywhere
    labels = torch.randint(0, 8, (2, 10))
    labels[1, 7:] = -100
    ref = torch.tensor([[0.0, 1.0, 0.0, 2.0, 1.0, 0.0, 2.0, 2.0, 0.0, 1.0]] * 2)
    for fraction, backend_name in [(0.35, "triton"), (0.35, "torch"), (0.7, "triton"), (0.7, "torch")]:
        backend(backend_name)
        for mask_by in ("highest", "lowest"):
            s = ak.token_scores(logits, labels, ref_logprobs=ref, mask_fraction=fraction, mask_by=mask_by)
            valid = labels != -100
            assert s.masked.sum(-1).tolist() == [math.floor(fraction * 10), math.floor(fraction * 7)]
            expect = brute_force_masked(s.rewards, valid, fraction, highest=mask_by == "highest", scope="sequence")
            assert torch.equal(s.masked, expect), (backend_name, mask_by)


@pytest.mark.parametrize("select", [_select_triton, _select_reference])
def test_selection_kernel_against_brute_force(select, backend):
    backend("triton")
    g = torch.Generator().manual_seed(3)
    for S, L in [(1, 1), (2, 37), (3, 200)]:
        logp = torch.randint(-3, 1, (S, L), generator=g).float()  # integer values: lots of ties
        ref = torch.zeros(S, L)
        labels = torch.randint(-1, 2, (S, L), generator=g)
        labels[labels < 0] = -100
        n = (labels != -100).sum(-1)
        for fraction in (0.0, 0.25, 0.999):
            k = torch.floor(fraction * n.double()).long()
            for highest in (True, False):
                rewards, masked = select(logp, ref, labels, k, beta=1.0, ignore_index=-100, highest=highest)
                expect = brute_force_masked(rewards, labels != -100, fraction, highest=highest, scope="sequence")
                assert torch.equal(masked, expect)
                assert masked.sum(-1).tolist() == k.tolist()


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_edge_cases(backend_name, backend):
    backend(backend_name)
    logits, labels, ref, w = make_case(torch.float32, B=3, T=6, V=40)
    labels[2] = -100  # a sequence with no valid tokens
    x = logits.detach().clone().requires_grad_()
    s = ak.token_scores(x, labels, ref_logprobs=ref, weights=w, mask_fraction=0.999)
    assert s.seq_logprobs[2].item() == 0.0 and s.n_tokens[2].item() == 0.0 and s.seq_ref_logprobs[2].item() == 0.0
    n = (labels != -100).sum(-1)
    assert s.masked.sum(-1).tolist() == [math.floor(0.999 * int(v)) for v in n]
    s.seq_logprobs.sum().backward()
    assert torch.isfinite(x.grad).all()
    # Masked tokens and ignored tokens get exactly zero gradient when only the sums are used.
    assert torch.count_nonzero(x.grad[~s.keep]) == 0
    # No ref, no weights, no mask: sums are plain sums of log-probs.
    s0 = ak.token_scores(logits, labels)
    torch.testing.assert_close(s0.seq_logprobs, s0.logprobs.sum(-1))
    assert torch.equal(s0.keep, labels != -100)
    assert torch.equal(s0.rewards, 0.1 * s0.logprobs.detach())


def test_all_weights_zero_and_fraction_zero(backend):
    backend("triton")
    logits, labels, ref, _ = make_case(torch.float32, B=2, T=5, V=30)
    x = logits.detach().clone().requires_grad_()
    s = ak.token_scores(x, labels, ref_logprobs=ref, weights=torch.zeros(2, 5))
    s.seq_logprobs.sum().backward()
    assert torch.equal(s.seq_logprobs.detach(), torch.zeros(2))
    assert torch.count_nonzero(x.grad) == 0


def test_bad_inputs():
    logits, labels, ref, w = make_case(torch.float32, B=2, T=4, V=20)
    with pytest.raises(ValueError, match="mask_fraction"):
        ak.token_scores(logits, labels, mask_fraction=1.0)
    with pytest.raises(ValueError, match="mask_fraction"):
        ak.token_scores(logits, labels, mask_fraction=-0.1)
    with pytest.raises(TypeError, match="mask_fraction"):
        ak.token_scores(logits, labels, mask_fraction="0.1")
    with pytest.raises(ValueError, match="mask_by"):
        ak.token_scores(logits, labels, mask_by="top")
    with pytest.raises(ValueError, match="mask_scope"):
        ak.token_scores(logits, labels, mask_scope="token")
    with pytest.raises(ValueError, match="beta"):
        ak.token_scores(logits, labels, beta=0)
    bad = ref.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="ref_logprobs must be finite, got 1"):
        ak.token_scores(logits, labels, ref_logprobs=bad)
    bad = w.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="weights must be finite"):
        ak.token_scores(logits, labels, weights=bad)
    with pytest.raises(ValueError, match="ref_logprobs must have the shape of labels"):
        ak.token_scores(logits, labels, ref_logprobs=ref[:, :2])
    with pytest.raises(TypeError, match="weights"):
        ak.token_scores(logits, labels, weights=w.long())
    with pytest.raises(ValueError, match=r"logits must be \[B, T, V\]"):
        ak.token_scores(logits[0], labels[0])


def _random_selection_case(g, S, L, *, nan_frac=0.0, inf_frac=0.0):
    logp = torch.randint(-3, 1, (S, L), generator=g).float()  # integer values: lots of ties
    special = torch.rand(S, L, generator=g)
    logp[special < nan_frac] = float("nan")
    logp[(special >= nan_frac) & (special < nan_frac + inf_frac)] = float("-inf")
    labels = torch.randint(-1, 2, (S, L), generator=g)
    labels[labels < 0] = -100
    return logp, labels


@pytest.mark.parametrize("select", [_select_triton, _select_reference])
def test_selection_odd_shapes_nan_and_inf(select, backend):
    """One token, all ignored, batch-sized scopes, many ties, NaN and -inf rewards: exact against brute force."""
    backend("triton")
    g = torch.Generator().manual_seed(7)
    cases = [(1, 1, 0.0), (1, 1, 1.0), (3, 5, 0.5), (2, 37, 0.3), (1, 300, 0.1), (4, 64, 0.0)]
    for S, L, nan_frac in cases:
        logp, labels = _random_selection_case(g, S, L, nan_frac=nan_frac, inf_frac=0.1)
        if (S, L) == (4, 64):
            labels[1] = -100  # a scope with every token ignored
        n = (labels != -100).sum(-1)
        for fraction in (0.0, 0.2, 0.5, 0.999):
            k = torch.floor(fraction * n.double()).long()
            for highest in (True, False):
                rewards, masked = select(
                    logp, torch.zeros(S, L), labels, k, beta=0.5, ignore_index=-100, highest=highest
                )
                expect = brute_force_masked(rewards, labels != -100, fraction, highest=highest, scope="sequence")
                assert torch.equal(masked, expect), (S, L, nan_frac, fraction, highest)
                assert masked.sum(-1).tolist() == k.tolist()


def test_signed_zero_rewards_tie_by_position(backend):
    backend("triton")
    logp = torch.tensor([[-0.0, 0.0, -0.0, 0.0, 1.0, -1.0]])
    labels = torch.zeros(1, 6, dtype=torch.long)
    k = torch.tensor([3])
    # highest: 1.0 first, then the zeros of either sign in position order; lowest: -1.0 first, then the zeros.
    for highest, expect in ((True, [1, 1, 0, 0, 1, 0]), (False, [1, 1, 0, 0, 0, 1])):
        for select in (_select_triton, _select_reference):
            _, masked = select(logp, torch.zeros(1, 6), labels, k, beta=1.0, ignore_index=-100, highest=highest)
            assert masked.int().tolist() == [expect], (select.__name__, highest)


@pytest.mark.parametrize("scope", ["sequence", "batch"])
@pytest.mark.parametrize("mask_by", ["highest", "lowest"])
def test_nan_rewards_same_mask_on_both_paths(scope, mask_by, backend):
    """Issue 11.20: a NaN log-prob must not change how many tokens are masked, on either path."""
    logits, labels, ref, _ = make_case(torch.float32, B=3, T=9, V=40)
    labels[0, :4] = 5  # all valid in row 0
    logits = logits.clone()
    logits[0, 2, :] = float("nan")  # row 0, token 2: NaN log-prob, NaN reward
    logits[2, 0, 7] = float("nan")
    out = {}
    for backend_name in ("triton", "torch"):
        backend(backend_name)
        s = ak.token_scores(logits, labels, ref_logprobs=ref, mask_fraction=0.4, mask_by=mask_by, mask_scope=scope)
        out[backend_name] = s
    assert torch.equal(out["triton"].masked, out["torch"].masked)
    valid = labels != -100
    expect = brute_force_masked(out["torch"].rewards, valid, 0.4, highest=mask_by == "highest", scope=scope)
    assert torch.equal(out["triton"].masked, expect)
    n = valid.sum(-1) if scope == "sequence" else valid.sum().reshape(1)
    got = out["triton"].masked.sum(-1) if scope == "sequence" else out["triton"].masked.sum().reshape(1)
    assert got.tolist() == [math.floor(0.4 * int(v)) for v in n]
    assert not out["triton"].masked[0, 2]  # NaN ranks last: not masked while numbers remain
