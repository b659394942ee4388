"""linear_cross_entropy: custom ops ``fastnn::linear_cross_entropy_fwd`` / ``_bwd`` (C++ CPU, CUDA) and their
``_triton`` twins: cross_entropy(input @ weight.T + bias, target) without the (N, V) logits.

``linear_cross_entropy`` maps torch 2.13's arguments onto the per-row ops (linear_weight -> weight, linear_bias ->
bias, torch's weight -> class_weight, options.batch_chunk_size -> chunk); a K-dimensional loss runs them once per
position, and class-probability targets (which the ops do not take) run checkpointed chunks of linear + the fused
cross_entropy instead.

The ops return the unreduced per-row loss and the per-row statistics as cross_entropy's do (ops/cross_entropy.py);
the argument checks and the reduction are cross_entropy's. The backward saves input, weight, bias and the
statistics, and recomputes the logits chunk by chunk.

With ``grad_in_forward`` (by default on the CPU: ``grad_in_forward_by_default``) and a scalar reduction,
``fastnn::linear_cross_entropy_fwd_grad`` (and its ``_triton`` twin) runs instead: the reduction's gradient of each
row's loss is known before the backward (1, or 1 / the mean's denominator), so the forward computes the gradients
in the same chunk loop, three products a chunk instead of four, and the backward only scales them by the upstream
gradient (``_GradInForward``).
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from .. import reference
from .._validation import check_same_device, check_tensor
from ..backend import resolve
from .cross_entropy import (acc_dtype, check_index_target, check_loss_options, cross_entropy, reduce_loss,
                            reduction_row_grads)
from .registry import Triton, register_op

_FORWARD = {"native": torch.ops.fastnn.linear_cross_entropy_fwd,
            "triton": torch.ops.fastnn.linear_cross_entropy_fwd_triton}
_FORWARD_GRAD = {"native": torch.ops.fastnn.linear_cross_entropy_fwd_grad,
                 "triton": torch.ops.fastnn.linear_cross_entropy_fwd_grad_triton}

# One (chunk, V) logits buffer of at most 128 MiB: on fewer rows (below ~1024 at V=32000) the CPU GEMMs lose
# FLOP rate (docs/measurements.md), and 128 MiB is still ~0.04x the (N, V) tensors torch keeps at N=8192. The
# gradients made in the forward take half that: they hold input's and the weight's gradients beside the buffer,
# and at 64 MiB the path's peak stays below torch's chunked linear_cross_entropy's, for ~3% of its time
# (docs/measurements.md, "The CPU's linear + CE default").
CHUNK_BYTES = 1 << 27
GRAD_IN_FORWARD_CHUNK_BYTES = CHUNK_BYTES // 2


def default_chunk(vocab: int, dtype: torch.dtype, budget: int = CHUNK_BYTES) -> int:
    """Rows per chunk: the largest power of two whose (rows, vocab) logits fit in budget bytes (at least 1)."""
    rows = budget // max(1, vocab * torch.empty((), dtype=dtype).element_size())
    return 1 << max(0, int(math.log2(max(rows, 1))))


def chunk_rows(fn: str, options, chunk_size) -> int | None:
    """Rows per chunk asked for: ``chunk_size`` or torch's ``options.batch_chunk_size`` (None: the default)."""
    if options is not None:
        if not hasattr(options, "batch_chunk_size"):
            raise TypeError(f"{fn}: options must be a torch.nn.LinearCrossEntropyOptions or None, got "
                            f"{type(options).__name__}")
        rows = options.batch_chunk_size
        if rows is not None and chunk_size is not None and rows != chunk_size:
            raise ValueError(f"{fn}: options.batch_chunk_size={rows!r} and chunk_size={chunk_size!r} disagree; "
                             "pass one of them")
        chunk_size = rows if rows is not None else chunk_size
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or
                                   chunk_size < 1):
        raise ValueError(f"{fn}: chunk_size (options.batch_chunk_size) must be a positive int, got {chunk_size!r}")
    return chunk_size


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction: str = "mean",
                         ignore_index: int | None = None, label_smoothing: float = 0.0, options=None,
                         chunk_size: int | None = None, backend: str | None = None,
                         grad_in_forward: bool | None = None):
    """torch.nn.functional.linear_cross_entropy in row chunks (see fastnn.functional)."""
    fn = "linear_cross_entropy"
    check_tensor(input, "input", fn=fn)
    check_tensor(linear_weight, "linear_weight", fn=fn)
    if linear_weight.dim() < 2:
        raise ValueError(f"{fn}: linear_weight must be (C, D) or (C, d1, ..., dK, D), got shape "
                         f"{tuple(linear_weight.shape)}")
    C, out_features, D = linear_weight.shape[0], tuple(linear_weight.shape[1:-1]), linear_weight.shape[-1]
    if input.dim() < 1 or input.shape[-1] != D:
        raise ValueError(f"{fn}: input must be (..., D) with D = linear_weight.shape[-1] = {D}, got "
                         f"{tuple(input.shape)}")
    if out_features and input.dim() != 2:
        raise ValueError(f"{fn}: a K-dimensional loss (linear_weight of shape {tuple(linear_weight.shape)}) needs "
                         f"input of shape (N, {D}), got {tuple(input.shape)}")
    if linear_weight.dtype != input.dtype:
        raise TypeError(f"{fn}: linear_weight must have input's dtype {input.dtype}, got {linear_weight.dtype}")
    if linear_bias is not None:
        check_tensor(linear_bias, "linear_bias", fn=fn)
        if linear_bias.shape != (C, *out_features) or linear_bias.dtype != input.dtype:
            raise ValueError(f"{fn}: linear_bias must be {(C, *out_features)} (linear_weight.shape[:-1]) of "
                             f"input's dtype, got {tuple(linear_bias.shape)} {linear_bias.dtype}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{fn}: target must be a torch.Tensor, got {type(target).__name__}")
    check_same_device(fn, input=input, linear_weight=linear_weight, target=target, linear_bias=linear_bias,
                      weight=weight)
    batch = tuple(input.shape[:-1])
    prob = target.is_floating_point()
    if prob:
        if tuple(target.shape) != (*batch, C, *out_features):
            raise ValueError(f"{fn}: target of class probabilities must have the logits' shape "
                             f"{(*batch, C, *out_features)} (input.shape[:-1] + linear_weight.shape[:-1]), got "
                             f"{tuple(target.shape)}")
        if ignore_index is not None:  # torch refuses it too
            raise ValueError(f"{fn}: ignore_index cannot be given when target holds class probabilities (a "
                             f"floating target), got {ignore_index!r}")
    ignore_index = -100 if ignore_index is None else ignore_index
    weight = check_loss_options(fn, weight, ignore_index, reduction, label_smoothing, C, input.dtype)
    if not prob:
        shape_from = (f"(N and linear_weight's d1..dK) for linear_weight of shape {tuple(linear_weight.shape)}"
                      if out_features else f"for input of shape {tuple(input.shape)}")
        target = check_index_target(fn, target, (*batch, *out_features), shape_from)
    chunk = chunk_rows(fn, options, chunk_size)
    if grad_in_forward is not None and not isinstance(grad_in_forward, bool):
        raise TypeError(f"{fn}: grad_in_forward must be a bool or None, got {type(grad_in_forward).__name__}")
    b = resolve(torch.ops.fastnn.linear_cross_entropy_fwd, backend, input, linear_weight, target, linear_bias,
                weight)
    if b == "reference":
        return reference.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=weight,
                                              reduction=reduction, ignore_index=ignore_index,
                                              label_smoothing=label_smoothing)
    dtype = torch.promote_types(input.dtype, target.dtype) if prob else input.dtype
    rows, P = math.prod(batch), math.prod(out_features)
    x = input.reshape(rows, D)  # (-1, D) is ambiguous for D = 0
    t = target.reshape((rows, C, P) if prob else (rows, P)).to(dtype if prob else target.dtype)
    wanted = [v is not None and v.requires_grad for v in (x, linear_weight, linear_bias)]
    if grad_in_forward is None:
        grad_in_forward = grad_in_forward_by_default(x)
    if (grad_in_forward and reduction != "none" and not prob and not out_features and torch.is_grad_enabled()
            and any(wanted)):
        chunk = chunk or default_chunk(C, dtype, GRAD_IN_FORWARD_CHUNK_BYTES)
        return _GradInForward.apply(x, linear_weight, linear_bias, t[:, 0], weight, ignore_index,
                                    float(label_smoothing), chunk, reduction, b, tuple(wanted))
    chunk = chunk or default_chunk(C, dtype)
    # A K-dimensional loss (C, d1..dK, D) is one (C, D) loss per position of d1..dK, all on the same input rows.
    if out_features:
        ws = linear_weight.reshape(C, P, D).unbind(1)
        bs = [None] * P if linear_bias is None else linear_bias.reshape(C, P).unbind(1)
    else:
        ws, bs = (linear_weight,), (linear_bias,)
    losses = [_probability_rows(x, ws[p], bs[p], t[:, :, p], weight, label_smoothing, chunk, b) if prob else
              _FORWARD[b](x, ws[p], bs[p], t[:, p], weight, ignore_index, float(label_smoothing), chunk)[0]
              for p in range(P)]
    loss = losses[0] if P == 1 else torch.stack(losses, 1)  # (rows, P), t's order
    out = reduce_loss(loss.reshape(-1), t.reshape(-1), weight, ignore_index, reduction, prob, dtype)
    return out.reshape((*batch, *out_features)) if reduction == "none" else out


def grad_in_forward_by_default(x: torch.Tensor) -> bool:
    """``grad_in_forward=None``: on the CPU, where the three products a chunk beat the recomputing path's four
    (as torch's own chunked path does, it then computes the gradients in the forward); not on a GPU, where the half
    types' gradients would be accumulated in float32 through the forward, against none held by the recomputing
    path."""
    return x.device.type == "cpu"


class _GradInForward(torch.autograd.Function):
    """The scalar loss ("mean" or "sum") of class-index targets, whose gradients the forward computes
    (``fastnn::linear_cross_entropy_fwd_grad``) for the reduction's own per-row gradient and the backward scales by
    the upstream one. The gradients live from the forward to the backward: input's and the weight's sizes (and
    the bias's), where the recomputing path keeps only the statistics."""

    @staticmethod
    def forward(ctx, x, w, bias, target, class_weight, ignore_index, label_smoothing, chunk, reduction, backend,
                wanted):
        rows = reduction_row_grads(target, class_weight, ignore_index, reduction, acc_dtype(x.dtype), x.device)
        loss, gi, gw, gb = _FORWARD_GRAD[backend](x, w, bias, target, class_weight, rows, ignore_index,
                                                  label_smoothing, chunk, list(wanted))
        ctx.save_for_backward(gi, gw, gb)
        ctx.wanted = wanted
        return reduce_loss(loss, target, class_weight, ignore_index, reduction, False, x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the stored gradients are constants: no second-order terms
    def backward(ctx, grad):
        stored = ctx.saved_tensors
        # An upstream gradient of 1 (``loss.backward()``) hands the stored gradients out as they are: unless the
        # graph is retained, autograd has released them from this node by the time the weight's AccumulateGrad
        # runs, so it takes the tensor as the weight's .grad instead of copying it; a retained graph gets a copy
        # there, so the stored ones stay as they are for the next backward. Otherwise (and when traced, where a
        # data-dependent branch cannot be) a scaled copy: grad is 0-d, so each product keeps the gradient's dtype.
        scale = torch.compiler.is_compiling() or grad.item() != 1.0
        out = [(g * grad if scale else g) if want else None for g, want in zip(stored, ctx.wanted)]
        return (*out, None, None, None, None, None, None, None, None)


def _probability_rows(x, w, bias, y, weight, label_smoothing, chunk, backend):
    """Per-row losses (rows,) for class-probability targets y (rows, C): chunks of rows through ``linear`` and
    fastnn's fused cross_entropy, each under activation checkpointing, so one chunk's logits at a time are held
    (in the forward and in the backward's recompute)."""
    dtype = y.dtype
    weight = None if weight is None else weight.to(dtype)

    def rows_loss(xc, w, bias, yc):
        logits = torch.nn.functional.linear(xc, w, bias).to(dtype)
        return cross_entropy(logits, yc, weight, reduction="none", label_smoothing=label_smoothing,
                             backend=backend)

    grad = torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in (x, w, bias, y))
    out = []
    for s in range(0, max(x.shape[0], 1), chunk):  # one (empty) chunk for no rows keeps the graph
        args = (x[s:s + chunk], w, bias, y[s:s + chunk])
        out.append(checkpoint(rows_loss, *args, use_reentrant=False) if grad else rows_loss(*args))
    return (out[0] if len(out) == 1 else torch.cat(out)).to(acc_dtype(dtype))


def _fake_fwd(input, weight, bias, target, class_weight, ignore_index, label_smoothing, chunk):
    shape = (input.shape[0],)
    return input.new_empty(shape, dtype=acc_dtype(input.dtype)), input.new_empty((2,) + shape, dtype=acc_dtype(input.dtype))


def _fake_bwd(grad_loss, input, weight, bias, target, class_weight, stats, ignore_index, label_smoothing, chunk,
               output_mask):
    shapes = (input.shape, weight.shape, (weight.shape[0],))
    return tuple(t.new_empty(s if want else (0,)) for t, s, want in zip((input, weight, weight), shapes, output_mask))


def _fake_fwd_grad(input, weight, bias, target, class_weight, grad_loss, ignore_index, label_smoothing, chunk,
                   output_mask):
    loss, _ = _fake_fwd(input, weight, bias, target, class_weight, ignore_index, label_smoothing, chunk)
    return (loss, *_fake_bwd(grad_loss, input, weight, bias, target, class_weight, None, ignore_index,
                             label_smoothing, chunk, output_mask))


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


def _triton_fwd_grad(input, weight, bias, target, class_weight, grad_loss, ignore_index, label_smoothing, chunk,
                     output_mask):
    from ..kernels.linear_cross_entropy import linear_cross_entropy_forward_grad

    acc = acc_dtype(input.dtype)
    if tuple(grad_loss.shape) != (input.shape[0],) or grad_loss.dtype != acc:  # the native op's check
        raise ValueError(f"linear_cross_entropy: grad_loss must be (N,) = ({input.shape[0]},) of {acc}, got "
                         f"{tuple(grad_loss.shape)} {grad_loss.dtype}")
    return linear_cross_entropy_forward_grad(input, weight, bias, target, class_weight, grad_loss, ignore_index,
                                             label_smoothing, chunk, output_mask)


for _op in _FORWARD_GRAD.values():
    torch.library.register_fake(_op.default)(_fake_fwd_grad)
torch.library.register_kernel(torch.ops.fastnn.linear_cross_entropy_fwd_grad_triton.default, ("cpu", "cuda"),
                              _triton_fwd_grad)
