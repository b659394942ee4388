"""fastnn's CUDA sources compiled whole as host C++ and run on the CPU: every kernel of csrc/cuda/*.cu in the
emulator of prelude.h (a std::thread per CUDA thread, warp shuffles, barriers, mma / ldmatrix / cp.async, grid.sync)
behind the files' own launchers - argument checks, launch geometry, path choice, device queries - against the
emulated sm_90 of shim/emu_cuda.h. The result is a library of the same schemas as fastnn's under the name
`fastnn_emu`, its kernels registered for CPU tensors: `torch.ops.fastnn_emu.softmax_fwd(x, -1, False)` runs what a
GPU would run for `torch.ops.fastnn.softmax_fwd`.

The sources are changed as little as a host compiler needs (see `host_source`): kernel launches become calls to
the emulator, dynamic shared memory a pointer to the block's, and the CUDA-device checks accept CPU tensors.
Launches the hardware would refuse (a grid's y past 65,535, shared memory past the opt-in maximum) abort, and so
does a launch that hangs (a barrier not every thread reaches). With ASan (the default build), a kernel reading
outside a tensor is reported.

    python tools/cuda_emu/library.py [--sanitizer asan|tsan|none]   builds (or finds in its cache) the library
    import library; library.load()                   the same from Python; checks.py uses it
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
SANITIZERS = {"asan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"],
              "tsan": ["-fsanitize=thread"], "none": []}


def _balanced(s: str, i: int, open_: str, close: str) -> int:
    """Index just past the bracket closing the one at s[i] (== open_)."""
    depth = 0
    for j in range(i, len(s)):
        if s[j] == open_:
            depth += 1
        elif s[j] == close:
            depth -= 1
            if depth == 0:
                return j + 1
    raise ValueError(f"unbalanced {open_} at {i}")


def _split_top(s: str) -> list:
    """s split at its commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


def _kernel_start(s: str, end: int) -> int:
    """Start of the kernel expression ending at s[end] (`name`, `ns::name<T, decltype(I)::value>`)."""
    i = end - 1
    while i >= 0:
        if s[i] == ">":  # a template argument list: back to its '<'
            depth = 0
            while i >= 0:
                depth += s[i] == ">"
                depth -= s[i] == "<"
                if depth == 0:
                    break
                i -= 1
            i -= 1
        elif s[i].isalnum() or s[i] in "_:":
            i -= 1
        else:
            break
    return i + 1


def rewrite_launches(s: str, name: str) -> str:
    """`k<<<grid, block[, smem[, stream]]>>>(args)` as `emu_launch_kernel("name:line", k, [&] { k(args); }, grid,
    block, ...)`, keeping the text's line breaks so compiler messages point at the .cu file's lines."""
    while (at := s.find("<<<")) >= 0:
        start = _kernel_start(s, at)
        close = s.index(">>>", at)
        config = _split_top(s[at + 3:close])
        j = close + 3
        while s[j].isspace():
            j += 1
        if s[j] != "(":
            raise ValueError(f"no argument list after a launch at {s[start:j]}")
        args_end = _balanced(s, j, "(", ")")
        kernel = s[start:at]
        line = s.count("\n", 0, at) + 1
        s = (s[:start] + f'emu_launch_kernel("{name}:{line}", {kernel}, [&] {{ {kernel}{s[j:args_end]}; }}, '
             + f"{', '.join(config)})"
             + s[args_end:])
    return s


def host_source(path: str) -> str:
    """csrc/cuda/<file>.cu as host C++ for the emulator."""
    s = open(path).read()
    s = rewrite_launches(s, os.path.basename(path))
    # dynamic shared memory: the emulated block's buffer
    s = re.sub(r"extern __shared__ (?:__align__\(\d+\) )?([\w ]+?) (\w+)\[\];",
               r"\1* \2 = reinterpret_cast<\1*>(emu_smem());", s)
    s = re.sub(r"cudaLaunchCooperativeKernel\(reinterpret_cast<const void\*>\((\w+)\),", r"emu_cooperative(\1,", s)
    s = s.replace(".is_cuda()", ".is_cpu()")
    s = s.replace("TORCH_LIBRARY_IMPL(fastnn, CUDA, m)", "TORCH_LIBRARY_IMPL(fastnn_emu, CPU, m)")
    return f'#line 1 "{path}"\n' + s


def schema_source() -> str:
    """csrc/ops.cpp's schemas, as the library fastnn_emu."""
    s = open(os.path.join(ROOT, "csrc", "ops.cpp")).read()
    block = s[s.index("TORCH_LIBRARY(fastnn, m) {"):]
    block = block.replace("TORCH_LIBRARY(fastnn, m) {", 'TORCH_LIBRARY(fastnn_emu, m) {\n  m.def("launches", &launches);')
    return ('#include <torch/library.h>\n#include "emu_cuda.h"\n'
            "// The kernel launches since the last call (emu_cuda.h's EmuLaunchLog), for checks.py.\n"
            "std::vector<std::string> launches() {\n"
            "  std::lock_guard<std::mutex> lock(emu_launch_log.mu);\n"
            "  return std::exchange(emu_launch_log.entries, {});\n}\n" + block)


def sources() -> dict:
    """{name: text} of the translation units."""
    units = {"schema": schema_source()}
    for f in sorted(os.listdir(CUDA_DIR)):
        if f.endswith(".cu"):
            units[f[:-3]] = host_source(os.path.join(CUDA_DIR, f))
    return units


def _inputs_digest(units: dict, flags: list) -> str:
    h = hashlib.sha256()
    for name in sorted(units):
        h.update(name.encode() + units[name].encode())
    for d in (HERE, os.path.join(HERE, "shim"), os.path.join(ROOT, "csrc")):
        for root, _, files in sorted(os.walk(d)):
            if os.path.basename(root) == "cpu":
                continue
            for f in sorted(files):
                if f.endswith((".h", ".cuh")):
                    h.update(f.encode() + open(os.path.join(root, f), "rb").read())
    h.update(" ".join(flags).encode())
    return h.hexdigest()[:16]


def build(sanitizer: str = "asan", jobs: int | None = None, verbose: bool = False) -> str:
    """Builds the library with `sanitizer` (asan: ASan + UBSan, tsan: ThreadSanitizer, none), or reuses the cached
    build of the same sources and flags; returns the .so's path."""
    import torch
    from torch.utils import cpp_extension

    flags = ["-std=c++20", "-O1", "-g", "-fPIC", "-pthread", "-Wno-unused-variable", "-Wno-unused-function",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"] + SANITIZERS[sanitizer]
    units = sources()
    cache = os.environ.get("FASTNN_CUDA_EMU_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fastnn_cuda_emu"))
    out = os.path.join(cache, _inputs_digest(units, flags + [torch.__version__]))
    so = os.path.join(out, "libfastnn_emu.so")
    if os.path.exists(so):
        return so
    os.makedirs(out, exist_ok=True)
    inc = [f"-I{os.path.join(HERE, 'shim')}", f"-I{HERE}", f"-I{os.path.join(ROOT, 'csrc')}"]
    inc += [f"-I{d}" for d in cpp_extension.include_paths()]

    def compile_unit(name: str) -> str:
        src, obj = os.path.join(out, f"{name}.cpp"), os.path.join(out, f"{name}.o")
        with open(src, "w") as f:
            f.write(units[name])
        r = subprocess.run(["g++", *flags, *inc, "-c", src, "-o", obj], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"cuda_emu: {name} did not compile:\n{r.stderr[:8000]}")
        if verbose:
            print(f"cuda_emu: compiled {name}", flush=True)
        return obj

    with concurrent.futures.ThreadPoolExecutor(jobs or os.cpu_count()) as pool:
        objs = list(pool.map(compile_unit, sorted(units)))
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    tmp = so + ".tmp"
    subprocess.run(["g++", "-shared", *flags, *objs, f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu",
                    "-ltorch", "-o", tmp], check=True)
    os.replace(tmp, so)
    return so


def load(sanitizer: str = "none") -> str:
    """Builds if needed and loads the library into this process (a sanitizer's runtime must be preloaded: see
    checks.py); returns its path."""
    import torch

    so = build(sanitizer)
    torch.ops.load_library(so)
    return so


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sanitizer", choices=sorted(SANITIZERS), default="asan")
    ap.add_argument("-j", type=int, default=None)
    a = ap.parse_args()
    print(build(a.sanitizer, a.j, verbose=True))
    sys.exit(0)
