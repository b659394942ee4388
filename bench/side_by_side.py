"""The side-by-side GPU bench: every fastnn op next to the kernels a user would pick instead, in one run on one
machine, with that machine's ceilings measured in the same run (so every ratio compares numbers of one run).

    python bench/side_by_side.py [--device cuda|cpu] [--quick | --tiny] [--budget S] [--sections a,b]
                                 [--out DIR] [--no-save] [--no-compile] [--repeats N] [--list]

Candidates, wherever they apply: fastnn's Triton and native (C++/CUDA) backends, torch eager, torch.compile,
Liger-Kernel (``liger_kernel.transformers.functional``: softmax, cross-entropy, fused linear + cross-entropy),
Cut Cross-Entropy (``cut_cross_entropy.linear_cross_entropy``), torch SDPA with each backend forced (flash,
cuDNN, efficient, math), and cuDNN's nn.LSTM (the "torch-eager" LSTM on CUDA; fastnn's native LSTM also appears
with each of its two CUDA recurrences forced, "-persistent" and "-step-loop"). A candidate whose package is not
installed is reported "absent", one that cannot run on the device "n/a"; neither stops the run. Liger and Cut
Cross-Entropy are not dependencies: on an offline GPU machine, tools/fetch_gpu_wheels.sh brings their wheels.

Each candidate is first checked against fastnn.reference (float64; float32 for bf16 inputs) on the case's own
inputs, the forward and, where fwd+bwd is timed, the gradients, by ||out - ref|| / ||ref||; one that fails is
reported ("invalid" or "error") and not timed. Then: time (triton.testing.do_bench's median on CUDA, the median
of repeats on CPU) of the forward (under no_grad) and of forward+backward; peak memory beyond what existed before
the call (the inputs, and for candidates that overwrite their input, that input's private copy); the fraction of
the measured copy bandwidth for the memory-bound ops (byte models below) and TFLOP/s for the products
(attention: 4*B*H*Lq*Lk*D forward, halved when causal, the backward 2.5x that, so fwd+bwd 3.5x; linear + CE:
2*N*D*V per product, 1 forward, 3 fwd+bwd; LSTM: the two products per step, x3 fwd+bwd). Candidates that
overwrite their input (Liger's and fastnn's in-place cross-entropy) are timed on a copy that keeps being
overwritten: the values drift, the work does not change.

Byte models (bytes read + written, s bytes an element): softmax and log-softmax, fwd 2 n s (x in, y out),
fwd+bwd 5 n s (then dy and y in, dx out); cross-entropy, fwd N V s (the logits), fwd+bwd 3 N V s (then the
logits in, their gradient out; a kernel that writes the gradient in the forward moves 2 N V s and can pass
100%); BCE with logits, fwd 2 n s (logits and targets), fwd+bwd 5 n s (then both in, dx out).

Not compared, and why: torch.compile of attention (Inductor lowers attention to the same SDPA kernels) and of the
LSTM layer (it calls the same cuDNN kernel); Liger has no log-softmax, BCE, attention or LSTM kernel.

Sections share --budget seconds by weight; time a section leaves unused goes to the ones after it. A candidate
is started only while its section has time left; the rest are recorded "skipped (budget)". On SIGINT (the
runbook's timeout) the rows measured so far are still written. Output (<out>: bench/results/gpu for CUDA,
bench/results for CPU): a markdown table (printed, and <out>/side_by_side_<device>.md), CSV rows appended to
<out>/side_by_side.csv (GPU, driver, torch, triton, commit and date on every row), plots
<out>/side_by_side_<device>.png and ..._bw.png (when matplotlib is there), and each goal of the GPU speed issue
with its measured ratio, met or missed. Exit status 1 when a fastnn candidate failed its check or raised, or the
run was interrupted (a competitor's failure is reported, not an error of fastnn's).

--tiny runs the same code on tiny shapes (CPU: the plumbing test in tests/test_bench.py; CUDA: a smoke run);
--quick a subset of the shapes at full size.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import importlib
import importlib.util
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
import torch.nn.functional as TF

import fastnn
import fastnn.functional as F
from fastnn import reference as R
from fastnn.backend import native_has, triton_interpret, triton_status
import harness
from harness import EAGER

FWD, FWD_BWD, STEP = "fwd", "fwd+bwd", "step"
COMPILE = "torch-compile"
CSV_NAME = "side_by_side.csv"
BF16, FP32 = torch.bfloat16, torch.float32
# The optional competitors: key -> (module to import, pip name).
PACKAGES = {"liger": ("liger_kernel.transformers.functional", "liger-kernel"),
            "cce": ("cut_cross_entropy", "cut-cross-entropy")}
NOT_RUN = ("absent", "n/a", "skipped")  # statuses of candidates that were not timed by choice


# ---- environment: what can run here ------------------------------------------------------------------------------

class Env:
    def __init__(self, args):
        self.device = args.device
        self.cuda = self.device == "cuda"
        ok = triton_status()[0]
        # Triton runs CUDA tensors, or CPU tensors under its interpreter (slow, but it exercises the same code).
        self.triton = ok and (self.cuda or triton_interpret())
        self.compile = not args.no_compile
        self._modules: dict[str, object] = {}

    def module(self, key: str):
        """The optional package's module, imported once; raises ImportError when it is missing or broken."""
        if key not in self._modules:
            self._modules[key] = importlib.import_module(PACKAGES[key][0])
        return self._modules[key]

    def missing(self, needs: tuple[str, ...]) -> str | None:
        """Why a candidate needing ``needs`` cannot run here (a status), or None when it can."""
        for n in needs:
            if n == "cuda" and not self.cuda:
                return "n/a: needs CUDA"
            if n == "triton" and not self.triton:
                return "n/a: needs Triton on CUDA (or TRITON_INTERPRET=1)"
            if n == "compile" and not self.compile:
                return "n/a: --no-compile"
            if n.startswith("native:") and not native_has(getattr(torch.ops.fastnn, n[7:] + "_fwd"), self.device):
                return f"n/a: no native {n[7:]} kernel for {self.device}"
            if n in PACKAGES:
                mod, pip = PACKAGES[n]
                if importlib.util.find_spec(mod.split(".")[0]) is None:
                    return f"absent: {pip} not installed"
                try:
                    self.module(n)
                except Exception as e:  # a broken install is absent too, with the reason
                    return f"absent: {pip} failed to import ({type(e).__name__}: {e})"[:160]
        return None


@dataclass
class Cand:
    """A candidate: ``fn(*inputs)`` returns the op's output; ``needs`` says what it needs to run (see
    Env.missing); ``mutates``: it overwrites its first input (timed on a private copy); ``modes``: which of fwd,
    fwd+bwd it is timed in (None: the case's); ``env``: environment variables set while it is checked and timed
    (the backward included), e.g. a kernel variant the native op chooses at run time."""
    fn: Callable
    needs: tuple[str, ...] = ()
    mutates: bool = False
    modes: tuple[str, ...] | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Case:
    """One shape of one op. ``inputs()`` makes the inputs (tensors or other arguments); ``grad``: indices of the
    inputs that get gradients in fwd+bwd (a Parameter is used as is, other tensors are detached and made leaves);
    ``reference(inputs, grad, g)`` -> (output, [gradients]) in float64; ``out_shape``: the output's shape when it
    is not a scalar (the backward then takes a random upstream gradient of that shape); ``bytes``/``flops``: the
    minimal traffic / arithmetic per mode."""
    section: str
    name: str
    dtype: torch.dtype
    inputs: Callable[[], list]
    grad: tuple[int, ...]
    reference: Callable
    cands: dict[str, Cand]
    tol: float
    out_shape: tuple[int, ...] | None = None
    bytes: dict[str, float] = field(default_factory=dict)
    flops: dict[str, float] = field(default_factory=dict)
    modes: tuple[str, ...] = (FWD, FWD_BWD)


def tolerance(dtype: torch.dtype, products: bool = False) -> float:
    """Largest ||out - ref|| / ||ref|| accepted: bf16 and fp16 by their rounding (products round their operands
    too); float32 ops without products stay near its rounding, products may use tf32 (cuDNN and Triton do)."""
    if dtype == torch.bfloat16:
        return 2e-2
    if dtype == torch.float16:
        return 5e-3
    if dtype == torch.float32:
        return 2e-3 if products else 1e-5
    return 1e-9


def dname(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}.get(
        dtype, str(dtype))


def ref_dtype(dtype: torch.dtype) -> torch.dtype:
    """The reference's precision: float32 for half-precision inputs (what fastnn.reference computes them in; far
    below their tolerance, and half the memory of float64 at the largest shapes), float64 otherwise."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else torch.float64


def autograd_reference(fn: Callable) -> Callable:
    """Case.reference from a differentiable plain-PyTorch function (fastnn.reference's return their input's
    dtype), evaluated on upcast copies of the inputs (ref_dtype), gradients by autograd."""
    def ref(inputs, grad, g):
        xs = [t.detach().to(ref_dtype(t.dtype)).requires_grad_(i in grad)
              if torch.is_tensor(t) and t.is_floating_point() else t for i, t in enumerate(inputs)]
        out = fn(*xs)
        up = None if g is None else g.to(out.dtype)
        grads = list(torch.autograd.grad(out, [xs[i] for i in grad], up)) if grad else []
        return out.detach(), grads
    return ref


# ---- the runner --------------------------------------------------------------------------------------------------

class Runner:
    def __init__(self, args, env: Env):
        self.args, self.env, self.device = args, env, args.device
        self.repeats = args.repeats or (3 if args.quick or args.tiny else 5)
        self.rows: list[dict] = []
        self.t_start = time.monotonic()
        self.t_end = self.t_start + args.budget
        self.deadline = self.t_end
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = ""
        self.meta = dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                         commit=harness.commit(), gpu=harness.machine(self.device),
                         driver=harness.driver_version() if env.cuda else "", torch=torch.__version__,
                         triton=triton_version, device=self.device)
        self.copy_gbs = float("nan")
        self.gemm_tflops = float("nan")

    # -- time budget
    def start_section(self, weight: float, later: float) -> None:
        """Gives the section its share of the time left: weight / (weight + the later sections' weights)."""
        now = time.monotonic()
        self.deadline = now + max(0.0, self.t_end - now) * weight / (weight + later)

    def out_of_time(self) -> bool:
        return time.monotonic() >= min(self.deadline, self.t_end)

    # -- rows
    def record(self, case: Case | None, impl: str, mode: str, status: str, *, section: str = "", name: str = "",
               dtype: str = "", t: float | None = None, peak: float | None = None, err: float | None = None,
               nbytes: float | None = None, flops: float | None = None) -> dict:
        row = dict(self.meta, section=case.section if case else section, case=case.name if case else name,
                   dtype=dname(case.dtype) if case else dtype, mode=mode, impl=impl, status=status, time_ms=t,
                   ratio_vs_eager=None, rel_err=err, bytes=nbytes, gbps=None, frac_copy_bw=None, flops=flops,
                   tflops=None, peak_extra_mib=peak, copy_gbs=self.copy_gbs, gemm_tflops=self.gemm_tflops)
        if t is not None and t == t and t > 0:
            if nbytes:
                row["gbps"] = nbytes / (t * 1e-3) / 1e9
                row["frac_copy_bw"] = row["gbps"] / self.copy_gbs
            if flops:
                row["tflops"] = flops / (t * 1e-3) / 1e12
        self.rows.append(row)
        return row

    def ceilings(self) -> None:
        """The machine's two ceilings, measured in this run: copy bandwidth and a matrix product's rate."""
        tiny = self.args.tiny
        mib = 64 if tiny else (1024 if self.env.cuda else 256)
        self.copy_gbs = harness.copy_bandwidth_gbs(self.device, mib)
        n, dt = (512, FP32) if tiny or not self.env.cuda else (8192, BF16)
        self.gemm_tflops = harness.gemm_tflops(self.device, n, dt)
        print(f"# side-by-side on {self.meta['gpu']} ({self.device}), driver {self.meta['driver'] or '-'}, torch "
              f"{self.meta['torch']}, triton {self.meta['triton'] or '-'}, commit {self.meta['commit']}, "
              f"{self.meta['date']} UTC")
        print(f"# ceilings: copy {self.copy_gbs:.1f} GB/s (read + write, {2 * mib} MiB moved); {n}^3 {dname(dt)} "
              f"matrix product {self.gemm_tflops:.3g} TFLOP/s\n")
        copy = self.record(None, "device-copy", "ceiling", "ok", section="ceilings", name=f"{mib} MiB copy",
                           dtype="fp32", nbytes=2 * mib * 2**20)
        copy.update(gbps=self.copy_gbs, frac_copy_bw=1.0)
        gemm = self.record(None, "matmul", "ceiling", "ok", section="ceilings", name=f"{n}^3 matmul",
                           dtype=dname(dt), flops=2 * n ** 3)
        gemm.update(tflops=self.gemm_tflops)

    # -- one case
    def run_case(self, case: Case) -> None:
        dev = self.device
        if self.out_of_time():
            for impl, c in case.cands.items():
                for mode in c.modes or case.modes:
                    self.record(case, impl, mode, "skipped (budget)")
            return
        inputs = case.inputs()
        g = torch.randn(case.out_shape, device=dev, dtype=case.dtype) if case.out_shape else None
        ref = None
        for impl, c in case.cands.items():
            with mock.patch.dict(os.environ, c.env):
                ref = self.run_cand(case, impl, c, inputs, g, ref)
        del inputs, ref, g
        self._free()

    def run_cand(self, case: Case, impl: str, c: Cand, inputs: list, g, ref):
        """Checks and times one candidate; returns the case's reference (computed by the first that needs it)."""
        dev = self.device
        modes = [m for m in (c.modes or case.modes) if m in case.modes]
        why = self.env.missing(c.needs)
        if why is None and self.out_of_time():
            why = "skipped (budget)"
        if why is not None:
            for mode in modes:
                self.record(case, impl, mode, why)
            return ref
        own = list(inputs)
        if c.mutates:  # a private copy of the input it overwrites
            own[0] = inputs[0].detach().clone()
        leaves = [own[i] if isinstance(own[i], torch.nn.Parameter) else own[i].detach().requires_grad_()
                  for i in case.grad]
        graded = list(own)
        for i, leaf in zip(case.grad, leaves):
            graded[i] = leaf

        def call_fwd(fn=c.fn, xs=own):
            with torch.no_grad():
                return fn(*xs)

        def call_fwd_bwd(fn=c.fn, xs=graded, leaves=leaves):
            # Views of the leaves, as a model's activations are non-leaves: a leaf's AccumulateGrad would copy an
            # in-place gradient out of its storage, timing a copy no model makes.
            ys = list(xs)
            for i in case.grad:
                if not isinstance(ys[i], torch.nn.Parameter):
                    ys[i] = ys[i].view(ys[i].shape)
            out = fn(*ys)
            out.backward(g)
            for t in leaves:
                t.grad = None
            return out

        # Validation against the reference, on this case's inputs.
        try:
            if ref is None:
                ref = case.reference(inputs, case.grad if FWD_BWD in case.modes else (), g)
            err = self.validate(case, c, own, graded, leaves, g, ref, FWD_BWD in modes)
        except Exception as e:
            for mode in modes:
                self.record(case, impl, mode, f"error: {type(e).__name__}: {e}"[:200].replace("\n", " "))
            print(f"  ! {case.section} {case.name} {impl}: {type(e).__name__}: {str(e)[:300]}")
            self._free()
            return ref
        if not err <= case.tol:
            for mode in modes:
                self.record(case, impl, mode, f"invalid: error {err:.2e} > {case.tol:.0e}", err=err)
            print(f"  ! {case.section} {case.name} {impl}: disagrees with the reference ({err:.2e} > "
                  f"{case.tol:.0e})")
            return ref
        for mode in modes:
            call = call_fwd if mode == FWD else call_fwd_bwd
            try:
                t = harness.time_ms(call, dev, self.repeats)
                peak = harness.peak_extra_mb(call, dev)
                self.record(case, impl, mode, "ok", t=t, peak=peak, err=err, nbytes=case.bytes.get(mode),
                            flops=case.flops.get(mode))
            except Exception as e:
                self.record(case, impl, mode, f"error: {type(e).__name__}: {e}"[:200].replace("\n", " "))
                print(f"  ! {case.section} {case.name} {impl} {mode}: {type(e).__name__}: {str(e)[:300]}")
                self._free()
        del own, graded, leaves
        return ref

    def validate(self, case, c, own, graded, leaves, g, ref, with_grads) -> float:
        """The worst relative error of the output and (with_grads) the gradients against the reference."""
        ref_out, ref_grads = ref
        if not with_grads:
            with torch.no_grad():
                return harness.rel_err(c.fn(*own), ref_out)
        ys = list(graded)
        for i in case.grad:
            if not isinstance(ys[i], torch.nn.Parameter):
                ys[i] = ys[i].view(ys[i].shape)
        out = c.fn(*ys)
        # The forward before the backward: an in-place backward overwrites what the output was computed from.
        err = harness.rel_err(out, ref_out)
        out.backward(g)
        for leaf, r in zip(leaves, ref_grads):
            err = max(err, float("inf") if leaf.grad is None else harness.rel_err(leaf.grad, r))
            leaf.grad = None
        return err

    def _free(self) -> None:
        gc.collect()
        if self.env.cuda:
            torch.cuda.empty_cache()

    # -- output
    def ratios(self) -> None:
        eager = {(r["section"], r["case"], r["dtype"], r["mode"]): r["time_ms"] for r in self.rows
                 if r["impl"] == EAGER and r["status"] == "ok"}
        for r in self.rows:
            e = eager.get((r["section"], r["case"], r["dtype"], r["mode"]))
            if e and r["status"] == "ok":
                r["ratio_vs_eager"] = r["time_ms"] / e

    def table(self) -> str:
        fmt = lambda v, f: "" if v is None or v != v else format(v, f)  # noqa: E731
        lines = ["| section | case | dtype | mode | impl | status | time ms | vs eager | of copy BW | TFLOP/s | "
                 "peak extra MiB |", "|---|---|---|---|---|---|---:|---:|---:|---:|---:|"]
        not_run: dict[tuple[str, str], str] = {}
        for r in self.rows:
            if r["section"] == "ceilings":
                continue
            if r["status"].startswith(NOT_RUN):
                not_run.setdefault((r["section"], r["impl"]), r["status"])
                continue
            lines.append(f"| {r['section']} | {r['case']} | {r['dtype']} | {r['mode']} | {r['impl']} | "
                         f"{r['status'][:40]} | {fmt(r['time_ms'], '.3f')} | {fmt(r['ratio_vs_eager'], '.2f')} | "
                         f"{fmt(r['frac_copy_bw'], '.0%')} | {fmt(r['tflops'], '.0f')} | "
                         f"{fmt(r['peak_extra_mib'], '.0f')} |")
        if not_run:
            lines.append("")
            lines.append("Not timed (first reason per section and candidate): " + "; ".join(
                f"{s} {i}: {why}" for (s, i), why in not_run.items()))
        return "\n".join(lines)

    def finish(self, goals: list[str], plot: bool = True) -> None:
        self.ratios()
        head = (f"# side-by-side: {self.meta['gpu']} ({self.device}), driver {self.meta['driver'] or '-'}, torch "
                f"{self.meta['torch']}, triton {self.meta['triton'] or '-'}, commit {self.meta['commit']}, "
                f"{self.meta['date']} UTC; copy {self.copy_gbs:.1f} GB/s, matrix product {self.gemm_tflops:.3g} "
                f"TFLOP/s; {time.monotonic() - self.t_start:.0f} s")
        text = "\n".join([head, "", self.table(), "", "## Goals", *goals])
        print("\n" + text)
        if self.args.no_save:
            return
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / CSV_NAME
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(self.rows[0].keys()), extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerows(self.rows)
        (out / f"side_by_side_{self.device}.md").write_text(text + "\n")
        print(f"\n{len(self.rows)} rows appended to {path}; table {out / f'side_by_side_{self.device}.md'}", flush=True)
        if not plot:  # interrupted: the runbook kills the process seconds after its SIGINT
            print("no plots (interrupted)")
            return
        pngs = plots(self.rows, out, self.device, head)
        print(f"plots {', '.join(pngs)}" if pngs else "no plots (matplotlib is not installed)")


# ---- the candidates and shapes of each section -------------------------------------------------------------------

def fastnn_cands(op: str, call: Callable[[str], Callable], inplace: Callable[[str], Callable] | None = None
                 ) -> dict[str, Cand]:
    """fastnn's two backends (and their in-place-backward variants, fwd+bwd only: their forward is the same)."""
    c = {"fastnn-triton": Cand(call("triton"), ("triton",)), "fastnn-native": Cand(call("native"), (f"native:{op}",))}
    if inplace is not None:
        c["fastnn-triton-inplace"] = Cand(inplace("triton"), ("triton",), mutates=True, modes=(FWD_BWD,))
        c["fastnn-native-inplace"] = Cand(inplace("native"), (f"native:{op}",), mutates=True, modes=(FWD_BWD,))
    return c


def grad_in_forward_cands(op: str, call: Callable[[str], Callable]) -> dict[str, Cand]:
    """fastnn's two backends with the gradients made in the forward (fwd+bwd only: a forward alone is the plain
    path's)."""
    return {f"fastnn-{b}-grad-in-fwd": Cand(call(b), ("triton",) if b == "triton" else (f"native:{op}",),
                                            modes=(FWD_BWD,)) for b in ("triton", "native")}


def compiled(fn: Callable) -> Cand:
    """torch.compile of fn, compiled on first use (so an unavailable candidate costs nothing); one graph per shape,
    dtype and grad mode (dynamic=False), as a model of fixed shapes gets."""
    holder: list[Callable] = []

    def run(*a):
        if not holder:
            holder.append(torch.compile(fn, dynamic=False))
        return holder[0](*a)
    return Cand(run, ("compile",))


def liger(env: Env, name: str, *, mutates: bool = False) -> Cand:
    return Cand(lambda *a: getattr(env.module("liger"), name)(*a), ("liger", "triton"), mutates=mutates)


def softmax_cases(env: Env, shapes, log: bool) -> list[Case]:
    section = "log_softmax" if log else "softmax"
    torch_fn = torch.log_softmax if log else torch.softmax
    ours = F.log_softmax if log else F.softmax
    cands = {EAGER: Cand(lambda x: torch_fn(x, -1)), COMPILE: compiled(lambda x: torch_fn(x, -1)),
             **fastnn_cands("softmax", lambda b: lambda x: ours(x, -1, backend=b))}
    if not log:  # Liger has no log-softmax
        cands["liger"] = liger(env, "liger_softmax")
    ref = autograd_reference(lambda x: (R.log_softmax if log else R.softmax)(x, -1))
    cases = []
    for dtype, rows, n in shapes:
        s = torch.finfo(dtype).bits // 8
        # fwd: read x, write y. bwd: read dy and y (the saved output), write dx.
        cases.append(Case(section, f"{rows}x{n}", dtype, lambda rows=rows, n=n, dtype=dtype: [
            torch.randn(rows, n, device=env.device, dtype=dtype)], (0,), ref, cands, tolerance(dtype),
            out_shape=(rows, n), bytes={FWD: 2 * rows * n * s, FWD_BWD: 5 * rows * n * s}))
    return cases


def cross_entropy_cases(env: Env, shapes) -> list[Case]:
    cands = {EAGER: Cand(TF.cross_entropy), COMPILE: compiled(TF.cross_entropy),
             **fastnn_cands("cross_entropy", lambda b: lambda x, t: F.cross_entropy(x, t, backend=b),
                            lambda b: lambda x, t: F.cross_entropy(x, t, inplace_backward=True, backend=b)),
             # The gradient written right after each row's loss, the row still in cache: one read from memory.
             **grad_in_forward_cands("cross_entropy",
                                     lambda b: lambda x, t: F.cross_entropy(x, t, backend=b, grad_in_forward=True)),
             # Liger writes the gradient into the logits during the forward.
             "liger": liger(env, "liger_cross_entropy", mutates=True)}
    ref = autograd_reference(R.cross_entropy)
    cases = []
    for dtype, n, v in shapes:
        s = torch.finfo(dtype).bits // 8
        # fwd: read the logits (the targets and the loss are N and 1 elements). bwd: read the logits (or their
        # saved form) again, write their gradient. A kernel that writes the gradient during the forward moves 2
        # N V s, so its fwd+bwd fraction can pass 100%.
        cases.append(Case("cross_entropy", f"N={n},V={v}", dtype, lambda n=n, v=v, dtype=dtype: [
            torch.randn(n, v, device=env.device, dtype=dtype), torch.randint(0, v, (n,), device=env.device)],
            (0,), ref, cands, tolerance(dtype), bytes={FWD: n * v * s, FWD_BWD: 3 * n * v * s}))
    return cases


def bce_cases(env: Env, shapes) -> list[Case]:
    cands = {EAGER: Cand(TF.binary_cross_entropy_with_logits), COMPILE: compiled(TF.binary_cross_entropy_with_logits),
             **fastnn_cands("bce_with_logits",
                            lambda b: lambda x, y: F.binary_cross_entropy_with_logits(x, y, backend=b))}
    ref = autograd_reference(R.binary_cross_entropy_with_logits)
    cases = []
    for dtype, n, c in shapes:
        s = torch.finfo(dtype).bits // 8
        # fwd: read logits and targets (the mean is one element). bwd: read both again, write the logits' gradient.
        cases.append(Case("bce_with_logits", f"{n}x{c}", dtype, lambda n=n, c=c, dtype=dtype: [
            torch.randn(n, c, device=env.device, dtype=dtype), torch.rand(n, c, device=env.device, dtype=dtype)],
            (0,), ref, cands, tolerance(dtype), bytes={FWD: 2 * n * c * s, FWD_BWD: 5 * n * c * s}))
    return cases


def linear_cross_entropy_cases(env: Env, shapes) -> list[Case]:
    def eager(x, w, t):
        return TF.cross_entropy(TF.linear(x, w), t)

    cands = {EAGER: Cand(eager), COMPILE: compiled(eager),
             **fastnn_cands("linear_cross_entropy",
                            lambda b: lambda x, w, t: F.linear_cross_entropy(x, w, t, backend=b)),
             # The gradients made in the forward, three products as Liger's.
             **grad_in_forward_cands("linear_cross_entropy", lambda b: lambda x, w, t: F.linear_cross_entropy(
                 x, w, t, backend=b, grad_in_forward=True)),
             "liger": liger(env, "liger_fused_linear_cross_entropy"),
             # Cut Cross-Entropy with its defaults (gradient filtering on): what its users run.
             "cut-cross-entropy": Cand(lambda x, w, t: env.module("cce").linear_cross_entropy(x, w, t),
                                       ("cce", "cuda"))}
    if hasattr(TF, "linear_cross_entropy"):  # torch >= 2.13: its chunked path
        opts = torch.nn.LinearCrossEntropyOptions()
        cands["torch-lce-chunked"] = Cand(lambda x, w, t: TF.linear_cross_entropy(x, w, t, options=opts))
    ref = autograd_reference(R.linear_cross_entropy)
    cases = []
    for dtype, n, d, v in shapes:
        def inputs(n=n, d=d, v=v, dtype=dtype):
            return [torch.randn(n, d, device=env.device, dtype=dtype),
                    (torch.randn(v, d, device=env.device) / d ** 0.5).to(dtype),
                    torch.randint(0, v, (n,), device=env.device)]
        # The logits product forward; fwd+bwd adds the two gradient products (a recomputing backward does a
        # fourth, not counted: the rate is of the work the op needs).
        cases.append(Case("linear_cross_entropy", f"N={n},D={d},V={v}", dtype, inputs, (0, 1), ref, cands,
                          tolerance(dtype, products=True), flops={FWD: 2 * n * d * v, FWD_BWD: 6 * n * d * v}))
    return cases


def sdpa(backend_name: str | None, causal: bool) -> Callable:
    def f(q, k, v):
        if backend_name is None:
            return TF.scaled_dot_product_attention(q, k, v, is_causal=causal)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return TF.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return f


def attention_reference(causal: bool) -> Callable:
    """fastnn.reference's attention (in ref_dtype), (batch, head) slices at a time: each slice is independent, and
    whole (L, L) score matrices for every head at L = 16384 would not fit."""
    def ref(inputs, grad, g):
        q, k, v = inputs
        B, H, L, D = q.shape
        bh = B * H
        flat = [t.reshape(bh, t.shape[-2], t.shape[-1]) for t in (q, k, v)]
        gf = g.reshape(bh, L, -1) if g is not None else None
        rd = ref_dtype(q.dtype)
        # ~4 GiB of score-sized buffers (scores, probabilities, their gradients) a slice
        step = max(1, int(2**32 // (rd.itemsize * 6 * L * k.shape[-2])))
        outs, grads = [], [[], [], []]
        for s in range(0, bh, step):
            xs = [t[s:s + step].detach().to(rd).requires_grad_(bool(grad))[None] for t in flat]
            o = R.scaled_dot_product_attention(*xs, is_causal=causal)
            if grad:
                for acc, gr in zip(grads, torch.autograd.grad(o, xs, gf[s:s + step].to(rd)[None])):
                    acc.append(gr[0])
            outs.append(o.detach()[0])
        shape = lambda ts, like: torch.cat(ts).reshape(like.shape)  # noqa: E731
        return shape(outs, g if g is not None else q), [shape(gs, t) for gs, t in zip(grads, (q, k, v)) if gs]
    return ref


def attention_cases(env: Env, shapes) -> list[Case]:
    cases = []
    for dtype, B, H, L, D, causal, tag in shapes:
        cands = {**fastnn_cands("attention", lambda b, c=causal: lambda q, k, v: F.scaled_dot_product_attention(
                     q, k, v, is_causal=c, backend=b)),
                 EAGER: Cand(sdpa(None, causal))}  # SDPA's own choice of backend
        for name, needs in (("FLASH_ATTENTION", ("cuda",)), ("CUDNN_ATTENTION", ("cuda",)),
                            ("EFFICIENT_ATTENTION", ("cuda",)), ("MATH", ())):
            cands["sdpa-" + name.split("_")[0].lower()] = Cand(sdpa(name, causal), needs)
        flops = 4 * B * H * L * L * D / (2 if causal else 1)
        cases.append(Case("attention", f"B={B},H={H},L={L},D={D}{',causal' if causal else ''}{tag}", dtype,
                          lambda B=B, H=H, L=L, D=D, dtype=dtype: [
                              torch.randn(B, H, L, D, device=env.device, dtype=dtype) for _ in range(3)],
                          (0, 1, 2), attention_reference(causal), cands, tolerance(dtype, products=True),
                          out_shape=(B, H, L, D), flops={FWD: flops, FWD_BWD: 3.5 * flops},
                          modes=(FWD_BWD,) if tag else (FWD, FWD_BWD)))
    return cases


def lstm_reference(x, w_ih, w_hh, b_ih, b_hh):
    h = c = x.new_zeros(x.shape[1], w_hh.shape[1])
    outs = []
    for t in range(x.shape[0]):
        h, c = R.lstm_cell(x[t], (h, c), w_ih, w_hh, b_ih, b_hh)
        outs.append(h)
    return torch.stack(outs)


def lstm_cases(env: Env, shapes) -> list[Case]:
    cases = []
    for dtype, T, B, H in shapes:
        holder: dict = {}

        def inputs(T=T, B=B, H=H, dtype=dtype, holder=holder):
            # torch.nn.LSTM (cuDNN on CUDA) and fastnn.nn.LSTM sharing its Parameters.
            holder["torch"] = theirs = torch.nn.LSTM(H, H, device=env.device, dtype=dtype)
            holder["fastnn"] = fastnn.nn.LSTM.from_torch(theirs)
            return [torch.randn(T, B, H, device=env.device, dtype=dtype), *theirs._flat_weights]

        def ours(backend, holder=holder):
            def f(x, *w):
                with fastnn.use_backend(backend):
                    return holder["fastnn"](x)[0]
            return f

        cands = {EAGER: Cand(lambda x, *w, holder=holder: holder["torch"](x)[0]),
                 "fastnn-triton": Cand(ours("triton"), ("triton",)),
                 "fastnn-native": Cand(ours("native"), ("native:lstm_layer",))}
        if env.cuda and dtype in (torch.float16, torch.bfloat16):
            # The native op's two recurrences forced, beside its own choice: the persistent kernels wherever they
            # can run, and the step loop (a cuBLAS product and a cell launch per step).
            for tag, setting in (("persistent", "1"), ("step-loop", "0")):
                cands[f"fastnn-native-{tag}"] = Cand(ours("native"), ("native:lstm_layer",),
                                                     env={"FASTNN_LSTM_PERSISTENT": setting})
        flops = 2 * T * B * 4 * H * (H + H)  # the input and recurrent products of every step
        cases.append(Case("lstm", f"T={T},B={B},H={H}", dtype, inputs, (0, 1, 2, 3, 4),
                          autograd_reference(lstm_reference), cands, tolerance(dtype, products=True),
                          out_shape=(T, B, H), flops={FWD: flops, FWD_BWD: 3 * flops}))
    return cases


def translator_rows(r: Runner, preset: str, n: int, length: int, vocab: int) -> None:
    """The translator's training step with kernels=torch and kernels=fastnn (bf16 autocast on CUDA): time and
    peak memory. Checked first, from the same weights: fastnn's loss and gradients against the torch-kernels
    model's in float32 (fastnn.reference has no whole model)."""
    from bench_translator import batch, train_step

    name = f"transformer-{preset} {n}x{length}"
    dt = "bf16-autocast" if r.env.cuda else "fp32"
    impls = (EAGER, "fastnn")
    if r.out_of_time():
        for impl in impls:
            r.record(None, impl, STEP, "skipped (budget)", section="translator", name=name, dtype=dt)
        return
    data = batch(n, length, vocab, r.device)
    built = {impl: train_step("transformer", preset, k, vocab, data, r.device)
             for impl, k in zip(impls, ("torch", "fastnn"))}
    built["fastnn"][0].load_state_dict(built[EAGER][0].state_dict())

    def loss_and_grads(impl, amp=True):
        model, step = built[impl]
        loss = step(update=False, amp=amp)
        grads = {k: p.grad.flatten().double() for k, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return loss, sorted(grads), torch.cat([grads[k] for k in sorted(grads)])

    def error(a, b):  # the worse of the loss's and the gradients' relative errors
        return max(harness.rel_err(a[0], b[0]), harness.rel_err(a[2], b[2])) if a[1] == b[1] else float("inf")

    # Validation, from the same weights: the float32 run of the torch-kernels model (no autocast) is the
    # reference; fastnn's error may be up to twice torch's own (its autocast run's), or the float32 products'
    # tolerance.
    ref = loss_and_grads(EAGER, amp=False)
    e_torch = error(loss_and_grads(EAGER), ref)
    err = error(loss_and_grads("fastnn"), ref)
    tol = max(2 * e_torch, tolerance(FP32, products=True))
    del ref
    for impl, (model, step) in built.items():
        if impl != EAGER and not err <= tol:
            r.record(None, impl, STEP, f"invalid: error {err:.2e} > {tol:.0e}", section="translator", name=name,
                     dtype=dt, err=err)
            continue
        t = harness.time_ms(step, r.device, r.repeats)
        r.record(None, impl, STEP, "ok", section="translator", name=name, dtype=dt, t=t,
                 peak=harness.peak_extra_mb(step, r.device), err=e_torch if impl == EAGER else err)
    del built
    r._free()


def plan(args, env: Env) -> list[tuple[str, float, Callable[[Runner], None]]]:
    """(section, weight, run) in order. Full: the shapes of the GPU speed issue; --quick: the goal shapes;
    --tiny: the same code on shapes a CPU runs in seconds."""
    tiny, quick = args.tiny, args.quick
    both = (BF16, FP32)  # bf16 first: the training dtype, kept when the budget cuts a section short
    if tiny:  # both dtypes where the op is memory-bound, float32 for the rest: seconds on a CPU
        sm = [(d, 8, n) for d in both for n in (300, 1000)]
        lsm = [(d, 8, 1000) for d in both]
        ce = [(d, 16, 1000) for d in both]
        bce = [(d, 16, 64) for d in both]
        lce = [(FP32, 16, 32, 300)]
        att = [(FP32, 1, 2, 64, 16, c, "") for c in (False, True)] + [(FP32, 1, 1, 128, 16, False, " memory")]
        lstm = [(FP32, 4, 2, 16)]
        tr = ("tiny", 4, 6, 200)
    elif quick:
        sm = [(BF16, 4096, n) for n in (32000, 128256)]
        lsm = [(BF16, 4096, 32000)]
        ce = [(BF16, 8192, 128256)]
        bce = [(BF16, 8192, 4096)]
        lce = [(BF16, 8192, 4096, 128256)]
        att = [(BF16, 4, 16, 4096, 128, c, "") for c in (False, True)] + [(BF16, 1, 16, 16384, 128, False,
                                                                             " memory")]
        lstm = [(FP32, 64, 32, 512)]
        tr = ("course", 100, 30, 8000)
    else:
        sm = [(d, 4096, n) for d in both for n in (4096, 32000, 128256)]
        lsm = sm
        ce = [(d, 8192, v) for d in both for v in (32000, 128256)]
        bce = [(d, 8192, 4096) for d in both]
        lce = [(BF16, 8192, 4096, 128256), (BF16, 8192, 512, 32000)]
        # B*H*L = 64*4096 throughout; L = 16384 for the memory (fwd+bwd only). The goal shapes first.
        att = [(BF16, 4, 16, 4096, 128, c, "") for c in (False, True)] + \
              [(BF16, 1, 16, 16384, 128, c, " memory") for c in (False, True)] + \
              [(BF16, 4, 16, 4096, 64, c, "") for c in (False, True)]
        lstm = [(d, 64, b, h) for d in both for b, h in ((32, 512), (128, 1024))]
        tr = ("course", 400, 30, 8000)

    def cases(make):
        def run(r: Runner):
            for case in make():
                r.run_case(case)
        run.cases = make  # for --list
        return run

    # Weights: roughly each section's share of the work (compiles included) at full size.
    return [("softmax", 3, cases(lambda: softmax_cases(env, sm, log=False))),
            ("log_softmax", 2, cases(lambda: softmax_cases(env, lsm, log=True))),
            ("cross_entropy", 2.5, cases(lambda: cross_entropy_cases(env, ce))),
            ("bce_with_logits", 1, cases(lambda: bce_cases(env, bce))),
            ("linear_cross_entropy", 2, cases(lambda: linear_cross_entropy_cases(env, lce))),
            ("attention", 3, cases(lambda: attention_cases(env, att))),
            ("lstm", 1.5, cases(lambda: lstm_cases(env, lstm))),
            ("translator", 1, lambda r: translator_rows(r, *tr))]


# ---- the goals ---------------------------------------------------------------------------------------------------

def goals(rows: list[dict], tiny: bool) -> list[str]:
    """Each goal of the GPU speed issue with its measured value (worst case over the shapes), met or missed.
    Every ratio is between two rows of this run."""
    ok = [r for r in rows if r["status"] == "ok"]
    note = " (tiny shapes: not a goal run)" if tiny else ""
    out = []

    def find(section, impl, **kw):
        return [r for r in ok if r["section"] == section and r["impl"] == impl and
                all(r[k] == v if not callable(v) else v(r[k]) for k, v in kw.items())]

    def twin(r, impl):
        m = [x for x in ok if x["impl"] == impl and all(x[k] == r[k] for k in ("section", "case", "dtype", "mode"))]
        return m[0] if m else None

    def line(goal, value, met, where=""):
        out.append(f"- {goal}: {value}{f' ({where})' if where else ''} -> "
                   f"{'not measured' if met is None else 'met' if met else 'MISSED'}{note}")

    mem_sections = ("softmax", "log_softmax", "cross_entropy", "bce_with_logits")
    # (the -grad-in-fwd variants: cross-entropy's fwd+bwd only)
    for ours in ("fastnn-triton", "fastnn-native", "fastnn-triton-grad-in-fwd", "fastnn-native-grad-in-fwd"):
        rs = [r for s in mem_sections for r in find(s, ours)]
        if rs:
            w = min(rs, key=lambda r: r["frac_copy_bw"])
            line(f"{ours} softmax/log-softmax/CE/BCE >= 85% of copy bandwidth, fwd and fwd+bwd",
                 f"worst {w['frac_copy_bw']:.0%}", w["frac_copy_bw"] >= 0.85,
                 f"{w['section']} {w['case']} {w['dtype']} {w['mode']}")
        else:
            line(f"{ours} softmax/log-softmax/CE/BCE >= 85% of copy bandwidth", "no rows", None)
        for rival in ("liger", COMPILE):
            pairs = [(r, twin(r, rival)) for r in rs]
            pairs = [(r, o) for r, o in pairs if o]
            if pairs:
                r, o = max(pairs, key=lambda p: p[0]["time_ms"] / p[1]["time_ms"])
                q = r["time_ms"] / o["time_ms"]
                line(f"{ours} faster than {rival} at every shape", f"worst {q:.2f}x its time", q < 1.0,
                     f"{r['section']} {r['case']} {r['dtype']} {r['mode']}")
            else:
                line(f"{ours} faster than {rival} at every shape", "no pairs", None)

    big = lambda c: c.endswith("D=4096,V=128256")  # noqa: E731
    for ours in ("fastnn-triton", "fastnn-native", "fastnn-triton-grad-in-fwd", "fastnn-native-grad-in-fwd"):
        rs = find("linear_cross_entropy", ours, mode=FWD_BWD, dtype="bf16", case=big)
        if not rs:
            line(f"{ours} linear+CE bf16 (4096, 128256) fwd+bwd", "no rows", None)
            continue
        r = rs[0]
        for rival, limit, key in ((EAGER, 1.0, "time_ms"), ("liger", 1.0, "time_ms"),
                                  ("cut-cross-entropy", 1.1, "peak_extra_mib")):
            o = twin(r, rival)
            if o is None or not o[key] or r[key] is None:
                line(f"{ours} linear+CE {key} <= {limit}x {rival}", "no pair", None)
                continue
            q = r[key] / o[key]
            line(f"{ours} linear+CE bf16 (4096, 128256) fwd+bwd {'time' if key == 'time_ms' else 'peak extra memory'}"
                 f" <= {limit}x {rival}", f"{q:.2f}x", q <= limit)

    for causal in (False, True):
        tag = "causal" if causal else "non-causal"
        sel = lambda c, causal=causal: "L=4096,D=128" in c and c.endswith(",causal") == causal  # noqa: E731
        rs = find("attention", "fastnn-triton", mode=FWD, dtype="bf16", case=sel)
        line(f"fastnn-triton attention bf16 D=128 L=4096 {tag} forward >= 450 TFLOP/s",
             f"{rs[0]['tflops']:.0f} TFLOP/s" if rs else "no row", rs[0]["tflops"] >= 450 if rs else None)
        rs = find("attention", "fastnn-triton", mode=FWD_BWD, dtype="bf16", case=sel)
        o = twin(rs[0], "sdpa-flash") if rs else None
        q = rs[0]["time_ms"] / o["time_ms"] if o else None
        line(f"fastnn-triton attention bf16 D=128 L=4096 {tag} fwd+bwd <= 1.0x sdpa-flash",
             f"{q:.2f}x" if q else "no pair", q <= 1.0 if q else None)
    def shape(case):  # "B=1,H=16,L=16384,D=128,causal memory" -> ({"B": 1, ...}, causal, memory)
        kv = dict(p.split("=") for p in case.split(" ")[0].split(",") if "=" in p)
        return {k: int(v) for k, v in kv.items()}, ",causal" in case, case.endswith("memory")

    for ours in ("fastnn-triton", "fastnn-native"):
        for m in find("attention", ours, mode=FWD_BWD, case=lambda c: shape(c)[2]):
            # The memory case keeps B*H*L: O(L) memory is what it is at the shorter L, O(L^2) grows with L.
            ms, mc, _ = shape(m["case"])
            base = [r for r in find("attention", ours, mode=FWD_BWD, dtype=m["dtype"])
                    if shape(r["case"])[1:] == (mc, False) and shape(r["case"])[0]["D"] == ms["D"]]
            if base and base[0]["peak_extra_mib"] and m["peak_extra_mib"] is not None:
                q = m["peak_extra_mib"] / base[0]["peak_extra_mib"]
                line(f"{ours} attention memory O(L): peak extra at {m['case']} / at {base[0]['case']}",
                     f"{q:.2f}x", q <= 1.5)
    for ours in ("fastnn-triton", "fastnn-native"):
        pairs = [(r, twin(r, EAGER)) for r in find("lstm", ours)]
        pairs = [(r, o) for r, o in pairs if o]
        if pairs:
            r, o = max(pairs, key=lambda p: p[0]["time_ms"] / p[1]["time_ms"])
            q = r["time_ms"] / o["time_ms"]
            line(f"{ours} LSTM layer <= 1.0x cuDNN nn.LSTM's time", f"worst {q:.2f}x",
                 q <= 1.0, f"{r['case']} {r['dtype']} {r['mode']}")
        else:
            line(f"{ours} LSTM layer <= 1.0x cuDNN nn.LSTM's time", "no pairs", None)
    rs = find("translator", "fastnn")
    o = twin(rs[0], EAGER) if rs else None
    if o:
        q = rs[0]["time_ms"] / o["time_ms"]
        line("translator step time <= 0.8x the torch-kernels step", f"{q:.2f}x", q <= 0.8, rs[0]["case"])
        if rs[0]["peak_extra_mib"] and o["peak_extra_mib"]:
            q = rs[0]["peak_extra_mib"] / o["peak_extra_mib"]
            line("translator step peak memory <= 0.7x the torch-kernels step", f"{q:.2f}x", q <= 0.7)
    else:
        line("translator step <= 0.8x time, <= 0.7x peak memory of the torch-kernels step", "no pair", None)
    return out


# ---- plots -------------------------------------------------------------------------------------------------------

def plots(rows: list[dict], out: Path, device: str, title: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    ok = [r for r in rows if r["status"] == "ok" and r["section"] != "ceilings"]
    made = []
    for suffix, key, label, log in (("", "ratio_vs_eager", "time / torch-eager's (lower is better)", True),
                                    ("_bw", "frac_copy_bw", "fraction of measured copy bandwidth", False)):
        sel = [r for r in ok if r[key] is not None]
        sections = list(dict.fromkeys(r["section"] for r in sel))
        if not sections:
            continue
        fig, axes = plt.subplots(len(sections), 1, figsize=(14, 3.2 * len(sections)), squeeze=False)
        for ax, s in zip(axes[:, 0], sections):
            rs = [r for r in sel if r["section"] == s]
            groups = list(dict.fromkeys((r["case"], r["dtype"], r["mode"]) for r in rs))
            impls = list(dict.fromkeys(r["impl"] for r in rs))
            w = 0.8 / len(impls)
            for j, impl in enumerate(impls):
                xs, ys = [], []
                for i, gk in enumerate(groups):
                    v = [r[key] for r in rs if r["impl"] == impl and (r["case"], r["dtype"], r["mode"]) == gk]
                    if v:
                        xs.append(i + j * w)
                        ys.append(v[0])
                ax.bar(xs, ys, width=w, label=impl)
            ax.set_xticks([i + 0.4 - w / 2 for i in range(len(groups))])
            ax.set_xticklabels([f"{c}\n{d} {m}" for c, d, m in groups], fontsize=6)
            if log:
                ax.set_yscale("log")
                ax.axhline(1.0, color="k", lw=0.6)
            else:
                ax.axhline(0.85, color="k", lw=0.6, ls="--")
            ax.set_title(s, fontsize=9)
            ax.set_ylabel(label, fontsize=7)
            ax.legend(fontsize=6, ncol=4)
            ax.grid(True, axis="y", alpha=0.3)
        fig.suptitle(title[:200], fontsize=7)
        fig.tight_layout()
        path = out / f"side_by_side_{device}{suffix}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made.append(str(path))
    return made


def print_plan(sections, env: Env) -> None:
    """What a run would do: each section's cases with their timed modes, and each candidate's status here."""
    for name, weight, run in sections:
        make = getattr(run, "cases", None)
        if make is None:
            print(f"{name} (weight {weight}): the translator step, kernels=torch and kernels=fastnn")
            continue
        cases = make()
        print(f"{name} (weight {weight}): {len(cases)} cases")
        for case in cases:
            print(f"  {case.name} {dname(case.dtype)} {'/'.join(case.modes)}")
        for impl, c in cases[0].cands.items():
            print(f"    {impl}: {env.missing(c.needs) or 'runs'}")


# ---- main --------------------------------------------------------------------------------------------------------

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the goal shapes only")
    size.add_argument("--tiny", action="store_true", help="tiny shapes: the plumbing (CPU) or a smoke run")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run (default 420; --quick 240; --tiny 120)")
    p.add_argument("--sections", default="", help="comma-separated subset of the sections, in the plan's order")
    p.add_argument("--out", default=None,
                   help="folder of the CSV, table and plots (default bench/results/gpu for CUDA, bench/results "
                        "for CPU: the GPU folder holds GPU runs only)")
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidates")
    p.add_argument("--repeats", type=int, default=None, help="CPU timing repeats (CUDA: do_bench decides)")
    p.add_argument("--list", action="store_true",
                   help="print the plan (sections, cases, candidates and whether each can run here) and exit")
    a = p.parse_args(argv)
    if a.out is None:
        a.out = str(harness.RESULTS / "gpu" if a.device == "cuda" else harness.RESULTS)
    if a.budget is None:
        a.budget = 120 if a.tiny else 240 if a.quick else 420
    return a


def main(argv=None) -> int:
    args = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("side_by_side: no CUDA device here (use --device cpu --tiny for the plumbing)")
        return 2
    # One graph per shape: past dynamo's default recompile limit (8) it would silently run the rest eagerly, and
    # rows labelled torch-compile would time eager.
    torch._dynamo.config.recompile_limit = 1024
    env = Env(args)
    r = Runner(args, env)
    # The objects of the imports (torch, Triton, dynamo) outlive the run: out of the collector's way, so that the
    # gc.collect() before every memory measurement scans only what the bench made.
    gc.freeze()
    sections = plan(args, env)
    wanted = [s for s in args.sections.split(",") if s]
    unknown = set(wanted) - {s for s, _, _ in sections}
    if unknown:
        raise SystemExit(f"side_by_side: unknown sections {sorted(unknown)}; known: {[s for s, _, _ in sections]}")
    sections = [s for s in sections if not wanted or s[0] in wanted]
    if args.list:
        print_plan(sections, env)
        return 0
    interrupted = False
    try:
        r.ceilings()
        for i, (name, weight, run) in enumerate(sections):
            r.start_section(weight, sum(w for _, w, _ in sections[i + 1:]))
            t0 = time.monotonic()
            print(f"== {name} ({r.deadline - t0:.0f} s of {r.t_end - t0:.0f} s left)", flush=True)
            run(r)
            print(f"   {name}: {time.monotonic() - t0:.0f} s", flush=True)
    except KeyboardInterrupt:  # the runbook's timeout: keep what was measured
        interrupted = True
        print("\nside_by_side: interrupted; writing the rows measured so far")
    if not r.rows:
        return 1
    r.finish(goals(r.rows, args.tiny), plot=not interrupted)
    bad = [x for x in r.rows if x["status"].startswith(("invalid", "error"))]
    ours = [x for x in bad if x["impl"].startswith("fastnn")]
    print(f"\nside_by_side: {sum(x['status'] == 'ok' for x in r.rows)} rows timed, {len(bad)} invalid or failed "
          f"({len(ours)} of fastnn's), "
          f"{sum(x['status'].startswith('absent') for x in r.rows)} absent, "
          f"{sum(x['status'].startswith('skipped') for x in r.rows)} skipped for time"
          + (", interrupted" if interrupted else ""))
    return 1 if ours or interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
