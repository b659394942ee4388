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
    """
    return _softmax.softmax(input, dim, False, dtype, backend)


def log_softmax(input: torch.Tensor, dim: int = -1, dtype: torch.dtype | None = None, *,
                backend: str | None = None) -> torch.Tensor:
    """``torch.nn.functional.log_softmax``: x - logsumexp(x) over ``dim``. Args and Returns as ``softmax``."""
    return _softmax.softmax(input, dim, True, dtype, backend)
