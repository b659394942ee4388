"""Training, evaluation and translation: the library behind the command line (``__main__.py``)."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from . import data as D
from .model import build_model
from .search import beam, greedy
from .tokenizer import BOS, EOS, PAD, Tokenizer

log = logging.getLogger("fastnn.translator")


# --- processes ---------------------------------------------------------------------------------------------
class Dist:
    """This process's place in a torchrun job (world 1 without torchrun)."""

    def __init__(self, device_pref: str = "auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref.startswith("cuda")
        self.device = torch.device(f"cuda:{local}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        self.main = self.rank == 0

    def sum(self, x: float) -> float:
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item()

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]


# --- data --------------------------------------------------------------------------------------------------
def _read(cfg: dict, split: str, clean: D.Cleaning) -> list:
    return D.read_specs(cfg["data"][split], clean, cfg["data"].get("builtin_size", 30000))


def encode_pairs(pairs, src_tok: Tokenizer, tgt_tok: Tokenizer, max_len: int):
    """(source ids + EOS, target ids) per pair, each cut to max_len pieces."""
    src = src_tok.encode_batch([k for k, _ in pairs])
    tgt = tgt_tok.encode_batch([e for _, e in pairs])
    return [(s[: max_len - 1] + [EOS], t[: max_len - 1]) for s, t in zip(src, tgt)]


def collate(examples, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (src, tgt_in = BOS + y, tgt_out = y + EOS)."""
    S = max(len(s) for s, _ in examples)
    T = max(len(t) for _, t in examples) + 1
    src = torch.full((len(examples), S), PAD, dtype=torch.long)
    tin = torch.full((len(examples), T), PAD, dtype=torch.long)
    tout = torch.full((len(examples), T), PAD, dtype=torch.long)
    for i, (s, t) in enumerate(examples):
        src[i, : len(s)] = torch.tensor(s)
        tin[i, : len(t) + 1] = torch.tensor([BOS] + t)
        tout[i, : len(t) + 1] = torch.tensor(t + [EOS])
    return src.to(device), tin.to(device), tout.to(device)


# --- schedule, optimizer -------------------------------------------------------------------------------------
def lr_at(step: int, total: int, t: dict) -> float:
    """Linear warmup to t["lr"], then inverse square root or cosine decay. `step` counts from 1."""
    warm = max(1, t["warmup"])
    if step <= warm:
        return t["lr"] * step / warm
    if t["schedule"] == "inverse_sqrt":
        return t["lr"] * math.sqrt(warm / step)
    if t["schedule"] == "cosine":
        frac = min(1.0, (step - warm) / max(1, total - warm))
        lo = t["lr"] * t["min_lr_ratio"]
        return lo + (t["lr"] - lo) * 0.5 * (1 + math.cos(math.pi * frac))
    raise ValueError(f"train.schedule must be inverse_sqrt or cosine, got {t['schedule']!r}")


def make_optimizer(model, t: dict) -> torch.optim.Optimizer:
    decay, rest = [], []
    for name, p in model.named_parameters():
        # Weight decay on matrices only: not biases, norms or embeddings (the tied output matrix is one).
        (decay if p.dim() >= 2 and "embed" not in name else rest).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": t["weight_decay"]},
                              {"params": rest, "weight_decay": 0.0}], lr=t["lr"], betas=tuple(t["betas"]))


# --- checkpoints ---------------------------------------------------------------------------------------------
def save_atomic(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found (train first, or pass --checkpoint)")
    return torch.load(path, map_location="cpu", weights_only=False)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def model_from_checkpoint(ck: dict, kernels: str | None = None, device="cpu"):
    cfg = dict(ck["config"])
    if kernels:
        cfg["kernels"] = kernels
    src_tok, tgt_tok = Tokenizer(ck["src_spm"]), Tokenizer(ck["tgt_spm"])
    model = build_model(cfg, len(src_tok), len(tgt_tok))
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), src_tok, tgt_tok, cfg


# --- decoding and scores ---------------------------------------------------------------------------------
def translate_lines(model, src_tok: Tokenizer, tgt_tok: Tokenizer, lines: list[str], beam_size: int = 4,
                    length_penalty: float = 1.0, batch: int = 100, max_len_ratio: float = 1.5,
                    device="cpu", max_src: int = 256) -> list[str]:
    """Translations of `lines`, decoded in batches of similar length (then put back in order)."""
    model.eval()
    ids = [s[: max_src - 1] + [EOS] for s in src_tok.encode_batch(lines)]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        S = max(len(ids[i]) for i in chunk)
        src = torch.full((len(chunk), S), PAD, dtype=torch.long)
        for r, i in enumerate(chunk):
            src[r, : len(ids[i])] = torch.tensor(ids[i])
        src = src.to(device)
        max_len = int(10 + max_len_ratio * S)
        hyps = beam(model, src, max_len, beam_size, length_penalty) if beam_size > 1 else greedy(model, src, max_len)
        for i, h in zip(chunk, hyps):
            out[i] = tgt_tok.decode(h)
    return out


def scores(hyps: list[str], refs: list[str]) -> dict:
    import sacrebleu

    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    return {"bleu": b.score, "chrf": c.score, "bleu_sig": str(bleu.get_signature()),
            "chrf_sig": str(chrf.get_signature()), "bleu_str": str(b), "chrf_str": str(c)}


@torch.no_grad()
def mean_loss(model, examples, max_tokens: int, device) -> float:
    """Label-smoothed loss per target token over `examples` (teacher forcing)."""
    model.eval()
    total = ntok = 0.0
    for b in D.token_batches([(len(s), len(t) + 1) for s, t in examples], max_tokens, 0, 0, shuffle=False):
        src, tin, tout = collate([examples[i] for i in b], device)
        total += model(src, tin, tout).item()
        ntok += tout.ne(PAD).sum().item()
    return total / max(1.0, ntok)


# --- training ------------------------------------------------------------------------------------------------
def plot_curves(history: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    if history["train"]:
        a.plot(*zip(*history["train"]), label="train", lw=1)
    if history["dev"]:
        steps, dev_loss, bleu = zip(*history["dev"])
        a.plot(steps, dev_loss, "o-", label="dev")
        b.plot(steps, bleu, "o-", color="C2")
    a.set(xlabel="step", ylabel="loss per token (label-smoothed)", title="loss")
    a.legend()
    b.set(xlabel="step", ylabel="sacreBLEU", title="dev BLEU")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def _say(d: Dist, *a):
    if d.main:
        print(*a, flush=True)


def train(cfg: dict, resume: bool = False, progress: bool = True) -> dict:
    """Trains per `cfg`; returns {"test": scores, "history": ..., "steps": ..., "checkpoint": ...}.

    With `resume`, continues from run_dir/last.pt exactly where it stopped: same model, optimizer, data order
    and random state, so the result equals that of an uninterrupted run.
    """
    t_start = time.time()
    d = Dist(cfg.get("device", "auto"))
    tcfg, ecfg = cfg["train"], cfg["eval"]
    threads = tcfg.get("threads") or (max(1, (os.cpu_count() or 1) // d.world) if d.world > 1 else 0)
    if threads:
        torch.set_num_threads(threads)
    run_dir = cfg["run_dir"]
    os.makedirs(run_dir, exist_ok=True)
    last_path, best_path = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "best.pt")
    ck = load_checkpoint(last_path) if resume else None
    if ck is not None:
        # The run's own config wins, except for keys that only say how long to go on.
        cfg = {**ck["config"], "run_dir": run_dir}
        cfg["train"] = {**ck["config"]["train"], **{k: tcfg[k] for k in ("max_steps", "epochs", "stop_after",
                                                                       "time_limit", "save_every")}}
        tcfg = cfg["train"]

    clean = D.Cleaning(skip=bool(cfg["data"]["clean"]), max_len=cfg["data"].get("max_chars", 0))
    train_pairs = _read(cfg, "train", clean)
    dev_pairs = _read(cfg, "dev", D.Cleaning(skip=clean.skip))
    if clean.skipped:
        _say(d, "data: skipped " + ", ".join(f"{n} x {why}" for why, n in clean.skipped.items()))
    if not train_pairs:
        raise D.DataError("no training pairs")
    _say(d, f"data: {len(train_pairs)} train / {len(dev_pairs)} dev pairs")

    tk = cfg["tokenizer"]
    if ck is not None:
        protos = (ck["src_spm"], ck["tgt_spm"])
    else:
        protos = None
        if d.main:
            t0 = time.time()
            src_tok = Tokenizer.train((k for k, _ in train_pairs), tk["src_vocab"], tk["model_type"], 0.9995)
            tgt_tok = Tokenizer.train((e for _, e in train_pairs), tk["tgt_vocab"], tk["model_type"], 1.0)
            protos = (src_tok.proto, tgt_tok.proto)
            _say(d, f"tokenizer: sentencepiece {tk['model_type']}, {len(src_tok)} ko / {len(tgt_tok)} en pieces "
                    f"({time.time() - t0:.1f}s)")
        protos = d.broadcast(protos)  # every process uses rank 0's models
    src_tok, tgt_tok = Tokenizer(protos[0]), Tokenizer(protos[1])
    train_ex = encode_pairs(train_pairs, src_tok, tgt_tok, tk["max_len"])
    dev_ex = encode_pairs(dev_pairs, src_tok, tgt_tok, tk["max_len"])
    lengths = [(len(s), len(t) + 1) for s, t in train_ex]

    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    model = build_model(cfg, len(src_tok), len(tgt_tok)).to(d.device)
    opt = make_optimizer(model, tcfg)
    state = {"step": 0, "epoch": 0, "batch": 0, "best_bleu": -1.0, "bad_epochs": 0,
             "history": {"train": [], "dev": []}, "train_seconds": 0.0}
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        state = ck["state"]
        _set_rng_state(ck["rng"])
        _say(d, f"resumed from {last_path} at step {state['step']} (epoch {state['epoch'] + 1}, "
                f"batch {state['batch']})")
    n_params = sum(p.numel() for p in model.parameters())
    _say(d, f"model: {cfg['model']['arch']} preset={cfg['model'].get('preset')} {n_params / 1e6:.2f}M parameters, "
            f"kernels={cfg['kernels']}, device={d.device}, processes={d.world}")
    net = model
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.device] if d.device.type == "cuda"
                                                        else None)

    batches_per_epoch = len(D.token_batches(lengths, tcfg["max_tokens"], cfg["seed"], 0))
    total_steps = batches_per_epoch * tcfg["epochs"]
    if tcfg["max_steps"]:
        total_steps = min(total_steps, tcfg["max_steps"])
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda" and tcfg["bf16"]
                else contextlib.nullcontext())

    def checkpoint(path: str) -> None:
        if d.main:
            save_atomic({"config": cfg, "model": model.state_dict(), "optimizer": opt.state_dict(),
                         "state": state, "rng": _rng_state(), "src_spm": src_tok.proto, "tgt_spm": tgt_tok.proto},
                        path)

    def evaluate_dev() -> tuple[float, dict]:
        dev_loss = mean_loss(model, dev_ex, tcfg["max_tokens"], d.device)
        sub = dev_pairs[: ecfg["dev_sentences"]]
        hyps = translate_lines(model, src_tok, tgt_tok, [k for k, _ in sub], ecfg["dev_beam"],
                               ecfg["length_penalty"], ecfg["batch_sentences"], ecfg["max_len_ratio"], d.device)
        model.train()
        return dev_loss, scores(hyps, [e for _, e in sub])

    session_steps, stop, interrupted = 0, False, False
    # Ctrl-C (or SIGTERM) ends the run at the next step boundary with a checkpoint, so --resume continues it
    # exactly; a second Ctrl-C interrupts at once.
    signals = {"hit": False}

    def on_signal(signum, frame):
        if signals["hit"]:
            raise KeyboardInterrupt
        signals["hit"] = True
        _say(d, "\ninterrupted: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old_handlers[sig] = signal.signal(sig, on_signal)
    t_train = time.time() - state["train_seconds"]
    bar = None
    if d.main and progress:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=state["step"], desc="train", file=sys.stderr, dynamic_ncols=True,
                   mininterval=1.0)
    model.train()
    run_loss = run_tok = 0.0
    tok_clock, tok_count = time.time(), 0
    while state["epoch"] < tcfg["epochs"] and not stop:
        batches = D.token_batches(lengths, tcfg["max_tokens"], cfg["seed"], state["epoch"])
        while state["batch"] < len(batches):
            batch = batches[state["batch"]]
            # Each process takes every world-th sentence of the global batch: same global batch at any scale.
            mine = [train_ex[i] for i in batch[d.rank::d.world]] or [train_ex[batch[0]]]
            src, tin, tout = collate(mine, d.device)
            ntok_local = tout.ne(PAD).sum().item() if batch[d.rank::d.world] else 0
            ntok = d.sum(ntok_local)
            lr = lr_at(state["step"] + 1, total_steps, tcfg)
            for g in opt.param_groups:
                g["lr"] = lr
            with autocast:
                loss_sum = net(src, tin, tout)
            if not batch[d.rank::d.world]:
                loss_sum = loss_sum * 0  # an idle process still joins DDP's gradient all-reduce
            # DDP averages gradients over processes; scaling by world / global tokens makes that the mean over
            # every target token of the global batch, as in one process.
            (loss_sum * (d.world / ntok)).backward()
            if tcfg["clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg["clip"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            state["step"] += 1
            state["batch"] += 1
            session_steps += 1
            run_loss += d.sum(loss_sum.item())
            run_tok += ntok
            tok_count += ntok
            if state["step"] % tcfg["log_every"] == 0:
                state["history"]["train"].append((state["step"], run_loss / run_tok))
                if bar is not None:
                    now = time.time()
                    bar.set_postfix(loss=f"{run_loss / run_tok:.3f}", tok_s=f"{tok_count / (now - tok_clock):.0f}",
                                    lr=f"{lr:.2e}", refresh=False)
                    tok_clock, tok_count = now, 0
                run_loss = run_tok = 0.0
            if bar is not None:
                bar.update(1)
            state["train_seconds"] = time.time() - t_train
            if tcfg["save_every"] and state["step"] % tcfg["save_every"] == 0:
                checkpoint(last_path)
            # Rank 0's clock and signals decide for every process.
            out_of_time, hit = d.broadcast((bool(tcfg["time_limit"]) and state["train_seconds"] >=
                                            tcfg["time_limit"], signals["hit"]))
            if (tcfg["stop_after"] and session_steps >= tcfg["stop_after"]) or hit:
                stop = interrupted = True
            if (tcfg["max_steps"] and state["step"] >= tcfg["max_steps"]) or out_of_time:
                stop = True
            if stop:
                break
        if interrupted:
            break
        # End of an epoch (or of the step/time budget): validate, keep the best, maybe stop early.
        if d.main:
            dev_loss, sc = evaluate_dev()
            state["history"]["dev"].append((state["step"], dev_loss, sc["bleu"]))
            msg = (f"epoch {state['epoch'] + 1} step {state['step']}: dev loss {dev_loss:.3f}, "
                   f"BLEU {sc['bleu']:.2f}, chrF {sc['chrf']:.2f}  ({time.time() - t_start:.0f}s)")
            if not state["history"]["dev"][:-1]:
                msg += f"\n  dev BLEU signature: {sc['bleu_sig']}"
            if bar is not None:
                bar.write(msg)
            else:
                print(msg, flush=True)
            if sc["bleu"] > state["best_bleu"]:
                state["best_bleu"], state["bad_epochs"] = sc["bleu"], 0
                checkpoint(best_path)
            else:
                state["bad_epochs"] += 1
            plot_curves(state["history"], os.path.join(run_dir, "curves.png"))
        state["bad_epochs"] = d.broadcast(state["bad_epochs"])
        if state["batch"] >= len(batches):  # advanced only now, so an interruption never skips validation
            state["epoch"] += 1
            state["batch"] = 0
        if tcfg["patience"] and state["bad_epochs"] >= tcfg["patience"]:
            _say(d, f"early stopping: no better dev BLEU for {state['bad_epochs']} epochs")
            stop = True
    if bar is not None:
        bar.close()
    for sig, handler in old_handlers.items():
        signal.signal(sig, handler)
    checkpoint(last_path)
    result = {"steps": state["step"], "history": state["history"], "checkpoint": best_path, "interrupted": interrupted,
              "model": model, "train_seconds": state["train_seconds"], "test": None}
    if interrupted:
        _say(d, f"stopped after {session_steps} steps (step {state['step']}); continue with --resume")
        return result
    if d.main:
        test_pairs = _read(cfg, "test", D.Cleaning(skip=clean.skip))
        if test_pairs:
            best, _, _, _ = model_from_checkpoint(load_checkpoint(best_path), device=d.device)
            hyps = translate_lines(best, src_tok, tgt_tok, [k for k, _ in test_pairs], ecfg["beam"],
                                   ecfg["length_penalty"], ecfg["batch_sentences"], ecfg["max_len_ratio"], d.device)
            sc = scores(hyps, [e for _, e in test_pairs])
            result["test"] = sc
            print(f"\ntest ({len(test_pairs)} pairs, beam {ecfg['beam']}): {sc['bleu_str']}\n  {sc['chrf_str']}")
            print(f"  BLEU signature: {sc['bleu_sig']}\n  chrF signature: {sc['chrf_sig']}")
            for (k, e), h in list(zip(test_pairs, hyps))[: ecfg["samples"]]:
                print(f"\n  ko:  {k}\n  ref: {e}\n  hyp: {h}")
        print(f"\ntotal {time.time() - t_start:.0f}s wall, {time.process_time():.0f}s CPU; checkpoints in {run_dir} (best.pt, last.pt), curve "
              f"{os.path.join(run_dir, 'curves.png')}", flush=True)
    if d.world > 1:
        dist.barrier()
    return result
