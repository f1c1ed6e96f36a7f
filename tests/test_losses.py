"""allo_kernels.losses against independent, element-by-element formulas (python ``math`` on floats), the official
ALLO code paths re-written here, float64 gradchecks, edge cases and argument errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from allo_kernels import losses as L


# ------------------------------------------------------------------------------------------------- scalar references
def logsig(x: float) -> float:
    # log(sigmoid(x)) = -log(1 + exp(-x)), written stably for both signs
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def floats(t: torch.Tensor) -> list:
    return t.detach().double().flatten().tolist()


def seq_batch(n=5, seed=0, dtype=torch.float32, scale=8.0, offset=-30.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g, dtype=torch.float64) * scale + offset).to(dtype) for _ in range(4)]


def close(actual: torch.Tensor, expected: float, tol=1e-5):
    assert actual.dim() == 0
    actual = actual.detach()
    assert math.isclose(float(actual), expected, rel_tol=tol, abs_tol=tol), (float(actual), expected)


def pref_metric_refs(beta, pc, pr, rc, rr):
    cr = [beta * (a - b) for a, b in zip(pc, rc)]
    rj = [beta * (a - b) for a, b in zip(pr, rr)]
    return {
        "rewards/chosen": mean(cr),
        "rewards/rejected": mean(rj),
        "rewards/margins": mean(a - b for a, b in zip(cr, rj)),
        "rewards/accuracies": mean(1.0 if a > b else 0.0 for a, b in zip(cr, rj)),
        "logps/chosen": mean(pc),
        "logps/rejected": mean(pr),
    }


def assert_metrics(metrics: dict, expected: dict, tol=1e-5):
    assert set(expected) <= set(metrics), (sorted(metrics), sorted(expected))
    for k, v in expected.items():
        m = metrics[k]
        assert isinstance(m, torch.Tensor) and m.dim() == 0 and not m.requires_grad, k
        assert math.isclose(float(m), v, rel_tol=tol, abs_tol=tol), (k, float(m), v)


# ------------------------------------------------------------------------------------------------------------- DPO
def dpo_ref(loss_type, beta, e, pc, pr, rc, rr):
    out = []
    for a, b, c, d in zip(pc, pr, rc, rr):
        D = (a - c) - (b - d)
        if loss_type == "sigmoid":
            out.append(-(1 - e) * logsig(beta * D) - e * logsig(-beta * D))
        elif loss_type == "robust":
            out.append((-(1 - e) * logsig(beta * D) + e * logsig(-beta * D)) / (1 - 2 * e))
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - beta * D))
        elif loss_type == "ipo":
            out.append((D - 1 / (2 * beta)) ** 2)
    return mean(out)


DPO_CASES = [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.0), ("robust", 0.3), ("hinge", 0.0), ("ipo", 0.0)]


@pytest.mark.parametrize("loss_type,e", DPO_CASES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_formula(loss_type, e, beta):
    pc, pr, rc, rr = seq_batch(7, seed=1)
    loss, metrics = L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=e)
    args = [floats(t) for t in (pc, pr, rc, rr)]
    close(loss, dpo_ref(loss_type, beta, e, *args), tol=2e-5)
    assert loss.dtype == torch.float32
    assert_metrics(metrics, pref_metric_refs(beta, *args), tol=2e-5)


def test_dpo_default_is_sigmoid_beta_0_1():
    pc, pr, rc, rr = seq_batch(4, seed=2)
    loss, _ = L.dpo_loss(pc, pr, rc, rr)
    close(loss, dpo_ref("sigmoid", 0.1, 0.0, *[floats(t) for t in (pc, pr, rc, rr)]))


@pytest.mark.parametrize("loss_type,e", DPO_CASES)
def test_dpo_gradcheck(loss_type, e):
    inputs = [t.requires_grad_() for t in seq_batch(3, seed=3, dtype=torch.float64, scale=3.0, offset=-5.0)]
    fn = lambda *x: L.dpo_loss(*x, beta=0.3, loss_type=loss_type, label_smoothing=e)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


def test_dpo_half_inputs_computed_in_fp32():
    pc, pr, rc, rr = seq_batch(6, seed=4)
    half = [t.to(torch.bfloat16) for t in (pc, pr, rc, rr)]
    loss, metrics = L.dpo_loss(*half, beta=0.2)
    assert loss.dtype == torch.float32 and metrics["rewards/chosen"].dtype == torch.float32
    # judged against the same bf16 values in float64
    close(loss, dpo_ref("sigmoid", 0.2, 0.0, *[floats(t) for t in half]))


def test_dpo_extreme_margins_stay_finite():
    big = torch.tensor([1e4, -1e4, 0.0])
    zero = torch.zeros(3)
    for e in (0.0, 0.1):
        loss, _ = L.dpo_loss(big.clone().requires_grad_(), zero, zero, zero, beta=1.0, label_smoothing=e)
        assert torch.isfinite(loss)
    pc = big.clone().requires_grad_()
    loss, _ = L.dpo_loss(pc, zero, zero, zero, beta=1.0)
    loss.backward()
    assert torch.isfinite(pc.grad).all()
    close(loss, (0.0 + 1e4 + math.log(2)) / 3, tol=1e-6)


# ------------------------------------------------------------------------------------------ ALLO improving (masked DPO)
def official_allo_improving(policy_c, ref_c, policy_r, ref_r, eps, beta):
    """RUCAIBox/ALLO train_improving.py MaskDPOTrainer.dpo_loss, re-written: per-token [B, T] logps (0 at padding);
    rejected keeps the int(T * eps) tokens with the lowest log-ratio (exact zeros treated as masked)."""
    chosen = (policy_c - ref_c).sum(-1)
    rej_ratio = policy_r - ref_r
    k = int(rej_ratio.size(-1) * eps)
    mask = torch.zeros_like(rej_ratio)
    for i in range(rej_ratio.size(0)):
        cand = -rej_ratio[i]
        cand = torch.where(cand == 0, torch.full_like(cand, -1e10), cand)
        threshold = cand.topk(k).values[-1]
        mask[i] = (cand >= threshold).to(mask.dtype)
    rejected = (rej_ratio * mask).sum(-1)
    return (-F.logsigmoid(beta * (chosen - rejected))).mean(), mask


def test_masked_dpo_composes_to_official_allo_improving():
    g = torch.Generator().manual_seed(5)
    B, T, eps, beta = 3, 20, 0.2, 0.1
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 15:] = False  # right padding: the official code sees exact-zero log-ratios there
    valid[2, 12:] = False
    lp = [torch.where(valid, -torch.rand(B, T, generator=g, dtype=torch.float64) * 4, 0.0) for _ in range(4)]
    pc, rc, pr, rr = lp
    pc.requires_grad_()
    pr.requires_grad_()
    expected, keep = official_allo_improving(pc, rc, pr, rr, eps, beta)
    assert int(keep.sum()) == B * int(T * eps)  # no ties in random data
    keep = keep.bool()
    # what token_scores hands over: masked sums of policy and reference log-probs
    loss, metrics = L.masked_dpo_loss(
        pc.sum(-1),
        (pr * keep).sum(-1),
        rc.sum(-1),
        (rr * keep).sum(-1),
        beta=beta,
        chosen_tokens=valid.sum(-1).double(),
        rejected_tokens=keep.sum(-1),
    )
    close(loss, float(expected.detach()), tol=1e-12)
    g_ours = torch.autograd.grad(loss, (pc, pr))
    g_official = torch.autograd.grad(expected, (pc, pr))
    for a, b in zip(g_ours, g_official):
        torch.testing.assert_close(a, b)
    close(metrics["tokens/chosen"], (20 + 15 + 12) / 3)
    close(metrics["tokens/rejected"], int(T * eps))
    assert "rewards/margins" in metrics


def test_masked_dpo_equals_sigmoid_dpo_and_checks_counts():
    pc, pr, rc, rr = seq_batch(4, seed=6)
    a = L.masked_dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.1)
    b = L.dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.1)
    assert torch.equal(a[0], b[0]) and a[1].keys() == b[1].keys()
    with pytest.raises(ValueError, match="rejected_tokens"):
        L.masked_dpo_loss(pc, pr, rc, rr, rejected_tokens=torch.ones(3))


# ------------------------------------------------------------------------------------------------------------- NPO
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_npo_matches_formula_and_gradcheck(beta):
    s, s_ref, _, _ = seq_batch(6, seed=7)
    loss, metrics = L.npo_loss(s, s_ref, beta=beta)
    a, b = floats(s), floats(s_ref)
    close(loss, mean(-(2 / beta) * logsig(-beta * (x - y)) for x, y in zip(a, b)), tol=2e-5)
    assert_metrics(metrics, {"rewards/rejected": mean(beta * (x - y) for x, y in zip(a, b)), "logps/rejected": mean(a)})
    s64, r64, _, _ = seq_batch(3, seed=8, dtype=torch.float64, scale=2.0, offset=-3.0)
    assert torch.autograd.gradcheck(
        lambda x, y: L.npo_loss(x, y, beta=beta)[0], (s64.requires_grad_(), r64.requires_grad_())
    )


# ------------------------------------------------------------------------------------------ ALLO forgetting (token NPO)
def official_allo_forgetting(logits, labels, reward, ref_prob, beta=0.1):
    """RUCAIBox/ALLO train_forgetting.py LlamaForFGNPO.forward, re-written (already shifted inputs, fp32)."""
    V = logits.size(-1)
    # (the official code upcasts bf16 logits with .float(); these logits are already float64)
    log_policy_prob = -torch.nn.CrossEntropyLoss(reduction="none")(logits.reshape(-1, V), labels.reshape(-1))
    reward = reward.reshape(-1)
    log_ref_prob = ref_prob.reshape(-1)
    num_label = torch.sum(torch.ne(reward, 0.0))
    diff = -beta * (log_policy_prob - log_ref_prob)
    loss = -reward * F.logsigmoid(diff)
    return loss.sum() / num_label


def test_token_npo_matches_official_allo_forgetting():
    g = torch.Generator().manual_seed(9)
    B, T, V = 3, 9, 17
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100  # prompt
    labels[2, 6:] = -100  # padding
    valid = labels != -100
    reward = torch.where(valid, torch.rand(B, T, generator=g, dtype=torch.float64), 0.0)
    reward[1, 3] = 0.0  # a response token without reward does not count
    ref = torch.where(valid, -torch.rand(B, T, generator=g, dtype=torch.float64) * 5, 0.0)

    lg_official = logits.clone().requires_grad_()
    expected = official_allo_forgetting(lg_official, labels, reward, ref)
    expected.backward()

    lg = logits.clone().requires_grad_()
    logp = torch.where(valid, lg.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    loss, metrics = L.token_npo_loss(logp, ref, reward, beta=0.1)
    loss.backward()
    close(loss, float(expected.detach()), tol=1e-12)
    torch.testing.assert_close(lg.grad, lg_official.grad)
    active = reward != 0
    n = int(active.sum())
    assert_metrics(
        metrics,
        {
            "num_tokens": float(n),
            "weights/mean": float(reward.sum()) / n,
            "logps/rejected": float(logp.detach()[active].sum()) / n,
            "rewards/rejected": 0.1 * float((logp.detach() - ref)[active].sum()) / n,
        },
        tol=1e-9,
    )


def test_token_npo_matches_scalar_formula_and_weights_are_constants():
    g = torch.Generator().manual_seed(10)
    lp = -torch.rand(2, 6, generator=g) * 6
    ref = -torch.rand(2, 6, generator=g) * 6
    w = torch.rand(2, 6, generator=g)
    w[0, 0] = 0.0
    w[1, 4] = 0.0
    w.requires_grad_()
    lp.requires_grad_()
    beta = 0.7
    loss, _ = L.token_npo_loss(lp, ref, w, beta=beta)
    terms = [-c * logsig(-beta * (a - b)) for a, b, c in zip(floats(lp), floats(ref), floats(w)) if c != 0]
    close(loss, sum(terms) / len(terms))
    loss.backward()
    assert w.grad is None  # weights are constants for autograd
    assert lp.grad[0, 0] == 0 and lp.grad[1, 4] == 0 and (lp.grad[w.detach() != 0] != 0).all()


def test_token_npo_gradcheck():
    g = torch.Generator().manual_seed(11)
    lp = (-torch.rand(2, 5, generator=g, dtype=torch.float64) * 3).requires_grad_()
    ref = (-torch.rand(2, 5, generator=g, dtype=torch.float64) * 3).requires_grad_()
    w = torch.rand(2, 5, generator=g, dtype=torch.float64)
    w[0, 1] = 0.0
    assert torch.autograd.gradcheck(lambda a, b: L.token_npo_loss(a, b, w, beta=0.5)[0], (lp, ref))


def test_token_npo_all_zero_weights_is_exactly_zero():
    lp = torch.tensor([[-1.0, -float("inf"), -3.0], [-0.5, -2.0, -7.0]], requires_grad=True)
    ref = torch.full((2, 3), -2.0, requires_grad=True)
    w = torch.zeros(2, 3)
    loss, metrics = L.token_npo_loss(lp, ref, w)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros(2, 3)) and torch.equal(ref.grad, torch.zeros(2, 3))
    assert all(float(v) == 0.0 for v in metrics.values())
    # an empty batch behaves the same
    empty = torch.zeros(0, 4, requires_grad=True)
    loss, _ = L.token_npo_loss(empty, torch.zeros(0, 4), torch.zeros(0, 4))
    assert loss.item() == 0.0


def test_token_npo_ignores_minus_inf_logprob_at_zero_weight():
    lp = torch.tensor([[-1.0, -float("inf")]], requires_grad=True)
    loss, _ = L.token_npo_loss(lp, torch.tensor([[-2.0, -3.0]]), torch.tensor([[0.5, 0.0]]), beta=0.1)
    loss.backward()
    close(loss, -0.5 * logsig(-0.1 * (-1.0 + 2.0)))
    assert torch.isfinite(lp.grad).all() and lp.grad[0, 1] == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_token_npo_rejects_non_finite_ref_and_weights(bad):
    lp, ref, w = torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)
    bad_ref = ref.clone()
    bad_ref[1, 2] = bad
    with pytest.raises(ValueError, match="ref_logprobs"):
        L.token_npo_loss(lp, bad_ref, w)
    bad_w = w.clone()
    bad_w[0, 0] = bad
    with pytest.raises(ValueError, match="weights"):
        L.token_npo_loss(lp, ref, bad_w)


def test_token_npo_rejects_negative_weights_and_bad_shapes():
    lp, ref = torch.zeros(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="weights must be >= 0"):
        L.token_npo_loss(lp, ref, torch.tensor([[1.0, -0.1, 0.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="weights"):
        L.token_npo_loss(lp, ref, torch.ones(2, 4))
    with pytest.raises(TypeError, match="weights"):
        L.token_npo_loss(lp, ref, torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="ref_logprobs"):
        L.token_npo_loss(lp, torch.zeros(2, 3, device="meta"), torch.ones(2, 3))


# ----------------------------------------------------------------------------------------------------------- SimPO
def simpo_ref(beta, gamma, e, c, r):
    out = []
    for a, b in zip(c, r):
        z = beta * (a - b) - gamma
        out.append(-(1 - e) * logsig(z) - e * logsig(-z))
    return mean(out)


@pytest.mark.parametrize("e", [0.0, 0.1])
def test_simpo_on_averages(e):
    c, r, _, _ = seq_batch(6, seed=12, scale=0.5, offset=-1.0)
    loss, metrics = L.simpo_loss(c, r, beta=2.5, gamma=1.4, label_smoothing=e)
    a, b = floats(c), floats(r)
    close(loss, simpo_ref(2.5, 1.4, e, a, b))
    assert_metrics(metrics, pref_metric_refs(2.5, a, b, [0.0] * 6, [0.0] * 6))


def test_simpo_defaults_and_lengths():
    sums_c = torch.tensor([-6.0, -3.0, 0.0, -10.0])
    sums_r = torch.tensor([-8.0, -1.0, -2.0, -9.0])
    len_c = torch.tensor([3, 2, 0, 5])  # a sequence with no valid tokens: average 0, no NaN
    len_r = torch.tensor([4.0, 1.0, 2.0, 3.0])
    c_req = sums_c.clone().requires_grad_()
    loss, metrics = L.simpo_loss(c_req, sums_r, chosen_lengths=len_c, rejected_lengths=len_r)
    avg_c = [-2.0, -1.5, 0.0, -2.0]
    avg_r = [-2.0, -1.0, -1.0, -3.0]
    close(loss, simpo_ref(2.0, 1.0, 0.0, avg_c, avg_r))  # defaults: beta=2, gamma=1 (gamma/beta = 0.5)
    close(metrics["logps/chosen"], mean(avg_c))
    loss.backward()
    assert torch.isfinite(c_req.grad).all() and c_req.grad[2] == 0


def test_simpo_gradcheck():
    c, r, lc, lr = seq_batch(3, seed=13, dtype=torch.float64, scale=2.0, offset=-4.0)
    lc, lr = lc.abs() + 1, lr.abs() + 1
    fn = lambda a, b: L.simpo_loss(a, b, chosen_lengths=lc, rejected_lengths=lr, beta=1.5, gamma=0.3)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (c.requires_grad_(), r.requires_grad_()))


def test_simpo_argument_errors():
    c = torch.zeros(3)
    with pytest.raises(ValueError, match="chosen_lengths"):
        L.simpo_loss(c, c, chosen_lengths=torch.ones(3))
    with pytest.raises(ValueError, match="rejected_lengths must be >= 0"):
        L.simpo_loss(c, c, chosen_lengths=torch.ones(3), rejected_lengths=torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="chosen_lengths must be finite"):
        L.simpo_loss(c, c, chosen_lengths=torch.tensor([1.0, float("nan"), 1.0]), rejected_lengths=torch.ones(3))
    with pytest.raises(ValueError, match="gamma"):
        L.simpo_loss(c, c, gamma=-0.5)
    with pytest.raises(ValueError, match="beta"):
        L.simpo_loss(c, c, beta=0.0)


# ------------------------------------------------------------------------------------------------------------ ORPO
def orpo_ref(beta, nll, c, r):
    ratios, log_odds = [], []
    for a, b in zip(c, r):
        lo = (a - b) - (math.log(1 - math.exp(a)) - math.log(1 - math.exp(b)))
        log_odds.append(lo)
        ratios.append(logsig(lo))
    return nll - beta * mean(ratios), mean(ratios), mean(log_odds)


def test_orpo_matches_formula():
    c = torch.tensor([-0.2, -1.5, -3.0, -1e-3, -0.9])  # both branches of log(1 - exp(x))
    r = torch.tensor([-0.4, -1.0, -4.5, -0.05, -2.0])
    nll = torch.tensor(1.7)
    loss, metrics = L.orpo_loss(c, r, nll, beta=0.25)
    expected, ratio, lo = orpo_ref(0.25, 1.7, floats(c), floats(r))
    close(loss, expected, tol=1e-5)
    expected_metrics = pref_metric_refs(0.25, floats(c), floats(r), [0.0] * 5, [0.0] * 5)
    expected_metrics.update({"nll_loss": 1.7, "log_odds_ratio": ratio, "log_odds_chosen": lo})
    assert_metrics(metrics, expected_metrics, tol=1e-5)


def test_orpo_gradcheck_and_nll_gradient():
    c = torch.tensor([-0.3, -2.0, -0.6], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-0.5, -1.2, -3.0], dtype=torch.float64, requires_grad=True)
    nll = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, n: L.orpo_loss(a, b, n, beta=0.4)[0], (c, r, nll))
    token_lp = torch.tensor([[-1.0, -2.0, -5.0]], requires_grad=True)
    nll_loss, _ = L.sft_loss(token_lp, torch.tensor([[True, True, False]]))
    loss, _ = L.orpo_loss(c.detach().float(), r.detach().float(), nll_loss)
    loss.backward()
    torch.testing.assert_close(token_lp.grad, torch.tensor([[-0.5, -0.5, 0.0]]))


def test_orpo_empty_sequences_are_finite():
    c = torch.tensor([0.0, 0.0, -1.0], requires_grad=True)
    r = torch.tensor([0.0, -1.0, 0.0])
    loss, metrics = L.orpo_loss(c, r, torch.tensor(0.5))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(c.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_orpo_argument_errors():
    c = torch.full((2,), -1.0)
    with pytest.raises(ValueError, match="nll_loss"):
        L.orpo_loss(c, c, torch.ones(2))
    with pytest.raises(ValueError, match="beta"):
        L.orpo_loss(c, c, torch.tensor(1.0), beta=-1)


# ------------------------------------------------------------------------------------------------------------- KTO
def kto_ref(beta, wd, wu, pc, rc, pr, rr, pk=None, rk=None):
    z0 = max(0.0, mean(a - b for a, b in zip(pk, rk))) if pk is not None else 0.0
    terms = [wd * (1 - sig(beta * ((a - b) - z0))) for a, b in zip(pc, rc)]
    terms += [wu * (1 - sig(beta * (z0 - (a - b)))) for a, b in zip(pr, rr)]
    return mean(terms), z0


@pytest.mark.parametrize("with_kl", [False, True])
def test_kto_matches_formula(with_kl):
    pc, rc, pk, rk = seq_batch(5, seed=14, scale=4.0, offset=-20.0)
    pr, rr, _, _ = seq_batch(3, seed=15, scale=4.0, offset=-20.0)
    pk = rk + 2.0  # positive mean KL so that the clamp is not the whole story
    kl_args = (pk, rk) if with_kl else ()
    loss, metrics = L.kto_loss(pc, pr, rc, rr, *kl_args, beta=0.2, desirable_weight=1.3, undesirable_weight=0.7)
    kl_floats = (floats(pk), floats(rk)) if with_kl else ()
    expected, z0 = kto_ref(0.2, 1.3, 0.7, floats(pc), floats(rc), floats(pr), floats(rr), *kl_floats)
    close(loss, expected)
    crw = mean(0.2 * (a - b) for a, b in zip(floats(pc), floats(rc)))
    rrw = mean(0.2 * (a - b) for a, b in zip(floats(pr), floats(rr)))
    assert_metrics(
        metrics,
        {
            "kl": z0,
            "rewards/chosen": crw,
            "rewards/rejected": rrw,
            "rewards/margins": crw - rrw,
            "logps/chosen": mean(floats(pc)),
            "logps/rejected": mean(floats(pr)),
            "count/chosen": 5.0,
            "count/rejected": 3.0,
        },
    )


def test_kto_kl_clamped_detached_and_one_sided_batches():
    pc = torch.tensor([-5.0, -6.0], dtype=torch.float64, requires_grad=True)
    rc = torch.tensor([-5.5, -5.0], dtype=torch.float64)
    pk = torch.tensor([-9.0, -8.0], dtype=torch.float64, requires_grad=True)
    rk = torch.tensor([-3.0, -3.0], dtype=torch.float64)  # negative KL estimate -> z0 = 0
    empty = torch.zeros(0, dtype=torch.float64)
    loss, metrics = L.kto_loss(pc, empty, rc, empty, pk, rk, beta=0.5)
    expected, _ = kto_ref(0.5, 1.0, 1.0, floats(pc), floats(rc), [], [], floats(pk), floats(rk))
    close(loss, expected, tol=1e-12)
    assert float(metrics["kl"]) == 0.0 and float(metrics["rewards/rejected"]) == 0.0
    loss.backward()
    assert pk.grad is None  # the KL reference point is a constant
    assert torch.autograd.gradcheck(
        lambda a, b: L.kto_loss(empty, a, empty, b, beta=0.5)[0], (pc, rc.clone().requires_grad_())
    )
    with pytest.raises(ValueError, match="both empty"):
        L.kto_loss(empty, empty, empty, empty)
    with pytest.raises(ValueError, match="policy_kl"):
        L.kto_loss(pc, empty, rc, empty, pk)
    with pytest.raises(ValueError, match="ref_kl must be finite"):
        L.kto_loss(pc, empty, rc, empty, pk, torch.tensor([0.0, float("inf")], dtype=torch.float64))
    with pytest.raises(ValueError, match="undesirable_weight"):
        L.kto_loss(pc, empty, rc, empty, undesirable_weight=0.0)


# ------------------------------------------------------------------------------------------------------------- SFT
def test_sft_mean_over_valid_tokens():
    lp = torch.tensor([[-1.0, -2.0, float("nan")], [-4.0, -float("inf"), -0.5]], requires_grad=True)
    valid = torch.tensor([[True, True, False], [True, False, True]])
    loss, metrics = L.sft_loss(lp, valid)
    close(loss, (1.0 + 2.0 + 4.0 + 0.5) / 4)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.where(valid, -0.25, 0.0))
    assert_metrics(metrics, {"num_tokens": 4.0})


def test_sft_no_valid_tokens_is_exactly_zero():
    lp = torch.tensor([[-1.0, -float("inf")]], requires_grad=True)
    loss, metrics = L.sft_loss(lp, torch.zeros(1, 2, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros(1, 2))
    assert float(metrics["num_tokens"]) == 0.0


def test_sft_gradcheck_and_argument_errors():
    lp = (-torch.rand(2, 4, dtype=torch.float64)).requires_grad_()
    valid = torch.tensor([[True, False, True, True], [False, False, True, False]])
    assert torch.autograd.gradcheck(lambda x: L.sft_loss(x, valid)[0], (lp,))
    with pytest.raises(TypeError, match="valid_mask"):
        L.sft_loss(lp, valid.float())
    with pytest.raises(ValueError, match="valid_mask"):
        L.sft_loss(lp, valid[:, :3])


# ------------------------------------------------------------------------------------------------ shared arguments
def test_dpo_argument_errors_name_the_argument():
    pc, pr, rc, rr = seq_batch(3, seed=16)
    with pytest.raises(ValueError, match="loss_type"):
        L.dpo_loss(pc, pr, rc, rr, loss_type="exo_pair")
    for beta in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta"):
            L.dpo_loss(pc, pr, rc, rr, beta=beta)
    for e in (0.5, -0.01, 0.7, float("nan")):
        with pytest.raises(ValueError, match="label_smoothing"):
            L.dpo_loss(pc, pr, rc, rr, label_smoothing=e)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.dpo_loss(pc, pr, rc, rr, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(TypeError, match="beta"):
        L.dpo_loss(pc, pr, rc, rr, beta="0.1")
    with pytest.raises(ValueError, match="ref_rejected"):
        L.dpo_loss(pc, pr, rc, rr[:2])
    with pytest.raises(ValueError, match="policy_chosen"):
        L.dpo_loss(pc[None], pr, rc, rr)
    with pytest.raises(TypeError, match="ref_chosen"):
        L.dpo_loss(pc, pr, rc.long(), rr)
    with pytest.raises(TypeError, match="policy_rejected"):
        L.dpo_loss(pc, pr.tolist(), rc, rr)
    with pytest.raises(ValueError, match="ref_chosen"):
        L.dpo_loss(pc, pr, rc.to("meta"), rr)
    with pytest.raises(ValueError, match="at least one"):
        L.dpo_loss(pc[:0], pr[:0], rc[:0], rr[:0])


@pytest.mark.parametrize("name", ["ref_chosen", "ref_rejected"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_dpo_rejects_non_finite_reference(name, bad):
    pc, pr, rc, rr = seq_batch(3, seed=17)
    refs = {"ref_chosen": rc.clone(), "ref_rejected": rr.clone()}
    refs[name][1] = bad
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        L.dpo_loss(pc, pr, refs["ref_chosen"], refs["ref_rejected"])
    with pytest.raises(ValueError, match="ref_logps must be finite"):
        L.npo_loss(pc, refs[name])


@pytest.mark.parametrize(
    "call",
    [
        lambda b: L.npo_loss(torch.zeros(2), torch.zeros(2), beta=b),
        lambda b: L.token_npo_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2, 2), beta=b),
        lambda b: L.masked_dpo_loss(*[torch.zeros(2)] * 4, beta=b),
        lambda b: L.kto_loss(*[torch.zeros(2)] * 4, beta=b),
    ],
)
def test_every_loss_rejects_non_positive_beta(call):
    with pytest.raises(ValueError, match="beta"):
        call(0.0)
    with pytest.raises(ValueError, match="beta"):
        call(-1.0)
