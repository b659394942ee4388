"""Softmax forward and forward+backward: fastnn backends vs torch eager vs torch.compile.

    python bench/bench_softmax.py [--quick] [--goal] [--device cpu|cuda] [--no-compile] [--no-thp]

--goal runs only the goal cases (softmax and log-softmax at 4096 x 32000), no sweep over row lengths.

Row lengths 128 ... 262,144 at a fixed total size (softmax), plus the goal cases 4096 x 32000 float32 (softmax and
log-softmax) (README's goal table:
on a 2-core CPU under the harness's interleaved protocol, fwd+bwd <= 0.8x the fastest torch: eager or compiled,
default allocator or THP_MEM_ALLOC_ENABLE=1). Validates every implementation against fastnn.reference before
timing it.
"""
from __future__ import annotations

import torch

import fastnn
import fastnn.functional as F
from harness import EAGER, Bench, forward_backward


def implementations(b: Bench, log: bool) -> dict:
    torch_fn, ours = (torch.log_softmax, F.log_softmax) if log else (torch.softmax, F.softmax)
    impls = {EAGER: lambda x: torch_fn(x, -1)}
    if b.compile_ok:
        impls["torch-compile"] = torch.compile(lambda x: torch_fn(x, -1), dynamic=False)
    impls["fastnn-native"] = lambda x: ours(x, -1, backend="native")
    if b.device == "cuda":
        impls["fastnn-triton"] = lambda x: ours(x, -1, backend="triton")
    return impls


def validate(impls: dict, device: str, log: bool) -> None:
    x = torch.randn(37, 1025, device=device)
    ref = (fastnn.reference.log_softmax if log else fastnn.reference.softmax)(x.double(), -1)
    for name, f in impls.items():
        err = (f(x).double() - ref).abs().max().item()
        assert err < 1e-5, f"{name} disagrees with the reference: max error {err}"


def forward(f, x):
    return lambda: f(x)


def main():
    b = Bench("softmax")
    impls = {log: implementations(b, log) for log in (False, True)}
    for log in impls:
        validate(impls[log], b.device, log)
    total = 2**22 if b.quick else 2**24  # elements per call on the sweep: past the CPU caches
    lengths = [128, 1024, 8192, 32000, 262144] if b.quick else [128, 512, 1024, 4096, 8192, 32000, 65536, 262144]
    # (rows, n, tag, log): softmax over the sweep; both at the goal case
    cases = [] if "--goal" in b.extra else [(max(1, total // n), n, "sweep", False) for n in lengths]
    rows = 1024 if b.quick and b.device == "cpu" else 4096
    cases += [(rows, 32000, "goal", False), (rows, 32000, "goal log_softmax", True)]
    for rows, n, tag, log in cases:
        x = torch.randn(rows, n, device=b.device)
        g = torch.randn_like(x)  # a dense upstream gradient, as a model's
        case = f"{rows}x{n}"
        nbytes = x.numel() * x.element_size()
        b.compare(case=case, fns={name: forward(f, x) for name, f in impls[log].items()}, like=x, bytes=2 * nbytes,
                  series=f"fwd {tag}", x=n)
        # fwd reads x, writes y; bwd reads dy and y, writes dx
        b.compare(case=case, fns={name: forward_backward(f, (x,), g) for name, f in impls[log].items()}, like=x,
                  bytes=5 * nbytes, series=f"fwd+bwd {tag}", x=n)
        del x, g
    b.finish()


if __name__ == "__main__":
    main()
