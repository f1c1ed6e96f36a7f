"""Render benchmark results (``<results dir>/<device>.json``) as markdown tables and PNG plots.

    python -m benchmarks.render                         # every JSON of the scratch folder .bench-results/
    python -m benchmarks.render --save                  # the committed benchmarks/results/*.json, rendered in place
    python -m benchmarks.render FILE.json [--no-plot] [--out-dir DIR]

For each JSON it prints the markdown, writes ``<stem>.md`` and one ``<stem>-<suite>.png`` per suite beside the JSON
(``--out-dir`` elsewhere), and lists the skipped cases with their reasons on stderr. Without ``--save`` nothing under
``benchmarks/results/`` is written: a committed JSON named on the command line is rendered into the scratch folder.

Suites are handled generically: rows are grouped by (case, shape, dtype), one column per implementation. The
implementation marked ``ours`` in the rows (else ``allo``, else the first one seen) is the reference of the speedup
columns: ``speedup = baseline median time / our median time`` (> 1: ours is faster), and of the memory ratios
``baseline peak memory / our peak memory``.

Needs only the standard library (and matplotlib for the plots).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

# Where results go (the pytest harness in conftest.py and the standalone scripts use these too): a run writes to the
# git-ignored scratch folder unless asked, with --save, to update the committed results.
COMMITTED_RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCRATCH_RESULTS_DIR = Path(__file__).resolve().parent.parent / ".bench-results"
RESULTS_DIR_ENV = "ALLO_BENCH_RESULTS_DIR"
CASE_ORDER = {"fwd": 0, "forward": 0, "bwd": 1, "backward": 1, "full": 2, "fwd+bwd": 2}


def results_dir(*, save: bool = False) -> Path:
    """The folder benchmark results are written to and rendered from.

    ``save=True``: the committed ``benchmarks/results/``. Otherwise ``$ALLO_BENCH_RESULTS_DIR`` when set, else the
    git-ignored scratch folder ``.bench-results/`` at the repository root. Asking for both is refused (ValueError).
    """
    env = os.environ.get(RESULTS_DIR_ENV, "").strip()
    if save and env:
        raise ValueError(
            f"--save writes the committed results in {COMMITTED_RESULTS_DIR}, but {RESULTS_DIR_ENV}={env!r} asks for "
            "another folder: unset one of them"
        )
    if save:
        return COMMITTED_RESULTS_DIR
    return Path(env) if env else SCRATCH_RESULTS_DIR


def load(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        data = json.load(f)
    if "rows" not in data:
        raise ValueError(f"{path}: not a benchmark results file (no 'rows')")
    return data


def _num_key(v: Any) -> tuple:
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def _group_key_sort(row: dict[str, Any]) -> tuple:
    params = row.get("params") or {}
    shape_key = tuple((k, _num_key(v)) for k, v in params.items()) if params else ((str(row.get("shape")), (1, 0, "")),)
    case = str(row.get("case"))
    return (CASE_ORDER.get(case, 99), case, shape_key, str(row.get("dtype")))


def suites(rows: list[dict[str, Any]]) -> OrderedDict[str, list[dict[str, Any]]]:
    out: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
    for row in rows:
        out.setdefault(str(row["suite"]), []).append(row)
    return out


def impl_order(rows: list[dict[str, Any]]) -> tuple[list[str], str]:
    """Implementations that ran at least once, in first-seen order with ours first; returns (impls, ours).

    Implementations that never ran (skipped or OOM everywhere) get no column; ``not_run`` lists them.
    """
    impls: list[str] = []
    for row in rows:
        if row["impl"] not in impls and _ok_time(row) is not None:
            impls.append(row["impl"])
    if not impls:
        impls = list(OrderedDict.fromkeys(r["impl"] for r in rows))
    marked = [r["impl"] for r in rows if r.get("ours")]
    ours = marked[0] if marked else ("allo" if "allo" in impls else impls[0])
    impls.remove(ours)
    return [ours, *impls], ours


def grouped(rows: list[dict[str, Any]]) -> OrderedDict[tuple[str, str, str], dict[str, dict[str, Any]]]:
    groups: OrderedDict[tuple[str, str, str], dict[str, dict[str, Any]]] = OrderedDict()
    for row in sorted(rows, key=_group_key_sort):
        groups.setdefault((str(row["case"]), str(row["shape"]), str(row["dtype"])), {})[row["impl"]] = row
    return groups


def _ok_time(row: dict[str, Any] | None) -> float | None:
    if row is None or row.get("status", "ok") != "ok":
        return None
    t = row.get("median_ms")
    return t if isinstance(t, (int, float)) and t > 0 and math.isfinite(t) else None


def _status_cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    status = row.get("status", "ok")
    if status == "oom":
        return "OOM"
    if status == "skipped":
        return "skip"
    return status


def speedup(baseline_ms: float | None, ours_ms: float | None) -> float | None:
    if baseline_ms is None or ours_ms is None or ours_ms <= 0:
        return None
    return baseline_ms / ours_ms


def fmt_ms(t: float) -> str:
    return f"{t:.3g}" if t < 100 else f"{t:.0f}"


def time_table(rows: list[dict[str, Any]]) -> str:
    impls, ours = impl_order(rows)
    has_bw = any(r.get("gbps") is not None for r in rows if r["impl"] == ours)
    has_pct = any(r.get("pct_of_peak") is not None for r in rows if r["impl"] == ours)
    header = ["case", "shape", "dtype", f"{ours} ms", *[f"{i} ms (speedup)" for i in impls[1:]]]
    if has_bw:
        header.append(f"{ours} GB/s")
    if has_pct:
        header.append(f"{ours} % of peak BW")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for (case, shape, dtype), by_impl in grouped(rows).items():
        t_ours = _ok_time(by_impl.get(ours))
        cells = [case, shape, dtype, fmt_ms(t_ours) if t_ours is not None else _status_cell(by_impl.get(ours))]
        for impl in impls[1:]:
            t = _ok_time(by_impl.get(impl))
            if t is None:
                cells.append(_status_cell(by_impl.get(impl)))
                continue
            s = speedup(t, t_ours)
            cells.append(fmt_ms(t) + (f" ({s:.2f}x)" if s is not None else ""))
        our_row = by_impl.get(ours) or {}
        if has_bw:
            g = our_row.get("gbps") if t_ours is not None else None
            cells.append("-" if g is None else f"{g:.0f}" if g >= 100 else f"{g:.3g}")
        if has_pct:
            p = our_row.get("pct_of_peak") if t_ours is not None else None
            cells.append(f"{p:.1f}%" if p is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_table(rows: list[dict[str, Any]]) -> str | None:
    if not any(isinstance(r.get("peak_mem_mb"), (int, float)) for r in rows):
        return None
    impls, ours = impl_order(rows)
    header = ["case", "shape", "dtype", f"{ours} MB", *[f"{i} MB (x ours)" for i in impls[1:]]]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for (case, shape, dtype), by_impl in grouped(rows).items():

        def mem(row):
            if row is None or row.get("status", "ok") != "ok":
                return None
            m = row.get("peak_mem_mb")
            return m if isinstance(m, (int, float)) else None

        m_ours = mem(by_impl.get(ours))
        cells = [case, shape, dtype, f"{m_ours:.0f}" if m_ours is not None else _status_cell(by_impl.get(ours))]
        for impl in impls[1:]:
            m = mem(by_impl.get(impl))
            if m is None:
                cells.append(_status_cell(by_impl.get(impl)) if _ok_time(by_impl.get(impl)) is None else "-")
            elif m_ours:
                cells.append(f"{m:.0f} ({m / m_ours:.2f}x)")
            else:
                cells.append(f"{m:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def not_run(rows: list[dict[str, Any]]) -> list[str]:
    shown, _ = impl_order(rows)
    return [i for i in OrderedDict.fromkeys(r["impl"] for r in rows) if i not in shown]


def notes(rows: list[dict[str, Any]]) -> list[str]:
    missing = set(not_run(rows))
    seen: OrderedDict[str, None] = OrderedDict()
    for r in rows:
        if r.get("note"):
            prefix = "not run here: " if r["impl"] in missing else ""
            seen[f"`{r['impl']}`: {prefix}{r['note']}"] = None
    return list(seen)


def render_markdown(data: dict[str, Any], *, plots: dict[str, str] | None = None) -> str:
    meta = data.get("metadata", {})
    out = [f"# Benchmarks on {meta.get('device', 'unknown device')}", ""]
    facts = [
        ("CPU", meta.get("cpu_model")),
        ("cores", meta.get("cpu_count")),
        ("torch threads", meta.get("torch_threads")),
        (
            "peak memory bandwidth",
            f"{meta['peak_bandwidth_gbps']:.0f} GB/s" if meta.get("peak_bandwidth_gbps") else None,
        ),
        ("torch", meta.get("torch")),
        ("triton", meta.get("triton")),
        ("CUDA", meta.get("cuda")),
        ("python", meta.get("python")),
        ("commit", (meta.get("git_commit") or "")[:12] + (" (dirty)" if meta.get("git_dirty") else "") or None),
        ("date", meta.get("date")),
    ]
    out.append(", ".join(f"{k}: {v}" for k, v in facts if v not in (None, "")))
    out.append("")
    if meta.get("device_type") == "cpu" or meta.get("device") == "cpu":
        out += [
            "**CPU run**: small shapes, torch code only (no Triton timings); no allocator statistics on CPU, so no "
            "memory columns. Medians on a shared few-core machine are noisy: read ratios below ~2x as ties.",
            "",
        ]
    for suite, rows in suites(data["rows"]).items():
        _impls, ours = impl_order(rows)
        out += [f"## {suite}", ""]
        out += [
            f"Median time in ms. Speedup = baseline time / `{ours}` time (> 1: `{ours}` is faster). "
            f"skip / OOM: did not run here.",
            "",
            time_table(rows),
            "",
        ]
        mem = memory_table(rows)
        if mem:
            out += ["Peak extra memory of the timed call (MB), and baseline / ours.", "", mem, ""]
        for line in notes(rows):
            out.append(f"- {line}")
        if notes(rows):
            out.append("")
        if plots and suite in plots:
            out += [f"![{suite}]({plots[suite]})", ""]
    return "\n".join(out).rstrip() + "\n"


def plot_suite(rows: list[dict[str, Any]], title: str, path: Path) -> bool:
    """Grouped bars of median time (log scale), one panel per case. Returns False when nothing ran or no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    impls, _ = impl_order(rows)
    groups = grouped(rows)
    cases = list(OrderedDict.fromkeys(case for case, _, _ in groups))
    ran = [i for i in impls if any(_ok_time(r.get(i)) is not None for r in groups.values())]
    if not ran:
        return False
    fig, axes = plt.subplots(
        len(cases), 1, figsize=(max(6.0, 1.1 * len(groups) / max(len(cases), 1) + 3), 3.2 * len(cases)), squeeze=False
    )
    width = 0.8 / len(ran)
    for ax, case in zip(axes[:, 0], cases):
        keys = [k for k in groups if k[0] == case]
        for j, impl in enumerate(ran):
            xs, ys = [], []
            for x, k in enumerate(keys):
                t = _ok_time(groups[k].get(impl))
                if t is not None:
                    xs.append(x + (j - (len(ran) - 1) / 2) * width)
                    ys.append(t)
            ax.bar(xs, ys, width=width, label=impl)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"{s}\n{d}" for _, s, d in keys], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median ms")
        ax.set_title(f"{title}: {case}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=min(len(ran), 6))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def skip_summary(rows: list[dict[str, Any]]) -> list[str]:
    """One line per reason a case did not run (skipped: the recorded note; OOM): how many cases, which suite/impl."""
    by_reason: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
    for row in rows:
        if row.get("status") == "skipped":
            by_reason.setdefault(str(row.get("note") or "no reason recorded"), []).append(row)
        elif row.get("status") == "oom":
            by_reason.setdefault("out of memory", []).append(row)
    lines = []
    for reason, skipped in by_reason.items():
        which = ", ".join(OrderedDict.fromkeys(f"{r['suite']}/{r['impl']}" for r in skipped))
        lines.append(f"{len(skipped):>4} x {which}: {reason}")
    return lines


def render_file(path: str | Path, *, out_dir: str | Path | None = None, plot: bool = True) -> str:
    path = Path(path)
    data = load(path)
    out_dir = Path(out_dir) if out_dir is not None else path.parent
    plots: dict[str, str] = {}
    if plot:
        for suite, rows in suites(data["rows"]).items():
            png = out_dir / f"{path.stem}-{suite}.png"
            if plot_suite(rows, f"{suite} on {data.get('metadata', {}).get('device', path.stem)}", png):
                plots[suite] = png.name
    text = render_markdown(data, plots=plots)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{path.stem}.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.render", description=__doc__.split("\n")[0])
    parser.add_argument(
        "files", nargs="*", help="results JSON files (default: every results JSON of the results folder)"
    )
    parser.add_argument(
        "--save",
        action="store_true",
        help=f"render the committed results in {COMMITTED_RESULTS_DIR.parent.name}/{COMMITTED_RESULTS_DIR.name}/ in "
        f"place (default: the scratch folder, {RESULTS_DIR_ENV} or {SCRATCH_RESULTS_DIR.name}/)",
    )
    parser.add_argument("--out-dir", default=None, help="where .md and .png go (default: beside each JSON)")
    parser.add_argument("--no-plot", action="store_true", help="markdown only")
    args = parser.parse_args(argv)
    try:
        folder = results_dir(save=args.save)
    except ValueError as exc:
        parser.error(str(exc))
    files = [Path(f) for f in args.files]
    if not files:  # every harness results file in the folder (other JSON there, e.g. raw optimizer runs, is skipped)
        files = [f for f in sorted(folder.glob("*.json")) if "rows" in json.loads(f.read_text())]
    if not files:
        hint = "" if args.save else " (run the benchmarks first, or render the committed results with --save)"
        print(f"no results files given and none in {folder}{hint}", file=sys.stderr)
        return 1
    for f in files:
        out_dir = Path(args.out_dir) if args.out_dir is not None else f.parent
        if args.out_dir is None and not args.save and f.resolve().parent == COMMITTED_RESULTS_DIR:
            out_dir = folder  # the committed .md and plots change only with --save
        print(render_file(f, out_dir=out_dir, plot=not args.no_plot))
        print(f"rendered {f} -> {out_dir / (f.stem + '.md')}", file=sys.stderr)
        skips = skip_summary(load(f)["rows"])
        if skips:
            print(f"cases not run in {f.name} (count x suite/impl: reason):", file=sys.stderr)
            for line in skips:
                print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
