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
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastnn
import fastnn.functional as F
import fastnn.nn as fnn

ERRORS = (TypeError, ValueError, IndexError, RuntimeError, NotImplementedError)


def r(*shape, dtype=torch.float32, device=None):  # None: the default device (CUDA in test_contract_cuda)
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


# ---- cross_entropy (function and CrossEntropyLoss)
def _ce_args(N=4, C=5, **over):
    a = dict(input=r(N, C), target=torch.randint(0, max(C, 1), (N,)))
    a.update(over)
    return a


def _idx(*shape, high=5):
    return torch.randint(0, high, shape)


def _with(t, *vals):
    """t (class indices) with its first entries set to vals (out-of-range or ignored targets)."""
    t.view(-1)[: len(vals)] = torch.tensor(vals)
    return t


def _probs(*shape, dim=1):
    return r(*shape).softmax(dim)


_CE_ROWS = [
    # (id, kwargs builder, names the message must contain one of)
    ("int-input", lambda: _ce_args(input=torch.ones(4, 5, dtype=torch.long)), ("input",)),
    ("bool-input", lambda: _ce_args(input=torch.ones(4, 5, dtype=torch.bool)), ("input",)),
    ("list-input", lambda: _ce_args(input=[[0.0, 1.0]]), ("input",)),
    ("0d-input", lambda: _ce_args(input=torch.tensor(1.0), target=torch.tensor(0)), ("input",)),
    ("bool-target", lambda: _ce_args(target=torch.ones(4, dtype=torch.bool)), ("target",)),
    ("complex-target", lambda: _ce_args(target=torch.ones(4, dtype=torch.complex64)), ("target",)),
    ("list-target", lambda: _ce_args(target=[0, 1, 2, 3]), ("target",)),
    ("int32-target", lambda: _ce_args(target=_idx(4).int()), ("target",)),
    ("uint8-target", lambda: _ce_args(target=_idx(4).to(torch.uint8)), ("target",)),
    ("target-batch", lambda: _ce_args(target=_idx(3)), ("target",)),
    ("target-2d-for-2d-input", lambda: _ce_args(target=_idx(4, 5)), ("target",)),
    ("target-spatial-shape", lambda: _ce_args(input=r(2, 5, 3, 4), target=_idx(2, 4, 3)), ("target",)),
    ("target-too-big", lambda: _ce_args(target=_with(_idx(4), 5)), ("target",)),
    ("target-huge", lambda: _ce_args(target=_with(_idx(4), 2 ** 40)), ("target",)),
    ("target-negative", lambda: _ce_args(target=_with(_idx(4), -1)), ("target",)),
    ("target-spatial-out-of-range", lambda: _ce_args(input=r(2, 5, 3), target=_with(_idx(2, 3), 0, 7)),
     ("target",)),
    ("target-unbatched-out-of-range", lambda: _ce_args(input=r(5), target=torch.tensor(5)), ("target",)),
    ("ignore-index-negative", lambda: _ce_args(target=_with(_idx(4), -1, -1), ignore_index=-1), ("target",)),
    ("ignore-index-out-of-range", lambda: _ce_args(target=_with(_idx(4), 9), ignore_index=9), ("target",)),
    ("ignore-index-valid-class", lambda: _ce_args(target=_with(_idx(4), 2, 2), ignore_index=2,
                                                  weight=r(5).abs()), ("target",)),
    ("all-ignored-mean", lambda: _ce_args(target=torch.full((4,), -100)), ("target",)),
    ("all-ignored-sum", lambda: _ce_args(target=torch.full((4,), -100), reduction="sum"), ("target",)),
    ("ignore-index-float", lambda: _ce_args(ignore_index=-100.0), ("ignore_index",)),
    ("probs-shape", lambda: _ce_args(target=_probs(4, 4)), ("target",)),
    ("probs-1d", lambda: _ce_args(target=r(4)), ("target",)),
    ("probs-spatial-shape", lambda: _ce_args(input=r(2, 5, 3), target=_probs(2, 3, 5)), ("target",)),
    ("probs-unbatched", lambda: _ce_args(input=r(5), target=_probs(5, dim=0)), ("target",)),
    ("probs-smoothing-weight", lambda: _ce_args(target=_probs(4, 5), weight=r(5).abs(), label_smoothing=0.2),
     ("target",)),
    ("probs-not-normalized", lambda: _ce_args(target=3 * r(4, 5), reduction="none"), ("target",)),
    ("weight-shape", lambda: _ce_args(weight=r(6)), ("weight",)),
    ("weight-2d", lambda: _ce_args(weight=r(1, 5)), ("weight",)),
    ("weight-int", lambda: _ce_args(weight=torch.ones(5, dtype=torch.long)), ("weight",)),
    ("weight-list", lambda: _ce_args(weight=[1.0] * 5), ("weight",)),
    ("half-input-float-weight", lambda: _ce_args(input=r(4, 5, dtype=torch.float16), weight=r(5).abs()),
     ("weight",)),
    ("weight-meta", lambda: _ce_args(weight=r(5, device="meta")), ("weight",)),
    ("weight-dtype", lambda: _ce_args(weight=r(5, dtype=torch.float64).abs()), ("weight",)),
    ("weight-requires-grad", lambda: _ce_args(weight=r(5).abs().requires_grad_()), ("weight",)),
    ("probs-dtype", lambda: _ce_args(target=_probs(4, 5).double()), ("target",)),
    ("probs-dtype-weight", lambda: _ce_args(target=_probs(4, 5).double(), weight=r(5).abs()), ("target", "weight")),
    ("probs-half", lambda: _ce_args(target=_probs(4, 5).half(), reduction="none"), ("target",)),
    ("target-meta", lambda: _ce_args(target=_idx(4).to("meta")), ("target",)),
    ("reduction", lambda: _ce_args(reduction="avg"), ("reduction",)),
    ("label-smoothing-above-1", lambda: _ce_args(label_smoothing=1.5), ("label_smoothing",)),
    ("label-smoothing-negative", lambda: _ce_args(label_smoothing=-0.1), ("label_smoothing",)),
    ("label-smoothing-1", lambda: _ce_args(label_smoothing=1.0, weight=r(5).abs()), ("input",)),
    ("nan-inf-input", lambda: _ce_args(input=special(4, 5)), ("input",)),
    ("nan-inf-input-none", lambda: _ce_args(input=special(4, 5), reduction="none", label_smoothing=0.1),
     ("input",)),
    ("all-minus-inf-row", lambda: _ce_args(input=torch.full((2, 5), float("-inf")), target=_idx(2),
                                           reduction="none"), ("input",)),
    ("nan-probs", lambda: _ce_args(target=special(4, 5), reduction="none"), ("target",)),
    ("nan-weight", lambda: _ce_args(weight=special(5).abs(), reduction="none"), ("weight",)),
    ("zero-batch-mean", lambda: _ce_args(N=0), ("input",)),
    ("zero-batch-sum", lambda: _ce_args(N=0, reduction="sum"), ("input",)),
    ("zero-batch-none", lambda: _ce_args(N=0, reduction="none"), ("input",)),
    ("zero-batch-probs", lambda: _ce_args(N=0, target=r(0, 5)), ("input",)),
    ("zero-classes", lambda: _ce_args(C=0, target=_idx(4, high=1)), ("input", "target")),
    ("zero-classes-ignored", lambda: _ce_args(C=0, target=torch.full((4,), -100), reduction="sum"),
     ("input", "target")),
    ("zero-spatial", lambda: _ce_args(input=r(2, 5, 0), target=_idx(2, 0), reduction="none"), ("input",)),
    ("unbatched", lambda: _ce_args(input=r(5), target=torch.tensor(3)), ("input",)),
    ("unbatched-target-1d", lambda: _ce_args(input=r(5), target=torch.tensor([3])), ("target",)),
    ("spatial", lambda: _ce_args(input=r(2, 5, 3, 4), target=_idx(2, 3, 4), weight=r(5).abs()), ("input",)),
    ("transposed", lambda: _ce_args(input=r(5, 4).t(), target=_idx(8)[::2]), ("input",)),
    ("expanded", lambda: _ce_args(input=expanded(4, 5), target=_idx(1).expand(4), reduction="none"),
     ("input",)),
    ("channels-last", lambda: _ce_args(input=channels_last(2, 5, 3, 4), target=_idx(2, 3, 4), reduction="sum"),
     ("input",)),
    ("channels-last-probs", lambda: _ce_args(input=channels_last(2, 5, 3, 4),
                                             target=channels_last(2, 5, 3, 4).softmax(1)), ("input",)),
    ("float64", lambda: _ce_args(input=r(4, 5, dtype=torch.float64), weight=r(5, dtype=torch.float64).abs()),
     ("input",)),
]


def _ce_rows():
    rows = []
    for i, kw, names in _CE_ROWS:
        rows.append((f"cross_entropy-{i}", lambda kw=kw: F.cross_entropy(**kw()),
                     lambda kw=kw: TF.cross_entropy(**kw()), names))

        def mod(cls, kw=kw):
            a = kw()
            m = cls(**{k: a.pop(k) for k in ("weight", "ignore_index", "reduction", "label_smoothing") if k in a})
            return m(a["input"], a["target"])
        rows.append((f"CrossEntropyLoss-{i}", lambda mod=mod: mod(fnn.CrossEntropyLoss),
                     lambda mod=mod: mod(nn.CrossEntropyLoss), names))
    return rows


# ---- linear_cross_entropy (function and LinearCrossEntropyLoss): torch's twin is linear + cross_entropy
def _lce_args(N=6, D=4, V=5, **over):
    a = dict(input=r(N, D), weight=r(V, D), target=torch.randint(0, max(V, 1), (N,)), bias=r(V))
    a.update(over)
    return a


def _torch_lce(input, weight, target, bias=None, class_weight=None, chunk_size=None, **kw):
    return TF.cross_entropy(TF.linear(input, weight, bias).movedim(-1, 1) if input.dim() > 2
                            else TF.linear(input, weight, bias), target, class_weight, **kw)


_LCE_ROWS = [
    ("int-input", lambda: _lce_args(input=torch.ones(6, 4, dtype=torch.long)), ("input",)),
    ("0d-input", lambda: _lce_args(input=torch.tensor(1.0), target=torch.tensor(0)), ("input",)),
    ("input-features", lambda: _lce_args(input=r(6, 3)), ("input",)),
    ("input-dtype", lambda: _lce_args(input=r(6, 4, dtype=torch.float64)), ("input", "weight")),
    ("weight-int", lambda: _lce_args(weight=torch.ones(5, 4, dtype=torch.long)), ("weight",)),
    ("weight-1d", lambda: _lce_args(weight=r(4)), ("weight",)),
    ("weight-3d", lambda: _lce_args(weight=r(1, 5, 4)), ("weight",)),
    ("weight-meta", lambda: _lce_args(weight=r(5, 4, device="meta")), ("weight",)),
    ("bias-shape", lambda: _lce_args(bias=r(6)), ("bias",)),
    ("bias-dtype", lambda: _lce_args(bias=r(5, dtype=torch.float64)), ("bias",)),
    ("bias-meta", lambda: _lce_args(bias=r(5, device="meta")), ("bias",)),
    ("target-float", lambda: _lce_args(target=_probs(6, 5)), ("target",)),
    ("target-bool", lambda: _lce_args(target=torch.ones(6, dtype=torch.bool)), ("target",)),
    ("target-list", lambda: _lce_args(target=[0] * 6), ("target",)),
    ("target-batch", lambda: _lce_args(target=_idx(5)), ("target",)),
    ("target-meta", lambda: _lce_args(target=_idx(6).to("meta")), ("target",)),
    ("target-too-big", lambda: _lce_args(target=_with(_idx(6), 5)), ("target",)),
    ("target-negative", lambda: _lce_args(target=_with(_idx(6), -3)), ("target",)),
    ("ignore-index", lambda: _lce_args(target=_with(_idx(6), -1, 7), ignore_index=-1), ("target",)),
    ("ignore-index-in-range", lambda: _lce_args(target=_with(_idx(6), 1, 1), ignore_index=1,
                                                class_weight=r(5).abs()), ("target",)),
    ("all-ignored", lambda: _lce_args(target=torch.full((6,), -100)), ("target",)),
    ("class-weight-shape", lambda: _lce_args(class_weight=r(4)), ("weight",)),
    ("class-weight-meta", lambda: _lce_args(class_weight=r(5, device="meta")), ("weight",)),
    ("reduction", lambda: _lce_args(reduction="mean "), ("reduction",)),
    ("label-smoothing", lambda: _lce_args(label_smoothing=2.0), ("label_smoothing",)),
    ("chunk-size-0", lambda: _lce_args(chunk_size=0), ("chunk_size",)),
    ("chunk-size-float", lambda: _lce_args(chunk_size=2.0), ("chunk_size",)),
    ("chunk-size-1", lambda: _lce_args(N=7, chunk_size=1, label_smoothing=0.1, reduction="none"), ("input",)),
    ("nan-inf-input", lambda: _lce_args(input=special(6, 4), reduction="none"), ("input",)),
    ("nan-inf-weight", lambda: _lce_args(weight=special(5, 4), reduction="none"), ("weight",)),
    ("zero-rows", lambda: _lce_args(N=0, reduction="sum"), ("input",)),
    ("zero-rows-mean", lambda: _lce_args(N=0), ("input",)),
    ("zero-features", lambda: _lce_args(D=0), ("input",)),
    ("zero-vocab", lambda: _lce_args(V=0, target=torch.full((6,), -100), reduction="sum"),
     ("weight", "input", "target")),
    ("3d-input", lambda: _lce_args(input=r(2, 3, 4), target=_idx(2, 3), reduction="none"), ("input",)),
    ("3d-target-shape", lambda: _lce_args(input=r(2, 3, 4), target=_idx(6)), ("target",)),
    ("unbatched", lambda: _lce_args(input=r(4), target=torch.tensor(2)), ("input",)),
    ("transposed-input", lambda: _lce_args(input=r(4, 6).t()), ("input",)),
    ("transposed-weight", lambda: _lce_args(weight=r(4, 5).t(), bias=None), ("input",)),
    ("expanded-input", lambda: _lce_args(input=expanded(6, 4), reduction="none"), ("input",)),
]


def _fastnn_lce(input, weight, target, bias=None, class_weight=None, **kw):
    # The table keeps fastnn's former names: weight is torch's linear_weight, class_weight its weight.
    return F.linear_cross_entropy(input, weight, target, linear_bias=bias, weight=class_weight, **kw)


def _lce_rows():
    rows = []
    for i, kw, names in _LCE_ROWS:
        rows.append((f"linear_cross_entropy-{i}", lambda kw=kw: _fastnn_lce(**kw()),
                     lambda kw=kw: _torch_lce(**kw()), names))

        def mod(kw=kw):
            a = kw()
            w, b = a.pop("weight"), a.pop("bias", None)
            lin = nn.Linear(1, 1, bias=b is not None)
            lin.in_features, lin.out_features = (w.shape[-1], w.shape[0]) if w.dim() == 2 else (1, 1)
            lin.weight = nn.Parameter(w, requires_grad=w.is_floating_point())
            lin.bias = None if b is None else nn.Parameter(b, requires_grad=b.is_floating_point())
            x, t = a.pop("input"), a.pop("target")
            return fnn.LinearCrossEntropyLoss.from_linear(lin, weight=a.pop("class_weight", None), **a)(x, t)
        rows.append((f"LinearCrossEntropyLoss-{i}", mod, lambda kw=kw: _torch_lce(**kw()), names))
    return rows


# ---- scaled_dot_product_attention (function), MultiheadAttention, MultiHeadSelfAttention
def _qkv(B=2, H=3, Lq=5, Lk=6, D=4, **over):
    a = dict(query=r(B, H, Lq, D), key=r(B, H, Lk, D), value=r(B, H, Lk, D))
    a.update(over)
    return a


def _torch_sdpa(query, key, value, attn_mask=None, key_padding_mask=None, is_causal=False, **kw):
    """torch's sdpa with fastnn's documented extensions spelled out: key_padding_mask (True = pad) as a bool
    attn_mask, is_causal combined with attn_mask as one mask, and a fully masked row as zeros (torch: NaN).
    torch's math backend: its CPU flash kernel returns zeros for a query row holding NaN (math, and fastnn: NaN)."""
    Lq, Lk = query.shape[-2], key.shape[-2]
    masks = []
    if attn_mask is not None:
        masks.append(attn_mask if attn_mask.dtype != torch.bool else
                     torch.zeros(attn_mask.shape).masked_fill(~attn_mask, float("-inf")))
    if key_padding_mask is not None:
        kpm = key_padding_mask[:, None, None, :] if key_padding_mask.dim() == 2 else key_padding_mask[None, :]
        masks.append(torch.zeros(kpm.shape).masked_fill(kpm, float("-inf")))
    if is_causal and masks:
        masks.append(torch.zeros(Lq, Lk).masked_fill(~torch.ones(Lq, Lk, dtype=torch.bool).tril(), float("-inf")))
        is_causal = False
    mask = None
    for m in masks:
        mask = m if mask is None else mask + m
    if mask is not None:
        mask = mask.to(query.dtype)
    with sdpa_kernel(SDPBackend.MATH):
        out = TF.scaled_dot_product_attention(query, key, value, mask, is_causal=is_causal, **kw)
    if mask is not None or is_causal:
        full = mask if mask is not None else torch.zeros(Lq, Lk).masked_fill(
            ~torch.ones(Lq, Lk, dtype=torch.bool).tril(), float("-inf"))
        dead = (full.expand(*query.shape[:-1], Lk) == float("-inf")).all(-1, keepdim=True)
        out = out.masked_fill(dead, 0.0)
    return out


def _kpm(B, Lk, pad=2):
    m = torch.zeros(B, Lk, dtype=torch.bool)
    m[:, Lk - pad:] = True
    return m


_SDPA_ROWS = [
    ("int-query", lambda: _qkv(query=torch.ones(2, 3, 5, 4, dtype=torch.long)), ("query",)),
    ("key-dtype", lambda: _qkv(key=r(2, 3, 6, 4, dtype=torch.float64)), ("key",)),
    ("value-half", lambda: _qkv(value=r(2, 3, 6, 4, dtype=torch.float16)), ("value",)),
    ("list-value", lambda: _qkv(value=[[0.0]]), ("value",)),
    ("query-2d", lambda: _qkv(query=r(5, 4)), ("query",)),
    ("query-5d", lambda: _qkv(query=r(1, 2, 3, 5, 4)), ("query",)),
    ("key-3d-query-4d", lambda: _qkv(key=r(3, 6, 4)), ("key", "query")),
    ("key-head-dim", lambda: _qkv(key=r(2, 3, 6, 5)), ("key",)),
    ("key-batch", lambda: _qkv(key=r(1, 3, 6, 4), value=r(1, 3, 6, 4)), ("key",)),
    ("key-heads", lambda: _qkv(key=r(2, 1, 6, 4), value=r(2, 1, 6, 4)), ("key",)),
    ("value-length", lambda: _qkv(value=r(2, 3, 7, 4)), ("value",)),
    ("value-head-dim", lambda: _qkv(value=r(2, 3, 6, 8)), ("value",)),
    ("head-dim-0", lambda: _qkv(D=0), ("query", "head dim")),
    ("head-dim-257", lambda: _qkv(B=1, H=1, Lq=2, Lk=2, D=257), ("query", "head dim")),
    ("key-meta", lambda: _qkv(key=r(2, 3, 6, 4, device="meta")), ("key",)),
    ("mask-meta", lambda: _qkv(attn_mask=torch.ones(5, 6, dtype=torch.bool, device="meta")), ("attn_mask",)),
    ("mask-shape", lambda: _qkv(attn_mask=torch.ones(5, 7, dtype=torch.bool)), ("attn_mask",)),
    ("mask-grows-output", lambda: _qkv(attn_mask=torch.ones(4, 3, 5, 6, dtype=torch.bool)), ("attn_mask",)),
    ("mask-int", lambda: _qkv(attn_mask=torch.ones(5, 6, dtype=torch.long)), ("attn_mask",)),
    ("mask-list", lambda: _qkv(attn_mask=[[True]]), ("attn_mask",)),
    ("mask-bool-2d", lambda: _qkv(attn_mask=torch.rand(5, 6) > 0.3), ("attn_mask",)),
    ("mask-float-broadcast", lambda: _qkv(attn_mask=r(2, 1, 1, 6)), ("attn_mask",)),
    ("mask-minus-inf", lambda: _qkv(attn_mask=_with(r(2, 3, 5, 6), *[float("-inf")] * 3)), ("attn_mask",)),
    ("mask-nan", lambda: _qkv(attn_mask=_with(r(5, 6), 0.0, float("nan"))), ("attn_mask",)),
    ("mask-row-fully-masked", lambda: _qkv(attn_mask=torch.ones(5, 6, dtype=torch.bool).index_fill(
        0, torch.tensor([1]), False)), ("attn_mask",)),
    ("mask-expanded", lambda: _qkv(attn_mask=(torch.rand(1, 1, 1, 6) > 0.2).expand(2, 3, 5, 6)), ("attn_mask",)),
    ("kpm", lambda: _qkv(key_padding_mask=_kpm(2, 6)), ("key_padding_mask",)),
    ("kpm-all-padded", lambda: _qkv(key_padding_mask=_kpm(2, 6, pad=6)), ("key_padding_mask",)),
    ("kpm-shape", lambda: _qkv(key_padding_mask=_kpm(2, 5)), ("key_padding_mask",)),
    ("kpm-broadcast-shape", lambda: _qkv(key_padding_mask=_kpm(1, 6)), ("key_padding_mask",)),
    ("kpm-float", lambda: _qkv(key_padding_mask=_kpm(2, 6).float()), ("key_padding_mask",)),
    ("kpm-meta", lambda: _qkv(key_padding_mask=_kpm(2, 6).to("meta")), ("key_padding_mask",)),
    ("kpm-unbatched", lambda: _qkv(query=r(3, 5, 4), key=r(3, 6, 4), value=r(3, 6, 4),
                                   key_padding_mask=_kpm(1, 6)[0]), ("key_padding_mask",)),
    ("causal", lambda: _qkv(is_causal=True), ("query",)),
    ("causal-lq-gt-lk", lambda: _qkv(Lq=7, Lk=3, is_causal=True), ("query",)),
    ("causal-and-mask", lambda: _qkv(is_causal=True, attn_mask=r(5, 6)), ("attn_mask",)),
    ("dropout-above-1", lambda: _qkv(dropout_p=1.5), ("dropout_p",)),
    ("dropout-negative", lambda: _qkv(dropout_p=-0.1), ("dropout_p",)),
    ("dropout-1", lambda: _qkv(dropout_p=1.0), ("dropout_p",)),
    ("scale-str", lambda: _qkv(scale="0.5"), ("scale",)),
    ("scale-0", lambda: _qkv(scale=0.0), ("scale",)),
    ("nan-inf-query", lambda: _qkv(query=special(2, 3, 5, 4)), ("query",)),
    ("nan-inf-value", lambda: _qkv(value=special(2, 3, 6, 4)), ("value",)),
    ("nan-inf-key", lambda: _qkv(key=special(2, 3, 6, 4), key_padding_mask=_kpm(2, 6, pad=1)), ("key",)),
    ("zero-batch", lambda: _qkv(B=0), ("query",)),
    ("zero-heads", lambda: _qkv(H=0), ("query",)),
    ("zero-queries", lambda: _qkv(Lq=0), ("query",)),
    ("zero-keys", lambda: _qkv(Lk=0), ("key",)),
    ("unbatched", lambda: _qkv(query=r(3, 5, 4), key=r(3, 6, 4), value=r(3, 6, 4)), ("query",)),
    ("odd-head-dim", lambda: _qkv(D=7, Lq=9, Lk=11), ("query",)),
    ("transposed", lambda: _qkv(query=r(2, 5, 3, 4).transpose(1, 2), key=r(2, 6, 3, 4).transpose(1, 2),
                                value=r(2, 6, 3, 4).transpose(1, 2)), ("query",)),
    ("expanded", lambda: _qkv(key=r(1, 3, 6, 4).expand(2, 3, 6, 4), value=r(2, 1, 6, 4).expand(2, 3, 6, 4)),
     ("key",)),
    ("channels-last", lambda: _qkv(query=channels_last(2, 3, 5, 4), key=channels_last(2, 3, 6, 4),
                                   value=channels_last(2, 3, 6, 4)), ("query",)),
    ("float64", lambda: _qkv(query=r(2, 3, 5, 4, dtype=torch.float64), key=r(2, 3, 6, 4, dtype=torch.float64),
                             value=r(2, 3, 6, 4, dtype=torch.float64), attn_mask=r(5, 6, dtype=torch.float64)),
     ("query",)),
]


def _sdpa_rows():
    return [(f"sdpa-{i}", lambda kw=kw: F.scaled_dot_product_attention(**kw()), lambda kw=kw: _torch_sdpa(**kw()),
             names) for i, kw, names in _SDPA_ROWS]


def _mha(fast, E=8, H=2, **kw):
    torch.manual_seed(1)
    m = nn.MultiheadAttention(E, H, **kw)
    return fnn.MultiheadAttention.from_torch(m) if fast else m


_MHA_ROWS = [
    # (id, module kwargs, call builder -> (args, kwargs), names)
    ("query-int", {}, lambda: ((torch.ones(5, 2, 8, dtype=torch.long),) * 3, {}), ("query",)),
    ("query-dtype", {}, lambda: ((r(5, 2, 8, dtype=torch.float64),) * 3, {}), ("query",)),
    ("key-dtype", {}, lambda: ((r(5, 2, 8), r(6, 2, 8, dtype=torch.float64), r(6, 2, 8)), {}), ("key",)),
    ("query-4d", {}, lambda: ((r(5, 2, 8, 1),) * 3, {}), ("query",)),
    ("query-1d", {}, lambda: ((r(8),) * 3, {}), ("query",)),
    ("key-rank", {}, lambda: ((r(5, 2, 8), r(6, 8), r(6, 8)), {}), ("key", "query")),
    ("query-embed", {}, lambda: ((r(5, 2, 6),) * 3, {}), ("query", "embed_dim")),
    ("key-embed", {}, lambda: ((r(5, 2, 8), r(6, 2, 6), r(6, 2, 8)), {}), ("key", "kdim")),
    ("value-embed-vdim", dict(kdim=6, vdim=3), lambda: ((r(5, 2, 8), r(6, 2, 6), r(6, 2, 6)), {}),
     ("value", "vdim")),
    ("kdim-vdim", dict(kdim=6, vdim=3), lambda: ((r(5, 2, 8), r(6, 2, 6), r(6, 2, 3)), {}), ("query",)),
    ("key-batch", {}, lambda: ((r(5, 2, 8), r(6, 3, 8), r(6, 3, 8)), {}), ("key",)),
    ("batch-first-mismatch", dict(batch_first=True), lambda: ((r(2, 5, 8), r(6, 2, 8), r(6, 2, 8)), {}),
     ("key",)),
    ("value-length", {}, lambda: ((r(5, 2, 8), r(6, 2, 8), r(7, 2, 8)), {}), ("value",)),
    ("key-meta", {}, lambda: ((r(5, 2, 8), r(6, 2, 8, device="meta"), r(6, 2, 8)), {}), ("key",)),
    ("kpm", {}, lambda: ((r(5, 2, 8), r(6, 2, 8), r(6, 2, 8)), dict(key_padding_mask=_kpm(2, 6))), ("query",)),
    ("kpm-float", {}, lambda: ((r(5, 2, 8),) * 3, dict(key_padding_mask=r(2, 5))), ("query",)),
    ("kpm-shape", {}, lambda: ((r(5, 2, 8), r(6, 2, 8), r(6, 2, 8)), dict(key_padding_mask=_kpm(2, 5))),
     ("key_padding_mask",)),
    ("kpm-broadcast-shape", {}, lambda: ((r(5, 2, 8), r(6, 2, 8), r(6, 2, 8)), dict(key_padding_mask=_kpm(1, 6))),
     ("key_padding_mask",)),
    ("kpm-float-broadcast-shape", {}, lambda: ((r(5, 2, 8),) * 3, dict(key_padding_mask=r(1, 5))),
     ("key_padding_mask",)),
    ("kpm-int", {}, lambda: ((r(5, 2, 8),) * 3, dict(key_padding_mask=_kpm(2, 5).long())), ("key_padding_mask",)),
    ("kpm-meta", {}, lambda: ((r(5, 2, 8),) * 3, dict(key_padding_mask=_kpm(2, 5).to("meta"))),
     ("key_padding_mask",)),
    ("mask-2d", {}, lambda: ((r(5, 2, 8), r(6, 2, 8), r(6, 2, 8)), dict(attn_mask=torch.rand(5, 6) > 0.7)),
     ("attn_mask",)),
    ("mask-3d", {}, lambda: ((r(5, 2, 8), r(6, 2, 8), r(6, 2, 8)), dict(attn_mask=r(4, 5, 6))), ("attn_mask",)),
    ("mask-3d-shape", {}, lambda: ((r(5, 2, 8), r(6, 2, 8), r(6, 2, 8)), dict(attn_mask=r(2, 5, 6))),
     ("attn_mask",)),
    ("mask-2d-shape", {}, lambda: ((r(5, 2, 8), r(6, 2, 8), r(6, 2, 8)), dict(attn_mask=r(5, 7))), ("attn_mask",)),
    ("mask-1d", {}, lambda: ((r(5, 2, 8),) * 3, dict(attn_mask=r(5))), ("attn_mask",)),
    ("mask-int", {}, lambda: ((r(5, 2, 8),) * 3, dict(attn_mask=torch.zeros(5, 5, dtype=torch.long))),
     ("attn_mask",)),
    ("mask-meta", {}, lambda: ((r(5, 2, 8),) * 3, dict(attn_mask=torch.zeros(5, 5, device="meta"))),
     ("attn_mask",)),
    ("mask-and-kpm", {}, lambda: ((r(5, 2, 8),) * 3, dict(attn_mask=torch.rand(5, 5) > 0.8,
                                                          key_padding_mask=_kpm(2, 5, pad=1))), ("attn_mask",)),
    ("causal", {}, lambda: ((r(5, 2, 8),) * 3, dict(is_causal=True, need_weights=False)), ("query",)),
    ("need-weights-per-head", {}, lambda: ((r(5, 2, 8),) * 3, dict(average_attn_weights=False)), ("query",)),
    ("nan-inf-query", {}, lambda: ((special(5, 2, 8), r(6, 2, 8), r(6, 2, 8)), {}), ("query",)),
    ("zero-batch", {}, lambda: ((r(5, 0, 8),) * 3, dict(need_weights=False)), ("query",)),
    ("zero-length", {}, lambda: ((r(0, 2, 8), r(6, 2, 8), r(6, 2, 8)), dict(need_weights=False)), ("query",)),
    ("unbatched", {}, lambda: ((r(5, 8), r(6, 8), r(6, 8)), dict(key_padding_mask=_kpm(1, 6)[0])), ("query",)),
    ("unbatched-kpm-shape", {}, lambda: ((r(5, 8), r(6, 8), r(6, 8)), dict(key_padding_mask=_kpm(2, 6))),
     ("key_padding_mask",)),
    ("batch-first", dict(batch_first=True), lambda: ((r(2, 5, 8), r(2, 6, 8), r(2, 6, 8)), {}), ("query",)),
    ("transposed", dict(batch_first=True), lambda: ((r(5, 2, 8).transpose(0, 1),) * 3, dict(need_weights=False)),
     ("query",)),
    ("expanded", {}, lambda: ((r(5, 1, 8).expand(5, 3, 8),) * 3, {}), ("query",)),
    ("bias-kv-zero-attn", dict(add_bias_kv=True, add_zero_attn=True),
     lambda: ((r(5, 2, 8),) * 3, dict(key_padding_mask=_kpm(2, 5, pad=1))), ("query",)),
]


def _mha_rows():
    def call(fast, mk, a):
        args, kw = a()
        m = _mha(fast, **mk)
        if not fast and kw.get("is_causal") and kw.get("attn_mask") is None:
            # fastnn takes is_causal alone (documented); torch wants the mask as well.
            L = args[0].shape[1 if mk.get("batch_first") else 0]
            kw = dict(kw, attn_mask=torch.ones(L, L, dtype=torch.bool).triu(1))
        return m(*args, **kw)
    return [(f"MultiheadAttention-{i}", lambda mk=mk, a=a: call(True, mk, a),
             lambda mk=mk, a=a: call(False, mk, a), names) for i, mk, a, names in _MHA_ROWS] + [
        ("MultiheadAttention-embed-not-divisible", lambda: fnn.MultiheadAttention(10, 3), None,
         ("embed_dim", "num_heads")),
        ("MultiheadAttention-embed-0", lambda: fnn.MultiheadAttention(0, 1), None, ("embed_dim",)),
    ]


def _mhsa(hidden=8, heads=2):
    torch.manual_seed(1)
    return fnn.MultiHeadSelfAttention(heads, hidden)


def _mhsa_torch(x, key_padding_mask=None, is_causal=False):
    # The same layer written with torch's sdpa: the module's own projections, fastnn's documented mask semantics.
    m = _mhsa()
    B, L, E = x.shape
    q, k, v = (f(x).view(B, L, 2, E // 2).transpose(1, 2) for f in (m.query, m.key, m.value))
    out = _torch_sdpa(q, k, v, key_padding_mask=key_padding_mask, is_causal=is_causal)
    return m.dense(out.transpose(1, 2).reshape(B, L, E))


_MHSA_ROWS = [
    ("int", lambda: (torch.ones(2, 5, 8, dtype=torch.long),), ("hidden_states",)),
    ("dtype", lambda: (r(2, 5, 8, dtype=torch.float64),), ("hidden_states",)),
    ("2d", lambda: (r(5, 8),), ("hidden_states",)),
    ("hidden-size", lambda: (r(2, 5, 6),), ("hidden_states",)),
    ("kpm-shape", lambda: (r(2, 5, 8), _kpm(2, 4)), ("key_padding_mask",)),
    ("kpm-float", lambda: (r(2, 5, 8), _kpm(2, 5).float()), ("key_padding_mask",)),
    ("kpm", lambda: (r(2, 5, 8), _kpm(2, 5)), ("hidden_states",)),
    ("kpm-all-padded", lambda: (r(2, 5, 8), _kpm(2, 5, pad=5)), ("hidden_states",)),
    ("causal", lambda: (r(2, 5, 8), None, True), ("hidden_states",)),
    ("nan-inf", lambda: (special(2, 5, 8),), ("hidden_states",)),
    ("zero-batch", lambda: (r(0, 5, 8),), ("hidden_states",)),
    ("transposed", lambda: (r(5, 2, 8).transpose(0, 1),), ("hidden_states",)),
]


def _mhsa_rows():
    def ours(a):
        args = a()  # before the module's seeded init, as on torch's side
        return _mhsa()(*args)
    return [(f"MultiHeadSelfAttention-{i}", lambda a=a: ours(a), lambda a=a: _mhsa_torch(*a()), names)
            for i, a, names in _MHSA_ROWS] + [
        ("MultiHeadSelfAttention-not-divisible", lambda: fnn.MultiHeadSelfAttention(3, 8), None,
         ("hidden_size", "num_heads")),
    ]


ROWS = (_softmax_rows("softmax", F.softmax, TF.softmax, fnn.Softmax, nn.Softmax)
        + _softmax_rows("log_softmax", F.log_softmax, TF.log_softmax, fnn.LogSoftmax, nn.LogSoftmax)
        + _bce_rows() + _cell_rows() + _lstm_rows() + _ce_rows() + _lce_rows() + _sdpa_rows() + _mha_rows()
        + _mhsa_rows())


def _flat(out):
    if out is None or isinstance(out, torch.Tensor):  # None: MultiheadAttention's weights with need_weights=False
        return [out]
    return [t for o in out for t in _flat(o)]


_ROW_PARAMS = [pytest.param(o, t, n, id=i) for i, o, t, n in ROWS]


@pytest.mark.parametrize("ours,theirs,names", _ROW_PARAMS)
def test_contract(ours, theirs, names, tol=1e-5):
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
        if a is None or b is None:
            assert a is b
            continue
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True)


# The table on CUDA tensors: every tensor the rows make follows torch.device("cuda") (a 'meta' one stays the second
# device), fastnn on each backend against torch on CUDA. Tolerances are first guesses, not yet measured on a GPU:
# the native kernels build with --use_fast_math, Triton's float32 dots are TF32.
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("ours,theirs,names", _ROW_PARAMS)
def test_contract_cuda(backend, ours, theirs, names):
    with torch.device("cuda"), fastnn.use_backend(backend):
        test_contract(ours, theirs, names, tol=1e-4 if backend == "native" else 2e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
@pytest.mark.parametrize("bad", [5, 1005, -7, 2 ** 40])
def test_out_of_range_target_cuda(backend, op, bad):
    # Reported, as on the CPU: an IndexError naming the target, raised before anything reads the logits there, so
    # the device stays usable (a kernel reading it would fault; memcheck over tools/gpu_sanitize_driver.py, which
    # puts such targets at the first and last row, checks that nothing reads it).
    x, w = torch.randn(6, 8, device="cuda"), torch.randn(5, 8, device="cuda")
    t = torch.randint(0, 5, (6,), device="cuda")
    t[-1] = bad

    def call(t):
        if op == "cross_entropy":
            return F.cross_entropy(x @ w.t(), t, backend=backend)
        return F.linear_cross_entropy(x, w, t, backend=backend)

    with pytest.raises(IndexError, match="target"):
        call(t)
    torch.cuda.synchronize()
    assert call(t.clamp(0, 4)).isfinite()
