"""Drop-in ``torch.nn`` twins running fastnn's kernels. Each takes its twin's constructor arguments and has its
``state_dict`` keys, and ``fastnn.patch`` swaps them into an existing model in place."""
from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn

from . import functional as F
from ._validation import FLOATING, check_same_device
from ._validation import check_tensor as _check_tensor
from .ops.attention import attention_with_weights, multihead_attention_masks

log = logging.getLogger("fastnn")

# torch.nn class -> fastnn twin; each twin implements `from_torch(module)`.
PATCHABLE: dict[type, type] = {}


def _patchable(torch_cls: type):
    def deco(cls):
        PATCHABLE[torch_cls] = cls
        return cls
    return deco


# The twins of torch's softmax modules and BCEWithLogitsLoss subclass them (constructor, buffers, extra_repr and
# isinstance checks as torch's) and replace only forward.
@_patchable(nn.Softmax)
class Softmax(nn.Softmax):
    """``torch.nn.Softmax(dim)`` on fastnn's fused softmax. Shape: any; output has the input's shape.

    Raises: as ``fastnn.functional.softmax`` (TypeError for a non-floating input, IndexError for ``dim`` out of
    range); NaN/Inf, zero-size and any strides give torch's result."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # dim None: torch's implicit choice, warned about from the module's caller (torch's stack level too).
        return F.softmax(input, self.dim, _stacklevel=5)

    @classmethod
    def from_torch(cls, module: nn.Module) -> "Softmax":
        return cls(module.dim)


@_patchable(nn.LogSoftmax)
class LogSoftmax(nn.LogSoftmax):
    """``torch.nn.LogSoftmax(dim)`` on fastnn's fused log-softmax. Shape and Raises: as ``Softmax``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(input, self.dim, _stacklevel=5)

    @classmethod
    def from_torch(cls, module: nn.Module) -> "LogSoftmax":
        return cls(module.dim)


def patch(model: nn.Module, *, verbose: bool = True) -> nn.Module:
    """Replaces, in place, every submodule whose type is a supported ``torch.nn`` class (exactly; subclasses are
    left alone, since they may override forward) with its fastnn twin, keeping parameters, buffers and
    train/eval mode.

    Every twin is built before the model is changed, so a failure leaves the model as it was. A module in a
    configuration its twin cannot run (its ``from_torch`` raises NotImplementedError, ValueError or TypeError) is
    left as the torch module and named in the report, never an error.

    Returns the model (the twin itself if ``model`` is a supported module). The replaced and the kept names are
    logged to the "fastnn" logger and, with ``verbose``, printed in one summary line.
    """
    swaps: list[tuple[nn.Module | None, str, str, nn.Module]] = []  # (parent, attribute, report name, twin)
    kept: list[str] = []
    twins: dict[int, nn.Module | None] = {}  # a module shared by two parents gets one twin

    def plan(parent: nn.Module | None, attr: str, name: str, module: nn.Module) -> None:
        """Plans the swap of `module`, or else looks for candidates among its children (a twin brings its own)."""
        twin_cls = PATCHABLE.get(type(module))
        if twin_cls is not None and id(module) not in twins:
            try:
                twins[id(module)] = twin_cls.from_torch(module).train(module.training)
            except (NotImplementedError, ValueError, TypeError) as e:
                twins[id(module)] = None
                kept.append(f"{name} ({type(module).__name__}: {e})")
        if twins.get(id(module)) is not None:
            swaps.append((parent, attr, f"{name} ({type(module).__name__})", twins[id(module)]))
            return
        for child_name, child in module.named_children():
            plan(module, child_name, child_name if parent is None else f"{name}.{child_name}", child)

    plan(None, "", "<root>", model)
    for parent, attr, _, twin in swaps:
        if parent is None:
            model = twin
        else:
            setattr(parent, attr, twin)
    replaced = [name for _, _, name, _ in swaps]
    for name in replaced:
        log.info("fastnn.patch: replaced %s", name)
    for name in kept:
        log.info("fastnn.patch: kept the torch module %s", name)
    if verbose:
        line = f"fastnn.patch: replaced {len(replaced)} module(s)" + (": " + ", ".join(replaced) if replaced else "")
        if kept:
            line += f"; kept {len(kept)} torch module(s) fastnn cannot run: " + ", ".join(kept)
        print(line)
    return model


# ---- binary cross-entropy with logits ----------------------------------------------------------------------------
@_patchable(nn.BCEWithLogitsLoss)
class BCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    """``torch.nn.BCEWithLogitsLoss`` on fastnn's fused kernel: torch's constructor, with ``weight`` and
    ``pos_weight`` as buffers (None when not given), so ``state_dict`` keys match torch's.

    Shape: input (*), target (*) of the same shape; output (*) for ``reduction="none"``, else a scalar.

    Raises: as ``fastnn.functional.binary_cross_entropy_with_logits`` (TypeError / ValueError naming input,
    target, weight, pos_weight or reduction).
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(input, target, self.weight, pos_weight=self.pos_weight,
                                                  reduction=self.reduction)

    @classmethod
    def from_torch(cls, module: nn.Module) -> "BCEWithLogitsLoss":
        return cls(module.weight, reduction=module.reduction, pos_weight=module.pos_weight)


# ---- LSTM ------------------------------------------------------------------------------------------------------
# The twins subclass their torch.nn classes for the constructor, parameter names, initialization and extra_repr,
# and replace only forward.


def _share_parameters(twin: nn.Module, module: nn.Module) -> nn.Module:
    # The twin takes the module's own Parameter objects (not copies), so an optimizer built before patching
    # keeps training the patched model.
    for name, p in module.named_parameters(recurse=False):
        setattr(twin, name, p)
    return twin


@_patchable(nn.LSTMCell)
class LSTMCell(nn.LSTMCell):
    """``torch.nn.LSTMCell(input_size, hidden_size, bias=True)`` on fastnn's fused cell.

    Shapes: input [B, I] or [I]; hx (h, c) of [B, H] or [H], or None -> (h', c').

    Raises: as ``fastnn.functional.lstm_cell`` (TypeError / ValueError naming input or hx, e.g. a wrong feature
    size, batch, dtype or device; a wrong feature size in torch's words, "input has inconsistent input_size: got
    11 expected 10", as a ValueError where torch raises a RuntimeError); NaN/Inf, a zero batch and any strides give
    torch's result.
    """

    def forward(self, input: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None):
        return F.lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)

    @classmethod
    def from_torch(cls, module: nn.LSTMCell) -> "LSTMCell":
        twin = cls(module.input_size, module.hidden_size, module.bias, device="meta")
        return _share_parameters(twin, module)


@_patchable(nn.LSTM)
class LSTM(nn.LSTM):
    """``torch.nn.LSTM`` (input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, proj_size=0) on fastnn's LSTM kernels, with torch's parameter names (``weight_ih_l0``,
    ``weight_hh_l0_reverse``, ``weight_hr_l0``, ...) so a torch ``state_dict`` loads unchanged.

    proj_size = P > 0 is torch's LSTM with projections: h_t = (o_t * tanh(c_t)) W_hr^T has P features (h0, h_n
    and the output too), c stays H. Such a layer runs a per-step loop over the fused cell and the projection's
    product on every backend (the one-call native layer has no projection), so it is slower than proj_size=0.

    forward converts its input (a ``PackedSequence``, batch_first, unbatched) to a padded [T, B, I] batch and runs
    ``fastnn.functional.lstm`` on the module's parameters.

    forward(input, hx=None, *, lengths=None):
        input: [T, B, I] ([B, T, I] with batch_first), [T, I] unbatched, or a ``PackedSequence``.
        hx: (h0 [num_layers * num_directions, B, R], c0 [num_layers * num_directions, B, H]), R = proj_size
            if proj_size > 0 else H, or None for zeros.
        lengths: optional int [B]: valid steps of each padded sequence; steps past it leave the states alone
            and give zero outputs (as a PackedSequence would).
    Returns:
        (output [T, B, D*R] (or a PackedSequence for one), (h_n [num_layers * D, B, R], c_n [num_layers * D,
        B, H])).
    Raises:
        TypeError: input not a floating tensor or not of the parameters' dtype; hx not a pair of tensors of
            input's dtype and device.
        ValueError: input not 2-d or 3-d, T = 0, input_size mismatch, hx of the wrong shape, lengths not integers
            of shape (B,) in [0, T], or lengths together with a PackedSequence.
        NaN/Inf, a zero batch and any strides give torch's result.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device=device, dtype=dtype)

    def forward(self, input, hx=None, *, lengths=None):
        fn = "fastnn.nn.LSTM"
        packed = isinstance(input, nn.utils.rnn.PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError(f"{fn}: pass lengths or a PackedSequence, not both")
            x, lengths = nn.utils.rnn.pad_packed_sequence(input)  # original batch order
        else:
            x = input
            _check_tensor(x, "input", ndim=(2, 3), fn=fn)
            if self.batch_first and x.dim() == 3:
                x = x.transpose(0, 1)
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
            hx = self._batch_states(hx, fn)
        params = [getattr(self, name) for name in self._flat_weights_names]  # current under functional_call too
        out, (h_n, c_n) = F.lstm(x, hx, params, self.num_layers, bias=self.bias, dropout=self.dropout,
                                 training=self.training, bidirectional=self.bidirectional, lengths=lengths)
        if packed:
            si = input.sorted_indices
            out_sorted = out if si is None else out.index_select(1, si)
            sorted_len = lengths if si is None else lengths[si.cpu()]
            data = nn.utils.rnn.pack_padded_sequence(out_sorted, sorted_len, enforce_sorted=True).data
            return nn.utils.rnn.PackedSequence(data, input.batch_sizes, si, input.unsorted_indices), (h_n, c_n)
        if unbatched:
            return out.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, (h_n, c_n)

    def _batch_states(self, hx, fn):
        # Unbatched input takes states of (num_layers * num_directions, hidden_size): a batch of one for F.lstm.
        # Anything but a pair of tensors goes on unchanged for F.lstm to name.
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            return hx
        LD = self.num_layers * (2 if self.bidirectional else 1)
        sizes = ("proj_size", self.proj_size) if self.proj_size else ("hidden_size", self.hidden_size)
        for name, s, (size, n) in zip(("hx[0] (h0)", "hx[1] (c0)"), hx, (sizes, ("hidden_size", self.hidden_size))):
            if isinstance(s, torch.Tensor) and tuple(s.shape) != (LD, n):
                raise ValueError(f"{fn}: {name} must have shape {(LD, n)} (num_layers * num_directions, {size}) "
                                 f"for unbatched input, got {tuple(s.shape)}")
        return tuple(s.unsqueeze(1) if isinstance(s, torch.Tensor) else s for s in hx)

    @classmethod
    def from_torch(cls, module: nn.LSTM) -> "LSTM":
        twin = cls(module.input_size, module.hidden_size, module.num_layers, module.bias, module.batch_first,
                   module.dropout, module.bidirectional, module.proj_size, device="meta")
        return _share_parameters(twin, module)


# ---- cross-entropy and linear + cross-entropy ---------------------------------------------------------------------

@_patchable(nn.CrossEntropyLoss)
class CrossEntropyLoss(nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` (same constructor, ``weight`` buffer and ``state_dict``) on fastnn's fused
    cross-entropy. ``inplace_backward=True`` writes the logits' gradient over the logits (see
    ``fastnn.functional.cross_entropy`` for the contract); ``grad_in_forward=True`` computes it in the forward
    (same page). Shapes: input (N, C), (N, C, d...) or (C,).

    Raises: as ``fastnn.functional.cross_entropy`` (TypeError / ValueError / IndexError naming input, target,
    weight, ignore_index, reduction or label_smoothing)."""

    def __init__(self, weight: torch.Tensor | None = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 inplace_backward: bool = False, grad_in_forward: bool = False) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.inplace_backward = inplace_backward
        self.grad_in_forward = grad_in_forward

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                               label_smoothing=self.label_smoothing, inplace_backward=self.inplace_backward,
                               grad_in_forward=self.grad_in_forward)

    @classmethod
    def from_torch(cls, module: nn.CrossEntropyLoss) -> "CrossEntropyLoss":
        return cls(module.weight, ignore_index=module.ignore_index, reduction=module.reduction,
                   label_smoothing=module.label_smoothing)


_TorchLinearCrossEntropyLoss = getattr(nn, "LinearCrossEntropyLoss", None)  # torch >= 2.13


if _TorchLinearCrossEntropyLoss is not None:
    _LinearCrossEntropyBase = _TorchLinearCrossEntropyLoss
else:
    class _LinearCrossEntropyBase(nn.modules.loss._WeightedLoss):
        """torch 2.13's ``nn.LinearCrossEntropyLoss`` constructor, attributes and ``state_dict`` for older torch."""

        __constants__ = ["num_classes", "out_features", "reduction", "ignore_index", "label_smoothing"]

        def __init__(self, in_features: int, num_classes: int, *, out_features: tuple[int, ...] = (),
                     bias: bool = False, device=None, dtype=None, reduction: str = "mean",
                     weight: torch.Tensor | None = None, ignore_index: int | None = None,
                     label_smoothing: float = 0.0, options=None) -> None:
            if weight is not None and weight.shape != (num_classes,):
                raise RuntimeError(f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
            if label_smoothing < 0 or label_smoothing > 1.0:
                raise RuntimeError(f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
            super().__init__(weight=weight, size_average=None, reduce=None, reduction=reduction)
            self.num_classes, self.out_features = num_classes, out_features
            self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
            self.linear = nn.Linear(in_features, math.prod(out_features, start=num_classes), bias=bias,
                                    device=device, dtype=dtype)
            self.options = options

        def extra_repr(self) -> str:
            return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                    f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
                    f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
                    f"label_smoothing={self.label_smoothing}, options={self.options}")


class LinearCrossEntropyLoss(_LinearCrossEntropyBase):
    """``torch.nn.LinearCrossEntropyLoss`` (torch 2.13's constructor, attributes and ``state_dict``: ``linear.weight``
    (C * prod(out_features), D), ``linear.bias``, the class ``weight`` buffer; a subclass of torch's class where
    torch has it, a standalone twin elsewhere) on ``fastnn.functional.linear_cross_entropy``: the output projection
    fused with its loss, never materializing the (N, C) logits, whatever ``options`` is. ``fastnn.patch`` swaps
    torch's module for it (sharing its ``linear`` submodule and ``weight`` buffer).

    As an existing model's output layer + loss (the same ``nn.Linear`` module, so tied embeddings and optimizers
    keep working)::

        head = fastnn.nn.LinearCrossEntropyLoss.from_linear(model.generator, ignore_index=pad_id,
                                                            label_smoothing=0.1)
        loss = head(hidden, target)        # training: hidden (..., D), target (...)
        logits = head.logits(hidden)       # decoding: the plain linear layer

    Args:
        in_features, num_classes, out_features, bias, device, dtype, reduction, weight, ignore_index,
        label_smoothing, options: as ``torch.nn.LinearCrossEntropyLoss`` (``bias`` defaults to False, as there;
            ``ignore_index=None`` means -100).
        chunk_size: fastnn's extra, rows per chunk (``options.batch_chunk_size`` does the same).
        grad_in_forward: fastnn's extra, ``fastnn.functional.linear_cross_entropy``'s (gradients computed in the
            forward: three products a chunk instead of four). None (default): that function's default in
            training mode, False in ``eval()`` mode, where a loss is seldom differentiated.
    Shapes: input (N, D) or (D,) (any (..., D) for class indices without ``out_features``); target class indices
        ``input.shape[:-1] + out_features`` or probabilities ``input.shape[:-1] + (C,) + out_features``.
    Raises:
        As ``fastnn.functional.linear_cross_entropy`` (TypeError / ValueError / IndexError naming input, target,
        linear_weight, linear_bias, weight, chunk_size, options, reduction or label_smoothing).
    """

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple[int, ...] = (),
                 bias: bool = False, device=None, dtype=None, reduction: str = "mean",
                 weight: torch.Tensor | None = None, ignore_index: int | None = None, label_smoothing: float = 0.0,
                 options=None, chunk_size: int | None = None, grad_in_forward: bool | None = None) -> None:
        super().__init__(in_features, num_classes, out_features=out_features, bias=bias, device=device,
                         dtype=dtype, reduction=reduction, weight=weight, ignore_index=ignore_index,
                         label_smoothing=label_smoothing, options=options)
        self.chunk_size = chunk_size
        self.grad_in_forward = grad_in_forward

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, out_features: tuple[int, ...] = (),
                    **loss_kwargs) -> "LinearCrossEntropyLoss":
        """A loss head whose ``linear`` is ``linear`` itself (its weight and bias Parameters, not copies);
        ``num_classes`` is ``linear.out_features / prod(out_features)``."""
        P = math.prod(out_features)
        if P < 1 or linear.out_features % P:
            raise ValueError(f"from_linear: linear.out_features={linear.out_features} is not num_classes x "
                             f"prod(out_features={tuple(out_features)})")
        head = cls(linear.in_features, linear.out_features // P, out_features=out_features,
                   bias=linear.bias is not None, device="meta", **loss_kwargs)
        head.linear = linear
        return head

    @classmethod
    def from_torch(cls, module: nn.Module) -> "LinearCrossEntropyLoss":
        """The twin of a ``torch.nn.LinearCrossEntropyLoss``, sharing its ``linear`` submodule and ``weight``."""
        head = cls.from_linear(module.linear, out_features=module.out_features, reduction=module.reduction,
                               weight=module.weight, ignore_index=module.ignore_index,
                               label_smoothing=module.label_smoothing, options=module.options)
        if head.num_classes != module.num_classes:
            raise ValueError(f"from_torch: num_classes={module.num_classes} does not match linear.out_features="
                             f"{module.linear.out_features} and out_features={module.out_features}")
        return head

    def _projection(self):
        # torch's reshape of the flat linear.weight (C * prod(out_features), D) to (C, d1, ..., dK, D); one that
        # does not fit goes on as it is, for linear_cross_entropy to name.
        w, b = self.linear.weight, self.linear.bias
        if not self.out_features:
            return w, b
        shape = (self.num_classes, *self.out_features)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == math.prod(shape):
            w = w.reshape(*shape, w.shape[1])
        if isinstance(b, torch.Tensor) and b.numel() == math.prod(shape):
            b = b.reshape(shape)
        return w, b

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        linear_weight, linear_bias = self._projection()
        return F.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
                                      reduction=self.reduction, ignore_index=self.ignore_index,
                                      label_smoothing=self.label_smoothing, options=self.options,
                                      chunk_size=self.chunk_size,
                                      grad_in_forward=(self.grad_in_forward if self.grad_in_forward is not None
                                                       else None if self.training else False))

    def logits(self, input: torch.Tensor) -> torch.Tensor:
        """The logits the loss never builds: ``linear(input)``, (..., C) or (N, C, d1, ..., dK)."""
        out = self.linear(input)
        return out.reshape(*input.shape[:-1], self.num_classes, *self.out_features) if self.out_features else out


if _TorchLinearCrossEntropyLoss is not None:
    PATCHABLE[_TorchLinearCrossEntropyLoss] = LinearCrossEntropyLoss


# ---- attention -------------------------------------------------------------------------------------------------

@_patchable(nn.MultiheadAttention)
class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` on fastnn's fused attention. A subclass that replaces only ``forward``: the
    constructor, defaults, parameters, ``state_dict`` keys, initialization and every other attribute and method
    (``merge_masks``, ``_qkv_same_embed_dim``, ...) are torch's, so torch's Transformer layers, which read them,
    take it unchanged. ``from_torch`` shares the module's Parameter objects (an optimizer built before
    ``fastnn.patch`` keeps training the patched model).

    Differences from torch, all deliberate:
      * a query row whose keys are all masked outputs zeros with zero gradients (torch 2.13 on CPU:
        zeros with need_weights=False, NaN with need_weights=True and on its inference fast path - eval,
        no_grad, batch_first self-attention - so also in a TransformerDecoderLayer whose target sequence is
        all padding);
      * ``need_weights=True`` (torch's default) materializes the (N, H, L, S) attention matrix on a separate,
        slower path; pass ``need_weights=False`` for the fused kernel (what torch's Transformer layers do);
      * ``is_causal=True`` needs no ``attn_mask`` (torch requires one as a hint). As in torch, the hint replaces
        ``attn_mask`` by the in-kernel causal mask only when ``need_weights=False`` and there is no
        ``key_padding_mask``; otherwise ``attn_mask`` is applied as given;
      * a nested tensor input takes torch's forward (torch runs nested tensors on its fast path only, in eval
        under no_grad, and raises elsewhere).

    Inside an unpatched ``nn.TransformerEncoderLayer``, torch's inference fast path reads this module's weights
    and runs torch's fused layer instead of calling it; ``fastnn.patch`` also swaps the layer
    (``fastnn.nn.TransformerEncoderLayer``), so that fastnn's kernel runs there too.

    Shapes: query (L, N, E) ((N, L, E) with batch_first, (L, E) unbatched), key (S, N, kdim), value (S, N, vdim);
    key_padding_mask (N, S) bool (True = ignore) or float (added); attn_mask (L, S) or (N * num_heads, L, S),
    bool (True = NOT allowed, torch's convention) or float (added). Returns (output like query, weights
    (N, L, S) averaged over heads or (N, H, L, S), or None).

    Raises:
        ValueError (constructor): embed_dim or num_heads not positive, embed_dim not divisible by num_heads.
        TypeError: query, key or value not a tensor of the parameters' dtype; a mask neither bool nor floating.
        ValueError: query not 2-d or 3-d; key/value of another rank; a last dim other than embed_dim / kdim /
            vdim; key or value with another batch size than query (e.g. a layout that does not match
            ``batch_first``); value's length not key's; key_padding_mask not (N, S) ((S,) unbatched); attn_mask
            not (L, S) or (N * num_heads, L, S); tensors (parameters included) on different devices.
        NaN/Inf, zero-size batch or length and any strides give torch's result.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None) -> None:
        if embed_dim > 0 and num_heads > 0 and embed_dim % num_heads:  # torch asserts; a ValueError says it better
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device=device, dtype=dtype)

    def _project(self, query, key, value, same):
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:E], b[E:2 * E], b[2 * E:])
        lin = torch.nn.functional.linear
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if same:  # self-attention: one GEMM
                return lin(query, w, b).chunk(3, dim=-1)
            if key is value:  # encoder-decoder attention: keys and values in one GEMM, as torch does
                return (lin(query, w[:E], bq),) + lin(key, w[E:], None if b is None else b[E:]).chunk(2, dim=-1)
            wq, wk, wv = w[:E], w[E:2 * E], w[2 * E:]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return lin(query, wq, bq), lin(key, wk, bk), lin(value, wv, bv)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if any(isinstance(t, torch.Tensor) and t.is_nested for t in (query, key, value)):  # torch's fast path/error
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        same = query is key and key is value
        if is_causal and attn_mask is not None and (need_weights or key_padding_mask is not None):
            is_causal = False  # as torch: the hint is only taken on its fused path; otherwise the mask rules
        self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # now (L, N, E) / (S, N, kdim)
        L, N, E = query.shape
        q, k, v = self._project(query, key, value, same)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, N, E)])
            v = torch.cat([v, self.bias_v.expand(1, N, E)])
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(1, N, E)])
            v = torch.cat([v, v.new_zeros(1, N, E)])
        extra = int(self.bias_k is not None) + int(self.add_zero_attn)
        H, hd = self.num_heads, self.head_dim
        q, k, v = (t.reshape(t.shape[0], N, H, hd).permute(1, 2, 0, 3) for t in (q, k, v))  # (N, H, L|S, hd)
        mask, kpm = multihead_attention_masks(attn_mask, key_padding_mask, H, extra, q.dtype, is_causal=is_causal)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            out, weights = attention_with_weights(q, k, v, mask, p, is_causal, kpm)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if unbatched:
                weights = weights[0]
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal,
                                                 key_padding_mask=kpm)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(L, N, E))  # (L, N, E)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> None:
        """The bad-input contract of forward: every tensor's type, dtype, device and shape is checked here, so a
        bad call raises an error naming the argument (never a reshape error from deep inside, nor a silent
        broadcast of a mask)."""
        fn = "MultiheadAttention"
        w = self.out_proj.weight
        _check_tensor(query, "query", dtypes=(w.dtype,), ndim=(2, 3), fn=fn)
        _check_tensor(key, "key", dtypes=(w.dtype,), fn=fn)
        _check_tensor(value, "value", dtypes=(w.dtype,), fn=fn)
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is not None:
                _check_tensor(m, name, dtypes=FLOATING + (torch.bool,), fn=fn)
        check_same_device(fn, query=query, key=key, value=value, key_padding_mask=key_padding_mask,
                          attn_mask=attn_mask, parameters=w)
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"{fn}: query, key and value must have the same number of dims, got "
                             f"{tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}")
        unbatched = query.dim() == 2
        lead = (lambda t: t.shape[:1] + (1,)) if unbatched else (
            (lambda t: (t.shape[1], t.shape[0])) if self.batch_first else (lambda t: tuple(t.shape[:2])))
        (L, N), (S, Nk), (Sv, Nv) = lead(query), lead(key), lead(value)
        layout = "(L, E)" if unbatched else "(N, L, E)" if self.batch_first else "(L, N, E)"
        for name, t, dim, n in (("query", query, self.embed_dim, N), ("key", key, self.kdim, Nk),
                                ("value", value, self.vdim, Nv)):
            if t.shape[-1] != dim:
                what = {"query": "embed_dim", "key": "kdim", "value": "vdim"}[name]
                raise ValueError(f"{fn}: {name}'s last dim must be {what}={dim}, got shape {tuple(t.shape)}")
            if n != N:
                raise ValueError(f"{fn}: {name} must have query's batch size {N} (layout {layout}, "
                                 f"batch_first={self.batch_first}), got shape {tuple(t.shape)}")
        if Sv != S:
            raise ValueError(f"{fn}: value must have key's sequence length {S}, got shapes {tuple(key.shape)} and "
                             f"{tuple(value.shape)}")
        if key_padding_mask is not None:
            want = (S,) if unbatched else (N, S)
            if tuple(key_padding_mask.shape) != want:
                raise ValueError(f"{fn}: key_padding_mask must have shape {'(S,)' if unbatched else '(N, S)'} = "
                                 f"{want}, got {tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            ok = ((L, S), (N * self.num_heads, L, S))
            if tuple(attn_mask.shape) not in ok:
                raise ValueError(f"{fn}: attn_mask must have shape (L, S) = {ok[0]} or (N * num_heads, L, S) = "
                                 f"{ok[1]}, got {tuple(attn_mask.shape)}")

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> "MultiheadAttention":
        twin = cls(module.embed_dim, module.num_heads, dropout=module.dropout,
                   bias=module.in_proj_bias is not None, add_bias_kv=module.bias_k is not None,
                   add_zero_attn=module.add_zero_attn, kdim=module.kdim, vdim=module.vdim,
                   batch_first=module.batch_first, device="meta")
        twin.out_proj = module.out_proj
        return _share_parameters(twin, module)


@_patchable(nn.TransformerEncoderLayer)
class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``torch.nn.TransformerEncoderLayer`` whose self-attention runs on fastnn's ``MultiheadAttention`` in every
    mode. A subclass that replaces only ``forward``: in eval under ``torch.no_grad()`` (batch_first, an even
    number of heads, ...) torch's own forward takes its fast path, ``torch._transformer_encoder_layer_fwd``, which
    reads the attention's weights and never calls the attention module; this forward always takes torch's other
    path, the same computation module by module (``_sa_block``, ``_ff_block``), so fastnn's kernel runs there too.

    A nested tensor ``src`` (what ``nn.TransformerEncoder`` makes of a padded batch in that mode, the padding
    dropped) runs as a padded batch with its padding as ``src_key_padding_mask`` and comes back nested, so
    positions that are padding stay out of the result as in torch's fast path; a nested ``src`` with a mask, or
    without batch_first, goes to torch's forward (its answer, or its error).

    ``use_torch_fast_path = True`` (on the class or one layer) gives torch's forward back, fast path included,
    for inference where torch's fused layer is faster (README: 1.04-1.4x of its time on the CPU).

    The constructor is torch's (the same arguments, defaults and initialization), its ``self_attn`` then a
    ``fastnn.nn.MultiheadAttention``. ``from_torch`` makes a twin that holds the module's own submodules and
    Parameters, with its ``self_attn`` replaced by ``fastnn.nn.MultiheadAttention`` (sharing the Parameters); the
    torch module is left unchanged. Shapes, arguments and Raises: as torch's.
    """

    use_torch_fast_path = False

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation=torch.nn.functional.relu,
                 layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True, device=None, dtype=None) -> None:
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first, norm_first,
                         bias, device, dtype)
        self.self_attn = MultiheadAttention.from_torch(self.self_attn)

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        if self.use_torch_fast_path:
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        if src.is_nested:
            if src_mask is not None or src_key_padding_mask is not None or not self.self_attn.batch_first:
                return super().forward(src, src_mask, src_key_padding_mask, is_causal)
            lengths = [t.shape[0] for t in src.unbind()]
            x = src.to_padded_tensor(0.0)
            pad = torch.arange(x.shape[1], device=x.device) >= torch.tensor(lengths, device=x.device)[:, None]
            out = self.forward(x, src_key_padding_mask=pad)
            return torch.nested.as_nested_tensor([o[:n] for o, n in zip(out, lengths)], layout=src.layout)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))

    @classmethod
    def from_torch(cls, module: nn.TransformerEncoderLayer) -> "TransformerEncoderLayer":
        twin = cls.__new__(cls)
        # every attribute, with copies of the dicts (submodules, parameters, hooks) so the torch module stays as is
        twin.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v for k, v in module.__dict__.items()})
        if type(twin.self_attn) is nn.MultiheadAttention:
            twin.self_attn = MultiheadAttention.from_torch(twin.self_attn).train(twin.self_attn.training)
        return twin


class MultiHeadSelfAttention(nn.Module):
    """The textbook self-attention layer - query, key, value and dense projections of ``hidden_size`` split into
    ``num_heads`` heads - with the matmul -> softmax -> matmul core replaced by the fused kernel.

    forward(hidden_states (B, L, hidden_size), key_padding_mask (B, L) bool True = pad, optional,
    is_causal=False) -> (B, L, hidden_size). Dropout on the attention probabilities (``attention_dropout``) is
    applied in training only.

    Raises:
        ValueError (constructor): hidden_size not divisible by num_heads.
        TypeError: hidden_states not a tensor of the parameters' dtype; key_padding_mask not bool.
        ValueError: hidden_states not (B, L, hidden_size), key_padding_mask not (B, L), or tensors on different
            devices. A fully padded row gives zeros before ``dense``, as ``scaled_dot_product_attention``.
    """

    def __init__(self, num_heads: int, hidden_size: int, attention_dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.hidden_size = num_heads, hidden_size
        self.head_dim = hidden_size // num_heads
        self.attention_dropout = attention_dropout
        self.query = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.key = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.value = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.dense = nn.Linear(hidden_size, hidden_size, bias=bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        fn = "MultiHeadSelfAttention"
        _check_tensor(hidden_states, "hidden_states", dtypes=(self.query.weight.dtype,), fn=fn)
        check_same_device(fn, hidden_states=hidden_states, parameters=self.query.weight,
                          key_padding_mask=key_padding_mask)
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"MultiHeadSelfAttention: hidden_states must be (B, L, {self.hidden_size}), got "
                             f"{tuple(hidden_states.shape)}")
        q, k, v = (self._heads(f(hidden_states)) for f in (self.query, self.key, self.value))
        ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attention_dropout if self.training else 0.0,
                                             is_causal=is_causal, key_padding_mask=key_padding_mask)
        B, H, L, D = ctx.shape
        return self.dense(ctx.transpose(1, 2).reshape(B, L, H * D))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, hidden_size={self.hidden_size}"
