"""Runs the float16 / bfloat16 tensor-core attention kernels of csrc/cuda/attention.cu on the CPU, in an emulator
(prelude.h: a std::thread per CUDA thread, warp collectives and mma.m16n8k16 per the PTX fragment layouts),
and compares forward output, row statistics and gradients with fastnn.reference. The kernel text is taken from
attention.cu as it is (score(), Tile, the tensor-core section), so what runs here is the code the GPU compiles.

    python tools/cuda_emu/attention.py [--tsan] [--eager] [--quick]
      --tsan   build with ThreadSanitizer instead of ASan + UBSan: shared-memory races between threads (combine
               with --eager, where cp.async lands when issued and a buffer refilled too early shows)
      --eager  cp.async copies land when issued (default: at cp.async.wait_group, where a missing wait shows)
Needs g++ with C++20 and the torch headers (the CPU venv's). Emulation is slow: shapes are small.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

import emu

sys.path.insert(0, emu.ROOT)
import fastnn.reference as R  # noqa: E402


def kernel_code() -> str:
    between = emu.section("attention.cu")
    return ('#include "prelude.h"\n#include "attention.h"\nnamespace fastnn::cuda {\nusing attention::Params;\n'
            + between("// Score of query i and key j", "// rows [r0, r0 + kTile)")
            + between("struct Tile {", "inline dim3 tile_grid")
            + between("// ---- Forward on tensor cores", "// The padded head dim of the tensor-core kernels")
            + '}\n#include "attention_driver.inc"\n')


def head_dim(D, Dv):
    w = max(D, Dv)
    return next(h for h in (32, 64, 96, 128, 256) if w <= h)


def case(exe, dtype, B, H, Hk, Lq, Lk, D, Dv, causal=False, mask=None, kpm=None, dropout=0.0, seed=12345, vec=None,
         label=""):
    """One call forward (and backward for padded head dims <= 128); returns whether every check held."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, dO = (torch.randn(*s, generator=gen).to(dtype) for s in
                   ((B, H, Lq, D), (B, Hk, Lk, D), (B, Hk, Lk, Dv), (B, H, Lq, Dv)))
    scale = D ** -0.5
    vec = D % 8 == 0 and Dv % 8 == 0 if vec is None else vec
    d = tempfile.mkdtemp(prefix="case_", dir=os.path.dirname(exe))
    for name, t in (("q", q), ("k", k), ("v", v), ("do", dO)):
        t.contiguous().view(torch.int16).numpy().tofile(f"{d}/{name}.bin")
    madd, mst, mask_n, learned = None, [0] * 4, 0, mask is not None and mask.dtype != torch.bool
    if mask is not None:  # the op's additive float32 mask at its own (broadcast) shape
        madd = mask.float() if learned else torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
        madd = madd.reshape((1,) * (4 - madd.dim()) + tuple(madd.shape)).contiguous()
        mst = [0 if madd.shape[i] == 1 else madd.stride(i) for i in range(4)]
        madd.numpy().tofile(f"{d}/mask.bin")
        mask_n = madd.numel()
    if kpm is not None:
        kpm.to(torch.uint8).numpy().tofile(f"{d}/kpm.bin")
    hd = head_dim(D, Dv)

    def run(mode):
        emu.run([exe, d, mode, "b" if dtype == torch.bfloat16 else "h", hd, B, H, Hk, Lq, Lk, D, Dv, int(causal),
                 repr(scale), mask_n, *mst, int(kpm is not None), repr(dropout), seed, int(vec),
                 mask_n if learned else 0, *mst], label, mode)

    def load(name, shape, dt):
        raw = np.fromfile(f"{d}/{name}.out", dtype=np.int16 if dt in (torch.float16, torch.bfloat16) else np.float32)
        return torch.from_numpy(raw).view(dt).view(shape)

    run("fwd")
    o, stats = load("o", (B, H, Lq, Dv), dtype), load("stats", (2, B, H, Lq), torch.float32)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    md = madd.double().requires_grad_() if learned else (None if madd is None else madd.double())
    ref = R.scaled_dot_product_attention(qd, kd, vd, md, dropout, causal, scale, kpm, seed)
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3  # a few ulps of O(1) values: index bugs give O(1) errors
    msg, ok = f"fwd {(o.double() - ref).abs().max().item():.1e}", (o.double() - ref).abs().max().item() <= tol
    with torch.no_grad():  # stats: (row max, log-sum) of the masked scores, (+inf, 0) for a fully masked row
        s = qd @ kd.repeat_interleave(H // Hk, 1).transpose(-1, -2) * scale
        if md is not None:
            s = torch.where(md.expand_as(s) == float("-inf"), float("-inf"), s + md)
        if kpm is not None:
            s = s.masked_fill(kpm[:, None, None, :], float("-inf"))
        if causal:
            s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool).triu(1), float("-inf"))
        m = s.amax(-1)
        dead = m == float("-inf")
        log_l = (s - m.masked_fill(dead, 0)[..., None]).exp().sum(-1).log()
        want = torch.stack([m.masked_fill(dead, float("inf")), log_l.masked_fill(dead, 0)])
        se = (stats.double() - want).nan_to_num(0).abs().max().item()
        ok = ok and se < 1e-4 and torch.equal(stats.isinf(), want.isinf())
        msg += f" stats {se:.1e}"
    if hd <= 128:
        delta = (dO.float() * o.float()).sum(-1)
        stats.numpy().tofile(f"{d}/stats.bin")
        delta.numpy().tofile(f"{d}/delta.bin")
        run("bwd")
        outs = [load("dq", (B, H, Lq, D), torch.float32) * scale, load("dk", (B, Hk, Lk, D), dtype),
                load("dv", (B, Hk, Lk, Dv), dtype)]
        leaves = [qd, kd, vd]
        if learned:
            outs.append(load("dmask", tuple(madd.shape), torch.float32))
            leaves.append(md)
        grads = torch.autograd.grad(ref, leaves, dO.double(), allow_unused=True)
        for name, a, g in zip(("dq", "dk", "dv", "dmask"), outs, grads):
            g = torch.zeros_like(a, dtype=torch.float64) if g is None else g
            e = (a.double() - g).abs().max().item()
            ok = ok and e <= 3 * tol * max(g.abs().max().item(), 1.0)
            msg += f" {name} {e:.1e}"
    subprocess.run(["rm", "-rf", d])
    print(f"{'ok ' if ok else 'BAD'} {label:34s} {msg}", flush=True)
    return ok


def cases(exe, quick):
    h, bf = torch.float16, torch.bfloat16
    g = torch.Generator().manual_seed(1)
    kpm = torch.rand(2, 70, generator=g) < 0.3
    kpm[1] = True  # batch 1 pads every key: fully masked rows
    full = torch.randn(2, 2, 37, 70, generator=g).masked_fill(torch.rand(2, 2, 37, 70, generator=g) < 0.2, float("-inf"))
    yield lambda: case(exe, h, 1, 1, 1, 64, 64, 64, 64, label="D64 one tile")
    yield lambda: case(exe, h, 2, 4, 2, 37, 70, 48, 24, causal=True, kpm=kpm, dropout=0.2,
                       mask=torch.randn(1, 4, 37, 70, generator=g), label="GQA, Dv<D, every mask, dropout")
    if quick:
        return
    yield lambda: case(exe, h, 1, 2, 2, 70, 130, 32, 32, causal=True, label="D32 causal, ragged")
    yield lambda: case(exe, bf, 1, 1, 1, 129, 65, 96, 96, label="D96 bf16, Lq > Lk")
    yield lambda: case(exe, h, 1, 1, 1, 65, 70, 128, 128, causal=True, label="D128 causal")
    yield lambda: case(exe, h, 1, 1, 1, 70, 97, 256, 200, causal=True, label="D256 (forward), Dv 200")
    yield lambda: case(exe, h, 1, 1, 1, 17, 100, 80, 80, causal=True, label="D80 padded to 96")
    yield lambda: case(exe, h, 1, 1, 1, 17, 130, 36, 36, label="D36: plain loads, 3 key tiles")
    yield lambda: case(exe, h, 1, 1, 1, 17, 33, 64, 64, vec=False, label="D64, plain loads")
    yield lambda: case(exe, bf, 1, 3, 1, 9, 70, 16, 100, label="MQA, Dv > D")
    yield lambda: case(exe, h, 1, 1, 1, 1, 1, 64, 64, label="L = 1")
    yield lambda: case(exe, h, 2, 2, 2, 37, 70, 32, 32, kpm=kpm, label="key padding, all-padded batch")
    yield lambda: case(exe, h, 2, 2, 2, 37, 70, 32, 32, mask=torch.rand(37, 70, generator=g) > 0.3, causal=True,
                       label="bool 2-d mask, causal")
    yield lambda: case(exe, h, 2, 2, 2, 37, 70, 64, 64, mask=full, label="learned full mask with -inf")
    yield lambda: case(exe, bf, 2, 2, 2, 37, 70, 64, 64, mask=torch.randn(2, 1, 1, 70, generator=g), kpm=kpm,
                       causal=True, label="learned per-key mask + kpm")
    yield lambda: case(exe, bf, 1, 4, 2, 200, 200, 64, 64, causal=True, dropout=0.1, label="L200 causal dropout GQA")
    yield lambda: case(exe, h, 1, 1, 1, 5, 7, 32, 32, dropout=1.0, label="dropout 1")


if __name__ == "__main__":
    sys.exit(emu.main("attention", __doc__, kernel_code, cases))
