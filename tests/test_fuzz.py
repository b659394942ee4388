"""Differential fuzzing: hypothesis draws shapes (0-size, 1, odd), strides (transposed, sliced, expanded,
channels-last), dtypes, dims, options and extreme values (+-1e4, +-inf, NaN, huge, tiny), and every backend
available here (native, Triton under the interpreter, reference) must agree with torch and with
fastnn.reference, forward and, where everything is finite, gradients.

Profiles (tests/conftest.py): the default run is small and derandomized; the dedicated run is
``bash tools/fuzz.sh`` (``--hypothesis-profile=fuzz``, >= 2000 examples per op and backend).

Adding an op: write a ``Case``-returning strategy (``@st.composite def _my_op(draw, small): ...``) and add one
line to ``OPS``. A Case holds the fastnn call (taking ``backend=``), torch's call and fastnn.reference's call on
the same tensors; ``run_case`` does the rest (NaN/inf pattern equal to torch's, error <= 2x torch's own error
plus a one-ulp-ish floor, gradients of every floating input that requires grad).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, strategies as st

import fastnn
import fastnn.functional as F
from helpers import device_backends

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIZES = [0, 1, 2, 3, 7, 16, 33]
SPECIALS = [1e4, -1e4, float("inf"), float("-inf"), float("nan"), 3e38, -3e38, 1e-30, -1e-30, 0.0, 60.0, -60.0]
TRITON_MAX_NUMEL = 256  # the interpreter runs a program per row in Python: keep its examples small
# Floors for "error <= 2 x torch's error + floor": a few ulps relative to the largest reference value.
FLOOR = {torch.float64: 1e-12, torch.float32: 4e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclasses.dataclass
class Case:
    fastnn: Callable  # fastnn(backend=...) -> tensor or tuple of tensors
    torch: Callable  # torch's own op on the same tensors
    reference: Callable  # reference(cast) -> fastnn.reference's result on the tensors cast by `cast`
    inputs: dict  # name -> tensor leaves (gradients are compared for those that are floating and finite)
    grad_inputs: tuple = ()  # names of inputs to differentiate


# ------------------------------------------------------------------------------------------ tensor strategies


@st.composite
def shapes(draw, min_dims=0, max_dims=4, sizes=SIZES):
    return tuple(draw(st.lists(st.sampled_from(sizes), min_size=min_dims, max_size=max_dims)))


@st.composite
def tensors(draw, shape, dtype, *, scale=None, lo=None, hi=None, specials=True, layout=None):
    """A tensor of ``shape``/``dtype`` with an arbitrary layout and a few special values written into it."""
    layout = layout or draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded", "channels_last"]))
    n = len(shape)
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    base_shape = list(shape)
    if layout == "transposed" and n >= 2:
        base_shape[-1], base_shape[-2] = base_shape[-2], base_shape[-1]
    elif layout == "sliced" and n >= 1:
        base_shape[-1] = 2 * base_shape[-1] + 1
    elif layout == "expanded" and n >= 1:
        exp_dim = draw(st.integers(0, n - 1))
        base_shape[exp_dim] = 1 if shape[exp_dim] > 0 else 0
    if lo is not None:
        base = lo + (hi - lo) * torch.rand(base_shape, generator=gen, dtype=torch.float64)
    else:
        scale = scale if scale is not None else draw(st.sampled_from([1.0, 5.0, 30.0]))
        base = scale * torch.randn(base_shape, generator=gen, dtype=torch.float64)
    if specials and base.numel():
        for pos, value in draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from(SPECIALS)),
                                        max_size=3)):
            base.view(-1)[int(pos * base.numel())] = value
    base = base.to(dtype)
    if layout == "transposed" and n >= 2:
        return base.transpose(-1, -2)
    if layout == "sliced" and n >= 1:
        return base[..., 1::2]
    if layout == "expanded" and n >= 1:
        return base.expand(shape)
    if layout == "channels_last" and n == 4:
        return base.contiguous(memory_format=torch.channels_last)
    return base


# ------------------------------------------------------------------------------------------------- the ops


@st.composite
def _softmax(draw, small):
    shape = draw(shapes().filter(lambda s: not small or _numel(s) <= TRITON_MAX_NUMEL))
    dtype = draw(st.sampled_from(DTYPES))
    x = draw(tensors(shape, dtype))
    dim = draw(st.integers(-max(len(shape), 1), max(len(shape), 1) - 1))
    log = draw(st.booleans())
    # Sometimes the dtype= argument: a half input normalized in float32, as models do before a loss.
    cast = draw(st.sampled_from([None, None, torch.float32]))
    ours = F.log_softmax if log else F.softmax
    theirs = TF.log_softmax if log else TF.softmax
    ref = fastnn.reference.log_softmax if log else fastnn.reference.softmax
    return Case(
        fastnn=lambda backend, x: ours(x, dim, dtype=cast, backend=backend),
        torch=lambda x: theirs(x, dim, dtype=cast),
        reference=lambda x: ref(x, dim),
        inputs=dict(x=x), grad_inputs=("x",))


@st.composite
def _bce(draw, small):
    shape = draw(shapes().filter(lambda s: not small or _numel(s) <= TRITON_MAX_NUMEL))
    dtype = draw(st.sampled_from(DTYPES))
    x = draw(tensors(shape, dtype))
    # Soft targets in [0, 1]; specials only sometimes (torch does not check the range).
    y = draw(tensors(shape, dtype, lo=0.0, hi=1.0, specials=draw(st.booleans())))

    def broadcastable():
        # A suffix of the shape with some dims squeezed to 1: every way torch broadcasts a weight.
        k = draw(st.integers(0, len(shape)))
        sub = [1 if draw(st.booleans()) else s for s in shape[len(shape) - k:]]
        return draw(tensors(tuple(sub), dtype, lo=0.0, hi=3.0, specials=False))

    w = broadcastable() if draw(st.booleans()) else None
    pw = broadcastable() if draw(st.booleans()) else None
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    return Case(
        fastnn=lambda backend, x, y: F.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=pw,
                                                                        backend=backend),
        torch=lambda x, y: TF.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=pw),
        reference=lambda x, y: fastnn.reference.binary_cross_entropy_with_logits(
            x, y, _like(w, x), reduction, _like(pw, x)),
        inputs=dict(x=x, y=y), grad_inputs=("x", "y"))


@st.composite
def _lstm_cell(draw, small):
    B, I, H = draw(st.sampled_from([0, 1, 2, 5])), draw(st.sampled_from([1, 3, 8])), draw(st.sampled_from([1, 4, 7]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    unbatched = draw(st.booleans())
    lead = () if unbatched else (B,)
    # Weights large enough (scale up to 30) to saturate the gates; specials only in the input.
    x = draw(tensors(lead + (I,), dtype, specials=draw(st.booleans())))
    w_ih = draw(tensors((4 * H, I), dtype, scale=draw(st.sampled_from([0.3, 30.0])), specials=False))
    w_hh = draw(tensors((4 * H, H), dtype, scale=0.3, specials=False))
    b_ih, b_hh = (draw(tensors((4 * H,), dtype, specials=False)) if draw(st.booleans()) else None for _ in range(2))
    if b_ih is None or b_hh is None:
        b_ih = b_hh = None  # torch's lstm_cell takes both or neither
    h = draw(tensors(lead + (H,), dtype, scale=1.0, specials=False))
    c = draw(tensors(lead + (H,), dtype, scale=draw(st.sampled_from([1.0, 1e3])), specials=False))

    def torch_cell(x, w_ih, w_hh, h, c):
        xb, hb, cb = (t.unsqueeze(0) for t in (x, h, c)) if unbatched else (x, h, c)
        hy, cy = torch._VF.lstm_cell(xb, (hb, cb), w_ih, w_hh, _like(b_ih, x), _like(b_hh, x))
        return (hy.squeeze(0), cy.squeeze(0)) if unbatched else (hy, cy)

    def ref_cell(x, w_ih, w_hh, h, c):
        xb, hb, cb = (t.unsqueeze(0) for t in (x, h, c)) if unbatched else (x, h, c)
        hy, cy = fastnn.reference.lstm_cell(xb, (hb, cb), w_ih, w_hh, _like(b_ih, x), _like(b_hh, x))
        return (hy.squeeze(0), cy.squeeze(0)) if unbatched else (hy, cy)

    return Case(
        fastnn=lambda backend, x, w_ih, w_hh, h, c: F.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh, backend=backend),
        torch=torch_cell, reference=ref_cell,
        inputs=dict(x=x, w_ih=w_ih, w_hh=w_hh, h=h, c=c), grad_inputs=("x", "w_ih", "w_hh", "h", "c"))


# One line per op: name (for device_backends) -> strategy. Cross-entropy and attention add theirs here.
OPS = {
    "softmax": _softmax,
    "bce_with_logits": _bce,
    "lstm_cell": _lstm_cell,
}


# ------------------------------------------------------------------------------------------------ machinery


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _like(t, x):
    return None if t is None else t.to(x.dtype)


def _tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _compare(name, ours, theirs, ref64):
    """NaN and inf pattern exactly torch's; finite error at most 2x torch's own error vs the float64
    reference plus FLOOR relative to the reference's magnitude."""
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} != torch's {tuple(theirs.shape)}"
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} != torch's {theirs.dtype}"
    o, t, r = ours.double(), theirs.double(), ref64.double()
    assert torch.equal(o.isnan(), t.isnan()), f"{name}: NaN pattern differs from torch\nours={o}\ntorch={t}"
    inf = o.isinf() | t.isinf()
    assert torch.equal(o[inf], t[inf]), f"{name}: inf pattern differs from torch\nours={o}\ntorch={t}"
    ok = o.isfinite() & t.isfinite() & r.isfinite()
    if not ok.any():
        return
    err_o = (o - r)[ok].abs().max().item()
    err_t = (t - r)[ok].abs().max().item()
    bound = 2 * err_t + FLOOR[ours.dtype] * max(1.0, r[ok].abs().max().item())
    assert err_o <= bound, f"{name}: error {err_o:.3g} > 2 x torch's {err_t:.3g} + floor (bound {bound:.3g})"


def run_case(case: Case, backend: str) -> None:
    names = list(case.inputs)

    def leaves(cast=None):
        out = {}
        for k, v in case.inputs.items():
            v = v.detach() if cast is None else v.detach().to(cast)
            out[k] = v.requires_grad_(k in case.grad_inputs)
        return out

    ours_in, torch_in, ref_in = leaves(), leaves(), leaves(torch.float64)
    try:
        expected = _tuple(case.torch(**torch_in))
    except RuntimeError as e:  # torch refuses the call: fastnn must refuse it too
        with pytest.raises((RuntimeError, ValueError, TypeError, IndexError)):
            case.fastnn(backend, **ours_in)
        return
    ours = _tuple(case.fastnn(backend, **ours_in))
    ref = _tuple(case.reference(**ref_in))
    for i, (a, b, r) in enumerate(zip(ours, expected, ref)):
        _compare(f"output {i}", a.detach(), b.detach(), r.detach())
    # Gradients only where everything is finite (torch's own inf/NaN gradients are not a contract).
    if not all(torch.isfinite(t).all() for t in (*case.inputs.values(), *expected, *ref)):
        return
    grads_wrt = [k for k in names if k in case.grad_inputs]
    if not grads_wrt or not any(o.requires_grad for o in ours):
        return
    gen = torch.Generator().manual_seed(1)
    gs = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in ours]

    def grads(outs, inp):
        pairs = [(o, g.to(o.dtype)) for o, g in zip(outs, gs) if o.requires_grad]
        return torch.autograd.grad([o for o, _ in pairs], [inp[k] for k in grads_wrt], [g for _, g in pairs],
                                   allow_unused=True)

    g_ours, g_torch, g_ref = grads(ours, ours_in), grads(expected, torch_in), grads(ref, ref_in)
    for k, a, b, r in zip(grads_wrt, g_ours, g_torch, g_ref):
        if b is None or r is None:
            continue
        assert a is not None, f"grad {k}: fastnn gave none"
        if not (r.isfinite().all() and b.isfinite().all()):
            continue
        _compare(f"grad {k}", a, b, r)


def _params():
    return [pytest.param(op, p.values[1], id=f"{op}-{p.values[1]}")
            for op in OPS for p in device_backends(op, reference=True) if p.values[0] == "cpu"]


@pytest.mark.parametrize("op,backend", _params())
@given(data=st.data())
def test_fuzz(op, backend, data):
    case = data.draw(OPS[op](small=backend == "triton"), label="case")
    run_case(case, backend)


# ---- regressions found by the fuzz and the contract tests, kept shrunk


@pytest.mark.parametrize("backend", [p.values[1] for p in device_backends("bce_with_logits", reference=True)
                                     if p.values[0] == "cpu"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_bce_infinite_target_without_pos_weight(backend, reduction):
    # The native kernel computed the positive term's weight as 1 + (pos_weight - 1) * y with pos_weight = 1 when
    # absent: 0 * inf = NaN where torch gives -inf / +inf (forward and d/dx).
    x = torch.tensor([0.5, -1.0, 2.0, 0.3])
    y = torch.tensor([float("inf"), float("-inf"), 0.5, 1e4])
    case = Case(
        fastnn=lambda backend, x, y: F.binary_cross_entropy_with_logits(x, y, reduction=reduction, backend=backend),
        torch=lambda x, y: TF.binary_cross_entropy_with_logits(x, y, reduction=reduction),
        reference=lambda x, y: fastnn.reference.binary_cross_entropy_with_logits(x, y, reduction=reduction),
        inputs=dict(x=x, y=y), grad_inputs=("x", "y"))
    run_case(case, backend)


def test_lstm_cell_triton_bf16_rounding():
    # The Triton LSTM kernels stored with a plain .to(bfloat16), which the interpreter truncates: c' one bf16 ulp
    # off and, through saturated gates and w_ih ~ 65, a gradient of x 3x torch's error. Now cast_rtne.
    bf = torch.bfloat16
    x = torch.tensor([0.6602], dtype=bf)
    w_ih = torch.tensor([[46.25], [-8.8125], [-65.5], [17.0]], dtype=bf)
    w_hh = torch.tensor([[0.4629], [-0.0879], [-0.6523], [0.1709]], dtype=bf)
    h = c = torch.tensor([1.5391], dtype=bf)

    def cell(fn):
        return lambda x, w_ih, w_hh, h, c: tuple(t[0] for t in fn(x[None], (h[None], c[None]), w_ih, w_hh))

    case = Case(fastnn=lambda backend, x, w_ih, w_hh, h, c: F.lstm_cell(x, (h, c), w_ih, w_hh, backend=backend),
                torch=cell(torch._VF.lstm_cell), reference=cell(fastnn.reference.lstm_cell),
                inputs=dict(x=x, w_ih=w_ih, w_hh=w_hh, h=h, c=c), grad_inputs=("x", "w_ih", "w_hh", "h", "c"))
    for p in device_backends("lstm_cell", reference=True):
        if p.values[0] == "cpu":
            run_case(case, p.values[1])
