"""SparseAdamW's Triton kernel under TRITON_INTERPRET=1 (CPU tensors) against the torch reference and torch AdamW."""

from __future__ import annotations

import os

import pytest
import torch

from allo_kernels.optim import SparseAdamW, _triton_adamw

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="Triton on CPU needs TRITON_INTERPRET=1 before triton is imported (tests/conftest.py sets it)",
)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(_triton_adamw, "BLOCK", 32)  # several blocks per segment on small tensors


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(24, 40), (30,), (16, 8)]
    ws = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    masks = [torch.rand(24, generator=g) < 0.4, None, torch.rand(16, 8, generator=g) < 0.2]
    return ws, masks


@pytest.mark.parametrize(
    "dtype,master,amsgrad",
    [
        (torch.float32, False, False),
        (torch.float32, False, True),
        (torch.bfloat16, True, False),
        (torch.float16, False, True),
    ],
)
def test_triton_matches_reference_one_launch_for_many_tensors(dtype, master, amsgrad):
    ws, masks = _params(dtype)
    out = {}
    for backend in ("torch", "triton"):
        ps = [w.clone().requires_grad_() for w in ws]
        opt = SparseAdamW(
            ps,
            lr=1e-2,
            weight_decay=0.1,
            amsgrad=amsgrad,
            master_weights=master,
            backend=backend,
            masks={p: m for p, m in zip(ps, masks) if m is not None},
        )
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            opt.step()
        out[backend] = ([p.detach().clone() for p in ps], [dict(opt.state[p]) for p in ps])
    (pr, sr), (pt, st) = out["torch"], out["triton"]
    for w, m, a, b, s_ref, s_tri in zip(ws, masks, pr, pt, sr, st):
        if m is not None:
            sel = m if m.shape == w.shape else m[:, None].expand(w.shape)
            assert torch.equal(b[~sel], w[~sel])  # never written
        tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(b.float(), a.float(), **tol)
        for k in s_ref:
            if k != "step":
                torch.testing.assert_close(s_tri[k], s_ref[k], atol=1e-6, rtol=1e-5)


def test_triton_fp32_matches_torch_adamw_on_selected_rows():
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(20, 12, generator=g)
    mask = torch.rand(20, generator=g) < 0.5
    p, q = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    opt = SparseAdamW([p], lr=2e-2, weight_decay=0.05, masks={p: mask}, backend="triton")
    ref = torch.optim.AdamW([q], lr=2e-2, weight_decay=0.05)
    for _ in range(4):
        gr = torch.randn(20, 12, generator=g)
        p.grad, q.grad = gr.clone(), gr.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(p.detach()[mask], q.detach()[mask], atol=1e-6, rtol=1e-5)
    assert torch.equal(p.detach()[~mask], w0[~mask])
    assert opt.state[p]["exp_avg"].shape == (int(mask.sum()), 12)


def test_block_table_covers_every_selected_element_once():
    from allo_kernels.optim._layout import mask_layout

    p = torch.zeros(50, 7)
    mask = torch.zeros(50, dtype=torch.bool)
    mask[[0, 1, 2, 10, 11, 40, 49]] = True
    layout = mask_layout(p, mask)
    blocks = _triton_adamw._block_table(layout, 8)
    covered = torch.cat([torch.arange(int(b[0]), int(b[0]) + int(b[2])) for b in blocks])
    expected = torch.nonzero(mask[:, None].expand(50, 7).reshape(-1)).flatten()
    assert torch.equal(covered.sort().values, expected)
    assert int(blocks[:, 2].max()) <= 8


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)])
def test_triton_cuda_matches_reference(dtype, master):
    ws, masks = _params(dtype, seed=5)
    out = {}
    for backend in ("torch", "triton"):
        ps = [w.cuda().requires_grad_() for w in ws]
        opt = SparseAdamW(
            ps,
            lr=1e-2,
            weight_decay=0.1,
            master_weights=master,
            backend=backend,
            masks={p: m.cuda() for p, m in zip(ps, masks) if m is not None},
        )
        g = torch.Generator().manual_seed(6)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(dtype).cuda()
            opt.step()
        out[backend] = [p.detach().cpu() for p in ps]
    for w, m, a, b in zip(ws, masks, out["torch"], out["triton"]):
        if m is not None:
            sel = m if m.shape == w.shape else m[:, None].expand(w.shape)
            assert torch.equal(b[~sel], w[~sel])
        tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(b.float(), a.float(), **tol)
