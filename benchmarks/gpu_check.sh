#!/usr/bin/env bash
# One-call GPU check (issue 12.5): on a fresh machine with one GPU and only PyTorch + Triton installed,
#   1. install what the check needs from a local wheel folder (no network; never torch, triton or CUDA wheels),
#   2. run the GPU tests (`pytest -m gpu` over every test file that has one),
#   3. run every benchmark suite benchmarks/bench_*.py at the GPU shapes of the performance targets,
#   4. write the results JSON and markdown tables into one folder,
# within a time budget (default 540 s: under 9 minutes on an H100/H200 including the install).
# `--dry-run` runs the same steps on a CPU at tiny shapes (ALLO_BENCH_TINY=1, one repetition) into a scratch folder.
# How to prepare the wheel folder: benchmarks/README.md, section "GPU check".
#
# Usage: bash benchmarks/gpu_check.sh [--wheels DIR] [--out DIR] [--budget SECONDS] [--dry-run]
#   --wheels DIR   wheel folder (default: .whl); missing or empty: use what is installed
#   --out DIR      results folder (default: benchmarks/results; with --dry-run a new scratch folder)
#   --budget S     total seconds (default 540; dry run 900); each step gets a share, a step past it is stopped
#                  (benchmark rows recorded before that are kept)
#   PYTHON=...     interpreter (default: python3)
# Writes into the results folder: <device>.json (benchmark rows), <device>.md (tables), pytest-benchmark.json (raw
# pytest-benchmark records of every suite), gpu_check.md (summary) and gpu_check.log (everything printed).
# Exit status: 0 all passed; 1 a test or a suite failed; 2 bad usage / no GPU; 3 passed but a step ran out of time.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS=".whl"
OUT=""
BUDGET=""
DRY_RUN=0

usage() { sed -n '11,21p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) [ $# -ge 2 ] || die "--wheels needs a folder"; WHEELS="$2"; shift 2 ;;
    --out) [ $# -ge 2 ] || die "--out needs a folder"; OUT="$2"; shift 2 ;;
    --budget) [ $# -ge 2 ] || die "--budget needs seconds"; BUDGET="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
case "$BUDGET" in ''|*[!0-9]*) [ -z "$BUDGET" ] || die "--budget must be whole seconds, got '$BUDGET'" ;; esac
[ -n "$BUDGET" ] || BUDGET=$([ "$DRY_RUN" = 1 ] && echo 900 || echo 540)
cd "$ROOT" || die "cannot enter $ROOT"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
case "$WHEELS" in /*) ;; *) WHEELS="$ROOT/$WHEELS" ;; esac

# ------------------------------------------------------------------------------------------------------ environment
# Checked before anything is written, so a refused run leaves nothing behind.
"$PY" - "$DRY_RUN" <<'EOF'
import platform, sys
import torch
import triton
dry = sys.argv[1] == "1"
print(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
elif dry:
    print("no GPU: dry run on the CPU at tiny shapes")
else:
    sys.exit("no CUDA device visible to torch; on a CPU machine use --dry-run")
EOF
[ $? -eq 0 ] || die "environment check failed (see above); nothing was written"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/allo-gpu-check.XXXXXX")" || die "cannot create a scratch folder"
trap 'rm -rf "$SCRATCH/site" "$SCRATCH/raw"' EXIT
if [ -z "$OUT" ]; then
  if [ "$DRY_RUN" = 1 ]; then OUT="$SCRATCH/results"; else OUT="$ROOT/benchmarks/results"; fi
fi
mkdir -p "$OUT" "$SCRATCH/raw" || die "cannot create $OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

STEPS_TSV="$SCRATCH/steps.tsv"
: >"$STEPS_TSV"
FAILED=0
TIMED_OUT=0
say() { printf '\n== %s ==\n' "$*"; }

# run_step NAME CAP_SECONDS STEPS_LEFT_AFTER_THIS COMMAND...: time-boxed; records name, seconds, status.
run_step() {
  local name="$1" cap="$2" later="$3"; shift 3
  local now left t0 rc status
  now=$(date +%s)
  left=$((DEADLINE - now - 20 - 30 * later))  # 20 s for the report, 30 s kept for each later step
  [ "$left" -lt "$cap" ] && cap="$left"
  if [ "$cap" -lt 20 ]; then
    printf '%s\t0\tnot run: out of time\n' "$name" >>"$STEPS_TSV"
    echo "$name: not run, the time budget is spent"
    TIMED_OUT=1
    return 0
  fi
  say "$name (at most ${cap}s)"
  t0=$(date +%s)
  timeout --kill-after=15 "$cap" "$@"
  rc=$?
  case "$rc" in
    0) status="passed" ;;
    5) status="passed (nothing selected here)" ;;
    124|137) status="stopped after ${cap}s (rows recorded before that are kept)"; TIMED_OUT=1 ;;
    *) status="FAILED (exit $rc)"; FAILED=1 ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$(($(date +%s) - t0))" "$status" >>"$STEPS_TSV"
  echo "$name: $status"
}

if [ "$DRY_RUN" = 1 ]; then
  export ALLO_BENCH_DEVICE=cpu ALLO_BENCH_TINY=1 ALLO_BENCH_WARMUP=0 ALLO_BENCH_REPS=1
fi
export ALLO_BENCH_RESULTS_DIR="$OUT" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"

# ---------------------------------------------------------------------------------------------------------- install
say "install from $WHEELS"
SITE="$SCRATCH/site"
shopt -s nullglob
wheels=()
for w in "$WHEELS"/*.whl; do
  case "$(basename "$w" | tr 'A-Z' 'a-z')" in
    torch-*|triton-*|nvidia_*|nvidia-*|pytorch_triton*) echo "left out (the machine's own stays): $(basename "$w")" ;;
    *) wheels+=("$w") ;;
  esac
done
shopt -u nullglob
if [ ${#wheels[@]} -gt 0 ]; then
  t0=$(date +%s)
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"; then
    printf 'install %s wheel(s)\t%s\tpassed\n' "${#wheels[@]}" "$(($(date +%s) - t0))" >>"$STEPS_TSV"
  else
    printf 'install %s wheel(s)\t%s\tFAILED\n' "${#wheels[@]}" "$(($(date +%s) - t0))" >>"$STEPS_TSV"
    FAILED=1
  fi
else
  echo "no wheels in $WHEELS: using what is installed"
  printf 'install\t0\tno wheel folder: what is installed\n' >>"$STEPS_TSV"
fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF' | tee "$SCRATCH/packages.txt"
import importlib.metadata as md
for name in ("deepspeed", "liger-kernel", "cut-cross-entropy", "pytest-benchmark", "transformers"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} missing (its baselines are recorded as skipped)")
EOF

# ---------------------------------------------------------------------------------------------------- the GPU tests
mapfile -t GPU_TEST_FILES < <(grep -l -E "pytest\.mark\.gpu|mark\.gpu\b" tests/test_*.py | sort)
mapfile -t SUITES < <(ls benchmarks/bench_*.py | sort)
n_later=${#SUITES[@]}
if [ ${#GPU_TEST_FILES[@]} -gt 0 ]; then
  run_step "pytest -m gpu (${#GPU_TEST_FILES[@]} files)" 150 "$n_later" \
    "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs "${GPU_TEST_FILES[@]}"
else
  printf 'pytest -m gpu\t0\tno test is marked gpu\n' >>"$STEPS_TSV"
fi

# --------------------------------------------------------------------------------------------------- the benchmarks
# Selections at the performance targets' GPU shapes (DESIGN.md); a suite not listed runs whole (its GPU shapes are its
# targets) with the default cap. Cases that measure the CPU (test_cpu_*) are never part of the GPU check.
gpu_selection() {
  case "$1" in
    bench_token_logprobs) echo "bf16 and N16384 and V128256" ;;  # the target case: full, N=16384, V=128256, bf16
    *) echo "" ;;
  esac
}
suite_cap() {
  case "$1" in
    bench_fused_linear) echo 200 ;;
    bench_token_logprobs|bench_e2e) echo 150 ;;
    *) echo 120 ;;
  esac
}
i=0
for f in "${SUITES[@]}"; do
  i=$((i + 1))
  name="$(basename "$f" .py)"
  sel="not test_cpu_"
  if [ "$DRY_RUN" = 0 ]; then
    extra="$(gpu_selection "$name")"
    [ -n "$extra" ] && sel="$sel and ($extra)"
  fi
  run_step "$name [-k '$sel']" "$(suite_cap "$name")" "$((n_later - i))" \
    "$PY" -m pytest -q -p no:cacheprovider "$f" --benchmark-only --benchmark-json "$SCRATCH/raw/$name.json" -k "$sel"
done

# ---------------------------------------------------------------------------------------------------------- report
say "report"
"$PY" - "$OUT" "$SCRATCH" "$DRY_RUN" "$BUDGET" "$(($(date +%s) - START))" <<'EOF' || FAILED=1
import json, subprocess, sys
from pathlib import Path

out, scratch, dry, budget, elapsed = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", sys.argv[4], sys.argv[5]
# every suite's pytest-benchmark records in one file
merged = None
for raw in sorted((scratch / "raw").glob("*.json")):
    data = json.loads(raw.read_text())
    if merged is None:
        merged = data
    else:
        merged["benchmarks"].extend(data.get("benchmarks", []))
if merged is not None:
    (out / "pytest-benchmark.json").write_text(json.dumps(merged, indent=1))
# the rows our harness recorded, rendered (one results file per device)
from benchmarks.conftest import device_slug

results = out / f"{device_slug()}.json"
rendered = ""
if results.exists():
    rendered = subprocess.run(
        [sys.executable, "-m", "benchmarks.render", str(results), "--no-plot", "--out-dir", str(out)],
        check=True, capture_output=True, text=True,
    ).stdout
steps = [line.split("\t") for line in (scratch / "steps.tsv").read_text().splitlines() if line]
packages = (scratch / "packages.txt").read_text().split("\n") if (scratch / "packages.txt").exists() else []
import platform, torch, triton

device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (dry run, tiny shapes)"
lines = [
    f"# allo GPU check: {device}",
    "",
    f"{'Dry run: the same steps on the CPU at tiny shapes, one repetition; no GPU number here.' if dry else ''}",
    f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}; "
    f"{elapsed} s of a {budget} s budget. Packages: {'; '.join(p for p in packages if p)}.",
    "",
    "| step | seconds | result |",
    "| --- | --- | --- |",
    *[f"| {s[0]} | {s[1]} | {s[2]} |" for s in steps],
    "",
    f"Benchmark tables: `{results.with_suffix('.md').name}`; rows: `{results.name}`; raw pytest-benchmark records: "
    "`pytest-benchmark.json`; everything printed: `gpu_check.log`.",
    "",
]
(out / "gpu_check.md").write_text("\n".join(lines))
print("\n".join(lines))
print(rendered[:4000])
EOF

elapsed=$(($(date +%s) - START))
echo
echo "gpu_check.sh: ${elapsed}s; results in $OUT"
if [ "$FAILED" = 1 ]; then echo "gpu_check.sh: FAILED (see the steps above)"; exit 1; fi
if [ "$TIMED_OUT" = 1 ]; then echo "gpu_check.sh: passed, but a step ran out of time"; exit 3; fi
echo "gpu_check.sh: passed"
