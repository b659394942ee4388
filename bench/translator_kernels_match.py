"""The kernels' equivalence check on the translator at full length: the same N fp32 training steps (default 200) on CPU with
kernels=fastnn and kernels=torch from the same seed; prints both loss curves' largest relative difference.

    python bench/translator_kernels_match.py [--steps 200] [--arch transformer|lstm] [--preset small]

(tests/test_translator.py runs the same comparison for 25 steps of a tiny model.)
"""
from __future__ import annotations

import argparse
import tempfile

from fastnn.translator import config as C
from fastnn.translator.train import train


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--arch", default="transformer")
    p.add_argument("--preset", default="small")
    p.add_argument("--max-tokens", type=int, default=1500)
    a = p.parse_args()
    curves = {}
    for kernels in ("fastnn", "torch"):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = C.load(sets=[f"run_dir={tmp}", f"kernels={kernels}", f"model.arch={a.arch}",
                               f"model.preset={a.preset}", "model.dropout=0.0", f"train.max_steps={a.steps}",
                               "train.epochs=1000", "train.log_every=1", "train.patience=0",
                               f"train.max_tokens={a.max_tokens}", "data.builtin_size=6000", "eval.beam=1",
                               "eval.dev_sentences=50", "data.dev=builtin:dev[:50]", "data.test=builtin:test[:50]",
                               "eval.samples=0"])
            curves[kernels] = [loss for _, loss in train(cfg, progress=False)["history"]["train"]]
    f, t = curves["fastnn"], curves["torch"]
    rel = [abs(x - y) / abs(y) for x, y in zip(f, t)]
    worst = max(range(len(rel)), key=rel.__getitem__)
    print(f"\n{len(f)} steps, {a.arch}/{a.preset}: loss {t[0]:.4f} -> {t[-1]:.4f} (torch), {f[0]:.4f} -> {f[-1]:.4f} "
          f"(fastnn); max relative difference {rel[worst]:.2e} at step {worst + 1} "
          f"({'within' if rel[worst] <= 1e-3 else 'OUTSIDE'} 1e-3)")


if __name__ == "__main__":
    main()
