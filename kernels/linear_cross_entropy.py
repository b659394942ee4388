"""Triton linear + cross-entropy: the chunk loop of csrc/linear_cross_entropy.h, with torch matmuls around
cross-entropy's row kernels (kernels/cross_entropy.py). One (chunk, V) logits buffer is reused for every chunk; the
backward recomputes each chunk's logits and overwrites them with their gradient. In half precision the weight
gradient's product is a Triton kernel of its own (grad_weight_kernel)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET
from .cross_entropy import acc_dtype, backward_into, forward_into

# grad_weight_kernel's tiles. Aligned operands (16-byte rows and pointers, V and D multiples of 16: the JIT's
# divisibility hints, so 16-byte loads): 128 x 128 float32 accumulators over 8 warps, 64 rows of the chunk a step,
# three stages (96 KiB of shared memory, within sm_80's and sm_90's); on sm_90 the products compile to wgmma.
# Others load element by element, which spills with those tiles: 128 x 64 accumulators, 32 rows a step, two stages.
_GW_ALIGNED = dict(BLOCK_V=128, BLOCK_D=128, BLOCK_N=64, GROUP=8, num_warps=8, num_stages=3)
_GW_UNALIGNED = dict(BLOCK_V=128, BLOCK_D=64, BLOCK_N=32, GROUP=8, num_warps=8, num_stages=2)


def _gw_config(aligned: bool) -> dict:
    return dict(_GW_ALIGNED if aligned else _GW_UNALIGNED)


@triton.jit
def grad_weight_kernel(DL, X, GW, n, V, D, stride_dl, ACCUMULATE: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, UPCAST: tl.constexpr):
    """GW[V, D] (float32, rows D apart) = (GW if ACCUMULATE) + DL[n, V]^T X[n, D], DL's rows stride_dl apart and
    X's D apart, both half precision: the products on the tensor cores, accumulated in float32 registers and added
    to the float32 sum of the earlier chunks, so the weight gradient is rounded to the input dtype once. One program
    per BLOCK_V x BLOCK_D tile; GROUP consecutive V blocks walk the D blocks together (X's tiles stay in L2)."""
    pid = tl.program_id(0)
    nv, nd = tl.cdiv(V, BLOCK_V), tl.cdiv(D, BLOCK_D)
    first_v = (pid // (GROUP * nd)) * GROUP
    group_size = tl.minimum(nv - first_v, GROUP)
    pv = first_v + (pid % (GROUP * nd)) % group_size
    pd = (pid % (GROUP * nd)) // group_size
    rv = pv * BLOCK_V + tl.arange(0, BLOCK_V)
    rd = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, n, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        a = tl.load(DL + rn[None, :].to(tl.int64) * stride_dl + rv[:, None],
                    mask=(rn[None, :] < n) & (rv[:, None] < V), other=0.0)  # [BLOCK_V, BLOCK_N]: DL^T's tile
        b = tl.load(X + rn[:, None].to(tl.int64) * D + rd[None, :], mask=(rn[:, None] < n) & (rd[None, :] < D),
                    other=0.0)
        if UPCAST:  # kernels/common.py's INTERPRET: the interpreter's bfloat16 products
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc)
    out = GW + rv[:, None].to(tl.int64) * D + rd[None, :]
    inside = (rv[:, None] < V) & (rd[None, :] < D)
    if ACCUMULATE:
        acc += tl.load(out, mask=inside, other=0.0)
    tl.store(out, acc, mask=inside)


def grad_weight_product(grad_weight: torch.Tensor, dlogits: torch.Tensor, x: torch.Tensor, first: bool) -> None:
    """grad_weight (+)= dlogits^T x for one chunk (first: store), grad_weight [V, D] float32 or the inputs' dtype.

    Args:
        grad_weight: [V, D], float32 for half-precision inputs, else the inputs' dtype; contiguous.
        dlogits: [n, V], the chunk's logits gradient; unit column stride.
        x: [n, D], the chunk's input rows; contiguous.
    """
    if grad_weight.dtype == x.dtype:  # float32 / float64: the BLAS as it is
        if first:
            torch.mm(dlogits.t(), x, out=grad_weight)
        else:
            grad_weight.addmm_(dlogits.t(), x)
        return
    V, D = grad_weight.shape
    if grad_weight.numel() == 0:
        return
    aligned = (all(t.data_ptr() % 16 == 0 for t in (dlogits, x, grad_weight))
               and all(v % 16 == 0 for v in (V, D, dlogits.stride(0))))
    cfg = _gw_config(aligned)
    grid = (triton.cdiv(V, cfg["BLOCK_V"]) * triton.cdiv(D, cfg["BLOCK_D"]),)
    grad_weight_kernel[grid](dlogits, x, grad_weight, x.shape[0], V, D, dlogits.stride(0), ACCUMULATE=not first,
                             UPCAST=INTERPRET and x.dtype == torch.bfloat16, **cfg)


def _chunk_logits(buf, x, w, bias, s, n):
    out = buf[:n]
    if bias is None:
        return torch.mm(x[s:s + n], w.t(), out=out)
    return torch.addmm(bias, x[s:s + n], w.t(), out=out)


def linear_cross_entropy_forward(x, w, bias, target, class_weight, ignore_index, label_smoothing, chunk):
    x, w, target = x.contiguous(), w.contiguous(), target.contiguous()
    N, V = x.shape[0], w.shape[0]
    loss = torch.empty(N, dtype=acc_dtype(x.dtype), device=x.device)
    stats = torch.empty(2, N, dtype=loss.dtype, device=x.device)
    if N:
        buf = torch.empty(min(chunk, N), V, dtype=x.dtype, device=x.device)
        for s in range(0, N, chunk):
            n = min(chunk, N - s)
            forward_into(_chunk_logits(buf, x, w, bias, s, n), target[s:s + n], class_weight, ignore_index,
                         label_smoothing, loss[s:s + n], stats[:, s:s + n])
    return loss, stats


def linear_cross_entropy_backward(grad_loss, x, w, bias, target, class_weight, stats, ignore_index,
                                  label_smoothing, chunk, output_mask=(True, True, True), forward=None):
    """(grad_input, grad_weight, grad_bias); one that output_mask leaves out is an empty (0,) tensor and its
    product is skipped, as in the native op. forward(logits, s, n), when given, runs on each chunk's logits before
    their gradient overwrites them (linear_cross_entropy_forward_grad)."""
    x, w, target = x.contiguous(), w.contiguous(), target.contiguous()
    grad_loss = grad_loss.contiguous()
    N, V = x.shape[0], w.shape[0]
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    want_x, want_w, want_b = output_mask
    grad_input = torch.empty(x.shape if want_x else (0,), dtype=x.dtype, device=x.device)
    # grad_weight is stored by the first chunk's product (no zero fill of a (V, D) float32 tensor); zeros for N = 0.
    grad_weight = (torch.empty if N else torch.zeros)(w.shape if want_w else (0,), dtype=acc, device=x.device)
    grad_bias = torch.zeros(V if want_b else 0, dtype=acc, device=x.device)
    want_b = want_b and bias is not None  # without a bias the (V,) gradient is zeros
    if N and (want_x or want_w or want_b or forward is not None):
        buf = torch.empty(min(chunk, N), V, dtype=x.dtype, device=x.device)
        for s in range(0, N, chunk):
            n = min(chunk, N - s)
            d = _chunk_logits(buf, x, w, bias, s, n)
            if forward is not None:
                forward(d, s, n)
            backward_into(grad_loss[s:s + n], d, target[s:s + n], class_weight, stats[:, s:s + n], ignore_index,
                          label_smoothing, d)
            if want_x:
                torch.mm(d, w, out=grad_input[s:s + n])
            if want_w:
                grad_weight_product(grad_weight, d, x[s:s + n], first=s == 0)
            if want_b:
                grad_bias += d.sum(0, dtype=acc)
    return grad_input, grad_weight.to(x.dtype), grad_bias.to(x.dtype)


def linear_cross_entropy_forward_grad(x, w, bias, target, class_weight, grad_loss, ignore_index, label_smoothing,
                                      chunk, output_mask=(True, True, True)):
    """(loss, grad_input, grad_weight, grad_bias): the forward and the gradients for grad_loss (N,) in one loop
    over the chunks, each chunk's logits made once (three products a chunk, not four)."""
    target = target.contiguous()
    N = x.shape[0]
    loss = torch.empty(N, dtype=acc_dtype(x.dtype), device=x.device)
    stats = torch.empty(2, N, dtype=loss.dtype, device=x.device)

    def forward(d, s, n):
        forward_into(d, target[s:s + n], class_weight, ignore_index, label_smoothing, loss[s:s + n],
                     stats[:, s:s + n])

    grads = linear_cross_entropy_backward(grad_loss, x, w, bias, target, class_weight, stats, ignore_index,
                                          label_smoothing, chunk, output_mask, forward=forward)
    return (loss, *grads)

def _aot_specs(arch: int = 90, aligned: bool = True):
    """grad_weight_kernel in both half types, accumulating (the later chunks); on sm_90 its products must be wgmma
    for aligned operands."""
    cfg = _gw_config(aligned)
    options = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    options["wgmma"] = arch >= 90 and aligned
    for dt in ("bf16", "fp16"):
        sig = {"DL": f"*{dt}", "X": f"*{dt}", "GW": "*fp32", "n": "i32", "V": "i32", "D": "i32", "stride_dl": "i32"}
        yield grad_weight_kernel, sig, dict(cfg, ACCUMULATE=True, UPCAST=False), options


AOT = _aot_specs
