"""What a GPU would get from allo's Triton kernels, found without one: compile them for sm_90 / sm_80, read the cubin.

    python -m benchmarks.codegen                     # both architectures; prints the tables
    python -m benchmarks.codegen --write             # ... and writes benchmarks/results/codegen-sm90.md and -sm80.md
    python -m benchmarks.codegen --arch 90 --json F  # one architecture, raw results as JSON (what the test reads)

Every kernel is compiled the way its launch wrapper really launches it: the wrapper itself runs (on ``meta`` tensors of
the realistic shapes, or on never-touched CPU tensors for the optimizer) with the kernel replaced by a recorder, and
the recorded arguments go through Triton's own launch binder for the target. So the block sizes, ``num_warps``,
argument dtypes and constexprs are the wrapper's, and the alignment specialization is the one a GPU launch sees
(pointers 16-byte aligned where the tensor's address is; integers "divisible by 16" where they are).

Triton's compiler and ptxas (shipped in the triton wheel) then build the cubin for ``GPUTarget("cuda", arch, 32)``;
``cuobjdump`` reads its resource usage (registers, stack, local and shared memory) and its SASS, from which come:

* spills: ``STL``/``LDL`` instructions and the stack frame (ptxas spills to the stack through local memory);
* the hot loop: the address range of the kernel's backward branches (the whole kernel when it has no loop); the
  width of every global load/store (``LDG``/``STG``) in it, e.g. ``LDG.E.128`` = 128-bit;
* occupancy, from registers, shared memory and warps per block (the CUDA occupancy calculator's rules)::

      regs_per_warp   = ceil(regs * 32 / 256) * 256                    (registers are allocated per warp, 256 at a time)
      warps_by_regs   = floor(floor(65536 / regs_per_warp) / 4) * 4     (64K registers per SM, 4 schedulers)
      blocks_by_regs  = floor(warps_by_regs / num_warps)
      blocks_by_smem  = floor(smem_per_sm / (static + dynamic shared + 1 KiB reserved per block))
      blocks_by_warps = floor(64 / num_warps)                          (64 resident warps per SM on sm_80 and sm_90)
      blocks          = min(blocks_by_regs, blocks_by_smem, blocks_by_warps, 32)
      occupancy       = blocks * num_warps / 64

  with smem_per_sm = 228 KiB on sm_90 (H100/H200) and 164 KiB on sm_80 (A100).

Needs only torch and triton with its NVIDIA backend (no CUDA driver, no GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ARCHS = (90, 80)
ARCH_NAMES = {90: "sm_90 (H100 / H200)", 80: "sm_80 (A100)"}
SMEM_PER_SM = {90: 228 * 1024, 80: 164 * 1024}
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
RESERVED_SMEM_PER_BLOCK = 1024


# --------------------------------------------------------------------------------------------------------- occupancy
@dataclass(frozen=True)
class Occupancy:
    blocks_per_sm: int
    fraction: float  # resident warps / 64
    limiter: str  # "registers", "shared memory", "warps" or "blocks"


def occupancy(regs: int, smem_bytes: int, num_warps: int, arch: int) -> Occupancy:
    """Resident blocks per SM and the occupancy they give (see the module docstring for the rules)."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    warps_by_regs = (REGS_PER_SM // regs_per_warp) // 4 * 4
    limits = {
        "registers": warps_by_regs // num_warps,
        "shared memory": SMEM_PER_SM[arch] // (smem_bytes + RESERVED_SMEM_PER_BLOCK),
        "warps": MAX_WARPS_PER_SM // num_warps,
        "blocks": MAX_BLOCKS_PER_SM,
    }
    limiter = min(limits, key=lambda k: limits[k])
    blocks = limits[limiter]
    return Occupancy(blocks, blocks * num_warps / MAX_WARPS_PER_SM, limiter)


# ------------------------------------------------------------------------------------------------------ SASS reading
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA(?:\.\w+)*\s+(?:`\(\.L_\w+\)|0x([0-9a-f]+))")
_WIDTHS = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def sass_instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction text without predicate) for every SASS instruction."""
    out = []
    for m in _SASS_LINE.finditer(sass):
        text = re.sub(r"^@!?U?P\w+\s+", "", m.group(2).strip())
        out.append((int(m.group(1), 16), text))
    return out


def access_width(instr: str) -> int:
    """Bits moved per thread by an LDG/STG instruction: LDG.E.128 -> 128, LDG.E -> 32, LDG.E.U16 -> 16."""
    opcode = instr.split()[0]
    for part in reversed(opcode.split(".")[1:]):
        if part in _WIDTHS:
            return _WIDTHS[part]
    return 32


def hot_range(instrs: list[tuple[int, str]]) -> tuple[int, int] | None:
    """Address range [start, end] covered by the kernel's backward branches (its loops); None when it has none."""
    lo, hi = None, None
    for addr, text in instrs:
        m = _BRANCH.search(text)
        if m and m.group(1):
            target = int(m.group(1), 16)
            if target < addr:
                lo = target if lo is None else min(lo, target)
                hi = addr if hi is None else max(hi, addr)
    return None if lo is None else (lo, hi)


@dataclass
class SassSummary:
    has_loop: bool
    hot_loads: dict[int, int]  # width in bits -> count, inside the hot range (the whole kernel when it has no loop)
    hot_stores: dict[int, int]
    all_loads: dict[int, int]
    all_stores: dict[int, int]
    local_accesses: int  # LDL + STL anywhere (spills or local arrays)


def summarize_sass(sass: str) -> SassSummary:
    instrs = sass_instructions(sass)
    rng = hot_range(instrs)
    hot_l: dict[int, int] = {}
    hot_s: dict[int, int] = {}
    all_l: dict[int, int] = {}
    all_s: dict[int, int] = {}
    local = 0
    for addr, text in instrs:
        op = text.split()[0] if text else ""
        if op.startswith(("LDL", "STL")):
            local += 1
        if not op.startswith(("LDG", "STG")):
            continue
        width = access_width(text)
        into = (all_l, hot_l) if op.startswith("LDG") else (all_s, hot_s)
        into[0][width] = into[0].get(width, 0) + 1
        if rng is None or rng[0] <= addr <= rng[1]:
            into[1][width] = into[1].get(width, 0) + 1
    return SassSummary(rng is not None, hot_l, hot_s, all_l, all_s, local)


# ---------------------------------------------------------------------------------------------------- cubin reading
def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def cubin_facts(cubin: bytes) -> tuple[dict[str, int], SassSummary]:
    """(resource usage {REG, STACK, SHARED, LOCAL, ...}, SASS summary) of a cubin, via the wheel's cuobjdump.

    Disassembly takes about half a second per kernel, so the result is kept in Triton's cache (keyed by the cubin's
    hash, honouring TRITON_CACHE_DIR) next to the compiled kernels themselves.
    """
    from triton.runtime.cache import get_cache_manager

    cache = get_cache_manager(hashlib.sha256(cubin).hexdigest())
    name = "allo_codegen_facts.json"
    cached = cache.get_file(name)
    if cached is not None:
        facts = json.loads(Path(cached).read_text())
        summary = SassSummary(
            **{k: v if isinstance(v, (bool, int)) else _int_keys(v) for k, v in facts["sass"].items()}
        )
        return facts["resources"], summary
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", "--dump-sass", path],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        os.remove(path)
    fn_line = next(line for line in out.splitlines() if "REG:" in line)
    resources = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", fn_line)}
    summary = summarize_sass(out)
    cache.put(json.dumps({"resources": resources, "sass": asdict(summary)}), name, binary=False)
    return resources, summary


def _int_keys(d: dict) -> dict[int, int]:
    return {int(k): v for k, v in d.items()}


# ------------------------------------------------------------------------------------------------- launch recording
@dataclass
class Launch:
    """One kernel launch as a wrapper made it: the kernel, its arguments and launch options."""

    kernel: Any  # triton JITFunction
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, kernel: Any, sink: list[Launch]):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.sink.append(Launch(self.kernel, args, kwargs))

        return launch


@contextlib.contextmanager
def recording(module: Any) -> Iterator[list[Launch]]:
    """Replace every Triton kernel of ``module`` with a recorder for the duration of the block."""
    from triton.runtime.jit import JITFunction

    sink: list[Launch] = []
    kernels = {name: obj for name, obj in vars(module).items() if isinstance(obj, JITFunction)}
    if not kernels:
        raise RuntimeError(f"{module.__name__} has no Triton kernels (is TRITON_INTERPRET set?)")
    try:
        for name, k in kernels.items():
            setattr(module, name, _Recorder(k, sink))
        yield sink
    finally:
        for name, k in kernels.items():
            setattr(module, name, k)


class _PointerArg:
    """What Triton's launch binder sees of a tensor: its dtype and address (``data_ptr``)."""

    def __init__(self, t: Any):
        self.dtype = t.dtype
        # meta tensors report storage_offset * itemsize; a GPU allocation starts at least 256-byte aligned
        self._ptr = t.data_ptr() + (1 << 40 if t.device.type == "meta" else 0)

    def data_ptr(self) -> int:
        return self._ptr


# ------------------------------------------------------------------------------------------------------- compiling
@dataclass
class KernelReport:
    """One compiled specialization of one kernel and what the cubin says about it."""

    kernel: str  # row label, e.g. "token_logprobs fwd"
    variant: str  # dtype / specialization summary
    cases: list[str]  # the realistic shapes that compile to this specialization
    arch: int
    num_warps: int
    constexprs: dict[str, Any]
    regs: int
    stack: int
    local: int
    smem: int  # static + dynamic shared memory per block, bytes
    local_accesses: int
    occupancy: float
    blocks_per_sm: int
    limiter: str
    has_loop: bool
    hot_loads: dict[int, int]
    hot_stores: dict[int, int]
    all_loads: dict[int, int]
    all_stores: dict[int, int]
    down_casts: list[str]  # PTX conversions from fp32 to a 16-bit float (cvt.rn.bf16.f32, ...)
    integer_rounding: bool  # the interpreter-only integer round-to-nearest-even sequence made it into the PTX
    expect: dict[str, Any] = field(default_factory=dict)  # what tests/test_gpu_codegen.py asserts for this row


def _binder_inputs(launch: Launch, backend: Any) -> tuple[dict, dict, dict, dict]:
    """(options, signature, constexprs, attrs) exactly as Triton's JIT derives them for this launch."""
    import torch
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    args = tuple(_PointerArg(a) if isinstance(a, torch.Tensor) else a for a in launch.args)
    kwargs = {k: (_PointerArg(v) if isinstance(v, torch.Tensor) else v) for k, v in launch.kwargs.items()}
    kwargs.setdefault("debug", kernel.debug)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound, specialization, options)


def compile_launch(launch: Launch, arch: int) -> tuple[Any, dict[str, Any]]:
    """Compile one recorded launch for ``sm_<arch>``; returns (compiled kernel, constexprs by name)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    options, signature, constexprs, attrs = _binder_inputs(launch, backend)
    compiled = triton.compile(
        ASTSource(launch.kernel, signature, constexprs, attrs), target=target, options=options.__dict__
    )
    names = list(signature)
    return compiled, {names[k[0]]: v for k, v in constexprs.items()}


def _spec_key(launch: Launch, arch: int) -> str:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    options, signature, constexprs, attrs = _binder_inputs(launch, make_backend(GPUTarget("cuda", arch, 32)))
    return repr(
        (
            launch.kernel.__name__,
            sorted(signature.items()),
            sorted(constexprs.items()),
            sorted(attrs.items()),
            options.num_warps,
        )
    )


_DOWN_CAST = re.compile(r"cvt\.rn\.(?:bf16|f16)(?:x2)?\.f32")


def report(kernel: str, variant: str, cases: list[str], launch: Launch, arch: int, expect: dict) -> KernelReport:
    compiled, constexprs = compile_launch(launch, arch)
    resources, s = cubin_facts(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    num_warps = compiled.metadata.num_warps
    smem = resources.get("SHARED", 0) + int(compiled.metadata.shared)
    occ = occupancy(resources["REG"], smem, num_warps, arch)
    return KernelReport(
        kernel=kernel,
        variant=variant,
        cases=cases,
        arch=arch,
        num_warps=num_warps,
        constexprs=constexprs,
        regs=resources["REG"],
        stack=resources.get("STACK", 0),
        local=resources.get("LOCAL", 0),
        smem=smem,
        local_accesses=s.local_accesses,
        occupancy=occ.fraction,
        blocks_per_sm=occ.blocks_per_sm,
        limiter=occ.limiter,
        has_loop=s.has_loop,
        hot_loads=s.hot_loads,
        hot_stores=s.hot_stores,
        all_loads=s.all_loads,
        all_stores=s.all_stores,
        down_casts=sorted(set(_DOWN_CAST.findall(ptx))),
        integer_rounding=bool(re.search(r"\b32767\b", ptx)),  # the 0x7FFF of allo_kernels/_triton_rounding.py
        expect=expect,
    )


# ----------------------------------------------------------------------------------------- the launches, per kernel
# Realistic shapes (the GPU performance targets): vocabularies of Llama-2 / Llama-3 / Qwen2 / Gemma-3 and two odd ones,
# N = 32768 tokens as 8 sequences of 4096 (logits[:, :-1] of a [8, 4097, V] tensor: strided rows, no copy).
VOCABS = (32000, 128256, 151936, 262144)
ODD_VOCABS = (32001, 50257)
BATCH, SEQ = 8, 4096
# One decoder layer of a 7B Llama (hidden 4096, intermediate 11008): the optimizer's tensors of those shapes.
LLAMA7B_MATRICES = {"q/k/v/o_proj": (4096, 4096), "gate/up_proj": (11008, 4096), "down_proj": (4096, 11008)}


@dataclass
class Case:
    kernel: str  # row label
    variant: str
    case: str  # the shape / configuration that produced the launch
    launch: Launch
    expect: dict


def _dtype_name(dtype: Any) -> str:
    import torch

    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def token_logprobs_cases() -> list[Case]:
    import torch

    from allo_kernels.ops import token_logprobs as op

    out = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        dt = _dtype_name(dtype)
        for vocab in VOCABS + ODD_VOCABS:
            full = torch.empty(BATCH, SEQ + 1, vocab, dtype=dtype, device="meta")
            labels = torch.empty(BATCH * SEQ, dtype=torch.int64, device="meta")
            lse = torch.empty(BATCH * SEQ, dtype=torch.float32, device="meta")
            grad_logp = torch.empty(BATCH, SEQ, dtype=torch.float32, device="meta")
            aligned = vocab % 16 == 0
            v_class = f"V % 16 {'== 0' if aligned else '!= 0'}"
            # Acceptance (issue 12): 128-bit loads and stores in the hot loop when V % 16 == 0; the peeled main loop
            # gives them for odd V too, except the out-of-phase backward loads (documented in token_logprobs.py).
            wide = {"min_hot_load_bits": 128, "min_hot_store_bits": 128}
            loads = {"min_hot_load_bits": 128}
            views = [("logits[:, :-1]", full[:, :-1])]
            if not aligned and dtype == torch.bfloat16 and vocab == ODD_VOCABS[0]:
                views.append(("logits[:, 1:]", full[:, 1:]))  # base pointer not 16-byte aligned: no vectors
            for view_name, logits in views:
                rows, layout = op.as_row_addressable(logits)
                assert rows is logits, "strided rows must not be copied"
                with recording(op) as launches:
                    op.logprobs_forward(rows, layout, labels, ignore_index=-100, temperature=1.0)
                    for inplace in (False, True):
                        op.logprobs_backward(
                            rows, layout, labels, lse, grad_logp, ignore_index=-100, temperature=1.0, inplace=inplace
                        )
                case = f"N={BATCH * SEQ}, V={vocab}"
                shifted = view_name != "logits[:, :-1]"
                tag = f", {view_name}" if shifted else ""
                fwd, bwd_new, bwd_inplace = launches
                out.append(Case("token_logprobs fwd", f"{dt}, {v_class}{tag}", case, fwd, {} if shifted else loads))
                bwd_expect = wide if aligned else {"min_hot_store_bits": 128}
                out.append(
                    Case(
                        "token_logprobs bwd",
                        f"{dt}, {v_class}{tag}, new buffer",
                        case,
                        bwd_new,
                        {} if shifted else bwd_expect,
                    )
                )
                out.append(
                    Case(
                        "token_logprobs bwd",
                        f"{dt}, {v_class}{tag}, in place",
                        case,
                        bwd_inplace,
                        {} if shifted else wide,
                    )
                )
    return out


def token_scores_cases() -> list[Case]:
    import torch

    from allo_kernels.ops import token_scores as op

    out = []
    for scope, (n_scopes, length) in (
        ("sequence", (BATCH, SEQ)),
        ("batch", (1, BATCH * SEQ)),
        ("sequence", (16, 1024)),
    ):
        for highest in (True, False):
            logp = torch.empty(n_scopes, length, dtype=torch.float32, device="meta")
            labels = torch.empty(n_scopes, length, dtype=torch.int64, device="meta")
            k = torch.empty(n_scopes, dtype=torch.int64, device="meta")
            with recording(op) as launches:
                op._select_triton(logp, logp, labels, k, beta=0.1, ignore_index=-100, highest=highest)
            for launch in launches:
                name = launch.kernel.__name__.strip("_").removesuffix("_kernel")
                variant = f"mask_by={'highest' if highest else 'lowest'}"
                out.append(Case(f"token_scores {name}", variant, f"{scope} scope {n_scopes}x{length}", launch, {}))
    return out


def sparse_adamw_cases() -> list[Case]:
    import torch

    from allo_kernels.optim import _triton_adamw as op
    from allo_kernels.optim._layout import make_layout, mask_layout
    from allo_kernels.optim._reference import StepScalars

    def scalars(amsgrad: bool) -> StepScalars:
        return StepScalars(
            lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=10.0, amsgrad=amsgrad, maximize=False
        )

    def work(dtype, *, master: bool, amsgrad: bool, elem: bool, fraction: float = 0.1) -> list:
        # torch.empty on CPU: the pages are never touched (nothing is launched), so 7B-sized buffers cost no memory.
        items = []
        g = torch.Generator().manual_seed(0)
        for rows, cols in LLAMA7B_MATRICES.values():
            p = torch.empty(rows, cols, dtype=dtype)
            mask = torch.rand(rows, generator=g) < fraction
            if elem:  # every third element of the selected rows left out
                mask = mask[:, None] & (torch.arange(cols) % 3 != 0)
            layout = mask_layout(p, mask)
            n = layout.n_compact
            state = [torch.empty(n, dtype=torch.float32) for _ in range(2)]
            vmax = torch.empty(n, dtype=torch.float32) if amsgrad else None
            mw = torch.empty(n, dtype=torch.float32) if master else None
            items.append((p, torch.empty_like(p), layout, *state, vmax, mw, scalars(amsgrad)))
        return items

    def zero_partition() -> list:
        # ZeRO: one flat fp32 partition cut at an arbitrary element; the selected rows' segments start unaligned.
        numel = 4096 * 4096
        flat = torch.empty(numel, dtype=torch.float32)
        starts = torch.tensor([4093, 4096 * 9 + 1, 4096 * 100 - 3])
        lens = torch.tensor([4096 * 3 + 5, 4096, 4096 * 2 - 7])
        layout = make_layout(numel, starts, lens)
        n = layout.n_compact
        return [(flat, torch.empty_like(flat), layout, torch.empty(n), torch.empty(n), None, None, scalars(False))]

    # Acceptance (issue 12): aligned fp32 moves 128 bits per access, bf16 / fp16 at least 64.
    wide = {"min_hot_load_bits": 128, "min_hot_store_bits": 128}
    half = {"min_hot_load_bits": 64, "min_hot_store_bits": 64}
    configs = [
        ("fp32, row masks", work(torch.float32, master=False, amsgrad=False, elem=False), wide),
        ("bf16 + fp32 master, row masks", work(torch.bfloat16, master=True, amsgrad=False, elem=False), half),
        ("bf16, row masks", work(torch.bfloat16, master=False, amsgrad=False, elem=False), half),
        ("fp16 + amsgrad, row masks", work(torch.float16, master=False, amsgrad=True, elem=False), half),
        ("fp32, element masks", work(torch.float32, master=False, amsgrad=False, elem=True), {}),
        ("fp32, ZeRO partition (unaligned segments)", zero_partition(), {}),
    ]
    out = []
    for variant, items, expect in configs:
        with recording(op) as launches:
            op.triton_step(items)
        shape = "4096x4096 flat partition" if "ZeRO" in variant else "7B layer (4096 / 11008), 10% of rows"
        out.extend(Case("SparseAdamW step", variant, shape, launch, expect) for launch in launches)
    return out


SPECS: tuple[Callable[[], list[Case]], ...] = (token_logprobs_cases, token_scores_cases, sparse_adamw_cases)


def collect(arch: int, only: str | None = None) -> list[KernelReport]:
    """Compile every distinct specialization of every kernel (whose row label contains ``only``) for ``sm_<arch>``."""
    groups: dict[str, tuple[Case, list[str]]] = {}
    for spec in SPECS:
        for case in spec():
            if only and only not in case.kernel:
                continue
            key = _spec_key(case.launch, arch) + repr((case.kernel, case.variant))
            if key in groups:
                groups[key][1].append(case.case)
            else:
                groups[key] = (case, [case.case])
    return [report(c.kernel, c.variant, cases, c.launch, arch, c.expect) for c, cases in groups.values()]


def nvidia_backend_missing() -> str | None:
    """Why kernels cannot be compiled for NVIDIA here (None when they can)."""
    try:
        import triton  # noqa: F401
        from triton.backends import backends

        if "nvidia" not in backends:
            return "the installed triton has no NVIDIA backend"
        for tool in ("ptxas", "cuobjdump"):
            if not Path(_tool(tool)).exists():
                return f"the installed triton ships no {tool}"
    except Exception as exc:
        return f"triton's NVIDIA backend cannot be loaded: {exc}"
    return None


# --------------------------------------------------------------------------------------------------------- rendering
def _widths(counts: dict) -> str:
    if not counts:
        return "-"
    return ", ".join(f"{w}-bit x{n}" for w, n in sorted(((int(w), n) for w, n in counts.items()), reverse=True))


def render(reports: list[dict], arch: int, triton_version: str) -> str:
    """The markdown table of one architecture (what benchmarks/results/codegen-sm<arch>.md holds)."""
    lines = [
        f"# allo's Triton kernels compiled for {ARCH_NAMES[arch]}",
        "",
        f"Written by `python -m benchmarks.codegen --write` with triton {triton_version} (its compiler, ptxas and",
        "cuobjdump; no GPU) and checked by tests/test_gpu_codegen.py: a change in generated code shows up here.",
        "Each row is one specialization, compiled exactly as its launch wrapper launches it at the listed shapes.",
        "",
        "- regs: registers per thread. stack / local: bytes per thread; LDL/STL: local-memory instructions (spills).",
        "- smem: shared memory per block (static + dynamic). occupancy: resident warps / 64, limiter in brackets",
        "  (formula in benchmarks/codegen.py).",
        "- hot loop: the kernel's loop (the whole kernel when it has none); per thread and iteration, width x count",
        "  of its global loads (LDG) and stores (STG). 128-bit = one 16-byte vector access.",
        "- casts: fp32 -> 16-bit conversions in the PTX (one `cvt.rn` each: round to nearest even).",
        "",
        "| kernel | variant | shapes | warps | regs | stack / local B | LDL/STL | smem B | occupancy | hot-loop loads "
        "| hot-loop stores | casts |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in reports:
        shapes = "; ".join(r["cases"][:2]) + (f"; +{len(r['cases']) - 2} more" if len(r["cases"]) > 2 else "")
        loop = "" if r["has_loop"] else " (no loop)"
        casts = ", ".join(f"`{c}`" for c in r["down_casts"]) or "-"
        lines.append(
            f"| {r['kernel']} | {r['variant']} | {shapes} | {r['num_warps']} | {r['regs']} | {r['stack']} / "
            f"{r['local']} | {r['local_accesses']} | {r['smem']} | {100 * r['occupancy']:.1f}% ({r['limiter']}) | "
            f"{_widths(r['hot_loads'])}{loop} | {_widths(r['hot_stores'])} | {casts} |"
        )
    return "\n".join(lines) + "\n"


def run_arch(arch: int, only: str | None = None) -> dict:
    import triton

    reports = collect(arch, only)
    return {"arch": arch, "triton": triton.__version__, "reports": [asdict(r) for r in reports]}


def run_all(archs: tuple[int, ...] = ARCHS, *, timeout: float = 600) -> dict[int, dict]:
    """Each architecture in its own process (two at once), without the interpreter; returns {arch: results}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the 3.9 default, stated (silences its warning)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        for arch in archs:
            out = Path(tmp) / f"sm{arch}.json"
            cmd = [sys.executable, "-m", "benchmarks.codegen", "--arch", str(arch), "--json", str(out)]
            procs[arch] = (
                subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                out,
            )
        results = {}
        for arch, (proc, out) in procs.items():
            log, _ = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"compiling for sm_{arch} failed (exit {proc.returncode}):\n{log[-4000:]}")
            results[arch] = json.loads(out.read_text())
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, choices=ARCHS, help="one architecture in this process")
    parser.add_argument("--json", type=Path, help="with --arch: write the raw results here")
    parser.add_argument("--write", action="store_true", help=f"write codegen-sm<arch>.md into {RESULTS_DIR}")
    parser.add_argument("--only", help="with --arch: only the kernels whose row label contains this text")
    args = parser.parse_args(argv)
    missing = nvidia_backend_missing()
    if missing:
        print(f"benchmarks.codegen: {missing}; nothing compiled", file=sys.stderr)
        return 2
    if args.arch is not None:
        result = run_arch(args.arch, args.only)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        print(render(result["reports"], args.arch, result["triton"]))
        return 0
    for arch, result in run_all().items():
        text = render(result["reports"], arch, result["triton"])
        print(text)
        if args.write:
            (RESULTS_DIR / f"codegen-sm{arch}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
