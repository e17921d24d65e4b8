#!/usr/bin/env bash
# Compile check of the CUDA sources without a GPU or a CUDA torch:
#   1. every csrc/cuda/*.cu (torch-free kernels) with `nvcc -c`, nvcc flags as torch's
#      CUDAExtension passes them, for the architectures in REVENGINE_CHECK_GENCODES;
#   2. every csrc/cuda/*.cpp (torch glue) with `g++ -fsyntax-only` against the installed (CPU)
#      torch's headers, a stub c10/cuda/impl/cuda_cmake_macros.h (the one header a CPU torch
#      lacks) and the CUDA toolkit's include folder.
# Exits non-zero on any compile error. Without nvcc it prints a SKIP line and exits 0 (CI has
# nvcc; developers may not). Python: $PYTHON, else python, else python3 (needs torch).
set -euo pipefail
cd "$(dirname "$0")/.."

GENCODES=${REVENGINE_CHECK_GENCODES:-"-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90"}

NVCC=$(command -v nvcc || true)
if [ -z "$NVCC" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then NVCC="$CUDA_HOME/bin/nvcc"; fi
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -z "$NVCC" ]; then
  echo "check_cuda_compile: SKIP: nvcc not found (not on PATH, no \$CUDA_HOME/bin/nvcc, no /usr/local/cuda); CUDA sources not compile-checked"
  exit 0
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# The toolkit root: $CUDA_HOME when it has the headers, else what nvcc says (it may be a wrapper
# script in another folder), else nvcc's parent folder.
CUDA_ROOT=""
if [ -n "${CUDA_HOME:-}" ] && [ -f "$CUDA_HOME/include/cuda_runtime.h" ]; then CUDA_ROOT=$CUDA_HOME; fi
if [ -z "$CUDA_ROOT" ]; then
  : >"$TMP/probe.cu"
  TOP=$("$NVCC" --dryrun -c "$TMP/probe.cu" -o "$TMP/probe.o" 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
  if [ -n "$TOP" ] && [ -f "$TOP/include/cuda_runtime.h" ]; then CUDA_ROOT=$(cd "$TOP" && pwd); fi
fi
if [ -z "$CUDA_ROOT" ]; then CUDA_ROOT=$(cd "$(dirname "$NVCC")/.." && pwd); fi
CUDA_INCLUDE="$CUDA_ROOT/include"
if [ ! -f "$CUDA_INCLUDE/cuda_runtime.h" ]; then
  echo "check_cuda_compile: FAIL: no cuda_runtime.h in $CUDA_INCLUDE (set CUDA_HOME to the CUDA toolkit root)" >&2
  exit 1
fi

PY=${PYTHON:-$(command -v python || command -v python3)}
# first line: torch's version; then its include folders
if ! TORCH_INFO=$("$PY" -c 'import torch, torch.utils.cpp_extension as c; print(torch.__version__); print("\n".join(c.include_paths()))' 2>"$TMP/py.err"); then
  echo "check_cuda_compile: FAIL: cannot import torch with $PY (needed for the glue's headers):" >&2
  tail -n 3 "$TMP/py.err" >&2
  exit 1
fi
CXX_BIN=${CXX:-g++}

mkdir -p "$TMP/stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$TMP/stub/c10/cuda/impl/cuda_cmake_macros.h"
INC_FLAGS=(-isystem "$TMP/stub")
while IFS= read -r d; do [ -n "$d" ] && INC_FLAGS+=(-isystem "$d"); done <<<"$(tail -n +2 <<<"$TORCH_INFO")"
INC_FLAGS+=(-isystem "$CUDA_INCLUDE" -I csrc)

echo "check_cuda_compile: nvcc $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') ($NVCC, toolkit $CUDA_ROOT), $CXX_BIN $("$CXX_BIN" -dumpversion), torch $(head -n 1 <<<"$TORCH_INFO")"

# seconds since $1 (from `date +%s%N`), one decimal
elapsed() {
  local ns=$(($(date +%s%N) - $1))
  printf '%d.%d' $((ns / 1000000000)) $(((ns / 100000000) % 10))
}

# Each check runs in the background (they take seconds each; the machines have 2+ cores); the
# results are printed in order once all are done.
# Flags of torch's CUDAExtension for nvcc (COMMON_NVCC_FLAGS, -std=c++20, -O3 from setup.py).
# shellcheck disable=SC2206
NVCC_FLAGS=(-std=c++20 -O3 -Xcompiler -fPIC -Xcompiler -Wall -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr $GENCODES)
shopt -s nullglob
checks=()
run_check() {  # run_check ID DESCRIPTION CMD...: runs CMD, records status, time and output under $TMP/ID.*
  local id=$1 desc=$2
  shift 2
  local start
  start=$(date +%s%N)
  if "$@" >"$TMP/$id.err" 2>&1; then echo ok >"$TMP/$id.status"; else echo FAILED >"$TMP/$id.status"; fi
  echo "$desc ($(elapsed "$start") s)" >"$TMP/$id.desc"
}
pids=()
for src in csrc/cuda/*.cu; do
  id=c${#checks[@]}
  checks+=("$id")
  run_check "$id" "nvcc -c $src [$GENCODES]" "$NVCC" "${NVCC_FLAGS[@]}" -I csrc -c "$src" -o "$TMP/$id.o" &
  pids+=($!)
done
for src in csrc/cuda/*.cpp; do
  id=c${#checks[@]}
  checks+=("$id")
  run_check "$id" "$CXX_BIN -std=c++20 -fsyntax-only $src (torch headers + stub c10/cuda/impl/cuda_cmake_macros.h + $CUDA_INCLUDE)" \
    "$CXX_BIN" -std=c++20 -fsyntax-only -Wall "${INC_FLAGS[@]}" "$src" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || true; done

fail=0
checked=0
for id in "${checks[@]}"; do
  status=$(cat "$TMP/$id.status" 2>/dev/null || echo FAILED)
  printf 'check_cuda_compile: %-6s %s\n' "$status" "$(cat "$TMP/$id.desc" 2>/dev/null || echo "$id")"
  if [ -s "$TMP/$id.err" ]; then  # the compiler's output, first 60 lines
    head -n 60 "$TMP/$id.err" | sed 's/^/    /'
    lines=$(wc -l <"$TMP/$id.err")
    if [ "$lines" -gt 60 ]; then echo "    ... ($((lines - 60)) more lines)"; fi
  fi
  [ "$status" = ok ] || fail=1
  checked=$((checked + 1))
done

if [ "$checked" -eq 0 ]; then
  echo "check_cuda_compile: FAIL: no CUDA sources found in csrc/cuda" >&2
  exit 1
fi
if [ "$fail" -ne 0 ]; then
  echo "check_cuda_compile: FAIL: some CUDA sources do not compile (see above)" >&2
  exit 1
fi
echo "check_cuda_compile: OK: $checked files"
