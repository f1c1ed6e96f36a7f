"""Narrow integer label dtypes through every op that takes labels (issue 11.16).

``check_labels`` used to compare against Python ints in the labels' own dtype, which wraps: a uint8 156 equalled
-100 (a real token silently dropped, or read out of range by Triton), int16 50 was rejected against V=40000 and int8
labels against V=200. Every dtype must now give exactly what int64 labels give, on both backends.
"""

import pytest
import torch

import allo_kernels as ak
from allo_kernels.ops import token_logprobs as logprob_op

LABEL_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(logprob_op, "MAX_BLOCK_V", 64)


def _labels(dtype, V):
    """[2, 5] ids with one position equal to an ignore_index the dtype can hold; uint8 holds 156 (= -100 wrapped)."""
    ignore = 255 if dtype == torch.uint8 else -100
    top = 127 if dtype == torch.int8 else V - 1
    ids = torch.tensor([[3, 156 if dtype == torch.uint8 else 17, 0, top, ignore], [ignore, 5, top, 1, 2]])
    return ids, ignore


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
def test_token_scores_and_fused_linear_take_any_label_dtype(label_dtype, backend_name, backend):
    V, H = 200, 8
    g = torch.Generator().manual_seed(0)
    logits0 = torch.randn(2, 5, V, generator=g)
    hidden0, weight0 = torch.randn(2, 5, H, generator=g), torch.randn(V, H, generator=g) * 0.3
    ids, ignore = _labels(label_dtype, V)
    results = {}
    for lab_dtype in (torch.int64, label_dtype):
        backend(backend_name)
        labels = ids.to(lab_dtype)
        logits = logits0.clone().requires_grad_()
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        s = ak.token_scores(logits, labels, mask_fraction=0.25, ignore_index=ignore)
        f = ak.fused_linear_token_logprobs(hidden, weight, labels, ignore_index=ignore, chunk_size=3)
        fs = ak.fused_linear_token_scores(hidden, weight, labels, mask_fraction=0.25, ignore_index=ignore)
        (s.seq_logprobs.sum() + f.sum() + fs.seq_logprobs.sum()).backward()
        results[lab_dtype] = (s.logprobs, s.keep, s.n_tokens, f, fs.logprobs, fs.keep, logits.grad, hidden.grad)
    for a, b in zip(results[torch.int64], results[label_dtype]):
        assert torch.equal(a, b)
    logprobs, keep = results[label_dtype][0], results[label_dtype][1]
    ignored = ids == ignore
    assert torch.equal(logprobs[ignored], torch.zeros(2)) and (logprobs[~ignored] < 0).all()
    assert not keep[ignored].any() and int(keep.sum()) == 2 * (4 - 1)  # floor(0.25 * 4) = 1 masked per sequence


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_wrapping_values_are_caught_by_every_op(backend_name, backend):
    backend(backend_name)
    u = torch.tensor([[156, 3]], dtype=torch.uint8)  # with V=100, 156 is out of range, never ignore_index=-100
    with pytest.raises(ValueError, match=r"got 156 at index \(0, 0\)"):
        ak.token_scores(torch.randn(1, 2, 100), u)
    with pytest.raises(ValueError, match=r"got 156 at index \(0, 0\)"):
        ak.fused_linear_token_logprobs(torch.randn(1, 2, 4), torch.randn(100, 4), u)
    with pytest.raises(ValueError, match=r"got 156 at index \(0, 0\)"):
        ak.fused_linear_token_scores(torch.randn(1, 2, 4), torch.randn(100, 4), u)
    # with V=200 it is a real token (the torch path used to drop it as ignored)
    assert (ak.token_scores(torch.randn(1, 2, 200), u).logprobs < 0).all()
    assert (ak.fused_linear_token_logprobs(torch.randn(1, 2, 4), torch.randn(200, 4), u) < 0).all()
    i16 = torch.tensor([[50, -100]], dtype=torch.int16)  # valid ids of a vocabulary int16 cannot hold
    hidden, weight = torch.randn(1, 2, 4), torch.randn(40000, 4)
    torch.testing.assert_close(
        ak.fused_linear_token_logprobs(hidden, weight, i16), ak.fused_linear_token_logprobs(hidden, weight, i16.long())
    )
    logits = torch.randn(1, 2, 40000)
    assert torch.equal(ak.token_scores(logits, i16).logprobs, ak.token_scores(logits, i16.long()).logprobs)
