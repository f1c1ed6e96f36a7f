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


# ---------------------------------------------------------------------------------- ignored rows with non-finite logits
@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_ignored_rows_give_zero_whatever_their_logits_hold(backend_name, temperature, backend, small_blocks):
    """Issue 11.14: an ignored row is 0.0 with exactly zero gradient even when its logits are -inf, NaN, +inf, or
    overflow after the temperature; the other rows are unaffected (compared with fp32 log_softmax on them alone)."""
    torch.manual_seed(0)
    V = 90
    logits = torch.randn(7, V) * 3
    logits[1] = float("-inf")  # all -inf: log_softmax is NaN everywhere
    logits[2, 5] = float("nan")
    logits[3, 40] = float("inf")
    logits[4, 0] = float("-inf")  # finite row apart from position 0
    logits[5] = 3e38  # finite, but inf once divided by a temperature < 1
    labels = torch.tensor([3, -100, -100, -100, -100, -100, 89])
    g = torch.randn(7)
    out, grad = _run(logits, labels, backend_name=backend_name, backend=backend, grad_out=g, temperature=temperature)
    ignored = labels == -100
    assert torch.equal(out[ignored], torch.zeros(5))
    assert torch.equal(grad[ignored], torch.zeros(5, V))
    keep = (~ignored).nonzero().flatten()
    x = logits[keep].clone().requires_grad_()
    expected = torch.log_softmax(x / temperature, -1).gather(-1, labels[keep][:, None])[:, 0]
    expected.backward(g[keep])
    torch.testing.assert_close(out[keep], expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad[keep], x.grad, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- narrow label dtypes
LABEL_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
def test_any_integer_label_dtype_is_compared_exactly(label_dtype, backend_name, backend, small_blocks):
    """Issue 11.16: labels are compared in int64, so no narrow dtype wraps: uint8 156 is not -100, int16 50 is a valid
    id of a 40000-word vocabulary, and a label equal to ignore_index is ignored in every dtype."""
    torch.manual_seed(0)
    V = 200
    ignore = 255 if label_dtype == torch.uint8 else -100  # an ignore_index the dtype can hold
    ids = [3, 120, 0, 99] if label_dtype == torch.int8 else [3, 156, 0, 199]  # 156 wraps to -100 as uint8 vs int
    labels64 = torch.tensor(ids + [ignore])
    logits = torch.randn(5, V)
    expected, expected_grad = _run(
        logits, labels64, backend_name=backend_name, backend=backend, grad_out=torch.ones(5), ignore_index=ignore
    )
    out, grad = _run(
        logits,
        labels64.to(label_dtype),
        backend_name=backend_name,
        backend=backend,
        grad_out=torch.ones(5),
        ignore_index=ignore,
    )
    assert torch.equal(out, expected) and torch.equal(grad, expected_grad)
    assert out[4] == 0 and (out[:4] < 0).all()
    # a uint8 156 is never taken for ignore_index=-100: it is a real id (V=200) or an out-of-range one (V=100)
    if label_dtype == torch.uint8:
        u = torch.tensor([156, 3], dtype=torch.uint8)
        out156 = ak.token_logprobs(logits[:2], u)
        assert out156[0] < 0
        with pytest.raises(ValueError, match=r"labels must be in \[0, 100\).*got 156 at index \(0,\)"):
            ak.token_logprobs(logits[:2, :100], u)
    # int16 ids below a vocabulary the dtype cannot hold are valid
    if label_dtype == torch.int16:
        big = torch.randn(2, 40000)
        lab = torch.tensor([50, -100], dtype=torch.int16)
        torch.testing.assert_close(ak.token_logprobs(big, lab), ak.token_logprobs(big, lab.long()))
    too_big = labels64.clone()
    too_big[0] = 250 if label_dtype == torch.uint8 else (120 if label_dtype == torch.int8 else 210)
    with pytest.raises(ValueError, match=rf"got {int(too_big[0])} at index \(0,\)"):
        ak.token_logprobs(
            logits[:, :110] if label_dtype == torch.int8 else logits, too_big.to(label_dtype), ignore_index=ignore
        )


def test_ignore_index_outside_int64_is_refused():
    with pytest.raises(ValueError, match="ignore_index"):
        ak.token_logprobs(torch.randn(2, 5), torch.tensor([1, 2]), ignore_index=2**63)


# ------------------------------------------------------------------------------------------------ inplace_backward
def _leaf_logits(shape=(3, 4, 100), dtype=torch.float32):
    torch.manual_seed(0)
    return (torch.randn(shape) * 2).to(dtype).requires_grad_()


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_inplace_backward_refuses_a_leaf_and_views_of_it(backend_name, backend, small_blocks):
    """Issue 11.17: writing the gradient into a leaf would replace a parameter's / input's data with its gradient."""
    backend(backend_name)
    leaf = _leaf_logits()
    before = leaf.detach().clone()
    labels = torch.randint(0, 100, (3, 4))
    with pytest.raises(ValueError, match=r"inplace_backward=True.*logits is a leaf"):
        ak.token_logprobs(leaf, labels, inplace_backward=True)
    with pytest.raises(ValueError, match=r"inplace_backward=True.*logits is a view of a leaf"):
        ak.token_logprobs(leaf[:, :-1], labels[:, :-1], inplace_backward=True)
    with pytest.raises(ValueError, match=r"inplace_backward=True.*logits is a leaf"):
        ak.token_scores(leaf, labels, inplace_backward=True)
    assert torch.equal(leaf.detach(), before)
    # a leaf that needs no gradient has no backward to run: nothing to refuse
    ak.token_logprobs(leaf.detach(), labels, inplace_backward=True)


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_inplace_backward_refuses_overlapping_logits(backend_name, backend, small_blocks):
    """Issue 11.17: expanded (stride-0) logits put several gradient rows on one address."""
    backend(backend_name)
    leaf = _leaf_logits((1, 100))
    labels = torch.tensor([3, 50, 99, -100])
    expanded = (leaf * 1).expand(4, 100)
    with pytest.raises(ValueError, match=r"inplace_backward=True.*logits may overlap.*stride"):
        ak.token_logprobs(expanded, labels, inplace_backward=True)
    with pytest.raises(ValueError, match=r"inplace_backward=True.*logits may overlap"):
        ak.token_scores(expanded[None], labels[None], inplace_backward=True)
    buf = (leaf * 1).expand(2, 100)
    windows = buf.as_strided((3, 60), (20, 1))  # rows 0..59, 20..79, 40..99 of one row share elements
    with pytest.raises(ValueError, match=r"logits may overlap"):
        ak.token_logprobs(windows, torch.tensor([3, 50, 59]), inplace_backward=True)
    # without inplace_backward the same expanded logits are fine on every backend: the gradients add up
    out = ak.token_logprobs(expanded, labels)
    out.sum().backward()
    x = leaf.detach().clone().requires_grad_()
    token_logprobs_reference(x.expand(4, 100), labels).sum().backward()
    torch.testing.assert_close(leaf.grad, x.grad, atol=1e-5, rtol=1e-5)


def test_inplace_backward_must_be_a_bool():
    with pytest.raises(TypeError, match="inplace_backward must be a bool"):
        ak.token_logprobs(torch.randn(2, 5), torch.tensor([1, 2]), inplace_backward="yes")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_on_contiguous_non_leaf(dtype, backend, small_blocks):
    """Contiguous non-leaf logits (an lm_head output) still take the gradient in place, with correct values."""
    torch.manual_seed(0)
    leaf = _leaf_logits((2, 5, 100), dtype)
    labels = torch.randint(0, 100, (2, 5))
    labels[0, 1] = -100
    g = torch.randn(2, 5)
    ref_x = leaf.detach().clone().requires_grad_()
    token_logprobs_reference(ref_x, labels).backward(g)
    backend("triton")
    buf = leaf * 1
    assert buf.is_contiguous() and not buf.is_leaf
    ak.token_logprobs(buf, labels, inplace_backward=True).backward(g)
    torch.testing.assert_close(leaf.grad.float(), ref_x.grad.float(), **tolerances(dtype))
    torch.testing.assert_close(buf.detach().float(), ref_x.grad.float(), **tolerances(dtype))  # written in place


def test_inplace_backward_marks_the_logits_modified(backend, small_blocks):
    """After the in-place backward the logits hold the gradient; autograd is told, so a second backward through the
    same graph (or another op that saved the logits) raises instead of computing with the overwritten values."""
    backend("triton")
    leaf = _leaf_logits((4, 100))
    labels = torch.tensor([3, 50, 99, -100])
    buf = leaf * 1
    out = ak.token_logprobs(buf, labels, inplace_backward=True)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    leaf2 = _leaf_logits((4, 100))
    logits = leaf2.exp()  # exp saves its output for its own backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        ak.token_logprobs(logits, labels, inplace_backward=True).sum().backward()
