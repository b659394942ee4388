"""fastnn: fused training kernels for PyTorch (Triton, CUDA, C++ CPU) behind torch.nn-compatible modules.

    import fastnn
    y = fastnn.functional.softmax(x, dim=-1)           # backend chosen automatically
    with fastnn.use_backend("triton"): ...             # or backend="native" per call, or FASTNN_BACKEND
    model = fastnn.patch(model)                        # swap supported torch.nn modules in place
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from ._cpuinfo import cpu_flags as _cpu_flags


def _check_cpu_isa(have=None) -> str:
    """The vector ISA the CPU kernels were built for (setup.py); raises ImportError if this CPU (its flags `have`,
    read from /proc/cpuinfo by default) lacks it, before the extension could die of an illegal instruction."""
    try:
        from ._build_config import CPU_FLAGS_REQUIRED, CPU_ISA
    except ImportError:  # built by an older setup.py
        return "unknown"
    have = _cpu_flags() if have is None else have
    missing = sorted(set(CPU_FLAGS_REQUIRED) - have) if have is not None else []
    if missing:
        raise ImportError(
            f"fastnn's CPU kernels were built for {CPU_ISA} but this CPU lacks {', '.join(missing)} (the build "
            "machine had them). Rebuild here: `FASTNN_CPU_ISA=avx2 pip install -e . --no-build-isolation`."
        )
    return CPU_ISA


CPU_ISA = _check_cpu_isa()  # "avx512", "avx2" or "generic": what csrc/cpu was compiled for

try:
    from . import _C  # noqa: F401  (registers the fastnn:: schemas and the C++/CUDA kernels)
except ImportError as e:  # pragma: no cover - a broken install
    raise ImportError(
        f"fastnn's compiled extension failed to load ({e}). Build it against the installed torch with "
        "`pip install -e . --no-build-isolation`."
    ) from e

from . import ops  # noqa: E402,F401  (fake kernels, autograd, Triton registrations)
from . import functional, nn, reference  # noqa: E402,F401
from .backend import BACKENDS, get_backend, use_backend  # noqa: E402,F401
from .nn import patch  # noqa: E402,F401

__version__ = "0.1.0"


def empty_cpu_cache() -> None:
    """Frees the large CPU blocks (2 MiB and more) fastnn's kernels keep for reuse, as torch.cuda.empty_cache does
    for CUDA. Kept blocks spare a training loop's per-step buffers their page faults; the cache holds at most
    FASTNN_CPU_CACHE_MB (default: a quarter of physical memory; 0 turns it off)."""
    _C.empty_cpu_cache()


def cpu_cache_info() -> dict:
    """The CPU block cache's state: held_bytes, limit_bytes, and counts of hits, misses and evictions since the
    process started."""
    return _C.cpu_cache_info()
