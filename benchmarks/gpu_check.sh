#!/usr/bin/env bash
# One call on a fresh GPU machine (torch, nvcc and ninja; no internet, no pip): build the
# extension from source, run the GPU tests and the GPU benchmarks, and write logs and JSON
# into $OUT (default ./gpu_out). Meant to finish in under 8 minutes on an H100/H200.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
start=$(date +%s)
status=0
step() { echo "== $1 ($(( $(date +%s) - start )) s)"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

step "build (CPU + CUDA kernels, sm_90)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
if ! $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -n 40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
$PY -c "import bsam_fast; print('backends', bsam_fast.available_backends())" | tee -a "$OUT/build.log"

step "GPU tests"
timeout 300 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda.py --junitxml="$OUT/gpu_tests.xml" \
  > "$OUT/gpu_tests.log" 2>&1 || status=1
tail -n 15 "$OUT/gpu_tests.log"

step "benchmark: optimizer step, >= 16M parameters and a ResNet-20 list"
timeout 240 $PY -m bsam_fast.bench --device cuda --sizes 1.6e7 6.4e7 --layouts one resnet20 transformer \
  --backends cuda foreach --no-progress --json "$OUT/bench_cuda.json" --plot "$OUT/bench_cuda.png" \
  > "$OUT/bench_cuda.txt" 2>&1 || status=1
timeout 120 $PY -m bsam_fast.bench --device cuda --sizes 2.7e5 --layouts resnet20 tiny --end-to-end \
  --models mlp lenet5 resnet20_frn --no-progress --json "$OUT/bench_cuda_resnet20.json" \
  > "$OUT/bench_cuda_resnet20.txt" 2>&1 || status=1
cat "$OUT/bench_cuda.txt" "$OUT/bench_cuda_resnet20.txt" | grep -v "^$" | tail -n 40

step "done, status $status"
exit $status
