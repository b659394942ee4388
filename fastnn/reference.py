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


# ---- attention (issue 4) -------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    # (h * c) mod 2**32 for 0 <= h < 2**32 without overflowing int64: multiply the 16-bit halves separately.
    return ((h & 0xFFFF) * c + ((((h >> 16) * c) & _M32) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def dropout_keep(seed: int, rows: torch.Tensor, cols: torch.Tensor, p: float) -> torch.Tensor:
    """The dropout mask every attention backend regenerates (forward and backward) instead of storing it.

    Element (row, col) of the flattened (B*H*Lq, Lk) probability matrix is kept when the top 24 bits of a hash of
    (seed, row, col) are >= round(p * 2**24). The hash is murmur3's 32-bit finalizer applied twice, written with
    32-bit wrap-around arithmetic so that C++, CUDA, Triton and this function agree bit for bit.
    """
    rows, cols = torch.broadcast_tensors(rows.long(), cols.long())
    lo, hi = seed & _M32, (seed >> 32) & _M32
    x = (_mul32(rows & _M32, 0x9E3779B1) + _mul32(cols & _M32, 0x85EBCA77) + lo) & _M32
    x = _fmix32(_fmix32(x) ^ hi)
    return (x >> 8) >= dropout_threshold(p)


def dropout_threshold(p: float) -> int:
    return min(1 << 24, int(round(p * (1 << 24))))


def attention_probs(query, key, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, key_padding_mask=None,
                    seed=0):
    """The attention matrix softmax(q k^T * scale + masks), dropout applied, of shape (B, H, Lq, Lk) in the
    compute dtype; arguments as ``scaled_dot_product_attention`` (4-d only). Fully masked rows are zero."""
    q, k = _upcast(query), _upcast(key)
    B, H, Lq, D = q.shape
    Lk = k.shape[-2]
    scale = D ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    neg = float("-inf")
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, neg) if attn_mask.dtype == torch.bool else s + attn_mask.to(s.dtype)
    if key_padding_mask is not None:
        s = s.masked_fill(key_padding_mask[:, None, None, :], neg)
    if is_causal:
        s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool, device=s.device).triu(1), neg)
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(m == neg, torch.zeros_like(m), m)
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    if dropout_p > 0:
        rows = torch.arange(B * H * Lq, device=s.device).view(B, H, Lq, 1)
        keep = dropout_keep(seed, rows, torch.arange(Lk, device=s.device), dropout_p)
        p = torch.where(keep, p / (1 - dropout_p), torch.zeros_like(p)) if dropout_p < 1 else torch.zeros_like(p)
    return p


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 key_padding_mask=None, seed=0):
    """softmax(q k^T * scale + mask) v, with the masks of fastnn.functional.scaled_dot_product_attention.

    query (B, H, Lq, D) or (H, Lq, D); key/value (..., Lk, D); attn_mask bool (True = attend) or additive,
    broadcastable to (B, H, Lq, Lk); key_padding_mask (B, Lk) bool, True = pad; causal keeps j <= i (top-left,
    as torch). A row with nothing left to attend gives zeros (torch: NaN). Dropout uses ``dropout_keep``.
    """
    unbatched = query.dim() == 3
    q, k, v = query, key, value
    if unbatched:
        q, k, v = q[None], k[None], v[None]
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[None]
    p = attention_probs(q, k, attn_mask, dropout_p, is_causal, scale, key_padding_mask, seed)
    out = (p @ _upcast(v)).to(query.dtype)
    return out[0] if unbatched else out
