"""Triton fused softmax cross-entropy, forward and backward.

One program per row (one (n, d1, ...) position; classes `inner` apart). The forward reads the row once, keeping
per-lane running max and rescaled sum of exp (plus the weighted sums that label smoothing and probability targets
need), and writes the loss and the row's statistics (max m and log(s); stat_plane in csrc/cross_entropy.h says why
not their sum). The backward reads the row once more and writes the gradient, optionally over the logits themselves
(DX == X). ce_fwd_grad_kernel does both in one program (cross_entropy_fwd_grad: the gradient for a per-row grad known
in the forward). Formulas: csrc/cross_entropy.h.

Out-of-range class indices are never used as addresses: the kernel clamps the read, gives the row a NaN loss and
records the index in a flag tensor, which the launcher checks and turns into an IndexError (one device sync).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cast_rtne, outer_chunks, row_start

MAX_BLOCK = 4096


@triton.jit
def _class_weight(W, c, mask, ACC: tl.constexpr, HAS_W: tl.constexpr):
    # One return: Triton 3.8 type-checks both returns of a constexpr branch (bf16 weights vs the float 1.0).
    if HAS_W:
        w = tl.load(W + c, mask=mask, other=0.0).to(ACC)
    else:
        w = tl.where(mask, 1.0, 0.0).to(ACC)
    return w


@triton.jit
def _target_weight(W, WSUM, t, n_cols, ACC: tl.constexpr, HAS_W: tl.constexpr):
    """(w_t, W = sum of the weights) of a class-index row; 1 and C without weights."""
    if HAS_W:
        wt = tl.load(W + t).to(ACC)
        wsum = tl.load(WSUM).to(ACC)
    else:
        wt = 1.0
        wsum = n_cols * 1.0
    return wt, wsum


@triton.jit
def _smoothing(EPS, n_cols):
    """(1 - eps, eps / C): the target's share and every class's share of label smoothing eps."""
    eps = tl.load(EPS)  # from memory: a float argument would be rounded to float32
    return 1.0 - eps, eps / n_cols


@triton.jit
def _row_forward(X, T, W, WSUM, FLAG, row, base, stride, n_cols, ignore_index, EPS, ACC: tl.constexpr,
                 BLOCK: tl.constexpr, PROB: tl.constexpr, HAS_W: tl.constexpr, SMOOTH: tl.constexpr):
    """One row's loss and statistics (m, log(s)); 0, 0, 0 for an ignored row, a NaN loss for an out-of-range
    index (recorded in FLAG)."""
    cols = tl.arange(0, BLOCK)
    n_eff = n_cols
    if not PROB:
        t = tl.load(T + row)
        ignored = t == ignore_index
        bad = (t != ignore_index) & ((t < 0) | (t >= n_cols))
        tl.store(FLAG, 1, mask=bad)
        tl.store(FLAG + 1, t, mask=bad)
        t = tl.where(ignored | bad, 0, t)
        n_eff = tl.where(ignored, 0, n_cols)  # an ignored row reads nothing
        xt = tl.load(X + base + t * stride).to(ACC)
    keep, add = _smoothing(EPS, n_cols)
    m_vec = tl.full([BLOCK], -float("inf"), ACC)
    s_vec = tl.zeros([BLOCK], ACC)
    # Weighted sums of x as offsets from the running max (a scalar; the sums are reduced per block of classes, so
    # that no per-lane state is added: 4096-wide blocks spill otherwise), rebased when it grows, as the loss's: no
    # term is positive, so rows of large logits (1e4) lose no precision and rows of 3e38 overflow only where the
    # loss does (offsets from a pivot fixed in advance could overflow midway: inf - inf).
    sx = tl.full([], 0.0, ACC)  # sum of w eps/C (x - mr) (smoothing) or of w y' (x - mr) (probabilities)
    u = tl.full([], 0.0, ACC)  # sum of w eps/C, or of w y'
    mr = tl.full([], -float("inf"), ACC)
    for start in range(0, n_eff, BLOCK):
        c = start + cols
        mask = c < n_cols
        x = tl.load(X + base + c * stride, mask=mask, other=-float("inf")).to(ACC)
        m_new = tl.maximum(m_vec, x)
        dead = m_new == -float("inf")
        s_vec = s_vec * tl.where(dead, 0.0, tl.exp(m_vec - m_new)) + tl.where(dead, 0.0, tl.exp(x - m_new))
        m_vec = m_new
        if PROB or SMOOTH:
            w = _class_weight(W, c, mask, ACC, HAS_W)
            if PROB:
                y = tl.load(T + base + c * stride, mask=mask, other=0.0).to(ACC)
                w = tl.where(mask, (y * keep + add) * w, 0.0)
            else:  # smoothing's class share eps / C inside the sum: sum w (x - m) can overflow where the loss fits
                w = w * add
            mr_new = tl.maximum(mr, tl.max(x, 0))
            # While the max is -inf the sum holds only -inf logits' terms (w x = -inf: the loss is inf, as torch's).
            sx = tl.where(mr > -float("inf"), sx + u * (mr - mr_new), sx)
            sx += tl.sum(tl.where(mask, w * (x - tl.where(mr_new == -float("inf"), 0.0, mr_new)), 0.0), 0)
            u += tl.sum(w, 0)
            mr = mr_new
    m = tl.max(m_vec, 0)
    log_s = tl.log(tl.sum(tl.where(m_vec == -float("inf"), 0.0, s_vec * tl.exp(m_vec - m)), 0))
    if PROB:
        loss = u * log_s - sx
    else:
        wt, wsum = _target_weight(W, WSUM, t, n_cols, ACC, HAS_W)
        loss = keep * wt * ((m - xt) + log_s)
        if SMOOTH:
            loss += add * wsum * log_s - sx
        loss = tl.where(ignored, 0.0, tl.where(bad, float("nan"), loss))
        m = tl.where(ignored, 0.0, m)
        log_s = tl.where(ignored, 0.0, log_s)
    return loss, m, log_s


@triton.jit
def _row_backward(g, m, log_s, X, T, W, WSUM, DX, row, base, stride, n_cols, ignore_index, EPS, ACC: tl.constexpr,
                  BLOCK: tl.constexpr, PROB: tl.constexpr, HAS_W: tl.constexpr):
    """One row's gradient from its per-row grad g and statistics m, log(s), into DX (which may be X); a zero row
    for an ignored or out-of-range class index."""
    cols = tl.arange(0, BLOCK)
    keep, add = _smoothing(EPS, n_cols)
    if PROB:
        sy_vec = tl.zeros([BLOCK], ACC)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            mask = c < n_cols
            y = tl.load(T + base + c * stride, mask=mask, other=0.0).to(ACC)
            sy_vec += tl.where(mask, (y * keep + add) * _class_weight(W, c, mask, ACC, HAS_W), 0.0)
        a = g * tl.sum(sy_vec, 0)
        live = True
        t = 0
        gt = 0.0
    else:
        t = tl.load(T + row)
        live = (t != ignore_index) & (t >= 0) & (t < n_cols)
        t = tl.where(live, t, 0)
        wt, wsum = _target_weight(W, WSUM, t, n_cols, ACC, HAS_W)
        a = g * (keep * wt + add * wsum)
        gt = g * keep * wt
    for start in range(0, n_cols, BLOCK):
        c = start + cols
        mask = c < n_cols
        x = tl.load(X + base + c * stride, mask=mask, other=0.0).to(ACC)
        w = _class_weight(W, c, mask, ACC, HAS_W)
        if PROB:
            y = tl.load(T + base + c * stride, mask=mask, other=0.0).to(ACC)
            dx = a * tl.exp((x - m) - log_s) - g * (y * keep + add) * w
        else:
            p = tl.exp((x - m) - log_s)
            # The target's entry with p_t - 1 (exact near 1: a confident row gets 0, as in torch).
            dx = tl.where(c == t, gt * (p - 1.0) + g * add * (wsum * p - w), a * p - g * add * w)
        dx = tl.where(live, dx, 0.0)
        tl.store(DX + base + c * stride, cast_rtne(dx, DX.dtype.element_ty), mask=mask)


@triton.jit
def ce_fwd_kernel(X, T, W, WSUM, LOSS, STATS, stats_plane, FLAG, n_cols, inner, ignore_index, EPS,
                  ACC: tl.constexpr, BLOCK: tl.constexpr, PROB: tl.constexpr, HAS_W: tl.constexpr,
                  SMOOTH: tl.constexpr, LASTDIM: tl.constexpr):
    row, base, stride = row_start(n_cols, inner, LASTDIM)
    loss, m, log_s = _row_forward(X, T, W, WSUM, FLAG, row, base, stride, n_cols, ignore_index, EPS, ACC, BLOCK,
                                  PROB, HAS_W, SMOOTH)
    tl.store(LOSS + row, loss)
    tl.store(STATS + row, m)
    tl.store(STATS + stats_plane + row, log_s)


@triton.jit
def ce_bwd_kernel(G, X, T, W, WSUM, STATS, stats_plane, DX, n_cols, inner, ignore_index, EPS,
                  ACC: tl.constexpr, BLOCK: tl.constexpr, PROB: tl.constexpr, HAS_W: tl.constexpr,
                  LASTDIM: tl.constexpr):
    row, base, stride = row_start(n_cols, inner, LASTDIM)
    g = tl.load(G + row).to(ACC)
    m = tl.load(STATS + row).to(ACC)
    log_s = tl.load(STATS + stats_plane + row).to(ACC)
    _row_backward(g, m, log_s, X, T, W, WSUM, DX, row, base, stride, n_cols, ignore_index, EPS, ACC, BLOCK, PROB,
                  HAS_W)


@triton.jit
def ce_fwd_grad_kernel(G, X, T, W, WSUM, LOSS, DX, FLAG, n_cols, inner, ignore_index, EPS, ACC: tl.constexpr,
                       BLOCK: tl.constexpr, PROB: tl.constexpr, HAS_W: tl.constexpr, SMOOTH: tl.constexpr,
                       LASTDIM: tl.constexpr):
    """The forward and the gradient for the per-row grad G in one program (cross_entropy_fwd_grad): the row's
    second read comes from L2 rather than memory."""
    row, base, stride = row_start(n_cols, inner, LASTDIM)
    loss, m, log_s = _row_forward(X, T, W, WSUM, FLAG, row, base, stride, n_cols, ignore_index, EPS, ACC, BLOCK,
                                  PROB, HAS_W, SMOOTH)
    tl.store(LOSS + row, loss)
    g = tl.load(G + row).to(ACC)
    _row_backward(g, m, log_s, X, T, W, WSUM, DX, row, base, stride, n_cols, ignore_index, EPS, ACC, BLOCK, PROB,
                  HAS_W)


def _config(n_cols: int, dtype: torch.dtype, fwd_grad_sums: bool = False) -> dict:
    """BLOCK and num_warps of a row kernel. ``fwd_grad_sums``: ce_fwd_grad_kernel on a row that also sums weighted
    logits (label smoothing or probability targets): both passes' state, more registers than ptxas gives a thread
    of 16 warps (it aims at 64 there and spilled), so half the warps, whose threads may use up to 128."""
    block = min(triton.next_power_of_2(max(n_cols, 1)), MAX_BLOCK)
    per_warp = 512 if fwd_grad_sums else 256
    return dict(ACC=tl.float64 if dtype == torch.float64 else tl.float32, BLOCK=block,
                num_warps=min(16, max(1, block // per_warp)))


def _geometry(x: torch.Tensor):
    inner = 1
    for s in x.shape[2:]:
        inner *= s
    return x.shape[1], inner, x.shape[0] * inner


def _weights(weight, x):
    # The weight sum stays on the device (no sync); a dummy pointer when there are no weights.
    if weight is None:
        return x, x, False
    weight = weight.contiguous()
    return weight, weight.sum(dtype=acc_dtype(x.dtype)).reshape(1), True


def _eps(label_smoothing, x):
    return torch.full((1,), float(label_smoothing), dtype=acc_dtype(x.dtype), device=x.device)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch(x, target, weight, label_smoothing: float, inner: int, n_cols: int, forward: bool):
    """What a row kernel's launch takes besides the tensors: the weights, their sum, eps and the constants
    (SMOOTH for the kernels that take the forward's path)."""
    prob = target.is_floating_point()
    w, wsum, has_w = _weights(weight, x)
    cfg = dict(PROB=prob, HAS_W=has_w, LASTDIM=inner == 1, **_config(n_cols, x.dtype))
    if forward:
        cfg["SMOOTH"] = label_smoothing > 0 and not prob
    return w, wsum, _eps(label_smoothing, x), cfg


def forward_into(x, target, weight, ignore_index: int, label_smoothing: float, loss, stats) -> None:
    """Launcher. x (N, C, d...) contiguous; target int64 (N, d...) or probabilities like x; writes the
    contiguous per-row loss and the (2, rows) statistics stats (each plane contiguous), in the accumulation dtype.
    Raises IndexError on an out-of-range class index."""
    n_cols, inner, rows = _geometry(x)
    if rows == 0:
        return
    w, wsum, eps, cfg = _launch(x, target, weight, label_smoothing, inner, n_cols, forward=True)
    flag, N = torch.zeros(2, dtype=torch.int64, device=x.device), x.shape[0]
    xo, to, lo, so = x.view(N, -1), target.view(N, -1), loss.view(N, -1), stats.view(2, N, -1)
    for o0, o1 in outer_chunks(N, inner):
        ce_fwd_kernel[((o1 - o0) * inner,)](xo[o0:o1], to[o0:o1], w, wsum, lo[o0:o1], so[:, o0:o1],
                                            so.stride(0), flag, n_cols, inner, ignore_index, eps, **cfg)
    report_bad_target(flag, target, n_cols, ignore_index)


def report_bad_target(flag, target, n_cols: int, ignore_index: int) -> None:
    """The IndexError for an out-of-range class index that a kernel recorded in flag (one device sync; none for
    probability targets)."""
    if not target.is_floating_point() and flag[0].item():
        raise IndexError(f"cross_entropy: target {int(flag[1])} is out of bounds: expected a class index in "
                         f"[0, {n_cols - 1}] or ignore_index ({ignore_index})")


def backward_into(grad_loss, x, target, weight, stats, ignore_index: int, label_smoothing: float, dx) -> None:
    """Launcher. Writes grad_input into dx (which may be x itself)."""
    n_cols, inner, rows = _geometry(x)
    if rows == 0 or n_cols == 0:
        return
    w, wsum, eps, cfg = _launch(x, target, weight, label_smoothing, inner, n_cols, forward=False)
    stats = stats.reshape(2, rows)
    if stats.stride(1) != 1:  # the kernel reads each plane as contiguous
        stats = stats.contiguous()
    N = x.shape[0]
    go, xo, to, so, do = (grad_loss.contiguous().view(N, -1), x.view(N, -1), target.view(N, -1),
                          stats.view(2, N, -1), dx.view(N, -1))
    for o0, o1 in outer_chunks(N, inner):
        ce_bwd_kernel[((o1 - o0) * inner,)](go[o0:o1], xo[o0:o1], to[o0:o1], w, wsum, so[:, o0:o1], so.stride(0),
                                            do[o0:o1], n_cols, inner, ignore_index, eps, **cfg)


def cross_entropy_forward_grad(x, target, weight, grad_loss, ignore_index, label_smoothing):
    """Launcher of cross_entropy_fwd_grad: (loss, grad_input) for the per-row grad_loss (the loss's shape, in the
    accumulation dtype). Raises IndexError on an out-of-range class index."""
    x, target = x.contiguous(), target.contiguous()
    n_cols, inner, rows = _geometry(x)
    loss = torch.empty((x.shape[0],) + tuple(x.shape[2:]), dtype=acc_dtype(x.dtype), device=x.device)
    dx = torch.empty_like(x)
    if rows == 0:
        return loss, dx
    w, wsum, eps, cfg = _launch(x, target, weight, label_smoothing, inner, n_cols, forward=True)
    cfg["num_warps"] = _config(n_cols, x.dtype, cfg["PROB"] or cfg["SMOOTH"])["num_warps"]
    flag, N = torch.zeros(2, dtype=torch.int64, device=x.device), x.shape[0]
    go, xo, to, lo, do = (grad_loss.contiguous().view(N, -1), x.view(N, -1), target.view(N, -1), loss.view(N, -1),
                          dx.view(N, -1))
    for o0, o1 in outer_chunks(N, inner):
        ce_fwd_grad_kernel[((o1 - o0) * inner,)](go[o0:o1], xo[o0:o1], to[o0:o1], w, wsum, lo[o0:o1], do[o0:o1],
                                                 flag, n_cols, inner, ignore_index, eps, **cfg)
    report_bad_target(flag, target, n_cols, ignore_index)
    return loss, dx


def cross_entropy_forward(x, target, weight, ignore_index, label_smoothing):
    x, target = x.contiguous(), target.contiguous()
    shape = (x.shape[0],) + tuple(x.shape[2:])
    loss = torch.empty(shape, dtype=acc_dtype(x.dtype), device=x.device)
    stats = torch.empty((2,) + shape, dtype=loss.dtype, device=x.device)
    forward_into(x, target, weight, ignore_index, label_smoothing, loss, stats)
    return loss, stats


def cross_entropy_backward(grad_loss, x, target, weight, stats, ignore_index, label_smoothing, out=None):
    x, target = x.contiguous(), target.contiguous()
    dx = torch.empty_like(x) if out is None else out
    backward_into(grad_loss, x, target, weight, stats, ignore_index, label_smoothing, dx)
    return dx


def _aot_specs():
    """Representative compilations for the ahead-of-time check (kernels/aot.py), with the launchers' warps."""
    for dt in ("fp32", "bf16"):
        for prob, has_w, smooth in ((False, False, False), (False, True, True), (True, False, False)):
            tsig = f"*{dt}" if prob else "*i64"
            common = dict(ACC=tl.float32, BLOCK=MAX_BLOCK, PROB=prob, HAS_W=has_w, LASTDIM=True)
            sig = {"X": f"*{dt}", "T": tsig, "W": f"*{dt}", "WSUM": "*fp32", "n_cols": "i32", "inner": "i32",
                   "ignore_index": "i64", "EPS": "*fp32"}
            warps = _config(MAX_BLOCK, torch.float32)["num_warps"]
            yield (ce_fwd_kernel, dict(sig, LOSS="*fp32", STATS="*fp32", stats_plane="i32", FLAG="*i64"),
                   dict(common, SMOOTH=smooth), warps)
            yield (ce_bwd_kernel, dict(sig, G="*fp32", STATS="*fp32", stats_plane="i32", DX=f"*{dt}"), common, warps)
            yield (ce_fwd_grad_kernel, dict(sig, G="*fp32", LOSS="*fp32", DX=f"*{dt}", FLAG="*i64"),
                   dict(common, SMOOTH=smooth), _config(MAX_BLOCK, torch.float32, prob or smooth)["num_warps"])


AOT = _aot_specs
