"""Model-level training steps: blocks built the way users build them, torch.nn modules vs the same model with
fastnn's modules (fastnn.patch, or the fused linear + cross-entropy head), time and peak extra memory.

    python bench/bench_models.py [--quick] [--device cpu|cuda] [--no-thp] [--repeats N] [--only BLOCK[,BLOCK]]

Blocks (float32 on CPU), each a full step: forward, loss, backward, SGD update:
  encoder      nn.TransformerEncoderLayer (batch_first, GELU) -> per-token classifier -> CrossEntropyLoss
  classifier   a 32,000-class head: Linear + GELU -> Linear(512, 32000) + CrossEntropyLoss; fastnn fuses the last
               Linear and the loss (LinearCrossEntropyLoss.from_linear), so no (N, 32000) logits exist
  lstm-tagger  Embedding -> nn.LSTM -> Linear -> CrossEntropyLoss over every token
  translator   the translator's `small` Transformer preset (bench_translator.train_step)
The two models of a block start from the same weights; the step is checked to give the same loss first.
Goal (README's goal table, 2-core CPU, the harness's interleaved protocol): every block's step <= 0.9x the
torch-module step, against the faster of torch's allocator settings.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

import fastnn
from bench_translator import VOCAB, batch, train_step
from harness import EAGER, Bench

FASTNN = "fastnn-modules"


class TokenClassifier(nn.Module):
    """encoder block: one Transformer encoder layer and a per-token classifier."""

    def __init__(self, d_model: int, nhead: int, classes: int):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d_model, nhead, 4 * d_model, dropout=0.1, activation="gelu",
                                                batch_first=True)
        self.out = nn.Linear(d_model, classes)
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x, target):
        return self.loss(self.out(self.layer(x)).flatten(0, 1), target.flatten())


class Classifier(nn.Module):
    """classifier block: a hidden layer and a wide output layer with cross-entropy, or the fused head."""

    def __init__(self, d_in: int, d_hidden: int, classes: int):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU())
        self.out = nn.Linear(d_hidden, classes)
        self.loss = nn.CrossEntropyLoss()
        self.fused = None  # fastnn.nn.LinearCrossEntropyLoss in the fastnn model

    def forward(self, x, target):
        h = self.hidden(x)
        return self.fused(h, target) if self.fused is not None else self.loss(self.out(h), target)


class Tagger(nn.Module):
    """lstm-tagger block: embeddings, a one-layer LSTM and a per-token classifier."""

    def __init__(self, vocab: int, dim: int, hidden: int, tags: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True)
        self.out = nn.Linear(hidden, tags)
        self.loss = nn.CrossEntropyLoss()

    def forward(self, tokens, target):
        return self.loss(self.out(self.lstm(self.embed(tokens))[0]).flatten(0, 1), target.flatten())


def with_fastnn(model: nn.Module) -> nn.Module:
    """The same model (a copy, same weights) on fastnn's modules."""
    ours = fastnn.patch(copy.deepcopy(model), verbose=False)
    if isinstance(ours, Classifier):
        ours.fused = fastnn.nn.LinearCrossEntropyLoss.from_linear(ours.out)
    return ours


def sgd_step(model: nn.Module, inputs: tuple):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        loss = model(*inputs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def blocks(quick: bool, device: str):
    """(name, torch model, inputs) of each block."""
    torch.manual_seed(0)
    B, L = (8, 128) if quick else (16, 256)
    yield ("encoder", f"B={B},L={L},d=512,h=8,classes=1000", TokenClassifier(512, 8, 1000),
           (torch.randn(B, L, 512), torch.randint(0, 1000, (B, L))))
    N = 1024 if quick else 4096
    yield ("classifier", f"N={N},512->512->32000", Classifier(512, 512, 32000),
           (torch.randn(N, 512), torch.randint(0, 32000, (N,))))
    B, T = (16, 32) if quick else (32, 64)
    yield ("lstm-tagger", f"B={B},T={T},emb=256,H=512,tags=50", Tagger(VOCAB, 256, 512, 50),
           (torch.randint(0, VOCAB, (B, T)), torch.randint(0, 50, (B, T))))


def check_same_loss(theirs: nn.Module, ours: nn.Module, inputs: tuple, name: str) -> None:
    theirs.eval(), ours.eval()  # no dropout: the two must agree
    with torch.no_grad():
        a, b = theirs(*inputs).item(), ours(*inputs).item()
    assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), f"{name}: fastnn's model gives loss {b}, torch's {a}"
    theirs.train(), ours.train()


BLOCKS = ("encoder", "classifier", "lstm-tagger", "translator")


def _only_blocks(extra: list[str]) -> set[str] | None:
    """--only BLOCK[,BLOCK...]: the blocks to run (None: all)."""
    if "--only" not in extra:
        return None
    i = extra.index("--only")
    only = set(extra[i + 1].split(",")) if i + 1 < len(extra) else set()
    if not only or not only <= set(BLOCKS):
        raise SystemExit(f"--only takes block names among {', '.join(BLOCKS)}, got {extra[i + 1:i + 2]}")
    return only


def main():
    b = Bench("models", description=__doc__)
    only = _only_blocks(b.extra)
    for name, case, theirs, inputs in blocks(b.quick, b.device):
        if only is not None and name not in only:
            continue
        theirs = theirs.to(b.device)
        inputs = tuple(t.to(b.device) for t in inputs)
        ours = with_fastnn(theirs)
        check_same_loss(theirs, ours, inputs, name)
        b.compare(case=case, fns={EAGER: sgd_step(theirs, inputs), FASTNN: sgd_step(ours, inputs)},
                  series=name, x=None)
    if only is None or "translator" in only:
        n, length = (50, 30) if b.quick else (100, 30)
        data = batch(n, length, VOCAB, b.device)
        b.compare(case=f"small {n}x{length}", series="translator",
                  fns={EAGER: train_step("transformer", "small", "torch", VOCAB, data, b.device)[1],
                       FASTNN: train_step("transformer", "small", "fastnn", VOCAB, data, b.device)[1]})
    b.finish()


if __name__ == "__main__":
    main()
