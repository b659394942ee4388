"""linear_cross_entropy: custom ops ``fastnn::linear_cross_entropy_fwd`` / ``_bwd`` (C++ CPU, CUDA) and their
``_triton`` twins: cross_entropy(input @ weight.T + bias, target) without the (N, V) logits.

The ops return the unreduced per-row loss and the per-row statistics as cross_entropy's do (ops/cross_entropy.py);
the argument checks and the reduction are cross_entropy's. The backward saves input, weight, bias and the
statistics, and recomputes the logits chunk by chunk.
"""
from __future__ import annotations

import math

import torch

from .. import reference
from .._validation import check_same_device, check_tensor
from ..backend import resolve
from .cross_entropy import acc_dtype, check_index_target, check_loss_options, reduce_loss
from .registry import Triton, register_op

_FORWARD = {"native": torch.ops.fastnn.linear_cross_entropy_fwd,
            "triton": torch.ops.fastnn.linear_cross_entropy_fwd_triton}

# One (chunk, V) logits buffer of at most 128 MiB: on fewer rows (below ~1024 at V=32000) the CPU GEMMs lose
# FLOP rate (docs/measurements.md), and 128 MiB is still ~0.04x the (N, V) tensors torch keeps at N=8192.
CHUNK_BYTES = 1 << 27


def default_chunk(vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk: the largest power of two whose (rows, vocab) logits fit in CHUNK_BYTES (at least 1)."""
    rows = CHUNK_BYTES // max(1, vocab * torch.empty((), dtype=dtype).element_size())
    return 1 << max(0, int(math.log2(max(rows, 1))))


def linear_cross_entropy(input, weight, target, bias=None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, class_weight=None, chunk_size: int | None = None,
                         backend: str | None = None):
    """cross_entropy(input @ weight.T + bias, target) in row chunks (see fastnn.functional)."""
    fn = "linear_cross_entropy"
    check_tensor(input, "input", fn=fn)
    check_tensor(weight, "weight", fn=fn, ndim=2)
    if input.dim() < 1 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"{fn}: input must be (..., D) with D = weight.shape[1] = {weight.shape[1]}, got "
                         f"{tuple(input.shape)}")
    if weight.dtype != input.dtype:
        raise TypeError(f"{fn}: weight must have input's dtype {input.dtype}, got {weight.dtype}")
    V = weight.shape[0]
    if bias is not None:
        check_tensor(bias, "bias", fn=fn)
        if bias.shape != (V,) or bias.dtype != input.dtype:
            raise ValueError(f"{fn}: bias must be ({V},) of input's dtype, got {tuple(bias.shape)} {bias.dtype}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{fn}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point():
        raise TypeError(f"{fn}: target must be int64 class indices, got {target.dtype}")
    check_same_device(fn, input=input, weight=weight, target=target, bias=bias, class_weight=class_weight)
    class_weight = check_loss_options(fn, class_weight, ignore_index, reduction, label_smoothing, V, input.dtype,
                                 "class_weight")
    target = check_index_target(fn, target, input.shape[:-1], input.shape)
    if chunk_size is None:
        chunk_size = default_chunk(V, input.dtype)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be a positive int, got {chunk_size!r}")
    b = resolve(torch.ops.fastnn.linear_cross_entropy_fwd, backend, input, weight, target, bias, class_weight)
    if b == "reference":
        return reference.linear_cross_entropy(input, weight, target, bias, ignore_index, reduction, label_smoothing,
                                              class_weight)
    x, t = input.reshape(target.numel(), input.shape[-1]), target.reshape(-1)  # (-1, D) is ambiguous for D = 0
    loss, _ = _FORWARD[b](x, weight, bias, t, class_weight, ignore_index, float(label_smoothing),
                                            chunk_size)
    out = reduce_loss(loss, t, class_weight, ignore_index, reduction, False, input.dtype)
    return out.reshape(input.shape[:-1]) if reduction == "none" else out


def _fake_fwd(input, weight, bias, target, class_weight, ignore_index, label_smoothing, chunk):
    shape = (input.shape[0],)
    return input.new_empty(shape, dtype=acc_dtype(input.dtype)), input.new_empty((2,) + shape, dtype=acc_dtype(input.dtype))


def _fake_bwd(grad_loss, input, weight, bias, target, class_weight, stats, ignore_index, label_smoothing, chunk,
               output_mask):
    shapes = (input.shape, weight.shape, (weight.shape[0],))
    return tuple(t.new_empty(s if want else (0,)) for t, s, want in zip((input, weight, weight), shapes, output_mask))


def _setup_context(ctx, inputs, output):
    input, weight, bias, target, class_weight, ctx.ignore_index, ctx.label_smoothing, ctx.chunk = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(input, weight, bias, target, class_weight, output[1])


def _backward(ctx, grads, bwd_op):
    input, weight, bias, target, class_weight, stats = ctx.saved_tensors
    # Only the gradients autograd asks for: a frozen head skips grad_weight's product, a detached input grad_input's.
    mask = list(ctx.needs_input_grad[:3])
    gi, gw, gb = bwd_op(grads[0], input, weight, bias, target, class_weight, stats, ctx.ignore_index,
                        ctx.label_smoothing, ctx.chunk, mask)
    gi, gw, gb = (g if want else None for g, want in zip((gi, gw, gb), mask))
    return gi, gw, gb, None, None, None, None, None


def _triton_fwd(input, weight, bias, target, class_weight, ignore_index, label_smoothing, chunk):
    from ..kernels.linear_cross_entropy import linear_cross_entropy_forward

    return linear_cross_entropy_forward(input, weight, bias, target, class_weight, ignore_index, label_smoothing,
                                        chunk)


def _triton_bwd(grad_loss, input, weight, bias, target, class_weight, stats, ignore_index, label_smoothing, chunk,
                 output_mask):
    from ..kernels.linear_cross_entropy import linear_cross_entropy_backward

    return linear_cross_entropy_backward(grad_loss, input, weight, bias, target, class_weight, stats, ignore_index,
                                         label_smoothing, chunk, output_mask)


register_op(torch.ops.fastnn.linear_cross_entropy_fwd, torch.ops.fastnn.linear_cross_entropy_bwd,
            fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, setup_context=_setup_context, backward=_backward,
            triton=Triton(torch.ops.fastnn.linear_cross_entropy_fwd_triton,
                          torch.ops.fastnn.linear_cross_entropy_bwd_triton, _triton_fwd, _triton_bwd))
