"""Down-casts in Triton kernels that round to nearest even on the GPU and under ``TRITON_INTERPRET=1`` alike.

On a GPU ``x.to(tl.bfloat16)`` is one ``cvt.rn`` instruction: round to nearest, ties to even (what torch's
``.to(torch.bfloat16)`` does). Triton's interpreter (3.x) instead *truncates* fp32 -> bf16 (it drops the low 16 bits;
its ``fp_downcast_rounding="rtne"`` mode rounds ties up and can carry a full mantissa into the exponent bits), so the
CPU test suite would not see what the GPU computes. ``to_rne`` keeps the single ``cvt.rn`` on the GPU and, only under
the interpreter, rounds explicitly in integer arithmetic on the fp32 bits:

    bits    = bitcast<u32>(x)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)      (ties go to the even upper half; a carry rolls into the exponent,
    bf16    = rounded >> 16                            so the largest finite values round to inf, as on the GPU)
    NaN     -> 0x7FC0 (a quiet NaN, as torch gives)

fp32 -> fp16 is already correct under the interpreter (numpy's conversion rounds to nearest even), and fp32 -> fp32
is the identity.
"""

from __future__ import annotations

from ._backend import interpreter_enabled, triton_available

if triton_available():
    import triton
    import triton.language as tl

    # Fixed when this module is imported, as triton.jit itself decides interpreter vs compiler at decoration time.
    INTERPRETED = tl.constexpr(interpreter_enabled())

    @triton.jit
    def to_rne(x, dtype: tl.constexpr):
        """fp32 ``x`` rounded to nearest even in ``dtype`` (bf16 / fp16 / fp32)."""
        if INTERPRETED and dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            upper = tl.where(x != x, 0x7FC0, rounded)
            return upper.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(dtype)
