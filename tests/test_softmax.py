"""softmax / log_softmax through every backend against fastnn.reference in float64, forward and backward."""
import inspect

import pytest
import torch
from torch import nn

import fastnn
import fastnn.functional as F
from helpers import assert_matches, assert_raises_naming, device_backends

FN = {False: F.softmax, True: F.log_softmax}
TORCH_FN = {False: torch.softmax, True: torch.log_softmax}
REF = {False: fastnn.reference.softmax, True: fastnn.reference.log_softmax}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

SHAPES = [
    ((1,), -1),            # one element: softmax is exactly 1
    ((7,), 0),             # shorter than one SIMD vector: only the tail path runs
    ((97, 1025), -1),      # 1025 = one past a power of two: Triton's block is 2048, mostly masked
    ((113, 203), -1),      # both odd
    ((113, 203), 0),       # reduce over a non-last dim: strided rows, no transposing copy
    ((150, 24), -1),       # short rows: the CPU takes 64 at a time as slabs (two full, one partial)
    ((70, 1), -1),         # rows of one element
    ((3, 5, 7, 9), 1),     # non-last dim with inner = 63, not a multiple of the vector width
    ((2, 262144), -1),     # rows longer than one block: the online (two-pass) path of every backend
    ((0, 5), -1),          # zero rows
    ((4, 0), -1),          # zero-length rows
    ((), 0),               # 0-d tensor, as torch accepts
]


def _run(fn, x, g, dim, **kw):
    x = x.detach().clone().requires_grad_()
    out = fn(x, dim, **kw)
    (dx,) = torch.autograd.grad(out, x, g)
    return out.detach(), dx


def _check_against_reference(device, backend, shape, dim, dtype, log):
    """Output and grad_input of one backend on fresh inputs against the float64 reference."""
    x = (3 * torch.randn(shape, dtype=torch.float64, device=device)).to(dtype)
    g = torch.randn(shape, dtype=torch.float64, device=device).to(dtype)
    ref, ref_dx = _run(REF[log], x.double(), g.double(), dim)
    out, dx = _run(FN[log], x, g, dim, backend=backend)
    t_out, t_dx = _run(TORCH_FN[log], x, g, dim)
    assert out.dtype == dtype and out.is_contiguous()
    assert_matches(out, ref, torch_out=t_out)
    assert_matches(dx, ref_dx, torch_out=t_dx, name="grad_input")


@pytest.mark.parametrize("device,backend", device_backends("softmax", reference=True))
@pytest.mark.parametrize("shape,dim", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_matches_reference(device, backend, shape, dim, dtype, log):
    _check_against_reference(device, backend, shape, dim, dtype, log)


@pytest.mark.parametrize("device,backend", device_backends("softmax"))
@pytest.mark.parametrize("make", [
    lambda d: torch.randn(40, 60, device=d).t(),                  # transposed
    lambda d: torch.randn(30, 80, device=d)[:, ::2],              # strided rows
    lambda d: torch.randn(1, 50, device=d).expand(7, 50),         # stride-0 (expanded)
    lambda d: torch.randn(2, 3, 4, 5, device=d).to(memory_format=torch.channels_last),
], ids=["transposed", "strided", "expanded", "channels_last"])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_non_contiguous(device, backend, make, log):
    x = make(device)
    g = torch.randn(x.shape, device=device)
    for dim in range(x.dim()):
        ref, ref_dx = _run(REF[log], x.double(), g.double(), dim)
        out, dx = _run(FN[log], x, g, dim, backend=backend)
        assert_matches(out, ref)
        assert_matches(dx, ref_dx, name="grad_input")


@pytest.mark.parametrize("device,backend", device_backends("softmax"))
@pytest.mark.parametrize("n", [5, 100000])  # register-resident row, and the online path
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_infinities_nan_and_extremes(device, backend, n, log):
    x = torch.randn(5, n, device=device)
    x[0] = float("-inf")                    # all -inf: NaN, as torch
    x[1, ::2] = float("-inf")               # some -inf: those get 0 (log: -inf)
    x[2, n // 2] = float("nan")             # a NaN poisons its row
    x[3] = 1e4 * torch.randn(n, device=device).sign()  # +-1e4 must not overflow
    x[4, 0] = float("inf")                  # a +inf: NaN, as torch
    out = FN[log](x, -1, backend=backend)
    expected = TORCH_FN[log](x.double(), -1)
    assert torch.equal(out.isnan(), expected.isnan())
    finite = ~expected.isnan()
    torch.testing.assert_close(out[finite].double(), expected[finite], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("width", [2, 40])  # rows inside one vector's tail, and over full vectors plus a tail
def test_exp_over_its_whole_range_native(width):
    """Row [x, 0, ..., 0]: softmax's first element is exp(x) / (exp(x) + width - 1), so it follows the CPU kernels'
    vector exp from where it rounds to 0 through the denormals to where it overflows (there the row's max, x,
    is subtracted first). Within a few ulp of float64, or below FLT_MIN where the AVX2 exp flushes to 0."""
    x = torch.cat([torch.linspace(-120, 100, 8001), torch.tensor([float("-inf"), 88.7, 88.73, 89.0, 1e30])])
    rows = torch.zeros(len(x), width)
    rows[:, 0] = x
    for log in (False, True):
        expected = TORCH_FN[log](rows.double(), -1)[:, 0]
        # The rows as they are (short rows run as slabs), and as columns (dim 0: a non-last dim's slabs).
        for out in (FN[log](rows, -1, backend="native")[:, 0], FN[log](rows.t().contiguous(), 0, backend="native")[0]):
            # log: x - log(s) cancels near 0, so its error is absolute there
            torch.testing.assert_close(out.double(), expected, rtol=4e-7, atol=4e-7 if log else 1.2e-38)


@pytest.mark.parametrize("n", [16411, 70001])  # odd rows (unaligned starts: head and tail), and the online path
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_large_outputs_stream_the_same_values_native(n, log):
    """float32 outputs of 64 MiB or more are written with streaming stores (csrc/cpu/vec.h, write_row), softmax's
    exp kept in a scratch row of the task and scaled from there: every row must hold exactly what the same row
    gives in a small tensor (plain stores), forward and backward, and match the float64 reference."""
    rows = (64 << 20) // (4 * n) + 2
    torch.manual_seed(5)
    x, g = 3 * torch.randn(rows, n), torch.randn(rows, n)
    y = FN[log](x, -1, backend="native")
    dx = torch.ops.fastnn.softmax_bwd(g, y, -1, log)
    for r in (0, 1, rows // 2, rows - 1):
        assert torch.equal(y[r:r + 1], FN[log](x[r:r + 1], -1, backend="native")), f"forward row {r}"
        assert torch.equal(dx[r:r + 1], torch.ops.fastnn.softmax_bwd(g[r:r + 1], y[r:r + 1], -1, log)), \
            f"backward row {r}"
    ref, ref_dx = _run(REF[log], x[:3].double(), g[:3].double(), -1)
    torch.testing.assert_close(y[:3].double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx[:3].double(), ref_dx, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [p.values[1] for p in device_backends("softmax") if p.values[0] == "cpu"])
@pytest.mark.parametrize("shape,dim", [((4, 7), -1), ((3, 5, 4), 1), ((2, 9000), -1)])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_gradcheck(backend, shape, dim, log):
    if shape[-1] > 1000 and backend == "triton":
        pytest.skip("the interpreter makes a long-row gradcheck slow; covered by test_matches_reference")
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: FN[log](t, dim, backend=backend), (x,), fast_mode=shape[-1] > 1000)


@pytest.mark.parametrize("suffix", ["", "_triton"])
@pytest.mark.parametrize("shape,dim", [((5, 33), -1), ((4, 6, 3), 1)])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_opcheck(suffix, shape, dim, log):
    if suffix and not [p for p in device_backends("softmax") if p.values == ("cpu", "triton")]:
        pytest.skip("no Triton on CPU here")
    x = torch.randn(shape, requires_grad=True)
    torch.library.opcheck(getattr(torch.ops.fastnn, "softmax_fwd" + suffix), (x, dim, log))
    y = torch.softmax(x.detach(), dim)
    torch.library.opcheck(getattr(torch.ops.fastnn, "softmax_bwd" + suffix), (torch.randn(shape), y, dim, log))


@pytest.mark.parametrize("device,backend", device_backends("softmax"))
def test_torch_compile_fullgraph(device, backend):
    def f(x):
        return F.softmax(x * 2, -1, backend=backend).sum(0) + F.log_softmax(x, 0, backend=backend)[0]

    x = torch.randn(6, 17, device=device, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x)
    (dx,) = torch.autograd.grad(out.sum(), x)
    (dx_eager,) = torch.autograd.grad(f(x).sum(), x)
    torch.testing.assert_close(out, f(x))
    torch.testing.assert_close(dx, dx_eager)


@pytest.mark.parametrize("twin,theirs", [(fastnn.nn.Softmax, nn.Softmax), (fastnn.nn.LogSoftmax, nn.LogSoftmax)])
def test_implicit_dim_under_torch_compile_fullgraph(twin, theirs):
    # dim=None warns outside compiled code only (Dynamo does not trace warnings.warn); the dimension is torch's.
    x = torch.randn(2, 3, 4, 5)
    with pytest.warns(UserWarning):
        expected = theirs()(x)
    torch.testing.assert_close(torch.compile(twin(), fullgraph=True)(x), expected)


def test_dtype_argument_casts_first():
    x = torch.randn(4, 9, dtype=torch.float64)
    out = F.softmax(x, -1, dtype=torch.float32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.softmax(x, -1, dtype=torch.float32))


@pytest.mark.parametrize("call,exc,words", [
    (lambda: F.softmax(torch.arange(6), -1), TypeError, ["input", "int64"]),
    (lambda: F.softmax(torch.randn(3, 4), 2), IndexError, ["dim", "[-2, 1]"]),
    (lambda: F.log_softmax(torch.randn(3), -2), IndexError, ["dim"]),
    (lambda: F.softmax([1.0, 2.0]), TypeError, ["input", "Tensor"]),
    (lambda: F.softmax(torch.randn(3), 0.5), TypeError, ["dim", "int"]),
    (lambda: F.softmax(torch.randn(3), -1, backend="cudnn"), ValueError, ["backend"]),
    (lambda: F.softmax(torch.randn(3, device="meta"), -1, backend="native"), ValueError, ["native", "meta"]),
    (lambda: torch.ops.fastnn.softmax_bwd(torch.randn(3, 4), torch.randn(4, 3), -1, False), RuntimeError,
     ["grad_output", "output", "shape"]),
    (lambda: torch.ops.fastnn.softmax_bwd(torch.randn(3), torch.randn(3).double(), -1, False), RuntimeError,
     ["dtype"]),
])
def test_bad_input_raises_clear_error(call, exc, words):
    assert_raises_naming(call, exc, words)


def test_backend_selection(monkeypatch):
    x = torch.randn(3, 4)
    assert fastnn.get_backend() == "auto"
    with fastnn.use_backend("reference"):
        assert fastnn.get_backend() == "reference"
        with fastnn.use_backend("native"):
            assert fastnn.get_backend() == "native"
        assert fastnn.get_backend() == "reference"
    monkeypatch.setenv("FASTNN_BACKEND", "native")
    assert fastnn.get_backend() == "native"
    torch.testing.assert_close(F.softmax(x, -1), torch.softmax(x, -1))
    monkeypatch.setenv("FASTNN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTNN_BACKEND"):
        F.softmax(x, -1)
    with pytest.raises(ValueError, match="backend"):
        with fastnn.use_backend("fast"):
            pass


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("shape", [(), (7,), (3, 5), (2, 3, 4), (2, 3, 4, 5)])
def test_functional_signature_and_implicit_dim_match_torch(log, shape):
    # Positional and keyword arguments in torch's order (input, dim, _stacklevel, dtype); dim=None picks torch's
    # deprecated implicit dimension (0 for 0-, 1- and 3-d input, else 1) with torch's warning, pointing at the caller.
    ours, theirs = (F.log_softmax, torch.nn.functional.log_softmax) if log else (F.softmax, torch.nn.functional.softmax)
    names = ["input", "dim", "_stacklevel", "dtype"]
    assert list(inspect.signature(ours).parameters)[:4] == names == list(inspect.signature(theirs).parameters)
    x = torch.randn(shape)
    with pytest.warns(UserWarning, match="Implicit dimension choice") as record:
        got = ours(x)
    assert record[0].filename == __file__
    with pytest.warns(UserWarning):
        expected = theirs(x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(ours(x, -1, 3, torch.float64), theirs(x, -1, 3, torch.float64))


@pytest.mark.parametrize("cls,twin", [(nn.Softmax, fastnn.nn.Softmax), (nn.LogSoftmax, fastnn.nn.LogSoftmax)])
@pytest.mark.parametrize("dim", [0, 1, -1, None])
def test_modules_match_torch(cls, twin, dim):
    x = torch.randn(4, 6, 5)
    with pytest.warns(UserWarning) if dim is None else _nullcontext():
        ours = twin(dim)(x)
    with pytest.warns(UserWarning) if dim is None else _nullcontext():
        theirs = cls(dim)(x)
    torch.testing.assert_close(ours, theirs)
    assert repr(twin(dim)).endswith(f"(dim={dim})") and twin(dim).state_dict() == {}


def test_patch_replaces_and_keeps_weights(capsys):
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.ReLU(), nn.Softmax(dim=-1)), nn.LogSoftmax(1)).eval()
    x = torch.randn(3, 8)
    expected, state = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    patched = fastnn.patch(model)
    assert patched is model
    assert type(model[1][1]) is fastnn.nn.Softmax and type(model[2]) is fastnn.nn.LogSoftmax
    assert not model[2].training
    assert "replaced 2 module(s)" in capsys.readouterr().out
    torch.testing.assert_close(model(x), expected)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert type(fastnn.patch(nn.Softmax(0), verbose=False)) is fastnn.nn.Softmax


class _Unsupported(nn.Module):
    """A twin whose from_torch refuses the module, as a twin does for a configuration it cannot run."""

    @classmethod
    def from_torch(cls, module):
        raise NotImplementedError("not this configuration")


class _Broken(nn.Module):
    @classmethod
    def from_torch(cls, module):
        raise RuntimeError("a bug in a twin")


def test_patch_keeps_what_it_cannot_run_and_never_half_changes(monkeypatch, capsys):
    shared = nn.Softmax(-1)
    model = nn.Sequential(nn.Softmax(0), nn.Tanh(), nn.Sequential(shared, nn.Hardtanh()), shared)
    monkeypatch.setitem(fastnn.nn.PATCHABLE, nn.Tanh, _Unsupported)
    fastnn.patch(model)
    out = capsys.readouterr().out
    assert type(model[1]) is nn.Tanh and "kept 1 torch module(s)" in out and "1 (Tanh: not this configuration)" in out
    assert type(model[0]) is fastnn.nn.Softmax and model[2][0] is model[3]  # one twin for a shared module
    assert type(model[3]) is fastnn.nn.Softmax
    # A twin that fails for another reason raises, and leaves the model as it was: every twin is built first.
    model = nn.Sequential(nn.Softmax(0), nn.Hardtanh(), nn.LogSoftmax(1))
    monkeypatch.setitem(fastnn.nn.PATCHABLE, nn.Hardtanh, _Broken)
    with pytest.raises(RuntimeError, match="a bug in a twin"):
        fastnn.patch(model)
    assert [type(m) for m in model] == [nn.Softmax, nn.Hardtanh, nn.LogSoftmax]


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


# ---- CUDA-only: every launch geometry of the native CUDA kernel (csrc/cuda/softmax.cu) and of Triton's.
CUDA_BACKENDS = [p for p in device_backends("softmax") if p.values[0] == "cuda"]


@pytest.mark.cuda
@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
@pytest.mark.parametrize("rows,n", [
    (37, 1),        # a row per lane group of 1: 37 is not a multiple of the rows a block takes
    (37, 5),        # a group of 2 lanes, the second slot half padding
    (37, 33),       # a group of 16 lanes (float32), one slot each
    (9, 1000),      # one warp per row, 8 slots a lane, last ones masked
    (9, 1025),      # a block per row; 1025 is no multiple of the 16-byte vector: element-wise loads
    (5, 4096),      # a block per row, whole vectors
    (3, 16385),     # past the backward's register cache (float32): its two-pass path; the forward still caches
    (3, 32768),     # the largest forward row held in registers (float32)
    (2, 40000),     # past every cache: the online forward and the two-pass backward
])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "offset"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_cuda_launch_geometries(device, backend, rows, n, aligned, dtype, log):
    def make():
        # One element of storage offset keeps the tensor contiguous but its rows off 16-byte boundaries.
        t = (3 * torch.randn(rows * n + 1, dtype=torch.float64, device=device)).to(dtype)
        return (t[:-1] if aligned else t[1:]).view(rows, n)

    x, g = make().requires_grad_(), make()  # no clone: it would realign them
    assert aligned == (x.data_ptr() % 16 == 0 and g.data_ptr() % 16 == 0)
    out = FN[log](x, -1, backend=backend)
    (dx,) = torch.autograd.grad(out, x, g)
    ref, ref_dx = _run(REF[log], x.double(), g.double(), -1)
    t_out, t_dx = _run(TORCH_FN[log], x, g, -1)
    assert_matches(out, ref, torch_out=t_out)
    assert_matches(dx, ref_dx, torch_out=t_dx, name="grad_input")


@pytest.mark.cuda
@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
@pytest.mark.parametrize("shape,dim", [
    ((70000, 3, 2), 1),   # more outer indices than a grid's y dimension (65535): the grid-stride loop
    ((2, 5000, 3), 1),    # long strided columns, 3 wide: most of a warp idles, the reduction splits over y
    ((4, 300, 97), 1),    # 97 columns: four column blocks, the last one partial
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_cuda_non_last_dim(device, backend, shape, dim, dtype, log):
    _check_against_reference(device, backend, shape, dim, dtype, log)


@pytest.mark.cuda
@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
def test_cuda_side_stream_and_second_device(device, backend):
    # The kernels must run on the caller's current stream (and device): work queued on a side stream
    # before the call must be visible to it without any synchronization by the caller.
    x = torch.randn(64, 3000, device=device)
    expected = torch.softmax(x * 2, -1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = F.softmax(x * 2, -1, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(out, expected)
    if torch.cuda.device_count() > 1:
        x1 = x.to("cuda:1")
        torch.testing.assert_close(F.softmax(x1, -1, backend=backend).cpu(), torch.softmax(x, -1).cpu())


try:
    import triton
    import triton.language as tl

    from fastnn.kernels.common import row_geometry

    @triton.jit
    def _row_offset_probe(OUT, row, n_cols, inner, c, LASTDIM: tl.constexpr):
        _, base, stride = row_geometry(row, n_cols, inner, LASTDIM)
        tl.store(OUT, base + c * stride)
except ImportError:  # no Triton: the test below skips
    _row_offset_probe = None


def _row_offsets(cases):
    """base + c * stride, as the softmax and cross-entropy Triton kernels address element c of a row, computed by
    kernels/common.py's row_geometry for each (row, n_cols, inner, c, lastdim) under the interpreter."""
    out = []
    for row, n_cols, inner, c, lastdim in cases:
        o = torch.zeros(1, dtype=torch.int64)
        _row_offset_probe[(1,)](o, row, n_cols, inner, c, LASTDIM=lastdim)
        out.append(int(o))
    return out


@pytest.mark.skipif(not any(p.values == ("cpu", "triton") for p in device_backends("softmax")),
                    reason="needs Triton's interpreter (TRITON_INTERPRET=1)")
def test_triton_row_offsets_past_2_31():
    # Arguments below 2**31 reach the kernel as int32 and the interpreter keeps numpy's int32 wrap-around, so a
    # 32-bit product of row and length, or of column and stride, shows up here as a wrong (negative) offset.
    cases = [
        (2**31 // 4096 + 5, 4096, 1, 4095, True),     # last dim: row * n_cols passes 2**31
        (3, 5, 2**30 + 7, 4, False),                   # non-last dim: c * inner passes 2**31
        (2**30 + 9, 5, 2**30 + 7, 4, False),           # and the base of the second outer index
        (2**31 + 3, 2, 1, 1, True),                    # a row index that is itself int64
    ]
    expected = [row * n + c if last else (row // inner) * n * inner + row % inner + c * inner
                for row, n, inner, c, last in cases]
    assert _row_offsets(cases) == expected


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
@pytest.mark.parametrize("shape,dim", [
    ((2**31 // 4096 + 1, 4096), -1),  # 2**31 + 4096 elements: the last row starts past 2**31
    ((3, 2**30), 0),                   # non-last dim: element (2, j) is 2**31 + j elements in
])
def test_cuda_past_2_31_elements(device, backend, shape, dim):
    # float16 (4-6 GB a tensor). Rows at both ends are checked against the reference: a 32-bit offset would send
    # the last ones to wrong addresses.
    x = torch.randn(shape, dtype=torch.float16, device=device)
    g = torch.randn(shape, dtype=torch.float16, device=device)
    out, dx = _run(F.softmax, x, g, dim, backend=backend)
    other = 1 - (dim % 2)
    idx = torch.tensor([0, 1, shape[other] - 2, shape[other] - 1], device=device)
    xs, gs = x.index_select(other, idx), g.index_select(other, idx)
    ref, ref_dx = _run(REF[False], xs.double(), gs.double(), dim)
    t_out, t_dx = _run(torch.softmax, xs, gs, dim)
    assert_matches(out.index_select(other, idx), ref, torch_out=t_out)
    assert_matches(dx.index_select(other, idx), ref_dx, torch_out=t_dx, name="grad_input")


@pytest.mark.skipif(not any(p.values == ("cpu", "triton") for p in device_backends("softmax")),
                    reason="needs Triton's interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("shape,dim", [((7, 33), -1), ((4, 5, 3), 1)])
def test_triton_more_rows_than_a_grid(monkeypatch, shape, dim):
    # More rows than a grid holds (2**31 - 1) take several launches on slices along the outer dim; a grid of 2
    # programs stands in for the limit.
    import fastnn.kernels.common as common

    monkeypatch.setattr(common, "MAX_PROGRAMS", 2 if dim == -1 else 7)
    _check_against_reference("cpu", "triton", shape, dim, torch.float32, False)


@pytest.mark.parametrize("device,backend", device_backends("softmax"))
@pytest.mark.parametrize("n", [20000, 32768])  # Triton: the forward holds the row in registers, the backward not
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_rows_between_the_register_caps(device, backend, n, dtype, log):
    _check_against_reference(device, backend, (3, n), -1, dtype, log)


@pytest.mark.cuda
@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
@pytest.mark.parametrize("n", [50257, 128256])  # CUDA: registers plus a shared-memory tail (fp32 128256: online)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_cuda_rows_past_the_registers(device, backend, n, dtype, log):
    _check_against_reference(device, backend, (5, n), -1, dtype, log)


def test_every_twin_is_its_torch_class():
    # Drop-in: code that checks isinstance(m, nn.Softmax) (or any patched class) still finds the patched module,
    # with torch's public attributes, state_dict keys and repr.
    made = {nn.LSTMCell: (4, 5), nn.LSTM: (4, 5), nn.MultiheadAttention: (8, 2), nn.TransformerEncoderLayer: (8, 2),
            nn.Softmax: (1,), nn.LogSoftmax: (1,)}
    lce = getattr(nn, "LinearCrossEntropyLoss", None)  # torch's, in the torch versions that have it
    if lce is not None:
        made[lce] = (8, 11)
    for torch_cls, twin_cls in fastnn.nn.PATCHABLE.items():
        assert issubclass(twin_cls, torch_cls), twin_cls
        args = made.get(torch_cls, ())
        theirs, ours = torch_cls(*args), twin_cls(*args)
        public = {a for a in dir(theirs) if not a.startswith("_")}
        assert public <= set(dir(ours)), (twin_cls, public - set(dir(ours)))
        assert set(ours.state_dict()) == set(theirs.state_dict()) and repr(ours) == repr(theirs)
        assert type(fastnn.patch(theirs, verbose=False)) is twin_cls
