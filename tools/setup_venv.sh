#!/usr/bin/env bash
# Creates (or updates) a virtual environment with CPU torch and builds fastnn into it, editable.
#   bash tools/setup_venv.sh [VENV_DIR]      (default: .venv in the repository)
# torch must be installed before fastnn's build (--no-build-isolation: the extension has to link the torch that
# is installed; an isolated build would compile against another one and fail at import).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$venv/bin/python" -m pip install -q -r "$root/tools/requirements-cpu.txt"
MAX_JOBS="${MAX_JOBS:-2}" "$venv/bin/python" -m pip install -q -e "$root" --no-build-isolation
"$venv/bin/python" -c "import fastnn, torch; print('fastnn ready:', fastnn.__file__, 'torch', torch.__version__)"
