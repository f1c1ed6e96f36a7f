"""token_scores: log-probs + rewards + per-sequence top-percentile mask + weighted sums, against the alternatives.

Implementations (``impl`` in the results):

* ``allo``            ``allo_kernels.token_scores(logits, labels, ref_logprobs=ref, weights=w, mask_fraction=f,
                      mask_by="highest")`` (Triton on CUDA: one read of the logits forward, one backward, the
                      selection in a Triton rank kernel without a host sync). On CPU the torch reference path.
* ``token_logprobs``  ``allo_kernels.token_logprobs`` alone (the per-token log-probs and nothing else), backward with
                      the same dense upstream gradient ``w`` (independent of the mask; measured again in each mask
                      group so that every table row has its own side-by-side number): the DESIGN target is
                      ``allo`` <= 1.05x its time, i.e. a "speedup" column >= 0.95 in the rendered table.
* ``official_eager``  the official ALLO code path, written here from its description (RUCAIBox/ALLO
                      ``train_improving.py`` / ``train_forgetting.py``): ``logits.float()``, per-token
                      ``cross_entropy(reduction="none")``, log-ratio ``logp - ref``, then ``gen_mask``: a Python loop
                      over the rows that builds the mask in a CPU tensor (one top-k per row, each row copied to the
                      host), moved back to the device; keeps the ``k = int(eps * T)`` lowest-log-ratio tokens of each
                      row (exact-zero log-ratios count as padding), ``eps = 1 - f``. DESIGN target: ``allo`` >= 5x.

The mask: ``f`` = fraction of the valid tokens of each sequence that is masked. ``f = 0.9`` is ALLO's improving stage
(keep the 10% lowest-reward tokens: ``eps = 0.1``), ``f = 0.1`` masks the top 10%. ``allo`` masks ``floor(f * n)`` of
the ``n`` valid tokens (keeps ``ceil(eps * n)``), the official code keeps ``int(eps * T)``: the counts can differ by one
token per row (``tests/test_benchmark_baselines.py`` checks equality where they coincide); the cost does not.

Cases: ``fwd`` (forward on logits that require grad), ``full`` (forward + backward of ``seq_logprobs.sum()`` into the
logits; for ``token_logprobs`` the backward of ``(logp * w).sum()``). Labels are all valid (the worst case for our
kernels: masked or ignored rows skip their backward reads, so ``f = 0.9`` reads only 10% of the rows backward).
Minimum traffic used for GB/s: fwd reads B*T*V elements; full adds one write of the gradient and one more read of the
rows whose upstream gradient is non-zero (for ``allo`` the (1 - f) kept rows; all rows for the others).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import allo_kernels
from allo_kernels._backend import select_backend
from allo_kernels.ops.token_logprobs import token_logprobs_reference
from benchmarks.conftest import bench_device, dtype_name, pick_shapes, record_skip, run_case

SUITE = "token_scores"
DEVICE = bench_device()
# (B, T, V): B*T = 16384 tokens on GPU (the DESIGN target shape), small on CPU.
SHAPES = pick_shapes(cpu=[(4, 128, 1000), (4, 128, 16000)], gpu=[(16, 1024, 128256)])
DTYPES = {"bf16": torch.bfloat16} if DEVICE.type == "cuda" else {"fp32": torch.float32}
MASK_FRACTIONS = (0.1, 0.9)
MODES = ("fwd", "full")
IMPLS = ("allo", "token_logprobs", "official_eager")
BETA = 0.1


# ------------------------------------------------------------------------------------------------ implementations
def official_gen_mask(logratios: torch.Tensor, eps: float) -> torch.Tensor:
    """ALLO's ``MaskDPOTrainer.dpo_loss.gen_mask(eps, logratios, -1)``: 1.0 for the ``int(eps * T)`` tokens of each row
    with the lowest log-ratio (ties at the threshold all kept; exact zeros = padding, never kept unless a row has too
    few other tokens). Built in a CPU tensor row by row, as the official code does, then moved to the device."""
    with torch.no_grad():
        num_selected = int(logratios.size(-1) * eps)
        mask = torch.zeros(logratios.size(0), logratios.size(1))
        for i in range(logratios.size(0)):
            cand = logratios[i, :] * -1
            cand = torch.where(cand == 0, -1e10, cand)
            tk = cand.topk(num_selected).values[-1]
            mask[i, :] = torch.where(cand >= tk, 1.0, 0.0)
        return mask.to(logratios.device)


def official_token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``train_forgetting.py``: ``logits.float()`` then ``-CrossEntropyLoss(reduction="none")`` per token (0 at
    ignored)."""
    v = logits.shape[-1]
    logp = -F.cross_entropy(
        logits.float().reshape(-1, v), labels.reshape(-1), reduction="none", ignore_index=ignore_index
    )
    return logp.view(labels.shape)


def official_eager_scores(logits, labels, ref, weights, *, eps: float, ignore_index: int = -100):
    """Official-style per-sequence masked, weighted sums: ``sum_t mask_t * w_t * logp_t`` (and of ``ref``)."""
    logp = official_token_logprobs(logits, labels, ignore_index)
    ref = torch.where(labels != ignore_index, ref, torch.zeros_like(ref))  # the official data has 0 there
    mask = official_gen_mask(logp.detach() - ref, eps)
    coef = mask * weights
    return (logp * coef).sum(-1), (ref * coef).sum(-1), mask


def allo_scores(logits, labels, ref, weights, *, mask_fraction: float):
    s = allo_kernels.token_scores(
        logits, labels, ref_logprobs=ref, weights=weights, beta=BETA, mask_fraction=mask_fraction, mask_by="highest"
    )
    return s.seq_logprobs, s


# ----------------------------------------------------------------------------------------------------------- inputs
_INPUTS: dict = {}


def make_inputs(b: int, t: int, v: int, dtype: torch.dtype):
    """Logits (leaf, requires grad) [B, T, V], labels, reference log-probs and weights; one set alive at a time."""
    key = (b, t, v, dtype)
    if key not in _INPUTS:
        _INPUTS.clear()
        gen = torch.Generator(device=DEVICE).manual_seed(4321 + b * t + v)
        logits = torch.randn(b, t, v, dtype=dtype, device=DEVICE, generator=gen).requires_grad_()
        labels = torch.randint(0, v, (b, t), device=DEVICE, generator=gen)
        # reference log-probs near the policy's (random logits: about -log V - 0.5), so the log-ratios straddle 0
        ref = -torch.log(torch.tensor(float(v))) - 0.5 + torch.randn(b, t, device=DEVICE, generator=gen)
        weights = torch.rand(b, t, device=DEVICE, generator=gen)
        _INPUTS[key] = (logits, labels, ref, weights)
    return _INPUTS[key]


def skip_reason(impl: str) -> str | None:
    if impl in ("allo", "token_logprobs") and DEVICE.type != "cuda" and select_backend(DEVICE) == "triton":
        return (
            "Triton interpreter timings are meaningless: unset TRITON_INTERPRET / ALLO_KERNELS_BACKEND for benchmarks"
        )
    return None


def impl_note(impl: str) -> str | None:
    if impl in ("allo", "token_logprobs") and DEVICE.type != "cuda":
        return "CPU: torch reference path (the Triton kernels run on CUDA only)"
    if impl == "official_eager":
        return "logits.float() + CE(reduction=none) + per-row CPU top-k mask loop (RUCAIBox/ALLO)"
    return None


def _cases():
    for b, t, v in SHAPES:
        for dname in DTYPES:
            for f in MASK_FRACTIONS:
                for mode in MODES:
                    for impl in IMPLS:
                        yield pytest.param(
                            mode, impl, b, t, v, f, dname, id=f"{mode}-{impl}-{dname}-B{b}-T{t}-V{v}-f{f}"
                        )


def _params(b, t, v, f):
    return {"B": b, "T": t, "V": v, "mask": f}


@pytest.mark.parametrize(("mode", "impl", "b", "t", "v", "f", "dname"), list(_cases()))
def test_token_scores(benchmark, results, mode, impl, b, t, v, f, dname):
    reason = skip_reason(impl)
    if reason:
        record_skip(results, suite=SUITE, case=mode, impl=impl, params=_params(b, t, v, f), dtype=dname, reason=reason)
    dtype = DTYPES[dname]
    logits, labels, ref, weights = make_inputs(b, t, v, dtype)

    if impl == "allo":

        def forward():
            return allo_scores(logits, labels, ref, weights, mask_fraction=f)[0]

    elif impl == "token_logprobs":

        def forward():
            return allo_kernels.token_logprobs(logits, labels) * weights

    else:

        def forward():
            return official_eager_scores(logits, labels, ref, weights, eps=1.0 - f)[0]

    if mode == "fwd":
        # Sanity check once per (impl, shape): a fast wrong answer is not a result.
        with torch.no_grad():
            ref_logp = token_logprobs_reference(logits[:1].detach(), labels[:1])
            if impl == "allo":
                seq, s = allo_scores(logits, labels, ref, weights, mask_fraction=f)
                expect = (ref_logp * s.weights[:1]).sum(-1)
                kept = int(s.keep[0].sum())
                assert kept == t - int(f * t), (kept, t, f)
            elif impl == "official_eager":
                seq, _, mask = official_eager_scores(logits, labels, ref, weights, eps=1.0 - f)
                expect = (ref_logp * mask[:1] * weights[:1]).sum(-1)
            else:
                seq = forward().sum(-1)
                expect = (ref_logp * weights[:1]).sum(-1)
        torch.testing.assert_close(seq[:1].float(), expect, rtol=2e-3, atol=1e-2 * t)
        del seq

        def timed():
            return forward()

    else:

        def timed():
            out = forward()
            return torch.autograd.grad(out.sum(), logits)

    nv_bytes = b * t * v * torch.empty((), dtype=dtype).element_size()
    # backward: every gradient row is written, but only rows with a non-zero upstream gradient need reading
    read_back = 1.0 - f if impl == "allo" else 1.0
    bytes_moved = {"fwd": nv_bytes, "full": int((2 + read_back) * nv_bytes)}[mode]
    run_case(
        benchmark,
        results,
        suite=SUITE,
        case=mode,
        impl=impl,
        params=_params(b, t, v, f),
        dtype=dtype_name(dtype),
        fn=timed,
        bytes_moved=bytes_moved,
        ours=impl == "allo",
        note=impl_note(impl),
        extra={"backend": select_backend(DEVICE)} if impl != "official_eager" else None,
    )
