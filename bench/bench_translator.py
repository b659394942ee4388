"""Translator training step: time and peak memory with kernels=fastnn vs kernels=torch (torch.nn modules),
for the `small` and `course` presets (Transformer) and the LSTM seq2seq.

    python bench/bench_translator.py [--quick] [--device cpu|cuda]

One step = forward, label-smoothed loss, backward, gradient clipping and an AdamW update on a fixed batch of
random token ids (sources and targets of similar length, some padding). Goal (README's goal table): on CPU the fastnn
step takes <= 0.85x the torch step. The "fastnn" rows use fastnn.nn's module wherever it exists and torch.nn's
otherwise; the resolved sources are printed, so a row is only a kernel comparison for the modules fastnn has.
"""
from __future__ import annotations

import torch

from harness import EAGER, Bench

from fastnn.translator import config as C
from fastnn.translator.model import build_model, kernel_modules
from fastnn.translator.tokenizer import PAD
from fastnn.translator.train import make_optimizer

VOCAB = 8000


def batch(n: int, length: int, vocab: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (n, length), generator=g)
    tgt = torch.randint(4, vocab, (n, length + 1), generator=g)
    lens = torch.randint(length // 2, length + 1, (n,), generator=g)
    pad = torch.arange(length + 1)[None] >= lens[:, None]
    src[pad[:, :length]] = PAD
    tgt[pad] = PAD
    return src.to(device), tgt[:, :-1].contiguous().to(device), tgt[:, 1:].contiguous().to(device)


def train_step(arch: str, preset: str, kernels: str, vocab: int, data, device: str):
    """(model, step): the model built from seed 0 (dropout off) and one training step on ``data`` (bf16 autocast on
    CUDA, float32 elsewhere) that returns the loss; ``step(update=False)`` stops after the backward, leaving the
    gradients in the parameters (to compare two models' gradients), and ``step(update=False, amp=False)`` runs
    without autocast (a float32 reference)."""
    ntok = int(data[2].ne(PAD).sum())
    cfg = C.load(sets=[f"model.arch={arch}", f"model.preset={preset}", f"kernels={kernels}", "model.dropout=0.0"])
    torch.manual_seed(0)
    model = build_model(cfg, vocab, vocab).to(device).train()
    opt = make_optimizer(model, cfg["train"])
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    no_autocast = torch.autocast(device, enabled=False)

    def step(update: bool = True, amp: bool = True):
        with autocast if amp else no_autocast:
            loss = model(*data) / ntok
        loss.backward()
        if not update:
            return loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step


def main():
    b = Bench("translator", description=__doc__)
    print("kernels=fastnn resolves to:", kernel_modules("fastnn").sources, "\n")
    cases = [("transformer", "small", 100, 30), ("transformer", "course", 100, 30), ("lstm", "small", 100, 30)]
    if b.quick:
        cases = [(a, p, n // 4 if p == "course" else n // 2, t) for a, p, n, t in cases]
    if b.device == "cuda":
        cases = [(a, p, n * 4, t) for a, p, n, t in cases]
    for arch, preset, n, length in cases:
        data = batch(n, length, VOCAB, b.device)
        steps = {impl: train_step(arch, preset, kernels, VOCAB, data, b.device)[1] for kernels, impl in
                 (("torch", EAGER), ("fastnn", "fastnn"))}
        b.compare(case=f"{arch}-{preset} {n}x{length}", fns=steps, series="train step",
                  dtype="bf16-autocast" if b.device == "cuda" else "float32")
        del steps
    b.finish()


if __name__ == "__main__":
    main()
