#!/usr/bin/env bash
# Everything revengine checks on a GPU, in one run (about 10 minutes on one H100/H200, 16 cores):
#   1. build the extension with the CUDA kernels (editable install, architecture of GPU 0);
#   2. `revengine selftest --device cuda` (kernels against their references, models, offload);
#   3. the tests that run on a GPU (`-k "cuda or gpu"`: the kernels against the CPU, the executor and
#      the models against mode="plain", the host tier, the `--device cuda` benchmarks' quick runs);
#   4. the `--device cuda` benchmarks: the host tier against depth (benchmarks/offload.py), BDIA's and
#      the MoE ops' kernels, peak memory against depth.
# Each stage has a time limit, cut to what is left of $BUDGET_S seconds (default 3600) from the start;
# its log goes to $OUT/<stage>.log (default folder ./gpu-check) and its last lines to stdout. Stages
# named on the command line run alone: scripts/gpu_check.sh build tests. Exit status: the number of
# stages that failed or were not run for lack of time. OFFLOAD_STEPS and OFFLOAD_ARGS shorten the
# offload stage (e.g. OFFLOAD_STEPS=2 OFFLOAD_ARGS="--depths 12 48").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MALLOC_MMAP_THRESHOLD_=65536
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') || exit 1
  export TORCH_CUDA_ARCH_LIST
fi
STAGES=${*:-"env build selftest offload tests kernels memory"}
DEADLINE=$(($(date +%s) + ${BUDGET_S:-3600}))
failed=0

stage() {  # stage NAME LIMIT_S CMD...: runs CMD with a time limit, its output in $OUT/NAME.log
  local name=$1 limit=$2 start rc
  shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  local left=$((DEADLINE - $(date +%s) - 5))
  [ "$limit" -le "$left" ] || limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "== $name: not run (${left} s of the budget left)"
    failed=$((failed + 1))
    return 1
  fi
  echo "== $name (limit ${limit} s): $*"
  start=$(date +%s)
  timeout -k 10 "$limit" "$@" >>"$OUT/$name.log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $(($(date +%s) - start)) s"
  tail -n "${TAIL:-30}" "$OUT/$name.log"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  return "$rc"
}

stage env 60 bash -c "nvidia-smi; nvcc --version; $PY -c 'import sys, torch; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())'"
stage build 480 $PY -m pip install --no-build-isolation --no-deps --no-index -v -e . || {
  echo "gpu_check: the build failed; nothing else can run"
  exit 1
}
# the extension must use torch's (shared) libstdc++: a static copy crashes at its first formatted message
case " $STAGES " in *" build "*)
  so=$(ls revengine/_C*.so 2>/dev/null | head -n 1)
  [ -n "$so" ] && echo "gpu_check: $so links $(ldd "$so" | grep -o 'libstdc++[^ ]*' | head -n 1 | grep . || echo 'no shared libstdc++ (static?)')" ;;
esac
stage selftest 180 $PY -m revengine selftest --device cuda
stage offload 300 $PY benchmarks/offload.py --device cuda --steps ${OFFLOAD_STEPS:-3} --rounds 1 ${OFFLOAD_ARGS:-}
# the benchmarks' quick --device cuda runs are left to the stages below
stage tests 600 $PY -m pytest -q -rfE -p no:cacheprovider --timeout 120 --continue-on-collection-errors -k "(cuda or gpu) and not take_device_cuda" tests/
stage kernels 300 bash -c "$PY benchmarks/bdia_kernels.py --device cuda && $PY benchmarks/moe_kernels.py --device cuda"
stage memory 300 $PY benchmarks/memory_vs_depth.py --device cuda
exit "$failed"
