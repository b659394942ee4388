#!/usr/bin/env bash
# The CPU extension under AddressSanitizer + UndefinedBehaviorSanitizer: builds fastnn._C with
# -fsanitize=address,undefined in a throwaway copy of the repository (never touching the normal build), then runs
# the CPU tests of the native backend against it with the ASan runtime preloaded into Python. Any ASan or UBSan
# report aborts the process, so the step fails.
#   bash tools/sanitize.sh [pytest args...]      (default: tests -k "native or contract", see below)
# Uses the venv of tools/test.sh ($FASTNN_VENV, default .venv) for torch and pytest only. CI's third stage
# (.ci/run) runs it with the default selection: every native-backend test (each op's C++ CPU kernels, forward and
# backward, gradcheck, opcheck, torch.compile, the fuzz's native cases) and the whole bad-input contract table.
# No subset is needed: on a 2-core machine the stage takes minutes, well inside CI's budget for it
# (docs/measurements.md, "CI"); FASTNN_SANITIZE_TIMEOUT (default 2400 s) bounds the tests anyway.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${FASTNN_VENV:-$root/.venv}"
[ -x "$venv/bin/python" ] || bash "$root/tools/setup_venv.sh" "$venv"
work="$(mktemp -d /tmp/fastnn-asan.XXXXXX)"
trap 'rm -rf "$work"' EXIT
start=$SECONDS

# Tracked and new (not ignored) files only: no .so, build/ or .venv from the normal build.
(cd "$root" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp -P --parents -t "$work")
# The installed layout maps kernels/ to fastnn.kernels; on PYTHONPATH the copy needs the same.
ln -sfn ../kernels "$work/fastnn/kernels"

cd "$work"
flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g -O1"
FASTNN_CUDA=0 FASTNN_CXXFLAGS="$flags" FASTNN_LDFLAGS="-fsanitize=address,undefined" MAX_JOBS="${MAX_JOBS:-2}" \
    "$venv/bin/python" setup.py -q build_ext --inplace >build.log 2>&1 || { tail -50 build.log; exit 1; }
so="$(ls fastnn/_C*.so)"
# grep without -q reads all of nm's output: -q would exit at the first match and, under pipefail, nm's SIGPIPE
# would fail the check on an instrumented build.
nm -D "$so" | grep __asan_report >/dev/null || { echo "sanitize: $so is not instrumented"; exit 1; }
echo "sanitize: built in $((SECONDS - start)) s"

asan="$(gcc -print-file-name=libasan.so)"
ubsan="$(gcc -print-file-name=libubsan.so)"
# Python and torch leak by design (detect_leaks=0); torch's own allocator is not instrumented, so only fastnn's
# code is checked. halt_on_error makes any report fatal; the pytest exit status then fails the step.
export LD_PRELOAD="$asan $ubsan"
# ASan reports go to files under $work/reports and UBSan's (which ignore log_path when linked with ASan) to
# stderr, kept in $work/pytest.log: a report from a process whose exit status nobody checks (a subprocess, an
# xdist worker that pytest replaced) still fails the step.
mkdir -p "$work/reports"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_odr_violation=0:allocator_may_return_null=1:log_path=$work/reports/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1"
export PYTHONPATH="$work" TRITON_INTERPRET=1 PYTHONUNBUFFERED=1
# fastnn's block cache off, so a freed block is freed and a use after it is reported rather than hidden by reuse.
export FASTNN_CPU_CACHE_MB=0
# The native backend's tests (Triton's interpreter runs no fastnn C++ and is slow under ASan), the bad-input
# contract and the fuzz's native cases.
if [ $# -eq 0 ]; then set -- tests -k "native or contract"; fi
"$venv/bin/python" -c "import fastnn, sys; assert fastnn.__file__.startswith('$work'), fastnn.__file__"
set +e
timeout "${FASTNN_SANITIZE_TIMEOUT:-2400}" "$venv/bin/python" -m pytest -q -p no:cacheprovider -x \
    -n "${PYTEST_WORKERS:-2}" "$@" 2>&1 | tee "$work/pytest.log"
status=${PIPESTATUS[0]}
set -e
if compgen -G "$work/reports/*" >/dev/null || grep -qE "runtime error:|Sanitizer" "$work/pytest.log"; then
    echo "sanitize: sanitizer reports:"
    cat "$work"/reports/* 2>/dev/null || true
    grep -E -A20 "runtime error:|Sanitizer" "$work/pytest.log" | head -200
    exit 1
fi
[ $status -eq 0 ] || { echo "sanitize: pytest failed (status $status; 124 = timed out)"; exit $status; }
echo "sanitize: clean in $((SECONDS - start)) s"
