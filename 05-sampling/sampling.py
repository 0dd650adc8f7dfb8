"""Decoding by sampling, from scratch: temperature, top-k, top-p (nucleus), min-p, repetition penalty.

Shapes: `V` is the vocabulary size, `B` the batch (number of sequences sampled side by side), `T` a
sequence length. Logits are `(B, V)` or a single row `(V,)`; every filter returns a tensor of the same
shape and dtype, with removed tokens set to `-inf` (so `softmax` gives them probability exactly 0).

The composed pipeline follows the order `transformers` uses when `generate(do_sample=True)` builds its
processors: repetition penalty -> temperature -> top-k -> top-p -> min-p, then softmax and one
`torch.multinomial` draw per row. Every filter is checked against its `transformers` twin in
`test_sampling.py` and in the notebook.

Decoding with a model is `shared.model.decode` (the one loop of the repository) driven by a `Sampler`, the
`pick_next` callable built from the knobs, which also records what each step looked like.

Metrics for the sampled text: `entropy` of a (filtered) next-token distribution, `distinct_n`,
`repetition_rate`, `longest_copy`, `perplexity` of a continuation under the model, and `wilson` intervals
for fractions. Coherence measured without the model: `judge_story` asks the story corpus's own generator
(`shared.data.story_logprob`) whether it could have written a continuation, split into finished / grammatical /
recall right, and `permutation_chance` is the per-opening chance control for the recall.
"""
from __future__ import annotations

import html
import math
import numbers
import re

import torch

from shared.data import story_logprob
from shared.model import decode, model_device
from shared.model import draw as draw_from_probs
from shared.stats import wilson  # noqa: F401  (re-exported: the notebook calls sampling.wilson)

KNOBS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


# ----------------------------------------------------------------------------------------------------------
# argument checks, gathered here so that the math below reads first
# (TypeError: wrong type; ValueError: wrong value; the message names the argument, the value and what is allowed)

def _check_logits(logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor of shape (B, V) or (V,), got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must have a floating dtype, got {logits.dtype}")
    if logits.dim() not in (1, 2) or logits.numel() == 0:
        raise ValueError(f"logits must have a non-empty shape (B, V) or (V,), got shape {tuple(logits.shape)}")
    if torch.isnan(logits).any():
        raise ValueError("logits contain NaN")


def _number(name: str, value, low: float, high: float = math.inf, *, open_low: bool = False,
            integer: bool = False, hint: str = ""):
    """`value` as an int/float in [low, high] ((low, high] with open_low); NaN is never in range."""
    kind, what = (numbers.Integral, "an int") if integer else (numbers.Real, "a real number")
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    if not ((value > low if open_low else value >= low) and value <= high):
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be in {interval}, got {value}{hint}")
    return int(value) if integer else float(value)


def _check_knobs(temperature=1.0, top_k=None, top_p=None, min_p=None, repetition_penalty=None) -> dict:
    """All knobs of the pipeline, validated at once; `None` switches a stage off."""
    return {
        "temperature": _number("temperature", temperature, 0.0, open_low=True,
                               hint="; for the T -> 0 limit ask for greedy decoding with greedy=True"),
        "top_k": None if top_k is None else _number("top_k", top_k, 1, integer=True),
        "top_p": None if top_p is None else _number("top_p", top_p, 0.0, 1.0, open_low=True),
        "min_p": None if min_p is None else _number("min_p", min_p, 0.0, 1.0),
        "repetition_penalty": None if repetition_penalty is None else
        _number("repetition_penalty", repetition_penalty, 0.0, open_low=True)}


def _check_ids(name: str, ids, shape_of: torch.Tensor | None = None, vocab: int | None = None) -> None:
    """Token ids: an integer tensor, (B, L) (or matching the batch dims of `shape_of`), inside [0, vocab)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must hold integer token ids (int64/int32), got {ids.dtype}")
    want = "(B, L)" if shape_of is None else f"(B, L) matching logits {tuple(shape_of.shape)} (or (L,) for (V,))"
    if (shape_of is None and ids.dim() != 2) or (
            shape_of is not None and (ids.dim() != shape_of.dim() or ids.shape[:-1] != shape_of.shape[:-1])):
        raise ValueError(f"{name} must have shape {want}, got {tuple(ids.shape)}")
    if vocab is not None and ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"{name} must be token ids in [0, {vocab}), got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")


# ----------------------------------------------------------------------------------------------------------
# the filters: logits (B, V) or (V,) -> same shape, removed tokens at -inf

def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by `temperature` > 0. (B, V) -> (B, V). T < 1 sharpens, T > 1 flattens;
    softmax(l / T) tends to the one-hot of argmax(l) as T -> 0 and to uniform as T -> inf."""
    _check_logits(logits)
    return logits / _check_knobs(temperature=temperature)["temperature"]


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the `k` largest logits per row, set the rest to -inf. (B, V) -> (B, V).

    Ties at the k-th value are all kept (a row may keep more than k tokens), as in transformers'
    `TopKLogitsWarper`; k > V is clipped to V (then nothing is removed)."""
    _check_logits(logits)
    k = min(_check_knobs(top_k=k)["top_k"], logits.shape[-1])
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]          # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose total probability is >= p.
    (B, V) -> (B, V).

    Written as transformers writes it: sort ascending and drop the least likely tokens while their
    cumulative probability stays <= 1 - p; the most likely token is always kept. Among tied logits the
    order of `torch.sort` decides which one sits on the boundary (the same call as transformers)."""
    _check_logits(logits)
    p = _check_knobs(top_p=p)["top_p"]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)  # (B, V) least likely first
    tail_mass = sorted_logits.softmax(dim=-1).cumsum(dim=-1)             # mass of this token and all below
    drop_sorted = tail_mass <= 1.0 - p
    drop_sorted[..., -1] = False                                         # never drop the top token
    drop = drop_sorted.scatter(-1, order, drop_sorted)                   # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is >= min_p * (probability of the most likely token). (B, V) -> (B, V).

    The cut scales with the model's confidence: a confident row keeps few tokens, a flat row many.
    min_p = 0 keeps everything; the top token is always kept."""
    _check_logits(logits)
    min_p = _check_knobs(min_p=min_p)["min_p"]
    probs = logits.softmax(dim=-1)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
    drop.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(drop, float("-inf"))


def apply_repetition_penalty(logits: torch.Tensor, prev_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token id that already occurs in `prev_ids`. (B, V), (B, L) -> (B, V).

    A positive logit is divided by `penalty`, a negative one multiplied, so penalty > 1 always makes a
    seen token less likely (penalty = 1 is a no-op). How often a token was seen does not matter."""
    _check_logits(logits)
    penalty = _check_knobs(repetition_penalty=penalty)["repetition_penalty"]
    _check_ids("prev_ids", prev_ids, shape_of=logits, vocab=logits.shape[-1])
    if prev_ids.shape[-1] == 0:
        return logits.clone()
    prev_ids = prev_ids.long()
    seen = torch.gather(logits, -1, prev_ids)                            # (B, L) logits of seen tokens
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(-1, prev_ids, seen)


def filter_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, min_p: float | None = None,
                  repetition_penalty: float | None = None, prev_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The whole pipeline in the conventional order: repetition penalty -> temperature -> top-k -> top-p
    -> min-p. (B, V) -> (B, V). `None` switches a stage off; the result's softmax is the distribution
    that `sample` draws from."""
    _check_logits(logits)
    _check_knobs(temperature, top_k, top_p, min_p, repetition_penalty)
    if repetition_penalty is not None and prev_ids is None:
        raise ValueError("repetition_penalty needs prev_ids, the ids generated so far, got None")
    out = logits
    if repetition_penalty is not None:
        out = apply_repetition_penalty(out, prev_ids, repetition_penalty)
    out = apply_temperature(out, temperature)
    if top_k is not None:
        out = top_k_filter(out, top_k)
    if top_p is not None:
        out = top_p_filter(out, top_p)
    if min_p is not None:
        out = min_p_filter(out, min_p)
    return out


def draw(filtered: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One `torch.multinomial` draw per row of softmax(filtered), in float32 as transformers. (B, V) -> (B,)."""
    probs = filtered.float().softmax(dim=-1)
    rows = probs if probs.dim() == 2 else probs[None]
    ids = draw_from_probs(rows, generator)                               # (B,), where the generator lives
    return ids if probs.dim() == 2 else ids[0]


def _check_draw(greedy, generator) -> None:
    if not isinstance(greedy, bool):
        raise TypeError(f"greedy must be a bool, got {greedy!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
           prev_ids: torch.Tensor | None = None, greedy: bool = False,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token id per row. (B, V) -> (B,) long; (V,) -> () long.

    `greedy=True` returns the argmax (after the repetition penalty, which changes the order of tokens;
    temperature and truncation never change the argmax, so they are skipped and temperature may be 0).
    Otherwise temperature must be > 0, and the draw is `draw(filter_logits(...), generator)`."""
    _check_logits(logits)
    _check_draw(greedy, generator)
    if greedy:
        _number("temperature", temperature, 0.0)
        if repetition_penalty is not None:
            logits = filter_logits(logits, repetition_penalty=repetition_penalty, prev_ids=prev_ids)
        return logits.argmax(dim=-1)
    return draw(filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              repetition_penalty=repetition_penalty, prev_ids=prev_ids), generator)


# ----------------------------------------------------------------------------------------------------------
# the sampler: the knobs as a pick_next(logits, ids) for shared.model.decode

class Sampler:
    """`pick_next(logits (B, V), ids (B, T)) -> (B,)` for `shared.model.decode`, built from `sample`'s knobs.

    Each call picks the next token exactly as `sample` does (the repetition penalty sees `ids`, the whole text
    so far, prompt included, as in transformers) and records, per row: the entropy in nats of the filtered
    distribution the token was drawn from (0 for greedy), and the log-probability of the chosen token under
    the model's plain distribution (T = 1, unfiltered), so the perplexity of a sample needs no second pass.
    """

    def __init__(self, *, greedy: bool = False, generator: torch.Generator | None = None, **knobs):
        unknown = set(knobs) - set(KNOBS)
        if unknown:
            raise TypeError(f"unknown knob(s) {sorted(unknown)}; the knobs are {list(KNOBS)}")
        _check_draw(greedy, generator)
        if greedy:            # the argmax ignores temperature (0 allowed here) and truncation; not the penalty
            _number("temperature", knobs.pop("temperature", 0.0), 0.0)
            _check_knobs(**knobs)
            knobs = {"repetition_penalty": knobs.get("repetition_penalty")}
        self.knobs = {k: v for k, v in _check_knobs(**knobs).items() if k in knobs}
        self.greedy, self.generator = greedy, generator
        self.entropies: list[torch.Tensor] = []                        # per step: (B,)
        self.logprobs: list[torch.Tensor] = []                         # per step: (B,)

    def __call__(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        logits = logits.float()                                        # (B, V)
        penalised = self.knobs.get("repetition_penalty") is not None
        if self.greedy:
            nxt = sample(logits, greedy=True, repetition_penalty=self.knobs["repetition_penalty"], prev_ids=ids)
            self.entropies.append(torch.zeros(len(logits), device=logits.device))
        else:
            filtered = filter_logits(logits, prev_ids=ids if penalised else None, **self.knobs)
            nxt = draw(filtered, self.generator)
            self.entropies.append(entropy(filtered))
        self.logprobs.append(torch.log_softmax(logits, dim=-1).gather(-1, nxt[:, None])[:, 0])
        return nxt

    def step_entropy(self) -> torch.Tensor:
        """(B, steps): entropy (nats) of the distribution each token was drawn from."""
        return torch.stack(self.entropies, dim=1)

    def step_logprob(self) -> torch.Tensor:
        """(B, steps): log p_model(chosen token | text so far) at T = 1, unfiltered."""
        return torch.stack(self.logprobs, dim=1)


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, *, generator: torch.Generator | None = None,
             greedy: bool = False, use_cache: bool | None = None, **knobs) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample continuations: `shared.model.decode` driven by a `Sampler(greedy, generator, **knobs)`.

    prompt_ids (B, T0) long -> (ids (B, T0 + max_new_tokens), step_entropy (B, max_new_tokens)).
    `use_cache=None` caches keys/values when `model` is a shared GPT and re-runs the window otherwise (any
    model whose `model(idx)` returns `(logits (B, T, V), _)` works); both give the same tokens."""
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dtype != torch.long:
        raise TypeError(f"prompt_ids must be a (B, T0) long tensor, got {getattr(prompt_ids, 'dtype', type(prompt_ids).__name__)}")
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be a (B, T0 >= 1) long tensor, got shape {tuple(prompt_ids.shape)} "
                         "(T0 = 0 leaves nothing to condition on)")
    pick = Sampler(greedy=greedy, generator=generator, **knobs)
    ids = decode(model, prompt_ids, max_new_tokens, pick, use_cache=use_cache)
    return ids, (pick.step_entropy() if pick.entropies else torch.zeros(len(prompt_ids), 0))


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, prompt_len: int, stop_id: int | None = None) -> torch.Tensor:
    """Perplexity of each continuation under the model's plain (T = 1, unfiltered) distribution:
    exp(mean over positions t >= prompt_len of -log p(ids[t] | ids[:t])). ids (B, T) -> (B,).

    With `stop_id` (e.g. end-of-text), each row counts its continuation only up to and including the first
    `stop_id`: the perplexity of the first document, not of what follows it."""
    _check_ids("ids", ids)
    _number("prompt_len", prompt_len, 1, ids.shape[1] - 1, integer=True)
    ids = ids.to(model_device(model))                        # the batch goes where the model is
    logits = model(ids[:, :-1])[0].float()                               # (B, T-1, V)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0][:, prompt_len - 1:]
    keep = torch.ones_like(logp) if stop_id is None else stop_mask(ids[:, prompt_len:], stop_id).float()
    return torch.exp(-(logp * keep).sum(dim=1) / keep.sum(dim=1))


def stop_mask(ids: torch.Tensor, stop_id: int) -> torch.Tensor:
    """(B, T) ids -> (B, T) bool: True up to and including the first `stop_id` of each row (all True if none)."""
    stop = (ids == stop_id).long()
    return (stop.cumsum(dim=1) - stop) == 0


# ----------------------------------------------------------------------------------------------------------
# metrics

def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) per row. (B, V) -> (B,); (V,) -> (). -inf logits count as
    probability 0 (0 * log 0 = 0), so this is the entropy of a filtered distribution too."""
    _check_logits(logits)
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(dim=-1)


def _as_id_lists(seqs, name: str = "seqs") -> list[list[int]]:
    if isinstance(seqs, torch.Tensor):
        if seqs.dim() not in (1, 2):
            raise ValueError(f"{name} must be (B, T) or (T,) ids, got shape {tuple(seqs.shape)}")
        return (seqs[None] if seqs.dim() == 1 else seqs).tolist()
    if isinstance(seqs, (list, tuple)):
        if all(isinstance(s, numbers.Integral) for s in seqs):
            return [list(seqs)]
        return [list(s.tolist() if isinstance(s, torch.Tensor) else s) for s in seqs]
    raise TypeError(f"{name} must be a tensor or a list of id lists, got {type(seqs).__name__}")


def ngrams(ids, n: int) -> list[tuple]:
    """All n-grams of one id sequence, in order (T - n + 1 of them, none if T < n)."""
    return [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]


def distinct_n(seqs, n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / total n-grams, pooled over all sequences.
    seqs: (B, T) tensor, (T,) tensor or list of id lists. 1.0 = no n-gram ever repeats; nan if no n-gram."""
    n = _number("n", n, 1, integer=True)
    grams = [g for s in _as_id_lists(seqs) for g in ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def repetition_rate(seqs, n: int = 4) -> float:
    """Fraction of n-grams that already occurred earlier in the same sequence, pooled over sequences.
    0 for fresh text; tends to 1 when the text loops. nan if no sequence has an n-gram."""
    n = _number("n", n, 1, integer=True)
    repeated = total = 0
    for s in _as_id_lists(seqs):
        seen = set()
        for g in ngrams(s, n):
            repeated += g in seen
            total += 1
            seen.add(g)
    return repeated / total if total else float("nan")


def longest_copy(ids) -> tuple[int, int]:
    """The longest stretch of one sequence that copies, token for token, the stretch `lag` tokens before it
    (ids[t] == ids[t - lag] for every t in the stretch). Returns (length, lag); (0, 0) if no token equals
    any earlier token at a fixed lag. A loop with period p that goes round r times gives a copy of (r - 1) * p
    tokens at lag p; a story told twice gives a copy as long as the story."""
    ids = _as_id_lists(ids, "ids")
    if len(ids) != 1:
        raise ValueError(f"longest_copy takes one sequence, got {len(ids)}")
    ids = ids[0]
    best = (0, 0)
    for lag in range(1, len(ids)):
        run = 0
        for t in range(lag, len(ids)):
            run = run + 1 if ids[t] == ids[t - lag] else 0
            if run > best[0]:
                best = (run, lag)
    return best


# ----------------------------------------------------------------------------------------------------------
# coherence without the model: the story generator's own verdict

RECALL = re.compile(r"Later, \w+ [a-z ]+? the (\w+) (\w+)\.")      # "Later, Tom hugged the green shoe."


def judge_story(prompt_text: str, continuation: str | None, planted: tuple[str, str]) -> dict:
    """The corpus generator's verdict on one continuation of a story opening that planted `planted`
    = (colour, object). `continuation` is the text up to the first end-of-text, or None if the token budget ran
    out first (the story did not finish). Returns a dict:

    - `finished`: an end-of-text came within the budget;
    - `grammatical`: finished, and the generator can write the story once the recall sentence's colour and
      object are set to the planted ones (so a wrong recall alone does not count against the grammar);
    - `recalled`: the (colour, object) named by the first recall sentence ("Later, ... the red ball."), or None;
    - `object_right` / `pair_right`: the recall names the planted object / colour and object;
    - `logprob`: the generator's exact natural-log probability of the grammatical story (-inf otherwise);
    - `valid`: the generator can write the story exactly as it stands (grammatical and the recall right).
    """
    if not (isinstance(planted, tuple) and len(planted) == 2 and all(isinstance(w, str) for w in planted)):
        raise TypeError(f"planted must be a (colour, object) tuple of str, got {planted!r}")
    text = continuation or ""
    m = RECALL.search(text)
    recalled = m.groups() if m else None
    if continuation is not None and m:
        text = text[:m.start(1)] + " ".join(planted) + text[m.end(2):]
    logprob = story_logprob(prompt_text + text) if continuation is not None else -math.inf
    grammatical = logprob > -math.inf
    return {"finished": continuation is not None, "grammatical": grammatical, "recalled": recalled,
            "object_right": recalled is not None and recalled[1] == planted[1],
            "pair_right": recalled == planted, "logprob": logprob, "valid": grammatical and recalled == planted}


def permutation_chance(recalled: list, planted: list, key=lambda pair: pair) -> float:
    """Chance control for a recall rate, per opening and over the same openings: for opening i, the fraction of
    the *other* openings j whose recall `key(recalled[j])` equals `key(planted[i])` (a recall of None never
    matches), averaged over all openings. It is the recall rate of a decoder that names what it names
    anyway, regardless of what this story planted. recalled, planted: lists of equal length N >= 2."""
    if len(recalled) != len(planted) or len(planted) < 2:
        raise ValueError(f"recalled and planted must have the same length >= 2, got {len(recalled)}, {len(planted)}")
    counts: dict = {}
    for r in recalled:
        if r is not None:
            counts[key(r)] = counts.get(key(r), 0) + 1
    n = len(planted)
    own = [r is not None and key(r) == key(p) for r, p in zip(recalled, planted)]   # j = i is not "another"
    return sum((counts.get(key(p), 0) - o) / (n - 1) for p, o in zip(planted, own)) / n


# ----------------------------------------------------------------------------------------------------------
# the playground: one prompt, several knob settings, samples side by side with their metrics

def describe(knobs: dict) -> str:
    """A short label for a knob setting, e.g. 'T=0.7 top_p=0.9', 'greedy' or 'greedy repetition_penalty=1.3'."""
    parts = ["greedy"] if knobs.get("greedy") else [f"T={knobs.get('temperature', 1.0):g}"]
    shown = ("repetition_penalty",) if knobs.get("greedy") else KNOBS[1:]
    return " ".join(parts + [f"{k}={knobs[k]:g}" for k in shown if knobs.get(k) is not None])


def playground(model, tokenizer, prompt: str, settings: list[dict], *, max_new_tokens: int = 48,
               n_samples: int = 4, seed: int = 0):
    """Sample `n_samples` continuations of `prompt` for every knob setting in `settings` (dicts of
    `sample`'s keyword arguments), each setting from the same seed, and measure them.

    Returns a pandas DataFrame, one row per setting: the first sample's text and, over all samples,
    mean filtered entropy (nats/token), distinct-2, repetition rate (4-grams) and perplexity under the model."""
    import pandas as pd

    if not isinstance(settings, (list, tuple)) or not settings or not all(isinstance(s, dict) for s in settings):
        raise TypeError(f"settings must be a non-empty list of dicts of sample() keyword arguments, got {settings!r}")
    prompt_ids = torch.tensor([tokenizer.encode(prompt)] * n_samples, dtype=torch.long)   # (n, T0)
    rows = []
    for knobs in settings:
        pick = Sampler(generator=torch.Generator().manual_seed(seed), **knobs)
        new = decode(model, prompt_ids, max_new_tokens, pick)[:, prompt_ids.shape[1]:]
        rows.append({
            "setting": describe(knobs),
            "sample": tokenizer.decode(new[0].tolist()),
            "entropy": round(pick.step_entropy().mean().item(), 2),
            "distinct-2": round(distinct_n(new, 2), 2),
            "repeat-4": round(repetition_rate(new, 4), 2),
            "ppl": round(pick.step_logprob().mean().neg().exp().item(), 1),
        })
    return pd.DataFrame(rows).set_index("setting")


def samples_html(frame) -> str:
    """The playground table as simple HTML with wrapped sample text (renders on GitHub)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in ["setting", *frame.columns])
    body = "".join(
        "<tr>" + f"<td><b>{html.escape(str(idx))}</b></td>" +
        "".join(f"<td style='text-align:left'>{html.escape(str(v))}</td>" for v in row) + "</tr>"
        for idx, row in zip(frame.index, frame.itertuples(index=False)))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
