"""Fused softmax cross-entropy through every backend against fastnn.reference (float64) and torch, forward and
gradients, every option of torch.nn.functional.cross_entropy."""
import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import fastnn
import fastnn.functional as F
from helpers import assert_matches as _assert_matches, assert_raises_naming
from helpers import device_backends


def assert_matches(out, ref, **kw):
    # A "mean" over zero rows is NaN on both sides (helpers' bound would be NaN too).
    if ref.numel() and ref.isnan().all():
        assert out.isnan().all(), f"expected NaN, got {out}"
        return
    _assert_matches(out, ref, **kw)

SHAPES = [
    (1, 5),          # one row
    (7, 2),          # two classes: shorter than one SIMD vector
    (113, 123),      # odd rows and classes
    (3, 5000),       # rows longer than one Triton block (4096): the online loop runs twice
    (3, 5, 7),       # spatial (N, C, d): classes `inner` apart
    (2, 4, 3, 5),    # two spatial dims
    (2, 3, 70),      # more positions than one CPU slab (64): a full slab and a partial one
    (130, 20),       # few classes: the CPU's forward runs slabs of 64 rows (the last partial), its backward rows
    (11,),           # unbatched (C,): target is 0-d
    (0, 5),          # no rows
]
# Triton's interpreter runs one program per row at a few ms each: the same code paths on fewer rows.
INTERP_SHAPES = [(1, 5), (7, 2), (3, 123), (2, 5000), (2, 5, 3), (1, 4, 3, 2), (11,), (0, 5)]


def backend_shapes(op, shapes, interp_shapes):
    """(device, backend, shape) params: the interpreter gets `interp_shapes`, real kernels `shapes`."""
    out = []
    for p in device_backends(op):
        device, backend = p.values
        for shape in interp_shapes if (device, backend) == ("cpu", "triton") else shapes:
            out.append(pytest.param(device, backend, shape, marks=p.marks, id=f"{p.id}-{shape}"))
    return out


# (weight, label_smoothing, reduction)
OPTIONS = [
    (False, 0.0, "mean"),
    (True, 0.0, "mean"),     # weighted mean divides by the summed weights of non-ignored targets
    (False, 0.1, "sum"),
    (True, 0.2, "mean"),     # smoothing with weights: torch divides the smoothing term by the same denominator
    (True, 0.3, "none"),
    (False, 0.0, "none"),
]
KINDS = ["index", "ignored", "prob"]  # class indices, about 20% of them ignore_index, class probabilities


def make_case(shape, kind, weighted, device, dtype, ignore_index=-100):
    cdim = 0 if len(shape) == 1 else 1
    C = shape[cdim]
    x = (3 * torch.randn(shape, dtype=torch.float64, device=device)).to(dtype)
    if kind == "prob":
        t = torch.softmax(2 * torch.randn(shape, dtype=torch.float64, device=device), cdim).to(dtype)
    else:
        tshape = shape[1:] if cdim == 0 else (shape[0],) + shape[2:]
        t = torch.randint(0, C, tshape, device=device)
        if kind == "ignored":
            t = torch.where(torch.rand(tshape, device=device) < 0.2, torch.full_like(t, ignore_index), t)
    w = (torch.rand(C, dtype=torch.float64, device=device) + 0.5).to(dtype) if weighted else None
    return x, t, w


def run(fn, x, t, w, g=None, **kw):
    x = x.detach().clone().requires_grad_()
    out = fn(x, t, w, **kw)
    if g is None:
        g = torch.randn(out.shape, dtype=torch.float64, device=x.device).to(out.dtype)
    (dx,) = torch.autograd.grad(out, x, g)
    return out.detach(), dx, g


@pytest.mark.parametrize("device,backend,shape", backend_shapes("cross_entropy", SHAPES, INTERP_SHAPES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("weighted,smoothing,reduction", OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(device, backend, shape, kind, weighted, smoothing, reduction, dtype):
    if backend == "triton" and device == "cpu" and (dtype == torch.float32 or not weighted and smoothing == 0):
        pytest.skip("interpreter: float64 and the weighted / smoothed options only (the code paths are shared)")
    x, t, w = make_case(shape, kind, weighted, device, dtype)
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    ref, ref_dx, g = run(fastnn.reference.cross_entropy, x.double(), t if kind != "prob" else t.double(),
                         None if w is None else w.double(), **kw)
    out, dx, _ = run(lambda *a, **k: F.cross_entropy(*a, **k, backend=backend), x, t, w, g.to(dtype), **kw)
    assert out.dtype == dtype
    assert_matches(out, ref)
    assert_matches(dx, ref_dx, name="grad_input")


@pytest.mark.parametrize("shape", SHAPES[:9], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("weighted,smoothing,reduction", OPTIONS)
def test_reference_matches_torch(shape, kind, weighted, smoothing, reduction):
    # The ground truth itself against torch's fused kernel, so the two cannot drift apart together.
    x, t, w = make_case(shape, kind, weighted, "cpu", torch.float64)
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    ref, ref_dx, g = run(fastnn.reference.cross_entropy, x, t, w, **kw)
    theirs, their_dx, _ = run(TF.cross_entropy, x, t, w, g, **kw)
    torch.testing.assert_close(ref, theirs, rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(ref_dx, their_dx, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend,shape", backend_shapes("cross_entropy",
                                                                [(113, 123), (3, 5, 7), (130, 20), (4, 5000)],
                                                                [(3, 123), (2, 5, 3)]))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("weighted,smoothing,reduction", [OPTIONS[1], OPTIONS[3], OPTIONS[4]])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(device, backend, shape, kind, weighted, smoothing, reduction, dtype):
    x, t, w = make_case(shape, kind, weighted, device, dtype)
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    ref, ref_dx, g = run(fastnn.reference.cross_entropy, x.double(), t if kind != "prob" else t.double(),
                         None if w is None else w.double(), **kw)
    out, dx, _ = run(lambda *a, **k: F.cross_entropy(*a, **k, backend=backend), x, t, w, g.to(dtype), **kw)
    theirs, their_dx, _ = run(TF.cross_entropy, x, t, w, g.to(dtype), **kw)
    assert out.dtype == dtype and dx.dtype == dtype
    # Triton's interpreter casts float32 -> bfloat16 by truncation (a GPU rounds to nearest): one more ulp.
    floor = torch.finfo(dtype).eps * ref_dx.abs().max().item() if (device, backend) == ("cpu", "triton") else 1e-6
    assert_matches(out, ref, torch_out=theirs)
    assert_matches(dx, ref_dx, torch_out=their_dx, name="grad_input", atol_floor=floor)


@pytest.mark.parametrize("device,backend", device_backends("cross_entropy"))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_all_ignored(device, backend, reduction, weighted):
    # "mean" over no targets is 0 / 0 = NaN, as torch; the gradient is still zero for every row.
    x, _, w = make_case((5, 9), "index", weighted, device, torch.float32)
    t = torch.full((5,), 3, device=device)
    args = dict(ignore_index=3, reduction=reduction)
    out, dx, g = run(lambda *a, **k: F.cross_entropy(*a, **k, backend=backend), x, t, w, **args)
    theirs, their_dx, _ = run(TF.cross_entropy, x, t, w, g, **args)
    torch.testing.assert_close(out, theirs, equal_nan=True)
    torch.testing.assert_close(dx, their_dx, equal_nan=True)


@pytest.mark.parametrize("device,backend", device_backends("cross_entropy"))
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_extreme_logits(device, backend, smoothing):
    C = 4500  # two Triton blocks
    x = torch.randn(6, C, device=device)
    x[0] = 1e4 * torch.randn(C, device=device).sign()   # +-1e4: must not overflow
    x[1, 1:] = float("-inf")                             # -inf in every non-target class
    x[2, ::3] = float("-inf")
    x[3] = -1e4
    x[4, 7] = 5e4
    t = torch.tensor([3, 0, 1, 9, 7, 2], device=device)
    for reduction in ("none", "sum"):
        out, dx, g = run(lambda *a, **k: F.cross_entropy(*a, **k, backend=backend), x, t, None,
                         reduction=reduction, label_smoothing=smoothing)
        theirs, their_dx, _ = run(TF.cross_entropy, x.double(), t, None, g.double(), reduction=reduction,
                                  label_smoothing=smoothing)
        torch.testing.assert_close(out.double(), theirs, rtol=1e-5, atol=1e-5, equal_nan=True)
        torch.testing.assert_close(dx.double(), their_dx, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("device,backend", device_backends("cross_entropy"))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(6, 33), (3, 5, 4)], ids=str)
def test_inplace_backward(device, backend, kind, shape):
    x, t, w = make_case(shape, kind, True, device, torch.float32)
    kw = dict(label_smoothing=0.1, reduction="sum")
    _, expected, g = run(lambda *a, **k: F.cross_entropy(*a, **k, backend=backend), 2 * x, t, w, **kw)
    leaf = x.clone().requires_grad_()
    logits = leaf * 2  # a non-leaf whose storage the backward overwrites
    logits.retain_grad()
    loss = F.cross_entropy(logits, t, w, inplace_backward=True, backend=backend, **kw)
    (loss * g).backward()
    torch.testing.assert_close(logits.grad, expected)
    torch.testing.assert_close(logits.detach(), expected)  # the logits' storage now holds their gradient
    torch.testing.assert_close(leaf.grad, 2 * expected)


GIF_SHAPES = [(113, 123), (4, 5000), (3, 5, 7), (11,), (0, 5)]
GIF_INTERP_SHAPES = [(3, 123), (2, 5000), (2, 5, 3), (11,), (0, 5)]


@pytest.mark.parametrize("device,backend,shape", backend_shapes("cross_entropy", GIF_SHAPES, GIF_INTERP_SHAPES))
@pytest.mark.parametrize("kind", ["index", "ignored"])
@pytest.mark.parametrize("weighted,smoothing,reduction", OPTIONS[:4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_grad_in_forward(device, backend, shape, kind, weighted, smoothing, reduction, dtype):
    # The loss and its gradient from one visit of each row (cross_entropy_fwd_grad), the backward scaling it by
    # the upstream gradient: against the float64 reference, and in bfloat16 within 2x torch's own error. bfloat16
    # takes the upstream gradient 1 (loss.backward()): another one rounds the stored gradient a second time.
    x, t, w = make_case(shape, kind, weighted, device, dtype)
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    g = torch.tensor(1.0 if dtype == torch.bfloat16 else -1.7, dtype=torch.float64, device=device)
    ref, ref_dx, _ = run(fastnn.reference.cross_entropy, x.double(), t, None if w is None else w.double(), g, **kw)
    ops = []

    def ours(*a, **k):
        out = F.cross_entropy(*a, **k, backend=backend, grad_in_forward=True)
        ops.append(out.grad_fn.name())
        return out
    out, dx, _ = run(ours, x, t, w, g.to(dtype), **kw)
    assert "GradInForward" in ops[0]  # the path under test, not the default one
    if dtype == torch.bfloat16:
        theirs, their_dx, _ = run(TF.cross_entropy, x, t, w, g.to(dtype), **kw)
        interp = (device, backend) == ("cpu", "triton") and ref_dx.numel()
        floor = torch.finfo(dtype).eps * ref_dx.abs().max().item() if interp else 1e-6
        assert_matches(out, ref, torch_out=theirs)
        assert_matches(dx, ref_dx, torch_out=their_dx, name="grad_input", atol_floor=floor)
    else:
        assert_matches(out, ref)
        assert_matches(dx, ref_dx, name="grad_input")


@pytest.mark.parametrize("device,backend", device_backends("cross_entropy"))
def test_grad_in_forward_elsewhere_changes_nothing(device, backend):
    # "none", probability targets, no grad wanted, grad disabled: the default path, same results.
    x, t, w = make_case((6, 17), "index", True, device, torch.float32)
    p = torch.softmax(torch.randn(6, 17, device=device), 1)
    for target, reduction in ((t, "none"), (p, "mean")):
        a, da, g = run(lambda *a, **k: F.cross_entropy(*a, **k, backend=backend), x, target, w, reduction=reduction)
        b, db, _ = run(lambda *a, **k: F.cross_entropy(*a, **k, backend=backend, grad_in_forward=True), x, target, w,
                       g, reduction=reduction)
        torch.testing.assert_close((a, da), (b, db), rtol=0, atol=0)
    with torch.no_grad():
        out = F.cross_entropy(x.requires_grad_(), t, w, backend=backend, grad_in_forward=True)
    assert out.grad_fn is None
    out = F.cross_entropy(x.detach(), t, w, backend=backend, grad_in_forward=True)
    torch.testing.assert_close(out, F.cross_entropy(x.detach(), t, w, backend=backend))


@pytest.mark.parametrize("device,backend", device_backends("cross_entropy"))
def test_grad_in_forward_out_of_range_target_raises(device, backend):
    x = torch.randn(4, 7, device=device, requires_grad=True)
    with pytest.raises(IndexError, match="out of bounds"):
        F.cross_entropy(x, torch.tensor([0, 9, 1, 2], device=device), backend=backend, grad_in_forward=True)


@pytest.mark.parametrize("device,backend", device_backends("cross_entropy"))
def test_grad_in_forward_torch_compile_fullgraph(device, backend):
    x, t, w = make_case((6, 17), "ignored", True, device, torch.float32)

    def f(x):
        return 2 * F.cross_entropy(x * 2, t, w, label_smoothing=0.1, backend=backend, grad_in_forward=True)

    x.requires_grad_()
    out = torch.compile(f, fullgraph=True)(x)
    (dx,) = torch.autograd.grad(out, x)
    (dx_eager,) = torch.autograd.grad(f(x), x)
    torch.testing.assert_close(out, f(x))
    torch.testing.assert_close(dx, dx_eager)


def test_grad_in_forward_serves_one_backward():
    # The stored gradient is handed out (upstream 1) or scaled in place: a second backward raises, not returns it
    # scaled twice; an upstream gradient of 1 returns the stored tensor itself (no copy).
    x = torch.randn(5, 9, requires_grad=True)
    t = torch.randint(0, 9, (5,))
    loss = F.cross_entropy(x, t, grad_in_forward=True)
    (g1,) = torch.autograd.grad(loss * 3.0, x, retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        torch.autograd.grad(loss, x)
    (want,) = torch.autograd.grad(3.0 * F.cross_entropy(x, t), x)
    torch.testing.assert_close(g1, want)


def test_grad_in_forward_module_flag():
    m = fastnn.nn.CrossEntropyLoss(label_smoothing=0.1, grad_in_forward=True)
    assert m.grad_in_forward and not fastnn.nn.CrossEntropyLoss().grad_in_forward
    x = torch.randn(5, 9, requires_grad=True)
    t = torch.randint(0, 9, (5,))
    assert "GradInForward" in m(x, t).grad_fn.name()
    with pytest.raises(TypeError, match="grad_in_forward"):
        F.cross_entropy(x, t, grad_in_forward=1)


@pytest.mark.parametrize("mode", ["backward", "inplace", "grad_in_forward"])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_large_gradients_stream_the_same_values_native(mode, kind):
    """float32 gradients of 64 MiB or more are written with streaming stores (csrc/cpu/cross_entropy_rows.h,
    ce_streams): every row, the target's entry and an ignored row included, must hold exactly what the same row
    gives in a small tensor (plain stores)."""
    C = 16411  # odd: rows start unaligned, so each has a head, full vectors and a tail
    N = (64 << 20) // (4 * C) + 2
    torch.manual_seed(6)
    x = 3 * torch.randn(N, C)
    w = torch.rand(C) + 0.5
    if kind == "index":
        t = torch.randint(0, C, (N,))
        t[0], t[1], t[N // 2] = -100, C - 1, 0  # an ignored row, and targets in the last and first vectors
        kw = dict(weight=w, label_smoothing=0.1)
    else:
        t, kw = torch.softmax(torch.randn(N, C), 1), dict(weight=w)

    def grads(x, t):
        x = x.clone().requires_grad_()
        flags = dict(inplace_backward=mode == "inplace", grad_in_forward=mode == "grad_in_forward")
        loss = F.cross_entropy(x, t, reduction="sum", backend="native", **kw, **flags)
        loss.backward()
        return x.grad

    big = grads(x, t)
    for r in (0, 1, N // 2, N - 1):
        assert torch.equal(big[r:r + 1], grads(x[r:r + 1], t[r:r + 1])), f"row {r}"


def test_inplace_backward_refuses_when_logits_are_needed():
    # Autograd's version counter catches a caller whose logits another op saved for its own backward.
    x = torch.randn(4, 6, requires_grad=True)
    logits = x.exp()  # exp saves its output
    loss = F.cross_entropy(logits, torch.tensor([0, 1, 2, 3]), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", [p.values[1] for p in device_backends("cross_entropy") if p.values[0] == "cpu"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(4, 7), (3, 5, 2), (6,)], ids=str)
def test_gradcheck(backend, kind, shape):
    interp = backend == "triton"  # the interpreter: one reduction, gradcheck's fast mode
    x, t, w = make_case(shape, kind, True, "cpu", torch.float64)
    x.requires_grad_()
    if kind == "prob":  # torch differentiates probability targets too
        t.requires_grad_()
        assert torch.autograd.gradcheck(
            lambda a, b: F.cross_entropy(a, b, w, label_smoothing=0.2, reduction="none", backend=backend), (x, t),
            fast_mode=interp)
    else:
        for red in ("sum",) if interp else ("none", "sum"):  # ("mean" of an ignored 0-d target is NaN)
            assert torch.autograd.gradcheck(
                lambda a: F.cross_entropy(a, t, w, label_smoothing=0.2, reduction=red, backend=backend), (x,),
                fast_mode=interp)


@pytest.mark.parametrize("suffix", ["", "_triton"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck(suffix, kind, weighted):
    if suffix and not [p for p in device_backends("cross_entropy") if p.values == ("cpu", "triton")]:
        pytest.skip("no Triton on CPU here")
    x, t, w = make_case((5, 3, 2), kind, weighted, "cpu", torch.float32)
    if kind == "ignored":
        t[0, 0] = -100
    ops = torch.ops.fastnn
    x.requires_grad_()
    torch.library.opcheck(getattr(ops, "cross_entropy_fwd" + suffix), (x, t, w, -100, 0.1, False))
    loss, stats = getattr(ops, "cross_entropy_fwd" + suffix)(x.detach(), t, w, -100, 0.1, False)
    g = torch.randn(loss.shape)
    torch.library.opcheck(getattr(ops, "cross_entropy_bwd" + suffix), (g, x.detach(), t, w, stats, -100, 0.1))
    torch.library.opcheck(getattr(ops, "cross_entropy_bwd_inplace" + suffix),
                          (g, x.detach().clone(), t, w, stats, -100, 0.1))
    torch.library.opcheck(getattr(ops, "cross_entropy_fwd_grad" + suffix), (x.detach(), t, w, g, -100, 0.1))


@pytest.mark.parametrize("device,backend", device_backends("cross_entropy"))
@pytest.mark.parametrize("kind", ["ignored", "prob"])
def test_torch_compile_fullgraph(device, backend, kind):
    x, t, w = make_case((6, 17), kind, True, device, torch.float32)

    def f(x):
        return F.cross_entropy(x * 2, t, w, label_smoothing=0.1, backend=backend) + \
            F.cross_entropy(x, t, reduction="none", backend=backend).sum()

    x.requires_grad_()
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x)
    (dx,) = torch.autograd.grad(out, x)
    (dx_eager,) = torch.autograd.grad(f(x), x)
    torch.testing.assert_close(out, f(x))
    torch.testing.assert_close(dx, dx_eager)


@pytest.mark.parametrize("device,backend", device_backends("cross_entropy"))
@pytest.mark.parametrize("bad", [5, -1, 1000])
def test_out_of_range_target_raises(device, backend, bad):
    x = torch.randn(4, 5, device=device)
    t = torch.tensor([0, 1, bad, 2], device=device)
    with pytest.raises(IndexError, match=f"target {bad} is out of bounds"):
        F.cross_entropy(x, t, backend=backend)
    F.cross_entropy(x, t, ignore_index=bad, backend=backend)  # the same index, ignored, is fine


@pytest.mark.parametrize("call,exc,words", [
    (lambda: F.cross_entropy(torch.arange(6).reshape(2, 3), torch.tensor([0, 1])), TypeError, ["input", "int64"]),
    (lambda: F.cross_entropy(torch.randn(2, 3), [0, 1]), TypeError, ["target", "Tensor"]),
    (lambda: F.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1, 2])), ValueError, ["target", "(2,)"]),
    (lambda: F.cross_entropy(torch.randn(2, 3), torch.rand(2, 4)), ValueError, ["target", "probabilities"]),
    (lambda: F.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), torch.ones(4)), ValueError, ["weight", "(3,)"]),
    (lambda: F.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), reduction="avg"), ValueError, ["reduction"]),
    (lambda: F.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), label_smoothing=1.5), ValueError,
     ["label_smoothing"]),
    (lambda: F.cross_entropy(torch.randn(2, 3), torch.tensor([True, False])), TypeError, ["target"]),
    (lambda: F.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), torch.ones(3, requires_grad=True)),
     NotImplementedError, ["weight"]),
    (lambda: F.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1], device="meta")), ValueError, ["device"]),
    (lambda: torch.ops.fastnn.cross_entropy_fwd(torch.randn(2, 3), torch.tensor([0, 1]).int(), None, -100, 0.0,
                                                False), RuntimeError, ["target", "int64"]),
    (lambda: torch.ops.fastnn.cross_entropy_bwd(torch.randn(3), torch.randn(2, 3), torch.tensor([0, 1]), None,
                                                torch.randn(2), -100, 0.0), RuntimeError, ["one value per row"]),
])
def test_bad_input_raises_clear_error(call, exc, words):
    assert_raises_naming(call, exc, words)


@pytest.mark.parametrize("kwargs", [
    {}, dict(weight=torch.rand(6) + 0.5), dict(ignore_index=2), dict(reduction="sum"), dict(reduction="none"),
    dict(label_smoothing=0.25, weight=torch.rand(6) + 0.5, ignore_index=1), dict(size_average=False),
])
def test_module_matches_torch(kwargs):
    x = torch.randn(9, 6, requires_grad=True)
    t = torch.randint(0, 6, (9,))
    ours, theirs = fastnn.nn.CrossEntropyLoss(**kwargs), nn.CrossEntropyLoss(**kwargs)
    out = ours(x, t)
    torch.testing.assert_close(out, theirs(x, t))
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(theirs(x, t).sum(), x)[0])
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert repr(ours) == repr(theirs)


def test_patch_replaces_cross_entropy_loss():
    w = torch.rand(5) + 0.5
    model = nn.ModuleDict({"proj": nn.Linear(4, 5), "loss": nn.CrossEntropyLoss(w, ignore_index=0,
                                                                                label_smoothing=0.1)})
    x, t = torch.randn(7, 4), torch.randint(0, 5, (7,))
    expected = model["loss"](model["proj"](x), t)
    fastnn.patch(model, verbose=False)
    assert type(model["loss"]) is fastnn.nn.CrossEntropyLoss
    torch.testing.assert_close(model["loss"](model["proj"](x), t), expected)
    assert torch.equal(model["loss"].weight, w)


CUDA_BACKENDS = [p for p in device_backends("cross_entropy") if p.values[0] == "cuda"]


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
@pytest.mark.parametrize("shape", [
    (2**31 // 32000 + 2, 32000),  # N * V past 2**31: the last rows start past 2**31 elements
    (1, 3, 2**30),                # classes 2**30 apart: class 2 of every position is past 2**31 elements
    (2**31 + 5, 2),               # more rows than a grid's x dimension holds (2**31 - 1)
])
def test_cuda_past_2_31_elements(device, backend, shape):
    # float16 logits (4-9 GB); per-row loss and the gradient at both ends against the reference.
    x = 3 * torch.randn(shape, dtype=torch.float16, device=device)
    t = torch.randint(0, shape[1], (shape[0],) + shape[2:], device=device)
    out, dx, g = run(F.cross_entropy, x, t, None, reduction="none", backend=backend)
    pos = t.numel()
    pick = torch.tensor([0, 1, pos - 2, pos - 1], device=device)
    # positions as rows of a (rows, C) problem
    x2 = x.movedim(1, -1).reshape(-1, shape[1]) if len(shape) > 2 else x
    dx2 = dx.movedim(1, -1).reshape(-1, shape[1]) if len(shape) > 2 else dx
    xs, ts, gs = x2[pick], t.reshape(-1)[pick], g.reshape(-1)[pick]
    ref, ref_dx, _ = run(fastnn.reference.cross_entropy, xs.double(), ts, None, gs.double(), reduction="none")
    t_out, t_dx, _ = run(TF.cross_entropy, xs, ts, None, gs, reduction="none")
    assert_matches(out.reshape(-1)[pick], ref, torch_out=t_out)
    assert_matches(dx2[pick], ref_dx, torch_out=t_dx, name="grad_input")


@pytest.mark.skipif(not any(p.values == ("cpu", "triton") for p in device_backends("cross_entropy")),
                    reason="needs Triton's interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("shape", [(7, 33), (5, 4, 3)])
@pytest.mark.parametrize("kind", ["ignored", "prob"])
def test_triton_more_rows_than_a_grid(monkeypatch, shape, kind):
    # More rows than a grid holds (2**31 - 1) take several launches on slices along N; a grid of 2 (or 7, for 3
    # positions per row) programs stands in for the limit.
    import fastnn.kernels.common as common

    monkeypatch.setattr(common, "MAX_PROGRAMS", 2 if len(shape) == 2 else 7)
    x, t, w = make_case(shape, kind, True, "cpu", torch.float32)
    kw = dict(reduction="none", label_smoothing=0.1)
    ref, ref_dx, g = run(fastnn.reference.cross_entropy, x.double(), t if kind != "prob" else t.double(),
                         w.double(), **kw)
    out, dx, _ = run(lambda *a, **k: F.cross_entropy(*a, **k, backend="triton"), x, t, w, g.float(), **kw)
    assert_matches(out, ref)
    assert_matches(dx, ref_dx, name="grad_input")
