#!/usr/bin/env bash
# The test command (README and CI): sets up the CPU environment, then runs the whole suite, Triton kernels
# under the interpreter. Extra arguments go to pytest.
#   bash tools/test.sh [pytest args...]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${FASTNN_VENV:-$root/.venv}"
bash "$root/tools/setup_venv.sh" "$venv"
cd "$root"
export TRITON_INTERPRET=1 PYTHONUNBUFFERED=1
exec "$venv/bin/python" -m pytest -q -n "${PYTEST_WORKERS:-2}" --durations=15 "$@"
