"""fastnn's fused ops with ``torch.nn.functional`` signatures. Every function also takes a keyword-only
``backend`` ("auto", "native", "triton", "reference"); see ``fastnn.use_backend``."""
from __future__ import annotations

import torch

from .ops import softmax as _softmax


def softmax(input: torch.Tensor, dim: int = -1, dtype: torch.dtype | None = None, *,
            backend: str | None = None) -> torch.Tensor:
    """``torch.nn.functional.softmax``: exp(x) / sum(exp(x)) over ``dim``, computed stably.

    Args:
        input: tensor of any shape; float32, float64, float16 or bfloat16 (half types accumulate in float32).
        dim: dimension to normalize over.
        dtype: cast ``input`` to this dtype first.
    Returns:
        Tensor of ``input``'s shape.
    Raises:
        TypeError: ``input`` not a floating tensor (integer, bool, complex), or ``dim`` not an int.
        IndexError: ``dim`` out of range for ``input``'s rank.
        NaN/Inf, 0-d, zero-size and any strides (transposed, expanded, channels-last) give torch's result.
    """
    return _softmax.softmax(input, dim, False, dtype, backend)


def log_softmax(input: torch.Tensor, dim: int = -1, dtype: torch.dtype | None = None, *,
                backend: str | None = None) -> torch.Tensor:
    """``torch.nn.functional.log_softmax``: x - logsumexp(x) over ``dim``. Args, Returns and Raises as
    ``softmax``."""
    return _softmax.softmax(input, dim, True, dtype, backend)


# ---- binary cross-entropy with logits ----
from .ops import bce_with_logits as _bce  # noqa: E402


def binary_cross_entropy_with_logits(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                                     size_average: bool | None = None, reduce: bool | None = None,
                                     reduction: str = "mean", pos_weight: torch.Tensor | None = None, *,
                                     backend: str | None = None) -> torch.Tensor:
    """``torch.nn.functional.binary_cross_entropy_with_logits``: sigmoid + binary cross-entropy in one fused,
    stable pass, ``weight * ((1 - y) * x + (1 + (pos_weight - 1) * y) * log(1 + exp(-x)))``.

    Args:
        input: logits, any shape; float32, float64, float16 or bfloat16.
        target: input's shape and dtype; soft targets in [0, 1] allowed. Gets a gradient if it requires one.
        weight: per-element rescaling, broadcastable to input's shape.
        size_average, reduce: deprecated, as in torch (they override ``reduction``).
        reduction: "none", "mean" or "sum".
        pos_weight: weight of positive examples, broadcastable to input's shape (usually (C,) along the last dim).
    Returns:
        input's shape for ``reduction="none"``, else a 0-d tensor.
    Raises:
        TypeError: a non-floating input/target/weight/pos_weight, or one whose dtype differs from input's.
        ValueError: target's shape differs from input's (torch's message), weight or pos_weight not
            broadcastable to input's shape, an unknown ``reduction``, or tensors on different devices.
        RuntimeError: weight or pos_weight requiring grad (not differentiable, as in torch).
        NaN/Inf anywhere, targets outside [0, 1], 0-d, zero-size ("mean" gives NaN) and any strides give
        torch's result.
    """
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    return _bce.bce_with_logits(input, target, weight, reduction, pos_weight, backend)


# ---- LSTM

def lstm_cell(input: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None, w_ih: torch.Tensor,
              w_hh: torch.Tensor, b_ih: torch.Tensor | None = None, b_hh: torch.Tensor | None = None, *,
              backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of ``torch.nn.LSTMCell`` (gate order i, f, g, o): the two products on BLAS, the rest one fused
    kernel forward and one backward.

    Args:
        input: [B, I], or [I] unbatched.
        hx: (h, c), each [B, H] ([H] unbatched), or None for zeros.
        w_ih: [4H, I];  w_hh: [4H, H];  b_ih, b_hh: [4H] or None.
    Returns:
        (h', c'), each [B, H] ([H] unbatched).
    Raises:
        TypeError / ValueError naming the argument (input, w_ih, w_hh, b_ih, b_hh, hx): see
        ``fastnn.ops.lstm.lstm_cell``. NaN/Inf, a zero batch and any strides give torch's result.
    """
    from .ops import lstm as _lstm

    return _lstm.lstm_cell(input, hx, w_ih, w_hh, b_ih, b_hh, backend)
