"""SparseAdamW against torch.optim.AdamW restricted to the selected entries (torch reference and native C++ backends).

The torch backend runs torch.optim.AdamW's own op sequence, so on fp32 it is compared bit for bit. The native kernel
rounds sqrt correctly where torch's CPU sqrt may be one ulp off, so it is compared with fp32 tolerances.
Unselected entries must stay bit-identical to their initial values (torch.equal) on every backend.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

from allo_kernels.optim import SparseAdamW, _native
from allo_kernels.optim import sparse_adamw as sa_mod

NATIVE = pytest.param(
    "native",
    marks=pytest.mark.skipif(not _native.available(), reason=f"native library not built: {_native.load_error()}"),
)
BACKENDS = ["torch", NATIVE]


def _close(actual, expected, backend, atol=1e-6, rtol=1e-5):
    if backend == "torch":
        assert torch.equal(actual, expected), (actual - expected).abs().max()
    else:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def _run_pair(
    backend,
    *,
    shape=(48, 20),
    row_frac=0.3,
    steps=5,
    wd=0.1,
    amsgrad=False,
    maximize=False,
    betas=(0.9, 0.999),
    element=False,
    seed=0,
):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(shape, generator=g)
    b0 = torch.randn(shape[0], generator=g)
    if element:
        mask = torch.rand(shape, generator=g) < row_frac
        mask[0] = False  # a row without any selected element holds no state
    else:
        mask = torch.rand(shape[0], generator=g) < row_frac
    p, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    q, bq = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = SparseAdamW(
        [p, b],
        lr=3e-2,
        betas=betas,
        weight_decay=wd,
        amsgrad=amsgrad,
        maximize=maximize,
        masks={p: mask},
        backend=backend,
    )
    ref = torch.optim.AdamW([q, bq], lr=3e-2, betas=betas, weight_decay=wd, amsgrad=amsgrad, maximize=maximize)
    for _ in range(steps):
        gw, gb = torch.randn(shape, generator=g), torch.randn(shape[0], generator=g)
        p.grad, q.grad, b.grad, bq.grad = gw.clone(), gw.clone(), gb.clone(), gb.clone()
        opt.step()
        ref.step()
    return opt, (p, b, w0, b0, mask), (q, bq, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wd,amsgrad,maximize", [(0.0, False, False), (0.1, False, False), (0.05, True, True)])
def test_row_mask_matches_adamw_on_selected_rows(backend, wd, amsgrad, maximize):
    opt, (p, b, w0, _b0, mask), (q, bq, ref) = _run_pair(backend, wd=wd, amsgrad=amsgrad, maximize=maximize)
    _close(p.detach()[mask], q.detach()[mask], backend)
    assert torch.equal(p.detach()[~mask], w0[~mask])  # unselected rows: bit-identical, no weight decay
    _close(b.detach(), bq.detach(), backend)  # unmasked param: dense AdamW
    st, rst = opt.state[p], ref.state[q]
    k = int(mask.sum())
    assert st["exp_avg"].shape == (k, p.shape[1]) and st["exp_avg_sq"].shape == (k, p.shape[1])
    assert opt.state_rows(p) == k
    _close(st["exp_avg"], rst["exp_avg"][mask], backend)
    _close(st["exp_avg_sq"], rst["exp_avg_sq"][mask], backend)
    if amsgrad:
        _close(st["max_exp_avg_sq"], rst["max_exp_avg_sq"][mask], backend)
    assert float(st["step"]) == float(rst["step"]) == 5.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_beta1_lerp_branch(backend):
    _opt, (p, _b, w0, _b0, mask), (q, _bq, _ref) = _run_pair(backend, betas=(0.3, 0.9), steps=3)
    _close(p.detach()[mask], q.detach()[mask], backend)
    assert torch.equal(p.detach()[~mask], w0[~mask])


@pytest.mark.parametrize("backend", BACKENDS)
def test_element_mask(backend):
    opt, (p, _b, w0, _b0, mask), (q, _bq, ref) = _run_pair(backend, element=True, row_frac=0.1)
    _close(p.detach()[mask], q.detach()[mask], backend)
    assert torch.equal(p.detach()[~mask], w0[~mask])  # includes unselected elements of rows that hold state
    rows = mask.any(dim=1)
    st = opt.state[p]
    assert st["exp_avg"].shape == (int(rows.sum()), p.shape[1])
    sel_in_rows = mask[rows]
    _close(st["exp_avg"][sel_in_rows], ref.state[q]["exp_avg"][mask], backend)
    assert torch.all(st["exp_avg"][~sel_in_rows] == 0) and torch.all(st["exp_avg_sq"][~sel_in_rows] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_with_fp32_master_rows(backend, dtype):
    g = torch.Generator().manual_seed(3)
    w32 = torch.randn(32, 24, generator=g)
    w0 = w32.to(dtype)
    mask = torch.rand(32, generator=g) < 0.4
    p = w0.clone().requires_grad_()
    q = w0.float().requires_grad_()  # fp32 AdamW on the same starting values = the master's reference
    opt = SparseAdamW([p], lr=1e-2, weight_decay=0.1, masks={p: mask}, master_weights=True, backend=backend)
    ref = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1)
    for _ in range(4):
        gr = torch.randn(32, 24, generator=g).to(dtype)
        p.grad, q.grad = gr.clone(), gr.float()
        opt.step()
        ref.step()
    st = opt.state[p]
    assert st["master"].dtype == torch.float32 and st["master"].shape == (int(mask.sum()), 24)
    _close(st["master"], q.detach()[mask], backend)
    assert torch.equal(p.detach()[mask], st["master"].to(dtype))  # params are the rounded master rows
    assert torch.equal(p.detach()[~mask], w0[~mask])
    assert st["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_without_master_updates_in_fp32(backend):
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(16, 8, generator=g).to(torch.bfloat16)
    mask = torch.tensor([True, False] * 8)
    p = w0.clone().requires_grad_()
    opt = SparseAdamW([p], lr=1e-2, masks={p: mask}, backend=backend)
    q = w0.float().requires_grad_()
    ref = torch.optim.AdamW([q], lr=1e-2)
    gr = torch.randn(16, 8, generator=g).to(torch.bfloat16)
    p.grad, q.grad = gr, gr.float()
    opt.step()
    ref.step()
    assert "master" not in opt.state[p]
    torch.testing.assert_close(p.detach()[mask], q.detach()[mask].to(torch.bfloat16), atol=0, rtol=2**-7)
    assert torch.equal(p.detach()[~mask], w0[~mask])


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_schedule_through_param_groups(backend):
    torch.manual_seed(5)
    w0 = torch.randn(20, 6)
    mask = torch.rand(20) < 0.5
    p, q = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    opt = SparseAdamW([p], lr=0.1, weight_decay=0.01, masks={p: mask}, backend=backend)
    ref = torch.optim.AdamW([q], lr=0.1, weight_decay=0.01)
    s1 = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(ref, step_size=1, gamma=0.5)
    for _ in range(4):
        gr = torch.randn(20, 6)
        p.grad, q.grad = gr.clone(), gr.clone()
        opt.step(), ref.step(), s1.step(), s2.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 16)
    _close(p.detach()[mask], q.detach()[mask], backend)
    assert torch.equal(p.detach()[~mask], w0[~mask])


def test_param_group_mask_key_and_params_without_grad():
    torch.manual_seed(6)
    a, b, c = (
        torch.randn(8, 4, requires_grad=True),
        torch.randn(6, 3, requires_grad=True),
        torch.randn(5, requires_grad=True),
    )
    ma, mb = torch.rand(8) < 0.5, torch.rand(6, 3) < 0.5
    opt = SparseAdamW([{"params": [a], "mask": ma}, {"params": [b, c], "mask": [mb, None], "lr": 0.5}], backend="torch")
    assert opt.mask_of(a) is not None and opt.mask_of(b) is not None and opt.mask_of(c) is None
    assert "mask" not in opt.param_groups[0] and opt.param_groups[1]["lr"] == 0.5
    a.grad = torch.randn(8, 4)
    opt.step()  # b, c have no grad: skipped like torch
    assert opt.state_rows(a) == int(ma.sum()) and b not in opt.state and c not in opt.state


def test_all_false_mask_keeps_no_state_and_writes_nothing():
    p = torch.randn(10, 3, requires_grad=True)
    w0 = p.detach().clone()
    opt = SparseAdamW([p], lr=0.1, weight_decay=0.5, masks={p: torch.zeros(10, dtype=torch.bool)}, backend="torch")
    p.grad = torch.randn(10, 3)
    opt.step()
    assert torch.equal(p.detach(), w0) and opt.state[p]["exp_avg"].numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)])
def test_state_dict_round_trip_is_exact(backend, dtype, master):
    torch.manual_seed(7)
    w0 = torch.randn(24, 10).to(dtype)
    mask = torch.rand(24) < 0.4
    grads = [torch.randn(24, 10).to(dtype) for _ in range(5)]

    def make(w):
        p = w.clone().requires_grad_()
        return p, SparseAdamW(
            [p], lr=1e-2, weight_decay=0.1, masks={p: mask}, master_weights=master, amsgrad=True, backend=backend
        )

    p1, o1 = make(w0)
    for gr in grads[:2]:
        p1.grad = gr.clone()
        o1.step()
    sd = o1.state_dict()
    p2, o2 = make(p1.detach())
    o2.load_state_dict(sd)
    for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") + (("master",) if master else ()):
        assert o2.state[p2][k].dtype == torch.float32  # not cast to the param's dtype
        assert torch.equal(o2.state[p2][k], o1.state[p1][k])
    for gr in grads[2:]:
        p1.grad, p2.grad = gr.clone(), gr.clone()
        o1.step()
        o2.step()
    assert torch.equal(p1, p2)
    assert torch.equal(o1.state[p1]["exp_avg"], o2.state[p2]["exp_avg"])


def test_changing_a_mask_migrates_state_of_rows_that_stay():
    torch.manual_seed(8)
    p = torch.randn(12, 5, requires_grad=True)
    old = torch.zeros(12, dtype=torch.bool)
    old[[1, 2, 3, 7]] = True
    new = torch.zeros(12, dtype=torch.bool)
    new[[2, 3, 9]] = True
    opt = SparseAdamW([p], lr=1e-2, masks={p: old}, backend="torch")
    p.grad = torch.randn(12, 5)
    opt.step()
    m_old = opt.state[p]["exp_avg"].clone()  # rows 1, 2, 3, 7
    sd_old = opt.state_dict()
    opt.set_mask(p, new)
    m_new = opt.state[p]["exp_avg"]
    assert m_new.shape == (3, 5)
    assert torch.equal(m_new[0], m_old[1]) and torch.equal(m_new[1], m_old[2])  # rows 2, 3 carried over
    assert torch.all(m_new[2] == 0)  # row 9 starts from zero moments
    # loading a state saved under the old mask into an optimizer with the new mask migrates the same way
    q = p.detach().clone().requires_grad_()
    opt2 = SparseAdamW([q], lr=1e-2, masks={q: new}, backend="torch")
    with pytest.warns(UserWarning, match=r"param 0 \(shape \(12, 5\)\) was saved under another mask.*2 of the 4"):
        opt2.load_state_dict(sd_old)
    assert torch.equal(opt2.state[q]["exp_avg"], m_new)


# ------------------------------------------------------------------------- masks are copied; layouts checked on load
def _row_mask(n, rows):
    m = torch.zeros(n, dtype=torch.bool)
    m[rows] = True
    return m


def test_masks_are_copied_when_given():
    """Issue 11.19: editing the caller's mask tensor after construction must not change what trains."""
    p, q, r = (torch.zeros(6, 2, requires_grad=True) for _ in range(3))
    mp, mq, mr = _row_mask(6, [0]), _row_mask(6, [1]), _row_mask(6, [2])
    opt = SparseAdamW([{"params": [p]}, {"params": [q], "mask": mq}, {"params": [r]}], lr=0.1, masks={p: mp})
    opt.set_mask(r, mr)
    for m in (mp, mq, mr):
        m[5] = True  # before the first step
    opt.mask_of(p)[4] = True  # mask_of hands out a copy
    for t in (p, q, r):
        t.grad = torch.ones(6, 2)
    opt.step()
    for m in (mp, mq, mr):
        m[3] = True  # after it
    opt.step()
    for t, row in ((p, 0), (q, 1), (r, 2)):
        changed = (t.detach() != 0).any(dim=1)
        assert torch.equal(changed, _row_mask(6, [row])), (row, changed)
        assert torch.equal(opt.mask_of(t), _row_mask(6, [row]))


def _trained(mask, shape=(8, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=g).requires_grad_()
    opt = SparseAdamW([p], lr=1e-2, masks={p: mask}, backend="torch")
    for _ in range(2):
        p.grad = torch.randn(shape, generator=g)
        opt.step()
    return p, opt


def test_state_saved_without_its_layout_is_refused():
    """Issue 11.19: compact state whose layout is unknown cannot be placed: the same row count under another mask used
    to load silently onto the wrong rows."""
    _, opt_a = _trained(_row_mask(8, [0, 1, 2]))
    sd = opt_a.state_dict()
    del sd["allo_layouts"]
    q = torch.randn(8, 3, requires_grad=True)
    opt_b = SparseAdamW([q], lr=1e-2, masks={q: _row_mask(8, [5, 6, 7])}, backend="torch")
    with pytest.raises(ValueError, match=r"optimizer state of param 0 \(shape \(8, 3\)\) holds .* no layout for it"):
        opt_b.load_state_dict(sd)
    assert len(opt_b.state) == 0  # nothing loaded
    sd["allo_layouts"] = {}
    with pytest.raises(ValueError, match="lacks index 0"):
        opt_b.load_state_dict(sd)
    # a dense state (torch.optim.AdamW's) needs no layout: the selected rows are taken from it
    dense_p = torch.randn(8, 3, requires_grad=True)
    dense = torch.optim.AdamW([dense_p], lr=1e-2)
    dense_p.grad = torch.randn(8, 3)
    dense.step()
    opt_b.load_state_dict(dense.state_dict())
    assert torch.equal(opt_b.state[q]["exp_avg"], dense.state[dense_p]["exp_avg"][5:])


def test_saved_layout_of_another_parameter_is_refused():
    _, opt_a = _trained(_row_mask(4, [0, 2]), shape=(4, 3))
    sd = opt_a.state_dict()
    for shape, mask, match in [
        ((3, 4), _row_mask(3, [0, 2]), r"param 0 \(shape \(3, 4\)\) was saved for a parameter of shape \(4, 3\)"),
        ((5, 3), _row_mask(5, [0, 2]), r"param 0 \(shape \(5, 3\)\) was saved for a parameter of shape \(4, 3\)"),
    ]:
        q = torch.randn(shape, requires_grad=True)
        opt = SparseAdamW([q], lr=1e-2, masks={q: mask}, backend="torch")
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(sd)
        assert len(opt.state) == 0
    # a state dict written before "param_shape" was stored is checked by element count
    old_format = copy.deepcopy(sd)
    del old_format["allo_layouts"][0]["param_shape"]
    q = torch.randn(5, 3, requires_grad=True)
    with pytest.raises(ValueError, match="was saved for a parameter of 12 elements"):
        SparseAdamW([q], masks={q: _row_mask(5, [0])}).load_state_dict(old_format)


def test_old_format_state_dict_still_loads():
    p, opt_a = _trained(_row_mask(8, [1, 4, 6]))
    sd = opt_a.state_dict()
    del sd["allo_layouts"][0]["param_shape"]
    q = p.detach().clone().requires_grad_()
    opt = SparseAdamW([q], lr=1e-2, masks={q: _row_mask(8, [1, 4, 6])}, backend="torch")
    opt.load_state_dict(sd)
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[q][k], opt_a.state[p][k])


def test_malformed_saved_layouts_are_refused():
    _, opt_a = _trained(_row_mask(8, [1, 4, 6]))
    q = torch.randn(8, 3, requires_grad=True)
    opt = SparseAdamW([q], lr=1e-2, masks={q: _row_mask(8, [1, 4, 6])}, backend="torch")
    cases = [
        ({"seg_param": torch.tensor([3, 12, 23])}, r"segments outside \[0, 24\)"),  # last segment runs past the end
        ({"seg_param": torch.tensor([12, 3, 18])}, "out of order"),
        ({"seg_len": torch.tensor([3.0, 3.0, 3.0])}, "malformed segment tables"),
        ({"state_shape": (4, 3)}, r"state shape \(4, 3\) for 9 state elements"),
        ({"elem_mask": torch.ones(5, dtype=torch.bool)}, "element mask"),
        ({"numel": "24x"}, "malformed"),
    ]
    for change, match in cases:
        sd = opt_a.state_dict()
        sd["allo_layouts"][0] = {**sd["allo_layouts"][0], **change}
        with pytest.raises(ValueError, match=r"^saved layout of param 0 \(shape \(8, 3\)\)") as info:
            opt.load_state_dict(sd)
        assert re.search(match, str(info.value)), (match, str(info.value))
    sd = opt_a.state_dict()
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"][:2]
    with pytest.raises(ValueError, match=r"'exp_avg': 6\} elements but its saved layout selects 9"):
        opt.load_state_dict(sd)
    assert len(opt.state) == 0


@pytest.mark.parametrize("element", [False, True])
def test_state_saved_under_another_mask_is_remapped_by_row(element):
    """Same row count, other rows: each saved row's moments go to the same parameter row, or are dropped."""
    rows_a, rows_b = [0, 1, 4], [1, 4, 6]
    mask_a = _row_mask(8, rows_a)
    mask_b = _row_mask(8, rows_b)
    if element:  # element masks: state lives on rows holding a selected element
        mask_a = mask_a[:, None].expand(8, 3).clone()
        mask_a[:, 1] = False
        mask_b = mask_b[:, None].expand(8, 3).clone()
    p, opt_a = _trained(mask_a)
    q = p.detach().clone().requires_grad_()
    opt_b = SparseAdamW([q], lr=1e-2, masks={q: mask_b}, backend="torch")
    with pytest.warns(UserWarning, match=r"2 of the 3 saved rows kept their moments, 1 newly selected rows start"):
        opt_b.load_state_dict(opt_a.state_dict())
    m_a, m_b = opt_a.state[p]["exp_avg"], opt_b.state[q]["exp_avg"]
    assert m_b.shape == (3, 3)
    assert torch.equal(m_b[0], m_a[1]) and torch.equal(m_b[1], m_a[2])  # rows 1 and 4
    assert torch.equal(m_b[2], torch.zeros(3))  # row 6 was not selected under A


def test_bad_masks_raise_clear_errors():
    p = torch.randn(6, 4, requires_grad=True)
    stranger = torch.randn(6, 4, requires_grad=True)
    with pytest.raises(TypeError, match=r"torch\.bool"):
        SparseAdamW([p], masks={p: torch.ones(6)})
    with pytest.raises(ValueError, match=r"shape \(6,\) \(rows\) or \(6, 4\)"):
        SparseAdamW([p], masks={p: torch.ones(5, dtype=torch.bool)})
    with pytest.raises(ValueError, match="is on meta"):
        SparseAdamW([p], masks={p: torch.ones(6, dtype=torch.bool, device="meta")})
    with pytest.raises(ValueError, match="not in this optimizer"):
        SparseAdamW([p], masks={stranger: torch.ones(6, dtype=torch.bool)})
    with pytest.raises(TypeError, match="masks must be a dict"):
        SparseAdamW([p], masks=[torch.ones(6, dtype=torch.bool)])
    with pytest.raises(ValueError, match="one mask"):
        SparseAdamW([{"params": [p, stranger], "mask": torch.ones(6, dtype=torch.bool)}])
    with pytest.raises(ValueError, match="betas"):
        SparseAdamW([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="backend"):
        SparseAdamW([p], backend="cuda")


@pytest.mark.parametrize(
    "pdtype,gdtype,master,amsgrad,element",
    [
        (torch.float32, torch.float32, False, False, False),
        (torch.float32, torch.float32, False, True, True),
        (torch.bfloat16, torch.bfloat16, True, False, True),
        (torch.bfloat16, torch.bfloat16, False, True, False),
        (torch.float16, torch.float16, True, True, False),
    ],
)
@pytest.mark.skipif(not _native.available(), reason="native library not built")
def test_native_matches_reference(pdtype, gdtype, master, amsgrad, element):
    # big enough for several OpenMP chunks (16384 elements) with segments that straddle chunk edges
    g = torch.Generator().manual_seed(9)
    shape = (700, 130)
    w0 = torch.randn(shape, generator=g).to(pdtype)
    mask = (torch.rand(shape, generator=g) < 0.05) if element else (torch.rand(shape[0], generator=g) < 0.45)
    out = {}
    for backend in ("torch", "native"):
        p = w0.clone().requires_grad_()
        opt = SparseAdamW(
            [p], lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, masks={p: mask}, master_weights=master, backend=backend
        )
        gg = torch.Generator().manual_seed(10)
        for _ in range(3):
            p.grad = torch.randn(shape, generator=gg).to(gdtype)
            opt.step()
        out[backend] = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    (pr, sr), (pn, sn) = out["torch"], out["native"]
    sel = mask if element else mask[:, None].expand(shape)
    assert torch.equal(pn[~sel], w0[~sel])
    for k in sr:
        if k != "step":
            torch.testing.assert_close(sn[k], sr[k], atol=1e-6, rtol=1e-5)
    if pdtype == torch.float32:
        torch.testing.assert_close(pn, pr, atol=1e-6, rtol=1e-5)
    else:  # fp32 values one ulp apart may round to neighbouring low-precision values
        torch.testing.assert_close(pn.float(), pr.float(), atol=1e-3, rtol=1e-2)


def test_missing_native_library_warns_and_falls_back(monkeypatch):
    monkeypatch.setattr(_native, "_loaded", True)
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setattr(_native, "_error", "no allo_kernels/_native*.so found (test)")
    monkeypatch.setattr(sa_mod, "_warned_no_native", False)
    monkeypatch.delenv("ALLO_KERNELS_BACKEND", raising=False)
    torch.manual_seed(11)
    p = torch.randn(8, 3, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt = SparseAdamW([p], lr=1e-2, weight_decay=0.01, backend="native")
    ref = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.01)
    p.grad = torch.randn(8, 3)
    q.grad = p.grad.clone()
    with pytest.warns(RuntimeWarning, match="native CPU library .* not available"):
        opt.step()
    ref.step()
    assert torch.equal(p, q)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # warned once only


def test_zero_param_groups_drops_all_false_masks_and_frozen_only_groups():
    from allo_kernels.optim import zero_param_groups

    a, b, c = (torch.randn(4, 3, requires_grad=True) for _ in range(3))
    frozen = torch.randn(2, requires_grad=False)
    groups = [
        {"params": [a, b], "weight_decay": 0.1},
        {"params": [c], "mask": torch.zeros(4, dtype=torch.bool)},  # all-false mask: the whole group goes
        {"params": [frozen]},
    ]
    out, masks = zero_param_groups(
        groups, {b: torch.zeros(4, 3, dtype=torch.bool), a: torch.tensor([1, 0, 1, 0]).bool()}
    )
    assert len(out) == 1 and out[0]["params"] == [a] and out[0]["weight_decay"] == 0.1
    assert list(masks) == [a]
    assert not b.requires_grad and not c.requires_grad
    opt = SparseAdamW(out, masks=masks, backend="torch")  # accepted as is
    assert opt.mask_of(a) is not None


def test_bind_requires_deepspeed_engine_shapes():
    p = torch.randn(4, 3, requires_grad=True)
    opt = SparseAdamW([p], masks={p: torch.ones(4, dtype=torch.bool)}, backend="torch")
    with pytest.raises(RuntimeError, match="bind"):
        opt.export_state()


_ISA_SCRIPT = r"""
import sys, torch
from allo_kernels.optim import SparseAdamW, _native
g = torch.Generator().manual_seed(3)
out = {"isa": _native.isa()}
for name, dtype, master, amsgrad in (("f32", torch.float32, False, True), ("bf16", torch.bfloat16, True, False)):
    p = torch.randn(300, 70, generator=g).to(dtype).requires_grad_()
    opt = SparseAdamW([p], lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, masks={p: torch.rand(300, generator=g) < 0.6},
                      master_weights=master, backend="native")
    for _ in range(3):
        p.grad = torch.randn(300, 70, generator=g).to(dtype)
        opt.step()
    out[name] = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
torch.save(out, sys.argv[1])
"""


@pytest.mark.skipif(not _native.available(), reason="native library not built")
def test_native_vector_builds_agree_bit_for_bit(tmp_path):
    # The portable, AVX2 and AVX-512 builds of the step share one op sequence with explicit fma and correctly rounded
    # sqrt/div, so every build the CPU can run must give identical bits. Each cap runs in its own process because the
    # choice is made once, when the library loads.
    import os
    import subprocess
    import sys

    results = {}
    for cap in ("default", "avx2", None):
        env = {k: v for k, v in os.environ.items() if k != "ALLO_NATIVE_ISA"}
        if cap is not None:
            env["ALLO_NATIVE_ISA"] = cap
        path = tmp_path / f"{cap}.pt"
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path)], env=env, check=True, timeout=120)
        results[cap] = torch.load(path)
    assert results["default"]["isa"] == "default"
    assert results["avx2"]["isa"] in ("default", "avx2")
    assert results[None]["isa"] == _native.isa()
    base = results["default"]
    for cap in ("avx2", None):
        for name in ("f32", "bf16"):
            (p0, s0), (p1, s1) = base[name], results[cap][name]
            assert torch.equal(p0, p1), (cap, name)
            assert s0.keys() == s1.keys()
            for k in s0:
                assert torch.equal(s0[k], s1[k]), (cap, name, k)
