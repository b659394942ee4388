"""Drop-in ``torch.nn`` twins running fastnn's kernels. Each takes its twin's constructor arguments and has its
``state_dict`` keys, and ``fastnn.patch`` swaps them into an existing model in place."""
from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from . import functional as F

log = logging.getLogger("fastnn")

# torch.nn class -> fastnn twin; each twin implements `from_torch(module)`. Later ops add their modules here.
PATCHABLE: dict[type, type] = {}


def _patchable(torch_cls: type):
    def deco(cls):
        PATCHABLE[torch_cls] = cls
        return cls
    return deco


def _legacy_softmax_dim(ndim: int) -> int:
    # torch.nn.Softmax(dim=None) keeps this old implicit choice (with a warning); a drop-in must match it.
    warnings.warn("Implicit dimension choice for softmax has been deprecated. Change the call to include dim=X "
                  "as an argument.", stacklevel=3)
    return 0 if ndim in (0, 1, 3) else 1


class _SoftmaxBase(nn.Module):
    _log = False
    __constants__ = ["dim"]

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        dim = self.dim if self.dim is not None else _legacy_softmax_dim(input.dim())
        return (F.log_softmax if self._log else F.softmax)(input, dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"

    @classmethod
    def from_torch(cls, module: nn.Module) -> "_SoftmaxBase":
        return cls(module.dim)


@_patchable(nn.Softmax)
class Softmax(_SoftmaxBase):
    """``torch.nn.Softmax(dim)`` on fastnn's fused softmax. Shape: any; output has the input's shape."""


@_patchable(nn.LogSoftmax)
class LogSoftmax(_SoftmaxBase):
    """``torch.nn.LogSoftmax(dim)`` on fastnn's fused log-softmax."""

    _log = True


def patch(model: nn.Module, *, verbose: bool = True) -> nn.Module:
    """Replaces, in place, every submodule whose type is a supported ``torch.nn`` class (exactly; subclasses are
    left alone, since they may override forward) with its fastnn twin, keeping parameters, buffers and
    train/eval mode.

    Returns the model (the twin itself if ``model`` is a supported module). The replaced names are logged to
    the "fastnn" logger and, with ``verbose``, printed one summary line.
    """
    replaced: list[str] = []

    def swap(module: nn.Module) -> nn.Module:
        twin_cls = PATCHABLE.get(type(module))
        if twin_cls is None:
            return module
        twin = twin_cls.from_torch(module)
        twin.train(module.training)
        return twin

    if type(model) in PATCHABLE:
        replaced.append(f"<root> ({type(model).__name__})")
        model = swap(model)
    else:
        for parent_name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                new = swap(child)
                if new is not child:
                    setattr(parent, child_name, new)
                    replaced.append(f"{parent_name + '.' if parent_name else ''}{child_name} ({type(child).__name__})")
    for name in replaced:
        log.info("fastnn.patch: replaced %s", name)
    if verbose:
        print(f"fastnn.patch: replaced {len(replaced)} module(s)" + (": " + ", ".join(replaced) if replaced else ""))
    return model


# ---- CrossEntropyLoss / LinearCrossEntropyLoss (losses helper) BEGIN -----------------------------------------------

@_patchable(nn.CrossEntropyLoss)
class CrossEntropyLoss(nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` (same constructor, ``weight`` buffer and ``state_dict``) on fastnn's fused
    cross-entropy. ``inplace_backward=True`` writes the logits' gradient over the logits (see
    ``fastnn.functional.cross_entropy`` for the contract). Shapes: input (N, C), (N, C, d...) or (C,)."""

    def __init__(self, weight: torch.Tensor | None = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 inplace_backward: bool = False) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.inplace_backward = inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                               label_smoothing=self.label_smoothing, inplace_backward=self.inplace_backward)

    @classmethod
    def from_torch(cls, module: nn.CrossEntropyLoss) -> "CrossEntropyLoss":
        return cls(module.weight, ignore_index=module.ignore_index, reduction=module.reduction,
                   label_smoothing=module.label_smoothing)


class LinearCrossEntropyLoss(nn.Module):
    """An output projection fused with its cross-entropy loss: ``loss = cross_entropy(input @ weight.T + bias,
    target)`` without the (N, V) logits (``fastnn.functional.linear_cross_entropy``). Parameters and
    ``state_dict`` keys are ``nn.Linear(in_features, out_features, bias)``'s: ``weight`` (V, D), ``bias`` (V,).

    As a model's output layer + loss, replacing its ``nn.Linear`` head (the same weight tensor, so tied
    embeddings and optimizers keep working)::

        head = fastnn.nn.LinearCrossEntropyLoss.from_linear(model.generator, ignore_index=pad_id,
                                                            label_smoothing=0.1)
        loss = head(hidden, target)        # training: hidden (..., D), target (...)
        logits = head.logits(hidden)       # decoding: the plain linear layer

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        class_weight: optional (V,) per-class loss weight (a buffer, ``CrossEntropyLoss``'s ``weight``).
        ignore_index, reduction, label_smoothing: as ``nn.CrossEntropyLoss``.
        chunk_size: rows per chunk (default: a 64 MiB logits buffer).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 class_weight: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, chunk_size: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        lin = nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features
        self.weight = lin.weight
        self.bias = lin.bias
        self.register_buffer("class_weight", class_weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.chunk_size = chunk_size

    @classmethod
    def from_linear(cls, linear: nn.Linear, **loss_kwargs) -> "LinearCrossEntropyLoss":
        """A loss head sharing ``linear``'s weight and bias Parameters (not copies)."""
        head = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", **loss_kwargs)
        head.weight = linear.weight
        head.bias = linear.bias
        return head

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.linear_cross_entropy(input, self.weight, target, self.bias, self.ignore_index, self.reduction,
                                      self.label_smoothing, class_weight=self.class_weight,
                                      chunk_size=self.chunk_size)

    def logits(self, input: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction}, "
                f"label_smoothing={self.label_smoothing}")

# ---- CrossEntropyLoss / LinearCrossEntropyLoss (losses helper) END -------------------------------------------------
