"""scaled dot-product attention: custom ops ``fastnn::attention_fwd`` / ``attention_bwd`` (C++ CPU, CUDA) and
their ``_triton`` twins, with one fake and one autograd formula. The backward saves q, k, v (the inputs), the
output and the per-row statistics (max score, log-sum) - nothing of size Lq x Lk - and regenerates dropout from
a seed; a float attn_mask that requires grad gets d(mask) from the same backward call (mask_grad). Grouped-query
key/value heads, a value head dim other than the query's and broadcast batch dims go to the kernels as they are
(stride-0 views, not copies). Also what ``fastnn.nn.MultiheadAttention`` computes around the op: its masks in the op's convention and
the path that returns the attention weights."""
from __future__ import annotations

import warnings

import torch

from .. import reference
from .._validation import FLOATING, check_same_device, check_tensor
from ..backend import resolve
from ..kernels.dropout import SEED_MASK
from .registry import Triton, register_op

FN = "scaled_dot_product_attention"
MAX_HEAD_DIM = 256
_FORWARD = {"native": torch.ops.fastnn.attention_fwd, "triton": torch.ops.fastnn.attention_fwd_triton}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _draw_seed(dropout_p: float) -> int:
    """The dropout hash's seed (0 without dropout): drawn below 2**62 from torch's default CPU generator, so that
    torch.manual_seed makes dropout reproducible, then masked by SEED_MASK (kernels/dropout.py says why)."""
    return int(torch.randint(0, 2 ** 62, (1,)).item()) & SEED_MASK if dropout_p > 0 else 0


def _additive_mask(attn_mask, full_shape, acc, unbatched):
    """attn_mask (bool: True = attend, or additive float) as a 4-d additive mask in ``acc`` of its own shape
    (size 1 along the dims it broadcasts over), which the kernels broadcast to the 4-d ``full_shape`` by strides:
    only a mask that already is Lq x Lk costs Lq x Lk memory, and its gradient has the mask's own shape."""
    check_tensor(attn_mask, "attn_mask", dtypes=FLOATING + (torch.bool,), fn=FN)
    target = full_shape[1:] if unbatched else full_shape
    try:
        if attn_mask.dim() > len(target) or torch.broadcast_shapes(attn_mask.shape, target) != tuple(target):
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"{FN}: attn_mask of shape {tuple(attn_mask.shape)} is not broadcastable to "
                         f"{'(H, Lq, Lk)' if unbatched else '(B, H, Lq, Lk)'} = {tuple(target)}") from None
    if attn_mask.dtype == torch.bool:
        mask = torch.zeros(attn_mask.shape, dtype=acc, device=attn_mask.device)
        mask.masked_fill_(~attn_mask, float("-inf"))
    else:
        mask = attn_mask.to(acc)
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def _broadcast(sizes, what: str, hint: str = "") -> int:
    try:
        return torch.broadcast_shapes(*((s,) for s in sizes))[0]
    except RuntimeError:
        raise ValueError(f"{FN}: the {what} of query, key and value ({', '.join(map(str, sizes))}) do not "
                         f"broadcast{hint}") from None


def _kv_heads(k, v, H: int, enable_gqa: bool):
    """(k, v, Hk): key and value with one head count Hk for the kernels, H a multiple of it. Grouped-query
    (enable_gqa): query head h reads key head h // (H / key heads) and value head h // (H / value heads), as
    torch's repeat_interleave; without it heads broadcast. A single kv head is shared by all query heads
    without copying (Hk = 1); unequal key and value head counts (rare) are repeated to a common one."""
    Hk, Hv = k.shape[1], v.shape[1]
    if enable_gqa:
        if min(Hk, Hv) < 1 or H % Hk or H % Hv:
            raise ValueError(f"{FN}: with enable_gqa the number of query heads ({H}) must be a multiple of the "
                             f"key's ({Hk}) and the value's ({Hv})")
        if Hk == Hv:
            return k, v, Hk
        hkv = max(Hk, Hv) if max(Hk, Hv) % min(Hk, Hv) == 0 else H
    else:
        hkv = 1 if Hk == Hv == 1 else H
    k, v = (t if t.shape[1] in (1, hkv) else t.repeat_interleave(hkv // t.shape[1], dim=1) for t in (k, v))
    return k, v, hkv


_warned_head_dim = False


def _head_dims_fit(D: int, Dv: int) -> bool:
    """Whether the fused kernels take head dims D (query / key) and Dv (value): both in [1, MAX_HEAD_DIM]. Larger
    ones run on the reference path (unfused: Lq x Lk memory), with a warning the first time."""
    global _warned_head_dim
    if max(D, Dv) <= MAX_HEAD_DIM:
        return True
    if not _warned_head_dim:
        _warned_head_dim = True
        warnings.warn(f"{FN}: head dims (query/key {D}, value {Dv}) above the fused kernels' {MAX_HEAD_DIM} run on "
                      "fastnn's reference path (plain PyTorch, attention matrix materialized); warned once",
                      stacklevel=4)
    return False


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, key_padding_mask=None, backend=None):
    """See ``fastnn.functional.scaled_dot_product_attention``."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(t, name, ndim=(3, 4), fn=FN)
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"{FN}: query, key and value must have the same dtype, got {query.dtype}, {key.dtype} and "
                        f"{value.dtype}")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"{FN}: enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    check_same_device(FN, query=query, key=key, value=value, attn_mask=attn_mask, key_padding_mask=key_padding_mask)
    # 3-d operands are one batch; the result has the most dims of the three (as torch's broadcasting)
    unbatched = max(query.dim(), key.dim(), value.dim()) == 3
    q, k, v = (t.unsqueeze(0) if t.dim() == 3 else t for t in (query, key, value))
    Lq, D = q.shape[2:]
    Lk, Dv = v.shape[2:]
    if k.shape[3] != D:
        raise ValueError(f"{FN}: key must have query's head dim {D}: expected (..., Lk, {D}), got query "
                         f"{tuple(query.shape)} and key {tuple(key.shape)}")
    if k.shape[2] != Lk:
        raise ValueError(f"{FN}: value must have key's length Lk = {k.shape[2]}: expected (..., {k.shape[2]}, Dv), "
                         f"got key {tuple(key.shape)} and value {tuple(value.shape)}")
    if min(D, Dv) < 1:
        raise ValueError(f"{FN}: head dims (query's and value's last dims) must be at least 1, got {D} and {Dv}")
    B = _broadcast([t.shape[0] for t in (q, k, v)], "batch sizes")
    if enable_gqa:
        H = q.shape[1]
    else:
        H = _broadcast([t.shape[1] for t in (q, k, v)], "head counts",
                       " (enable_gqa=True shares key/value heads among query heads)")
    k, v, Hk = _kv_heads(k, v, H, enable_gqa)
    # Broadcast batch / head dims become stride-0 views, read in place by the kernels; autograd sums the gradients.
    q, k, v = q.expand(B, H, Lq, D), k.expand(B, Hk, Lk, D), v.expand(B, Hk, Lk, Dv)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{FN}: dropout_p must be a float in [0, 1], got {dropout_p!r}")
    if scale is None:
        scale = D ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{FN}: scale must be a float or None, got {type(scale).__name__}")
    acc = _acc_dtype(q.dtype)
    mask = None
    if attn_mask is not None:
        mask = _additive_mask(attn_mask, (B, H, Lq, Lk), acc, unbatched)
    kpm = None
    if key_padding_mask is not None:
        check_tensor(key_padding_mask, "key_padding_mask", dtypes=(torch.bool,), fn=FN)
        want = (Lk,) if unbatched else (B, Lk)
        if tuple(key_padding_mask.shape) != want:
            raise ValueError(f"{FN}: key_padding_mask must have shape {'(Lk,)' if unbatched else '(B, Lk)'} = "
                             f"{want}, got {tuple(key_padding_mask.shape)}")
        kpm = key_padding_mask.reshape(B, Lk)
    b = resolve(torch.ops.fastnn.attention_fwd, backend, q, k, v, mask, kpm)
    if not _head_dims_fit(D, Dv):
        b = "reference"
    seed = _draw_seed(dropout_p)
    if b == "reference":
        out = reference.scaled_dot_product_attention(q, k, v, mask, float(dropout_p), bool(is_causal), float(scale),
                                                     kpm, seed)
    else:
        out, _ = _FORWARD[b](q, k, v, mask, kpm, float(dropout_p), bool(is_causal), float(scale), seed)
    return out[0] if unbatched else out


def multihead_attention_masks(attn_mask, key_padding_mask, num_heads: int, extra_keys: int, dtype: torch.dtype,
                              is_causal: bool = False):
    """``torch.nn.MultiheadAttention``'s masks as ``scaled_dot_product_attention`` takes them, for the (N, H, L, S')
    heads that MultiheadAttention builds, S' = S + extra_keys.

    attn_mask: (L, S) or (N * num_heads, L, S), bool with True = NOT allowed (torch's convention) or additive
    float, or None; dropped when ``is_causal`` (then only torch's hint for the in-kernel causal mask).
    key_padding_mask: (N, S), bool with True = ignore or additive float, or None. ``extra_keys`` keys appended
    after the S (bias_k, add_zero_attn) are always attended: both masks are padded for them.
    Returns (attn_mask, key_padding_mask): attn_mask bool with True = attend or additive in ``dtype``,
    broadcastable to (N, num_heads, L, S'), or None; key_padding_mask (N, S') bool or None, a float one being
    added to attn_mask instead."""
    pad = torch.nn.functional.pad
    mask = None
    if attn_mask is not None and not is_causal:
        if attn_mask.dim() == 3:
            attn_mask = attn_mask.reshape(attn_mask.shape[0] // num_heads, num_heads, *attn_mask.shape[1:])
        mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(dtype)
        if extra_keys:
            mask = pad(mask, (0, extra_keys), value=True if mask.dtype == torch.bool else 0.0)
    if key_padding_mask is None:
        return mask, None
    if extra_keys:
        key_padding_mask = pad(key_padding_mask, (0, extra_keys),
                               value=False if key_padding_mask.dtype == torch.bool else 0.0)
    if key_padding_mask.dtype == torch.bool:
        return mask, key_padding_mask
    add = key_padding_mask.to(dtype)[:, None, None, :]
    if mask is None:
        return add, None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask + add, None


def attention_with_weights(q, k, v, attn_mask, dropout_p: float, is_causal: bool, key_padding_mask):
    """(out, weights): attention that also returns its (B, H, Lq, Lk) probabilities (MultiheadAttention's
    need_weights=True), so the matrix is materialized and the output computed from it with plain matmuls - the
    slower path, kept apart from the fused kernel. q, k, v (B, H, L, D) and the masks as
    ``scaled_dot_product_attention`` takes them; the default scale; both results in q's dtype."""
    seed = _draw_seed(dropout_p)
    p = reference.attention_probs(q, k, attn_mask, dropout_p, is_causal, None, key_padding_mask, seed)
    return (p @ v.to(p.dtype)).to(q.dtype), p.to(q.dtype)


def _fake_fwd(query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed):
    # out (B, H, Lq, Dv); stats: (2, B, H, Lq), the row max and log-sum of the scores (kept apart, see
    # kernels/attention.py)
    return (query.new_empty(tuple(query.shape[:3]) + (value.shape[3],)),
            query.new_empty((2,) + tuple(query.shape[:3]), dtype=_acc_dtype(query.dtype)))


def _fake_bwd(grad_out, query, key, value, out, stats, attn_mask, key_padding_mask, dropout_p, is_causal, scale,
              seed, mask_grad):
    dmask = attn_mask.new_empty(attn_mask.shape) if mask_grad else query.new_empty((0,), dtype=_acc_dtype(query.dtype))
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape), dmask


def _setup_context(ctx, inputs, output):
    q, k, v, mask, kpm, ctx.dropout_p, ctx.is_causal, ctx.scale, ctx.seed = inputs
    out, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(q, k, v, out, stats, mask, kpm)


def _backward(ctx, grads, bwd_op):
    q, k, v, out, stats, mask, kpm = ctx.saved_tensors
    mask_grad = mask is not None and ctx.needs_input_grad[3]  # a learned bias (T5, ALiBi slopes)
    dq, dk, dv, dmask = bwd_op(grads[0], q, k, v, out, stats, mask, kpm, ctx.dropout_p, ctx.is_causal, ctx.scale,
                               ctx.seed, mask_grad)
    return dq, dk, dv, dmask if mask_grad else None, None, None, None, None, None


def _triton_fwd(*args):
    from ..kernels.attention import attention_forward

    return attention_forward(*args)


def _triton_bwd(*args):
    from ..kernels.attention import attention_backward

    return attention_backward(*args)


register_op(torch.ops.fastnn.attention_fwd, torch.ops.fastnn.attention_bwd, fake_fwd=_fake_fwd, fake_bwd=_fake_bwd,
            setup_context=_setup_context, backward=_backward,
            triton=Triton(torch.ops.fastnn.attention_fwd_triton, torch.ops.fastnn.attention_bwd_triton, _triton_fwd,
                          _triton_bwd))
