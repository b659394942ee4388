"""Chunked linear + cross-entropy against fastnn.reference (logits materialized) in float64, forward and the
gradients of input, weight and bias, through every backend."""
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import fastnn
import fastnn.functional as F
from helpers import assert_matches, assert_raises_naming, device_backends

# (N, D, V, chunk_size)
SIZES = [
    (1, 3, 5, None),      # one row
    (7, 4, 2, 3),         # chunks of 3 over 7 rows: a short last chunk
    (113, 16, 123, 32),   # odd sizes, four chunks
    (9, 8, 5000, 4),      # rows longer than one Triton block
    # The float32 CPU kernel: three class blocks of 64 (the last 22), 20 features (a partial panel of 16), tiles
    # of 24 rows (the last 13: row tiles of 6, 6, 1).
    (61, 20, 150, 24),
    (600, 8, 70, None),   # the default chunk: tiles of 512 rows and 88
    (13, 600, 150, None),  # D > 512: the CPU kernel's logits sum two depth blocks (onto the bias, if any)
]
OPTIONS = [  # (bias, class_weight, ignored, label_smoothing, reduction)
    (True, False, False, 0.0, "mean"),
    (False, True, True, 0.0, "mean"),
    (True, True, True, 0.2, "sum"),
    (True, False, True, 0.1, "none"),
]


def make_case(N, D, V, bias, cw, ignored, device, dtype):
    x = torch.randn(N, D, dtype=torch.float64, device=device).to(dtype)
    w = (torch.randn(V, D, dtype=torch.float64, device=device) / D ** 0.5).to(dtype)
    b = torch.randn(V, dtype=torch.float64, device=device).to(dtype) if bias else None
    t = torch.randint(0, V, (N,), device=device)
    if ignored:
        t = torch.where(torch.rand(N, device=device) < 0.2, torch.full_like(t, -100), t)
    c = (torch.rand(V, dtype=torch.float64, device=device) + 0.5).to(dtype) if cw else None
    return x, w, b, t, c


def run(fn, x, w, b, g=None):
    leaves = [v.detach().clone().requires_grad_() for v in (x, w) + ((b,) if b is not None else ())]
    out = fn(*leaves)
    if g is None:
        g = torch.randn(out.shape, dtype=torch.float64, device=x.device).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, g)
    return out.detach(), grads, g


def backend_sizes():
    # Triton's interpreter runs one program per row at a few ms each: fewer rows, the same paths.
    out = []
    for p in device_backends("linear_cross_entropy"):
        interp = p.values == ("cpu", "triton")
        for size in SIZES:
            if interp and size[0] > 10:
                size = (10, size[1], size[2], 4)
            out.append(pytest.param(*p.values, *size, marks=p.marks, id=f"{p.id}-{size}"))
    return out


@pytest.mark.parametrize("device,backend,N,D,V,chunk", backend_sizes())
@pytest.mark.parametrize("bias,cw,ignored,smoothing,reduction", OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(device, backend, N, D, V, chunk, bias, cw, ignored, smoothing, reduction, dtype):
    # The recomputing backward at every size; test_grad_in_forward_matches_the_recomputing_backward takes the
    # other path (the CPU's default for a scalar loss) over the same sizes.
    x, w, b, t, c = make_case(N, D, V, bias, cw, ignored, device, dtype)
    kw = dict(ignore_index=-100, reduction=reduction, label_smoothing=smoothing)

    def ref(x_, w_, b_=None):
        return fastnn.reference.linear_cross_entropy(x_, w_, t, linear_bias=b_,
                                                     weight=None if c is None else c.double(), **kw)

    def ours(x_, w_, b_=None):
        return F.linear_cross_entropy(x_, w_, t, linear_bias=b_, weight=c, chunk_size=chunk, backend=backend,
                                      grad_in_forward=False, **kw)

    r, rg, g = run(ref, x.double(), w.double(), None if b is None else b.double())
    o, og, _ = run(ours, x, w, b, g.to(dtype))
    assert o.dtype == dtype
    assert_matches(o, r)
    for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), og, rg):
        assert_matches(a, e, name=name)


# Which of (input, weight, bias) require grad: a linear probe on detached features, a frozen head, the bias alone.
WANTED = [(False, True, True), (True, False, False), (True, False, True), (False, False, True), (True, True, False)]


@pytest.mark.parametrize("device,backend", device_backends("linear_cross_entropy"))
@pytest.mark.parametrize("wanted", WANTED)
# float32 takes the CPU kernel (V = 150: class blocks for both threads), float64 the chunk loop.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_only_the_gradients_asked_for(device, backend, wanted, dtype):
    x, w, b, t, c = make_case(10 if backend == "triton" else 61, 20, 150, True, True, True, device, dtype)
    kw = dict(label_smoothing=0.1, weight=c)
    leaves = [v.detach().clone().requires_grad_(want) for v, want in zip((x, w, b), wanted)]
    asked = [v for v in leaves if v.requires_grad]
    g = torch.autograd.grad(F.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2], chunk_size=24,
                                                   backend=backend, grad_in_forward=False, **kw), asked)
    ref = [v.double().requires_grad_(v.requires_grad) for v in leaves]
    rg = torch.autograd.grad(fastnn.reference.linear_cross_entropy(ref[0], ref[1], t, linear_bias=ref[2],
                                                                   label_smoothing=0.1, weight=c.double()),
                             [v for v in ref if v.requires_grad])
    for a, e in zip(g, rg):
        assert_matches(a, e)
    # The op itself computes only those: the others come back empty.
    fwd, bwd = ((torch.ops.fastnn.linear_cross_entropy_fwd_triton, torch.ops.fastnn.linear_cross_entropy_bwd_triton)
                if backend == "triton" else
                (torch.ops.fastnn.linear_cross_entropy_fwd, torch.ops.fastnn.linear_cross_entropy_bwd))
    loss, stats = fwd(x, w, b, t, c, -100, 0.1, 24)
    out = bwd(torch.ones_like(loss), x, w, b, t, c, stats, -100, 0.1, 24, list(wanted))
    for o, v, want in zip(out, (x, w, b), wanted):
        assert o.shape == (v.shape if want else (0,))


@pytest.mark.parametrize("device,backend", device_backends("linear_cross_entropy"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,D,V,chunk", [
    (12, 32, 300, 5),     # three chunks of logits, the last short
    (70, 136, 260, 32),   # the half-precision weight-gradient product with unaligned tiles: ragged V and D
                          # tiles, chunks of the 32-row step, summed over three chunks in float32
    (40, 48, 320, 16),    # and with the aligned ones (V, D multiples of 16): ragged, chunks under its 64-row step
])
@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_low_precision(device, backend, dtype, N, D, V, chunk, grad_in_forward):
    # Within twice torch's error, the weight gradient summed over the chunks in float32, made in the backward or
    # in the forward.
    x, w, b, t, _ = make_case(N, D, V, True, False, True, device, dtype)

    def fn(f):
        return lambda x_, w_, b_: f(x_, w_, t, linear_bias=b_, label_smoothing=0.1)

    r, rg, g = run(fn(fastnn.reference.linear_cross_entropy), x.double(), w.double(), b.double())
    o, og, _ = run(fn(lambda *a, **k: F.linear_cross_entropy(*a, **k, chunk_size=chunk, backend=backend,
                                                            grad_in_forward=grad_in_forward)), x, w, b, g.to(dtype))
    th, tg, _ = run(lambda x_, w_, b_: TF.cross_entropy(TF.linear(x_, w_, b_), t, label_smoothing=0.1), x, w, b,
                    g.to(dtype))
    assert_matches(o, r, torch_out=th)
    for name, a, e, tt in zip(("grad_input", "grad_weight", "grad_bias"), og, rg, tg):
        assert_matches(a, e, torch_out=tt, name=name, atol_floor=1e-3)


@pytest.mark.parametrize("device,backend", device_backends("linear_cross_entropy"))
def test_batched_input_and_reduction_none(device, backend):
    # (..., D) hidden states, as a decoder produces: the loss keeps the leading shape.
    x, w, b, t, _ = make_case(12, 6, 17, True, False, True, device, torch.float64)
    x3, t3 = x.reshape(3, 4, 6), t.reshape(3, 4)
    out = F.linear_cross_entropy(x3, w, t3, linear_bias=b, reduction="none", chunk_size=5, backend=backend)
    assert out.shape == (3, 4)
    torch.testing.assert_close(out, TF.cross_entropy(TF.linear(x3, w, b).transpose(1, 2), t3, reduction="none"))


@pytest.mark.parametrize("threads,V", [
    (1, 150),  # one thread takes every class block
    (3, 150),  # three threads, a block each: three grad_input shares and three sets of statistics to merge
    (3, 200),  # four blocks over three threads: one thread takes two
    (3, 100),  # two blocks for three threads: the kernel leaves this to the BLAS and the row kernel
])
def test_native_float32_thread_counts(threads, V):
    x, w, b, t, c = make_case(37, 24, V, True, True, True, "cpu", torch.float32)
    kw = dict(reduction="sum", label_smoothing=0.1)
    r, rg, g = run(lambda x_, w_, b_: fastnn.reference.linear_cross_entropy(x_, w_, t, linear_bias=b_,
                                                                            weight=c.double(), **kw),
                   x.double(), w.double(), b.double())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        o, og, _ = run(lambda x_, w_, b_: F.linear_cross_entropy(x_, w_, t, linear_bias=b_, weight=c,
                                                                 backend="native", grad_in_forward=False, **kw),
                       x, w, b, g.float())
    finally:
        torch.set_num_threads(before)
    assert_matches(o, r)
    for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), og, rg):
        assert_matches(a, e, name=name)


@pytest.mark.parametrize("device,backend", device_backends("linear_cross_entropy"))
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_minus_inf_logits_in_a_whole_class_block(device, backend, smoothing):
    # A bias of -inf on the first 64 classes: the float32 CPU kernel's first block of classes is all -inf for
    # every row (x - max is NaN there), the targets lie in the second. torch: a finite loss, or +inf with smoothing.
    x, w, b, _, _ = make_case(9, 8, 97, True, False, False, device, torch.float32)
    b[:64] = float("-inf")
    t = torch.randint(64, 97, (9,), device=device)
    kw = dict(reduction="none", label_smoothing=smoothing)
    expect = TF.cross_entropy(TF.linear(x, w, b), t, **kw)
    got = F.linear_cross_entropy(x, w, t, linear_bias=b, backend=backend, **kw)
    torch.testing.assert_close(got, expect)
    if smoothing == 0:  # (with smoothing torch's gradient is NaN: inf - inf)
        leaves = [v.clone().requires_grad_() for v in (x, w)]
        g_ref = torch.autograd.grad(TF.cross_entropy(TF.linear(*leaves, b), t, **kw).sum(), leaves)
        g = torch.autograd.grad(F.linear_cross_entropy(*leaves, t, linear_bias=b, backend=backend, **kw).sum(),
                                leaves)
        for a, e in zip(g, g_ref):
            torch.testing.assert_close(a, e)


# ---- grad_in_forward: the gradients made in the forward (fastnn::linear_cross_entropy_fwd_grad)

@pytest.mark.parametrize("device,backend,N,D,V,chunk", backend_sizes())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias,cw,ignored,smoothing,reduction", [o for o in OPTIONS if o[4] != "none"])
def test_grad_in_forward_matches_the_recomputing_backward(device, backend, N, D, V, chunk, dtype, bias, cw, ignored,
                                                          smoothing, reduction):
    # The same loss and gradients as the recomputing path and the reference, scaled by a non-unit upstream
    # gradient, over ragged chunks; the loss is computed before the backward is asked for.
    x, w, b, t, c = make_case(N, D, V, bias, cw, ignored, device, dtype)

    def fn(gif):
        return lambda *v: 2.5 * F.linear_cross_entropy(v[0], v[1], t, linear_bias=v[2] if bias else None, weight=c,
                                                       reduction=reduction, label_smoothing=smoothing,
                                                       chunk_size=chunk, backend=backend, grad_in_forward=gif)

    out, grads, _ = run(fn(True), x, w, b, torch.ones((), dtype=dtype, device=device))
    o2, g2, _ = run(fn(False), x, w, b, torch.ones((), dtype=dtype, device=device))
    torch.testing.assert_close(out, o2)
    for a, e in zip(grads, g2):
        torch.testing.assert_close(a, e)
    ref, rg, _ = run(lambda *v: 2.5 * fastnn.reference.linear_cross_entropy(
        v[0], v[1], t, linear_bias=v[2] if bias else None, weight=None if c is None else c.double(),
        reduction=reduction, label_smoothing=smoothing), x.double(), w.double(), None if b is None else b.double(),
        torch.ones((), dtype=torch.float64, device=device))
    assert_matches(out, ref)
    for a, e in zip(grads, rg):
        assert_matches(a, e)


@pytest.mark.parametrize("device,backend", device_backends("linear_cross_entropy"))
@pytest.mark.parametrize("wanted", [(True, False, False), (False, True, True), (False, False, True)])
def test_grad_in_forward_only_the_gradients_asked_for(device, backend, wanted):
    x, w, b, t, c = make_case(9, 6, 11, True, True, True, device, torch.float64)
    leaves = [v.detach().clone().requires_grad_(want) for v, want in zip((x, w, b), wanted)]
    asked = [v for v in leaves if v.requires_grad]
    kw = dict(linear_bias=leaves[2], weight=c, label_smoothing=0.1, chunk_size=4, backend=backend)
    g = torch.autograd.grad(F.linear_cross_entropy(leaves[0], leaves[1], t, grad_in_forward=True, **kw), asked)
    e = torch.autograd.grad(F.linear_cross_entropy(leaves[0], leaves[1], t, **kw), asked)
    for a, b_ in zip(g, e):
        torch.testing.assert_close(a, b_)
    op = (torch.ops.fastnn.linear_cross_entropy_fwd_grad_triton if backend == "triton" else
          torch.ops.fastnn.linear_cross_entropy_fwd_grad)
    out = op(x, w, b, t, c, torch.ones(9, dtype=torch.float64, device=device), -100, 0.1, 4, list(wanted))
    for o, v, want in zip(out[1:], (x, w, b), wanted):
        assert o.shape == (v.shape if want else (0,))


def test_grad_in_forward_elsewhere_changes_nothing():
    # No grad asked (no_grad, or nothing requires it), reduction="none", probabilities: the usual path, the same
    # results; a non-bool is refused.
    x, w, b, t, _ = make_case(9, 6, 11, True, False, True, "cpu", torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(F.linear_cross_entropy(x.requires_grad_(), w, t, grad_in_forward=True),
                                   F.linear_cross_entropy(x, w, t))
    x.requires_grad_(False)
    torch.testing.assert_close(F.linear_cross_entropy(x, w, t, grad_in_forward=True), F.linear_cross_entropy(x, w, t))
    xl = x.clone().requires_grad_()
    out = F.linear_cross_entropy(xl, w, t, reduction="none", grad_in_forward=True)
    assert out.shape == (9,) and out.grad_fn is not None
    torch.testing.assert_close(out, F.linear_cross_entropy(x, w, t, reduction="none"))
    y = torch.softmax(torch.randn(9, 11, dtype=torch.float64), 1)
    torch.testing.assert_close(F.linear_cross_entropy(xl, w, y, grad_in_forward=True), F.linear_cross_entropy(x, w, y))
    assert_raises_naming(lambda: F.linear_cross_entropy(xl, w, t, grad_in_forward=1), TypeError, ["grad_in_forward"])


def test_grad_in_forward_bad_input_raises():
    x, w, _, t, _ = make_case(9, 6, 11, False, False, False, "cpu", torch.float32)
    t[4] = 11
    with pytest.raises(IndexError):
        F.linear_cross_entropy(x.requires_grad_(), w, t, grad_in_forward=True)
    t[4] = 0
    for op in (torch.ops.fastnn.linear_cross_entropy_fwd_grad, torch.ops.fastnn.linear_cross_entropy_fwd_grad_triton):
        if op is torch.ops.fastnn.linear_cross_entropy_fwd_grad_triton and not [
                p for p in device_backends("linear_cross_entropy") if p.values == ("cpu", "triton")]:
            continue
        for g in (torch.ones(8), torch.ones(9, dtype=torch.float64)):  # one value per row, in float32
            assert_raises_naming(lambda: op(x.detach(), w, None, t, None, g, -100, 0.0, 4, [True, True, False]),
                                 (RuntimeError, ValueError), ["grad_loss"])


@pytest.mark.parametrize("suffix", ["", "_triton"])
def test_grad_in_forward_opcheck(suffix):
    if suffix and not [p for p in device_backends("linear_cross_entropy") if p.values == ("cpu", "triton")]:
        pytest.skip("no Triton on CPU here")
    x, w, b, t, c = make_case(7, 4, 9, True, True, True, "cpu", torch.float32)
    for mask in ([True, True, True], [False, True, False]):
        torch.library.opcheck(getattr(torch.ops.fastnn, "linear_cross_entropy_fwd_grad" + suffix),
                              (x, w, b, t, c, torch.full((7,), 0.25), -100, 0.1, 3, mask))


@pytest.mark.parametrize("device,backend", device_backends("linear_cross_entropy"))
def test_grad_in_forward_torch_compile_fullgraph(device, backend):
    x, w, b, t, _ = make_case(10, 5, 13, True, False, True, device, torch.float32)

    def f(x_, w_, b_):
        return F.linear_cross_entropy(torch.tanh(x_), w_, t, linear_bias=b_, label_smoothing=0.1, chunk_size=4,
                                      backend=backend, grad_in_forward=True)

    leaves = [v.requires_grad_() for v in (x, w, b)]
    out = torch.compile(f, fullgraph=True)(*leaves)
    grads = torch.autograd.grad(out * 3, leaves)
    eager = f(*leaves)
    torch.testing.assert_close(out, eager)
    for a, e in zip(grads, torch.autograd.grad(eager * 3, leaves)):
        torch.testing.assert_close(a, e)


def test_grad_in_forward_module_option():
    head = fastnn.nn.LinearCrossEntropyLoss(6, 11, bias=True, grad_in_forward=True, label_smoothing=0.1)
    x, t = torch.randn(9, 6, requires_grad=True), torch.randint(0, 11, (9,))
    head(x, t).backward()
    ref = fastnn.nn.LinearCrossEntropyLoss(6, 11, bias=True, label_smoothing=0.1)
    ref.load_state_dict(head.state_dict())
    x2 = x.detach().clone().requires_grad_()
    ref(x2, t).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(head.linear.weight.grad, ref.linear.weight.grad)


def gradients_made_in_the_forward(loss: torch.Tensor) -> bool:
    return type(loss.grad_fn).__name__ == "_GradInForwardBackward"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_grad_in_forward_default(device):
    # None: on the CPU when the loss will be differentiated, not on a GPU; the module's None follows it in
    # training mode and recomputes in eval mode.
    x, w, b, t, _ = make_case(9, 6, 11, True, False, False, device, torch.float32)
    on = device == "cpu"
    assert gradients_made_in_the_forward(F.linear_cross_entropy(x.requires_grad_(), w, t)) == on
    assert gradients_made_in_the_forward(F.linear_cross_entropy(x, w, t, grad_in_forward=True))
    assert not gradients_made_in_the_forward(F.linear_cross_entropy(x, w, t, grad_in_forward=False))
    head = fastnn.nn.LinearCrossEntropyLoss(6, 11, device=device)
    assert head.grad_in_forward is None
    assert gradients_made_in_the_forward(head(x, t)) == on
    assert not gradients_made_in_the_forward(head.eval()(x, t))
    head.grad_in_forward = True
    assert gradients_made_in_the_forward(head(x, t))


def test_grad_in_forward_retain_graph_and_create_graph():
    # The stored gradients serve any number of backwards (each copies them), and a second-order gradient is
    # refused rather than computed as if they were constants.
    x, w, b, t, _ = make_case(9, 6, 11, True, False, True, "cpu", torch.float64)
    x.requires_grad_(), w.requires_grad_()
    loss = F.linear_cross_entropy(x, w, t, linear_bias=b, grad_in_forward=True)
    first = torch.autograd.grad(loss, (x, w), retain_graph=True)
    second = torch.autograd.grad(2 * loss, (x, w), retain_graph=True)
    for a, e in zip(second, first):
        torch.testing.assert_close(a, 2 * e)
    for gif in (True, False):  # neither path gives second-order terms (the recomputing op has no double backward)
        loss = F.linear_cross_entropy(x, w, t, linear_bias=b, grad_in_forward=gif)
        with pytest.raises(RuntimeError):
            gx, = torch.autograd.grad(loss, x, create_graph=True)
            gx.sum().backward()


@pytest.mark.parametrize("backend", [p.values[1] for p in device_backends("linear_cross_entropy")
                                     if p.values[0] == "cpu"])
def test_gradcheck(backend):
    x, w, b, t, c = make_case(7, 3, 6, True, True, True, "cpu", torch.float64)
    # (reduction, grad_in_forward): the recomputing backward, and the gradients made in the forward
    cases = [("mean", False), ("mean", True)] + ([] if backend == "triton" else [("none", None), ("sum", True)])
    for red, gif in cases:
        assert torch.autograd.gradcheck(
            lambda x_, w_, b_: F.linear_cross_entropy(x_, w_, t, linear_bias=b_, reduction=red, label_smoothing=0.2,
                                                      weight=c, chunk_size=3, backend=backend, grad_in_forward=gif),
            tuple(v.requires_grad_() for v in (x, w, b)), fast_mode=backend == "triton")


@pytest.mark.parametrize("suffix", ["", "_triton"])
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck(suffix, bias):
    if suffix and not [p for p in device_backends("linear_cross_entropy") if p.values == ("cpu", "triton")]:
        pytest.skip("no Triton on CPU here")
    x, w, b, t, c = make_case(7, 4, 9, bias, True, True, "cpu", torch.float32)
    ops = torch.ops.fastnn
    args = (x.requires_grad_(), w.requires_grad_(), b, t, c, -100, 0.1, 3)
    torch.library.opcheck(getattr(ops, "linear_cross_entropy_fwd" + suffix), args)
    loss, stats = getattr(ops, "linear_cross_entropy_fwd" + suffix)(x.detach(), w.detach(), b, t, c, -100, 0.1, 3)
    for mask in ([True, True, True], [False, True, bias], [True, False, False]):
        torch.library.opcheck(getattr(ops, "linear_cross_entropy_bwd" + suffix),
                              (torch.randn(7), x.detach(), w.detach(), b, t, c, stats, -100, 0.1, 3, mask))


@pytest.mark.parametrize("device,backend", device_backends("linear_cross_entropy"))
@pytest.mark.parametrize("out_features,prob", [((), False), ((2,), False), ((2,), True)])
def test_torch_compile_fullgraph(device, backend, out_features, prob):
    # Class indices on the fused op; a K-dimensional loss (one op per position); probabilities (checkpointed
    # chunks of linear + cross_entropy).
    x, w, b, t, _ = torch_case(10, 5, 13, out_features, prob, True, False, None, device, torch.float32)

    def f(x_, w_, b_):
        return F.linear_cross_entropy(torch.tanh(x_), w_, t, linear_bias=b_, label_smoothing=0.1, chunk_size=4,
                                      backend=backend, grad_in_forward=False)

    leaves = [v.requires_grad_() for v in (x, w, b)]
    out = torch.compile(f, fullgraph=True)(*leaves)
    grads = torch.autograd.grad(out, leaves)
    eager = f(*leaves)
    torch.testing.assert_close(out, eager)
    for a, e in zip(grads, torch.autograd.grad(eager, leaves)):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("device,backend", device_backends("linear_cross_entropy"))
def test_out_of_range_target_raises(device, backend):
    x, w, b, t, _ = make_case(6, 4, 9, True, False, False, device, torch.float32)
    t[4] = 9
    with pytest.raises(IndexError, match="target 9 is out of bounds"):
        F.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=2, backend=backend)


@pytest.mark.parametrize("call,exc,words", [
    (lambda: F.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 3), torch.zeros(3).long()), ValueError,
     ["input", "D"]),
    (lambda: F.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4).double(), torch.zeros(3).long()),
     TypeError, ["linear_weight", "dtype"]),
    (lambda: F.linear_cross_entropy(torch.randn(3, 4), torch.randn(4), torch.zeros(3).long()), ValueError,
     ["linear_weight", "(C, D)"]),
    (lambda: F.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(4).long()), ValueError,
     ["target", "(3,)"]),
    (lambda: F.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, 5).long()), ValueError,
     ["target", "(3,)"]),
    (lambda: F.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3)), ValueError,
     ["target", "probabilities", "(3, 5)"]),
    (lambda: F.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.int32)),
     TypeError, ["target", "int64"]),
    (lambda: F.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3).long(),
                                    linear_bias=torch.randn(4)), ValueError, ["linear_bias", "(5,)"]),
    (lambda: F.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 2, 4), torch.zeros(3, 2).long(),
                                    linear_bias=torch.randn(5)), ValueError, ["linear_bias", "(5, 2)"]),
    (lambda: F.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3).long(),
                                    weight=torch.ones(4)), ValueError, ["weight", "(5,)"]),
    (lambda: F.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3).long(), chunk_size=0),
     ValueError, ["chunk_size"]),
    # K-dimensional loss: input (N, D) only, target (N, d1..dK).
    (lambda: F.linear_cross_entropy(torch.randn(2, 3, 4), torch.randn(5, 2, 4), torch.zeros(2, 3, 2).long()),
     ValueError, ["K-dimensional", "(N, 4)"]),
    (lambda: F.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 2, 4), torch.zeros(3).long()), ValueError,
     ["target", "(3, 2)", "linear_weight"]),
    # Probabilities: torch refuses an ignore_index with them.
    (lambda: F.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.rand(3, 5), ignore_index=-100),
     ValueError, ["ignore_index", "probabilities"]),
    (lambda: F.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3).long(), options=4),
     TypeError, ["options", "LinearCrossEntropyOptions"]),
    (lambda: F.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3).long(), chunk_size=2,
                                    options=types.SimpleNamespace(batch_chunk_size=3)),
     ValueError, ["batch_chunk_size", "chunk_size"]),
])
def test_bad_input_raises_clear_error(call, exc, words):
    assert_raises_naming(call, exc, words)


def test_default_chunk_bounds_the_buffer():
    from fastnn.ops.linear_cross_entropy import CHUNK_BYTES, GRAD_IN_FORWARD_CHUNK_BYTES, default_chunk

    for budget in (CHUNK_BYTES, GRAD_IN_FORWARD_CHUNK_BYTES):
        for V in (7, 1000, 32000, 256000, 10 ** 8):
            rows = default_chunk(V, torch.float32, budget)
            assert rows >= 1 and rows & (rows - 1) == 0
            assert rows == 1 or (rows * V * 4 <= budget < 2 * rows * V * 4)


def test_grad_in_forward_hands_its_gradients_to_autograd(monkeypatch):
    # The chunk that the path without a chunk_size takes (half the recomputing path's buffer), and the weight's
    # .grad is the tensor the forward made for an upstream gradient of 1, while a retained graph gets copies and
    # a second backward the same gradients, also scaled.
    from fastnn.ops import linear_cross_entropy as lce

    made = []  # (chunk, grad_input's address, grad_weight's): no reference kept, which would force a copy
    op = lce._FORWARD_GRAD["native"]

    def spy(*args):
        out = op(*args)
        made.append((args[-2], out[1].data_ptr(), out[2].data_ptr()))
        return out

    monkeypatch.setitem(lce._FORWARD_GRAD, "native", spy)
    x, w, b, t, _ = make_case(37, 8, 150, True, False, True, "cpu", torch.float32)
    x.requires_grad_(), w.requires_grad_()
    F.linear_cross_entropy(x, w, t, linear_bias=b, grad_in_forward=True, backend="native").backward()
    assert made[-1] == (lce.default_chunk(150, torch.float32, lce.GRAD_IN_FORWARD_CHUNK_BYTES),
                        x.grad.data_ptr(), w.grad.data_ptr())
    x.grad = w.grad = None
    loss = F.linear_cross_entropy(x, w, t, linear_bias=b, grad_in_forward=True, backend="native")
    loss.backward(retain_graph=True)
    first = w.grad
    assert first.data_ptr() != made[-1][2]
    w.grad = None
    (3 * loss).backward()
    torch.testing.assert_close(w.grad, 3 * first)


def test_module_from_linear_shares_the_layer():
    # The translator's use: the loss head on an existing output layer (the same nn.Linear, so the same
    # Parameters), the logits from it for decoding.
    torch.manual_seed(1)
    lin = nn.Linear(8, 11)
    head = fastnn.nn.LinearCrossEntropyLoss.from_linear(lin, ignore_index=0, label_smoothing=0.1)
    assert head.linear is lin and head.num_classes == 11 and head.weight is None
    assert list(head.state_dict()) == ["linear.weight", "linear.bias"]
    x, t = torch.randn(2, 5, 8), torch.randint(0, 11, (2, 5))
    loss = head(x, t)
    expected = nn.CrossEntropyLoss(ignore_index=0, label_smoothing=0.1)(lin(x).reshape(-1, 11), t.reshape(-1))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    g = lin.weight.grad.clone()
    lin.weight.grad = None
    expected.backward()
    torch.testing.assert_close(g, lin.weight.grad)
    torch.testing.assert_close(head.logits(x), lin(x))
    fresh = fastnn.nn.LinearCrossEntropyLoss(8, 11)  # torch's default: no bias
    assert list(fresh.state_dict()) == ["linear.weight"] and fresh.linear.weight.shape == (11, 8)
    k = fastnn.nn.LinearCrossEntropyLoss.from_linear(nn.Linear(8, 12), out_features=(3,))
    assert k.num_classes == 4 and k.logits(torch.randn(2, 8)).shape == (2, 4, 3)
    with pytest.raises(ValueError, match="out_features"):
        fastnn.nn.LinearCrossEntropyLoss.from_linear(nn.Linear(8, 11), out_features=(3,))


# ---- parity with torch 2.13's torch.nn.functional.linear_cross_entropy / nn.LinearCrossEntropyLoss -------------

needs_torch_lce = pytest.mark.skipif(not hasattr(TF, "linear_cross_entropy"),
                                     reason="torch < 2.13 has no linear_cross_entropy")

# (linear_bias, weight (per class), ignore_index, label_smoothing, reduction); ignore_index None is -100.
TORCH_OPTIONS = [
    (False, False, None, 0.0, "mean"),  # torch's defaults
    (True, True, None, 0.1, "sum"),
    (True, True, 3, 0.0, "mean"),
    (True, False, None, 0.2, "none"),
    (False, True, 3, 0.1, "none"),
]


def torch_case(N, D, C, out_features, prob, bias, cw, ignore_index, device, dtype=torch.float64):
    x = torch.randn(N, D, dtype=torch.float64, device=device).to(dtype)
    w = (torch.randn(C, *out_features, D, dtype=torch.float64, device=device) / D ** 0.5).to(dtype)
    b = torch.randn(C, *out_features, dtype=torch.float64, device=device).to(dtype) if bias else None
    c = (torch.rand(C, dtype=torch.float64, device=device) + 0.5).to(dtype) if cw else None
    if prob:
        t = torch.randn(N, C, *out_features, dtype=torch.float64, device=device).softmax(1).to(dtype)
    else:
        t = torch.randint(0, C, (N, *out_features), device=device)
        t = torch.where(torch.rand(t.shape, device=device) < 0.2,
                        torch.full_like(t, -100 if ignore_index is None else ignore_index), t)
    return x, w, b, t, c


@needs_torch_lce
@pytest.mark.parametrize("device,backend", device_backends("linear_cross_entropy", reference=True))
@pytest.mark.parametrize("out_features", [(), (2, 3)])
@pytest.mark.parametrize("prob", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("bias,cw,ignore_index,smoothing,reduction", TORCH_OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_torch_linear_cross_entropy(device, backend, out_features, prob, bias, cw, ignore_index, smoothing,
                                            reduction, dtype):
    if prob and ignore_index is not None:
        pytest.skip("torch refuses ignore_index with probabilities")
    if backend == "triton" and (out_features or dtype == torch.float32):  # the interpreter is slow
        pytest.skip("Triton's interpreter: the 2-d float64 cases only")
    x, w, b, t, c = torch_case(9, 6, 13, out_features, prob, bias, cw, ignore_index, device)
    kw = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=smoothing)

    def theirs(x_, w_, b_=None):  # options=None: torch's reference path (its logits in float64 here)
        return TF.linear_cross_entropy(x_, w_, t, linear_bias=b_, weight=c, **kw)

    def ours(x_, w_, b_=None):
        cast = (lambda v: None if v is None else v.to(dtype))
        return F.linear_cross_entropy(x_, w_, cast(t) if prob else t, linear_bias=b_, weight=cast(c), chunk_size=4,
                                      backend=backend, **kw)

    r, rg, g = run(theirs, x, w, b)
    o, og, _ = run(ours, x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), g.to(dtype))
    assert o.dtype == dtype and o.shape == r.shape
    assert_matches(o, r)
    for name, a, e in zip(("grad_input", "grad_linear_weight", "grad_linear_bias"), og, rg):
        assert_matches(a, e, name=name)


@needs_torch_lce
@pytest.mark.parametrize("device,backend", device_backends("linear_cross_entropy"))
@pytest.mark.parametrize("prob", [False, True], ids=["indices", "probabilities"])
def test_unbatched_input_matches_torch(device, backend, prob):
    x, w, b, t, c = torch_case(1, 6, 13, (), prob, True, True, None, device)
    x, t = x[0], t[0]  # (D,) and a 0-d index or (C,) probabilities
    r, rg, g = run(lambda x_, w_, b_: TF.linear_cross_entropy(x_, w_, t, linear_bias=b_, weight=c,
                                                              label_smoothing=0.1, reduction="none"), x, w, b)
    o, og, _ = run(lambda x_, w_, b_: F.linear_cross_entropy(x_, w_, t, linear_bias=b_, weight=c,
                                                             label_smoothing=0.1, reduction="none",
                                                             backend=backend), x, w, b, g)
    assert o.shape == r.shape == ()
    assert_matches(o, r)
    for a, e in zip(og, rg):
        assert_matches(a, e)


@needs_torch_lce
def test_options_batch_chunk_size_is_honoured(monkeypatch):
    from fastnn.ops import linear_cross_entropy as lce

    chunks = []
    op = lce._FORWARD["native"]
    monkeypatch.setitem(lce._FORWARD, "native", lambda *a: chunks.append(a[-1]) or op(*a))
    x, w, b, t, c = torch_case(37, 8, 150, (), False, True, True, None, "cpu", torch.float32)
    Options = torch.nn.LinearCrossEntropyOptions
    for options in (Options(batch_chunk_size=5), Options(), None):
        got = F.linear_cross_entropy(x, w, t, linear_bias=b, weight=c, options=options, backend="native")
        # torch's chunked path where options are given, its reference path for None
        torch.testing.assert_close(got, TF.linear_cross_entropy(x, w, t, linear_bias=b, weight=c, options=options))
    assert chunks == [5, lce.default_chunk(150, torch.float32), lce.default_chunk(150, torch.float32)]
    F.linear_cross_entropy(x, w, t, options=Options(batch_chunk_size=5), chunk_size=5, backend="native")
    assert chunks[-1] == 5


@pytest.mark.parametrize("device,backend", device_backends("linear_cross_entropy"))
def test_probability_targets_hold_one_chunk_of_logits(device, backend):
    # Probabilities take chunks of linear + fused cross_entropy under checkpointing: the same loss and
    # gradients whatever the chunk, and a second backward (retain_graph) works.
    x, w, b, t, c = torch_case(9, 6, 13, (), True, True, True, None, device)
    outs = [run(lambda x_, w_, b_: F.linear_cross_entropy(x_, w_, t, linear_bias=b_, weight=c, chunk_size=k,
                                                          backend=backend), x, w, b, torch.tensor(1.0))
            for k in (2, 9)]
    r, rg, _ = run(lambda x_, w_, b_: fastnn.reference.linear_cross_entropy(x_, w_, t, linear_bias=b_, weight=c),
                   x, w, b, torch.tensor(1.0))
    for o, og, _ in outs:
        assert_matches(o, r)
        for a, e in zip(og, rg):
            assert_matches(a, e)
    tt = t.clone().requires_grad_()  # probabilities take a gradient too, as in torch
    got = torch.autograd.grad(F.linear_cross_entropy(x, w, tt, label_smoothing=0.1, chunk_size=4, backend=backend),
                              tt)[0]
    assert_matches(got, torch.autograd.grad(fastnn.reference.linear_cross_entropy(x, w, tt, label_smoothing=0.1),
                                            tt)[0], name="grad_target")
    leaf = x.clone().requires_grad_()
    loss = F.linear_cross_entropy(leaf, w, t, chunk_size=4, backend=backend)
    loss.backward(retain_graph=True)
    first = leaf.grad.clone()
    loss.backward()
    torch.testing.assert_close(leaf.grad, 2 * first)


@needs_torch_lce
@pytest.mark.parametrize("out_features,bias", [((), False), ((), True), ((2, 3), True)])
def test_module_is_torchs_module(out_features, bias):
    torch.manual_seed(0)
    kw = dict(out_features=out_features, bias=bias, weight=torch.rand(7) + 0.5, reduction="sum",
              label_smoothing=0.1)
    theirs = nn.LinearCrossEntropyLoss(5, 7, **kw)
    ours = fastnn.nn.LinearCrossEntropyLoss(5, 7, **kw)
    assert isinstance(ours, nn.LinearCrossEntropyLoss)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert repr(ours) == repr(theirs).replace("LinearCrossEntropyLoss", "LinearCrossEntropyLoss", 1)
    for name in ("num_classes", "out_features", "reduction", "ignore_index", "label_smoothing", "options"):
        assert getattr(ours, name) == getattr(theirs, name), name
    x = torch.randn(4, 5)
    for t in (torch.randint(0, 7, (4, *out_features)), torch.randn(4, 7, *out_features).softmax(1)):
        expected = theirs(x, t)
        torch.testing.assert_close(ours(x, t), expected)
        got = torch.autograd.grad(ours(x, t), list(ours.parameters()))
        torch.testing.assert_close(got, torch.autograd.grad(expected, list(theirs.parameters())))


@needs_torch_lce
def test_patch_swaps_torch_module_keeping_its_parameters():
    torch.manual_seed(0)
    model = nn.Module()
    model.head = nn.LinearCrossEntropyLoss(5, 7, bias=True, weight=torch.rand(7) + 0.5, ignore_index=2,
                                           options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=3))
    torch_head, params = model.head, list(model.parameters())
    fastnn.patch(model, verbose=False)
    assert type(model.head) is fastnn.nn.LinearCrossEntropyLoss
    assert list(model.parameters()) == params and model.head.linear is torch_head.linear
    assert model.head.weight is torch_head.weight and model.head.options is torch_head.options
    x, t = torch.randn(6, 5), torch.tensor([0, 2, 6, 2, 1, 3])
    torch.testing.assert_close(model.head(x, t), torch_head(x, t))


def test_works_without_torchs_names():
    # torch < 2.13: no F.linear_cross_entropy, nn.LinearCrossEntropyLoss or LinearCrossEntropyOptions. fastnn's
    # function and its standalone module (torch's constructor and state_dict) still work.
    code = """
import torch
for mod, name in ((torch.nn, "LinearCrossEntropyLoss"), (torch.nn, "LinearCrossEntropyOptions"),
                  (torch.nn.functional, "linear_cross_entropy")):
    if hasattr(mod, name):
        delattr(mod, name)
import fastnn, fastnn.nn, fastnn.functional as F
assert all(cls.__name__ != "LinearCrossEntropyLoss" for cls in fastnn.nn.PATCHABLE)
torch.manual_seed(0)
m = fastnn.nn.LinearCrossEntropyLoss(5, 7, out_features=(2,), bias=True, weight=torch.rand(7).double() + 0.5,
                                     label_smoothing=0.1, dtype=torch.float64)
assert list(m.state_dict()) == ["weight", "linear.weight", "linear.bias"], list(m.state_dict())
assert m.linear.weight.shape == (14, 5) and m.ignore_index is None and "num_classes=7" in repr(m)
x, t = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 7, (4, 2))
expected = fastnn.reference.linear_cross_entropy(x, m.linear.weight.reshape(7, 2, 5), t,
                                                 linear_bias=m.linear.bias.reshape(7, 2), weight=m.weight,
                                                 label_smoothing=0.1)
torch.testing.assert_close(m(x, t), expected)
torch.testing.assert_close(F.linear_cross_entropy(x, m.linear.weight, t[:, 0], chunk_size=3),
                           fastnn.reference.linear_cross_entropy(x, m.linear.weight, t[:, 0]))
print("ok")
"""
    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
