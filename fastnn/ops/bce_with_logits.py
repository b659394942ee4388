"""binary_cross_entropy_with_logits: custom ops ``fastnn::bce_with_logits_fwd`` / ``bce_with_logits_bwd`` (C++ CPU,
CUDA) and their ``_triton`` twins, with one fake and one autograd formula. The forward saves nothing it computed:
the backward recomputes from input and target, giving grad_input and grad_target in one pass."""
from __future__ import annotations

import torch

from .. import reference
from .._validation import check_same_device, check_tensor
from ..backend import resolve
from .registry import Triton, register_op

_FORWARD = {"native": torch.ops.fastnn.bce_with_logits_fwd, "triton": torch.ops.fastnn.bce_with_logits_fwd_triton}

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}  # at::Reduction
FN = "binary_cross_entropy_with_logits"


def bce_with_logits(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                    reduction: str = "mean", pos_weight: torch.Tensor | None = None,
                    backend: str | None = None) -> torch.Tensor:
    """Sigmoid + binary cross-entropy, fused and stable for any logit.

    Args:
        input: logits x, any shape (0-d and empty included); float32/float64/float16/bfloat16 (half types
            compute in float32).
        target: y of input's shape and dtype, soft targets in [0, 1] allowed.
        weight: rescales each element's loss; broadcastable to input's shape, input's dtype.
        reduction: "none" (input's shape), "mean" (over all elements; NaN if there are none) or "sum".
        pos_weight: weight of the positive term, broadcastable to input's shape - typically (C,) for C classes
            along the last dim; input's dtype.
        backend: "auto", "native", "triton" or "reference"; None uses ``fastnn.get_backend()``.

    Returns:
        The loss: input's shape for "none", else a 0-d tensor; input's dtype. Gradients flow to input and
        target; weight and pos_weight must not require grad (as in torch).
    """
    check_tensor(input, "input", fn=FN)
    check_tensor(target, "target", fn=FN)
    if target.shape != input.shape:  # torch's own message
        raise ValueError(f"Target size ({target.size()}) must be the same as input size ({input.size()})")
    named = {"target": target, "weight": weight, "pos_weight": pos_weight}
    for name, t in named.items():
        if t is None:
            continue
        check_tensor(t, name, fn=FN)
        if t.dtype != input.dtype:
            raise TypeError(f"{FN}: {name} must have input's dtype {input.dtype}, got {t.dtype}")
        if name != "target":
            try:
                ok = torch.broadcast_shapes(t.shape, input.shape) == input.shape
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(f"{FN}: {name} of shape {tuple(t.shape)} cannot be broadcast to input's shape "
                                 f"{tuple(input.shape)}")
            if t.requires_grad and torch.is_grad_enabled():
                raise RuntimeError(f"{FN}: is not differentiable with respect to {name} (as in torch); "
                                   f"pass {name}.detach()")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{FN}: reduction must be one of {tuple(REDUCTIONS)}, got {reduction!r}")
    check_same_device(FN, input=input, **named)
    b = resolve(torch.ops.fastnn.bce_with_logits_fwd, backend, input, target, weight, pos_weight)
    if b == "reference":
        return reference.binary_cross_entropy_with_logits(input, target, weight, reduction, pos_weight)
    return _FORWARD[b](input, target, weight, pos_weight, REDUCTIONS[reduction])


def _fake_fwd(input, target, weight, pos_weight, reduction):
    return input.new_empty(input.shape if reduction == 0 else ())


def _fake_bwd(grad_output, input, target, weight, pos_weight, reduction, input_grad, target_grad):
    return (input.new_empty(input.shape if input_grad else (0,)),
            input.new_empty(input.shape if target_grad else (0,)))


def _setup_context(ctx, inputs, output):
    input, target, weight, pos_weight, ctx.reduction = inputs
    ctx.save_for_backward(input, target, weight, pos_weight)


def _backward(ctx, grads, bwd_op):
    input, target, weight, pos_weight = ctx.saved_tensors
    need_input, need_target = ctx.needs_input_grad[:2]
    if not (need_input or need_target):
        return None, None, None, None, None
    dx, dy = bwd_op(grads[0], input, target, weight, pos_weight, ctx.reduction, need_input, need_target)
    return dx if need_input else None, dy if need_target else None, None, None, None


def _triton_fwd(input, target, weight, pos_weight, reduction):
    from ..kernels.bce_with_logits import bce_with_logits_forward

    return bce_with_logits_forward(input, target, weight, pos_weight, reduction)


def _triton_bwd(grad_output, input, target, weight, pos_weight, reduction, input_grad, target_grad):
    from ..kernels.bce_with_logits import bce_with_logits_backward

    return bce_with_logits_backward(grad_output, input, target, weight, pos_weight, reduction, input_grad,
                                    target_grad)


register_op(torch.ops.fastnn.bce_with_logits_fwd, torch.ops.fastnn.bce_with_logits_bwd, fake_fwd=_fake_fwd,
            fake_bwd=_fake_bwd, setup_context=_setup_context, backward=_backward,
            triton=Triton(torch.ops.fastnn.bce_with_logits_fwd_triton, torch.ops.fastnn.bce_with_logits_bwd_triton,
                          _triton_fwd, _triton_bwd))
