"""Batched greedy and beam search over any `Seq2Seq` model, decoding incrementally (each step feeds only the
newest token; the model caches what earlier positions computed)."""
from __future__ import annotations

import torch

from .tokenizer import BOS, EOS, PAD


def _strip(ids: list[int]) -> list[int]:
    out = []
    for i in ids:
        if i in (EOS, PAD):
            break
        out.append(i)
    return out


@torch.no_grad()
def greedy(model, src: torch.Tensor, max_len: int) -> list[list[int]]:
    """Most likely next token at each step, for a batch of padded sources (B, S)."""
    memory = model.encode(src)
    B = src.shape[0]
    ys = torch.full((B, 1), BOS, dtype=torch.long, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    cache = None
    for t in range(max_len):
        hidden, cache = model.step(ys[:, -1:], memory, cache, t)
        nxt = model.logits(hidden).argmax(-1).masked_fill(done, PAD)
        ys = torch.cat([ys, nxt[:, None]], 1)
        done |= nxt.eq(EOS)
        if done.all():
            break
    return [_strip(row) for row in ys[:, 1:].tolist()]


@torch.no_grad()
def beam(model, src: torch.Tensor, max_len: int, beam_size: int = 4, length_penalty: float = 1.0) -> list[list[int]]:
    """Beam search for all sentences of the batch at once (B * beam_size rows).

    A finished hypothesis scores log p / length ** length_penalty (0: raw log-probability, which favours short
    outputs; 1: the per-token average). A sentence's search ends once beam_size hypotheses have ended
    (fairseq's rule); the best of them by that score is returned.
    """
    if beam_size <= 1:
        return greedy(model, src, max_len)
    B, K, dev = src.shape[0], beam_size, src.device
    memory = model.select(model.encode(src), torch.arange(B, device=dev).repeat_interleave(K))
    ys = torch.full((B * K, 1), BOS, dtype=torch.long, device=dev)
    # Only the first beam of each sentence is live at the start, or all K would expand the same prefix.
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    closed = [False] * B
    cache = None
    neg = float("-inf")
    for t in range(max_len):
        hidden, cache = model.step(ys[:, -1:], memory, cache, t)
        logp = torch.log_softmax(model.logits(hidden).float(), -1)  # (B*K, V)
        V = logp.shape[-1]
        if t == max_len - 1:  # out of length: every open beam ends here
            logp = torch.full_like(logp, neg).index_fill_(1, torch.tensor([EOS], device=dev), 0.0)
        cand = (scores.view(-1, 1) + logp).view(B, K * V)
        top, idx = cand.topk(2 * K, dim=-1)  # 2K candidates: even if K of them end, K stay open
        top, origin, token = top.tolist(), (idx // V).tolist(), (idx % V).tolist()
        rows, toks, new_scores = [], [], []
        for b in range(B):
            keep = []
            for s, o, tok in zip(top[b], origin[b], token[b]):
                if s == neg or closed[b] or len(keep) == K:
                    break
                if tok == EOS:
                    seq = ys[b * K + o, 1:].tolist()
                    finished[b].append((s / (len(seq) + 1) ** length_penalty, seq))
                else:
                    keep.append((s, b * K + o, tok))
            keep += [(neg, b * K, PAD)] * (K - len(keep))  # dead beams
            if len(finished[b]) >= K:  # fairseq's rule: done once beam_size hypotheses have ended
                closed[b] = True
            if closed[b]:
                keep = [(neg, b * K, PAD)] * K
            for s, r, tok in keep:
                new_scores.append(s)
                rows.append(r)
                toks.append(tok)
        if all(closed):
            break
        index = torch.tensor(rows, device=dev)
        ys = torch.cat([ys.index_select(0, index), torch.tensor(toks, device=dev)[:, None]], 1)
        cache = model.reorder(cache, index)
        scores = torch.tensor(new_scores, device=dev).view(B, K)
    return [max(f)[1] if f else [] for f in finished]
