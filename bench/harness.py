"""Shared benchmark harness: times implementations side by side in one run and records the results.

    from harness import Bench
    b = Bench("softmax")                       # parses --quick, --device, --repeats, --no-save, --no-thp
    b.compare(case="4096x32000", series="fwd+bwd", x=32000, like=x, bytes=...,
              fns={"torch-eager": f1, "fastnn-native": f2})
    b.finish()                                 # markdown table, CSV rows, PNG plot

CPU protocol (the one every CPU goal is measured under): the implementations of a case run interleaved in one
process, round by round in a rotating order, with a torch autograd op on a tensor of the case's size
(tanh forward and backward, ``like``) before every timed call, as a model's other layers run between two calls
of one op; medians and the spread ((max - min) / median) of the rounds. torch's own CPU allocator is measured
twice: in this process (its default) and, unless --no-thp, in a second process with THP_MEM_ALLOC_ENABLE=1
(torch's switch for huge-page-backed CPU allocations), whose rows come back as ``<impl>+thp``. Every
implementation runs in both, since fastnn's modules allocate through torch too (all but the fastnn kernels' own
outputs), so a model's step depends on that setting as much as torch's does. "vs eager" is
each row's time over torch eager's in the faster of the two settings (the reference of the goals), "vs best torch"
over the fastest torch row of its case and series, eager or compiled.
GPU: ``triton.testing.do_bench`` (median) per implementation.

Peak memory: the extra memory a call needs beyond what existed before it (CPU: the process's resident
high-water mark, reset through /proc/self/clear_refs; GPU: the caching allocator's peak). Bandwidth is reported
as a fraction of the machine's copy bandwidth measured in the same run, so numbers from different machines
compare. Rows go to bench/results/<op>.csv with machine, date and commit; plots to
bench/results/<op>_<device>.png.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import fastnn

RESULTS = Path(__file__).resolve().parent / "results"
EAGER = "torch-eager"  # the implementation every ratio is taken against
THP = "+thp"  # suffix of the rows torch ran with THP_MEM_ALLOC_ENABLE=1


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} x{os.cpu_count()} cores, {torch.get_num_threads()} threads"


def commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        # bench/results is what the benches write: a run that saved rows must not label the next one dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], cwd=root, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable, device: str, repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn() in milliseconds."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=max(100, 20 * repeats), return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def interleaved_ms(fns: dict[str, Callable], between: Callable | None, repeats: int, warmup: int = 2,
                   ) -> dict[str, list[float]]:
    """Wall times in ms of every fn, `repeats` rounds, each round running all of them in a rotating order with
    between() (untimed) before each call. A failing fn is dropped from the later rounds; its entry is the
    exception."""
    names = list(fns)
    out: dict[str, list[float] | Exception] = {n: [] for n in names}
    for n in names:
        try:
            for _ in range(warmup):
                fns[n]()
        except Exception as e:  # one failing implementation must not lose the others' numbers
            out[n] = e
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            if isinstance(out[n], Exception):
                continue
            if between is not None:
                between()
            try:
                t0 = time.perf_counter()
                fns[n]()
                out[n].append((time.perf_counter() - t0) * 1e3)
            except Exception as e:
                out[n] = e
    return out


def autograd_op_like(t: torch.Tensor, device: str) -> Callable:
    """A torch autograd op on a float tensor of t's size (tanh, forward and backward, a dense gradient): what a
    model's other layers do between two calls of the op under test. t may be a meta tensor."""
    a = torch.randn(t.numel(), device=device, requires_grad=True)
    g = torch.randn(t.numel(), device=device)

    def op():
        torch.tanh(a).backward(g)
        a.grad = None

    return op


def forward_backward(f: Callable, inputs: tuple, grad: torch.Tensor, *args) -> Callable:
    """A timed call: f(*leaves, *args).backward(grad), then the leaves' grads dropped. The leaves are copies of
    `inputs` that require grad, made once here, outside the timed region."""
    leaves = tuple(t.clone().requires_grad_() for t in inputs)

    def run():
        f(*leaves, *args).backward(grad)
        for t in leaves:
            t.grad = None

    return run


def _proc_status_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def peak_extra_mb(fn: Callable, device: str) -> float | None:
    """Memory fn() needs beyond what is allocated before it, in MiB (None where it cannot be measured)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        # Freed heap memory is reused without new page faults, so a fn() that reuses it would show no growth:
        # give it back to the OS first (glibc, fastnn's cache), then every byte fn() touches raises the RSS
        # high-water mark.
        fastnn.empty_cpu_cache()  # the blocks fastnn's allocator keeps, back to glibc first
        _malloc_trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _proc_status_kb("VmRSS")
        fn()
        return max(0, _proc_status_kb("VmHWM") - base) / 1024
    except (OSError, KeyError):
        return None


def copy_bandwidth_gbs(device: str, mib: int = 256) -> float:
    """Achieved GB/s of a large device-to-same-device copy, counting bytes read plus bytes written."""
    n = mib * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), device, repeats=10)
    return 2 * n * 4 / (t * 1e-3) / 1e9


class Bench:
    def __init__(self, op: str, argv: list[str] | None = None, description: str | None = None):
        p = argparse.ArgumentParser(description=description or f"fastnn {op} benchmark")
        p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (a smoke run)")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--repeats", type=int, default=None)
        p.add_argument("--no-save", action="store_true", help="print only: no CSV rows, no plot")
        p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
        p.add_argument("--no-thp", action="store_true",
                       help="CPU: skip the second process timing torch with THP_MEM_ALLOC_ENABLE=1")
        p.add_argument("--thp-rows", help=argparse.SUPPRESS)  # set in that second process: where its rows go
        self.args, self.extra = p.parse_known_args(argv)
        self._argv = list(sys.argv[1:] if argv is None else argv)
        # The torch.compile baselines compile once per shape (dynamic=False), and a sweep passes dynamo's default
        # recompile limit of 8 graphs per function, past which it silently runs the rest eagerly: rows labelled
        # torch-compile would time eager.
        torch._dynamo.config.recompile_limit = 1024
        self.op, self.device, self.quick = op, self.args.device, self.args.quick
        self.thp_child = self.args.thp_rows is not None
        self.repeats = self.args.repeats or (5 if self.quick else 9)
        self.rows: list[dict] = []
        self.meta = dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"), commit=commit(),
                         machine=machine(self.device), device=self.device, torch=torch.__version__,
                         protocol="interleaved" if self.device == "cpu" else "do_bench")
        self.copy_gbs = copy_bandwidth_gbs(self.device)
        if not self.thp_child:
            print(f"# {op} on {self.meta['machine']} ({self.device}), torch {torch.__version__}, commit "
                  f"{self.meta['commit']}, {self.meta['date']} UTC; copy bandwidth {self.copy_gbs:.1f} GB/s\n")

    @property
    def compile_ok(self) -> bool:
        return not self.args.no_compile

    def compare(self, *, case: str, fns: dict[str, Callable], like: torch.Tensor | None = None,
                bytes: float | None = None, flops: float | None = None, dtype: str = "float32", series: str = "",
                x: float | None = None, memory: bool = True) -> list[dict]:
        """Times the implementations `fns` ({impl: fn}) of one case side by side and records a row each.
        ``like``: a tensor of the case's size, for the autograd op run between timed calls (CPU protocol).
        ``bytes``/``flops``: the minimum traffic / arithmetic of the operation, for GB/s, fraction of copy
        bandwidth, TFLOP/s. ``series``/``x`` place the rows on the plot (one panel per series)."""
        if self.thp_child:  # the second process: every implementation again, under torch's huge-page setting
            fns = {n + THP: f for n, f in fns.items()}
        times: dict[str, list[float] | Exception] = {}
        if self.device == "cuda":
            for n, f in fns.items():
                try:
                    times[n] = [time_ms(f, self.device, self.repeats)]
                except Exception as e:
                    times[n] = e
        else:
            between = autograd_op_like(like, self.device) if like is not None else None
            times = interleaved_ms(fns, between, self.repeats)
        rows = []
        for n, f in fns.items():
            ts, err, peak = times[n], "", None
            if isinstance(ts, Exception):
                t, spread, err = float("nan"), None, f"{type(ts).__name__}: {ts}"[:200]
                print(f"  ! {n} on {case}: {err}")
            else:
                t = statistics.median(ts)
                spread = (max(ts) - min(ts)) / t if len(ts) > 1 and t > 0 else None
                if memory:
                    try:
                        peak = peak_extra_mb(f, self.device)
                    except Exception as e:
                        err = f"memory: {type(e).__name__}: {e}"[:200]
            row = dict(self.meta, op=self.op, case=case, series=series, x=x, impl=n, dtype=dtype, time_ms=t,
                       spread=spread, peak_extra_mb=peak, gbps=None, frac_copy_bw=None, tflops=None, error=err)
            if bytes and t == t:
                row["gbps"] = bytes / (t * 1e-3) / 1e9
                row["frac_copy_bw"] = row["gbps"] / self.copy_gbs
            if flops and t == t:
                row["tflops"] = flops / (t * 1e-3) / 1e12
            self.rows.append(row)
            rows.append(row)
        return rows

    def _thp_rows(self) -> list[dict]:
        """Runs this bench again in a process with THP_MEM_ALLOC_ENABLE=1 and returns its rows."""
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "rows.json")
            env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1")
            proc = subprocess.run([sys.executable, sys.argv[0], *self._argv, "--thp-rows", path], env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0 or not os.path.exists(path):
                print(f"  ! the THP_MEM_ALLOC_ENABLE=1 run failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
                return []
            with open(path) as f:
                return [dict(r, **self.meta) for r in json.load(f)]

    def _ratio(self, row: dict, base_impls: tuple[str, ...] | None) -> float | None:
        """row's time over the fastest of its case and series among `base_impls` (None: every torch row, eager or
        compiled, in either allocator setting)."""
        same = [r for r in self.rows if r["case"] == row["case"] and r["series"] == row["series"]
                and r["time_ms"] == r["time_ms"] and r["time_ms"] > 0]
        base = [r["time_ms"] for r in same
                if (r["impl"].startswith("torch") if base_impls is None else r["impl"] in base_impls)]
        return row["time_ms"] / min(base) if base and row["time_ms"] == row["time_ms"] else None

    def table(self) -> str:
        fmt = lambda v, f: "" if v is None or v != v else format(v, f)  # noqa: E731
        lines = ["| series | case | impl | dtype | time ms | spread | vs eager | vs best torch | peak extra MiB | "
                 "GB/s | of copy BW | TFLOP/s |",
                 "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            # eager: torch eager with the faster of its allocator settings, the reference of the goals
            r["ratio_vs_eager"] = self._ratio(r, (EAGER, EAGER + THP))
            r["ratio_vs_best_torch"] = self._ratio(r, None)
            lines.append(f"| {r['series']} | {r['case']} | {r['impl']} | {r['dtype']} | {fmt(r['time_ms'], '.3f')} | "
                         f"{fmt(r['spread'], '.0%')} | {fmt(r['ratio_vs_eager'], '.2f')}x | "
                         f"{fmt(r['ratio_vs_best_torch'], '.2f')}x | {fmt(r['peak_extra_mb'], '.1f')} | "
                         f"{fmt(r['gbps'], '.1f')} | {fmt(r['frac_copy_bw'], '.0%')} | {fmt(r['tflops'], '.1f')} |")
        return "\n".join(lines)

    def finish(self) -> list[dict]:
        if self.thp_child:
            with open(self.args.thp_rows, "w") as f:
                json.dump(self.rows, f)
            return self.rows
        if self.device == "cpu" and not self.args.no_thp:
            thp = self._thp_rows()
            key = lambda r: (r["series"], r["case"])  # noqa: E731
            merged = []
            for i, r in enumerate(self.rows):  # each case's +thp rows right after its own
                merged.append(r)
                if i + 1 == len(self.rows) or key(self.rows[i + 1]) != key(r):
                    merged += [t for t in thp if key(t) == key(r)]
            self.rows = merged
        print(self.table())
        if self.args.no_save or not self.rows:
            return self.rows
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{self.op}.csv"
        fields = list(self.rows[0].keys())
        new = not path.exists()
        if not new:  # rows measured before a column was added keep their own header: extend it
            with open(path, newline="") as f:
                old = list(csv.DictReader(f))
            known = list(old[0].keys()) if old else []
            if [c for c in fields if c not in known]:
                fields = known + [c for c in fields if c not in known]
                with open(path, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
                    w.writeheader()
                    w.writerows(old)
            else:
                fields = known
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerows(self.rows)
        png = self.plot()
        print(f"\nrows appended to {path.relative_to(RESULTS.parent.parent)}" + (f"; plot {png}" if png else ""))
        return self.rows

    def plot(self) -> str | None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        series = sorted({r["series"] for r in self.rows})
        fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4.5), squeeze=False)
        for ax, s in zip(axes[0], series):
            rows = [r for r in self.rows if r["series"] == s and r["time_ms"] == r["time_ms"]]
            numeric = all(r["x"] is not None for r in rows)
            for impl in dict.fromkeys(r["impl"] for r in rows):
                pts = [r for r in rows if r["impl"] == impl]
                xs = [r["x"] if numeric else r["case"] for r in pts]
                ax.plot(xs, [r["time_ms"] for r in pts], marker="o", label=impl)
            if numeric:
                ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{self.op} {s} ({self.device})")
            ax.set_xlabel("size")
            ax.set_ylabel("time (ms, lower is better)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{self.meta['machine']} - {self.meta['commit']} - {self.meta['date']}", fontsize=8)
        fig.tight_layout()
        out = RESULTS / f"{self.op}_{self.device}.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return str(out.relative_to(RESULTS.parent.parent))


def gemm_tflops(device: str, n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Achieved TFLOP/s of an n x n x n matrix product on random data (zeros run faster than real data)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = time_ms(lambda: torch.mm(a, b, out=out), device, repeats=10)
    return 2 * n ** 3 / (t * 1e-3) / 1e12


def driver_version() -> str:
    """The NVIDIA driver's version (nvidia-smi), or "" without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
        return out.strip().splitlines()[0] if out.strip() else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN anywhere gives NaN, which no tolerance passes); 0 for an exact
    match, also of zeros."""
    d = out.detach().double() - ref.detach().double()
    den = ref.detach().double().norm().item()
    num = d.norm().item()
    return num / den if den else (0.0 if num == 0 else float("inf"))
