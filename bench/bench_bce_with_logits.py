"""Binary cross-entropy with logits, forward and forward+backward: fastnn backends vs torch eager vs torch.compile.

    python bench/bench_bce_with_logits.py [--quick] [--goal] [--device cpu|cuda] [--no-compile] [--no-thp]

--goal runs only the goal case (mean reduction, no pos_weight).

Goal case (README's goal table): 8192 x 4096 float32, reduction "mean", on a 2-core CPU <= 0.5x torch eager time. torch eager
composes log_sigmoid, mul, sub and mean forward (and sigmoid, sub, mul backward), each a pass over memory with
a temporary; fastnn makes one pass forward (no output but the scalar) and one backward. Also timed: the same with a
(4096,) pos_weight, and reduction "none". Validates every implementation against fastnn.reference first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as TF

import fastnn
import fastnn.functional as F
from harness import EAGER, Bench


def implementations(b: Bench) -> dict:
    impls = {EAGER: TF.binary_cross_entropy_with_logits}
    if b.compile_ok:
        impls["torch-compile"] = torch.compile(TF.binary_cross_entropy_with_logits, dynamic=False)
    impls["fastnn-native"] = lambda *a, **k: F.binary_cross_entropy_with_logits(*a, **k, backend="native")
    if b.device == "cuda":
        impls["fastnn-triton"] = lambda *a, **k: F.binary_cross_entropy_with_logits(*a, **k, backend="triton")
    return impls


def validate(impls: dict, device: str) -> None:
    x, y = 4 * torch.randn(37, 1025, device=device), torch.rand(37, 1025, device=device)
    pw = torch.rand(1025, device=device) + 0.5
    ref = fastnn.reference.binary_cross_entropy_with_logits(x.double(), y.double(), None, "sum", pw.double())
    for name, f in impls.items():
        err = abs(f(x, y, pos_weight=pw, reduction="sum").item() - ref.item()) / ref.item()
        assert err < 1e-5, f"{name} disagrees with the reference: relative error {err}"


def forward(f, x, y, kw):
    return lambda: f(x, y, **kw)


def forward_backward(f, x, y, kw):
    xg = x.clone().requires_grad_()
    g = torch.randn_like(x)  # a dense upstream gradient for reduction="none"

    def run():
        out = f(xg, y, **kw)
        out.backward() if out.dim() == 0 else out.backward(g)
        xg.grad = None

    return run


def main():
    b = Bench("bce_with_logits")
    impls = implementations(b)
    validate(impls, b.device)
    rows, cols = (2048, 4096) if b.quick else (8192, 4096)
    x = torch.randn(rows, cols, device=b.device)
    y = torch.rand(rows, cols, device=b.device)
    pw = torch.rand(cols, device=b.device) + 0.5
    nbytes = x.numel() * x.element_size()
    case = f"{rows}x{cols}"
    variants = [("goal", dict())]
    if "--goal" not in b.extra:
        variants += [("pos_weight", dict(pos_weight=pw)), ("none", dict(reduction="none"))]
    for tag, kw in variants:
        # fwd reads x and y (and writes the loss for "none"); + bwd reads x and y, writes grad_input
        b.compare(case=case, fns={name: forward(f, x, y, kw) for name, f in impls.items()}, like=x,
                  bytes=(3 if tag == "none" else 2) * nbytes, series=f"fwd {tag}")
        b.compare(case=case, fns={name: forward_backward(f, x, y, kw) for name, f in impls.items()}, like=x,
                  bytes=(6 if tag == "none" else 5) * nbytes, series=f"fwd+bwd {tag}")
    b.finish()


if __name__ == "__main__":
    main()
