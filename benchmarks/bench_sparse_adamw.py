"""SparseAdamW benchmarks (pytest-benchmark), with the baselines side by side in the same run.

CPU (native C++ kernel): 4 fp32 weights, row masks selecting 1/5/10/25/100 % of the rows (rows drawn at random),
against dense ``torch.optim.AdamW(fused=True)`` and DeepSpeed's ``DeepSpeedCPUAdam`` on the same tensors.
Target (docs/design.md): at 10 % rows >= 6x faster than both; at 100 % at least DeepSpeedCPUAdam's speed.

    ALLO_BENCH_FULL=1 pytest benchmarks/bench_sparse_adamw.py      # 4 x 4096 x 4096 (default: 4 x 512 x 512)
    python benchmarks/bench_sparse_adamw.py          # full CPU table -> .bench-results/cpu-sparse_adamw.json
    python benchmarks/bench_sparse_adamw.py --save   # ... -> the committed benchmarks/results/cpu-sparse_adamw.json

The standalone table steps every optimizer round-robin and also reports paired speedups (baseline / ours within each
round), which cancel most of the drift of a shared machine; see benchmarks/README.md.

DeepSpeedCPUAdam needs a JIT build (about 2 minutes): it is benchmarked only with ALLO_BENCH_FULL=1 (or
ALLO_BENCH_DSCPUADAM=1) and skipped with the build error as the reason when the build fails.

GPU (Triton kernel, skipped without CUDA): a 7B-shaped parameter set (Llama-2-7B matrices; ALLO_BENCH_GPU_LAYERS
layers, default 16 so the dense fp32 baselines fit an 80 GB card) in bf16 with fp32 master rows and fp32 moments for
the selected rows, at 10 % and 100 % rows, against ``torch.optim.AdamW(fused=True)`` and DeepSpeed ``FusedAdam`` on
the fp32 master copy (fp32 state: the mixed-precision optimizer step they replace). Reported: step time and optimizer
state bytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from allo_kernels.optim import SparseAdamW, _native
from benchmarks.render import results_dir

FULL = os.environ.get("ALLO_BENCH_FULL") == "1"
CPU_ROWS, CPU_COLS = (4096, 4096) if FULL else (512, 512)
CPU_TENSORS = 4
FRACTIONS = (0.01, 0.05, 0.10, 0.25, 1.0)
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01
_cpu_cache: dict = {}
STANDALONE_JSON = "cpu-sparse_adamw.json"  # the round-robin table of main()


# ----------------------------------------------------------------------------------------------------------- CPU
def cpu_tensors(rows: int = CPU_ROWS, cols: int = CPU_COLS, n: int = CPU_TENSORS):
    """Params (with grads) shared by every CPU case: each optimizer only adds its own state."""
    key = (rows, cols, n)
    if key not in _cpu_cache:
        _cpu_cache.clear()
        g = torch.Generator().manual_seed(0)
        params = []
        for _ in range(n):
            p = torch.nn.Parameter(torch.randn(rows, cols, generator=g) * 0.02)
            p.grad = torch.randn(rows, cols, generator=g) * 1e-3
            params.append(p)
        _cpu_cache[key] = params
    return _cpu_cache[key]


def row_masks(params, frac: float) -> dict:
    g = torch.Generator().manual_seed(1)
    masks = {}
    for p in params:
        k = max(1, round(frac * p.shape[0]))
        m = torch.zeros(p.shape[0], dtype=torch.bool)
        m[torch.randperm(p.shape[0], generator=g)[:k]] = True
        masks[p] = m
    return masks


def make_cpu_optimizer(kind: str, params, frac: float = 1.0):
    if kind == "allo_native":
        return SparseAdamW(
            params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, masks=row_masks(params, frac), backend="native"
        )
    if kind == "allo_torch":
        return SparseAdamW(
            params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, masks=row_masks(params, frac), backend="torch"
        )
    if kind == "torch_adamw_fused":
        return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
    if kind == "deepspeed_cpu_adam":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, adamw_mode=True)
    raise ValueError(kind)


def state_bytes(opt) -> int:
    return sum(
        t.numel() * t.element_size()
        for st in opt.state.values()
        for t in st.values()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    )


def _need_native():
    if not _native.available():
        pytest.skip(f"native library not built: {_native.load_error()}")


def _dscpuadam_or_skip():
    if not (FULL or os.environ.get("ALLO_BENCH_DSCPUADAM") == "1"):
        pytest.skip("DeepSpeedCPUAdam needs a ~2 min JIT build: set ALLO_BENCH_FULL=1 (or ALLO_BENCH_DSCPUADAM=1)")
    try:
        make_cpu_optimizer("deepspeed_cpu_adam", [torch.nn.Parameter(torch.zeros(8))])
    except Exception as exc:  # the JIT build needs a compiler and ninja
        pytest.skip(f"DeepSpeedCPUAdam unavailable: {type(exc).__name__}: {exc}")


def _bench(benchmark, opt, info: dict):
    opt.step()  # allocates the state (first touch) outside the timing
    benchmark.extra_info.update(info, state_bytes=state_bytes(opt))
    benchmark.pedantic(opt.step, rounds=10 if FULL else 20, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("frac", FRACTIONS, ids=[f"{int(f * 100)}pct" for f in FRACTIONS])
def test_cpu_sparse_adamw_native(benchmark, frac):
    _need_native()
    params = cpu_tensors()
    benchmark.group = "sparse_adamw-cpu"
    _bench(
        benchmark,
        make_cpu_optimizer("allo_native", params, frac),
        dict(impl="allo SparseAdamW (native)", row_fraction=frac, shape=[CPU_TENSORS, CPU_ROWS, CPU_COLS]),
    )


def test_cpu_torch_adamw_fused_dense(benchmark):
    params = cpu_tensors()
    benchmark.group = "sparse_adamw-cpu"
    _bench(
        benchmark,
        make_cpu_optimizer("torch_adamw_fused", params),
        dict(impl="torch.optim.AdamW(fused=True) dense", row_fraction=1.0, shape=[CPU_TENSORS, CPU_ROWS, CPU_COLS]),
    )


def test_cpu_deepspeed_cpu_adam_dense(benchmark):
    _dscpuadam_or_skip()
    params = cpu_tensors()
    benchmark.group = "sparse_adamw-cpu"
    _bench(
        benchmark,
        make_cpu_optimizer("deepspeed_cpu_adam", params),
        dict(impl="DeepSpeedCPUAdam dense", row_fraction=1.0, shape=[CPU_TENSORS, CPU_ROWS, CPU_COLS]),
    )


# ----------------------------------------------------------------------------------------------------------- GPU
LLAMA7B = dict(hidden=4096, intermediate=11008, vocab=32000, layers=32)


def llama7b_shapes(layers: int) -> list[tuple[int, ...]]:
    h, i, v = LLAMA7B["hidden"], LLAMA7B["intermediate"], LLAMA7B["vocab"]
    shapes = [(v, h)]
    for _ in range(layers):
        shapes += [(h, h)] * 4 + [(i, h), (i, h), (h, i), (h,), (h,)]
    return shapes + [(h,), (v, h)]


def _gpu_layers() -> int:
    return int(os.environ.get("ALLO_BENCH_GPU_LAYERS", "16"))


def _gpu_params(dtype):
    gc.collect()  # the previous case's params and state died with its test function: give their memory back first
    torch.cuda.empty_cache()
    g = torch.Generator(device="cuda").manual_seed(0)
    params = []
    for s in llama7b_shapes(_gpu_layers()):
        p = torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype, generator=g) * 0.02)
        p.grad = torch.randn(s, device="cuda", dtype=dtype, generator=g) * 1e-3
        params.append(p)
    return params


def _bench_gpu(benchmark, opt, params, **info):
    benchmark.group = "sparse_adamw-gpu"
    benchmark.extra_info.update(info, layers=_gpu_layers(), params=sum(p.numel() for p in params))
    opt.step()  # allocates the state outside the timing
    benchmark.extra_info["state_bytes"] = state_bytes(opt)
    benchmark.pedantic(lambda: (opt.step(), torch.cuda.synchronize()), rounds=10, iterations=1, warmup_rounds=1)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark needs CUDA")


@gpu
@pytest.mark.parametrize("frac", (0.10, 1.0), ids=("10pct", "100pct"))
def test_gpu_sparse_adamw_triton_bf16(benchmark, frac):
    params = _gpu_params(torch.bfloat16)
    masks = {p: m.cuda() for p, m in row_masks(params, frac).items() if p.dim() == 2}
    opt = SparseAdamW(params, lr=LR, weight_decay=WD, masks=masks, master_weights=True, backend="triton")
    _bench_gpu(benchmark, opt, params, impl="allo SparseAdamW (triton, bf16 + fp32 master rows)", row_fraction=frac)


@gpu
@pytest.mark.parametrize("impl", ("torch_adamw_fused", "deepspeed_fused_adam"))
def test_gpu_dense_baselines_fp32_master(benchmark, impl):
    params = _gpu_params(torch.float32)
    if impl == "torch_adamw_fused":
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, fused=True)
    else:
        try:
            from deepspeed.ops.adam import FusedAdam

            opt = FusedAdam(params, lr=LR, weight_decay=WD, adam_w_mode=True)
        except Exception as exc:
            pytest.skip(f"DeepSpeed FusedAdam unavailable: {type(exc).__name__}: {exc}")
    _bench_gpu(benchmark, opt, params, impl=f"{impl} dense (fp32 master, fp32 state)", row_fraction=1.0)


# ------------------------------------------------------------------------------------- standalone CPU table
def paired_speedup(base_times: list[float], our_times: list[float]) -> dict:
    """baseline / ours per round (timed back to back): median and the 10th / 90th percentiles."""
    ratios = sorted(b / o for b, o in zip(base_times, our_times))
    q = statistics.quantiles(ratios, n=10, method="inclusive") if len(ratios) >= 2 else [ratios[0]] * 9
    return dict(median=statistics.median(ratios), p10=q[0], p90=q[-1], rounds=len(ratios))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group()
    where.add_argument(
        "--json", type=Path, help=f"write the table here (default: {STANDALONE_JSON} in the scratch results folder)"
    )
    where.add_argument("--save", action="store_true", help=f"write the committed benchmarks/results/{STANDALONE_JSON}")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--no-deepspeed", action="store_true")
    args = ap.parse_args(argv)
    try:
        out = args.json or results_dir(save=args.save) / STANDALONE_JSON
    except ValueError as exc:
        ap.error(str(exc))
    params = cpu_tensors(args.rows, args.cols, CPU_TENSORS)
    cases = [("allo_native", f) for f in FRACTIONS] + [("torch_adamw_fused", 1.0)]
    if not args.no_deepspeed:
        cases.append(("deepspeed_cpu_adam", 1.0))
    # All optimizers live at once and are stepped round-robin, one step each per round (the order reversed every other
    # round): on a shared machine the background load then hits every case alike, and the per-round ratio of two
    # cases timed back to back cancels most of the drift that makes single timings wander by 30 % here.
    results, live = [], []
    for kind, frac in cases:
        try:
            opt = make_cpu_optimizer(kind, params, frac)
        except Exception as exc:
            results.append(dict(impl=kind, row_fraction=frac, error=f"{type(exc).__name__}: {exc}"))
            continue
        opt.step()
        opt.step()
        live.append((kind, frac, opt, []))
    for r in range(args.rounds):
        for _kind, _frac, opt, times in live if r % 2 == 0 else live[::-1]:
            t = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t)
    for kind, frac, opt, times in live:
        results.append(
            dict(
                impl=kind,
                row_fraction=frac,
                seconds_per_step_min=min(times),
                seconds_per_step_median=statistics.median(times),
                rounds=len(times),
                state_bytes=state_bytes(opt),
            )
        )
        print(
            f"{kind:>20} rows={frac:>5.0%}  min {min(times):.4f}  median {statistics.median(times):.4f} s/step",
            flush=True,
        )
    by = {(r["impl"], r["row_fraction"]): r for r in results if "error" not in r}
    per_round = {(kind, frac): times for kind, frac, _, times in live}
    speedups, paired = {}, {}
    for base in ("torch_adamw_fused", "deepspeed_cpu_adam"):
        if (base, 1.0) in by:
            for f in FRACTIONS:
                if ("allo_native", f) in by:
                    key = f"vs_{base}@{int(f * 100)}pct"
                    speedups[key] = (
                        by[(base, 1.0)]["seconds_per_step_median"] / by[("allo_native", f)]["seconds_per_step_median"]
                    )
                    paired[key] = paired_speedup(per_round[(base, 1.0)], per_round[("allo_native", f)])
    del live
    gc.collect()
    import deepspeed

    report = dict(
        benchmark="sparse_adamw-cpu",
        device=f"cpu ({os.cpu_count()} cores)",
        cpu=cpu_model(),
        native_isa=_native.isa(),
        threads=torch.get_num_threads(),
        shapes=[[args.rows, args.cols]] * CPU_TENSORS,
        dtype="float32",
        hyper=dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD),
        versions=dict(torch=torch.__version__, deepspeed=deepspeed.__version__, python=platform.python_version()),
        note=(
            "cases stepped round-robin, one step each per round, order reversed every other round; the 2-core "
            "machine is shared with other jobs. speedups_median: ratio of medians; speedups_paired: baseline/ours "
            "per round (the two timed back to back), median with the 10th and 90th percentiles"
        ),
        results=results,
        speedups_median=speedups,
        speedups_paired=paired,
    )
    print(json.dumps(dict(median=speedups, paired=paired), indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}" + ("" if args.save or args.json else " (scratch; --save updates benchmarks/results/)"))


if __name__ == "__main__":
    main()
