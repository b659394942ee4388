"""The Korean→English translator (fastnn/translator): data readers and their errors, the download command
against a local server, the tokenizer, both architectures on both kernel libraries, training equivalences
(fastnn vs torch kernels, 2-process DDP vs 1 process, resume vs uninterrupted), beam search, the CLI."""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import subprocess
import sys
import tarfile
import threading
import time

import pytest
import torch

from fastnn.translator import config as C
from fastnn.translator import corpus
from fastnn.translator import data as D
from fastnn.translator import search
from fastnn.translator.__main__ import main as cli
from fastnn.translator.model import build_model, kernel_modules
from fastnn.translator.tokenizer import BOS, EOS, PAD, Tokenizer
from fastnn.translator.train import load_checkpoint, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("FASTNN_KOEN_DATA", os.path.join(ROOT, "..", "shared", "data", "ko-en"))


def tiny_cfg(tmp_path, *sets, name="run"):
    """A config that trains in seconds: tiny model, 600 built-in pairs, small batches."""
    base = [f"run_dir={tmp_path / name}", "model.preset=tiny", "data.builtin_size=600",
            "data.dev=builtin:dev[:40]", "data.test=builtin:test[:40]", "tokenizer.src_vocab=300",
            "tokenizer.tgt_vocab=300", "train.max_tokens=600", "train.epochs=2", "train.warmup=10",
            "train.lr=3e-3", "train.log_every=1", "train.threads=1", "eval.beam=2", "eval.dev_sentences=40",
            "eval.samples=0", "train.patience=0"]
    return C.load(sets=base + list(sets))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One trained tiny model shared by the search and CLI tests."""
    torch.manual_seed(0)
    cfg = tiny_cfg(tmp_path_factory.mktemp("tiny"), "train.epochs=3", "data.builtin_size=1500")
    return train(cfg, progress=False)


# --- the built-in corpus -----------------------------------------------------------------------------------
def test_builtin_corpus_fixed_and_disjoint():
    test = corpus.generate("test")
    assert test == corpus.generate("test") and len(test) == corpus.SPLITS["test"]
    train_ko = {k for k, _ in corpus.generate("train", 3000)}
    # The test split is the same whatever the training size, and never trained on.
    assert not train_ko & {k for k, _ in test}
    assert corpus.generate("test") == D.read_spec("builtin:test")
    assert all(e.endswith((".", "?")) and k.endswith((".", "?")) for k, e in test)


@pytest.mark.parametrize("word,topic,obj", [("사과", "사과는", "사과를"), ("책", "책은", "책을"),
                                            ("물", "물은", "물을")])  # 물: final ㄹ is a consonant too
def test_particles_follow_final_consonant(word, topic, obj):
    assert corpus.topic(word) == topic and corpus.obj(word) == obj


# --- readers and their errors --------------------------------------------------------------------------------
def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def test_read_aligned_tsv_archive(tmp_path):
    _write(tmp_path / "a.ko", "안녕.\n고마워.\n".encode())
    _write(tmp_path / "a.en", b"Hi.\r\nThanks.\n")
    assert D.read_spec(str(tmp_path / "a")) == [("안녕.", "Hi."), ("고마워.", "Thanks.")]
    tsv = _write(tmp_path / "t.tsv", "Go.\t가.\tCC-BY 2.0 (France) Attribution: tatoeba.org\nHi.\t안녕.\n".encode())
    assert D.read_spec(tsv) == [("가.", "Go."), ("안녕.", "Hi.")]
    arc = _archive(tmp_path / "x.tar.gz", ["하나.", "둘."], ["One.", "Two."])
    assert D.read_spec(arc) == [("하나.", "One."), ("둘.", "Two.")]


def test_slices_and_complement(tmp_path):
    tsv = _write(tmp_path / "t.tsv", "".join(f"E{i}\tK{i}\n" for i in range(10)).encode())
    held = D.read_spec(tsv + "[::3]")
    rest = D.read_spec(tsv + "[!::3]")
    assert [k for k, _ in held] == ["K0", "K3", "K6", "K9"]
    assert len(rest) == 6 and not set(held) & set(rest)


def test_malformed_input_names_file_and_line(tmp_path):
    _write(tmp_path / "u.ko", "가\n나\n다\n".encode())
    _write(tmp_path / "u.en", b"a\nb\n")
    with pytest.raises(D.DataError, match=r"u\.ko has 3 lines but .*u\.en has 2"):
        D.read_spec(str(tmp_path / "u"))
    _write(tmp_path / "e.ko", "가\n\n다\n".encode())
    _write(tmp_path / "e.en", b"a\nb\nc\n")
    with pytest.raises(D.DataError, match=r"e\.ko:2: empty line"):
        D.read_spec(str(tmp_path / "e"))
    _write(tmp_path / "b.ko", "가\n나\n다\n".encode())
    _write(tmp_path / "b.en", b"a\n\xff\xfeb\nc\n")
    with pytest.raises(D.DataError, match=r"b\.en:2: invalid UTF-8"):
        D.read_spec(str(tmp_path / "b"))
    tsv = _write(tmp_path / "t.tsv", "Go.\t가.\nonly one column\n\t비어\n".encode())
    with pytest.raises(D.DataError, match=r"t\.tsv:2: expected English<TAB>Korean"):
        D.read_spec(tsv)
    # Cleaning skips and counts instead.
    clean = D.Cleaning(skip=True)
    assert D.read_spec(str(tmp_path / "e"), clean) == [("가", "a"), ("다", "c")]
    assert D.read_spec(str(tmp_path / "b"), clean) == [("가", "a"), ("다", "c")]
    assert D.read_spec(tsv, clean) == [("가.", "Go.")]
    assert clean.skipped == {"empty line": 1, "invalid UTF-8 at byte 0": 1,
                             "expected English<TAB>Korean, found 1 column": 1, "empty English column": 1}
    with pytest.raises(D.DataError, match="has 3 lines"):  # misalignment is never skippable
        D.read_spec(str(tmp_path / "u"), D.Cleaning(skip=True))
    with pytest.raises(D.DataError, match="no such file"):
        D.read_spec(str(tmp_path / "missing"))
    with pytest.raises(D.DataError, match="not a readable tar archive"):
        D.read_spec(_write(tmp_path / "bad.tar.gz", b"not a tar"))


# --- download ------------------------------------------------------------------------------------------------
def _archive(path, ko, en) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, lines in (("korean-english-park.dev.ko", ko), ("korean-english-park.dev.en", en)):
            blob = "".join(s + "\n" for s in lines).encode()
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return str(path)


@pytest.fixture
def local_server(tmp_path):
    """A static HTTP server on 127.0.0.1 serving tmp_path/srv."""
    root = tmp_path / "srv"
    root.mkdir()
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_download_from_local_server(tmp_path, local_server, capsys):
    root, url = local_server
    name = "korean-english-park.dev.tar.gz"
    arc = _archive(root / name, ["뉴스 하나.", "뉴스 둘."], ["News one.", "News two."])
    digest = hashlib.sha256(open(arc, "rb").read()).hexdigest()
    dest = tmp_path / "cache"
    (path,) = D.download(str(dest), url, [name], {name: digest}, progress=False)
    assert D.read_archive(path) == [("뉴스 하나.", "News one."), ("뉴스 둘.", "News two.")]
    assert f"{digest}  {name}" in (dest / "SHA256SUMS").read_text()
    # Cached: the second call verifies and does not fetch (the server no longer has it).
    os.remove(root / name)
    assert D.download(str(dest), url, [name], progress=False) == [path]
    # A wrong digest removes the download and says so.
    _archive(root / name, ["다른."], ["Other."])
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        D.download(str(tmp_path / "c2"), url, [name], {name: "0" * 64}, progress=False)
    assert not os.listdir(tmp_path / "c2") or os.listdir(tmp_path / "c2") == []
    # Unknown digest: pinned on first download; the command line reports the pairs.
    assert cli(["download", "--dest", str(tmp_path / "c3"), "--base-url", url, "--split", "dev"]) == 0
    out = capsys.readouterr().out
    assert "(pinned in" in out and "1 pairs" in out
    with pytest.raises(RuntimeError, match="download of .* failed"):
        D.download(str(tmp_path / "c4"), url, ["missing.tar.gz"], progress=False)


# --- tokenizer ---------------------------------------------------------------------------------------------
def test_tokenizer_roundtrip_and_serialization():
    pairs = corpus.generate("train", 1500)
    tok = Tokenizer.train((e for _, e in pairs), 300)
    assert tok.sp.pad_id() == PAD and tok.sp.bos_id() == BOS and tok.sp.eos_id() == EOS
    s = "On May 3, 2021, my friend bought two bicycles."
    ids = tok.encode(s)
    assert min(ids) > EOS and tok.decode(ids + [EOS, PAD]) == s
    assert "▁" in tok.pieces(s)[4] or tok.pieces("2021")[-4:] == ["2", "0", "2", "1"]  # digits split
    again = Tokenizer(tok.proto)
    assert again.encode(s) == ids and len(again) == len(tok)


# --- models --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["transformer", "lstm"])
@pytest.mark.parametrize("kernels", ["fastnn", "torch"])
def test_model_shapes(arch, kernels):
    cfg = C.load(sets=[f"model.arch={arch}", "model.preset=tiny", f"kernels={kernels}", "model.pre_norm=false"])
    model = build_model(cfg, 50, 40)
    src = torch.randint(4, 50, (3, 7))
    src[0, 5:] = PAD  # padded source
    tin = torch.randint(4, 40, (3, 5))
    mem = model.encode(src)
    hidden = model.hidden(tin, mem)
    assert hidden.shape == (3, 5, 32) and model.logits(hidden).shape == (3, 5, 40)
    # Incremental decoding (what search uses) gives the teacher-forced states position by position.
    cache, steps = None, []
    for t in range(tin.shape[1]):
        h, cache = model.step(tin[:, t:t + 1], mem, cache, t)
        steps.append(h)
    torch.testing.assert_close(torch.stack(steps, 1), hidden, rtol=1e-5, atol=1e-5)
    loss = model(src, tin, tin)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # Same parameter names with either library; a state_dict loads across.
    other = build_model(C.override(cfg, f"kernels={'torch' if kernels == 'fastnn' else 'fastnn'}"), 50, 40)
    assert list(model.state_dict()) == list(other.state_dict())
    other.load_state_dict(model.state_dict())
    if arch == "transformer":  # tied embeddings are one tensor
        assert model.out.weight is model.tgt_embed.tok.weight


def test_kernel_resolver():
    k = kernel_modules("fastnn")
    import fastnn

    for name in ("MultiheadAttention", "CrossEntropyLoss", "LSTM", "Softmax"):
        expect = getattr(fastnn.nn, name, None) or getattr(torch.nn, name)
        assert getattr(k, name) is expect and k.sources[name] == ("fastnn" if hasattr(fastnn.nn, name) else "torch")
    assert kernel_modules("torch").Softmax is torch.nn.Softmax
    with pytest.raises(ValueError, match="kernels must be"):
        kernel_modules("tf")


# --- training equivalences ---------------------------------------------------------------------------------
def _train_losses(cfg):
    return [loss for _, loss in train(cfg, progress=False)["history"]["train"]]


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_fastnn_and_torch_kernels_same_losses(tmp_path, arch):
    """The same fp32 steps from the same seed on either kernel library: losses within 1e-3 relative.
    (bench/translator_kernels_match.py runs 200 steps.)"""
    sets = [f"model.arch={arch}", "train.max_steps=25", "train.epochs=100", "eval.beam=1"]
    a = _train_losses(tiny_cfg(tmp_path, *sets, "kernels=fastnn", name="f"))
    b = _train_losses(tiny_cfg(tmp_path, *sets, "kernels=torch", name="t"))
    assert len(a) == len(b) == 25
    rel = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    assert rel <= 1e-3, rel
    assert a[-1] < a[0]


def _states_equal(a, b):
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_is_bit_exact(tmp_path):
    # Dropout on, so the saved random state matters; 600 pairs at 600 tokens are ~20 steps an epoch, so
    # stopping at step 27 interrupts the second epoch mid-way (data order restored from (seed, epoch)).
    sets = ["model.dropout=0.1", "train.epochs=2", "train.max_steps=34"]
    full = train(tiny_cfg(tmp_path, *sets, name="full"), progress=False)
    part = train(tiny_cfg(tmp_path, *sets, "train.stop_after=27", name="part"), progress=False)
    assert part["interrupted"] and part["steps"] == 27
    resumed = train(tiny_cfg(tmp_path, *sets, name="part"), resume=True, progress=False)
    assert resumed["steps"] == full["steps"] == 34
    assert resumed["history"] == full["history"]
    _states_equal(load_checkpoint(str(tmp_path / "full" / "last.pt"))["model"],
                  load_checkpoint(str(tmp_path / "part" / "last.pt"))["model"])


def test_ctrl_c_saves_and_resumes(tmp_path):
    """SIGINT mid-run: the step in flight finishes, last.pt is written, and --resume carries on."""
    import signal

    cfg = tiny_cfg(tmp_path, "train.epochs=1000", "train.max_steps=100000")
    def press_ctrl_c():  # once train() has installed its handler, and a few steps later
        for _ in range(1200):
            if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
                time.sleep(1.0)
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    presser.start()
    res = train(cfg, progress=False)
    presser.join()
    assert res["interrupted"] and 0 < res["steps"] < 100000
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    ck = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert ck["state"]["step"] == res["steps"]
    more = train(C.override(cfg, f"train.max_steps={res['steps'] + 3}"), resume=True, progress=False)
    assert more["steps"] == res["steps"] + 3 and not more["interrupted"]


def test_torchrun_two_processes_match_one(tmp_path):
    """2 gloo processes, each on half of every global batch, end where one process does."""
    sets = ["train.max_steps=8", "train.epochs=100", "eval.beam=1", "train.max_tokens=1200"]
    one = tiny_cfg(tmp_path, *sets, name="one")
    train(one, progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "fastnn.translator", "train", "--no-progress"] + [a for s in _sets(one, tmp_path / "two") for a in
                                                             ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "processes=2" in r.stdout
    a = load_checkpoint(str(tmp_path / "one" / "last.pt"))
    b = load_checkpoint(str(tmp_path / "two" / "last.pt"))
    assert a["src_spm"] == b["src_spm"] and b["state"]["step"] == 8
    la, lb = ([x for _, x in c["state"]["history"]["train"]] for c in (a, b))
    torch.testing.assert_close(lb, la, rtol=1e-6, atol=0)
    for k in a["model"]:
        x, y = a["model"][k], b["model"][k]
        if k.endswith("in_proj_bias"):
            # The key bias cannot change attention (softmax ignores a shift shared by a row), so its true
            # gradient is 0 and Adam turns the summation-order rounding left in it into lr-sized steps: only
            # the query and value parts are comparable.
            d = x.shape[0] // 3
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=k)


def _sets(cfg, run_dir):
    """--set arguments that reproduce `cfg` with another run_dir."""
    out = [f"run_dir={run_dir}"]
    for section in ("data", "tokenizer", "model", "train", "eval"):
        for k, v in cfg[section].items():
            out.append(f"{section}.{k}={'null' if v is None else v}" if not isinstance(v, list) else
                       f"{section}.{k}=[{', '.join(map(str, v))}]")
    return out


@pytest.mark.skipif(not os.path.isdir(SHARED), reason=f"{SHARED} not present")
def test_short_run_on_real_data(tmp_path, capsys):
    """Tatoeba (all but every 10th pair) + news dev + JHE dev for training; every 10th Tatoeba pair for test."""
    tsv = os.path.join(SHARED, "tatoeba.kor-eng.tsv")
    cfg = tiny_cfg(tmp_path, f"data.train=[{tsv}[!::10], {SHARED}/news.dev, {SHARED}/jhe.dev]",
                   f"data.dev={tsv}[::10][:60]", f"data.test={tsv}[::10][:150]", "tokenizer.src_vocab=1000",
                   "tokenizer.tgt_vocab=1000", "train.max_tokens=2000", "train.max_steps=60", "train.epochs=100",
                   "train.log_every=10", "eval.beam=1", "data.max_chars=150")
    res = train(cfg, progress=False)
    losses = [loss for _, loss in res["history"]["train"]]
    assert losses[-1] < 0.8 * losses[0], losses
    assert 0 <= res["test"]["bleu"] <= 100 and "BLEU signature" in capsys.readouterr().out


# --- search ------------------------------------------------------------------------------------------------
class _Table:
    """A 'model' whose next-token distribution depends only on the last token: a known search problem."""

    def __init__(self, table):
        self.table = torch.log(torch.tensor(table))

    def encode(self, src):
        return {"memory": src.float()}

    def step(self, tokens, memory, cache, position):
        return tokens[:, -1], []

    reorder = staticmethod(lambda cache, index: cache)

    def logits(self, hidden):
        return self.table[hidden]

    select = staticmethod(lambda memory, index: {k: v.index_select(0, index) for k, v in memory.items()})

    def eval(self):
        return self


def test_beam_beats_greedy_on_a_known_problem():
    # Tokens: 0 pad, 1 unk, 2 bos, 3 eos, 4 "A", 5 "B". After BOS: A 0.6, B 0.4. After A: nothing good
    # (A/B/EOS 1/3 each). After B: EOS 0.9. Greedy takes A; the best sequence is "B".
    e = 1e-9
    table = [[1 / 6] * 6] * 2 + [[e, e, e, e, 0.6, 0.4], [1 / 6] * 6, [e, e, e, 1 / 3, 1 / 3, 1 / 3],
                                 [e, e, e, 0.9, 0.05, 0.05]]
    model = _Table(table)
    src = torch.ones(2, 3, dtype=torch.long)
    assert search.greedy(model, src, 4)[0][0] == 4
    assert search.beam(model, src, 4, beam_size=2, length_penalty=0.0) == [[5], [5]]
    assert search.beam(model, src, 4, beam_size=1) == search.greedy(model, src, 4)


def _logprob(model, src_ids, hyp, length_penalty):
    """Teacher-forced score of one hypothesis (+ EOS), as beam search normalizes it."""
    src = torch.tensor([src_ids])
    tin, tout = torch.tensor([[BOS] + hyp]), torch.tensor([hyp + [EOS]])
    with torch.no_grad():
        logp = torch.log_softmax(model.logits(model.hidden(tin, model.encode(src))), -1)
    return logp.gather(-1, tout[..., None]).sum().item() / (len(hyp) + 1) ** length_penalty


def test_beam_batched_equals_one_by_one(tiny_run):
    """Padding a sentence into a batch changes nothing but rounding: the hypotheses found in a batch score
    (under the model) what the ones found alone do. Scores, not strings: a barely trained model has near-ties
    that rounding may break either way."""
    from fastnn.translator.train import model_from_checkpoint

    model, st, _, _ = model_from_checkpoint(load_checkpoint(tiny_run["checkpoint"]))
    ids = [s + [EOS] for s in st.encode_batch([k for k, _ in corpus.generate("test")[:6]])]
    S = max(map(len, ids))
    src = torch.tensor([s + [PAD] * (S - len(s)) for s in ids])
    for k, lp in ((1, 1.0), (3, 1.0), (3, 0.0)):
        together = search.beam(model, src, 30, k, lp)
        for s, hyp in zip(ids, together):
            (alone,) = search.beam(model, torch.tensor([s]), 30, k, lp)
            a, b = _logprob(model, s, hyp, lp), _logprob(model, s, alone, lp)
            assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (k, lp, hyp, alone, a, b)
    # A wider beam finds hypotheses at least as likely as greedy's on average (per-token scores).
    greedy = search.greedy(model, src, 30)
    wide = search.beam(model, src, 30, 4, 1.0)
    assert sum(_logprob(model, s, h, 1.0) for s, h in zip(ids, wide)) >= \
        sum(_logprob(model, s, h, 1.0) for s, h in zip(ids, greedy)) - 1e-4


# --- command line ------------------------------------------------------------------------------------------
def test_cli_translate_and_evaluate(tiny_run, tmp_path, capsys, monkeypatch):
    ck = tiny_run["checkpoint"]
    assert tiny_run["test"]["bleu"] > 0 and tiny_run["history"]["dev"]
    assert os.path.exists(os.path.join(os.path.dirname(ck), "curves.png"))
    assert cli(["translate", "--checkpoint", ck, "나는 사과를 먹었다.", "그는 학교에 갔다."]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(out)
    src = tmp_path / "in.txt"
    src.write_text("나는 사과를 먹었다.\n\n그는 학교에 갔다.\n", encoding="utf-8")
    assert cli(["translate", "--checkpoint", ck, "--input", str(src), "--beam", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[1] == ""  # empty lines stay empty, so output stays line-aligned
    monkeypatch.setattr(sys, "stdin", io.StringIO("나는 사과를 먹었다.\n"))
    assert cli(["translate", "--checkpoint", ck, "--kernels", "torch"]) == 0
    assert capsys.readouterr().out.strip() == out[0]
    assert cli(["evaluate", "--checkpoint", ck, "--data", "builtin:test[:30]", "--beam", "2"]) == 0
    text = capsys.readouterr().out
    assert "BLEU = " in text and "nrefs:1|case:mixed|eff:no|tok:13a" in text and "chrF2 = " in text


def test_config_overrides_and_errors(tmp_path):
    cfg = C.load(sets=["train.lr=1e-3", "data.test=x.tsv[::10]", "model.preset=course",
                       "data.train=[a.tsv[!::10], b]"])
    assert cfg["train"]["lr"] == 1e-3 and cfg["data"]["test"] == "x.tsv[::10]"
    assert cfg["data"]["train"] == ["a.tsv[!::10]", "b"]
    with pytest.raises(KeyError, match="unknown config key 'train.lrr'"):
        C.load(sets=["train.lrr=1"])
    user = tmp_path / "u.yaml"
    user.write_text("train:\n  epochs: 7\n")
    assert C.load(str(user))["train"]["epochs"] == 7
    with pytest.raises(ValueError, match="preset must be one of"):
        build_model(C.load(sets=["model.preset=huge"]), 10, 10)
