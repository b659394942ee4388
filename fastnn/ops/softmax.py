"""softmax / log_softmax: custom ops ``fastnn::softmax_fwd`` / ``softmax_bwd`` (C++ CPU, CUDA) and their
``_triton`` twins, with one fake and one autograd formula. The backward saves only the forward's output."""
from __future__ import annotations

import torch

from .. import reference
from .._validation import check_tensor, wrap_dim
from ..backend import resolve
from .registry import Triton, register_op

_FORWARD = {"native": torch.ops.fastnn.softmax_fwd, "triton": torch.ops.fastnn.softmax_fwd_triton}


def softmax(input: torch.Tensor, dim: int, log: bool, dtype: torch.dtype | None = None,
            backend: str | None = None) -> torch.Tensor:
    """Softmax (``log=False``) or log-softmax (``log=True``) of ``input`` over ``dim``.

    Args:
        input: any shape, float32/float64/float16/bfloat16 (half types accumulate in float32); any strides.
        dim: the dimension to normalize, negative counts from the end.
        dtype: if given, ``input`` is cast to it first (as in ``torch.nn.functional.softmax``).
        backend: "auto", "native", "triton" or "reference"; None uses ``fastnn.get_backend()``.

    Returns:
        A contiguous tensor of ``input``'s shape (and ``dtype``, if given). A row of all ``-inf`` gives NaN,
        as in torch.
    """
    fn = "log_softmax" if log else "softmax"
    if dtype is not None:
        input = input.to(dtype) if isinstance(input, torch.Tensor) else input
    check_tensor(input, "input", fn=fn)
    dim = wrap_dim(dim, input.dim(), fn=fn)
    b = resolve(torch.ops.fastnn.softmax_fwd, backend, input)
    if b == "reference":
        return (reference.log_softmax if log else reference.softmax)(input, dim)
    return _FORWARD[b](input, dim, log)


def _fake_fwd(input, dim, log):
    return input.new_empty(input.shape)


def _fake_bwd(grad_output, output, dim, log):
    return output.new_empty(output.shape)


def _setup_context(ctx, inputs, output):
    _, ctx.dim, ctx.log = inputs
    ctx.save_for_backward(output)


def _backward(ctx, grads, bwd_op):
    (output,) = ctx.saved_tensors
    return bwd_op(grads[0], output, ctx.dim, ctx.log), None, None


def _triton_fwd(input, dim, log):
    from ..kernels.softmax import softmax_forward

    return softmax_forward(input, dim, log)


def _triton_bwd(grad_output, output, dim, log):
    from ..kernels.softmax import softmax_backward

    return softmax_backward(grad_output, output, dim, log)


register_op(torch.ops.fastnn.softmax_fwd, torch.ops.fastnn.softmax_bwd, fake_fwd=_fake_fwd, fake_bwd=_fake_bwd,
            setup_context=_setup_context, backward=_backward,
            triton=Triton(torch.ops.fastnn.softmax_fwd_triton, torch.ops.fastnn.softmax_bwd_triton, _triton_fwd,
                          _triton_bwd))
