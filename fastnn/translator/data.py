"""Parallel data: readers for the three on-disk formats and the built-in corpus, the `download` command, and
token-count batching with length bucketing.

A data source is named by a spec string (the config's `data.train` / `data.dev` / `data.test` lists):

    builtin:train | builtin:dev | builtin:test   the generated corpus (corpus.py); builtin:train:N for N pairs
    path/news.dev                                 line-aligned path/news.dev.ko + path/news.dev.en
    path/tatoeba.kor-eng.tsv                      tab-separated English \\t Korean [\\t attribution] (Tatoeba)
    path/korean-english-park.dev.tar.gz           an archive holding one *.ko and one *.en member
    <any of these>[a:b:c]                         a Python slice of the pairs, e.g. tatoeba.tsv[::10]
    <any of these>[!a:b:c]                        every pair except that slice (a held-out complement)
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import re
import sys
import tarfile
import urllib.request
from dataclasses import dataclass

Pair = tuple  # (korean, english)


class DataError(ValueError):
    """Malformed parallel data; the message names the file and line."""


@dataclass
class Cleaning:
    """What to do with malformed lines: raise a DataError (default) or skip them, counting why."""
    skip: bool = False
    max_len: int = 0  # drop pairs with more characters than this on either side (0: keep all)

    def __post_init__(self):
        self.skipped: dict[str, int] = {}

    def bad(self, why: str, where: str) -> None:
        if not self.skip:
            raise DataError(f"{where}: {why} (set data.clean: true to skip such lines)")
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def too_long(self, ko: str, en: str) -> bool:
        """Whether the pair is over max_len on either side (then counted as skipped)."""
        if self.max_len and max(len(ko), len(en)) > self.max_len:
            self.skipped["too long"] = self.skipped.get("too long", 0) + 1
            return True
        return False


def _decode_lines(raw: bytes, name: str, clean: Cleaning) -> list[str | None]:
    """Lines of a UTF-8 file; an undecodable line is an error naming it, or None when cleaning."""
    out: list[str | None] = []
    for i, line in enumerate(raw.split(b"\n"), 1):
        try:
            out.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            clean.bad(f"invalid UTF-8 at byte {e.start}", f"{name}:{i}")
            out.append(None)
    if out and out[-1] == "":  # the final newline
        out.pop()
    if out and out[0] is not None and out[0].startswith("\ufeff"):
        out[0] = out[0][1:]
    return out


def _pair_up(ko: list, en: list, ko_name: str, en_name: str, clean: Cleaning) -> list[Pair]:
    if len(ko) != len(en):
        # Not skippable: after a missing line every later pair would be misaligned.
        raise DataError(f"{ko_name} has {len(ko)} lines but {en_name} has {len(en)}: line-aligned files must "
                        "have equal line counts")
    pairs = []
    for i, (k, e) in enumerate(zip(ko, en), 1):
        if k is None or e is None:
            continue  # already counted as bad UTF-8
        k, e = k.strip(), e.strip()
        if not k or not e:
            clean.bad("empty line", f"{ko_name if not k else en_name}:{i}")
            continue
        if clean.too_long(k, e):
            continue
        pairs.append((k, e))
    return pairs


def read_aligned(prefix: str, clean: Cleaning | None = None) -> list[Pair]:
    """`prefix.ko` and `prefix.en`, line N translating line N."""
    clean = clean or Cleaning()
    names = [prefix + ".ko", prefix + ".en"]
    for n in names:
        if not os.path.exists(n):
            raise DataError(f"{n}: no such file (a line-aligned source needs both {names[0]} and {names[1]})")
    ko, en = (_decode_lines(open(n, "rb").read(), n, clean) for n in names)
    return _pair_up(ko, en, names[0], names[1], clean)


def read_tsv(path: str, clean: Cleaning | None = None) -> list[Pair]:
    """Tatoeba's export: English \\t Korean [\\t attribution]."""
    clean = clean or Cleaning()
    pairs = []
    for i, line in enumerate(_decode_lines(open(path, "rb").read(), path, clean), 1):
        if line is None:
            continue
        cols = line.split("\t")
        if len(cols) < 2:
            clean.bad(f"expected English<TAB>Korean, found {len(cols)} column", f"{path}:{i}")
            continue
        en, ko = cols[0].strip(), cols[1].strip()
        if not en or not ko:
            clean.bad("empty " + ("English" if not en else "Korean") + " column", f"{path}:{i}")
            continue
        if clean.too_long(ko, en):
            continue
        pairs.append((ko, en))
    return pairs


def read_archive(path: str, clean: Cleaning | None = None) -> list[Pair]:
    """A korean-english-park .tar.gz: one member ending in .ko and one ending in .en."""
    clean = clean or Cleaning()
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{path}: not a readable tar archive ({e})") from e
    with tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        ko = [n for n in members if n.endswith(".ko")]
        en = [n for n in members if n.endswith(".en")]
        if len(ko) != 1 or len(en) != 1:
            raise DataError(f"{path}: expected one *.ko and one *.en member, found {sorted(members)}")
        text = {n: _decode_lines(tar.extractfile(members[n]).read(), f"{path}!{n}", clean) for n in ko + en}
    return _pair_up(text[ko[0]], text[en[0]], f"{path}!{ko[0]}", f"{path}!{en[0]}", clean)


_SLICE = re.compile(r"^(.*)\[(!?)(-?\d*):?(-?\d*):?(-?\d*)\]$")


def read_spec(spec: str, clean: Cleaning | None = None, builtin_size: int = 30000) -> list[Pair]:
    """Pairs named by one spec string (see the module docstring)."""
    clean = clean or Cleaning()
    m = _SLICE.match(spec)
    if m:
        base, invert = m.group(1), m.group(2) == "!"
        sl = slice(*(int(g) if g else None for g in m.group(3, 4, 5)))
        pairs = read_spec(base, clean, builtin_size)
        if not invert:
            return pairs[sl]
        held = set(range(len(pairs))[sl])
        return [p for i, p in enumerate(pairs) if i not in held]
    if spec.startswith("builtin:"):
        from . import corpus
        parts = spec.split(":")
        size = int(parts[2]) if len(parts) > 2 else builtin_size
        return corpus.generate(parts[1], size)
    if spec.endswith((".tar.gz", ".tgz", ".tar")):
        return read_archive(spec, clean)
    if spec.endswith((".tsv", ".txt")) and os.path.isfile(spec):
        return read_tsv(spec, clean)
    if os.path.exists(spec + ".ko") or os.path.exists(spec + ".en"):
        return read_aligned(spec, clean)
    raise DataError(f"data source {spec!r}: no such file; expected builtin:<split>, a .tsv, a .tar.gz, or a "
                    "prefix P with P.ko and P.en")


def read_specs(specs, clean: Cleaning | None = None, builtin_size: int = 30000) -> list[Pair]:
    if isinstance(specs, str):
        specs = [specs]
    pairs = []
    for s in specs:
        pairs += read_spec(os.path.expanduser(s), clean, builtin_size)
    return pairs


# --- download ----------------------------------------------------------------------------------------------
NEWS_URL = "https://raw.githubusercontent.com/jungyeul/korean-parallel-corpora/master/korean-english-news-v1/"
NEWS_FILES = [f"korean-english-park.{s}.tar.gz" for s in ("train", "dev", "test")]
# Known digests, checked when present. A digest not listed here is pinned on first download (written to
# SHA256SUMS in the cache) and checked on every later use, so a changed or corrupted file is still caught.
NEWS_SHA256: dict[str, str] = {}


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_sums(path: str) -> dict[str, str]:
    sums = {}
    if os.path.exists(path):
        for line in open(path):
            if line.strip():
                digest, name = line.split(None, 1)
                sums[name.strip().lstrip("*")] = digest
    return sums


def download(dest: str, base_url: str = NEWS_URL, files=NEWS_FILES, sha256: dict | None = None,
             progress: bool = True, timeout: float = 60.0) -> list[str]:
    """Fetches `files` from `base_url` into `dest` (skipping ones already there with the right digest),
    verifying SHA-256 digests. Returns the local paths."""
    from tqdm import tqdm

    os.makedirs(dest, exist_ok=True)
    sums_path = os.path.join(dest, "SHA256SUMS")
    pinned = _read_sums(sums_path)
    known = {**NEWS_SHA256, **pinned, **(sha256 or {})}
    paths = []
    for name in files:
        path = os.path.join(dest, name)
        want = known.get(name)
        if os.path.exists(path) and want and sha256_file(path) == want:
            print(f"{name}: cached, sha256 ok")
            paths.append(path)
            continue
        url = base_url.rstrip("/") + "/" + name
        tmp = path + ".part"
        h = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=not progress,
                          file=sys.stderr) as bar:
                    for block in iter(lambda: resp.read(1 << 16), b""):
                        out.write(block)
                        h.update(block)
                        bar.update(len(block))
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise RuntimeError(f"download of {url} failed: {e}") from e
        got = h.hexdigest()
        if want and got != want:
            os.remove(tmp)
            raise RuntimeError(f"{name}: sha256 mismatch: expected {want}, got {got} (file removed)")
        os.replace(tmp, path)
        pinned[name] = got
        print(f"{name}: sha256 ok" if want else f"{name}: sha256 {got} (pinned in {sums_path})")
        paths.append(path)
    with open(sums_path + ".tmp", "w") as f:
        f.writelines(f"{d}  {n}\n" for n, d in sorted(pinned.items()))
    os.replace(sums_path + ".tmp", sums_path)
    return paths


def default_cache() -> str:
    return os.environ.get("FASTNN_DATA", os.path.join(os.path.expanduser("~"), ".cache", "fastnn", "ko-en"))


# --- batching ----------------------------------------------------------------------------------------------
def token_batches(lengths: list[tuple[int, int]], max_tokens: int, seed: int, epoch: int,
                  shuffle: bool = True, pool: int = 100) -> list[list[int]]:
    """Splits example indices into batches of at most `max_tokens` padded tokens (counting the longer side).

    Length bucketing: indices are shuffled, cut into pools of `pool` batches' worth, each pool sorted by length
    so that a batch holds sentences of similar length (little padding), then the batch order is shuffled. The
    result depends only on (seed, epoch), which is what makes --resume and multi-process runs reproducible.
    """
    r = random.Random(seed * 1000003 + epoch)
    idx = list(range(len(lengths)))
    if shuffle:
        r.shuffle(idx)
    mean = max(1, sum(max(a, b) for a, b in lengths) // max(1, len(lengths)))
    chunk = max(1, pool * max_tokens // mean)
    batches: list[list[int]] = []
    for start in range(0, len(idx), chunk):
        part = sorted(idx[start:start + chunk], key=lambda i: (max(lengths[i]), lengths[i]))
        cur: list[int] = []
        longest = 0
        for i in part:
            n = max(lengths[i])
            if cur and max(longest, n) * (len(cur) + 1) > max_tokens:
                batches.append(cur)
                cur, longest = [], 0
            cur.append(i)
            longest = max(longest, n)
        if cur:
            batches.append(cur)
    if shuffle:
        r.shuffle(batches)
    return batches
