"""binary_cross_entropy_with_logits through every backend against fastnn.reference in float64 and against torch,
forward and gradients (input and target), with weight / pos_weight broadcast in every supported way."""
import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import fastnn
import fastnn.functional as F
from helpers import assert_matches, assert_raises_naming, device_backends

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
REDUCTIONS = ["none", "mean", "sum"]

SHAPES = [
    (),             # 0-d: torch accepts it, "mean" of one element
    (1,),           # one element
    (7,),           # shorter than one SIMD vector: only the tail path runs
    (1025,),        # one past a Triton block (1024) and a CPU reduction chunk (1024)
    (113, 203),     # both odd; pos_weight runs of 203 split vectors and chunks at odd places
    (3, 5000),      # rows longer than a block and a chunk
    (2, 3, 37),     # 3-d: weight broadcast over the middle dim
    (0,),           # empty: "mean" is NaN, "sum" 0, as torch
    (4, 0),         # empty rows
]
OPTIONS = ["plain", "weight", "pos_weight", "both"]


def _inputs(shape, dtype, device, option):
    """Logits with a spread that reaches the saturated regions, soft targets in [0, 1] (some exactly 0 or 1),
    and positive weights: weight broadcast over the first dim, pos_weight along the last (torch's usual use)."""
    x = (4 * torch.randn(shape, dtype=torch.float64, device=device)).to(dtype)
    y = torch.rand(shape, dtype=torch.float64, device=device)
    if y.numel() > 4:
        y.view(-1)[:2] = torch.tensor([0.0, 1.0])
    y = y.to(dtype)
    w = pw = None
    if option in ("weight", "both"):
        wshape = (1,) + tuple(shape[1:]) if len(shape) >= 2 else shape
        if len(shape) == 3:
            wshape = (shape[0], 1, shape[2])
        w = (0.25 + torch.rand(wshape, dtype=torch.float64, device=device)).to(dtype)
    if option in ("pos_weight", "both"):
        pw = (0.1 + 3 * torch.rand(shape[-1:], dtype=torch.float64, device=device)).to(dtype)
    return x, y, w, pw


def _run(fn, x, y, w, pw, reduction, g=None, **kw):
    """(loss, grad_input, grad_target, g) with upstream gradient g; a random one in x's dtype if None, so that
    the float64 reference sees exactly the rounded gradient the low-precision kernels get."""
    x = x.detach().clone().requires_grad_()
    y = y.detach().clone().requires_grad_()
    out = fn(x, y, w, reduction=reduction, pos_weight=pw, **kw)
    if g is None:
        g = torch.randn(out.shape, dtype=torch.float64, device=out.device).to(x.dtype)
    dx, dy = torch.autograd.grad(out, (x, y), g.to(out.dtype))
    return out.detach(), dx, dy, g


def _check(out, ref, torch_out=None, name="output"):
    if ref.numel() and ref.isnan().all():  # "mean" of nothing (assert_matches' bound would be NaN)
        assert out.isnan().all(), f"{name}: expected NaN, got {out}"
        return
    assert_matches(out, ref, torch_out=torch_out, name=name)


def _d(t):
    return None if t is None else t.double()


def _params_all_shapes():
    # every shape, dtype and reduction with weight and pos_weight both given (the path with the most terms)
    for shape in SHAPES:
        for dtype in DTYPES:
            for reduction in REDUCTIONS:
                yield pytest.param(shape, dtype, reduction, "both", id=f"{shape}-{dtype}-{reduction}")


def _params_all_options():
    # every weight / pos_weight combination and reduction on one odd 2-d shape, full and low precision
    for option in OPTIONS:
        for dtype in (torch.float32, torch.bfloat16):
            for reduction in REDUCTIONS:
                yield pytest.param((113, 203), dtype, reduction, option, id=f"{option}-{dtype}-{reduction}")


@pytest.mark.parametrize("device,backend", device_backends("bce_with_logits", reference=True))
@pytest.mark.parametrize("shape,dtype,reduction,option", [*_params_all_shapes(), *_params_all_options()])
def test_matches_reference(device, backend, shape, dtype, reduction, option):
    x, y, w, pw = _inputs(shape, dtype, device, option)
    out, dx, dy, g = _run(F.binary_cross_entropy_with_logits, x, y, w, pw, reduction, backend=backend)
    ref, ref_dx, ref_dy, _ = _run(fastnn.reference.binary_cross_entropy_with_logits, x.double(), y.double(), _d(w),
                                  _d(pw), reduction, g.double())
    t_out, t_dx, t_dy, _ = _run(TF.binary_cross_entropy_with_logits, x, y, w, pw, reduction, g)
    assert out.dtype == dtype and out.shape == t_out.shape
    _check(out, ref, t_out)
    _check(dx, ref_dx, t_dx, name="grad_input")
    _check(dy, ref_dy, t_dy, name="grad_target")
    if dtype == torch.float64:  # and the reference itself agrees with torch's kernel
        torch.testing.assert_close(ref, t_out, rtol=1e-10, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(ref_dx, t_dx, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ref_dy, t_dy, rtol=1e-10, atol=1e-12)


# Broadcast layouts of weight / pos_weight read in place (no expanded copy), and the fallbacks that copy.
LAYOUTS = [
    ((6, 10), (), None),                    # scalar weight: one stride-0 run over everything
    ((6, 10), (6, 1), (10,)),               # per-row weight (stride-0 runs of 10), per-column pos_weight
    ((6, 10), (1, 10), (1, 10)),            # leading size-1 dims are dropped
    ((2, 3, 4, 5), (3, 1, 1), (5,)),        # weight constant over the two inner dims: coalesced into one run
    ((2, 3, 4, 5), (2, 1, 4, 1), (4, 5)),   # alternating broadcast: 4 coalesced dims, the most kept in place
    ((2, 3, 2, 3, 2), (3, 1, 3, 1), (2,)),  # 5 alternating dims: more than 4, falls back to an expanded copy
    ((5, 9), "transposed", "strided"),      # non-contiguous weight / pos_weight: made contiguous first
    ((1,), (1,), (1,)),
]


def _layout_tensor(spec, shape, device):
    if spec is None:
        return None
    if spec == "transposed":
        return (0.5 + torch.rand(shape[::-1], dtype=torch.float64, device=device)).t()
    if spec == "strided":
        return (0.5 + torch.rand(2 * shape[-1], dtype=torch.float64, device=device))[::2]
    return 0.5 + torch.rand(spec, dtype=torch.float64, device=device)


@pytest.mark.parametrize("device,backend", device_backends("bce_with_logits"))
@pytest.mark.parametrize("shape,wspec,pwspec", LAYOUTS, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_broadcast_layouts(device, backend, shape, wspec, pwspec, reduction):
    x = 3 * torch.randn(shape, dtype=torch.float64, device=device)
    y = torch.rand(shape, dtype=torch.float64, device=device)
    w, pw = _layout_tensor(wspec, shape, device), _layout_tensor(pwspec, shape, device)
    t_out, t_dx, t_dy, g = _run(TF.binary_cross_entropy_with_logits, x, y, w, pw, reduction)
    out, dx, dy, _ = _run(F.binary_cross_entropy_with_logits, x, y, w, pw, reduction, g, backend=backend)
    for a, b in ((out, t_out), (dx, t_dx), (dy, t_dy)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device,backend", device_backends("bce_with_logits"))
@pytest.mark.parametrize("make_g", [
    lambda s, d: torch.randn(s[1], s[0], dtype=torch.float64, device=d).t(),   # transposed grad_output
    lambda s, d: torch.randn(1, s[1], dtype=torch.float64, device=d).expand(s),  # expanded: loss.sum(0).mean()
], ids=["transposed", "expanded"])
def test_non_contiguous_inputs_and_grad(device, backend, make_g):
    shape = (12, 17)
    x = (3 * torch.randn(shape[::-1], dtype=torch.float64, device=device)).t()  # transposed logits
    y = torch.rand(2 * shape[0], shape[1], dtype=torch.float64, device=device)[::2]  # strided targets
    g = make_g(shape, device)
    pw = torch.rand(shape[1], dtype=torch.float64, device=device) + 0.5
    t_out, t_dx, t_dy, _ = _run(TF.binary_cross_entropy_with_logits, x, y, None, pw, "none", g)
    out, dx, dy, _ = _run(F.binary_cross_entropy_with_logits, x, y, None, pw, "none", g, backend=backend)
    for a, b in ((out, t_out), (dx, t_dx), (dy, t_dy)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device,backend", device_backends("bce_with_logits"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", OPTIONS)
def test_extreme_logits(device, backend, dtype, option):
    # +-1e4 saturates sigmoid: exp(-|x|) underflows to 0 and the loss is exactly linear in x; a naive
    # log(sigmoid(x)) would give -inf / NaN. Also +-30 / +-90, where float32's exp(x) alone would overflow.
    repeats = 1 if dtype == torch.float16 else 5  # float16 sums of several 1e4 losses overflow (to inf, as torch)
    x = torch.tensor([1e4, -1e4, 30.0, -30.0, 90.0, -90.0, 0.0, 1e-3] * repeats, dtype=torch.float64, device=device)
    y = torch.rand(x.shape, dtype=torch.float64, device=device)
    y[:4] = torch.tensor([0.0, 1.0, 1.0, 0.0])
    w = pw = None
    if option in ("weight", "both"):
        w = 0.5 + torch.rand(x.shape, dtype=torch.float64, device=device)
    if option in ("pos_weight", "both"):
        pw = 0.5 + torch.rand((), dtype=torch.float64, device=device)
    x, y = x.to(dtype), y.to(dtype)
    w, pw = (None if t is None else t.to(dtype) for t in (w, pw))
    for reduction in REDUCTIONS:
        out, dx, dy, g = _run(F.binary_cross_entropy_with_logits, x, y, w, pw, reduction, backend=backend)
        ref, ref_dx, ref_dy, _ = _run(fastnn.reference.binary_cross_entropy_with_logits, x.double(), y.double(),
                                      _d(w), _d(pw), reduction, g.double())
        t_out, t_dx, t_dy, _ = _run(TF.binary_cross_entropy_with_logits, x, y, w, pw, reduction, g)
        assert out.isfinite().all() and dx.isfinite().all() and dy.isfinite().all()
        _check(out, ref, t_out)
        _check(dx, ref_dx, t_dx, name="grad_input")
        _check(dy, ref_dy, t_dy, name="grad_target")


def test_softplus_within_two_ulp_native():
    """With target 1 the loss is softplus(-x) = log1p(exp(-|x|)) + max(-x, 0); the CPU kernel takes log1p on [0, 1]
    in two reduced forms, split at exp(-|x|) = sqrt(2) - 1 (csrc/cpu/vec.h, log1p_unit). Over a dense range
    around both branches, the split and the tails, float32 stays within 2 ulp of float64, as torch's does."""
    x = torch.cat([torch.linspace(-20, 20, 400_001), torch.linspace(0.87, 0.89, 20_001),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 87.0, -87.0, 103.0, 104.5, 1e4, -1e4])])
    y = torch.ones_like(x)
    out = F.binary_cross_entropy_with_logits(x, y, reduction="none", backend="native").double()
    xd = x.double()
    exact = torch.log1p(torch.exp(-xd.abs())) + torch.clamp(-xd, min=0)
    ulp = (torch.nextafter(exact.float(), torch.tensor(float("inf"))) - exact.float()).double()
    err = (out - exact).abs() / ulp
    assert err.max().item() <= 2.0, f"{err.max().item():.2f} ulp at x = {x[err.argmax()].item()}"


def _cpu_backends():
    return [p.values[1] for p in device_backends("bce_with_logits") if p.values[0] == "cpu"]


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape,wshape,pwshape", [((4, 7), (4, 1), (7,)), ((9,), None, None), ((), (), ())],
                         ids=str)
def test_gradcheck(backend, reduction, shape, wshape, pwshape):
    x = (3 * torch.randn(shape, dtype=torch.float64)).requires_grad_()
    y = torch.rand(shape, dtype=torch.float64).requires_grad_()
    w = None if wshape is None else torch.rand(wshape, dtype=torch.float64) + 0.5
    pw = None if pwshape is None else torch.rand(pwshape, dtype=torch.float64) + 0.5

    def f(x, y):
        return F.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=pw, backend=backend)

    # fast mode for the interpreter: the full Jacobian would be 2 x 28 interpreted launches per output element
    assert torch.autograd.gradcheck(f, (x, y), fast_mode=backend == "triton")


@pytest.mark.parametrize("suffix", ["", "_triton"])
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("with_weights", [False, True])
def test_opcheck(suffix, reduction, with_weights):
    if suffix and "triton" not in _cpu_backends():
        pytest.skip("no Triton on CPU here")
    x, y = torch.randn(5, 33, requires_grad=True), torch.rand(5, 33, requires_grad=True)
    w, pw = (torch.rand(5, 1), torch.rand(33)) if with_weights else (None, None)
    torch.library.opcheck(getattr(torch.ops.fastnn, "bce_with_logits_fwd" + suffix), (x, y, w, pw, reduction))
    g = torch.randn(5, 33) if reduction == 0 else torch.randn(())
    bwd = getattr(torch.ops.fastnn, "bce_with_logits_bwd" + suffix)
    for need in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(bwd, (g, x.detach(), y.detach(), w, pw, reduction, *need))


@pytest.mark.parametrize("device,backend", device_backends("bce_with_logits"))
def test_torch_compile_fullgraph(device, backend):
    pw = torch.rand(17, device=device) + 0.5

    def f(x, y):
        a = F.binary_cross_entropy_with_logits(x * 2, y, pos_weight=pw, backend=backend)
        b = F.binary_cross_entropy_with_logits(x, y, reduction="none", backend=backend)
        return a + b.sum(0).mean()

    x = torch.randn(6, 17, device=device, requires_grad=True)
    y = torch.rand(6, 17, device=device, requires_grad=True)
    out = torch.compile(f, fullgraph=True)(x, y)
    dx, dy = torch.autograd.grad(out, (x, y))
    eager = f(x, y)
    dx_e, dy_e = torch.autograd.grad(eager, (x, y))
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(dx, dx_e)
    torch.testing.assert_close(dy, dy_e)


@pytest.mark.parametrize("device,backend", device_backends("bce_with_logits"))
@pytest.mark.parametrize("needs", [(True, False), (False, True)], ids=["input-only", "target-only"])
def test_one_gradient_only(device, backend, needs):
    x = torch.randn(8, 9, device=device, requires_grad=needs[0])
    y = torch.rand(8, 9, device=device, requires_grad=needs[1])
    out = F.binary_cross_entropy_with_logits(x, y, reduction="sum", backend=backend)
    (grad,) = torch.autograd.grad(out, [x if needs[0] else y])
    (expected,) = torch.autograd.grad(TF.binary_cross_entropy_with_logits(x, y, reduction="sum"),
                                      [x if needs[0] else y])
    torch.testing.assert_close(grad, expected)


def test_legacy_size_average_and_reduce():
    x, y = torch.randn(4, 5), torch.rand(4, 5)
    for kw in (dict(size_average=False), dict(reduce=False), dict(size_average=True, reduce=True)):
        with pytest.warns(UserWarning):
            expected = TF.binary_cross_entropy_with_logits(x, y, **kw)
        with pytest.warns(UserWarning):
            torch.testing.assert_close(F.binary_cross_entropy_with_logits(x, y, **kw), expected)


@pytest.mark.parametrize("call,exc,words", [
    (lambda: F.binary_cross_entropy_with_logits(torch.randn(3, 4), torch.rand(4, 3)), ValueError,
     ["Target size", "input size"]),
    (lambda: F.binary_cross_entropy_with_logits(torch.randn(3), torch.ones(3, dtype=torch.long)), TypeError,
     ["target", "int64"]),
    (lambda: F.binary_cross_entropy_with_logits(torch.arange(3), torch.rand(3)), TypeError, ["input", "int64"]),
    (lambda: F.binary_cross_entropy_with_logits(torch.randn(3), torch.rand(3).double()), TypeError,
     ["target", "dtype"]),
    (lambda: F.binary_cross_entropy_with_logits(torch.randn(3, 4), torch.rand(3, 4), torch.rand(4).half()),
     TypeError, ["weight", "dtype"]),
    (lambda: F.binary_cross_entropy_with_logits(torch.randn(3, 4), torch.rand(3, 4), torch.rand(3)), ValueError,
     ["weight", "(3,)", "broadcast"]),
    (lambda: F.binary_cross_entropy_with_logits(torch.randn(3, 4), torch.rand(3, 4), pos_weight=torch.rand(2, 3, 4)),
     ValueError, ["pos_weight", "broadcast"]),
    (lambda: F.binary_cross_entropy_with_logits(torch.randn(3), torch.rand(3), reduction="avg"), ValueError,
     ["reduction", "avg"]),
    (lambda: F.binary_cross_entropy_with_logits(torch.randn(3), torch.rand(3, device="meta")), ValueError,
     ["device", "target"]),
    (lambda: F.binary_cross_entropy_with_logits(torch.randn(3, device="meta"), torch.rand(3, device="meta"),
                                                backend="native"), ValueError, ["native", "meta"]),
    (lambda: F.binary_cross_entropy_with_logits(torch.randn(3), torch.rand(3), torch.rand(3, requires_grad=True)),
     RuntimeError, ["weight", "differentiable"]),
    (lambda: F.binary_cross_entropy_with_logits(torch.randn(3), [0.0, 1.0, 1.0]), TypeError, ["target", "Tensor"]),
    # the C++ ops check again (defense in depth)
    (lambda: torch.ops.fastnn.bce_with_logits_fwd(torch.randn(3), torch.rand(4), None, None, 1), RuntimeError,
     ["target", "shape"]),
    (lambda: torch.ops.fastnn.bce_with_logits_fwd(torch.randn(3), torch.rand(3), torch.rand(2), None, 1),
     RuntimeError, ["weight", "broadcast"]),
    (lambda: torch.ops.fastnn.bce_with_logits_fwd(torch.randn(3), torch.rand(3), None, torch.rand(3).double(), 1),
     RuntimeError, ["pos_weight", "dtype"]),
    (lambda: torch.ops.fastnn.bce_with_logits_fwd(torch.randn(3), torch.rand(3), None, None, 3), RuntimeError,
     ["reduction"]),
    (lambda: torch.ops.fastnn.bce_with_logits_bwd(torch.randn(3), torch.randn(3), torch.rand(3), None, None, 1,
                                                  True, True), RuntimeError, ["grad_output", "shape"]),
])
def test_bad_input_raises_clear_error(call, exc, words):
    assert_raises_naming(call, exc, words)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(reduction="sum", pos_weight=torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5])),
    dict(weight=torch.rand(4, 1), reduction="none"),
    dict(weight=torch.rand(5), pos_weight=torch.rand(5) + 0.5),
    dict(size_average=False),
], ids=["default", "pos_weight-sum", "weight-none", "both", "legacy"])
def test_module_matches_torch(kwargs):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the legacy arguments' deprecation warning
        theirs, ours = nn.BCEWithLogitsLoss(**kwargs), fastnn.nn.BCEWithLogitsLoss(**kwargs)
    x, y = torch.randn(4, 5, requires_grad=True), torch.rand(4, 5)
    torch.testing.assert_close(ours(x, y), theirs(x, y))
    assert ours.reduction == theirs.reduction and repr(ours) == repr(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert dict(ours.named_buffers()).keys() == dict(theirs.named_buffers()).keys()
    ours.load_state_dict(theirs.state_dict())  # interchangeable checkpoints


def test_patch_replaces_loss_and_keeps_buffers(capsys):
    model = nn.Sequential(nn.Linear(8, 5), nn.BCEWithLogitsLoss(pos_weight=torch.rand(5) + 0.5))
    x, y = torch.randn(3, 8), torch.rand(3, 5)
    expected = model[1](model[0](x), y)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fastnn.patch(model)
    assert type(model[1]) is fastnn.nn.BCEWithLogitsLoss
    assert "replaced 1 module(s)" in capsys.readouterr().out
    torch.testing.assert_close(model[1](model[0](x), y), expected)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    model.to(torch.float64)  # buffers follow the module, as torch's do
    assert model[1].pos_weight.dtype == torch.float64


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_native_and_triton_agree(dtype):
    x, y, w, pw = _inputs((1000, 1037), dtype, "cuda", "both")
    g = torch.randn((), device="cuda").to(dtype)
    ref, ref_dx, ref_dy, _ = _run(fastnn.reference.binary_cross_entropy_with_logits, x.double(), y.double(), _d(w),
                                  _d(pw), "mean", g.double())
    t_out, t_dx, t_dy, _ = _run(TF.binary_cross_entropy_with_logits, x, y, w, pw, "mean", g)
    for backend in ("native", "triton"):
        out, dx, dy, _ = _run(F.binary_cross_entropy_with_logits, x, y, w, pw, "mean", g, backend=backend)
        _check(out, ref, t_out)
        _check(dx, ref_dx, t_dx, name="grad_input")
        _check(dy, ref_dy, t_dy, name="grad_target")


@pytest.mark.cuda
@pytest.mark.parametrize("device,backend", [p for p in device_backends("bce_with_logits") if p.values[0] == "cuda"])
@pytest.mark.parametrize("shape,wspec,pwspec", [
    ((2053, 2053), (2053, 1), (2053,)),       # more slots than one grid-stride pass (the walk's step), odd runs
    ((3, 1401, 1001), (3, 1, 1001), (1,)),    # broadcast over the middle dim, runs crossing 16-byte slots
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_cuda_grid_stride_broadcast(device, backend, shape, wspec, pwspec, dtype, reduction):
    x = (3 * torch.randn(shape, dtype=torch.float64, device=device)).to(dtype)
    y = torch.rand(shape, dtype=torch.float64, device=device).to(dtype)
    w = _layout_tensor(wspec, shape, device).to(dtype)
    pw = _layout_tensor(pwspec, shape, device).to(dtype)
    ref, ref_dx, ref_dy, g = _run(fastnn.reference.binary_cross_entropy_with_logits, x.double(), y.double(),
                                  w.double(), pw.double(), reduction)
    out, dx, dy, _ = _run(F.binary_cross_entropy_with_logits, x, y, w, pw, reduction, g.to(dtype), backend=backend)
    t_out, t_dx, t_dy, _ = _run(TF.binary_cross_entropy_with_logits, x, y, w, pw, reduction, g.to(dtype))
    _check(out, ref, t_out)
    _check(dx, ref_dx, t_dx, name="grad_input")
    _check(dy, ref_dy, t_dy, name="grad_target")
