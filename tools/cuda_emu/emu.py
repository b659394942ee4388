"""What the emulator runners (attention.py, lstm.py) share: a kernel file's text between two markers, building it
against prelude.h with a sanitizer, running the built emulator on one case, and the command line."""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SHARED_MEMORY = "extern __shared__ __align__(16) unsigned char smem_raw[];"


def section(path: str):
    """between(a, b): the text of csrc/cuda/<path> from marker a up to marker b."""
    src = open(os.path.join(ROOT, "csrc", "cuda", path)).read()

    def between(a: str, b: str) -> str:
        i = src.index(a)
        return src[i:src.index(b, i)]
    return between


def build(code: str, name: str, tsan: bool) -> str:
    """Compiles `code` (the kernels' text between prelude.h and the driver) with ASan + UBSan, or ThreadSanitizer;
    returns the executable, in a fresh temporary folder."""
    out = tempfile.mkdtemp(prefix=f"{name}_emu_")
    with open(os.path.join(out, "emu.cpp"), "w") as f:
        f.write(code.replace(SHARED_MEMORY, "unsigned char* smem_raw = emu_smem();"))
    from torch.utils import cpp_extension

    inc = [f"-I{d}" for d in cpp_extension.include_paths()]
    san = ["-fsanitize=thread"] if tsan else ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    exe = os.path.join(out, "emu")
    subprocess.run(["g++", "-std=c++20", "-O1", "-g", "-pthread", *san, f"-I{HERE}", f"-I{ROOT}/csrc", *inc,
                    os.path.join(out, "emu.cpp"), "-o", exe], check=True)
    return exe


def run(args: list, label: str, mode: str) -> None:
    """One run of the emulator; a failure (a sanitizer report, a crash) ends the script with its output."""
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                       env=dict(os.environ, ASAN_OPTIONS="detect_leaks=0", TSAN_OPTIONS="halt_on_error=1"))
    if r.returncode:
        print(r.stdout[-2000:], r.stderr[-6000:])
        raise SystemExit(f"{label}: the emulated {mode} kernel failed")


def main(name: str, doc: str, make_code, cases) -> int:
    """The runners' command line: --tsan, --eager, --quick; builds make_code() and runs cases(exe, quick), each a
    callable returning whether its checks held."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tsan", action="store_true")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--quick", action="store_true", help="two cases only")
    a = ap.parse_args()
    if a.eager:
        os.environ["EMU_CP_EAGER"] = "1"
    exe = build(make_code(), name, a.tsan)
    results = [c() for c in cases(exe, a.quick)]
    subprocess.run(["rm", "-rf", os.path.dirname(exe)])
    print(f"cuda_emu {name}: {sum(results)}/{len(results)} cases ok")
    return 0 if all(results) else 1
