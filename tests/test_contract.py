"""The bad-input contract of every public function and module: given a wrong dtype, rank or shape, mismatched
batch/length, tensors on different devices ('meta' as the second device), out-of-range values, NaN/Inf,
zero-size or non-contiguous / expanded / channels-last tensors, fastnn either returns exactly what torch returns
for the same call or raises a Python exception whose message names the argument.

One table row per line of the contract: (id, fastnn call, torch call, names the message must contain one of).
Adding an op: add its rows to ROWS (build the tensors inside the lambdas, the table is evaluated per test).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import fastnn.functional as F
import fastnn.nn as fnn

ERRORS = (TypeError, ValueError, IndexError, RuntimeError, NotImplementedError)


def r(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, dtype=dtype, device=device)


def special(*shape):
    x = r(*shape)
    x.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e4])[: x.numel()]
    return x


def channels_last(*shape):
    return r(*shape).contiguous(memory_format=torch.channels_last)


def expanded(*shape):
    return r(1, *shape[1:]).expand(shape)


# ---- softmax / log_softmax (functions and modules)
def _softmax_rows(name, ours, theirs, ours_mod, theirs_mod):
    rows = [
        ("int-input", lambda: ours(torch.arange(6).view(2, 3), -1), lambda: theirs(torch.arange(6).view(2, 3), -1)),
        ("bool-input", lambda: ours(torch.ones(2, 3, dtype=torch.bool), -1), None),
        ("complex-input", lambda: ours(r(2, 3, dtype=torch.complex64), -1), None),
        ("list-input", lambda: ours([[1.0, 2.0]], -1), None),
        ("dim-out-of-range", lambda: ours(r(2, 3), 2), lambda: theirs(r(2, 3), 2)),
        ("dim-negative-out-of-range", lambda: ours(r(2, 3), -3), lambda: theirs(r(2, 3), -3)),
        ("dim-float", lambda: ours(r(2, 3), 1.0), None),
        ("0d", lambda: ours(torch.tensor(2.0), 0), lambda: theirs(torch.tensor(2.0), 0)),
        ("0d-dim-1-out-of-range", lambda: ours(torch.tensor(2.0), 1), lambda: theirs(torch.tensor(2.0), 1)),
        ("zero-rows", lambda: ours(r(0, 5), -1), lambda: theirs(r(0, 5), -1)),
        ("zero-cols", lambda: ours(r(5, 0), -1), lambda: theirs(r(5, 0), -1)),
        ("nan-inf", lambda: ours(special(3, 5), -1), lambda: theirs(special(3, 5), -1)),
        ("all-minus-inf-row", lambda: ours(torch.full((2, 3), float("-inf")), 1),
         lambda: theirs(torch.full((2, 3), float("-inf")), 1)),
        ("transposed", lambda: ours(r(7, 5).t(), 0), lambda: theirs(r(7, 5).t(), 0)),
        ("expanded", lambda: ours(expanded(4, 9), 0), lambda: theirs(expanded(4, 9), 0)),
        ("channels-last", lambda: ours(channels_last(2, 3, 4, 5), 1), lambda: theirs(channels_last(2, 3, 4, 5), 1)),
        ("sliced", lambda: ours(r(4, 10)[:, ::3], 1), lambda: theirs(r(4, 10)[:, ::3], 1)),
        ("dtype-arg", lambda: ours(r(3, 4, dtype=torch.float16), 1, dtype=torch.float64),
         lambda: theirs(r(3, 4, dtype=torch.float16), 1, dtype=torch.float64)),
        ("module-int-input", lambda: ours_mod(1)(torch.arange(6).view(2, 3)),
         lambda: theirs_mod(1)(torch.arange(6).view(2, 3))),
        ("module-dim-out-of-range", lambda: ours_mod(3)(r(2, 3)), lambda: theirs_mod(3)(r(2, 3))),
        ("module-nan-inf", lambda: ours_mod(-1)(special(2, 6)), lambda: theirs_mod(-1)(special(2, 6))),
        ("module-zero-size", lambda: ours_mod(0)(r(0, 3)), lambda: theirs_mod(0)(r(0, 3))),
    ]
    return [(f"{name}-{i}", o, t, ("input", "dim")) for i, o, t in rows]


# ---- binary_cross_entropy_with_logits (function and module)
_bce = F.binary_cross_entropy_with_logits


_BCE_ROWS = [
    # (id, kwargs builder, names)
    ("int-input", lambda: dict(input=torch.ones(3, dtype=torch.long), target=r(3)), ("input",)),
    ("int-target", lambda: dict(input=r(3), target=torch.ones(3, dtype=torch.long)), ("target",)),
    ("bool-target", lambda: dict(input=r(3), target=torch.ones(3, dtype=torch.bool)), ("target",)),
    ("target-dtype-mismatch", lambda: dict(input=r(3), target=r(3, dtype=torch.float64)), ("target",)),
    ("target-shape", lambda: dict(input=r(3, 4), target=r(4, 3)), ("target",)),
    ("target-broadcastable-shape", lambda: dict(input=r(3, 4), target=r(1, 4)), ("target",)),
    ("target-list", lambda: dict(input=r(3), target=[0.0, 1.0, 0.0]), ("target",)),
    ("weight-shape", lambda: dict(input=r(3, 4), target=r(3, 4).sigmoid(), weight=r(3)), ("weight",)),
    ("weight-grows-output", lambda: dict(input=r(4), target=r(4).sigmoid(), weight=r(2, 4).abs()), ("weight",)),
    ("weight-int", lambda: dict(input=r(3), target=r(3).sigmoid(), weight=torch.ones(3, dtype=torch.long)),
     ("weight",)),
    ("weight-dtype", lambda: dict(input=r(3), target=r(3).sigmoid(), weight=r(3, dtype=torch.float64)),
     ("weight",)),
    ("weight-meta", lambda: dict(input=r(3), target=r(3).sigmoid(), weight=r(3, device="meta")), ("weight",)),
    ("target-meta", lambda: dict(input=r(3), target=r(3, device="meta")), ("target",)),
    ("pos-weight-shape", lambda: dict(input=r(3, 4), target=r(3, 4).sigmoid(), pos_weight=r(3)), ("pos_weight",)),
    ("pos-weight-meta", lambda: dict(input=r(3, 4), target=r(3, 4).sigmoid(), pos_weight=r(4, device="meta")),
     ("pos_weight",)),
    ("reduction", lambda: dict(input=r(3), target=r(3).sigmoid(), reduction="avg"), ("reduction",)),
    ("nan-inf-input", lambda: dict(input=special(3, 5), target=r(3, 5).sigmoid()), ("input",)),
    ("nan-inf-input-none", lambda: dict(input=special(3, 5), target=r(3, 5).sigmoid(), reduction="none"),
     ("input",)),
    ("nan-inf-target", lambda: dict(input=r(3, 5), target=special(3, 5), reduction="none"), ("target",)),
    ("target-out-of-[0,1]", lambda: dict(input=r(3, 5), target=3 * r(3, 5), reduction="sum"), ("target",)),
    ("zero-size-mean", lambda: dict(input=r(0, 4), target=r(0, 4)), ("input",)),
    ("zero-size-sum", lambda: dict(input=r(0, 4), target=r(0, 4), reduction="sum"), ("input",)),
    ("zero-size-none", lambda: dict(input=r(4, 0), target=r(4, 0), reduction="none"), ("input",)),
    ("0d", lambda: dict(input=torch.tensor(0.3), target=torch.tensor(1.0)), ("input",)),
    ("transposed", lambda: dict(input=r(5, 3).t(), target=r(5, 3).sigmoid().t(), pos_weight=r(5).abs()),
     ("input",)),
    ("expanded", lambda: dict(input=expanded(4, 6), target=expanded(4, 6).sigmoid(), weight=r(6).abs(),
                              reduction="none"), ("input",)),
    ("channels-last", lambda: dict(input=channels_last(2, 3, 4, 5), target=channels_last(2, 3, 4, 5).sigmoid(),
                                   weight=r(3, 1, 1).abs(), reduction="sum"), ("input",)),
]


def _bce_rows():
    rows = []
    for i, kw, names in _BCE_ROWS:
        rows.append((f"bce-{i}", lambda kw=kw: _bce(**kw()),
                     lambda kw=kw: TF.binary_cross_entropy_with_logits(**kw()), names))

        def mod(cls, kw=kw):
            a = kw()
            m = cls(weight=a.pop("weight", None), pos_weight=a.pop("pos_weight", None),
                    reduction=a.pop("reduction", "mean"))
            return m(a["input"], a["target"])
        rows.append((f"BCEWithLogitsLoss-{i}", lambda mod=mod: mod(fnn.BCEWithLogitsLoss),
                     lambda mod=mod: mod(nn.BCEWithLogitsLoss), names))
    return rows


# ---- lstm_cell and the LSTMCell / LSTM modules
def _cell_args(B=3, I=5, H=4, **over):
    a = dict(input=r(B, I), hx=(r(B, H), r(B, H)), w_ih=r(4 * H, I), w_hh=r(4 * H, H), b_ih=r(4 * H), b_hh=r(4 * H))
    a.update(over)
    return a


_CELL_ROWS = [
    ("input-3d", lambda: _cell_args(input=r(2, 3, 5)), ("input",)),
    ("input-int", lambda: _cell_args(input=torch.ones(3, 5, dtype=torch.long)), ("input",)),
    ("input-features", lambda: _cell_args(input=r(3, 6)), ("input", "w_ih")),
    ("input-dtype", lambda: _cell_args(input=r(3, 5, dtype=torch.float64)), ("input",)),
    ("w_ih-shape", lambda: _cell_args(w_ih=r(15, 5)), ("w_ih",)),
    ("w_hh-shape", lambda: _cell_args(w_hh=r(16, 5)), ("w_hh",)),
    ("w_hh-1d", lambda: _cell_args(w_hh=r(16)), ("w_hh",)),
    ("b_ih-shape", lambda: _cell_args(b_ih=r(15)), ("b_ih",)),
    ("b_hh-2d", lambda: _cell_args(b_hh=r(1, 16)), ("b_hh",)),
    ("hx-batch", lambda: _cell_args(hx=(r(2, 4), r(2, 4))), ("hx",)),
    ("hx-c-shape", lambda: _cell_args(hx=(r(3, 4), r(3, 5))), ("hx",)),
    ("hx-not-tuple", lambda: _cell_args(hx=r(3, 4)), ("hx",)),
    ("hx-unbatched-input", lambda: _cell_args(input=r(5)), ("hx",)),
    ("hx-meta", lambda: _cell_args(hx=(r(3, 4, device="meta"), r(3, 4))), ("hx",)),
    ("w_hh-meta", lambda: _cell_args(w_hh=r(16, 4, device="meta")), ("w_hh",)),
    ("hx-dtype", lambda: _cell_args(hx=(r(3, 4), r(3, 4, dtype=torch.float64))), ("hx",)),
    ("nan-inf-input", lambda: _cell_args(input=special(3, 5)), ("input",)),
    ("saturated", lambda: _cell_args(w_ih=1e4 * r(16, 5)), ("input",)),
    ("zero-batch", lambda: _cell_args(B=0), ("input",)),
    ("unbatched", lambda: _cell_args(input=r(5), hx=(r(4), r(4))), ("input",)),
    ("no-hx", lambda: _cell_args(hx=None), ("input",)),
    ("transposed", lambda: _cell_args(input=r(5, 3).t(), w_ih=r(5, 16).t()), ("input",)),
    ("expanded", lambda: _cell_args(input=expanded(3, 5), hx=(expanded(3, 4), expanded(3, 4))), ("input",)),
]


def _cell_rows():
    return [(f"lstm_cell-{i}", lambda a=a: F.lstm_cell(**a()), lambda a=a: _torch_cell(**a()), names)
            for i, a, names in _CELL_ROWS]


def _torch_cell(input, hx, **w):
    # torch's own cell (nn.LSTMCell's forward without the module): batched (h, c), zeros for None.
    unbatched = input.dim() == 1 and isinstance(hx, tuple) and hx[0].dim() == 1
    if unbatched:
        input, hx = input[None], tuple(t[None] for t in hx)
    if hx is None:
        hx = (input.new_zeros(input.shape[0], w["w_hh"].shape[-1]),) * 2
    out = torch._VF.lstm_cell(input, hx, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])
    return tuple(t[0] for t in out) if unbatched else out


def _lstm(fast, **kw):
    torch.manual_seed(1)
    m = nn.LSTM(5, 4, **{k: v for k, v in kw.items() if k in ("num_layers", "bidirectional", "batch_first")})
    return fnn.LSTM.from_torch(m) if fast else m


_LSTM_ROWS = [
    ("input-4d", lambda: (r(2, 3, 5, 1),), {}, ("input",)),
    ("input-1d", lambda: (r(5),), {}, ("input",)),
    ("input-int", lambda: (torch.ones(2, 3, 5, dtype=torch.long),), {}, ("input",)),
    ("input-features", lambda: (r(2, 3, 6),), {}, ("input",)),
    ("input-dtype", lambda: (r(2, 3, 5, dtype=torch.float64),), {}, ("input",)),
    ("hx-shape", lambda: (r(2, 3, 5), (r(1, 2, 4), r(1, 3, 4))), {}, ("hx",)),
    ("hx-layers", lambda: (r(2, 3, 5), (r(1, 3, 4), r(1, 3, 4))), dict(num_layers=2), ("hx",)),
    ("hx-not-tuple", lambda: (r(2, 3, 5), r(1, 3, 4)), {}, ("hx",)),
    ("hx-meta", lambda: (r(2, 3, 5), (r(1, 3, 4, device="meta"), r(1, 3, 4))), {}, ("hx",)),
    ("nan-inf", lambda: (special(4, 2, 5),), dict(bidirectional=True), ("input",)),
    ("zero-batch", lambda: (r(3, 0, 5),), {}, ("input",)),
    ("zero-steps", lambda: (r(0, 2, 5),), {}, ("input",)),
    ("unbatched", lambda: (r(3, 5),), dict(num_layers=2), ("input",)),
    ("transposed", lambda: (r(3, 2, 5).transpose(0, 1),), dict(batch_first=True), ("input",)),
    ("expanded", lambda: (r(3, 1, 5).expand(3, 4, 5),), {}, ("input",)),
]


def _lstm_rows():
    def call(fast, a, kw):
        args = a()  # before the module's seeded init, so both sides see the same tensors and weights
        return _lstm(fast, **kw)(*args)
    return [(f"LSTM-{i}", lambda a=a, kw=kw: call(True, a, kw), lambda a=a, kw=kw: call(False, a, kw), names)
            for i, a, kw, names in _LSTM_ROWS] + [
        ("LSTM-lengths-range", lambda: _lstm(True)(r(3, 2, 5), lengths=torch.tensor([4, 1])), None, ("lengths",)),
        ("LSTM-lengths-negative", lambda: _lstm(True)(r(3, 2, 5), lengths=torch.tensor([-1, 1])), None,
         ("lengths",)),
        ("LSTM-lengths-shape", lambda: _lstm(True)(r(3, 2, 5), lengths=torch.tensor([1, 1, 1])), None,
         ("lengths",)),
        ("LSTM-lengths-float", lambda: _lstm(True)(r(3, 2, 5), lengths=torch.tensor([1.0, 2.0])), None,
         ("lengths",)),
        ("LSTMCell-input-features", lambda: fnn.LSTMCell(5, 4)(r(3, 6)), lambda: nn.LSTMCell(5, 4)(r(3, 6)),
         ("input",)),
        ("LSTMCell-hx-batch", lambda: fnn.LSTMCell(5, 4)(r(3, 5), (r(2, 4), r(2, 4))),
         lambda: nn.LSTMCell(5, 4)(r(3, 5), (r(2, 4), r(2, 4))), ("hx",)),
    ]


ROWS = (_softmax_rows("softmax", F.softmax, TF.softmax, fnn.Softmax, nn.Softmax)
        + _softmax_rows("log_softmax", F.log_softmax, TF.log_softmax, fnn.LogSoftmax, nn.LogSoftmax)
        + _bce_rows() + _cell_rows() + _lstm_rows())


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


@pytest.mark.parametrize("ours,theirs,names", [pytest.param(o, t, n, id=i) for i, o, t, n in ROWS])
def test_contract(ours, theirs, names):
    torch.manual_seed(0)
    try:
        got = ours()
    except ERRORS as e:
        msg = str(e).lower()
        assert any(n.lower() in msg for n in names), f"{type(e).__name__} does not name {names}: {e}"
        return
    assert theirs is not None, "fastnn accepted a call that has no torch equivalent"
    torch.manual_seed(0)
    try:
        expected = theirs()
    except Exception as e:  # torch refuses what fastnn accepted
        pytest.fail(f"fastnn returned but torch raises {type(e).__name__}: {e}")
    got, expected = _flat(got), _flat(expected)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)
