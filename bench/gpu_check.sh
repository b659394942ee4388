#!/usr/bin/env bash
# GPU check: on a machine with a CUDA GPU and no network, build fastnn, test it, benchmark it, sanitize it.
#
#   bash bench/gpu_check.sh OUT_DIR [WHEELS_DIR]
#
# Steps (each logged to OUT_DIR/<step>.log; a summary table is printed last and written to OUT_DIR/summary.txt):
#   env        nvidia-smi, versions (python, torch, triton, nvcc, compute-sanitizer)
#   install    only with WHEELS_DIR: pip install --no-index --find-links WHEELS_DIR torch triton and test tools
#   build      FASTNN_CUDA=1 pip install -e . --no-build-isolation, for this GPU's arch (TORCH_CUDA_ARCH_LIST)
#   import     fastnn imports; lists the ops with CUDA kernels (fails if none, i.e. no softmax)
#   test-cuda  pytest -m cuda (junit XML beside the log)
#   test-all   the full test suite
#   aot        python -m fastnn.kernels.aot for this GPU's arch: Triton register report, fails on spills
#   bench-*    every bench/bench_*.py (CSV rows and PNGs copied to OUT_DIR/results/)
#   memcheck / racecheck   compute-sanitizer on the CUDA tests of the native backend, when the tool exists
# Environment: PYTHON (default: python on PATH, or ./.venv/bin/python), QUICK=1 (benches with --quick),
#   SKIP="bench sanitize ..." (step-name prefixes to skip), SANITIZE_K (pytest -k of the sanitized tests,
#   default "native"), STEP_TIMEOUT (seconds per step, default 1800), PYTEST_JOBS (default 4 for test-all).
# Exit status: 0 when every step that ran passed.
set -uo pipefail
[ $# -ge 1 ] || { sed -n '2,20p' "$0"; exit 2; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
WHEELS=${2:-}
cd "$ROOT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=$(command -v python3 || command -v python); fi
fi
SKIP=${SKIP:-}
STEP_TIMEOUT=${STEP_TIMEOUT:-1800}
SANITIZE_K=${SANITIZE_K:-native}
PYTEST_JOBS=${PYTEST_JOBS:-4}
[ -n "${CUDA_HOME:-}" ] || { [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda; }
# compute-sanitizer sits in its own folder in some toolkit layouts, not in bin/
export PATH=$PATH:${CUDA_HOME:-/usr/local/cuda}/bin:${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer
unset TRITON_INTERPRET
: >"$OUT/summary.txt"
failed=0

skipped() { local s; for s in $SKIP; do case $1 in "$s"*) return 0 ;; esac; done; return 1; }
step() {  # step NAME CMD...: runs CMD (timeout STEP_TIMEOUT) with its output in OUT/NAME.log
  local name=$1 t0 rc res
  shift
  if skipped "$name"; then printf '%-22s %-7s\n' "$name" skipped | tee -a "$OUT/summary.txt"; return 0; fi
  t0=$(date +%s)
  timeout "$STEP_TIMEOUT" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  case $rc in 0) res=ok ;; 124) res=TIMEOUT ;; *) res="FAIL($rc)" ;; esac
  [ $rc = 0 ] || failed=1
  printf '%-22s %-9s %6d s  %s\n' "$name" "$res" $(( $(date +%s) - t0 )) "$(tail -1 "$OUT/$name.log" | cut -c1-90)" \
    | tee -a "$OUT/summary.txt"
  return $rc
}

step env bash -c "nvidia-smi; '$PYTHON' -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \
\"cuda\", torch.version.cuda, \"gpu\", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'; \
'$PYTHON' -c 'import triton; print(\"triton\", triton.__version__)'; nvcc --version; compute-sanitizer --version; true"

if [ -n "$WHEELS" ]; then
  step install "$PYTHON" -m pip install --no-index --find-links "$WHEELS" torch triton "numpy<2.4" pytest \
    pytest-xdist hypothesis ninja setuptools wheel matplotlib || true
fi

CC_ARCH=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)
if [ -z "$CC_ARCH" ]; then
  echo "gpu_check: torch sees no CUDA GPU ($PYTHON)" | tee -a "$OUT/summary.txt"
  exit 1
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$CC_ARCH}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

step build env FASTNN_CUDA=1 "$PYTHON" -m pip install -v --no-deps --no-index -e . --no-build-isolation || {
  cat "$OUT/summary.txt"; exit 1; }
step import env -C /tmp "$PYTHON" -c '
import torch, fastnn, fastnn.ops
from fastnn.backend import native_has
ops = sorted({n.split("::")[1][:-4] for n in torch._C._dispatch_get_all_op_names()
              if n.startswith("fastnn::") and n.endswith("_fwd")})
with_cuda = [op for op in ops if native_has(getattr(torch.ops.fastnn, op + "_fwd"), "cuda")]
print("fastnn imported from", fastnn.__file__)
print("ops with a CUDA kernel:", with_cuda, "| without (CPU/Triton only so far):", sorted(set(ops) - set(with_cuda)))
assert "softmax" in with_cuda, "fastnn._C registered no CUDA kernels: was it built without CUDA?"'

xdist() { "$PYTHON" -c "import xdist" 2>/dev/null && echo "-n $1"; }
step test-cuda "$PYTHON" -m pytest tests -m cuda -q -rfE -p no:cacheprovider --junitxml="$OUT/test-cuda.xml"
step test-all "$PYTHON" -m pytest tests -q -rfE -p no:cacheprovider $(xdist "$PYTEST_JOBS") --junitxml="$OUT/test-all.xml"
step aot env -C /tmp "$PYTHON" -m fastnn.kernels.aot --arch "${CC_ARCH/./}"

mkdir -p "$OUT/results"
for b in bench/bench_*.py; do
  [ -e "$b" ] || continue
  name=$(basename "$b" .py)
  step "bench-${name#bench_}" "$PYTHON" "$b" --device cuda ${QUICK:+--quick}
done
cp -r bench/results/. "$OUT/results/" 2>/dev/null

if command -v compute-sanitizer >/dev/null; then
  # The caching allocator would hide out-of-bounds accesses inside its blocks: allocate exactly under memcheck.
  step sanitize-memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
    --error-exitcode 1 --print-limit 20 "$PYTHON" -m pytest tests -m cuda -k "$SANITIZE_K" -q -x -p no:cacheprovider
  step sanitize-racecheck compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 1 \
    --print-limit 20 "$PYTHON" -m pytest tests -m cuda -k "$SANITIZE_K" -q -x -p no:cacheprovider
else
  printf '%-22s %-9s\n' sanitize "absent (compute-sanitizer not found)" | tee -a "$OUT/summary.txt"
fi

echo
echo "== gpu_check summary ($(date -u +%FT%TZ), $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null)) =="
cat "$OUT/summary.txt"
echo "logs and results in $OUT"
exit $failed
