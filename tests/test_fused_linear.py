import types

import pytest
import torch

import allo_kernels as ak
from allo_kernels.ops import fused_linear as fl
from allo_kernels.ops import token_logprobs as logprob_op
from allo_kernels.ops.token_logprobs import token_logprobs_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Half-precision runs are judged against an fp32 reference of the same half inputs: the logits chunk itself is
# rounded to the half type, so the comparison allows that one rounding of O(1) logits.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
    torch.float16: dict(atol=6e-3, rtol=6e-3),
}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(logprob_op, "MAX_BLOCK_V", 64)


def make(dtype, lead=(13,), H=16, V=150, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*lead, H, generator=g) * 0.5).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, lead, generator=g)
    labels.view(-1)[:3] = -100
    return hidden, weight, b, labels


def leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def reference(hidden, weight, bias, labels, g, **kw):
    h, w, b = leaves(hidden.float(), weight.float(), None if bias is None else bias.float())
    z = h @ w.t() + (b if b is not None else 0)
    out = token_logprobs_reference(z, labels, **kw)
    out.backward(g)
    return out.detach(), h.grad, w.grad, (b.grad if b is not None else None)


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [1, 5, 64, None])
def test_matches_unfused(dtype, chunk_size, backend_name, backend):
    backend(backend_name)
    hidden, weight, bias, labels = make(dtype)
    g = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))
    h, w, b = leaves(hidden, weight, bias)
    out = ak.fused_linear_token_logprobs(h, w, labels, bias=b, chunk_size=chunk_size, temperature=0.9)
    out.backward(g)
    ref, gh, gw, gb = reference(hidden, weight, bias, labels, g, temperature=0.9)
    assert out.dtype == torch.float32
    assert h.grad.dtype == dtype and w.grad.dtype == dtype and b.grad.dtype == dtype
    torch.testing.assert_close(out.detach(), ref, **TOL[dtype])
    torch.testing.assert_close(h.grad.float(), gh, **TOL[dtype])
    torch.testing.assert_close(w.grad.float(), gw, **TOL[dtype])
    torch.testing.assert_close(b.grad.float(), gb, **TOL[dtype])


def test_3d_hidden_no_bias_odd_shapes(backend):
    backend("triton")
    hidden, weight, _, labels = make(torch.float32, lead=(2, 7), H=5, V=67, bias=False)
    g = torch.randn(2, 7)
    h, w = leaves(hidden, weight)
    out = ak.fused_linear_token_logprobs(h, w, labels, chunk_size=4)
    out.backward(g)
    ref, gh, gw, _ = reference(hidden, weight, None, labels, g)
    assert out.shape == (2, 7)
    torch.testing.assert_close(out.detach(), ref, **TOL[torch.float32])
    torch.testing.assert_close(h.grad, gh, **TOL[torch.float32])
    torch.testing.assert_close(w.grad, gw, **TOL[torch.float32])


def test_single_token_and_all_ignored(backend):
    backend("triton")
    hidden, weight, bias, _ = make(torch.float32, lead=(1,), V=10)
    h, w, b = leaves(hidden, weight, bias)
    out = ak.fused_linear_token_logprobs(h, w, torch.tensor([9]), bias=b)
    ref, _gh, gw, _gb = reference(hidden, weight, bias, torch.tensor([9]), torch.ones(1))
    out.sum().backward()
    torch.testing.assert_close(out.detach(), ref, **TOL[torch.float32])
    torch.testing.assert_close(w.grad, gw, **TOL[torch.float32])

    h, w, b = leaves(*make(torch.float32, lead=(6,))[:3])
    out = ak.fused_linear_token_logprobs(h, w, torch.full((6,), -100), bias=b, chunk_size=4)
    out.sum().backward()
    assert torch.equal(out.detach(), torch.zeros(6))
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0 and torch.count_nonzero(b.grad) == 0


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_fused_token_scores_matches_token_scores(backend_name, backend):
    backend(backend_name)
    hidden, weight, bias, labels = make(torch.float32, lead=(3, 8), H=12, V=90)
    ref_lp = torch.randn(3, 8)
    wts = torch.rand(3, 8)
    kw = dict(ref_logprobs=ref_lp, weights=wts, beta=0.3, mask_fraction=0.25, mask_by="lowest")
    h1, w1, b1 = leaves(hidden, weight, bias)
    s1 = ak.fused_linear_token_scores(h1, w1, labels, bias=b1, chunk_size=5, **kw)
    h2, w2, b2 = leaves(hidden, weight, bias)
    s2 = ak.token_scores(h2 @ w2.t() + b2, labels, **kw)
    assert torch.equal(s1.keep, s2.keep) and torch.equal(s1.masked, s2.masked)
    torch.testing.assert_close(s1.seq_logprobs.detach(), s2.seq_logprobs.detach(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(s1.seq_ref_logprobs, s2.seq_ref_logprobs)
    (s1.seq_logprobs.sum() + s1.logprobs.mean()).backward()
    (s2.seq_logprobs.sum() + s2.logprobs.mean()).backward()
    for a, b in ((h1, h2), (w1, w2), (b1, b2)):
        torch.testing.assert_close(a.grad, b.grad, atol=2e-5, rtol=2e-5)


class FakeZero3Param(torch.nn.Parameter):
    """Stands in for a DeepSpeed ZeRO-3 parameter: its local storage is empty until all_gather()."""


def make_zero3(full: torch.Tensor) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.empty(0, dtype=full.dtype))
    p.ds_shape = tuple(full.shape)
    p.ds_status = types.SimpleNamespace(name="NOT_AVAILABLE")
    p.gathers = 0

    def all_gather():
        p.data = full.clone()
        p.ds_status = types.SimpleNamespace(name="AVAILABLE")
        p.gathers += 1

    def partition():
        p.data = torch.empty(0, dtype=full.dtype)
        p.ds_status = types.SimpleNamespace(name="NOT_AVAILABLE")

    p.all_gather, p.partition = all_gather, partition
    return p


def test_zero3_partitioned_weight_is_gathered(backend):
    backend("triton")
    hidden, weight, bias, labels = make(torch.float32, V=40)
    w = make_zero3(weight)
    b = make_zero3(bias)
    h = hidden.clone().requires_grad_()
    out = ak.fused_linear_token_logprobs(h, w, labels, bias=b, chunk_size=4)
    assert w.numel() == 0  # released again after the forward
    g = torch.randn(labels.shape)
    out.backward(g)
    assert w.gathers == 2 and w.numel() == 0  # gathered for the forward and again for the backward
    ref, gh, gw, gb = reference(hidden, weight, bias, labels, g)
    torch.testing.assert_close(out.detach(), ref, **TOL[torch.float32])
    torch.testing.assert_close(h.grad, gh, **TOL[torch.float32])
    torch.testing.assert_close(w.grad, gw, **TOL[torch.float32])  # full-size grad, as ZeRO-3's hooks expect
    torch.testing.assert_close(b.grad, gb, **TOL[torch.float32])


def test_auto_chunk_size():
    assert fl.auto_chunk_size(10, 100, 8, torch.float32, torch.device("cpu")) == 10
    rows = fl.auto_chunk_size(10**6, 128256, 4096, torch.bfloat16, torch.device("cpu"))
    assert rows * fl.chunk_bytes_per_row(128256, torch.bfloat16, torch_path=True) <= fl.MAX_CHUNK_BYTES_CPU
    assert rows >= 128
    assert fl.auto_chunk_size(10**6, 1000, 64, torch.float32, torch.device("cpu")) % 128 == 0


def test_bad_inputs():
    hidden, weight, bias, labels = make(torch.float32)
    with pytest.raises(ValueError, match="hidden's last dimension must equal weight's second dimension 16"):
        ak.fused_linear_token_logprobs(hidden[:, :8], weight, labels)
    with pytest.raises(TypeError, match="share a dtype"):
        ak.fused_linear_token_logprobs(hidden.bfloat16(), weight, labels)
    with pytest.raises(ValueError, match="bias must have shape"):
        ak.fused_linear_token_logprobs(hidden, weight, labels, bias=bias[:5])
    with pytest.raises(ValueError, match="chunk_size"):
        ak.fused_linear_token_logprobs(hidden, weight, labels, chunk_size=0)
    for bad_budget in (-1, 1.5, True):
        with pytest.raises(ValueError, match=r"retain_logits_bytes must be an int >= 0 or None, got"):
            ak.fused_linear_token_logprobs(hidden, weight, labels, retain_logits_bytes=bad_budget)
    with pytest.raises(ValueError, match=r"weight must have 2 dimensions \[V, H\]"):
        ak.fused_linear_token_logprobs(hidden, weight[None], labels)
    bad = labels.clone()
    bad[4] = 150
    with pytest.raises(ValueError, match=r"labels must be in \[0, 150\)"):
        ak.fused_linear_token_logprobs(hidden, weight, bad)
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, H\]"):
        ak.fused_linear_token_scores(hidden, weight, labels)


@pytest.mark.gpu
def test_gpu_bf16_realistic():
    torch.manual_seed(0)
    hidden = (torch.randn(2, 256, 1024, device="cuda") * 0.3).bfloat16()
    weight = (torch.randn(32000, 1024, device="cuda") * 0.02).bfloat16()
    labels = torch.randint(0, 32000, (2, 256), device="cuda")
    h, w = leaves(hidden, weight)
    out = ak.fused_linear_token_logprobs(h, w, labels, chunk_size=100)
    g = torch.randn(2, 256, device="cuda")
    out.backward(g)
    ref, _gh, gw, _ = reference(hidden, weight, None, labels, g)
    torch.testing.assert_close(out.detach(), ref, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(w.grad.float(), gw, atol=5e-2, rtol=5e-2)


def test_zero3_partitioned_frozen_weight(backend):
    backend("triton")
    hidden, weight, _, labels = make(torch.float32, V=40)
    w = make_zero3(weight)
    w.requires_grad_(False)
    h = hidden.clone().requires_grad_()
    out = ak.fused_linear_token_logprobs(h, w, labels, chunk_size=4)
    g = torch.randn(labels.shape)
    out.backward(g)
    assert w.gathers == 2 and w.numel() == 0 and w.grad is None
    _, gh, _, _ = reference(hidden, weight, None, labels, g)
    torch.testing.assert_close(h.grad, gh, **TOL[torch.float32])


# ----------------------------------------------------------------------------- issue 11.14: ignored rows, huge logits
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_ignored_row_with_huge_logits_has_zero_gradient(backend_name, backend):
    backend(backend_name)
    # Row 1 is ignored and its logits (100) overflow exp(z - 0); it must contribute exactly nothing.
    h = torch.full((2, 1), 100.0, requires_grad=True)
    w = torch.ones(8, 1, requires_grad=True)
    b = torch.zeros(8, requires_grad=True)
    labels = torch.tensor([3, -100])
    out = ak.fused_linear_token_logprobs(h, w, labels, bias=b)
    out.sum().backward()
    ref, gh, gw, gb = reference(h.detach(), w.detach(), b.detach(), labels, torch.ones(2))
    torch.testing.assert_close(out.detach(), ref)
    for got, expect in ((h.grad, gh), (w.grad, gw), (b.grad, gb)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expect, **TOL[torch.float32])
    assert h.grad[1].item() == 0.0


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_scores_and_preference_loss_with_ignored_huge_logits(backend_name, backend):
    backend(backend_name)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 6, 5, generator=g)
    hidden[:, :2] = 60.0  # prompt rows: ignored, logits far beyond exp's range
    weight = torch.randn(30, 5, generator=g)
    labels = torch.randint(0, 30, (4, 6), generator=g)
    labels[:, :2] = -100
    ref = torch.where(labels != -100, torch.randn(4, 6, generator=g) - 3.0, 0.0)
    h1, w1 = leaves(hidden, weight)
    s = ak.fused_linear_token_scores(h1, w1, labels, ref_logprobs=ref, chunk_size=5)
    s.seq_logprobs.sum().backward()
    h2, w2 = leaves(hidden, weight)
    ak.token_scores(h2 @ w2.t(), labels, ref_logprobs=ref).seq_logprobs.sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, **TOL[torch.float32])
    torch.testing.assert_close(w1.grad, w2.grad, **TOL[torch.float32])

    h1, w1 = leaves(hidden, weight)
    ak.preference_loss(h1, labels, lm_head_weight=w1, ref_logprobs=ref, mask_fraction=0.5, chunk_size=5)[0].backward()
    h2, w2 = leaves(hidden, weight)
    ak.preference_loss(h2 @ w2.t(), labels, ref_logprobs=ref, mask_fraction=0.5)[0].backward()
    assert torch.isfinite(h1.grad).all() and torch.isfinite(w1.grad).all()
    torch.testing.assert_close(h1.grad, h2.grad, **TOL[torch.float32])
    torch.testing.assert_close(w1.grad, w2.grad, **TOL[torch.float32])


# --------------------------------------------------------------------------------------- issue 11.15: under autocast
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@pytest.mark.parametrize("backward_inside", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_autocast_matches_unfused_under_the_same_autocast(backend_name, backward_inside, bias, backend):
    backend(backend_name)
    hidden, weight, b, labels = make(torch.float32, lead=(2, 7), V=70, bias=bias)
    hidden = hidden * 4  # logits of std ~4: the bf16 rounding of the logits matters (the bug was 17-25% off)
    g = torch.randn(2, 7, generator=torch.Generator().manual_seed(2))
    h1, w1, b1 = leaves(hidden, weight, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ak.fused_linear_token_logprobs(h1, w1, labels, bias=b1, chunk_size=5)
        if backward_inside:
            out.backward(g)
    if not backward_inside:
        out.backward(g)
    h2, w2, b2 = leaves(hidden, weight, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = torch.nn.functional.linear(h2, w2, b2)  # an nn.Linear lm_head under autocast: bf16 logits
        expect = token_logprobs_reference(z, labels)
    expect.backward(g)
    assert z.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert h1.grad.dtype == w1.grad.dtype == torch.float32
    torch.testing.assert_close(out.detach(), expect.detach(), **TOL[torch.bfloat16])
    for got, want in ((h1, h2), (w1, w2)) + (((b1, b2),) if bias else ()):
        torch.testing.assert_close(got.grad, want.grad, **TOL[torch.bfloat16])


def test_autocast_accepts_mixed_input_dtypes(backend):
    backend("torch")
    hidden, weight, _, labels = make(torch.float32, V=40, bias=False)
    h = hidden.bfloat16().requires_grad_()  # e.g. a bf16 activation and an fp32 lm_head, as autocast leaves them
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ak.fused_linear_token_logprobs(h, w, labels)
    out.sum().backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    ref, gh, gw, _ = reference(h.detach(), w.detach().bfloat16(), None, labels, torch.ones(labels.shape))
    torch.testing.assert_close(out.detach(), ref, **TOL[torch.bfloat16])
    torch.testing.assert_close(h.grad.float(), gh, **TOL[torch.bfloat16])
    torch.testing.assert_close(w.grad, gw, **TOL[torch.bfloat16])


# ---------------------------------------------------------------------- issue 17: only the rows that count are computed
def todays_path(hidden, weight, bias, labels, g, *, chunk_size, temperature, ignore_index=-100):
    """The fp32 torch path as it was before rows were skipped (every row chunked and recomputed), frozen here as the
    oracle for 'values and gradients identical to today's path'."""
    n = hidden.shape[0]
    logp, lse = torch.zeros(n), torch.zeros(n)
    gh, gw, gb = torch.empty_like(hidden), torch.zeros(weight.shape), torch.zeros(bias.shape)
    valid = labels != ignore_index
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        x = torch.addmm(bias, hidden[s:e], weight.t()).float() / temperature
        lse[s:e] = torch.where(valid[s:e], torch.logsumexp(x, -1), 0.0)
        target = x.gather(-1, torch.where(valid[s:e], labels[s:e], 0)[:, None])[:, 0]
        logp[s:e] = torch.where(valid[s:e], target - lse[s:e], 0.0)
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        x = torch.addmm(bias, hidden[s:e], weight.t()).float() / temperature
        p = torch.exp(torch.where(valid[s:e, None], x - lse[s:e, None], float("-inf")))
        grad = -p
        grad[torch.arange(e - s), torch.where(valid[s:e], labels[s:e], 0)] += 1.0
        dz = grad * torch.where(valid[s:e], g[s:e] / temperature, 0.0)[:, None]
        torch.mm(dz, weight, out=gh[s:e])
        gw.addmm_(dz.t(), hidden[s:e])
        gb += dz.sum(0)
    return logp, gh, gw, gb


def sparse_batch(n=40, H=16, V=150, seed=0):
    """30% ignored rows (prompt/padding) and half of the valid rows with a zero upstream gradient (dropped tokens)."""
    hidden, weight, bias, labels = make(torch.float32, lead=(n,), H=H, V=V, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    labels[torch.rand(n, generator=gen) < 0.3] = -100
    g = torch.randn(n, generator=gen) * (torch.rand(n, generator=gen) < 0.5)
    return hidden, weight, bias, labels, g


def retain_rows(rows, V=150):
    """retain_logits_bytes for ``rows`` retained fp32 rows of V logits."""
    return None if rows is None else rows * V * 4


# Retained rows: none (every row recomputed), 10 (some kept, the rest recomputed), None (the default: all kept here).
RETAINED = [0, 10, None]


@pytest.mark.parametrize("retained", RETAINED)
@pytest.mark.parametrize("chunk_size", [3, 64, None])
def test_fp32_identical_to_todays_path(chunk_size, retained, backend):
    backend("torch")
    hidden, weight, bias, labels, g = sparse_batch()
    h, w, b = leaves(hidden, weight, bias)
    out = ak.fused_linear_token_logprobs(
        h, w, labels, bias=b, chunk_size=chunk_size, temperature=0.7, retain_logits_bytes=retain_rows(retained)
    )
    out.backward(g)
    expect = todays_path(hidden, weight, bias, labels, g, chunk_size=chunk_size or 40, temperature=0.7)
    for got, want in zip((out.detach(), h.grad, w.grad, b.grad), expect):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


def count_gemm_rows(monkeypatch):
    """Record the rows of every logits GEMM (forward and recompute) and every weight-gradient GEMM."""
    seen = {"logits": [], "weight_grad": []}
    linear, accumulate = fl._Chunks._linear, fl._accumulate_weight_grad

    def counting_linear(self, h, out):
        seen["logits"].append(h.shape[0])
        return linear(self, h, out)

    def counting_accumulate(acc, dz, h):
        seen["weight_grad"].append(h.shape[0])
        return accumulate(acc, dz, h)

    monkeypatch.setattr(fl._Chunks, "_linear", counting_linear)
    monkeypatch.setattr(fl, "_accumulate_weight_grad", counting_accumulate)
    return seen


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("retained", RETAINED)
def test_ignored_and_zero_gradient_rows_are_not_computed(backend_name, dtype, retained, backend, monkeypatch):
    backend(backend_name)
    hidden, weight, bias, labels, g = sparse_batch()
    hidden, weight, bias = hidden.to(dtype), weight.to(dtype), bias.to(dtype)
    seen = count_gemm_rows(monkeypatch)
    h, w, b = leaves(hidden, weight, bias)
    # The Triton path retains rows in the compute dtype: the same row count needs fewer bytes for bf16.
    per_row = 150 * (4 if backend_name == "torch" else hidden.element_size())
    budget = None if retained is None else retained * per_row
    out = ak.fused_linear_token_logprobs(h, w, labels, bias=b, chunk_size=6, retain_logits_bytes=budget)
    valid_rows = (labels != -100).nonzero()[:, 0]
    n_valid = len(valid_rows)
    assert sum(seen["logits"]) == n_valid and max(seen["logits"]) == 6
    out.backward(g)
    active = (labels != -100) & (g != 0)
    n_active = int(active.sum())
    kept_rows = valid_rows[: n_valid if retained is None else retained]  # the first valid rows: not recomputed
    n_kept = int(active[kept_rows].sum())
    assert 0 < n_active < n_valid and (retained != 10 or 0 < n_kept < len(kept_rows))
    assert sum(seen["logits"]) == n_valid + n_active - n_kept and sum(seen["weight_grad"]) == n_active
    ref, gh, gw, gb = reference(hidden, weight, bias, labels, g)
    torch.testing.assert_close(out.detach(), ref, **TOL[dtype])
    torch.testing.assert_close(h.grad.float(), gh, **TOL[dtype])
    torch.testing.assert_close(w.grad.float(), gw, **TOL[dtype])
    torch.testing.assert_close(b.grad.float(), gb, **TOL[dtype])
    skipped = (labels == -100) | (g == 0)
    assert torch.count_nonzero(h.grad[skipped]) == 0


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_zero_upstream_gradient_does_no_backward_work(backend_name, backend, monkeypatch):
    backend(backend_name)
    hidden, weight, bias, labels, _ = sparse_batch()
    seen = count_gemm_rows(monkeypatch)
    h, w, b = leaves(hidden, weight, bias)
    out = ak.fused_linear_token_logprobs(h, w, labels, bias=b, chunk_size=8)
    before = sum(seen["logits"])
    out.backward(torch.zeros_like(out))
    assert sum(seen["logits"]) == before and not seen["weight_grad"]
    assert not h.grad.any() and not w.grad.any() and not b.grad.any()


def test_native_half_gemm_path(backend, monkeypatch):
    """CPUs with oneDNN half GEMMs take the half GEMM branch of the torch path; run it here too (tiny, slow GEMMs)."""
    backend("torch")
    monkeypatch.setattr(fl, "native_half_gemm", lambda dtype, device: True)
    hidden, weight, bias, labels, g = sparse_batch(n=12, V=70)
    hidden, weight, bias = hidden.bfloat16(), weight.bfloat16(), bias.bfloat16()
    h, w, b = leaves(hidden, weight, bias)
    out = ak.fused_linear_token_logprobs(h, w, labels, bias=b, chunk_size=5)
    out.backward(g)
    ref, gh, gw, gb = reference(hidden, weight, bias, labels, g)
    torch.testing.assert_close(out.detach(), ref, **TOL[torch.bfloat16])
    for got, want in ((h.grad, gh), (w.grad, gw), (b.grad, gb)):
        torch.testing.assert_close(got.float(), want, **TOL[torch.bfloat16])


class RecordShapes(torch.utils._python_dispatch.TorchDispatchMode):
    """Every aten op run inside, with the shapes of the tensors it returned."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.ops.append((str(func), [tuple(t.shape) for t in outs if isinstance(t, torch.Tensor)]))
        return out


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@pytest.mark.parametrize("trainable", [False, True])
def test_frozen_weight_has_no_weight_gradient_gemm_or_accumulator(backend_name, trainable, backend):
    backend(backend_name)
    V, H = 150, 16
    hidden, weight, _, labels, g = sparse_batch(V=V, H=H)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_(trainable)
    out = ak.fused_linear_token_logprobs(h, w, labels, chunk_size=8)
    with RecordShapes() as rec:
        out.backward(g)
    weight_sized = [op for op, shapes in rec.ops if (V, H) in shapes]
    if trainable:
        assert weight_sized  # the accumulator and its GEMMs: what the frozen case must not have
    else:
        assert weight_sized == [] and w.grad is None
    _, gh, _, _ = reference(hidden, weight, None, labels, g)
    torch.testing.assert_close(h.grad, gh, **TOL[torch.float32])


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_retained_rows_are_not_recomputed(backend_name, backend, monkeypatch):
    backend(backend_name)
    hidden, weight, bias, labels = make(torch.float32, lead=(13,))  # 10 valid rows
    g = torch.randn(13, generator=torch.Generator().manual_seed(4))
    seen = count_gemm_rows(monkeypatch)
    buffers = []
    init = fl._Chunks.__init__

    def recording_init(self, *a):
        init(self, *a)
        buffers.append(self.logits_buf.shape[0])

    monkeypatch.setattr(fl._Chunks, "__init__", recording_init)
    h, w, b = leaves(hidden, weight, bias)
    out = ak.fused_linear_token_logprobs(h, w, labels, bias=b, chunk_size=4, retain_logits_bytes=retain_rows(6))
    out.backward(g, retain_graph=True)
    # forward: the 4 rows not retained, then the 6 retained in chunks of 4 and 2; backward: only the 4 recomputed
    assert seen["logits"] == [4, 4, 2, 4] and sum(seen["weight_grad"]) == 10
    assert buffers == [6]  # one buffer per call, shared by the forward and the backward: max(retained, chunk) rows
    ref, gh, gw, gb = reference(hidden, weight, bias, labels, g)
    torch.testing.assert_close(out.detach(), ref, **TOL[torch.float32])
    for got, want in ((h.grad, gh), (w.grad, gw), (b.grad, gb)):
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    out.backward(g)  # a second backward recomputes every chunk (the retained ones were consumed), gets the same
    assert seen["logits"][4:] == [4, 4, 2] and buffers == [6, 4]
    for got, want in ((h.grad, gh), (w.grad, gw), (b.grad, gb)):
        torch.testing.assert_close(got, 2 * want, **TOL[torch.float32])
    with torch.no_grad():  # nothing to retain without a backward
        ak.fused_linear_token_logprobs(h, w, labels, bias=b, chunk_size=4, retain_logits_bytes=retain_rows(6))
    assert buffers[2:] == [4]


@pytest.mark.parametrize(
    ("memory", "want"),
    [(24 << 30, 768 << 20), (12 << 30, 768 << 20), (8 << 30, 512 << 20), (2 << 30, 256 << 20), (None, 256 << 20)],
)
def test_default_retention_budget_on_cpu(memory, want, monkeypatch):
    """768 MiB (MAX_RETAIN_BYTES_CPU), or 1/16 of a smaller machine's memory, never below the 256 MiB chunk budget
    (nor where the memory is unknown)."""
    monkeypatch.setattr(fl, "cpu_memory_bytes", lambda: memory)
    assert fl.retain_budget_bytes(torch.device("cpu")) == want
    assert fl.MAX_RETAIN_BYTES_CPU == 768 << 20 and fl.chunk_budget_bytes(torch.device("cpu")) == 256 << 20


def test_default_retention_budget_on_cuda(monkeypatch):
    """The chunk budget, min(1 GiB, free / 8), whatever the host's memory."""
    monkeypatch.setattr(fl, "cpu_memory_bytes", lambda: 1 << 40)
    for free, want in ((80 << 30, 1 << 30), (2 << 30, 256 << 20)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 80 << 30))
        assert fl.retain_budget_bytes(torch.device("cuda")) == want


@pytest.mark.parametrize(
    ("files", "want_gib"),
    [
        ({}, 16),  # no cgroup files: physical memory
        ({"/sys/fs/cgroup/memory.max": "max\n"}, 16),  # cgroup v2 without a limit
        ({"/sys/fs/cgroup/memory.max": f"{4 << 30}\n"}, 4),  # cgroup v2 limit
        ({"/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n"}, 16),  # cgroup v1, unlimited
        ({"/sys/fs/cgroup/memory/memory.limit_in_bytes": f"{2 << 30}\n"}, 2),  # cgroup v1 limit
    ],
)
def test_cpu_memory_is_physical_or_the_cgroup_limit(files, want_gib, monkeypatch):
    import io

    def fake_open(path, *a, **k):
        if path not in files:
            raise FileNotFoundError(path)
        return io.StringIO(files[path])

    pages = {"SC_PHYS_PAGES": 4 << 20, "SC_PAGE_SIZE": 4096}  # 16 GiB
    monkeypatch.setattr(fl.os, "sysconf", lambda name: pages[name])
    monkeypatch.setattr(fl, "open", fake_open, raising=False)
    fl.cpu_memory_bytes.cache_clear()
    try:
        assert fl.cpu_memory_bytes() == want_gib << 30
    finally:
        fl.cpu_memory_bytes.cache_clear()


def test_compact_rows_in_place_across_blocks(monkeypatch):
    monkeypatch.setattr(fl, "_COMPACT_BLOCK_ROWS", 2)
    x = torch.arange(40.0).reshape(10, 4)
    keep = torch.tensor([1, 2, 5, 6, 7, 9])
    expect = x[keep].clone()
    fl._compact_rows(x, keep)
    assert torch.equal(x[:6], expect)


@pytest.mark.parametrize(
    ("retained", "gemm_rows", "buffer_rows"),
    [(0, [7, 3, 7, 3], 7), (3, [7, 3, 7], 7), (8, [2, 7, 1, 2], 8), (None, [1, 7, 2, 1], 9)],
)
def test_retention_budget_plans_the_chunks(retained, gemm_rows, buffer_rows, backend, monkeypatch):
    """Auto chunks of 7 rows (the chunk budget), the retained rows on top; the buffer is max(retained, chunk) rows.
    The default (None) retains the CPU retention budget, here 9 rows: only the last valid row is recomputed."""
    backend("torch")
    hidden, weight, bias, labels = make(torch.float32, lead=(13,))  # 10 valid rows, V=150
    monkeypatch.setattr(fl, "MAX_CHUNK_BYTES_CPU", 7 * 150 * 4)
    monkeypatch.setattr(fl, "MAX_RETAIN_BYTES_CPU", 9 * 150 * 4)
    seen = count_gemm_rows(monkeypatch)
    buffers = []
    init = fl._Chunks.__init__
    monkeypatch.setattr(fl._Chunks, "__init__", lambda self, *a: init(self, *a) or buffers.append(self.logits_buf))
    h, w, b = leaves(hidden, weight, bias)
    out = ak.fused_linear_token_logprobs(h, w, labels, bias=b, retain_logits_bytes=retain_rows(retained))
    out.sum().backward()
    assert seen["logits"] == gemm_rows and buffers[0].shape == (buffer_rows, 150)
    _, gh, gw, gb = reference(hidden, weight, bias, labels, torch.ones(13))
    for got, want in ((h.grad, gh), (w.grad, gw), (b.grad, gb)):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_partly_retained_matches_unfused(backend_name, dtype, backend):
    """Some rows retained, the others recomputed, with a temperature, in every dtype on both paths."""
    backend(backend_name)
    hidden, weight, bias, labels = make(dtype, lead=(21,))
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(21, generator=gen) * (torch.rand(21, generator=gen) < 0.7)
    h, w, b = leaves(hidden, weight, bias)
    out = ak.fused_linear_token_logprobs(
        h, w, labels, bias=b, chunk_size=4, temperature=1.3, retain_logits_bytes=9 * 150 * 4
    )
    out.backward(g)
    ref, gh, gw, gb = reference(hidden, weight, bias, labels, g, temperature=1.3)
    torch.testing.assert_close(out.detach(), ref, **TOL[dtype])
    for got, want in ((h.grad, gh), (w.grad, gw), (b.grad, gb)):
        torch.testing.assert_close(got.float(), want, **TOL[dtype])
