"""``register_op``: one call per op registers its fake (meta) kernels, its autograd formula and its Triton
twins' kernels."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class Triton(NamedTuple):
    """An op's Triton twins (``fastnn::<op>_fwd_triton`` / ``_bwd_triton``) and the launchers that run them."""

    fwd: torch._ops.OpOverloadPacket
    bwd: torch._ops.OpOverloadPacket
    launch_fwd: Callable
    launch_bwd: Callable


def register_op(
    fwd: torch._ops.OpOverloadPacket,
    bwd: torch._ops.OpOverloadPacket,
    *,
    fake_fwd: Callable,
    fake_bwd: Callable,
    setup_context: Callable,
    backward: Callable,
    triton: Triton | None = None,
) -> None:
    """Registers the fake kernels and the autograd formula of the native op pair ``fwd`` / ``bwd`` and, when
    given, of its Triton twins, whose kernels the launchers become.

    ``backward(ctx, grads, bwd_op)`` receives the matching backward op (native or Triton) so one formula
    serves both variants. The Triton launchers run for CPU tensors too (under TRITON_INTERPRET=1).
    """
    pairs = [(fwd, bwd)] + ([(triton.fwd, triton.bwd)] if triton is not None else [])
    for f, b in pairs:
        torch.library.register_fake(f.default)(fake_fwd)
        torch.library.register_fake(b.default)(fake_bwd)
        torch.library.register_autograd(
            f.default, lambda ctx, *grads, _op=b: backward(ctx, grads, _op), setup_context=setup_context
        )
    if triton is not None:
        torch.library.register_kernel(triton.fwd.default, ("cpu", "cuda"), triton.launch_fwd)
        torch.library.register_kernel(triton.bwd.default, ("cpu", "cuda"), triton.launch_bwd)


