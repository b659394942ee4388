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
import math
import types
from typing import Callable

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import assume, currently_in_test_context, event, given, strategies as st

import fastnn
import fastnn.functional as F
from helpers import device_backends, flash_cancel_floor, flash_delta_bound

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIZES = [0, 1, 2, 3, 7, 16, 33]
SPECIALS = [1e4, -1e4, float("inf"), float("-inf"), float("nan"), 3e38, -3e38, 1e-30, -1e-30, 0.0, 60.0, -60.0]
TRITON_MAX_NUMEL = 256  # the interpreter runs a program per row in Python: keep its examples small
# Floors for "error <= 2 x torch's error + floor": a few ulps relative to the largest reference value.
BCE_TARGET_SPECIALS = [0.0, 1.0, 1e-30, float("nan")]
LSTM_INPUT_SPECIALS = [s for s in SPECIALS if abs(s) != 3e38]
FLOOR = {torch.float64: 1e-12, torch.float32: 4e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclasses.dataclass
class Case:
    fastnn: Callable  # fastnn(backend=...) -> tensor or tuple of tensors
    torch: Callable  # torch's own op on the same tensors
    reference: Callable  # reference(cast) -> fastnn.reference's result on the tensors cast by `cast`
    inputs: dict  # name -> tensor leaves (gradients are compared for those that are floating and finite)
    grad_inputs: tuple = ()  # names of inputs to differentiate
    check: Callable | None = None  # check(grads) after the comparisons: an op's own contract (fastnn's gradients)
    info: dict = dataclasses.field(default_factory=dict)  # the other arguments, printed with a failing example
    # Extra absolute floor for gradients: a few ulps of intermediates that a backward formula cancels (attention's
    # dS = P (dP - delta), delta = rowsum(dO * O), is exactly 0 with one key in torch's order, ~1 ulp of dP in ours).
    grad_atol: float = 0.0
    # Other ways torch computes the op in the input dtype (attention: matmul-softmax-matmul, and its fused kernel on
    # contiguous inputs, which takes another path than strided ones): the largest of their errors and torch's is
    # "torch's error" in the bound (FlashAttention's rule); `torch` alone sets the NaN/inf pattern.
    plain: tuple = ()
    out_atol: float = 0.0  # the same as grad_atol, for the outputs
    # grad_bound(name, upstream gradients) -> a further absolute floor for one input's gradient, where the error
    # a kernel design carries depends on the upstream gradient (attention's delta from the rounded output).
    grad_bound: Callable | None = None


# ------------------------------------------------------------------------------------------ tensor strategies


@st.composite
def shapes(draw, min_dims=0, max_dims=4, sizes=SIZES):
    return tuple(draw(st.lists(st.sampled_from(sizes), min_size=min_dims, max_size=max_dims)))


@st.composite
def tensors(draw, shape, dtype, *, scale=None, lo=None, hi=None, specials=True, layout=None):
    """A tensor of ``shape``/``dtype`` with an arbitrary layout and a few special values (``specials``: True for
    SPECIALS, or a list) written into it."""
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
        values = SPECIALS if specials is True else specials  # or a list of the specials that make sense
        for pos, value in draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from(values)),
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
        inputs=dict(x=x), grad_inputs=("x",),
        # dtype=float32 on a float64 input computes in float32; the gradient comes back in float64.
        grad_atol=cancel_floor(torch.float32, 1, 1.0) if cast is not None and dtype == torch.float64 else 0.0)


@st.composite
def _bce(draw, small):
    shape = draw(shapes().filter(lambda s: not small or _numel(s) <= TRITON_MAX_NUMEL))
    dtype = draw(st.sampled_from(DTYPES))
    x = draw(tensors(shape, dtype))
    # Soft targets in [0, 1]; specials only sometimes (torch does not check the range).
    # Targets outside [0, 1] (1e4, -1e4, 3e38) are left out as for cross-entropy's probabilities: the stable form
    # (1 - y) x + log1p(exp(-|x|)) ... and torch's cancel differently there (inf vs NaN, 27 vs NaN).
    y = draw(tensors(shape, dtype, lo=0.0, hi=1.0, specials=draw(st.sampled_from([False, BCE_TARGET_SPECIALS]))))

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
    # +-3e38 inputs are left out: whether x w_ih overflows to inf, -inf or inf - inf = NaN depends on the GEMM's
    # summation order (torch's bfloat16 GEMM returned finite gates where the reference's float32 sum gave NaN).
    x = draw(tensors(lead + (I,), dtype, specials=draw(st.sampled_from([False, LSTM_INPUT_SPECIALS]))))
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
        inputs=dict(x=x, w_ih=w_ih, w_hh=w_hh, h=h, c=c), grad_inputs=("x", "w_ih", "w_hh", "h", "c"),
        # dx = dgates @ w_ih (and alike) sums 4H products; the forget gate's gradient carries c.
        grad_atol=cancel_floor(dtype, 4 * H + max(B, 1), max(1.0, _absmax(c)) * _absmax(w_ih, w_hh, x, h)),
        # The gates' pre-activations sum I + H products (x w_ih can be 1e4 x 0.1); their rounding moves c by as much.
        out_atol=_finite_or_zero(cancel_floor(dtype, I + H, max(1.0, _absmax(c)) * (
            _absmax(x) * _absmax(w_ih) + _absmax(h) * _absmax(w_hh)))))


@st.composite
def _lstm_layer(draw, small):
    # fastnn.nn.LSTM (one layer, either direction) against torch.nn.LSTM with the drawn weights: the C++ layer's
    # recurrence, its split of the hidden units over the threads (H = 150 at B = 8 splits in two), lengths (rows
    # stopping mid-sequence, in both directions) and initial states. Finite inputs: the cell's fuzz above covers
    # the extreme values; here the point is the recurrence's bookkeeping. B = 5, 8, 13 with T > 1 reach each row
    # tile of float32's packed GEMM (csrc/cpu/gemm.h, AVX2: 4 + 1, 6 + 2, 6 + 6 + 1; AVX-512: 4 + 1, 8, 8 + 4 + 1),
    # H = 7, 33, 150 its partial panels (33 and 150 after pairs of full ones).
    T = draw(st.sampled_from([1, 3] if small else [1, 2, 5, 9]))
    B = draw(st.sampled_from([1, 2] if small else [1, 3, 5, 8, 13]))
    I = draw(st.sampled_from([1, 3, 8]))
    H = draw(st.sampled_from([1, 4] if small else [1, 7, 33, 150]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    bidir, bias, given_hx = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    lengths = None
    if draw(st.booleans()):
        lengths = torch.tensor(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)))
    D = 2 if bidir else 1
    inputs = dict(x=draw(tensors((T, B, I), dtype, scale=draw(st.sampled_from([1.0, 5.0])), specials=False)))
    for sfx in ["", "_reverse"][:D]:
        inputs["weight_ih_l0" + sfx] = draw(tensors((4 * H, I), dtype, scale=draw(st.sampled_from([0.3, 3.0])),
                                                    specials=False))
        inputs["weight_hh_l0" + sfx] = draw(tensors((4 * H, H), dtype, scale=0.3, specials=False))
        if bias:
            for name in ("bias_ih_l0", "bias_hh_l0"):
                inputs[name + sfx] = draw(tensors((4 * H,), dtype, scale=1.0, specials=False))
    if given_hx:
        inputs["h0"] = draw(tensors((D, B, H), dtype, scale=1.0, specials=False))
        inputs["c0"] = draw(tensors((D, B, H), dtype, scale=draw(st.sampled_from([1.0, 1e3])), specials=False))
    kw = dict(input_size=I, hidden_size=H, bias=bias, bidirectional=bidir)

    def run(module, x, h0=None, c0=None, **params):
        seq = x if lengths is None else torch.nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
        out, (h, c) = torch.func.functional_call(module, params, (seq, None if h0 is None else (h0, c0)))
        if lengths is not None:
            out = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)[0]
        return out, h, c

    def ours(backend, **t):
        with fastnn.use_backend(backend):
            return run(fastnn.nn.LSTM(**kw, dtype=dtype), **t)

    c0 = inputs.get("c0")
    term = max(1.0, _absmax(c0)) * _absmax(*(v for k, v in inputs.items() if k != "c0"))
    return Case(
        fastnn=ours, torch=lambda **t: run(torch.nn.LSTM(**kw, dtype=dtype), **t),
        # torch's float64 LSTM: the cell's reference is fastnn.reference.lstm_cell, checked by the cell's fuzz.
        reference=lambda **t: run(torch.nn.LSTM(**kw, dtype=torch.float64), **t),
        inputs=inputs, grad_inputs=tuple(inputs), info=dict(lengths=lengths, bidirectional=bidir, bias=bias),
        # A step's gradients sum 4H + I + B products, as the cell's; the recurrence carries them on.
        grad_atol=cancel_floor(dtype, 4 * H + I + B, term),
        out_atol=cancel_floor(dtype, I + H, term))


# ---- cross_entropy / linear_cross_entropy

CE_CLASSES = [1, 2, 3, 7, 16, 33]
CE_ROWS = [0, 1, 2, 3, 7]
CE_SMALL_ROWS = 16  # the interpreter runs a program per row


@st.composite
def _ce_options(draw, classes, dtype):
    """weight, ignore_index, reduction and label_smoothing, drawn alike for both losses."""
    weight = draw(tensors((classes,), dtype, lo=0.0, hi=3.0, specials=False)) if draw(st.booleans()) else None
    # torch's default, other negative values, and a real class (whose targets are then ignored).
    ignore_index = draw(st.one_of(st.sampled_from([-100, -1, -7]), st.integers(0, classes - 1)))
    return dict(weight=weight, ignore_index=ignore_index, reduction=draw(st.sampled_from(["none", "mean", "sum"])),
                label_smoothing=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])))


@st.composite
def _class_targets(draw, shape, classes, ignore_index):
    """int64 class indices; sometimes ~20% of them ignore_index, now and then one out of range (torch raises an
    IndexError there, and so must fastnn, on every backend)."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    t = torch.randint(0, classes, shape, generator=gen)
    if draw(st.booleans()):
        t = torch.where(torch.rand(shape, generator=gen) < 0.2, ignore_index, t)
    if t.numel() and draw(st.integers(0, 9)) == 0:
        bad = draw(st.sampled_from([classes, classes + 3, -1, -2]).filter(lambda b: b != ignore_index))
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = bad
    return t


@st.composite
def _cross_entropy(draw, small):
    kind = draw(st.sampled_from(["C", "NC", "NCd", "NCdd"]))
    C = draw(st.sampled_from(CE_CLASSES))
    N = draw(st.sampled_from(CE_ROWS))
    spatial = tuple(draw(st.sampled_from([1, 2, 3, 5])) for _ in range(kind.count("d")))
    shape = (C,) if kind == "C" else (N, C) + spatial
    tshape = () if kind == "C" else (N,) + spatial
    if small:
        assume(_numel(tshape) <= CE_SMALL_ROWS)
    cdim = 0 if kind == "C" else 1
    dtype = draw(st.sampled_from(DTYPES))
    x = draw(tensors(shape, dtype, scale=draw(st.sampled_from([1.0, 5.0, 30.0, 1e4])),
                     specials=draw(st.booleans())))
    opts = draw(_ce_options(C, dtype))
    prob = draw(st.booleans())
    if prob:
        # Probabilities in [0, 1], sometimes 0, 1 or NaN - not values far outside [0, 1] (torch does not check them):
        # the fused row computes loss = S (lse - m) - sum w y' (x - m) and dx = S p - w y' (S = sum w y'), whose
        # rounding grows with |y| (y = 1e4: a 1e-4 gradient where torch's log_softmax backward cancels to exactly
        # 0; w y' = 3e38 * 3 overflows) and which gives NaN (inf - inf) where torch's -sum(y log p) gives +-inf
        # for an infinite y. Documented in docs/reliability.md as a known difference.
        y = draw(tensors(shape, dtype, lo=0.0, hi=1.0,
                         specials=[0.0, 1.0, float("nan")] if draw(st.booleans()) else False))
        target = None
    else:
        y = None
        target = draw(_class_targets(tshape, C, opts["ignore_index"]))
        if draw(st.integers(0, 3)) == 0:
            # Some rows with -inf in every class but the target: the loss is exactly 0, the softmax one-hot.
            gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
            rows = torch.rand(tshape, generator=gen) < 0.5
            hot = TF.one_hot(target.clamp(0, C - 1), C).movedim(-1, cdim).bool()
            x = x.masked_fill(rows.unsqueeze(cdim) & ~hot, float("-inf"))
    inplace = draw(st.booleans())
    state = {}

    def ours(backend, x, y=None):
        if inplace:
            # A non-leaf copy, as logits usually are: the backward overwrites its storage with the gradient.
            x = state["logits"] = x.clone()
            state["backend"] = backend
        return F.cross_entropy(x, target if y is None else y, inplace_backward=inplace, backend=backend, **opts)

    def check(grads):
        # inplace_backward's contract: the logits' storage now holds their gradient (when the logits were
        # contiguous; otherwise a contiguous copy took it). The reference backend ignores the flag.
        logits = state.get("logits")
        if logits is not None and state["backend"] != "reference" and logits.is_contiguous():
            assert torch.equal(logits.detach(), grads["x"]), "inplace_backward: the logits do not hold the gradient"

    def ref(x, y=None):
        return fastnn.reference.cross_entropy(x, target if y is None else y, _like(opts["weight"], x),
                                              opts["ignore_index"], opts["reduction"], opts["label_smoothing"])

    return Case(fastnn=ours, torch=lambda x, y=None: TF.cross_entropy(x, target if y is None else y, **opts),
                reference=ref, inputs=dict(x=x) if y is None else dict(x=x, y=y), grad_inputs=("x", "y"),
                check=check, info=dict(target=target, inplace_backward=inplace, **opts))


@st.composite
def _linear_cross_entropy(draw, small):
    lead = draw(st.sampled_from([(0,), (1,), (2,), (3,), (7,), (2, 3)]))
    # V = 97: two class blocks (of 64) for the CPU's float32 kernel, split over two threads.
    D, V = draw(st.sampled_from([1, 3, 8])), draw(st.sampled_from([1, 2, 5, 33, 97]))
    if small:
        assume(_numel(lead) <= CE_SMALL_ROWS)
    dtype = draw(st.sampled_from(DTYPES))
    x = draw(tensors(lead + (D,), dtype, scale=draw(st.sampled_from([1.0, 5.0, 30.0])),
                     specials=draw(st.booleans())))
    w = draw(tensors((V, D), dtype, scale=draw(st.sampled_from([0.3, 3.0])), specials=draw(st.booleans())))
    b = draw(tensors((V,), dtype, specials=False)) if draw(st.booleans()) else None
    opts = draw(_ce_options(V, dtype))
    cw = opts.pop("weight")
    target = draw(_class_targets(lead, V, opts["ignore_index"]))
    # Small chunks so that rows straddle chunk boundaries (None: the default, one chunk here).
    chunk = draw(st.sampled_from([1, 2, 3, None]))

    def theirs(x, w, b=None):
        out = TF.cross_entropy(TF.linear(x, w, b).reshape(-1, V), target.reshape(-1), cw, **opts)
        return out.reshape(lead) if opts["reduction"] == "none" else out

    inputs = dict(x=x, w=w) if b is None else dict(x=x, w=w, b=b)
    return Case(
        fastnn=lambda backend, x, w, b=None: F.linear_cross_entropy(x, w, target, linear_bias=b, weight=cw,
                                                                     chunk_size=chunk, backend=backend, **opts),
        torch=theirs,
        reference=lambda x, w, b=None: fastnn.reference.linear_cross_entropy(x, w, target, linear_bias=b,
                                                                             weight=_like(cw, x), **opts),
        inputs=inputs, grad_inputs=("x", "w", "b"),
        info=dict(target=target, class_weight=cw, chunk_size=chunk, **opts),
        # dx = dlogits @ w sums V products of size |w| (identical rows of w cancel exactly in torch's order), dw
        # sums the rows' |x|; dlogits <= class weight.
        grad_atol=cancel_floor(dtype, V + _numel(lead), max(1.0, _absmax(cw)) * _absmax(w, x)),
        # The loss moves by the logits' rounding: D-term dot products of |x| |w| (GEMM order differs from torch's).
        out_atol=cancel_floor(dtype, D * max(1, _numel(lead)), max(1.0, _absmax(cw)) * _absmax(x) * _absmax(w)))


# ---- attention

ATTN_LENGTHS = [0, 1, 2, 3, 7, 16, 33]
ATTN_HEAD_DIMS = [1, 3, 7, 8, 16, 33]
ATTN_SMALL_HEADS = 2  # the interpreter: B * H programs of 128 x 128 tiles per kernel, ~0.1 s each


@st.composite
def _attention(draw, small):
    B, H = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 3]))
    Lq, Lk = draw(st.sampled_from(ATTN_LENGTHS)), draw(st.sampled_from(ATTN_LENGTHS))
    D = draw(st.sampled_from(ATTN_HEAD_DIMS))
    if small:
        assume(B * H <= ATTN_SMALL_HEADS)
    dtype = draw(st.sampled_from(DTYPES))
    unbatched = draw(st.booleans())
    lead = (H,) if unbatched else (B, H)
    # fastnn requires value's head dim to be the query's (documented; torch allows another Dv): Dv = D.
    specials = draw(st.booleans())
    q, k, v = (draw(tensors(lead + (L, D), dtype, scale=draw(st.sampled_from([0.3, 1.0, 5.0])), specials=specials))
               for L in (Lq, Lk, Lk))
    full = lead + (Lq, Lk)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    mask_kind = draw(st.sampled_from([None, "bool", "float"]))
    attn_mask = None
    if mask_kind is not None:
        # Every broadcastable shape: a suffix of (B, H, Lq, Lk) with some dims 1.
        n = draw(st.integers(0 if mask_kind == "float" else 1, len(full)))
        mshape = tuple(1 if draw(st.booleans()) else s for s in full[len(full) - n:])
        if mask_kind == "bool":
            attn_mask = torch.rand(mshape, generator=gen) < draw(st.sampled_from([0.3, 0.7, 1.0]))
        else:
            attn_mask = draw(tensors(mshape, dtype, specials=draw(st.booleans())))
            drop = torch.rand(mshape, generator=gen) < draw(st.sampled_from([0.0, 0.3, 0.8]))
            attn_mask = attn_mask.masked_fill(drop, float("-inf"))
    kpm = None
    if draw(st.booleans()):
        kpm = torch.rand(lead[:-1] + (Lk,), generator=gen) < draw(st.sampled_from([0.3, 1.0]))
    is_causal = draw(st.booleans())
    scale = draw(st.sampled_from([None, None, 0.1, 1.0, 2.5, -0.5]))

    # torch's SDPA takes neither key_padding_mask nor attn_mask together with is_causal: merge them into one
    # additive mask (top-left causal, torch's convention for Lq != Lk).
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    add = torch.zeros(full, dtype=acc)
    if attn_mask is not None:
        add = add + (torch.zeros(attn_mask.shape, dtype=acc).masked_fill(~attn_mask, float("-inf"))
                     if attn_mask.dtype == torch.bool else attn_mask.to(acc))
    if kpm is not None:
        add = add.masked_fill(kpm.reshape(lead[:-1] + (1, 1, Lk)), float("-inf"))
    if is_causal:
        add = add.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool).triu(1), float("-inf"))
    # fastnn's contract: a query row with nothing to attend - every key masked, or every score -inf (the kernel
    # cannot tell a -inf score from a masked key), or no keys at all - gives zeros and zero gradients where torch
    # gives NaN. torch gets such rows unmasked (finite values and gradients) and its output there is zeroed.
    eff = D ** -0.5 if scale is None else scale
    with torch.no_grad():
        scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * eff + add
        dead = (scores == float("-inf")).all(-1, keepdim=True)
        # A row whose scores are all NaN or -inf (a NaN in q or k with few keys): the result depends on the max
        # instruction - torch's fused CPU kernel, fastnn's native one and GPU max.f32 drop NaN (so: an empty row,
        # zeros), numpy under Triton's interpreter propagates it (NaN). Neither is a contract; not drawn.
        nan_rows = ((scores.isnan() | (scores == float("-inf"))).all(-1) & scores.isnan().any(-1)).any()
        # A +inf score (|q.k| > 3e38 from finite q and k, or an infinite key): softmax is inf / inf there, torch's
        # fused kernel returns the value or 0, its math backend and fastnn.reference NaN. Not a contract; not drawn.
        overflow = bool((scores == float("inf")).any())
        # A non-finite key or value at a key that is masked (or scores -inf) for some query: torch adds -inf to an
        # inf score or multiplies the value by p = 0 (NaN), fastnn's kernels skip masked keys or whole masked
        # blocks (finite). Not a contract; not drawn.
        dead_keys = ((scores == float("-inf")) | (add == float("-inf"))).any(-2)
        bad_kv = ~(k.isfinite().all(-1) & v.isfinite().all(-1)) if v.numel() else torch.zeros((), dtype=torch.bool)
        masked_bad_v = bool((dead_keys & bad_kv).any())
        # An inf/NaN value at a key whose probability is below the half dtype's smallest subnormal: the Triton
        # kernel rounds P to the input dtype for the P V product, as FlashAttention does (0 * inf = NaN), torch's
        # CPU kernel multiplies in float32 (inf). Not a contract; not drawn.
        flushed_bad_v = False
        if dtype in (torch.float16, torch.bfloat16) and v.numel():
            p32 = torch.softmax(scores, -1).nan_to_num(0.0)
            flushed = (p32 > 0) & (p32.to(dtype) == 0)
            flushed_bad_v = bool((flushed & ~v.isfinite().all(-1).unsqueeze(-2)).any())
    assume(not nan_rows and not overflow and not masked_bad_v and not flushed_bad_v)
    mask_dead = (add == float("-inf")).all(-1, keepdim=True)
    simple = kpm is None and not (is_causal and attn_mask is not None) and not dead.any()
    torch_mask = None if simple else add.masked_fill(mask_dead, 0.0).to(dtype)
    # dS = P (dP - delta) cancels terms of size |scale| |k| |v| sqrt(D) (dO ~ N(0, 1)): a few ulps of that.
    big = max([t.abs().max().item() for t in (q, k, v) if t.numel()] + [0.0])
    grad_atol = flash_cancel_floor(acc, eff, D, big, big) if math.isfinite(big) else 0.0

    def delta_bound(name, gs):  # FlashAttention's delta from the rounded output (tests/helpers.py)
        return flash_delta_bound(name, q, k, v, gs[0], dtype, eff, attn_mask, is_causal, kpm)

    def plain(q, k, v):  # torch in the input dtype, as the course layer computes attention
        s = (q @ k.transpose(-1, -2)) * eff + add.masked_fill(mask_dead, 0.0).to(q.dtype)
        return torch.where(dead, torch.zeros((), dtype=q.dtype), torch.softmax(s, -1) @ v)

    def theirs(q, k, v):
        if simple:  # torch's own broadcasting of attn_mask and its is_causal, as given (but at least 2-d: torch's
            # CPU kernel raises an IndexError for a broadcastable 0-d or 1-d mask, which fastnn takes)
            m = None if attn_mask is None else attn_mask.reshape((1,) * (2 - attn_mask.dim()) + attn_mask.shape)
            out = TF.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=is_causal, scale=scale)
        else:
            out = TF.scaled_dot_product_attention(q, k, v, attn_mask=torch_mask, scale=scale)
        return torch.where(dead, torch.zeros((), dtype=out.dtype), out)

    return Case(
        fastnn=lambda backend, q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, key_padding_mask=kpm, backend=backend),
        torch=theirs,
        reference=lambda q, k, v: fastnn.reference.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=eff,
            key_padding_mask=kpm),
        inputs=dict(q=q, k=k, v=v), grad_inputs=("q", "k", "v"),
        info=dict(attn_mask=attn_mask, key_padding_mask=kpm, is_causal=is_causal, scale=scale, rows_zeroed=dead.sum()),
        grad_atol=grad_atol, plain=(plain, lambda q, k, v: theirs(q.contiguous(), k.contiguous(), v.contiguous())),
        grad_bound=delta_bound)


# One line per op: name (for device_backends) -> strategy.
OPS = {
    "softmax": _softmax,
    "bce_with_logits": _bce,
    "lstm_cell": _lstm_cell,
    "lstm_layer": _lstm_layer,
    "cross_entropy": _cross_entropy,
    "linear_cross_entropy": _linear_cross_entropy,
    "attention": _attention,
}


# ------------------------------------------------------------------------------------------------ machinery


def _absmax(*ts) -> float:
    """Largest finite |value| over the tensors (0 if none): the size of the terms a gradient sums."""
    vals = [t.detach().double().abs().nan_to_num(0.0, 0.0, 0.0).max().item() for t in ts if t is not None and t.numel()]
    return max(vals + [0.0])


def _finite_or_zero(v: float) -> float:
    return v if math.isfinite(v) else 0.0


def cancel_floor(dtype, n_terms, term) -> float:
    """Absolute floor for a gradient that sums n_terms products of size <= term: a few ulps of each term, the
    error bound of a sum whose terms cancel (torch's own error there is often exactly 0 by luck of order, so
    "2x torch's error" alone cannot be the bound). dO ~ N(0, 1) bounds the upstream gradient by ~4."""
    return FLOOR[dtype] * n_terms * 4 * term


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _like(t, x):
    return None if t is None else t.to(x.dtype)


def _tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _compare(name, ours, theirs, ref64, atol=0.0, plain=()):
    """NaN and inf pattern exactly torch's; finite error at most 2x torch's own error (the larger of its fused op's
    and, if given, its plain implementation's) vs the float64 reference plus FLOOR relative to the reference's
    magnitude."""
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} != torch's {tuple(theirs.shape)}"
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} != torch's {theirs.dtype}"
    o, t, r = ours.double(), theirs.double(), ref64.double()
    # Where torch overflows an intermediate (inf, or inf - inf = NaN) but fastnn returns the float64 reference -
    # finite within FLOOR, or that reference rounded to the dtype (inf) - fastnn is right, not different.
    rd = r.to(ours.dtype).double()
    near = o.isfinite() & rd.isfinite() & ((o - r).abs() <= FLOOR[ours.dtype] * r.abs().clamp(min=1))
    fits = (t.isinf() | t.isnan()) & ~r.isnan() & (near | (o.isinf() & (o == rd)))
    assert torch.equal(o.isnan(), t.isnan() & ~fits), f"{name}: NaN pattern differs from torch\nours={o}\ntorch={t}"
    inf = (o.isinf() | t.isinf()) & ~fits
    assert torch.equal(o[inf], t[inf]), f"{name}: inf pattern differs from torch\nours={o}\ntorch={t}"
    ok = o.isfinite() & t.isfinite() & r.isfinite()
    if not ok.any():
        return
    err_o = (o - r)[ok].abs().max().item()
    err_t = (t - r)[ok].abs().max().item()
    for pl in plain:
        if pl is None:
            continue
        pl = pl.double()
        ok_p = ok & pl.isfinite()
        if ok_p.any():
            err_t = max(err_t, (pl - r)[ok_p].abs().max().item())
    bound = 2 * err_t + FLOOR[ours.dtype] * max(1.0, r[ok].abs().max().item()) + atol
    assert err_o <= bound, f"{name}: error {err_o:.3g} > 2 x torch's {err_t:.3g} + floor (bound {bound:.3g})"


def _to_device(obj, device, seen):
    """obj with every tensor it holds on ``device``: containers in place, functions through their closures (the
    tensors a strategy's lambdas captured: targets, weights, masks)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = _to_device(v, device, seen)
    elif isinstance(obj, list):
        obj[:] = [_to_device(v, device, seen) for v in obj]
    elif isinstance(obj, tuple):
        return tuple(_to_device(v, device, seen) for v in obj)
    elif isinstance(obj, types.FunctionType):
        for cell in obj.__closure__ or ():
            if id(cell) not in seen:
                seen.add(id(cell))
                try:
                    cell.cell_contents = _to_device(cell.cell_contents, device, seen)
                except ValueError:  # an empty cell
                    pass
    return obj


def run_case(case: Case, backend: str, device: str = "cpu") -> None:
    """Torch and the reference run on the CPU, where the strategies drew the tensors (on CUDA an out-of-range
    target is a device-side assert, not torch's IndexError); fastnn on ``device``."""
    names = list(case.inputs)

    def leaves(cast=None):
        out = {}
        for k, v in case.inputs.items():
            v = v.detach() if cast is None else v.detach().to(cast)
            out[k] = v.requires_grad_(k in case.grad_inputs)
        return out

    def on_device():
        if device != "cpu":
            seen = set()
            for f in dataclasses.fields(case):
                if f.name != "info":
                    _to_device(getattr(case, f.name), device, seen)
        return leaves()

    torch_in, ref_in = leaves(), leaves(torch.float64)
    try:
        expected = _tuple(case.torch(**torch_in))
    except (RuntimeError, IndexError, ValueError) as e:  # torch refuses the call: fastnn must refuse it too
        _event(f"torch refuses ({type(e).__name__})")
        with pytest.raises((RuntimeError, ValueError, TypeError, IndexError)):
            case.fastnn(backend, **on_device())
        return
    ref = _tuple(case.reference(**ref_in))
    plain_in = [leaves() for _ in case.plain]
    plain = [_tuple(fn(**inp)) for fn, inp in zip(case.plain, plain_in)]
    ours_in = on_device()
    ours = _tuple(case.fastnn(backend, **ours_in))
    for i, (a, b, r) in enumerate(zip(ours, expected, ref)):
        _compare(f"output {i}", a.detach().to(b.device), b.detach(), r.detach(), case.out_atol,
                 plain=[pl[i].detach() for pl in plain])
    # Gradients only where everything is finite (torch's own inf/NaN gradients are not a contract).
    if not all(torch.isfinite(t).all() for t in (*case.inputs.values(), *expected, *ref)):
        _event("gradients not compared")
        return
    grads_wrt = [k for k in names if k in case.grad_inputs]
    if not grads_wrt or not any(o.requires_grad for o in ours):
        return
    gen = torch.Generator().manual_seed(1)
    gs = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in ours]

    def grads(outs, inp):
        pairs = [(o, g.to(o.device, o.dtype)) for o, g in zip(outs, gs) if o.requires_grad]
        return torch.autograd.grad([o for o, _ in pairs], [inp[k] for k in grads_wrt], [g for _, g in pairs],
                                   allow_unused=True)

    g_ours, g_torch, g_ref = grads(ours, ours_in), grads(expected, torch_in), grads(ref, ref_in)
    g_plain = [grads(pl, inp) for pl, inp in zip(plain, plain_in)]
    compared = 0
    for i, (k, a, b, r) in enumerate(zip(grads_wrt, g_ours, g_torch, g_ref)):
        if b is None or r is None:
            continue
        assert a is not None, f"grad {k}: fastnn gave none"
        if not (r.isfinite().all() and b.isfinite().all()):
            continue
        atol = case.grad_atol + (case.grad_bound(k, [g.to(device) for g in gs]) if case.grad_bound else 0.0)
        _compare(f"grad {k}", a.to(b.device), b, r, atol, plain=[gp[i] for gp in g_plain])
        compared += 1
    _event("gradients compared" if compared else "gradients not compared")
    if case.check is not None:
        case.check(dict(zip(grads_wrt, g_ours)))


def _event(what: str) -> None:
    # Counted in --hypothesis-show-statistics; the regression tests below call run_case outside hypothesis.
    if currently_in_test_context():
        event(what)


def _params():
    # CPU ids stay "<op>-<backend>"; CUDA ones (marked cuda) read "<op>-cuda-<backend>".
    return [pytest.param(op, *p.values, marks=p.marks, id=f"{op}-{p.values[1]}" if p.values[0] == "cpu" else
                         f"{op}-{p.values[0]}-{p.values[1]}")
            for op in OPS for p in device_backends(op, reference=True)]


@pytest.mark.parametrize("op,device,backend", _params())
@given(data=st.data())
def test_fuzz(op, device, backend, data):
    case = data.draw(OPS[op](small=backend == "triton" and device == "cpu"), label="case")
    run_case(case, backend, device)


# ---- regressions found by the fuzz and the contract tests, kept shrunk


def _cpu_backends(op):
    return [p.values[1] for p in device_backends(op, reference=True) if p.values[0] == "cpu"]


def _same_call_case(name, inputs, **kw):
    """The call fastnn.functional.<name>(*inputs, **kw) beside torch's and fastnn.reference's, every input
    differentiated."""
    return Case(fastnn=lambda backend, **t: getattr(F, name)(*t.values(), backend=backend, **kw),
                torch=lambda **t: getattr(TF, name)(*t.values(), **kw),
                reference=lambda **t: getattr(fastnn.reference, name)(*t.values(), **kw),
                inputs=inputs, grad_inputs=tuple(inputs))


@pytest.mark.parametrize("backend", _cpu_backends("bce_with_logits"))
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_bce_infinite_target_without_pos_weight(backend, reduction):
    # The native kernel computed the positive term's weight as 1 + (pos_weight - 1) * y with pos_weight = 1 when
    # absent: 0 * inf = NaN where torch gives -inf / +inf (forward and d/dx).
    x = torch.tensor([0.5, -1.0, 2.0, 0.3])
    y = torch.tensor([float("inf"), float("-inf"), 0.5, 1e4])
    run_case(_same_call_case("binary_cross_entropy_with_logits", dict(x=x, y=y), reduction=reduction), backend)


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
    for backend in _cpu_backends("lstm_cell"):
        run_case(case, backend)


@pytest.mark.parametrize("backend", _cpu_backends("cross_entropy"))
@pytest.mark.parametrize("ignore_index", [0, 2])
def test_cross_entropy_probability_target_refuses_class_ignore_index(backend, ignore_index):
    # torch raises "ignore_index is not supported for floating point target" for ignore_index >= 0; fastnn
    # silently ignored it. (Negative values pass on both sides.)
    x, y = torch.tensor([1.541, 0.3, -2.0]), torch.tensor([0.97, 0.01, 0.02])
    run_case(_same_call_case("cross_entropy", dict(x=x, y=y), ignore_index=ignore_index), backend)


def _sdpa_case(q, k, v, **kw):
    return _same_call_case("scaled_dot_product_attention", dict(q=q, k=k, v=v), **kw)


@pytest.mark.parametrize("backend", _cpu_backends("attention"))
@pytest.mark.parametrize("Lq", [0, 3])
def test_attention_no_keys(backend, Lq):
    # fastnn.reference took amax over the empty key dim (an IndexError); no keys means zeros, as torch.
    q, k = torch.tensor([0.4623, -0.088, 0.5]).expand(1, 1, Lq, 3), torch.empty(1, 1, 0, 3)
    run_case(_sdpa_case(q, k, k), backend)


@pytest.mark.parametrize("backend", _cpu_backends("attention"))
def test_attention_masked_row_with_infinite_value(backend):
    # Triton (and CUDA) divided the accumulator of a fully masked row by 1 instead of writing zeros: 0 * inf = NaN
    # there, where torch and the contract give zeros. Row 0 attends nothing; row 1 attends key 1 only.
    q = torch.tensor([[[[0.4623, 1.0], [0.3, -0.2]]]])
    k = torch.tensor([[[[0.4623, 0.5], [1.0, 2.0]]]])
    v = torch.tensor([[[[float("inf"), 1.0], [0.5, -1.0]]]])
    mask = torch.tensor([[False, False], [False, True]])
    case = _sdpa_case(q, k, v, attn_mask=mask)
    # fastnn's documented contract for the masked row: zeros (torch: NaN here, zeros with finite values).
    case.torch = lambda q, k, v: torch.where(~mask.any(-1, keepdim=True), 0.0,
                                             TF.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    run_case(case, backend)


# Shrunk cross_entropy rows: (logits, target, label_smoothing), each with what it found.
CE_REGRESSIONS = {
    # Found by the fuzz (linear_cross_entropy, x = 1e4, equal weight rows): two tied logits of 9000.3 gave
    # p = 0.5001 / 0.4999 when the backward read a float32 logsumexp (rounded to ulp(9000)); torch's log_softmax
    # ((x - m) - log s) gives 0.5. The kernels now save the row's (max, log-sum) pair.
    "large_tied_logits": ([[9000.3, 9000.3, -5.0]], [0], 0.0),
    # fastnn.reference added eps / C * (all-class loss) with eps = 0: 0 * inf = NaN for a -inf logit; torch: 0.
    "minus_inf_logit_without_smoothing": ([1.541, float("-inf")], 0, 0.0),
    # Dedicated run (Triton): logits (3e38, 3e38). stats = m + log(2) rounds to m at that size (even in float64), and
    # exp(x - stats) gave p = 1 for both classes; the (max, log-sum) pair keeps 0.5.
    "tied_logits_at_float_max": ([3e38, 3e38], 0, 0.0),
    # Dedicated run (linear_cross_entropy, Triton): logits ~ +-1e38 with smoothing. The smoothing sum overflows
    # (torch: inf); the single-pass kernel's two offset sums both overflowed and gave inf - inf = NaN.
    "smoothing_overflow_is_inf": ([[1.3869e+38, -2.6400e+37, -1.9608e+38, 5.1150e+37, -9.7620e+37]], [4], 0.1),
    # Dedicated run (Triton): logits (3e38, -0.29), target 1. The loss, 2.85e38, fits (torch: finite) but the
    # kernel's W (m - pivot) = 2 * 3e38 overflowed: inf.
    "smoothing_sum_fits_after_overflow": ([3e38, -0.29343], 1, 0.1),
    # Dedicated run (Triton): probabilities with a first logit of -3e38 (the old pivot): torch's loss 2.9e38, the
    # kernel's offsets from that pivot overflowed (inf). The sums are now offsets from the running max.
    "probabilities_with_minus_huge_first_logit": ([-3e38, -0.29343, -2.1788], [0.9701, 0.7078, 0.4594], 0.0),
}


@pytest.mark.parametrize("backend", _cpu_backends("cross_entropy"))
@pytest.mark.parametrize("row", list(CE_REGRESSIONS))
def test_cross_entropy_regression_rows(backend, row):
    x, t, eps = CE_REGRESSIONS[row]
    x, t = torch.tensor(x), torch.tensor(t)
    opts = dict(reduction="none", label_smoothing=eps)
    case = Case(fastnn=lambda backend, x: F.cross_entropy(x, t, backend=backend, **opts),
                torch=lambda x: TF.cross_entropy(x, t, **opts),
                reference=lambda x: fastnn.reference.cross_entropy(x, t, **opts),
                inputs=dict(x=x), grad_inputs=("x",))
    run_case(case, backend)


@pytest.mark.parametrize("backend", _cpu_backends("linear_cross_entropy"))
def test_linear_cross_entropy_single_class_gradient_is_zero(backend):
    # Found by the dedicated run (native): with one class p = 1 and torch's gradient is exactly 0; the fused
    # backward's w_t p - w_t, contracted to an FMA, left an ulp per row (1e-5 in grad_weight over 7 rows). The
    # target's entry is now computed as w_t (p - 1).
    x = torch.tensor([[19.8406], [8.0077], [1.8503], [18.6395], [-13.5572], [-4.9839], [-45.6831]])
    w, t, cw = torch.tensor([[0.4623]]), torch.zeros(7, dtype=torch.long), torch.tensor([2.8995])
    case = Case(fastnn=lambda backend, x, w: F.linear_cross_entropy(x, w, t, weight=cw, chunk_size=1,
                                                                    reduction="none", backend=backend),
                torch=lambda x, w: TF.cross_entropy(TF.linear(x, w), t, cw, reduction="none"),
                reference=lambda x, w: fastnn.reference.linear_cross_entropy(x, w, t, weight=cw.double(),
                                                                             reduction="none"),
                inputs=dict(x=x, w=w), grad_inputs=("x", "w"))
    run_case(case, backend)


@pytest.mark.parametrize("backend", _cpu_backends("bce_with_logits"))
def test_bce_pos_weight_target_gradient_at_float_max(backend):
    # Dedicated run (reference): x = -3e38, y = 0.97, pos_weight. The target's gradient, weight ((pos_weight - 1)
    # softplus(-x) - x), fits (torch: 1.06e38), but fastnn.reference scaled its two terms by the weight apart and
    # they met as inf - inf = NaN. It now groups them before the weight.
    # (x = +inf: the grouped form is inf - inf there; the reference keeps the plain one for infinite x.)
    x, y = torch.tensor([-3e38, 0.5, float("inf")]), torch.tensor([0.9701, 0.2, 0.9701])
    w, pw = torch.tensor([10.0, 1.0, 1.0]), torch.tensor([0.035, 2.0, 2.0])
    case = Case(fastnn=lambda backend, x, y: F.binary_cross_entropy_with_logits(x, y, w, reduction="none",
                                                                               pos_weight=pw, backend=backend),
                torch=lambda x, y: TF.binary_cross_entropy_with_logits(x, y, w, reduction="none", pos_weight=pw),
                reference=lambda x, y: fastnn.reference.binary_cross_entropy_with_logits(
                    x, y, _like(w, x), "none", _like(pw, x)),
                inputs=dict(x=x, y=y), grad_inputs=("x", "y"))
    run_case(case, backend)


@pytest.mark.parametrize("backend", _cpu_backends("linear_cross_entropy"))
def test_linear_cross_entropy_float16_logit_overflow(backend):
    # Dedicated run (reference): float16 logits of 4.6e5 are inf in torch's logits and in the fused kernels'
    # chunks (a NaN loss); fastnn.reference kept them in float32 (0.151, 2% off the float64 loss). It now rounds
    # the logits to the input's dtype, as they are held.
    h = torch.float16
    x, w = torch.tensor([[46.2188], [0.5]], dtype=h), torch.tensor([[1e4], [1e4]], dtype=h)
    b, t = torch.tensor([1.541, -0.2935], dtype=h), torch.tensor([0, 1])
    case = Case(fastnn=lambda backend, x, w, b: F.linear_cross_entropy(x, w, t, linear_bias=b, reduction="none",
                                                                       chunk_size=1, backend=backend),
                torch=lambda x, w, b: TF.cross_entropy(TF.linear(x, w, b), t, reduction="none"),
                reference=lambda x, w, b: fastnn.reference.linear_cross_entropy(x, w, t, linear_bias=b,
                                                                                reduction="none"),
                inputs=dict(x=x, w=w, b=b), grad_inputs=("x", "w", "b"))
    run_case(case, backend)


@pytest.mark.parametrize("backend", _cpu_backends("attention"))
def test_attention_tied_large_scores(backend):
    # Dedicated run (native): two keys of 3e38 with D = 1 gave twice torch's grad k and a NaN grad q. The saved
    # stats = m + log(2) rounds to m at that size, so the backward's P was 1 for both keys; at scores of 9000.25 it
    # was already off by ulp(9000) / 2. The kernels now save m and log(l) apart (cross-entropy's fix).
    q = torch.tensor([[[[1.0]], [[-0.088]]]])
    k = torch.tensor([[[[9000.25], [9000.25]], [[3e38], [3e38]]]])
    v = torch.tensor([[[[7.705], [-1.4671]], [[-10.8939], [2.8422]]]])
    run_case(_sdpa_case(q, k, v), backend)


@pytest.mark.parametrize("backend", _cpu_backends("attention"))
@pytest.mark.parametrize("case", ["reference", "native"])
def test_attention_masked_key_with_overflowing_score(backend, case):
    # Dedicated run: q.k of a key the bool mask hides overflows to +inf (2.31 * 3e38, 1.54 * 3e38); the mask, made
    # additive, gave inf + -inf = NaN for the whole row (torch: the unmasked key's value) - found in the reference,
    # then in the native kernel (CUDA and Triton add the mask the same way). A -inf entry now masks its key
    # whatever the score.
    if case == "reference":
        q, k = torch.tensor([[[-2.3104, 0.5]]]), torch.tensor([[[-3e38, 0.1], [0.2, 0.3], [0.4, -0.5]]])
        v = torch.tensor([[[-0.6931, 0.25], [0.0461, -0.19], [-0.0275, 0.1669]]])
        mask, scale = [False, False, True], None
    else:
        q, k, v = torch.tensor([[[1.541]]]), torch.tensor([[[0.4623], [3e38]]]), torch.tensor([[[0.4623], [-0.088]]])
        mask, scale = [True, False], 0.1
    run_case(_sdpa_case(q, k, v, attn_mask=torch.tensor(mask), scale=scale), backend)


@pytest.mark.parametrize("backend", _cpu_backends("cross_entropy"))
def test_cross_entropy_smoothing_loss_near_float_max(backend):
    # Dedicated run (Triton; native and CUDA the same): logits (3e38, -0.29, -2.18), weights, label_smoothing 1.
    # The loss, eps/C (W stats - sum w x) = 3.2e38, fits (torch: NaN, 0 * inf), but the kernels' sum of w (x - m),
    # 9.7e38, overflowed before the 1/C: inf. The class share eps / C is now taken inside the sum.
    x, t, w = torch.tensor([3e38, -0.29343, -2.1788]), torch.tensor(2), torch.tensor([1.6679, 1.3261, 1.9077])
    opts = dict(reduction="none", label_smoothing=1.0)
    case = Case(fastnn=lambda backend, x: F.cross_entropy(x, t, w, backend=backend, **opts),
                torch=lambda x: TF.cross_entropy(x, t, w, **opts),
                reference=lambda x: fastnn.reference.cross_entropy(x, t, _like(w, x), **opts),
                inputs=dict(x=x), grad_inputs=("x",))
    run_case(case, backend)


@pytest.mark.parametrize("backend", _cpu_backends("attention"))
def test_attention_masked_row_gradient_with_huge_value(backend):
    # Dedicated run (native, then Triton): a row with every key masked and a finite value of 3e38: dP = dO V
    # overflows and the backward's dS = P (dP - delta) = 0 * inf was NaN in grad q, where the contract (and torch,
    # given the row unmasked and zeroed) gives 0. dS is now 0 on such rows. Eight rows, so that some dO overflows.
    q = torch.linspace(-1.0, 1.0, 24).reshape(1, 1, 8, 3)
    k = torch.tensor([[[[0.4623, -0.088, -0.6536]]]])
    v = torch.tensor([[[[3e38, -3e38, 3e38]]]])
    mask = torch.tensor([False])
    case = _sdpa_case(q, k, v, attn_mask=mask)
    case.torch = lambda q, k, v: q * 0 + (k.sum() + v.sum()) * 0  # the contract: zeros, zero gradients
    run_case(case, backend)


@pytest.mark.parametrize("backend", _cpu_backends("attention"))
def test_attention_backward_scores_in_forward_units(backend):
    # Dedicated run (Triton, float64): tied scores of 1e8 (q = k = 1e4, D = 1) gave a grad k 11x torch's error, and
    # one key of -3e38 against 16 queries NaN grad q rows where torch's is 0. The Triton forward computed the row max
    # m in base 2 and saved m ln(2); the backward's m ln(2) log2(e) missed the recomputed s log2(e) by an ulp of m:
    # 3e-8 at 1e8, past 2^62 an exp2 overflow. Its stats are now kept in base 2, as computed.
    q = torch.tensor([[[[1e4]]]], dtype=torch.float64)
    k = torch.tensor([[[[1e4], [1e4]]]], dtype=torch.float64)
    v = torch.tensor([[[[0.4623], [-0.088]]]], dtype=torch.float64)
    run_case(_sdpa_case(q, k, v), backend)
    q = torch.tensor([-0.6931, -0.112, -0.3182, 0.2999, -0.2652, -0.3827, -0.187, -0.2599],
                     dtype=torch.float64).reshape(1, 1, 8, 1)
    k, v = torch.tensor([[[[-3e38]]]], dtype=torch.float64), torch.tensor([[[[0.4623]]]], dtype=torch.float64)
    run_case(_sdpa_case(q, k, v), backend)
