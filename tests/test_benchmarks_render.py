"""benchmarks/render.py turns a results JSON into tables with the right speedups; the recorder merges rows by key."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str, filename: str):
    # Loaded by path: the benchmarks directory is not an installed package (and is never collected by `pytest tests`).
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


render = _load("allo_bench_render", "render.py")


def _row(suite, case, impl, n, dtype, **fields):
    row = {"suite": suite, "case": case, "impl": impl, "shape": f"N={n}", "params": {"N": n}, "dtype": dtype}
    row.update(fields)
    row.setdefault("status", "ok")
    return row


@pytest.fixture
def results_json(tmp_path):
    rows = [
        # Known suite, ours = "allo" (marked).
        _row(
            "token_logprobs",
            "full",
            "allo",
            4096,
            "bf16",
            ours=True,
            median_ms=2.0,
            peak_mem_mb=100.0,
            gbps=1500.0,
            pct_of_peak=44.8,
        ),
        _row("token_logprobs", "full", "eager_fp32", 4096, "bf16", median_ms=6.0, peak_mem_mb=400.0),
        _row("token_logprobs", "full", "trl_selective", 4096, "bf16", median_ms=5.0, peak_mem_mb=250.0),
        _row("token_logprobs", "full", "compiled", 4096, "bf16", status="oom"),
        _row("token_logprobs", "full", "liger", 4096, "bf16", status="skipped", note="liger_kernel is not importable"),
        # Second shape; listed first in the file with a larger N to check numeric ordering of groups.
        _row("token_logprobs", "fwd", "allo", 16384, "bf16", ours=True, median_ms=4.0, peak_mem_mb=10.0),
        _row("token_logprobs", "fwd", "eager_fp32", 16384, "bf16", median_ms=3.0, peak_mem_mb=30.0),
        _row("token_logprobs", "fwd", "allo", 512, "bf16", ours=True, median_ms=1.0, peak_mem_mb=5.0),
        _row("token_logprobs", "fwd", "eager_fp32", 512, "bf16", median_ms=1.5, peak_mem_mb=None),
        # A suite the renderer knows nothing about, ours marked on an impl that is not called "allo".
        _row("sparse_adamw", "step", "dense_torch", 7, "fp32", median_ms=9.0),
        _row("sparse_adamw", "step", "ours_sparse", 7, "fp32", ours=True, median_ms=1.5),
    ]
    data = {
        "schema": 1,
        "metadata": {"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda", "peak_bandwidth_gbps": 3350.0},
        "rows": rows,
    }
    path = tmp_path / "nvidia-h100-80gb-hbm3.json"
    path.write_text(json.dumps(data))
    return path


def _table_lines(text: str, section: str) -> list[str]:
    part = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in part.splitlines() if line.startswith("| ")]


def test_speedups_memory_ratios_and_statuses(results_json, tmp_path):
    text = render.render_file(results_json, out_dir=tmp_path / "out", plot=False)
    assert (tmp_path / "out" / "nvidia-h100-80gb-hbm3.md").read_text() == text

    lines = _table_lines(text, "token_logprobs")
    time_header = lines[0]
    # Ours first; liger never ran anywhere -> no column; compiled ran nowhere either (OOM) -> no column.
    assert time_header == (
        "| case | shape | dtype | allo ms | eager_fp32 ms (speedup) | trl_selective ms (speedup) "
        "| allo GB/s | allo % of peak BW |"
    )
    # Groups ordered fwd before full, and by numeric N within a case (512 before 16384).
    assert lines[1] == "| fwd | N=512 | bf16 | 1 | 1.5 (1.50x) | - | - | - |"
    assert lines[2] == "| fwd | N=16384 | bf16 | 4 | 3 (0.75x) | - | - | - |"
    assert lines[3] == "| full | N=4096 | bf16 | 2 | 6 (3.00x) | 5 (2.50x) | 1500 | 44.8% |"

    mem_header = lines[4]
    assert mem_header == "| case | shape | dtype | allo MB | eager_fp32 MB (x ours) | trl_selective MB (x ours) |"
    assert lines[5] == "| fwd | N=512 | bf16 | 5 | - | - |"
    assert lines[6] == "| fwd | N=16384 | bf16 | 10 | 30 (3.00x) | - |"
    assert lines[7] == "| full | N=4096 | bf16 | 100 | 400 (4.00x) | 250 (2.50x) |"
    assert "`liger`: not run here: liger_kernel is not importable" in text

    # Unknown suite: ours comes from the row flag, speedup 9.0 / 1.5.
    other = _table_lines(text, "sparse_adamw")
    assert other[0] == "| case | shape | dtype | ours_sparse ms | dense_torch ms (speedup) |"
    assert other[1] == "| step | N=7 | fp32 | 1.5 | 9 (6.00x) |"


def test_cli_writes_markdown_and_one_plot_per_suite(results_json, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "rendered"
    assert render.main([str(results_json), "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| full | N=4096 | bf16 | 2 | 6 (3.00x) | 5 (2.50x) | 1500 | 44.8% |" in printed
    for suite in ("token_logprobs", "sparse_adamw"):
        png = out / f"nvidia-h100-80gb-hbm3-{suite}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{suite}]({png.name})" in printed


def test_recorder_replaces_rows_by_key_and_keeps_measured_rows(tmp_path):
    harness = _load("allo_bench_harness", "conftest.py")
    path = tmp_path / "dev.json"
    rec = harness.ResultsRecorder(path, {"device": "dev", "git_commit": "abc"})
    key = dict(suite="s", case="fwd", impl="a", shape="N=1", params={"N": 1}, dtype="fp32")
    rec.add({**key, "status": "ok", "median_ms": 2.0})
    rec.add({**key, "impl": "b", "status": "ok", "median_ms": 3.0})
    rec.add({**key, "status": "ok", "median_ms": 1.0})  # same key: replaces, keeps its place
    rec.add({**key, "status": "skipped", "note": "x"})  # a skip never erases a measurement
    rec.add({**key, "dtype": "bf16", "status": "skipped", "note": "y"})
    data = json.loads(path.read_text())
    assert data["metadata"]["device"] == "dev"
    got = [(r["impl"], r["dtype"], r["status"], r.get("median_ms")) for r in data["rows"]]
    assert got == [("a", "bf16", "skipped", None), ("a", "fp32", "ok", 1.0), ("b", "fp32", "ok", 3.0)]
    with pytest.raises(ValueError, match="missing"):
        rec.add({"suite": "s", "case": "fwd", "impl": "a", "dtype": "fp32"})


def test_measure_reports_median_of_reps_and_no_memory_on_cpu():
    harness = _load("allo_bench_harness2", "conftest.py")
    import torch

    calls = []
    m = harness.measure(lambda x: calls.append(x), setup=lambda: 7, warmup=2, reps=5, device=torch.device("cpu"))
    assert calls == [7] * 7
    assert m.reps == 5 and m.warmup == 2 and m.timer == "perf_counter" and m.peak_mem_bytes is None
    assert m.min_s <= m.median_s and m.median_s >= 0
    assert harness.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3350e9
    assert harness.peak_bandwidth("NVIDIA H100 PCIe") == 2000e9
    assert harness.peak_bandwidth("NVIDIA H200") == 4800e9
    assert harness.peak_bandwidth("NVIDIA A100-SXM4-80GB") == 2039e9
    assert harness.peak_bandwidth("Some Future GPU") is None
    assert harness.format_shape({"N": 4096, "V": 32000}) == "N=4096,V=32000"
