#!/usr/bin/env bash
# One bounded call on a fresh GPU machine (python3 with torch, nvcc, ninja; no network, no
# pip): build the extension, prove the CUDA kernels loaded, gather the evidence, run the GPU
# tests, run the GPU benchmarks. Every step's failure is recorded and the others still run;
# every step is capped by what is left of one time budget; at most 8 files land in $OUT:
#
#   summary.txt     versions, each step's exit code and seconds, the key numbers (read first)
#   build.log       the extension build
#   evidence.jsonl  benchmarks/gpu_evidence.py: one JSON line per section (noise, ops, graph)
#   tests.log, tests.xml   pytest tests/test_cuda.py, test_capturable.py, test_amp.py (and junit XML)
#   bench.txt       the benchmark tables (optimizer step; end-to-end training steps; the
#                   torch.compile peer, last, as the time left allows)
#   bench.json, bench_e2e.json   the benchmark records (bench.json: the compiled peer's too)
#
# Usage, from the repository root (the golden trajectories travel in ./gpu_golden, a
# git-ignored copy of ../shared/golden named in the device call's `carry`):
#
#   cp -r ../shared/golden gpu_golden        # once, on the CPU machine
#   bash benchmarks/gpu_check.sh             # on the GPU machine; OUT defaults to ./gpu_out
#   bash benchmarks/gpu_check.sh --dry       # anywhere: no build, CPU stand-ins, tiny sizes
#
# Environment: OUT, PYTHON (python3), BSAM_GPU_CHECK_BUDGET (seconds, default 480), BSAM_COMMIT,
# BSAM_GOLDEN_DIR (default ./gpu_golden, else ../shared/golden), TORCH_CUDA_ARCH_LIST (9.0).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
BUDGET=${BSAM_GPU_CHECK_BUDGET:-480}
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${BSAM_GOLDEN_DIR:-}" ]; then
  if [ -d "$ROOT/gpu_golden" ]; then BSAM_GOLDEN_DIR=$ROOT/gpu_golden; else BSAM_GOLDEN_DIR=$ROOT/../shared/golden; fi
fi
export BSAM_GOLDEN_DIR
SUMMARY=$OUT/summary.txt
FAILED=0

elapsed() { echo $(( $(date +%s) - START )); }
note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME CAP_SECONDS LOG COMMAND...: runs COMMAND with its output appended to LOG, under
# min(CAP, what is left of the budget); SIGINT first, so that pytest still writes its
# summary and XML, then SIGKILL 10 s later. Records exit code and time in the summary.
step() {
  local name=$1 cap=$2 log=$3; shift 3
  local left=$(( BUDGET - $(elapsed) ))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 5 ]; then
    note "step $name: NOT RUN (no time left: ${left}s of ${BUDGET}s)"; FAILED=1; return 0
  fi
  local t0 rc
  t0=$(date +%s)
  echo "== $name (limit ${limit}s, at $(elapsed)s)"
  timeout -s INT -k 10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  [ "$rc" -eq 124 ] && rc="124 (timed out after ${limit}s)"
  note "step $name: exit $rc, $(( $(date +%s) - t0 ))s"
  [ "${rc%% *}" = "0" ] || FAILED=1
  return 0
}

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
[ -n "${CUDA_HOME:-}" ] && export PATH="$CUDA_HOME/bin:$PATH"
: > "$SUMMARY"
note "# bsam-fast GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ) $([ $DRY = 1 ] && echo '(DRY RUN: no GPU steps, CPU stand-ins)')"
# The device machine gets the working tree without .git: the caller may name the commit.
if git rev-parse --is-inside-work-tree > /dev/null 2>&1; then
  note "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' (+ uncommitted changes)')"
else
  note "commit: ${BSAM_COMMIT:-unknown (no .git here; set BSAM_COMMIT)}"
fi
note "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 1)"
note "nvcc: $(command -v nvcc) $(nvcc --version 2>&1 | grep -i release || echo 'not found') (CUDA_HOME=${CUDA_HOME:-unset})"
note "gcc: $(gcc --version 2>&1 | head -n 1)"
note "python/torch: $($PY -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1 | tail -n 1)"
note "golden: $BSAM_GOLDEN_DIR ($(ls "$BSAM_GOLDEN_DIR"/*.npz 2>/dev/null | wc -l) .npz)"

# ---------------------------------------------------------------- build
if [ $DRY = 1 ]; then
  note "step build: NOT RUN (dry run: using the extension already built here, if any)"
  DEVICE=cpu
else
  step build 300 "$OUT/build.log" $PY setup.py build_ext --inplace
  DEVICE=cuda
fi
# Without the CUDA kernels every GPU test skips and pytest exits 0: a false green. Say so.
step kernels-loaded 60 "$OUT/build.log" $PY -c "
import torch, bsam_fast
from bsam_fast import _ops
print('backends', bsam_fast.available_backends())
assert _ops.is_loaded(), 'extension did not load: %s' % _ops.LOAD_ERROR
if '$DEVICE' == 'cuda':
    assert torch.cuda.is_available(), 'torch sees no CUDA device'
    assert _ops.has_kernel('cuda'), 'the extension has no CUDA kernels'
    print('CUDA kernels loaded on', torch.cuda.get_device_name())
"

# ---------------------------------------------------------------- evidence, then tests
DRAWS=10500000
[ $DRY = 1 ] && DRAWS=60000
for section in noise ops graph; do
  step "evidence-$section" 90 "$OUT/evidence.jsonl" $PY benchmarks/gpu_evidence.py --section $section \
    --device $DEVICE --draws $DRAWS
done

TEST_ARGS=(-q -p no:cacheprovider -rs --run-slow tests/test_cuda.py tests/test_capturable.py tests/test_amp.py
           --junitxml="$OUT/tests.xml")
step tests 200 "$OUT/tests.log" $PY -m pytest "${TEST_ARGS[@]}"

# ---------------------------------------------------------------- benchmarks
if [ $DRY = 1 ]; then
  BENCH=(--device cpu --sizes 2e4 --layouts one tiny host --backends cpu --reps 20)
  E2E=(--device cpu --sizes 2e4 --layouts one --backends cpu --reps 20 --end-to-end --models mlp)
  COMPILED=(--device cpu --sizes 2e4 --backends compiled --reps 20)
  COMPILED_LAYOUTS=(one)
else
  BENCH=(--device cuda --sizes 1.6e7 6.4e7 --layouts one resnet20 transformer tiny host --backends cuda foreach)
  E2E=(--device cuda --sizes 2.7e5 --layouts resnet20 tiny --backends cuda --end-to-end
       --models mlp lenet5 resnet20_frn transformer_stack)
  COMPILED=(--device cuda --sizes 1.6e7 --backends compiled)
  COMPILED_LAYOUTS=(one resnet20)
fi
step bench 150 "$OUT/bench.txt" $PY -m bsam_fast.bench "${BENCH[@]}" --no-progress --json "$OUT/bench.json"
step bench-e2e 160 "$OUT/bench.txt" $PY -m bsam_fast.bench "${E2E[@]}" --no-progress --json "$OUT/bench_e2e.json"
# The compiled peer last, one layout per call: its compile time is what the budget has left
# (a layout cut short is reported as timed out; the rows of those done are kept). Its records
# join bench.json (8 files at most come back).
for layout in "${COMPILED_LAYOUTS[@]}"; do
  COMPILED_JSON=$(mktemp)
  step "bench-compiled-$layout" 150 "$OUT/bench.txt" $PY -m bsam_fast.bench "${COMPILED[@]}" --layouts "$layout" \
    --no-progress --json "$COMPILED_JSON"
  $PY - "$OUT/bench.json" "$COMPILED_JSON" <<'PY'
import json, pathlib, sys
bench, new = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
try:
    compiled = [r for r in json.loads(new.read_text()) if r.get("backend") == "compiled"]
except ValueError:
    sys.exit(0)                  # the step failed or was cut short: the summary says so
try:
    records = json.loads(bench.read_text())
except (OSError, ValueError):
    records = []                 # the bench step failed: keep the peer's rows anyway
bench.write_text(json.dumps(records + compiled, indent=1))
PY
  rm -f "$COMPILED_JSON"
done

# ---------------------------------------------------------------- key numbers
note "## key numbers"
$PY - "$OUT" 2>&1 <<'PY' | tee -a "$SUMMARY"
import json, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
ev = out / "evidence.jsonl"
for line in (ev.read_text().splitlines() if ev.exists() else []):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    brief = {k: r[k] for k in ("ok", "error", "max_abs_diff_by_dtype", "comparisons", "max_abs_diff_graph_vs_eager",
                               "noise_offset", "graph_speedup", "step_ms", "timing_error", "sync_free", "amp_overflow", "seconds") if k in r}
    if "pairs" in r:
        brief["mismatches"] = [(p["draws"], p["gpu_vs_cpu_kernel_mismatches"], p["gpu_vs_definition_mismatches"],
                                p["max_ulp"]) for p in r["pairs"]]
    print(f"evidence {r.get('section')}: {json.dumps(brief)}")
log = out / "tests.log"
if log.exists():
    lines = [l for l in log.read_text().splitlines() if re.search(r"passed|failed|error|skipped", l)]
    print("tests:", lines[-1] if lines else "no summary line")
bench = out / "bench.json"
if bench.exists():
    try:
        for r in json.loads(bench.read_text()):
            if r.get("backend") in ("cuda", "cpu", "compiled"):
                print(f"bench {r['backend']} {r['layout']} {r['numel']:.3g}: {r['median_ms']:.3f} ms, "
                      f"{r['gbps']:.0f} GB/s, {r['pct_copy_bw']:.0f}% copy BW, "
                      f"x{r['ratio_vs_adamw_fused'] or float('nan'):.2f} AdamW(fused)")
    except (ValueError, KeyError, TypeError) as exc:
        print("bench.json unreadable:", exc)
e2e = out / "bench_e2e.json"
if e2e.exists():
    try:
        for r in json.loads(e2e.read_text())["end_to_end"]:
            print(f"e2e {r['model']} {r['method']}: {r['median_ms']:.2f} ms, x{r['overhead_vs_adam']:.2f} Adam, "
                  f"x{r['overhead_vs_sam_adam_same_m']:.2f} SAM-Adam (same m)")
    except (ValueError, KeyError, TypeError) as exc:
        print("bench_e2e.json unreadable:", exc)
PY
note "## done in $(elapsed)s: $([ $FAILED = 0 ] && echo 'every step passed' || echo 'SOME STEPS FAILED')"
n=$(find "$OUT" -type f | wc -l)
[ "$n" -le 8 ] || note "WARNING: $n files in $OUT (at most 8 come back)"
exit $FAILED
