#!/usr/bin/env bash
# Everything that needs a GPU, in one run of under 8 minutes: build the CUDA extension, the gpu-marked tests (the
# low-rank CUDA kernel against the reference among them), the perturbation benchmark, a short step benchmark and the
# low-rank update pass. For a machine with torch, Triton, transformers, nvcc,
# cmake/ninja/pybind11 already installed and no internet (the build uses --no-build-isolation --no-deps).
#
# Usage: bash bench/gpu_check.sh            output under $OUT if set, else bench/out/gpu
#   PYTHON=python3        interpreter to use (default: python)
#   BUDGET_S=470          wall-clock budget for all stages; each stage also has its own limit below
#   RESULTS_IN_PLACE=1    benchmarks update bench/RESULTS.md itself; by default they update a copy,
#                         <out>/RESULTS.md, so that the figures come back from a lent machine
# Every stage runs even when an earlier one failed (a failed build leaves the tests to report what is missing);
# the summary at the end gives each stage's exit status (124: stopped at its time limit) and its log.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
OUT_DIR=${OUT:-bench/out/gpu}
BUDGET_S=${BUDGET_S:-470}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
if [ "${RESULTS_IN_PLACE:-0}" = 1 ]; then
  RESULTS=$PWD/bench/RESULTS.md
else
  RESULTS=$OUT_DIR/RESULTS.md
  cp bench/RESULTS.md "$RESULTS"
fi
T0=$(date +%s)
SUMMARY=()

# stage NAME LIMIT_S CMD...: run CMD with at most LIMIT_S seconds (less if the budget is nearly spent),
# output to <out>/NAME.log; record the exit status and time.
stage() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - T0)))
  if [ "$left" -lt 15 ]; then
    SUMMARY+=("$(printf '%-10s %-8s %6s  %s' "$name" skipped - "budget of ${BUDGET_S}s spent")")
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s): $*"
  local t=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  local dt=$(($(date +%s) - t))
  local verdict=ok
  [ "$rc" -ne 0 ] && verdict=FAILED && tail -n 15 "$OUT_DIR/$name.log"
  SUMMARY+=("$(printf '%-10s %-8s %6s  %s' "$name" "$verdict($rc)" "${dt}s" "$OUT_DIR/$name.log")")
}

stage env 30 bash -c "nvidia-smi; nvcc --version; $PY -c 'import sys, torch, triton; print(sys.version); \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0)); \
print(\"triton\", triton.__version__)'; $PY -c 'import transformers; print(\"transformers\", transformers.__version__)'"
stage build 200 env MEZO_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e .
stage backends 30 "$PY" -c "import mezo_kernels as mk, torch; print(mk.backends(torch.device('cuda')))"
stage tests 150 "$PY" -m pytest -m gpu -q -ra -p no:cacheprovider --junitxml="$OUT_DIR/gpu_tests.xml" tests
stage perturb 120 "$PY" bench/bench_perturb.py --device cuda --out "$OUT_DIR" --results "$RESULTS"
stage step 120 "$PY" bench/bench_step.py --device cuda --quick --out "$OUT_DIR/step" --results "$RESULTS"
# the fused low-rank update pass (issue 21) against a copy of the same bytes; its correctness is in the tests stage
# (tests/test_lowrank_cuda.py: the CUDA kernel against the reference and Triton, bit for bit)
stage lowrank 90 "$PY" bench/bench_perturb.py --device cuda --method mezo-lowrank --reps 5 --out "$OUT_DIR" \
  --results "$RESULTS"
# 2 GPUs: FSDP2-sharded MeZO over NCCL equals one device bit for bit (bench/multi_gpu_check.py); else skipped, saying so
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "${NGPU:-0}" -ge 2 ]; then
  stage nccl 120 "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 bench/multi_gpu_check.py --device cuda
else
  echo "== nccl: skipped, this machine has ${NGPU:-0} GPU(s); the 2-GPU NCCL stage needs 2"
  SUMMARY+=("$(printf '%-10s %-8s %6s  %s' nccl "skipped" "0s" "needs 2 GPUs, found ${NGPU:-0}")")
fi

echo
echo "== summary ($(($(date +%s) - T0))s of ${BUDGET_S}s; output in $OUT_DIR)"
printf '%-10s %-8s %6s  %s\n' stage status time log
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT_DIR/summary.txt"
! grep -q -e FAILED -e skipped "$OUT_DIR/summary.txt"
