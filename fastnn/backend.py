"""Which implementation runs an op: `native` (C++ CPU or CUDA, picked by the dispatcher from the tensors'
device), `triton`, or `reference` (plain PyTorch, fastnn.reference).

Precedence: the per-call ``backend=`` keyword, then the innermost ``fastnn.use_backend(...)`` block, then the
``FASTNN_BACKEND`` environment variable, then ``"auto"``: Triton for CUDA tensors when Triton works, otherwise
native.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch

BACKENDS = ("auto", "native", "triton", "reference")

_selected: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastnn_backend", default=None)


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The backend in force when no ``backend=`` keyword is given."""
    name = _selected.get()
    if name is None:
        name = os.environ.get("FASTNN_BACKEND", "auto").strip().lower() or "auto"
        if name not in BACKENDS:
            raise ValueError(f"FASTNN_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block on ``name`` ("auto", "native", "triton" or "reference").

    Example::

        with fastnn.use_backend("triton"):
            y = fastnn.functional.softmax(x, dim=-1)
    """
    token = _selected.set(_check_name(name))
    try:
        yield
    finally:
        _selected.reset(token)


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    """(usable, reason). Triton is optional: a CPU-only install runs without it."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return False, f"Triton is not installed or failed to import ({e}); `pip install triton`"
    return True, ""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@torch.compiler.assume_constant_result  # a dispatcher query Dynamo cannot trace; constant for a compiled graph
def native_has(op: torch._ops.OpOverloadPacket, device_type: str) -> bool:
    """Whether fastnn._C registered a kernel of ``op`` (e.g. ``torch.ops.fastnn.softmax_fwd``) for this device
    type."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(op._qualified_op_name, key)


def resolve(op: torch._ops.OpOverloadPacket, backend: str | None, *tensors: torch.Tensor | None) -> str:
    """Concrete backend ("native", "triton" or "reference") for running ``op`` (the native forward op, e.g.
    ``torch.ops.fastnn.softmax_fwd``) on ``tensors``.

    Raises a ValueError naming the problem when the tensors sit on different devices or when the requested
    backend cannot run on their device. Under torch.compile the choice is made once, at trace time.
    """
    ts = [t for t in tensors if t is not None]
    devices = {t.device for t in ts}
    if len(devices) > 1:
        raise ValueError(f"{op._qualified_op_name}: all tensors must be on the same device, got "
                         f"{sorted(map(str, devices))}")
    return _choose(op, backend, ts[0].device.type if ts else "cpu")


# Dynamo cannot trace the dispatcher query or the ContextVar; the answer is a constant for a compiled graph.
@torch.compiler.assume_constant_result
def _choose(op: torch._ops.OpOverloadPacket, backend: str | None, dev: str) -> str:
    what = op._qualified_op_name
    name = _check_name(backend) if backend is not None else get_backend()
    if name == "auto":
        if dev == "cuda" and triton_status()[0]:
            return "triton"
        name = "native"
    if name == "native" and not native_has(op, dev):
        hint = " (fastnn was built without CUDA: reinstall with a CUDA build of torch)" if dev == "cuda" else ""
        raise ValueError(f"{what}: the native backend has no kernel for {dev} tensors{hint}")
    if name == "triton":
        ok, why = triton_status()
        if not ok:
            raise ValueError(f"{what}: the triton backend was asked for but {why}")
        if dev == "cpu" and not triton_interpret():
            raise ValueError(
                f"{what}: the triton backend needs CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 "
                "before importing triton (the interpreter, for testing)"
            )
        if dev not in ("cpu", "cuda"):
            raise ValueError(f"{what}: the triton backend cannot run on {dev} tensors")
    return name
