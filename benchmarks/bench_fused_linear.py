"""Fused-linear losses (hidden states x lm_head, the [N, V] logits never held) against unfused, eager and Liger.

Two suites, both timed as ``full`` (loss forward + backward into ``hidden`` and the lm_head ``weight``; Liger's
chunked losses compute their gradients inside the forward, so a forward-only comparison would be meaningless):

``fused_linear_dpo``: sigmoid DPO over a ``[chosen; rejected]`` batch of 2B rows, per-token reference log-probs given.

* ``allo``          ``allo_kernels.preference_loss(hidden, labels, lm_head_weight=W, ref_logprobs=ref)``: the token-
                    chunked fused-linear log-prob kernels (recompute backward, fp32 weight-gradient accumulator) and
                    ``losses.masked_dpo_loss`` on the per-sequence sums. On CPU the torch path of the same chunking.
* ``unfused``       our kernels on materialised logits: ``preference_loss(hidden @ W.T, labels, ref_logprobs=ref)``.
* ``eager_hf``      the eager Hugging Face / TRL-0.8 path (what the official ALLO code runs): ``logits = hidden @ W.T``
                    in the input dtype, ``log_softmax(logits.float())``, gather, masked per-sequence sums, sigmoid DPO.
* ``liger``         Liger-Kernel's ``LigerFusedLinearDPOLoss`` (``chunked_loss``; torch + ``torch.compile``, chunks
                    of one pair). Liger cannot take precomputed per-token reference log-probs: it recomputes them from
                    a reference model's hidden states and lm_head (``use_ref_model=True``, ``ref_input``,
                    ``ref_weight``), which is how TRL calls it; the reference here is that same pair, so all
                    implementations compute the same loss (checked before timing).
* ``liger_noref``   the same with ``use_ref_model=False`` (no reference pass: its cheapest setting, a lower bound).

``fused_linear_ce``: SFT cross-entropy, mean over the N tokens.

* ``allo``          ``fused_linear_token_logprobs`` + ``losses.sft_loss`` (mean NLL).
* ``unfused``       ``token_logprobs(hidden @ W.T)`` + ``sft_loss``.
* ``eager``         ``cross_entropy((hidden @ W.T).float(), labels)``.
* ``liger``         ``LigerFusedLinearCrossEntropyLoss`` (Triton; CUDA only).

Liger is optional (``pip install --no-deps liger-kernel``, see the README); its rows are skipped when it is not
importable. On CPU Liger's chunked DPO runs eagerly (``compiled=False``: no Inductor builds on small CPU boxes); its
CE kernel needs a GPU. DESIGN targets (GPU, B=16 pairs, T=1024, H=4096, V=128256, bf16): ``allo`` peak memory
<= 0.25x ``eager_hf`` and <= ``liger``; time <= ``liger`` and <= 1.1x ``unfused``.

Peak memory is the harness's: what one call allocates beyond its inputs (hidden, weight, labels, reference tensors),
the returned gradients included. Labels are all valid.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import allo_kernels
from allo_kernels._backend import select_backend
from benchmarks.conftest import (
    bench_device,
    dtype_name,
    format_shape,
    free_memory,
    is_oom,
    pick_shapes,
    record_skip,
    run_case,
)

DEVICE = bench_device()
ON_GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
BETA = 0.1

# (pairs B, T, H, V): 2B rows of T tokens.
DPO_SHAPES = pick_shapes(cpu=[(2, 128, 64, 2000), (2, 128, 128, 8000)], gpu=[(16, 1024, 4096, 128256)])
# (N tokens, H, V)
CE_SHAPES = pick_shapes(cpu=[(256, 64, 2000), (1024, 128, 8000)], gpu=[(4096, 4096, 128256), (32768, 4096, 128256)])
DPO_IMPLS = ("allo", "unfused", "eager_hf", "liger", "liger_noref")
CE_IMPLS = ("allo", "unfused", "eager", "liger")


# ------------------------------------------------------------------------------------------------ implementations
def eager_hf_dpo(hidden, weight, labels, ref, *, beta: float = BETA, ignore_index: int = -100):
    """HF lm_head + TRL-0.8 ``get_batch_logps`` (as in RUCAIBox/ALLO) + sigmoid DPO on per-sequence sums."""
    logits = hidden @ weight.t()  # the model's lm_head, in the model's dtype
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    seq = (logp * valid).sum(-1)
    ref_seq = (ref * valid).sum(-1)
    half = labels.shape[0] // 2
    margin = (seq[:half] - ref_seq[:half]) - (seq[half:] - ref_seq[half:])
    return -F.logsigmoid(beta * margin).mean()


def allo_dpo(hidden, weight, labels, ref):
    return allo_kernels.preference_loss(hidden, labels, lm_head_weight=weight, ref_logprobs=ref, beta=BETA)[0]


def unfused_dpo(hidden, weight, labels, ref):
    return allo_kernels.preference_loss(hidden @ weight.t(), labels, ref_logprobs=ref, beta=BETA)[0]


def eager_ce(hidden, weight, labels, ignore_index: int = -100):
    logits = hidden @ weight.t()
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index)


def allo_ce(hidden, weight, labels):
    logp = allo_kernels.fused_linear_token_logprobs(hidden, weight, labels)
    return allo_kernels.losses.sft_loss(logp, labels != -100)[0]


def unfused_ce(hidden, weight, labels):
    logp = allo_kernels.token_logprobs(hidden @ weight.t(), labels)
    return allo_kernels.losses.sft_loss(logp, labels != -100)[0]


def liger_modules():
    """(LigerFusedLinearDPOLoss, LigerFusedLinearCrossEntropyLoss) or None when liger_kernel is not importable."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:
        return None
    return LigerFusedLinearDPOLoss, LigerFusedLinearCrossEntropyLoss


_LIGER_LOSSES: dict = {}


def liger_dpo(hidden, weight, labels, ref_hidden=None, ref_weight=None):
    """Liger's fused DPO (sum of token log-probs, sigmoid, beta). With ``ref_hidden``/``ref_weight`` it computes the
    reference log-probs itself; without, the reference is 0."""
    use_ref = ref_hidden is not None
    key = ("dpo", use_ref)
    if key not in _LIGER_LOSSES:
        dpo_cls = liger_modules()[0]
        # compiled=True is Liger's default and how it is used on GPUs; on CPU its torch code runs eagerly.
        _LIGER_LOSSES[key] = dpo_cls(beta=BETA, use_ref_model=use_ref, compiled=ON_GPU, average_log_prob=False)
    if use_ref:
        out = _LIGER_LOSSES[key](weight, hidden, labels, ref_input=ref_hidden, ref_weight=ref_weight)
    else:
        out = _LIGER_LOSSES[key](weight, hidden, labels)
    return out[0] if isinstance(out, tuple) else out


def liger_ce(hidden, weight, labels):
    if "ce" not in _LIGER_LOSSES:
        _LIGER_LOSSES["ce"] = liger_modules()[1](ignore_index=-100, reduction="mean")
    return _LIGER_LOSSES["ce"](weight, hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1))


def skip_reason(impl: str, suite: str) -> str | None:
    if impl in ("allo", "unfused") and not ON_GPU and select_backend(DEVICE) == "triton":
        return (
            "Triton interpreter timings are meaningless: unset TRITON_INTERPRET / ALLO_KERNELS_BACKEND for benchmarks"
        )
    if impl.startswith("liger"):
        if liger_modules() is None:
            return "liger_kernel is not importable (pip install --no-deps liger-kernel, see benchmarks/README.md)"
        if suite == "fused_linear_ce" and not ON_GPU:
            return "CPU: Liger's fused-linear cross-entropy is a Triton kernel (GPU only)"
    return None


def impl_note(impl: str, suite: str) -> str | None:
    if impl in ("allo", "unfused") and not ON_GPU:
        return "CPU: torch path of our ops (the Triton kernels run on CUDA only)"
    if impl == "liger" and suite == "fused_linear_dpo":
        return "reference log-probs recomputed from ref_input x ref_weight (Liger takes no precomputed ones)"
    if impl == "liger_noref":
        return "use_ref_model=False (no reference pass): Liger's cheapest setting"
    if impl.startswith("liger") and not ON_GPU:
        return "CPU: compiled=False"
    return None


# ----------------------------------------------------------------------------------------------------------- inputs
_INPUTS: dict = {}


def _weight(v: int, h: int, gen) -> torch.Tensor:
    # logits of std ~1 for unit-variance hidden states
    return (torch.randn(v, h, device=DEVICE, generator=gen) * h**-0.5).to(DTYPE)


def dpo_inputs(b: int, t: int, h: int, v: int):
    """hidden [2B, T, H] and W [V, H] (leaves that require grad), labels [2B, T], a reference model's hidden states and
    lm_head (a small perturbation of the policy's), and its per-token log-probs (computed once, untimed)."""
    key = ("dpo", b, t, h, v)
    if key not in _INPUTS:
        _INPUTS.clear()
        gen = torch.Generator(device=DEVICE).manual_seed(77 + b + t + h + v)
        hidden = torch.randn(2 * b, t, h, device=DEVICE, generator=gen).to(DTYPE).requires_grad_()
        weight = _weight(v, h, gen).requires_grad_()
        labels = torch.randint(0, v, (2 * b, t), device=DEVICE, generator=gen)
        ref_hidden = (hidden.detach() + 0.1 * torch.randn(hidden.shape, device=DEVICE, generator=gen)).to(DTYPE)
        ref_weight = (weight.detach().float() + 0.1 * _weight(v, h, gen).float()).to(DTYPE)
        with torch.no_grad():
            ref = allo_kernels.fused_linear_token_logprobs(ref_hidden, ref_weight, labels)
        _INPUTS[key] = (hidden, weight, labels, ref, ref_hidden, ref_weight)
    return _INPUTS[key]


def ce_inputs(n: int, h: int, v: int):
    key = ("ce", n, h, v)
    if key not in _INPUTS:
        _INPUTS.clear()
        gen = torch.Generator(device=DEVICE).manual_seed(99 + n + h + v)
        hidden = torch.randn(n, h, device=DEVICE, generator=gen).to(DTYPE).requires_grad_()
        weight = _weight(v, h, gen).requires_grad_()
        labels = torch.randint(0, v, (n,), device=DEVICE, generator=gen)
        _INPUTS[key] = (hidden, weight, labels)
    return _INPUTS[key]


def _check_loss(results, suite, impl, params, compute_got, compute_expect) -> None:
    """A fast wrong answer is not a result: every implementation's loss against ours before timing. An out-of-memory
    error here (the eager paths at the largest shapes) is recorded like one in the timed calls."""
    tol = dict(rtol=2e-2, atol=2e-2) if torch.float32 != DTYPE else dict(rtol=1e-4, atol=1e-4)
    oom_message = None
    try:
        with torch.no_grad():
            expect = compute_expect().detach().float()
        got = compute_got().detach().float()
    except Exception as exc:
        if not is_oom(exc):
            raise
        oom_message = (str(exc).splitlines() or ["out of memory"])[0][:200]
    if oom_message is not None:
        free_memory(DEVICE)
        results.add(
            {
                "suite": suite,
                "case": "full",
                "impl": impl,
                "shape": format_shape(params),
                "params": params,
                "dtype": dtype_name(DTYPE),
                "ours": impl == "allo",
                "status": "oom",
                "error": oom_message,
            }
        )
        pytest.skip(f"out of memory: {impl} {format_shape(params)}")
    torch.testing.assert_close(got, expect, **tol, msg=lambda m: f"{impl}: {m}")
    del got, expect
    free_memory(DEVICE)


def _warmup(impl: str) -> int | None:
    if impl.startswith("liger") and ON_GPU:
        return max(2, int(os.environ.get("ALLO_BENCH_WARMUP", "3")))  # the first calls compile
    return None


# ------------------------------------------------------------------------------------------------------------ cases
@pytest.mark.parametrize(
    ("impl", "b", "t", "h", "v"),
    [pytest.param(i, *s, id=f"{i}-B{s[0]}-T{s[1]}-H{s[2]}-V{s[3]}") for s in DPO_SHAPES for i in DPO_IMPLS],
)
def test_fused_linear_dpo(benchmark, results, impl, b, t, h, v):
    suite, params, dname = "fused_linear_dpo", {"B": b, "T": t, "H": h, "V": v}, dtype_name(DTYPE)
    reason = skip_reason(impl, suite)
    if reason:
        record_skip(results, suite=suite, case="full", impl=impl, params=params, dtype=dname, reason=reason)
    hidden, weight, labels, ref, ref_hidden, ref_weight = dpo_inputs(b, t, h, v)
    loss_fn = {
        "allo": lambda: allo_dpo(hidden, weight, labels, ref),
        "unfused": lambda: unfused_dpo(hidden, weight, labels, ref),
        "eager_hf": lambda: eager_hf_dpo(hidden, weight, labels, ref),
        "liger": lambda: liger_dpo(hidden, weight, labels, ref_hidden, ref_weight),
        "liger_noref": lambda: liger_dpo(hidden, weight, labels),
    }[impl]
    zero_ref = torch.zeros_like(ref) if impl == "liger_noref" else ref
    _check_loss(results, suite, impl, params, loss_fn, lambda: allo_dpo(hidden, weight, labels, zero_ref))

    def timed():
        loss = loss_fn()
        return torch.autograd.grad(loss, (hidden, weight))

    run_case(
        benchmark,
        results,
        suite=suite,
        case="full",
        impl=impl,
        params=params,
        dtype=dname,
        fn=timed,
        ours=impl == "allo",
        warmup=_warmup(impl),
        note=impl_note(impl, suite),
        extra={"backend": select_backend(DEVICE)} if impl in ("allo", "unfused") else None,
    )


@pytest.mark.parametrize(
    ("impl", "n", "h", "v"),
    [pytest.param(i, *s, id=f"{i}-N{s[0]}-H{s[1]}-V{s[2]}") for s in CE_SHAPES for i in CE_IMPLS],
)
def test_fused_linear_ce(benchmark, results, impl, n, h, v):
    suite, params, dname = "fused_linear_ce", {"N": n, "H": h, "V": v}, dtype_name(DTYPE)
    reason = skip_reason(impl, suite)
    if reason:
        record_skip(results, suite=suite, case="full", impl=impl, params=params, dtype=dname, reason=reason)
    hidden, weight, labels = ce_inputs(n, h, v)
    loss_fn = {"allo": allo_ce, "unfused": unfused_ce, "eager": eager_ce, "liger": liger_ce}[impl]
    _check_loss(
        results, suite, impl, params, lambda: loss_fn(hidden, weight, labels), lambda: allo_ce(hidden, weight, labels)
    )

    def timed():
        loss = loss_fn(hidden, weight, labels)
        return torch.autograd.grad(loss, (hidden, weight))

    run_case(
        benchmark,
        results,
        suite=suite,
        case="full",
        impl=impl,
        params=params,
        dtype=dname,
        fn=timed,
        ours=impl == "allo",
        note=impl_note(impl, suite),
        extra={"backend": select_backend(DEVICE)} if impl in ("allo", "unfused") else None,
    )
