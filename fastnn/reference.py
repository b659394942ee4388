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


# ---- binary cross-entropy with logits ----
def binary_cross_entropy_with_logits(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                                     reduction: str = "mean", pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """weight * ((1 - y) * x + (1 + (pos_weight - 1) * y) * softplus(-x)), with softplus(-x) = -log(sigmoid(x))
    written as max(-x, 0) + log1p(exp(-|x|)) so that no exp overflows; then summed or averaged over all
    elements ("mean" of nothing is NaN)."""
    x, y = _upcast(input), _upcast(target)
    # Both branches of each `where` are finite, and autograd's derivative at x = 0 is the true -1/2 (abs and
    # clamp would give a one-sided subgradient there).
    pos = x >= 0
    softplus_neg = torch.log1p(torch.exp(torch.where(pos, -x, x))) - torch.where(pos, torch.zeros_like(x), x)
    log_weight = 1 if pos_weight is None else 1 + (_upcast(pos_weight) - 1) * y
    loss = (1 - y) * x + log_weight * softplus_neg
    if weight is not None:
        loss = loss * _upcast(weight)
    if reduction == "mean":
        loss = loss.sum() / loss.numel()
    elif reduction == "sum":
        loss = loss.sum()
    return loss.to(input.dtype)
