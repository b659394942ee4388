"""torch.library plumbing of every fastnn op: fake (meta) kernels, autograd formulas, Triton registrations.

Each ``fastnn/ops/<op>.py`` imports ``register_op`` and describes its op once; the native (C++/CUDA) and the
Triton variant share the schema, the fake and the autograd formula.
"""
from __future__ import annotations

from typing import Callable

import torch


def register_op(
    name: str,
    *,
    fake_fwd: Callable,
    fake_bwd: Callable,
    setup_context: Callable,
    backward: Callable,
    triton_fwd: Callable | None = None,
    triton_bwd: Callable | None = None,
) -> None:
    """Registers ``fastnn::{name}_fwd`` and ``fastnn::{name}_bwd`` and their ``_triton`` twins.

    ``backward(ctx, grads, bwd_op)`` receives the matching backward op (native or Triton) so one formula
    serves both variants. The Triton launchers run for CPU tensors too (under TRITON_INTERPRET=1). An op without
    Triton launchers (``triton_fwd=None``) has no ``_triton`` twin.
    """
    for suffix in ("", "_triton") if triton_fwd is not None else ("",):
        fwd, bwd = f"fastnn::{name}_fwd{suffix}", f"fastnn::{name}_bwd{suffix}"
        torch.library.register_fake(fwd)(fake_fwd)
        torch.library.register_fake(bwd)(fake_bwd)
        bwd_op = getattr(torch.ops.fastnn, f"{name}_bwd{suffix}")
        torch.library.register_autograd(
            fwd, lambda ctx, *grads, _op=bwd_op: backward(ctx, grads, _op), setup_context=setup_context
        )
    if triton_fwd is not None:
        torch.library.register_kernel(f"fastnn::{name}_fwd_triton", ("cpu", "cuda"), triton_fwd)
        torch.library.register_kernel(f"fastnn::{name}_bwd_triton", ("cpu", "cuda"), triton_bwd)


def op(name: str, backend: str):
    """The forward op to call for a resolved backend ("native" or "triton")."""
    return getattr(torch.ops.fastnn, f"{name}_fwd" if backend == "native" else f"{name}_fwd_triton")


from . import softmax  # noqa: E402,F401  (registers)
from . import bce_with_logits  # noqa: E402,F401  (registers)
from . import lstm  # noqa: E402,F401  (registers)
from . import cross_entropy  # noqa: E402,F401  (losses helper: cross_entropy, linear_cross_entropy)


from . import attention  # noqa: E402,F401  (registers; issue 4)
