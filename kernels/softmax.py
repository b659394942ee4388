"""Triton softmax / log-softmax, forward and backward, over any dim.

One program per row. A row of at most MAX_SINGLE elements (forward; MAX_SINGLE_BWD for the backward, which holds
two tensors) is held in registers: one read, one write. A longer row takes two passes: an online max+sum (per-lane
running max and rescaled sum, reduced once at the end), then the write. Non-last dims address the row with stride `inner` instead of transposing. Half types compute in
float32, float64 in float64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cast_rtne, outer_chunks, row_start

# Rows held in registers, at most 32 fp32 values a thread with 32 warps (1024 threads leave 64 registers each): a
# 32000-class row is one read and one write. The backward holds dy and y, so half as many.
MAX_SINGLE = 32768
MAX_SINGLE_BWD = 16384
VALUES_PER_THREAD = 32
ONLINE_BLOCK = 4096


@triton.jit
def softmax_fwd_kernel(X, Y, n_cols, inner, ACC: tl.constexpr, BLOCK: tl.constexpr, LOG: tl.constexpr,
                       LASTDIM: tl.constexpr, SINGLE: tl.constexpr):
    _, base, stride = row_start(n_cols, inner, LASTDIM)
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        mask = cols < n_cols
        x = tl.load(X + base + cols * stride, mask=mask, other=-float("inf")).to(ACC)
        m = tl.max(x, 0)
        e = tl.exp(x - m)
        s = tl.sum(tl.where(mask, e, 0.0), 0)
        if LOG:
            y = (x - m) - tl.log(s)
        else:
            y = e * (1.0 / s)
        tl.store(Y + base + cols * stride, cast_rtne(y, Y.dtype.element_ty), mask=mask)
    else:
        m_vec = tl.full([BLOCK], -float("inf"), ACC)
        s_vec = tl.zeros([BLOCK], ACC)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            x = tl.load(X + base + c * stride, mask=c < n_cols, other=-float("inf")).to(ACC)
            m_new = tl.maximum(m_vec, x)
            dead = m_new == -float("inf")  # nothing finite seen in this lane yet: keep exp(-inf - -inf) out
            alpha = tl.where(dead, 0.0, tl.exp(m_vec - m_new))
            s_vec = s_vec * alpha + tl.where(dead, 0.0, tl.exp(x - m_new))
            m_vec = m_new
        m = tl.max(m_vec, 0)
        s = tl.sum(tl.where(m_vec == -float("inf"), 0.0, s_vec * tl.exp(m_vec - m)), 0)
        # NaN anywhere in the row: the lane sum is NaN, so s is NaN and so is every output, as in torch.
        log_s = tl.log(s)
        inv = 1.0 / s
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            mask = c < n_cols
            x = tl.load(X + base + c * stride, mask=mask, other=0.0).to(ACC)
            if LOG:
                y = (x - m) - log_s  # not x - (m + log_s): at |x| ~ 1e4 that sum rounds log_s away
            else:
                y = tl.exp(x - m) * inv
            tl.store(Y + base + c * stride, cast_rtne(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def softmax_bwd_kernel(DY, Yp, DX, n_cols, inner, ACC: tl.constexpr, BLOCK: tl.constexpr, LOG: tl.constexpr,
                       LASTDIM: tl.constexpr, SINGLE: tl.constexpr):
    # softmax: dx = y * (dy - sum(dy * y));  log_softmax: dx = dy - exp(y) * sum(dy)
    _, base, stride = row_start(n_cols, inner, LASTDIM)
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        mask = cols < n_cols
        dy = tl.load(DY + base + cols * stride, mask=mask, other=0.0).to(ACC)
        y = tl.load(Yp + base + cols * stride, mask=mask, other=0.0).to(ACC)
        if LOG:
            dx = dy - tl.exp(y) * tl.sum(dy, 0)
        else:
            dx = y * (dy - tl.sum(dy * y, 0))
        tl.store(DX + base + cols * stride, cast_rtne(dx, DX.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], ACC)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            mask = c < n_cols
            dy = tl.load(DY + base + c * stride, mask=mask, other=0.0).to(ACC)
            if LOG:
                acc += dy
            else:
                acc += dy * tl.load(Yp + base + c * stride, mask=mask, other=0.0).to(ACC)
        d = tl.sum(acc, 0)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            mask = c < n_cols
            dy = tl.load(DY + base + c * stride, mask=mask, other=0.0).to(ACC)
            y = tl.load(Yp + base + c * stride, mask=mask, other=0.0).to(ACC)
            dx = dy - tl.exp(y) * d if LOG else y * (dy - d)
            tl.store(DX + base + c * stride, cast_rtne(dx, DX.dtype.element_ty), mask=mask)


def _launch_config(n_cols: int, dtype: torch.dtype, bwd: bool = False) -> dict:
    # A float64 value takes two registers: half the row.
    single = n_cols <= (MAX_SINGLE_BWD if bwd else MAX_SINGLE) // (2 if dtype == torch.float64 else 1)
    block = triton.next_power_of_2(max(n_cols, 1)) if single else ONLINE_BLOCK
    # Enough warps that each thread holds at most VALUES_PER_THREAD // 2 values of a tensor's row (16 of x, or of
    # dy and of y) below the cap, at most VALUES_PER_THREAD at the forward's cap.
    per_thread = VALUES_PER_THREAD if block > MAX_SINGLE_BWD else VALUES_PER_THREAD // 2
    num_warps = min(32, max(1, block // (32 * per_thread)))
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    return dict(ACC=acc, BLOCK=block, SINGLE=single, num_warps=num_warps)


def _geometry(t: torch.Tensor, dim: int):
    dim = dim % max(t.dim(), 1)
    shape = t.shape if t.dim() else (1,)
    n = shape[dim]
    inner = 1
    for s in shape[dim + 1:]:
        inner *= s
    return n, inner, t.numel() // max(n, 1)


def softmax_forward(x: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    """Launcher. x: any shape; returns a contiguous tensor of x's shape and dtype."""
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    n, inner, rows = _geometry(x, dim)
    cfg = _launch_config(n, x.dtype)
    outer = rows // inner
    xo, yo = x.view(outer, -1), y.view(outer, -1)
    for o0, o1 in outer_chunks(outer, inner):
        softmax_fwd_kernel[((o1 - o0) * inner,)](xo[o0:o1], yo[o0:o1], n, inner, LOG=log, LASTDIM=inner == 1, **cfg)
    return y


def softmax_backward(grad_output: torch.Tensor, output: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    """Launcher. grad_output, output: same shape and dtype; returns grad_input, contiguous."""
    dy, y = grad_output.contiguous(), output.contiguous()
    dx = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if y.numel() == 0:
        return dx
    n, inner, rows = _geometry(y, dim)
    cfg = _launch_config(n, y.dtype, bwd=True)
    outer = rows // inner
    dyo, yo, dxo = dy.view(outer, -1), y.view(outer, -1), dx.view(outer, -1)
    for o0, o1 in outer_chunks(outer, inner):
        softmax_bwd_kernel[((o1 - o0) * inner,)](dyo[o0:o1], yo[o0:o1], dxo[o0:o1], n, inner, LOG=log,
                                                 LASTDIM=inner == 1, **cfg)
    return dx


def _aot_specs():
    """Representative compilations for the ahead-of-time check (kernels/aot.py): every code path, fp32/bf16."""
    for dt in ("fp32", "bf16"):
        for n in (1000, 8192, MAX_SINGLE_BWD, MAX_SINGLE, MAX_SINGLE + 1):
            for log in (False, True):
                for bwd in (False, True):
                    if bwd and MAX_SINGLE_BWD < n <= MAX_SINGLE:  # the backward runs this length online
                        continue
                    cfg = _launch_config(n, torch.float32, bwd)
                    warps = cfg.pop("num_warps")
                    common = dict(cfg, LOG=log, LASTDIM=True)
                    if bwd:
                        yield (softmax_bwd_kernel,
                               {"DY": f"*{dt}", "Yp": f"*{dt}", "DX": f"*{dt}", "n_cols": "i32", "inner": "i32"},
                               common, warps)
                    else:
                        yield (softmax_fwd_kernel, {"X": f"*{dt}", "Y": f"*{dt}", "n_cols": "i32", "inner": "i32"},
                               common, warps)


AOT = _aot_specs
