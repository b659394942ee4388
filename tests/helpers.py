"""Shared test helpers: which (device, backend) pairs run here, and the comparison rules (docs/reliability.md)."""
from __future__ import annotations

import pytest
import torch

from fastnn.backend import native_has, triton_interpret, triton_status


def device_backends(op: str, reference: bool = False) -> list:
    """pytest params (device, backend) for every backend of ``op``; CUDA ones marked `cuda` (skipped without
    a GPU). The Triton backend on CPU needs the interpreter (tests/conftest.py turns it on without a GPU)."""
    params = []
    for device in ("cpu", "cuda"):
        marks = [pytest.mark.cuda] if device == "cuda" else []
        names = ["native"]
        if triton_status()[0] and (device == "cuda" or triton_interpret()):
            names.append("triton")
        if reference:
            names.append("reference")
        for name in names:
            if device == "cpu" and name == "native" and not native_has(getattr(torch.ops.fastnn, op + "_fwd"), "cpu"):
                continue
            params.append(pytest.param(device, name, marks=marks, id=f"{device}-{name}"))
    return params


def assert_raises_naming(call, exc, words) -> None:
    """call() raises exc with every one of ``words`` (the argument it names, what is wrong) in its message."""
    with pytest.raises(exc) as info:
        call()
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


# Tolerances against a float64 reference for full-precision dtypes.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}
LOW = (torch.float16, torch.bfloat16)


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    a, ref = a.double(), ref.double()
    both_nan = a.isnan() & ref.isnan()
    same_inf = (a == ref) & a.isinf()
    d = (a - ref).abs().masked_fill(both_nan | same_inf, 0)
    return d.max().item()


def assert_matches(out: torch.Tensor, ref64: torch.Tensor, *, torch_out: torch.Tensor | None = None,
                   name: str = "output", atol_floor: float = 1e-6) -> None:
    """out vs a float64 reference. Full precision: TOL. Half types: FlashAttention's rule, error at most 2x
    torch's own error in that dtype (``torch_out``) plus a small floor for when torch is exact."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.equal(out.isnan(), ref64.isnan()), f"{name}: NaN pattern differs from the reference"
    if out.dtype in LOW:
        assert torch_out is not None, "low precision needs torch's own output to compare errors"
        ours, theirs = max_err(out, ref64), max_err(torch_out, ref64)
        assert ours <= 2 * theirs + atol_floor, f"{name}: error {ours:.3g} > 2 x torch's {theirs:.3g}"
    else:
        tol = TOL[out.dtype]
        err = max_err(out, ref64)
        finite = ref64[ref64.isfinite()]  # an all-NaN reference (e.g. "mean" of nothing) must not make the bound NaN
        bound = tol["atol"] + tol["rtol"] * (finite.abs().max().item() if finite.numel() else 0.0)
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def flash_cancel_floor(acc_dtype, scale: float, D: int, qk_max: float, v_max: float, do_max: float = 1.0) -> float:
    """Absolute floor for attention's dQ / dK: 4 ulps (accumulation dtype) of the terms dS = P (dP - delta) cancels,
    |dO| |v| sqrt(D), times |k| (dQ) or |q| (dK) and the scale. With one key the difference is exactly 0 in torch's
    order and ~1 ulp of dP in a flash kernel's, so "2x torch's error" alone would demand bit-equality."""
    return 4 * torch.finfo(acc_dtype).eps * abs(scale) * qk_max * v_max * do_max * D ** 0.5


def flash_delta_bound(name: str, q, k, v, grad_out, dtype, scale: float, attn_mask=None, is_causal=False,
                      key_padding_mask=None) -> float:
    """The error that FlashAttention's backward (and all three fastnn attention backends) carries by design in
    float16 / bfloat16, twice over: delta = rowsum(dO * O) is taken from the output as stored, rounded to the dtype
    (torch's CPU kernel keeps its float32 accumulator). With e the rounding's share of delta per row, it enters
    dS = P (dP - delta) as -P e, so dQ as -scale e (P |K|) and dK as -scale P^T (e |Q|); 0 for other gradients and
    dtypes. q, k, v, grad_out: 4-d (or 3-d unbatched) tensors; masks as fastnn.reference takes them."""
    import fastnn.reference

    if dtype not in LOW or name not in ("q", "k"):
        return 0.0
    q4, k4, v4, do4 = (t.detach().double() if t.dim() == 4 else t.detach().double()[None]
                       for t in (q, k, v, grad_out))
    kpm = key_padding_mask if key_padding_mask is None or key_padding_mask.dim() == 2 else key_padding_mask[None]
    p = fastnn.reference.attention_probs(q4, k4, attn_mask, 0.0, is_causal, scale, kpm)
    o = p @ v4.nan_to_num(0.0, 0.0, 0.0)
    e = (do4 * (o.to(dtype).double() - o)).sum(-1, keepdim=True).nan_to_num(0.0, 0.0, 0.0).abs()
    grow = e * (p @ k4.abs()) if name == "q" else p.transpose(-1, -2) @ (e * q4.abs())
    return 2 * abs(scale) * (grow.nan_to_num(0.0, 0.0, 0.0).max().item() if grow.numel() else 0.0)


def run_cuda_emulator(runner: str, *args: str, timeout: int = 900) -> str:
    """Runs ``tools/cuda_emu/<runner>.py`` with ``args`` (default ``--quick``; CUDA kernels' own source on the CPU;
    skips without g++) and returns its output, after checking that it succeeded."""
    import os
    import shutil
    import subprocess
    import sys

    if shutil.which("g++") is None or shutil.which("nm") is None:
        pytest.skip("no g++ / nm to build the emulator")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "tools", "cuda_emu", f"{runner}.py"), *(args or ("--quick",))],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout
