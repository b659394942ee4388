"""LSTM: custom ops ``fastnn::lstm_cell_fwd`` / ``lstm_cell_bwd`` (C++ CPU, CUDA) with ``_triton`` twins, and
``fastnn::lstm_layer_fwd`` / ``lstm_layer_bwd`` (C++ CPU and CUDA: a whole layer's recurrence in one call) with
``lstm_layer_infer_fwd`` (C++ CPU: the same without autograd); ``lstm`` runs a multi-layer, optionally
bidirectional LSTM on them, layer by layer.

The matrix products are ordinary differentiable torch ops (``mm`` / ``addmm`` on the platform BLAS) around the
fused ops, so autograd turns their gradients into GEMMs too. The cell's backward saves the activated gates and
the previous cell state only; the layer's saves those for every step plus the states it produced.
"""
from __future__ import annotations

import torch

from .. import reference
from .._validation import check_same_device, check_tensor
from ..backend import native_has, resolve
from .registry import Triton, register_op

_CELL_FORWARD = {"native": torch.ops.fastnn.lstm_cell_fwd, "triton": torch.ops.fastnn.lstm_cell_fwd_triton}

# ---- the cell


def lstm_cell(input: torch.Tensor, hx, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor | None = None,
              b_hh: torch.Tensor | None = None, backend: str | None = None):
    """One LSTM step, ``torch.nn.LSTMCell`` semantics (gate order i, f, g, o).

    Args:
        input: [B, I] or unbatched [I].
        hx: (h, c), each [B, H] ([H] when unbatched), or None for zeros.
        w_ih: [4H, I];  w_hh: [4H, H];  b_ih, b_hh: [4H] or None.
        backend: "auto", "native", "triton" or "reference"; None uses ``fastnn.get_backend()``.

    Returns:
        (h', c'), each [B, H] ([H] when unbatched).

    Raises:
        TypeError: a non-tensor or non-floating argument, hx not a pair, or tensors of different dtypes.
        ValueError: a wrong rank or shape (named: input, w_ih, w_hh, b_ih, b_hh, hx[0] (h), hx[1] (c); an input
            of the wrong feature size in torch's words, "input has inconsistent input_size: got 11 expected 10",
            where torch raises a RuntimeError), or tensors on different devices. NaN/Inf, zero batch and any strides are accepted and give torch's
            result.
    """
    fn = "lstm_cell"
    check_tensor(input, "input", ndim=(1, 2), fn=fn)
    check_tensor(w_ih, "w_ih", ndim=2, fn=fn)
    check_tensor(w_hh, "w_hh", ndim=2, fn=fn)
    hidden = w_hh.shape[1]
    if w_hh.shape[0] != 4 * hidden:
        raise ValueError(f"{fn}: w_hh must be [4*hidden_size, hidden_size], got {tuple(w_hh.shape)}")
    if w_ih.shape[0] != 4 * hidden:
        raise ValueError(f"{fn}: w_ih must be [4*hidden_size, input_size] = [{4 * hidden}, input_size], got "
                         f"{tuple(w_ih.shape)}")
    if input.shape[-1] != w_ih.shape[1]:  # torch's words (it raises a RuntimeError)
        raise ValueError(f"{fn}: input has inconsistent input_size: got {input.shape[-1]} expected "
                         f"{w_ih.shape[1]} (the input_size of w_ih {tuple(w_ih.shape)})")
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None:
            check_tensor(b, name, fn=fn)
            if tuple(b.shape) != (4 * hidden,):
                raise ValueError(f"{fn}: {name} must be [4*hidden_size] = [{4 * hidden}], got {tuple(b.shape)}")
    unbatched = input.dim() == 1
    x = input.unsqueeze(0) if unbatched else input
    if hx is None:
        h = c = x.new_zeros(x.shape[0], hidden)
    else:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f"{fn}: hx must be a tuple (h, c) or None, got {type(hx).__name__}")
        h, c = hx
        for name, s in (("hx[0] (h)", h), ("hx[1] (c)", c)):
            check_tensor(s, name, fn=fn)
            want = (hidden,) if unbatched else (x.shape[0], hidden)
            if tuple(s.shape) != want:
                raise ValueError(f"{fn}: {name} must have shape {want} for input {tuple(input.shape)}, "
                                 f"got {tuple(s.shape)}")
        if unbatched:
            h, c = h.unsqueeze(0), c.unsqueeze(0)
    tensors = {"input": x, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh, "hx[0] (h)": h, "hx[1] (c)": c}
    check_same_device(fn, **tensors)
    _check_same_dtype(fn, tensors)
    b = resolve(torch.ops.fastnn.lstm_cell_fwd, backend, *tensors.values())
    if b == "reference":
        hy, cy = reference.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
    else:
        gates = torch.addmm(torch.mm(x, w_ih.t()), h, w_hh.t())
        bias = b_ih + b_hh if b_ih is not None and b_hh is not None else (b_ih if b_ih is not None else b_hh)
        hy, cy, _ = _CELL_FORWARD[b](gates, bias, c)
    return (hy.squeeze(0), cy.squeeze(0)) if unbatched else (hy, cy)


def _check_same_dtype(fn: str, tensors: dict) -> None:
    named = {k: v for k, v in tensors.items() if v is not None}
    dtypes = {v.dtype for v in named.values()}
    if len(dtypes) > 1:
        desc = ", ".join(f"{k} {str(v.dtype).replace('torch.', '')}" for k, v in named.items())
        raise TypeError(f"{fn}: all tensors must have the same dtype, got {desc}")


def _cell_fake_fwd(gates, bias, cx):
    return cx.new_empty(cx.shape), cx.new_empty(cx.shape), gates.new_empty(gates.shape)


def _cell_fake_bwd(grad_hy, grad_cy, act, cx):
    return act.new_empty(act.shape), cx.new_empty(cx.shape)


def _cell_setup_context(ctx, inputs, output):
    gates, bias, cx = inputs
    _, _, act = output
    ctx.mark_non_differentiable(act)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(act, cx)


def _cell_backward(ctx, grads, bwd_op):
    act, cx = ctx.saved_tensors
    grad_gates, grad_cx = bwd_op(grads[0], grads[1], act, cx)
    grad_bias = grad_gates.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
    return grad_gates, grad_bias, grad_cx


def _cell_triton_fwd(gates, bias, cx):
    from ..kernels.lstm import lstm_cell_forward

    return lstm_cell_forward(gates, bias, cx)


def _cell_triton_bwd(grad_hy, grad_cy, act, cx):
    from ..kernels.lstm import lstm_cell_backward

    return lstm_cell_backward(grad_hy, grad_cy, act, cx)


register_op(torch.ops.fastnn.lstm_cell_fwd, torch.ops.fastnn.lstm_cell_bwd, fake_fwd=_cell_fake_fwd,
            fake_bwd=_cell_fake_bwd, setup_context=_cell_setup_context, backward=_cell_backward,
            triton=Triton(torch.ops.fastnn.lstm_cell_fwd_triton, torch.ops.fastnn.lstm_cell_bwd_triton,
                          _cell_triton_fwd, _cell_triton_bwd))

# ---- one layer and direction


def lstm_layer(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
               b_ih: torch.Tensor | None, b_hh: torch.Tensor | None, lengths: torch.Tensor | None = None,
               reverse: bool = False, backend: str = "native", w_hr: torch.Tensor | None = None):
    """One direction of one LSTM layer over a whole sequence (arguments already checked by the caller).

    Args:
        x: [T, B, I];  h0: [B, R], c0: [B, H] (R = P with a projection, else H);  w_ih [4H, I], w_hh [4H, R],
            b_ih, b_hh [4H] or None;  lengths: int64 [B] on the CPU or None.
        reverse: run t = T-1 .. 0 (a bidirectional layer's second direction).
        backend: a resolved backend ("native", "triton" or "reference").
        w_hr: [P, H] or None: ``torch.nn.LSTM(proj_size=P)``'s projection, h_t = (o_t * tanh(c_t)) W_hr^T.
            A projected layer always runs the per-step loop over the fused cell (the native layer op has no
            projection): T small products and cell calls from Python, slower than the one-call native layer.

    Returns:
        (hs, h_n, c_n): hs [T, B, R] holds the state after every step (a row past its length keeps its state,
        so h_n and c_n are those of its last real step); the caller zeroes padded outputs.
    """
    T, B, I = x.shape
    H = w_ih.shape[0] // 4
    if w_hr is None and backend == "native" and native_has(torch.ops.fastnn.lstm_layer_fwd, x.device.type):
        last = 0 if reverse else T - 1
        args = (x, w_ih, _sum_bias(b_ih, b_hh), w_hh, h0, c0, lengths, reverse)
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                               for t in (x, w_ih, w_hh, b_ih, b_hh, h0, c0))
        if not grad and native_has(torch.ops.fastnn.lstm_layer_infer_fwd, x.device.type):
            # Nothing to differentiate: the op keeps no per-step gates or cell states for a backward.
            hs, c_n = torch.ops.fastnn.lstm_layer_infer_fwd(*args)
            return hs, hs[last], c_n
        hs, cs, _ = torch.ops.fastnn.lstm_layer_fwd(*args)
        return hs, hs[last], cs[last]
    # Elsewhere a Python loop over the fused cell, the input product still one GEMM over all steps.
    # The bias joins that GEMM, so its gradient is one sum over all steps rather than T accumulations.
    bias, x2 = _sum_bias(b_ih, b_hh), x.reshape(T * B, I)
    gx = (torch.addmm(bias, x2, w_ih.t()) if bias is not None else torch.mm(x2, w_ih.t())).view(T, B, 4 * H)
    # unbind, not gx[t]: each indexing's backward would write a zero-filled [T, B, 4H] gradient (O(T^2) memory
    # traffic); unbind's backward stacks the T step gradients once.
    gx = gx.unbind(0)
    h, c = h0, c0
    hs = []
    steps = range(T - 1, -1, -1) if reverse else range(T)
    mask = None if lengths is None else (torch.arange(T).unsqueeze(1) < lengths.unsqueeze(0)).to(x.device)
    for t in steps:
        if backend == "reference":
            hn, cn = reference.lstm_cell_gates(torch.addmm(gx[t], h, w_hh.t()), None, c)
        else:
            hn, cn, _ = _CELL_FORWARD[backend](torch.addmm(gx[t], h, w_hh.t()), None, c)
        if w_hr is not None:
            hn = torch.mm(hn, w_hr.t())
        if mask is not None:
            m = mask[t].unsqueeze(1)
            hn, cn = torch.where(m, hn, h), torch.where(m, cn, c)
        h, c = hn, cn
        hs.append(h)
    if reverse:
        hs.reverse()
    return (torch.stack(hs) if hs else x.new_zeros(0, B, h0.shape[1])), h, c


def _sum_bias(b_ih, b_hh):
    if b_ih is not None and b_hh is not None:
        return b_ih + b_hh
    return b_ih if b_ih is not None else b_hh


def _layer_fake_fwd(x, w_ih, bias, w_hh, h0, c0, lengths, reverse):
    T, B, _ = x.shape
    H = w_hh.shape[1]
    return x.new_empty(T, B, H), x.new_empty(T, B, H), x.new_empty(T, B, 4 * H)


def _layer_infer_fake_fwd(x, w_ih, bias, w_hh, h0, c0, lengths, reverse):
    return x.new_empty(x.shape[0], x.shape[1], w_hh.shape[1]), c0.new_empty(c0.shape)


torch.library.register_fake(torch.ops.fastnn.lstm_layer_infer_fwd.default)(_layer_infer_fake_fwd)


def _layer_fake_bwd(grad_hs, grad_cs, w_hh, c0, cs, act, lengths, reverse):
    return act.new_empty(act.shape), c0.new_empty(c0.shape), c0.new_empty(c0.shape), act.new_empty(act.shape[2])


def _layer_setup_context(ctx, inputs, output):
    x, w_ih, bias, w_hh, h0, c0, lengths, reverse = inputs
    hs, cs, act = output
    ctx.mark_non_differentiable(act)
    # act is an output autograd never gives a gradient to; materializing one would zero-fill a [T, B, 4H] buffer
    # on every backward. The hs / cs gradients a model leaves out are made below, at their own sizes.
    ctx.set_materialize_grads(False)
    ctx.reverse, ctx.has_bias = reverse, bias is not None
    ctx.save_for_backward(x, w_ih, w_hh, h0, c0, hs, cs, act, lengths)


def _layer_backward(ctx, grads, bwd_op):
    x, w_ih, w_hh, h0, c0, hs, cs, act, lengths = ctx.saved_tensors
    # A model that reads only hs and h_n / c_n leaves grad_cs None (or holding only the final step, from c_n):
    # the op takes None as zero rather than a zero-filled [T, B, H] tensor.
    grad_hs = torch.zeros_like(hs) if grads[0] is None else grads[0]
    grad_gates, grad_h0, grad_c0, grad_bias = bwd_op(grad_hs, grads[1], w_hh, c0, cs, act, lengths, ctx.reverse)
    T, B, H4 = grad_gates.shape
    g2 = grad_gates.view(T * B, H4)
    need = ctx.needs_input_grad
    grad_x = torch.mm(g2, w_ih).view(x.shape) if need[0] else None
    grad_bias = grad_bias if ctx.has_bias and need[2] else None
    # The weight gradients: dG^T x_t and dG^T h_prev(t) over all steps, where step t ran on h_{t-1} (forward) or
    # h_{t+1} (reverse), and on h0 at the first step: products on x and hs as they are, with h0's step added in
    # place. (One product over a copied [x_t | h_prev(t)] and two column slices of its result measured slower:
    # docs/measurements.md.)
    grad_w_ih = torch.mm(g2.t(), x.reshape(T * B, x.shape[2])) if need[1] else None
    grad_w_hh = None
    if need[3]:
        H = H4 // 4
        if T == 0:
            grad_w_hh = w_hh.new_zeros(w_hh.shape)
        else:
            rows = (T - 1) * B
            g_rest, g_first = (g2[:rows], g2[rows:]) if ctx.reverse else (g2[B:], g2[:B])
            h_rest = hs[1:] if ctx.reverse else hs[:-1]
            grad_w_hh = torch.mm(g_rest.t(), h_rest.reshape(rows, H)).addmm_(g_first.t(), h0)
    return grad_x, grad_w_ih, grad_bias, grad_w_hh, grad_h0, grad_c0, None, None


register_op(torch.ops.fastnn.lstm_layer_fwd, torch.ops.fastnn.lstm_layer_bwd, fake_fwd=_layer_fake_fwd,
            fake_bwd=_layer_fake_bwd, setup_context=_layer_setup_context, backward=_layer_backward)

# ---- the multi-layer LSTM


def lstm(input: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None, params: list[torch.Tensor],
         num_layers: int, bias: bool = True, dropout: float = 0.0, training: bool = True,
         bidirectional: bool = False, lengths: torch.Tensor | None = None, backend: str | None = None):
    """``torch.nn.LSTM``'s forward over a padded, time-major batch, as ``fastnn.functional.lstm`` documents it:
    input [T, B, I], hx (h0 [num_layers * D, B, R], c0 [num_layers * D, B, H]) or None, params in
    ``nn.LSTM._flat_weights`` order (with weight_hr for projections, R = proj_size, else R = H) ->
    (output [T, B, D * R], (h_n, c_n)). Checks every argument, then runs each layer's directions with
    ``lstm_layer``, dropout between layers while training, and zeroes the outputs past ``lengths``."""
    fn = "lstm"
    check_tensor(input, "input", ndim=3, fn=fn)
    T, B, _ = input.shape
    if T == 0:  # torch refuses it too
        raise ValueError(f"{fn}: input must have a sequence length larger than 0, got shape {tuple(input.shape)}")
    D = 2 if bidirectional else 1
    names, H, R = _check_params(fn, input, params, num_layers, bias, D)
    h0, c0 = _initial_states(fn, hx, input, num_layers * D, H, R)
    if lengths is not None:
        lengths = _check_lengths(fn, lengths, T, B)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
        raise ValueError(f"{fn}: dropout must be a probability in [0, 1], got {dropout!r}")
    check_same_device(fn, input=input, **dict(zip(names, params)))
    backend = resolve(torch.ops.fastnn.lstm_cell_fwd, backend, input, h0, params[0])
    per = len(params) // (num_layers * D)  # weight_ih, weight_hh (, bias_ih, bias_hh) (, weight_hr)
    proj = per in (3, 5)
    layer_in, h_n, c_n = input, [], []
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            # Indexing rather than star-unpacking and pop(): torch 2.11's Dynamo traces the starred rest as a tuple.
            group = params[k * per:(k + 1) * per]
            w_ih, w_hh = group[0], group[1]
            w_hr = group[-1] if proj else None
            b_ih, b_hh = (group[2], group[3]) if per >= 4 else (None, None)
            hs, h, c = lstm_layer(layer_in, h0[k], c0[k], w_ih, w_hh, b_ih, b_hh, lengths, bool(d), backend, w_hr)
            outs.append(hs)
            h_n.append(h)
            c_n.append(c)
        layer_in = outs[0] if D == 1 else torch.cat(outs, 2)
        if dropout and training and layer < num_layers - 1:
            layer_in = torch.nn.functional.dropout(layer_in, dropout, True)
    out = layer_in
    if lengths is not None:
        # Past its length a row holds its last state; its output there is zero, as unpacking would give.
        valid = torch.arange(T).unsqueeze(1) < lengths.unsqueeze(0)
        out = out * valid.to(out.device, out.dtype).unsqueeze(2)
    return out, (torch.stack(h_n), torch.stack(c_n))


def _param_names(num_layers: int, D: int, bias: bool, proj: bool = False) -> list[str]:
    """``torch.nn.LSTM``'s parameter names in its ``_flat_weights`` order: per layer and direction weight_ih,
    weight_hh (, bias_ih, bias_hh) (, weight_hr), the reverse direction's with the suffix ``_reverse``."""
    kinds = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if bias else ()) + (("weight_hr",) if proj else ())
    return [f"{kind}_l{layer}{'_reverse' if d else ''}" for layer in range(num_layers) for d in range(D)
            for kind in kinds]


def _check_params(fn, input, params, num_layers, bias, D):
    """Checks params against input and the layout; returns their names, the hidden size H and the size R of h
    (proj_size when params hold weight_hr, as torch.lstm infers it from their number, else H)."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"{fn}: num_layers must be a positive int, got {num_layers!r}")
    names = _param_names(num_layers, D, bias)
    if not isinstance(params, (list, tuple)):
        raise TypeError(f"{fn}: params must be a list of tensors, got {type(params).__name__}")
    proj = len(params) == len(names) + num_layers * D
    if proj:
        names = _param_names(num_layers, D, bias, proj=True)
    elif len(params) != len(names):
        per = len(names) // (num_layers * D)
        raise ValueError(f"{fn}: params must hold {len(names)} tensors for num_layers={num_layers}, bias={bias}, "
                         f"bidirectional={D == 2} ({', '.join(names[:per])}, ... in torch.nn.LSTM's order; "
                         f"{len(names) + num_layers * D} with a weight_hr each for proj_size > 0), got {len(params)}")
    for name, p in zip(names, params):
        check_tensor(p, name, fn=fn)
    per = len(names) // (num_layers * D)
    w_ih, w_hh = params[0], params[1]
    if w_ih.dim() != 2 or w_ih.shape[0] % 4:
        raise ValueError(f"{fn}: weight_ih_l0 must be [4*hidden_size, input_size], got {tuple(w_ih.shape)}")
    H = w_ih.shape[0] // 4
    if proj:
        w_hr = params[per - 1]
        if w_hr.dim() != 2 or w_hr.shape[1] != H:
            raise ValueError(f"{fn}: weight_hr_l0 must be [proj_size, hidden_size] = [proj_size, {H}], got "
                             f"{tuple(w_hr.shape)}")
    R = params[per - 1].shape[0] if proj else H
    if tuple(w_hh.shape) != (4 * H, R):
        raise ValueError(f"{fn}: weight_hh_l0 must be [4*hidden_size, {'proj_size' if proj else 'hidden_size'}] = "
                         f"{[4 * H, R]}, got {tuple(w_hh.shape)}")
    if input.shape[2] != w_ih.shape[1]:
        raise ValueError(f"{fn}: input.size(-1) must be equal to input_size. Expected {w_ih.shape[1]}, got "
                         f"{input.shape[2]}")
    for i, (name, p) in enumerate(zip(names, params)):
        layer, kind = i // (per * D), i % per  # kind: weight_ih, weight_hh (, bias_ih, bias_hh) (, weight_hr)
        shapes = [(4 * H, input.shape[2] if layer == 0 else D * R), (4 * H, R)] + [(4 * H,)] * (2 * bias)
        want = (shapes + [(R, H)])[kind]
        if tuple(p.shape) != want:
            raise ValueError(f"{fn}: {name} must have shape {want}, got {tuple(p.shape)}")
        if p.dtype != input.dtype:
            raise TypeError(f"{fn}: input dtype {_dtype_name(input)} does not match the parameters' "
                            f"{_dtype_name(p)} ({name})")
    return names, H, R


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _initial_states(fn, hx, input, LD, H, R):
    """(h0 [LD, B, R], c0 [LD, B, H]): hx checked against input, or zeros (R = proj_size, or H without one)."""
    B = input.shape[1]
    if hx is None:
        c = input.new_zeros(LD, B, H)
        return (c if R == H else input.new_zeros(LD, B, R)), c
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError(f"{fn}: hx must be a tuple (h0, c0) or None, got {type(hx).__name__}")
    sizes = ("proj_size" if R != H else "hidden_size", "hidden_size")
    for name, s, size, want in zip(("hx[0] (h0)", "hx[1] (c0)"), hx, sizes, ((LD, B, R), (LD, B, H))):
        check_tensor(s, name, fn=fn)
        if tuple(s.shape) != want:
            raise ValueError(f"{fn}: {name} must have shape {want} (num_layers * num_directions, batch, "
                             f"{size}), got {tuple(s.shape)}")
        if s.dtype != input.dtype or s.device != input.device:
            raise TypeError(f"{fn}: {name} must match input's dtype and device ({input.dtype}, {input.device}), "
                            f"got {s.dtype} on {s.device}")
    return hx


def _check_lengths(fn, lengths, T, B):
    """lengths as int64 [B] on the CPU (where the layer ops read them), each in [0, T]."""
    lengths = torch.as_tensor(lengths)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or tuple(lengths.shape) != (B,):
        raise ValueError(f"{fn}: lengths must be integers of shape ({B},), got {lengths.dtype} "
                         f"{tuple(lengths.shape)}")
    lengths = lengths.to("cpu", torch.int64)
    if B and (lengths.min() < 0 or lengths.max() > T):
        raise ValueError(f"{fn}: lengths must lie in [0, {T}] (the sequence length), got {lengths.tolist()}")
    return lengths
