"""fastnn-translate: train, evaluate and use a Korean→English translator.

    fastnn-translate train                          # small model, built-in corpus, a few minutes on a CPU
    fastnn-translate train --config my.yaml --set model.preset=course --set train.lr=5e-4
    torchrun --nproc_per_node 2 -m fastnn.translator train      # data-parallel (gloo on CPU, NCCL on GPU)
    fastnn-translate train --resume                 # continue runs/default/last.pt
    fastnn-translate evaluate [--data news.test]    # BLEU and chrF with signatures
    fastnn-translate translate "나는 어제 사과를 먹었다."   # or --input file, or lines on stdin
    fastnn-translate download [--dest DIR]          # the korean-english-park news corpus
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from . import config as C


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file merged over the default config (fastnn/translator/default.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set train.lr=1e-3 (repeatable)")


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--checkpoint", help="default: <run_dir>/best.pt")
    p.add_argument("--beam", type=int, help="beam size (1: greedy); default: eval.beam")
    p.add_argument("--length-penalty", type=float, help="default: eval.length_penalty")
    p.add_argument("--kernels", choices=["fastnn", "torch"], help="module library (default: the checkpoint's)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fastnn-translate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model (no arguments: the small model on the built-in corpus)")
    _common(t)
    t.add_argument("--resume", action="store_true", help="continue from <run_dir>/last.pt")
    t.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    e = sub.add_parser("evaluate", help="BLEU and chrF on a test set")
    _checkpoint_args(e)
    e.add_argument("--data", action="append", help="test source spec(s) (default: the config's data.test)")
    e.add_argument("--output", help="write the translations here")
    tr = sub.add_parser("translate", help="translate sentences from arguments, --input or stdin")
    _checkpoint_args(tr)
    tr.add_argument("text", nargs="*", help="Korean sentences (none: read --input or stdin)")
    tr.add_argument("--input", help="file with one sentence per line")
    dl = sub.add_parser("download", help="fetch the korean-english-park news corpus (train/dev/test archives)")
    dl.add_argument("--dest", help="cache folder (default: $FASTNN_DATA or ~/.cache/fastnn/ko-en)")
    dl.add_argument("--base-url", default=None, help="where the archives are (default: the corpus repository)")
    dl.add_argument("--split", action="append", choices=["train", "dev", "test"], help="default: all three")
    dl.add_argument("--sha256", action="append", default=[], metavar="NAME=DIGEST", help="expected digest")
    return ap


def _load_model(args, cfg):
    import torch

    from .train import load_checkpoint, model_from_checkpoint

    path = args.checkpoint or os.path.join(cfg["run_dir"], "best.pt")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, src_tok, tgt_tok, ck_cfg = model_from_checkpoint(load_checkpoint(path), args.kernels, device)
    ev = ck_cfg["eval"]
    beam = args.beam if args.beam is not None else ev["beam"]
    lp = args.length_penalty if args.length_penalty is not None else ev["length_penalty"]
    return model, src_tok, tgt_tok, ck_cfg, dict(beam_size=beam, length_penalty=lp, batch=ev["batch_sentences"],
                                                 max_len_ratio=ev["max_len_ratio"], device=device)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if args.command == "download":
        from . import data as D

        names = [f"korean-english-park.{s}.tar.gz" for s in (args.split or ["train", "dev", "test"])]
        sums = dict(s.split("=", 1) for s in args.sha256)
        paths = D.download(args.dest or D.default_cache(), args.base_url or D.NEWS_URL, names, sums)
        for p in paths:
            print(f"{p}: {len(D.read_archive(p))} pairs")
        return 0
    cfg = C.load(args.config, args.set)
    if args.command == "train":
        logging.getLogger("fastnn.translator").setLevel(logging.INFO)
        from .train import train

        import torch.distributed as dist

        try:
            train(cfg, resume=args.resume, progress=not args.no_progress)
        finally:
            # A torchrun process ends its process group itself: left to the interpreter's exit, gloo's threads
            # can outlive their group's destructor and abort the process after a finished run.
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        return 0
    from .train import scores, translate_lines

    model, src_tok, tgt_tok, ck_cfg, opts = _load_model(args, cfg)
    if args.command == "evaluate":
        from . import data as D

        pairs = D.read_specs(args.data or ck_cfg["data"]["test"], D.Cleaning(skip=bool(cfg["data"]["clean"])),
                             ck_cfg["data"].get("builtin_size", 30000))
        hyps = translate_lines(model, src_tok, tgt_tok, [k for k, _ in pairs], **opts)
        sc = scores(hyps, [e for _, e in pairs])
        print(f"{len(pairs)} pairs, beam {opts['beam_size']}, length penalty {opts['length_penalty']}")
        print(f"{sc['bleu_str']}\n  signature: {sc['bleu_sig']}\n{sc['chrf_str']}\n  signature: {sc['chrf_sig']}")
        if args.output:
            with open(args.output, "w") as f:
                f.writelines(h + "\n" for h in hyps)
        return 0
    lines = args.text
    if not lines:
        stream = open(args.input, encoding="utf-8") if args.input else sys.stdin
        lines = [ln.rstrip("\n") for ln in stream]
    keep = [i for i, ln in enumerate(lines) if ln.strip()]
    hyps = translate_lines(model, src_tok, tgt_tok, [lines[i] for i in keep], **opts)
    out = [""] * len(lines)
    for i, h in zip(keep, hyps):
        out[i] = h
    sys.stdout.write("".join(h + "\n" for h in out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
