"""kernels/aot.py's recorded mode, without a GPU: launches made under Triton's interpreter are written down as the
JIT would specialize them on a GPU, then compiled for sm_90 for real. Three compile-time failures the interpreter
cannot show are among them (each aborted or failed the GPU compile before its fix):
- a one-element BCE with mean reduction: the JIT passes n = 1 as a Python int, which has no ``.to``;
- float64 attention with a key padding mask: a byte-wide mask sized the float64 MMA's operand fragments for bytes
  and the compile aborted;
- a dropout seed half equal to 1, or divisible by 16, specialized the attention kernels (an int without ``.to``;
  another compiled variant per seed).
And for sm_80 (the A100): the float64 attention backward at head dim 256 staged 224 KB of shared memory, above
the A100's 163 KB (Triton's out-of-resources error at launch); it now reads its key block inside the loop there."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

LAUNCHES = r"""
import sys
import torch
from fastnn.kernels.aot import record_launches

record_launches(sys.argv[1], arch=90)

import fastnn.functional as F
from fastnn.kernels import attention

x = torch.randn(1, dtype=torch.float64, requires_grad=True)
F.binary_cross_entropy_with_logits(x, torch.rand(1, dtype=torch.float64), backend="triton").backward()

B, H, L, D = 2, 2, 19, 8
q, k, v, g = (torch.randn(B, H, L, D, dtype=torch.float64) for _ in range(4))
pad = torch.zeros(B, L, dtype=torch.bool)
pad[:, -3:] = True
seed = (16 << 32) | 1  # halves 1 and 16
out, stats = attention.attention_forward(q, k, v, None, pad, 0.25, True, D ** -0.5, seed)
attention.attention_backward(g, q, k, v, out, stats, None, pad, 0.25, True, D ** -0.5, seed, False)
"""


LAUNCHES_SM80 = r"""
import sys
import torch
from fastnn.kernels.aot import record_launches

record_launches(sys.argv[1], arch=80)

from fastnn.kernels import attention

B, H, L, D = 1, 2, 19, 256
q, k, v, g = (torch.randn(B, H, L, D, dtype=torch.float64) for _ in range(4))
out, stats = attention.attention_forward(q, k, v, None, None, 0.0, True, D ** -0.5, 0)
attention.attention_backward(g, q, k, v, out, stats, None, None, 0.0, True, D ** -0.5, 0, False)
"""


def _env(**kw):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTNN_TRITON_RECORD")}
    return dict(env, **kw)


def _record_and_compile(tmp_path, script, arch):
    """Runs ``script`` under the interpreter, recording its launches for ``arch``; compiles them for ``arch``.
    Returns the recorded entries."""
    path = tmp_path / "launches.jsonl"
    rec = subprocess.run([sys.executable, "-c", script, str(path)], env=_env(TRITON_INTERPRET="1"),
                         capture_output=True, text=True, timeout=600)
    assert rec.returncode == 0, rec.stderr[-3000:]
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    aot = subprocess.run([sys.executable, "-m", "fastnn.kernels.aot", "--recorded", str(path), "--arch", str(arch)],
                         env=_env(), capture_output=True, text=True, timeout=900)
    assert aot.returncode == 0, aot.stdout[-4000:] + aot.stderr[-2000:]
    n = len({json.dumps(e, sort_keys=True) for e in entries})
    assert f"aot: {n} compilations, 0 failure(s)" in aot.stdout, aot.stdout[-4000:]
    return entries


def test_recorded_launches_compile_for_sm90(tmp_path):
    entries = _record_and_compile(tmp_path, LAUNCHES, 90)
    kernels = {e["kernel"] for e in entries}
    assert {"bce_with_logits_fwd_kernel", "bce_with_logits_bwd_kernel", "_attn_fwd", "_attn_bwd"} <= kernels
    bce_bwd = next(e for e in entries if e["kernel"] == "bce_with_logits_bwd_kernel")
    assert bce_bwd["constexprs"]["n"] == 1 and bce_bwd["arch"] is None  # what the JIT does with n = 1
    for e in entries:
        if e["kernel"] in ("_attn_fwd", "_attn_bwd"):
            assert e["arch"] == 90 and e["signature"]["KPM"] == "*i32"
            for half in ("seed_lo", "seed_hi"):  # typed, never a constant nor divisible by 16
                assert e["signature"][half] == "i32" and half not in e["divisible"]
            assert e["constexprs"]["UPCAST"] is False and e["constexprs"]["BLOCK_M"] in (16, 32)


def test_float64_head_dim_256_backward_fits_an_a100(tmp_path):
    entries = _record_and_compile(tmp_path, LAUNCHES_SM80, 80)
    bwd = [e for e in entries if e["kernel"] == "_attn_bwd"]
    assert bwd and all(e["arch"] == 80 and e["constexprs"]["KV_IN_LOOP"] for e in bwd)
