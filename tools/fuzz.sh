#!/usr/bin/env bash
# The dedicated differential-fuzzing run (tests/test_fuzz.py with the `fuzz` hypothesis profile: >= 2000 examples
# per op and backend, random seeds, failures saved in .hypothesis/ and replayed first next time).
#   bash tools/fuzz.sh [pytest args...]      e.g.  bash tools/fuzz.sh -k softmax
#   FASTNN_FUZZ_EXAMPLES=10000 bash tools/fuzz.sh
# A failure prints the shrunk example; keep it as a regression test in tests/test_fuzz.py.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${FASTNN_VENV:-$root/.venv}"
[ -x "$venv/bin/python" ] || bash "$root/tools/setup_venv.sh" "$venv"
cd "$root"
export TRITON_INTERPRET=1 PYTHONUNBUFFERED=1 FASTNN_HYPOTHESIS_PROFILE=fuzz
exec "$venv/bin/python" -m pytest -q -n "${PYTEST_WORKERS:-2}" tests/test_fuzz.py --hypothesis-show-statistics "$@"
