import pytest
import torch
from conftest import tolerances

import allo_kernels as ak
from allo_kernels.ops import token_logprobs as op
from allo_kernels.ops.token_logprobs import as_row_addressable, token_logprobs_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def small_blocks(monkeypatch):
    # Small vocabulary blocks so small interpreter cases still run the multi-block loop and its masked tail.
    monkeypatch.setattr(op, "MAX_BLOCK_V", 64)


def _run(logits, labels, *, backend_name, backend, grad_out=None, **kw):
    backend(backend_name)
    x = logits.detach().clone().requires_grad_()
    out = ak.token_logprobs(x, labels, **kw)
    g = torch.randn_like(out) if grad_out is None else grad_out
    out.backward(g)
    return out.detach(), x.grad


def _check_against_reference(logits, labels, backend, grad_out=None, **kw):
    out, grad = _run(logits, labels, backend_name="triton", backend=backend, grad_out=grad_out, **kw)
    torch.manual_seed(1)
    g = grad_out if grad_out is not None else torch.randn(labels.shape)
    out, grad = _run(logits, labels, backend_name="triton", backend=backend, grad_out=g, **kw)
    x = logits.detach().clone().requires_grad_()
    ref = token_logprobs_reference(x, labels, **kw)
    ref.backward(g)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    # Forward: fp32 result of the same (possibly half-precision) inputs on both sides.
    torch.testing.assert_close(out, ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.float(), x.grad.float(), **tolerances(logits.dtype))
    return out, grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [(1, 1), (3, 7), (4, 130), (2, 3, 200), (5, 64)],
    ids=["N1-V1", "V7", "V130-not-multiple-of-block", "3d", "V-equals-block"],
)
def test_matches_reference(dtype, shape, backend, small_blocks):
    torch.manual_seed(0)
    logits = (torch.randn(shape) * 4).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1])
    _check_against_reference(logits, labels, backend)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows_no_copy(dtype, backend, small_blocks):
    torch.manual_seed(0)
    full = (torch.randn(2, 6, 150) * 3).to(dtype)
    ids = torch.randint(0, 150, (2, 6))
    logits, labels = full[:, :-1], ids[:, 1:]
    assert not logits.is_contiguous()
    rows, layout = as_row_addressable(logits)
    assert rows is logits and layout.n_rows == 10 and layout.n_inner == 5
    _check_against_reference(logits, labels, backend)


def test_non_contiguous_vocab_dim_and_unfoldable_rows(backend, small_blocks):
    torch.manual_seed(0)
    v_strided = torch.randn(90, 4).t()  # vocab dimension has stride 4: copied, still correct
    _check_against_reference(v_strided, torch.randint(0, 90, (4,)), backend)
    base = torch.randn(3, 4, 5, 70)
    three_groups = base[::2, ::2, ::2]  # leading dims fold into 3 groups: copied, still correct
    assert as_row_addressable(three_groups)[0] is not three_groups
    _check_against_reference(three_groups, torch.randint(0, 70, (2, 2, 3)), backend)


@pytest.mark.parametrize("dtype", DTYPES)
def test_temperature_and_ignore_index(dtype, backend, small_blocks):
    torch.manual_seed(0)
    logits = (torch.randn(6, 100) * 5).to(dtype)
    labels = torch.randint(0, 100, (6,), dtype=torch.int32)
    labels[[1, 4]] = -1
    out, grad = _check_against_reference(logits, labels, backend, ignore_index=-1, temperature=0.6)
    assert torch.equal(out[[1, 4]], torch.zeros(2))
    assert torch.count_nonzero(grad[[1, 4]]) == 0


def test_all_ignored(backend, small_blocks):
    logits = torch.randn(3, 4, 77)
    labels = torch.full((3, 4), -100)
    out, grad = _run(logits, labels, backend_name="triton", backend=backend)
    assert torch.equal(out, torch.zeros(3, 4))
    assert torch.equal(grad, torch.zeros_like(grad))


def test_zero_upstream_gradient_rows_write_zeros(backend, small_blocks):
    torch.manual_seed(0)
    logits = torch.randn(4, 90)
    labels = torch.randint(0, 90, (4,))
    g = torch.tensor([1.0, 0.0, -2.0, 0.0])
    _, grad = _check_against_reference(logits, labels, backend, grad_out=g)
    assert torch.count_nonzero(grad[[1, 3]]) == 0
    assert torch.count_nonzero(grad[[0, 2]]) == 180


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_writes_into_logits(dtype, backend, small_blocks):
    torch.manual_seed(0)
    base = (torch.randn(2, 5, 100) * 2).to(dtype)
    labels = torch.randint(0, 100, (2, 4))
    labels[1, 2] = -100
    g = torch.randn(2, 4)
    ref_x = base[:, :-1].clone().requires_grad_()
    ref = token_logprobs_reference(ref_x, labels)
    ref.backward(g)

    backend("triton")
    leaf = base.clone().requires_grad_()
    buf = leaf * 1  # a non-leaf buffer the loss owns (as logits from an lm_head would be)
    out = ak.token_logprobs(buf[:, :-1], labels, inplace_backward=True)
    torch.testing.assert_close(out, ref.detach(), atol=1e-5, rtol=1e-5)
    out.backward(g)
    torch.testing.assert_close(leaf.grad[:, :-1].float(), ref_x.grad.float(), **tolerances(dtype))
    assert torch.count_nonzero(leaf.grad[:, -1]) == 0
    # The gradient now lives in the logits buffer itself: no second [N, V] buffer was allocated.
    torch.testing.assert_close(buf[:, :-1].detach().float(), ref_x.grad.float(), **tolerances(dtype))


def test_empty_rows(backend):
    backend("triton")
    x = torch.randn(0, 5, requires_grad=True)
    out = ak.token_logprobs(x, torch.zeros(0, dtype=torch.long))
    out.sum().backward()
    assert out.shape == (0,) and x.grad.shape == (0, 5)


def test_large_vocab_single_row(backend, monkeypatch):
    monkeypatch.setattr(op, "MAX_BLOCK_V", 4096)
    torch.manual_seed(0)
    logits = torch.randn(1, 262147)
    _check_against_reference(logits, torch.tensor([262146]), backend)


def test_torch_backend_is_the_reference(backend):
    backend("torch")
    torch.manual_seed(0)
    logits = torch.randn(3, 11)
    labels = torch.tensor([0, -100, 10])
    out = ak.token_logprobs(logits, labels)
    expected = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[:, None])[:, 0] * (labels != -100)
    torch.testing.assert_close(out, expected)


def test_bad_inputs():
    logits = torch.randn(2, 3, 10)
    labels = torch.randint(0, 10, (2, 3))
    with pytest.raises(TypeError, match="logits"):
        ak.token_logprobs(logits.numpy(), labels)
    with pytest.raises(TypeError, match="logits"):
        ak.token_logprobs(logits.double(), labels)
    with pytest.raises(TypeError, match="labels"):
        ak.token_logprobs(logits, labels.float())
    with pytest.raises(ValueError, match=r"labels must have the shape .*\(2, 3\)"):
        ak.token_logprobs(logits, labels[:, :2])
    bad = labels.clone()
    bad[1, 2] = 10
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\).*got 10 at index \(1, 2\)"):
        ak.token_logprobs(logits, bad)
    bad[1, 2] = -5
    with pytest.raises(ValueError, match="got -5"):
        ak.token_logprobs(logits, bad)
    with pytest.raises(ValueError, match="temperature"):
        ak.token_logprobs(logits, labels, temperature=0.0)
    with pytest.raises(TypeError, match="ignore_index"):
        ak.token_logprobs(logits, labels, ignore_index=1.5)
    with pytest.raises(ValueError, match="labels is on meta"):
        ak.token_logprobs(logits, labels.to("meta"))
    with pytest.raises(ValueError, match="vocabulary"):
        ak.token_logprobs(torch.randn(2, 0), torch.zeros(2, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_realistic_shape(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(2, 65, 128256, device="cuda") * 3).to(dtype)[:, :-1]
    labels = torch.randint(0, 128256, (2, 64), device="cuda")
    labels[0, :5] = -100
    x = logits.detach().clone().requires_grad_()
    out = ak.token_logprobs(logits.detach().requires_grad_(), labels)
    ref = token_logprobs_reference(x, labels)
    torch.testing.assert_close(out, ref.detach(), atol=2e-5, rtol=2e-5)
