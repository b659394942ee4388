"""Triton binary cross-entropy with logits, forward and backward, over any shape.

Elementwise over input's flat index, BLOCK elements a program. The loss is written stably as
    w * ((1 - y) * x + (1 + (pw - 1) * y) * sp),    sp = softplus(-x) = max(-x, 0) + log1p(exp(-|x|))
(exp of a non-positive number never overflows). weight, pos_weight and grad_output are read in place through
their broadcast strides (see _Operand), never expanded. A reduction writes one partial sum per program; the
launcher adds the partials (a few thousand numbers) in float64. The backward recomputes from x and y and writes
grad_input and grad_target in the same pass. Half types compute in float32, float64 in float64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cast_rtne

BLOCK = 1024
NUM_WARPS = 4
MAX_DIMS = 4


@triton.jit
def _offset(i, s1, s2, s3, t0, t1, t2, t3, NDIM: tl.constexpr):
    """Element offset of flat index i in an operand of NDIM coalesced dims, right-aligned in (s0..s3), (t0..t3).
    The outermost dim needs no modulo, so the common cases (full, scalar, a (C,) vector) cost one or no
    division."""
    if NDIM == 1:
        off = i * t3
    else:
        off = (i % s3) * t3
        q = i // s3
        if NDIM == 2:
            off += q * t2
        else:
            off += (q % s2) * t2
            q = q // s2
            if NDIM == 3:
                off += q * t1
            else:
                off += (q % s1) * t1 + (q // s1) * t0
    return off


@triton.jit
def _load_operand(P, i, mask, s1, s2, s3, t0, t1, t2, t3, NDIM: tl.constexpr, ACC: tl.constexpr):
    if NDIM == 0:  # absent: 1
        return tl.full(i.shape, 1.0, ACC)
    return tl.load(P + _offset(i, s1, s2, s3, t0, t1, t2, t3, NDIM), mask=mask, other=0.0).to(ACC)


@triton.jit
def _softplus_neg(x, e):
    # log1p(e) as log(u) + (e - (u - 1)) / u with u = 1 + e: the correction restores what rounding u lost (e in
    # (0, 1], so u in (1, 2] and no special case); tl has no portable log1p.
    u = 1.0 + e
    return tl.maximum(-x, 0.0) + tl.log(u) + (e - (u - 1.0)) / u


@triton.jit
def bce_with_logits_fwd_kernel(X, Y, W, PW, OUT, PARTIAL, n,
                               ws1, ws2, ws3, wt0, wt1, wt2, wt3,
                               ps1, ps2, ps3, pt0, pt1, pt2, pt3,
                               ACC: tl.constexpr, BLOCK: tl.constexpr, W_NDIM: tl.constexpr,
                               PW_NDIM: tl.constexpr, REDUCE: tl.constexpr):
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    x = tl.load(X + i, mask=mask, other=0.0).to(ACC)
    y = tl.load(Y + i, mask=mask, other=0.0).to(ACC)
    sp = _softplus_neg(x, tl.exp(-tl.abs(x)))
    if PW_NDIM == 0:
        loss = (1.0 - y) * x + sp
    else:
        pw = _load_operand(PW, i, mask, ps1, ps2, ps3, pt0, pt1, pt2, pt3, PW_NDIM, ACC)
        loss = (1.0 - y) * x + (1.0 + (pw - 1.0) * y) * sp
    if W_NDIM != 0:
        loss = loss * _load_operand(W, i, mask, ws1, ws2, ws3, wt0, wt1, wt2, wt3, W_NDIM, ACC)
    if REDUCE:
        tl.store(PARTIAL + pid, tl.sum(tl.where(mask, loss, 0.0), 0))
    else:
        tl.store(OUT + i, cast_rtne(loss, OUT.dtype.element_ty), mask=mask)


@triton.jit
def bce_with_logits_bwd_kernel(X, Y, W, PW, G, DX, DY, n,
                               ws1, ws2, ws3, wt0, wt1, wt2, wt3,
                               ps1, ps2, ps3, pt0, pt1, pt2, pt3,
                               gs1, gs2, gs3, gt0, gt1, gt2, gt3,
                               ACC: tl.constexpr, BLOCK: tl.constexpr, W_NDIM: tl.constexpr,
                               PW_NDIM: tl.constexpr, G_NDIM: tl.constexpr, MEAN: tl.constexpr,
                               INPUT_GRAD: tl.constexpr, TARGET_GRAD: tl.constexpr):
    # d/dx = w g (lw sigmoid(x) - pw y),  d/dy = w g ((pw - 1) softplus(-x) - x),  lw = 1 + (pw - 1) y
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    x = tl.load(X + i, mask=mask, other=0.0).to(ACC)
    y = tl.load(Y + i, mask=mask, other=0.0).to(ACC)
    wg = _load_operand(G, i, mask, gs1, gs2, gs3, gt0, gt1, gt2, gt3, G_NDIM, ACC)
    if MEAN:  # divided in ACC: a float scale argument would be rounded to float32
        wg = wg / tl.cast(n, ACC)  # tl.cast: the JIT passes an n of 1 as a Python int, which has no .to
    if W_NDIM != 0:
        wg = wg * _load_operand(W, i, mask, ws1, ws2, ws3, wt0, wt1, wt2, wt3, W_NDIM, ACC)
    pw = _load_operand(PW, i, mask, ps1, ps2, ps3, pt0, pt1, pt2, pt3, PW_NDIM, ACC)
    e = tl.exp(-tl.abs(x))
    if INPUT_GRAD:
        sig = tl.where(x >= 0, 1.0, e) / (1.0 + e)
        if PW_NDIM == 0:
            dx = sig - y
        else:
            dx = (1.0 + (pw - 1.0) * y) * sig - pw * y
        tl.store(DX + i, cast_rtne(dx * wg, DX.dtype.element_ty), mask=mask)
    if TARGET_GRAD:
        if PW_NDIM == 0:
            dy = -x
        else:
            dy = (pw - 1.0) * _softplus_neg(x, e) - x
        tl.store(DY + i, cast_rtne(dy * wg, DY.dtype.element_ty), mask=mask)


def _operand(t: torch.Tensor | None, shape: torch.Size, dummy: torch.Tensor):
    """(tensor, NDIM, 7 geometry ints) of t broadcast to shape: its expanded strides with size-1 dims dropped
    and mergeable neighbours coalesced, right-aligned in MAX_DIMS dims. A layout needing more dims is made
    contiguous in its own shape, then (last resort) expanded into a copy. Absent: NDIM 0."""
    if t is None:
        return dummy, 0, (1, 1, 1, 0, 0, 0, 0)
    for make in (lambda: t.expand(shape), lambda: t.contiguous().expand(shape),
                 lambda: t.expand(shape).contiguous()):
        e = make()
        dims: list[list[int]] = []
        for s, st in zip(e.shape, e.stride()):
            if s == 1:
                continue
            if dims and dims[-1][1] == s * st:
                dims[-1] = [dims[-1][0] * s, st]
            else:
                dims.append([s, st])
        dims = dims or [[e.numel(), 0]]
        if len(dims) <= MAX_DIMS:
            break
    ndim = len(dims)
    dims = [[1, 0]] * (MAX_DIMS - ndim) + dims
    sizes, strides = [d[0] for d in dims], [d[1] for d in dims]
    return e, ndim, (*sizes[1:], *strides)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def bce_with_logits_forward(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                            pos_weight: torch.Tensor | None, reduction: int) -> torch.Tensor:
    """Launcher. input, target: same shape and dtype; weight, pos_weight: broadcastable to it or None.
    reduction 0 (none) returns input's shape, 1 (mean) / 2 (sum) a 0-d tensor; input's dtype."""
    x, y = input.contiguous(), target.contiguous()
    n = x.numel()
    if reduction != 0 and n == 0:
        return torch.full((), float("nan") if reduction == 1 else 0.0, dtype=x.dtype, device=x.device)
    out = torch.empty(x.shape if reduction == 0 else (), dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    w, w_nd, w_geo = _operand(weight, x.shape, x)
    pw, pw_nd, pw_geo = _operand(pos_weight, x.shape, x)
    grid = triton.cdiv(n, BLOCK)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    partial = torch.empty(grid if reduction != 0 else 1, dtype=acc, device=x.device)
    bce_with_logits_fwd_kernel[(grid,)](x, y, w, pw, out, partial, n, *w_geo, *pw_geo, ACC=_acc(x.dtype),
                                        BLOCK=BLOCK, W_NDIM=w_nd, PW_NDIM=pw_nd, REDUCE=reduction != 0,
                                        num_warps=NUM_WARPS)
    if reduction == 0:
        return out
    total = partial.sum(dtype=torch.float64)
    return (total / n if reduction == 1 else total).to(x.dtype)


def bce_with_logits_backward(grad_output: torch.Tensor, input: torch.Tensor, target: torch.Tensor,
                             weight: torch.Tensor | None, pos_weight: torch.Tensor | None, reduction: int,
                             input_grad: bool, target_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher. grad_output: input's shape (reduction 0) or 0-d. Returns (grad_input, grad_target), each
    contiguous of input's shape, or empty when not asked for."""
    x, y = input.contiguous(), target.contiguous()
    n = x.numel()
    dx = torch.empty(x.shape if input_grad else (0,), dtype=x.dtype, device=x.device)
    dy = torch.empty(x.shape if target_grad else (0,), dtype=x.dtype, device=x.device)
    if n == 0 or not (input_grad or target_grad):
        return dx, dy
    w, w_nd, w_geo = _operand(weight, x.shape, x)
    pw, pw_nd, pw_geo = _operand(pos_weight, x.shape, x)
    g, g_nd, g_geo = _operand(grad_output, x.shape, x)
    bce_with_logits_bwd_kernel[(triton.cdiv(n, BLOCK),)](
        x, y, w, pw, g, dx if input_grad else x, dy if target_grad else x, n, *w_geo, *pw_geo, *g_geo,
        ACC=_acc(x.dtype), BLOCK=BLOCK, W_NDIM=w_nd, PW_NDIM=pw_nd, G_NDIM=g_nd, MEAN=reduction == 1,
        INPUT_GRAD=input_grad, TARGET_GRAD=target_grad, num_warps=NUM_WARPS)
    return dx, dy


def _aot_specs():
    """Representative compilations for the ahead-of-time check (kernels/aot.py): fp32/bf16, with and without
    weight / pos_weight (pos_weight as a (C,) vector: 2 dims), both reductions and gradient choices."""
    geo = lambda p: {f"{p}s{k}": "i64" for k in (1, 2, 3)} | {f"{p}t{k}": "i64" for k in (0, 1, 2, 3)}  # noqa: E731
    for dt in ("fp32", "bf16"):
        acc = tl.float32
        ptrs = {k: f"*{dt}" for k in ("X", "Y", "W", "PW")}
        for w_nd, pw_nd in ((0, 0), (1, 2)):
            for reduce in (False, True):
                sig = ptrs | {"OUT": f"*{dt}", "PARTIAL": "*fp32", "n": "i64"} | geo("w") | geo("p")
                yield (bce_with_logits_fwd_kernel, sig,
                       dict(ACC=acc, BLOCK=BLOCK, W_NDIM=w_nd, PW_NDIM=pw_nd, REDUCE=reduce), NUM_WARPS)
            for g_nd, ig, tg in ((1, True, True), (1, True, False)):
                sig = ptrs | {"G": f"*{dt}", "DX": f"*{dt}", "DY": f"*{dt}", "n": "i64"} \
                    | geo("w") | geo("p") | geo("g")
                yield (bce_with_logits_bwd_kernel, sig,
                       dict(ACC=acc, BLOCK=BLOCK, W_NDIM=w_nd, PW_NDIM=pw_nd, G_NDIM=g_nd, MEAN=True, INPUT_GRAD=ig,
                            TARGET_GRAD=tg), NUM_WARPS)


AOT = _aot_specs
