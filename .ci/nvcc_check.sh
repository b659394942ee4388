#!/usr/bin/env bash
# Compiles CUDA sources of fastnn (C++20, as torch 2.14's headers need) for sm_80 and sm_90 with `-Xptxas -v`, against a CUDA build of torch, and
# reports registers / stack / spills per kernel. No GPU needed. Exits non-zero on a compile error or a spill.
#
#   .ci/nvcc_check.sh [FILE.cu ...]        (default: every csrc/cuda/*.cu)
#   .ci/nvcc_check.sh --sass OBJECT        only the tensor-core check (TENSOR_CORE below) on a built object or
#                                          extension (.o, .so), every FILE's pattern against it
# Environment: PYTHON  python of a CUDA build of torch (default /work/cuda-venv/bin/python)
#              ARCHS   space-separated compute capabilities (default "80 90")
#              ALLOW_SPILL  grep -E pattern of kernels whose spills are reported but not fatal (default "<double[,>]":
#                      ptxas 13.0 spills 8-48 bytes around libdevice's double exp in some float64 kernels even at
#                      40-64 of the 128 registers allowed; float64 is fastnn's accuracy path, not a fast one)
#              NVCC_FLAGS extra nvcc flags (setup.py passes FASTNN_NVCCFLAGS the same way)
#              NVCC    (default: $CUDA_HOME/bin/nvcc, else /usr/local/cuda/bin/nvcc, else nvcc on PATH)
#              TENSOR_CORE  "FILE:PATTERN ..." - every kernel of FILE whose demangled name matches the grep -E
#                      PATTERN must hold HMMA (tensor-core mma) instructions in its SASS for every arch, and at least
#                      one must exist (default: the attention tensor-core kernels and the persistent LSTM kernels,
#                      forward and backward). Read with
#                      cuobjdump ($CUDA_HOME/bin, PATH, else the copy Triton bundles).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-/work/cuda-venv/bin/python}
ARCHS=${ARCHS:-"80 90"}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
NVCC=${NVCC:-$CUDA_HOME/bin/nvcc}
[ -x "$NVCC" ] || NVCC=$(command -v nvcc)
files=("$@")
[ ${#files[@]} -gt 0 ] || files=(csrc/cuda/*.cu)

# torch's include dirs and the flags torch.utils.cpp_extension passes to nvcc.
mapfile -t TORCH_FLAGS < <("$PYTHON" - <<'PY' 2>/dev/null
import glob, os
from torch.utils import cpp_extension as c
try:
    paths = c.include_paths("cuda")
except TypeError:  # torch < 2.6 spelled it cuda=True
    paths = c.include_paths(cuda=True)
for d in paths: print("-I" + d)
try:  # headers of the pip nvidia packages (cusparse.h, ...), as setup.py passes them
    import nvidia
    for base in nvidia.__path__:
        for d in sorted(glob.glob(os.path.join(base, "*", "include"))): print("-isystem=" + d)
except ImportError:
    pass
for f in c.COMMON_NVCC_FLAGS: print(f)
import torch
print("-D_GLIBCXX_USE_CXX11_ABI=%d" % int(torch._C._GLIBCXX_USE_CXX11_ABI))
PY
)
[ ${#TORCH_FLAGS[@]} -gt 0 ] || { echo "nvcc_check: $PYTHON has no torch"; exit 2; }
gencode=()
for a in $ARCHS; do gencode+=("-gencode=arch=compute_$a,code=sm_$a"); done

TENSOR_CORE=${TENSOR_CORE:-"csrc/cuda/attention.cu:attn_(fwd|bwd)_tc_kernel< csrc/cuda/lstm.cu:layer_(fwd|bwd)_persistent_kernel<"}
CUOBJDUMP=${CUOBJDUMP:-$CUDA_HOME/bin/cuobjdump}
[ -x "$CUOBJDUMP" ] || CUOBJDUMP=$(command -v cuobjdump || "$PYTHON" -c \
  "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))" \
  2>/dev/null || true)
demangle() { if command -v cu++filt >/dev/null; then cu++filt; elif [ -x "$CUDA_HOME/bin/cu++filt" ]; then "$CUDA_HOME/bin/cu++filt"; else c++filt; fi; }

# hmma_check FILE OBJECT: the HMMA count per (arch, kernel) of the kernels TENSOR_CORE names for FILE; fails when
# one has none or none is found.
hmma_check() {
  local f=$1 obj=$2 entry pattern rc=0
  for entry in $TENSOR_CORE; do
    [ "${entry%%:*}" = "$f" ] || continue
    pattern=${entry#*:}
    if [ ! -x "$CUOBJDUMP" ]; then echo "nvcc_check: no cuobjdump to check $f's tensor-core kernels"; return 1; fi
    # cuobjdump -sass: "arch = sm_XX" starts each cubin, "Function : MANGLED" each kernel.
    "$CUOBJDUMP" -sass "$obj" | awk '
      /arch = sm_/ { match($0, /sm_[0-9a-z]+/); arch = substr($0, RSTART, RLENGTH) }
      /Function : / { if (fn != "") print arch, fn, n; fn = $3; n = 0 }
      /HMMA/ { n++ }
      END { if (fn != "") print arch, fn, n }' | demangle | grep -E "$pattern" >"$tmp/hmma" || true
    if [ ! -s "$tmp/hmma" ]; then echo "nvcc_check: no kernel of $f matches '$pattern' (tensor-core check)"; rc=1; continue; fi
    awk '{ printf "%s HMMA=%s", $1, $NF; for (i = 2; i < NF; i++) printf " %s", $i; print "" }' "$tmp/hmma" |
      sed -E 's/ (fastnn::)?(cuda::)?\(anonymous namespace\)::/ /; s/\(.*//'
    if awk '$NF == 0 { bad = 1 } END { exit !bad }' "$tmp/hmma"; then
      echo "nvcc_check: kernels of $f matching '$pattern' without HMMA instructions"; rc=1
    fi
  done
  return $rc
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
[ -n "${KEEP_LOG:-}" ] && trap 'cp "$tmp"/*.log "$KEEP_LOG"/ 2>/dev/null; rm -rf "$tmp"' EXIT
status=0
if [ "${1:-}" = "--sass" ]; then
  [ -f "${2:-}" ] || { echo "nvcc_check: --sass needs an object file, got '${2:-}'"; exit 2; }
  for entry in $TENSOR_CORE; do hmma_check "${entry%%:*}" "$2" || status=1; done
  exit $status
fi
for f in "${files[@]}"; do
  log="$tmp/$(basename "$f").log"
  start=$(date +%s)
  if ! "$NVCC" -std=c++20 -O3 --use_fast_math -lineinfo -Xptxas -v "${gencode[@]}" -Icsrc "${TORCH_FLAGS[@]}" \
      -DTORCH_EXTENSION_NAME=_C -Xcompiler -fPIC ${NVCC_FLAGS:-} -c "$f" -o "$tmp/out.o" >"$log" 2>&1; then
    cat "$log"
    echo "nvcc_check: FAILED to compile $f"
    status=1
    continue
  fi
  echo "== $f ($(( $(date +%s) - start )) s)"
  # ptxas prints, per kernel: "Compiling entry function 'NAME' for 'sm_XX'", then "Used N registers" and
  # "N bytes stack frame, N bytes spill stores, N bytes spill loads".
  awk '
    /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); name = substr($0, RSTART + 1, RLENGTH - 2);
                                 match($0, /sm_[0-9a-z]+/); arch = substr($0, RSTART, RLENGTH) }
    /bytes stack frame/ { stack = $1; st = $5; ld = $9 }
    /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/); regs = substr($0, RSTART + 5, RLENGTH - 15);
                              spill = (st + ld > 0) ? "  SPILL" : "";
                              printf "%s %s regs=%s stack=%s spill_st=%s spill_ld=%s%s\n", arch, name, regs, stack, st, ld, spill;
                              stack = st = ld = 0 }
  ' "$log" | demangle \
    | sed -E 's/ (fastnn::)?(cuda::)?\(anonymous namespace\)::/ /' | tee "$tmp/report"
  if grep SPILL "$tmp/report" | grep -qvE "${ALLOW_SPILL:-<double[,>]}"; then
    echo "nvcc_check: register spills in $f"
    status=1
  elif grep -q SPILL "$tmp/report"; then
    echo "nvcc_check: spills only in kernels matching ALLOW_SPILL='${ALLOW_SPILL:-<double[,>]}' (not fatal)"
  fi
  grep -i "warning" "$log" | grep -v "^$" | head -20 || true
  hmma_check "$f" "$tmp/out.o" || status=1
done
exit $status
