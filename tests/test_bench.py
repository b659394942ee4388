"""The benchmarks run from a clean checkout: each bench/bench_*.py in its quick mode, one repeat, nothing saved.

They validate every implementation against fastnn.reference before timing it, and the harness records a failing
implementation as an error row instead of stopping (so one broken baseline does not lose the others' numbers):
hence the check of the printed table for error marks as well as of the exit status. torch.compile is left out
(--no-compile): compiling the baselines would take minutes here, and it is torch's code, not fastnn's.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


# ---- bench/side_by_side.py: the GPU side-by-side bench's plumbing, on CPU tensors and tiny shapes

def _side_by_side():
    sys.path.insert(0, str(BENCH))
    try:
        import side_by_side
    finally:
        sys.path.remove(str(BENCH))
    return side_by_side


def test_side_by_side_tiny_cpu(tmp_path):
    """Every section runs end to end (--tiny on CPU): validation, timing, the table, the goals, the CSV rows with
    their machine columns, and candidates that cannot run here reported rather than crashing the run."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(BENCH / "side_by_side.py"), "--device", "cpu", "--tiny",
                           "--no-compile", "--repeats", "1", "--budget", "600", "--out", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "| section | case | dtype | mode | impl | status |" in proc.stdout, out[-4000:]
    assert "## Goals" in proc.stdout and " -> " in proc.stdout.split("## Goals")[1], out[-4000:]
    with open(tmp_path / "side_by_side.csv") as f:
        rows = list(csv.DictReader(f))
    for key in ("gpu", "driver", "torch", "triton", "commit", "date"):
        assert key in rows[0], rows[0].keys()
    assert rows[0]["torch"] == torch.__version__
    sections = {"softmax", "log_softmax", "cross_entropy", "bce_with_logits", "linear_cross_entropy", "attention",
                "lstm", "translator"}
    timed = {r["section"] for r in rows if r["status"] == "ok" and r["impl"].startswith("fastnn")}
    assert timed == sections, sections - timed
    assert not [r for r in rows if r["status"].startswith(("invalid", "error"))]
    # Candidates that need CUDA or --no-compile are reported, one row per case and mode.
    assert any(r["impl"] == "sdpa-flash" and r["status"].startswith("n/a") for r in rows)
    assert any(r["impl"] == "torch-compile" and r["status"] == "n/a: --no-compile" for r in rows)
    assert (tmp_path / "side_by_side_cpu.md").exists()
    # The byte model of softmax: fwd reads x and writes y; fwd+bwd adds reading dy and y and writing dx.
    sm = {r["mode"]: r for r in rows if r["section"] == "softmax" and r["case"] == "8x300" and r["dtype"] == "fp32"
          and r["impl"] == "fastnn-native"}
    assert float(sm["fwd"]["bytes"]) == 2 * 8 * 300 * 4 and float(sm["fwd+bwd"]["bytes"]) == 5 * 8 * 300 * 4
    r = sm["fwd"]
    gbps = float(r["bytes"]) / (float(r["time_ms"]) * 1e-3) / 1e9
    assert abs(float(r["frac_copy_bw"]) - gbps / float(r["copy_gbs"])) <= 1e-9 * gbps / float(r["copy_gbs"])


def test_side_by_side_rejects_wrong_candidates():
    """A candidate whose forward or gradient disagrees with fastnn.reference, or that raises, is reported and not
    timed; the others in the same case still are."""
    sbs = _side_by_side()
    args = sbs.parse(["--device", "cpu", "--tiny", "--no-save", "--no-compile", "--repeats", "1"])
    env = sbs.Env(args)
    runner = sbs.Runner(args, env)
    runner.copy_gbs = 10.0

    def wrong_grad(x):  # the right values, a gradient off by 10%
        return torch.softmax(x, -1) + 0.1 * (x - x.detach())

    def raises(x):
        raise RuntimeError("boom")

    case = sbs.softmax_cases(env, [(torch.float32, 8, 300)], log=False)[0]
    case.cands = {"torch-eager": sbs.Cand(lambda x: torch.softmax(x, -1)),
                  "wrong-fwd": sbs.Cand(lambda x: torch.softmax(1.01 * x, -1)),
                  "wrong-grad": sbs.Cand(wrong_grad), "raises": sbs.Cand(raises),
                  "cuda-only": sbs.Cand(lambda x: torch.softmax(x, -1), ("cuda",))}
    runner.run_case(case)
    got = {(r["impl"], r["mode"]): r for r in runner.rows}
    assert len(got) == 10
    for mode in ("fwd", "fwd+bwd"):
        assert got[("torch-eager", mode)]["status"] == "ok" and got[("torch-eager", mode)]["time_ms"] > 0
        assert got[("wrong-fwd", mode)]["status"].startswith("invalid")
        assert got[("raises", mode)]["status"].startswith("error: RuntimeError: boom")
        assert got[("cuda-only", mode)]["status"] == "n/a: needs CUDA"
        for impl in ("wrong-fwd", "wrong-grad", "raises", "cuda-only"):
            assert got[(impl, mode)]["time_ms"] is None
    # Only the gradient is wrong: caught because fwd+bwd is timed for this case.
    assert got[("wrong-grad", "fwd")]["status"].startswith("invalid")
    ok = got[("torch-eager", "fwd")]
    assert ok["bytes"] == 2 * 8 * 300 * 4
    assert abs(ok["frac_copy_bw"] - ok["bytes"] / (ok["time_ms"] * 1e-3) / 1e9 / 10.0) < 1e-12


def test_side_by_side_candidate_environment(monkeypatch):
    """A candidate's ``env`` holds while it runs, its backward included (the native LSTM reads its kernel choice
    from the environment at each call), and the environment is restored after it, also when it raises."""
    sbs = _side_by_side()
    name = "FASTNN_SIDE_BY_SIDE_PROBE"
    monkeypatch.setenv(name, "before")
    args = sbs.parse(["--device", "cpu", "--tiny", "--no-save", "--no-compile", "--repeats", "1"])
    runner = sbs.Runner(args, sbs.Env(args))
    runner.copy_gbs = 10.0
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(x):
            seen.append(("fwd", os.environ.get(name)))
            return torch.softmax(x, -1)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(output)

        @staticmethod
        def backward(ctx, g):
            seen.append(("bwd", os.environ.get(name)))
            y, = ctx.saved_tensors
            return y * (g - (g * y).sum(-1, keepdim=True))

    def raises(x):
        seen.append(("raises", os.environ.get(name)))
        raise RuntimeError("boom")

    case = sbs.softmax_cases(sbs.Env(args), [(torch.float32, 8, 300)], log=False)[0]
    case.cands = {"probe": sbs.Cand(Probe.apply, env={name: "inside"}),
                  "raises": sbs.Cand(raises, env={name: "inside-too"}),
                  "plain": sbs.Cand(lambda x: (seen.append(("plain", os.environ.get(name))), torch.softmax(x, -1))[1])}
    runner.run_case(case)
    got = {(r["impl"], r["mode"]): r["status"] for r in runner.rows}
    assert got[("probe", "fwd+bwd")] == "ok" and got[("plain", "fwd")] == "ok"
    assert {v for k, v in seen if k in ("fwd", "bwd")} == {"inside"} and ("bwd", "inside") in seen
    assert ("raises", "inside-too") in seen
    assert {v for k, v in seen if k == "plain"} == {"before"}
    assert os.environ[name] == "before"
