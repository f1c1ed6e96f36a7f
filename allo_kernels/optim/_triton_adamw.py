"""Triton kernel of SparseAdamW: one launch updates many tensors, driven by a table of selected-row blocks.

Design (why a table of offsets and not of pointers): Triton kernels take typed base pointers, so tensors are grouped
by (param dtype, grad dtype, master?, amsgrad?, element mask?, alignment) and one launch runs per group. Inside a group
every tensor is addressed as ``base + offset``, with the element offset of each tensor from the group's first tensor
of the same role (param, grad, exp_avg, ...) kept in a small per-step table ``tensor_offsets [T, 7]`` (int64) next to
the per-tensor scalars ``tensor_scalars [T, 8]`` (fp32: decay, lerp weight, beta2, 1-beta2, sqrt(bias correction 2),
eps, -step size, grad sign). These two tables (T rows) are the only host-to-device copy per step.
The block table ``[n_blocks, 4]`` = (tensor, param element, compact state element, valid elements) is derived on the
device from each layout's segment table once and cached: masks never travel host-to-device after setup.

Each program updates one block of up to BLOCK consecutive elements of one segment, CHUNK elements per loop iteration
(4 per thread: one 128-bit access per fp32 stream, 64-bit per bf16/fp16 stream), so the two dependent table loads at
its start are paid once per BLOCK elements and the loop holds only the data streams.

Vector accesses need the compiler to know that every offset is a multiple of the vector length. The offsets are
loaded at run time, so the host tells it: ``ALIGN`` (a constexpr) is the largest power of two up to 16 that divides
every segment start, compact start, segment length and per-tensor offset of the group (from the layout's cached CPU
tables, no sync per step); the kernel states it with ``tl.multiple_of``. ALIGN = 1 (e.g. ZeRO partitions cut at
arbitrary elements) compiles the same kernel with scalar accesses. With element masks the loads stay vectorized and
the stores are predicated per element (an element that is not selected is never written).

Arithmetic follows torch.optim.AdamW (see _reference.py) with IEEE-rounded sqrt and division (``tl.sqrt_rn``,
``tl.div_rn``) and fma where torch's CPU kernels use one, so results agree with the reference to about one ulp; bf16
/ fp16 params are rounded to nearest even (``to_rne``), on the GPU and under the interpreter alike.
"""

from __future__ import annotations

import torch

from .._backend import triton_available
from ._layout import Layout

if triton_available():
    import triton
    import triton.language as tl

    from .._triton_rounding import to_rne
else:  # pragma: no cover
    triton = None
    tl = None

# Elements per program, and per loop iteration (4 per thread of NUM_WARPS warps). Tests shrink them (monkeypatch) to
# exercise many blocks per segment and many iterations per block on small tensors.
BLOCK = 4096
NUM_WARPS = 4
CHUNK = 4 * 32 * NUM_WARPS
MAX_ALIGN = 16

if triton is not None:

    @triton.jit
    def _sparse_adamw_kernel(
        blocks_ptr,
        toff_ptr,
        tsc_ptr,
        p_base,
        g_base,
        m_base,
        v_base,
        vmax_base,
        master_base,
        emask_base,
        HAS_MASTER: tl.constexpr,
        AMSGRAD: tl.constexpr,
        HAS_EMASK: tl.constexpr,
        ALIGN: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        t = tl.load(blocks_ptr + b * 4)
        p_el = tl.load(blocks_ptr + b * 4 + 1)
        s_el = tl.load(blocks_ptr + b * 4 + 2)
        n_valid = tl.load(blocks_ptr + b * 4 + 3)
        # Element offsets of this block in every stream (a stream the group lacks gets 0 and is never touched).
        p_off = tl.load(toff_ptr + t * 7) + p_el
        g_off = tl.load(toff_ptr + t * 7 + 1) + p_el
        m_off = tl.load(toff_ptr + t * 7 + 2) + s_el
        v_off = tl.load(toff_ptr + t * 7 + 3) + s_el
        x_off = tl.load(toff_ptr + t * 7 + 4) + s_el
        w_off = tl.load(toff_ptr + t * 7 + 5) + s_el
        e_off = tl.load(toff_ptr + t * 7 + 6) + s_el
        if ALIGN > 1:
            p_off = tl.multiple_of(p_off, ALIGN)
            g_off = tl.multiple_of(g_off, ALIGN)
            m_off = tl.multiple_of(m_off, ALIGN)
            v_off = tl.multiple_of(v_off, ALIGN)
            x_off = tl.multiple_of(x_off, ALIGN)
            w_off = tl.multiple_of(w_off, ALIGN)
            e_off = tl.multiple_of(e_off, ALIGN)
            n_valid = tl.multiple_of(n_valid, ALIGN)
        decay = tl.load(tsc_ptr + t * 8)
        w = tl.load(tsc_ptr + t * 8 + 1)
        beta2 = tl.load(tsc_ptr + t * 8 + 2)
        omb2 = tl.load(tsc_ptr + t * 8 + 3)
        bc2_sqrt = tl.load(tsc_ptr + t * 8 + 4)
        eps = tl.load(tsc_ptr + t * 8 + 5)
        neg_step = tl.load(tsc_ptr + t * 8 + 6)
        g_sign = tl.load(tsc_ptr + t * 8 + 7)

        offs = tl.arange(0, CHUNK)
        for start in range(0, n_valid, CHUNK):
            idx = start + offs
            live = idx < n_valid
            g = tl.load(g_base + g_off + idx, mask=live, other=0.0).to(tl.float32) * g_sign
            if HAS_MASTER:
                p = tl.load(master_base + w_off + idx, mask=live, other=0.0)
            else:
                p = tl.load(p_base + p_off + idx, mask=live, other=0.0).to(tl.float32)
            m = tl.load(m_base + m_off + idx, mask=live, other=0.0)
            v = tl.load(v_base + v_off + idx, mask=live, other=0.0)
            write = live
            if HAS_EMASK:
                write = live & (tl.load(emask_base + e_off + idx, mask=live, other=0) != 0)

            p_new = p * decay
            d = g - m
            # torch's lerp: weight < 0.5 -> m + w * (g - m), else g - (g - m) * (1 - w); both as one fma
            m_new = tl.where(w < 0.5, tl.fma(d, w, m), tl.fma(d, w - 1.0, g))
            v_new = tl.fma(omb2 * g, g, v * beta2)
            if AMSGRAD:
                vmax = tl.load(vmax_base + x_off + idx, mask=live, other=0.0)
                vmax = tl.maximum(vmax, v_new, propagate_nan=tl.PropagateNan.ALL)
                tl.store(vmax_base + x_off + idx, vmax, mask=write)
                denom = tl.div_rn(tl.sqrt_rn(vmax), bc2_sqrt) + eps
            else:
                denom = tl.div_rn(tl.sqrt_rn(v_new), bc2_sqrt) + eps
            p_new = p_new + tl.div_rn(neg_step * m_new, denom)

            tl.store(m_base + m_off + idx, m_new, mask=write)
            tl.store(v_base + v_off + idx, v_new, mask=write)
            if HAS_MASTER:
                tl.store(master_base + w_off + idx, p_new, mask=write)
            tl.store(p_base + p_off + idx, to_rne(p_new, p_base.dtype.element_ty), mask=write)


def _block_table(layout: Layout, block: int) -> torch.Tensor:
    """[n_blocks, 3] int64 (param element, state element, valid count) of one layout, built on its device, cached."""
    key = ("blocks", block)
    cache = layout._derived
    if key not in cache:
        lens = layout.seg_len
        n_blk = (lens + block - 1) // block
        total = int(n_blk.sum().item()) if n_blk.numel() else 0
        seg_of = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), n_blk, output_size=total)
        first = torch.cumsum(n_blk, 0) - n_blk
        within = (torch.arange(total, device=lens.device) - first[seg_of]) * block
        cache[key] = torch.stack(
            [
                layout.seg_param[seg_of] + within,
                layout.seg_state[seg_of] + within,
                torch.clamp(lens[seg_of] - within, max=block),
            ],
            dim=1,
        ).contiguous()
    return cache[key]


def _pow2_divisor(values: torch.Tensor | list[int]) -> int:
    """Largest power of two up to MAX_ALIGN that divides every value (MAX_ALIGN for none)."""
    values = torch.as_tensor(values, dtype=torch.int64)
    align = MAX_ALIGN
    while align > 1 and bool((values % align).any()):
        align //= 2
    return align


def _layout_alignment(layout: Layout) -> int:
    """Alignment (in elements) of every segment start, compact start and length of a layout; cached."""
    cache = layout._derived
    if "align" not in cache:
        seg_param, seg_state, seg_len, _ = layout.cpu_tables()
        cache["align"] = _pow2_divisor(torch.cat([seg_param, seg_state, seg_len]))
    return cache["align"]


def _offset(t: torch.Tensor | None, base: torch.Tensor | None) -> int:
    if t is None or base is None:
        return 0
    delta = t.data_ptr() - base.data_ptr()
    if delta % t.element_size():
        raise RuntimeError("internal: tensors of one Triton group are not element-aligned to each other")
    return delta // t.element_size()


def triton_step(work: list) -> None:
    """work: list of (param, grad, layout, exp_avg, exp_avg_sq, max_exp_avg_sq, master, StepScalars)."""
    groups: dict[tuple, list] = {}
    for item in work:
        p, g, layout, m, v, vmax, master, sc = item
        align = min(_layout_alignment(layout), _pow2_divisor([BLOCK]))
        key = (p.device, p.dtype, g.dtype, master is not None, vmax is not None, layout.elem_mask is not None, align)
        groups.setdefault(key, []).append(item)
    chunk = min(CHUNK, BLOCK)
    for (device, _pd, _gd, has_master, amsgrad, has_emask, align), items in groups.items():
        base = items[0]
        bases = [base[0], base[1], base[3], base[4], base[5], base[6], base[2].elem_mask]
        toff, tsc, tables = [], [], []
        for ti, (p, g, layout, m, v, vmax, master, sc) in enumerate(items):
            toff.append(
                [
                    _offset(p, bases[0]),
                    _offset(g, bases[1]),
                    _offset(m, bases[2]),
                    _offset(v, bases[3]),
                    _offset(vmax, bases[4]),
                    _offset(master, bases[5]),
                    _offset(layout.elem_mask, bases[6]),
                ]
            )
            tsc.append(
                [
                    sc.decay,
                    1 - sc.beta1,
                    sc.beta2,
                    1 - sc.beta2,
                    sc.bias_correction2_sqrt,
                    sc.eps,
                    -sc.step_size,
                    -1.0 if sc.maximize else 1.0,
                ]
            )
            blk = _block_table(layout, BLOCK)
            tables.append(torch.cat([torch.full((blk.shape[0], 1), ti, dtype=torch.int64, device=device), blk], 1))
        align = min(align, _pow2_divisor([o for row in toff for o in row]))
        blocks = torch.cat(tables, 0).contiguous()
        n_blocks = blocks.shape[0]
        if n_blocks == 0:
            continue
        pin = device.type == "cuda"
        toff_t = torch.tensor(toff, dtype=torch.int64, pin_memory=pin).to(device, non_blocking=True)
        tsc_t = torch.tensor(tsc, dtype=torch.float32, pin_memory=pin).to(device, non_blocking=True)
        dummy = bases[2]
        emask_base = bases[6].view(torch.uint8) if bases[6] is not None else dummy
        _sparse_adamw_kernel[(n_blocks,)](
            blocks,
            toff_t,
            tsc_t,
            bases[0],
            bases[1],
            bases[2],
            bases[3],
            bases[4] if bases[4] is not None else dummy,
            bases[5] if bases[5] is not None else dummy,
            emask_base,
            HAS_MASTER=has_master,
            AMSGRAD=amsgrad,
            HAS_EMASK=has_emask,
            ALIGN=align,
            CHUNK=chunk,
            num_warps=NUM_WARPS,
        )
