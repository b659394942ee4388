"""Triton flash attention, forward and backward, with causal / additive / key-padding masks and dropout.

q (B, H, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, DV): query head h reads kv head h // G, G = H / Hk (grouped-query
attention; G = 1 otherwise), and DV may differ from D. q, k, v are read through batch / head strides (0 along
broadcast dims), each head's (L, D) block row-contiguous; outputs and gradients are contiguous.

Grid: one flat axis of B * H * (row blocks) programs (2^31 - 1 at most; a second grid axis would stop at 65535),
the row block varying fastest, so that the programs running together share one head's keys and values in L2.
Offsets that scale whole heads are 64-bit.

The forward keeps, per block of BLOCK_M queries, a running max m, sum l and unnormalized output acc while it walks
the keys BLOCK_N at a time (online softmax), in base 2: the scores are taken as s * log2(e), the scale and log2(e)
folded into one factor, so each probability is one exp2. It walks the keys in two loops: the blocks that no bound
or causal mask touches (no mask work at all there), then the causal diagonal and the ragged last block, masked.
It writes the output and the per-row statistics m and log2(l), in base 2 as it computed them (the other backends'
stats, csrc/attention.h, are in natural units: s and log(l)), the only things the backward needs besides q, k, v.
The backward recomputes each score s log2(e) exactly as the forward did, so s - m is exact (0 at the row's max)
where a round trip through natural units, m ln(2) log2(e), would leave an ulp of m: at scores of 1e8 in float64
several of torch's errors, and inf (NaN gradients) past 2^62 in float64 or 2^34 in float32. m and log2(l) are
kept apart, as the two planes of the launchers' stats (2, B, H, Lq) that the kernels take as ROW_MAX and LOGL:
their sum would lose log2(l) to ulp(m) at scores of 1e4 and more.

The backward (_attn_bwd) is FlashAttention-2's: one program per (key block, kv head) walks the G query heads'
query blocks, recomputes P = exp2((S log2(e) - m) - log2(l)) once per tile and makes the five products
  S = Q K^T,  dP = dO V^T,  dV += Pd^T dO,  dK += dS^T Q,  dQ += dS K  (dQ: atomically, in float32 / float64)
with delta = rowsum(dO * O) (dropout included, since O already is the dropped product), dS = P * (dP - delta),
Pd = P * Z and dP scaled by Z, Z the dropout mask scaled by 1/(1-p), regenerated from (seed, row, col) by _keep.
dS takes the scale before its products (dQ, dK); the mask's gradient (when asked for) is dS, added atomically
into the mask's shape. The atomics make dQ's last bits depend on the order the programs finish on a GPU.
Causal limits each walk to the blocks that can be unmasked, for any Lq, Lk (no multiple-of-block assumption).
A row with every key masked has l = 0: its output is 0 and its m +inf, so P = 0 there and its gradients vanish.
"""
from __future__ import annotations

import math
import struct
import sys

import torch
import triton
import triton.language as tl

from .common import INTERPRET
from .dropout import COL_MUL, FMIX_MUL1, FMIX_MUL2, KEEP_BITS, ROW_MUL, SEED_MASK, dropout_threshold, seed_halves

MAX_HEAD_DIM = 256
# Tiles under the interpreter, whose cost is per operation, not per element: big tiles, few iterations. Tests
# shrink them to reach the multi-block paths (causal diagonal, ragged last block) at small shapes.
INTERPRET_TILES = dict(BLOCK_M=128, BLOCK_N=128)
# Whether the launchers pick the GPU's tiles (below): False under the interpreter, unless set to record what a GPU
# would run (kernels/aot.py, record_launches).
GPU_TILES = not INTERPRET
# The dropout hash's constants (kernels/dropout.py) as a jitted function may read a global: constexpr.
_ROW_MUL, _COL_MUL, _FMIX_MUL1, _FMIX_MUL2 = (tl.constexpr(c) for c in (ROW_MUL, COL_MUL, FMIX_MUL1, FMIX_MUL2))
_DROP_SHIFT = tl.constexpr(32 - KEEP_BITS)
# The dropout seed's halves are new every call: specialized, a half equal to 1 would reach the kernel as a Python
# int (which has no .to) and one divisible by 16 would compile another variant.
_SEEDS = ["seed_lo", "seed_hi"]
_LOG2E = tl.constexpr(math.log2(math.e))


@triton.jit
def _fmix32(h):
    h ^= h >> 16
    h *= _FMIX_MUL1
    h ^= h >> 13
    h *= _FMIX_MUL2
    h ^= h >> 16
    return h


@triton.jit
def _mm(a, b, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # Triton 3.6's interpreter multiplies bfloat16 as raw integers: upcast there (only)
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, out_dtype=ACC, input_precision=PREC)


@triton.jit
def _to(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """x.to(dtype); under the interpreter with bfloat16 (UPCAST), rounded to nearest-even first, since the
    interpreter truncates float32 -> bfloat16 where the GPU rounds (which doubles the rounding error)."""
    if UPCAST:
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        x = b.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _const(x: tl.constexpr, ACC: tl.constexpr):
    """The constant x in the accumulation dtype (a bare Python float is a float32 constant on the GPU)."""
    return tl.full([], x, ACC)


@triton.jit
def _scale(scale_hi, scale_lo, ACC: tl.constexpr):
    """The softmax scale in the accumulation dtype from its two float32 halves (float64 needs more than the float32
    that a float argument is on the GPU)."""
    return (_const(0.0, ACC) + scale_hi) + scale_lo


@triton.jit
def _keep(rows, cols, seed_lo, seed_hi, thresh):
    # The hash of kernels/dropout.py (fastnn.reference.dropout_keep), in uint32 arithmetic.
    x = rows.to(tl.uint32)[:, None] * _ROW_MUL + cols.to(tl.uint32)[None, :] * _COL_MUL + seed_lo.to(tl.uint32)
    x = _fmix32(_fmix32(x) ^ seed_hi.to(tl.uint32))
    return (x >> _DROP_SHIFT) >= thresh


@triton.jit
def _program(n_blocks, REVERSE: tl.constexpr):
    """(block, head) of this program on the flat grid of heads x n_blocks row blocks, the block varying fastest
    (REVERSE: last block first - the causal forward's longest walks start first). head is int64: it scales whole
    heads."""
    pid = tl.program_id(0)
    blk = pid % n_blocks
    if REVERSE:
        blk = n_blocks - 1 - blk
    return blk, (pid // n_blocks).to(tl.int64)


@triton.jit
def _load(base, offs, L, D, offs_d, dmask, ROWS: tl.constexpr, COLS: tl.constexpr, TRANS: tl.constexpr = False):
    """Rows offs of one head's contiguous (L, D) matrix at base, zeros where they do not exist; the row bound
    checked only when ROWS, the head-dim bound only when COLS (a full tile takes unmasked loads). TRANS: the tile
    transposed, [BLOCK_D, rows], read from memory in that order."""
    if TRANS:
        ptrs = base + offs[None, :] * D + offs_d[:, None]
        rmask, cmask = offs[None, :] < L, dmask[:, None]
    else:
        ptrs = base + offs[:, None] * D + offs_d[None, :]
        rmask, cmask = offs[:, None] < L, dmask[None, :]
    if ROWS and COLS:
        x = tl.load(ptrs, mask=rmask & cmask, other=0.0)
    elif ROWS:
        x = tl.load(ptrs, mask=rmask, other=0.0)
    elif COLS:
        x = tl.load(ptrs, mask=cmask, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _store(base, x, offs, L, D, offs_d, dmask, COLS: tl.constexpr):
    """Stores rows offs (those below L) of one head's contiguous (L, D) matrix at base."""
    ptrs = base + offs[:, None] * D + offs_d[None, :]
    if COLS:
        tl.store(ptrs, x, mask=(offs[:, None] < L) & dmask[None, :])
    else:
        tl.store(ptrs, x, mask=offs[:, None] < L)


@triton.jit
def _scores(qk, c, offs_m, offs_n, b, h, Lq, Lk, MASK, smb, smh, smm, smn, KPM,
            HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, BOUND_N: tl.constexpr,
            ACC: tl.constexpr):
    """Scores of one tile in base 2, (q k^T scale + mask) log2(e) with c = scale log2(e), from qk = q k^T; -inf
    where a key is padded, in the causal future (CAUSAL) or out of range (BOUND_N)."""
    s = qk * c
    if HAS_MASK:
        mp = MASK + b * smb + h * smh + offs_m[:, None].to(tl.int64) * smm + offs_n[None, :].to(tl.int64) * smn
        add = tl.load(mp, mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk), other=0.0).to(ACC)
        # A -inf entry masks the key whatever its score (an overflowed +inf would give NaN).
        s = tl.where(add == float("-inf"), float("-inf"), s + add * _const(_LOG2E, ACC))
    if BOUND_N:
        s = tl.where(offs_n[None, :] < Lk, s, float("-inf"))
    if HAS_KPM:
        pad = tl.load(KPM + b * Lk + offs_n, mask=offs_n < Lk, other=1)
        s = tl.where((pad != 0)[None, :], float("-inf"), s)
    if CAUSAL:
        s = tl.where(offs_n[None, :] > offs_m[:, None], float("-inf"), s)
    return s


@triton.jit
def _fwd_step(acc, m_i, l_i, q, k_base, v_base, start_n, offs_m, offs_n0, c, b, h, bh, Lq, Lk, D, DV, offs_d, dmask,
              offs_dv, dvmask, MASK, smb, smh, smm, smn, KPM, seed_lo, seed_hi, thresh, drop_scale,
              HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, BOUND_N: tl.constexpr, EVEN_D: tl.constexpr, ACC: tl.constexpr,
              PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One key block of the forward's online softmax. MASKED: the causal diagonal / ragged last block (CAUSAL and
    BOUND_N say which masks apply there); otherwise every key of the block is in range and causally visible."""
    offs_n = start_n + offs_n0
    k = _load(k_base, offs_n, Lk, D, offs_d, dmask, BOUND_N, not EVEN_D)
    qk = _mm(q, tl.trans(k), ACC, PREC, UPCAST)
    if MASKED or HAS_MASK or HAS_KPM:
        s = _scores(qk, c, offs_m, offs_n, b, h, Lq, Lk, MASK, smb, smh, smm, smn, KPM,
                    HAS_MASK, HAS_KPM, CAUSAL, BOUND_N, ACC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing unmasked yet: exp2(-inf - 0) = 0
        p = tl.math.exp2(s - m_safe[:, None])
    else:  # no mask: the row max of q k^T scaled once (c >= 0), and one fused multiply-add per score
        m_new = tl.maximum(m_i, tl.max(qk, 1) * c)
        m_safe = m_new
        p = tl.math.exp2(qk * c - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keep = _keep(bh * Lq + offs_m, offs_n, seed_lo, seed_hi, thresh)
        p = tl.where(keep, p * drop_scale, 0.0)
    v = _load(v_base, offs_n, Lk, DV, offs_dv, dvmask, BOUND_N, not EVEN_D)
    acc = acc * alpha[:, None] + _mm(_to(p, v.dtype, UPCAST), v, ACC, PREC, UPCAST)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=_SEEDS)
def _attn_fwd(Q, K, V, O, ROW_MAX, LOGL, MASK, KPM, H, G, Lq, Lk, D, DV, q_sb, q_sh, k_sb, k_sh, v_sb, v_sh,
              scale_hi, scale_lo, smb, smh, smm, smn, seed_lo, seed_hi, thresh, drop_scale,
              HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
              ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, GQA: tl.constexpr, EQUAL_D: tl.constexpr,
              EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, NEG_SCALE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m, bh = _program(tl.cdiv(Lq, BLOCK_M), CAUSAL)
    b, h = bh // H, bh % H
    hk = h
    if GQA:
        hk = h // G  # the kv head this query head reads (grouped-query attention)
    if EQUAL_D:  # the common case, specialized: one set of head-dim offsets and masks (registers; kernels/aot.py)
        DV = D
    if EVEN_D:  # head dims that are their tiles' (64, 128, ...): strides known at compile time, no head-dim masks
        D = BLOCK_D
        DV = BLOCK_DV
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_dv = tl.arange(0, BLOCK_DV)
    dvmask = offs_dv < DV
    sc = _scale(scale_hi, scale_lo, ACC)
    q = _load(Q + b * q_sb + h * q_sh, offs_m, Lq, D, offs_d, dmask, True, not EVEN_D)
    c = sc * _const(_LOG2E, ACC)
    if NEG_SCALE:  # on q (exactly), so that c >= 0 and max(q k^T) c is the row max of the scaled scores
        q = (-q.to(ACC)).to(q.dtype)  # through ACC: the interpreter holds bfloat16 as raw integers
        c = -c
    k_base, v_base = K + b * k_sb + hk * k_sh, V + b * v_sb + hk * v_sh
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    # Keys [0, n_full): whole blocks, in range and (causal) at or before the block's first query - no masks.
    # Keys [n_full, hi): the causal diagonal and the ragged last block, masked.
    if CAUSAL:
        hi = tl.minimum(Lk, start_m + BLOCK_M)
        n_full = (tl.minimum(Lk, start_m + 1) // BLOCK_N) * BLOCK_N
    else:
        hi = Lk
        n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, start_n, offs_m, offs_n0, c, b, h, bh, Lq, Lk,
                                  D, DV, offs_d, dmask, offs_dv, dvmask, MASK, smb, smh, smm, smn, KPM, seed_lo,
                                  seed_hi, thresh, drop_scale, HAS_MASK, HAS_KPM, DROPOUT, False, False, False,
                                  EVEN_D, ACC, PREC, UPCAST)
    if CAUSAL or not EVEN_N:
        for start_n in range(n_full, hi, BLOCK_N):
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, start_n, offs_m, offs_n0, c, b, h, bh, Lq,
                                      Lk, D, DV, offs_d, dmask, offs_dv, dvmask, MASK, smb, smh, smm, smn, KPM,
                                      seed_lo, seed_hi, thresh, drop_scale, HAS_MASK, HAS_KPM, DROPOUT, True, CAUSAL,
                                      not EVEN_N, EVEN_D, ACC, PREC, UPCAST)
    empty = l_i == 0.0
    # Every key masked: zeros, even where a value is inf/NaN (0 * inf in acc would be NaN).
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    _store(O + bh * Lq * DV, _to(out, O.dtype.element_ty, UPCAST), offs_m, Lq, DV, offs_dv, dvmask, not EVEN_D)
    rmask = offs_m < Lq
    # In base 2, as computed (the module's docstring): m = max s log2(e) and log2(l).
    tl.store(ROW_MAX + bh * Lq + offs_m, tl.where(empty, float("inf"), m_i), mask=rmask)
    tl.store(LOGL + bh * Lq + offs_m, tl.math.log2(tl.where(empty, 1.0, l_i)), mask=rmask)


@triton.jit
def _add_dmask(DMASK, ds, b, h, offs_m, offs_n, Lq, Lk, dmb, dmh, dmm, dmn,
               SUM_M: tl.constexpr, SUM_N: tl.constexpr):
    """d(mask) += dS of one tile, atomically (programs of other heads or batches may share the mask's elements):
    summed first over the tile's queries (SUM_M) or keys (SUM_N) where the mask broadcasts over them."""
    base = DMASK + b * dmb + h * dmh
    rows, cols = offs_m < Lq, offs_n < Lk
    if SUM_M and SUM_N:
        tl.atomic_add(base, tl.sum(tl.sum(ds, 1), 0), sem="relaxed")
    elif SUM_N:
        tl.atomic_add(base + offs_m.to(tl.int64) * dmm, tl.sum(ds, 1), mask=rows, sem="relaxed")
    elif SUM_M:
        tl.atomic_add(base + offs_n.to(tl.int64) * dmn, tl.sum(ds, 0), mask=cols, sem="relaxed")
    else:
        tl.atomic_add(base + offs_m[:, None].to(tl.int64) * dmm + offs_n[None, :].to(tl.int64) * dmn, ds,
                      mask=rows[:, None] & cols[None, :], sem="relaxed")


@triton.jit
def _bwd_step(dk, dv, k, v, k_base, v_base, start_m, offs_m0, offs_n, q_base, do_base, dq_base, c, sc, b, h, bh,
              Lq, Lk, D, DV, offs_d, dmask, offs_dv, dvmask, ROW_MAX, LOGL, DELTA, MASK, smb, smh, smm, smn, KPM,
              DMASK, dmb, dmh, dmm, dmn, seed_lo, seed_hi, thresh, drop_scale,
              HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, BOUND_N: tl.constexpr,
              DROPOUT: tl.constexpr, EVEN_D: tl.constexpr, MASK_GRAD: tl.constexpr, DM_SUM_M: tl.constexpr,
              DM_SUM_N: tl.constexpr, KV_IN_LOOP: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
              UPCAST: tl.constexpr):
    """One query block of the backward against the program's key block: the five products, dQ added atomically.
    CAUSAL: the block meets the causal diagonal; BOUND_N: the key block is ragged. KV_IN_LOOP: k and v are not
    used; the key block is read (from cache) where each product needs it, in the layout it needs (_attn_bwd)."""
    offs_m = start_m + offs_m0
    q = _load(q_base, offs_m, Lq, D, offs_d, dmask, True, not EVEN_D)
    if not KV_IN_LOOP:
        do = _load(do_base, offs_m, Lq, DV, offs_dv, dvmask, True, not EVEN_D)
    rmask = offs_m < Lq
    m = tl.load(ROW_MAX + bh * Lq + offs_m, mask=rmask, other=float("inf"))  # +inf past Lq: P = 0 there
    logl = tl.load(LOGL + bh * Lq + offs_m, mask=rmask, other=0.0)
    delta = tl.load(DELTA + bh * Lq + offs_m, mask=rmask, other=0.0)
    if KV_IN_LOOP:
        kt = _load(k_base, offs_n, Lk, D, offs_d, dmask, BOUND_N, not EVEN_D, True)
    else:
        kt = tl.trans(k)
    s = _scores(_mm(q, kt, ACC, PREC, UPCAST), c, offs_m, offs_n, b, h, Lq, Lk, MASK, smb, smh, smm, smn, KPM,
                HAS_MASK, HAS_KPM, CAUSAL, BOUND_N, ACC)
    p = tl.math.exp2((s - m[:, None]) - logl[:, None])  # m = +inf on empty rows: p = 0
    if KV_IN_LOOP:  # dO read here, so that its two staged copies are not held through Q K^T
        do = _load(do_base, offs_m, Lq, DV, offs_dv, dvmask, True, not EVEN_D)
        vt = _load(v_base, offs_n, Lk, DV, offs_dv, dvmask, BOUND_N, not EVEN_D, True)
    else:
        vt = tl.trans(v)
    dp = _mm(do, vt, ACC, PREC, UPCAST)
    pd = p
    if DROPOUT:
        keep = _keep(bh * Lq + offs_m, offs_n, seed_lo, seed_hi, thresh)
        pd = tl.where(keep, p * drop_scale, 0.0)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    # Rows that attend nothing (m = +inf): dS = 0, where P (dP - delta) = 0 * inf if dO V overflows.
    ds = tl.where((m == float("inf"))[:, None], 0.0, p * (dp - delta[:, None]))
    dv += _mm(tl.trans(_to(pd, do.dtype, UPCAST)), do, ACC, PREC, UPCAST)
    ds_in = _to(ds * sc, q.dtype, UPCAST)  # the scale of dK = dS^T Q scale and dQ = dS K scale, once
    dk += _mm(tl.trans(ds_in), q, ACC, PREC, UPCAST)
    if KV_IN_LOOP:
        k = _load(k_base, offs_n, Lk, D, offs_d, dmask, BOUND_N, not EVEN_D)
    dq = _mm(ds_in, k, ACC, PREC, UPCAST)
    dq_ptrs = dq_base + offs_m[:, None] * D + offs_d[None, :]
    if EVEN_D:
        tl.atomic_add(dq_ptrs, dq, mask=rmask[:, None], sem="relaxed")
    else:
        tl.atomic_add(dq_ptrs, dq, mask=rmask[:, None] & dmask[None, :], sem="relaxed")
    if MASK_GRAD:
        _add_dmask(DMASK, ds, b, h, offs_m, offs_n, Lq, Lk, dmb, dmh, dmm, dmn, DM_SUM_M, DM_SUM_N)
    return dk, dv


@triton.jit(do_not_specialize=_SEEDS)
def _attn_bwd(Q, K, V, DO, ROW_MAX, LOGL, DELTA, DQ, DK, DV_, DMASK, MASK, KPM, H, G, Lq, Lk, D, DV, q_sb, q_sh,
              k_sb, k_sh, v_sb, v_sh, scale_hi, scale_lo, smb, smh, smm, smn, dmb, dmh, dmm, dmn, seed_lo, seed_hi,
              thresh, drop_scale,
              HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
              ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, GQA: tl.constexpr, EQUAL_D: tl.constexpr,
              EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, MASK_GRAD: tl.constexpr, DM_SUM_M: tl.constexpr,
              DM_SUM_N: tl.constexpr, KV_IN_LOOP: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    # One program per (key block, batch * kv head): it walks the G query heads that share the kv head (grouped-
    # query attention), so dK / dV sum over the group without atomics. DQ (float32 / float64, zeroed) takes dQ
    # atomically, scaled; DMASK the mask's gradient (MASK_GRAD). The key block is held through the loop, or with
    # KV_IN_LOOP (_kv_in_loop: shared memory too small to hold it) read again by each product that takes it.
    if EQUAL_D:
        DV = D
    if EVEN_D:
        D = BLOCK_D
        DV = BLOCK_DV
    n_group = 1
    if GQA:
        n_group = G
    pid_n, bhk = _program(tl.cdiv(Lk, BLOCK_N), False)
    Hk = H // n_group
    b, hk = bhk // Hk, bhk % Hk
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_dv = tl.arange(0, BLOCK_DV)
    dvmask = offs_dv < DV
    k_base, v_base = K + b * k_sb + hk * k_sh, V + b * v_sb + hk * v_sh
    k = tl.zeros([BLOCK_N, BLOCK_D], K.dtype.element_ty)
    v = tl.zeros([BLOCK_N, BLOCK_DV], V.dtype.element_ty)
    if not KV_IN_LOOP:
        k = _load(k_base, offs_n, Lk, D, offs_d, dmask, not EVEN_N, not EVEN_D)
        v = _load(v_base, offs_n, Lk, DV, offs_dv, dvmask, not EVEN_N, not EVEN_D)
    sc = _scale(scale_hi, scale_lo, ACC)
    c = sc * _const(_LOG2E, ACC)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC)
    lo = 0
    diag_end = 0
    if CAUSAL:
        # Queries before the block's first key see none of it; from diag_end on, every query sees every key.
        lo = (start_n // BLOCK_M) * BLOCK_M
        diag_end = tl.minimum(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, Lq)
    for g in range(0, n_group):
        h = hk * n_group + g
        bh = b * H + h
        q_base, do_base, dq_base = Q + b * q_sb + h * q_sh, DO + bh * Lq * DV, DQ + bh * Lq * D
        if CAUSAL:
            for start_m in range(lo, diag_end, BLOCK_M):
                dk, dv = _bwd_step(dk, dv, k, v, k_base, v_base, start_m, offs_m0, offs_n, q_base, do_base,
                                   dq_base, c, sc, b, h, bh, Lq, Lk, D, DV, offs_d, dmask, offs_dv, dvmask, ROW_MAX,
                                   LOGL, DELTA, MASK, smb, smh, smm, smn, KPM, DMASK, dmb, dmh, dmm, dmn, seed_lo,
                                   seed_hi, thresh, drop_scale, HAS_MASK, HAS_KPM, True, not EVEN_N, DROPOUT, EVEN_D,
                                   MASK_GRAD, DM_SUM_M, DM_SUM_N, KV_IN_LOOP, ACC, PREC, UPCAST)
        for start_m in range(diag_end, Lq, BLOCK_M):
            dk, dv = _bwd_step(dk, dv, k, v, k_base, v_base, start_m, offs_m0, offs_n, q_base, do_base, dq_base, c,
                               sc, b, h, bh, Lq, Lk, D, DV, offs_d, dmask, offs_dv, dvmask, ROW_MAX, LOGL, DELTA, MASK,
                               smb, smh, smm, smn, KPM, DMASK, dmb, dmh, dmm, dmn, seed_lo, seed_hi, thresh,
                               drop_scale, HAS_MASK, HAS_KPM, False, not EVEN_N, DROPOUT, EVEN_D, MASK_GRAD, DM_SUM_M,
                               DM_SUM_N, KV_IN_LOOP, ACC, PREC, UPCAST)
    _store(DK + bhk * Lk * D, _to(dk, DK.dtype.element_ty, UPCAST), offs_n, Lk, D, offs_d, dmask, not EVEN_D)
    _store(DV_ + bhk * Lk * DV, _to(dv, DV_.dtype.element_ty, UPCAST), offs_n, Lk, DV, offs_dv, dvmask, not EVEN_D)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, R, DV, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta = rowsum(dO * O) over the R rows of the contiguous (R, DV) output and its gradient, in ACC."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_DV)
    mask = (rows[:, None] < R) & (cols[None, :] < DV)
    offs = rows[:, None] * DV + cols[None, :]
    o = tl.load(O + offs, mask=mask, other=0.0).to(ACC)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(ACC)
    tl.store(DELTA + rows, tl.sum(o * do, 1), mask=rows < R)


def _delta_rows(block_dv: int) -> int:
    """Rows per program of _attn_bwd_delta: ~4096 elements (big tiles under the interpreter)."""
    return max(1, 4096 // block_dv) if GPU_TILES else 128


# ---- launchers ----------------------------------------------------------------------------------------------

def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise go through TF32 tensor cores (10-bit mantissa); keep them exact.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _blocks(d: int, dtype: torch.dtype, backward: bool, variant: str, hopper: bool, aligned: bool = True) -> dict:
    """Tile sizes and launch options. ``variant``: "plain", "causal" or "masked" (masks or dropout, whose
    [BLOCK_M, BLOCK_N] offsets and hashes need registers too); ``hopper``: sm_90 or later; ``aligned``: what
    _aligned says (else element-wise loads and their addresses take registers: smaller tiles). Chosen so that no
    bf16/fp16/float32 variant spills (kernels/aot.py checks, sm_90 and sm_80, Triton 3.8), but for the unaligned
    masked D=256 backward: float32 on sm_90 with Triton 3.6, bf16 on sm_80 (docs/measurements.md, "Attention");
    and on sm_90 so that the half-precision products run on wgmma, which takes products whose M (BLOCK_M; BLOCK_N
    for dK, dV) is 64 or more, from warps in groups of 4. float32 (exact FMA dots, not tensor cores) and float64
    take small tiles (16 x 16; 32 x 32 for the forward at head dims up to 32), and at D=256 no software pipelining
    (num_stages=1): the prefetched tiles of the default 3 stages spilled in the backward. ptxas' counts:
    docs/measurements.md, "Attention"; every variant the tests reach, not only these: kernels/aot.py --recorded."""
    block_d = _pad(d)
    if not GPU_TILES:
        return dict(INTERPRET_TILES, BLOCK_D=block_d, num_warps=4)
    if dtype in (torch.float32, torch.float64):
        # 32 x 32 tiles only for the forward at small head dims, on 8 warps: with 4, or in the backward (five
        # products' tiles live), masked and ragged variants spilled (kernels/aot.py --recorded, Triton 3.6)
        small = block_d <= 32 and not backward
        cfg = dict(BLOCK_M=32, BLOCK_N=32) if small else dict(BLOCK_M=16, BLOCK_N=16)
        cfg.update(BLOCK_D=block_d, num_warps=8 if block_d >= 64 or small else 4)
        # ptxas held some variants to 128 or 168 registers and spilled; with its cap lifted they take ~150-220
        cfg.update(maxnreg=255)
        if (backward and (variant == "masked" or not aligned)) or block_d >= 256:
            cfg.update(num_stages=1)
        return cfg
    table = (_HOPPER if hopper else _AMPERE) if aligned else _UNALIGNED
    bm, bn, warps, stages, _ = table[(backward, variant, max(block_d, 64))]
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=stages)


# Half precision tiles: (backward, variant, padded head dim 64 / 128 / 256) -> (BLOCK_M, BLOCK_N, warps, stages,
# whether the products run on wgmma); variant "plain", "causal" or "masked" (attn_mask, key padding or dropout).
# sm_90: the backward keeps dK, dV, dQ's tile and S, dP live: at head dim 128 its 64 x 64 tiles take ~250
# registers (64 x 128 spilled 1-3 KB; causal 64 x 64 spilled 24 B with Triton 3.6, whence 32 x 128 there); at
# 256 masked only 16 x 32 tiles (mma.sync) fit.
_HOPPER = {
    (False, "plain", 64): (128, 64, 8, 3, True), (False, "causal", 64): (128, 64, 8, 3, True),
    (False, "masked", 64): (128, 64, 8, 3, True),
    (False, "plain", 128): (128, 64, 8, 3, True), (False, "causal", 128): (128, 64, 8, 3, True),
    (False, "masked", 128): (64, 64, 8, 2, True),
    (False, "plain", 256): (64, 64, 8, 2, True), (False, "causal", 256): (64, 64, 8, 2, True),
    (False, "masked", 256): (64, 32, 8, 2, True),
    (True, "plain", 64): (64, 64, 8, 2, True), (True, "causal", 64): (64, 64, 8, 2, True),
    (True, "masked", 64): (32, 64, 8, 1, True),
    (True, "plain", 128): (64, 64, 8, 2, True), (True, "causal", 128): (32, 128, 8, 2, True),
    (True, "masked", 128): (16, 64, 8, 1, True),
    (True, "plain", 256): (32, 64, 8, 1, True), (True, "causal", 256): (32, 64, 8, 1, True),
    (True, "masked", 256): (16, 32, 8, 1, False),
}


# Before sm_90 (mma.sync). Masked backward: one pipelining stage (the prefetched tiles spilled).
_AMPERE = {
    (False, "plain", 64): (64, 64, 8, 3, False), (False, "causal", 64): (64, 64, 8, 3, False),
    (False, "masked", 64): (64, 64, 8, 3, False),
    (False, "plain", 128): (64, 64, 8, 3, False), (False, "causal", 128): (64, 64, 8, 3, False),
    (False, "masked", 128): (32, 64, 8, 3, False),
    (False, "plain", 256): (32, 32, 8, 3, False), (False, "causal", 256): (32, 32, 8, 3, False),
    (False, "masked", 256): (32, 32, 8, 3, False),
    (True, "plain", 64): (32, 64, 8, 3, False), (True, "causal", 64): (32, 64, 8, 3, False),
    (True, "masked", 64): (32, 32, 8, 1, False),
    (True, "plain", 128): (32, 64, 8, 3, False), (True, "causal", 128): (32, 64, 8, 3, False),
    (True, "masked", 128): (16, 32, 8, 3, False),
    (True, "plain", 256): (32, 32, 8, 3, False), (True, "causal", 256): (32, 32, 8, 3, False),
    (True, "masked", 256): (16, 16, 8, 1, False),
}


# Operands that are not 16-byte aligned (an odd head dim, a sliced tensor), any GPU.
_UNALIGNED = {
    (False, "plain", 64): (64, 64, 8, 2, False), (False, "causal", 64): (64, 64, 8, 2, False),
    (False, "masked", 64): (32, 32, 8, 1, False),
    (False, "plain", 128): (64, 32, 8, 2, False), (False, "causal", 128): (64, 32, 8, 2, False),
    (False, "masked", 128): (16, 32, 8, 1, False),
    (False, "plain", 256): (32, 32, 8, 1, False), (False, "causal", 256): (32, 32, 8, 1, False),
    (False, "masked", 256): (16, 32, 8, 1, False),
    (True, "plain", 64): (32, 64, 8, 2, False), (True, "causal", 64): (32, 64, 8, 2, False),
    (True, "masked", 64): (16, 32, 8, 1, False),
    (True, "plain", 128): (32, 32, 8, 1, False), (True, "causal", 128): (32, 32, 8, 1, False),
    (True, "masked", 128): (16, 32, 8, 1, False),
    (True, "plain", 256): (16, 32, 8, 1, False), (True, "causal", 256): (16, 32, 8, 1, False),
    (True, "masked", 256): (16, 16, 8, 1, False),
}


def _aligned(tensors, ints) -> bool:
    """Whether the JIT's aligned specialization runs (kernels/aot.py, variant A): 16-byte aligned tensors and
    integer arguments (head dims, strides) that are multiples of 16."""
    return all(t.data_ptr() % 16 == 0 for t in tensors) and all(i % 16 == 0 for i in ints)


def _is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one block may use on device (the opt-in maximum); no limit for the interpreter."""
    if device.type != "cuda":
        return sys.maxsize
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block)


def _dropout_args(dropout_p: float, seed: int) -> dict:
    # Halves kept below 2**31 (SEED_MASK; fastnn.ops.attention draws seeds that way) so both are typed int32.
    seed_lo, seed_hi = seed_halves(seed & SEED_MASK)
    return dict(seed_lo=seed_lo, seed_hi=seed_hi, thresh=dropout_threshold(dropout_p),
                drop_scale=1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0)


def _f32(x: float) -> float:
    """x rounded to float32 (to nearest even; past float32's range, an infinity)."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _scale_halves(scale: float) -> dict:
    """scale as two float32 (a float argument's type on the GPU) whose sum holds it to ~48 bits: float64 inputs
    keep their precision (the kernels add the halves in the accumulation dtype)."""
    hi = _f32(scale)
    return dict(scale_hi=hi, scale_lo=_f32(scale - hi) if math.isfinite(hi) else 0.0)


def _bstrides(t, dims=(0, 1)) -> tuple:
    """t's strides along dims as the kernels index it: 0 along a broadcast (size-1) dim."""
    return tuple(0 if t.shape[d] == 1 else t.stride(d) for d in dims)


def _operand(t: torch.Tensor) -> torch.Tensor:
    """A (B, H, L, D) operand as the kernels read it: row-contiguous (L, D) blocks at batch / head strides, which
    stay 0 along broadcast dims (an expanded key shared by the batch is read in place, not copied)."""
    base = t
    for d in (0, 1):
        if t.shape[d] > 1 and t.stride(d) == 0:
            base = base.narrow(d, 0, 1)
    if not ((base.shape[3] <= 1 or base.stride(3) == 1) and (base.shape[2] <= 1 or base.stride(2) == base.shape[3])):
        base = base.contiguous()
    return base.expand(t.shape)


def _launch_args(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, backward: bool) -> dict:
    """The keyword arguments every attention kernel takes after its own tensors: geometry and operand strides,
    masks, dropout, specialization flags and tile sizes (with num_warps / num_stages)."""
    B, H, Lq, D = q.shape
    Hk, Lk, DV = k.shape[1], k.shape[2], v.shape[3]
    dtype = q.dtype
    if attn_mask is not None:
        mask, strides = attn_mask, _bstrides(attn_mask, range(4))
    else:
        mask, strides = q, (0, 0, 0, 0)  # never read
    kpm = q  # never read
    if key_padding_mask is not None:
        # Bytes, but int32 for float64: Triton sizes the products' operand fragments by the narrowest element
        # loaded on the way to them, and the float64 MMA takes no fragment sized for bytes (the compile aborts).
        kpm = key_padding_mask.contiguous().view(torch.uint8)
        kpm = kpm.to(torch.int32) if dtype == torch.float64 else kpm
    variant = "plain"
    if attn_mask is not None or key_padding_mask is not None or dropout_p > 0:
        variant = "masked"
    elif is_causal:
        variant = "causal"
    (q_sb, q_sh), (k_sb, k_sh), (v_sb, v_sh) = _bstrides(q), _bstrides(k), _bstrides(v)
    aligned = _aligned((q, k, v), (D, DV, q_sb, q_sh, k_sb, k_sh, v_sb, v_sh))
    cfg = _head_blocks(D, DV, dtype, backward, variant, _is_hopper(q.device), aligned)
    if backward:
        cfg["KV_IN_LOOP"] = _kv_in_loop(cfg, dtype, _shared_memory(q.device))
    return dict(MASK=mask, KPM=kpm, H=H, G=H // Hk, Lq=Lq, Lk=Lk, D=D, DV=DV, q_sb=q_sb, q_sh=q_sh, k_sb=k_sb,
                k_sh=k_sh, v_sb=v_sb, v_sh=v_sh, **_scale_halves(scale),
                **dict(zip(("smb", "smh", "smm", "smn"), strides)), **_dropout_args(dropout_p, seed),
                HAS_MASK=attn_mask is not None, HAS_KPM=key_padding_mask is not None, CAUSAL=bool(is_causal),
                DROPOUT=dropout_p > 0, ACC=_acc(dtype), PREC=_prec(dtype),
                UPCAST=INTERPRET and dtype == torch.bfloat16, GQA=Hk != H, EQUAL_D=D == DV,
                EVEN_N=Lk % cfg["BLOCK_N"] == 0, EVEN_D=D == cfg["BLOCK_D"] and DV == cfg["BLOCK_DV"], **cfg)


def _kv_in_loop(cfg: dict, dtype: torch.dtype, shared: int) -> bool:
    """Whether the backward reads its key block inside the query loop (_attn_bwd's KV_IN_LOOP), for float32 /
    float64, whose products stage every operand in shared memory: with K and V held for the whole loop it holds
    K twice and V once (BLOCK_N rows each), Q and dO twice each (BLOCK_M rows), all at once - for float64 at head
    dim 256, 224 KB, above the A100's 163 KB (``shared``: what the device lets one block use). Read where each
    product needs it, at most four of those tiles are held at once."""
    if dtype not in (torch.float32, torch.float64):
        return False
    tiles = 3 * cfg["BLOCK_N"] + 4 * cfg["BLOCK_M"]
    return tiles * max(cfg["BLOCK_D"], cfg["BLOCK_DV"]) * dtype.itemsize > shared


def _head_blocks(d: int, dv: int, dtype: torch.dtype, backward: bool, variant: str, hopper: bool,
                 aligned: bool = True) -> dict:
    """_blocks' tiles for the larger head dim, with BLOCK_D (query / key) and BLOCK_DV (value) each padded from
    their own dim."""
    cfg = _blocks(max(d, dv), dtype, backward, variant, hopper, aligned)
    cfg["BLOCK_D"], cfg["BLOCK_DV"] = _pad(d), _pad(dv)
    return cfg


def attention_forward(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed):
    """q (B, H, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv), H a multiple of Hk, read through batch / head
    strides; attn_mask additive in the accumulation dtype, 4-d, each dim 1 or (B, H, Lq, Lk)'s (any strides), or
    None; key_padding_mask (B, Lk) bool or None.
    Returns (out (B, H, Lq, Dv) in q's dtype, stats (2, B, H, Lq) float32 / float64: in base 2, each row's max m of
    the scores times log2(e) and log2 of its sum of exp2(s log2(e) - m), what attention_backward reads)."""
    q, k, v = _operand(q), _operand(k), _operand(v)
    B, H, Lq, D = q.shape
    out = q.new_empty((B, H, Lq, v.shape[3]))
    stats = torch.empty((2, B, H, Lq), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                        device=q.device)
    if out.numel() == 0:
        stats[0].fill_(float("inf"))
        stats[1].zero_()
        return out, stats
    args = _launch_args(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, backward=False)
    _attn_fwd[(B * H * triton.cdiv(Lq, args["BLOCK_M"]),)](q, k, v, out, stats[0], stats[1], **args,
                                                            NEG_SCALE=scale < 0)
    return out, stats


def attention_backward(grad_out, q, k, v, out, stats, attn_mask, key_padding_mask, dropout_p, is_causal, scale,
                       seed, mask_grad):
    """Returns (dq, dk, dv, dmask): dq, dk, dv contiguous in q's dtype, dk / dv (B, Hk, Lk, *) summed over each kv
    head's query heads; dmask the mask's gradient, of its shape in the accumulation dtype, when mask_grad (else an
    empty (0,) tensor)."""
    q, k, v = _operand(q), _operand(k), _operand(v)
    out, do = out.contiguous(), grad_out.contiguous()
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # dQ is summed atomically over the key blocks, in the accumulation dtype (q's own for float32 / float64).
    dq_acc = torch.zeros((B, H, Lq, D), dtype=acc, device=q.device)
    dk, dv = q.new_empty((B, Hk, Lk, D)), q.new_empty((B, Hk, Lk, v.shape[3]))
    dmask = torch.zeros(attn_mask.shape if mask_grad else (0,), dtype=acc, device=q.device)
    if Lq == 0 or Lk == 0 or B * H == 0:
        return dq_acc.to(q.dtype), dk.zero_(), dv.zero_(), dmask
    delta = torch.empty((B, H, Lq), dtype=acc, device=q.device)
    rows, block_dv = B * H * Lq, _pad(v.shape[3])
    block_r = _delta_rows(block_dv)
    _attn_bwd_delta[(triton.cdiv(rows, block_r),)](out, do, delta, rows, v.shape[3], ACC=_acc(q.dtype),
                                                   BLOCK_R=block_r, BLOCK_DV=block_dv, num_warps=4)
    m, logl = stats[0].contiguous(), stats[1].contiguous()
    args = _launch_args(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, backward=True)
    dm_strides = _bstrides(dmask, range(4)) if mask_grad else (0, 0, 0, 0)
    _attn_bwd[(B * Hk * triton.cdiv(Lk, args["BLOCK_N"]),)](
        q, k, v, do, m, logl, delta, dq_acc, dk, dv, dmask if mask_grad else q, **args,
        **dict(zip(("dmb", "dmh", "dmm", "dmn"), dm_strides)), MASK_GRAD=mask_grad,
        DM_SUM_M=mask_grad and attn_mask.shape[2] == 1, DM_SUM_N=mask_grad and attn_mask.shape[3] == 1)
    return dq_acc.to(q.dtype), dk, dv, dmask


def _aot_specs(arch: int = 90, aligned: bool = True):
    """Representative compilations for ``arch`` and operands ``aligned`` or not (kernels/aot.py's variants A, U):
    bf16/fp32, head dims 64/128/256; the plain variant, the causal one with full tiles (EVEN_N, EVEN_D: what
    aligned shapes run) and causal + masks + dropout + the mask's gradient with ragged key blocks and head dims
    (the heaviest, most registers). On sm_90 the aligned bf16 kernels must use wgmma where _HOPPER says so
    (options' "wgmma", which kernels/aot.py checks)."""
    scalars = {"H": "i32", "G": "i32", "Lq": "i32", "Lk": "i32", "D": "i32", "DV": "i32", "q_sb": "i64",
               "q_sh": "i64", "k_sb": "i64", "k_sh": "i64", "v_sb": "i64", "v_sh": "i64", "scale_hi": "fp32",
               "scale_lo": "fp32", "smb": "i64", "smh": "i64", "smm": "i64", "smn": "i64", "dmb": "i64",
               "dmh": "i64", "dmm": "i64", "dmn": "i64", "seed_lo": "i32", "seed_hi": "i32", "thresh": "i32",
               "drop_scale": "fp32"}
    tdt = {torch.bfloat16: "bf16", torch.float32: "fp32"}  # fp16 compiles to bf16's code with another MMA type
    hopper = arch >= 90
    for dtype, name in tdt.items():
        for d in (64, 128, 256):
            for variant in ("plain", "causal", "masked"):
                causal, heavy = variant != "plain", variant == "masked"
                flags = dict(HAS_MASK=heavy, HAS_KPM=heavy, CAUSAL=causal, DROPOUT=heavy, ACC=tl.float32,
                             PREC=_prec(dtype), UPCAST=False, GQA=heavy, EQUAL_D=True, EVEN_N=not heavy,
                             EVEN_D=not heavy)
                for backward, kernel, ptrs in ((False, _attn_fwd, ("Q", "K", "V", "O")),
                                               (True, _attn_bwd, ("Q", "K", "V", "DO", "DK", "DV_"))):
                    cfg = _head_blocks(d, d, dtype, backward, variant, hopper, aligned)
                    options = {k: cfg.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in cfg}
                    options["wgmma"] = (hopper and aligned and dtype != torch.float32
                                        and _HOPPER[(backward, variant, d)][4])
                    sig = {p: f"*{name}" for p in ptrs}
                    sig.update({"ROW_MAX": "*fp32", "LOGL": "*fp32", "MASK": "*fp32", "KPM": "*u8", "DQ": "*fp32",
                                "DMASK": "*fp32"})
                    if backward:
                        sig["DELTA"] = "*fp32"
                    sig.update(scalars)
                    # the signature must follow the kernel's argument order
                    order = [a for a in kernel.arg_names if a in sig]
                    extra = {}
                    if backward:
                        extra = dict(MASK_GRAD=heavy, DM_SUM_M=False, DM_SUM_N=False, KV_IN_LOOP=False)
                    else:
                        extra = dict(NEG_SCALE=False)
                    yield kernel, {a: sig[a] for a in order}, {**flags, **extra, **cfg}, options


    for name in tdt.values():
        for dv in (64, 128, 256):
            sig = {"O": f"*{name}", "DO": f"*{name}", "DELTA": "*fp32", "R": "i32", "DV": "i32"}
            yield _attn_bwd_delta, sig, dict(ACC=tl.float32, BLOCK_R=_delta_rows(dv), BLOCK_DV=dv), {"num_warps": 4}


AOT = _aot_specs
