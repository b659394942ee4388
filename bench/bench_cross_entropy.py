"""Cross-entropy and linear + cross-entropy, forward and forward+backward: fastnn backends vs torch eager vs
torch.compile, time and peak extra memory.

    python bench/bench_cross_entropy.py [--quick] [--goal] [--shapes] [--device cpu|cuda] [--no-compile]

--goal runs only the two goal cases (no sweep). --shapes runs only linear + CE at N=4096 over feature sizes and
vocabularies: where the logits are cheap next to the products (large D, small V) the backward's fourth product
costs more than the saved memory traffic gains, and this shows where that turns.

Goal cases (issue 3, float32, 2-core CPU):
  CE N=8192, C=32000:               fwd+bwd <= 0.6x torch eager time, <= 0.5x its peak memory
  linear+CE N=8192, D=512, V=32000: fwd+bwd <= 1.0x torch eager time, extra peak memory <= 0.1x torch's
Every implementation is checked against fastnn.reference before it is timed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as TF

import fastnn
import fastnn.functional as F
from harness import EAGER, Bench


def ce_impls(b: Bench) -> dict:
    impls = {EAGER: TF.cross_entropy}
    if b.compile_ok:
        impls["torch-compile"] = torch.compile(TF.cross_entropy, dynamic=False)
    impls["fastnn-native"] = lambda x, t: F.cross_entropy(x, t, backend="native")
    impls["fastnn-native-inplace"] = lambda x, t: F.cross_entropy(x, t, inplace_backward=True, backend="native")
    if b.device == "cuda":
        impls["fastnn-triton"] = lambda x, t: F.cross_entropy(x, t, backend="triton")
        impls["fastnn-triton-inplace"] = lambda x, t: F.cross_entropy(x, t, inplace_backward=True,
                                                                      backend="triton")
    return impls


def linear_impls(b: Bench) -> dict:
    def eager(x, w, t):
        return TF.cross_entropy(TF.linear(x, w), t)

    impls = {EAGER: eager}
    if b.compile_ok:
        impls["torch-compile"] = torch.compile(eager, dynamic=False)
    impls["fastnn-native"] = lambda x, w, t: F.linear_cross_entropy(x, w, t, backend="native")
    if b.device == "cuda":
        impls["fastnn-triton"] = lambda x, w, t: F.linear_cross_entropy(x, w, t, backend="triton")
    return impls


def validate(ce: dict, lin: dict, device: str) -> None:
    x = 3 * torch.randn(37, 1025, device=device)
    t = torch.randint(0, 1025, (37,), device=device)
    ref = fastnn.reference.cross_entropy(x.double(), t)
    for name, f in ce.items():
        err = abs(f(x.clone(), t).item() - ref.item())
        assert err < 1e-4, f"{name} disagrees with the reference: error {err}"
    h, w = torch.randn(37, 64, device=device), torch.randn(1025, 64, device=device) / 8
    ref = fastnn.reference.linear_cross_entropy(h.double(), w.double(), t)
    for name, f in lin.items():
        err = abs(f(h, w, t).item() - ref.item())
        assert err < 1e-4, f"{name} disagrees with the reference: error {err}"


def bench_ce(b: Bench, impls: dict, N: int, C: int, tag: str) -> None:
    x = torch.randn(N, C, device=b.device)
    t = torch.randint(0, C, (N,), device=b.device)
    xg = x.clone().requires_grad_()
    case = f"N={N},C={C}"
    nbytes = x.numel() * x.element_size()
    for name, f in impls.items():
        if not name.endswith("-inplace"):  # the same forward as its out-of-place twin
            b.run(case=case, impl=name, fn=lambda: f(x, t), bytes=nbytes, series=f"CE fwd {tag}", x=C)

        def fwd_bwd():
            # Through a view, as a model's logits are a non-leaf: a leaf's AccumulateGrad would copy the in-place
            # gradient out of the logits' storage (it aliases the leaf), timing a copy no model makes.
            f(xg.view(N, C), t).backward()
            xg.grad = None

        # fwd reads the logits; bwd reads them again and writes their gradient
        b.run(case=case, impl=name, fn=fwd_bwd, bytes=3 * nbytes, series=f"CE fwd+bwd {tag}", x=C)


def bench_linear(b: Bench, impls: dict, N: int, D: int, V: int, tag: str) -> None:
    x = torch.randn(N, D, device=b.device, requires_grad=True)
    w = (torch.randn(V, D, device=b.device) / D ** 0.5).requires_grad_()
    t = torch.randint(0, V, (N,), device=b.device)
    case = f"N={N},D={D},V={V}"
    flops = 2 * N * D * V
    for name, f in impls.items():
        b.run(case=case, impl=name, fn=lambda: f(x.detach(), w.detach(), t), flops=flops,
              series=f"linear+CE fwd {tag}", x=V)

        def fwd_bwd():
            f(x, w, t).backward()
            x.grad = w.grad = None

        # torch: 3 matmuls; fastnn: 4 (the backward recomputes the logits chunk by chunk)
        b.run(case=case, impl=name, fn=fwd_bwd, flops=3 * flops, series=f"linear+CE fwd+bwd {tag}", x=V)


def main():
    b = Bench("cross_entropy")
    ce, lin = ce_impls(b), linear_impls(b)
    validate(ce, lin, b.device)
    if "--shapes" in b.extra:
        for D in (64, 512, 1024):
            for V in (1000, 8000, 32000):
                bench_linear(b, lin, 4096, D, V, f"shapes D={D}")
    elif b.quick:
        bench_ce(b, ce, 1024, 32000, "goal (quick)")
        bench_linear(b, lin, 1024, 512, 32000, "goal (quick)")
    else:
        for C in () if "--goal" in b.extra else (1024, 8192):  # smaller vocabularies at the same total size
            bench_ce(b, ce, 8192 * 32000 // C, C, "sweep")
        bench_ce(b, ce, 8192, 32000, "goal")
        bench_linear(b, lin, 8192, 512, 32000, "goal")
    b.finish()


if __name__ == "__main__":
    main()
