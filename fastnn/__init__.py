"""fastnn: fused training kernels for PyTorch (Triton, CUDA, C++ CPU) behind torch.nn-compatible modules.

    import fastnn
    y = fastnn.functional.softmax(x, dim=-1)           # backend chosen automatically
    with fastnn.use_backend("triton"): ...             # or backend="native" per call, or FASTNN_BACKEND
    model = fastnn.patch(model)                        # swap supported torch.nn modules in place
"""
import torch  # noqa: F401  (loads libtorch before the extension)

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
