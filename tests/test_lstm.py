"""LSTM: the fused cell through every backend, and fastnn.functional.lstm and fastnn.nn.LSTMCell / LSTM against
their torch.nn twins with the same weights (outputs, final states and every gradient), variable lengths, dropout,
opcheck, compile."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence, pad_packed_sequence

import fastnn
import fastnn.functional as F
from fastnn.ops.lstm import lstm_layer
from helpers import assert_matches, assert_raises_naming, device_backends, run_cuda_emulator

FULL = [torch.float32, torch.float64]


def _grads(outs, inputs, seed_grads):
    return torch.autograd.grad(outs, inputs, seed_grads, allow_unused=True)


def _leaf(t):
    return t.detach().clone().requires_grad_()


# ---------------------------------------------------------------------------------------------------- the cell

CELL_SHAPES = [
    (1, 5, 7),      # batch 1, hidden 7: shorter than one SIMD vector, tail lanes only
    (4, 13, 97),    # odd hidden: 12 full float vectors and a tail of 1
    (3, 8, 513),    # one past a power of two: Triton's block is 1024, mostly masked
]


def _cell_inputs(B, I, H, dtype, device, bias=True):
    def r(*s):
        return torch.randn(*s, dtype=torch.float64, device=device).to(dtype)
    x, h, c = r(B, I), r(B, H), r(B, H)
    w_ih, w_hh = r(4 * H, I) / I ** 0.5, r(4 * H, H) / H ** 0.5
    b_ih, b_hh = (r(4 * H), r(4 * H)) if bias else (None, None)
    return [t if t is None else _leaf(t) for t in (x, h, c, w_ih, w_hh, b_ih, b_hh)]


def _run_cell(fn, ts, gh, gc):
    x, h, c, w_ih, w_hh, b_ih, b_hh = ts
    hy, cy = fn(x, (h, c), w_ih, w_hh, b_ih, b_hh)
    leaves = [t for t in ts if t is not None]
    return [hy.detach(), cy.detach()] + list(_grads((hy, cy), leaves, (gh, gc)))


NAMES = ["h'", "c'", "grad_input", "grad_h", "grad_c", "grad_w_ih", "grad_w_hh", "grad_b_ih", "grad_b_hh"]


@pytest.mark.parametrize("device,backend", device_backends("lstm_cell", reference=True))
@pytest.mark.parametrize("B,I,H", CELL_SHAPES)
@pytest.mark.parametrize("dtype", FULL + [torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_cell_matches_reference_and_torch(device, backend, B, I, H, dtype, bias):
    ts = _cell_inputs(B, I, H, dtype, device, bias)
    gh, gc = torch.randn(B, H, device=device).to(dtype), torch.randn(B, H, device=device).to(dtype)
    ours = _run_cell(lambda *a: F.lstm_cell(*a, backend=backend), ts, gh, gc)
    ref = _run_cell(fastnn.reference.lstm_cell, [None if t is None else _leaf(t.double()) for t in ts],
                    gh.double(), gc.double())
    theirs = _run_cell(torch.lstm_cell, ts, gh, gc)  # torch.nn.LSTMCell's own function
    for name, o, r, t in zip(NAMES, ours, ref, theirs):
        assert o.dtype == dtype
        assert_matches(o, r, torch_out=t, name=name, atol_floor=1e-2 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("device,backend", device_backends("lstm_cell"))
def test_cell_unbatched_and_default_state(device, backend):
    cell = nn.LSTMCell(6, 9, device=device)
    ours = fastnn.nn.LSTMCell.from_torch(cell)
    x = torch.randn(6, device=device)
    with fastnn.use_backend(backend):
        h, c = ours(x)
        h2, c2 = ours(x, (h, c))
    torch.testing.assert_close(h, cell(x)[0])
    torch.testing.assert_close((h2, c2), cell(x, cell(x)))
    assert h.shape == (9,)


@pytest.mark.parametrize("backend", [p.values[1] for p in device_backends("lstm_cell") if p.values[0] == "cpu"])
@pytest.mark.parametrize("bias", [True, False])
def test_cell_gradcheck(backend, bias):
    ts = _cell_inputs(3, 4, 5, torch.float64, "cpu", bias)
    # Large-ish pre-activations so the saturating ends of sigmoid/tanh are exercised too.
    ts[0] = _leaf(3 * ts[0])
    leaves = [t for t in ts if t is not None]

    def f(*args):
        x, h, c, w_ih, w_hh, *b = args
        return F.lstm_cell(x, (h, c), w_ih, w_hh, *(b or [None, None]), backend=backend)

    assert torch.autograd.gradcheck(f, leaves)


def test_cell_saturation_and_extremes():
    # |pre-activation| ~ 1e4: sigmoid/tanh must saturate to exactly 0/1/+-1 without inf/NaN, in every dtype.
    for dtype in FULL:
        g = 1e4 * torch.randn(5, 4 * 16, dtype=dtype)
        c = torch.randn(5, 16, dtype=dtype)
        hy, cy, act = torch.ops.fastnn.lstm_cell_fwd(g, None, c)
        ref_h, ref_c = fastnn.reference.lstm_cell_gates(g, None, c)
        assert torch.isfinite(act).all()
        torch.testing.assert_close((hy, cy), (ref_h, ref_c))


@pytest.mark.parametrize("suffix", ["", "_triton"])
@pytest.mark.parametrize("bias", [True, False])
def test_cell_opcheck(suffix, bias):
    if suffix and not [p for p in device_backends("lstm_cell") if p.values == ("cpu", "triton")]:
        pytest.skip("no Triton on CPU here")
    B, H = 3, 11
    g = torch.randn(B, 4 * H, requires_grad=True)
    b = torch.randn(4 * H, requires_grad=True) if bias else None
    c = torch.randn(B, H, requires_grad=True)
    torch.library.opcheck(getattr(torch.ops.fastnn, "lstm_cell_fwd" + suffix), (g, b, c))
    _, _, act = torch.ops.fastnn.lstm_cell_fwd(g.detach(), None, c.detach())
    torch.library.opcheck(getattr(torch.ops.fastnn, "lstm_cell_bwd" + suffix),
                          (torch.randn(B, H), torch.randn(B, H), act, c.detach()))


def _layer_args(T, B, I, H, dtype, device="cpu"):
    """Fresh random arguments of the layer ops: [x, w_ih, bias, w_hh, h0, c0]."""
    args = [torch.randn(T, B, I, dtype=dtype), torch.randn(4 * H, I, dtype=dtype) / 2, torch.randn(4 * H, dtype=dtype),
            torch.randn(4 * H, H, dtype=dtype) / 4, torch.randn(B, H, dtype=dtype), torch.randn(B, H, dtype=dtype)]
    return [a.to(device) for a in args]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_layer_opcheck(reverse, with_lengths):
    T, B, I, H = 4, 3, 5, 6
    x = torch.randn(T, B, I, requires_grad=True)
    w_ih = (torch.randn(4 * H, I) / 3).requires_grad_()
    bias = torch.randn(4 * H, requires_grad=True)
    w_hh = (torch.randn(4 * H, H) / 3).requires_grad_()
    h0, c0 = torch.randn(B, H, requires_grad=True), torch.randn(B, H, requires_grad=True)
    lengths = torch.tensor([4, 1, 3]) if with_lengths else None
    torch.library.opcheck(torch.ops.fastnn.lstm_layer_fwd, (x, w_ih, bias, w_hh, h0, c0, lengths, reverse))
    torch.library.opcheck(torch.ops.fastnn.lstm_layer_fwd, (x, w_ih, None, w_hh, h0, c0, lengths, reverse))
    hs, cs, act = torch.ops.fastnn.lstm_layer_fwd(*(t.detach() for t in (x, w_ih, bias, w_hh, h0, c0)), lengths,
                                                  reverse)
    for grad_cs in (torch.randn(T, B, H), None):
        torch.library.opcheck(torch.ops.fastnn.lstm_layer_bwd,
                              (torch.randn(T, B, H), grad_cs, w_hh.detach(), c0.detach(), cs, act, lengths, reverse))
    torch.library.opcheck(torch.ops.fastnn.lstm_layer_infer_fwd,
                          tuple(t.detach() for t in (x, w_ih, bias, w_hh, h0, c0)) + (lengths, reverse))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_layer_bwd_without_a_cell_state_gradient(device, dtype, reverse, with_lengths):
    # grad_cs None (what autograd hands over when only hs and h_n are used) must act as a zero gradient: the same
    # results as an explicit zero tensor, bit for bit, rows past their length included.
    torch.manual_seed(5)
    T, B, I, H = 7, 5, 3, 20
    args = _layer_args(T, B, I, H, dtype, device)
    lengths = torch.tensor([7, 1, 4, 0, 6]) if with_lengths else None
    hs, cs, act = torch.ops.fastnn.lstm_layer_fwd(*args, lengths, reverse)
    grad_hs = torch.randn_like(hs)
    w_hh, c0 = args[3], args[5]
    got = torch.ops.fastnn.lstm_layer_bwd(grad_hs, None, w_hh, c0, cs, act, lengths, reverse)
    want = torch.ops.fastnn.lstm_layer_bwd(grad_hs, torch.zeros_like(cs), w_hh, c0, cs, act, lengths, reverse)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("B, H", [(5, 20), (27, 150)])
def test_layer_bwd_reads_a_strided_grad_hs(device, with_lengths, B, H):
    # A batch_first model hands the op the transpose of its [B, T, H] gradient (the CPU op reads it in place): the
    # same results, bit for bit, as from its contiguous copy.
    torch.manual_seed(7)
    T, I = 6, 9
    args = _layer_args(T, B, I, H, torch.float32, device)
    lengths = torch.randint(1, T + 1, (B,)) if with_lengths else None
    hs, cs, act = torch.ops.fastnn.lstm_layer_fwd(*args, lengths, False)
    g_bf = torch.randn(B, T, H, device=device)
    for grad_cs in (None, torch.randn_like(cs)):
        got = torch.ops.fastnn.lstm_layer_bwd(g_bf.transpose(0, 1), grad_cs, args[3], args[5], cs, act, lengths,
                                              False)
        want = torch.ops.fastnn.lstm_layer_bwd(g_bf.transpose(0, 1).contiguous(), grad_cs, args[3], args[5], cs,
                                               act, lengths, False)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("B, H", [(5, 20), (27, 150)])  # one slice of units; two (the CPU's threads split them)
@pytest.mark.parametrize("reverse", [False, True])
def test_layer_bwd_bias_gradient_is_the_gate_gradients_sum(device, dtype, B, H, reverse):
    # The backward's grad_bias (on the CPU summed in the cell loop, each thread over its own units) is grad_gates
    # summed over steps and rows; rows past their length add nothing.
    torch.manual_seed(6)
    T, I = 6, 11
    args = _layer_args(T, B, I, H, dtype, device)
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    hs, cs, act = torch.ops.fastnn.lstm_layer_fwd(*args, lengths, reverse)
    grad_gates, _, _, grad_bias = torch.ops.fastnn.lstm_layer_bwd(torch.randn_like(hs), torch.randn_like(cs),
                                                                  args[3], args[5], cs, act, lengths, reverse)
    assert grad_bias.shape == (4 * H,) and grad_bias.dtype == dtype
    # bfloat16: the op sums the gradients before rounding them to bfloat16, the check after.
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    want = grad_gates.double().sum((0, 1))
    torch.testing.assert_close(grad_bias.double(), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("B", [40, 20, 32])
def test_layer_infer_op_matches_training_op(dtype, reverse, with_lengths, B):
    # The no-grad op runs the input product in blocks of steps (at B = 40 ceil(256 / 40) = 7: blocks of 7 and 2
    # steps, taken in the order the steps run; at B = 20 blocks of 13, so one; at B = 32 blocks of 8 and 1) and
    # keeps two cell-state buffers; it must give the training op's hs and final c. float32 runs the packed GEMM (at
    # B = 32 with AVX-512 in the column form), float64 ATen's.
    torch.manual_seed(3)
    T, I, H = 9, 5, 24
    args = _layer_args(T, B, I, H, dtype)
    lengths = torch.randint(1, T + 1, (B,)) if with_lengths else None
    hs, cs, _ = torch.ops.fastnn.lstm_layer_fwd(*args, lengths, reverse)
    hs_i, c_n = torch.ops.fastnn.lstm_layer_infer_fwd(*args, lengths, reverse)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hs_i, hs, **tol)
    torch.testing.assert_close(c_n, cs[0 if reverse else T - 1], **tol)


@pytest.mark.parametrize("grad", [False, True])
def test_layer_torch_compile_fullgraph(grad):
    # The layer function compiles into one graph either way: without grad it calls the no-grad op (its fake
    # kernel gives the shapes), with grad the training op and its autograd.
    torch.manual_seed(5)
    T, B, I, H = 5, 3, 4, 6
    ts = [torch.randn(T, B, I), torch.randn(B, H), torch.randn(B, H), torch.randn(4 * H, I), torch.randn(4 * H, H),
          torch.randn(4 * H), torch.randn(4 * H)]
    ts = [t.requires_grad_(grad) for t in ts]
    f = lambda *a: lstm_layer(*a, reverse=True)  # noqa: E731
    with torch.set_grad_enabled(grad):
        want = f(*ts)
        got = torch.compile(f, fullgraph=True)(*ts)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    if grad:
        g = torch.autograd.grad(sum(o.sum() for o in got), ts)
        w = torch.autograd.grad(sum(o.sum() for o in want), ts)
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b)


def test_lstm_without_grad_uses_the_infer_op_and_matches_torch():
    torch.manual_seed(4)
    ours, theirs = _twins(torch.float32, input_size=6, hidden_size=20, num_layers=2, bidirectional=True)
    x = torch.randn(11, 37, 6)
    with torch.no_grad():
        want = theirs(x)
        with torch.autograd.profiler.profile() as prof:
            got = ours(x)
    assert any(e.name == "fastnn::lstm_layer_infer_fwd" for e in prof.function_events)
    for a, b in zip((got[0], *got[1]), (want[0], *want[1])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", device_backends("lstm_cell"))
def test_cell_torch_compile_fullgraph(device, backend):
    ts = _cell_inputs(4, 6, 9, torch.float32, device)

    def f(x, h, c, w_ih, w_hh, b_ih, b_hh):
        h1, c1 = F.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh, backend=backend)
        h2, c2 = F.lstm_cell(x * 2, (h1, c1), w_ih, w_hh, b_ih, b_hh, backend=backend)
        return h2 * 2 + c2

    compiled = torch.compile(f, fullgraph=True)
    out = compiled(*ts)
    grads = torch.autograd.grad(out.sum(), ts)
    eager = f(*ts)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grads, torch.autograd.grad(eager.sum(), ts))


# ---------------------------------------------------------------------------------------------------- the LSTM

def _twins(dtype, device="cpu", **kw):
    theirs = nn.LSTM(**kw, dtype=dtype, device=device)
    ours = fastnn.nn.LSTM(**kw, dtype=dtype, device=device)
    ours.load_state_dict(theirs.state_dict())  # a torch state_dict loads unchanged
    return ours, theirs


def _run_lstm(model, x, hx, seeds, **kw):
    x = _leaf(x)
    hx = None if hx is None else tuple(_leaf(s) for s in hx)
    out, (h, c) = model(x, hx, **kw)
    leaves = [x] + ([] if hx is None else list(hx)) + list(model.parameters())
    grads = _grads((out, h, c), leaves, seeds)
    return [out.detach(), h.detach(), c.detach()] + list(grads)


LSTM_CASES = [
    # (T, B, input, hidden, layers, bidirectional, batch_first, bias)
    (1, 3, 5, 7, 1, False, False, True),     # T = 1: one step, h0 and the output touch
    (37, 1, 6, 7, 1, False, False, True),     # batch 1, odd T
    (37, 4, 9, 97, 2, True, False, True),     # bidirectional, two layers: layer 2 eats 2H features
    (5, 3, 8, 513, 1, True, True, False),     # hidden 513, batch_first, no biases
    (6, 2, 4, 7, 3, False, True, True),       # three layers
]


@pytest.mark.parametrize("device,backend", device_backends("lstm_cell"))
@pytest.mark.parametrize("T,B,I,H,L,bidir,bf,bias", LSTM_CASES)
@pytest.mark.parametrize("dtype", FULL + [torch.bfloat16])
def test_lstm_matches_torch(device, backend, T, B, I, H, L, bidir, bf, bias, dtype):
    given_hx = T > 1  # the T = 1 case starts from zeros (hx=None)
    if backend == "triton" and device == "cpu" and (H > 100 or dtype == torch.float64):
        pytest.skip("interpreter: the Triton cell is the same code at every size and is checked against the "
                    "reference by the cell tests; here one dtype pair and the small shapes show the wiring")
    kw = dict(input_size=I, hidden_size=H, num_layers=L, bidirectional=bidir, batch_first=bf, bias=bias)
    ours, theirs = _twins(dtype, device, **kw)
    ref64 = nn.LSTM(**kw, dtype=torch.float64, device=device)
    ref64.load_state_dict(theirs.state_dict())
    D = 2 if bidir else 1
    x = torch.randn((B, T, I) if bf else (T, B, I), device=device).to(dtype)
    hx = tuple(torch.randn(L * D, B, H, device=device).to(dtype) for _ in range(2)) if given_hx else None
    seeds = [torch.randn((B, T, D * H) if bf else (T, B, D * H), device=device).to(dtype),
             torch.randn(L * D, B, H, device=device).to(dtype), torch.randn(L * D, B, H, device=device).to(dtype)]
    with fastnn.use_backend(backend):
        got = _run_lstm(ours, x, hx, seeds)
    want = _run_lstm(theirs, x, hx, seeds)
    ref = _run_lstm(ref64, x.double(), None if hx is None else tuple(s.double() for s in hx),
                    [s.double() for s in seeds])
    names = ["output", "h_n", "c_n", "grad_input"] + (["grad_h0", "grad_c0"] if given_hx else []) + \
        [f"grad_{n}" for n, _ in theirs.named_parameters()]
    assert len(names) == len(got)
    for name, o, r, t in zip(names, got, ref, want):
        assert o.dtype == dtype, name
        if dtype == torch.bfloat16:
            assert_matches(o, r, torch_out=t, name=name, atol_floor=2e-2)
        else:
            tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-11)
            torch.testing.assert_close(o, r.to(dtype), **tol, msg=lambda m: f"{name}: {m}")


PROJ_CASES = [
    # (T, B, input, hidden, proj_size, layers, bidirectional, batch_first, bias)
    (4, 3, 5, 7, 3, 2, True, False, True),    # two bidirectional layers: layer 2 eats 2P features
    (3, 2, 4, 6, 5, 1, False, True, False),   # batch_first, no biases (params: w_ih, w_hh, w_hr), P = H - 1
]


@pytest.mark.parametrize("device,backend", device_backends("lstm_cell", reference=True))
@pytest.mark.parametrize("T,B,I,H,P,L,bidir,bf,bias", PROJ_CASES)
@pytest.mark.parametrize("dtype", FULL)
def test_lstm_proj_matches_torch(device, backend, T, B, I, H, P, L, bidir, bf, bias, dtype):
    # torch.nn.LSTM(proj_size=P): h (h0, h_n, the output) has P features, c has H; its state_dict (weight_hr_l0,
    # ...) loads unchanged. Outputs, final states and every gradient against torch's float64 LSTM.
    torch.manual_seed(12)
    kw = dict(input_size=I, hidden_size=H, num_layers=L, bidirectional=bidir, batch_first=bf, bias=bias,
              proj_size=P)
    ours, theirs = _twins(dtype, device, **kw)
    assert "weight_hr_l0" in ours.state_dict() and ours._flat_weights_names == theirs._flat_weights_names
    ref64 = nn.LSTM(**kw, dtype=torch.float64, device=device)
    ref64.load_state_dict(theirs.state_dict())
    D = 2 if bidir else 1
    x = torch.randn((B, T, I) if bf else (T, B, I), device=device).to(dtype)
    hx = (torch.randn(L * D, B, P, device=device).to(dtype), torch.randn(L * D, B, H, device=device).to(dtype))
    seeds = [torch.randn((B, T, D * P) if bf else (T, B, D * P), device=device).to(dtype),
             torch.randn(L * D, B, P, device=device).to(dtype), torch.randn(L * D, B, H, device=device).to(dtype)]
    with fastnn.use_backend(backend):
        got = _run_lstm(ours, x, hx, seeds)
    ref = _run_lstm(ref64, x.double(), tuple(s.double() for s in hx), [s.double() for s in seeds])
    names = ["output", "h_n", "c_n", "grad_input", "grad_h0", "grad_c0"] + \
        [f"grad_{n}" for n, _ in theirs.named_parameters()]
    assert len(names) == len(got) and any("weight_hr" in n for n in names)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-11)
    for name, o, r in zip(names, got, ref):
        assert o.dtype == dtype, name
        torch.testing.assert_close(o, r.to(dtype), **tol, msg=lambda m: f"{name}: {m}")


def test_lstm_proj_torch_compile_fullgraph():
    # F.lstm with projections (the per-step loop, unrolled by the trace) compiles into one graph, forward and
    # backward. (Dynamo refuses to trace an nn.LSTM subclass's forward: the functional form is what compiles.)
    torch.manual_seed(13)
    theirs = nn.LSTM(4, 6, proj_size=3, bidirectional=True)
    ts = [torch.randn(2, 2, 4, requires_grad=True)] + [p.detach().requires_grad_() for p in theirs._flat_weights]

    def f(x, *params):
        out, (h, c) = F.lstm(x, None, list(params), 1, bidirectional=True)
        return out, h, c

    got = torch.compile(f, fullgraph=True)(*ts)
    want = theirs(ts[0])
    want = (want[0], *want[1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(sum(o.sum() for o in got), ts),
                               torch.autograd.grad(sum(o.sum() for o in want), [ts[0], *theirs.parameters()]),
                               rtol=1e-5, atol=1e-6)


def test_lstm_state_dict_and_repr_match_torch():
    ours, theirs = _twins(torch.float32, input_size=5, hidden_size=7, num_layers=2, bidirectional=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert "weight_hh_l1_reverse" in ours.state_dict()
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]
    # Same initialization scheme: uniform in +-1/sqrt(hidden).
    torch.manual_seed(3)
    a = fastnn.nn.LSTM(5, 7).state_dict()
    torch.manual_seed(3)
    b = nn.LSTM(5, 7).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _packed_case(bidir, L=2, batch_first=False, proj_size=0):
    lengths = torch.tensor([5, 9, 1, 9, 3])  # unsorted, with ties and a length-1 sequence
    seqs = [torch.randn(int(n), 6) for n in lengths]
    ours, theirs = _twins(torch.float32, input_size=6, hidden_size=11, num_layers=L, bidirectional=bidir,
                          batch_first=batch_first, proj_size=proj_size)
    return lengths, seqs, ours, theirs


@pytest.mark.parametrize("device,backend", device_backends("lstm_cell", reference=True))
@pytest.mark.parametrize("bidir,P", [(False, 0), (True, 0), (True, 4)])
def test_packed_sequence(device, backend, bidir, P):
    lengths, seqs, ours, theirs = _packed_case(bidir, proj_size=P)
    D = 2 if bidir else 1
    hx = tuple(torch.randn(2 * D, 5, n) for n in (P or 11, 11))
    results = []
    for model, be in ((ours, backend), (theirs, None)):
        xs = [_leaf(s) for s in seqs]
        h0 = tuple(_leaf(s) for s in hx)
        packed = pack_sequence(xs, enforce_sorted=False)
        with fastnn.use_backend(be or "auto"):
            out, (h, c) = model(packed, h0)
        assert isinstance(out, nn.utils.rnn.PackedSequence)
        padded, out_len = pad_packed_sequence(out, batch_first=True)
        loss = (padded * torch.randn_like(padded, generator=torch.Generator().manual_seed(1))).sum() + \
            (h * 2).sum() + (c * 3).sum()
        grads = torch.autograd.grad(loss, xs + list(h0) + list(model.parameters()))
        results.append([out.data, out.batch_sizes, out_len, h, c, *grads])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bidir", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("P", [0, 4])
def test_lengths_argument_ignores_padding(bidir, batch_first, P):
    lengths, seqs, ours, theirs = _packed_case(bidir, batch_first=batch_first, proj_size=P)
    padded = nn.utils.rnn.pad_sequence(seqs, batch_first=batch_first, padding_value=7.0)
    out, (h, c) = ours(padded, lengths=lengths)
    t_out, (t_h, t_c) = theirs(pack_padded_sequence(padded, lengths, batch_first=batch_first, enforce_sorted=False))
    t_out, _ = pad_packed_sequence(t_out, batch_first=batch_first)
    torch.testing.assert_close((out, h, c), (t_out, t_h, t_c), rtol=1e-4, atol=1e-5)
    # Padded steps change nothing: the same batch padded further gives the same states.
    more = torch.cat([padded, torch.randn_like(padded)], dim=1 if batch_first else 0)
    _, (h2, c2) = ours(more, lengths=lengths)
    torch.testing.assert_close((h2, c2), (h, c))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_split_over_threads_with_lengths(dtype):
    # H = 150 at B = 8 is enough work for the C++ layer to split the hidden units over two threads (slices of 80
    # and 70 units, the second not a multiple of the vector width). Unequal lengths make rows stop mid-sequence in
    # both directions.
    torch.manual_seed(0)
    ours, theirs = _twins(dtype, input_size=16, hidden_size=150, num_layers=1, bidirectional=True)
    lengths = torch.tensor([9, 3, 7, 1, 9, 5, 8, 2])
    x = torch.randn(9, 8, 16, dtype=dtype)
    results = []
    for model in (ours, theirs):
        xl = _leaf(x)
        out, (h, c) = model(pack_padded_sequence(xl, lengths, enforce_sorted=False))
        out, _ = pad_packed_sequence(out)
        loss = (out * torch.cos(torch.arange(out.numel(), dtype=dtype)).view_as(out)).sum() + h.sin().sum() + c.sum()
        results.append([out, h, c, *torch.autograd.grad(loss, [xl, *model.parameters()])])
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-11)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("B,H", [
    (13, 16),  # row tiles 6 + 6 + 1 (AVX2) or 8 + 4 + 1 (AVX-512) of the packed recurrent GEMM; one full panel
    (35, 45),  # row tiles 6 x 5 + 4 + 1 or 8 x 4 + 1 + 1 + 1; 45 = a pair of 16-column panels (AVX-512 takes
               # two at a time) and a partial one of 13 columns
    (13, 61),  # a pair, a single full panel and a partial one
    (27, 45),  # with AVX-512 the column form at its fewest rows, 27 padded to 32 (12 columns a group: 3 tails)
    (32, 150),  # the column form with the units split over two threads (slices of 80 and 70 units)
])
def test_layer_packed_recurrent_gemm_tails(B, H):
    # float32 layers of more than one step run their recurrent products on csrc/cpu/gemm.h; these shapes reach
    # every row-tile size, panels in pairs and alone, and a partial last panel, forward and backward, with rows
    # that stop early (the backward's pass-through is added onto the product) in both directions. With AVX-512, 27
    # to 32 rows run the column form instead (gemm_cols), its 16 x 16 transposes cut at B and H.
    torch.manual_seed(1)
    ours, theirs = _twins(torch.float32, input_size=11, hidden_size=H, num_layers=1, bidirectional=True)
    ref = nn.LSTM(11, H, bidirectional=True, dtype=torch.float64)
    ref.load_state_dict(theirs.state_dict())
    lengths = torch.randint(1, 7, (B,))
    lengths[0] = 6
    x = torch.randn(6, B, 11)
    results = []
    for model, dtype in ((ours, torch.float32), (ref, torch.float64)):
        xl = _leaf(x.to(dtype))
        out, (h, c) = model(pack_padded_sequence(xl, lengths, enforce_sorted=False))
        out, _ = pad_packed_sequence(out)
        loss = (out * torch.cos(torch.arange(out.numel(), dtype=dtype)).view_as(out)).sum() + h.sin().sum() + c.sum()
        results.append([out, h, c, *torch.autograd.grad(loss, [xl, *model.parameters()])])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=2e-5)


PERSISTENT_CASES = [
    # (T, B, H, lengths, persistent): the persistent kernels' edges - B = 1 (one 16-row tile, the k tiles split
    # over all 8 warps), 7 and 97 (a partial last row tile), 128 (8 full tiles, the largest batch they take);
    # H = 8 (one block of two units in the forward, a partial 8-unit block in the backward), 520 (the last
    # 64-column chunk partial, a partial last block); B = 129 and H = 36 (not a multiple of 8) take the step loop.
    (5, 1, 8, False, True),
    (9, 7, 24, True, True),
    (17, 97, 520, True, True),
    (4, 128, 256, False, True),
    (3, 129, 64, True, False),
    (4, 5, 36, False, False),
]


def _cuda_kernel_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return " ".join(e.name for e in prof.events())


@pytest.mark.cuda
@pytest.mark.parametrize("T,B,H,with_lengths,persistent", PERSISTENT_CASES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_persistent_kernels(T, B, H, with_lengths, persistent, reverse, dtype, monkeypatch):
    # Half-precision layers on sm_80+ run the whole recurrence in one cooperative launch per direction
    # (csrc/cuda/lstm.cu) where they can and their L2 traffic is small; FASTNN_LSTM_PERSISTENT=1 takes them wherever
    # they can run, =0 forces the per-step loop. Each setting, outputs and every
    # gradient, against float64, within 2x the error of the same layer in plain torch ops in that dtype; and the
    # profiler shows which kernels ran.
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the persistent kernels need sm_80 (mma.sync on bfloat16)")
    torch.manual_seed(0)
    I = 12

    def r(*shape, scale=1.0):
        return torch.randn(*shape, dtype=torch.float64, device="cuda") * scale
    inputs = [r(T, B, I), r(B, H), r(B, H), r(4 * H, I, scale=I ** -0.5), r(4 * H, H, scale=H ** -0.5), r(4 * H),
              r(4 * H)]
    seeds = [r(T, B, H), r(B, H), r(B, H)]
    lengths = None
    if with_lengths:
        lengths = torch.randint(1, T + 1, (B,))
        lengths[0] = T

    def run(dt, backend):
        leaves = [t.to(dt).requires_grad_() for t in inputs]
        outs = lstm_layer(*leaves, lengths=lengths, reverse=reverse, backend=backend)
        grads = torch.autograd.grad(outs, leaves, [s.to(dt) for s in seeds])
        return [o.detach() for o in outs] + list(grads)

    ref, theirs = run(torch.float64, "reference"), run(dtype, "reference")
    names = ["hs", "h_n", "c_n", "grad_x", "grad_h0", "grad_c0", "grad_w_ih", "grad_w_hh", "grad_b_ih", "grad_b_hh"]
    for setting in ("1", "0", "auto"):  # wherever they can run, never, by the L2 traffic limit
        monkeypatch.setenv("FASTNN_LSTM_PERSISTENT", setting)
        got = []
        kernels = _cuda_kernel_names(lambda: got.extend(run(dtype, "native")))
        if setting != "auto":
            expect = persistent and setting == "1"
            assert ("layer_fwd_persistent_kernel" in kernels) == expect, kernels[:2000]
            assert ("layer_bwd_persistent_kernel" in kernels) == expect, kernels[:2000]
        for name, o, want, t in zip(names, got, ref, theirs):
            assert_matches(o, want, torch_out=t, name=f"{name} (FASTNN_LSTM_PERSISTENT={setting})", atol_floor=1e-2)
        if setting == "1":  # the warps' partial sums meet in a fixed order: the same bits on a second run
            again = run(dtype, "native")
            assert all(torch.equal(a, b) for a, b in zip(got, again))


def test_persistent_kernels_in_the_cpu_emulator():
    # The persistent float16 / bfloat16 layer kernels' own text (csrc/cuda/lstm.cu) compiled for the host and run by
    # tools/cuda_emu/lstm.py (a thread per CUDA thread, every block at once for grid.sync(), mma / ldmatrix per the
    # PTX fragment layouts, ASan + UBSan) against a float64 recurrence, forward and backward: batch 1 (the k tiles
    # spread over all warps, several chunks), and batch 17 in bfloat16, reversed, with lengths, a partial block.
    assert "2/2 cases ok" in run_cuda_emulator("lstm")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T", [0, 1, 5])
@pytest.mark.parametrize("uses_cs", [False, True])
def test_layer_gradients_of_any_subset_of_inputs(reverse, T, uses_cs):
    # The backward skips the product of a frozen weight's gradient and adds h0's step into W_hh's; a model that
    # reads only hs leaves the cs gradient to be made. Each subset of inputs must get the full run's gradients.
    torch.manual_seed(3)
    B, I, H = 3, 5, 6
    args = [torch.randn(T, B, I, dtype=torch.float64), torch.randn(4 * H, I, dtype=torch.float64) / 3,
            torch.randn(4 * H, dtype=torch.float64), torch.randn(4 * H, H, dtype=torch.float64) / 3,
            torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)]
    g_hs, g_cs = torch.randn(T, B, H, dtype=torch.float64), torch.randn(T, B, H, dtype=torch.float64)

    def grads(wanted):
        leaves = [_leaf(a) if i in wanted else a for i, a in enumerate(args)]
        hs, cs, _ = torch.ops.fastnn.lstm_layer_fwd(*leaves, None, reverse)
        loss = (hs * g_hs).sum() + ((cs * g_cs).sum() if uses_cs else 0)
        return torch.autograd.grad(loss, [leaves[i] for i in wanted], allow_unused=True)

    full = dict(zip(range(6), grads(range(6))))
    for wanted in [(1,), (3,), (0, 3), (1, 2), (0, 4, 5)]:
        for i, g in zip(wanted, grads(wanted)):
            torch.testing.assert_close(g, full[i], rtol=1e-12, atol=1e-12, msg=f"input {i} of {wanted}")
    gradcheck_args = [_leaf(a) for a in args]
    torch.autograd.gradcheck(
        lambda *a: torch.ops.fastnn.lstm_layer_fwd(*a, None, reverse)[:2 if uses_cs else 1], gradcheck_args)


def test_layer_op_with_no_input_features():
    # nn.LSTM refuses input_size 0, the op does not: its input product is then an empty sum, which the packed GEMM
    # must store as zeros (its K loop never runs). Same as one input feature with a zero weight column.
    torch.manual_seed(2)
    w_hh, bias = torch.randn(28, 7), torch.randn(28)
    h0, c0 = torch.randn(2, 7), torch.randn(2, 7)
    empty = torch.ops.fastnn.lstm_layer_fwd(torch.randn(3, 2, 0), torch.randn(28, 0), bias, w_hh, h0, c0, None,
                                            False)
    zero_col = torch.ops.fastnn.lstm_layer_fwd(torch.randn(3, 2, 1), torch.zeros(28, 1), bias, w_hh, h0, c0, None,
                                               False)
    for a, b in zip(empty, zero_col):
        torch.testing.assert_close(a, b)


def test_cpu_block_cache():
    # The layer's big buffers come from fastnn's CPU allocator, which keeps freed blocks for the next call of the
    # same size: reused blocks give the same results, and empty_cpu_cache() frees them.
    ours = fastnn.nn.LSTM(64, 256)
    x = torch.randn(40, 16, 64)
    with torch.no_grad():
        first = ours(x)[0]
        again = ours(x)[0]
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    fastnn.empty_cpu_cache()
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], first, rtol=0, atol=0)


def test_cpu_cache_size_variable_is_checked():
    code = "import torch, fastnn; fastnn.nn.LSTM(64, 256)(torch.randn(40, 16, 64))"
    env = dict(os.environ, FASTNN_CPU_CACHE_MB="lots")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "FASTNN_CPU_CACHE_MB" in res.stderr, res.stderr[-2000:]


@pytest.mark.parametrize("L,bidir", [(2, False), (3, True)])
def test_dropout_train_and_eval(L, bidir):
    ours, theirs = _twins(torch.float64, input_size=5, hidden_size=8, num_layers=L, bidirectional=bidir,
                          dropout=0.4)
    x = torch.randn(7, 3, 5, dtype=torch.float64)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x)[0], theirs(x)[0])  # eval: no dropout, exactly torch
    # Training: dropout on every layer's output but the last. torch's own random stream differs, so the
    # reference is a stack of one-layer torch LSTMs with the same dropout calls under the same seed.
    ours.train()
    layers = []
    D = 2 if bidir else 1
    for k in range(L):
        one = nn.LSTM(5 if k == 0 else D * 8, 8, bidirectional=bidir, dtype=torch.float64)
        one.load_state_dict({n.replace(f"_l{k}", "_l0"): p for n, p in theirs.state_dict().items() if f"_l{k}" in n})
        layers.append(one)
    torch.manual_seed(11)
    xl, out = _leaf(x), None
    out, _ = ours(xl)
    (gx,) = torch.autograd.grad(out.sum(), xl)
    torch.manual_seed(11)
    xr = _leaf(x)
    y = xr
    for k, one in enumerate(layers):
        y, _ = one(y)
        if k < L - 1:
            y = torch.nn.functional.dropout(y, 0.4, True)
    (gr,) = torch.autograd.grad(y.sum(), xr)
    torch.testing.assert_close(out, y)
    torch.testing.assert_close(gx, gr)
    assert not torch.allclose(out, ours.eval()(x)[0])


@pytest.mark.parametrize("P", [0, 3])
def test_unbatched_input(P):
    ours, theirs = _twins(torch.float32, input_size=4, hidden_size=6, num_layers=2, bidirectional=True, proj_size=P)
    x = torch.randn(5, 4)
    hx = (torch.randn(4, P or 6), torch.randn(4, 6))
    torch.testing.assert_close(ours(x, hx), theirs(x, hx))
    torch.testing.assert_close(ours(x), theirs(x))


# ---------------------------------------------------------------------------------------------- F.lstm

FUNCTIONAL_CASES = [
    # (T, B, input, hidden, layers, bidirectional, bias, lengths, proj_size)
    (6, 4, 5, 7, 2, True, True, None, 0),            # bidirectional, two layers: layer 2 eats 2H features
    (6, 4, 5, 7, 3, False, True, [6, 2, 5, 1], 0),   # three layers, unsorted lengths with a length-1 row
    (5, 3, 4, 9, 2, True, False, [5, 3, 3], 0),      # no biases (params holds 2 per layer and direction), lengths
    (5, 3, 4, 7, 2, True, True, [5, 1, 3], 3),       # projections (weight_hr in params): h of 3, layer 2 eats 6
]


@pytest.mark.parametrize("device,backend", device_backends("lstm_cell", reference=True))
@pytest.mark.parametrize("T,B,I,H,L,bidir,bias,lengths,P", FUNCTIONAL_CASES)
def test_functional_lstm_matches_torch(device, backend, T, B, I, H, L, bidir, bias, lengths, P):
    # F.lstm on torch.nn.LSTM's own _flat_weights gives nn.LSTM's outputs, final states and every gradient;
    # with lengths, those of the packed sequence through nn.LSTM, padded back with zeros.
    torch.manual_seed(6)
    dtype, D = torch.float64, 2 if bidir else 1
    theirs = nn.LSTM(I, H, L, bias=bias, bidirectional=bidir, proj_size=P, dtype=dtype, device=device)
    lengths = None if lengths is None else torch.tensor(lengths)
    x = torch.randn(T, B, I, dtype=dtype, device=device)
    R = P or H  # the size of h
    hx = tuple(torch.randn(L * D, B, n, dtype=dtype, device=device) for n in (R, H))
    seeds = [torch.randn(T, B, D * R, dtype=dtype, device=device)] + \
        [torch.randn(L * D, B, n, dtype=dtype, device=device) for n in (R, H)]

    def ours(x, hx):
        return F.lstm(x, hx, theirs._flat_weights, L, bias=bias, bidirectional=bidir, lengths=lengths,
                      backend=backend)

    def torch_lstm(x, hx):
        if lengths is None:
            return theirs(x, hx)
        out, states = theirs(pack_padded_sequence(x, lengths, enforce_sorted=False), hx)
        return pad_packed_sequence(out, total_length=T)[0], states

    results = []
    for f in (ours, torch_lstm):
        xl, hl = _leaf(x), tuple(_leaf(s) for s in hx)
        out, (h, c) = f(xl, hl)
        grads = _grads((out, h, c), [xl, *hl, *theirs._flat_weights], seeds)
        results.append([out.detach(), h.detach(), c.detach(), *grads])
    names = ["output", "h_n", "c_n", "grad_input", "grad_h0", "grad_c0"] + \
        [f"grad_{n}" for n in theirs._flat_weights_names]
    for name, a, b in zip(names, *results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11, msg=lambda m: f"{name}: {m}")


def test_functional_lstm_dropout_only_while_training():
    torch.manual_seed(8)
    theirs = nn.LSTM(5, 6, 3, dropout=0.5, dtype=torch.float64).eval()
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    want = theirs(x)
    torch.testing.assert_close(F.lstm(x, None, theirs._flat_weights, 3, dropout=0.5, training=False), want)
    assert not torch.allclose(F.lstm(x, None, theirs._flat_weights, 3, dropout=0.5)[0], want[0])


def test_functional_lstm_torch_compile_fullgraph():
    # Two bidirectional layers compile into one graph, forward and backward: the argument checks and the backend
    # choice run at trace time, the layer ops through their fake kernels and autograd formula.
    torch.manual_seed(9)
    L, T, B, I, H = 2, 5, 3, 4, 6
    params = [p.detach().requires_grad_() for p in nn.LSTM(I, H, L, bidirectional=True)._flat_weights]
    ts = [torch.randn(T, B, I, requires_grad=True)] + [torch.randn(2 * L, B, H, requires_grad=True)
                                                       for _ in range(2)] + params

    def f(x, h0, c0, *params):
        out, (h, c) = F.lstm(x, (h0, c0), list(params), L, bidirectional=True)
        return out, h, c

    want = f(*ts)
    got = torch.compile(f, fullgraph=True)(*ts)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(sum(o.sum() for o in got), ts),
                               torch.autograd.grad(sum(o.sum() for o in want), ts))


def _lstm_params(I=4, H=7, L=1, bias=True, P=0):
    return nn.LSTM(I, H, L, bias=bias, proj_size=P)._flat_weights


def test_patch_swaps_lstm_and_cell_sharing_parameters(capsys):
    # proj (an LSTM with projections) used to be kept as the torch module; now it is swapped too.
    model = nn.ModuleDict({"rnn": nn.LSTM(4, 6, 2, batch_first=True), "proj": nn.LSTM(6, 7, proj_size=6),
                           "cell": nn.LSTMCell(6, 5)})
    x = torch.randn(2, 3, 4)

    def run(m):
        out, _ = m["rnn"](x)
        out, _ = m["proj"](out)
        return m["cell"](out[:, -1])

    expected = run(model)
    params = dict(model.named_parameters())
    fastnn.patch(model)
    assert type(model["rnn"]) is fastnn.nn.LSTM and type(model["cell"]) is fastnn.nn.LSTMCell
    assert type(model["proj"]) is fastnn.nn.LSTM and model["proj"].proj_size == 6
    assert "replaced 3 module(s)" in capsys.readouterr().out
    torch.testing.assert_close(run(model), expected)
    assert all(p is params[n] for n, p in model.named_parameters())  # an existing optimizer keeps working


@pytest.mark.parametrize("call,exc,words", [
    (lambda: F.lstm_cell(torch.randn(3, 5), None, torch.randn(28, 4), torch.randn(28, 7)), ValueError,
     ["w_ih", "input_size", "5"]),
    (lambda: F.lstm_cell(torch.randn(3, 4), (torch.randn(2, 7), torch.randn(3, 7)), torch.randn(28, 4),
                         torch.randn(28, 7)), ValueError, ["hx[0]", "(3, 7)"]),
    (lambda: F.lstm_cell(torch.randn(3, 4), (torch.randn(3, 7), torch.randn(3, 7)), torch.randn(28, 4),
                         torch.randn(27, 7)), ValueError, ["w_hh"]),
    (lambda: F.lstm_cell(torch.randn(3, 4).double(), None, torch.randn(28, 4), torch.randn(28, 7)), TypeError,
     ["dtype", "input float64", "w_ih float32"]),
    (lambda: F.lstm_cell(torch.randn(3, 4), torch.randn(3, 7), torch.randn(28, 4), torch.randn(28, 7)),
     TypeError, ["hx", "tuple"]),
    (lambda: F.lstm_cell(torch.randn(3, 4), None, torch.randn(28, 4), torch.randn(28, 7), torch.randn(27)),
     ValueError, ["b_ih", "28"]),
    (lambda: F.lstm_cell(torch.arange(4), None, torch.randn(28, 4), torch.randn(28, 7)), TypeError,
     ["input", "int64"]),
    (lambda: fastnn.nn.LSTM(4, 6)(torch.randn(5, 2, 3)), ValueError, ["input_size", "Expected 4, got 3"]),
    (lambda: fastnn.nn.LSTM(4, 6)(torch.randn(5, 2, 4), (torch.randn(1, 3, 6), torch.randn(1, 3, 6))),
     ValueError, ["hx[0]", "(1, 2, 6)"]),
    (lambda: fastnn.nn.LSTM(4, 6, bidirectional=True)(torch.randn(5, 2, 4), (torch.randn(1, 2, 6),) * 2),
     ValueError, ["h0", "(2, 2, 6)"]),
    (lambda: fastnn.nn.LSTM(4, 6)(torch.randn(5, 2, 4).double()), TypeError, ["dtype", "float64"]),
    (lambda: fastnn.nn.LSTM(4, 6)(torch.randn(5, 2, 4), lengths=torch.tensor([5, 6])), ValueError,
     ["lengths", "[0, 5]"]),
    (lambda: fastnn.nn.LSTM(4, 6)(torch.randn(5, 2, 4), lengths=torch.tensor([5])), ValueError,
     ["lengths", "(2,)"]),
    (lambda: fastnn.nn.LSTMCell(10, 4)(torch.randn(3, 11)), ValueError,
     ["input has inconsistent input_size: got 11 expected 10"]),  # torch's words (a RuntimeError there)
    (lambda: fastnn.nn.LSTM(4, 6, proj_size=6), ValueError, ["proj_size", "smaller than hidden_size"]),  # torch's
    (lambda: fastnn.nn.LSTM(4, 6, proj_size=3)(torch.randn(5, 2, 4), (torch.randn(1, 2, 6), torch.randn(1, 2, 6))),
     ValueError, ["hx[0]", "(1, 2, 3)", "proj_size"]),
    (lambda: fastnn.nn.LSTM(4, 6, proj_size=3)(torch.randn(5, 2, 4), (torch.randn(1, 2, 3), torch.randn(1, 2, 3))),
     ValueError, ["hx[1]", "(1, 2, 6)", "hidden_size"]),
    (lambda: fastnn.nn.LSTM(4, 6, proj_size=3)(torch.randn(5, 4), (torch.randn(1, 6), torch.randn(1, 6))),
     ValueError, ["hx[0]", "(1, 3)", "unbatched"]),
    (lambda: F.lstm(torch.randn(5, 2, 4), None, _lstm_params(H=6, P=3)[:4] + [torch.randn(3, 5)], 1), ValueError,
     ["weight_hr_l0", "(3, 5)"]),
    (lambda: F.lstm(torch.randn(5, 2, 4), None, _lstm_params(H=6, P=3, L=2)[:5] + [torch.randn(24, 6)] +
                    _lstm_params(H=6, P=3, L=2)[6:], 2), ValueError, ["weight_ih_l1", "(24, 3)"]),
    (lambda: F.lstm(torch.randn(5, 2, 4), None, _lstm_params(H=6, P=3)[:1] + [torch.randn(24, 6)] +
                    _lstm_params(H=6, P=3)[2:], 1), ValueError, ["weight_hh_l0", "proj_size", "[24, 3]"]),
    (lambda: F.lstm(torch.randn(5, 2, 4), None, _lstm_params()[:3], 1), ValueError, ["params", "5 with a weight_hr"]),
    (lambda: F.lstm(torch.randn(5, 4), None, _lstm_params(), 1), ValueError, ["input", "3-dimensional"]),
    (lambda: F.lstm(torch.randn(5, 2, 4), None, _lstm_params()[:3], 1), ValueError, ["params", "4 tensors"]),
    (lambda: F.lstm(torch.randn(5, 2, 4), None, _lstm_params(L=2), 1), ValueError, ["params", "got 8"]),
    (lambda: F.lstm(torch.randn(5, 2, 4), None, _lstm_params(bias=False), 1), ValueError, ["params", "got 2"]),
    (lambda: F.lstm(torch.randn(5, 2, 4), None, _lstm_params(L=2)[:4] + [torch.randn(28, 6)] +
                    _lstm_params(L=2)[5:], 2), ValueError, ["weight_ih_l1", "(28, 7)"]),
    (lambda: F.lstm(torch.randn(5, 2, 4), None, _lstm_params()[:3] + [torch.randn(28).double()], 1), TypeError,
     ["dtype", "bias_hh_l0"]),
    (lambda: F.lstm(torch.randn(5, 2, 3), None, _lstm_params(), 1), ValueError, ["input_size", "Expected 4, got 3"]),
    (lambda: F.lstm(torch.randn(5, 2, 4), None, _lstm_params(), 1, dropout=1.5), ValueError, ["dropout"]),
    (lambda: F.lstm(torch.randn(5, 2, 4), None, _lstm_params(), 0), ValueError, ["num_layers"]),
    (lambda: torch.ops.fastnn.lstm_cell_fwd(torch.randn(3, 27), None, torch.randn(3, 7)), RuntimeError,
     ["gates", "[B, 4H]"]),
    (lambda: torch.ops.fastnn.lstm_layer_fwd(torch.randn(2, 3, 5), torch.randn(28, 5), None, torch.randn(28, 7),
                                             torch.randn(3, 7), torch.randn(3, 7), torch.tensor([1, 2, 3]), False),
     RuntimeError, ["lengths", "[0, 2]"]),
    (lambda: torch.ops.fastnn.lstm_layer_fwd(torch.randn(2, 3, 5), torch.randn(28, 4), None, torch.randn(28, 7),
                                             torch.randn(3, 7), torch.randn(3, 7), None, False),
     RuntimeError, ["w_ih", "[28, 4]"]),
])
def test_bad_input_raises_clear_error(call, exc, words):
    assert_raises_naming(call, exc, words)
