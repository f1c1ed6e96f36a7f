"""Down-casts in our Triton kernels round to nearest even under TRITON_INTERPRET=1, as on a GPU (issue 11.18).

Triton 3.9's interpreter truncates fp32 -> bf16; ``to_rne`` rounds explicitly there and is a plain ``.to()`` (one
``cvt.rn``) when compiled (tests/test_gpu_codegen.py checks the PTX).
"""

import pytest
import torch

import allo_kernels as ak
from allo_kernels._backend import interpreter_enabled

pytestmark = pytest.mark.skipif(not interpreter_enabled(), reason="checks the interpreter's rounding")

triton = pytest.importorskip("triton")
tl = triton.language

from allo_kernels._triton_rounding import to_rne  # noqa: E402


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n)
    tl.store(y_ptr + i, to_rne(x, y_ptr.dtype.element_ty), mask=i < n)


def _hard_values() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(2048, generator=g) * torch.logspace(-42, 38, 2048)
    upper = torch.randint(0, 2**15, (512,), generator=g, dtype=torch.int32) << 16
    ties = (upper | 0x8000).view(torch.float32)  # exactly halfway between two bf16 values: even and odd uppers
    near = torch.cat([(upper | 0x7FFF).view(torch.float32), (upper | 0x8001).view(torch.float32)])
    special = torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.4028235e38, -3.4028235e38, 3.3961776e38]
        + [1e-45, -1e-45, 1.1754942e-38, 65504.0, 65520.0, 6.0e-8, 2.9e-8]
    )
    return torch.cat([spread, ties, near, special])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_to_rne_matches_torch_bit_for_bit(dtype):
    x = _hard_values()
    y = torch.empty(x.shape, dtype=dtype)
    _round_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    expect = x.to(dtype)
    same_bits = y.view(torch.uint8).view(-1, y.element_size()) == expect.view(torch.uint8).view(-1, y.element_size())
    same = same_bits.all(-1) | (torch.isnan(y) & torch.isnan(expect))
    assert bool(same.all()), x[~same][:8]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_token_logprobs_half_gradients_round_like_torch(dtype, backend, monkeypatch):
    """The half-precision gradient is exactly torch's ``.to(dtype)`` of the kernel's fp32 gradient: the fp32 run of
    the same kernel on the same (exactly widened) logits computes that fp32 gradient bit for bit."""
    from allo_kernels.ops import token_logprobs as op

    monkeypatch.setattr(op, "MAX_BLOCK_V", 64)
    backend("triton")
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(6, 301, generator=g) * 4).to(dtype)
    labels = torch.randint(0, 301, (6,), generator=g)
    upstream = torch.randn(6, generator=g)
    grads = {}
    for t in (logits, logits.float()):
        x = t.clone().requires_grad_()
        ak.token_logprobs(x, labels).backward(upstream)
        grads[t.dtype] = x.grad
    expect = grads[torch.float32].to(dtype)
    mismatched = (grads[dtype].view(torch.int16) != expect.view(torch.int16)).sum()
    assert int(mismatched) == 0
