"""Runs the persistent float16 / bfloat16 LSTM layer kernels of csrc/cuda/lstm.cu (one cooperative launch for the
whole recurrence, W_hh's slices in shared memory, mma.m16n8k16, grid.sync() between steps) on the CPU, in the
emulator of prelude.h (a std::thread per CUDA thread, every block at once for the grid barrier), and compares the
forward's h, c and activated gates and the backward's gate, h0 and c0 gradients with a float64 recurrence. The
kernel text is taken from lstm.cu as it is, so what runs here is the code the GPU compiles.

    python tools/cuda_emu/lstm.py [--tsan] [--eager] [--quick]
      --tsan   ThreadSanitizer instead of ASan + UBSan (shared-memory races; with --eager, a stage refilled early)
      --eager  cp.async copies land when issued (default: at cp.async.wait_group, where a missing wait shows)
Each case names its tile sizes (NT) itself; on a GPU the host code picks them from the device.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

import emu


def kernel_code() -> str:
    between = emu.section("lstm.cu")
    return ('#include "prelude.h"\nnamespace fastnn::cuda {\n'
            'inline float exp_(float x) { return std::exp(x); }\ninline double exp_(double x) { return std::exp(x); }\n'
            'constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }\n'
            + between("// float: the approximate divide", "// pre may alias act")
            + between("// ---- The persistent layer kernels", "// Enough blocks to fill any current GPU")
            + '}\n#include "lstm_driver.inc"\n')


def reference(gx, w, h0, c0, lengths, reverse):
    """float64 recurrence from the gates' input part gx [T, B, 4H]: hs, cs [T, B, H], the activated gates."""
    T = gx.shape[0]
    h, c = h0, c0
    hs, cs, acts = [None] * T, [None] * T, [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        i, f, g, o = (gx[t] + h @ w.t()).chunk(4, 1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        cn = f * c + i * g
        hn = o * cn.tanh()
        if lengths is not None:
            m = (t < lengths)[:, None]
            cn, hn = torch.where(m, cn, c), torch.where(m, hn, h)
        h, c = hn, cn
        hs[t], cs[t], acts[t] = h, c, torch.cat([i, f, g, o], 1)
    return torch.stack(hs), torch.stack(cs), torch.stack(acts)


def case(exe, dtype, nt_fwd, nt_bwd, T, B, H, reverse=False, with_lengths=False, kc=0, label=""):
    """One forward and backward; nt_*: the kernels' NT, kc: the chunk width (0: the host code's choice)."""
    gen = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    gx, w, h0, c0 = r(T, B, 4 * H), r(4 * H, H, scale=H ** -0.5), r(B, H), r(B, H)
    dhs, dcs = r(T, B, H), r(T, B, H)
    lengths = None
    if with_lengths:
        lengths = torch.randint(0, T + 1, (B,), generator=gen)
        lengths[0] = T
    d = tempfile.mkdtemp(prefix="case_", dir=os.path.dirname(exe))

    def put(name, t):
        (t.contiguous().view(torch.int16) if t.dtype == dtype else t.contiguous()).numpy().tofile(f"{d}/{name}.bin")

    def get(name, shape):
        return torch.from_numpy(np.fromfile(f"{d}/{name}.out", dtype=np.int16)).view(dtype).view(shape)

    def run(mode, nt):
        emu.run([exe, d, mode, "b" if dtype == torch.bfloat16 else "h", nt, T, B, H, int(reverse),
                 int(lengths is not None), kc], label, mode)

    for name, t in (("w", w), ("h0", h0), ("c0", c0), ("act", gx)):
        put(name, t)
    if lengths is not None:
        put("len", lengths)
    run("fwd", nt_fwd)
    hs, cs, act = get("hs", (T, B, H)), get("cs", (T, B, H)), get("act", (T, B, 4 * H))

    leaves = [t.double().requires_grad_() for t in (gx, h0, c0)]
    want_hs, want_cs, want_act = reference(leaves[0], w.double(), leaves[1], leaves[2], lengths, reverse)
    tol = 3e-2 if dtype == torch.bfloat16 else 4e-3  # a few ulps of O(1) values: index bugs give O(1) errors
    live = torch.ones(T, B, dtype=torch.bool) if lengths is None else torch.arange(T)[:, None] < lengths
    errs = {"hs": (hs.double() - want_hs).abs().max().item(), "cs": (cs.double() - want_cs).abs().max().item(),
            "act": (act.double() - want_act)[live].abs().max().item() if live.any() else 0.0}
    bounds = {k: tol * max(1.0, v.abs().max().item()) for k, v in (("hs", want_hs), ("cs", want_cs), ("act", want_act))}

    for name, t in (("dhs", dhs), ("dcs", dcs), ("cs", cs), ("act", act)):
        put(name, t)
    run("bwd", nt_bwd)
    got = [get("dgx", (T, B, 4 * H)), get("dh", (B, H)), get("dc", (B, H))]
    grads = torch.autograd.grad((want_hs, want_cs), leaves, (dhs.double(), dcs.double()))
    for name, a, g in zip(("dgx", "dh0", "dc0"), got, grads):
        errs[name] = (a.double() - g).abs().max().item()
        bounds[name] = 3 * tol * max(1.0, g.abs().max().item())
    subprocess.run(["rm", "-rf", d])
    ok = all(errs[k] <= bounds[k] for k in errs)
    print(f"{'ok ' if ok else 'BAD'} {label:44s} " + " ".join(f"{k} {v:.1e}" for k, v in errs.items()), flush=True)
    return ok


def cases(exe, quick):
    h, bf = torch.float16, torch.bfloat16
    yield lambda: case(exe, h, 8, 1, 5, 1, 40, kc=64,
                       label="B1 H40: k tiles over 8 warps, 4 a chunk, 3 bwd chunks")
    yield lambda: case(exe, bf, 2, 2, 4, 17, 24, reverse=True, with_lengths=True, kc=64,
                       label="bf16 B17 H24 reverse lengths, partial bwd block, 2 chunks")
    if quick:
        return
    yield lambda: case(exe, h, 8, 1, 3, 40, 72, with_lengths=True, kc=64,
                       label="B40 H72: partial fwd block, 2 + 5 chunks")
    yield lambda: case(exe, bf, 8, 2, 3, 7, 136, with_lengths=True, kc=128,
                       label="B7 H136: 2 + 5 chunks of 128, partial last")
    yield lambda: case(exe, h, 1, 1, 2, 1, 8, label="B1 H8: one chunk each")
    yield lambda: case(exe, bf, 4, 4, 2, 128, 16, reverse=True, label="B128: 8 row tiles, KS 1")


if __name__ == "__main__":
    sys.exit(emu.main("lstm", __doc__, kernel_code, cases))
