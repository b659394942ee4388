"""Triton linear + cross-entropy: the chunk loop of csrc/linear_cross_entropy.h, with torch matmuls around
cross-entropy's row kernels (kernels/cross_entropy.py). One (chunk, V) logits buffer is reused for every chunk; the
backward recomputes each chunk's logits and overwrites them with their gradient."""
from __future__ import annotations

import torch

from .cross_entropy import acc_dtype, backward_into, forward_into


def _chunk_logits(buf, x, w, bias, s, n):
    out = buf[:n]
    if bias is None:
        return torch.mm(x[s:s + n], w.t(), out=out)
    return torch.addmm(bias, x[s:s + n], w.t(), out=out)


def linear_cross_entropy_forward(x, w, bias, target, class_weight, ignore_index, label_smoothing, chunk):
    x, w, target = x.contiguous(), w.contiguous(), target.contiguous()
    N, V = x.shape[0], w.shape[0]
    loss = torch.empty(N, dtype=acc_dtype(x.dtype), device=x.device)
    stats = torch.empty(2, N, dtype=loss.dtype, device=x.device)
    if N:
        buf = torch.empty(min(chunk, N), V, dtype=x.dtype, device=x.device)
        for s in range(0, N, chunk):
            n = min(chunk, N - s)
            forward_into(_chunk_logits(buf, x, w, bias, s, n), target[s:s + n], class_weight, ignore_index,
                         label_smoothing, loss[s:s + n], stats[:, s:s + n])
    return loss, stats


def linear_cross_entropy_backward(grad_loss, x, w, bias, target, class_weight, stats, ignore_index,
                                  label_smoothing, chunk, output_mask=(True, True, True)):
    """(grad_input, grad_weight, grad_bias); one that output_mask leaves out is an empty (0,) tensor and its
    product is skipped, as in the native op."""
    x, w, target = x.contiguous(), w.contiguous(), target.contiguous()
    grad_loss = grad_loss.contiguous()
    N, V = x.shape[0], w.shape[0]
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    want_x, want_w, want_b = output_mask
    grad_input = torch.empty(x.shape if want_x else (0,), dtype=x.dtype, device=x.device)
    grad_weight = torch.zeros(w.shape if want_w else (0,), dtype=acc, device=x.device)
    grad_bias = torch.zeros(V if want_b else 0, dtype=acc, device=x.device)
    want_b = want_b and bias is not None  # without a bias the (V,) gradient is zeros
    if N and (want_x or want_w or want_b):
        buf = torch.empty(min(chunk, N), V, dtype=x.dtype, device=x.device)
        for s in range(0, N, chunk):
            n = min(chunk, N - s)
            d = _chunk_logits(buf, x, w, bias, s, n)
            backward_into(grad_loss[s:s + n], d, target[s:s + n], class_weight, stats[:, s:s + n], ignore_index,
                          label_smoothing, d)
            if want_x:
                torch.mm(d, w, out=grad_input[s:s + n])
            if want_w:
                grad_weight.addmm_(d.t().to(acc), x[s:s + n].to(acc))
            if want_b:
                grad_bias += d.sum(0, dtype=acc)
    return grad_input, grad_weight.to(x.dtype), grad_bias.to(x.dtype)
