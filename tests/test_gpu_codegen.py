"""What a GPU would get from every Triton kernel, checked without a GPU (issue 12).

benchmarks/codegen.py compiles each kernel for sm_90 and sm_80 exactly as its launch wrapper launches it (the wrapper
runs on meta tensors of realistic shapes with the kernel replaced by a recorder) and reads the cubin. Here we assert:
it compiles; no spills and no local memory; the bandwidth-bound hot loops move their data with vector accesses; the
occupancy targets; fp32 -> bf16/fp16 casts are one ``cvt.rn`` each; and benchmarks/results/codegen-sm*.md are what
the current code compiles to (regenerate with ``python -m benchmarks.codegen --write``).

About a minute on two cores with a cold Triton cache (both architectures compile in parallel processes).
"""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_codegen():
    # Loaded by path: the benchmarks directory is not an installed package.
    spec = importlib.util.spec_from_file_location("allo_bench_codegen", ROOT / "benchmarks" / "codegen.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["allo_bench_codegen"] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


codegen = _load_codegen()
MISSING = codegen.nvidia_backend_missing()
needs_backend = pytest.mark.skipif(MISSING is not None, reason=f"cannot compile for NVIDIA GPUs here: {MISSING}")
ARCHS = list(codegen.ARCHS)
KERNELS = {"token_logprobs fwd", "token_logprobs bwd", "token_scores select_key", "SparseAdamW step"}


@pytest.fixture(scope="module")
def compiled() -> dict[int, dict]:
    return codegen.run_all()


def _reports(compiled, arch):
    return compiled[arch]["reports"]


def _name(r) -> str:
    return f"sm_{r['arch']} {r['kernel']} [{r['variant']}]"


# ------------------------------------------------------------------------------------- the helpers, without compiling
@pytest.mark.parametrize(
    "regs,smem,warps,arch,blocks,fraction",
    [
        (255, 1280, 4, 90, 2, 0.125),  # the old rank-count select kernel
        (124, 0, 4, 90, 4, 0.25),  # the old SparseAdamW kernel
        (48, 0, 4, 90, 10, 0.625),
        (32, 1056, 8, 90, 8, 1.0),
        (40, 0, 8, 80, 6, 0.75),
        (16, 100 * 1024, 4, 80, 1, 0.0625),  # shared memory bound
    ],
)
def test_occupancy_formula(regs, smem, warps, arch, blocks, fraction):
    occ = codegen.occupancy(regs, smem, warps, arch)
    assert (occ.blocks_per_sm, occ.fraction) == (blocks, fraction)


def test_sass_reading():
    sass = """
        /*0000*/                   LDG.E.64 R2, desc[UR8][R2.64] ;
        /*0010*/              @!P1 LDG.E.128 R4, desc[UR8][R22.64] ;
        /*0020*/              @!P1 LDG.E.U16 R8, desc[UR8][R22.64+0x1000] ;
        /*0030*/                   STG.E.128 desc[UR8][R2.64], R4 ;
        /*0040*/                   STL [R1], R9 ;
        /*0050*/              @!P2 BRA 0x10 ;
        /*0060*/                   STG.E desc[UR8][R4.64], R9 ;
        /*0070*/                   BRA 0x70;
    """
    s = codegen.summarize_sass(sass)
    assert s.has_loop
    assert s.hot_loads == {128: 1, 16: 1} and s.hot_stores == {128: 1}
    assert s.all_loads == {64: 1, 128: 1, 16: 1} and s.all_stores == {128: 1, 32: 1}
    assert s.local_accesses == 1


# --------------------------------------------------------------------------------------------- the compiled kernels
@needs_backend
@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiles(compiled, arch):
    reports = _reports(compiled, arch)
    assert {r["kernel"] for r in reports} == KERNELS
    assert all(r["regs"] > 0 for r in reports)


@needs_backend
@pytest.mark.parametrize("arch", ARCHS)
def test_no_spills_and_no_local_memory(compiled, arch):
    bad = [_name(r) for r in _reports(compiled, arch) if r["stack"] or r["local"] or r["local_accesses"]]
    assert not bad, f"spills / local memory in: {bad}"


@needs_backend
@pytest.mark.parametrize("arch", ARCHS)
def test_hot_loops_use_vector_accesses(compiled, arch):
    checked = 0
    for r in _reports(compiled, arch):
        for key, widths in (("min_hot_load_bits", r["hot_loads"]), ("min_hot_store_bits", r["hot_stores"])):
            if key in r["expect"]:
                narrowest = min((int(w) for w in widths), default=None)
                assert narrowest is not None or key == "min_hot_store_bits", f"{_name(r)}: no hot-loop loads"
                assert narrowest is None or narrowest >= r["expect"][key], f"{_name(r)}: {key} {widths}"
                checked += 1
    # token_logprobs fwd + 2 bwd for 3 dtypes x 2 vocabulary classes; SparseAdamW aligned fp32 / bf16 / fp16.
    assert checked >= 30


@needs_backend
@pytest.mark.parametrize("arch", ARCHS)
def test_occupancy_at_least_half(compiled, arch):
    low = [f"{_name(r)}: {r['occupancy']:.3f}" for r in _reports(compiled, arch) if r["occupancy"] < 0.5]
    assert not low


@needs_backend
@pytest.mark.parametrize("arch", ARCHS)
def test_down_casts_are_one_cvt_rn(compiled, arch):
    """to_rne's integer rounding is for the interpreter only: compiled, a half store is one cvt.rn per value."""
    for r in _reports(compiled, arch):
        assert not r["integer_rounding"], _name(r)
        stores_half = r["kernel"] in ("token_logprobs bwd", "SparseAdamW step") and not r["variant"].startswith("fp32")
        if stores_half:
            half = "bf16" if r["variant"].startswith("bf16") else "f16"
            assert any(c.startswith(f"cvt.rn.{half}") for c in r["down_casts"]), _name(r)
        else:
            assert not r["down_casts"], _name(r)


@needs_backend
@pytest.mark.parametrize("arch", ARCHS)
def test_committed_tables_are_current(compiled, arch):
    path = ROOT / "benchmarks" / "results" / f"codegen-sm{arch}.md"
    fresh = codegen.render(compiled[arch]["reports"], arch, compiled[arch]["triton"])
    committed = path.read_text() if path.exists() else ""
    assert committed == fresh, (
        f"{path.relative_to(ROOT)} is not what the kernels compile to now; regenerate it with "
        "`python -m benchmarks.codegen --write` and review the difference"
    )
