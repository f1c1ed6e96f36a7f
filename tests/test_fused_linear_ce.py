"""fused_linear_cross_entropy: the SFT loss with its gradients made in the forward, against the token op + sft_loss
(today's path, fp32 <= 1e-6 relative) and an unfused fp32 reference, on both paths and in every dtype."""

import pytest
import torch
from test_fused_linear import TOL, RecordShapes, count_gemm_rows, leaves, make, make_zero3

import allo_kernels as ak


def token_path(hidden, weight, bias, labels, scale=1.0, reduction="mean", **kw):
    """Today's path: per-token fused-linear log-probs, then sft_loss (or their sum); loss * scale backpropagated."""
    h, w, b = leaves(hidden, weight, bias)
    logp = ak.fused_linear_token_logprobs(h, w, labels, bias=b, **kw)
    valid = labels != -100
    loss = ak.losses.sft_loss(logp, valid)[0] if reduction == "mean" else -logp.sum()
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


def unfused_fp32(hidden, weight, bias, labels, scale=1.0, temperature=1.0):
    h, w, b = leaves(hidden.float(), weight.float(), None if bias is None else bias.float())
    z = h @ w.t() + (0 if b is None else b)
    loss = torch.nn.functional.cross_entropy((z / temperature).flatten(0, -2), labels.flatten(), ignore_index=-100)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


def close_fp32(got, want):
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@pytest.mark.parametrize("chunk_size", [1, 4, None])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("scale", [1.0, -2.5])
def test_fp32_matches_the_token_op_and_sft_loss(backend_name, chunk_size, reduction, scale, backend):
    backend(backend_name)
    hidden, weight, bias, labels = make(torch.float32, lead=(3, 7), V=150)  # V not a multiple of the block (64)
    h, w, b = leaves(hidden, weight, bias)
    loss = ak.fused_linear_cross_entropy(
        h, w, labels, bias=b, chunk_size=chunk_size, temperature=0.7, reduction=reduction
    )
    (loss * scale).backward()
    want = token_path(hidden, weight, bias, labels, scale, reduction, chunk_size=chunk_size, temperature=0.7)
    assert loss.dtype == torch.float32 and loss.shape == ()
    for got, expect in zip((loss.detach(), h.grad, w.grad, b.grad), want):
        close_fp32(got, expect)
    if scale == 1.0:  # the same upstream gradients in the same order: the gradients agree bit for bit
        for got, expect in zip((h.grad, w.grad, b.grad), want[1:]):
            assert torch.equal(got, expect)


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_unfused_fp32_reference(backend_name, dtype, backend):
    backend(backend_name)
    hidden, weight, bias, labels = make(dtype, lead=(13,))
    h, w, b = leaves(hidden, weight, bias)
    loss = ak.fused_linear_cross_entropy(h, w, labels, bias=b, chunk_size=5, temperature=0.9)
    (loss * 3.0).backward()
    want = unfused_fp32(hidden, weight, bias, labels, 3.0, temperature=0.9)
    assert h.grad.dtype == w.grad.dtype == b.grad.dtype == dtype
    for got, expect in zip((loss.detach(), h.grad, w.grad, b.grad), want):
        torch.testing.assert_close(got.float(), expect, **TOL[dtype])


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_no_backward_gemm_and_three_gemms_per_valid_row(backend_name, backend, monkeypatch):
    backend(backend_name)
    hidden, weight, bias, labels = make(torch.float32, lead=(13,))  # 10 valid rows
    seen = count_gemm_rows(monkeypatch)
    h, w, b = leaves(hidden, weight, bias)
    loss = ak.fused_linear_cross_entropy(h, w, labels, bias=b, chunk_size=4)
    assert seen == {"logits": [4, 4, 2], "weight_grad": [4, 4, 2]}  # every valid row once, in the forward
    with RecordShapes() as rec:
        loss.backward()
    assert not [op for op, _ in rec.ops if "mm" in op]  # the backward only hands the gradients over
    for got, expect in zip((h.grad, w.grad, b.grad), unfused_fp32(hidden, weight, bias, labels)[1:]):
        torch.testing.assert_close(got, expect, **TOL[torch.float32])


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@pytest.mark.parametrize("trainable", [False, True])
def test_frozen_weight_and_hidden_without_grad_get_no_gemm_or_buffer(backend_name, trainable, backend):
    backend(backend_name)
    V, H = 150, 16
    hidden, weight, _, labels = make(torch.float32, lead=(20,), H=H, V=V, bias=False)
    h = hidden.clone().requires_grad_(not trainable)  # frozen weight with a hidden gradient, or the reverse
    w = weight.clone().requires_grad_(trainable)
    with RecordShapes() as rec:
        loss = ak.fused_linear_cross_entropy(h, w, labels, chunk_size=8)
        loss.backward()
    weight_sized = [op for op, shapes in rec.ops if (V, H) in shapes]
    hidden_grad_gemms = [op for op, shapes in rec.ops if "mm" in op and (8, H) in shapes]
    want = unfused_fp32(hidden, weight, None, labels)
    if trainable:
        assert weight_sized and not hidden_grad_gemms and h.grad is None
        torch.testing.assert_close(w.grad, want[2], **TOL[torch.float32])
    else:
        assert weight_sized == [] and hidden_grad_gemms and w.grad is None
        torch.testing.assert_close(h.grad, want[1], **TOL[torch.float32])


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_no_gradient_work_without_grad_mode(backend_name, backend, monkeypatch):
    backend(backend_name)
    hidden, weight, bias, labels = make(torch.float32, lead=(13,))
    h, w, b = leaves(hidden, weight, bias)
    seen = count_gemm_rows(monkeypatch)
    with torch.no_grad():
        loss = ak.fused_linear_cross_entropy(h, w, labels, bias=b, chunk_size=4)
    assert seen == {"logits": [4, 4, 2], "weight_grad": []} and not loss.requires_grad
    close_fp32(loss, unfused_fp32(hidden, weight, bias, labels)[0])


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_single_token_all_ignored_and_large_logits(backend_name, backend):
    backend(backend_name)
    hidden, weight, bias, _ = make(torch.float32, lead=(6,))
    h, w, b = leaves(hidden, weight, bias)
    ak.fused_linear_cross_entropy(h, w, torch.full((6,), -100), bias=b).backward()  # no valid token: 0, zero grads
    for grad in (h.grad, w.grad, b.grad):
        assert torch.count_nonzero(grad) == 0
    labels = torch.full((6,), -100)
    labels[4] = 7
    big = hidden * 1e3  # logits ~1e4: log_softmax must not overflow
    for lab, hid in ((labels, hidden), (torch.randint(0, 150, (6,)), big)):
        h, w, b = leaves(hid, weight, bias)
        loss = ak.fused_linear_cross_entropy(h, w, lab, bias=b, chunk_size=4)
        loss.backward()
        want = unfused_fp32(hid, weight, bias, lab)
        assert torch.isfinite(loss)
        for got, expect in zip((loss.detach(), h.grad, w.grad, b.grad), want):
            torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5 * max(1.0, expect.abs().max().item()))


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_strided_hidden_and_autocast_match_the_token_op(backend_name, backend):
    backend(backend_name)
    hidden, weight, bias, labels = make(torch.float32, lead=(2, 9), V=150)
    wide = torch.cat([hidden, hidden], dim=-1)[..., ::2]  # rows not contiguous in memory
    h, w, b = leaves(wide, weight, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ak.fused_linear_cross_entropy(h, w, labels, bias=b, chunk_size=5)
    loss.backward()
    h2, w2, b2 = leaves(wide, weight, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ak.losses.sft_loss(ak.fused_linear_token_logprobs(h2, w2, labels, bias=b2, chunk_size=5), labels != -100)
    want[0].backward()
    for got, expect in ((loss, want[0]), (h.grad, h2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(got.detach(), expect.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
@pytest.mark.parametrize("autocast", [False, True])
def test_fp16_takes_the_token_ops_path(backend_name, autocast, backend):
    """fp16 training scales the loss so that dZ survives rounding to fp16; dZ made in the forward would not have the
    scale yet, so fp16 runs the token op (its backward gets the scale): the same gradients bit for bit."""
    backend(backend_name)
    hidden, weight, bias, labels = make(torch.float32 if autocast else torch.float16, lead=(3, 9))
    got, want = leaves(hidden, weight, bias), leaves(hidden, weight, bias)
    with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
        loss = ak.fused_linear_cross_entropy(*got[:2], labels, bias=got[2], chunk_size=4)
        logp = ak.fused_linear_token_logprobs(*want[:2], labels, bias=want[2], chunk_size=4)
        expect = ak.losses.sft_loss(logp, labels != -100)[0]
    (loss * 2.0**16).backward()
    (expect * 2.0**16).backward()
    assert torch.equal(loss.detach(), expect.detach())
    for a, b in zip(got, want):
        assert torch.equal(a.grad, b.grad)
    reference = unfused_fp32(hidden.half(), weight.half(), bias.half(), labels, 2.0**16)
    torch.testing.assert_close(loss.detach(), reference[0], **TOL[torch.float16])


def test_zero3_partitioned_weight_is_gathered_for_the_forward(backend):
    backend("triton")
    hidden, weight, bias, labels = make(torch.float32, V=40)
    w, b = make_zero3(weight), make_zero3(bias)
    h = hidden.clone().requires_grad_()
    loss = ak.fused_linear_cross_entropy(h, w, labels, bias=b, chunk_size=4)
    assert w.numel() == 0 and w.gathers == 1  # released again after the forward
    loss.backward()
    # gathered again for the backward only so that autograd sees the full parameter; released by the hook
    assert w.gathers == 2 and w.numel() == 0
    want = unfused_fp32(hidden, weight, bias, labels)
    for got, expect in zip((loss.detach(), h.grad, w.grad, b.grad), want):
        torch.testing.assert_close(got, expect, **TOL[torch.float32])


def test_a_second_backward_through_the_graph_is_an_error(backend):
    backend("torch")
    h, w, b = leaves(*make(torch.float32)[:3])
    labels = make(torch.float32)[3]
    loss = ak.fused_linear_cross_entropy(h, w, labels, bias=b)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"fused_linear_cross_entropy.*already handed"):
        loss.backward()


def test_bad_inputs_name_the_argument():
    hidden, weight, bias, labels = make(torch.float32)
    with pytest.raises(ValueError, match=r"reduction must be one of .*'none'"):
        ak.fused_linear_cross_entropy(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="hidden's last dimension"):
        ak.fused_linear_cross_entropy(hidden[:, :3], weight, labels)
    with pytest.raises(ValueError, match="chunk_size"):
        ak.fused_linear_cross_entropy(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="labels"):
        ak.fused_linear_cross_entropy(hidden, weight, torch.full_like(labels, 150))
    with pytest.raises(TypeError, match=r"takes 3 positional"):
        ak.fused_linear_cross_entropy(hidden, weight, labels, bias)
