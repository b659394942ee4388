#!/usr/bin/env bash
# CI, CUDA half (no GPU needed): in a venv holding the CUDA build of torch 2.14.1,
#   1. builds the whole extension with CUDA for sm_80 and sm_90 (nvcc, MAX_JOBS=2),
#   2. imports fastnn and checks that fastnn._C registered CUDA kernels for every op,
#   3. runs the CPU test suite there (Triton interpreter),
#   4. compiles every Triton kernel ahead of time for sm_90 (and sm_80) and fails on register spills.
#
#   .ci/cuda_build_check.sh [--venv DIR] [--out DIR] [--no-tests] [--no-aot] [--jobs N]
#     --venv DIR  venv with torch 2.14.1 (CUDA build); created from PyPI if it has no torch (default:
#                 $CUDA_VENV, else .venv-cuda in the repository; /work/cuda-venv on the dev machine)
#     --out DIR   logs: build.log, import.log, tests.log, aot.log, times.txt (default: .ci/out/cuda)
#     --jobs N    pytest -n N (default 2); MAX_JOBS (parallel nvcc) is taken from the environment, default 2
# Needs nvcc (CUDA 13.0) at $CUDA_HOME, /usr/local/cuda or on PATH. Exit status: 0 if every step passed.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${CUDA_VENV:-$ROOT/.venv-cuda}
OUT=$ROOT/.ci/out/cuda
TESTS=1 AOT=1 JOBS=2
while [ $# -gt 0 ]; do
  case $1 in
    --venv) VENV=$2; shift ;;
    --out) OUT=$2; shift ;;
    --no-tests) TESTS=0 ;;
    --no-aot) AOT=0 ;;
    --jobs) JOBS=$2; shift ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export MAX_JOBS=${MAX_JOBS:-2}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
[ -n "${CUDA_HOME:-}" ] || { [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda; }
PY=$VENV/bin/python
: >"$OUT/times.txt"
status=0
step() {  # step NAME LOG CMD...: runs CMD with its output in LOG, records the wall time and the result
  local name=$1 log=$2 t0 rc
  shift 2
  t0=$(date +%s)
  "$@" >"$log" 2>&1
  rc=$?
  printf '%-8s %-5s %5d s  %s\n' "$name" "$([ $rc = 0 ] && echo ok || echo FAIL)" $(( $(date +%s) - t0 )) "$log" \
    | tee -a "$OUT/times.txt"
  [ $rc = 0 ] || { tail -30 "$log"; status=1; }
  return $rc
}

if ! "$PY" -c "import torch" 2>/dev/null; then
  step venv "$OUT/venv.log" bash -c "python3 -m venv '$VENV' && '$VENV/bin/pip' install -q torch==2.14.1 \
    'numpy<2.4' pytest pytest-xdist hypothesis ninja setuptools wheel" || exit 1
fi
"$PY" - <<'PY' || { echo "cuda_build_check: $PY has no CUDA build of torch"; exit 1; }
import torch
assert torch.version.cuda, "torch has no CUDA"
print("torch", torch.__version__, "CUDA", torch.version.cuda)
PY
# Test tools, if the venv lacks them (local wheels or PyPI).
"$PY" -c "import pytest, xdist, hypothesis, ninja" 2>/dev/null ||
  "$VENV/bin/pip" install -q pytest pytest-xdist hypothesis ninja setuptools wheel "numpy<2.4" >"$OUT/pip.log" 2>&1

cd "$ROOT"
rm -rf build fastnn/_C*.so  # a clean build: its time is what CI pays
step build "$OUT/build.log" env FASTNN_CUDA=1 "$VENV/bin/pip" install -v -e . --no-build-isolation || exit 1
step import "$OUT/import.log" env -C /tmp "$PY" - <<'PY'
import torch, fastnn, fastnn.ops
from fastnn.backend import native_has
ops = sorted({n.split("::")[1][:-4] for n in torch._C._dispatch_get_all_op_names()
              if n.startswith("fastnn::") and n.endswith("_fwd")})
missing = [op for op in ops if not native_has(op, "cuda")]
print("fastnn imported from", fastnn.__file__, "| ops:", ops, "| CUDA kernels missing:", missing)
assert ops and not missing, f"no CUDA kernel registered for {missing}"
PY
[ $TESTS = 1 ] && step tests "$OUT/tests.log" env TRITON_INTERPRET=1 "$PY" -m pytest tests -q -n "$JOBS" -p no:cacheprovider
[ $AOT = 1 ] && step aot "$OUT/aot.log" env -C /tmp "$PY" -m fastnn.kernels.aot --arch 90 --arch 80
[ $AOT = 1 ] && grep -E "^sm_|aot:" "$OUT/aot.log" | tail -60
echo "cuda_build_check: $([ $status = 0 ] && echo PASSED || echo FAILED) (logs in $OUT)"
exit $status
