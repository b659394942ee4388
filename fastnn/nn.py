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


# ---- binary cross-entropy with logits ----
@_patchable(nn.BCEWithLogitsLoss)
class BCEWithLogitsLoss(nn.Module):
    """``torch.nn.BCEWithLogitsLoss`` on fastnn's fused kernel: same constructor, and ``weight`` / ``pos_weight``
    registered as buffers (None when not given), so ``state_dict`` keys match torch's.

    Shape: input (*), target (*) of the same shape; output (*) for ``reduction="none"``, else a scalar.
    """

    __constants__ = ["reduction"]

    def __init__(self, weight: torch.Tensor | None = None, size_average=None, reduce=None, reduction: str = "mean",
                 pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = nn._reduction.legacy_get_string(size_average, reduce)
        self.reduction = reduction
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(input, target, self.weight, pos_weight=self.pos_weight,
                                                  reduction=self.reduction)

    @classmethod
    def from_torch(cls, module: nn.Module) -> "BCEWithLogitsLoss":
        return cls(module.weight, reduction=module.reduction, pos_weight=module.pos_weight)
