"""Benchmark runs and renders write to a scratch folder unless asked (--save) to update the committed results.

Every run here happens in a throw-away git repository holding a copy of the harness (benchmarks/conftest.py,
render.py), a committed results file and one tiny benchmark, so the paths are resolved exactly as in the real tree
while the real tree is never written to.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TINY_BENCH = """
from benchmarks.conftest import record_skip, run_case


def test_tiny(benchmark, results):
    run_case(benchmark, results, suite="tiny", case="full", impl="allo", params={"N": 4}, dtype="fp32",
             fn=lambda: sum(range(100)), ours=True, warmup=0, reps=2)


def test_tiny_skip(results):
    record_skip(results, suite="tiny", case="full", impl="other", params={"N": 4}, dtype="fp32",
                reason="other_lib not installed")
"""


def _committed_results() -> dict:
    rows = [
        {"suite": "s", "case": "fwd", "impl": "allo", "shape": "N=1", "params": {"N": 1}, "dtype": "fp32"}
        | {"status": "ok", "median_ms": 1.0, "ours": True},
        {"suite": "s", "case": "fwd", "impl": "base", "shape": "N=1", "params": {"N": 1}, "dtype": "fp32"}
        | {"status": "ok", "median_ms": 3.0},
        {"suite": "s", "case": "fwd", "impl": "gone", "shape": "N=1", "params": {"N": 1}, "dtype": "fp32"}
        | {"status": "skipped", "note": "gone_lib not installed"},
    ]
    return {"schema": 1, "metadata": {"device": "cpu", "device_type": "cpu"}, "rows": rows}


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


@pytest.fixture
def bench_repo(tmp_path) -> Path:
    """A git repository with a copy of the harness, one committed results file and a tiny benchmark; clean status."""
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    for name in ("__init__.py", "conftest.py", "render.py"):
        shutil.copy(REPO / "benchmarks" / name, repo / "benchmarks" / name)
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")
    (repo / "benchmarks" / "bench_tiny.py").write_text(TINY_BENCH)
    (repo / "benchmarks" / "results" / "cpu.json").write_text(json.dumps(_committed_results(), indent=1) + "\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "committed results")
    assert _git(repo, "status", "--porcelain") == ""
    return repo


def _run(repo: Path, *args: str, results_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ALLO_BENCH_RESULTS_DIR"}
    env["PYTHONPATH"] = os.pathsep.join([str(repo), str(REPO)])  # the copied `benchmarks`, the real allo_kernels
    env["ALLO_BENCH_DEVICE"] = "cpu"
    if results_dir is not None:
        env["ALLO_BENCH_RESULTS_DIR"] = str(results_dir)
    return subprocess.run([sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)


def _bench(repo: Path, *extra: str, results_dir: Path | None = None) -> subprocess.CompletedProcess:
    return _run(repo, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks", *extra, results_dir=results_dir)


def _rows(path: Path) -> set[tuple[str, str]]:
    return {(r["impl"], r["status"]) for r in json.loads(path.read_text())["rows"]}


def test_bench_run_writes_scratch_by_default_and_committed_results_only_with_save(bench_repo, tmp_path):
    committed = bench_repo / "benchmarks" / "results" / "cpu.json"
    before = committed.read_bytes()

    run = _bench(bench_repo)
    assert run.returncode == 0, run.stdout + run.stderr
    assert _git(bench_repo, "status", "--porcelain") == ""  # nothing in the repository changed (scratch is ignored)
    assert committed.read_bytes() == before
    scratch = bench_repo / ".bench-results" / "cpu.json"
    assert _rows(scratch) == {("allo", "ok"), ("other", "skipped")}
    lines = run.stdout.splitlines()
    assert (
        f"allo benchmarks: 2 rows merged into {scratch} (scratch; rerun with --save to update benchmarks/results/)"
        in (lines)
    )
    # the skipped case is explained at the end of the output, with its reason
    i = lines.index("allo benchmarks: skipped cases (count x reason, e.g. which): 1")
    assert lines[i + 1].split() == [
        "1",
        "x",
        "other_lib",
        "not",
        "installed",
        "(e.g.",
        "bench_tiny.py::test_tiny_skip)",
    ]

    elsewhere = tmp_path / "elsewhere"
    run = _bench(bench_repo, results_dir=elsewhere)
    assert run.returncode == 0, run.stdout + run.stderr
    assert _rows(elsewhere / "cpu.json") == {("allo", "ok"), ("other", "skipped")}
    assert f"rows merged into {elsewhere / 'cpu.json'}" in run.stdout

    run = _bench(bench_repo, "--save", results_dir=elsewhere)  # two destinations: refused before anything runs
    assert run.returncode == 4 and "ALLO_BENCH_RESULTS_DIR" in run.stderr and "--save" in run.stderr
    assert _git(bench_repo, "status", "--porcelain") == ""

    run = _bench(bench_repo, "--save")
    assert run.returncode == 0, run.stdout + run.stderr
    assert _git(bench_repo, "status", "--porcelain").split() == ["M", "benchmarks/results/cpu.json"]
    assert _rows(committed) == {("allo", "ok"), ("base", "ok"), ("gone", "skipped"), ("other", "skipped")}
    assert f"allo benchmarks: 2 rows merged into {committed}\n" in run.stdout


def test_render_writes_scratch_by_default_and_committed_results_only_with_save(bench_repo):
    pytest.importorskip("matplotlib")
    scratch = bench_repo / ".bench-results"
    scratch.mkdir()
    shutil.copy(bench_repo / "benchmarks" / "results" / "cpu.json", scratch / "cpu.json")

    run = _run(bench_repo, "-m", "benchmarks.render")
    assert run.returncode == 0, run.stderr
    assert _git(bench_repo, "status", "--porcelain") == ""
    assert sorted(p.name for p in scratch.iterdir()) == ["cpu-s.png", "cpu.json", "cpu.md"]
    assert "| fwd | N=1 | fp32 | 1 | 3 (3.00x) |" in run.stdout
    # the cases that did not run, with their reasons
    assert "   1 x s/gone: gone_lib not installed" in run.stderr.splitlines()
    assert f"rendered {scratch / 'cpu.json'} -> {scratch / 'cpu.md'}" in run.stderr

    (scratch / "cpu.md").unlink()
    run = _run(bench_repo, "-m", "benchmarks.render", "benchmarks/results/cpu.json", "--no-plot")
    assert run.returncode == 0, run.stderr
    assert _git(bench_repo, "status", "--porcelain") == ""  # a committed file named explicitly renders to scratch
    assert (scratch / "cpu.md").is_file()

    run = _run(bench_repo, "-m", "benchmarks.render", "--save")
    assert run.returncode == 0, run.stderr
    assert sorted(_git(bench_repo, "status", "--porcelain", "-uall").splitlines()) == [
        "?? benchmarks/results/cpu-s.png",
        "?? benchmarks/results/cpu.md",
    ]

    shutil.rmtree(scratch)
    run = _run(bench_repo, "-m", "benchmarks.render")
    assert run.returncode == 1 and "--save" in run.stderr and not scratch.exists()


def test_standalone_sparse_adamw_table_goes_to_scratch_unless_saved(tmp_path, monkeypatch, capsys):
    from benchmarks import bench_sparse_adamw as bsa
    from benchmarks import render

    args = ["--rows", "16", "--cols", "8", "--rounds", "2", "--no-deepspeed"]
    monkeypatch.setattr(render, "COMMITTED_RESULTS_DIR", tmp_path / "committed")
    monkeypatch.setenv("ALLO_BENCH_RESULTS_DIR", str(tmp_path / "scratch"))
    bsa.main(args)
    assert json.loads((tmp_path / "scratch" / bsa.STANDALONE_JSON).read_text())["shapes"] == [[16, 8]] * 4
    assert f"wrote {tmp_path / 'scratch' / bsa.STANDALONE_JSON} (scratch;" in capsys.readouterr().out
    assert not (tmp_path / "committed").exists()

    with pytest.raises(SystemExit) as exc:  # --save and ALLO_BENCH_RESULTS_DIR: refused before any step
        bsa.main([*args, "--save"])
    assert exc.value.code == 2 and "ALLO_BENCH_RESULTS_DIR" in capsys.readouterr().err

    monkeypatch.delenv("ALLO_BENCH_RESULTS_DIR")
    bsa.main([*args, "--save"])
    assert (tmp_path / "committed" / bsa.STANDALONE_JSON).is_file()


def test_standalone_row_delta_results_go_to_scratch_unless_saved(tmp_path, monkeypatch, capsys):
    from benchmarks import bench_row_delta as brd
    from benchmarks import render

    args = ["--sections", "layer", "--dtypes", "float32", "--layer-tokens", "4", "--layer-rounds", "2"]
    monkeypatch.setattr(render, "COMMITTED_RESULTS_DIR", tmp_path / "committed")
    monkeypatch.setenv("ALLO_BENCH_RESULTS_DIR", str(tmp_path / "scratch"))
    brd.main(args)
    written = json.loads((tmp_path / "scratch" / brd.RESULTS_JSON).read_text())
    assert set(written["layer"]) == {"float32"} and "step" not in written
    assert f"wrote {tmp_path / 'scratch' / brd.RESULTS_JSON} (scratch;" in capsys.readouterr().out
    assert not (tmp_path / "committed").exists()

    with pytest.raises(SystemExit) as exc:  # --save and ALLO_BENCH_RESULTS_DIR: refused before any measurement
        brd.main([*args, "--save"])
    assert exc.value.code == 2 and "ALLO_BENCH_RESULTS_DIR" in capsys.readouterr().err
