"""The baselines the benchmarks time compute the same thing as our implementations (apples to apples).

Each baseline written in ``benchmarks/`` (the official-ALLO-style eager paths, the eager HF/TRL path, MaskAdamW_HF) is
checked on tiny CPU inputs against ``allo_kernels``: same loss (and gradients), same optimizer update. The official
improving stage keeps ``int(eps * T)`` tokens per row where ``token_scores`` keeps ``ceil(eps * n)`` of the ``n``
valid ones; the inputs here make the two counts coincide (no padding, ``eps * T`` an integer, no ties).
"""

import pytest
import torch

import allo_kernels as ak
from allo_kernels.ops.token_logprobs import token_logprobs_reference
from benchmarks import bench_e2e, bench_fused_linear, bench_token_scores


@pytest.fixture(autouse=True)
def torch_backend(backend):
    backend("torch")  # the baselines are what is under test; the kernels have their own tests


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def test_official_token_scores_baseline_equals_token_scores():
    g = torch.Generator().manual_seed(0)
    B, T, V, eps = 3, 20, 50, 0.1  # keeps int(0.1 * 20) = 2 = 20 - floor(0.9 * 20) tokens per row
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float32)
    labels = torch.randint(0, V, (B, T), generator=g)
    ref = torch.randn(B, T, generator=g, dtype=torch.float32) - 4.0
    weights = torch.rand(B, T, generator=g, dtype=torch.float32)

    lg_off = logits.clone().requires_grad_()
    seq_off, ref_off, mask = bench_token_scores.official_eager_scores(lg_off, labels, ref, weights, eps=eps)
    lg = logits.clone().requires_grad_()
    seq, s = bench_token_scores.allo_scores(lg, labels, ref, weights, mask_fraction=1.0 - eps)

    assert mask.sum(-1).tolist() == [2.0] * B
    assert torch.equal(mask.bool(), s.keep)
    torch.testing.assert_close(seq, seq_off)
    torch.testing.assert_close(s.seq_ref_logprobs, ref_off)
    for a, b in zip(_grads(seq.sum(), lg), _grads(seq_off.sum(), lg_off)):
        torch.testing.assert_close(a, b)


def test_official_gen_mask_treats_exact_zeros_as_padding():
    ratios = torch.tensor([[0.0, -3.0, -1.0, 0.0, -2.0, 0.5, -0.5, 0.0, 1.0, 2.0]])
    mask = bench_e2e.official_gen_mask(0.3, ratios, -1)  # int(10 * 0.3) = 3 lowest, zeros never chosen
    assert mask.tolist() == [[0, 1, 1, 0, 1, 0, 0, 0, 0, 0]]
    assert torch.equal(bench_token_scores.official_gen_mask(ratios, 0.3), mask)


def _lm_batch(rows=4, T=11, H=16, V=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, T, H, generator=g, dtype=torch.float32)
    weight = torch.randn(V, H, generator=g, dtype=torch.float32) * 0.3
    labels = torch.randint(0, V, (rows, T), generator=g)
    ref = torch.randn(rows, T - 1, generator=g, dtype=torch.float32) - 3.5
    return hidden, weight, labels, ref


def test_official_improve_loss_equals_preference_loss():
    # T - 1 = 10 shifted positions, all valid: official keeps int(0.1 * 10) = 1, token_scores 10 - floor(0.9 * 10) = 1
    hidden, weight, labels, ref = _lm_batch()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    official = bench_e2e.official_improve_loss(h1 @ w1.t(), labels, ref)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = bench_e2e.allo_improve_loss(h2, w2, labels, ref)
    torch.testing.assert_close(ours, official)
    for a, b in zip(_grads(ours, h2, w2), _grads(official, h1, w1)):
        torch.testing.assert_close(a, b)


def test_official_forget_loss_equals_forgetting_loss():
    hidden, weight, labels, ref = _lm_batch(seed=2)
    labels[:, :3] = -100  # prompt
    valid = labels[:, 1:] != -100
    g = torch.Generator().manual_seed(3)
    reward = torch.where(valid, torch.rand(valid.shape, generator=g, dtype=torch.float32), 0.0)
    reward[0, 4] = 0.0  # a response token without reward does not count
    ref = torch.where(valid, ref, 0.0)
    h1 = hidden.clone().requires_grad_()
    official = bench_e2e.official_forget_loss(h1 @ weight.t(), labels, ref, reward)
    h2 = hidden.clone().requires_grad_()
    ours = bench_e2e.allo_forget_loss(h2, weight, labels, ref, reward)
    torch.testing.assert_close(ours, official)
    torch.testing.assert_close(_grads(ours, h2)[0], _grads(official, h1)[0])


def test_eager_hf_dpo_and_liger_setup_equal_preference_loss():
    hidden, weight, labels, _ = _lm_batch(seed=4)
    labels[:, :2] = -100
    g = torch.Generator().manual_seed(5)
    ref = torch.where(labels != -100, torch.randn(labels.shape, generator=g, dtype=torch.float32) - 3.0, 0.0)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    eager = bench_fused_linear.eager_hf_dpo(h1, w1, labels, ref)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused = bench_fused_linear.allo_dpo(h2, w2, labels, ref)
    h3, w3 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    unfused = bench_fused_linear.unfused_dpo(h3, w3, labels, ref)
    torch.testing.assert_close(fused, eager)
    torch.testing.assert_close(unfused, eager)
    for a, b in zip(_grads(fused, h2, w2), _grads(eager, h1, w1)):
        torch.testing.assert_close(a, b)


def test_eager_ce_equals_fused_sft():
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(30, 12, generator=g, dtype=torch.float32)
    weight = torch.randn(50, 12, generator=g, dtype=torch.float32) * 0.3
    labels = torch.randint(0, 50, (30,), generator=g)
    labels[::7] = -100
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    eager = bench_fused_linear.eager_ce(h1, w1, labels)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = bench_fused_linear.allo_ce(h2, w2, labels)
    torch.testing.assert_close(ours, eager)
    torch.testing.assert_close(bench_fused_linear.unfused_ce(hidden, weight, labels), eager)
    h3, w3 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused_ce = bench_fused_linear.allo_fused_ce(h3, w3, labels)
    torch.testing.assert_close(fused_ce, eager)
    want = _grads(eager, h1, w1)
    for a, b, c in zip(_grads(ours, h2, w2), _grads(fused_ce, h3, w3), want):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_official_mask_adamw_matches_sparse_adamw_on_selected_rows(dtype):
    g = torch.Generator().manual_seed(7)
    shapes = [(12, 5), (9, 3, 2)]
    init = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    row_masks = [torch.rand(s[0], generator=g) < 0.4 for s in shapes]
    row_masks[0][0] = True
    grads = [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(2)]
    master = dtype != torch.float32

    ours = [p.clone() for p in init]
    theirs = [p.clone() for p in init]
    # eps = 0: the official HF-style update (bias correction folded into the step size, denom = sqrt(v) + eps) equals
    # torch's AdamW (denom = sqrt(v) / sqrt(1 - b2^t) + eps) exactly in real arithmetic only without eps; with eps they
    # differ by eps's placement (up to ~1e-3 relative for gradients near eps / sqrt(1 - b2)), a deliberate difference
    opt_ours = ak.SparseAdamW(ours, lr=1e-2, eps=0.0, masks=dict(zip(ours, row_masks)), master_weights=master)
    opt_off = bench_e2e.OfficialMaskAdamW(
        theirs, lr=1e-2, eps=0.0, masks=dict(zip(theirs, row_masks)), master_weights=master
    )
    for step_grads in grads:
        for a, b, gr in zip(ours, theirs, step_grads):
            a.grad, b.grad = gr.clone(), gr.clone()
        opt_ours.step()
        opt_off.step()

    for p0, a, b, m in zip(init, ours, theirs, row_masks):
        assert torch.equal(b[~m], p0[~m]), "official-style MaskAdamW wrote unselected rows"
        assert torch.equal(a[~m], p0[~m])
        assert not torch.equal(b[m], p0[m])
        # bf16 params: the rounding of fp32 masters that agree to ~1e-7 can still land one bf16 ulp apart
        tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=8e-3, atol=0)
        torch.testing.assert_close(a[m], b[m], **tol)
    if master:  # the fp32 master rows agree too (the bf16 params are their rounding)
        for a, b, m in zip(ours, theirs, row_masks):
            compact = opt_ours.state[a]["master"].reshape(-1)  # [k, C] rows of the selected rows
            torch.testing.assert_close(compact, opt_off.state[b]["master"][m].reshape(-1), rtol=1e-6, atol=1e-7)
    # dense state for the baseline, compact for ours
    assert opt_off.state[theirs[0]]["exp_avg"].shape == shapes[0]
    assert opt_ours.state[ours[0]]["exp_avg"].shape[0] == int(row_masks[0].sum())


def test_e2e_steps_run_on_a_tiny_llama():
    """Both e2e step implementations train the same masked rows of the tiny Llama and nothing else."""
    spec = bench_e2e.ModelSpec(
        hidden=32, layers=1, heads=2, intermediate=64, vocab=0, seq_len=16, pairs=1, dtype=torch.float32
    )
    model = bench_e2e.get_model(spec)
    vocab = model.config.vocab_size
    for case in bench_e2e.CASES:
        for impl in bench_e2e.IMPLS:
            masks = bench_e2e.trainable_masks(model)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            step, _ = bench_e2e.make_step(impl, case, model, masks, bench_e2e.make_batch(spec, vocab, case))
            assert torch.isfinite(step())
            mask_by_param = {id(p): m for p, m in masks.items()}
            for name, p in model.named_parameters():
                m = mask_by_param.get(id(p))
                if m is None:
                    assert torch.equal(p, before[name]), f"{impl}/{case}: frozen {name} changed"
                else:
                    assert torch.equal(p[~m], before[name][~m]), f"{impl}/{case}: unselected rows of {name} changed"
                    assert not torch.equal(p[m], before[name][m]), f"{impl}/{case}: selected rows of {name} unchanged"
    bench_e2e._MODEL.clear()


def test_official_logprobs_match_reference():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 6, 30, generator=g)
    labels = torch.randint(0, 30, (2, 6), generator=g)
    labels[0, 0] = -100
    got = bench_token_scores.official_token_logprobs(logits, labels)
    torch.testing.assert_close(got, token_logprobs_reference(logits, labels))


def test_sparse_adamw_paired_speedup_and_standalone_table(tmp_path):
    import json

    from benchmarks import bench_sparse_adamw as bsa

    got = bsa.paired_speedup([2.0, 4.0, 9.0], [1.0, 1.0, 3.0])  # per-round ratios 2, 4, 3
    assert got["median"] == 3.0 and got["rounds"] == 3
    assert 2.0 <= got["p10"] <= got["median"] <= got["p90"] <= 4.0

    out = tmp_path / "t.json"
    bsa.main(["--rows", "64", "--cols", "32", "--rounds", "3", "--no-deepspeed", "--json", str(out)])
    report = json.loads(out.read_text())
    impls = {(r["impl"], r["row_fraction"]) for r in report["results"] if "error" not in r}
    assert ("torch_adamw_fused", 1.0) in impls and ("allo_native", 0.1) in impls
    paired = report["speedups_paired"]["vs_torch_adamw_fused@10pct"]
    assert paired["rounds"] == 3 and paired["p10"] <= paired["median"] <= paired["p90"]
    assert report["shapes"] == [[64, 32]] * 4 and report["native_isa"] == bsa._native.isa()
    # state is kept for the selected rows only: 10 % of 64 rows -> 6 rows x 32 cols x (exp_avg, exp_avg_sq) x 4 tensors
    row = next(r for r in report["results"] if r["impl"] == "allo_native" and r["row_fraction"] == 0.1)
    assert row["state_bytes"] == 4 * 6 * 32 * 2 * 4


def test_fused_linear_retain_contender_names():
    assert bench_fused_linear.retain_option("allo_retain512") == {"retain_logits_bytes": 512 << 20}
    assert bench_fused_linear.retain_option("allo") == {}
    with pytest.raises(ValueError, match=r"contender 'allo_retainx': expected allo_retain<MiB>"):
        bench_fused_linear.retain_option("allo_retainx")
