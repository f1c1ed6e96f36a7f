"""Fused-linear losses (hidden states x lm_head, the [N, V] logits never held) against unfused, eager and Liger.

Two suites, both timed as ``full`` (loss forward + backward into ``hidden`` and the lm_head ``weight``; Liger's
chunked losses compute their gradients inside the forward, so a forward-only comparison would be meaningless):

``fused_linear_dpo``: sigmoid DPO over a ``[chosen; rejected]`` batch of 2B rows, per-token reference log-probs given.

* ``allo``          ``allo_kernels.preference_loss(hidden, labels, lm_head_weight=W, ref_logprobs=ref)``: the token-
                    chunked fused-linear log-prob kernels (recompute backward, fp32 weight-gradient accumulator) and
                    ``losses.kept_token_dpo_loss`` on the per-sequence sums. On CPU the torch path of the same chunking.
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

* ``allo``          ``fused_linear_token_logprobs`` + ``losses.sft_loss`` (mean NLL): the per-token op every
                    alignment loss uses (its backward recomputes the rows whose logits were not retained).
* ``allo_fused_ce`` ``fused_linear_cross_entropy``: the same loss with its gradients made in the forward (no
                    recompute; the upstream gradient of every token is known there).
* ``unfused``       ``token_logprobs(hidden @ W.T)`` + ``sft_loss``.
* ``eager``         ``cross_entropy((hidden @ W.T).float(), labels)``.
* ``liger``         ``LigerFusedLinearCrossEntropyLoss`` (Triton; CUDA only).
* ``cce``           Apple's Cut Cross-Entropy ``linear_cross_entropy`` (``impl="cce"`` on GPU; ``impl="torch_compile"``
                    on CPU, run only with ``ALLO_BENCH_COMPILE_CPU=1``: its Inductor build takes minutes there).

Liger and Cut Cross-Entropy are optional (``pip install --no-deps liger-kernel cut-cross-entropy``, see the
README); their rows are skipped when they are not importable. On CPU Liger's chunked DPO runs eagerly
(``compiled=False``) unless ``ALLO_BENCH_COMPILE_CPU=1`` (Inductor builds take minutes on small CPU boxes); its CE
kernel needs a GPU. DESIGN targets (GPU, B=16 pairs, T=1024, H=4096, V=128256, bf16): ``allo`` peak memory
<= 0.25x ``eager_hf`` and <= ``liger``; time <= ``liger`` and <= 1.1x ``unfused``.

Peak memory is the harness's: what one call allocates beyond its inputs (hidden, weight, labels, reference tensors),
the returned gradients included. Labels are all valid.

Run as a script (``python -m benchmarks.bench_fused_linear``; ``--save`` writes the committed
``benchmarks/results/<device>-fused_linear.json``, by default the scratch results folder) it measures the issue-17
table instead: every contender of a case alive in one process and timed round-robin (the order reversed every other
round), with paired ratios (contender time / allo time within a round; median and range), and the peak memory of each
contender in a subprocess of its own (CPU: peak RSS during one call after a warm-up call, ``VmHWM`` reset through
``/proc/self/clear_refs``, minus the RSS just before it; CUDA: ``max_memory_allocated``). Cases (``CASES`` below): SFT
cross-entropy N=8192, H=1024, V=32000 in fp32 and bf16 against eager and CCE (and in fp32 allo with
``retain_logits_bytes=0``, every row's logits recomputed in the backward, and with 256 MiB, the CPU chunk budget), and
in bf16 at N=16 too, small enough for eager and CCE to finish on CPUs without native bf16 GEMMs (there torch's
emulated bf16 dH GEMM alone takes ~1 s per row at H=1024, V=32000); sigmoid DPO B=4 pairs, T=512 with every row valid,
with 40% prompt rows, with 90% of each rejected response's tokens dropped (ALLO's improving-stage mask), lm_head
trainable and frozen, against Liger's compiled chunked DPO and the eager TRL path; token-weighted NPO (ALLO's
forgetting stage) with all and with 20% of the weights nonzero; ``dpo_fp32_drop90`` is the 90%-dropped DPO ratio
alone, ``ce_fp32_vs_eager`` allo's two CE entry points against eager alone. ``--save`` and ``--json`` merge into an
existing report: cases not run keep their entries, each with the metadata of its own run. A contender
``allo_retain<MiB>`` (e.g. ``--impls allo allo_retain0 allo_retain512``) is allo with ``retain_logits_bytes`` set to
that many MiB.
"""

from __future__ import annotations

import math
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
    sync,
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
CE_IMPLS = ("allo", "allo_fused_ce", "unfused", "eager", "liger", "cce")
COMPILE_CPU = os.environ.get("ALLO_BENCH_COMPILE_CPU", "0") not in ("", "0", "false", "False")


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


def allo_ce(hidden, weight, labels, **options):
    logp = allo_kernels.fused_linear_token_logprobs(hidden, weight, labels, **options)
    return allo_kernels.losses.sft_loss(logp, labels != -100)[0]


def allo_fused_ce(hidden, weight, labels):
    return allo_kernels.fused_linear_cross_entropy(hidden, weight, labels)


def unfused_ce(hidden, weight, labels):
    logp = allo_kernels.token_logprobs(hidden @ weight.t(), labels)
    return allo_kernels.losses.sft_loss(logp, labels != -100)[0]


def cce_linear_cross_entropy():
    """cut_cross_entropy.linear_cross_entropy, or None when it is not importable."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception:
        return None
    return linear_cross_entropy


def cce_ce(hidden, weight, labels):
    """Cut Cross-Entropy, mean NLL over the valid tokens (its own ignored-row skipping)."""
    impl = "cce" if hidden.is_cuda else "torch_compile"
    return cce_linear_cross_entropy()(hidden, weight, labels, ignore_index=-100, reduction="mean", impl=impl)


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
        # compiled=True is Liger's default and how it is used on GPUs; on CPU only with ALLO_BENCH_COMPILE_CPU=1.
        compiled = ON_GPU or COMPILE_CPU
        _LIGER_LOSSES[key] = dpo_cls(beta=BETA, use_ref_model=use_ref, compiled=compiled, average_log_prob=False)
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
    if impl in ("allo", "allo_fused_ce", "unfused") and not ON_GPU and select_backend(DEVICE) == "triton":
        return (
            "Triton interpreter timings are meaningless: unset TRITON_INTERPRET / ALLO_KERNELS_BACKEND for benchmarks"
        )
    if impl.startswith("liger"):
        if liger_modules() is None:
            return "liger_kernel is not importable (pip install --no-deps liger-kernel, see benchmarks/README.md)"
        if suite == "fused_linear_ce" and not ON_GPU:
            return "CPU: Liger's fused-linear cross-entropy is a Triton kernel (GPU only)"
    if impl == "cce":
        if cce_linear_cross_entropy() is None:
            return "cut_cross_entropy is not importable (pip install --no-deps cut-cross-entropy, see the README)"
        if not ON_GPU and not COMPILE_CPU:
            return "CPU: CCE's torch_compile impl needs minutes of Inductor builds; set ALLO_BENCH_COMPILE_CPU=1"
    return None


def impl_note(impl: str, suite: str) -> str | None:
    if impl in ("allo", "allo_fused_ce", "unfused") and not ON_GPU:
        return "CPU: torch path of our ops (the Triton kernels run on CUDA only)"
    if impl == "liger" and suite == "fused_linear_dpo":
        return "reference log-probs recomputed from ref_input x ref_weight (Liger takes no precomputed ones)"
    if impl == "liger_noref":
        return "use_ref_model=False (no reference pass): Liger's cheapest setting"
    if impl.startswith("liger") and not ON_GPU:
        return "CPU: compiled" if COMPILE_CPU else "CPU: compiled=False"
    if impl == "cce":
        return "impl='cce'" if ON_GPU else "impl='torch_compile'"
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
    if (impl.startswith("liger") or impl == "cce") and (ON_GPU or COMPILE_CPU):
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
    loss_fn = {
        "allo": allo_ce,
        "allo_fused_ce": allo_fused_ce,
        "unfused": unfused_ce,
        "eager": eager_ce,
        "liger": liger_ce,
        "cce": cce_ce,
    }[impl]
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
        warmup=_warmup(impl),
        note=impl_note(impl, suite),
        extra={"backend": select_backend(DEVICE)} if impl in ("allo", "allo_fused_ce", "unfused") else None,
    )


# ------------------------------------------------------------------------------------ the issue-17 table (a script)
# case -> (kind, shape, dtype, contenders). allo is the first contender of every case: ratios are against it.
CASES: dict[str, tuple[str, dict[str, int], torch.dtype, tuple[str, ...]]] = {
    "ce_fp32": (
        "ce",
        {"N": 8192, "H": 1024, "V": 32000},
        torch.float32,
        ("allo", "allo_fused_ce", "allo_retain0", "allo_retain256", "eager", "cce"),
    ),
    # allo's two CE entry points against eager alone (three contenders: shorter rounds, less drift between them)
    "ce_fp32_vs_eager": (
        "ce",
        {"N": 8192, "H": 1024, "V": 32000},
        torch.float32,
        ("allo", "allo_fused_ce", "eager"),
    ),
    "ce_bf16": ("ce", {"N": 8192, "H": 1024, "V": 32000}, torch.bfloat16, ("allo", "allo_fused_ce", "eager", "cce")),
    "ce_bf16_small": (
        "ce",
        {"N": 16, "H": 1024, "V": 32000},
        torch.bfloat16,
        ("allo", "allo_fused_ce", "eager", "cce"),
    ),
    "dpo_fp32": (
        "dpo",
        {"B": 4, "T": 512, "H": 1024, "V": 32000},
        torch.float32,
        ("allo", "allo_prompt40", "allo_drop90", "allo_frozen", "allo_drop90_frozen", "liger", "eager_hf"),
    ),
    # the 90%-dropped ratio alone (two contenders: shorter rounds, less drift between the paired calls)
    "dpo_fp32_drop90": ("dpo", {"B": 4, "T": 512, "H": 1024, "V": 32000}, torch.float32, ("allo", "allo_drop90")),
    "npo_fp32": (
        "npo",
        {"B": 8, "T": 512, "H": 1024, "V": 32000},
        torch.float32,
        ("allo", "allo_w20", "allo_w20_frozen"),
    ),
}
_STANDALONE_NOTES = {
    "allo_prompt40": "the first 40% of each sequence's positions are prompt (ignore_index)",
    "allo_drop90": "mask_fraction=0.9 on the rejected half: 90% of each rejected response's tokens dropped",
    "allo_frozen": "lm_head frozen (gradient for hidden only)",
    "allo_drop90_frozen": "90% of rejected tokens dropped, lm_head frozen",
    "allo_w20": "20% of the token weights nonzero",
    "allo_w20_frozen": "20% of the token weights nonzero, lm_head frozen",
    "liger": "LigerFusedLinearDPOLoss(compiled=True), reference recomputed from ref_input x ref_weight",
    "eager_hf": "hidden @ W.T, log_softmax(.float()), gather, sums, sigmoid DPO (TRL-0.8 / official ALLO)",
    "eager": "cross_entropy((hidden @ W.T).float())",
    "allo_fused_ce": "fused_linear_cross_entropy: gradients made in the forward, no recompute",
    "cce": "cut_cross_entropy.linear_cross_entropy(impl='torch_compile' on CPU, 'cce' on GPU)",
}


# Cases small enough for eager and CCE to finish where half GEMMs are emulated (CPUs without AVX512-BF16/AMX).
_SMALL_ENOUGH_FOR_EMULATED_HALF = {"ce_bf16_small"}
_SAME_LOSS_AS_ALLO = {"eager", "cce", "liger", "eager_hf", "allo_frozen", "allo_fused_ce"}
_RETAIN_PREFIX = "allo_retain"


def retain_option(impl: str) -> dict:
    """``allo_retain<MiB>`` -> {"retain_logits_bytes": MiB << 20}; {} for every other contender."""
    if not impl.startswith(_RETAIN_PREFIX):
        return {}
    mib = impl[len(_RETAIN_PREFIX) :]
    if not mib.isdigit():
        raise ValueError(f"contender {impl!r}: expected {_RETAIN_PREFIX}<MiB>, e.g. {_RETAIN_PREFIX}512")
    return {"retain_logits_bytes": int(mib) << 20}


def contender_note(impl: str) -> str | None:
    if impl.startswith(_RETAIN_PREFIX):
        mib = retain_option(impl)["retain_logits_bytes"] >> 20
        recompute_all = " (every row recomputed in the backward)" if mib == 0 else ""
        return f"allo with retain_logits_bytes={mib} MiB{recompute_all}"
    return _STANDALONE_NOTES.get(impl)


def standalone_skip(case: str, impl: str) -> str | None:
    dtype = CASES[case][2]
    if impl == "liger" and liger_modules() is None:
        return "liger_kernel is not importable (pip install --no-deps liger-kernel, see benchmarks/README.md)"
    if impl == "cce" and cce_linear_cross_entropy() is None:
        return "cut_cross_entropy is not importable (pip install --no-deps cut-cross-entropy)"
    if impl in ("eager", "cce", "eager_hf", "liger") and DEVICE.type == "cpu":
        from allo_kernels.ops.fused_linear import native_half_gemm

        if not native_half_gemm(dtype, DEVICE) and case not in _SMALL_ENOUGH_FOR_EMULATED_HALF:
            return (
                f"this CPU has no native {dtype_name(dtype)} GEMM (no AVX512-BF16/AMX: torch falls back to a scalar "
                "GEMM measured at 0.1-6 GFLOP/s against 50-120 for fp32), so one call would take tens of minutes; "
                "allo runs its GEMMs in fp32 there"
            )
    return None


def standalone_inputs(case: str, impl: str):
    """(fn, leaves): fn() returns the loss; its gradient w.r.t. leaves is what one timed call computes."""
    kind, shape, dtype, _ = CASES[case]
    gen = torch.Generator(device=DEVICE).manual_seed(17)
    h, v = shape["H"], shape["V"]
    frozen = impl.endswith("_frozen")
    if kind == "ce":
        n = shape["N"]
        hidden = torch.randn(n, h, device=DEVICE, generator=gen).to(dtype).requires_grad_()
        weight = (torch.randn(v, h, device=DEVICE, generator=gen) * h**-0.5).to(dtype).requires_grad_()
        labels = torch.randint(0, v, (n,), device=DEVICE, generator=gen)
        if impl.startswith(_RETAIN_PREFIX):
            return (lambda: allo_ce(hidden, weight, labels, **retain_option(impl))), (hidden, weight)
        fn = {"allo": allo_ce, "allo_fused_ce": allo_fused_ce, "eager": eager_ce, "cce": cce_ce}[impl]
        return (lambda: fn(hidden, weight, labels)), (hidden, weight)
    rows, t = (2 * shape["B"], shape["T"]) if kind == "dpo" else (shape["B"], shape["T"])
    hidden = torch.randn(rows, t, h, device=DEVICE, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=DEVICE, generator=gen) * h**-0.5).to(dtype).requires_grad_(not frozen)
    labels = torch.randint(0, v, (rows, t), device=DEVICE, generator=gen)
    if impl == "allo_prompt40":
        labels[:, : int(0.4 * t)] = -100
    leaves = (hidden,) if frozen else (hidden, weight)
    if kind == "npo":
        ref = torch.randn(rows, t, device=DEVICE, generator=gen) - 10.0
        keep = torch.rand(rows, t, device=DEVICE, generator=gen) < (0.2 if "_w20" in impl else 2.0)
        w_tok = torch.where(keep, torch.rand(rows, t, device=DEVICE, generator=gen), 0.0)
        return (
            lambda: allo_kernels.forgetting_loss(
                hidden, labels, lm_head_weight=weight, ref_logprobs=ref, weights=w_tok, **retain_option(impl)
            )[0]
        ), leaves
    ref_hidden = (hidden.detach() + 0.1 * torch.randn(hidden.shape, device=DEVICE, generator=gen)).to(dtype)
    ref_weight = (weight.detach().float() + 0.1 * _weight(v, h, gen).float()).to(dtype)
    with torch.no_grad():
        ref = allo_kernels.fused_linear_token_logprobs(ref_hidden, ref_weight, labels)
    if impl == "liger":
        return (lambda: liger_dpo(hidden, weight, labels, ref_hidden, ref_weight)), leaves
    if impl == "eager_hf":
        return (lambda: eager_hf_dpo(hidden, weight, labels, ref)), leaves
    fraction = 0.9 if "drop90" in impl else 0.0
    return (
        lambda: allo_kernels.preference_loss(
            hidden,
            labels,
            lm_head_weight=weight,
            ref_logprobs=ref,
            beta=BETA,
            mask_fraction=fraction,
            **retain_option(impl),
        )[0]
    ), leaves


def _call(fn, leaves) -> None:
    loss = fn()
    grads = torch.autograd.grad(loss, leaves)
    sync(DEVICE)
    del loss, grads


def _rss_mb(field_name: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def peak_memory_child(case: str, impl: str) -> dict:
    """In a fresh process: build the inputs, warm up (compiles), then the peak extra memory of one call."""
    import ctypes
    import gc

    fn, leaves = standalone_inputs(case, impl)
    if impl in ("liger", "cce"):
        _call(fn, leaves)  # warm-up: the compile's own memory is not the call's
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        _call(fn, leaves)
        return {"peak_extra_mb": (torch.cuda.max_memory_allocated(DEVICE) - base) / 2**20}
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS, so the baseline is what is live
    base = _rss_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    _call(fn, leaves)
    peak = _rss_mb("VmHWM")
    return {"peak_extra_mb": peak - base, "rss_before_mb": base, "peak_rss_mb": peak}


def _peak_memory(case: str, impl: str) -> dict:
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "benchmarks.bench_fused_linear", "--peak-memory-child", case, impl]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=str(_repo_root()))
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(len(xs) - 1, int(k) + 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_standalone(cases: list[str], rounds: int, impls: list[str] | None = None) -> dict:
    import statistics
    import time

    from benchmarks.conftest import environment_metadata

    metadata = environment_metadata(DEVICE)
    report = {"metadata": metadata, "rounds": rounds, "cases": {}}
    for case in cases:
        kind, shape, dtype, contenders = CASES[case]
        entry = {"kind": kind, "shape": shape, "dtype": dtype_name(dtype), "rounds": rounds, "metadata": metadata}
        entry["contenders"] = {}
        report["cases"][case] = entry
        live = {}
        for impl in impls or contenders:
            reason = standalone_skip(case, impl)
            if reason:
                entry["contenders"][impl] = {"status": "skipped", "reason": reason}
                continue
            live[impl] = standalone_inputs(case, impl)
        losses = {}
        for impl, (fn, leaves) in live.items():  # warm-up and the loss check in one
            t0 = time.perf_counter()
            losses[impl] = float(fn().detach())
            _call(fn, leaves)
            entry["contenders"][impl] = {"status": "ok", "warmup_s": time.perf_counter() - t0, "loss": losses[impl]}
            print(f"[{case}] warm-up {impl}: {time.perf_counter() - t0:.1f} s, loss {losses[impl]:.6f}", flush=True)
        same_loss = {i for i in live if i in _SAME_LOSS_AS_ALLO or i.startswith(_RETAIN_PREFIX)}
        for impl in same_loss:  # a fast wrong answer is not a result
            if "allo" in losses and not math.isclose(losses[impl], losses["allo"], rel_tol=1e-3, abs_tol=1e-4):
                raise AssertionError(f"{case}: {impl} loss {losses[impl]} != allo's {losses['allo']}")
        times = {impl: [] for impl in live}
        for r in range(rounds):
            order = list(live) if r % 2 == 0 else list(reversed(live))
            for impl in order:
                t0 = time.perf_counter()
                _call(*live[impl])
                times[impl].append(time.perf_counter() - t0)
            print(f"[{case}] round {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
        base = times.get("allo")
        for impl, ts in times.items():
            row = entry["contenders"][impl]
            row.update({"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "times_s": ts})
            if base is not None:
                ratios = [a / b for a, b in zip(ts, base)]
                row["ratio_to_allo"] = {
                    "median": statistics.median(ratios),
                    "p10": _percentile(ratios, 0.1),
                    "p90": _percentile(ratios, 0.9),
                }
            note = contender_note(impl)
            if note:
                row["note"] = note
        del live
        free_memory(DEVICE)
        for impl in times:
            entry["contenders"][impl]["memory"] = mem = _peak_memory(case, impl)
            print(f"[{case}] peak memory {impl}: {mem}", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    from pathlib import Path

    from benchmarks.render import results_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--json", type=Path, help="write the report here (default: the scratch results folder)")
    where.add_argument("--save", action="store_true", help="write the committed benchmarks/results/ file")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument(
        "--impls", nargs="*", help=f"contenders instead of each case's own (allo first; {_RETAIN_PREFIX}<MiB> too)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--peak-memory-child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_memory_child:
        print(json.dumps(peak_memory_child(*args.peak_memory_child)))
        return 0
    for impl in args.impls or []:
        try:
            retain_option(impl)
        except ValueError as exc:
            parser.error(str(exc))
    try:
        out = args.json or results_dir(save=args.save) / f"{DEVICE.type}-fused_linear.json"
    except ValueError as exc:
        parser.error(str(exc))
    report = run_standalone(args.cases, args.rounds, args.impls)
    if out.exists():
        # Cases not run this time keep their earlier entries (each entry carries the metadata of its own run).
        earlier = json.loads(out.read_text())
        for entry in earlier.get("cases", {}).values():
            entry.setdefault("rounds", earlier.get("rounds"))
            entry.setdefault("metadata", earlier.get("metadata"))
        report["cases"] = {**earlier.get("cases", {}), **report["cases"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(
        json.dumps({c: {k: v.get("median_s") for k, v in e["contenders"].items()} for c, e in report["cases"].items()})
    )
    print(f"wrote {out}" + ("" if args.save or args.json else " (scratch; --save updates benchmarks/results/)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
