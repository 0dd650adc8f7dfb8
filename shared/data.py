"""Offline corpora and batching.

1. Synthetic children's stories whose every sample carries its exact log-probability under the generator.
   The generator is a sequence of random choices; every choice picks one string from a prefix-free list (no
   option is a prefix of another), so a text determines its choices uniquely and `story_logprob(text)` can
   replay the generator on the text alone. Each story plants an object early ("Mia had a red kite.") and recalls
   it after `recall_distance` filler sentences ("Later, Mia found the red kite."): the recalled colour and
   object cost 0 bits for a model that remembers, and several bits for one that does not.
2. Real English prose that ships with every Python: the help topics in `pydoc_data.topics`.

Plus `recall_items`/`recall_hits` (each story's recalled object as a teacher-forced next-token test), `encode_corpus`
(texts -> one token stream) and `random_windows` (seeded (x, y) batches from a stream).
"""
from __future__ import annotations

import bisect
import functools
import math
import random
from dataclasses import dataclass
from itertools import accumulate

import torch

from .model import model_device
from .validate import check_int

# ----------------------------------------------------------------------------------------------------------
# Vocabulary: a few hundred distinct words, grouped into categories that notebooks can colour plots by.
CATEGORIES: dict[str, list[str]] = {
    "name": ["Mia", "Tom", "Lily", "Ben", "Anna", "Max", "Zoe", "Sam", "Lucy", "Jack", "Emma", "Leo", "Nora",
             "Finn", "Ruby", "Jake", "Rosa", "Kai", "Ivy", "Hugo", "Tara", "Omar", "Pia", "Dan"],
    "animal": ["cat", "dog", "rabbit", "fox", "bear", "duck", "frog", "mouse", "horse", "pig", "goat", "lion",
               "tiger", "wolf", "deer", "sheep", "cow", "bird", "turtle", "puppy", "kitten", "squirrel",
               "hedgehog", "panda"],
    "colour": ["red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white", "grey", "gold",
               "silver"],
    "object": ["ball", "kite", "book", "hat", "drum", "box", "cup", "key", "ring", "shoe", "bell", "boat",
               "doll", "map", "lamp", "coin", "spoon", "sock", "scarf", "basket", "bucket", "whistle", "puzzle",
               "blanket"],
    "place": ["forest", "village", "garden", "meadow", "castle", "farm", "river", "beach", "mountain", "town",
              "park", "lake", "cave", "island", "valley", "hill", "school", "market", "bridge", "pond"],
    "feeling": ["happy", "sad", "scared", "brave", "tired", "proud", "angry", "calm", "excited", "lonely",
                "curious", "grumpy", "shy", "silly"],
    "food": ["apples", "bread", "cake", "soup", "carrots", "cheese", "honey", "berries", "cookies", "pie",
             "rice", "pears", "plums", "nuts", "jam", "muffins"],
    "weather": ["sunny", "rainy", "windy", "cold", "warm", "cloudy", "foggy", "snowy", "stormy", "bright"],
    "size": ["little", "big", "tiny", "small", "kind", "gentle", "clever", "funny", "quiet", "fluffy", "lazy",
             "busy", "noisy", "sleepy"],
    "verb": ["found", "lost", "remembered", "looked for", "showed everyone", "cleaned", "hugged", "carried",
             "shared", "dropped"],
}
_WORD_TO_CATEGORY = {w.lower(): c for c, words in CATEGORIES.items() for w in words}


def word_category(word: str) -> str | None:
    """The category of a story word ('Mia' -> 'name', 'kite' -> 'object'), or None."""
    if not isinstance(word, str):
        raise TypeError(f"word must be a str, got {type(word).__name__}")
    return _WORD_TO_CATEGORY.get(word.strip().lower())


@dataclass(frozen=True)
class _Choice:
    """A prefix-free list of strings with probabilities proportional to a mild Zipf law (rank^-0.7)."""
    options: tuple[str, ...]
    logp: tuple[float, ...]
    cum: tuple[float, ...]

    @classmethod
    def zipf(cls, options, exponent: float = 0.7):
        options = tuple(options)
        for a in options:
            for b in options:
                if a != b and b.startswith(a):
                    raise ValueError(f"choice options must be prefix-free: {a!r} is a prefix of {b!r}")
        weights = [(rank + 1) ** -exponent for rank in range(len(options))]
        total = sum(weights)
        probs = [w / total for w in weights]
        return cls(options, tuple(math.log(p) for p in probs), tuple(accumulate(probs)))


_OPENER = _Choice.zipf(["Once upon a time, ", "One day, ", "Long ago, "])
_NAME = _Choice.zipf(CATEGORIES["name"])
_ANIMAL = _Choice.zipf(CATEGORIES["animal"])
_COLOUR = _Choice.zipf(CATEGORIES["colour"])
_OBJECT = _Choice.zipf(CATEGORIES["object"])
_PLACE = _Choice.zipf(CATEGORIES["place"])
_FEELING = _Choice.zipf(CATEGORIES["feeling"])
_FOOD = _Choice.zipf(CATEGORIES["food"])
_WEATHER = _Choice.zipf(CATEGORIES["weather"])
_SIZE = _Choice.zipf(CATEGORIES["size"])
_VERB = _Choice.zipf(CATEGORIES["verb"])
_RECALL = "Later, "   # the recall sentence's marker; no filler sentence starts with it
# Filler sentence templates: literal text and slots. "@name" is the main character (no choice, no cost).
_FILLERS = _Choice.zipf([
    "The weather was ", "A ", "There was a ", "Then the ", "In the ", "After lunch, ", "Every morning, ", "Soon ",
], exponent=0.3)


class _Mismatch(Exception):
    """The text cannot have been produced by the generator."""


class _Tape:
    """Either samples choices (generation) or reads them back from a text (scoring), adding up log p."""

    def __init__(self, rng: random.Random | None = None, text: str | None = None):
        self.rng, self.text = rng, text
        self.pos = 0          # scoring: characters of `text` consumed
        self.parts: list[str] = []
        self.logp = 0.0

    def emit(self, literal: str) -> None:
        if self.text is None:
            self.parts.append(literal)
        elif self.text.startswith(literal, self.pos):
            self.pos += len(literal)
        else:
            raise _Mismatch(f"expected {literal!r} at character {self.pos}")

    def choose(self, choice: _Choice) -> str:
        if self.text is None:
            i = bisect.bisect_right(choice.cum, self.rng.random() * choice.cum[-1])
            i = min(i, len(choice.options) - 1)
        else:  # prefix-free options: at most one can start here
            i = next((j for j, o in enumerate(choice.options) if self.text.startswith(o, self.pos)), None)
            if i is None:
                raise _Mismatch(f"no option of {choice.options[:3]}... at character {self.pos}")
        self.logp += choice.logp[i]
        self.emit(choice.options[i])
        return choice.options[i]

    def branch(self, p: float, marker: str) -> bool:
        """True with probability p; a True branch must continue with `marker`, a False one never does."""
        if self.text is None:
            taken = self.rng.random() < p
        else:
            taken = self.text.startswith(marker, self.pos)
            if not taken and p >= 1.0:
                raise _Mismatch(f"expected {marker!r} at character {self.pos}")
        self.logp += math.log(p) if taken else math.log1p(-p)
        return taken

    def done(self) -> str:
        if self.text is not None and self.pos != len(self.text):
            raise _Mismatch(f"unexpected trailing text at character {self.pos}")
        return "".join(self.parts) if self.text is None else self.text


def _filler(t: _Tape, name: str) -> None:
    """One filler sentence that never mentions the planted object."""
    start = t.choose(_FILLERS)
    if start == "The weather was ":
        t.choose(_WEATHER)
        t.emit(".")
    elif start in ("A ", "There was a "):
        t.choose(_COLOUR)
        t.emit(" ")
        t.choose(_ANIMAL)
        t.emit(" sat near the " if start == "A " else " in the ")
        t.choose(_PLACE)
        t.emit(".")
    elif start == "Then the ":
        t.choose(_ANIMAL)
        t.emit(" felt ")
        t.choose(_FEELING)
        t.emit(".")
    elif start == "In the ":
        t.choose(_PLACE)
        t.emit(f", {name} met ")
        t.choose(_NAME)
        t.emit(" the ")
        t.choose(_ANIMAL)
        t.emit(".")
    elif start == "After lunch, ":
        t.emit(f"{name} ate some ")
        t.choose(_FOOD)
        t.emit(".")
    elif start == "Every morning, ":
        t.emit(f"{name} went to the ")
        t.choose(_PLACE)
        t.emit(".")
    else:  # "Soon "
        t.emit(f"{name} felt ")
        t.choose(_FEELING)
        t.emit(".")


def _story(t: _Tape, min_recall: int, max_recall: int) -> dict:
    t.choose(_OPENER)
    t.emit("there was a ")
    t.choose(_SIZE)
    t.emit(" ")
    animal = t.choose(_ANIMAL)
    t.emit(" named ")
    name = t.choose(_NAME)
    t.emit(f". {name} lived near the ")
    t.choose(_PLACE)
    t.emit(f". {name} had a ")
    colour = t.choose(_COLOUR)
    t.emit(" ")
    obj = t.choose(_OBJECT)
    t.emit(".")
    distance = 0
    while True:   # filler sentences; recall after d ~ Uniform{min_recall..max_recall} of them (hazard form)
        if distance >= min_recall:
            t.emit(" ")
            if t.branch(1.0 / (max_recall - distance + 1), _RECALL):
                break
        else:
            t.emit(" ")
        _filler(t, name)
        distance += 1
    t.emit(f"{_RECALL}{name} ")
    t.choose(_VERB)
    t.emit(f" the {colour} {obj}. {name} felt ")   # the long-range recall: fully determined by the story so far
    t.choose(_FEELING)
    t.emit(". The end.")
    return {"recall_distance": distance, "name": name, "animal": animal, "colour": colour, "object": obj}


def _check_recall(min_recall: int, max_recall: int) -> None:
    for arg, v in (("min_recall", min_recall), ("max_recall", max_recall)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{arg} must be a non-negative int, got {v!r}")
    if min_recall > max_recall:
        raise ValueError(f"min_recall ({min_recall}) must be <= max_recall ({max_recall})")


@dataclass
class Story:
    text: str
    logprob: float        # natural log of the probability that the generator writes exactly `text`
    recall_distance: int
    name: str
    animal: str
    colour: str
    object: str


class StoryGenerator:
    """Deterministic per seed: `StoryGenerator(seed=0).sample()` -> Story."""

    def __init__(self, seed: int = 0, min_recall: int = 1, max_recall: int = 8):
        _check_recall(min_recall, max_recall)
        self.rng = random.Random(seed)
        self.min_recall, self.max_recall = min_recall, max_recall

    def sample(self) -> Story:
        tape = _Tape(rng=self.rng)
        meta = _story(tape, self.min_recall, self.max_recall)
        return Story(tape.done(), tape.logp, **meta)

    def samples(self, n: int) -> list[Story]:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        return [self.sample() for _ in range(n)]


def story_logprob(text: str, min_recall: int = 1, max_recall: int = 8) -> float:
    """Exact natural-log probability of `text` under the generator, from the text alone; -inf if impossible."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    _check_recall(min_recall, max_recall)
    tape = _Tape(text=text)
    try:
        _story(tape, min_recall, max_recall)
        tape.done()
    except _Mismatch:
        return float("-inf")
    return tape.logp


def stories(n_train: int = 20000, n_val: int = 1000, n_test: int = 1000, seed: int = 0, min_recall: int = 1,
            max_recall: int = 8):
    """The story corpus as a `datasets.DatasetDict` (train/validation/test), each split from its own seed."""
    from datasets import Dataset, DatasetDict

    splits = {}
    for offset, (split, n) in enumerate((("train", n_train), ("validation", n_val), ("test", n_test))):
        rows = StoryGenerator(seed * 1000 + offset, min_recall, max_recall).samples(n)
        columns = {"text": [s.text for s in rows], "logprob": [s.logprob for s in rows],
                   "n_chars": [len(s.text) for s in rows]}
        for key in ("recall_distance", "name", "animal", "colour", "object"):
            columns[key] = [getattr(s, key) for s in rows]
        splits[split] = Dataset.from_dict(columns)
    return DatasetDict(splits)


def entropy_rate(n: int = 4000, seed: int = 123, min_recall: int = 1, max_recall: int = 8) -> tuple[float, float]:
    """Bits per character of the story source, (estimate, standard error), from n fresh stories.

    The ratio estimator sum(-log2 p) / sum(chars), with its delta-method standard error. This is the Bayes floor:
    no model of these stories can reach a lower cross-entropy per character.
    """
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    rows = StoryGenerator(seed, min_recall, max_recall).samples(n)
    bits = torch.tensor([-s.logprob / math.log(2) for s in rows], dtype=torch.float64)
    chars = torch.tensor([len(s.text) for s in rows], dtype=torch.float64)
    rate = bits.sum() / chars.sum()
    residual = bits - rate * chars
    stderr = residual.std() / chars.mean() / math.sqrt(n)
    return float(rate), float(stderr)


def bits_per_char(loss_nats_per_token: float, n_tokens: int, n_chars: int) -> float:
    """Convert a mean cross-entropy (nats per token) over a text of n_tokens tokens and n_chars characters."""
    if n_tokens <= 0 or n_chars <= 0:
        raise ValueError(f"n_tokens and n_chars must be positive, got {n_tokens}, {n_chars}")
    return loss_nats_per_token * n_tokens / n_chars / math.log(2)


@dataclass
class StoryStreams:
    """The story corpus as token streams, ready for `shared.train`, with the numbers every loss is read against.

    `train`, `validation`, `test`: 1-D long streams (end-of-text after every story); `texts` holds the split
    datasets (with each story's metadata). `floor_bits_per_char` is the corpus's entropy rate (the Bayes floor,
    estimated on fresh stories, ± `floor_se`); `val_floor_bits_per_char` is the exact code length of this very
    validation set under the generator.
    """
    texts: object                       # datasets.DatasetDict with columns text, logprob, n_chars, ...
    train: torch.Tensor
    validation: torch.Tensor
    test: torch.Tensor | None
    floor_bits_per_char: float
    floor_se: float
    val_floor_bits_per_char: float

    def bits_per_char(self, loss_nats_per_token: float, split: str = "validation") -> float:
        """A mean loss (nats/token) over a split's stream, in bits per character of that split's text."""
        if split not in ("train", "validation", "test") or getattr(self, split) is None:
            raise ValueError(f"split must be one of train/validation/test (present), got {split!r}")
        return bits_per_char(loss_nats_per_token, len(getattr(self, split)) - 1, sum(self.texts[split]["n_chars"]))


@functools.lru_cache(maxsize=4)
def _entropy_rate_cached(*args) -> tuple[float, float]:
    return entropy_rate(*args)


def story_streams(tokenizer, n_train: int = 20000, n_val: int = 1000, n_test: int = 0, seed: int = 0) -> StoryStreams:
    """`stories(...)` encoded with `tokenizer` into streams, with the entropy floor: one call per notebook."""
    texts = stories(n_train=n_train, n_val=n_val, n_test=n_test, seed=seed)
    streams = {split: encode_corpus(tokenizer, texts[split]["text"]) if len(texts[split]) else None
               for split in ("train", "validation", "test")}
    if streams["train"] is None or streams["validation"] is None:
        raise ValueError(f"need n_train >= 1 and n_val >= 1, got {n_train}, {n_val}")
    floor, floor_se = _entropy_rate_cached(4000, 123)
    val_floor = -sum(texts["validation"]["logprob"]) / math.log(2) / sum(texts["validation"]["n_chars"])
    return StoryStreams(texts, streams["train"], streams["validation"], streams["test"], floor, floor_se, val_floor)


# ----------------------------------------------------------------------------------------------------------
# Recall of the planted object at a distance ("Mia had a red kite. ... Later, Mia found the red kite.")
@dataclass(frozen=True)
class RecallItem:
    """One story scored on its recalled object. The model reads `ids[:query + 1]` (up to "... the red") and must
    predict `target` (the object, "kite") at position `query`; the planted object sits at `query - distance`, so a
    band of W tokens still sees it directly iff `distance < W`."""
    ids: tuple[int, ...]    # the whole story's token ids
    query: int              # position whose next-token prediction is scored
    target: int             # the object's token id (= ids[query + 1] = ids[query - distance])
    distance: int           # tokens from the planted object to the query (query - planted position)
    sentences: int          # filler sentences between the plant and the recall (the corpus's recall_distance)


def recall_items(tokenizer, stories) -> list[RecallItem]:
    """A `RecallItem` per story; `stories` is a sequence of dicts (or a `datasets` split) with the story corpus's
    `text`, `colour`, `object` and `recall_distance`. Needs a tokenizer that keeps word boundaries (one token per
    story word, as the zoo's does): raises ValueError if the object's tokens do not line up."""
    items = []
    for i, st in enumerate(stories):
        text, colour, obj = st["text"], st["colour"], st["object"]
        try:
            recall_at = text.index(f" the {colour} {obj}.", text.index("Later, "))
            planted_at = text.index(f" {colour} {obj}.")
        except ValueError:
            raise ValueError(f"story {i} has no planted and recalled '{colour} {obj}'") from None
        ids = tuple(tokenizer.encode(text))
        query = len(tokenizer.encode(text[:recall_at + len(f" the {colour}")])) - 1
        planted = len(tokenizer.encode(text[:planted_at + len(f" {colour}")]))
        if not (0 < planted < query + 1 < len(ids)) or ids[planted] != ids[query + 1]:
            raise ValueError(f"story {i}: the object's tokens do not line up (a tokenizer that merges across words?)")
        items.append(RecallItem(ids, query, ids[query + 1], query - planted, int(st["recall_distance"])))
    return items


@torch.no_grad()
def recall_hits(model, items: list[RecallItem], pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """(N,) bool: does the model's top-1 next token at each item's `query` equal its `target` (teacher-forced,
    right-padded batches: a causal model never sees the padding)."""
    check_int("pad_id", pad_id, 0)
    check_int("batch_size", batch_size, 1)
    if not items:
        raise ValueError("items is empty")
    dev = model_device(model)                                             # inputs go to the model
    hits = []
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        T = max(it.query + 1 for it in chunk)
        x = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        for b, it in enumerate(chunk):
            x[b, :it.query + 1] = torch.tensor(it.ids[:it.query + 1])
        logits = model(x.to(dev))[0]                                          # (B, T, V)
        q = torch.tensor([it.query for it in chunk])
        pred = logits[torch.arange(len(chunk)), q].argmax(-1).cpu()           # (B,)
        hits.append(pred == torch.tensor([it.target for it in chunk]))
    return torch.cat(hits)


# ----------------------------------------------------------------------------------------------------------
def python_docs(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1):
    """Real English prose shipped with CPython: the `pydoc_data.topics` help texts, split by topic."""
    from datasets import Dataset, DatasetDict
    from pydoc_data.topics import topics

    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"fractions must be in [0, 1) and sum below 1, got {val_fraction}, {test_fraction}")
    names = sorted(topics)
    random.Random(seed).shuffle(names)
    n_val, n_test = round(len(names) * val_fraction), round(len(names) * test_fraction)
    parts = {"validation": names[:n_val], "test": names[n_val:n_val + n_test], "train": names[n_val + n_test:]}
    return DatasetDict({split: Dataset.from_dict({"topic": ks, "text": [topics[k].strip() for k in ks]})
                        for split, ks in (("train", parts["train"]), ("validation", parts["validation"]),
                                          ("test", parts["test"]))})


def encode_corpus(tokenizer, texts) -> torch.Tensor:
    """Encode texts with a HF tokenizer into one 1-D long stream, the end-of-text id after every document."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    texts = list(texts)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs an eos_token to separate documents")
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return torch.tensor([t for doc in ids for t in (*doc, eos)], dtype=torch.long)


def random_windows(tokens: torch.Tensor, seq_len: int, batch_size: int,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """B random windows of seq_len+1 tokens from a 1-D stream: x = window[:-1], y = window[1:], each (B, seq_len)."""
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"need at least seq_len+1 = {seq_len + 1} tokens, got {len(tokens)}")
    starts = torch.randint(len(tokens) - seq_len, (batch_size,), generator=generator)
    windows = torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])   # (B, seq_len+1)
    return windows[:, :-1], windows[:, 1:]
