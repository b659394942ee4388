"""Plain-PyTorch ground truth of every fastnn op, written from the definitions with elementary tensor ops (not
the fused torch kernels fastnn is compared with). Tests run it in float64 or float32; autograd differentiates it.
Half-precision inputs are computed in float32 and cast back, as the fused kernels do (BCE: float64, see there)."""
from __future__ import annotations

import torch

from .kernels.dropout import COL_MUL, FMIX_MUL1, FMIX_MUL2, KEEP_BITS, ROW_MUL, dropout_threshold, seed_halves

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
    elements ("mean" of nothing is NaN). Computed in float64 (for every input dtype but float64): at |x| ~ 3e38
    the terms and their gradients' products with weight and pos_weight overflow float32 where the result fits,
    and which one overflows depends on how the formula is grouped."""
    x, y = input.double(), target.double()
    # Both branches of each `where` are finite, and autograd's derivative at x = 0 is the true -1/2 (abs and
    # clamp would give a one-sided subgradient there).
    pos = x >= 0
    softplus_neg = torch.log1p(torch.exp(torch.where(pos, -x, x))) - torch.where(pos, torch.zeros_like(x), x)
    log_weight = 1 if pos_weight is None else 1 + (pos_weight.double() - 1) * y
    loss = (1 - y) * x + log_weight * softplus_neg
    if weight is not None:
        loss = loss * weight.double()
    if reduction == "mean":
        loss = loss.sum() / loss.numel()
    elif reduction == "sum":
        loss = loss.sum()
    return loss.to(input.dtype)


# ---- LSTM (gate order i, f, g, o, as torch.nn.LSTMCell)

def lstm_cell_gates(gates: torch.Tensor, bias: torch.Tensor | None, c: torch.Tensor):
    """The part of an LSTM step after the matrix products: gates [B, 4H] (+ bias [4H]), c [B, H] -> (h', c')."""
    z = _upcast(gates) if bias is None else _upcast(gates) + _upcast(bias)
    i, f, g, o = z.chunk(4, dim=-1)
    # torch.sigmoid, not 1 / (1 + exp(-x)): that form's gradient is inf / inf = NaN once exp(-x) overflows.
    i, f, o = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o)
    g = torch.tanh(g)
    c_new = f * _upcast(c) + i * g
    h_new = o * torch.tanh(c_new)
    return h_new.to(gates.dtype), c_new.to(gates.dtype)


def lstm_cell(input: torch.Tensor, hx, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih=None, b_hh=None):
    """One LSTM step: input [B, I], hx = (h, c) [B, H] each, w_ih [4H, I], w_hh [4H, H] -> (h', c')."""
    h, c = hx
    gates = _upcast(input) @ _upcast(w_ih).t() + _upcast(h) @ _upcast(w_hh).t()
    bias = None
    for b in (b_ih, b_hh):
        if b is not None:
            bias = _upcast(b) if bias is None else bias + _upcast(b)
    h_new, c_new = lstm_cell_gates(gates, bias, _upcast(c))
    return h_new.to(input.dtype), c_new.to(input.dtype)


# ---- cross_entropy / linear_cross_entropy (losses helper) BEGIN ----------------------------------------------------

def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """torch.nn.functional.cross_entropy from log_softmax, gather and sums. input (N, C, d...) or (C,); target
    class indices (N, d...) / () or probabilities of input's shape. Smoothing mixes (1 - eps) of the target loss
    with eps / C of the all-class loss; a weighted or ignoring "mean" divides both by the summed weight of the
    non-ignored targets (all ignored: 0 / 0 = NaN), probability targets by the number of rows."""
    x = _upcast(input)
    cdim = 1 if x.dim() > 1 else 0
    C = x.shape[cdim]
    logp = log_softmax(x, cdim)
    shape = [1] * x.dim()
    shape[cdim] = C
    w = _upcast(weight).reshape(shape) if weight is not None else torch.ones(shape, dtype=x.dtype, device=x.device)
    eps = label_smoothing
    if target.is_floating_point():
        y = _upcast(target) * (1 - eps) + eps / C
        per = -(logp * y * w).sum(cdim)
        denom = per.numel()
    else:
        valid = target != ignore_index
        t = torch.where(valid, target, 0)
        wt = torch.where(valid, w.reshape(C)[t], 0)
        nll = -wt * logp.gather(cdim, t.unsqueeze(cdim)).squeeze(cdim)
        smooth = -(logp * w).sum(cdim)
        # Without smoothing the all-class term is left out, not multiplied by 0: a -inf logit makes it inf.
        per = torch.where(valid, (1 - eps) * nll + eps / C * smooth if eps else nll, 0)
        denom = wt.sum()
    if reduction == "none":
        out = per
    elif reduction == "sum":
        out = per.sum()
    else:
        out = per.sum() / denom
    return out.to(input.dtype)


def linear_cross_entropy(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor, *,
                         linear_bias: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                         reduction: str = "mean", ignore_index: int | None = None,
                         label_smoothing: float = 0.0) -> torch.Tensor:
    """torch.nn.functional.linear_cross_entropy's reference path: cross_entropy(linear(input), target) with the
    logits materialized in input's dtype. input (..., D); linear_weight (C, D) or (C, d1, ..., dK, D) for a
    K-dimensional loss (then input (N, D)), linear_bias its shape without D; weight: per-class loss weights (C,);
    target class indices (..., d1, ..., dK) or probabilities of the logits' shape (..., C, d1, ..., dK);
    ignore_index None means -100."""
    C, out_features = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    w2 = linear_weight.reshape(linear_weight.shape[:-1].numel(), linear_weight.shape[-1])  # (C * d1 * ... * dK, D)
    logits = _upcast(input) @ _upcast(w2).T
    if linear_bias is not None:
        logits = logits + _upcast(linear_bias).reshape(-1)
    # The logits rounded to input's dtype, as torch's and the fused kernels' chunks hold them (float16 logits past
    # 65504 are inf there too).
    logits = logits.to(input.dtype)
    batch = input.shape[:-1]
    rows = batch.numel()  # not -1: ambiguous for C = 0
    if target.is_floating_point():  # probabilities: the loss in the promoted dtype, as torch
        logits = logits.to(torch.promote_types(input.dtype, target.dtype))
        target = target.reshape(rows, C, *out_features)
    else:
        target = target.reshape(rows, *out_features)
    # (rows, C, d1, ..., dK): the class dimension second, as cross_entropy takes it.
    out = cross_entropy(logits.reshape(rows, C, *out_features), target, weight,
                        -100 if ignore_index is None else ignore_index, reduction, label_smoothing)
    return out.reshape((*batch, *out_features)) if reduction == "none" else out

# ---- cross_entropy / linear_cross_entropy (losses helper) END ------------------------------------------------------


# ---- attention ----

_M32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    # (h * c) mod 2**32 for 0 <= h < 2**32 without overflowing int64: multiply the 16-bit halves separately.
    return ((h & 0xFFFF) * c + ((((h >> 16) * c) & _M32) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, FMIX_MUL1)
    h = h ^ (h >> 13)
    h = _mul32(h, FMIX_MUL2)
    return h ^ (h >> 16)


def dropout_keep(seed: int, rows: torch.Tensor, cols: torch.Tensor, p: float) -> torch.Tensor:
    """The dropout mask every attention backend regenerates (forward and backward) instead of storing it.

    Element (row, col) of the flattened (B*H*Lq, Lk) probability matrix is kept when the top 24 bits of a hash of
    (seed, row, col) are >= round(p * 2**24). The hash is murmur3's 32-bit finalizer applied twice, written with
    32-bit wrap-around arithmetic so that C++, CUDA, Triton and this function agree bit for bit (its constants:
    fastnn.kernels.dropout).
    """
    rows, cols = torch.broadcast_tensors(rows.long(), cols.long())
    lo, hi = seed_halves(seed)
    x = (_mul32(rows & _M32, ROW_MUL) + _mul32(cols & _M32, COL_MUL) + lo) & _M32
    x = _fmix32(_fmix32(x) ^ hi)
    return (x >> (32 - KEEP_BITS)) >= dropout_threshold(p)


def _share_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Key or value (B, Hk, L, D) for `heads` query heads: grouped-query attention (query head h reads head
    h // (heads / Hk), torch's enable_gqa) when Hk divides heads; otherwise as is (broadcast or equal)."""
    hk = x.shape[-3]
    return x.repeat_interleave(heads // hk, dim=-3) if 1 < hk < heads and heads % hk == 0 else x


def attention_probs(query, key, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, key_padding_mask=None,
                    seed=0):
    """The attention matrix softmax(q k^T * scale + masks), dropout applied, of shape (B, H, Lq, Lk) in the
    compute dtype; arguments as ``scaled_dot_product_attention`` (4-d only). Fully masked rows are zero."""
    q, k = _upcast(query), _share_heads(_upcast(key), query.shape[-3])
    Lq, D = q.shape[-2:]
    Lk = k.shape[-2]
    scale = D ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    B, H = s.shape[:2]  # broadcast batch and heads
    neg = float("-inf")
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        s = s.masked_fill(~attn_mask, neg)
    elif attn_mask is not None:
        # A -inf entry masks its key whatever the score: inf + -inf would be NaN where the score overflowed.
        add = attn_mask.to(s.dtype)
        s = torch.where(add == neg, neg, s + add)
    if key_padding_mask is not None:
        s = s.masked_fill(key_padding_mask[:, None, None, :], neg)
    if is_causal:
        s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool, device=s.device).triu(1), neg)
    m = s.amax(-1, keepdim=True).detach() if Lk else s.new_zeros(s.shape[:-1] + (1,))  # no keys: zeros out
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

    query (B, H, Lq, D) or (H, Lq, D); key (..., Lk, D); value (..., Lk, Dv); batch and head dims broadcast, and a
    key / value with Hk heads, 1 < Hk < H dividing H, is shared by groups of H / Hk query heads (torch's
    enable_gqa). attn_mask bool (True = attend) or additive, broadcastable to (B, H, Lq, Lk); key_padding_mask
    (B, Lk) bool, True = pad; causal keeps j <= i (top-left, as torch). A row with nothing left to attend gives
    zeros (as torch 2.13's CPU SDPA). Dropout uses ``dropout_keep`` (rows numbered over (B, H, Lq) of the
    broadcast result). Differentiable in every tensor argument, a float attn_mask included.
    """
    unbatched = query.dim() == 3
    q, k, v = query, key, value
    if unbatched:
        q, k, v = q[None], k[None], v[None]
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[None]
    p = attention_probs(q, k, attn_mask, dropout_p, is_causal, scale, key_padding_mask, seed)
    out = p @ _share_heads(_upcast(v), p.shape[-3])
    # A row with nothing to attend is zeros even where a value is inf/NaN (0 * inf would be NaN).
    out = torch.where((p != 0).any(-1, keepdim=True), out, torch.zeros((), dtype=out.dtype)).to(query.dtype)
    return out[0] if unbatched else out
