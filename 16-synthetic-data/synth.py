"""Synthetic data, measured against a known truth: generate, corrupt, deduplicate, split without leaks.

The story corpus of `shared.data` is the "real" distribution: `story_logprob(text)` gives every text's exact
log-probability (-inf for a text the generator cannot write), so a synthetic set's quality is measured against
the truth, not a proxy. This module holds:

* generation: `sample_stories` (the shared decoding loop, cut at end-of-text), `augment` (paraphrase / entity
  swap) and `corrupt` (typos, dropped or duplicated sentences);
* quality against the truth: `quality` (valid fraction, true bits/char, distinct-n, name/object vocabulary);
* deduplication: `normalise` + `exact_duplicates`, `shingles`, `minhash_signatures` (MinHash from scratch, the
  same permutations as `datasketch`'s default `affine32` scheme so the two agree bit for bit), `lsh_pairs`
  (banding), `jaccard_pairs` (the brute force: all pairs through one sparse product) and `s_curve` (theory);
* splits: `components` (union-find over near-duplicate pairs), `group_split`, `ngram_contamination`.
* collapse: `opening` (a story's first sentences), `text_batches` (padded batches for `shared.train.train`),
  `true_choice_probs`, `next_word_probs` (a model's exact name distribution) and `diversity` (its exact diversity);
* memorisation: `story_bits` (a model's code length of each story, to set against the truth's), `greedy_reproduces`.
"""
from __future__ import annotations

import hashlib
import math
import random
import re
import struct

import numpy as np
import torch

from shared import data
from shared.model import decode, model_device, sample_next
from shared.stats import wilson  # noqa: F401  (re-exported: the notebook calls synth.wilson)

# ----------------------------------------------------------------------------------------------------------
# Generation


def sample_stories(model, tokenizer, n: int, temperature: float = 1.0, seed: int = 0, max_new_tokens: int = 120,
                   batch_size: int = 256) -> list[str]:
    """n stories sampled from `model` after an end-of-text token, each cut at its first end-of-text.

    A row that never reaches end-of-text within `max_new_tokens` is kept as it is (and will score -inf).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    eos = tokenizer.eos_token_id
    g = torch.Generator().manual_seed(seed)
    texts = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        ids = decode(model, torch.full((b, 1), eos), max_new_tokens, sample_next(temperature, None, g))
        for row in ids[:, 1:].tolist():                       # (b, max_new_tokens)
            row = row[:row.index(eos)] if eos in row else row
            texts.append(tokenizer.decode(row))
    return texts


_OPENING = re.compile(r"there was an? (\w+) (\w+) named (\w+)\. \3 lived near the \w+\. \3 had an? (\w+) (\w+)\.")


def story_fields(text: str) -> dict | None:
    """The planted facts of a story, parsed from its opening: {size, animal, name, colour, object}, or None."""
    m = _OPENING.search(text)
    if m is None:
        return None
    return dict(zip(("size", "animal", "name", "colour", "object"), m.groups()))


_SENT = re.compile(r"(?<=\.) ")


def sentences(text: str) -> list[str]:
    """Split a story into sentences (at '. ')."""
    return _SENT.split(text)


def augment(text: str, kind: str, rng: random.Random) -> str:
    """A paraphrase-style augmentation.

    kind = "swap_name": every mention of the main character renamed to another name (still a story the generator
    can write); "swap_opener": the opening formula replaced by another of the generator's openers (also valid);
    "reword": synonyms the generator never uses ("had a" -> "owned a", "felt" -> "was feeling"): same meaning,
    outside the true distribution.
    """
    if kind == "swap_name":
        f = story_fields(text)
        if f is None:
            return text
        new = rng.choice([w for w in data.CATEGORIES["name"] if w != f["name"]])
        return re.sub(rf"\b{f['name']}\b", new, text)
    if kind == "swap_opener":
        openers = ["Once upon a time, ", "One day, ", "Long ago, "]
        cur = next((o for o in openers if text.startswith(o)), None)
        if cur is None:
            return text
        return rng.choice([o for o in openers if o != cur]) + text[len(cur):]
    if kind == "reword":
        return text.replace(" had a ", " owned a ").replace(" felt ", " was feeling ")
    raise ValueError(f"kind must be one of swap_name, swap_opener, reword; got {kind!r}")


def corrupt(text: str, kind: str, rng: random.Random, rate: float = 0.02) -> str:
    """Noise injection. kind = "typo" (each letter swapped with its right neighbour with probability `rate`),
    "drop" (one sentence other than the first and the last two removed), "duplicate" (one such sentence repeated)."""
    if kind == "typo":
        chars = list(text)
        for i in range(len(chars) - 1):
            if chars[i].isalpha() and chars[i + 1].isalpha() and rng.random() < rate:
                chars[i], chars[i + 1] = chars[i + 1], chars[i]
        return "".join(chars)
    if kind in ("drop", "duplicate"):
        s = sentences(text)
        if len(s) < 5:
            return text
        i = rng.randrange(1, len(s) - 2)
        s = s[:i] + s[i + 1:] if kind == "drop" else s[:i + 1] + [s[i]] + s[i + 1:]
        return " ".join(s)
    raise ValueError(f"kind must be one of typo, drop, duplicate; got {kind!r}")


# ----------------------------------------------------------------------------------------------------------
# Quality against the known truth


_RECALL = re.compile(r"Later, (\w+) (found|lost|remembered|looked for|showed everyone|cleaned|hugged|carried|shared|dropped) "
                     r"the (\w+) (\w+)\.")


def repair_recall(text: str) -> str:
    """The text with its recall sentence naming the planted colour and object (unchanged if none is found).

    The zoo model often forgets what it planted; the repaired text separates that one long-range error from
    everything else the model wrote, which `story_logprob` then scores.
    """
    f = story_fields(text)
    if f is None:
        return text
    return _RECALL.sub(lambda m: f"Later, {m.group(1)} {m.group(2)} the {f['colour']} {f['object']}.", text, count=1)


def distinct_n(texts, n: int = 2) -> float:
    """Distinct word n-grams / total word n-grams over all texts (0 for no n-grams)."""
    grams = [tuple(w[i:i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def quality(texts, floor_bits_per_char: float | None = None) -> dict:
    """Scores of a set of stories against the generator that defines the real distribution.

    valid: how many texts the generator can write at all (story_logprob > -inf); valid_but_recall: how many are
    valid once the recall sentence is repaired (`repair_recall`); bits_per_char: true code length -log2 p / chars
    over those repaired texts (the entropy rate is its value on real stories; lower means "too
    typical", higher "unlikely"); gap: bits_per_char - floor; distinct-2; names/objects: distinct main-character
    names and planted objects among them; tail_names: those texts whose name is in the rarer half of the
    generator's list.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("texts must not be empty")
    exact = sum(math.isfinite(data.story_logprob(t)) for t in texts)
    repaired = [repair_recall(t) for t in texts]
    lps = [data.story_logprob(t) for t in repaired]
    valid = [(t, lp) for t, lp in zip(repaired, lps) if math.isfinite(lp)]
    bits = -sum(lp for _, lp in valid) / math.log(2) / max(1, sum(len(t) for t, _ in valid)) if valid else float("nan")
    fields = [story_fields(t) for t, _ in valid]
    rare = set(data.CATEGORIES["name"][len(data.CATEGORIES["name"]) // 2:])
    return {"n": len(texts), "valid": exact, "valid_but_recall": len(valid), "bits_per_char": bits,
            "gap": bits - floor_bits_per_char if floor_bits_per_char is not None else None,
            "distinct-2": distinct_n(texts, 2), "names": len({f["name"] for f in fields}),
            "objects": len({f["object"] for f in fields}), "tail_names": sum(f["name"] in rare for f in fields)}


# ----------------------------------------------------------------------------------------------------------
# Deduplication


def normalise(text: str) -> str:
    """Lower case, letters/digits/spaces only, single spaces: what an exact-dedup hash should see."""
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def exact_duplicates(texts) -> list[int]:
    """For each text, the index of the first text with the same normalised SHA-1 (itself if it is the first)."""
    first: dict[bytes, int] = {}
    return [first.setdefault(hashlib.sha1(normalise(t).encode()).digest(), i) for i, t in enumerate(texts)]


def shingles(text: str, k: int = 3) -> set[str]:
    """The set of word k-grams of the normalised text (one shingle for a text shorter than k words)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    w = normalise(text).split()
    return {" ".join(w[i:i + k]) for i in range(max(1, len(w) - k + 1))}


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser (a bijection), as datasketch pre-mixes every input hash."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def minhash_permutations(num_perm: int = 128, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The affine maps h -> a h + b (mod 2^32), a odd: drawn as datasketch's `affine32` scheme draws them."""
    if not isinstance(num_perm, int) or num_perm < 1:
        raise ValueError(f"num_perm must be a positive int, got {num_perm!r}")
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def minhash_signatures(shingle_sets, num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """MinHash signatures (N, num_perm) uint32: for each permutation, the smallest permuted hash of the set.

    Hash of a shingle: first 4 bytes of SHA-1 (little-endian), then the fmix32 bijection, then a_k h + b_k mod
    2^32. P(sig_A[k] == sig_B[k]) = Jaccard(A, B) for a min-wise family, so the fraction of equal entries
    estimates the Jaccard similarity with standard error sqrt(J(1-J)/num_perm).
    """
    a, b = minhash_permutations(num_perm, seed)
    sets = [sorted(s) for s in shingle_sets]
    if any(len(s) == 0 for s in sets):
        raise ValueError("every shingle set must be non-empty")
    sig = np.empty((len(sets), num_perm), dtype=np.uint32)
    for i, s in enumerate(sets):
        h = np.array([struct.unpack("<I", hashlib.sha1(x.encode()).digest()[:4])[0] for x in s], dtype=np.uint32)
        sig[i] = (_fmix32(h)[:, None] * a[None, :] + b[None, :]).min(axis=0)   # (|s|, P) -> (P,)
    return sig


def lsh_pairs(signatures: np.ndarray, bands: int, rows: int) -> set[tuple[int, int]]:
    """Candidate pairs (i < j) whose signatures agree on all `rows` entries of at least one of `bands` bands."""
    n, p = signatures.shape
    if bands * rows > p:
        raise ValueError(f"bands * rows = {bands * rows} exceeds num_perm = {p}")
    pairs = set()
    for band in range(bands):
        buckets: dict[bytes, list[int]] = {}
        for i, key in enumerate(signatures[:, band * rows:(band + 1) * rows]):
            buckets.setdefault(key.tobytes(), []).append(i)
        for members in buckets.values():
            pairs.update((members[x], members[y]) for x in range(len(members)) for y in range(x + 1, len(members)))
    return pairs


def s_curve(s, bands: int, rows: int):
    """P(a pair of Jaccard s becomes an LSH candidate) = 1 - (1 - s^rows)^bands."""
    return 1.0 - (1.0 - np.asarray(s, dtype=float) ** rows) ** bands


def jaccard_matrix(shingle_sets) -> np.ndarray:
    """Brute force: exact Jaccard of every pair, (N, N) float, via one sparse product |A & B| = X X^T."""
    from scipy import sparse

    vocab: dict[str, int] = {}
    rows, cols = [], []
    for i, s in enumerate(shingle_sets):
        for x in s:
            rows.append(i)
            cols.append(vocab.setdefault(x, len(vocab)))
    x = sparse.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(shingle_sets), len(vocab)))
    inter = (x @ x.T).toarray()                                   # (N, N)
    size = np.asarray(x.sum(axis=1)).ravel()
    return inter / (size[:, None] + size[None, :] - inter)


def jaccard_pairs(jac: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    """Pairs (i < j) with Jaccard >= threshold, from `jaccard_matrix`."""
    i, j = np.nonzero(np.triu(jac >= threshold, k=1))
    return set(zip(i.tolist(), j.tolist()))


# ----------------------------------------------------------------------------------------------------------
# Splits without leaks


def components(n: int, pairs) -> list[int]:
    """Union-find: a group id per item such that every pair ends up in one group (connected components)."""
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[find(i)] = find(j)
    return [find(i) for i in range(n)]


def group_split(groups, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Split item indices into (train, val) so that every group lies on one side; about val_fraction of groups
    go to val. Random splitting is the special case of one group per item."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    ids = sorted(set(groups))
    random.Random(seed).shuffle(ids)
    val_groups = set(ids[:max(1, round(len(ids) * val_fraction))])
    train = [i for i, g in enumerate(groups) if g not in val_groups]
    val = [i for i, g in enumerate(groups) if g in val_groups]
    return train, val


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    w = normalise(text).split()
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def ngram_contamination(train_texts, eval_texts, n: int = 13) -> list[bool]:
    """For each eval text: does it share any word n-gram with the training texts (the GPT-3 / PaLM check)?"""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    seen = set().union(*(word_ngrams(t, n) for t in train_texts)) if train_texts else set()
    return [bool(word_ngrams(t, n) & seen) for t in eval_texts]


# ----------------------------------------------------------------------------------------------------------
# Probing a model against the truth


def true_choice_probs(category: str) -> dict[str, float]:
    """The generator's exact probability of each word of a category where it is chosen freely (Zipf 0.7)."""
    words = data.CATEGORIES.get(category)
    if words is None:
        raise ValueError(f"category must be one of {sorted(data.CATEGORIES)}, got {category!r}")
    w = [(r + 1) ** -0.7 for r in range(len(words))]
    return {word: x / sum(w) for word, x in zip(words, w)}


@torch.no_grad()
def next_word_probs(model, tokenizer, contexts, words) -> np.ndarray:
    """The model's probability of each word (one token with its leading space) right after each context,
    renormalised over `words` and averaged over contexts: (len(words),). Each context is read after an
    end-of-text token, as the model saw stories in training."""
    ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in words]
    if any(len(i) != 1 for i in ids):
        raise ValueError("every word must be a single token with its leading space")
    ids = [i[0] for i in ids]
    dev = model_device(model)                  # contexts go where the model is
    out = np.zeros(len(words))
    for c in contexts:
        x = torch.tensor([[tokenizer.eos_token_id] + tokenizer(c, add_special_tokens=False)["input_ids"]])
        p = model(x.to(dev))[0][0, -1].softmax(-1)[ids].double().cpu().numpy()
        out += p / p.sum()
    return out / len(contexts)


def opening(text: str, n_sentences: int = 3) -> str:
    """The first `n_sentences` sentences of a story: where the generator makes its free choices (size, animal,
    name, place, colour, object)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not isinstance(n_sentences, int) or n_sentences < 1:
        raise ValueError(f"n_sentences must be a positive int, got {n_sentences!r}")
    return " ".join(sentences(text)[:n_sentences])


def text_batches(tokenizer, texts, batch_size: int, epochs: bool = False):
    """A batch function for `shared.train.train`: each batch is `batch_size` of `texts` drawn without replacement
    (a seeded permutation), each read after an end-of-text token, right-padded; targets -100 on the padding.
    With `epochs=True` the batches walk through one seeded permutation of all texts in order (a new one each
    epoch), so after `len(texts) / batch_size` steps every text has been seen exactly once (exact exposure counts).
    Returns `fn(generator) -> (x, y)`, both (batch_size, L - 1) long, L the longest text + 1 in tokens."""
    texts = list(texts)
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise ValueError("texts must be a non-empty list of non-empty strings")
    if not isinstance(batch_size, int) or not 1 <= batch_size <= len(texts):
        raise ValueError(f"batch_size must be an int in [1, {len(texts)}], got {batch_size!r}")
    eos = tokenizer.eos_token_id
    rows = [[eos] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(r) for r in rows) - 1
    x = torch.full((len(rows), width), eos)
    y = torch.full((len(rows), width), -100)
    for i, r in enumerate(rows):
        x[i, :len(r) - 1] = torch.tensor(r[:-1])
        y[i, :len(r) - 1] = torch.tensor(r[1:])

    order: list[int] = []

    def batch(generator):
        if not epochs:
            idx = torch.randperm(len(rows), generator=generator)[:batch_size]
            return x[idx], y[idx]
        while len(order) < batch_size:
            order.extend(torch.randperm(len(rows), generator=generator).tolist())
        idx = torch.tensor(order[:batch_size])
        del order[:batch_size]
        return x[idx], y[idx]
    return batch


def diversity(p, p_true=None, draws: int = 100) -> dict:
    """Diversity of a categorical distribution `p` (K,), computed exactly (no sampling):
    `effective` = 2^H(p) (the number of equally likely names with the same entropy), `expected_distinct` =
    sum_i 1 - (1 - p_i)^draws (distinct names expected among `draws` samples), and, given the truth `p_true`,
    `kl_bits` = KL(p_true || p) in bits and `tail` = p's mass on the rarer half of p_true's names."""
    p = np.asarray(p, dtype=float)
    if p.ndim != 1 or len(p) == 0 or (p < 0).any() or not math.isclose(p.sum(), 1.0, abs_tol=1e-6):
        raise ValueError("p must be a non-empty 1-D probability vector (non-negative, summing to 1)")
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive int, got {draws!r}")
    nz = p[p > 0]
    out = {"effective": float(2 ** -(nz * np.log2(nz)).sum()), "expected_distinct": float((1 - (1 - p) ** draws).sum())}
    if p_true is not None:
        q = np.asarray(p_true, dtype=float)
        if q.shape != p.shape or (q < 0).any() or not math.isclose(q.sum(), 1.0, abs_tol=1e-6):
            raise ValueError(f"p_true must be a probability vector of the same shape as p {p.shape}, got {q.shape}")
        m = q > 0
        out["kl_bits"] = float((q[m] * np.log2(q[m] / p[m])).sum()) if (p[m] > 0).all() else math.inf
        rare = np.argsort(-q, kind="stable")[len(q) // 2:]
        out["tail"] = float(p[rare].sum())
    return out


@torch.no_grad()
def greedy_reproduces(model, tokenizer, texts, prompt_sentences: int = 1) -> list[bool]:
    """For each text: would greedy decoding from its first `prompt_sentences` sentences write the rest verbatim
    (up to and including end-of-text)? Computed exactly with one teacher-forced pass: greedy reproduces the
    text iff the argmax equals the true next token at every position after the prompt."""
    eos = tokenizer.eos_token_id
    dev = model_device(model)
    out = []
    for t in texts:
        prompt = " ".join(sentences(t)[:prompt_sentences])
        n_prompt = 1 + len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([[eos] + tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]], device=dev)
        pred = model(ids[:, :-1])[0].argmax(-1)                      # (1, T-1)
        out.append(bool((pred[0, n_prompt - 1:] == ids[0, n_prompt:]).all()))
    return out


@torch.no_grad()
def story_bits(model, tokenizer, texts, batch_size: int = 64) -> np.ndarray:
    """The model's code length of each story in bits, -log2 p_model(text + end-of-text | end-of-text): (N,).

    Batched: each story read after an end-of-text token, right-padded, padding left out of the sum. Its exact
    counterpart under the generator is -story_logprob(text) / ln 2 (the generator ends every story with "The end.",
    so the model's end-of-text prediction is the only extra token)."""
    texts = list(texts)
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise ValueError("texts must be a non-empty list of non-empty strings")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    eos = tokenizer.eos_token_id
    dev = model_device(model)                  # batches go where the model is
    out = []
    for start in range(0, len(texts), batch_size):
        rows = [[eos] + tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts[start:start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), eos)
        mask = torch.zeros((len(rows), width - 1), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r) - 1] = True
        ids, mask = ids.to(dev), mask.to(dev)
        logp = model(ids[:, :-1])[0].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]   # (B, width - 1)
        out.append(-(logp * mask).sum(1).double().cpu().numpy() / math.log(2))
    return np.concatenate(out)


@torch.no_grad()
def story_bits_per_char(model, tokenizer, texts) -> np.ndarray:
    """The model's code length of each story (after end-of-text, including the final end-of-text), bits/char."""
    eos = tokenizer.eos_token_id
    dev = model_device(model)
    out = []
    for t in texts:
        ids = torch.tensor([[eos] + tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]], device=dev)
        loss = model(ids[:, :-1], ids[:, 1:])[1].item()               # nats/token
        out.append(loss * (ids.shape[1] - 1) / len(t) / math.log(2))
    return np.array(out)
