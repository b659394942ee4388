"""cross_entropy: custom ops ``fastnn::cross_entropy_fwd`` / ``_bwd`` (+ ``_bwd_inplace``) (C++ CPU, CUDA) and their
``_triton`` twins, and the checks and reduction that linear_cross_entropy shares.

The ops return the unreduced per-row loss and, as "stats", the per-row statistics (2, rows...): the row's max and the
log of its sum of exp(x - max) (stat_plane in csrc/cross_entropy.h says why not their sum), both float32 (float64
for float64 input); the reduction is done here, in a few O(rows) torch ops that autograd differentiates. The
backward saves only the logits plus those statistics, and recomputes the softmax.

With ``grad_in_forward`` and a scalar reduction of class-index targets, ``fastnn::cross_entropy_fwd_grad`` (and its
``_triton`` twin) runs instead: the reduction's gradient of each row's loss is known in the forward (1, or 1 / the
mean's denominator), so each row's gradient is written right after its loss, while the row is still in cache, and
the backward only scales it by the upstream gradient (``_GradInForward``).
"""
from __future__ import annotations

import math

import torch

from .. import reference
from .._validation import check_same_device, check_tensor
from ..backend import resolve
from .registry import Triton, register_op

_FORWARD = {"native": torch.ops.fastnn.cross_entropy_fwd, "triton": torch.ops.fastnn.cross_entropy_fwd_triton}
_FORWARD_GRAD = {"native": torch.ops.fastnn.cross_entropy_fwd_grad,
                 "triton": torch.ops.fastnn.cross_entropy_fwd_grad_triton}
# The in-place backward of each backward op (inplace_backward=True).
_INPLACE = {torch.ops.fastnn.cross_entropy_bwd: torch.ops.fastnn.cross_entropy_bwd_inplace,
            torch.ops.fastnn.cross_entropy_bwd_triton: torch.ops.fastnn.cross_entropy_bwd_inplace_triton}

REDUCTIONS = ("none", "mean", "sum")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_loss_options(fn, weight, ignore_index, reduction, label_smoothing, classes, dtype, wname="weight"):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or \
            not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{fn}: label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if weight is not None:
        check_tensor(weight, wname, fn=fn)
        if weight.shape != (classes,):
            raise ValueError(f"{fn}: {wname} must have shape ({classes},) (one per class), got {tuple(weight.shape)}")
        if weight.dtype != dtype:  # torch refuses it too
            raise TypeError(f"{fn}: {wname} must have input's dtype {dtype}, got {weight.dtype}")
        if weight.requires_grad:
            raise NotImplementedError(f"{fn}: gradients with respect to {wname} are not supported (nor are they "
                                      f"in torch's nll_loss); pass {wname}.detach()")
    return weight


# The class-index dtypes torch's nll_loss takes.
INDEX_DTYPES = (torch.int64, torch.uint8)


def check_index_target(fn, target, expect_shape, shape_from: str):
    """target as int64 class indices of ``expect_shape``; ``shape_from`` says where that shape comes from."""
    if target.dtype not in INDEX_DTYPES:
        raise TypeError(f"{fn}: target must be class indices of dtype int64 (or uint8) or floating probabilities, "
                        f"got {target.dtype}")
    if tuple(target.shape) != tuple(expect_shape):
        raise ValueError(f"{fn}: target of class indices must have shape {tuple(expect_shape)} {shape_from}, got "
                         f"{tuple(target.shape)}")
    return target.long()


def reduce_loss(loss, target, weight, ignore_index, reduction, prob, dtype):
    """loss: per-row losses (accumulation dtype). A "mean" divides by the summed weight of the non-ignored targets
    (their count without weights; the number of rows for probability targets), as torch; all ignored gives NaN."""
    if reduction == "none":
        out = loss
    elif reduction == "sum":
        out = loss.sum()
    elif prob:
        out = loss.sum() / loss.numel()
    else:
        out = loss.sum() / mean_denominator(target, weight, ignore_index, loss.dtype)
    # No .to() when the dtype already matches: torch.compile in torch 2.11 turns a same-dtype .to() at the end of
    # an autograd.Function's forward (the grad_in_forward losses) into a zero gradient.
    return out if out.dtype == dtype else out.to(dtype)


def mean_denominator(target, weight, ignore_index, acc):
    """What a "mean" over class-index targets divides by, in dtype acc: the summed weight of the non-ignored
    targets, or their count without weights."""
    valid = target != ignore_index
    if weight is None:
        return valid.sum().to(acc)
    w = weight.to(acc)
    return torch.where(valid, w[target.clamp(0, w.shape[0] - 1)], 0).sum()


def reduction_row_grads(target, weight, ignore_index, reduction, acc, device):
    """The gradient of a "sum" or "mean" reduction with respect to each row's loss, target's shape, in dtype acc:
    1, or 1 / the mean's denominator (what the grad_in_forward ops take as grad_loss)."""
    rows = torch.ones(target.shape, dtype=acc, device=device)
    return rows / mean_denominator(target, weight, ignore_index, acc) if reduction == "mean" else rows


def cross_entropy(input, target, weight=None, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, inplace_backward: bool = False, backend: str | None = None,
                  grad_in_forward: bool = False):
    """Fused softmax cross-entropy with ``torch.nn.functional.cross_entropy`` semantics (see fastnn.functional)."""
    fn = "cross_entropy"
    check_tensor(input, "input", fn=fn)
    for name, flag in (("inplace_backward", inplace_backward), ("grad_in_forward", grad_in_forward)):
        if not isinstance(flag, bool):
            raise TypeError(f"{fn}: {name} must be a bool, got {type(flag).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{fn}: target must be a torch.Tensor, got {type(target).__name__}")
    if input.dim() == 0:
        raise ValueError(f"{fn}: input must be (C,), (N, C) or (N, C, d1, ...), got a 0-d tensor")
    check_same_device(fn, input=input, target=target, weight=weight)
    unbatched = input.dim() == 1
    classes = input.shape[0 if unbatched else 1]
    weight = check_loss_options(fn, weight, ignore_index, reduction, label_smoothing, classes, input.dtype)
    prob = target.is_floating_point()
    if prob:
        if target.shape != input.shape:
            raise ValueError(f"{fn}: target of class probabilities must have input's shape {tuple(input.shape)}, "
                             f"got {tuple(target.shape)}")
        if ignore_index >= 0:
            # torch refuses it too: a real class index means nothing for probabilities (negative ones pass).
            raise ValueError(f"{fn}: ignore_index={ignore_index} is not supported for class-probability targets "
                             "(floating target); leave it negative (default -100)")
        # As torch: the loss is computed (and returned) in the promoted dtype of logits and probabilities.
        dtype = torch.promote_types(input.dtype, target.dtype)
        input, target = input.to(dtype), target.to(dtype)
        weight = None if weight is None else weight.to(dtype)
    else:
        row_shape = input.shape[1:] if unbatched else (input.shape[0],) + tuple(input.shape[2:])
        target = check_index_target(fn, target, () if unbatched else row_shape,
                                    f"for input of shape {tuple(input.shape)}")
    b = resolve(torch.ops.fastnn.cross_entropy_fwd, backend, input, target, weight)
    if b == "reference":
        return reference.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing)
    x = input.unsqueeze(0) if unbatched else input
    t = target.unsqueeze(0) if unbatched else target
    if grad_in_forward and reduction != "none" and not prob and torch.is_grad_enabled() and input.requires_grad:
        return _GradInForward.apply(x.contiguous(), t.contiguous(), weight, ignore_index, float(label_smoothing),
                                    reduction, b)
    loss, _ = _FORWARD[b](x.contiguous(), t.contiguous(), weight, ignore_index, float(label_smoothing),
                          bool(inplace_backward))
    out = reduce_loss(loss, t, weight, ignore_index, reduction, prob, input.dtype)
    return out.squeeze(0) if unbatched and reduction == "none" else out


class _GradInForward(torch.autograd.Function):
    """The scalar loss ("mean" or "sum") of class-index targets, whose gradient the forward computes
    (``fastnn::cross_entropy_fwd_grad``) for the reduction's own per-row gradient and the backward scales by the
    upstream one. The gradient (input's size) lives from the forward to the backward in place of the logits.

    The backward hands the stored gradient out as it is when the upstream gradient is 1 (``loss.backward()``: one
    read of g, a device sync on CUDA, as Liger-Kernel's), else scales it in place: either way no second (N, C)
    tensor and no extra pass over one in the common case. So the stored gradient serves one backward; a second
    one (``retain_graph=True``) raises instead of returning a gradient scaled twice."""

    @staticmethod
    def forward(ctx, x, target, weight, ignore_index, label_smoothing, reduction, backend):
        rows = reduction_row_grads(target, weight, ignore_index, reduction, acc_dtype(x.dtype), x.device)
        loss, grad = _FORWARD_GRAD[backend](x, target, weight, rows, ignore_index, label_smoothing)
        ctx.save_for_backward(grad)
        ctx.used = False
        return reduce_loss(loss, target, weight, ignore_index, reduction, False, x.dtype)

    @staticmethod
    def backward(ctx, g):
        if ctx.used:
            raise RuntimeError("cross_entropy(grad_in_forward=True): the gradient made in the forward was handed "
                               "out by the first backward; for a second backward through the same loss "
                               "(retain_graph=True) use grad_in_forward=False")
        ctx.used = True
        grad, = ctx.saved_tensors
        if torch.compiler.is_compiling():  # traced: no data-dependent branch, and the compiler plans the buffers
            return grad * g, None, None, None, None, None, None
        if g.item() != 1.0:
            grad.mul_(g)  # g is 0-d: the product keeps grad's dtype
        return grad, None, None, None, None, None, None


def _fake_fwd(input, target, weight, ignore_index, label_smoothing, inplace_backward):
    shape = (input.shape[0],) + tuple(input.shape[2:])
    return input.new_empty(shape, dtype=acc_dtype(input.dtype)), input.new_empty((2,) + shape, dtype=acc_dtype(input.dtype))


def _fake_bwd(grad_loss, input, target, weight, stats, ignore_index, label_smoothing):
    return input.new_empty(input.shape)


def _setup_context(ctx, inputs, output):
    input, target, weight, ctx.ignore_index, ctx.label_smoothing, ctx.inplace = inputs
    ctx.mark_non_differentiable(output[1])
    # stats never gets a gradient: materializing one would zero-fill a (2, rows...) tensor on every backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, target, weight, output[1])


def _target_grad(g, input, weight, stats, eps):
    # Probability targets: d loss / d y_c = -(1 - eps) w_c log p_c.
    shape = [1] * input.dim()
    shape[1] = input.shape[1]
    logp = (input.to(stats.dtype) - stats[0].unsqueeze(1)) - stats[1].unsqueeze(1)
    w = 1.0 if weight is None else weight.to(stats.dtype).reshape(shape)
    return (-(1.0 - eps) * g.unsqueeze(1) * logp * w).to(input.dtype)


def _backward(ctx, grads, bwd_op):
    input, target, weight, stats = ctx.saved_tensors
    g = grads[0]
    if g is None:  # the loss took no part in what is differentiated
        return None, None, None, None, None, None
    args = (target, weight, stats, ctx.ignore_index, ctx.label_smoothing)
    grad_target = None
    if ctx.needs_input_grad[1] and target.is_floating_point():
        grad_target = _target_grad(g, input, weight, stats, ctx.label_smoothing)
    if not ctx.needs_input_grad[0]:
        grad_input = None
    elif ctx.inplace:
        # The contract of inplace_backward: the logits' storage now holds their gradient.
        _INPLACE[bwd_op](g, input, *args)
        # A custom op's write does not bump the version counter; bumping it makes autograd refuse (rather than
        # silently use) the overwritten logits if another op saved them for its backward.
        torch.autograd.graph.increment_version(input)
        grad_input = input
    else:
        grad_input = bwd_op(g, input, *args)
    return grad_input, grad_target, None, None, None, None


def _triton_fwd(input, target, weight, ignore_index, label_smoothing, inplace_backward):
    from ..kernels.cross_entropy import cross_entropy_forward

    return cross_entropy_forward(input, target, weight, ignore_index, label_smoothing)


def _triton_bwd(grad_loss, input, target, weight, stats, ignore_index, label_smoothing):
    from ..kernels.cross_entropy import cross_entropy_backward

    return cross_entropy_backward(grad_loss, input, target, weight, stats, ignore_index, label_smoothing)


def _triton_bwd_inplace(grad_loss, input, target, weight, stats, ignore_index, label_smoothing):
    from ..kernels.cross_entropy import backward_into

    if not input.is_contiguous():
        raise RuntimeError("cross_entropy_bwd_inplace: input must be contiguous")
    backward_into(grad_loss, input, target.contiguous(), weight, stats, ignore_index, label_smoothing, input)


register_op(torch.ops.fastnn.cross_entropy_fwd, torch.ops.fastnn.cross_entropy_bwd, fake_fwd=_fake_fwd,
            fake_bwd=_fake_bwd, setup_context=_setup_context, backward=_backward,
            triton=Triton(torch.ops.fastnn.cross_entropy_fwd_triton, torch.ops.fastnn.cross_entropy_bwd_triton,
                          _triton_fwd, _triton_bwd))
for _inplace in _INPLACE.values():
    torch.library.register_fake(_inplace.default)(lambda *args: None)
torch.library.register_kernel(torch.ops.fastnn.cross_entropy_bwd_inplace_triton.default, ("cpu", "cuda"),
                              _triton_bwd_inplace)


def _fake_fwd_grad(input, target, weight, grad_loss, ignore_index, label_smoothing):
    return _fake_fwd(input, target, weight, ignore_index, label_smoothing, False)[0], input.new_empty(input.shape)


def _triton_fwd_grad(input, target, weight, grad_loss, ignore_index, label_smoothing):
    from ..kernels.cross_entropy import cross_entropy_forward_grad

    acc = acc_dtype(input.dtype)
    rows = math.prod(input.shape[:1] + input.shape[2:])
    if grad_loss.numel() != rows or grad_loss.dtype != acc:  # the native op's check
        raise ValueError(f"cross_entropy: grad_loss must have one value per row ({rows}) in {acc}, got "
                         f"{grad_loss.numel()} of {grad_loss.dtype}")
    return cross_entropy_forward_grad(input, target, weight, grad_loss, ignore_index, label_smoothing)


for _op in _FORWARD_GRAD.values():
    torch.library.register_fake(_op.default)(_fake_fwd_grad)
torch.library.register_kernel(torch.ops.fastnn.cross_entropy_fwd_grad_triton.default, ("cpu", "cuda"),
                              _triton_fwd_grad)
