"""Plain-PyTorch ground truth of every fastnn op, written from the definitions with elementary tensor ops (not
the fused torch kernels fastnn is compared with). Tests run it in float64 or float32; autograd differentiates it.
Half-precision inputs are computed in float32 and cast back, as the fused kernels do."""
from __future__ import annotations

import torch

_HALF = (torch.float16, torch.bfloat16)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in _HALF else x


def softmax(input: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(x - max) / sum(exp(x - max)) over ``dim``; a row of all -inf gives NaN (as torch)."""
    x = _upcast(input)
    if x.dim() > 0 and x.shape[dim] == 0:
        return input.clone()
    e = torch.exp(x - x.amax(dim, keepdim=True).detach())
    return (e / e.sum(dim, keepdim=True)).to(input.dtype)


def log_softmax(input: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x - max - log(sum(exp(x - max))) over ``dim``."""
    x = _upcast(input)
    if x.dim() > 0 and x.shape[dim] == 0:
        return input.clone()
    shifted = x - x.amax(dim, keepdim=True).detach()
    return (shifted - torch.log(torch.exp(shifted).sum(dim, keepdim=True))).to(input.dtype)
