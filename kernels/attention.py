"""Triton flash attention, forward and backward, with causal / additive / key-padding masks and dropout.

q (B, H, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, DV): query head h reads kv head h // G, G = H / Hk (grouped-query
attention; G = 1 otherwise), and DV may differ from D. q, k, v are read through batch / head strides (0 along
broadcast dims), each head's (L, D) block row-contiguous; outputs and gradients are contiguous. The forward keeps, per block of BLOCK_M queries, a running max m,
sum l and unnormalized output acc while it walks the keys BLOCK_N at a time (online softmax), and writes the
output and the per-row statistics m and log(l) - the only things the backward needs besides q, k, v. They are
kept apart, as the two planes of the launchers' stats (2, B, H, Lq) that the kernels take as ROW_MAX and LOGL:
their sum would lose log(l) to ulp(m) at scores of 1e4 and more.

The backward recomputes P = exp((S - m) - log(l)) tile by tile in two kernels, so that neither needs atomics:
  * _attn_bwd_dkdv: one program per (key block, kv head) walks the G query heads' query blocks and accumulates
                    dK, dV (summed over the group);
  * _attn_bwd_dq:   one program per query block walks the key blocks and accumulates dQ, and, when asked for, adds
                    dS into the attn_mask's gradient (atomics: d(mask) = dS summed over the mask's broadcast dims).
With delta = rowsum(dO * O) (dropout included, since O already is the dropped product):
  dV = Pd^T dO,  dP = (dO V^T) * Z,  dS = P * (dP - delta),  dQ = dS K * scale,  dK = dS^T Q * scale
where Pd = P * Z and Z is the dropout mask scaled by 1/(1-p), regenerated from (seed, row, col) by _keep.
Causal limits each walk to the blocks that can be unmasked, for any Lq, Lk (no multiple-of-block assumption).
A row with every key masked has l = 0: its output is 0 and its m +inf, so P = 0 there and its gradients vanish.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .dropout import COL_MUL, FMIX_MUL1, FMIX_MUL2, KEEP_BITS, ROW_MUL, SEED_MASK, dropout_threshold, seed_halves

MAX_HEAD_DIM = 256
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# The dropout hash's constants (kernels/dropout.py) as a jitted function may read a global: constexpr.
_ROW_MUL, _COL_MUL, _FMIX_MUL1, _FMIX_MUL2 = (tl.constexpr(c) for c in (ROW_MUL, COL_MUL, FMIX_MUL1, FMIX_MUL2))
_DROP_SHIFT = tl.constexpr(32 - KEEP_BITS)


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
def _keep(rows, cols, seed_lo, seed_hi, thresh):
    # The hash of kernels/dropout.py (fastnn.reference.dropout_keep), in uint32 arithmetic.
    x = rows.to(tl.uint32)[:, None] * _ROW_MUL + cols.to(tl.uint32)[None, :] * _COL_MUL + seed_lo.to(tl.uint32)
    x = _fmix32(_fmix32(x) ^ seed_hi.to(tl.uint32))
    return (x >> _DROP_SHIFT) >= thresh


@triton.jit
def _scores(q, k, offs_m, offs_n, b, h, Lq, Lk, scale, MASK, smb, smh, smm, smn, KPM,
            HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, ACC: tl.constexpr,
            PREC: tl.constexpr, UPCAST: tl.constexpr):
    """S = q k^T * scale + mask, with -inf where a key is out of range, padded or in the causal future."""
    s = _mm(q, tl.trans(k), ACC, PREC, UPCAST) * scale
    if HAS_MASK:
        mp = MASK + b * smb + h * smh + offs_m[:, None].to(tl.int64) * smm + offs_n[None, :].to(tl.int64) * smn
        add = tl.load(mp, mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk), other=0.0).to(ACC)
        # A -inf entry masks the key whatever its score (an overflowed +inf would give NaN).
        s = tl.where(add == float("-inf"), float("-inf"), s + add)
    dead = offs_n[None, :] >= Lk
    if HAS_KPM:
        pad = tl.load(KPM + b * Lk + offs_n, mask=offs_n < Lk, other=1)
        dead = dead | (pad != 0)[None, :]
    if CAUSAL:
        dead = dead | (offs_n[None, :] > offs_m[:, None])
    return tl.where(dead, float("-inf"), s)


@triton.jit
def _program(H, D, DV, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Where a program of any attention grid stands: axis 0 is a block of BLOCK rows (queries or keys), axis 1 the
    (batch, head) pair bh of H heads (query heads, or kv heads for dK/dV). Returns the block index, its row
    offsets, bh (int64: it scales whole heads), b, h, and the offsets with their masks of the query/key head dim
    D and of the value head dim DV."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    return pid, pid * BLOCK + tl.arange(0, BLOCK), bh, bh // H, bh % H, offs_d, offs_d < D, offs_dv, offs_dv < DV


@triton.jit
def _add_dmask(DMASK, ds, b, h, offs_m, offs_n, Lq, Lk, dmb, dmh, dmm, dmn,
               SUM_M: tl.constexpr, SUM_N: tl.constexpr):
    """d(mask) += dS of one tile, atomically (programs of other heads or batches may share the mask's elements):
    summed first over the tile's queries (SUM_M) or keys (SUM_N) where the mask broadcasts over them."""
    base = DMASK + b * dmb + h * dmh
    rows, cols = offs_m < Lq, offs_n < Lk
    if SUM_M and SUM_N:
        tl.atomic_add(base, tl.sum(tl.sum(ds, 1), 0))
    elif SUM_N:
        tl.atomic_add(base + offs_m.to(tl.int64) * dmm, tl.sum(ds, 1), mask=rows)
    elif SUM_M:
        tl.atomic_add(base + offs_n.to(tl.int64) * dmn, tl.sum(ds, 0), mask=cols)
    else:
        tl.atomic_add(base + offs_m[:, None].to(tl.int64) * dmm + offs_n[None, :].to(tl.int64) * dmn, ds,
                      mask=rows[:, None] & cols[None, :])


@triton.jit
def _tile(base, offs, L, D, offs_d, dmask):
    """Pointers to rows offs of one head's contiguous (L, D) matrix at base, and the mask of the elements that
    exist. Pointers, not offsets: an offset tile shared by a load before a loop and a store after it would stay
    live across the loop (at D = 256 that spilled)."""
    return base + offs[:, None] * D + offs_d[None, :], (offs[:, None] < L) & dmask[None, :]


@triton.jit
def _load_tiles(X, Y, offs, L, D, offs_d, dmask, DY, offs_dy, dymask):
    """Rows offs of one head's contiguous (L, D) matrix at X and (L, DY) matrix at Y, zeros where they do not
    exist."""
    x, mask = _tile(X, offs, L, D, offs_d, dmask)
    y, ymask = _tile(Y, offs, L, DY, offs_dy, dymask)
    return tl.load(x, mask=mask, other=0.0), tl.load(y, mask=ymask, other=0.0)


@triton.jit
def _key_end(pid_m, Lk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """End of query block pid_m's walk over the keys: causal stops after the block's last query."""
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)
    return hi


@triton.jit
def _row_stats(ROW_MAX, LOGL, DELTA, bh, Lq, offs_m):
    """m, log(l) and delta of query rows offs_m (+inf, 0, 0 past Lq, so those rows get P = 0)."""
    rmask = offs_m < Lq
    return (tl.load(ROW_MAX + bh * Lq + offs_m, mask=rmask, other=float("inf")),
            tl.load(LOGL + bh * Lq + offs_m, mask=rmask, other=0.0),
            tl.load(DELTA + bh * Lq + offs_m, mask=rmask, other=0.0))


@triton.jit
def _attn_fwd(Q, K, V, O, ROW_MAX, LOGL, MASK, KPM, H, G, Lq, Lk, D, DV, q_sb, q_sh, k_sb, k_sh, v_sb, v_sh,
              scale, smb, smh, smm, smn, seed_lo, seed_hi, thresh, drop_scale,
              HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
              ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, GQA: tl.constexpr, EQUAL_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    # Spelled out rather than through _program / _tile / _key_end: fp32 at D = 256 sits at ptxas' edge, and the
    # helpers' order of the same operations made it spill or take more registers (kernels/aot.py; the counts:
    # docs/measurements.md, "Attention").
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    hk = h
    if GQA:
        hk = h // G  # the kv head this query head reads (grouped-query attention)
    if EQUAL_D:  # the common case, specialized: one set of head-dim offsets and masks (registers; kernels/aot.py)
        DV = D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_dv = tl.arange(0, BLOCK_DV)
    dvmask = offs_dv < DV
    q = tl.load(Q + b * q_sb + h * q_sh + offs_m[:, None] * D + offs_d[None, :],
                mask=(offs_m[:, None] < Lq) & dmask[None, :], other=0.0)
    k_base, v_base = K + b * k_sb + hk * k_sh, V + b * v_sb + hk * v_sh
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kv_mask = (offs_n[:, None] < Lk) & dmask[None, :]
        k = tl.load(k_base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _scores(q, k, offs_m, offs_n, b, h, Lq, Lk, scale, MASK, smb, smh, smm, smn, KPM,
                    HAS_MASK, HAS_KPM, CAUSAL, ACC, PREC, UPCAST)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing unmasked yet: exp(-inf - 0) = 0
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _keep(bh * Lq + offs_m, offs_n, seed_lo, seed_hi, thresh)
            p = tl.where(keep, p * drop_scale, 0.0)
        v = tl.load(v_base + offs_n[:, None] * DV + offs_dv[None, :],
                    mask=(offs_n[:, None] < Lk) & dvmask[None, :], other=0.0)
        acc = acc * alpha[:, None] + _mm(_to(p, v.dtype, UPCAST), v, ACC, PREC, UPCAST)
        m_i = m_new
    empty = l_i == 0.0
    # Every key masked: zeros, even where a value is inf/NaN (0 * inf in acc would be NaN).
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    rmask = offs_m < Lq
    tl.store(O + bh * Lq * DV + offs_m[:, None] * DV + offs_dv[None, :], _to(out, O.dtype.element_ty, UPCAST),
             mask=rmask[:, None] & dvmask[None, :])
    tl.store(ROW_MAX + bh * Lq + offs_m, tl.where(empty, float("inf"), m_i), mask=rmask)
    tl.store(LOGL + bh * Lq + offs_m, tl.log(tl.where(empty, 1.0, l_i)), mask=rmask)


@triton.jit
def _probs_and_dscores(q, k, v, do, m, logl, delta, offs_m, offs_n, bh, b, h, Lq, Lk, scale, MASK, smb, smh, smm,
                       smn, KPM, seed_lo, seed_hi, thresh, drop_scale,
                       HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
                       DROPOUT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                       UPCAST: tl.constexpr):
    """(Pd, dS) of one tile: the dropped probabilities (for dV) and the score gradient (for dQ, dK)."""
    s = _scores(q, k, offs_m, offs_n, b, h, Lq, Lk, scale, MASK, smb, smh, smm, smn, KPM,
                HAS_MASK, HAS_KPM, CAUSAL, ACC, PREC, UPCAST)
    p = tl.exp((s - m[:, None]) - logl[:, None])  # m = +inf on empty / out-of-range rows: p = 0
    dp = _mm(do, tl.trans(v), ACC, PREC, UPCAST)
    pd = p
    if DROPOUT:
        keep = _keep(bh * Lq + offs_m, offs_n, seed_lo, seed_hi, thresh)
        pd = tl.where(keep, p * drop_scale, 0.0)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    return pd, ds


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, ROW_MAX, LOGL, DELTA, DK, DV_, MASK, KPM, H, G, Lq, Lk, D, DV, q_sb, q_sh, k_sb, k_sh,
                   v_sb, v_sh, scale, smb, smh, smm, smn, seed_lo, seed_hi, thresh, drop_scale,
                   HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                   ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, GQA: tl.constexpr,
                   EQUAL_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    # One program per (key block, batch * kv head): it walks the G query heads that share the kv head (grouped-
    # query attention), so dK / dV sum over the group without atomics.
    if EQUAL_D:
        DV = D
    n_group = 1
    if GQA:
        n_group = G
    pid_n, offs_n, bhk, b, hk, offs_d, dmask, offs_dv, dvmask = _program(H // n_group, D, DV, BLOCK_N, BLOCK_D,
                                                                         BLOCK_DV)
    offs_m0 = tl.arange(0, BLOCK_M)
    k, v = _load_tiles(K + b * k_sb + hk * k_sh, V + b * v_sb + hk * v_sh, offs_n, Lk, D, offs_d, dmask, DV,
                       offs_dv, dvmask)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC)
    lo = 0
    if CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M  # queries before the block's first key see none of it
    for g in range(0, n_group):
        h = hk * n_group + g
        bh = b * H + h
        q_base, do_base = Q + b * q_sb + h * q_sh, DO + bh * Lq * DV
        for start_m in range(lo, Lq, BLOCK_M):
            offs_m = start_m + offs_m0
            q, do = _load_tiles(q_base, do_base, offs_m, Lq, D, offs_d, dmask, DV, offs_dv, dvmask)
            m, logl, delta = _row_stats(ROW_MAX, LOGL, DELTA, bh, Lq, offs_m)
            pd, ds = _probs_and_dscores(q, k, v, do, m, logl, delta, offs_m, offs_n, bh, b, h, Lq, Lk, scale, MASK,
                                        smb, smh, smm, smn, KPM, seed_lo, seed_hi, thresh, drop_scale,
                                        HAS_MASK, HAS_KPM, CAUSAL, DROPOUT, ACC, PREC, UPCAST)
            # Rows that attend nothing (m = +inf): dS = 0, where P (dP - delta) = 0 * inf if dO V overflows (the dQ
            # kernel zeroes those rows of dO once instead; here, per tile, that cost registers: spills at D = 128).
            ds = tl.where((m == float("inf"))[:, None], 0.0, ds)
            dv += _mm(tl.trans(_to(pd, do.dtype, UPCAST)), do, ACC, PREC, UPCAST)
            dk += _mm(tl.trans(_to(ds, q.dtype, UPCAST)), q, ACC, PREC, UPCAST)
    dk_ptrs, k_mask = _tile(DK + bhk * Lk * D, offs_n, Lk, D, offs_d, dmask)
    tl.store(dk_ptrs, _to(dk * scale, DK.dtype.element_ty, UPCAST), mask=k_mask)
    dv_ptrs, v_mask = _tile(DV_ + bhk * Lk * DV, offs_n, Lk, DV, offs_dv, dvmask)
    tl.store(dv_ptrs, _to(dv, DV_.dtype.element_ty, UPCAST), mask=v_mask)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, ROW_MAX, LOGL, DELTA, DQ, DMASK, MASK, KPM, H, G, Lq, Lk, D, DV, q_sb, q_sh, k_sb,
                 k_sh, v_sb, v_sh, scale, smb, smh, smm, smn, dmb, dmh, dmm, dmn, seed_lo, seed_hi, thresh,
                 drop_scale,
                 HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                 ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, GQA: tl.constexpr,
                 EQUAL_D: tl.constexpr, MASK_GRAD: tl.constexpr, DM_SUM_M: tl.constexpr, DM_SUM_N: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    # Also the mask's gradient (MASK_GRAD): dS tile by tile, added atomically into DMASK (the mask's own shape).
    if EQUAL_D:
        DV = D
    pid_m, offs_m, bh, b, h, offs_d, dmask, offs_dv, dvmask = _program(H, D, DV, BLOCK_M, BLOCK_D, BLOCK_DV)
    hk = h
    if GQA:
        hk = h // G
    offs_n0 = tl.arange(0, BLOCK_N)
    q, do = _load_tiles(Q + b * q_sb + h * q_sh, DO + bh * Lq * DV, offs_m, Lq, D, offs_d, dmask, DV, offs_dv,
                        dvmask)
    m, logl, delta = _row_stats(ROW_MAX, LOGL, DELTA, bh, Lq, offs_m)
    # Rows that attend nothing (m = +inf): dO zeroed, so dS = 0 there (P (dP - delta) = 0 * inf if dO V overflows).
    do = tl.where((m == float("inf"))[:, None], 0.0, do).to(do.dtype)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    k_base, v_base = K + b * k_sb + hk * k_sh, V + b * v_sb + hk * v_sh
    for start_n in range(0, _key_end(pid_m, Lk, CAUSAL, BLOCK_M), BLOCK_N):
        offs_n = start_n + offs_n0
        k, v = _load_tiles(k_base, v_base, offs_n, Lk, D, offs_d, dmask, DV, offs_dv, dvmask)
        _, ds = _probs_and_dscores(q, k, v, do, m, logl, delta, offs_m, offs_n, bh, b, h, Lq, Lk, scale, MASK,
                                   smb, smh, smm, smn, KPM, seed_lo, seed_hi, thresh, drop_scale,
                                   HAS_MASK, HAS_KPM, CAUSAL, DROPOUT, ACC, PREC, UPCAST)
        if MASK_GRAD:
            _add_dmask(DMASK, ds, b, h, offs_m, offs_n, Lq, Lk, dmb, dmh, dmm, dmn, DM_SUM_M, DM_SUM_N)
        dq += _mm(_to(ds, k.dtype, UPCAST), k, ACC, PREC, UPCAST)
    dq_ptrs, q_mask = _tile(DQ + bh * Lq * D, offs_m, Lq, D, offs_d, dmask)
    tl.store(dq_ptrs, _to(dq * scale, DQ.dtype.element_ty, UPCAST), mask=q_mask)


# ---- launchers ----------------------------------------------------------------------------------------------

def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise go through TF32 tensor cores (10-bit mantissa); keep them exact.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _blocks(d: int, dtype: torch.dtype, backward: bool, heavy: bool) -> dict:
    """Tile sizes. ``heavy``: masks or dropout, whose [BLOCK_M, BLOCK_N] offsets and hashes need registers too.
    Chosen so that no bf16/fp16/float32 variant spills on sm_90 (kernels/aot.py checks). float32 (exact FMA dots,
    not tensor cores) and float64 take small tiles, and at D=256 no software pipelining (num_stages=1): the
    prefetched tiles of the default 3 stages spilled in dK/dV. float32 D=256 backward takes 4 warps and the plain
    half-precision D=256 forward 32 x 64 tiles: 8 warps and 64 x 32 tiles spilled once the saved statistics became
    the pair (m, log l). ptxas' counts: docs/measurements.md, "Attention"."""
    block_d = max(16, triton.next_power_of_2(d))
    if _INTERPRET:
        # The interpreter's cost is per operation, not per element: big tiles, few iterations.
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=block_d, num_warps=4)
    num_warps = 8 if block_d >= 64 else 4
    if dtype in (torch.float32, torch.float64):
        bm, bn = (32, 32) if block_d <= 32 else (16, 16)
        if block_d >= 256:
            return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=4 if backward else num_warps,
                        num_stages=1)
    elif not backward:
        bm, bn = (64, 64) if block_d <= 128 else ((32, 32) if heavy else (32, 64))
    elif block_d <= 64:
        bm, bn = (32, 64) if heavy else (64, 64)
    elif block_d <= 128:
        bm, bn = (32, 32) if heavy else (32, 64)
    else:
        bm, bn = (16, 16) if heavy else (32, 32)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=num_warps)


def _dropout_args(dropout_p: float, seed: int) -> dict:
    # Halves kept below 2**31 (SEED_MASK; fastnn.ops.attention draws seeds that way) so both are typed int32.
    seed_lo, seed_hi = seed_halves(seed & SEED_MASK)
    return dict(seed_lo=seed_lo, seed_hi=seed_hi, thresh=dropout_threshold(dropout_p),
                drop_scale=1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0)


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
    kpm = key_padding_mask.contiguous().view(torch.uint8) if key_padding_mask is not None else q
    heavy = attn_mask is not None or key_padding_mask is not None or dropout_p > 0
    (q_sb, q_sh), (k_sb, k_sh), (v_sb, v_sh) = _bstrides(q), _bstrides(k), _bstrides(v)
    return dict(MASK=mask, KPM=kpm, H=H, G=H // Hk, Lq=Lq, Lk=Lk, D=D, DV=DV, q_sb=q_sb, q_sh=q_sh, k_sb=k_sb,
                k_sh=k_sh, v_sb=v_sb, v_sh=v_sh, scale=scale,
                **dict(zip(("smb", "smh", "smm", "smn"), strides)), **_dropout_args(dropout_p, seed),
                HAS_MASK=attn_mask is not None, HAS_KPM=key_padding_mask is not None, CAUSAL=bool(is_causal),
                DROPOUT=dropout_p > 0, ACC=_acc(dtype), PREC=_prec(dtype),
                UPCAST=_INTERPRET and dtype == torch.bfloat16, GQA=Hk != H, EQUAL_D=D == DV,
                **_head_blocks(D, DV, dtype, backward, heavy))


def _head_blocks(d: int, dv: int, dtype: torch.dtype, backward: bool, heavy: bool) -> dict:
    """_blocks' tiles for the larger head dim, with BLOCK_D (query / key) and BLOCK_DV (value) each padded from
    their own dim."""
    cfg = _blocks(max(d, dv), dtype, backward, heavy)
    cfg["BLOCK_D"] = max(16, triton.next_power_of_2(d))
    cfg["BLOCK_DV"] = max(16, triton.next_power_of_2(dv))
    return cfg


def _mask_grad_warps(cfg: dict) -> dict:
    """The dQ kernel's config when it also sums the mask's gradient: float32 / float64 at head dim 256 (4 warps)
    spilled 32 B there with the atomics' addresses live, 8 warps do not (kernels/aot.py)."""
    if cfg["PREC"] == "ieee" and cfg["BLOCK_D"] >= 256:
        return {**cfg, "num_warps": 8}
    return cfg


def attention_forward(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed):
    """q (B, H, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv), H a multiple of Hk, read through batch / head
    strides; attn_mask additive in the accumulation dtype, 4-d, each dim 1 or (B, H, Lq, Lk)'s (any strides), or
    None; key_padding_mask (B, Lk) bool or None.
    Returns (out (B, H, Lq, Dv) in q's dtype, stats (2, B, H, Lq) float32 / float64: each row's max score m and
    log of its sum of exp(s - m))."""
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
    _attn_fwd[(triton.cdiv(Lq, args["BLOCK_M"]), B * H)](q, k, v, out, stats[0], stats[1], **args)
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
    dq = q.new_empty((B, H, Lq, D))
    dk, dv = q.new_empty((B, Hk, Lk, D)), q.new_empty((B, Hk, Lk, v.shape[3]))
    dmask = torch.zeros(attn_mask.shape if mask_grad else (0,), dtype=acc, device=q.device)
    if Lq == 0 or Lk == 0 or B * H == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dmask
    delta = (do.to(acc) * out.to(acc)).sum(-1).contiguous()
    m, logl = stats[0].contiguous(), stats[1].contiguous()
    args = _launch_args(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, backward=True)
    _attn_bwd_dkdv[(triton.cdiv(Lk, args["BLOCK_N"]), B * Hk)](q, k, v, do, m, logl, delta, dk, dv, **args)
    dm_strides = _bstrides(dmask, range(4)) if mask_grad else (0, 0, 0, 0)
    _attn_bwd_dq[(triton.cdiv(Lq, args["BLOCK_M"]), B * H)](
        q, k, v, do, m, logl, delta, dq, dmask if mask_grad else q, **(_mask_grad_warps(args) if mask_grad else args),
        **dict(zip(("dmb", "dmh", "dmm", "dmn"), dm_strides)), MASK_GRAD=mask_grad,
        DM_SUM_M=mask_grad and attn_mask.shape[2] == 1, DM_SUM_N=mask_grad and attn_mask.shape[3] == 1)
    return dq, dk, dv, dmask


def _aot_specs():
    """Representative sm_90 compilations: bf16/fp32, head dims 64/128/256, causal + masks + dropout (+ the mask's
    gradient in dQ: the heaviest variant, most registers) and the plain variant."""
    scalars = {"H": "i32", "G": "i32", "Lq": "i32", "Lk": "i32", "D": "i32", "DV": "i32", "q_sb": "i64",
               "q_sh": "i64", "k_sb": "i64", "k_sh": "i64", "v_sb": "i64", "v_sh": "i64", "scale": "fp32",
               "smb": "i64", "smh": "i64", "smm": "i64", "smn": "i64", "dmb": "i64", "dmh": "i64", "dmm": "i64",
               "dmn": "i64", "seed_lo": "i32", "seed_hi": "i32", "thresh": "i32", "drop_scale": "fp32"}
    tdt = {torch.bfloat16: "bf16", torch.float32: "fp32"}  # fp16 compiles to bf16's code with another MMA type
    for dtype, name in tdt.items():
        for d in (64, 128, 256):
            for heavy in (False, True):
                flags = dict(HAS_MASK=heavy, HAS_KPM=heavy, CAUSAL=heavy, DROPOUT=heavy, ACC=tl.float32,
                             PREC=_prec(dtype), UPCAST=False, GQA=heavy, EQUAL_D=True)
                for backward, kernel, ptrs in (
                        (False, _attn_fwd, ("Q", "K", "V", "O")),
                        (True, _attn_bwd_dkdv, ("Q", "K", "V", "DO", "DK", "DV_")),
                        (True, _attn_bwd_dq, ("Q", "K", "V", "DO", "DQ"))):
                    cfg = _head_blocks(d, d, dtype, backward, heavy)
                    if kernel is _attn_bwd_dq and heavy:  # MASK_GRAD below
                        cfg = {k: v for k, v in _mask_grad_warps({**cfg, "PREC": _prec(dtype)}).items() if k != "PREC"}
                    options = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
                    sig = {p: f"*{name}" for p in ptrs}
                    sig.update({"ROW_MAX": "*fp32", "LOGL": "*fp32", "MASK": "*fp32", "KPM": "*u8",
                                "DMASK": "*fp32"})
                    if backward:
                        sig["DELTA"] = "*fp32"
                    sig.update(scalars)
                    # the signature must follow the kernel's argument order
                    order = [a for a in kernel.arg_names if a in sig]
                    extra = {}
                    if kernel is _attn_bwd_dq:
                        extra = dict(MASK_GRAD=heavy, DM_SUM_M=False, DM_SUM_N=False)
                    yield kernel, {a: sig[a] for a in order}, {**flags, **extra, **cfg}, options


AOT = _aot_specs
