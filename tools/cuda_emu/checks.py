"""Runs every CUDA op of fastnn through its CUDA source on the CPU (library.py: the .cu files compiled whole against
the emulator) and compares each result with fastnn's C++ CPU kernels - the same schema, the same inputs. The cases
walk the launchers' paths: short rows several to a block, a block per row, the shared-memory tail, the two-pass
online rows, non-last dims, unaligned rows, every dtype, masks, dropout, Lq != Lk, grouped heads, padded head dims,
the tensor-core kernels, the persistent LSTM and the step loop. Bad targets must be reported as on the CPU. With
the ASan build (the default), a kernel reading or writing outside a tensor stops the run with ASan's report; with
--sanitizer tsan, two threads of a block touching the same shared memory without a barrier between them do.

    python tools/cuda_emu/checks.py [--quick] [--sanitizer asan|tsan|none] [-k SUBSTRING]
    EMU_CP_EAGER=1 ...   cp.async copies land when issued (default: at the wait), see prelude.h

Needs fastnn's CPU build importable (the repository's .venv). Emulation runs a thread per CUDA thread: shapes are
small, and the whole run takes minutes.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

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
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            copies = [[a.clone() if isinstance(a, torch.Tensor) else a for a in args] for _ in range(2)]
            outs = []
            for lib, cargs in (("fastnn_emu", copies[0]), ("fastnn", copies[1])):
                r = getattr(getattr(torch.ops, lib), op)(*cargs)
                if mutated is not None:
                    r = cargs[mutated]
                outs.append(list(r) if isinstance(r, (tuple, list)) else [r])
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
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
            ref = max(1.0, fb[finite].abs().max().item()) if finite.any() else 1.0
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


def softmax_cases(c: Checker, quick: bool):
    torch = c.torch
    f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
    shapes = [((7, 97), f32, -1, "short rows, a group each, unaligned n"), ((3, 1025), f16, -1, "block per row"),
              ((2, 40000), f32, -1, "fwd shared-memory tail, bwd tail"), ((1, 150001), f32, -1, "online rows"),
              ((4, 33, 5), f64, 1, "non-last dim"), ((3, 200, 40), bf16, 1, "non-last dim, y split")]
    if not quick:
        shapes += [((2, 128256), bf16, -1, "bf16 128256: fwd tail"), ((1, 20000), f32, -1, "bwd tail"),
                   ((5, 4096), bf16, -1, "cached, vectorized"), ((1, 1), f32, -1, "one element"),
                   ((6, 129), f64, -1, "float64 short rows"), ((2, 70000), f16, -1, "fp16 long row")]
    for shape, dt, dim, what in shapes:
        x = c.randn(*shape, dtype=dt, scale=3)
        for log in (False, True):
            lab = f"{'log ' if log else ''}{dt} {shape} {what}"
            c.compare(lab, "softmax_fwd", [x, dim, log])
            y = torch.ops.fastnn.softmax_fwd(x, dim, log)
            c.compare(lab, "softmax_bwd", [c.randn(*shape, dtype=dt), y, dim, log])
    x = c.unaligned(c.randn(3, 4096, scale=3))
    c.compare("float32 (3, 4096) unaligned storage", "softmax_fwd", [x, -1, False])


def cross_entropy_cases(c: Checker, quick: bool):
    torch = c.torch
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    shapes = [((7, 97), f32, "short rows"), ((3, 5000), bf16, "bf16 5000"), ((2, 11, 3), f32, "class dim not last")]
    if not quick:
        shapes += [((3, 40000), f32, "long rows"), ((4, 1025), f16, "fp16 1025"), ((1, 1), f32, "one class")]
    for shape, dt, what in shapes:
        N, C = shape[0], shape[1]
        x = c.randn(*shape, dtype=dt, scale=2)
        tshape = (shape[0],) + shape[2:]
        t = torch.randint(0, C, tshape, generator=c.gen)
        t.view(-1)[0] = -100  # an ignored row
        w = (c.randn(C).abs() + 0.1).to(dt)
        for weight, ls in ((None, 0.0), (w, 0.1)):
            lab = f"{dt} {shape} {what}{' weight ls 0.1' if weight is not None else ''}"
            c.compare(lab, "cross_entropy_fwd", [x, t, weight, -100, ls, False])
            loss, stats = torch.ops.fastnn.cross_entropy_fwd(x, t, weight, -100, ls, False)
            g = c.randn(*loss.shape)
            c.compare(lab, "cross_entropy_bwd", [g, x, t, weight, stats, -100, ls])
            c.compare(lab, "cross_entropy_bwd_inplace", [g, x, t, weight, stats, -100, ls], mutated=1)
            c.compare(lab, "cross_entropy_fwd_grad", [x, t, weight, g, -100, ls])
        probs = torch.softmax(c.randn(*shape), 1).to(dt)
        c.compare(f"{dt} {shape} probability targets", "cross_entropy_fwd", [x, probs, None, -100, 0.0, False])
        loss, stats = torch.ops.fastnn.cross_entropy_fwd(x, probs, None, -100, 0.0, False)
        c.compare(f"{dt} {shape} probability targets", "cross_entropy_bwd",
                  [c.randn(*loss.shape), x, probs, None, stats, -100, 0.0])
    x = c.randn(5, 9)
    bad = torch.tensor([0, 3, 9, 1, 2])
    c.raises("target 9 of 9 classes", "cross_entropy_fwd", [x, bad, None, -100, 0.0, False], "arget")
    c.raises("target 9 of 9 classes", "cross_entropy_fwd_grad", [x, bad, None, torch.ones(5), -100, 0.0], "arget")


def bce_cases(c: Checker, quick: bool):
    torch = c.torch
    f32, bf16, f64 = torch.float32, torch.bfloat16, torch.float64
    shapes = [((7, 97), f32), ((1025,), f64), ((3, 4099), bf16)]
    if not quick:
        shapes += [((1,), f32), ((64, 1000), f32)]
    for shape, dt in shapes:
        x, y = c.randn(*shape, dtype=dt, scale=3), torch.rand(*shape, generator=c.gen).to(dt)
        n = shape[-1]
        w, pw = c.randn(n, dtype=dt).abs(), c.randn(n, dtype=dt).abs() + 0.5
        for weight, pos in ((None, None), (w, pw), (c.randn(*shape, dtype=dt), None)):
            for red in (0, 1, 2):
                lab = f"{dt} {shape} red {red}{' weight' if weight is not None else ''}{' pos' if pos is not None else ''}"
                c.compare(lab, "bce_with_logits_fwd", [x, y, weight, pos, red])
                g = c.randn(*shape, dtype=dt) if red == 0 else c.randn((), dtype=dt)
                c.compare(lab, "bce_with_logits_bwd", [g, x, y, weight, pos, red, True, True])
    x = c.unaligned(c.randn(5, 64))
    y = c.unaligned(torch.rand(5, 64, generator=c.gen))
    c.compare("float32 (5, 64) unaligned storage", "bce_with_logits_fwd", [x, y, None, None, 1])


def linear_cross_entropy_cases(c: Checker, quick: bool):
    torch = c.torch
    cases = [(torch.float32, 37, 24, 97, 16), (torch.bfloat16, 29, 32, 130, 8)]
    if not quick:
        cases += [(torch.float16, 9, 16, 40, 64)]
    for dt, N, D, V, chunk in cases:
        x, w, b = c.randn(N, D, dtype=dt), c.randn(V, D, dtype=dt, scale=D ** -0.5), c.randn(V, dtype=dt)
        t = torch.randint(0, V, (N,), generator=c.gen)
        t[1] = -100
        cw = (c.randn(V).abs() + 0.1).to(dt)
        lab = f"{dt} N{N} D{D} V{V} chunk {chunk}"
        c.compare(lab, "linear_cross_entropy_fwd", [x, w, b, t, cw, -100, 0.1, chunk])
        loss, stats = torch.ops.fastnn.linear_cross_entropy_fwd(x, w, b, t, cw, -100, 0.1, chunk)
        g = c.randn(*loss.shape)
        # the weight gradient sums N products: tolerance relative to its largest value, as for one product
        c.compare(lab, "linear_cross_entropy_bwd", [g, x, w, b, t, cw, stats, -100, 0.1, chunk, [True, True, True]])
        c.compare(lab, "linear_cross_entropy_fwd_grad", [x, w, b, t, cw, g, -100, 0.1, chunk, [True, True, True]])


def attention_cases(c: Checker, quick: bool):
    torch = c.torch
    f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
    # (dtype, B, H, Hk, Lq, Lk, D, Dv, causal, mask kind, key padding, dropout, label)
    cases = [(f32, 2, 2, 2, 17, 17, 32, 32, False, None, False, 0.0, "float32 simple kernel"),
             (bf16, 1, 2, 2, 33, 33, 64, 64, True, None, False, 0.0, "bf16 tensor cores, causal"),
             (f16, 2, 4, 2, 17, 40, 40, 24, False, "bool", True, 0.0, "fp16 GQA, Lq<Lk, D40 Dv24, masks"),
             (bf16, 1, 2, 1, 20, 20, 64, 64, True, "float", False, 0.2, "bf16 dropout, additive mask")]
    if not quick:
        cases += [(f64, 1, 1, 1, 7, 5, 24, 16, True, "float", True, 0.1, "float64 Lq>Lk causal"),
                  (f16, 1, 1, 1, 1, 1, 128, 128, False, None, False, 0.0, "length 1, D128"),
                  (bf16, 1, 1, 1, 65, 65, 256, 256, False, None, False, 0.0, "D256: forward on tensor cores"),
                  (f32, 1, 2, 2, 70, 70, 96, 96, True, "bool", True, 0.3, "float32 everything")]
    for dt, B, H, Hk, Lq, Lk, D, Dv, causal, mask, kpm, p, what in cases:
        q, k, v = c.randn(B, H, Lq, D, dtype=dt), c.randn(B, Hk, Lk, D, dtype=dt), c.randn(B, Hk, Lk, Dv, dtype=dt)
        am, mdt = None, f64 if dt == f64 else f32  # the mask's dtype: the accumulation type
        if mask == "bool":  # the op's additive float32 form of a boolean mask, broadcast over batch and heads
            keep = torch.rand(1, 1, Lq, Lk, generator=c.gen) > 0.3
            am = torch.zeros(keep.shape, dtype=mdt).masked_fill(~keep, float("-inf"))
        elif mask == "float":
            am = c.randn(1, H, Lq, Lk, dtype=mdt)
        pad = torch.rand(B, Lk, generator=c.gen) > 0.8 if kpm else None
        scale = D ** -0.5
        lab = f"{what} B{B} H{H}/{Hk} L{Lq}x{Lk} D{D}/{Dv}"
        c.compare(lab, "attention_fwd", [q, k, v, am, pad, p, causal, scale, 1234])
        out, stats = torch.ops.fastnn.attention_fwd(q, k, v, am, pad, p, causal, scale, 1234)
        do = c.randn(*out.shape, dtype=dt)
        grad_mask = mask == "float"
        c.compare(lab, "attention_bwd", [do, q, k, v, out, stats, am, pad, p, causal, scale, 1234, grad_mask])


def lstm_cases(c: Checker, quick: bool):
    torch = c.torch
    f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
    for dt, B, H in ((f32, 7, 13), (bf16, 3, 40), (f64, 1, 5)):
        gates, bias, cx = c.randn(B, 4 * H, dtype=dt), c.randn(4 * H, dtype=dt), c.randn(B, H, dtype=dt)
        lab = f"{dt} B{B} H{H}"
        c.compare(lab, "lstm_cell_fwd", [gates, bias, cx])
        hy, cy, act = torch.ops.fastnn.lstm_cell_fwd(gates, bias, cx)
        c.compare(lab, "lstm_cell_bwd", [c.randn(B, H, dtype=dt), c.randn(B, H, dtype=dt), act, cx])
    # (dtype, T, B, I, H, lengths, reverse, FASTNN_LSTM_PERSISTENT, label)
    cases = [(f32, 5, 3, 7, 12, True, False, "auto", "float32 step loop"),
             (bf16, 4, 17, 8, 24, True, True, "1", "bf16 persistent, reverse, lengths"),
             (f16, 3, 5, 16, 40, False, False, "0", "fp16 step loop forced")]
    if not quick:
        cases += [(f16, 3, 33, 8, 64, False, False, "1", "fp16 persistent B33 H64"),
                  (bf16, 2, 129, 8, 16, False, False, "auto", "bf16 B129: step loop")]
    for dt, T, B, I, H, with_len, rev, mode, what in cases:
        x, w_ih, w_hh = c.randn(T, B, I, dtype=dt), c.randn(4 * H, I, dtype=dt, scale=0.3), \
            c.randn(4 * H, H, dtype=dt, scale=H ** -0.5)
        bias, h0, c0 = c.randn(4 * H, dtype=dt), c.randn(B, H, dtype=dt), c.randn(B, H, dtype=dt)
        lengths = torch.randint(0, T + 1, (B,), generator=c.gen) if with_len else None
        if lengths is not None:
            lengths[0] = T
        env = {"FASTNN_LSTM_PERSISTENT": mode}
        lab = f"{what} T{T} B{B} I{I} H{H}"
        # act (output 2) is unspecified past a row's length: the backward never reads it there
        live = None if lengths is None else {2: (torch.arange(T)[:, None] < lengths)[:, :, None]}
        c.compare(lab, "lstm_layer_fwd", [x, w_ih, bias, w_hh, h0, c0, lengths, rev], env=env, defined=live)
        hs, cs, act = torch.ops.fastnn.lstm_layer_fwd(x, w_ih, bias, w_hh, h0, c0, lengths, rev)
        c.compare(lab, "lstm_layer_bwd", [c.randn(T, B, H, dtype=dt), c.randn(T, B, H, dtype=dt), w_hh, c0, cs, act,
                                          lengths, rev], env=env)


def large_grid_cases(c: Checker, quick: bool):
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


OPS = {"softmax": softmax_cases, "cross_entropy": cross_entropy_cases, "bce_with_logits": bce_cases,
       "linear_cross_entropy": linear_cross_entropy_cases, "attention": attention_cases, "lstm": lstm_cases,
       "large_grid": large_grid_cases}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer cases per op")
    ap.add_argument("--sanitizer", choices=sorted(library.SANITIZERS), default="asan",
                    help="asan (ASan + UBSan, the default), tsan (ThreadSanitizer: races between a block's threads, "
                         "e.g. shared memory reused before a barrier) or none")
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
    for name, cases in OPS.items():
        cases(c, a.quick)
    print(f"kernels launched: {' '.join(sorted(c.launched))}")
    print(f"cuda_emu checks: {c.ok} ok, {c.bad} bad in {time.time() - t0:.0f} s", flush=True)
    return 1 if c.bad or not c.ok else 0


if __name__ == "__main__":
    sys.exit(main())
