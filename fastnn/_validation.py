"""Argument checks shared by every public function: a bad call raises a Python error naming the argument and
what was expected, before any kernel runs."""
from __future__ import annotations

import torch

FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_tensor(x, name: str, *, dtypes=FLOATING, ndim=None, fn: str = "fastnn") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{fn}: {name} must have dtype in ({allowed}), got {str(x.dtype).replace('torch.', '')}")
    if ndim is not None and x.dim() not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{fn}: {name} must be {ndim}-dimensional, got shape {tuple(x.shape)}")
    return x


def wrap_dim(dim, ndim: int, *, name: str = "dim", fn: str = "fastnn") -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(dim).__name__}")
    n = max(ndim, 1)  # a 0-d tensor accepts dim 0 and -1, as in torch
    if not -n <= dim < n:
        raise IndexError(f"{fn}: {name} out of range: expected a value in [{-n}, {n - 1}] for a {ndim}-d tensor, got {dim}")
    return dim % n


def check_same_device(fn: str, **tensors) -> None:
    named = {k: v for k, v in tensors.items() if v is not None}
    for k, v in named.items():  # callers may check devices before each argument's own checks
        check_tensor(v, k, dtypes=None, fn=fn)
    devices = {v.device for v in named.values()}
    if len(devices) > 1:
        desc = ", ".join(f"{k} on {v.device}" for k, v in named.items())
        raise ValueError(f"{fn}: tensors must be on the same device, got {desc}")
