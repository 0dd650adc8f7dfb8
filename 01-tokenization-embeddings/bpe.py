"""A byte-level BPE tokenizer written from scratch, identical to tiktoken on the same ranks.

Pieces, in the order a reader meets them:

* **Pre-splitting** (`pre_split`): a regex cuts text into chunks ("words"); BPE never merges across chunk
  boundaries. `CL100K_PATTERN` (GPT-4) is the default, `GPT2_PATTERN` the older one, `None` switches it off
  (each document is then one chunk).
* **Training** (`train`): start from the 256 single bytes and repeatedly merge the most frequent adjacent
  pair. Pair counts are kept and updated *incrementally*: a merge only revisits the chunks that contain the
  merged pair (an index pair -> chunks), and a max-heap with lazy deletion finds the next best pair. Ties are
  broken deterministically: among pairs with the highest count, the smallest `(left_id, right_id)` wins.
  `brute_force_merges` is the slow, obviously correct reference (recount everything after each merge) that
  the notebook and the tests hold `train` to.
* **Encoding** (`BPETokenizer.encode`): tiktoken's rule. Inside one chunk, repeatedly merge the adjacent
  pair whose concatenated bytes has the lowest rank (id) in the vocabulary, leftmost first, until no adjacent
  pair is a token. With cl100k's ranks this reproduces tiktoken token for token.
* **Export** (`BPETokenizer.to_tiktoken`): our ranks as a `tiktoken.Encoding` (Rust speed, same output).
* **Visualiser** (`plot_tokens`): text as coloured token spans with ids underneath, in a matplotlib axes.

Shapes: everything here is 1-D: text `str` -> ids `list[int]` of length T (T tokens); `decode` inverts it.
"""
from __future__ import annotations

import base64
import heapq
import json
import operator
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path

import regex

# GPT-4 / cl100k_base split pattern (possessive quantifiers, as tiktoken ships it).
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
# GPT-2 split pattern.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_BYTE = [bytes([b]) for b in range(256)]  # the 256 one-byte strings, built once
_NO_RANK = 1 << 62  # "this pair is not a token" in the encoder's merge loop: above every real rank
# Used when exporting a tokenizer without pre-splitting to tiktoken: the whole text is one chunk.
_WHOLE_TEXT_PATTERN = r"[\s\S]+"


# ----------------------------------------------------------------------------------------------------------
# argument checks: one small validator per entry point, so the functions below read as the algorithm.
# TypeError for a wrong type, ValueError for a wrong value; each message names the argument.
def _check_str(value, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    return value


def _check_int(value, name: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_pattern(pattern) -> str | None:
    """`None` (no pre-split) or a str that compiles as a regex."""
    if pattern is None:
        return None
    _check_str(pattern, "pattern")
    try:
        regex.compile(pattern)
    except regex.error as err:
        raise ValueError(f"pattern must be a valid regex, got {pattern!r} ({err})") from None
    return pattern


def _check_specials(special_tokens) -> list[str]:
    if special_tokens is None:
        return []
    if isinstance(special_tokens, str):
        raise TypeError("special_tokens must be a sequence of str (not a single str), "
                        f"got {special_tokens!r}")
    specials = list(special_tokens)
    for s in specials:
        _check_str(s, "each special token")
        if not s:
            raise ValueError("special_tokens must not contain the empty string")
    if len(set(specials)) != len(specials):
        raise ValueError(f"special_tokens must be distinct, got {specials}")
    return specials


def _documents(text) -> list[str]:
    """`text` as a list of documents: a str is one document; a sequence of str is several."""
    if isinstance(text, str):
        return [text]
    if isinstance(text, (bytes, bytearray)) or not isinstance(text, Iterable):
        raise TypeError(f"text must be a str or a sequence of str, got {type(text).__name__}")
    docs = list(text)
    for d in docs:
        _check_str(d, "each document in text")
    return docs


def _check_train_args(text, vocab_size, pattern, special_tokens) -> tuple[list[str], str | None, list[str]]:
    """`train`'s arguments -> (documents, pattern, special tokens)."""
    docs = _documents(text)
    _check_int(vocab_size, "vocab_size")
    pattern, specials = _check_pattern(pattern), _check_specials(special_tokens)
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be >= 256 + {len(specials)} special tokens = "
                         f"{256 + len(specials)}, got {vocab_size}")
    return docs, pattern, specials


def _check_vocabulary(ranks, special_tokens) -> dict[str, int]:
    """`BPETokenizer`'s tables: all 256 bytes present, distinct ids, specials that do not reuse an id."""
    if not isinstance(ranks, dict):
        raise TypeError(f"ranks must be a dict bytes -> int, got {type(ranks).__name__}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"ranks must contain all 256 single bytes, {len(missing)} missing (first: {missing[0]})")
    if len(set(ranks.values())) != len(ranks):
        raise ValueError("ranks must map distinct byte strings to distinct ids")
    special_tokens = dict(special_tokens or {})
    _check_specials(list(special_tokens))
    clash = set(ranks.values()) & set(special_tokens.values())
    if clash:
        raise ValueError(f"special token ids collide with ordinary ids: {sorted(clash)[:5]}")
    return special_tokens


def _check_allowed_special(allowed_special, known: dict[str, int]) -> set[str]:
    """`encode`'s allowed_special ("all", "none" or a collection of known specials) -> a set of specials."""
    if allowed_special == "all":
        return set(known)
    if allowed_special == "none":
        return set()
    allowed = set(allowed_special)
    unknown = allowed - set(known)
    if unknown:
        raise ValueError(f"allowed_special has unknown special tokens {sorted(unknown)}; known: {sorted(known)}")
    return allowed


def _check_token_id(token_id) -> int:
    if isinstance(token_id, bool) or not hasattr(token_id, "__index__"):
        raise TypeError(f"token ids must be int, got {type(token_id).__name__}")
    return operator.index(token_id)  # numpy / torch integer scalars are fine


# ----------------------------------------------------------------------------------------------------------
# pre-splitting
def pre_split(text: str, pattern: str | None = CL100K_PATTERN) -> list[str]:
    """Cut `text` into the chunks BPE works inside. `pattern=None`: the whole text is one chunk.

    >>> pre_split("Hello world!!")
    ['Hello', ' world', '!!']
    """
    _check_str(text, "text")
    if pattern is None:
        return [text] if text else []
    return regex.findall(pattern, text)


# ----------------------------------------------------------------------------------------------------------
# training
def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair` in `ids` (left to right) by `new_id`.

    `ids`: (T,) -> (T',) with T' <= T.  >>> merge_pair([1, 1, 1, 2], (1, 1), 9)  ->  [9, 1, 2]
    """
    a, b = pair
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def pair_count_changes(word: list[int], pair: tuple[int, int], new_id: int) -> tuple[list[int], list[tuple[tuple[int, int], int]]]:
    """Merge `pair` in one chunk and list how the chunk's pair counts change, one occurrence at a time.

    `word`: (T,) ids -> (new word (T',), changes [((left, right), +1 or -1), ...]). For each occurrence, left to
    right, with `x` the token now before it (possibly a `new_id` made by the previous occurrence) and `y` the
    token after it: (x, a) -1 and (x, new) +1; (b, y) -1 and (new, y) +1. The merged pair (a, b) itself is not
    listed: the trainer drops it as a whole. Every other pair of the chunk is untouched, which is why a merge
    costs work proportional to its occurrences, not to the corpus.

    >>> pair_count_changes([97, 97, 97, 98], (97, 98), 256)[1]   # 'aaab', merge 'ab'
    [((97, 97), -1), ((97, 256), 1)]
    """
    a, b = pair
    new: list[int] = []
    changes: list[tuple[tuple[int, int], int]] = []
    i, n = 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            if new:
                changes += [((new[-1], a), -1), ((new[-1], new_id), +1)]
            if i + 2 < n:
                changes += [((b, word[i + 2]), -1), ((new_id, word[i + 2]), +1)]
            new.append(new_id)
            i += 2
        else:
            new.append(word[i])
            i += 1
    return new, changes


def train_merges(words: list[list[int]], freqs: list[int], n_merges: int,
                 first_id: int = 256) -> list[tuple[int, int]]:
    """Learn up to `n_merges` merges on chunks `words` (each a list of ids) occurring `freqs` times.

    Incremental: `pair_counts[p]` holds the weighted count of pair p over all chunks, `where[p]` the
    chunks that contained p at some point (a superset; a chunk without p is skipped). A merge rewrites
    only the chunks in `where[p]` and applies `pair_count_changes`'s rule (inlined here for speed, and held
    to the brute force by the tests) weighted by the chunk's frequency, so the work per merge is
    proportional to the occurrences it merges, not to the corpus. The best pair comes from a heap of
    (-count, pair): an entry goes stale when its count drops and is re-pushed with the current count when
    popped (an existing pair's count can only go down; pairs with the new token are pushed after each
    merge). Ties: the smallest (left, right) id pair. Stops early when no adjacent pair is left.
    `words` is modified in place. Returns the merges in order; merge k creates id `first_id + k`.
    """
    if len(words) != len(freqs):
        raise ValueError(f"words and freqs must have the same length, got {len(words)} and {len(freqs)}")
    _check_int(n_merges, "n_merges", minimum=0)
    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for w_idx, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + freq
            where.setdefault(pair, set()).add(w_idx)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    pop, push, get = heapq.heappop, heapq.heappush, pair_counts.get
    while len(merges) < n_merges and heap:
        neg_count, pair = pop(heap)
        count = get(pair, 0)
        if count != -neg_count:  # stale entry: re-push with the current (smaller) count
            if count > 0:
                push(heap, (-count, pair))
            continue
        new_id = first_id + len(merges)
        merges.append(pair)
        a, b = pair
        touched: set[tuple[int, int]] = set()  # pairs with the new token: pushed on the heap below
        merged = 0                             # weighted occurrences merged: what is left of pair's count
        for w_idx in where.pop(pair):
            word = words[w_idx]
            if a not in word:
                continue
            n, freq, new, start = len(word), freqs[w_idx], None, 0
            i = word.index(a)
            while True:  # jump from one `a` to the next (C speed); an occurrence is `a` followed by `b`
                if i + 1 < n and word[i + 1] == b:
                    if new is None:
                        new = word[:i]
                    else:
                        new.extend(word[start:i])
                    if new:        # (x, a) -1, (x, new) +1, x = the token now on the left
                        x = new[-1]
                        pair_counts[(x, a)] -= freq
                        q = (x, new_id)
                        pair_counts[q] = get(q, 0) + freq
                        touched.add(q)
                        where.setdefault(q, set()).add(w_idx)
                    if i + 2 < n:  # (b, y) -1, (new, y) +1, y = the token on the right
                        y = word[i + 2]
                        pair_counts[(b, y)] -= freq
                        q = (new_id, y)
                        pair_counts[q] = get(q, 0) + freq
                        touched.add(q)
                        where.setdefault(q, set()).add(w_idx)
                    new.append(new_id)
                    merged += freq
                    start = i = i + 2
                else:
                    i += 1
                if i >= n:
                    break
                try:
                    i = word.index(a, i)
                except ValueError:
                    break
            if new is not None:
                new.extend(word[start:])
                words[w_idx] = new
        left = pair_counts.pop(pair)
        if left != merged:
            raise AssertionError(f"internal error: pair {pair} counted {left} times, merged {merged}")
        for q in touched:
            if get(q, 0) > 0:
                push(heap, (-pair_counts[q], q))
    return merges


def train(text: str | Sequence[str], vocab_size: int, *, pattern: str | None = CL100K_PATTERN,
          special_tokens: Sequence[str] | None = ("<|endoftext|>",)) -> "BPETokenizer":
    """Train a byte-level BPE of `vocab_size` tokens (256 bytes + merges + `special_tokens`).

    `text`: one str, or a sequence of documents (chunks never span two documents). `pattern`: split regex
    (default `CL100K_PATTERN`; `None` = no pre-split, each document is one chunk). Special-token strings in
    the training text are ordinary text. Ids: bytes 0..255, merge k -> 256 + k, then the specials.
    If the text runs out of pairs first, the vocabulary is smaller than asked (see `n_vocab`).
    """
    docs, pattern, specials = _check_train_args(text, vocab_size, pattern, special_tokens)
    # Count unique chunks once: a word that occurs 10,000 times is merged once, weighted by 10,000. The same
    # saving one level up: a document given twice (a blank line, "    return x" in code) is split once.
    chunk_counts: Counter = Counter()
    split = regex.compile(pattern).findall if pattern is not None else (lambda d: [d] if d else [])
    for doc, n_doc in Counter(docs).items():
        chunks = split(doc)
        if n_doc == 1:
            chunk_counts.update(chunks)
        else:
            for chunk in chunks:
                chunk_counts[chunk] += n_doc
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    merges = train_merges(words, freqs, vocab_size - 256 - len(specials))
    return BPETokenizer.from_merges(merges, pattern=pattern, special_tokens=specials)


def brute_force_merges(text: str, n_merges: int, pattern: str | None = CL100K_PATTERN, *,
                       dedup: bool = False) -> list[tuple[int, int]]:
    """The reference trainer: recount every pair of the corpus after every merge. O(corpus x merges), obviously
    correct, same tie rule (highest count, then the smallest (left, right) pair). `train` must equal it.

    `dedup=True` recounts over the *unique* chunks, each weighted by how often it occurs: the same merges, with
    only the first of `train`'s two savings (the notebook times both to split the speed-up into its causes).
    """
    chunks = pre_split(_check_str(text, "text"), _check_pattern(pattern))
    if dedup:                               # each distinct chunk once, with its number of occurrences
        counted = Counter(chunks)
        chunks, freqs = list(counted), list(counted.values())
    else:                                   # every occurrence separately
        freqs = [1] * len(chunks)
    words = [list(chunk.encode("utf-8")) for chunk in chunks]
    merges: list[tuple[int, int]] = []
    for k in range(_check_int(n_merges, "n_merges", minimum=0)):
        counts: Counter = Counter()
        for w, f in zip(words, freqs):
            for pair in zip(w, w[1:]):
                counts[pair] += f
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        words = [merge_pair(w, best, 256 + k) for w in words]
    return merges


class _ChunkCache(dict):
    """chunk (str) -> ids; a missing chunk is merged by `bpe(chunk bytes)` and kept (up to `max_size` chunks)."""

    def __init__(self, bpe, max_size: int = 500_000):
        super().__init__()
        self.bpe, self.max_size = bpe, max_size

    def __missing__(self, chunk: str) -> list[int]:
        ids = self.bpe(chunk.encode("utf-8"))
        if len(self) < self.max_size:
            self[chunk] = ids
        return ids


# ----------------------------------------------------------------------------------------------------------
# the tokenizer
class BPETokenizer:
    """Byte-level BPE: `ranks` (token bytes -> id), a split `pattern`, `special_tokens` (str -> id).

    A lower id means an earlier merge (tiktoken calls ids "ranks"). `merges` holds the (left, right) id
    pairs when the tokenizer was trained here, else None (ranks loaded from tiktoken).
    """

    def __init__(self, ranks: dict[bytes, int], *, pattern: str | None = CL100K_PATTERN,
                 special_tokens: dict[str, int] | None = None,
                 merges: list[tuple[int, int]] | None = None):
        special_tokens = _check_vocabulary(ranks, special_tokens)
        self.ranks = ranks
        self.pattern = _check_pattern(pattern)
        self.special_tokens = special_tokens
        self.merges = merges
        self.decoder = {i: b for b, i in ranks.items()}
        self.special_decoder = {i: s for s, i in special_tokens.items()}
        self._split = regex.compile(self.pattern) if self.pattern is not None else None
        self._cache = _ChunkCache(self._bpe)  # chunk str -> ids, filled by encode_ordinary

    # --- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_merges(cls, merges: list[tuple[int, int]], *, pattern: str | None = CL100K_PATTERN,
                    special_tokens: Sequence[str] = ()) -> "BPETokenizer":
        """Vocabulary from an ordered merge list: bytes 0..255, merge k -> 256 + k, then the specials."""
        vocab = {i: bytes([i]) for i in range(256)}
        for k, (a, b) in enumerate(merges):
            vocab[256 + k] = vocab[a] + vocab[b]
        ranks = {tok: i for i, tok in vocab.items()}
        if len(ranks) != len(vocab):
            raise ValueError("merges produce the same byte string twice")
        specials = {s: len(vocab) + j for j, s in enumerate(_check_specials(special_tokens))}
        return cls(ranks, pattern=pattern, special_tokens=specials, merges=list(merges))

    @classmethod
    def from_tiktoken(cls, encoding) -> "BPETokenizer":
        """Take the ranks, split pattern and special tokens of a `tiktoken.Encoding` (e.g. cl100k_base)."""
        return cls(dict(encoding._mergeable_ranks), pattern=encoding._pat_str,
                   special_tokens=dict(encoding._special_tokens))

    def to_tiktoken(self, name: str = "bpe_from_scratch"):
        """Our vocabulary as a `tiktoken.Encoding` (Rust): same ids as `self.encode`."""
        import tiktoken
        return tiktoken.Encoding(name, pat_str=self.pattern if self.pattern is not None else _WHOLE_TEXT_PATTERN,
                                 mergeable_ranks=dict(self.ranks), special_tokens=dict(self.special_tokens))

    def truncated(self, vocab_size: int) -> "BPETokenizer":
        """The tokenizer a shorter training run would have produced: the first merges, same specials.

        BPE training is greedy and sequential, so stopping after k merges gives exactly the first k merges
        of a longer run. Only for tokenizers trained here (`merges` is not None).
        """
        if self.merges is None:
            raise ValueError("truncated() needs a tokenizer trained here (merges is None)")
        n_merges = vocab_size - 256 - len(self.special_tokens)
        if not 0 <= n_merges <= len(self.merges):
            raise ValueError(f"vocab_size must be in [{256 + len(self.special_tokens)}, {self.n_vocab}], "
                             f"got {vocab_size}")
        specials = sorted(self.special_tokens, key=self.special_tokens.get)
        return BPETokenizer.from_merges(self.merges[:n_merges], pattern=self.pattern, special_tokens=specials)

    @property
    def n_vocab(self) -> int:
        """Number of tokens (ordinary + special). tiktoken's `n_vocab` is the largest id + 1 instead, which is
        larger when the ids have gaps (cl100k: no id 100256, none in 100261..100275)."""
        return len(self.ranks) + len(self.special_tokens)

    def clear_cache(self) -> None:
        """Forget the chunk -> ids cache of `encode` (a timing with an empty cache measures the merge loop)."""
        self._cache.clear()

    # --- encoding --------------------------------------------------------------------------------------
    def _bpe(self, piece: bytes) -> list[int]:
        """One chunk's bytes (L,) -> ids (T,), T <= L, by lowest-rank-first merging (tiktoken's rule)."""
        if piece in self.ranks:  # tiktoken's shortcut: a chunk that is a whole token is that token
            return [self.ranks[piece]]
        ranks, get, none = self.ranks, self.ranks.get, _NO_RANK
        parts = [_BYTE[b] for b in piece]                                       # (L,) one byte each
        pair_ranks = [get(x + y, none) for x, y in zip(parts, parts[1:])]      # (L-1,)
        while pair_ranks:
            best = min(pair_ranks)
            if best == none:
                break
            i = pair_ranks.index(best)  # the leftmost pair of the lowest rank
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
            del pair_ranks[i]           # only the two pairs next to the merged one change
            if i > 0:
                pair_ranks[i - 1] = get(parts[i - 1] + parts[i], none)
            if i < len(parts) - 1:
                pair_ranks[i] = get(parts[i] + parts[i + 1], none)
        return [ranks[p] for p in parts]

    def encode_ordinary(self, text: str) -> list[int]:
        """Text -> ids, with special-token strings treated as plain text."""
        _check_str(text, "text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: the same fix-up tiktoken applies
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        chunks = self._split.findall(text) if self._split is not None else ([text] if text else [])
        # Most chunks of real text repeat (" the", "    "): each distinct chunk is merged once (`_ChunkCache`
        # calls `_bpe` on a miss) and looked up by its str afterwards, so the loop over chunks runs in C
        # (map + chain). tiktoken has no such cache.
        return list(chain.from_iterable(map(self._cache.__getitem__, chunks)))

    def encode(self, text: str, *, allowed_special="none", disallowed_special="all") -> list[int]:
        """Text -> ids (T,), with tiktoken's special-token rules.

        `allowed_special`: "all", "none" or a set of special strings encoded as their special id.
        `disallowed_special`: "all" (= every special not allowed) or a collection; if one occurs in the text,
        ValueError (a guard against prompt injection). Pass `disallowed_special=()` to encode them as text.
        Cost: pure Python, quadratic in the length of a chunk; without a pre-split a whole document is one
        chunk, so use `to_tiktoken()` for long texts.
        """
        _check_str(text, "text")
        allowed = _check_allowed_special(allowed_special, self.special_tokens)
        disallowed = set(self.special_tokens) - allowed if disallowed_special == "all" else set(disallowed_special)
        if disallowed:
            hit = regex.search("|".join(regex.escape(s) for s in disallowed), text)
            if hit:
                raise ValueError(f"text contains the disallowed special token {hit.group()!r}; pass "
                                 "allowed_special={...} to encode it as a special token, or "
                                 "disallowed_special=() to encode it as text")
        if not allowed:
            return self.encode_ordinary(text)
        # split on allowed specials (longest first, so a special that contains another wins)
        alternatives = "|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True))
        ids, start = [], 0
        for m in regex.finditer(alternatives, text):
            ids.extend(self.encode_ordinary(text[start:m.start()]))
            ids.append(self.special_tokens[m.group()])
            start = m.end()
        ids.extend(self.encode_ordinary(text[start:]))
        return ids

    # --- decoding --------------------------------------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one id (a special token: its UTF-8 string)."""
        token_id = _check_token_id(token_id)
        if token_id in self.decoder:
            return self.decoder[token_id]
        if token_id in self.special_decoder:
            return self.special_decoder[token_id].encode("utf-8")
        raise ValueError(f"unknown token id {token_id}: ids must be in the vocabulary "
                         f"(0..{self.n_vocab - 1} for a contiguous vocabulary)")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids (T,) -> the exact bytes."""
        return b"".join(self.token_bytes(i) for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids (T,) -> text; bytes that are not valid UTF-8 (a cut multi-byte char) become U+FFFD."""
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"ids must be a sequence of int, got {type(ids).__name__}")
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --- persistence -----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write JSON: pattern, special tokens, merges (if any) and ranks (base64 token bytes -> id)."""
        state = {"format": "bpe-from-scratch/1", "pattern": self.pattern, "special_tokens": self.special_tokens,
                 "merges": self.merges,
                 "ranks": [[base64.b64encode(tok).decode("ascii"), i]
                           for tok, i in sorted(self.ranks.items(), key=lambda kv: kv[1])]}
        Path(path).write_text(json.dumps(state))

    @classmethod
    def load(cls, path: str | Path) -> "BPETokenizer":
        state = json.loads(Path(path).read_text())
        if state.get("format") != "bpe-from-scratch/1":
            raise ValueError(f"path must be a file written by BPETokenizer.save, got format {state.get('format')!r}")
        ranks = {base64.b64decode(tok): i for tok, i in state["ranks"]}
        merges = [tuple(m) for m in state["merges"]] if state["merges"] is not None else None
        return cls(ranks, pattern=state["pattern"], special_tokens=state["special_tokens"], merges=merges)

    def __repr__(self) -> str:
        return (f"BPETokenizer(n_vocab={self.n_vocab}, specials={len(self.special_tokens)}, "
                f"pattern={'none' if self.pattern is None else 'cl100k' if self.pattern == CL100K_PATTERN else 'custom'})")


# ----------------------------------------------------------------------------------------------------------
# the reference: Hugging Face `tokenizers` (Rust) with the same pre-split and byte alphabet
# Oniguruma (tokenizers' regex engine) reads `{1,3}+` as "repeat", not possessive: the one quantifier is written
# without `+`; `test_bpe.py` checks that both engines cut the same chunks.
TOKENIZERS_PATTERN = CL100K_PATTERN.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for the 256 bytes: how byte-level `tokenizers` vocabularies spell tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def train_tokenizers(text: str | Sequence[str], vocab_size: int, special_tokens: Sequence[str] = ("<|endoftext|>",)):
    """The reference trainer: `tokenizers`' BPE with our split regex and the 256-byte alphabet -> `Tokenizer`."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    docs = _documents(text)
    _check_int(vocab_size, "vocab_size", minimum=256 + len(_check_specials(special_tokens)))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TOKENIZERS_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return tok


def tokenizers_vocab(tok, special_tokens: Sequence[str] = ("<|endoftext|>",)) -> set[bytes]:
    """The ordinary tokens of a byte-level `tokenizers.Tokenizer` as byte strings (comparable to `ranks`)."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    return {bytes(byte_of[c] for c in s) for s in tok.get_vocab() if s not in special_tokens}


# ----------------------------------------------------------------------------------------------------------
# measurements
def bytes_per_token(encode, texts: Sequence[str]) -> float:
    """Compression: total UTF-8 bytes / total tokens over `texts` (higher = fewer tokens per text)."""
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(encode(t)) for t in texts)
    if n_tokens == 0:
        raise ValueError("texts must contain at least one non-empty text")
    return n_bytes / n_tokens


def crosses_split(token: bytes, pattern: str = CL100K_PATTERN) -> bool:
    """True if the regex pre-split would cut this token's text into more than one chunk.

    Such a token swallows a word boundary (e.g. b'd the' or b'.\\n\\nThe'); a pre-split tokenizer can never
    learn one. Tokens that are not whole UTF-8 text count by their decodable part.
    """
    return len(regex.findall(pattern, token.decode("utf-8", errors="ignore"))) > 1


# ----------------------------------------------------------------------------------------------------------
# visualiser
_PALETTE = ["#fbb4ae", "#b3cde3", "#ccebc5", "#decbe4", "#fed9a6", "#ffffcc", "#e5d8bd", "#fddaec"]


def token_label(token: bytes) -> str:
    """How a token is drawn: its text with space -> '·', newline -> '↵', tab -> '→'; bytes that are not
    valid UTF-8 on their own (part of a multi-byte character) as hex, e.g. '<d0>'."""
    try:
        text = token.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"<{b:02x}>" for b in token)
    return text.replace(" ", "·").replace("\n", "↵").replace("\t", "→")


def plot_tokens(ax, tokens: Sequence[bytes], ids: Sequence[int], *, title: str = "", width: int = 64,
                max_rows: int = 6) -> int:
    """Draw tokens as coloured spans with their ids underneath, wrapping at `width` character cells.

    `tokens`: (T,) byte strings, `ids`: (T,) ints. A span is as wide as its label or its id, whichever is
    wider; a new row starts after a newline token. Returns the number of rows drawn (at most `max_rows`;
    the rest is cut, with '…'). The vertical extent is always `max_rows` rows, so panels side by side match.
    """
    from matplotlib.patches import Rectangle

    if len(tokens) != len(ids):
        raise ValueError(f"tokens and ids must have the same length, got {len(tokens)} and {len(ids)}")
    fig = ax.figure
    ax_width_in = ax.get_position().width * fig.get_figwidth()
    cell_pt = ax_width_in * 72 / width
    font_pt = cell_pt / 0.62  # DejaVu Sans Mono: a character is ~0.6 em wide
    row_h = 2.2
    x, row, n_rows = 0.0, 0, 1
    for k, (tok, tid) in enumerate(zip(tokens, ids)):
        label, id_text = token_label(tok), str(tid)
        span = max(len(label), 0.7 * len(id_text)) + 0.3
        if x + span > width and x > 0:
            x, row = 0.0, row + 1
        if row >= max_rows:
            ax.text(width, -(max_rows - 1) * row_h, "…", fontsize=font_pt, ha="left", va="center")
            break
        y = -row * row_h
        ax.add_patch(Rectangle((x, y - 0.55), span - 0.15, 1.1, color=_PALETTE[k % len(_PALETTE)], lw=0))
        ax.text(x + (span - 0.15) / 2, y, label, family="DejaVu Sans Mono", fontsize=font_pt,
                ha="center", va="center")
        ax.text(x + (span - 0.15) / 2, y - 0.9, id_text, family="DejaVu Sans Mono", fontsize=font_pt * 0.7,
                ha="center", va="center", color="#444444")
        x += span
        n_rows = row + 1
        if tok.endswith(b"\n"):
            x, row = 0.0, row + 1
    ax.set_xlim(0, width)
    ax.set_ylim(-(max_rows - 1) * row_h - 1.4, 0.8)  # fixed: spans look the same in every panel
    ax.axis("off")
    if title:
        ax.set_title(title, loc="left", fontsize=10)
    return n_rows
