"""fastnn's fused ops with ``torch.nn.functional`` signatures. Every function also takes a keyword-only
``backend`` ("auto", "native", "triton", "reference"); see ``fastnn.use_backend``."""
from __future__ import annotations

import warnings

import torch

from .ops import attention as _attention
from .ops import bce_with_logits as _bce
from .ops import cross_entropy as _ce
from .ops import linear_cross_entropy as _lce
from .ops import lstm as _lstm
from .ops import softmax as _softmax


def _implicit_dim(fn: str, input, dim: int | None, stacklevel: int):
    # torch's dim=None: an old implicit choice (0 for 0-, 1- and 3-d input, else 1) with a deprecation warning,
    # kept by torch.nn.functional and nn.Softmax alike; a drop-in picks the same dimension.
    if dim is not None or not isinstance(input, torch.Tensor):
        return dim
    if not torch.compiler.is_compiling():  # Dynamo would not trace the call (torch.compile warns at trace time)
        warnings.warn(f"Implicit dimension choice for {fn} has been deprecated. Change the call to include dim=X "
                      "as an argument.", stacklevel=stacklevel)
    return 0 if input.dim() in (0, 1, 3) else 1


def softmax(input: torch.Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None, *,
            backend: str | None = None) -> torch.Tensor:
    """``torch.nn.functional.softmax``: exp(x) / sum(exp(x)) over ``dim``, computed stably.

    Args:
        input: tensor of any shape; float32, float64, float16 or bfloat16 (half types accumulate in float32).
        dim: dimension to normalize over. None: torch's deprecated implicit choice (dim 0 for 0-, 1- and 3-d
            input, else 1), with torch's warning.
        _stacklevel: the warning's stack level, as in torch.
        dtype: cast ``input`` to this dtype first.
    Returns:
        Tensor of ``input``'s shape.
    Raises:
        TypeError: ``input`` not a floating tensor (integer, bool, complex), or ``dim`` not an int.
        IndexError: ``dim`` out of range for ``input``'s rank.
        NaN/Inf, 0-d, zero-size and any strides (transposed, expanded, channels-last) give torch's result.
    """
    dim = _implicit_dim("softmax", input, dim, _stacklevel)
    return _softmax.softmax(input, dim=dim, log=False, dtype=dtype, backend=backend)


def log_softmax(input: torch.Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None,
                *, backend: str | None = None) -> torch.Tensor:
    """``torch.nn.functional.log_softmax``: x - logsumexp(x) over ``dim``. Args, Returns and Raises as
    ``softmax``."""
    dim = _implicit_dim("log_softmax", input, dim, _stacklevel)
    return _softmax.softmax(input, dim=dim, log=True, dtype=dtype, backend=backend)


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
    return _bce.bce_with_logits(input, target, weight=weight, reduction=reduction, pos_weight=pos_weight,
                                backend=backend)


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  size_average=None, ignore_index: int = -100, reduce=None, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, inplace_backward: bool = False,
                  backend: str | None = None, grad_in_forward: bool = False) -> torch.Tensor:
    """``torch.nn.functional.cross_entropy`` as one fused pass: the softmax is never stored, the backward
    recomputes it from the logits and the saved per-row max and log-sum of exp.

    Args:
        input: logits (N, C), (N, C, d1, ...) or (C,); float32/float64/float16/bfloat16 (half types accumulate
            in float32).
        target: class indices (N,), (N, d1, ...) or () of dtype int64 (or uint8, as torch), each in [0, C) or
            ``ignore_index``; or class probabilities of ``input``'s shape (floating; as in torch, the loss is
            computed and returned in the promoted dtype of ``input`` and ``target``).
        weight: (C,) rescaling weight per class, ``input``'s dtype (no gradient).
        size_average, reduce: deprecated, as in torch (they override ``reduction``).
        ignore_index: a class-index target equal to it contributes no loss and no gradient.
        reduction: "none" (input's shape without C), "mean" (weighted mean over non-ignored targets: NaN when
            all are ignored) or "sum".
        label_smoothing: in [0, 1]; mixes the target with the uniform distribution, as torch.
        inplace_backward: write the gradient of ``input`` into ``input``'s own storage instead of a new tensor
            (saves one N x C allocation). Contract: after ``backward()`` the logits' values are gone (their
            storage holds the gradient, which is also what is returned as / accumulated into their grad); only
            use it when nothing else reads the logits afterwards - autograd raises if another op saved them for
            its backward. It saves memory only when ``input`` is contiguous (else a contiguous copy is reused).
        backend: fastnn's extra, "auto" | "native" | "triton" | "reference".
        grad_in_forward: fastnn's extra (default False). With class-index targets, a "mean" or "sum" reduction and
            ``input`` requiring grad, the forward also writes the gradient of ``input``, each row right after its
            loss while the row is still in cache (as Liger-Kernel's cross-entropy), and the backward scales it by
            the upstream gradient: the logits are read from memory once instead of twice. The gradient (input's
            size) is held from the forward to the backward instead of the logits; ``inplace_backward`` has no
            effect then. The backward hands that gradient out as it is for an upstream gradient of 1 (reading
            it: a device sync on CUDA), else scales it in place; so it serves one backward, and a second one
            through the same loss (``retain_graph=True``) raises a RuntimeError. In float16 / bfloat16 an upstream
            gradient other than 1 rounds the stored gradient once more (the default path rounds once). Elsewhere
            it changes nothing.
    Returns:
        The loss: a scalar, or (N, d1, ...) for "none", in ``input``'s dtype.
    Raises:
        TypeError: ``input`` or ``weight`` not a floating tensor, ``weight`` of another dtype than ``input``,
            ``target`` not a tensor or class indices of another dtype than int64/uint8 (int32, bool, ...), or
            ``ignore_index`` not an int.
        TypeError: also ``inplace_backward`` or ``grad_in_forward`` not a bool.
        ValueError: a 0-d ``input``; ``target`` of the wrong shape (class indices: input's shape without C,
            mismatched N included; probabilities: input's shape); ``weight`` not (C,); an unknown ``reduction``;
            ``label_smoothing`` outside [0, 1]; tensors on different devices.
        IndexError: a class index outside [0, C) that is not ``ignore_index`` (negative ones included).
        NotImplementedError: ``weight`` requiring grad.
        NaN/Inf in any tensor, all targets ignored, zero-size tensors and any strides (transposed, expanded,
        channels-last) give torch's result.
    """
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    return _ce.cross_entropy(input, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                             label_smoothing=label_smoothing, inplace_backward=inplace_backward, backend=backend,
                             grad_in_forward=grad_in_forward)


def linear_cross_entropy(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor, *,
                         linear_bias: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                         reduction: str = "mean", ignore_index: int | None = None, label_smoothing: float = 0.0,
                         options=None, chunk_size: int | None = None, backend: str | None = None,
                         grad_in_forward: bool | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear_cross_entropy`` (torch 2.13's signature and semantics, on any torch):
    ``cross_entropy(linear(input, linear_weight, linear_bias), target, weight, ...)`` without materializing the
    (N, C) logits. Rows run in chunks through one reused (chunk, C) buffer. On a GPU (and with
    ``grad_in_forward=False``) the backward recomputes each chunk's logits (no gradient is computed or stored in the
    forward), and peak extra memory is O(chunk x C); on the CPU the forward of a loss that will be differentiated
    computes the gradients too (``grad_in_forward`` below). The float32 CPU
    kernel (on CPUs with AVX2, when C gives each thread a block) goes further: threads take blocks of 64 classes
    against tiles of at most min(chunk, 512) rows, so each block's logits and their gradient stay in cache, and
    its extra memory is O(threads x tile x (64 + D)), with no (chunk, C) buffer. The recompute costs a fourth
    matrix product (torch's reference path runs three): with a large D and a small C, where the logits are cheap
    to hold, this is up to ~1.3x slower than ``cross_entropy(linear(input, linear_weight), target)`` (README,
    "Benchmarks").

    Unlike torch, the fused path runs whatever ``options`` is: ``options=None`` (torch's reference path) and
    ``options=torch.nn.LinearCrossEntropyOptions(...)`` (torch's chunked path) both chunk here. Which path runs:

    - class-index targets: the fused op (``fastnn::linear_cross_entropy_fwd`` / ``_bwd``, native or Triton) for
      every ``reduction``, ``weight``, ``ignore_index`` and ``label_smoothing`` (torch's chunked path falls back to
      its reference path for label smoothing).
    - class-probability targets: not the fused op (it takes indices only): chunks of rows through ``linear`` and
      fastnn's fused ``cross_entropy``, each under activation checkpointing (one chunk's logits held at a time,
      and the backward recomputes them), so memory stays O(chunk x C) there too.
    - K-dimensional loss (``linear_weight`` (C, d1, ..., dK, D)): one of the above per position of d1..dK, each
      with that position's (C, D) slice of ``linear_weight`` against all N rows.
    - ``backend="reference"``: ``fastnn.reference.linear_cross_entropy``, torch's reference formula.

    Args:
        input: (N, D), (D,) or, with class-index targets and a (C, D) ``linear_weight``, any (..., D) (torch takes
            (N, D) and (D,) only); float32/float64/float16/bfloat16.
        linear_weight: (C, D) output projection (``nn.Linear(D, C).weight``), or (C, d1, ..., dK, D) for a
            K-dimensional loss (input then (N, D)); input's dtype. (Formerly fastnn's ``weight``.)
        target: class indices (int64) of shape ``input.shape[:-1] + (d1, ..., dK)``, each in [0, C) or
            ``ignore_index``; or class probabilities (floating) of the logits' shape
            ``input.shape[:-1] + (C, d1, ..., dK)``, summing to 1 over C (not checked, as in torch).
        linear_bias: optional (C, d1, ..., dK) (``(C,)`` without K dims). (Formerly ``bias``.)
        weight: optional (C,) per-class loss weight, ``cross_entropy``'s. (Formerly ``class_weight``.)
        reduction: "none" | "mean" | "sum"; "mean" divides by the summed weight of the non-ignored targets (their
            count without ``weight``; the number of rows x positions for probability targets).
        ignore_index: a target value that contributes neither loss nor gradient; None (default) means -100, as
            in torch. Only for class-index targets (an error with probabilities, as in torch).
        label_smoothing: float in [0, 1], as ``cross_entropy``.
        options: ``torch.nn.LinearCrossEntropyOptions`` or None. Its ``batch_chunk_size`` sets the rows per
            chunk; its other fields (``chunking_method``, ``acc_policy``, ``acc_dtype``, ``allow_retain_graph``)
            tune torch's own chunked kernel and are ignored (``retain_graph=True`` always works here).
        chunk_size: fastnn's extra, rows per chunk (must agree with ``options.batch_chunk_size`` if both are
            given); default: as many as keep a (chunk, C) logits buffer at 128 MiB (64 MiB where the gradients
            are made in the forward).
        backend: fastnn's extra, "auto" | "native" | "triton" | "reference".
        grad_in_forward: fastnn's extra: True, False, or None (default: True on the CPU, False on a GPU, where
            the recomputing path holds no gradient through the forward). With
            class-index targets, a "mean" or "sum" reduction, no K dims and a gradient to compute (grad mode on,
            an input requiring grad), the forward also computes the gradients (each chunk's logits made once:
            three matrix products a chunk instead of four, as Liger-Kernel's fused linear cross-entropy and torch's
            own chunked path), and the backward scales them by the upstream gradient. They are held from the
            forward to the backward (input's and linear_weight's sizes; float32 accumulation for the half types
            while the forward runs); the backward hands them to autograd (scaled copies for an upstream
            gradient other than 1; a retained graph keeps its own, so ``retain_graph=True`` works), and it is not
            differentiable again (``create_graph=True`` raises). Elsewhere it changes nothing. A loss computed
            with grad mode on and never differentiated (an evaluation outside ``torch.no_grad()``) pays the
            gradients' products too: pass False there, or use the module in ``eval()`` mode.
    Returns:
        The loss: a scalar, or ``input.shape[:-1] + (d1, ..., dK)`` for "none", in ``input``'s dtype (the
        promoted dtype of input and target for probabilities). Gradients flow to input, linear_weight and
        linear_bias (and to probability targets, as in torch); with class-index targets only those that require
        grad are computed (a frozen head or a detached input skips one of the backward's three products).
    Raises:
        TypeError: a non-floating ``input``/``linear_weight``/``linear_bias``/``weight``, ``linear_weight`` of
            another dtype than ``input``, ``target`` neither int64 (or uint8) indices nor floating, or ``options``
            not a LinearCrossEntropyOptions.
        ValueError: ``linear_weight`` below 2-d, ``input``'s last dim not D, a K-dimensional ``linear_weight``
            with input not (N, D), ``linear_bias`` not (C, d1..dK) of input's dtype, ``target`` of the wrong
            shape, ``weight`` not (C,), ``ignore_index`` with probabilities, ``chunk_size`` /
            ``options.batch_chunk_size`` not a positive int or the two disagreeing, an unknown ``reduction``,
            ``label_smoothing`` outside [0, 1], or tensors on different devices.
        IndexError: a class index outside [0, C) that is not ``ignore_index``.
        NotImplementedError: ``weight`` requiring grad.
        RuntimeError: C = 0 (``linear_weight`` has no rows).
        As ``cross_entropy`` for the rest: NaN/Inf, zero-size and any strides give torch's
        ``cross_entropy(linear(input, linear_weight, linear_bias), target)``.
    """
    return _lce.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=weight,
                                     reduction=reduction, ignore_index=ignore_index,
                                     label_smoothing=label_smoothing, options=options, chunk_size=chunk_size,
                                     backend=backend, grad_in_forward=grad_in_forward)


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
                                 key_padding_mask: torch.Tensor | None = None,
                                 backend: str | None = None) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` as a flash-style kernel: softmax(q k^T * scale + mask)
    v computed tile by tile with an online softmax, so memory grows with L, not L^2. Same positional arguments as
    torch 2.13's; fastnn's own ``key_padding_mask`` and ``backend`` are keyword-only.

    Args:
        query: (B, Hq, Lq, D) or (Hq, Lq, D); float32, float64, float16 or bfloat16 (accumulation in float32).
        key: (B, Hk, Lk, D), value: (B, Hv, Lk, Dv) (or 3-d), query's dtype; Lk may differ from Lq and the value
            head dim Dv from D. Batch dims broadcast between query, key and value as in torch (a size-1 batch is
            read in place, not copied), and so do heads without ``enable_gqa``. Head dims up to 256 run on the
            fused kernels; larger ones on fastnn's reference path (plain PyTorch, Lq x Lk memory), with a
            one-time warning.
        attn_mask: bool (True = attend) or additive float, broadcastable to (B, Hq, Lq, Lk). A broadcast mask
            (e.g. (Lq, Lk) or (B, 1, 1, Lk)) is read through stride-0 dims, never expanded in memory. A float
            mask that requires grad gets its gradient (a learned bias: T5 relative positions, ALiBi slopes),
            summed over the dims it broadcasts over, computed tile by tile in the backward (memory beyond the
            mask's own size stays O(L)).
        dropout_p: dropout on the attention probabilities. The mask is a hash of a seed drawn from torch's CPU
            generator (so ``torch.manual_seed`` reproduces it) and is regenerated in the backward, not stored.
            Unlike torch, dropout is applied whenever ``dropout_p > 0``: pass 0.0 for evaluation.
        is_causal: query i attends to keys j <= i (top-left alignment, as torch's ``is_causal``). May be combined
            with ``attn_mask`` (torch refuses the combination).
        scale: score scale, default 1 / sqrt(D).
        enable_gqa: grouped-query attention (torch >= 2.5): key and value have Hk (Hv) heads, Hq a multiple of
            them, query head h reading key head h // (Hq / Hk). The kernels read the shared head in place (no
            repeat_interleave) and sum dK / dV over each group.
        key_padding_mask: (B, Lk) bool ((Lk,) for 3-d inputs), True = padding key; applied in the kernel.
    Returns:
        (B, Hq, Lq, Dv) (or (Hq, Lq, Dv)) in query's dtype. A query row whose keys are all masked gets zeros and
        zero gradients, as torch 2.13's CPU SDPA gives (math and flash backends; torch.nn.MultiheadAttention with
        need_weights=True returns NaN there).
    Raises:
        TypeError: query/key/value not floating tensors of one dtype, ``attn_mask`` neither bool nor floating,
            ``key_padding_mask`` not bool, ``scale`` not a number or ``enable_gqa`` not a bool.
        ValueError: query/key/value not 3-d or 4-d, key's head dim not query's, value's length not key's, a
            head dim of 0, batch sizes (or, without ``enable_gqa``, head counts) that do not broadcast, with
            ``enable_gqa`` query heads not a multiple of key's and value's, ``attn_mask`` not broadcastable to
            (B, Hq, Lq, Lk), ``key_padding_mask`` not exactly (B, Lk), ``dropout_p`` outside [0, 1], or tensors on
            different devices.
        NaN/Inf (in inputs or mask), zero-size dims (B, H, Lq or Lk = 0) and any strides (transposed, expanded,
            channels-last) give torch's result, except fully masked rows as said above; a NaN in a query or key
            gives NaN rows as torch's math backend does (torch's CPU flash kernel returns zeros for a NaN query).
    """
    return _attention.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                   is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                                                   key_padding_mask=key_padding_mask, backend=backend)


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
        ``fastnn.ops.lstm.lstm_cell``. An input of the wrong feature size gives torch's message ("input has
        inconsistent input_size: got 11 expected 10") in a ValueError (torch: RuntimeError). NaN/Inf, a zero batch and any strides give torch's result.
    """
    return _lstm.lstm_cell(input, hx, w_ih, w_hh, b_ih=b_ih, b_hh=b_hh, backend=backend)


def lstm(input: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None, params: list[torch.Tensor],
         num_layers: int, bias: bool = True, dropout: float = 0.0, training: bool = True,
         bidirectional: bool = False, lengths: torch.Tensor | None = None, *,
         backend: str | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``torch.nn.LSTM``'s forward as a function, over a padded, time-major batch (gate order i, f, g, o;
    ``fastnn.nn.LSTM`` converts batch-first, unbatched and packed input to it). Each layer and direction computes
    its input product for all steps as one GEMM; with the native backend (CPU, CUDA) its recurrence then runs in
    one C++ call, with the others as a loop over the fused cell. Without autograd (``torch.no_grad()``, or nothing
    requiring grad) the CPU layer keeps no per-step gates or cell states. With projections (``params`` holding a
    weight_hr per layer and direction, as ``torch.nn.LSTM(proj_size=P)._flat_weights`` does; inferred from their
    number, as ``torch.lstm`` does) h_t = (o_t * tanh(c_t)) W_hr^T has P features, and every backend runs the
    loop over the fused cell plus the projection's product per step: slower than the one-call native layer.

    Args:
        input: [T, B, I], T >= 1; float32, float64, float16 or bfloat16.
        hx: (h0 [num_layers * D, B, R], c0 [num_layers * D, B, H]) (D = 2 if bidirectional, else 1; R = P with
            projections, else H), or None for zeros.
        params: the weights as ``torch.nn.LSTM._flat_weights`` lists them: for each layer, for each direction
            (forward, then reverse), weight_ih [4H, I] ([4H, D * R] past the first layer), weight_hh [4H, R],
            with ``bias`` bias_ih, bias_hh [4H], and with projections weight_hr [P, H]; all of input's dtype and
            device.
        num_layers: stacked layers, each reading the previous one's output.
        bias: whether ``params`` holds the biases.
        dropout: dropout probability on every layer's output but the last's, applied when ``training``.
        training: apply ``dropout`` (as ``torch.nn.functional.dropout``'s ``training``).
        bidirectional: run a reverse direction too and concatenate the two outputs.
        lengths: int [B], each in [0, T]: the valid steps of each sequence. A row past its length keeps its states
            (h_n, c_n are those of its last valid step, the reverse direction starts at it) and its output is
            zero, as a ``PackedSequence`` through ``torch.nn.LSTM`` and back gives. None: all T steps.
    Returns:
        (output [T, B, D * R], (h_n, c_n)): output is the last layer's h at every step, the directions
        concatenated; h_n [num_layers * D, B, R], c_n [num_layers * D, B, H] are every layer's and direction's
        final states.
    Raises:
        TypeError: input or a parameter not a floating tensor, a parameter not of input's dtype (named, e.g.
            weight_hh_l1_reverse), params not a list, or hx not a pair (h0, c0) of tensors of input's dtype and
            device.
        ValueError: input not 3-d or T = 0; params not holding num_layers * D * (4 if bias else 2) tensors (one
            more per layer and direction with projections), or one of the wrong shape (named); input.size(-1) not the input size of weight_ih_l0; hx of the wrong shape;
            lengths not integers of shape (B,) in [0, T]; dropout outside [0, 1]; num_layers < 1; tensors on
            different devices.
        NaN/Inf, a zero batch and any strides give torch's result.
    """
    return _lstm.lstm(input, hx, params, num_layers=num_layers, bias=bias, dropout=dropout, training=training,
                      bidirectional=bidirectional, lengths=lengths, backend=backend)
