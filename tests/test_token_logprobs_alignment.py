"""token_logprobs' aligned main loop and its peeled head/tail (issue 12.4), under TRITON_INTERPRET=1.

Every row is split into [0, head) + whole 16-byte vectors + a tail of < VEC elements, with head depending on where
the row starts; these cases put rows at every phase, labels in the head, main part and tail, vocabularies smaller
than one vector, and gradient rows in and out of phase with the logits rows (strided, in place, shifted base).
"""

import pytest
import torch
from conftest import tolerances

import allo_kernels as ak
from allo_kernels.ops import token_logprobs as op
from allo_kernels.ops.token_logprobs import token_logprobs_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(op, "MAX_BLOCK_V", 16)  # several main-loop iterations on small vocabularies


LAYOUTS = {
    "strided": lambda t: t[:, :-1],  # row starts b * (T + 1) * V + t * V
    "shifted-base": lambda t: t[:, 1:],  # base pointer V elements in: not 16-byte aligned when V is odd
}


def _labels(batch: int, seq: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    flat = labels.view(-1)
    flat[0], flat[1 % flat.numel()] = 0, vocab - 1  # first and last column: head and tail
    flat[2 % flat.numel()] = vocab // 2
    if flat.numel() > 3:
        flat[3] = -100
    return labels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 3, 9, 37, 64, 133])
def test_every_row_phase_matches_reference(dtype, vocab, backend):
    backend("triton")
    gen = torch.Generator().manual_seed(vocab)
    full = (torch.randn(2, 4, vocab, generator=gen) * 3).to(dtype)
    labels = _labels(2, 3, vocab, gen)
    g = torch.randn(2, 3, generator=gen)
    for name in ("strided", "shifted-base", "contiguous"):
        if name == "contiguous":
            leaf = full[:, 1:].contiguous().requires_grad_()
            view = leaf
        else:
            leaf = full.clone().requires_grad_()
            view = LAYOUTS[name](leaf)
        x = view.detach().clone().requires_grad_()
        ref = token_logprobs_reference(x, labels)
        ref.backward(g)
        out = ak.token_logprobs(view, labels)
        out.backward(g)
        grad = leaf.grad if name == "contiguous" else LAYOUTS[name](leaf.grad)
        torch.testing.assert_close(out.detach(), ref.detach(), atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(grad.float(), x.grad.float(), **tolerances(dtype), msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [7, 37])
def test_inplace_backward_out_of_phase_rows(dtype, vocab, backend):
    """In place the gradient rows are the logits rows (same phase); the non-aligned vocabulary puts rows at every
    phase, and the masked (zero-gradient) and ignored rows must be written with zeros over head, main part and tail."""
    backend("triton")
    gen = torch.Generator().manual_seed(vocab + 1)
    base = (torch.randn(2, 5, vocab, generator=gen) * 2).to(dtype)
    labels = _labels(2, 4, vocab, gen)
    g = torch.randn(2, 4, generator=gen)
    g[1, 1] = 0.0
    ref_x = base[:, :-1].clone().requires_grad_()
    ref = token_logprobs_reference(ref_x, labels)
    ref.backward(g)
    leaf = base.clone().requires_grad_()
    buf = leaf * 1
    out = ak.token_logprobs(buf[:, :-1], labels, inplace_backward=True)
    out.backward(g)
    torch.testing.assert_close(leaf.grad[:, :-1].float(), ref_x.grad.float(), **tolerances(dtype))
    assert torch.count_nonzero(leaf.grad[1, 1]) == 0 and torch.count_nonzero(leaf.grad[0, 3]) == 0
    assert torch.count_nonzero(leaf.grad[:, -1]) == 0


@pytest.mark.parametrize(
    "layout_a,layout_b,vec,same",
    [
        ((10, 5, 70, 7), (10, 5, 70, 7), 8, True),  # identical layouts (in place)
        ((10, 5, 96, 16), (10, 5, 80, 16), 8, True),  # every stride a multiple of the vector
        ((10, 5, 72, 7), (10, 5, 70, 7), 8, False),  # strided logits, contiguous gradient, odd V
        ((10, 5, 96, 16), (10, 5, 80, 16), 32, False),
    ],
)
def test_same_phase_decision(layout_a, layout_b, vec, same):
    """SAME_PHASE tells the compiler the loads are aligned like the stores; it must hold for every row."""
    a, b = op.RowLayout(*layout_a), op.RowLayout(*layout_b)
    assert op._same_phase(a, b, vec) is same
    if same:
        for r in range(a.n_rows):
            off_a = (r // a.n_inner) * a.stride_outer + (r % a.n_inner) * a.stride_inner
            off_b = (r // b.n_inner) * b.stride_outer + (r % b.n_inner) * b.stride_inner
            assert off_a % vec == off_b % vec
