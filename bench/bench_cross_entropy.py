"""Cross-entropy, forward and forward+backward: fastnn backends vs torch eager vs torch.compile, time and peak
extra memory. Linear + cross-entropy has its own bench (bench_linear_cross_entropy.py).

    python bench/bench_cross_entropy.py [--quick] [--goal] [--device cpu|cuda] [--no-compile]

--goal runs only the goal case (no sweep over vocabularies).

Goal case (the README's "Benchmarks" table, float32, 2-core CPU):
  N=8192, C=32000: fwd+bwd <= 0.6x torch eager time, <= 0.5x its peak memory
Every implementation is checked against fastnn.reference before it is timed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as TF

import fastnn
import fastnn.functional as F
from harness import EAGER, Bench


def implementations(b: Bench) -> dict:
    impls = {EAGER: TF.cross_entropy}
    if b.compile_ok:
        impls["torch-compile"] = torch.compile(TF.cross_entropy, dynamic=False)
    impls["fastnn-native"] = lambda x, t: F.cross_entropy(x, t, backend="native")
    impls["fastnn-native-inplace"] = lambda x, t: F.cross_entropy(x, t, inplace_backward=True, backend="native")
    impls["fastnn-native-grad-in-fwd"] = lambda x, t: F.cross_entropy(x, t, grad_in_forward=True, backend="native")
    if b.device == "cuda":
        impls["fastnn-triton"] = lambda x, t: F.cross_entropy(x, t, backend="triton")
        impls["fastnn-triton-inplace"] = lambda x, t: F.cross_entropy(x, t, inplace_backward=True, backend="triton")
        impls["fastnn-triton-grad-in-fwd"] = lambda x, t: F.cross_entropy(x, t, grad_in_forward=True,
                                                                          backend="triton")
    return impls


# Variants whose forward alone is their plain twin's (timed in fwd+bwd only).
FWD_BWD_ONLY = ("-inplace", "-grad-in-fwd")


def validate(impls: dict, device: str) -> None:
    x = 3 * torch.randn(37, 1025, device=device)
    t = torch.randint(0, 1025, (37,), device=device)
    xr = x.double().requires_grad_()
    ref = fastnn.reference.cross_entropy(xr, t)
    (ref_dx,) = torch.autograd.grad(ref, xr)
    for name, f in impls.items():
        xg = x.clone().requires_grad_()
        out = f(xg * 1, t)  # a non-leaf, as the in-place variants need
        (dx,) = torch.autograd.grad(out, xg)
        err = max(abs(out.item() - ref.item()), (dx.double() - ref_dx).abs().max().item())
        assert err < 1e-4, f"{name} disagrees with the reference: error {err}"


def run_case(b: Bench, impls: dict, N: int, C: int, tag: str) -> None:
    x = torch.randn(N, C, device=b.device)
    t = torch.randint(0, C, (N,), device=b.device)
    case = f"N={N},C={C}"
    nbytes = x.numel() * x.element_size()
    # fwd reads the logits (the in-place and grad-in-forward variants' forward alone is their plain twins')
    b.compare(case=case, fns={name: forward(f, x, t) for name, f in impls.items() if not name.endswith(FWD_BWD_ONLY)},
              like=x, bytes=nbytes, series=f"CE fwd {tag}", x=C)
    # + bwd reads them again and writes their gradient
    b.compare(case=case, fns={name: forward_backward(f, x, t) for name, f in impls.items()}, like=x,
              bytes=3 * nbytes, series=f"CE fwd+bwd {tag}", x=C)


def forward(f, x, t):
    return lambda: f(x, t)


def forward_backward(f, x, t):
    xg = x.clone().requires_grad_()
    N, C = x.shape

    def run():
        # Through a view, as a model's logits are a non-leaf: a leaf's AccumulateGrad would copy the in-place
        # gradient out of the logits' storage (it aliases the leaf), timing a copy no model makes.
        f(xg.view(N, C), t).backward()
        xg.grad = None

    return run


def main():
    b = Bench("cross_entropy")
    impls = implementations(b)
    validate(impls, b.device)
    if b.quick:
        run_case(b, impls, 1024, 32000, "goal (quick)")
    else:
        for C in () if "--goal" in b.extra else (1024, 8192):  # smaller vocabularies at the same total size
            run_case(b, impls, 8192 * 32000 // C, C, "sweep")
        run_case(b, impls, 8192, 32000, "goal")
    b.finish()


if __name__ == "__main__":
    main()
