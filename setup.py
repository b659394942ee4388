"""Builds fastnn._C: csrc/cpu/*.cpp always, csrc/cuda/*.cu when the installed torch has CUDA.

Environment:
  FASTNN_CUDA=0          force a CPU-only build
  FASTNN_CUDA=1          a missing CUDA toolchain is an error instead of a silent CPU-only build
  TORCH_CUDA_ARCH_LIST   GPU architectures (default "8.0;9.0": A100 and H100/H200)
  FASTNN_CPU_ISA         x86 vector ISA of the CPU kernels: auto (default: avx512 when the build machine has
                         AVX-512 F/DQ/BW/VL, else avx2), avx512 or avx2. The result is recorded in
                         fastnn/_build_config.py, and importing fastnn on a CPU without that ISA is an error.
  FASTNN_CXXFLAGS        extra host compiler flags (the sanitizer build uses it)

Install with `pip install -e . --no-build-isolation`: an isolated build would compile against another torch
than the one installed, and the extension then fails to import.
"""
import glob
import importlib.util
import os
import platform
import shlex
import shutil

from setuptools import find_packages, setup


def _default_cuda_home():
    # cpp_extension takes CUDA_HOME from `which nvcc` first; a wrapper script on PATH (/usr/local/bin/nvcc here)
    # then yields a CUDA_HOME without the toolkit's headers. Fall back to the standard location in that case.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None
    if home and not os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) and os.path.exists(
        "/usr/local/cuda/include/cuda_runtime.h"
    ):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


_default_cuda_home()  # before cpp_extension reads it at import

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_wanted() -> bool:
    flag = os.environ.get("FASTNN_CUDA", "auto").strip().lower()
    nvcc = shutil.which("nvcc") or (
        cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    )
    have = torch.version.cuda is not None and bool(cpp_extension.CUDA_HOME) and bool(nvcc)
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on") and not have:
        raise RuntimeError(
            "FASTNN_CUDA=1 but no CUDA toolchain: torch.version.cuda=%r, CUDA_HOME=%r. Install a CUDA build of "
            "torch and nvcc, or unset FASTNN_CUDA for a CPU-only build." % (torch.version.cuda, cpp_extension.CUDA_HOME)
        )
    return have


def _nvidia_include_dirs():
    # CUDA builds of torch pull headers such as cusparse.h from the pip-installed nvidia packages.
    try:
        import nvidia  # noqa: F401
    except ImportError:
        return []
    dirs = []
    for base in getattr(nvidia, "__path__", []):
        dirs += [d for d in glob.glob(os.path.join(base, "*", "include")) if os.path.isdir(d)]
    return sorted(dirs)


def _load_cpuinfo():
    # fastnn/_cpuinfo.py by path: importing the fastnn package would load the extension this script builds.
    spec = importlib.util.spec_from_file_location("fastnn_cpuinfo", os.path.join(ROOT, "fastnn", "_cpuinfo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_cpuinfo = _load_cpuinfo()
AVX512_FLAGS = _cpuinfo.AVX512_FLAGS


def _cpu_isa() -> str:
    """The vector ISA the CPU kernels are compiled for. fastnn is built from source on the machine that runs it, so
    by default the build machine's widest supported ISA (AVX-512 widens every vector loop of csrc/cpu, vec.h)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return "generic"
    isa = os.environ.get("FASTNN_CPU_ISA", "auto").strip().lower()
    if isa not in ("auto", "avx2", "avx512"):
        raise RuntimeError(f"FASTNN_CPU_ISA={isa!r}: expected auto, avx2 or avx512")
    if isa == "auto":
        isa = "avx512" if set(AVX512_FLAGS) <= (_cpuinfo.cpu_flags() or set()) else "avx2"
    return isa


def _write_build_config(isa: str) -> None:
    # Read by fastnn/__init__.py before it loads the extension: an AVX-512 build on a CPU without AVX-512 would
    # die of SIGILL inside the extension instead of saying why.
    text = (
        "# Written by setup.py at build time; not tracked.\n"
        f"CPU_ISA = {isa!r}\n"
        f"CPU_FLAGS_REQUIRED = {AVX512_FLAGS if isa == 'avx512' else ()!r}\n"
    )
    path = os.path.join(ROOT, "fastnn", "_build_config.py")
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return  # unchanged: no rebuild of what imports it
    with open(path, "w") as f:
        f.write(text)


def build_extension():
    with_cuda = _cuda_wanted()
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # OpenMP: ATen's parallel_for is an inline `#pragma omp parallel`, so without -fopenmp it runs serially.
    # AVX2+FMA is the x86-64 baseline; AVX-512 where the build machine has it (_cpu_isa).
    # No -std flag: cpp_extension adds the standard the installed torch's headers need (C++20 from torch 2.14).
    cxx = ["-O3", "-fopenmp", "-fno-math-errno"]
    isa = _cpu_isa()
    if isa != "generic":
        cxx += ["-mavx2", "-mfma", "-mf16c"]
    if isa == "avx512":
        cxx += ["-m" + f for f in AVX512_FLAGS]
    _write_build_config(isa)
    cxx += shlex.split(os.environ.get("FASTNN_CXXFLAGS", ""))
    extra = {"cxx": cxx}
    ldflags = ["-fopenmp"] + shlex.split(os.environ.get("FASTNN_LDFLAGS", ""))
    ext_cls = cpp_extension.CppExtension
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo"] + shlex.split(
            os.environ.get("FASTNN_NVCCFLAGS", "")
        )
        # -isystem, not -I: searched after the toolkit's own include dir, so the pip copy of the CUDA runtime
        # headers (nvidia/cu13/include) cannot shadow the ones matching nvcc.
        for d in _nvidia_include_dirs():
            extra["cxx"] += ["-isystem", d]
            extra["nvcc"] += ["-isystem", d]
        ext_cls = cpp_extension.CUDAExtension
    print(f"fastnn: building fastnn._C with {'CPU + CUDA' if with_cuda else 'CPU only'} kernels, CPU ISA {isa}")
    return ext_cls(
        "fastnn._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=ldflags,
        py_limited_api=False,
    )


setup(
    name="fastnn",
    version="0.1.0",
    description="Fused training kernels for PyTorch: softmax, losses, attention, LSTM (Triton, CUDA, C++ CPU)",
    packages=find_packages(include=["fastnn", "fastnn.*"]) + ["fastnn.kernels"],
    # The Triton kernels sit in kernels/ at the top of the repository and install as fastnn.kernels.
    package_dir={"fastnn.kernels": "kernels"},
    # The translator's default configuration and its command line.
    package_data={"fastnn.translator": ["*.yaml"]},
    entry_points={"console_scripts": ["fastnn-translate=fastnn.translator.__main__:main"]},
    ext_modules=[build_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={
        "triton": ["triton>=3.4"],
        "test": ["pytest", "pytest-xdist", "hypothesis", "numpy"],
        "bench": ["matplotlib"],
        "translator": ["sentencepiece", "sacrebleu", "tqdm", "pyyaml", "matplotlib"],
    },
)
