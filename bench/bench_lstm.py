"""LSTM: one layer forward and forward+backward, and the cell alone - fastnn vs torch.nn.LSTM (oneDNN on the
CPU, cuDNN on the GPU) and a torch.nn.LSTMCell loop.

    python bench/bench_lstm.py [--quick] [--device cpu|cuda]

Goal case (README, "Benchmarks"): T=64, B=32, input=hidden=512, float32: on a 2-core CPU fastnn.nn.LSTM <= 1.0x
nn.LSTM; on a GPU <= 1.0x cuDNN's nn.LSTM. Validates every implementation against a float64 torch LSTM before
timing it.
"""
from __future__ import annotations

import torch
from torch import nn

import fastnn
from harness import EAGER, Bench, forward_backward


def cell_loop(cell):
    def run(x, hx=None):
        h = c = x.new_zeros(x.shape[1], cell.hidden_size)
        outs = []
        for t in range(x.shape[0]):
            h, c = cell(x[t], (h, c))
            outs.append(h)
        return torch.stack(outs), (h, c)
    return run


def layer_impls(b: Bench, I: int, H: int) -> tuple[dict, nn.LSTM]:
    theirs = nn.LSTM(I, H, device=b.device)
    ours = fastnn.nn.LSTM.from_torch(theirs)
    cell = nn.LSTMCell(I, H, device=b.device)
    with torch.no_grad():  # the same weights in the cell, for the validation
        for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, n).copy_(getattr(theirs, n + "_l0"))
    impls = {EAGER: lambda x: theirs(x)[0], "torch-LSTMCell-loop": lambda x: cell_loop(cell)(x)[0],
             "fastnn-native": lambda x: ours(x)[0],
             "fastnn-LSTMCell-loop": lambda x: cell_loop(fastnn.nn.LSTMCell.from_torch(cell))(x)[0]}
    if b.device == "cuda":
        def triton_lstm(x):
            with fastnn.use_backend("triton"):
                return ours(x)[0]
        impls["fastnn-triton"] = triton_lstm
    return impls, theirs


def validate(impls: dict, theirs: nn.LSTM, device: str) -> None:
    ref = nn.LSTM(theirs.input_size, theirs.hidden_size, dtype=torch.float64, device=device)
    ref.load_state_dict(theirs.state_dict())
    x = torch.randn(9, 3, theirs.input_size, device=device)
    want = ref(x.double())[0]
    for name, f in impls.items():
        err = (f(x).double() - want).abs().max().item()
        assert err < 1e-4, f"{name} disagrees with the float64 reference: max error {err}"


def no_grad(f, *args):
    def run():
        with torch.no_grad():
            f(*args)

    return run


def cell_fwd_bwd(f, xc, hc, cc, gh, gc):
    def run():
        h, c = f(xc, (hc, cc))
        torch.autograd.grad((h, c), (xc, hc, cc), (gh, gc))

    return run


def main():
    b = Bench("lstm")
    T, B, I, H = (16 if b.quick else 64), 32, 512, 512
    impls, theirs = layer_impls(b, I, H)
    validate(impls, theirs, b.device)
    x = torch.randn(T, B, I, device=b.device)
    case = f"T={T},B={B},I={I},H={H}"
    flops = 2 * T * B * 4 * H * (I + H)  # the two products; the backward does twice that
    g = torch.randn(T, B, H, device=b.device)  # a dense upstream gradient, as a model's
    b.compare(case=case, fns={name: no_grad(f, x) for name, f in impls.items()}, like=g, flops=flops,
              series="layer fwd (no grad)", x=T)
    b.compare(case=case, fns={name: forward_backward(f, (x,), g) for name, f in impls.items()}, like=g, flops=3 * flops,
              series="layer fwd+bwd", x=T)

    # The cell alone: one step of B rows, what an attention decoder runs per target token.
    cell = nn.LSTMCell(I, H, device=b.device)
    ours = fastnn.nn.LSTMCell.from_torch(cell)
    xc, hc, cc = (torch.randn(B, n, device=b.device, requires_grad=True) for n in (I, H, H))
    cells = {EAGER: cell, "fastnn-native": ours}
    if b.compile_ok:
        cells["torch-compile"] = torch.compile(cell, dynamic=False)
    if b.device == "cuda":
        def triton_cell(*a):
            with fastnn.use_backend("triton"):
                return ours(*a)
        cells["fastnn-triton"] = triton_cell
    ccase = f"B={B},I={I},H={H}"
    # The fused part moves gates (4H) in, c in, act (4H) + h + c out per row; forward only.
    cbytes = B * H * 11 * 4
    gh, gc = torch.randn(B, H, device=b.device), torch.randn(B, H, device=b.device)
    b.compare(case=ccase, fns={name: no_grad(f, xc, (hc, cc)) for name, f in cells.items()}, like=gh, bytes=cbytes,
              flops=2 * B * 4 * H * (I + H), series="cell fwd (no grad)", x=H)
    b.compare(case=ccase, fns={name: cell_fwd_bwd(f, xc, hc, cc, gh, gc) for name, f in cells.items()}, like=gh,
              flops=6 * B * 4 * H * (I + H), series="cell fwd+bwd", x=H)
    b.finish()


if __name__ == "__main__":
    main()
