#!/usr/bin/env bash
# CI, CUDA half (no GPU needed): in a venv holding a CUDA build of torch (2.14.1 unless CUDA_TORCH says otherwise),
#   1. builds the whole extension with CUDA for sm_80 and sm_90 (nvcc, MAX_JOBS=2),
#   2. imports fastnn, lists the ops with CUDA kernels, and fails if fastnn._C registered none (softmax), and fails
#      if the built extension's tensor-core kernels hold no HMMA instructions (.ci/nvcc_check.sh --sass),
#   3. runs the CPU test suite there (Triton interpreter),
#   4. with --aot: compiles every Triton kernel ahead of time for sm_90, failing on register spills;
#   5. with --aot-recorded FILE: compiles for sm_90 every Triton launch a test run recorded in FILE
#      (FASTNN_TRITON_RECORD, kernels/aot.py), failing on a compile error or shared memory above sm_90's.
#
#   .ci/cuda_build_check.sh [VENV_DIR] [--out DIR] [--no-tests] [--aot] [--aot-recorded FILE] [--jobs N]
#     VENV_DIR    venv with a CUDA build of torch; created if it has no torch: torch==$CUDA_TORCH (default 2.14.1)
#                 from PyPI, with the Triton it pins, plus tools/requirements-cpu.txt without its torch/triton pins,
#                 under $CUDA_PYTHON (default python3) (default VENV_DIR: $CUDA_VENV, else .venv-cuda in the
#                 repository; /work/cuda-venv on the dev machine)
#     --out DIR   logs: build.log, import.log, tests.log, aot.log, aot-recorded.log, times.txt (default:
#                 .ci/out/cuda)
#     -k EXPR     only the tests pytest's -k selects (CI: "not triton", the interpreter ran in the CPU stage)
#     --jobs N    pytest -n N (default 2); MAX_JOBS (parallel nvcc) is taken from the environment, default 2
# Needs nvcc (CUDA 13.0) at $CUDA_HOME, /usr/local/cuda or on PATH. Exit status: 0 if every step passed.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${CUDA_VENV:-$ROOT/.venv-cuda}
OUT=$ROOT/.ci/out/cuda
TESTS=1 AOT=0 JOBS=2 KEXPR= RECORDED=
while [ $# -gt 0 ]; do
  case $1 in
    --venv) VENV=$2; shift ;;
    --out) OUT=$2; shift ;;
    --no-tests) TESTS=0 ;;
    --aot) AOT=1 ;;
    --aot-recorded) RECORDED=$(cd "$(dirname "$2")" && pwd)/$(basename "$2"); shift ;;
    -k) KEXPR=$2; shift ;;
    --jobs) JOBS=$2; shift ;;
    -*) echo "unknown argument $1"; exit 2 ;;
    *) VENV=$1 ;;
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
step() {  # step NAME LOG CMD...: runs CMD with its output in LOG, records wall and CPU time and the result
  local name=$1 log=$2 rc t TIMEFORMAT="%R %U %S"
  shift 2
  { time "$@" >"$log" 2>&1; } 2>"$OUT/.time"
  rc=$?
  t=$(awk '{printf "%6.0f s wall %6.0f s cpu", $1, $2 + $3}' "$OUT/.time")
  printf '%-8s %-5s %s (load %s)  %s\n' "$name" "$([ $rc = 0 ] && echo ok || echo FAIL)" "$t" \
    "$(cut -d' ' -f1 /proc/loadavg)" "$log" | tee -a "$OUT/times.txt"
  [ $rc = 0 ] || { tail -30 "$log"; status=1; }
  return $rc
}

if ! "$PY" -c "import torch" 2>/dev/null; then
  grep -vE '^(torch|triton)([=<> ]|$)' "$ROOT/tools/requirements-cpu.txt" >"$OUT/requirements.txt"
  step venv "$OUT/venv.log" bash -c "'${CUDA_PYTHON:-python3}' -m venv '$VENV' && '$VENV/bin/pip' install -q \
    torch==${CUDA_TORCH:-2.14.1} -r '$OUT/requirements.txt'" || exit 1
fi
"$PY" - <<'PY' || { echo "cuda_build_check: $PY has no CUDA build of torch"; exit 1; }
import torch
assert torch.version.cuda, "torch has no CUDA"
print("torch", torch.__version__, "CUDA", torch.version.cuda)
PY
# Test tools, if the venv lacks them (local wheels or PyPI).
"$PY" -c "import pytest, xdist, hypothesis, ninja" 2>/dev/null ||
  "$VENV/bin/pip" install -q pytest pytest-xdist hypothesis ninja setuptools wheel "numpy<2.4" >"$OUT/pip.log" 2>&1

# Build from a copy of the working tree (tracked and untracked-but-not-ignored files): an editable install puts
# fastnn/_C*.so in the source tree, and this CUDA-torch build must not replace the checkout's CPU-torch one.
SRC=$VENV/fastnn-src
rm -rf "$SRC" && mkdir -p "$SRC"
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  (cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) |
    tar -xf - -C "$SRC"
else
  (cd "$ROOT" && tar --exclude='./.venv*' --exclude=./build --exclude='*.so' -cf - .) | tar -xf - -C "$SRC"
fi
cd "$SRC"  # a fresh tree, so a clean build: its time is what CI pays
echo "cuda_build_check: building $SRC (copy of $ROOT) in $VENV"
step build "$OUT/build.log" env FASTNN_CUDA=1 "$VENV/bin/pip" install -v -e . --no-build-isolation || exit 1
step import "$OUT/import.log" env -C /tmp "$PY" - <<'PY'
import torch, fastnn, fastnn.ops
from fastnn.backend import native_has
ops = sorted({n.split("::")[1][:-4] for n in torch._C._dispatch_get_all_op_names()
              if n.startswith("fastnn::") and n.endswith("_fwd")})
with_cuda = [op for op in ops if native_has(getattr(torch.ops.fastnn, op + "_fwd"), "cuda")]
print("fastnn imported from", fastnn.__file__)
print("ops with a CUDA kernel:", with_cuda, "| without (CPU/Triton only so far):", sorted(set(ops) - set(with_cuda)))
assert "softmax" in with_cuda, "fastnn._C registered no CUDA kernels: was it built without CUDA?"
PY
step sass "$OUT/sass.log" env PYTHON="$PY" bash "$ROOT/.ci/nvcc_check.sh" --sass "$(ls "$SRC"/fastnn/_C*.so | head -1)"
[ $TESTS = 1 ] && step tests "$OUT/tests.log" env TRITON_INTERPRET=1 PYTHONUNBUFFERED=1 "$PY" -m pytest tests -q \
  -n "$JOBS" -p no:cacheprovider --durations=10 ${KEXPR:+-k "$KEXPR"}
[ $AOT = 1 ] && step aot "$OUT/aot.log" env -C /tmp "$PY" -m fastnn.kernels.aot --arch 90
[ $AOT = 1 ] && grep -E "^sm_|aot:" "$OUT/aot.log" | tail -60
if [ -n "$RECORDED" ]; then
  step aot-recorded "$OUT/aot-recorded.log" env -C /tmp "$PY" -m fastnn.kernels.aot --recorded "$RECORDED" \
    --arch 90 --jobs "$JOBS"
  grep -E "^aot:|^  (FAIL|SPILL)" "$OUT/aot-recorded.log" | cut -c1-240 | head -40
fi
echo "cuda_build_check: $([ $status = 0 ] && echo PASSED || echo FAILED) (logs in $OUT)"
exit $status
