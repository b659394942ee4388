"""The translation models: an encoder–decoder Transformer (Vaswani et al.) and an LSTM encoder–decoder with
Luong attention. Attention, softmax, the loss and the LSTM come from `kernel_modules(kernels)`, so the same code
builds the model on fastnn's kernels or on torch's, with the same parameter names."""
from __future__ import annotations

import logging
import math
import types

import torch
import torch.nn.functional as F
from torch import nn

from .tokenizer import PAD

log = logging.getLogger("fastnn.translator")

PRESETS = {
    # Vaswani et al.'s base Transformer with 3 + 3 layers: the model size a typical translation course trains.
    "course": dict(d_model=512, heads=8, enc_layers=3, dec_layers=3, ffn=2048, dropout=0.1),
    # Trains on a 2-core CPU in a few minutes.
    "small": dict(d_model=128, heads=4, enc_layers=2, dec_layers=2, ffn=256, dropout=0.1),
    # Tests only.
    "tiny": dict(d_model=32, heads=2, enc_layers=1, dec_layers=1, ffn=64, dropout=0.0),
}

_NAMES = ("MultiheadAttention", "CrossEntropyLoss", "LSTM", "Softmax")


def kernel_modules(kernels: str) -> types.SimpleNamespace:
    """The module classes to build with: fastnn.nn.<Name> where fastnn has it (kernels="fastnn"), otherwise
    torch.nn.<Name>. Which library each name resolved to is logged, and kept in `.sources`."""
    if kernels not in ("fastnn", "torch"):
        raise ValueError(f"kernels must be 'fastnn' or 'torch', got {kernels!r}")
    import fastnn.functional
    import fastnn.nn

    ns, sources = types.SimpleNamespace(), {}
    for name in _NAMES:
        cls = getattr(fastnn.nn, name, None) if kernels == "fastnn" else None
        setattr(ns, name, cls or getattr(nn, name))
        sources[name] = "fastnn" if cls else "torch"
    fused = getattr(fastnn.functional, "linear_cross_entropy", None) if kernels == "fastnn" else None
    ns.linear_cross_entropy = fused
    sources["linear_cross_entropy"] = "fastnn" if fused else "unavailable"
    ns.sources = sources
    log.info("kernels=%s: %s", kernels, ", ".join(f"{k} from {v}" for k, v in sources.items()))
    return ns


def sinusoids(length: int, dim: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * inv)
    pe[:, 1::2] = torch.cos(pos * inv)[:, : dim // 2]
    return pe


class Embed(nn.Module):
    """Token embedding scaled by sqrt(d_model) plus fixed sinusoidal positions."""

    def __init__(self, vocab: int, d: int, dropout: float, max_len: int = 1024, positions: bool = True):
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=PAD)
        nn.init.normal_(self.tok.weight, std=d ** -0.5)
        self.scale = math.sqrt(d)
        self.register_buffer("pos", sinusoids(max_len, d) * positions, persistent=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        end = offset + ids.shape[1]
        if end > self.pos.shape[0]:
            self.pos = sinusoids(end * 2, self.pos.shape[1]).to(self.pos) * self.pos.abs().amax().gt(0)
        return self.drop(self.tok(ids) * self.scale + self.pos[offset:end])


class Block(nn.Module):
    """One Transformer layer: self-attention, optional cross-attention, feed-forward; each sublayer with a
    residual and LayerNorm before (pre-norm, stable without warmup tricks) or after it (post-norm, the 2017
    original)."""

    def __init__(self, k, d: int, heads: int, ffn: int, dropout: float, cross: bool, pre_norm: bool):
        super().__init__()
        self.pre_norm = pre_norm
        self.self_attn = k.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.cross_attn = k.MultiheadAttention(d, heads, dropout=dropout, batch_first=True) if cross else None
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, d))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(3 if cross else 2))
        self.drop = nn.Dropout(dropout)

    def _sub(self, x, i, fn):
        if self.pre_norm:
            return x + self.drop(fn(self.norms[i](x)))
        return self.norms[i](x + self.drop(fn(x)))

    def forward(self, x, pad_mask=None, causal=None, memory=None, memory_pad=None, past=None):
        """`past`: this layer's inputs at earlier positions (incremental decoding): x then holds only the new
        positions, which attend to past + themselves; earlier positions are unaffected by later ones."""
        if past is None:
            x = self._sub(x, 0, lambda h: self.self_attn(h, h, h, key_padding_mask=pad_mask, attn_mask=causal,
                                                         need_weights=False)[0])
        else:
            kv = torch.cat([past, x], 1)
            kv = self.norms[0](kv) if self.pre_norm else kv
            x = self._sub(x, 0, lambda h: self.self_attn(h, kv, kv, need_weights=False)[0])
        if self.cross_attn is not None:
            x = self._sub(x, 1, lambda h: self.cross_attn(h, memory, memory, key_padding_mask=memory_pad,
                                                          need_weights=False)[0])
        return self._sub(x, len(self.norms) - 1, self.ffn)


class Seq2Seq(nn.Module):
    """Shared interface of both architectures: `encode(src) -> memory dict`; `hidden(tgt_in, memory) ->
    decoder states (B, T, d)` for training; `step(tokens, memory, cache, position)` for incremental decoding;
    `logits(hidden)`; `loss(hidden, target)`. Beam search reorders with `select(memory, index)` and
    `reorder(cache, index)`."""

    def _init_head(self, k, d: int, tgt_vocab: int, tie: bool, label_smoothing: float, fused: bool):
        self.out = nn.Linear(d, tgt_vocab)
        if tie:
            self.out.weight = self.tgt_embed.tok.weight
        self.criterion = k.CrossEntropyLoss(ignore_index=PAD, label_smoothing=label_smoothing, reduction="sum")
        self.label_smoothing = label_smoothing
        self._fused = k.linear_cross_entropy if fused else None
        if fused and self._fused is None:
            log.warning("loss.fused_head: fastnn.functional.linear_cross_entropy is not available; "
                        "using Linear + CrossEntropyLoss")

    def step(self, tokens: torch.Tensor, memory: dict, cache, position: int):
        """Incremental decoding: hidden state (B, d) after feeding `tokens` (B, 1) at `position`, given
        `cache` from the previous step (None at the start). Returns (hidden, cache); the cache is a list of
        batch-first tensors (see `reorder`)."""
        raise NotImplementedError

    @staticmethod
    def reorder(cache: list, index: torch.Tensor) -> list:
        return [c.index_select(0, index) for c in cache]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(hidden)

    def loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Summed label-smoothed cross-entropy over non-pad target tokens (the caller divides by the token
        count, across processes under DDP)."""
        h, t = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
        if self._fused is not None:  # output layer + loss without materializing the logits
            # A training step always runs the backward: the gradients are made in the forward (three products,
            # not four). Without grad (evaluation) this is the plain forward.
            return self._fused(h, self.out.weight, t, linear_bias=self.out.bias, ignore_index=PAD,
                               reduction="sum", label_smoothing=self.label_smoothing, grad_in_forward=True)
        return self.criterion(self.out(h).float(), t)

    @staticmethod
    def select(memory: dict, index: torch.Tensor) -> dict:
        return {k: (v.index_select(0, index) if torch.is_tensor(v) else
                    tuple(s.index_select(1, index) for s in v)) for k, v in memory.items()}

    def hidden(self, tgt_in: torch.Tensor, memory: dict) -> torch.Tensor:
        """Decoder states (B, T, d) for teacher-forced targets."""
        out = self.decode(tgt_in, memory)
        return out[0] if isinstance(out, tuple) else out

    def forward(self, src, tgt_in, tgt_out):
        return self.loss(self.hidden(tgt_in, self.encode(src)), tgt_out)


class Transformer(Seq2Seq):
    def __init__(self, src_vocab: int, tgt_vocab: int, kernels: str = "fastnn", d_model: int = 512,
                 heads: int = 8, enc_layers: int = 3, dec_layers: int = 3, ffn: int = 2048, dropout: float = 0.1,
                 pre_norm: bool = True, tie_embeddings: bool = True, label_smoothing: float = 0.1,
                 fused_head: bool = False, **_):
        super().__init__()
        k = kernel_modules(kernels)
        self.src_embed = Embed(src_vocab, d_model, dropout)
        self.tgt_embed = Embed(tgt_vocab, d_model, dropout)
        self.encoder = nn.ModuleList(Block(k, d_model, heads, ffn, dropout, False, pre_norm)
                                     for _ in range(enc_layers))
        self.decoder = nn.ModuleList(Block(k, d_model, heads, ffn, dropout, True, pre_norm)
                                     for _ in range(dec_layers))
        # Pre-norm leaves the last residual stream unnormalized: one final LayerNorm per stack.
        self.enc_norm = nn.LayerNorm(d_model) if pre_norm else nn.Identity()
        self.dec_norm = nn.LayerNorm(d_model) if pre_norm else nn.Identity()
        self._init_head(k, d_model, tgt_vocab, tie_embeddings, label_smoothing, fused_head)

    def encode(self, src: torch.Tensor) -> dict:
        pad = src.eq(PAD)
        x = self.src_embed(src)
        for layer in self.encoder:
            x = layer(x, pad_mask=pad)
        return {"memory": self.enc_norm(x), "pad": pad}

    def decode(self, tgt_in: torch.Tensor, memory: dict) -> torch.Tensor:
        T = tgt_in.shape[1]
        # Right-padded targets: the causal mask alone keeps real positions off the padding after them.
        causal = torch.ones(T, T, dtype=torch.bool, device=tgt_in.device).triu(1)
        x = self.tgt_embed(tgt_in)
        for layer in self.decoder:
            x = layer(x, causal=causal, memory=memory["memory"], memory_pad=memory["pad"])
        return self.dec_norm(x)

    def step(self, tokens, memory, cache, position):
        x = self.tgt_embed(tokens, offset=position)
        new_cache = []
        for i, layer in enumerate(self.decoder):
            past = cache[i] if cache is not None else x[:, :0]
            new_cache.append(torch.cat([past, x], 1))
            x = layer(x, memory=memory["memory"], memory_pad=memory["pad"], past=past)
        return self.dec_norm(x)[:, -1], new_cache


class LSTMSeq2Seq(Seq2Seq):
    """Seq2seq with attention (Luong et al.): a (bidirectional) LSTM encoder; an LSTM decoder initialised from the encoder's
    final state; Luong "general" attention over the encoder outputs after the decoder LSTM (so teacher-forced
    training runs the decoder LSTM over the whole sequence in one call)."""

    def __init__(self, src_vocab: int, tgt_vocab: int, kernels: str = "fastnn", d_model: int = 256,
                 enc_layers: int = 2, dec_layers: int = 2, dropout: float = 0.1, bidirectional: bool = True,
                 tie_embeddings: bool = True, label_smoothing: float = 0.1, fused_head: bool = False, **_):
        super().__init__()
        k = kernel_modules(kernels)
        self.bidirectional = bidirectional
        # Recurrence already knows positions: no sinusoids.
        self.src_embed = Embed(src_vocab, d_model, dropout, positions=False)
        self.tgt_embed = Embed(tgt_vocab, d_model, dropout, positions=False)
        enc_hidden = d_model // 2 if bidirectional else d_model
        self.encoder = k.LSTM(d_model, enc_hidden, num_layers=enc_layers, batch_first=True,
                              dropout=dropout if enc_layers > 1 else 0.0, bidirectional=bidirectional)
        self.decoder = k.LSTM(d_model, d_model, num_layers=dec_layers, batch_first=True,
                              dropout=dropout if dec_layers > 1 else 0.0)
        self.dec_layers = dec_layers
        self.attn_in = nn.Linear(d_model, d_model, bias=False)
        self.softmax = k.Softmax(dim=-1)
        self.combine = nn.Linear(2 * d_model, d_model)
        self.drop = nn.Dropout(dropout)
        self._init_head(k, d_model, tgt_vocab, tie_embeddings, label_smoothing, fused_head)

    def encode(self, src: torch.Tensor) -> dict:
        pad = src.eq(PAD)
        out, (h, c) = self.encoder(self.src_embed(src))
        # Packed sequences are not part of the interface every LSTM backend shares, so padded steps run too;
        # the attention masks them, and the initial decoder state is the mean over real positions instead of
        # the (pad-polluted) final state.
        keep = (~pad).unsqueeze(-1).to(out.dtype)
        mean = (out * keep).sum(1) / keep.sum(1).clamp_min(1)
        h0 = torch.tanh(mean).unsqueeze(0).expand(self.dec_layers, -1, -1).contiguous()
        return {"memory": out, "pad": pad, "state": (h0, torch.zeros_like(h0))}

    def decode(self, tgt_in: torch.Tensor, memory: dict, state=None):
        h, state = self.decoder(self.tgt_embed(tgt_in), memory["state"] if state is None else state)
        return self._attend(h, memory), state

    def _attend(self, h, memory):
        scores = torch.bmm(self.attn_in(h), memory["memory"].transpose(1, 2))
        scores = scores.masked_fill(memory["pad"].unsqueeze(1), float("-inf"))
        context = torch.bmm(self.softmax(scores), memory["memory"])
        return self.drop(torch.tanh(self.combine(torch.cat([h, context], -1))))

    def step(self, tokens, memory, cache, position):
        # The cache is the LSTM state, stored batch-first so that `reorder` treats both models alike.
        state = None if cache is None else tuple(c.transpose(0, 1).contiguous() for c in cache)
        out, state = self.decode(tokens, memory, state)
        return out[:, -1], [c.transpose(0, 1) for c in state]


def build_model(cfg: dict, src_vocab: int, tgt_vocab: int) -> Seq2Seq:
    """The model of a config's `model` section (preset defaults, overridden by explicit keys)."""
    m = dict(cfg["model"])
    arch = m.pop("arch", "transformer")
    preset = m.pop("preset", None)
    if preset and preset not in PRESETS:
        raise ValueError(f"model.preset must be one of {sorted(PRESETS)}, got {preset!r}")
    params = dict(PRESETS[preset]) if preset else {}
    params.update({k: v for k, v in m.items() if v is not None})
    params["label_smoothing"] = cfg["train"].get("label_smoothing", 0.1)
    params["fused_head"] = cfg["train"].get("fused_head", False)
    cls = {"transformer": Transformer, "lstm": LSTMSeq2Seq}.get(arch)
    if cls is None:
        raise ValueError(f"model.arch must be 'transformer' or 'lstm', got {arch!r}")
    return cls(src_vocab, tgt_vocab, kernels=cfg.get("kernels", "fastnn"), **params)
