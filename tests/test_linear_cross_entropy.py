"""Chunked linear + cross-entropy against fastnn.reference (logits materialized) in float64, forward and the
gradients of input, weight and bias, through every backend."""
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
    x, w, b, t, c = make_case(N, D, V, bias, cw, ignored, device, dtype)
    kw = dict(ignore_index=-100, reduction=reduction, label_smoothing=smoothing)

    def ref(x_, w_, b_=None):
        return fastnn.reference.linear_cross_entropy(x_, w_, t, b_, class_weight=None if c is None else c.double(),
                                                     **kw)

    def ours(x_, w_, b_=None):
        return F.linear_cross_entropy(x_, w_, t, b_, class_weight=c, chunk_size=chunk, backend=backend, **kw)

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
    kw = dict(label_smoothing=0.1, class_weight=c)
    leaves = [v.detach().clone().requires_grad_(want) for v, want in zip((x, w, b), wanted)]
    asked = [v for v in leaves if v.requires_grad]
    g = torch.autograd.grad(F.linear_cross_entropy(leaves[0], leaves[1], t, leaves[2], chunk_size=24,
                                                   backend=backend, **kw), asked)
    ref = [v.double().requires_grad_(v.requires_grad) for v in leaves]
    rg = torch.autograd.grad(fastnn.reference.linear_cross_entropy(ref[0], ref[1], t, ref[2], label_smoothing=0.1,
                                                                   class_weight=c.double()),
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
def test_low_precision(device, backend, dtype):
    x, w, b, t, _ = make_case(12, 32, 300, True, False, True, device, dtype)

    def fn(f):
        return lambda x_, w_, b_: f(x_, w_, t, b_, label_smoothing=0.1)

    r, rg, g = run(fn(fastnn.reference.linear_cross_entropy), x.double(), w.double(), b.double())
    o, og, _ = run(fn(lambda *a, **k: F.linear_cross_entropy(*a, **k, chunk_size=5, backend=backend)), x, w, b,
                   g.to(dtype))
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
    out = F.linear_cross_entropy(x3, w, t3, b, reduction="none", chunk_size=5, backend=backend)
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
    r, rg, g = run(lambda x_, w_, b_: fastnn.reference.linear_cross_entropy(x_, w_, t, b_, class_weight=c.double(),
                                                                            **kw), x.double(), w.double(), b.double())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        o, og, _ = run(lambda x_, w_, b_: F.linear_cross_entropy(x_, w_, t, b_, class_weight=c, backend="native",
                                                                 **kw), x, w, b, g.float())
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
    got = F.linear_cross_entropy(x, w, t, b, backend=backend, **kw)
    torch.testing.assert_close(got, expect)
    if smoothing == 0:  # (with smoothing torch's gradient is NaN: inf - inf)
        leaves = [v.clone().requires_grad_() for v in (x, w)]
        g_ref = torch.autograd.grad(TF.cross_entropy(TF.linear(*leaves, b), t, **kw).sum(), leaves)
        g = torch.autograd.grad(F.linear_cross_entropy(*leaves, t, b, backend=backend, **kw).sum(), leaves)
        for a, e in zip(g, g_ref):
            torch.testing.assert_close(a, e)


@pytest.mark.parametrize("backend", [p.values[1] for p in device_backends("linear_cross_entropy")
                                     if p.values[0] == "cpu"])
def test_gradcheck(backend):
    x, w, b, t, c = make_case(7, 3, 6, True, True, True, "cpu", torch.float64)
    for red in ("mean",) if backend == "triton" else ("none", "mean"):  # the interpreter is slow
        assert torch.autograd.gradcheck(
            lambda x_, w_, b_: F.linear_cross_entropy(x_, w_, t, b_, reduction=red, label_smoothing=0.2,
                                                      class_weight=c, chunk_size=3, backend=backend),
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
def test_torch_compile_fullgraph(device, backend):
    x, w, b, t, _ = make_case(10, 5, 13, True, False, True, device, torch.float32)

    def f(x_, w_, b_):
        return F.linear_cross_entropy(torch.tanh(x_), w_, t, b_, label_smoothing=0.1, chunk_size=4, backend=backend)

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
        F.linear_cross_entropy(x, w, t, b, chunk_size=2, backend=backend)


@pytest.mark.parametrize("call,exc,words", [
    (lambda: F.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 3), torch.zeros(3).long()), ValueError,
     ["input", "D"]),
    (lambda: F.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4).double(), torch.zeros(3).long()),
     TypeError, ["weight", "dtype"]),
    (lambda: F.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(4).long()), ValueError,
     ["target", "(3,)"]),
    (lambda: F.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3)), TypeError,
     ["target", "int64"]),
    (lambda: F.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3).long(), torch.randn(4)),
     ValueError, ["bias", "(5,)"]),
    (lambda: F.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3).long(),
                                    class_weight=torch.ones(4)), ValueError, ["class_weight"]),
    (lambda: F.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3).long(), chunk_size=0),
     ValueError, ["chunk_size"]),
])
def test_bad_input_raises_clear_error(call, exc, words):
    assert_raises_naming(call, exc, words)


def test_default_chunk_bounds_the_buffer():
    from fastnn.ops.linear_cross_entropy import CHUNK_BYTES, default_chunk

    for V in (7, 1000, 32000, 256000, 10 ** 8):
        rows = default_chunk(V, torch.float32)
        assert rows >= 1 and rows & (rows - 1) == 0
        assert rows == 1 or rows * V * 4 <= CHUNK_BYTES


def test_module_shares_linear_weight_and_matches_torch():
    torch.manual_seed(1)
    lin = nn.Linear(8, 11)
    head = fastnn.nn.LinearCrossEntropyLoss.from_linear(lin, ignore_index=0, label_smoothing=0.1)
    assert head.weight is lin.weight and head.bias is lin.bias
    assert list(head.state_dict()) == list(lin.state_dict())
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
    fresh = fastnn.nn.LinearCrossEntropyLoss(8, 11, bias=False)
    assert list(fresh.state_dict()) == ["weight"] and fresh.weight.shape == (11, 8)
