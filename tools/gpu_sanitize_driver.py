"""Launches every fastnn kernel once, forward and backward, on small odd inputs: the program that
compute-sanitizer (memcheck, racecheck, initcheck, synccheck) runs in `bash bench/gpu_check.sh sanitize`, in
place of the whole test suite.

    python tools/gpu_sanitize_driver.py [--device cuda|cpu] [--backend native] [--only softmax] [--kernels]

Every case of ``cases()`` runs on each backend asked for (default: native and triton): forward, then backward
with a fixed upstream gradient, then a synchronize, so that an error is reported at its case. Inputs: tails (1, 7,
97, 113 x 203, 1025, 4099 and 32771 columns: every path of the row kernels), non-contiguous and strided-dim
layouts, float32/float64/float16/bfloat16, bool and float attention masks, key padding, causal, dropout, class
weights, label smoothing, ignore_index, probability targets, in-place backward, LSTM lengths and both directions;
and out-of-range class targets placed at the first and last row, which must raise an IndexError before any
kernel reads the logits there (memcheck sees a read). Outputs and gradients are compared loosely with the
reference backend (garbage, not rounding: an unwritten or misread element).

Coverage, printed last: the fastnn:: ops each backend called against those registered for the device (native)
or with a ``_triton`` twin; the Triton kernels launched against those ``kernels/aot.py`` lists; with
``--kernels`` (CUDA, not under a sanitizer: it uses the profiler) the CUDA kernels launched against every
``__global__`` function of csrc/cuda. Exit status 1 if a case failed or a kernel was not reached.

On the CPU (``--device cpu``) the native backend is the C++ one and Triton runs under its interpreter (set here).
``cases()`` is also the catalogue of tests/test_cuda.py (gradcheck, opcheck on CUDA).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclasses.dataclass
class Case:
    op: str  # softmax, bce, cross_entropy, linear_cross_entropy, attention, lstm_cell, lstm
    label: str
    call: Callable  # call(backend, **inputs) -> tensor or (nested) tuple of tensors
    inputs: dict  # name -> tensor
    grad: tuple = ()  # names of the inputs to differentiate
    compare: bool = True  # False where backends may differ by design (dropout's mask)
    raises: type | None = None  # the exception the call must raise (bad input)
    once: bool = False  # its backward may run only once (in-place backward): no gradcheck

    @property
    def dtype(self):
        return next(t.dtype for t in self.inputs.values() if t.is_floating_point())

    def numel(self) -> int:
        return sum(t.numel() for t in self.inputs.values())


def _flat(out) -> list:
    if out is None:
        return []
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return [out]


# ------------------------------------------------------------------------------------------------- the cases


def cases(device: str = "cuda", dtypes=DTYPES, ops=None) -> list[Case]:
    """The catalogue: the same values on every device (drawn on the CPU from fixed seeds, then moved)."""
    import torch

    dts = [getattr(torch, d) if isinstance(d, str) else d for d in dtypes]
    gen = torch.Generator().manual_seed(0)
    out: list[Case] = []

    def rand(*shape, dtype=torch.float32, scale=1.0, lo=None):
        t = torch.rand(shape, generator=gen, dtype=torch.float64) if lo is not None else \
            scale * torch.randn(shape, generator=gen, dtype=torch.float64)
        return (t if lo is None else lo + t).to(device=device, dtype=dtype)

    def randint(high, *shape):
        return torch.randint(0, high, shape, generator=gen).to(device)

    def mask(*shape, p=0.7):
        return (torch.rand(shape, generator=gen) < p).to(device)

    def add(op, label, call, inputs, grad, **kw):
        if ops is None or op in ops:
            out.append(Case(op, label, call, inputs, tuple(grad), **kw))

    import fastnn
    import fastnn.functional as F

    for dt in dts:
        name = str(dt).replace("torch.", "")
        low = dt in (torch.float16, torch.bfloat16)

        # softmax / log_softmax: every path of the row kernels (a warp group, 2-8 slots a lane, a block a row,
        # the online loop past 32768 float32 columns; Triton's single block up to 8192, its loop beyond), vector
        # and scalar tails, a strided (non-last) dim, non-contiguous inputs, the dtype= cast.
        for i, (shape, dim) in enumerate([((3, 1), -1), ((5, 7), -1), ((4, 97), -1), ((113, 203), -1),
                                          ((2, 1024), -1), ((2, 1025), -1), ((2, 4099), -1), ((1, 32771), -1),
                                          ((3, 5, 4), 1), ((7, 3, 33), 0)]):
            log = i % 2 == 1
            fn = F.log_softmax if log else F.softmax
            add("softmax", f"{name} {shape} dim={dim}{' log' if log else ''}",
                lambda b, x, fn=fn, dim=dim: fn(x, dim, backend=b), dict(x=rand(*shape, dtype=dt, scale=3)), "x")
        add("softmax", f"{name} transposed (203, 113).t()",
            lambda b, x: F.softmax(x.t(), -1, backend=b), dict(x=rand(203, 113, dtype=dt)), "x")
        add("softmax", f"{name} sliced [:, ::2] of (9, 130) log",
            lambda b, x: F.log_softmax(x[:, ::2], -1, backend=b), dict(x=rand(9, 130, dtype=dt)), "x")
        if low:
            add("softmax", f"{name} dtype=float32 (6, 97)",
                lambda b, x: F.softmax(x, -1, dtype=torch.float32, backend=b), dict(x=rand(6, 97, dtype=dt)), "x")

        # binary_cross_entropy_with_logits: broadcast weight and pos_weight read in place, reductions, the
        # target's gradient, a transposed input, and more elements than one grid (the grid-stride loop, many
        # partial sums).
        for shape, w_shape, pw_shape, red in [((7,), None, None, "mean"), ((113, 203), (203,), (203,), "none"),
                                              ((2, 3, 1025), (3, 1), (1025,), "sum"),
                                              ((600_001,), None, (1,), "mean")]:
            if shape[0] == 600_001 and dt != torch.float32:
                continue
            inputs = dict(x=rand(*shape, dtype=dt, scale=3), y=rand(*shape, dtype=dt, lo=0.0))
            w = None if w_shape is None else rand(*w_shape, dtype=dt, lo=0.5)
            pw = None if pw_shape is None else rand(*pw_shape, dtype=dt, lo=0.5)
            add("bce", f"{name} {shape} weight={w_shape} pos_weight={pw_shape} {red}",
                lambda b, x, y, w=w, pw=pw, red=red: F.binary_cross_entropy_with_logits(
                    x, y, w, reduction=red, pos_weight=pw, backend=b), inputs, ("x", "y"))
        add("bce", f"{name} transposed (97, 7).t()",
            lambda b, x, y: F.binary_cross_entropy_with_logits(x.t(), y.t(), reduction="none", backend=b),
            dict(x=rand(97, 7, dtype=dt), y=rand(97, 7, dtype=dt, lo=0.0)), ("x", "y"))

        # cross_entropy: class counts below, at and past one block (4096), class weights, label smoothing,
        # ignore_index (the default and a real class), probability targets, a spatial (non-last) class dim,
        # reductions, in-place backward, transposed logits, uint8 targets.
        for N, C, opts in [(3, 1, {}), (7, 7, dict(weight=True, label_smoothing=0.1)),
                           (113, 203, dict(ignore=-100, reduction="none")), (5, 1025, dict(ignore=2, weight=True)),
                           (2, 4099, dict(label_smoothing=0.2, reduction="sum")), (3, 97, dict(prob=True)),
                           (4, 33, dict(prob=True, weight=True, label_smoothing=0.1, reduction="none"))]:
            kw = dict(reduction=opts.get("reduction", "mean"), label_smoothing=opts.get("label_smoothing", 0.0))
            if opts.get("weight"):
                kw["weight"] = rand(C, dtype=dt, lo=0.5)
            x = rand(N, C, dtype=dt, scale=3)
            if opts.get("prob"):
                inputs = dict(x=x, t=torch.softmax(rand(N, C, dtype=torch.float64), -1).to(dt))
                grad = ("x", "t")
            else:
                t = randint(C, N)
                if "ignore" in opts:
                    kw["ignore_index"] = opts["ignore"]
                    t[::3] = opts["ignore"]
                inputs, grad = dict(x=x, t=t), ("x",)
            add("cross_entropy", f"{name} ({N}, {C}) {', '.join(opts)}",
                lambda b, x, t, kw=kw: F.cross_entropy(x, t, backend=b, **kw), inputs, grad)
        add("cross_entropy", f"{name} spatial (3, 7, 5, 2) weight",
            lambda b, x, t, w: F.cross_entropy(x, t, w, label_smoothing=0.1, reduction="none", backend=b),
            dict(x=rand(3, 7, 5, 2, dtype=dt), t=randint(7, 3, 5, 2), w=rand(7, dtype=dt, lo=0.5)), "x")
        add("cross_entropy", f"{name} spatial probabilities (2, 5, 3)",
            lambda b, x, t: F.cross_entropy(x, t, backend=b),
            dict(x=rand(2, 5, 3, dtype=dt), t=torch.softmax(rand(2, 5, 3, dtype=torch.float64), 1).to(dt)), "x")
        add("cross_entropy", f"{name} transposed (97, 9).t(), uint8 target",
            lambda b, x, t: F.cross_entropy(x.t(), t, backend=b),
            dict(x=rand(97, 9, dtype=dt), t=randint(97, 9).to(torch.uint8)), "x")
        add("cross_entropy", f"{name} inplace_backward (7, 1025)",
            lambda b, x, t: F.cross_entropy(x * 1, t, inplace_backward=True, backend=b),
            dict(x=rand(7, 1025, dtype=dt), t=randint(1025, 7)), "x", once=True)
        t = randint(4100, 5)
        t[1] = -100
        add("cross_entropy", f"{name} grad_in_forward (5, 4100) weight smoothing ignore_index, spatial (3, 7, 2)",
            lambda b, x, t, w, xs, ts: F.cross_entropy(x, t, w, label_smoothing=0.1, backend=b, grad_in_forward=True)
            + F.cross_entropy(xs, ts, reduction="sum", backend=b, grad_in_forward=True),
            dict(x=rand(5, 4100, dtype=dt), t=t, w=rand(4100, dtype=dt, lo=0.5), xs=rand(3, 7, 2, dtype=dt),
                 ts=randint(7, 3, 2)), ("x", "xs"))

        # linear_cross_entropy: rows straddling chunks, bias, class weights, smoothing, ignore_index.
        # grad_in_forward: the gradients in the forward's chunk loop (the half types' weight-gradient kernel, with
        # aligned tiles at D = 64, V = 1024, unaligned ones elsewhere).
        for N, D, V, kw in [(7, 33, 97, dict(chunk_size=3)), (5, 64, 1025, dict(label_smoothing=0.1)),
                            (9, 7, 203, dict(chunk_size=4, ignore_index=1, reduction="sum")),
                            (70, 64, 1024, dict(chunk_size=32, grad_in_forward=True)),
                            (9, 7, 203, dict(chunk_size=4, grad_in_forward=True, reduction="sum"))]:
            t = randint(V, N)
            if "ignore_index" in kw:
                t[::2] = kw["ignore_index"]
            inputs = dict(x=rand(N, D, dtype=dt), w=rand(V, D, dtype=dt, scale=0.3), bias=rand(V, dtype=dt))
            cw = rand(V, dtype=dt, lo=0.5) if N == 7 else None
            add("linear_cross_entropy", f"{name} N={N} D={D} V={V} {kw}",
                lambda b, x, w, bias, t=t, kw=kw, cw=cw: F.linear_cross_entropy(
                    x, w, t, linear_bias=bias, weight=cw, backend=b, **kw), inputs, ("x", "w", "bias"))
        add("linear_cross_entropy", f"{name} 3-d input, no bias, frozen weight",
            lambda b, x, w, t: F.linear_cross_entropy(x, w, t, reduction="none", backend=b),
            dict(x=rand(2, 3, 16, dtype=dt), w=rand(33, 16, dtype=dt, scale=0.3), t=randint(33, 2, 3)), "x")

        # scaled_dot_product_attention: head dims 1..256 (each Triton tile config), query/key tails, masks of
        # every kind, causal, dropout, unbatched, transposed inputs, a fully masked row.
        for B, H, Lq, Lk, D, kw in [
                (1, 1, 1, 1, 1, {}), (2, 1, 7, 97, 7, dict(causal=True)),
                (1, 2, 97, 33, 16, dict(mask="bool")), (2, 1, 33, 130, 64, dict(mask="float", kpm=True)),
                (1, 1, 65, 7, 128, dict(kpm=True, causal=True)), (1, 1, 17, 33, 200, dict(mask="bool")),
                (2, 1, 33, 65, 64, dict(dropout=0.2, mask="bool", causal=True))]:
            q, k, v = rand(B, H, Lq, D, dtype=dt), rand(B, H, Lk, D, dtype=dt), rand(B, H, Lk, D, dtype=dt)
            m = None
            if kw.get("mask") == "bool":
                m = mask(Lq, Lk)
                m[0] = False  # a row with nothing to attend: zeros
            elif kw.get("mask") == "float":
                m = rand(B, 1, Lq, Lk, dtype=dt).masked_fill(mask(B, 1, Lq, Lk, p=0.2), float("-inf"))
            kpm = None
            if kw.get("kpm"):
                kpm = torch.zeros(B, Lk, dtype=torch.bool, device=device)
                kpm[:, Lk - max(1, Lk // 3):] = True
            p = kw.get("dropout", 0.0)

            def sdpa(b, q, k, v, m=m, kpm=kpm, p=p, causal=kw.get("causal", False)):
                if p:
                    torch.manual_seed(7)  # the mask's seed comes from torch's CPU generator: reproducible calls
                return F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=p, is_causal=causal,
                                                      key_padding_mask=kpm, backend=b)
            add("attention", f"{name} B={B} H={H} Lq={Lq} Lk={Lk} D={D} {kw}", sdpa, dict(q=q, k=k, v=v),
                ("q", "k", "v"), compare=not p)
        # Grouped-query heads (4 on 2) with a value head dim other than the key's and a learned float mask that
        # gets a gradient (broadcast over the batch: the kernels sum it), causal and key padding.
        gqa_kpm = torch.zeros(2, 45, dtype=torch.bool, device=device)
        gqa_kpm[1, 40:] = True
        add("attention", f"{name} GQA 4 on 2, D=24, Dv=40, learned (1, 4, 37, 45) mask, causal, kpm",
            lambda b, q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True,
                                                                 enable_gqa=True, key_padding_mask=gqa_kpm,
                                                                 backend=b),
            dict(q=rand(2, 4, 37, 24, dtype=dt), k=rand(2, 2, 45, 24, dtype=dt), v=rand(2, 2, 45, 40, dtype=dt),
                 m=rand(1, 4, 37, 45, dtype=dt)), ("q", "k", "v", "m"))
        add("attention", f"{name} unbatched (3, 7, 16), transposed from (7, 3, 16), scale=0.3",
            lambda b, q, k, v: F.scaled_dot_product_attention(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=0.3, backend=b),
            dict(q=rand(7, 3, 16, dtype=dt), k=rand(9, 3, 16, dtype=dt), v=rand(9, 3, 16, dtype=dt)), ("q", "k", "v"))

        # lstm_cell: batched and unbatched, bias or not, no hx, transposed weights, more hidden units than a block.
        for B, I, H, bias in [(1, 3, 1, True), (5, 7, 33, False), (2, 5, 1030, True), (0, 3, 4, True)]:
            inputs = dict(x=rand(B, I, dtype=dt), h=rand(B, H, dtype=dt), c=rand(B, H, dtype=dt),
                          w_ih=rand(4 * H, I, dtype=dt, scale=0.3), w_hh=rand(4 * H, H, dtype=dt, scale=0.3))
            if bias:
                inputs.update(b_ih=rand(4 * H, dtype=dt), b_hh=rand(4 * H, dtype=dt))
            add("lstm_cell", f"{name} B={B} I={I} H={H} bias={bias}",
                lambda b, x, h, c, w_ih, w_hh, b_ih=None, b_hh=None: F.lstm_cell(
                    x, (h, c), w_ih, w_hh, b_ih, b_hh, backend=b), inputs, tuple(inputs))
        add("lstm_cell", f"{name} unbatched, no hx, transposed w_ih",
            lambda b, x, w_ih, w_hh: F.lstm_cell(x, None, w_ih.t(), w_hh, backend=b),
            dict(x=rand(5, dtype=dt), w_ih=rand(5, 28, dtype=dt, scale=0.3), w_hh=rand(28, 7, dtype=dt, scale=0.3)),
            ("x", "w_ih", "w_hh"))

        # fastnn.nn.LSTM: two layers, both directions, batch_first, lengths, and the no-grad (inference) path;
        # H = 24 (a multiple of 8) runs float16 / bfloat16 layers on the persistent kernels (the others: the step loop).
        for T, B, I, H, kw, lengths in [(5, 3, 7, 9, dict(num_layers=2, bidirectional=True), [5, 2, 1]),
                                        (4, 2, 3, 33, dict(batch_first=True), None),
                                        (6, 17, 5, 24, dict(bidirectional=True), [6, 1, 3] + [6] * 14)]:
            torch.manual_seed(0)
            mod = fastnn.nn.LSTM(I, H, dtype=dt, **kw).to(device)
            params = {n: p.detach() for n, p in mod.named_parameters()}
            x = rand(B, T, I, dtype=dt) if kw.get("batch_first") else rand(T, B, I, dtype=dt)
            lens = None if lengths is None else torch.tensor(lengths)

            def lstm(b, x, mod=mod, lens=lens, **p):
                with fastnn.use_backend(b):
                    return torch.func.functional_call(mod, p, (x,), dict(lengths=lens))
            add("lstm", f"{name} T={T} B={B} I={I} H={H} {kw} lengths={lengths}", lstm, dict(x=x, **params),
                ("x", *params))
            add("lstm", f"{name} T={T} B={B} H={H} {kw} no grad", lstm, dict(x=x, **params), ())

    # Out-of-range class targets at the first and the last row (C + 1000 reads past the allocation): an
    # IndexError, and memcheck sees no read.
    for C, bad, at in [(5, 1005, -1), (97, -7, 0)]:
        t = randint(C, 6)
        t[at] = bad
        add("cross_entropy", f"float32 target {bad} out of range at row {at}",
            lambda b, x, t: F.cross_entropy(x, t, backend=b), dict(x=rand(6, C), t=t), "x", raises=IndexError)
        add("linear_cross_entropy", f"float32 target {bad} out of range at row {at}",
            lambda b, x, w, t: F.linear_cross_entropy(x, w, t, backend=b),
            dict(x=rand(6, 8), w=rand(C, 8), t=t), ("x", "w"), raises=IndexError)
    return out


# ------------------------------------------------------------------------------------------------ running


def launch(case: Case, backend: str):
    """Forward and backward of one case: (outputs, gradients of case.grad), all detached."""
    import torch

    leaves = {k: v.detach().clone().requires_grad_(k in case.grad and v.is_floating_point())
              for k, v in case.inputs.items()}
    outs = _flat(case.call(backend, **leaves))
    wrt = [leaves[k] for k in case.grad if leaves[k].requires_grad]
    diff = [o for o in outs if o.requires_grad]
    grads = []
    if wrt and diff:
        gen = torch.Generator().manual_seed(1)
        gs = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for o in diff]
        grads = [g for g in torch.autograd.grad(diff, wrt, gs, allow_unused=True) if g is not None]
    return [o.detach() for o in outs], grads


TOL = {"float64": 1e-6, "float32": 1e-2, "float16": 5e-2, "bfloat16": 1e-1}


def _close(a, r, dtype) -> str | None:
    """None if a matches the reference r loosely (NaN pattern, max error <= tol * max(1, |r|max)), else why."""
    import torch

    if a.shape != r.shape:
        return f"shape {tuple(a.shape)} != {tuple(r.shape)}"
    a, r = a.double(), r.double()
    if not torch.equal(a.isnan(), r.isnan()):
        return "NaN pattern differs"
    ok = r.isfinite() & a.isfinite()
    if not torch.equal(a[~ok].nan_to_num(), r[~ok].nan_to_num()):
        return "inf pattern differs"
    if ok.any():
        err, size = (a - r)[ok].abs().max().item(), r[ok].abs().max().item()
        if err > TOL[str(dtype).replace("torch.", "")] * max(1.0, size):
            return f"max error {err:.3g} (|ref| <= {size:.3g})"
    return None


def run_case(case: Case, backend: str, check: bool, sync) -> str:
    """'ok', 'skip: ...' or 'FAIL: ...'."""
    if case.raises is not None:
        try:
            launch(case, backend)
            sync()
        except case.raises as e:
            sync()  # the refusal must leave the device usable
            return "ok" if "target" in str(e) else f"FAIL: {type(e).__name__} does not name the target: {e}"
        return f"FAIL: no {case.raises.__name__}"
    if check and case.compare:
        try:
            ref = launch(case, "reference")
        except (TypeError, ValueError, NotImplementedError) as e:
            return f"skip: the reference refuses it ({type(e).__name__}: {str(e)[:80]})"
    outs, grads = launch(case, backend)
    sync()
    if check and case.compare:
        for what, got, exp in (("output", outs, ref[0]), ("grad", grads, ref[1])):
            if len(got) != len(exp):
                return f"FAIL: {len(got)} {what}s, the reference {len(exp)}"
            for i, (a, r) in enumerate(zip(got, exp)):
                why = _close(a, r, case.dtype)
                if why:
                    return f"FAIL: {what} {i}: {why}"
    return "ok"


class Recorder:
    """Names of the fastnn:: ops called (a TorchDispatchMode sees them below autograd, backward ops too) and
    of the Triton kernels launched; with ``keep``, each op call's arguments, cloned before it runs."""

    def __init__(self, keep: bool = False):
        self.ops: set[str] = set()
        self.kernels: set[str] = set()
        self.calls: list = []
        self.keep = keep

    def __enter__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        rec = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.name()
                if name.startswith("fastnn::"):
                    rec.ops.add(name.split("::")[1].split(".")[0])
                    if rec.keep:  # requires_grad as the call saw it: a backward's calls run without grad mode
                        grad = torch.is_grad_enabled()
                        rec.calls.append((func, *torch.utils._pytree.tree_map_only(
                            torch.Tensor, lambda t: _clone(t, grad), (args, kwargs or {}))))
                return func(*args, **(kwargs or {}))

        self._mode = Mode()
        self._mode.__enter__()
        self._patched = []
        for cls in _triton_function_classes():
            run = cls.run

            def wrapped(fn, *args, _run=run, **kwargs):
                rec.kernels.add(fn.fn.__name__)
                return _run(fn, *args, **kwargs)
            cls.run = wrapped
            self._patched.append((cls, run))
        return self

    def __exit__(self, *exc):
        for cls, run in self._patched:
            cls.run = run
        self._mode.__exit__(*exc)


def _clone(t, grad: bool):
    return t.detach().clone().requires_grad_(grad and t.requires_grad) if t.is_floating_point() else t.clone()


def _triton_function_classes():
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return []
    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass
    return classes


def expected_ops(device: str, backend: str) -> set[str]:
    import torch

    from fastnn.backend import native_has

    names = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastnn::")}
    if backend == "triton":
        return {n for n in names if n.endswith("_triton")}
    return {n for n in names if not n.endswith("_triton") and native_has(getattr(torch.ops.fastnn, n), device)}


def expected_triton_kernels() -> set[str]:
    from fastnn.kernels.aot import discover

    return {kernel.__name__ for _, aot in discover() for kernel, *_ in aot()}


def expected_cuda_kernels() -> set[str]:
    names = set()
    for path in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        names |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", path.read_text()))
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--backend", action="append", choices=("native", "triton"), help="default: both")
    p.add_argument("--only", action="append", help="op: softmax, bce, cross_entropy, linear_cross_entropy, "
                                                   "attention, lstm_cell, lstm (repeatable)")
    p.add_argument("--dtype", action="append", choices=DTYPES, help="default: all four")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with the reference backend")
    p.add_argument("--kernels", action="store_true",
                   help="CUDA: list the CUDA kernels launched (torch.profiler; not under a sanitizer)")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    args = p.parse_args(argv)
    backends = args.backend or ["native", "triton"]

    if args.device == "cpu" and "triton" in backends:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    elif args.device == "cuda":
        os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(ROOT))
    import torch

    import fastnn  # noqa: F401
    from fastnn.backend import triton_status

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize_driver: torch sees no CUDA device")
        return 2
    if "triton" in backends and not triton_status()[0]:
        print(f"gpu_sanitize_driver: no Triton ({triton_status()[1]}); native only")
        backends.remove("triton")
    if "triton" in backends and os.environ.get("FASTNN_TRITON_RECORD"):  # on the CPU: kernels/aot.py --recorded
        from fastnn.kernels.aot import record_launches_from_env

        record_launches_from_env()
    all_cases = cases(args.device, args.dtype or DTYPES, args.only)
    if args.list:
        for c in all_cases:
            print(f"{c.op:<22} {c.label}")
        return 0
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    print(f"gpu_sanitize_driver: {len(all_cases)} cases x {backends} on {args.device} "
          f"({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}), torch {torch.__version__}",
          flush=True)

    prof = None
    if args.kernels and args.device == "cuda":
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
        prof.__enter__()
    results, recs, fatal = {}, {}, None
    n, total, start = 0, len(all_cases) * len(backends), time.time()
    for backend in backends:
        with Recorder() as rec:
            for case in all_cases:
                n += 1
                t0 = time.time()
                if fatal:
                    res = "skip: after a sticky CUDA error"
                else:
                    try:
                        res = run_case(case, backend, not args.no_check, sync)
                    except Exception as e:  # a case's failure is reported, the others still run
                        res = f"FAIL: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                        if args.device == "cuda" and ("CUDA error" in str(e) or "device-side" in str(e)):
                            fatal = res
                results[(backend, case.op, case.label)] = res
                print(f"[{n:>4}/{total}] {backend:<7} {case.op:<21} {case.label:<60} {res} "
                      f"({time.time() - t0:.2f} s)", flush=True)
        recs[backend] = rec
    if prof is not None:
        sync()
        prof.__exit__(None, None, None)

    # ---- summary: per op and backend, then coverage
    failed = 0
    print(f"\n== cases ({time.time() - start:.0f} s) ==")
    print(f"{'backend':<8} {'op':<22} {'ok':>4} {'skip':>5} {'FAIL':>5}")
    for backend in backends:
        for op in dict.fromkeys(c.op for c in all_cases):
            rs = [r for (b, o, _), r in results.items() if b == backend and o == op]
            bad = sum(r.startswith("FAIL") for r in rs)
            failed += bad
            print(f"{backend:<8} {op:<22} {sum(r == 'ok' for r in rs):>4} {sum(r.startswith('skip') for r in rs):>5} "
                  f"{bad:>5}")
    for (backend, op, label), r in results.items():
        if r.startswith("FAIL"):
            print(f"  FAIL {backend} {op} {label}: {r[6:]}")
    print("\n== coverage ==")
    missing = 0
    whole = args.only is None
    for backend in backends:
        called = recs[backend].ops
        want = expected_ops(args.device, backend) if whole else called
        miss = sorted(want - called)
        missing += len(miss)
        print(f"fastnn ops, {backend}: {len(called & want)}/{len(want)} called"
              + (f"; NOT called: {miss}" if miss else ""))
    if "triton" in backends:
        launched = recs["triton"].kernels
        want = expected_triton_kernels() if whole else launched
        miss = sorted(want - launched)
        missing += len(miss)
        print(f"Triton kernels: {len(launched & want)}/{len(want)} of kernels/aot.py's launched"
              + (f"; NOT launched: {miss}" if miss else "")
              + (f"; launched, not in the AOT specs: {sorted(launched - want)}" if launched - want else ""))
    if prof is not None:
        names = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
        want = expected_cuda_kernels()
        hit = {k for k in want if any(re.search(rf"\b{k}\b", n) for n in names)}
        miss = sorted(want - hit) if whole and "native" in backends else []
        missing += len(miss)
        print(f"CUDA kernels (csrc/cuda): {len(hit)}/{len(want)} launched"
              + (f"; NOT launched: {miss}" if miss else ""))
    print(f"gpu_sanitize_driver: {'FAILED' if failed or missing or fatal else 'passed'} "
          f"({failed} failed case(s), {missing} kernel(s)/op(s) not reached)")
    return 1 if failed or missing or fatal else 0


if __name__ == "__main__":
    sys.exit(main())
