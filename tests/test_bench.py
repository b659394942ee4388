"""The benchmarks run from a clean checkout: each bench/bench_*.py in its quick mode, one repeat, nothing saved.

They validate every implementation against fastnn.reference before timing it, and the harness records a failing
implementation as an error row instead of stopping (so one broken baseline does not lose the others' numbers):
hence the check of the printed table for error marks as well as of the exit status. torch.compile is left out
(--no-compile): compiling the baselines would take minutes here, and it is torch's code, not fastnn's.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("bench_*.py")))
def test_bench_runs(script, tmp_path):
    # The interpreter setting of the test session would route nothing here (CPU tensors take the native
    # backend), but a bench must not depend on it either way.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # One bench also runs the harness's second process (torch with THP_MEM_ALLOC_ENABLE=1); the others skip it.
    thp = [] if script == "bench_softmax.py" else ["--no-thp"]
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--no-save", "--no-compile",
                           "--repeats", "1", "--device", "cpu", *thp],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "| series | case | impl |" in proc.stdout, out[-4000:]
    errors = [line for line in proc.stdout.splitlines() if line.startswith("  ! ")]
    assert not errors, "\n".join(errors)
    # fastnn's own rows, not only the baselines: every bench times at least one fastnn implementation.
    assert any("| fastnn" in line for line in proc.stdout.splitlines()), out[-4000:]
    if not thp:
        assert "+thp |" in proc.stdout, out[-4000:]
