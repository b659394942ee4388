"""scaled_dot_product_attention through every backend against fastnn.reference in float64, forward and backward;
masks, dropout, gradcheck, opcheck, torch.compile, bad inputs, and the MultiheadAttention modules."""
import pytest
import torch
import torch.nn.functional as TF

import fastnn
import fastnn.functional as F
from fastnn.ops.attention import _additive_mask
from helpers import assert_matches, assert_raises_naming, device_backends, flash_cancel_floor, flash_delta_bound, \
    max_err, run_cuda_emulator

BACKENDS = device_backends("attention")
CPU_BACKENDS = [p.values[1] for p in BACKENDS if p.values[0] == "cpu"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

SHAPES = [  # (B, H, Lq, Lk, D)
    (2, 3, 113, 203, 59),   # cross-attention, both lengths ragged, odd head dim: every tile edge is partial
    (1, 2, 1, 1, 80),       # L = 1: one key, softmax is exactly 1
    (1, 1, 1025, 1025, 16),  # one past a power of two: the last query and key blocks hold one row
    (2, 2, 64, 64, 96),     # exact tiles, non-power-of-two D padded to 128
    (1, 2, 7, 97, 48),      # fewer queries than one tile, many keys
    (1, 1, 203, 113, 256),  # Lq > Lk, the largest head dim
]


def _qkv(B, H, Lq, Lk, D, dtype, device="cpu"):
    make = lambda L: torch.randn(B, H, L, D, dtype=torch.float64, device=device).to(dtype)  # noqa: E731
    return make(Lq), make(Lk), make(Lk)


def _run(fn, q, k, v, g, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), g)
    return (out.detach(),) + grads


def _eager(q, k, v, is_causal=False):
    """torch eager in the input dtype, as a model would write it (matmul -> softmax -> matmul, all in that dtype):
    the yardstick of the low-precision rule. (torch's fused CPU SDPA computes bf16/fp16 in float32 throughout, so
    it is not what a kernel that feeds P and dS to its matmuls in bf16 - as every GPU flash kernel does - is
    held to.)"""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def _check(ours, ref, theirs=None):
    for name, a, r, t in zip(("output", "dq", "dk", "dv"), ours, ref, theirs or (None,) * 4):
        assert a.dtype == (t.dtype if t is not None else a.dtype)
        assert_matches(a, r, torch_out=t, name=name)


def _torch_mask(B, H, Lq, Lk, attn_mask, key_padding_mask, is_causal, device="cpu"):
    """All masks merged into one bool (True = attend) for torch's SDPA, which takes neither key_padding_mask nor
    attn_mask together with is_causal."""
    keep = torch.ones(B, H, Lq, Lk, dtype=torch.bool, device=device)
    if attn_mask is not None:
        keep = keep & (attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf"))
    if key_padding_mask is not None:
        keep = keep & ~key_padding_mask[:, None, None, :]
    if is_causal:
        keep = keep & torch.ones(Lq, Lk, dtype=torch.bool, device=device).tril()
    return keep


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_matches_reference(device, backend, shape, dtype, is_causal):
    if backend == "triton" and shape[2] * shape[3] > 200_000 and dtype != torch.float32:
        pytest.skip("interpreter time: L=1025 runs once, in float32")
    B, H, Lq, Lk, D = shape
    q, k, v = _qkv(B, H, Lq, Lk, D, dtype, device)
    g = torch.randn(B, H, Lq, D, dtype=torch.float64, device=device).to(dtype)
    ref = _run(fastnn.reference.scaled_dot_product_attention, q.double(), k.double(), v.double(), g.double(),
               is_causal=is_causal)
    ours = _run(F.scaled_dot_product_attention, q, k, v, g, is_causal=is_causal, backend=backend)
    theirs = None
    if dtype in (torch.float16, torch.bfloat16):
        theirs = _run(_eager, q, k, v, g, is_causal=is_causal)
    _check(ours, ref, theirs)
    assert ours[0].is_contiguous() and ours[0].shape == (B, H, Lq, D)


MASKS = {
    "none": lambda B, H, Lq, Lk: None,
    "bool_2d": lambda B, H, Lq, Lk: torch.rand(Lq, Lk) > 0.3,              # one mask shared by all heads
    "float_per_key": lambda B, H, Lq, Lk: torch.randn(B, 1, 1, Lk),        # broadcast over heads and queries
    "float_full": lambda B, H, Lq, Lk: torch.randn(B, H, Lq, Lk).masked_fill(torch.rand(B, H, Lq, Lk) < 0.2,
                                                                             float("-inf")),
    "bool_per_head": lambda B, H, Lq, Lk: torch.rand(H, 1, Lk) > 0.5,      # (H, 1, Lk): broadcast over B, Lq
}


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[0] == "cpu"])
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("kpm", [False, True], ids=["", "kpm"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["", "causal"])
def test_mask_combinations(device, backend, mask, kpm, is_causal):
    B, H, Lq, Lk, D = 2, 2, 37, 45, 24
    q, k, v = _qkv(B, H, Lq, Lk, D, torch.float32)
    g = torch.randn(B, H, Lq, D)
    attn_mask = MASKS[mask](B, H, Lq, Lk)
    key_padding_mask = None
    if kpm:
        key_padding_mask = torch.rand(B, Lk) < 0.3
        key_padding_mask[1] = True  # batch 1 pads everything: every one of its rows is fully masked
    kw = dict(attn_mask=attn_mask, is_causal=is_causal, key_padding_mask=key_padding_mask)
    ref = _run(fastnn.reference.scaled_dot_product_attention, q.double(), k.double(), v.double(), g.double(), **kw)
    ours = _run(F.scaled_dot_product_attention, q, k, v, g, backend=backend, **kw)
    _check(ours, ref)
    # Where torch's SDPA is defined (rows with something to attend), the reference agrees with it.
    keep = _torch_mask(B, H, Lq, Lk, attn_mask, key_padding_mask, is_causal)
    live = keep.any(-1)
    additive = attn_mask if (attn_mask is not None and attn_mask.dtype != torch.bool) else None
    t_mask = torch.zeros(B, H, Lq, Lk, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    if additive is not None:
        t_mask = t_mask + additive.double().masked_fill(~keep, 0).expand(B, H, Lq, Lk)
    t_out = TF.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=t_mask)
    torch.testing.assert_close(ref[0][live], t_out[live])
    # Fully masked rows: zeros out and no gradient into q (torch gives NaN there).
    assert (ours[0][~live] == 0).all() and (ours[1][~live] == 0).all()
    if kpm:
        assert (ours[2][1] == 0).all() and (ours[3][1] == 0).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qk,vmax", [(100.0, 1.0), (1.0, 6e4)], ids=["scores_1e4", "values_6e4"])
def test_large_scores_and_values_near_the_dtype_max(device, backend, dtype, qk, vmax):
    # Numerical robustness. scores_1e4: q, k ~ 100 N(0, 1) give scores spread over ~1e4 (exp overflows without the
    # running max, and the saved row statistics must not lose log l to ulp(m)). values_6e4: values up to 6e4
    # (float16's largest finite is 65504). Outputs finite; every error at most 2x torch's own in that dtype, plus
    # for dQ / dK a few float32 ulps of the terms dS = P (dP - delta) cancels (|dO| |v| sqrt(D)), times |q|, |k|
    # and the scale (torch's error there is 0 or not by luck of order), and in half precision FlashAttention's
    # delta-from-the-rounded-output error (tests/helpers.py).
    gen = torch.Generator().manual_seed(7)
    B, H, L, D = 1, 2, 37, 16
    q, k = (qk * torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) for _ in range(2))
    v = vmax * (2 * torch.rand(B, H, L, D, generator=gen, dtype=torch.float64) - 1)
    g = torch.randn(B, H, L, D, generator=gen, dtype=torch.float64)
    q, k, v, g = (t.to(dtype).to(device) for t in (q, k, v, g))
    ref = _run(fastnn.reference.scaled_dot_product_attention, q.double(), k.double(), v.double(), g.double())
    ours = _run(F.scaled_dot_product_attention, q, k, v, g, backend=backend)
    theirs = _run(TF.scaled_dot_product_attention, q, k, v, g)
    assert ours[0].isfinite().all()
    scale, acc = D ** -0.5, torch.float64 if dtype == torch.float64 else torch.float32
    for name, a, r, t in zip(("output", "q", "k", "v"), ours, ref, theirs):
        err, err_t = max_err(a, r), max_err(t, r)
        bound = 2 * err_t + 1e-6 * r.abs().max().item()
        if name in ("q", "k"):
            other = (k if name == "q" else q).double().abs().max().item()
            bound += flash_cancel_floor(acc, scale, D, other, vmax, g.double().abs().max().item())
            bound += flash_delta_bound(name, q, k, v, g, dtype, scale)
        assert err <= bound, f"{name}: error {err:.3g} > 2 x torch's {err_t:.3g} (bound {bound:.3g})"


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[0] == "cpu"])
def test_unbatched_3d(device, backend):
    H, Lq, Lk, D = 3, 17, 29, 40
    q, k, v = (torch.randn(H, L, D) for L in (Lq, Lk, Lk))
    kpm = torch.rand(Lk) < 0.3
    mask = torch.rand(Lq, Lk) > 0.2
    g = torch.randn(H, Lq, D)
    kw = dict(attn_mask=mask, key_padding_mask=kpm, is_causal=True)
    ref = _run(fastnn.reference.scaled_dot_product_attention, q.double(), k.double(), v.double(), g.double(), **kw)
    ours = _run(F.scaled_dot_product_attention, q, k, v, g, backend=backend, **kw)
    _check(ours, ref)
    batched = F.scaled_dot_product_attention(q[None], k[None], v[None], backend=backend, attn_mask=mask,
                                             key_padding_mask=kpm[None], is_causal=True)
    torch.testing.assert_close(ours[0], batched[0])


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[0] == "cpu"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_scale_and_reference_vs_torch(device, backend, scale):
    q, k, v = _qkv(2, 2, 30, 50, 32, torch.float64)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=True, backend=backend)
    torch.testing.assert_close(out, TF.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=True))


# ---- torch 2.13 parity: value head dim, grouped-query attention, broadcast batch dims, the mask's gradient ----

def _leaves(*ts):
    return [t.detach().clone().requires_grad_() if t is not None and t.is_floating_point() else t for t in ts]


def _grads(fn, q, k, v, mask, g, device="cpu", **kw):
    """(output, dq, dk, dv[, dmask]) of fn(q, k, v, attn_mask=mask, **kw) with fresh leaves on ``device``,
    returned on the CPU."""
    q, k, v, mask, g = (None if t is None else t.to(device) for t in (q, k, v, mask, g))
    if "key_padding_mask" in kw:
        kw["key_padding_mask"] = kw["key_padding_mask"].to(device)
    q, k, v, mask = _leaves(q, k, v, mask)
    out = fn(q, k, v, attn_mask=mask, **kw)
    leaves = [q, k, v] + ([mask] if mask is not None and mask.is_floating_point() else [])
    return tuple(t.cpu() for t in (out.detach(),) + torch.autograd.grad(out, leaves, g))


PARITY = {  # name: (query, key, value shapes, attn_mask shape or None, enable_gqa)
    "course_dk128_dv256": ((1, 30, 128), (1, 50, 128), (1, 50, 256), None, False),  # n_Q=30, n_K=n_V=50
    "dv_ne_dk_batched": ((2, 3, 7, 59), (2, 3, 97, 59), (2, 3, 97, 24), (7, 97), False),
    "gqa_4_on_2": ((2, 4, 7, 16), (2, 2, 9, 16), (2, 2, 9, 33), (1, 4, 7, 9), True),
    "mqa_6_on_1": ((1, 6, 13, 8), (1, 1, 13, 8), (1, 1, 13, 8), (1, 1, 1, 13), True),
    "gqa_key_value_heads_differ": ((2, 4, 5, 8), (2, 1, 6, 8), (2, 2, 6, 8), None, True),
    "heads_broadcast": ((2, 3, 5, 8), (2, 1, 6, 8), (2, 1, 6, 8), (2, 1, 1, 6), False),
    "batch_broadcast_kv": ((3, 2, 7, 16), (1, 2, 11, 16), (1, 2, 11, 16), (3, 1, 1, 11), False),
    "batch_broadcast_q": ((1, 2, 7, 16), (3, 2, 11, 16), (3, 2, 11, 16), (7, 11), False),
    "mixed_3d_4d": ((2, 7, 16), (3, 2, 11, 16), (3, 2, 11, 5), (2, 7, 1), False),
}


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("case", list(PARITY))
def test_parity_with_torch_sdpa(device, backend, case):
    """Shapes torch 2.13's SDPA accepts that fastnn refused: Dv != D, enable_gqa, broadcast batch / head dims,
    mixed 3-d / 4-d; with a float mask that requires grad. Output and every gradient against torch's own
    autograd, float64."""
    qs, ks, vs, ms, gqa = PARITY[case]
    q, k, v = (torch.randn(s, dtype=torch.float64) for s in (qs, ks, vs))
    mask = torch.randn(ms, dtype=torch.float64) if ms is not None else None
    theirs_out = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    g = torch.randn_like(theirs_out)
    theirs = _grads(TF.scaled_dot_product_attention, q, k, v, mask, g, enable_gqa=gqa)
    ours = _grads(F.scaled_dot_product_attention, q, k, v, mask, g, device, enable_gqa=gqa, backend=backend)
    for name, a, t in zip(("output", "dq", "dk", "dv", "dmask"), ours, theirs):
        assert a.shape == t.shape, name
        torch.testing.assert_close(a, t, msg=name)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("mask_shape", [(37, 45), (1, 3, 37, 45), (2, 1, 1, 45), (3, 37, 1), (2, 3, 37, 45)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("extra", ["", "causal_kpm_dropout"])
def test_mask_gradient(device, backend, mask_shape, extra):
    """d(loss)/d(attn_mask) for a learned float bias, summed over the dims it broadcasts over: against torch's
    autograd through its SDPA, and with causal + key padding + dropout against fastnn's reference (the same
    dropout mask), whose autograd has the math of torch's."""
    B, H, Lq, Lk, D = 2, 3, 37, 45, 24
    q, k, v = _qkv(B, H, Lq, Lk, D, torch.float32)
    mask = torch.randn(mask_shape)
    g = torch.randn(B, H, Lq, D)
    if not extra:
        ours = _grads(F.scaled_dot_product_attention, q, k, v, mask, g, device, backend=backend)
        theirs = _grads(TF.scaled_dot_product_attention, q.double(), k.double(), v.double(), mask.double(),
                        g.double())
    else:
        kpm = torch.rand(B, Lk) < 0.2
        kpm[1] = True  # batch 1 attends nothing: zero gradients there
        kw = dict(is_causal=True, key_padding_mask=kpm, dropout_p=0.3)
        torch.manual_seed(11)
        ours = _grads(F.scaled_dot_product_attention, q, k, v, mask, g, device, backend=backend, **kw)
        torch.manual_seed(11)
        theirs = _grads(F.scaled_dot_product_attention, q.double(), k.double(), v.double(), mask.double(),
                        g.double(), backend="reference", **kw)
    assert ours[4].shape == mask.shape
    for name, a, t in zip(("output", "dq", "dk", "dv"), ours, theirs):
        assert_matches(a, t, name=name)
    # Each score gradient P (dP - delta) cancels terms of |dP| ~ 5 (exactly, for a row with one key), and dmask
    # sums n of them per element (over keys: a sum that is exactly 0, softmax being shift-invariant, so only
    # rounding is left): float32's absolute error grows with n.
    n = B * H * Lq * Lk // mask.numel()
    torch.testing.assert_close(ours[4], theirs[4].float(), rtol=1e-5, atol=5e-6 * n)


def test_large_head_dim_runs_on_the_reference_path(monkeypatch):
    import fastnn.ops.attention as attn

    monkeypatch.setattr(attn, "_warned_head_dim", False)
    q, k, v = (torch.randn(2, 2, L, 300, dtype=torch.float64) for L in (5, 7, 7))
    mask = torch.randn(5, 7, dtype=torch.float64)
    g = torch.randn(2, 2, 5, 300, dtype=torch.float64)
    with pytest.warns(UserWarning, match="reference path"):
        ours = _grads(F.scaled_dot_product_attention, q, k, v, mask, g)
    theirs = _grads(TF.scaled_dot_product_attention, q, k, v, mask, g)
    for a, t in zip(ours, theirs):
        torch.testing.assert_close(a, t)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        F.scaled_dot_product_attention(q[..., :8], k[..., :8], v)  # value head dim 300 alone takes it too


def test_new_arguments_keep_their_positions():
    # torch 2.13's order: (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) (torch takes the
    # last two by keyword only; fastnn also positionally); fastnn's key_padding_mask and backend are keyword-only.
    import inspect

    params = inspect.signature(F.scaled_dot_product_attention).parameters
    assert list(params)[:8] == ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    assert params["key_padding_mask"].kind is inspect.Parameter.KEYWORD_ONLY
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, None, 0.0, False, None, True),
                               TF.scaled_dot_product_attention(q, k, v, None, 0.0, False, scale=None,
                                                               enable_gqa=True))


def test_broadcast_mask_is_not_materialized():
    # The op takes the mask at its own shape (size 1 along broadcast dims); the kernels broadcast by strides.
    m = _additive_mask(torch.rand(45) > 0.5, (2, 3, 37, 45), torch.float32, unbatched=False)
    assert m.shape == (1, 1, 1, 45) and m.untyped_storage().nbytes() == 45 * 4
    m = _additive_mask(torch.randn(2, 1, 1, 45), (2, 3, 37, 45), torch.float32, unbatched=False)
    assert m.shape == (2, 1, 1, 45) and m.untyped_storage().nbytes() == 2 * 45 * 4


# ---- dropout -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[0] == "cpu"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_statistics(device, backend, p):
    # q = 0 makes attention uniform (1 / Lk) and v = I exposes each kept/dropped probability in the output.
    B, H, Lq, Lk = 2, 2, 256, 128
    q = torch.zeros(B, H, Lq, Lk)
    k = torch.randn(B, H, Lk, Lk)
    v = torch.eye(Lk).expand(B, H, Lk, Lk).contiguous()
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend)
    kept = out != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.01
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (Lk * (1 - p))))
    # no correlation along rows or columns: every row and column keeps about 1-p
    assert (kept.float().mean(-1) - (1 - p)).abs().max() < 0.2
    assert (kept.float().mean(-2) - (1 - p)).abs().max() < 0.15


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[0] == "cpu"])
def test_dropout_matches_reference_and_is_reproducible(device, backend):
    B, H, Lq, Lk, D = 2, 2, 33, 70, 24
    q, k, v = _qkv(B, H, Lq, Lk, D, torch.float32)
    g = torch.randn(B, H, Lq, D)
    kw = dict(dropout_p=0.3, is_causal=True, key_padding_mask=torch.rand(B, Lk) < 0.2)
    torch.manual_seed(7)
    ours = _run(F.scaled_dot_product_attention, q, k, v, g, backend=backend, **kw)
    torch.manual_seed(7)  # same seed drawn -> the reference regenerates the very same mask
    ref = _run(F.scaled_dot_product_attention, q.double(), k.double(), v.double(), g.double(), backend="reference",
               **kw)
    _check(ours, ref)
    torch.manual_seed(7)
    again = _run(F.scaled_dot_product_attention, q, k, v, g, backend=backend, **kw)
    assert all(torch.equal(a, b) for a, b in zip(ours, again))
    other = F.scaled_dot_product_attention(q, k, v, backend=backend, **kw)  # next seed: another mask
    assert not torch.equal(other, ours[0])


def test_dropout_one_gives_zeros():
    q, k, v = _qkv(1, 1, 5, 6, 8, torch.float32)
    assert (F.scaled_dot_product_attention(q, k, v, dropout_p=1.0) == 0).all()


# ---- autograd machinery --------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["plain", "masks", "dropout", "gqa_dv_mask_grad"])
def test_gradcheck(backend, case):
    B, H, Lq, Lk, D = 1, 2, 5, 7, 6
    q, k, v = (t.requires_grad_() for t in _qkv(B, H, Lq, Lk, D, torch.float64))
    kw = {}
    if case == "gqa_dv_mask_grad":  # 2 query heads on 1 kv head, value head dim 3, learned (Lq, Lk) bias, dropout
        k, v = k[:, :1].detach().requires_grad_(), torch.randn(B, 1, Lk, 3, dtype=torch.float64, requires_grad=True)
        mask = torch.randn(Lq, Lk, dtype=torch.float64, requires_grad=True)

        def fn(q, k, v, mask):
            torch.manual_seed(3)
            return F.scaled_dot_product_attention(q, k, v, mask, 0.3, True, None, True, backend=backend)

        assert torch.autograd.gradcheck(fn, (q, k, v, mask), fast_mode=backend == "triton")
        return
    if case == "masks":
        kw = dict(attn_mask=torch.randn(Lq, Lk), is_causal=True, key_padding_mask=torch.tensor([[0, 1, 0, 0, 0, 1, 0]]).bool())
    if case == "dropout":
        kw = dict(dropout_p=0.4)
    fast = backend == "triton"  # the interpreter is slow: a random-direction gradcheck there

    def fn(q, k, v):
        torch.manual_seed(3)  # the same dropout mask on every evaluation
        return F.scaled_dot_product_attention(q, k, v, backend=backend, **kw)

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=fast)


@pytest.mark.parametrize("suffix", ["", "_triton"])
@pytest.mark.parametrize("case", ["plain", "masks_dropout", "gqa_dv_mask_grad"])
def test_opcheck(suffix, case):
    if suffix and "triton" not in CPU_BACKENDS:
        pytest.skip("no Triton on CPU here")
    if not suffix and "native" not in CPU_BACKENDS:
        pytest.skip("no native CPU kernel")
    B, H, Lq, Lk, D = 2, 2, 9, 13, 16
    q, k, v = (t.requires_grad_() for t in _qkv(B, H, Lq, Lk, D, torch.float32))
    mask = kpm = None
    p, causal = 0.0, False
    if case == "masks_dropout":
        mask = _additive_mask(torch.rand(Lq, Lk) > 0.2, (B, H, Lq, Lk), torch.float32, False)
        kpm = torch.rand(B, Lk) < 0.2
        p, causal = 0.25, True
    if case == "gqa_dv_mask_grad":  # 4 query heads on 2 kv heads, value head dim 24, a learned (H, 1, Lk) bias
        k, v = k[:, :1].expand(B, 2, Lk, D), torch.randn(B, 2, Lk, 24)
        q = torch.randn(B, 4, Lq, D)
        mask = torch.randn(1, 4, 1, Lk, requires_grad=True)
    fwd = getattr(torch.ops.fastnn, "attention_fwd" + suffix)
    bwd = getattr(torch.ops.fastnn, "attention_bwd" + suffix)
    args = (q, k, v, mask, kpm, p, causal, 0.25, 12345)
    torch.library.opcheck(fwd, args)
    out, stats = fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    d = lambda t: t.detach() if t is not None else None  # noqa: E731
    torch.library.opcheck(bwd, (torch.randn_like(out), d(q), d(k), d(v), out, stats, d(mask), kpm, p, causal, 0.25,
                                12345, case == "gqa_dv_mask_grad"))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_torch_compile_fullgraph(device, backend):
    kpm = torch.zeros(2, 19, dtype=torch.bool, device=device)
    kpm[0, -4:] = True

    def f(q, k, v):
        return F.scaled_dot_product_attention(q * 2, k, v, is_causal=True, key_padding_mask=kpm, backend=backend)

    q, k, v = (t.requires_grad_() for t in _qkv(2, 3, 11, 19, 32, torch.float32, device))
    out = torch.compile(f, fullgraph=True)(q, k, v)
    _check_compiled(f, out, q, k, v)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_torch_compile_fullgraph_gqa_mask_grad(device, backend):
    bias = torch.randn(1, 4, 11, 19, device=device, requires_grad=True)  # a learned relative-position bias

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, bias, enable_gqa=True, backend=backend)

    q = torch.randn(2, 4, 11, 32, device=device, requires_grad=True)
    k, v = (torch.randn(2, 2, 19, d, device=device, requires_grad=True) for d in (32, 48))
    out = torch.compile(f, fullgraph=True)(q, k, v)
    _check_compiled(f, out, q, k, v, bias)


def _check_compiled(f, out, *leaves):
    grads = torch.autograd.grad(out.sum(), leaves)
    expected = f(*leaves[:3])
    torch.testing.assert_close(out, expected)
    for a, b in zip(grads, torch.autograd.grad(expected.sum(), leaves)):
        torch.testing.assert_close(a, b)


# ---- errors ----------------------------------------------------------------------------------------------------

def _t(*shape, dtype=torch.float32):
    return torch.randn(shape).to(dtype)


@pytest.mark.parametrize("call,exc,words", [
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 4, 8), _t(2, 3, 5, 8), _t(2, 3, 5, 8, dtype=torch.float64)),
     TypeError, ["same dtype"]),
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 4, 8).long(), _t(2, 3, 5, 8), _t(2, 3, 5, 8)), TypeError,
     ["query", "int64"]),
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 4, 8), _t(3, 3, 5, 8), _t(3, 3, 5, 8)), ValueError,
     ["batch", "broadcast"]),
    (lambda: F.scaled_dot_product_attention(_t(2, 4, 4, 8), _t(2, 2, 5, 8), _t(2, 2, 5, 8)), ValueError,
     ["head", "enable_gqa"]),
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 4, 8), _t(2, 2, 5, 8), _t(2, 2, 5, 8), enable_gqa=True),
     ValueError, ["enable_gqa", "multiple"]),
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 4, 8), _t(2, 3, 5, 8), _t(2, 3, 5, 8), enable_gqa=1), TypeError,
     ["enable_gqa"]),
    (lambda: F.scaled_dot_product_attention(_t(4, 8), _t(5, 8), _t(5, 8)), ValueError, ["query", "dimensional"]),
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 4, 8), _t(2, 3, 5, 7), _t(2, 3, 5, 7)), ValueError,
     ["key", "head dim"]),
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 4, 8), _t(2, 3, 5, 8), _t(2, 3, 6, 8)), ValueError,
     ["value", "length"]),
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 4, 0), _t(2, 3, 5, 0), _t(2, 3, 5, 8)), ValueError,
     ["head dims", "at least 1"]),
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 4, 8), _t(2, 3, 5, 8), _t(2, 3, 5, 8), attn_mask=_t(4, 4)),
     ValueError, ["attn_mask", "broadcastable"]),
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 4, 8), _t(2, 3, 5, 8), _t(2, 3, 5, 8),
                                            attn_mask=torch.ones(4, 5, dtype=torch.int32)), TypeError, ["attn_mask"]),
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 4, 8), _t(2, 3, 5, 8), _t(2, 3, 5, 8),
                                            key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), ValueError,
     ["key_padding_mask", "(B, Lk)"]),
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 4, 8), _t(2, 3, 5, 8), _t(2, 3, 5, 8),
                                            key_padding_mask=torch.zeros(2, 5)), TypeError, ["key_padding_mask", "bool"]),
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 4, 8), _t(2, 3, 5, 8), _t(2, 3, 5, 8), dropout_p=1.5),
     ValueError, ["dropout_p"]),
    (lambda: F.scaled_dot_product_attention(_t(2, 3, 4, 8), _t(2, 3, 5, 8), _t(2, 3, 5, 8), scale="x"), TypeError,
     ["scale"]),
    (lambda: torch.ops.fastnn.attention_fwd(_t(2, 3, 4, 8), _t(2, 3, 5, 8), _t(2, 3, 6, 8), None, None, 0.0, False,
                                            1.0, 0), RuntimeError, ["value"]),
    (lambda: torch.ops.fastnn.attention_fwd(_t(2, 3, 4, 8), _t(2, 3, 5, 8), _t(2, 3, 5, 8), _t(2, 3, 4, 4), None,
                                            0.0, False, 1.0, 0), RuntimeError, ["attn_mask"]),
])
def test_bad_input_raises_clear_error(call, exc, words):
    assert_raises_naming(call, exc, words)


# ---- modules ---------------------------------------------------------------------------------------------------

MHA_CONFIGS = [  # constructor kwargs beyond (embed_dim=16, num_heads=4)
    dict(),
    dict(batch_first=True),
    dict(kdim=12, vdim=20),                        # separate q/k/v projection weights
    dict(bias=False, batch_first=True),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True, add_bias_kv=True, batch_first=True),
]


def _mha_inputs(cfg, N=3, L=7, S=9, unbatched=False):
    E = 16
    shape = lambda n, d: ((n, d) if unbatched else ((N, n, d) if cfg.get("batch_first") else (n, N, d)))  # noqa
    q = torch.randn(shape(L, E), dtype=torch.float64)
    k = torch.randn(shape(S, cfg.get("kdim", E)), dtype=torch.float64)
    v = torch.randn(shape(S, cfg.get("vdim", E)), dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("cfg", MHA_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("masks", ["none", "kpm_bool+mask_bool", "kpm_float+mask_3d_float", "causal"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_matches_torch(cfg, masks, need_weights):
    theirs = torch.nn.MultiheadAttention(16, 4, dtype=torch.float64, **cfg).eval()
    with torch.no_grad():  # non-zero biases, so a bias mix-up shows
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = fastnn.nn.MultiheadAttention(16, 4, dtype=torch.float64, **cfg).eval()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    q, k, v = _mha_inputs(cfg)
    N, L, S = 3, 7, 9
    kw = {}
    if masks == "kpm_bool+mask_bool":
        kpm = torch.rand(N, S) < 0.3
        kpm[:, 0] = False  # keep every row attending something: torch gives NaN otherwise
        kw = dict(key_padding_mask=kpm, attn_mask=torch.eye(L, S, dtype=torch.bool))  # True = not allowed
    elif masks == "kpm_float+mask_3d_float":
        kw = dict(key_padding_mask=torch.randn(N, S, dtype=torch.float64),
                  attn_mask=torch.randn(N * 4, L, S, dtype=torch.float64))
    elif masks == "causal":
        kw = dict(attn_mask=torch.ones(L, S, dtype=torch.bool).triu(1), is_causal=True)
    args = [t.requires_grad_() for t in (q, k, v)]
    out, w = ours(*args, need_weights=need_weights, **kw)
    t_out, t_w = theirs(*args, need_weights=need_weights, **kw)
    torch.testing.assert_close(out, t_out)
    if need_weights:
        torch.testing.assert_close(w, t_w)
    else:
        assert w is None and t_w is None
    g = torch.randn_like(out)
    ours_g = torch.autograd.grad(out, args + list(ours.parameters()), g)
    theirs_g = torch.autograd.grad(t_out, args + list(theirs.parameters()), g)
    for a, b in zip(ours_g, theirs_g):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shared", [
    "self",    # query is key is value: one GEMM for all three projections
    "kv",      # key is value (encoder-decoder attention): one GEMM for keys and values
])
@pytest.mark.parametrize("bias", [True, False])
def test_multihead_attention_shared_inputs(shared, bias):
    theirs = torch.nn.MultiheadAttention(16, 4, bias=bias, dtype=torch.float64).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = fastnn.nn.MultiheadAttention(16, 4, bias=bias, dtype=torch.float64).eval()
    ours.load_state_dict(theirs.state_dict())
    q, k, _ = _mha_inputs({})
    q.requires_grad_()
    k.requires_grad_()
    args = (q, q, q) if shared == "self" else (q, k, k)
    out = ours(*args, need_weights=False)[0]
    t_out = theirs(*args, need_weights=False)[0]
    torch.testing.assert_close(out, t_out)
    g = torch.randn_like(out)
    leaves = [q] + ([] if shared == "self" else [k])
    for a, b in zip(torch.autograd.grad(out, leaves + list(ours.parameters()), g),
                    torch.autograd.grad(t_out, leaves + list(theirs.parameters()), g)):
        torch.testing.assert_close(a, b)


def test_multihead_attention_unbatched_and_per_head_weights():
    theirs = torch.nn.MultiheadAttention(16, 4, dtype=torch.float64).eval()
    ours = fastnn.nn.MultiheadAttention.from_torch(theirs)
    q, k, v = _mha_inputs({}, unbatched=True)
    for nw, avg in ((False, True), (True, False)):
        out, w = ours(q, k, v, need_weights=nw, average_attn_weights=avg)
        t_out, t_w = theirs(q, k, v, need_weights=nw, average_attn_weights=avg)
        torch.testing.assert_close(out, t_out)
        if nw:
            assert w.shape == (4, 7, 9)
            torch.testing.assert_close(w, t_w)


def test_multihead_attention_dropout_and_fully_masked():
    m = fastnn.nn.MultiheadAttention(16, 4, dropout=0.5, batch_first=True)
    x = torch.randn(2, 6, 16)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1] = True  # batch 1 has nothing to attend to
    torch.manual_seed(5)
    a, _ = m(x, x, x, key_padding_mask=kpm, need_weights=False)
    torch.manual_seed(5)
    b, _ = m(x, x, x, key_padding_mask=kpm, need_weights=False)
    assert torch.equal(a, b)
    m.eval()
    c, _ = m(x, x, x, key_padding_mask=kpm, need_weights=False)
    assert not torch.equal(a, c)
    # all-padded batch: attention output 0, so the result is out_proj's bias for every position
    torch.testing.assert_close(c[1], m.out_proj.bias.expand(6, 16))


def test_patch_swaps_multihead_attention(capsys):
    model = torch.nn.Sequential(torch.nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0,
                                                                 batch_first=True)).eval()
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    expected = mha(x, x, x, need_weights=False)[0]
    twin = fastnn.patch(mha)
    assert type(twin) is fastnn.nn.MultiheadAttention and not twin.training
    torch.testing.assert_close(twin(x, x, x, need_weights=False)[0], expected)
    assert torch.nn.MultiheadAttention in fastnn.nn.PATCHABLE


def test_multi_head_self_attention_matches_unfused_layer():
    torch.manual_seed(0)
    m = fastnn.nn.MultiHeadSelfAttention(num_heads=4, hidden_size=32).double()
    x = torch.randn(2, 11, 32, dtype=torch.float64, requires_grad=True)

    def unfused(x):  # matmul -> softmax -> matmul, written out
        B, L, _ = x.shape
        heads = lambda t: t.view(B, L, 4, 8).transpose(1, 2)  # noqa: E731
        q, k, v = heads(m.query(x)), heads(m.key(x)), heads(m.value(x))
        p = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1)
        return m.dense((p @ v).transpose(1, 2).reshape(B, L, 32))

    out, expected = m(x), unfused(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0])
    with pytest.raises(ValueError, match="hidden_size"):
        fastnn.nn.MultiHeadSelfAttention(3, 32)


# ---- native CUDA backend: float16 / bfloat16 forward on tensor cores, large grids (cuda-marked) ----------------
# The tensor-core kernel's output and row statistics, and the gradients the backward computes from them, against
# the float64 reference: errors within 2x torch eager's own in that dtype (FlashAttention's rule), dQ / dK also
# allowed the flash backward's documented floors (tests/helpers.py).

TC_DTYPES = [torch.float16, torch.bfloat16]


def _eager_masked(q, k, v, attn_mask=None, is_causal=False, key_padding_mask=None, dropout_p=0.0, seed=0,
                  scale=None):
    """torch eager in q's dtype (scores, softmax and both products), with every mask, dropout from fastnn's hash and
    grouped-query heads: the yardstick of the low-precision rule. Rows with nothing to attend are zeros (torch's
    softmax gives NaN there), with no gradient."""
    B, H, Lq = q.shape[:3]
    Lk = k.shape[2]
    k, v = (t.repeat_interleave(H // t.shape[1], 1) for t in (k, v))
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    keep = _torch_mask(B, H, Lq, Lk, attn_mask, key_padding_mask, is_causal, q.device)
    if attn_mask is not None and attn_mask.is_floating_point():
        s = s + attn_mask.to(s.dtype)
    live = keep.any(-1, keepdim=True)
    s = torch.where(live, s.masked_fill(~keep, float("-inf")), torch.zeros((), dtype=s.dtype, device=s.device))
    p = torch.where(live, torch.softmax(s, -1), torch.zeros((), dtype=s.dtype, device=s.device))
    if dropout_p:
        rows = torch.arange(B * H * Lq, device=q.device).view(B, H, Lq, 1)
        kept = fastnn.reference.dropout_keep(seed, rows, torch.arange(Lk, device=q.device), dropout_p)
        p = torch.where(kept, p / (1 - dropout_p), torch.zeros((), dtype=p.dtype, device=p.device))
    return p @ v


def _tc_case(dtype, B, H, Hk, Lq, Lk, D, Dv, attn_mask=None, key_padding_mask=None, is_causal=False, dropout_p=0.0,
             gen_seed=0, device="cuda"):
    """Native forward + backward in ``dtype`` on ``device`` vs the float64 reference (same dropout seed), bounded
    by torch eager's error in ``dtype``; a float attn_mask gets its gradient checked too."""
    gen = torch.Generator().manual_seed(gen_seed)
    q = torch.randn(B, H, Lq, D, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hk, Lk, D, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hk, Lk, Dv, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(B, H, Lq, Dv, generator=gen, dtype=torch.float64).to(dtype)
    kw = dict(is_causal=is_causal, dropout_p=dropout_p)
    if key_padding_mask is not None:
        kw["key_padding_mask"] = key_padding_mask
    gqa = dict(enable_gqa=True) if Hk != H else {}
    torch.manual_seed(1234)
    ours = _grads(F.scaled_dot_product_attention, q, k, v, attn_mask, g, device, backend="native", **kw, **gqa)
    torch.manual_seed(1234)
    ref = _grads(F.scaled_dot_product_attention, q.double(), k.double(), v.double(),
                 None if attn_mask is None else (attn_mask if attn_mask.dtype == torch.bool else attn_mask.double()),
                 g.double(), device, backend="reference", **kw, **gqa)
    torch.manual_seed(1234)
    seed = fastnn.ops.attention._draw_seed(dropout_p)  # the seed both calls above drew
    theirs = _grads(_eager_masked, q, k, v, attn_mask, g, device, seed=seed, **kw)
    scale, group = D ** -0.5, H // Hk
    names = ("output", "q", "k", "v", "mask")
    for name, a, r, t in zip(names, ours, ref, theirs):
        assert a.shape == r.shape, name
        assert a.isfinite().all(), f"{name}: non-finite values"
        bound = 2 * max_err(t, r) + 1e-6
        if name in ("q", "k"):  # per query head; a kv head's dK sums its group's
            other = (k if name == "q" else q).double().abs().max().item()
            floor = flash_cancel_floor(torch.float32, scale, D, other, v.double().abs().max().item(),
                                       g.double().abs().max().item())
            floor += flash_delta_bound(name, q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), g,
                                       dtype, scale, attn_mask, is_causal, key_padding_mask)
            bound += floor * (group if name == "k" else 1)
        if name == "mask":
            bound += _mask_grad_delta_floor(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), g, dtype,
                                            scale, attn_mask, is_causal, key_padding_mask, dropout_p, seed)
        err = max_err(a, r)
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (torch eager's {max_err(t, r):.3g})"
    return ours


def _mask_grad_delta_floor(q, k, v, g, dtype, scale, attn_mask, is_causal, kpm, dropout_p, seed):
    """flash_delta_bound's error for d(mask): delta = rowsum(dO * O) from the output rounded to ``dtype`` errs by
    e per row, which enters dS = P (dP - delta) as -P e; d(mask) sums dS over the dims the mask broadcasts over.
    Twice that sum (float64 tensors from the inputs; dropout as the call had it)."""
    q, k, v, g = (t.double() for t in (q, k, v, g))
    o = fastnn.reference.attention_probs(q, k, attn_mask, dropout_p, is_causal, scale, kpm, seed) @ v
    e = (g * (o.to(dtype).double() - o)).sum(-1, keepdim=True).abs()
    p = fastnn.reference.attention_probs(q, k, attn_mask, 0.0, is_causal, scale, kpm)
    return 2 * (p * e).sum_to_size(attn_mask.shape).max().item()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("D", [32, 64, 96, 128, 256, 80, 36, 8], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_cuda_tensor_core_head_dims(dtype, D, is_causal):
    # Every specialized head dim, one that pads up (80 -> 96), one not a multiple of 8 (36: plain loads instead of
    # cp.async) and one below the smallest tile; Lq != Lk with partial tiles on both sides.
    _tc_case(dtype, 2, 3, 3, 129, 200, D, D, is_causal=is_causal)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 1000), (17, 17), (17, 129), (129, 17), (129, 1000), (1000, 129),
                                   (1000, 1000)], ids=lambda x: str(x))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_cuda_tensor_core_lengths(dtype, Lq, Lk, is_causal):
    _tc_case(dtype, 1, 2, 2, Lq, Lk, 64, 64, is_causal=is_causal)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("kpm", [False, True], ids=["", "kpm"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["", "causal"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["", "dropout"])
def test_cuda_tensor_core_masks_and_dropout(dtype, mask, kpm, is_causal, dropout_p):
    B, H, Lq, Lk, D = 2, 2, 70, 130, 64
    gen = torch.Generator().manual_seed(5)
    attn_mask = MASKS[mask](B, H, Lq, Lk)
    key_padding_mask = None
    if kpm:
        key_padding_mask = torch.rand(B, Lk, generator=gen) < 0.3
        key_padding_mask[1] = True  # batch 1 pads everything: every one of its rows is fully masked
    ours = _tc_case(dtype, B, H, H, Lq, Lk, D, D, attn_mask, key_padding_mask, is_causal, dropout_p)
    if kpm:
        assert (ours[0][1] == 0).all() and (ours[1][1] == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
@pytest.mark.parametrize("case", [
    (2, 8, 2, 65, 97, 64, 32, (1, 8, 65, 97), True, 0.0),     # grouped-query 8 on 2, Dv < D, learned full bias
    (1, 6, 1, 33, 70, 40, 128, (1, 6, 1, 70), False, 0.2),     # multi-query, Dv > D, D not a multiple of 8
    (2, 4, 2, 17, 129, 128, 64, (17, 129), True, 0.1),         # Dv pads down to D's tile
], ids=["gqa8on2_dv32", "mqa_dv128_d40", "gqa_dk128_dv64"])
def test_cuda_tensor_core_gqa_dv_mask_grad(dtype, case):
    B, H, Hk, Lq, Lk, D, Dv, mshape, is_causal, p = case
    mask = torch.randn(mshape, generator=torch.Generator().manual_seed(3))
    _tc_case(dtype, B, H, Hk, Lq, Lk, D, Dv, mask, None, is_causal, p)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
def test_cuda_tensor_core_unaligned_views(dtype):
    # Contiguous operands one element into their buffers: rows are not 16-byte aligned, so the kernel must take
    # its plain-load path (kernel_operand keeps row-contiguous views as they are).
    B, H, L, D = 2, 3, 77, 64
    n = B * H * L * D
    views = lambda t: [t[1 + i * n:1 + (i + 1) * n].view(B, H, L, D) for i in range(3)]  # noqa: E731
    buf = torch.randn(3 * n + 1, dtype=torch.float64, device="cuda").to(dtype).requires_grad_()
    g = torch.randn(B, H, L, D, dtype=torch.float64, device="cuda").to(dtype)
    q, k, v = views(buf)
    assert q.data_ptr() % 16 != 0
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, backend="native")
    ours = [t.cpu() for t in [out.detach()] + views(torch.autograd.grad(out, buf, g)[0])]
    q, k, v = views(buf.detach())
    ref = _grads(F.scaled_dot_product_attention, q.double(), k.double(), v.double(), None, g.double(), "cuda",
                 backend="reference", is_causal=True)
    theirs = _grads(_eager_masked, q, k, v, None, g, "cuda", is_causal=True)
    assert_matches(ours[0], ref[0], torch_out=theirs[0])
    assert_matches(ours[3], ref[3], torch_out=theirs[3], name="dv")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
def test_cuda_tensor_core_row_statistics(dtype):
    # stats = (row max m, log l) in float32, as the backward reads them; a fully masked row gives (+inf, 0).
    B, H, Lq, Lk, D = 2, 2, 100, 150, 64
    q, k, v = (t.cuda() for t in _qkv(B, H, Lq, Lk, D, dtype))
    kpm = torch.zeros(B, Lk, dtype=torch.bool, device="cuda")
    kpm[1] = True
    out, stats = torch.ops.fastnn.attention_fwd(q, k, v, None, kpm, 0.0, True, D ** -0.5, 0)
    s = (q.double() @ k.double().transpose(-1, -2)) * D ** -0.5
    s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
    m = s.amax(-1)
    log_l = (s - m[..., None]).exp().sum(-1).log()
    torch.testing.assert_close(stats[0, 0].double(), m[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats[1, 0].double(), log_l[0], rtol=1e-5, atol=1e-4)
    assert (stats[0, 1] == float("inf")).all() and (stats[1, 1] == 0).all() and (out[1] == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cuda_more_heads_than_a_grid_dimension(dtype):
    # B * H = 66,000 > 65,535 (gridDim.y's limit): every launch is a 1-d grid. float32 runs the simple kernels,
    # float16 the tensor-core forward; both backward kernels (B * H and B * Hk pairs).
    B, H, Lq, Lk, D = 2, 33_000, 3, 5, 8
    q, k, v = _qkv(B, H, Lq, Lk, D, dtype, "cuda")
    g = torch.randn(B, H, Lq, D, device="cuda").to(dtype)
    ours = _grads(F.scaled_dot_product_attention, q, k, v, None, g, "cuda", backend="native", is_causal=True)
    ref = _grads(F.scaled_dot_product_attention, q.double(), k.double(), v.double(), None, g.double(), "cuda",
                 backend="reference", is_causal=True)
    theirs = _grads(_eager_masked, q, k, v, None, g, "cuda", is_causal=True) if dtype != torch.float32 else (None,) * 4
    for name, a, r, t in zip(("output", "dq", "dk", "dv"), ours, ref, theirs):
        if dtype == torch.float16 and name in ("dq", "dk"):
            continue  # the flash backward's floors apply there (test_cuda_tensor_core_* check them); here: no wrap
        assert_matches(a, r, torch_out=t, name=name)
    assert ours[1].isfinite().all() and (ours[1].abs().amax((0, 2, 3)) > 0).all()  # every head got its gradient


def test_tensor_core_kernels_in_the_cpu_emulator():
    # The float16 / bfloat16 tensor-core kernels' own text (csrc/cuda/attention.cu) compiled for the host and run by
    # tools/cuda_emu/attention.py (a thread per CUDA thread, mma / ldmatrix per the PTX fragment layouts, ASan + UBSan)
    # on two cases that touch every path - one tile; grouped-query heads, Dv != D, causal, key padding, a learned
    # mask and dropout - against fastnn.reference: fragment indexing and masking checked without a GPU.
    assert "2/2 cases ok" in run_cuda_emulator("attention")


# ---- Triton kernels: flat grid, causal split, full / ragged key blocks ------------------------------------------

TRITON_CPU = [p for p in BACKENDS if p.values == ("cpu", "triton")]


def _small_tiles(monkeypatch, block_m, block_n):
    """Interpreter tiles of block_m x block_n, so that small shapes span several query and key blocks (also while
    the GPU's tiles are being recorded: kernels/aot.py, record_launches)."""
    import fastnn.kernels.attention as kernels

    monkeypatch.setattr(kernels, "GPU_TILES", False)
    monkeypatch.setitem(kernels.INTERPRET_TILES, "BLOCK_M", block_m)
    monkeypatch.setitem(kernels.INTERPRET_TILES, "BLOCK_N", block_n)
    return kernels


@pytest.mark.parametrize("device,backend", TRITON_CPU)
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
def test_triton_flat_grid_index_math(monkeypatch, device, backend, gqa):
    """Every (batch, head, row block) program reads and writes its own rows: many heads, several query and key
    blocks per head, Lq != Lk, each head's data distinct; with grouped-query heads and Dv != D the kv head of each
    query head and the dK / dV sums over the group."""
    _small_tiles(monkeypatch, 16, 16)
    B, H, Lq, Lk, D = 3, 4, 40, 24, 16
    Hk, Dv = (2, 8) if gqa else (H, D)
    q = torch.randn(B, H, Lq, D, dtype=torch.float64)
    k, v = torch.randn(B, Hk, Lk, D, dtype=torch.float64), torch.randn(B, Hk, Lk, Dv, dtype=torch.float64)
    g = torch.randn(B, H, Lq, Dv, dtype=torch.float64)
    ours = _grads(F.scaled_dot_product_attention, q.float(), k.float(), v.float(), None, g.float(), device,
                  enable_gqa=gqa, backend=backend)
    ref = _grads(F.scaled_dot_product_attention, q, k, v, None, g, enable_gqa=gqa, backend="reference")
    for name, a, r in zip(("output", "dq", "dk", "dv"), ours, ref):
        assert_matches(a, r, name=name)


@pytest.mark.parametrize("device,backend", TRITON_CPU)
@pytest.mark.parametrize("lq,lk,block_m,block_n", [
    (50, 64, 16, 32),   # Lk a multiple of BLOCK_N (EVEN_N), Lq ragged, BLOCK_M < BLOCK_N
    (64, 50, 32, 16),   # Lk ragged, Lq > Lk, BLOCK_M > BLOCK_N
    (37, 37, 16, 16),   # square, both ragged
    (48, 96, 16, 16),   # Lq < Lk, both even
], ids=lambda x: str(x))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("extra", ["", "masks_dropout"])
def test_triton_causal_split_and_ragged_key_blocks(monkeypatch, device, backend, lq, lk, block_m, block_n,
                                                   is_causal, extra):
    """The forward's unmasked key blocks and masked diagonal / ragged last block, the backward's diagonal and
    off-diagonal query blocks, for Lk a multiple of BLOCK_N (EVEN_N: no bound masks) or not, against the
    reference; with a key padding mask, a float attn_mask that takes a gradient and dropout in the unmasked
    blocks too."""
    kernels = _small_tiles(monkeypatch, block_m, block_n)
    B, H, D = 2, 2, 16
    q, k, v = _qkv(B, H, lq, lk, D, torch.float32)
    args = kernels._launch_args(q, k, v, None, None, 0.0, is_causal, 0.25, 0, backward=True)
    assert args["EVEN_N"] == (lk % block_n == 0) and args["BLOCK_M"] == block_m
    g = torch.randn(B, H, lq, D)
    mask, kw = None, dict(is_causal=is_causal)
    if extra:
        mask = torch.randn(H, lq, lk)
        kpm = torch.rand(B, lk) < 0.2
        kpm[1, :block_n] = True  # batch 1: the first key block padded entirely
        kw.update(key_padding_mask=kpm, dropout_p=0.2)
    torch.manual_seed(5)
    ours = _grads(F.scaled_dot_product_attention, q, k, v, mask, g, device, backend=backend, **kw)
    torch.manual_seed(5)
    ref = _grads(F.scaled_dot_product_attention, q.double(), k.double(), v.double(),
                 None if mask is None else mask.double(), g.double(), backend="reference", **kw)
    for name, a, r in zip(("output", "dq", "dk", "dv"), ours, ref):
        assert_matches(a, r, name=name)
    if extra:
        torch.testing.assert_close(ours[4], ref[4].float(), rtol=1e-5, atol=5e-6 * B)


@pytest.mark.parametrize("device,backend", TRITON_CPU)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("extra", ["", "masks_dropout"])
def test_triton_backward_reading_keys_in_the_loop(monkeypatch, device, backend, is_causal, extra):
    """The float32 / float64 backward for a GPU whose shared memory cannot hold the key block's tiles through the
    query loop (float64 at head dim 256 on an A100): it reads K and V where each product needs them (KV_IN_LOOP).
    Forced here on small shapes - grouped-query heads, Dv != D, both padded, ragged query and key blocks, causal,
    masks, dropout and the mask's gradient - against the reference."""
    kernels = _small_tiles(monkeypatch, 16, 16)
    monkeypatch.setattr(kernels, "_shared_memory", lambda device: 0)
    B, H, Hk, Lq, Lk, D, Dv = 2, 4, 2, 37, 29, 24, 40
    q = torch.randn(B, H, Lq, D, dtype=torch.float64)
    k, v = torch.randn(B, Hk, Lk, D, dtype=torch.float64), torch.randn(B, Hk, Lk, Dv, dtype=torch.float64)
    assert kernels._launch_args(q, k, v, None, None, 0.0, is_causal, 0.25, 0, backward=True)["KV_IN_LOOP"]
    g = torch.randn(B, H, Lq, Dv, dtype=torch.float64)
    mask, kw = None, dict(is_causal=is_causal, enable_gqa=True)
    if extra:
        mask = torch.randn(H, Lq, Lk, dtype=torch.float64)
        kpm = torch.rand(B, Lk) < 0.2
        kpm[1, :16] = True  # batch 1: the first key block padded entirely
        kw.update(key_padding_mask=kpm, dropout_p=0.2)
    torch.manual_seed(5)
    ours = _grads(F.scaled_dot_product_attention, q, k, v, mask, g, device, backend=backend, **kw)
    torch.manual_seed(5)
    ref = _grads(F.scaled_dot_product_attention, q, k, v, mask, g, backend="reference", **kw)
    for name, a, r in zip(("output", "dq", "dk", "dv", "dmask"), ours, ref):
        assert_matches(a, r, name=name)


def test_triton_backward_keys_in_the_loop_only_where_shared_memory_is_short(monkeypatch):
    """On the GPU's tiles (16 x 16 for float32 / float64): float64 at head dim 256 reads its key block in the loop
    on an A100 (163 KB a block) and holds it on an H100 / H200 (227 KB); float32 and narrower heads hold it on
    both; bfloat16 never takes the path."""
    import fastnn.kernels.attention as kernels

    monkeypatch.setattr(kernels, "GPU_TILES", True)
    a100, h100 = 166_912, 232_448
    for d, dtype, shared, expect in [(256, torch.float64, a100, True), (256, torch.float64, h100, False),
                                     (200, torch.float64, a100, True), (128, torch.float64, a100, False),
                                     (256, torch.float32, a100, False), (256, torch.bfloat16, 0, False)]:
        for variant in ("plain", "causal", "masked"):
            cfg = kernels._head_blocks(d, d, dtype, True, variant, shared == h100)
            assert kernels._kv_in_loop(cfg, dtype, shared) == expect, (d, dtype, shared, variant)


@pytest.mark.parametrize("device,backend", TRITON_CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_negative_scale(device, backend, dtype):
    # The forward puts a negative scale's sign on q to keep its row maxima exact; the backward takes it as is.
    q, k, v = _qkv(1, 2, 19, 23, 8, dtype)
    g = torch.randn(1, 2, 19, 8).to(dtype)
    ours = _run(F.scaled_dot_product_attention, q, k, v, g, scale=-0.7, is_causal=True, backend=backend)
    ref = _run(fastnn.reference.scaled_dot_product_attention, q.double(), k.double(), v.double(), g.double(),
               scale=-0.7, is_causal=True)
    theirs = None
    if dtype == torch.bfloat16:
        def eager(q, k, v):  # _eager's matmul -> softmax -> matmul in bfloat16, at this scale
            s = (q @ k.transpose(-1, -2)) * -0.7
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
            return torch.softmax(s, -1) @ v

        theirs = _run(eager, q, k, v, g)
    _check(ours, ref, theirs)


@pytest.mark.cuda
@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values == ("cuda", "triton")])
def test_triton_more_heads_than_a_grid_axis_holds(device, backend):
    """B * H = 70,000 > 65,535 (the most a CUDA grid's y or z axis takes): the flat grids run every head, forward
    and backward."""
    B, H, L, D = 2, 35_000, 5, 8
    q, k, v, g = (torch.randn(B, H, L, D, device=device) for _ in range(4))
    ours = _grads(F.scaled_dot_product_attention, q, k, v, None, g, device, is_causal=True, backend=backend)
    ref = _grads(F.scaled_dot_product_attention, q.double(), k.double(), v.double(), None, g.double(), device,
                 is_causal=True, backend="reference")
    for name, a, r in zip(("output", "dq", "dk", "dv"), ours, ref):
        assert_matches(a, r, name=name)
