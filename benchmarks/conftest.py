"""Shared benchmark harness: device facts, timing, peak memory, and the results file.

Every ``benchmarks/bench_*.py`` imports its helpers from here (``from benchmarks.conftest import ...``):

* ``bench_device()``, ``device_name()``, ``device_slug()``, ``peak_bandwidth()``: what runs and how fast its memory is.
* ``pick_shapes(cpu=..., gpu=...)``: small shapes on CPU, the full list on CUDA or with ``ALLO_BENCH_FULL=1``.
* ``measure(fn, warmup=, reps=, setup=)``: median time (CUDA events on GPU, ``perf_counter`` on CPU) and peak memory.
* ``run_case(benchmark, results, ...)``: one benchmark case through pytest-benchmark, recorded as one results row;
  an out-of-memory case is recorded as ``status="oom"`` and skipped.
* the ``results`` fixture (a ``ResultsRecorder``): rows merged into ``<results dir>/<device-slug>.json``, one file
  per device, each row keyed by (suite, case, impl, shape, dtype); rerunning a case replaces its row. The results dir
  is the git-ignored scratch folder ``.bench-results/`` (or ``ALLO_BENCH_RESULTS_DIR``); ``pytest benchmarks --save``
  updates the committed ``benchmarks/results/`` instead. The run ends with where the rows went and why cases skipped.

Environment: ``ALLO_BENCH_DEVICE`` (cpu|cuda) overrides the device, ``ALLO_BENCH_FULL=1`` forces the full shape list,
``ALLO_BENCH_WARMUP`` / ``ALLO_BENCH_REPS`` override the repetition counts, ``ALLO_BENCH_PEAK_GBPS`` sets the peak
memory bandwidth of a GPU missing from the table, ``ALLO_BENCH_RESULTS_DIR`` is the scratch folder to write to,
``ALLO_BENCH_THREADS`` sets torch's intra-op CPU threads.

Files named ``bench_*.py`` are collected when this directory is passed to pytest; ``pytest tests`` (and a bare
``pytest``, via ``testpaths``) never looks here.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.render import COMMITTED_RESULTS_DIR, results_dir

if os.environ.get("ALLO_BENCH_THREADS"):
    # CPU runs on shared machines are steadier with one intra-op thread; recorded as torch_threads in the metadata.
    torch.set_num_threads(int(os.environ["ALLO_BENCH_THREADS"]))

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
SCHEMA_VERSION = 1
ROW_KEY_FIELDS = ("suite", "case", "impl", "shape", "dtype")


# -------------------------------------------------------------------------------------------------------- collection
def pytest_addoption(parser) -> None:
    parser.addoption(
        "--save",
        action="store_true",
        default=False,
        help="allo benchmarks: merge the rows into the committed benchmarks/results/ (default: the git-ignored "
        "scratch folder .bench-results/, or ALLO_BENCH_RESULTS_DIR)",
    )


def pytest_configure(config) -> None:
    global _RESULTS_DIR
    try:
        _RESULTS_DIR = results_dir(save=config.getoption("save"))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_collect_file(file_path: Path, parent):
    """Collect ``bench_*.py`` here (pytest's default pattern is ``test_*.py``).

    A file named on the command line is collected by pytest itself; returning a module for it too would run it twice.
    """
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


# ------------------------------------------------------------------------------------------------------------ device
def bench_device() -> torch.device:
    """The device under benchmark: CUDA when present, else CPU; ``ALLO_BENCH_DEVICE`` overrides."""
    forced = os.environ.get("ALLO_BENCH_DEVICE", "").strip().lower()
    if forced:
        if forced.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"ALLO_BENCH_DEVICE={forced} but torch.cuda.is_available() is False")
        return torch.device(forced)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device | None = None) -> str:
    """``torch.cuda.get_device_name`` on CUDA; ``"cpu"`` (the CPU model is in the metadata) otherwise."""
    device = device or bench_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_slug(device: torch.device | None = None) -> str:
    """File-name form of the device name: ``nvidia-h100-80gb-hbm3``, ``cpu``."""
    return slugify(device_name(device))


# Peak DRAM/HBM bandwidth in GB/s (1e9 bytes/s) from vendor data sheets. Matched in order on the lower-cased
# device name: every pattern must occur; the first row that matches wins, so specific rows come first.
PEAK_BANDWIDTH_GBPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("gb200",), 8000.0),
    (("b200",), 8000.0),
    (("h200",), 4800.0),
    (("h100", "nvl"), 3900.0),
    (("h100", "pcie"), 2000.0),
    (("h100",), 3350.0),  # SXM5 / "H100 80GB HBM3"
    (("h800", "pcie"), 2000.0),
    (("h800",), 3350.0),
    (("h20",), 4000.0),
    (("a100", "80gb", "pcie"), 1935.0),
    (("a100", "80gb"), 2039.0),
    (("a100",), 1555.0),  # 40 GB, SXM4 and PCIe
    (("a800", "80gb"), 2039.0),
    (("a10g",), 600.0),
    (("a10",), 600.0),
    (("l40s",), 864.0),
    (("l40",), 864.0),
    (("l4",), 300.0),
    (("rtx 6000 ada",), 960.0),
    (("a6000",), 768.0),
    (("4090",), 1008.0),
    (("3090",), 936.0),
    (("v100",), 900.0),
    (("t4",), 320.0),
    (("mi300x",), 5300.0),
    (("mi250x",), 3277.0),
)


def peak_bandwidth(name: str | None = None) -> float | None:
    """Peak memory bandwidth in bytes/s of the named (default: benchmarked) device; None when unknown or CPU."""
    override = os.environ.get("ALLO_BENCH_PEAK_GBPS", "").strip()
    if override:
        return float(override) * 1e9
    if name is None:
        name = device_name()
    lowered = name.lower()
    if lowered == "cpu":
        return None
    for patterns, gbps in PEAK_BANDWIDTH_GBPS:
        if all(p in lowered for p in patterns):
            return gbps * 1e9
    return None


def full_shapes() -> bool:
    """Whether the full (GPU-sized) shape lists run: on CUDA, or when ``ALLO_BENCH_FULL=1``."""
    if os.environ.get("ALLO_BENCH_FULL", "0") not in ("", "0", "false", "False"):
        return True
    return bench_device().type == "cuda"


def pick_shapes(*, cpu: Sequence[Any], gpu: Sequence[Any]) -> list[Any]:
    """The GPU shape list on CUDA (or ALLO_BENCH_FULL=1), else the CPU one; ``ALLO_BENCH_TINY=1`` keeps only the
    first CPU shape (the smallest, by convention): what ``gpu_check.sh --dry-run`` runs."""
    if full_shapes():
        return list(gpu)
    if os.environ.get("ALLO_BENCH_TINY", "0") not in ("", "0", "false", "False"):
        return list(cpu[:1])
    return list(cpu)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}.get(
        dtype, str(dtype).replace("torch.", "")
    )


def format_shape(params: dict[str, Any]) -> str:
    """``{"N": 4096, "V": 32000}`` -> ``"N=4096,V=32000"`` (the row key's shape string)."""
    return ",".join(f"{k}={v}" for k, v in params.items())


def default_warmup(device: torch.device | None = None) -> int:
    env = os.environ.get("ALLO_BENCH_WARMUP")
    if env:
        return int(env)
    return 3 if (device or bench_device()).type == "cuda" else 1


def default_reps(device: torch.device | None = None) -> int:
    env = os.environ.get("ALLO_BENCH_REPS")
    if env:
        return int(env)
    return 20 if (device or bench_device()).type == "cuda" else 3


def sync(device: torch.device | None = None) -> None:
    device = device or bench_device()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device | None = None) -> None:
    """Drop cached allocator blocks between cases so one case's leftovers do not shape the next one's numbers."""
    import gc

    gc.collect()
    device = device or bench_device()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


# ------------------------------------------------------------------------------------------------------------ timing
@dataclass
class Measurement:
    """Timing of ``reps`` calls (after ``warmup``) and the peak extra memory of one call."""

    times_s: list[float]
    warmup: int
    timer: str  # "cuda_events" or "perf_counter"
    peak_mem_bytes: int | None  # None on CPU: torch has no allocator statistics there, and RSS deltas lie
    median_s: float = field(init=False)
    min_s: float = field(init=False)
    mean_s: float = field(init=False)
    stdev_s: float = field(init=False)

    def __post_init__(self) -> None:
        if not self.times_s:
            raise ValueError("Measurement needs at least one timed repetition")
        self.median_s = statistics.median(self.times_s)
        self.min_s = min(self.times_s)
        self.mean_s = statistics.fmean(self.times_s)
        self.stdev_s = statistics.stdev(self.times_s) if len(self.times_s) > 1 else 0.0

    @property
    def reps(self) -> int:
        return len(self.times_s)


class _Timer:
    """Calls ``fn(*state)`` and records its time: CUDA events on GPU (queue time excluded), ``perf_counter`` on CPU.

    ``setup()`` (untimed) returns the state tuple handed to ``fn``; its device work is synchronised before timing.
    """

    def __init__(self, fn: Callable[..., Any], setup: Callable[[], Any] | None, device: torch.device):
        self.fn, self.setup, self.device = fn, setup, device
        self.cuda = device.type == "cuda"
        self._events: list[tuple[Any, Any]] = []
        self._times: list[float] = []

    def prepare(self) -> tuple:
        state = self.setup() if self.setup is not None else ()
        if not isinstance(state, tuple):
            state = (state,)
        sync(self.device)
        return state

    def timed_call(self, *state: Any) -> None:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.fn(*state)
            end.record()
            del out
            torch.cuda.synchronize(self.device)  # so the wall clock around this call (pytest-benchmark's) is right too
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            out = self.fn(*state)
            self._times.append(time.perf_counter() - t0)
            del out

    def times(self) -> list[float]:
        if self.cuda:
            return [s.elapsed_time(e) / 1e3 for s, e in self._events]
        return list(self._times)

    def peak_memory(self) -> int | None:
        if not self.cuda:
            return None
        state = self.prepare()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        out = self.fn(*state)
        sync(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del out, state
        return int(peak)


def measure(
    fn: Callable[..., Any],
    *,
    warmup: int | None = None,
    reps: int | None = None,
    setup: Callable[[], Any] | None = None,
    device: torch.device | None = None,
    track_memory: bool = True,
) -> Measurement:
    """Time ``fn`` without pytest-benchmark (scripts, end-to-end loops).

    ``setup()`` runs untimed before every call and its return value (a tuple, or one object) is passed to ``fn``.
    Peak memory is ``max_memory_allocated`` during one extra call minus ``memory_allocated`` just before it: the extra
    memory the call needs beyond its inputs (and, for a backward, beyond the saved forward state). None on CPU.
    """
    device = device or bench_device()
    warmup = default_warmup(device) if warmup is None else warmup
    reps = default_reps(device) if reps is None else reps
    timer = _Timer(fn, setup, device)
    for _ in range(warmup + reps):
        timer.timed_call(*timer.prepare())
    times = timer.times()[warmup:]
    peak = timer.peak_memory() if track_memory else None
    return Measurement(times, warmup, "cuda_events" if timer.cuda else "perf_counter", peak)


def run_benchmark(
    benchmark: Any,
    fn: Callable[..., Any],
    *,
    warmup: int | None = None,
    reps: int | None = None,
    setup: Callable[[], Any] | None = None,
    device: torch.device | None = None,
    track_memory: bool = True,
) -> Measurement | None:
    """Like ``measure`` but through pytest-benchmark's ``benchmark.pedantic`` (so its table and JSON options work).

    The recorded times are the same CUDA-event / perf_counter times ``measure`` reports; pytest-benchmark's own wall
    clock includes one synchronisation per round. Returns None under ``--benchmark-disable`` (``fn`` ran once).
    """
    device = device or bench_device()
    warmup = default_warmup(device) if warmup is None else warmup
    timer = _Timer(fn, setup, device)
    if getattr(benchmark, "disabled", False):  # --benchmark-disable: run once as a smoke test, record nothing
        benchmark.pedantic(timer.timed_call, setup=lambda: (timer.prepare(), {}), rounds=1, iterations=1)
        return None
    for _ in range(max(warmup, 1) if reps is None else warmup):
        timer.timed_call(*timer.prepare())
    if reps is None:
        reps = default_reps(device)
        if device.type == "cpu" and not os.environ.get("ALLO_BENCH_REPS"):
            # Small CPU cases are noisy (shared cores): more repetitions where they are cheap, ~0.5 s per case.
            reps = int(min(15, max(reps, 0.5 / max(timer.times()[-1], 1e-6))))
    benchmark.pedantic(
        timer.timed_call,
        setup=lambda: (timer.prepare(), {}),
        rounds=reps,
        warmup_rounds=0,
        iterations=1,
    )
    times = timer.times()
    times = times[len(times) - reps :]  # pedantic's warmup rounds went through the same timer
    peak = timer.peak_memory() if track_memory else None
    return Measurement(times, warmup, "cuda_events" if timer.cuda else "perf_counter", peak)


# ----------------------------------------------------------------------------------------------------------- results
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment_metadata(device: torch.device | None = None) -> dict[str, Any]:
    device = device or bench_device()
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover
        triton_version = None
    peak = peak_bandwidth(device_name(device))
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": device_name(device),
        "device_slug": device_slug(device),
        "device_type": device.type,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "peak_bandwidth_gbps": None if peak is None else peak / 1e9,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _sort_value(v: Any) -> tuple:
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def row_sort_key(row: dict[str, Any]) -> tuple:
    params = row.get("params") or {}
    return (
        str(row.get("suite")),
        str(row.get("case")),
        tuple((k, _sort_value(v)) for k, v in params.items()) or ((str(row.get("shape")), (1, 0, "")),),
        str(row.get("dtype")),
    )


class ResultsRecorder:
    """Merges rows into ``<results_dir>/<device-slug>.json``; written after every row so a killed run keeps its rows."""

    def __init__(self, path: Path, metadata: dict[str, Any]):
        self.path = Path(path)
        self.metadata = metadata
        self.n_recorded = 0

    def _load(self) -> dict[str, Any]:
        if self.path.exists():
            with open(self.path) as f:
                data = json.load(f)
            if data.get("schema") == SCHEMA_VERSION:
                return data
        return {"schema": SCHEMA_VERSION, "metadata": {}, "rows": []}

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        missing = [k for k in ROW_KEY_FIELDS if row.get(k) in (None, "")]
        if missing:
            raise ValueError(f"results row needs {ROW_KEY_FIELDS}, missing {missing}: {row}")
        row = {
            **row,
            "device": self.metadata["device"],
            "git_commit": self.metadata.get("git_commit"),
            "recorded_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        data = self._load()
        key = tuple(row[k] for k in ROW_KEY_FIELDS)
        old = [r for r in data["rows"] if tuple(r.get(k) for k in ROW_KEY_FIELDS) == key]
        if row.get("status") == "skipped" and any(r.get("status") == "ok" for r in old):
            return old[0]  # a run without (say) Liger installed must not erase Liger's measured row
        rows = [row if tuple(r.get(k) for k in ROW_KEY_FIELDS) == key else r for r in data["rows"]]
        if not old:
            rows.append(row)
        rows.sort(key=row_sort_key)  # stable: implementations keep the order they were first recorded in
        data["rows"] = rows
        data["metadata"] = self.metadata
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=False)
            f.write("\n")
        os.replace(tmp, self.path)
        self.n_recorded += 1
        return row


_RESULTS_DIR: Path | None = None  # set from --save / ALLO_BENCH_RESULTS_DIR when pytest starts
_RECORDER: ResultsRecorder | None = None


@pytest.fixture(scope="session")
def results() -> ResultsRecorder:
    global _RECORDER
    device = bench_device()
    folder = _RESULTS_DIR if _RESULTS_DIR is not None else results_dir()
    _RECORDER = ResultsRecorder(folder / f"{device_slug(device)}.json", environment_metadata(device))
    return _RECORDER


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's table, so these lines end the output
def pytest_terminal_summary(terminalreporter) -> None:
    """Where the rows went, and why cases were skipped (pytest -q shows only a count)."""
    write = terminalreporter.write_line
    if _RECORDER is not None and _RECORDER.n_recorded:
        committed = _RECORDER.path.parent.resolve() == COMMITTED_RESULTS_DIR
        write(
            f"allo benchmarks: {_RECORDER.n_recorded} rows merged into {_RECORDER.path}"
            + ("" if committed else " (scratch; rerun with --save to update benchmarks/results/)")
        )
        write(f"render with: python -m benchmarks.render{' --save' if committed else ''} {_RECORDER.path}")
    by_reason: dict[str, list[str]] = {}
    for report in terminalreporter.stats.get("skipped", []):
        by_reason.setdefault(_skip_reason(report), []).append(report.nodeid)
    if by_reason:
        write(f"allo benchmarks: skipped cases (count x reason, e.g. which): {sum(map(len, by_reason.values()))}")
        for reason, nodeids in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            write(f"{len(nodeids):>5} x {reason}  (e.g. {nodeids[0].rsplit('/', 1)[-1]})")


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def timing_fields(m: Measurement) -> dict:
    """The timing columns every measured results row carries."""
    return {
        "median_ms": m.median_s * 1e3,
        "min_ms": m.min_s * 1e3,
        "mean_ms": m.mean_s * 1e3,
        "stdev_ms": m.stdev_s * 1e3,
        "reps": m.reps,
        "warmup": m.warmup,
        "timer": m.timer,
    }


def run_case(
    benchmark: Any,
    results: ResultsRecorder,
    *,
    suite: str,
    case: str,
    impl: str,
    params: dict[str, Any],
    dtype: str,
    fn: Callable[..., Any],
    setup: Callable[[], Any] | None = None,
    bytes_moved: int | None = None,
    ours: bool = False,
    warmup: int | None = None,
    reps: int | None = None,
    note: str | None = None,
    extra: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> Measurement | None:
    """Benchmark one case and record it as one row.

    ``bytes_moved``: the minimum DRAM traffic of the case; gives ``gbps`` and ``pct_of_peak`` (of the device's peak
    bandwidth, when known). ``ours=True`` marks the implementation the renderer computes speedups for.
    An out-of-memory error records ``status="oom"`` and skips the test.
    """
    device = device or bench_device()
    base = {
        "suite": suite,
        "case": case,
        "impl": impl,
        "shape": format_shape(params),
        "params": dict(params),
        "dtype": dtype,
        "ours": bool(ours),
        "note": note,
        **(extra or {}),
    }
    free_memory(device)
    oom_message = None
    try:
        m = run_benchmark(benchmark, fn, warmup=warmup, reps=reps, setup=setup, device=device)
    except Exception as exc:
        if not is_oom(exc):
            raise
        oom_message = (str(exc).splitlines() or ["out of memory"])[0][:200]
    if oom_message is not None:
        free_memory(device)  # outside the except block: the traceback no longer pins the failed call's tensors
        results.add({**base, "status": "oom", "error": oom_message})
        pytest.skip(f"out of memory: {impl} {case} {format_shape(params)} {dtype}")
    if m is None:
        return None
    peak_bw = peak_bandwidth(device_name(device))
    gbps = None if bytes_moved is None else bytes_moved / m.median_s / 1e9
    pct = None if (gbps is None or peak_bw is None) else 100.0 * gbps * 1e9 / peak_bw
    results.add(
        {
            **base,
            "status": "ok",
            **timing_fields(m),
            "peak_mem_mb": None if m.peak_mem_bytes is None else m.peak_mem_bytes / 2**20,
            "bytes": bytes_moved,
            "gbps": _finite_or_none(gbps),
            "pct_of_peak": _finite_or_none(pct),
        }
    )
    benchmark.extra_info.update({"median_ms": m.median_s * 1e3, "gbps": gbps, "pct_of_peak": pct})
    free_memory(device)
    return m


def record_skip(
    results: ResultsRecorder, *, suite: str, case: str, impl: str, params: dict[str, Any], dtype: str, reason: str
) -> None:
    """Record a case that cannot run here (library missing, unsupported device) and skip the test with ``reason``."""
    results.add(
        {
            "suite": suite,
            "case": case,
            "impl": impl,
            "shape": format_shape(params),
            "params": dict(params),
            "dtype": dtype,
            "status": "skipped",
            "note": reason,
        }
    )
    pytest.skip(reason)
