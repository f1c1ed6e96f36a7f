"""token_logprobs: forward, backward and forward+backward against the ways people compute per-token log-probs today.

Implementations (``impl`` in the results):

* ``allo``          ``allo_kernels.token_logprobs`` (Triton on CUDA; on CPU it is the torch reference path, so the CPU
                    numbers compare torch code with torch code and say nothing about the kernels).
* ``allo_inplace``  the same with ``inplace_backward=True`` (gradient written into the logits buffer). CUDA only.
* ``eager_fp32``    ``log_softmax(logits.float()).gather(label)``: what the official ALLO code does.
* ``trl_selective`` TRL-style selective log-softmax over [B, T, V] (T = ``TRL_SEQ_LEN``): in fp32 a gather minus a
                    per-sequence ``logsumexp`` loop; in bf16/fp16 a per-sequence loop of ``log_softmax`` + gather in the
                    input dtype (its result is bf16). Written here from TRL's documented behaviour.
* ``compiled``      ``torch.compile`` of ``eager_fp32`` (static shapes). CUDA only by default (see
                    ``ALLO_BENCH_COMPILE_CPU``).
* ``liger``         Liger-Kernel's cross-entropy kernel with ``reduction="none"``, negated. It writes the gradient
                    into the logits during the forward (its forward includes that write) and its result is in the
                    input dtype.
                    Skipped when ``liger_kernel`` is not importable, and on CPU.

Cases: ``fwd`` (the forward on logits that require grad), ``bwd`` (backward only; the forward runs untimed in the
setup), ``full`` (both). Labels are all valid and the upstream gradient is dense, the worst case for our kernels
(ignored or zero-gradient rows skip their reads).
Minimum traffic used for GB/s and %-of-peak: fwd reads N*V elements, bwd reads N*V and writes N*V, full is the sum.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import allo_kernels
from allo_kernels._backend import select_backend
from allo_kernels.ops.token_logprobs import token_logprobs_reference
from benchmarks.conftest import bench_device, dtype_name, pick_shapes, record_skip, run_case

SUITE = "token_logprobs"
DEVICE = bench_device()
SHAPES = pick_shapes(
    cpu=[(256, 1000), (256, 32000), (1024, 1000), (1024, 32000)],
    gpu=[(n, v) for n in (4096, 16384) for v in (32000, 128256, 256000)],
)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "full")
IMPLS = ("allo", "allo_inplace", "eager_fp32", "trl_selective", "compiled", "liger")
# Sequence length of the [B, T, V] view the TRL-style loop iterates over (B = N / T sequences).
TRL_SEQ_LEN = 1024 if DEVICE.type == "cuda" else 128
MUTATES_LOGITS = {"allo_inplace", "liger"}  # these get a fresh copy of the logits before every call (untimed)


# ------------------------------------------------------------------------------------------------ implementations
def eager_fp32(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def trl_selective(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Selective log-softmax the way TRL does it: loops over sequences to bound the extra memory of a full pass."""
    seq_len = min(TRL_SEQ_LEN, logits.shape[0])
    seqs, seq_labels = logits.view(-1, seq_len, logits.shape[-1]), labels.view(-1, seq_len)
    if logits.dtype in (torch.float32, torch.float64):
        picked = seqs.gather(-1, seq_labels.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(seq, dim=-1) for seq in seqs])
        return (picked - lse).view(-1)
    # Half precision: logsumexp in bf16 loses too much, so a per-sequence log_softmax (in the input dtype) + gather.
    per_seq = [
        F.log_softmax(seq, dim=-1).gather(-1, lab.unsqueeze(-1)).squeeze(-1) for seq, lab in zip(seqs, seq_labels)
    ]
    return torch.stack(per_seq).view(-1)


_COMPILED = None


def compiled(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    global _COMPILED
    if _COMPILED is None:
        cfg = torch._dynamo.config
        # One static graph per (shape, dtype) of the matrix: raise the recompile limit instead of going dynamic.
        for name in (
            "recompile_limit",
            "cache_size_limit",
            "accumulated_recompile_limit",
            "accumulated_cache_size_limit",
        ):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 256))
        _COMPILED = torch.compile(eager_fp32, dynamic=False)
    return _COMPILED(logits, labels)


def _liger_cross_entropy():
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except Exception:
        return None
    return liger_cross_entropy


def liger(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -_liger_cross_entropy()(logits, labels, reduction="none")


def allo(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return allo_kernels.token_logprobs(logits, labels)


def allo_inplace(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return allo_kernels.token_logprobs(logits, labels, inplace_backward=True)


IMPL_FNS = {
    "allo": allo,
    "allo_inplace": allo_inplace,
    "eager_fp32": eager_fp32,
    "trl_selective": trl_selective,
    "compiled": compiled,
    "liger": liger,
}


def skip_reason(impl: str) -> str | None:
    on_cpu = DEVICE.type != "cuda"
    if impl in ("allo", "allo_inplace") and on_cpu and select_backend(DEVICE) == "triton":
        return (
            "Triton interpreter timings are meaningless: unset TRITON_INTERPRET / ALLO_KERNELS_BACKEND for benchmarks"
        )
    if impl == "allo_inplace" and on_cpu:
        return "CPU: the torch reference path has no in-place backward (same numbers as allo)"
    if impl == "compiled" and on_cpu and os.environ.get("ALLO_BENCH_COMPILE_CPU", "0") in ("", "0"):
        return (
            "CPU: torch.compile left out (Inductor's C++ builds take minutes on small CPU boxes); "
            "ALLO_BENCH_COMPILE_CPU=1 adds it"
        )
    if impl == "liger":
        if on_cpu:
            return "CPU: Liger-Kernel's Triton kernels need a GPU"
        if _liger_cross_entropy() is None:
            return "liger_kernel is not importable (pip install liger-kernel --no-deps)"
    return None


def impl_note(impl: str) -> str | None:
    if impl == "allo" and DEVICE.type != "cuda":
        return "CPU: torch reference path (the Triton kernels run on CUDA only)"
    if impl == "trl_selective":
        return f"loop over N/{TRL_SEQ_LEN} sequences"
    return None


# ----------------------------------------------------------------------------------------------------------- inputs
_INPUTS: dict = {}


def make_inputs(n: int, v: int, dtype: torch.dtype):
    """Logits (leaf, requires grad), labels and an upstream gradient; the last shape's tensors are reused."""
    key = (n, v, dtype)
    if key not in _INPUTS:
        _INPUTS.clear()  # keep one set alive at a time: full-size fp32 logits are up to 16 GB
        gen = torch.Generator(device=DEVICE).manual_seed(1234 + n + v)
        logits = torch.randn(n, v, dtype=dtype, device=DEVICE, generator=gen).requires_grad_()
        labels = torch.randint(0, v, (n,), device=DEVICE, generator=gen)
        grad_out = torch.randn(n, dtype=torch.float32, device=DEVICE, generator=gen)
        _INPUTS[key] = (logits, labels, grad_out)
    return _INPUTS[key]


def _cases():
    for n, v in SHAPES:
        for dname in DTYPES:
            for mode in MODES:
                for impl in IMPLS:
                    yield pytest.param(mode, impl, n, v, dname, id=f"{mode}-{impl}-{dname}-N{n}-V{v}")


@pytest.mark.parametrize(("mode", "impl", "n", "v", "dname"), list(_cases()))
def test_token_logprobs(benchmark, results, mode, impl, n, v, dname):
    params = {"N": n, "V": v}
    reason = skip_reason(impl)
    if reason:
        record_skip(results, suite=SUITE, case=mode, impl=impl, params=params, dtype=dname, reason=reason)

    dtype = DTYPES[dname]
    source, labels, grad_out = make_inputs(n, v, dtype)
    fn = IMPL_FNS[impl]
    if impl in MUTATES_LOGITS:
        logits = source.detach().clone().requires_grad_()

        def restore():
            with torch.no_grad():
                logits.copy_(source)

    else:
        logits = source

        def restore():
            pass

    def upstream(out: torch.Tensor) -> torch.Tensor:
        return grad_out if out.dtype == grad_out.dtype else grad_out.to(out.dtype)

    if mode == "fwd":
        # Sanity check once per (impl, shape, dtype): a fast wrong answer is not a result.
        restore()
        out = fn(logits, labels)
        ref = token_logprobs_reference(source[:64].detach(), labels[:64])
        loose = out.dtype != torch.float32  # bf16 results (TRL bf16 path, Liger) carry bf16 rounding
        torch.testing.assert_close(
            out[:64].detach().float(), ref, rtol=2e-2 if loose else 1e-4, atol=0.1 if loose else 1e-3
        )
        del out

        def setup():
            restore()
            return ()

        def timed():
            return fn(logits, labels)

    elif mode == "bwd":

        def setup():
            restore()
            out = fn(logits, labels)
            return (out, upstream(out))

        def timed(out, g):
            return torch.autograd.grad(out, logits, g)

    else:

        def setup():
            restore()
            return ()

        def timed():
            out = fn(logits, labels)
            return torch.autograd.grad(out, logits, upstream(out))

    nv_bytes = n * v * torch.empty((), dtype=dtype).element_size()
    bytes_moved = {"fwd": nv_bytes, "bwd": 2 * nv_bytes, "full": 3 * nv_bytes}[mode]
    warmup = None
    if impl == "compiled":
        warmup = max(2, int(os.environ.get("ALLO_BENCH_WARMUP", "3")))  # the first calls compile
    run_case(
        benchmark,
        results,
        suite=SUITE,
        case=mode,
        impl=impl,
        params=params,
        dtype=dtype_name(dtype),
        fn=timed,
        setup=setup,
        bytes_moved=bytes_moved,
        ours=impl == "allo",
        warmup=warmup,
        note=impl_note(impl),
        extra={"backend": select_backend(DEVICE)} if impl.startswith("allo") else None,
    )
