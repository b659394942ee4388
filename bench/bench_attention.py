"""Scaled dot-product attention, forward and forward+backward: fastnn backends vs torch SDPA (eager) vs the
textbook attention layer that materializes the scores, matmul -> softmax -> matmul (eager and torch.compile).

    python bench/bench_attention.py [--quick] [--goal] [--device cpu|cuda] [--no-compile] [--no-thp]

--goal: on CPU only the goal case, not the memory series.

CPU goal (README, "Benchmarks"): B=8, H=8, L=512, D=64, causal, float32, fwd+bwd: <= 1.0x torch SDPA ("vs eager"
column) and >= 3x faster than matmul -> softmax -> matmul; peak extra memory over L = 512 ... 8192 grows
linearly for fastnn (matmul -> softmax -> matmul's grows as L^2). GPU (only when CUDA exists): TFLOP/s at
D = 64/128, L = 512 ... 16k, causal and not, bf16, against torch SDPA's flash and cuDNN backends; forward FLOPs
4*B*H*Lq*Lk*D (halved when causal), backward 2.5x forward.
"""
from __future__ import annotations

import contextlib

import torch

import fastnn
import fastnn.functional as F
from harness import EAGER, Bench, forward_backward

MATMUL_SOFTMAX = "matmul-softmax-matmul"


def matmul_softmax_matmul(q, k, v, is_causal):
    """Attention as the textbook layer writes it: the full L x L score and probability matrices."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if is_causal:
        L = s.shape[-1]
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def torch_sdpa(backend=None):
    def f(q, k, v, is_causal):
        ctx = contextlib.nullcontext()
        if backend is not None:
            from torch.nn.attention import sdpa_kernel

            ctx = sdpa_kernel(backend)
        with ctx:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    return f


def implementations(b: Bench) -> dict:
    impls = {EAGER: torch_sdpa()}  # torch SDPA: on CPU its fused flash kernel
    if b.device == "cuda":
        from torch.nn.attention import SDPBackend

        impls = {"torch-flash": torch_sdpa(SDPBackend.FLASH_ATTENTION),
                 "torch-cudnn": torch_sdpa(SDPBackend.CUDNN_ATTENTION),
                 EAGER: torch_sdpa()}
        impls["fastnn-triton"] = lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c,
                                                                                   backend="triton")
    impls["fastnn-native"] = lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c,
                                                                               backend="native")
    impls[MATMUL_SOFTMAX] = matmul_softmax_matmul
    if b.compile_ok:
        impls[f"{MATMUL_SOFTMAX}-compiled"] = torch.compile(matmul_softmax_matmul, dynamic=False)
    return impls


def validate(impls: dict, device: str, dtype: torch.dtype) -> None:
    q, k, v = (torch.randn(2, 3, 97, 64, device=device, dtype=dtype) for _ in range(3))
    ref = fastnn.reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, f in impls.items():
        err = (f(q, k, v, True).double() - ref).abs().max().item()
        assert err < tol, f"{name} disagrees with the reference: max error {err}"


def run_case(b: Bench, impls: dict, B, H, L, D, causal, dtype, series, only=None):
    q, k, v = (torch.randn(B, H, L, D, device=b.device, dtype=dtype) for _ in range(3))
    g = torch.randn_like(q)
    flops = 4 * B * H * L * L * D / (2 if causal else 1)
    case = f"B={B},H={H},L={L},D={D}" + (",causal" if causal else "")
    dt = str(dtype).replace("torch.", "")
    chosen = {name: f for name, f in impls.items() if only is None or name in only}
    b.compare(case=case, fns={name: forward(f, q, k, v, causal) for name, f in chosen.items()}, like=q,
              flops=flops, dtype=dt, series=f"fwd {series}", x=L)
    b.compare(case=case, fns={name: forward_backward(f, (q, k, v), g, causal) for name, f in chosen.items()}, like=q,
              flops=3.5 * flops, dtype=dt, series=f"fwd+bwd {series}", x=L)


def forward(f, q, k, v, causal):
    return lambda: f(q, k, v, causal)


def main():
    b = Bench("attention")
    impls = implementations(b)
    if b.device == "cpu":
        validate(impls, "cpu", torch.float32)
        # The goal case.
        run_case(b, impls, 8, 8, 512, 64, True, torch.float32, "goal")
        # Memory vs L: fastnn's extra memory is O(L) (q, k, v grads, stats), matmul -> softmax -> matmul's O(L^2).
        Ls = [512, 1024, 2048, 4096] if b.quick else [512, 1024, 2048, 4096, 8192]
        for L in [] if "--goal" in b.extra else Ls:
            only = {"fastnn-native", EAGER} | ({MATMUL_SOFTMAX} if L <= 4096 else set())
            run_case(b, impls, 1, 8, L, 64, True, torch.float32, "memory", only=only)
    else:
        validate(impls, "cuda", torch.bfloat16)
        Ls = [512, 2048, 8192] if b.quick else [512, 1024, 2048, 4096, 8192, 16384]
        for D in (64, 128):
            for causal in (False, True):
                for L in Ls:
                    B, H = max(1, 16384 // L), 2048 // D
                    run_case(b, impls, B, H, L, D, causal, torch.bfloat16, f"D={D}{' causal' if causal else ''}",
                             only={"torch-flash", "torch-cudnn", EAGER, "fastnn-triton", "fastnn-native"}
                             if L <= 4096 else {"torch-flash", "torch-cudnn", "fastnn-triton"})
    b.finish()


if __name__ == "__main__":
    main()
