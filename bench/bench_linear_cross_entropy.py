"""Linear + cross-entropy, forward and forward+backward: fastnn backends vs torch eager
(cross_entropy(linear(x, w), t)) vs torch.compile, and (torch >= 2.13) torch's own
torch.nn.functional.linear_cross_entropy on its reference path (options=None) and on its chunked path
(options=torch.nn.LinearCrossEntropyOptions()), time and peak extra memory.

    python bench/bench_linear_cross_entropy.py [--quick] [--shapes] [--device cpu|cuda] [--no-compile]

--shapes runs N=4096 over feature sizes and vocabularies instead of the goal case: where the logits are cheap next
to the products (large D, small V) the backward's fourth product costs more than the saved memory traffic gains,
and this shows where that turns.

Goal case (the README's "Benchmarks" table, float32, 2-core CPU):
  N=8192, D=512, V=32000: fwd+bwd <= 1.0x torch eager time, extra peak memory <= 0.1x torch's;
  and below torch's chunked linear_cross_entropy in both time and extra peak memory
Every implementation is checked against fastnn.reference before it is timed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as TF

import fastnn
import fastnn.functional as F
from harness import EAGER, Bench

TORCH_CHUNKED = "torch-lce-chunked"  # the goal's second baseline
# Suffixes of the rows that set grad_in_forward against the default (True on the CPU, False on a GPU): fwd+bwd only,
# since a forward with nothing requiring grad is the same either way.
GRAD_IN_FORWARD, RECOMPUTE = "-grad-in-fwd", "-recompute"


def implementations(b: Bench) -> dict:
    def eager(x, w, t):
        return TF.cross_entropy(TF.linear(x, w), t)

    impls = {EAGER: eager}
    if b.compile_ok:
        impls["torch-compile"] = torch.compile(eager, dynamic=False)
    if hasattr(TF, "linear_cross_entropy"):  # torch >= 2.13
        impls["torch-lce-reference"] = lambda x, w, t: TF.linear_cross_entropy(x, w, t)
        chunked = torch.nn.LinearCrossEntropyOptions()
        impls[TORCH_CHUNKED] = lambda x, w, t: TF.linear_cross_entropy(x, w, t, options=chunked)
    backends = ("native", "triton") if b.device == "cuda" else ("native",)
    for backend in backends:
        impls[f"fastnn-{backend}"] = lambda x, w, t, k=backend: F.linear_cross_entropy(x, w, t, backend=k)
    # The path the default does not take: the gradients made in the forward (three products, not four) on a GPU,
    # the recomputing backward on the CPU.
    suffix, gif = (GRAD_IN_FORWARD, True) if b.device == "cuda" else (RECOMPUTE, False)
    for backend in backends:
        impls[f"fastnn-{backend}{suffix}"] = lambda x, w, t, k=backend: F.linear_cross_entropy(
            x, w, t, backend=k, grad_in_forward=gif)
    return impls


def validate(impls: dict, device: str) -> None:
    t = torch.randint(0, 1025, (37,), device=device)
    h, w = torch.randn(37, 64, device=device), torch.randn(1025, 64, device=device) / 8
    ref = fastnn.reference.linear_cross_entropy(h.double(), w.double(), t)
    for name, f in impls.items():
        err = abs(f(h, w, t).item() - ref.item())
        assert err < 1e-4, f"{name} disagrees with the reference: error {err}"


def run_case(b: Bench, impls: dict, N: int, D: int, V: int, tag: str) -> None:
    x = torch.randn(N, D, device=b.device, requires_grad=True)
    w = (torch.randn(V, D, device=b.device) / D ** 0.5).requires_grad_()
    t = torch.randint(0, V, (N,), device=b.device)
    case = f"N={N},D={D},V={V}"
    flops = 2 * N * D * V
    logits = torch.empty(N, V, device="meta")  # the size of the autograd op run between timed calls
    b.compare(case=case, fns={name: forward(f, x.detach(), w.detach(), t) for name, f in impls.items()
                              if not name.endswith((GRAD_IN_FORWARD, RECOMPUTE))},
              like=logits, flops=flops, series=f"linear+CE fwd {tag}", x=V)
    # torch: 3 matmuls; fastnn: 3 with the gradients made in the forward, 4 when the backward recomputes the logits
    b.compare(case=case, fns={name: forward_backward(f, x, w, t) for name, f in impls.items()}, like=logits,
              flops=3 * flops, series=f"linear+CE fwd+bwd {tag}", x=V)


def forward(f, x, w, t):
    return lambda: f(x, w, t)


def forward_backward(f, x, w, t):
    def run():
        f(x, w, t).backward()
        x.grad = w.grad = None

    return run


def versus_chunked(b: Bench) -> None:
    """fastnn's ratios to torch's chunked linear_cross_entropy, time and extra memory, for each case and series."""
    base = {(r["case"], r["series"]): r for r in b.rows if r["impl"] == TORCH_CHUNKED}
    for r in b.rows:
        c = base.get((r["case"], r["series"]))
        if c is None or not r["impl"].startswith("fastnn") or not c["time_ms"] or not c["peak_extra_mb"] or \
                r["peak_extra_mb"] is None:
            continue
        print(f"{r['series']} {r['case']} {r['impl']} vs {TORCH_CHUNKED}: {r['time_ms'] / c['time_ms']:.2f}x time, "
              f"{r['peak_extra_mb'] / c['peak_extra_mb']:.3f}x extra peak memory "
              f"({r['peak_extra_mb']:.1f} vs {c['peak_extra_mb']:.1f} MiB)")


def main():
    b = Bench("linear_cross_entropy")
    impls = implementations(b)
    validate(impls, b.device)
    if "--shapes" in b.extra:
        for D in (64, 512, 1024):
            for V in (1000, 8000, 32000):
                run_case(b, impls, 4096, D, V, f"shapes D={D}")
    elif b.quick:
        run_case(b, impls, 1024, 512, 32000, "goal (quick)")
    else:
        run_case(b, impls, 8192, 512, 32000, "goal")
    b.finish()
    versus_chunked(b)


if __name__ == "__main__":
    main()
