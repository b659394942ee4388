"""Runs every CUDA op of fastnn through its CUDA source on the CPU (library.py: the .cu files compiled whole against
the emulator) and compares each result with fastnn's C++ CPU kernels - the same schema, the same inputs. The cases
walk the launchers' paths: short rows several to a block, a block per row, the shared-memory tail, the two-pass
online rows, non-last dims, unaligned rows, every dtype, masks, dropout, Lq != Lk, grouped heads, padded head dims,
the tensor-core kernels, the persistent LSTM and the step loop. Bad targets must be reported as on the CPU. With
the ASan build (the default), a kernel reading or writing outside a tensor stops the run with ASan's report; with
--sanitizer tsan, two threads of a block touching the same shared memory without a barrier between them do.

    python tools/cuda_emu/checks.py [--quick] [--sanitizer asan|tsan|none] [-k SUBSTRING] [--fuzz N --seed S]
                                    [--past-int32]
    EMU_CP_EAGER=1 ...   cp.async copies land when issued (default: at the wait), see prelude.h

Needs fastnn's CPU build importable (the repository's .venv). Emulation runs a thread per CUDA thread: shapes are
small, and the whole run takes minutes.
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import library  # noqa: E402


def _reexec_with_sanitizer(sanitizer: str, args) -> None:
    """A sanitized library loads only into a process whose first library is the sanitizer's runtime."""
    if sanitizer == "none" or os.environ.get("FASTNN_CUDA_EMU_PRELOADED") == sanitizer:
        return
    libs = {"asan": ["libasan.so", "libubsan.so"], "tsan": ["libtsan.so"]}[sanitizer]
    paths = [subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
             for lib in libs]
    env = dict(os.environ, FASTNN_CUDA_EMU_PRELOADED=sanitizer, LD_PRELOAD=" ".join(paths),
               ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_odr_violation=0",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1",
               TSAN_OPTIONS="halt_on_error=1:abort_on_error=1:report_signal_unsafe=0")
    if sanitizer == "tsan":  # torch's own OpenMP threads synchronize in ways TSan does not see: one thread
        env["OMP_NUM_THREADS"] = "1"
    os.execve(sys.executable, [sys.executable, *args], env)


TOL = {"float64": 1e-9, "float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}


def kernel_names(so: str) -> dict:
    """{offset: short name} of the library's functions (its symbol table: the kernels are local symbols)."""
    out = subprocess.run(["nm", "-C", "--defined-only", so], capture_output=True, text=True, check=True).stdout
    names = {}
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "tT":
            name = parts[2].replace("(anonymous namespace)::", "").replace("fastnn::cuda::", "")
            name = name.removeprefix("void ")
            depth = 0
            for i, ch in enumerate(name):  # up to the parameter list, outside template arguments
                depth += (ch == "<") - (ch == ">")
                if ch == "(" and depth == 0:
                    name = name[:i]
                    break
            names[int(parts[0], 16)] = name
    return names


class Checker:
    def __init__(self, filt: str | None, so: str):
        import torch

        self.torch = torch
        self.filt = filt
        self.names = kernel_names(so)
        self.launched: set = set()
        self.ok = self.bad = 0
        self.gen = torch.Generator().manual_seed(0)

    def randn(self, *shape, dtype=None, scale=1.0):
        t = self.torch.randn(*shape, generator=self.gen, dtype=self.torch.float64) * scale
        return t.to(dtype or self.torch.float32)

    def unaligned(self, t):
        """t's values in a contiguous tensor starting one element past a 16-byte boundary."""
        flat = self.torch.empty(t.numel() + 1, dtype=t.dtype)
        out = flat[1:].view(t.shape)
        out.copy_(t)
        return out

    def compare(self, label: str, op: str, args: list, tol: float | None = None, env=None,
                mutated: int | None = None, defined: dict | None = None) -> None:
        """Runs torch.ops.fastnn_emu.<op> and torch.ops.fastnn.<op> on copies of args; every output tensor (or,
        for an in-place op, args[mutated]) must match within tol (relative to the CPU result's largest value).
        defined: {output index: boolean mask broadcast to it} where an output's other elements are unspecified."""
        if self.filt and self.filt not in f"{op} {label}":
            return
        torch = self.torch
        t0 = time.time()
        with mock.patch.dict(os.environ, env or {}):
            copies = [[a.clone() if isinstance(a, torch.Tensor) else a for a in args] for _ in range(2)]
            outs = []
            for lib, cargs in (("fastnn_emu", copies[0]), ("fastnn", copies[1])):
                r = getattr(getattr(torch.ops, lib), op)(*cargs)
                if mutated is not None:
                    r = cargs[mutated]
                outs.append(list(r) if isinstance(r, (tuple, list)) else [r])
        errs = []
        good = len(outs[0]) == len(outs[1])
        kernels = self.kernels()
        for i, (a, b) in enumerate(zip(*outs)):
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or b.numel() == 0:
                continue
            if a.shape != b.shape or a.dtype != b.dtype:
                errs.append(f"out{i} {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
                good = False
                continue
            if not b.is_floating_point():
                same = torch.equal(a, b)
                errs.append(f"out{i} {'equal' if same else 'DIFFERS'}")
                good &= same
                continue
            fa, fb = a.double(), b.double()
            if defined and i in defined:
                keep = defined[i].expand_as(fb)
                fa, fb = fa[keep], fb[keep]
            nan_a, nan_b = fa.isnan(), fb.isnan()
            if not torch.equal(nan_a, nan_b):
                errs.append(f"out{i} NaN pattern differs")
                good = False
                continue
            fa, fb = fa.masked_fill(nan_a, 0), fb.masked_fill(nan_b, 0)
            finite = fb.isfinite()
            if not torch.equal(fa.isfinite(), finite) or not torch.equal(fa[~finite], fb[~finite]):
                errs.append(f"out{i} infinities differ")
                good = False
                continue
            err = (fa - fb)[finite].abs().max().item() if finite.any() else 0.0
            # relative to the largest value (a softmax row of 10^5 has values near 10^-5, where a bound of O(1)
            # would pass a wrong element), floored at 10^-3 for outputs that are rounding noise around zero (the
            # gradients of attention over a single key)
            ref = max(fb[finite].abs().max().item() if finite.any() else 0.0, 1e-3)
            bound = (tol if tol is not None else TOL[str(b.dtype).split(".")[-1]]) * ref
            errs.append(f"out{i} {err:.1e}")
            good &= err <= bound
        self._report(good, label, op, ", ".join(errs) + f" [{kernels}]", time.time() - t0)

    def kernels(self) -> str:
        """The kernels launched since the last call, by name."""
        seen = []
        for entry in self.torch.ops.fastnn_emu.launches():
            site, offset = entry.rsplit("@", 1)
            name = self.names.get(int(offset), site)
            if name not in seen:
                seen.append(name)
        self.launched.update(seen)
        return " ".join(seen)

    def raises(self, label: str, op: str, args: list, needle: str) -> None:
        """Both libraries must raise an error containing `needle` (a bad input reported, never read)."""
        if self.filt and self.filt not in f"{op} {label}":
            return
        t0 = time.time()
        msgs = []
        for lib in ("fastnn_emu", "fastnn"):
            try:
                getattr(getattr(self.torch.ops, lib), op)(*args)
                msgs.append(None)
            except (RuntimeError, IndexError, ValueError) as e:
                msgs.append(str(e).splitlines()[0])
        good = all(m is not None and needle in m for m in msgs)
        self._report(good, label, op, f"raises: {msgs[0]!r}", time.time() - t0)

    def _report(self, good, label, op, detail, secs):
        self.ok += good
        self.bad += not good
        print(f"{'ok ' if good else 'BAD'} {op:30s} {label:46s} {detail} ({secs:.1f} s)", flush=True)


# Each op: check_<op>(c, **config) runs one configuration through every kernel of the op; <op>_configs(quick) are
# the fixed configurations, chosen to reach each launcher path; draw_<op>(rng) draws a random one (--fuzz).
def check_softmax(c: Checker, shape, dt, dim, what="", unaligned=False):
    torch = c.torch
    x = c.randn(*shape, dtype=dt, scale=3)
    x.select(dim, -1).copy_(x.amax(dim) + 2)  # each row's largest element last: a tail slot skipped shows
    if unaligned:
        x = c.unaligned(x)
    for log in (False, True):
        lab = f"{'log ' if log else ''}{dt} {tuple(shape)} dim {dim}{' unaligned' if unaligned else ''} {what}"
        c.compare(lab, "softmax_fwd", [x, dim, log])
        y = torch.ops.fastnn.softmax_fwd(x, dim, log)
        dy = c.randn(*shape, dtype=dt)
        c.compare(lab, "softmax_bwd", [c.unaligned(dy) if unaligned else dy, y, dim, log])


def softmax_configs(torch, quick):
    f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
    cfgs = [((7, 97), f32, -1, "short rows, a group each, unaligned n"), ((3, 1025), f16, -1, "block per row"),
            ((2, 40000), f32, -1, "fwd shared-memory tail, bwd tail"), ((1, 150001), f32, -1, "online rows"),
            ((4, 33, 5), f64, 1, "non-last dim"), ((3, 200, 40), bf16, 1, "non-last dim, y split")]
    if not quick:
        cfgs += [((2, 128256), bf16, -1, "bf16 128256: fwd tail"), ((1, 20000), f32, -1, "bwd tail"),
                 ((5, 4096), bf16, -1, "cached, vectorized"), ((1, 1), f32, -1, "one element"),
                 ((6, 129), f64, -1, "float64 short rows"), ((2, 70000), f16, -1, "fp16 long row")]
    out = [dict(shape=sh, dt=dt, dim=dim, what=w) for sh, dt, dim, w in cfgs]
    return out + [dict(shape=(3, 4096), dt=f32, dim=-1, what="16-byte rows, storage not", unaligned=True)]


def draw_softmax(torch, rng):
    nd = rng.randint(1, 3)
    shape = [rng.choice([1, 2, 3, 5, 7]) for _ in range(nd - 1)]
    n = rng.choice([rng.randint(1, 300), rng.randint(300, 5000), rng.randint(5000, 80000)])
    dim = rng.randrange(nd)
    shape.insert(dim, n)
    if shape[dim] > 5000 and nd > 1 and dim != nd - 1:
        shape[dim] = rng.randint(1, 500)  # long non-last dims: slow to emulate, no other path
    return dict(shape=tuple(shape), dt=_dtype(torch, rng), dim=dim - nd if rng.random() < 0.5 else dim,
                unaligned=rng.random() < 0.2)


def check_cross_entropy(c: Checker, shape, dt, what="", probs=False):
    torch = c.torch
    C = shape[1]
    x = c.randn(*shape, dtype=dt, scale=2)
    x.select(1, -1).copy_(x.amax(1) + 2)  # each row's largest logit last: a tail slot skipped shows
    if probs:
        p = torch.softmax(c.randn(*shape), 1).to(dt)
        lab = f"{dt} {tuple(shape)} probability targets {what}"
        c.compare(lab, "cross_entropy_fwd", [x, p, None, -100, 0.0, False])
        loss, stats = torch.ops.fastnn.cross_entropy_fwd(x, p, None, -100, 0.0, False)
        c.compare(lab, "cross_entropy_bwd", [c.randn(*loss.shape), x, p, None, stats, -100, 0.0])
        return
    t = torch.randint(0, C, (shape[0],) + tuple(shape[2:]), generator=c.gen)
    t.view(-1)[0] = -100  # an ignored row
    w = (c.randn(C).abs() + 0.1).to(dt)
    for weight, ls in ((None, 0.0), (w, 0.1)):
        lab = f"{dt} {tuple(shape)} {what}{' weight ls 0.1' if weight is not None else ''}"
        c.compare(lab, "cross_entropy_fwd", [x, t, weight, -100, ls, False])
        loss, stats = torch.ops.fastnn.cross_entropy_fwd(x, t, weight, -100, ls, False)
        g = c.randn(*loss.shape)
        c.compare(lab, "cross_entropy_bwd", [g, x, t, weight, stats, -100, ls])
        c.compare(lab, "cross_entropy_bwd_inplace", [g, x, t, weight, stats, -100, ls], mutated=1)
        c.compare(lab, "cross_entropy_fwd_grad", [x, t, weight, g, -100, ls])


def cross_entropy_configs(torch, quick):
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    cfgs = [((7, 97), f32, "short rows"), ((3, 5000), bf16, "bf16 5000"), ((2, 11, 3), f32, "class dim not last")]
    if not quick:
        cfgs += [((3, 40000), f32, "long rows"), ((4, 1025), f16, "fp16 1025"), ((1, 1), f32, "one class")]
    out = [dict(shape=sh, dt=dt, what=w) for sh, dt, w in cfgs]
    return out + [dict(shape=sh, dt=dt, what=w, probs=True) for sh, dt, w in cfgs]


def draw_cross_entropy(torch, rng):
    C = rng.choice([rng.randint(1, 300), rng.randint(300, 40000)])
    shape = (rng.randint(1, 9), C) + ((rng.randint(1, 4),) if rng.random() < 0.25 else ())
    return dict(shape=shape, dt=_dtype(torch, rng, f64=False), probs=rng.random() < 0.25)


def check_cross_entropy_bad_target(c: Checker):
    torch = c.torch
    x, bad = c.randn(5, 9), torch.tensor([0, 3, 9, 1, 2])
    c.raises("target 9 of 9 classes", "cross_entropy_fwd", [x, bad, None, -100, 0.0, False], "arget")
    c.raises("target 9 of 9 classes", "cross_entropy_fwd_grad", [x, bad, None, torch.ones(5), -100, 0.0], "arget")


def check_bce(c: Checker, shape, dt, weights="none", unaligned=False):
    """weights: none, row (weight and pos_weight over the last dim) or full (a weight of the input's shape)."""
    torch = c.torch
    x, y = c.randn(*shape, dtype=dt, scale=3), torch.rand(*shape, generator=c.gen).to(dt)
    if unaligned:
        x, y = c.unaligned(x), c.unaligned(y)
    n = shape[-1]
    weight = pos = None
    if weights == "row":
        weight, pos = c.randn(n, dtype=dt).abs(), c.randn(n, dtype=dt).abs() + 0.5
    elif weights == "full":
        weight = c.randn(*shape, dtype=dt)
    for red in (0, 1, 2):
        lab = f"{dt} {tuple(shape)} red {red} weights {weights}{' unaligned' if unaligned else ''}"
        c.compare(lab, "bce_with_logits_fwd", [x, y, weight, pos, red])
        g = c.randn(*shape, dtype=dt) if red == 0 else c.randn((), dtype=dt)
        c.compare(lab, "bce_with_logits_bwd", [g, x, y, weight, pos, red, True, True])


def bce_with_logits_configs(torch, quick):
    f32, bf16, f64 = torch.float32, torch.bfloat16, torch.float64
    shapes = [((7, 97), f32), ((1025,), f64), ((3, 4099), bf16)] + ([((1,), f32), ((64, 1000), f32)] if not quick else [])
    out = [dict(shape=sh, dt=dt, weights=w) for sh, dt in shapes for w in ("none", "row", "full")]
    return out + [dict(shape=(5, 64), dt=f32, unaligned=True)]


def draw_bce_with_logits(torch, rng):
    shape = tuple(rng.choice([1, 3, 7, 64, 1000]) for _ in range(rng.randint(0, 2))) + (rng.randint(1, 5000),)
    return dict(shape=shape, dt=_dtype(torch, rng), weights=rng.choice(["none", "row", "full"]),
                unaligned=rng.random() < 0.2)


def check_linear_cross_entropy(c: Checker, dt, N, D, V, chunk):
    torch = c.torch
    x, w, b = c.randn(N, D, dtype=dt), c.randn(V, D, dtype=dt, scale=D ** -0.5), c.randn(V, dtype=dt)
    t = torch.randint(0, V, (N,), generator=c.gen)
    t[N // 2] = -100
    cw = (c.randn(V).abs() + 0.1).to(dt)
    lab = f"{dt} N{N} D{D} V{V} chunk {chunk}"
    c.compare(lab, "linear_cross_entropy_fwd", [x, w, b, t, cw, -100, 0.1, chunk])
    loss, stats = torch.ops.fastnn.linear_cross_entropy_fwd(x, w, b, t, cw, -100, 0.1, chunk)
    g = c.randn(*loss.shape)
    c.compare(lab, "linear_cross_entropy_bwd", [g, x, w, b, t, cw, stats, -100, 0.1, chunk, [True, True, True]])
    c.compare(lab, "linear_cross_entropy_fwd_grad", [x, w, b, t, cw, g, -100, 0.1, chunk, [True, True, True]])


def linear_cross_entropy_configs(torch, quick):
    cfgs = [(torch.float32, 37, 24, 97, 16), (torch.bfloat16, 29, 32, 130, 8)]
    cfgs += [(torch.float16, 9, 16, 40, 64)] if not quick else []
    return [dict(dt=dt, N=N, D=D, V=V, chunk=ch) for dt, N, D, V, ch in cfgs]


def draw_linear_cross_entropy(torch, rng):
    return dict(dt=_dtype(torch, rng, f64=False), N=rng.randint(1, 40), D=rng.randint(1, 64),
                V=rng.randint(1, 400), chunk=rng.randint(1, 64))


def check_attention(c: Checker, dt, B, H, Hk, Lq, Lk, D, Dv, causal=False, mask=None, kpm=False, p=0.0, what="",
                    sm=90):
    """mask: None, "bool" (its additive form, broadcast over batch and heads) or "float" (per head, learned);
    sm: the emulated device's compute capability (below 80, half types take the simple kernels)."""
    torch = c.torch
    q, k, v = c.randn(B, H, Lq, D, dtype=dt), c.randn(B, Hk, Lk, D, dtype=dt), c.randn(B, Hk, Lk, Dv, dtype=dt)
    am, mdt = None, torch.float64 if dt == torch.float64 else torch.float32  # a mask is in the accumulation type
    if mask == "bool":
        keep = torch.rand(1, 1, Lq, Lk, generator=c.gen) > 0.3
        am = torch.zeros(keep.shape, dtype=mdt).masked_fill(~keep, float("-inf"))
    elif mask == "float":
        am = c.randn(1, H, Lq, Lk, dtype=mdt)
    pad = torch.rand(B, Lk, generator=c.gen) > 0.8 if kpm else None
    scale = D ** -0.5
    lab = (f"{dt} B{B} H{H}/{Hk} L{Lq}x{Lk} D{D}/{Dv}{' causal' if causal else ''} mask {mask}"
           f"{' kpm' if kpm else ''} p {p}{f' sm_{sm}' if sm != 90 else ''} {what}")
    env = {"EMU_SM": str(sm)}
    c.compare(lab, "attention_fwd", [q, k, v, am, pad, p, causal, scale, 1234], env=env)
    out, stats = torch.ops.fastnn.attention_fwd(q, k, v, am, pad, p, causal, scale, 1234)
    do = c.randn(*out.shape, dtype=dt)
    c.compare(lab, "attention_bwd", [do, q, k, v, out, stats, am, pad, p, causal, scale, 1234, mask == "float"],
              env=env)


def attention_configs(torch, quick):
    f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
    # (dtype, B, H, Hk, Lq, Lk, D, Dv, causal, mask kind, key padding, dropout, label)
    cfgs = [(f32, 2, 2, 2, 17, 17, 32, 32, False, None, False, 0.0, "float32 simple kernel"),
            (bf16, 1, 2, 2, 33, 33, 64, 64, True, None, False, 0.0, "bf16 tensor cores"),
            (f16, 2, 4, 2, 17, 40, 40, 24, False, "bool", True, 0.0, "fp16 GQA, Lq<Lk, padded head dims"),
            (bf16, 1, 2, 1, 20, 20, 64, 64, True, "float", False, 0.2, "bf16 dropout, learned mask")]
    if not quick:
        cfgs += [(f64, 1, 1, 1, 7, 5, 24, 16, True, "float", True, 0.1, "float64 Lq>Lk"),
                 (f16, 1, 1, 1, 1, 1, 128, 128, False, None, False, 0.0, "length 1"),
                 (bf16, 1, 1, 1, 65, 65, 256, 256, False, None, False, 0.0, "D256: forward on tensor cores"),
                 (f32, 1, 2, 2, 70, 70, 96, 96, True, "bool", True, 0.3, "float32 everything")]
    keys = ("dt", "B", "H", "Hk", "Lq", "Lk", "D", "Dv", "causal", "mask", "kpm", "p", "what")
    out = [dict(zip(keys, cfg)) for cfg in cfgs]
    # a pre-sm_80 GPU: half types on the simple kernels
    return out + [dict(dt=bf16, B=1, H=2, Hk=1, Lq=19, Lk=23, D=40, Dv=24, causal=True, mask="float", kpm=True,
                       p=0.2, what="simple kernels for half types", sm=75)]


def draw_attention(torch, rng):
    Hk = rng.randint(1, 2)
    return dict(dt=_dtype(torch, rng), B=rng.randint(1, 2), H=Hk * rng.randint(1, 2), Hk=Hk, Lq=rng.randint(1, 80),
                Lk=rng.randint(1, 80), D=rng.randint(1, 130), Dv=rng.randint(1, 130), causal=rng.random() < 0.4,
                mask=rng.choice([None, None, "bool", "float"]), kpm=rng.random() < 0.3,
                p=rng.choice([0.0, 0.0, 0.25]), sm=rng.choice([90, 90, 90, 75]))


def check_lstm_cell(c: Checker, dt, B, H):
    torch = c.torch
    gates, bias, cx = c.randn(B, 4 * H, dtype=dt), c.randn(4 * H, dtype=dt), c.randn(B, H, dtype=dt)
    lab = f"{dt} B{B} H{H}"
    c.compare(lab, "lstm_cell_fwd", [gates, bias, cx])
    hy, cy, act = torch.ops.fastnn.lstm_cell_fwd(gates, bias, cx)
    c.compare(lab, "lstm_cell_bwd", [c.randn(B, H, dtype=dt), c.randn(B, H, dtype=dt), act, cx])


def check_lstm(c: Checker, dt, T, B, I, H, lengths=False, reverse=False, mode="auto", what=""):
    """mode: FASTNN_LSTM_PERSISTENT (1: the persistent kernels where they apply, 0: the step loop, auto)."""
    torch = c.torch
    x, w_ih, w_hh = c.randn(T, B, I, dtype=dt), c.randn(4 * H, I, dtype=dt, scale=0.3), \
        c.randn(4 * H, H, dtype=dt, scale=H ** -0.5)
    bias, h0, c0 = c.randn(4 * H, dtype=dt), c.randn(B, H, dtype=dt), c.randn(B, H, dtype=dt)
    lens = None
    if lengths:
        lens = torch.randint(0, T + 1, (B,), generator=c.gen)
        lens[0] = T
    env = {"FASTNN_LSTM_PERSISTENT": mode}
    lab = f"{dt} T{T} B{B} I{I} H{H}{' lengths' if lengths else ''}{' reverse' if reverse else ''} mode {mode} {what}"
    # act (output 2) is unspecified past a row's length: the backward never reads it there
    live = None if lens is None else {2: (torch.arange(T)[:, None] < lens)[:, :, None]}
    c.compare(lab, "lstm_layer_fwd", [x, w_ih, bias, w_hh, h0, c0, lens, reverse], env=env, defined=live)
    hs, cs, act = torch.ops.fastnn.lstm_layer_fwd(x, w_ih, bias, w_hh, h0, c0, lens, reverse)
    c.compare(lab, "lstm_layer_bwd", [c.randn(T, B, H, dtype=dt), c.randn(T, B, H, dtype=dt), w_hh, c0, cs, act,
                                      lens, reverse], env=env)
    # no gradient for the cell states (a model reading only hs): grad_cs None
    c.compare(lab + " grad_cs None", "lstm_layer_bwd", [c.randn(T, B, H, dtype=dt), None, w_hh, c0, cs, act, lens,
                                                        reverse], env=env)


def lstm_configs(torch, quick):
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    cfgs = [(f32, 5, 3, 7, 12, True, False, "auto", "float32 step loop"),
            (bf16, 4, 17, 8, 24, True, True, "1", "bf16 persistent"),
            (f16, 3, 5, 16, 40, False, False, "0", "fp16 step loop forced")]
    if not quick:
        cfgs += [(f16, 3, 33, 8, 64, False, False, "1", "fp16 persistent B33 H64"),
                 (bf16, 2, 129, 8, 16, False, False, "auto", "bf16 B129: step loop")]
    keys = ("dt", "T", "B", "I", "H", "lengths", "reverse", "mode", "what")
    return [dict(zip(keys, cfg)) for cfg in cfgs]


def draw_lstm(torch, rng):
    H = rng.choice([8 * rng.randint(1, 8), rng.randint(1, 40)])
    return dict(dt=_dtype(torch, rng), T=rng.randint(1, 5), B=rng.choice([rng.randint(1, 40), rng.randint(100, 140)]),
                I=rng.randint(1, 20), H=H, lengths=rng.random() < 0.4, reverse=rng.random() < 0.4,
                mode=rng.choice(["auto", "1", "0"]))


def _dtype(torch, rng, f64=True):
    return rng.choice([torch.float32, torch.float16, torch.bfloat16] + ([torch.float64] if f64 else []))


def large_grid_cases(c: Checker):
    """Grids past what a dimension of a launch holds (y at most 65,535): only the first and last 4 blocks run
    (EMU_SAMPLE_BLOCKS), and the elements those blocks own are compared - a grid put on the wrong axis is refused
    at launch, a wrong block-to-data mapping leaves the compared elements unwritten."""
    torch = c.torch
    env = {"EMU_SAMPLE_BLOCKS": "4"}
    heads = 70000  # B * H past 65,535, one query row each: one block per head in every attention kernel
    ends = torch.zeros(heads, dtype=torch.bool)
    ends[:4] = ends[-4:] = True
    for dt in (torch.float32, torch.bfloat16):
        q = c.randn(1, heads, 1, 8, dtype=dt)
        lab = f"{dt} B*H = {heads}, first and last 4 heads"
        c.compare(lab, "attention_fwd", [q, q, q, None, None, 0.0, False, 0.35, 7], env=env,
                  defined={0: ends[None, :, None, None], 1: ends[None, :, None]})
    outer = 70000  # softmax over dim 1 of [outer, 3, 2]: outer rides gridDim.y, at most 65,535, strided past it
    y = torch.arange(outer) % 65535
    owned = (y < 4) | (y >= 65535 - 4)
    x = c.randn(outer, 3, 2)
    c.compare(f"float32 [{outer}, 3, 2] dim 1, sampled blocks", "softmax_fwd", [x, 1, False], env=env,
              defined={0: owned[:, None, None]})


def past_int32_cases(c: Checker):
    """Tensors of more than 2**31 elements (4 GiB each in bfloat16; the run needs ~20 GiB): only the first and last
    two blocks of each launch run (EMU_SAMPLE_BLOCKS), and the rows those blocks own - the first and the last, whose
    offsets pass 2**31 - are compared with the CPU kernels run on those rows alone. An offset computed in 32 bits
    reads and writes the wrong addresses there (or outside the tensor: ASan's report)."""
    torch = c.torch
    bf16 = torch.bfloat16
    big = 2 ** 31 + 2 ** 20

    def fill(*shape):
        t = torch.empty(*shape, dtype=bf16)
        return t.normal_(generator=c.gen)

    def check(label, op, emu_out, cpu_out):
        """The sampled rows of the emulated outputs against the CPU kernels' outputs computed on them alone."""
        t0 = time.time()
        errs = [(a.double() - b.double()).abs().max().item() for a, b in zip(emu_out, cpu_out)]
        good = all(e <= TOL["bfloat16"] * b.double().abs().max().item() for e, b in zip(errs, cpu_out))
        c._report(good, label, op, " ".join(f"{e:.1e}" for e in errs) + f" [{c.kernels()}]", time.time() - t0)

    with mock.patch.dict(os.environ, {"EMU_SAMPLE_BLOCKS": "2"}):
        n = 32000
        rows = big // n + 1  # one row a block at this width
        lab = f"bf16 [{rows}, {n}]: {rows * n} elements"
        x = fill(rows, n)
        ends = torch.tensor([0, 1, rows - 2, rows - 1])
        y = torch.ops.fastnn_emu.softmax_fwd(x, -1, False)
        check(lab, "softmax_fwd", [y[ends]],
              [torch.ops.fastnn.softmax_fwd(x[ends], -1, False)])
        dy = fill(rows, n)
        dx = torch.ops.fastnn_emu.softmax_bwd(dy, y, -1, False)
        check(lab, "softmax_bwd", [dx[ends]],
              [torch.ops.fastnn.softmax_bwd(dy[ends], y[ends], -1, False)])
        del y, dy, dx
        t = torch.randint(0, n, (rows,), generator=c.gen)
        loss, stats = torch.ops.fastnn_emu.cross_entropy_fwd(x, t, None, -100, 0.1, False)
        cl, cs = torch.ops.fastnn.cross_entropy_fwd(x[ends], t[ends], None, -100, 0.1, False)
        check(lab, "cross_entropy_fwd", [loss[ends]], [cl])
        g = torch.ones(rows)
        dx = torch.ops.fastnn_emu.cross_entropy_bwd(g, x, t, None, stats, -100, 0.1)
        check(lab, "cross_entropy_bwd", [dx[ends]],
              [torch.ops.fastnn.cross_entropy_bwd(g[ends], x[ends], t[ends], None, cs, -100, 0.1)])
        del x, dx
        D, L = 64, big // 64 + 100  # one query sequence past 2**31 elements, 16 keys
        q, k, v = fill(1, 1, L, D), fill(1, 1, 16, D), fill(1, 1, 16, D)
        last = slice(L - 4, L)  # the simple kernel: a block has 4 or more query rows
        for sm in ("90", "75"):  # the tensor-core kernel, and the simple one a pre-sm_80 GPU runs
            with mock.patch.dict(os.environ, {"EMU_SM": sm}):
                out, st = torch.ops.fastnn_emu.attention_fwd(q, k, v, None, None, 0.0, False, 0.125, 1)
            co, cst = torch.ops.fastnn.attention_fwd(q[:, :, last].contiguous(), k, v, None, None, 0.0, False, 0.125, 1)
            check(f"bf16 query [1, 1, {L}, {D}] sm_{sm}: {L * D} elements", "attention_fwd",
                  [out[:, :, last], st[..., last]], [co, cst])
            del out, st
        del q, k, v
        # BCE: a grid-stride loop over 16-byte slots, block b owning slots s with (s // 256) % blocks == b (at most
        # 2048 blocks of 256 threads): the sampled blocks' slots of the last stride pass 2**31 elements.
        C = 4096
        R = big // C + 1
        x, y = fill(R, C), torch.rand(R, C, generator=c.gen).to(bf16)
        w, pw = fill(C).abs_(), fill(C).abs_() + 0.5
        slots, per = (R * C) // 8, 2048 * 256
        last = (slots - 1) // per * per
        owned = torch.cat([torch.arange(last + b * 256, min(last + (b + 1) * 256, slots)) for b in (0, 1)])
        idx = (owned[:, None] * 8 + torch.arange(8)).reshape(-1)
        assert idx.min() >= 2 ** 31
        xs, ys, cols = x.view(-1)[idx], y.view(-1)[idx], idx % C
        lab = f"bf16 [{R}, {C}] weight, pos_weight: elements past 2**31"
        out = torch.ops.fastnn_emu.bce_with_logits_fwd(x, y, w, pw, 0)
        check(lab, "bce_with_logits_fwd", [out.view(-1)[idx]],
              [torch.ops.fastnn.bce_with_logits_fwd(xs, ys, w[cols], pw[cols], 0)])
        del out
        g = torch.tensor(1.0, dtype=bf16)
        dx, _ = torch.ops.fastnn_emu.bce_with_logits_bwd(g, x, y, w, pw, 2, True, False)
        want, _ = torch.ops.fastnn.bce_with_logits_bwd(g, xs, ys, w[cols], pw[cols], 2, True, False)
        check(lab, "bce_with_logits_bwd", [dx.view(-1)[idx]], [want])


# (check, fixed configurations, random draw) of each op
OPS = {"softmax": (check_softmax, softmax_configs, draw_softmax),
       "cross_entropy": (check_cross_entropy, cross_entropy_configs, draw_cross_entropy),
       "bce_with_logits": (check_bce, bce_with_logits_configs, draw_bce_with_logits),
       "linear_cross_entropy": (check_linear_cross_entropy, linear_cross_entropy_configs, draw_linear_cross_entropy),
       "attention": (check_attention, attention_configs, draw_attention),
       "lstm": (check_lstm, lstm_configs, draw_lstm)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer cases per op")
    ap.add_argument("--sanitizer", choices=sorted(library.SANITIZERS), default="asan",
                    help="asan (ASan + UBSan, the default), tsan (ThreadSanitizer: races between a block's threads, "
                         "e.g. shared memory reused before a barrier) or none")
    ap.add_argument("--fuzz", type=int, default=0, metavar="N", help="N random configurations instead of the fixed ones")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--past-int32", action="store_true",
                    help="instead: tensors past 2**31 elements, sampled blocks (needs ~20 GiB of memory)")
    ap.add_argument("-k", default=None, help="only cases whose op and label contain this")
    a = ap.parse_args()
    library.build(a.sanitizer)  # before the re-exec: the compiler must not run with a preloaded runtime
    _reexec_with_sanitizer(a.sanitizer, [os.path.abspath(__file__), *sys.argv[1:]])
    import torch
    import fastnn  # noqa: F401  (the CPU kernels, the comparison's other side)

    so = library.build(a.sanitizer)
    torch.ops.load_library(so)
    c = Checker(a.k, so)
    t0 = time.time()
    if a.past_int32:
        past_int32_cases(c)
    elif a.fuzz:
        rng = random.Random(a.seed)
        for i in range(a.fuzz):
            check, _, draw = OPS[rng.choice(sorted(OPS))]
            cfg = draw(torch, rng)
            c.gen.manual_seed(a.seed * 100003 + i)
            check(c, **cfg)
    else:
        for check, configs, _ in OPS.values():
            for cfg in configs(torch, a.quick):
                check(c, **cfg)
        for dt, B, H in ((torch.float32, 7, 13), (torch.bfloat16, 3, 40), (torch.float64, 1, 5)):
            check_lstm_cell(c, dt, B, H)
        check_cross_entropy_bad_target(c)
        large_grid_cases(c)
    print(f"kernels launched: {' '.join(sorted(c.launched))}")
    print(f"cuda_emu checks: {c.ok} ok, {c.bad} bad in {time.time() - t0:.0f} s", flush=True)
    return 1 if c.bad or not c.ok else 0


if __name__ == "__main__":
    sys.exit(main())
