"""Attention dropout's hash: the constants and threshold every backend uses to regenerate the same mask.

Element (row, col) of the flattened (B*H*Lq, Lk) probability matrix is kept when the top KEEP_BITS bits of
x = fmix32(fmix32(row * ROW_MUL + col * COL_MUL + seed_lo) ^ seed_hi) reach dropout_threshold(p), all in 32-bit
wrap-around arithmetic; fmix32 is murmur3's finalizer (multipliers FMIX_MUL1, FMIX_MUL2). fastnn.reference and
the Triton kernels (kernels/attention.py) import these; csrc/attention.h spells the same numbers in C++.

No Triton here: fastnn.reference imports this module, and CPU-only installs run without Triton.
"""
from __future__ import annotations

ROW_MUL = 0x9E3779B1
COL_MUL = 0x85EBCA77
FMIX_MUL1 = 0x85EBCA6B
FMIX_MUL2 = 0xC2B2AE35
KEEP_BITS = 24
# Applied to every seed: bit 31 of each 32-bit half cleared, so that Triton types both halves as int32 (a half of
# 2**31 or more it types as uint32, which its interpreter mishandles).
SEED_MASK = 0x7FFFFFFF7FFFFFFF


def dropout_threshold(p: float) -> int:
    """round(p * 2**KEEP_BITS) (half to even, as C++'s nearbyint), at most 2**KEEP_BITS: every element dropped
    at p = 1."""
    return min(1 << KEEP_BITS, int(round(p * (1 << KEEP_BITS))))


def seed_halves(seed: int) -> tuple[int, int]:
    """(low, high) 32-bit halves of a 64-bit seed: the hash's seed_lo and seed_hi."""
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
