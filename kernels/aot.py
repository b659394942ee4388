"""Ahead-of-time compile of every fastnn Triton kernel for NVIDIA GPUs - no GPU needed - with a register report.

    python -m fastnn.kernels.aot [--arch 90] [--arch 80] [--only softmax] [--variant both] [--keep DIR]
    python -m fastnn.kernels.aot --recorded LAUNCHES.jsonl [--arch 90] [--jobs 2]

Every module ``kernels/<op>.py`` that defines ``AOT`` (a callable yielding ``(kernel, signature, constexprs,
options)``: the representative specializations its launcher uses; it is called with ``arch=`` and ``aligned=``
(the variant, below) when it takes those parameters, for launchers whose tiles depend on the GPU or on the
operands' alignment) is found automatically and each entry is compiled with
``triton.compile`` for each ``--arch`` (default 90, i.e. sm_90). ``options`` is the launch's num_warps or a dict
of compile options (num_warps, num_stages, maxnreg), which may also hold ``"wgmma": True``: on sm_90 and later
the kernel must run its products on Hopper's warpgroup MMA. Per kernel it prints registers, spill bytes (ptxas'
own report, captured from a fresh cache), local memory and shared memory (``cuobjdump --dump-resource-usage`` of
the cubin, Triton's bundled copy), and the kind of tensor-core MMA in its PTX (column ``mma``: ``wgmma``, ``mma``
for mma.sync, ``-`` for none). Exit status 1 if any kernel fails to compile, spills registers or lacks a required
wgmma, 0 otherwise.

Recorded launches (``--recorded``, variant ``R``): instead of the modules' representative lists, every distinct
specialization a run of the test suite launched. ``record_launches`` (tests/conftest.py calls it when
FASTNN_TRITON_RECORD names a file) writes each launch under the interpreter as the JIT would specialize it on a GPU;
compiling them all shows what the interpreter cannot: a kernel that does not compile for some shape or dtype, or
whose shared memory exceeds the arch's (``_MAX_SHARED``), in any variant the tests reach - each a failure. Spills
there are listed, not failed: they cost speed, not results, and the tests reach variants (tiny or ragged shapes,
float64) that no tile choice was tuned for.

Variants (column ``var``). At launch the JIT specializes each pointer whose address is a multiple of 16 and each
integer that is a multiple of 16 with ``tt.divisibility = 16`` (and turns an integer equal to 1 into the constant
1): that is what lets it emit 16-byte loads. ``A`` (aligned) is the variant that runs for aligned tensors and
sizes - every pointer and every integer argument divisible by 16, as torch's allocations and sizes like 64, 1024
or 4096 give; ``U`` (unaligned) has no such hint, the variant that runs for an odd size (a vocabulary of 50257)
or a sliced tensor. ``--variant`` picks one or both (default). A signature entry may carry Triton's own hint
(``"i32:16"``, ``"*fp32:16"``, or ``"i32:1"`` for an argument the launcher always passes as 1); a hint holds in
both variants.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time


_cache_base: str | None = None  # _prepare_env's cache directory: compile_one makes one below it per compile


def _prepare_env(cache_dir: str) -> None:
    # The interpreter replaces @triton.jit functions with Python ones that cannot be compiled, and a warm cache
    # skips ptxas and so its report: both must be settled before triton is first imported.
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("aot: triton was imported with TRITON_INTERPRET=1; run this in a fresh process")
    os.environ.pop("TRITON_INTERPRET", None)
    global _cache_base
    _cache_base = os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"


def discover(only: list[str] | None = None):
    """(module name, AOT callable) for every kernels/*.py module that defines AOT."""
    from fastnn import kernels

    found = []
    for info in sorted(pkgutil.iter_modules(kernels.__path__), key=lambda i: i.name):
        if info.name == "aot" or info.name.startswith("_") or (only and info.name not in only):
            continue
        module = importlib.import_module(f"fastnn.kernels.{info.name}")
        if hasattr(module, "AOT"):
            found.append((info.name, module.AOT))
    return found


def _cuobjdump() -> str | None:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for path in (bundled, os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")):
        if os.path.exists(path):
            return path
    return shutil.which("cuobjdump")


def resource_usage(cubin: bytes, tool: str | None) -> dict:
    """REG, STACK, SHARED, LOCAL of the (single) kernel in a cubin, from cuobjdump; {} without the tool."""
    if not tool:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        if m:
            usage[key] = int(m.group(1))
    return usage


def ptxas_report(log: str) -> dict:
    """Registers and spill bytes from the `ptxas -v` log that TRITON_DUMP_PTXAS_LOG prints; {} if absent."""
    rep = {}
    m = re.search(r"Used (\d+) registers", log)
    if m:
        rep["regs"] = int(m.group(1))
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        rep["spill_stores"], rep["spill_loads"] = int(m.group(1)), int(m.group(2))
    return rep


def mma_kind(ptx: str) -> str:
    """The tensor-core MMA a kernel's PTX uses: "wgmma" (Hopper's warpgroup MMA, also when mixed with mma.sync),
    "mma" (mma.sync only) or "-" (none: FMA dots)."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    return "mma" if "mma.sync" in ptx else "-"


def _describe(constexprs: dict) -> str:
    def short(v):
        return getattr(v, "name", None) or (str(v) if not isinstance(v, bool) else "FT"[v])

    return ",".join(f"{k}={short(v)}" for k, v in constexprs.items())


def _dtype(signature: dict) -> str:
    """The element type of the kernel's first pointer argument (fp32 and bf16 rows otherwise read the same)."""
    return next((t.split(":")[0][1:] for t in signature.values() if t.startswith("*")), "-")


_DIVISIBLE = re.compile(r"^(\*.*|[iu](32|64))$")  # what the JIT gives tt.divisibility: pointers and integers


def specialize(kernel, signature: dict, constexprs: dict, aligned: bool):
    """(signature, constexprs, names given tt.divisibility=16) as the JIT would build them for a launch whose
    pointer and integer arguments are all multiples of 16 (``aligned``) or none of them; Triton's ``:16`` / ``:1``
    hints in ``signature`` hold either way. Triton >= 3.3 wants every argument in the signature, constexprs typed
    "constexpr"."""
    sig, consts, divisible = {}, dict(constexprs), []
    for name in kernel.arg_names:
        ty, _, hint = signature.get(name, "constexpr").partition(":")
        if hint == "1":
            consts[name], ty = 1, "constexpr"
        elif hint == "16" or (aligned and not hint and name not in consts and _DIVISIBLE.match(ty)):
            divisible.append(name)
        elif hint:
            raise ValueError(f"{kernel.__name__}: argument {name}: only the hints 1 and 16 exist, got {hint!r}")
        sig[name] = ty
    return sig, consts, divisible


def compile_one(kernel, signature: dict, constexprs: dict, options, arch: int, aligned: bool = True):
    """options: the launch's num_warps, or a dict of compile options (num_warps, num_stages). Each compile gets a
    cache of its own under the prepared one: a compile found in a cache skips ptxas, and so its spill report."""
    import triton
    from triton.backends.compiler import GPUTarget

    if _cache_base:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(dir=_cache_base)

    target = GPUTarget("cuda", arch, 32)
    sig, consts, divisible = specialize(kernel, signature, constexprs, aligned)
    backend = triton.compiler.make_backend(target)
    attr = backend.parse_attr("D")  # the JIT's own encoding of "divisible by 16": [["tt.divisibility", 16]]
    attrs = {(kernel.arg_names.index(name),): attr for name in divisible}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        opts = options if isinstance(options, dict) else {"num_warps": options}
        compiled = triton.compile(src, target=target, options=opts)
    return compiled, log.getvalue()


_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_ARCH_DEPENDENT = {"attention"}  # kernel modules whose launchers choose by the GPU (record_launches)
# Shared memory a block may use (the opt-in maximum) per compute capability: a kernel above it cannot launch there.
_MAX_SHARED = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


def record_launches(path: str, arch: int = 80) -> None:
    """Append to ``path`` (JSON lines) the compile key of every Triton launch in this process - kernel, argument
    types, constexprs, which arguments are divisible by 16, launch options - as the JIT would specialize it on a
    GPU. For the interpreter (TRITON_INTERPRET=1): the test suite's launches on CPU tensors then become the list
    that ``--recorded`` compiles for real, so every specialization the tests run is known to compile, not only the
    representative ones of ``AOT``. What the launchers choose for the interpreter alone is set as a GPU has it: the
    attention tiles (kernels/attention.py's GPU_TILES; ``arch`` >= 90 picks Hopper's) and whether the float32 /
    float64 attention backward holds its key block in the loop (by ``arch``'s shared memory, _MAX_SHARED) - the
    launchers' only choices that depend on the device - and the constexpr UPCAST, the interpreter's bfloat16 workaround
    (kernels/common.py), is recorded as False. Each process writes each key once; lines are short single appends,
    so pytest-xdist workers may share the file."""
    import json

    import triton.language as tl
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import _normalize_ty

    from fastnn.kernels import attention

    if arch not in _MAX_SHARED:
        raise ValueError(f"record_launches: arch {arch} is not one of {sorted(_MAX_SHARED)}")
    attention.GPU_TILES = True
    if arch >= 90:
        attention._is_hopper = lambda device: True
    attention._shared_memory = lambda device: _MAX_SHARED[arch]
    seen, run = set(), InterpretedFunction.run

    def value(v):
        if isinstance(v, tl.dtype):
            return {"dtype": str(v)}
        v = getattr(v, "value", v)  # tl.constexpr
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        raise TypeError(f"record_launches: cannot record a constexpr of type {type(v).__name__}")

    def recording_run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        # a test's own kernel, or attention tiles a test set for the interpreter (a GPU never runs those)
        if not fn.__module__.startswith("fastnn.kernels.") or (fn.__module__ == attention.__name__
                                                               and not attention.GPU_TILES):
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        params = inspect.signature(fn).parameters
        bound = inspect.signature(fn).bind_partial(*args, **{k: v for k, v in kwargs.items()
                                                             if k not in _LAUNCH_OPTIONS})
        bound.apply_defaults()
        notes = {name: _normalize_ty(ty) for name, ty in fn.__annotations__.items()}
        sig, consts, divisible = {}, {}, []
        fixed = [self.kwargs.get(k) or () for k in ("do_not_specialize", "do_not_specialize_on_alignment")]
        for i, name in enumerate(params):
            arg = bound.arguments[name]
            if notes.get(name) == "constexpr":
                consts[name] = False if name == "UPCAST" else value(arg)
                continue
            specialize, align = (not (i in f or name in f) for f in fixed)
            ty, key = native_specialize_impl(CUDABackend, arg, False, specialize, align)
            if ty == "constexpr":
                consts[name] = value(key)
            else:
                sig[name] = ty
                if key == "D":
                    divisible.append(name)
        module = fn.__module__.removeprefix("fastnn.kernels.")
        entry = {"module": module, "kernel": fn.__name__, "arch": arch if module in _ARCH_DEPENDENT else None,
                 "signature": sig, "constexprs": consts, "divisible": divisible,
                 "options": {k: kwargs[k] for k in _LAUNCH_OPTIONS if k in kwargs}}
        line = json.dumps(entry, sort_keys=True)
        if line not in seen:
            seen.add(line)
            with open(path, "a") as f:
                f.write(line + "\n")
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run


def record_launches_from_env() -> bool:
    """record_launches into $FASTNN_TRITON_RECORD (for $FASTNN_TRITON_RECORD_ARCH, default 80) when that is set and
    Triton runs interpreted; whether it records. The test suite (tests/conftest.py) and
    tools/gpu_sanitize_driver.py --device cpu call it."""
    path = os.environ.get("FASTNN_TRITON_RECORD")
    if not path or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    record_launches(path, int(os.environ.get("FASTNN_TRITON_RECORD_ARCH", "80")))
    return True


def recorded_specs(paths: list[str], archs: list[int]):
    """(module, arch, aligned, spec) for each distinct launch that ``record_launches`` wrote to ``paths``, for each
    of ``archs``: a launch recorded for one arch (its tiles were chosen for it) only for that one."""
    import json

    import triton.language as tl

    entries = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                e = json.loads(line)
                for arch in archs if e["arch"] is None else [e["arch"]] if e["arch"] in archs else []:
                    e = dict(e, arch=arch)
                    entries[json.dumps(e, sort_keys=True)] = e
    for e in sorted(entries.values(), key=lambda e: (e["arch"], e["module"], e["kernel"], json.dumps(e))):
        kernel = getattr(importlib.import_module(f"fastnn.kernels.{e['module']}"), e["kernel"])
        consts = {k: tl.dtype(v["dtype"]) if isinstance(v, dict) else v for k, v in e["constexprs"].items()}
        types = e["signature"]
        sig = {k: f"{types[k]}:16" if k in e["divisible"] else types[k] for k in kernel.arg_names if k in types}
        options = dict(e["options"]) or {}
        options.setdefault("num_warps", 4)
        yield e["module"], e["arch"], False, (kernel, sig, consts, options)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastnn.kernels.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 or 80 (repeatable)")
    p.add_argument("--only", action="append", help="kernel module name, e.g. softmax (repeatable)")
    p.add_argument("--variant", choices=("aligned", "unaligned", "both"), default="both",
                   help="A: every pointer and integer argument divisible by 16 (what runs for aligned tensors); "
                        "U: no divisibility hints; both (default)")
    p.add_argument("--recorded", action="append",
                   help="compile the launches record_launches wrote to this file (repeatable; variant R) "
                        "instead of the modules' AOT lists")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    p.add_argument("--keep", help="also write each kernel's PTX and cubin under this directory")
    args = p.parse_args(argv)
    archs = args.arch or [90]
    variants = {"aligned": [True], "unaligned": [False], "both": [True, False]}[args.variant]

    cache = tempfile.mkdtemp(prefix="fastnn-aot-")
    _prepare_env(cache)
    try:
        if args.recorded:
            items = [i for i in recorded_specs(args.recorded, archs) if not args.only or i[0] in args.only]
        else:
            items = [(name, *i) for name, aot in discover(args.only) for i in _specs(aot, archs, variants)]
        return _run(items, args.keep, args.jobs, recorded=bool(args.recorded))
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _specs(aot, archs, variants):
    """(arch, aligned, spec) triples: AOT called with arch= and aligned= where it takes them (a launcher whose tiles
    depend on the GPU or on its operands' alignment), else its one list for every arch and variant."""
    params = inspect.signature(aot).parameters
    for arch in archs:
        for aligned in variants:
            kw = {k: v for k, v in (("arch", arch), ("aligned", aligned)) if k in params}
            for spec in aot(**kw):
                yield arch, aligned, spec


_ITEMS: list = []  # what _report's worker processes compile, inherited through fork


def _report(index: int, keep: str | None = None, recorded: bool = False) -> tuple[str, list[str], list[str]]:
    """Compile item ``index`` of _ITEMS: its line of the table, its failures and its spills (failures too, but for
    recorded launches, which include variants no tile was chosen for: there they are listed, not failed)."""
    name, arch, aligned, (kernel, signature, constexprs, options) = _ITEMS[index]
    num_warps = options["num_warps"] if isinstance(options, dict) else options
    need_wgmma = isinstance(options, dict) and options.get("wgmma", False) and arch >= 90
    if isinstance(options, dict):
        options = {k: v for k, v in options.items() if k != "wgmma"}
    var = "R" if recorded else "A" if aligned else "U"
    label = f"{name}.{kernel.__name__}"
    head = f"sm_{arch:<3} {label:<38} {var:>3} {_dtype(signature):>5} {num_warps:>5}"
    what = f"sm_{arch} {label} ({var}, {_dtype(signature)}) [{_describe(constexprs)}]"
    if recorded:
        what += f" divisible by 16: {','.join(n for n, t in signature.items() if t.endswith(':16')) or '-'}"
    start = time.time()
    try:
        compiled, log = compile_one(kernel, signature, constexprs, options, arch, aligned)
    except Exception as e:  # a compile error is a failure of this check, not a crash of the report
        return (f"{head}  COMPILE ERROR: {str(e).splitlines()[0][:80] if str(e) else type(e).__name__}",
                [f"{what}: {type(e).__name__}: {e}"], [])
    secs = time.time() - start
    failures, spills = [], []
    rep = ptxas_report(log)
    use = resource_usage(compiled.asm["cubin"], _cuobjdump())
    regs = rep.get("regs", use.get("REG", getattr(compiled, "n_regs", None)))
    spill = rep.get("spill_stores", 0) + rep.get("spill_loads", 0)
    local = use.get("LOCAL", 0)
    spilled = spill > 0 or local > 0
    if not rep and not use:
        failures.append(f"{what}: no register report (neither ptxas log nor cuobjdump)")
    if spilled:
        spills.append(f"{what}: spills {spill} B, local {local} B")
    smem = compiled.metadata.shared
    if smem > _MAX_SHARED.get(arch, smem):
        failures.append(f"{what}: {smem} B of shared memory, above sm_{arch}'s {_MAX_SHARED[arch]}")
    mma = mma_kind(compiled.asm["ptx"])
    no_wgmma = need_wgmma and mma != "wgmma"
    if no_wgmma:
        failures.append(f"{what}: no wgmma in the PTX (tensor cores: {mma})")
    if keep:
        os.makedirs(keep, exist_ok=True)
        stem = os.path.join(keep, f"sm{arch}-{label}-{var}-{compiled.hash[:10]}")
        with open(stem + ".ptx", "w") as f:
            f.write(compiled.asm["ptx"])
        with open(stem + ".cubin", "wb") as f:
            f.write(compiled.asm["cubin"])
    return (f"{head} {regs!s:>5} {spill:>6} {local:>6} {smem:>7} {mma:>5} {secs:>5.1f}  "
            f"{_describe(constexprs)}{'  SPILL' if spilled else ''}{'  NO-WGMMA' if no_wgmma else ''}", failures,
            spills)


def _run(items, keep, jobs: int = 1, recorded: bool = False) -> int:
    import concurrent.futures
    import functools
    import multiprocessing

    import triton

    if not items:
        print("aot: nothing to compile (no kernels/*.py module defines AOT, or nothing was recorded)",
              file=sys.stderr)
        return 1
    archs = sorted({arch for _, arch, _, _ in items})
    kinds = "R (recorded launches)" if recorded else "".join(sorted({"AU"[not a] for _, _, a, _ in items}))
    print(f"triton {triton.__version__}; archs {archs}; variants {kinds} (A: arguments divisible by 16, U: no "
          f"hints); cuobjdump: {_cuobjdump() or 'not found'}")
    print(f"{'arch':<6} {'kernel':<38} {'var':>3} {'dtype':>5} {'warps':>5} {'regs':>5} {'spill':>6} {'local':>6} "
          f"{'smem':>7} {'mma':>5} {'s':>5}  constexprs")
    _ITEMS[:] = items
    report = functools.partial(_report, keep=keep, recorded=recorded)
    failures, spills = [], []
    with contextlib.ExitStack() as stack:
        if jobs > 1:  # fork: the workers inherit _ITEMS (kernels do not pickle) and the prepared environment;
            # a worker that dies (a compiler abort) raises BrokenProcessPool here rather than hanging the map
            pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
                jobs, mp_context=multiprocessing.get_context("fork")))
            results = pool.map(report, range(len(items)))
        else:
            results = map(report, range(len(items)))
        for line, failed, spilled in results:
            print(line, flush=True)
            failures += failed
            spills += spilled
    if not recorded:
        failures, spills = failures + spills, []
    print(f"aot: {len(items)} compilations, {len(failures)} failure(s)"
          + (f", {len(spills)} spilling (listed, not failed)" if recorded else ""))
    for f in failures:
        print("  FAIL " + f)
    for f in spills:
        print("  SPILL " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
