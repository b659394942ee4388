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


def _resumed_config(cfg: dict, ck: dict) -> dict:
    """The config a resumed run goes on with.

    Args:
        cfg: the config given now.
        ck: the run's last checkpoint.

    Returns:
        The checkpoint's config, with cfg's run_dir and cfg's values of the train keys below.
    """
    # The run's own config wins, except for keys that only say how long to go on.
    run = {**ck["config"], "run_dir": cfg["run_dir"]}
    run["train"] = {**ck["config"]["train"], **{k: cfg["train"][k] for k in ("max_steps", "epochs", "stop_after",
                                                                           "time_limit", "save_every")}}
    return run


class Trainer:
    """One training run, shaped as JoeyNMT's TrainManager: the constructor sets it up, `run()` carries it out.

    `run()` trains epoch by epoch (`train_step` per batch), validates after each epoch (`validate`), saves
    checkpoints (`save`), and at the end scores the best checkpoint on the test split (`test`). With `resume`,
    the constructor continues from run_dir/last.pt exactly where it stopped (`_resume`): same model, optimizer,
    data order and random state, so the result equals that of an uninterrupted run.
    """

    def __init__(self, cfg: dict, resume: bool = False, progress: bool = True):
        """Reads the data, makes the tokenizers, builds the model and optimizer (or resumes them).

        Args:
            cfg: a full config, as config.load returns.
            resume: continue from run_dir/last.pt.
            progress: show a tqdm bar (rank 0 only).
        """
        self.t_start = time.time()
        self.proc = Dist(cfg.get("device", "auto"))
        self.progress = progress
        self._set_threads(cfg["train"])
        self.run_dir = cfg["run_dir"]
        os.makedirs(self.run_dir, exist_ok=True)
        self.last_path, self.best_path = os.path.join(self.run_dir, "last.pt"), os.path.join(self.run_dir, "best.pt")
        ck = load_checkpoint(self.last_path) if resume else None
        self.cfg = cfg if ck is None else _resumed_config(cfg, ck)
        self.tcfg = self.cfg["train"]
        self.ecfg = cfg["eval"]  # the eval section as given now, also on resume
        self._load_data()
        self._make_tokenizers(ck)
        self._encode_data()
        self._build_model(ck)
        self._plan_steps()
        self.session_steps, self.stop, self.interrupted, self.signal_hit = 0, False, False, False

    # --- set up ----------------------------------------------------------------------------------------------
    def _say(self, *a) -> None:
        if self.proc.main:
            print(*a, flush=True)

    def _set_threads(self, tcfg: dict) -> None:
        world = self.proc.world
        threads = tcfg.get("threads") or (max(1, (os.cpu_count() or 1) // world) if world > 1 else 0)
        if threads:
            torch.set_num_threads(threads)

    def _load_data(self) -> None:
        """Reads the train and dev pairs; only the training pairs are cut to data.max_chars."""
        data = self.cfg["data"]
        clean = D.Cleaning(skip=bool(data["clean"]), max_len=data.get("max_chars", 0))
        self.clean_skip = clean.skip
        self.train_pairs = _read(self.cfg, "train", clean)
        self.dev_pairs = _read(self.cfg, "dev", D.Cleaning(skip=clean.skip))
        if clean.skipped:
            self._say("data: skipped " + ", ".join(f"{n} x {why}" for why, n in clean.skipped.items()))
        if not self.train_pairs:
            raise D.DataError("no training pairs")
        self._say(f"data: {len(self.train_pairs)} train / {len(self.dev_pairs)} dev pairs")

    def _make_tokenizers(self, ck: dict | None) -> None:
        """The checkpoint's SentencePiece models on resume, else the ones rank 0 trains on the training pairs."""
        if ck is not None:
            protos = (ck["src_spm"], ck["tgt_spm"])
        else:
            protos = self.proc.broadcast(self._train_tokenizers())  # every process uses rank 0's models
        self.src_tok, self.tgt_tok = Tokenizer(protos[0]), Tokenizer(protos[1])

    def _train_tokenizers(self) -> tuple[bytes, bytes] | None:
        """Trains one SentencePiece model per language on the training pairs, on rank 0 only.

        Returns:
            The (source, target) models, serialized; None on the other ranks.
        """
        if not self.proc.main:
            return None
        tk = self.cfg["tokenizer"]
        t0 = time.time()
        src_tok = Tokenizer.train((k for k, _ in self.train_pairs), tk["src_vocab"], tk["model_type"], 0.9995)
        tgt_tok = Tokenizer.train((e for _, e in self.train_pairs), tk["tgt_vocab"], tk["model_type"], 1.0)
        self._say(f"tokenizer: sentencepiece {tk['model_type']}, {len(src_tok)} ko / {len(tgt_tok)} en pieces "
                  f"({time.time() - t0:.1f}s)")
        return src_tok.proto, tgt_tok.proto

    def _encode_data(self) -> None:
        max_len = self.cfg["tokenizer"]["max_len"]
        self.train_ex = encode_pairs(self.train_pairs, self.src_tok, self.tgt_tok, max_len)
        self.dev_ex = encode_pairs(self.dev_pairs, self.src_tok, self.tgt_tok, max_len)
        self.lengths = [(len(s), len(t) + 1) for s, t in self.train_ex]

    def _build_model(self, ck: dict | None) -> None:
        """The model and optimizer from the config's seed; on resume, then the checkpoint's state."""
        cfg, proc = self.cfg, self.proc
        torch.manual_seed(cfg["seed"])
        random.seed(cfg["seed"])
        self.model = build_model(cfg, len(self.src_tok), len(self.tgt_tok)).to(proc.device)
        self.opt = make_optimizer(self.model, self.tcfg)
        self.state = {"step": 0, "epoch": 0, "batch": 0, "best_bleu": -1.0, "bad_epochs": 0,
                      "history": {"train": [], "dev": []}, "train_seconds": 0.0}
        if ck is not None:
            self._resume(ck)
        n_params = sum(p.numel() for p in self.model.parameters())
        self._say(f"model: {cfg['model']['arch']} preset={cfg['model'].get('preset')} {n_params / 1e6:.2f}M "
                  f"parameters, kernels={cfg['kernels']}, device={proc.device}, processes={proc.world}")
        self.net = self.model
        if proc.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[proc.device] if proc.device.type == "cuda" else None)

    def _plan_steps(self) -> None:
        """The schedule's length in steps, and the autocast of every training step."""
        t = self.tcfg
        self.total_steps = len(self._epoch_batches(0)) * t["epochs"]
        if t["max_steps"]:
            self.total_steps = min(self.total_steps, t["max_steps"])
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.proc.device.type == "cuda" and t["bf16"]
                         else contextlib.nullcontext())

    def _epoch_batches(self, epoch: int) -> list:
        return D.token_batches(self.lengths, self.tcfg["max_tokens"], self.cfg["seed"], epoch)

    # --- save and resume -------------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Writes all that `_resume` needs to `path` (rank 0 only)."""
        if self.proc.main:
            save_atomic({"config": self.cfg, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                         "state": self.state, "rng": _rng_state(), "src_spm": self.src_tok.proto,
                         "tgt_spm": self.tgt_tok.proto}, path)

    def _resume(self, ck: dict) -> None:
        """Takes the model, optimizer, counters and random state from `ck`, a checkpoint `save` wrote."""
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.state = ck["state"]
        _set_rng_state(ck["rng"])
        self._say(f"resumed from {self.last_path} at step {self.state['step']} (epoch {self.state['epoch'] + 1}, "
                  f"batch {self.state['batch']})")

    # --- run -------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Trains and validates, saves last.pt, then (unless interrupted) tests the best checkpoint.

        Returns:
            {"steps", "history", "checkpoint": best.pt's path, "interrupted", "model", "train_seconds",
            "test": the test scores, or None when interrupted, on ranks other than 0 or without test pairs}.
        """
        old_handlers = self._catch_signals()
        self.t_train = time.time() - self.state["train_seconds"]
        self.bar = self._progress_bar()
        try:
            self.train_and_validate()
        finally:  # also after a second Ctrl-C: the caller gets its own handlers back
            if self.bar is not None:
                self.bar.close()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
        self.save(self.last_path)
        state = self.state
        result = {"steps": state["step"], "history": state["history"], "checkpoint": self.best_path,
                  "interrupted": self.interrupted, "model": self.model, "train_seconds": state["train_seconds"],
                  "test": None}
        if self.interrupted:
            self._say(f"stopped after {self.session_steps} steps (step {state['step']}); continue with --resume")
            return result
        if self.proc.main:
            result["test"] = self.test()
            print(f"\ntotal {time.time() - self.t_start:.0f}s wall, {time.process_time():.0f}s CPU; checkpoints in "
                  f"{self.run_dir} (best.pt, last.pt), curve {os.path.join(self.run_dir, 'curves.png')}", flush=True)
        if self.proc.world > 1:
            dist.barrier()
        return result

    def _catch_signals(self) -> dict:
        """Installs `_on_signal` for SIGINT and SIGTERM, where it can (in the main thread).

        Returns:
            The handlers it replaced, by signal.
        """
        # Ctrl-C (or SIGTERM) ends the run at the next step boundary with a checkpoint, so --resume continues it
        # exactly; a second Ctrl-C interrupts at once.
        old_handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old_handlers[sig] = signal.signal(sig, self._on_signal)
        return old_handlers

    def _on_signal(self, signum, frame) -> None:
        if self.signal_hit:
            raise KeyboardInterrupt
        self.signal_hit = True
        self._say("\ninterrupted: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    def _progress_bar(self):
        if not (self.proc.main and self.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.state["step"], desc="train", file=sys.stderr,
                    dynamic_ncols=True, mininterval=1.0)

    def train_and_validate(self) -> None:
        """Epochs of training steps, each followed by validation, until the epochs, the step or time budget, an
        interruption or early stopping end the run."""
        self.model.train()
        self.run_loss = self.run_tok = 0.0
        self.tok_clock, self.tok_count = time.time(), 0
        while self.state["epoch"] < self.tcfg["epochs"] and not self.stop:
            batches = self._epoch_batches(self.state["epoch"])
            while self.state["batch"] < len(batches) and not self.stop:
                loss_sum, ntok, lr = self.train_step(batches[self.state["batch"]])
                self._log_step(loss_sum, ntok, lr)
                self._save_and_check_stop()
            if self.interrupted:
                break
            self._end_epoch(len(batches))

    # --- one step --------------------------------------------------------------------------------------------
    def train_step(self, batch: list[int]) -> tuple[torch.Tensor, float, float]:
        """One optimizer step on one global batch, of which this process takes its share.

        Args:
            batch: indices into the training examples.

        Returns:
            (this process's summed loss, the global batch's target tokens, the learning rate of the step).
        """
        proc, t = self.proc, self.tcfg
        share = batch[proc.rank::proc.world]
        # Each process takes every world-th sentence of the global batch: same global batch at any scale.
        mine = [self.train_ex[i] for i in share] or [self.train_ex[batch[0]]]
        src, tin, tout = collate(mine, proc.device)
        ntok = proc.sum(tout.ne(PAD).sum().item() if share else 0)
        lr = lr_at(self.state["step"] + 1, self.total_steps, t)
        for g in self.opt.param_groups:
            g["lr"] = lr
        with self.autocast:
            loss_sum = self.net(src, tin, tout)
        if not share:
            loss_sum = loss_sum * 0  # an idle process still joins DDP's gradient all-reduce
        # DDP averages gradients over processes; scaling by world / global tokens makes that the mean over
        # every target token of the global batch, as in one process.
        (loss_sum * (proc.world / ntok)).backward()
        if t["clip"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t["clip"])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.state["step"] += 1
        self.state["batch"] += 1
        self.session_steps += 1
        return loss_sum, ntok, lr

    def _log_step(self, loss_sum: torch.Tensor, ntok: float, lr: float) -> None:
        """Adds the step to the running loss; every train.log_every steps, to the history and the bar."""
        self.run_loss += self.proc.sum(loss_sum.item())
        self.run_tok += ntok
        self.tok_count += ntok
        if self.state["step"] % self.tcfg["log_every"] == 0:
            self.state["history"]["train"].append((self.state["step"], self.run_loss / self.run_tok))
            if self.bar is not None:
                now = time.time()
                self.bar.set_postfix(loss=f"{self.run_loss / self.run_tok:.3f}",
                                     tok_s=f"{self.tok_count / (now - self.tok_clock):.0f}", lr=f"{lr:.2e}",
                                     refresh=False)
                self.tok_clock, self.tok_count = now, 0
            self.run_loss = self.run_tok = 0.0
        if self.bar is not None:
            self.bar.update(1)

    def _save_and_check_stop(self) -> None:
        """Saves last.pt every train.save_every steps; sets `stop` (and `interrupted`) when a budget is spent."""
        t, state = self.tcfg, self.state
        state["train_seconds"] = time.time() - self.t_train
        if t["save_every"] and state["step"] % t["save_every"] == 0:
            self.save(self.last_path)
        # Rank 0's clock and signals decide for every process.
        out_of_time, hit = self.proc.broadcast((bool(t["time_limit"]) and state["train_seconds"] >= t["time_limit"],
                                                self.signal_hit))
        if (t["stop_after"] and self.session_steps >= t["stop_after"]) or hit:
            self.stop = self.interrupted = True
        if (t["max_steps"] and state["step"] >= t["max_steps"]) or out_of_time:
            self.stop = True

    # --- evaluate --------------------------------------------------------------------------------------------
    def _end_epoch(self, n_batches: int) -> None:
        """End of an epoch (or of the step/time budget): validate, keep the best, maybe stop early."""
        state = self.state
        if self.proc.main:
            self.validate()
        state["bad_epochs"] = self.proc.broadcast(state["bad_epochs"])
        if state["batch"] >= n_batches:  # advanced only now, so an interruption never skips validation
            state["epoch"] += 1
            state["batch"] = 0
        if self.tcfg["patience"] and state["bad_epochs"] >= self.tcfg["patience"]:
            self._say(f"early stopping: no better dev BLEU for {state['bad_epochs']} epochs")
            self.stop = True

    def validate(self) -> None:
        """Scores the dev set, reports it, saves best.pt on a better BLEU and redraws the curves (rank 0 only)."""
        state = self.state
        dev_loss, sc = self.evaluate_dev()
        state["history"]["dev"].append((state["step"], dev_loss, sc["bleu"]))
        msg = (f"epoch {state['epoch'] + 1} step {state['step']}: dev loss {dev_loss:.3f}, "
               f"BLEU {sc['bleu']:.2f}, chrF {sc['chrf']:.2f}  ({time.time() - self.t_start:.0f}s)")
        if not state["history"]["dev"][:-1]:
            msg += f"\n  dev BLEU signature: {sc['bleu_sig']}"
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)
        if sc["bleu"] > state["best_bleu"]:
            state["best_bleu"], state["bad_epochs"] = sc["bleu"], 0
            self.save(self.best_path)
        else:
            state["bad_epochs"] += 1
        plot_curves(state["history"], os.path.join(self.run_dir, "curves.png"))

    def evaluate_dev(self) -> tuple[float, dict]:
        """Scores the model on the dev set, then puts it back in training mode.

        Returns:
            (the dev loss per target token, `scores` of the first eval.dev_sentences dev translations).
        """
        dev_loss = mean_loss(self.model, self.dev_ex, self.tcfg["max_tokens"], self.proc.device)
        sub = self.dev_pairs[: self.ecfg["dev_sentences"]]
        hyps = self._translate(self.model, sub, self.ecfg["dev_beam"])
        self.model.train()
        return dev_loss, scores(hyps, [e for _, e in sub])

    def test(self) -> dict | None:
        """Translates the test split with best.pt and prints its scores and a few samples (rank 0 only).

        Returns:
            `scores` of the translations, or None without test pairs.
        """
        ecfg = self.ecfg
        test_pairs = _read(self.cfg, "test", D.Cleaning(skip=self.clean_skip))
        if not test_pairs:
            return None
        best, _, _, _ = model_from_checkpoint(load_checkpoint(self.best_path), device=self.proc.device)
        hyps = self._translate(best, test_pairs, ecfg["beam"])
        sc = scores(hyps, [e for _, e in test_pairs])
        print(f"\ntest ({len(test_pairs)} pairs, beam {ecfg['beam']}): {sc['bleu_str']}\n  {sc['chrf_str']}")
        print(f"  BLEU signature: {sc['bleu_sig']}\n  chrF signature: {sc['chrf_sig']}")
        for (k, e), h in list(zip(test_pairs, hyps))[: ecfg["samples"]]:
            print(f"\n  ko:  {k}\n  ref: {e}\n  hyp: {h}")
        return sc

    def _translate(self, model, pairs: list, beam_size: int) -> list[str]:
        """Translations of the sources of `pairs`, with the eval section's decoding settings."""
        e = self.ecfg
        return translate_lines(model, self.src_tok, self.tgt_tok, [k for k, _ in pairs], beam_size,
                               e["length_penalty"], e["batch_sentences"], e["max_len_ratio"], self.proc.device)


def train(cfg: dict, resume: bool = False, progress: bool = True) -> dict:
    """Trains per `cfg`; returns {"test": scores, "history": ..., "steps": ..., "checkpoint": ...}.

    With `resume`, continues from run_dir/last.pt exactly where it stopped: same model, optimizer, data order
    and random state, so the result equals that of an uninterrupted run.
    """
    return Trainer(cfg, resume, progress).run()
