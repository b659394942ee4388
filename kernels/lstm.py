"""Triton LSTM cell, forward and backward: everything of a step after its two matrix products.

A program owns BLOCK hidden units of one batch row and reads the matching slice of each of the four gates
(i, f, g, o at offsets 0, H, 2H, 3H of the row), so a step is one read of the gate pre-activations and c and
one write of h', c' and the activated gates, which the backward reads back with c (it recomputes c' from
them rather than loading it). Half types compute in float32, float64 in float64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cast_rtne

MAX_BLOCK = 1024


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # exp of a non-positive argument only: no overflow for large |x|, saturates to +-1.
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _load_gates(P, H, mask, ACC: tl.constexpr):
    """The four gate blocks (i, f, g, o) of a (4 H) row: at P, P + H, P + 2 H and P + 3 H, stepped one H at a time
    (pointer arithmetic is 64-bit; 3 * H in H's int32 would wrap past 2**31)."""
    P1 = P + H
    P2 = P1 + H
    return (tl.load(P, mask=mask, other=0.0).to(ACC), tl.load(P1, mask=mask, other=0.0).to(ACC),
            tl.load(P2, mask=mask, other=0.0).to(ACC), tl.load(P2 + H, mask=mask, other=0.0).to(ACC))


@triton.jit
def _store_gates(P, H, i, f, g, o, mask, ty: tl.constexpr):
    P1 = P + H
    P2 = P1 + H
    tl.store(P, cast_rtne(i, ty), mask=mask)
    tl.store(P1, cast_rtne(f, ty), mask=mask)
    tl.store(P2, cast_rtne(g, ty), mask=mask)
    tl.store(P2 + H, cast_rtne(o, ty), mask=mask)


@triton.jit
def lstm_cell_fwd_kernel(G, Bias, C, HY, CY, ACT, H, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    zi, zf, zg, zo = _load_gates(G + row * 4 * H + cols, H, mask, ACC)
    if HAS_BIAS:
        bi, bf, bg, bo = _load_gates(Bias + cols, H, mask, ACC)
        zi, zf, zg, zo = zi + bi, zf + bf, zg + bg, zo + bo
    i, f, g, o = _sigmoid(zi), _sigmoid(zf), _tanh(zg), _sigmoid(zo)
    c = f * tl.load(C + row * H + cols, mask=mask, other=0.0).to(ACC) + i * g
    ty = HY.dtype.element_ty
    _store_gates(ACT + row * 4 * H + cols, H, i, f, g, o, mask, ty)
    tl.store(CY + row * H + cols, cast_rtne(c, ty), mask=mask)
    tl.store(HY + row * H + cols, cast_rtne(o * _tanh(c), ty), mask=mask)


@triton.jit
def lstm_cell_bwd_kernel(DH, DC, ACT, C, DG, DCX, H, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    i, f, g, o = _load_gates(ACT + row * 4 * H + cols, H, mask, ACC)
    c0 = tl.load(C + row * H + cols, mask=mask, other=0.0).to(ACC)
    dh = tl.load(DH + row * H + cols, mask=mask, other=0.0).to(ACC)
    dc = tl.load(DC + row * H + cols, mask=mask, other=0.0).to(ACC)
    tc = _tanh(f * c0 + i * g)
    dc += dh * o * (1.0 - tc * tc)
    ty = DG.dtype.element_ty
    _store_gates(DG + row * 4 * H + cols, H, dc * g * i * (1.0 - i), dc * c0 * f * (1.0 - f),
                 dc * i * (1.0 - g * g), dh * tc * o * (1.0 - o), mask, ty)
    tl.store(DCX + row * H + cols, cast_rtne(dc * f, ty), mask=mask)


def _config(hidden: int, dtype: torch.dtype) -> dict:
    # Four units a thread: at eight (4 warps for 1024 units) ptxas kept the forward to 72 registers and spilled
    # in bfloat16 without the divisibility hints.
    block = min(MAX_BLOCK, triton.next_power_of_2(max(hidden, 1)))
    return dict(ACC=tl.float64 if dtype == torch.float64 else tl.float32, BLOCK=block,
                num_warps=max(1, min(8, block // 128)))


def _grid(batch: int, hidden: int, block: int):
    return (batch, triton.cdiv(hidden, block))


def lstm_cell_forward(gates: torch.Tensor, bias: torch.Tensor | None, cx: torch.Tensor):
    """Launcher. gates [B, 4H], bias [4H] or None, cx [B, H] -> (hy, cy, act [B, 4H]), contiguous."""
    gates, cx = gates.contiguous(), cx.contiguous()
    B, H = cx.shape
    hy, cy, act = torch.empty_like(cx), torch.empty_like(cx), torch.empty_like(gates)
    if cx.numel() == 0:
        return hy, cy, act
    cfg = _config(H, cx.dtype)
    b = bias.contiguous() if bias is not None else gates  # an unused pointer when HAS_BIAS is off
    lstm_cell_fwd_kernel[_grid(B, H, cfg["BLOCK"])](gates, b, cx, hy, cy, act, H, HAS_BIAS=bias is not None, **cfg)
    return hy, cy, act


def lstm_cell_backward(grad_hy: torch.Tensor, grad_cy: torch.Tensor, act: torch.Tensor, cx: torch.Tensor):
    """Launcher. grad_hy, grad_cy, cx [B, H], act [B, 4H] -> (grad_gates [B, 4H], grad_cx [B, H])."""
    dh, dc, act, cx = grad_hy.contiguous(), grad_cy.contiguous(), act.contiguous(), cx.contiguous()
    B, H = cx.shape
    dg, dcx = torch.empty_like(act), torch.empty_like(cx)
    if cx.numel() == 0:
        return dg, dcx
    cfg = _config(H, cx.dtype)
    lstm_cell_bwd_kernel[_grid(B, H, cfg["BLOCK"])](dh, dc, act, cx, dg, dcx, H, **cfg)
    return dg, dcx


def _aot_specs():
    """Representative compilations for the ahead-of-time check (kernels/aot.py): fp32/bf16, with and without
    bias, a small and the largest block."""
    for dt in ("fp32", "bf16"):
        for block in (128, MAX_BLOCK):
            warps = _config(block, torch.float32)["num_warps"]
            for has_bias in (False, True):
                yield (lstm_cell_fwd_kernel,
                       {"G": f"*{dt}", "Bias": f"*{dt}", "C": f"*{dt}", "HY": f"*{dt}", "CY": f"*{dt}",
                        "ACT": f"*{dt}", "H": "i32"},
                       dict(HAS_BIAS=has_bias, ACC=tl.float32, BLOCK=block), warps)
            yield (lstm_cell_bwd_kernel,
                   {"DH": f"*{dt}", "DC": f"*{dt}", "ACT": f"*{dt}", "C": f"*{dt}", "DG": f"*{dt}",
                    "DCX": f"*{dt}", "H": "i32"},
                   dict(ACC=tl.float32, BLOCK=block), warps)


AOT = _aot_specs
