#!/usr/bin/env bash
# GPU check in stages, on a machine with a CUDA GPU and no network (an H200, H100 or A100; torch >= 2.11).
#
#   bash bench/gpu_check.sh [STAGE ...] OUT_DIR        (no stage: build; "all": build test compile sanitize bench)
#
# Stages run in the order given, in one command, under one global deadline (DEADLINE seconds from the start,
# default 420): every step's timeout is capped by the time left, so the command ends before it, and a step
# with too little time left is skipped ("no time"). Each stage after build first checks the extension: it is
# rebuilt only when it does not import with CUDA kernels or csrc/setup.py changed since it was built (a fresh
# machine), so stages can also run as separate commands.
#   build     versions (gcc, nvcc, python, torch, triton, GPU, driver, compute-sanitizer); the extension for this
#             GPU's arch (TORCH_CUDA_ARCH_LIST from the device, MAX_JOBS = all cores, setup.py build_ext
#             --inplace); the import, listing the ops with CUDA kernels. A failed build shows nvcc's first errors.
#   test      pytest -m cuda without the torch.compile and opcheck tests: -n JOBS, a per-test timeout
#             (pytest-timeout, else only pytest's faulthandler dump), --durations, junit XML.
#   compile   pytest -m cuda -k "compile or opcheck": torch.compile(fullgraph=True) and opcheck on CUDA tensors.
#   sanitize  tools/gpu_sanitize_driver.py (every CUDA and Triton kernel once on odd shapes) plain, with the
#             comparison to the reference and the list of CUDA kernels launched; then under compute-sanitizer
#             memcheck, racecheck, initcheck and synccheck, the time left shared among them.
#   bench     bench/side_by_side.py --device cuda BENCH_ARGS: every op beside torch eager, torch.compile,
#             Liger-Kernel, Cut Cross-Entropy, SDPA's forced backends and cuDNN's LSTM, with the copy bandwidth and
#             matrix-product ceilings measured in the same run; its --budget is the time left less BENCH_MARGIN
#             (default 45 s: imports, the last candidate's overrun, the table, CSV and plots), so the full run
#             fits DEADLINE=470 (under 8 minutes) on a machine with the extension built. Liger and Cut
#             Cross-Entropy come as wheels: tools/fetch_gpu_wheels.sh downloads them into .whl/ where pip works;
#             name .whl in the device call's carry, and this stage installs them first with
#               python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#             (WHEEL_SITE, default /tmp/site) and adds that folder to PYTHONPATH after the repository, so fastnn
#             stays the checkout's. Without .whl/ they are reported "absent". The tarball gets the table
#             (markdown), the CSV (the committed rows of bench/results/gpu/ plus this run's) and the plots; the
#             summary gets the goal lines, met or missed. The per-op benches (bench/bench_<op>.py) stay for runs
#             by hand.
#   aot       python -m fastnn.kernels.aot for this GPU's arch: the register report (not part of "all").
# OUT_DIR gets summary.txt (the table, appended step by step) and one <stage>.tar.gz of its logs per stage: at
# most 7 files for every stage in one command. The table is printed last, with the failing tests' lines.
# Environment: PYTHON (default python3), DEADLINE (seconds, default 420), JOBS (pytest -n, default min(12,
#   cores)), TEST_TIMEOUT (seconds per test, default 180), SANITIZE_TOOLS (default "memcheck racecheck initcheck
#   synccheck"), SANITIZE_ARGS (to the sanitized driver, e.g. "--backend native"), BENCH_ARGS (to side_by_side.py,
#   e.g. "--quick" or "--sections attention,lstm"), BENCH_MARGIN, WHEEL_SITE, PYTEST_ARGS (added
#   to every pytest, e.g. "--maxfail=20"), MAX_<STAGE> (seconds a stage may take, e.g. MAX_TEST=300, so that
#   the next stage of the command keeps its time), FORCE_BUILD=1, DRY_RUN=1 (print the commands, run nothing).
# Exit status: 0 when every step that ran passed; 2 without a CUDA GPU.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
STAGES=()
while [ $# -gt 1 ]; do STAGES+=("$1"); shift; done
[ $# -eq 1 ] && [ "${1#-}" = "$1" ] || { sed -n '2,/^# Exit status/p' "$0"; exit 2; }
[ ${#STAGES[@]} -gt 0 ] || STAGES=(build)
[ "${STAGES[*]}" = all ] && STAGES=(build test compile sanitize bench)
for s in "${STAGES[@]}"; do
  case $s in build | test | compile | sanitize | bench | aot) ;; *) echo "gpu_check: unknown stage $s"; exit 2 ;; esac
done
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
START=$(date +%s)
END=$((START + ${DEADLINE:-420}))
RESERVE=20  # seconds kept for a step's SIGKILL grace, the tarballs and the table
ERRORS="error:|error [0-9]|FAILED:|Error:|No such file"  # a build log's errors (nvcc, gcc, ninja, Python)
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-$(($(nproc) < 12 ? $(nproc) : 12))}
TEST_TIMEOUT=${TEST_TIMEOUT:-180}
SANITIZE_TOOLS=${SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}
SANITIZE_ARGS=${SANITIZE_ARGS:-}  # to the driver under the sanitizers, e.g. "--backend native --dtype float32"
BENCH_ARGS=${BENCH_ARGS:-}
BENCH_MARGIN=${BENCH_MARGIN:-45}
WHEEL_SITE=${WHEEL_SITE:-/tmp/site}
PYTEST_ARGS=${PYTEST_ARGS:-}
DRY_RUN=${DRY_RUN:-}
LOGS=$(mktemp -d /tmp/gpu_check.XXXXXX)
cd "$ROOT"
[ -n "${CUDA_HOME:-}" ] || { [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda; }
# compute-sanitizer sits in its own folder in some toolkit layouts, not in bin/
export PATH=$PATH:${CUDA_HOME:-/usr/local/cuda}/bin:${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
# The Triton kernels install as fastnn.kernels; an in-place build needs the link (git ignores it).
[ -e fastnn/kernels ] || ln -s ../kernels fastnn/kernels
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
failed=0 BUILD_LOG=

STAGE_END=$END
left() { echo $(((STAGE_END < END ? STAGE_END : END) - $(date +%s) - RESERVE)); }
row() {  # row STAGE STEP RESULT SECONDS DETAIL
  printf '%-9s %-20s %-9s %5s  %s\n' "$1" "$2" "$3" "$4" "$5" | tee -a "$SUMMARY"
}

# What one line of the table says about a step's log.
detail() {  # detail STEP LOG RC
  local log=$2
  case $1 in
    build)
      if [ "$3" = 0 ]; then ls fastnn/_C*.so 2>/dev/null | head -1
      else grep -m 3 -E "$ERRORS" "$log" | cut -c1-160 | tr '\n' '|'; fi ;;
    pytest*) grep -E "[0-9]+ (passed|failed|error|skipped)|no tests ran" "$log" | tail -1 | tr -d '=' ;;
    memcheck | racecheck | initcheck | synccheck)
      { grep -m 1 "ERROR SUMMARY" "$log" || tail -1 "$log"; } | tr -d '='
      grep -oE "^=+ +at (void )?[A-Za-z_][A-Za-z_0-9:]*" "$log" | awk '{print $NF}' | sort | uniq -c | sort -rn |
        head -3 | awk '{printf " %s x%s", $2, $1}' ;;
    driver) { grep -E "^gpu_sanitize_driver: (passed|FAILED)|^(CUDA|Triton) kernels" "$log" || tail -1 "$log"; } |
      tr '\n' ' ' ;;
    *) grep -v '^\s*$' "$log" | tail -1 ;;
  esac | tr -s ' ' | cut -c1-300
}

step() {  # step STAGE NAME CAP CMD...: CMD with a timeout of min(CAP, time left); output in LOGS/STAGE/NAME.log
  local stage=$1 name=$2 cap=$3 t0 rc res lim
  shift 3
  mkdir -p "$LOGS/$stage"
  local log=$LOGS/$stage/$name.log
  lim=$(left)
  [ "$cap" -lt "$lim" ] && lim=$cap
  if [ -n "$DRY_RUN" ]; then
    printf '%s\n' "$*" >"$log"
    row "$stage" "$name" dry "$lim" "$(printf '%s ' "$@" | tr -s ' \n' '  ' | cut -c1-160)"
    return 0
  fi
  if [ "$lim" -lt 15 ]; then
    row "$stage" "$name" "no time" 0 "$(left) s left of DEADLINE=${DEADLINE:-420}"
    failed=1
    return 124
  fi
  t0=$(date +%s)
  # SIGINT first: pytest then still prints its summary and writes the junit XML.
  timeout -s INT -k 5 "$lim" "$@" >"$log" 2>&1
  rc=$?
  case $rc in 0) res=ok ;; 124 | 137) res=TIMEOUT ;; *) res="FAIL($rc)" ;; esac
  [ $rc = 0 ] || failed=1
  row "$stage" "$name" "$res" $(($(date +%s) - t0)) "$(detail "$name" "$log" "$rc")"
  return $rc
}

pack() {  # the stage's logs, one tarball
  [ -d "$LOGS/$1" ] && tar -czf "$OUT/$1.tar.gz" -C "$LOGS" "$1"
}

# ---- the extension
src_hash() { cat setup.py csrc/*.* csrc/*/*.* 2>/dev/null | sha1sum | cut -c1-16; }
built_ok() {  # fastnn imports with CUDA kernels, from sources with the hash it was built from
  [ -z "${FORCE_BUILD:-}" ] && [ "$(cat build/.fastnn_src_hash 2>/dev/null)" = "$(src_hash)" ] &&
    "$PYTHON" -c 'import torch, fastnn; from fastnn.backend import native_has
assert native_has(torch.ops.fastnn.softmax_fwd, "cuda")' >/dev/null 2>&1
}
build() {  # build STAGE
  if [ -n "$BUILD_LOG" ]; then
    row "$1" build skipped 0 "the build failed above"
    return 1
  fi
  if built_ok; then
    row "$1" build ok 0 "up to date ($(ls fastnn/_C*.so | head -1))"
    return 0
  fi
  local h
  h=$(src_hash)
  rm -f build/.fastnn_src_hash
  step "$1" build 600 env FASTNN_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
    "$PYTHON" setup.py build_ext --inplace || { [ -e "$LOGS/$1/build.log" ] && BUILD_LOG=$LOGS/$1/build.log
    return 1; }
  [ -n "$DRY_RUN" ] || { mkdir -p build && echo "$h" >build/.fastnn_src_hash; }
  step "$1" import 60 "$PYTHON" -c '
import torch, fastnn
from fastnn.backend import native_has
ops = sorted({n.split("::")[1][:-4] for n in torch._C._dispatch_get_all_op_names()
              if n.startswith("fastnn::") and n.endswith("_fwd")})
cuda = [op for op in ops if native_has(getattr(torch.ops.fastnn, op + "_fwd"), "cuda")]
print("fastnn from", fastnn.__file__, "| without CUDA kernels:", sorted(set(ops) - set(cuda)))
assert "softmax" in cuda, "fastnn._C registered no CUDA kernels"
print("ops with CUDA kernels:", " ".join(cuda))'
}

# ---- the stages
stage_build() {
  # The last line, the table's: GPU, driver, torch, triton, nvcc, gcc.
  step build env 60 bash -c "
    nvidia-smi; compute-sanitizer --version; echo cores: \$(nproc); free -g | head -2
    '$PYTHON' -c 'import pytest_timeout' 2>/dev/null && echo pytest-timeout: yes || echo pytest-timeout: no
    echo $GPU sm_${ARCH/./}, driver \$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1), \
      \$('$PYTHON' -c 'import sys, torch, triton; print(\"python\", sys.version.split()[0], \"torch\",
      torch.__version__, \"triton\", triton.__version__, end=\"\")'), \
      nvcc \$(nvcc --version | grep -o 'release [0-9.]*' | cut -d' ' -f2), gcc \$(gcc -dumpfullversion)"
  build build
}

pytest_step() {  # pytest_step STAGE NAME -k EXPR
  # pytest-timeout fails a test past TEST_TIMEOUT and goes on; without it pytest's own faulthandler only dumps
  # the stacks of a test past it, and the step's timeout ends the run.
  local per_test=(-o faulthandler_timeout="$TEST_TIMEOUT")
  "$PYTHON" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout "$TEST_TIMEOUT")
  step "$1" "$2" 600 "$PYTHON" -m pytest tests -m cuda "${@:3}" -n "$JOBS" "${per_test[@]}" -v -rfE \
    --durations=25 -p no:cacheprovider --junitxml="$LOGS/$1/$2.xml" $PYTEST_ARGS
}

stage_test() { build test && pytest_step test pytest-cuda -k "not compile and not opcheck"; }
stage_compile() { build compile && pytest_step compile pytest-compile -k "compile or opcheck"; }

stage_sanitize() {
  build sanitize || return 1
  local driver=(tools/gpu_sanitize_driver.py --device cuda)
  # Plain first: it compiles the Triton kernels into the cache the sanitized runs then reuse.
  step sanitize driver 200 "$PYTHON" "${driver[@]}" --kernels
  if ! command -v compute-sanitizer >/dev/null; then
    row sanitize compute-sanitizer absent 0 "not on PATH (CUDA_HOME=${CUDA_HOME:-})"
    failed=1
    return 1
  fi
  local tools=($SANITIZE_TOOLS) i=0 tool share env
  for tool in "${tools[@]}"; do
    share=$(($(left) / (${#tools[@]} - i)))
    i=$((i + 1))
    # Exact allocations where reads out of bounds or of unwritten memory are looked for: the caching allocator
    # would hide them inside its blocks.
    env=(PYTORCH_NO_CUDA_MEMORY_CACHING=0)
    case $tool in memcheck | initcheck) env=(PYTORCH_NO_CUDA_MEMORY_CACHING=1) ;; esac
    step sanitize "$tool" "$share" env "${env[@]}" compute-sanitizer --tool "$tool" --error-exitcode 1 \
      --print-limit 20 "$PYTHON" "${driver[@]}" --no-check $SANITIZE_ARGS
  done
}

stage_bench() {
  build bench || return 1
  if ls .whl/*.whl >/dev/null 2>&1; then
    step bench wheels 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WHEEL_SITE" .whl/*.whl && export PYTHONPATH=$PYTHONPATH:$WHEEL_SITE
  else
    row bench wheels absent 0 "no .whl/ (tools/fetch_gpu_wheels.sh): Liger, Cut Cross-Entropy reported absent"
  fi
  local lim log=$LOGS/bench/side_by_side.log
  lim=$(left)
  [ "$lim" -gt 600 ] && lim=600
  # The bench spends its budget and then writes; the step's timeout (SIGINT, then the writes of what was
  # measured) only catches an overrun.
  local budget=$((lim - BENCH_MARGIN))
  [ "$budget" -lt 30 ] && budget=30  # little time left (a build ran first): the ceilings and what fits
  step bench side_by_side 600 "$PYTHON" bench/side_by_side.py --device cuda --budget "$budget" $BENCH_ARGS
  [ -e "$log" ] && grep -E "^- .* -> (met|MISSED|not measured)" "$log" | cut -c1-200 | sed 's/^/          goal: /' \
    >>"$SUMMARY"
  mkdir -p "$LOGS/bench/results"
  cp bench/results/gpu/side_by_side* "$LOGS/bench/results/" 2>/dev/null
  return 0
}

stage_aot() { build aot && step aot aot 300 "$PYTHON" -m fastnn.kernels.aot --arch "${ARCH/./}"; }

# ---- the GPU
GPU=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name()) if torch.cuda.is_available() else None' \
  2>/dev/null | tail -1)
ARCH=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null | tail -1)
if [ -z "$ARCH" ] || [ -z "$GPU" ]; then
  if [ -z "$DRY_RUN" ]; then
    row gpu_check gpu "no GPU" 0 "torch ($PYTHON) sees no CUDA GPU: nothing to build or run"
    echo "gpu_check: no CUDA GPU here; stages ${STAGES[*]} not run (DRY_RUN=1 prints their commands)"
    rm -rf "$LOGS"
    exit 2
  fi
  GPU="(no GPU: dry run)" ARCH=9.0
fi
export TORCH_CUDA_ARCH_LIST=$ARCH

echo "gpu_check: stages ${STAGES[*]} on $GPU (sm_${ARCH/./}), deadline ${DEADLINE:-420} s, output $OUT"
for s in "${STAGES[@]}"; do
  max=MAX_$(echo "$s" | tr a-z A-Z)
  STAGE_END=$(($(date +%s) + ${!max:-100000}))
  echo "== $s ($(left) s left)"
  "stage_$s"
  pack "$s"
done

echo
echo "== gpu_check ${STAGES[*]}: $(git rev-parse --short HEAD 2>/dev/null), $(date -u +%FT%TZ), $GPU, \
$(($(date +%s) - START)) s =="
printf '%-9s %-20s %-9s %5s  %s\n' stage step result s detail
cat "$SUMMARY"
[ -n "$BUILD_LOG" ] && grep -m 12 -E "$ERRORS" "$BUILD_LOG" | cut -c1-240  # a failed build's first errors
for f in "$LOGS"/*/pytest-*.log; do  # the failing tests, as pytest's short summary lists them
  [ -e "$f" ] && grep -E "^(FAILED|ERROR) " "$f" | cut -c1-200 | head -40
done
echo "files: $(cd "$OUT" && ls | tr '\n' ' ')"
rm -rf "$LOGS"
exit $failed
