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


# ------------------------------------------------------------------------------------- benchmarks/gpu_check.sh on CPU
def _write_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel (one module) for the install step."""
    import base64
    import hashlib
    import zipfile

    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": "PROBE = True\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: allo-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


def test_gpu_check_dry_run(tmp_path):
    """The whole GPU check on the CPU at tiny shapes: install from a wheel folder (a torch wheel there is left out),
    the GPU tests, every benchmark suite, results JSON and markdown. About two minutes on two busy cores."""
    import os
    import subprocess

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _write_wheel(wheels, "allo_gpu_check_probe", "0.1")
    (wheels / "torch-9.9-py3-none-any.whl").write_text("not a wheel: must never reach pip")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ALLO_KERNELS_BACKEND")}
    env["PYTHON"] = sys.executable
    cmd = ["bash", "benchmarks/gpu_check.sh", "--dry-run", "--wheels", str(wheels), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (out / "gpu_check.md").read_text()
    steps = {line.split(" | ")[0].lstrip("| "): line for line in summary.splitlines() if line.startswith("| ")}
    assert "passed" in steps["install 1 wheel(s)"]
    assert "left out (the machine's own stays): torch-9.9-py3-none-any.whl" in (out / "gpu_check.log").read_text()
    gpu_tests = [k for k in steps if k.startswith("pytest -m gpu")]
    assert len(gpu_tests) == 1 and "passed" in steps[gpu_tests[0]]
    for suite in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        row = [v for k, v in steps.items() if k.startswith(f"{suite.stem} [")]
        assert len(row) == 1 and "passed" in row[0], (suite.stem, row)
    rows = __import__("json").loads((out / "cpu.json").read_text())["rows"]
    assert {r["suite"] for r in rows} >= {"token_logprobs", "token_scores"}
    assert (out / "cpu.md").read_text().startswith("# Benchmarks on cpu")
    assert (out / "pytest-benchmark.json").exists()


def test_gpu_check_refuses_without_gpu_and_bad_arguments(tmp_path):
    import os
    import subprocess

    import torch

    env = {**os.environ, "PYTHON": sys.executable}
    out = tmp_path / "never"
    cases = [
        (["--budget", "ten"], "--budget must be whole seconds, got 'ten'"),
        (["--colour"], "unknown argument '--colour'"),
    ]
    if not torch.cuda.is_available():  # with a GPU this would start the real check
        cases.append(([], "no CUDA device visible to torch; on a CPU machine use --dry-run"))
    for args, message in cases:
        proc = subprocess.run(
            ["bash", "benchmarks/gpu_check.sh", "--out", str(out), *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    assert not out.exists()
