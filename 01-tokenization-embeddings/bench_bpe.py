"""Speed of the from-scratch BPE against the Rust references, side by side in one run.

    python bench_bpe.py                          # the issue's size: 10 MB of mixed text -> 8,192 tokens (~1 CPU minute)
    python bench_bpe.py --save bench_bpe.txt     # the same, report also written to bench_bpe.txt
    python bench_bpe.py --mb 1 --vocab 2048 --repeats 3

* **Train**: `bpe.train` vs Hugging Face `tokenizers` (`bpe.train_tokenizers`: same split regex, same byte
  alphabet), on the same text given two ways: one string, and a list of lines (the way `tokenizers` is usually fed).
* **Encode**: our `encode_ordinary` (pure Python, chunk cache empty at the start) vs tiktoken's Rust `encode_ordinary`
  with *the same vocabulary* (our ranks exported with `to_tiktoken`); the ids are checked equal.
* **Profile**: where our time goes. Train: pre-split regex, chunk counting, merges. Encode, in three parts that add
  up to the whole: the regex pre-split, merging each *distinct* chunk once (`_bpe`, the cache misses) and the
  per-chunk cache lookups + id concatenation. The split and the lookups are a floor for any pure-Python encode
  that uses `regex` and a dict: even with merging for free it cannot go below (split + lookups) / tiktoken.

Times are CPU seconds of this process (`time.process_time`), one thread each (`TOKENIZERS_PARALLELISM=false`): on a
busy machine they are steadier than wall time and compare like with like. Median of `--repeats`, runs alternating.

The text (offline, deterministic for one Python install): Python's own help topics (English prose), the locale
strings of `arrow` if it is installed (about 60 languages, many scripts), synthetic stories, and the standard
library's source code (code and docstrings), cut to the requested size at a character boundary.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import statistics
import sys
import sysconfig
import time
from collections import Counter
from itertools import chain
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")   # one thread for the Rust trainer too

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import regex  # noqa: E402

import bpe  # noqa: E402


def mixed_text(n_bytes: int, n_stories: int = 4000) -> str:
    """About `n_bytes` of mixed text: prose, many scripts, stories, code (see the module docstring)."""
    if isinstance(n_bytes, bool) or not isinstance(n_bytes, int) or n_bytes <= 0:
        raise ValueError(f"n_bytes must be a positive int, got {n_bytes!r}")
    from shared import data

    parts = ["\n\n".join(data.python_docs()["train"]["text"])]
    spec = importlib.util.find_spec("arrow.locales")
    if spec is not None and spec.origin:
        parts.append(Path(spec.origin).read_text(encoding="utf-8"))
    parts.append("\n\n".join(data.stories(n_train=n_stories, n_val=0, n_test=0)["train"]["text"]))
    size = sum(len(p.encode("utf-8")) for p in parts)
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)):
        if size >= n_bytes:
            break
        if any(skip in path for skip in ("/test", "site-packages", "idlelib")):
            continue
        code = Path(path).read_text(encoding="utf-8", errors="replace")
        parts.append(code)
        size += len(code.encode("utf-8"))
    return "\n\n".join(parts).encode("utf-8")[:n_bytes].decode("utf-8", errors="ignore")


def cpu_seconds(fn, repeats: int) -> tuple[float, list[float], object]:
    """(median, all, last result) of `fn()`'s CPU time in this process."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        times.append(time.process_time() - t0)
    return statistics.median(times), times, out


def train_profile(text: str, vocab_size: int) -> dict[str, float]:
    """CPU seconds of `bpe.train`'s three stages on one text: regex pre-split, chunk counting, merges."""
    t0 = time.process_time()
    chunks = regex.compile(bpe.CL100K_PATTERN).findall(text)
    t1 = time.process_time()
    counts = Counter(chunks)
    words, freqs = [list(c.encode("utf-8")) for c in counts], list(counts.values())
    t2 = time.process_time()
    bpe.train_merges(words, freqs, vocab_size - 257)
    t3 = time.process_time()
    return {"pre-split (regex)": t1 - t0, "count chunks": t2 - t1, "merges": t3 - t2,
            "chunks": len(chunks), "unique chunks": len(counts)}


def encode_profile(tok: bpe.BPETokenizer, text: str) -> dict:
    """CPU seconds of `tok.encode_ordinary(text)`'s parts, from an empty cache: split, misses (merge), lookups.

    The three steps are `encode_ordinary`'s own, run one after the other: the regex split, `_bpe` once per
    distinct chunk (what the cache misses cost), then the lookups of every chunk in the now-warm cache.
    """
    if tok._split is None:
        raise ValueError("encode_profile needs a tokenizer with a split pattern")
    tok.clear_cache()
    t0 = time.process_time()
    chunks = tok._split.findall(text)
    t1 = time.process_time()
    cache = tok._cache
    for c in dict.fromkeys(chunks):   # distinct chunks, first-seen order: each merged once
        cache[c]
    t2 = time.process_time()
    ids = list(chain.from_iterable(map(cache.__getitem__, chunks)))
    t3 = time.process_time()
    return {"split": t1 - t0, "merge": t2 - t1, "lookup": t3 - t2, "total": t3 - t0,
            "chunks": len(chunks), "unique chunks": len(cache), "n_tokens": len(ids)}


def run(n_bytes: int = 10_000_000, vocab_size: int = 8192, repeats: int = 3, text: str | None = None,
        verbose: bool = True) -> dict:
    """Time training and encoding, ours vs the references; returns every number (CPU seconds)."""
    text = mixed_text(n_bytes) if text is None else text
    lines = text.splitlines(keepends=True)
    lines_out: list[str] = []

    def say(line: str) -> None:
        lines_out.append(line)
        if verbose:
            print(line)

    say(f"text: {len(text.encode('utf-8')):,} bytes, {len(lines):,} lines; vocabulary {vocab_size:,}; "
        f"CPU seconds, median of {repeats}")
    res: dict = {"bytes": len(text.encode("utf-8")), "vocab_size": vocab_size, "repeats": repeats}

    train_t = {"ours, one string": [], "tokenizers, one string": [], "ours, lines": [], "tokenizers, lines": []}
    for _ in range(repeats):   # alternate, so a load that slows one slows the other
        for name, fn in [("ours, one string", lambda: bpe.train(text, vocab_size)),
                         ("tokenizers, one string", lambda: bpe.train_tokenizers(text, vocab_size)),
                         ("ours, lines", lambda: bpe.train(lines, vocab_size)),
                         ("tokenizers, lines", lambda: bpe.train_tokenizers(lines, vocab_size))]:
            train_t[name].append(cpu_seconds(fn, 1)[0])
    res["train"] = {k: statistics.median(v) for k, v in train_t.items()}
    for k, v in train_t.items():
        say(f"  train  {k:24} {res['train'][k]:7.2f} s  {[round(x, 2) for x in v]}")
    for how in ("one string", "lines"):
        say(f"  train  ours / tokenizers ({how}): {res['train']['ours, ' + how] / res['train']['tokenizers, ' + how]:.2f}")

    ours = bpe.train(text, vocab_size)
    tt = ours.to_tiktoken()
    enc_t = {"ours (empty cache)": [], "tiktoken": []}
    for _ in range(repeats):
        ours.clear_cache()
        t_ours, _, ids_ours = cpu_seconds(lambda: ours.encode_ordinary(text), 1)
        t_tt, _, ids_tt = cpu_seconds(lambda: tt.encode_ordinary(text), 1)
        enc_t["ours (empty cache)"].append(t_ours)
        enc_t["tiktoken"].append(t_tt)
    res["encode_equal"] = ids_ours == ids_tt
    res["encode"] = {k: statistics.median(v) for k, v in enc_t.items()}
    for k, v in enc_t.items():
        say(f"  encode {k:24} {res['encode'][k]:7.2f} s  {[round(x, 2) for x in v]}")
    say(f"  encode ours / tiktoken: {res['encode']['ours (empty cache)'] / res['encode']['tiktoken']:.2f} "
        f"(same ids: {res['encode_equal']}; {len(ids_tt):,} tokens)")

    res["train_profile"] = train_profile(text, vocab_size)
    res["encode_profile"] = encode_profile(ours, text)
    ep = res["encode_profile"]
    say("  profile, train: " + ", ".join(f"{k} {v:.2f} s" if isinstance(v, float) else f"{k} {v:,}"
                                        for k, v in res["train_profile"].items()))
    t_tt = res["encode"]["tiktoken"]
    say(f"  profile, encode (x tiktoken's whole encode): pre-split (regex) {ep['split']:.2f} s = {ep['split'] / t_tt:.2f}x, "
        f"merge {ep['unique chunks']:,} distinct chunks (cache misses, _bpe) {ep['merge']:.2f} s = {ep['merge'] / t_tt:.2f}x, "
        f"{ep['chunks']:,} cache lookups + concatenation {ep['lookup']:.2f} s = {ep['lookup'] / t_tt:.2f}x; "
        f"sum {ep['total']:.2f} s = {ep['total'] / t_tt:.2f}x")
    say(f"  floor (merging for free): split + lookups = {(ep['split'] + ep['lookup']) / t_tt:.2f}x tiktoken")
    res["report"] = "\n".join(lines_out)
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=10.0, help="megabytes of mixed text (default 10)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (default 8192)")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats, median reported (default 3)")
    p.add_argument("--save", metavar="FILE", help="also write the report to FILE (e.g. bench_bpe.txt)")
    args = p.parse_args(argv)
    res = run(int(args.mb * 1_000_000), args.vocab, args.repeats)
    if args.save:
        import platform
        header = (f"# python bench_bpe.py --mb {args.mb:g} --vocab {args.vocab} --repeats {args.repeats}\n"
                  f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
                  f"python {platform.python_version()}, {os.cpu_count()} cores (busy: CPU seconds, not wall)\n")
        Path(args.save).write_text(header + res["report"] + "\n")


if __name__ == "__main__":
    main()
