"""Decoding by sampling, from scratch: temperature, top-k, top-p (nucleus), min-p, repetition penalty.

Shapes: `V` is the vocabulary size, `B` the batch (number of sequences sampled side by side), `T` a
sequence length. Logits are `(B, V)` or a single row `(V,)`; every filter returns a tensor of the same
shape and dtype, with removed tokens set to `-inf` (so `softmax` gives them probability exactly 0).

The composed pipeline follows the order `transformers` uses when `generate(do_sample=True)` builds its
processors: repetition penalty -> temperature -> top-k -> top-p -> min-p, then softmax and one
`torch.multinomial` draw per row. Every filter is checked against its `transformers` twin in
`test_sampling.py` and in the notebook.

Metrics for the sampled text: `entropy` of a (filtered) next-token distribution, `distinct_n`,
`repetition_rate`, `longest_copy`, and `perplexity` of a continuation under the model.
"""
from __future__ import annotations

import html
import inspect
import math
import numbers
from collections import Counter

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------
# argument checks (clear messages: which argument, what was given, what is expected)

def _check_logits(logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor of shape (B, V) or (V,), got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must have a floating dtype, got {logits.dtype}")
    if logits.dim() not in (1, 2):
        raise ValueError(f"logits must have shape (B, V) or (V,), got shape {tuple(logits.shape)}")
    if logits.numel() == 0:
        raise ValueError(f"logits must be non-empty, got shape {tuple(logits.shape)}")
    if torch.isnan(logits).any():
        raise ValueError("logits contain NaN")


def _check_real(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def _check_temperature(temperature) -> float:
    t = _check_real("temperature", temperature)
    if not t > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; for the T -> 0 limit ask for "
                         "greedy decoding explicitly with greedy=True")
    return t


def _check_top_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"top_k must be an int >= 1, got {k!r} ({type(k).__name__})")
    if k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {k}")
    return int(k)


def _check_top_p(p) -> float:
    p = _check_real("top_p", p)
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    return p


def _check_min_p(min_p) -> float:
    m = _check_real("min_p", min_p)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {m}")
    return m


# ----------------------------------------------------------------------------------------------------------
# the filters: logits (B, V) or (V,) -> same shape, removed tokens at -inf

def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by `temperature` > 0. (B, V) -> (B, V). T < 1 sharpens, T > 1 flattens;
    softmax(l / T) tends to the one-hot of argmax(l) as T -> 0 and to uniform as T -> inf."""
    _check_logits(logits)
    return logits / _check_temperature(temperature)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the `k` largest logits per row, set the rest to -inf. (B, V) -> (B, V).

    Ties at the k-th value are all kept (a row may keep more than k tokens), as in transformers'
    `TopKLogitsWarper`; k > V is clipped to V (then nothing is removed)."""
    _check_logits(logits)
    k = min(_check_top_k(k), logits.shape[-1])
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]          # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose total probability is >= p.
    (B, V) -> (B, V).

    Written as transformers writes it: sort ascending and drop the least likely tokens while their
    cumulative probability stays <= 1 - p; the most likely token is always kept. Among tied logits the
    order of `torch.sort` decides which one sits on the boundary (the same call as transformers)."""
    _check_logits(logits)
    p = _check_top_p(p)
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
    min_p = _check_min_p(min_p)
    probs = logits.softmax(dim=-1)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
    drop.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(drop, float("-inf"))


def apply_repetition_penalty(logits: torch.Tensor, prev_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token id that already occurs in `prev_ids`. (B, V), (B, L) -> (B, V).

    A positive logit is divided by `penalty`, a negative one multiplied, so penalty > 1 always makes a
    seen token less likely (penalty = 1 is a no-op). How often a token was seen does not matter."""
    _check_logits(logits)
    penalty = _check_real("penalty", penalty)
    if not penalty > 0:
        raise ValueError(f"penalty must be > 0, got {penalty}")
    if not isinstance(prev_ids, torch.Tensor):
        raise TypeError(f"prev_ids must be a torch.Tensor of token ids, got {type(prev_ids).__name__}")
    if prev_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"prev_ids must hold integer token ids (int64/int32), got {prev_ids.dtype}")
    if prev_ids.dim() != logits.dim() or prev_ids.shape[:-1] != logits.shape[:-1]:
        raise ValueError(f"prev_ids must have shape (B, L) matching logits (B, V) (or (L,) for (V,)), "
                         f"got prev_ids {tuple(prev_ids.shape)} and logits {tuple(logits.shape)}")
    vocab = logits.shape[-1]
    if prev_ids.numel() and (prev_ids.min() < 0 or prev_ids.max() >= vocab):
        raise ValueError(f"prev_ids must be token ids in [0, {vocab}), got values in "
                         f"[{int(prev_ids.min())}, {int(prev_ids.max())}]")
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
    out = logits
    if repetition_penalty is not None:
        if prev_ids is None:
            raise ValueError("repetition_penalty needs prev_ids, the ids generated so far, got None")
        out = apply_repetition_penalty(out, prev_ids, repetition_penalty)
    out = apply_temperature(out, temperature)
    if top_k is not None:
        out = top_k_filter(out, top_k)
    if top_p is not None:
        out = top_p_filter(out, top_p)
    if min_p is not None:
        out = min_p_filter(out, min_p)
    return out


def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
           prev_ids: torch.Tensor | None = None, greedy: bool = False,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token id per row. (B, V) -> (B,) long; (V,) -> () long.

    `greedy=True` returns the argmax (after the repetition penalty, which changes the order of tokens;
    temperature and truncation never change the argmax, so they are skipped and temperature may be 0).
    Otherwise temperature must be > 0, and the draw is `torch.multinomial` on the softmax of
    `filter_logits(...)` with the given seeded `generator` (float32 probabilities, as transformers)."""
    _check_logits(logits)
    if not isinstance(greedy, bool):
        raise TypeError(f"greedy must be a bool, got {greedy!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if greedy:
        _check_real("temperature", temperature)
        out = logits
        if repetition_penalty is not None:
            out = filter_logits(logits, repetition_penalty=repetition_penalty, prev_ids=prev_ids)
        return out.argmax(dim=-1)
    out = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        repetition_penalty=repetition_penalty, prev_ids=prev_ids)
    probs = out.float().softmax(dim=-1)
    rows = probs if probs.dim() == 2 else probs[None]
    ids = torch.multinomial(rows, num_samples=1, generator=generator)[:, 0]  # (B,)
    return ids if probs.dim() == 2 else ids[0]


# ----------------------------------------------------------------------------------------------------------
# metrics

def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) per row. (B, V) -> (B,); (V,) -> (). -inf logits count as
    probability 0 (0 * log 0 = 0), so this is the entropy of a filtered distribution too."""
    _check_logits(logits)
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(dim=-1)


def _as_id_lists(seqs, name="seqs"):
    if isinstance(seqs, torch.Tensor):
        if seqs.dim() == 1:
            seqs = seqs[None]
        if seqs.dim() != 2:
            raise ValueError(f"{name} must be (B, T) or (T,) ids, got shape {tuple(seqs.shape)}")
        return seqs.tolist()
    if isinstance(seqs, (list, tuple)):
        if all(isinstance(s, numbers.Integral) for s in seqs):
            return [list(seqs)]
        return [list(s.tolist() if isinstance(s, torch.Tensor) else s) for s in seqs]
    raise TypeError(f"{name} must be a tensor or a list of id lists, got {type(seqs).__name__}")


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    return int(n)


def ngrams(ids, n: int) -> list[tuple]:
    """All n-grams of one id sequence, in order (T - n + 1 of them, none if T < n)."""
    return [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]


def distinct_n(seqs, n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / total n-grams, pooled over all sequences.
    seqs: (B, T) tensor, (T,) tensor or list of id lists. 1.0 = no n-gram ever repeats; nan if no n-gram."""
    n = _check_n(n)
    grams = [g for s in _as_id_lists(seqs) for g in ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def repetition_rate(seqs, n: int = 4) -> float:
    """Fraction of n-grams that already occurred earlier in the same sequence, pooled over sequences.
    0 for fresh text; tends to 1 when the text loops. nan if no sequence has an n-gram."""
    n = _check_n(n)
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
# generation with a model, and scoring under it

@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, *, generator: torch.Generator | None = None,
             greedy: bool = False, use_cache: bool = True, **knobs) -> tuple[torch.Tensor, torch.Tensor]:
    """Autoregressive decoding with `sample`. `model(idx)` must return `(logits (B, T, V), _)`.

    prompt_ids (B, T0) long -> (ids (B, T0 + max_new_tokens), step_entropy (B, max_new_tokens)), where
    step_entropy is the entropy in nats of the filtered distribution each token was drawn from (0 for greedy).
    `knobs` are `sample`'s: temperature, top_k, top_p, min_p, repetition_penalty (its prev_ids is the text so
    far, prompt included, as in transformers). With `use_cache` and a model whose forward takes
    `start_pos, caches` (shared.model.GPT), only the new token is run each step; otherwise the whole
    window (the last `block_size` tokens) is re-run, which is slower but gives the same distribution."""
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2 or prompt_ids.dtype != torch.long:
        raise ValueError(f"prompt_ids must be a (B, T0) long tensor, got "
                         f"{getattr(prompt_ids, 'shape', type(prompt_ids).__name__)}")
    if prompt_ids.shape[1] == 0:
        raise ValueError("prompt_ids must hold at least one token per row, got T0 = 0")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    block = getattr(getattr(model, "cfg", None), "block_size", None)
    cached = use_cache and "caches" in inspect.signature(model.forward).parameters
    caches = [{} for _ in model.blocks] if cached else None
    ids, fed, entropies = prompt_ids, 0, []                               # fed: tokens already in the caches
    for _ in range(max_new_tokens):
        if caches is not None and (block is None or ids.shape[1] <= block):
            logits = model(ids[:, fed:], start_pos=fed, caches=caches)[0]
            fed = ids.shape[1]
        else:
            caches = None                                                  # past the trained context: slide
            logits = model(ids if block is None else ids[:, -block:])[0]
        logits = logits[:, -1, :].float()                                  # (B, V)
        step_knobs = dict(knobs, prev_ids=ids) if knobs.get("repetition_penalty") is not None else knobs
        if greedy:
            entropies.append(torch.zeros(ids.shape[0]))
        else:
            entropies.append(entropy(filter_logits(logits, **step_knobs)))
        nxt = sample(logits, greedy=greedy, generator=generator, **step_knobs)  # (B,)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    step_entropy = torch.stack(entropies, dim=1) if entropies else torch.zeros(ids.shape[0], 0)
    return ids, step_entropy


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Perplexity of each continuation under the model's plain (T = 1, unfiltered) distribution:
    exp(mean over positions >= prompt_len of -log p(ids[t] | ids[:t])). ids (B, T) -> (B,)."""
    if ids.dim() != 2 or ids.dtype != torch.long:
        raise ValueError(f"ids must be (B, T) long, got {tuple(ids.shape)} {ids.dtype}")
    if not 1 <= prompt_len < ids.shape[1]:
        raise ValueError(f"prompt_len must be in [1, {ids.shape[1]}) for ids of length {ids.shape[1]}, "
                         f"got {prompt_len}")
    logits = model(ids[:, :-1])[0].float()                               # (B, T-1, V)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
    return torch.exp(-logp[:, prompt_len - 1:].mean(dim=1))


# ----------------------------------------------------------------------------------------------------------
# the playground: one prompt, several knob settings, samples side by side with their metrics

def describe(knobs: dict) -> str:
    """A short label for a knob setting, e.g. 'T=0.7 top_p=0.9' or 'greedy'."""
    if knobs.get("greedy"):
        return "greedy"
    parts = [f"T={knobs.get('temperature', 1.0):g}"]
    parts += [f"{k}={knobs[k]:g}" for k in ("top_k", "top_p", "min_p", "repetition_penalty") if knobs.get(k) is not None]
    return " ".join(parts)


def playground(model, tokenizer, prompt: str, settings: list[dict], *, max_new_tokens: int = 48,
               n_samples: int = 4, seed: int = 0):
    """Sample `n_samples` continuations of `prompt` for every knob setting in `settings` (dicts of
    `sample`'s keyword arguments), each setting from the same seed, and measure them.

    Returns a pandas DataFrame, one row per setting: the first sample's text and, over all samples,
    mean filtered entropy (nats/token), distinct-2, repetition rate (4-grams) and perplexity under the model."""
    import pandas as pd

    if not isinstance(settings, (list, tuple)) or not settings or not all(isinstance(s, dict) for s in settings):
        raise TypeError("settings must be a non-empty list of dicts of sample() keyword arguments")
    prompt_ids = torch.tensor([tokenizer.encode(prompt)] * n_samples, dtype=torch.long)   # (n, T0)
    rows = []
    for knobs in settings:
        g = torch.Generator().manual_seed(seed)
        ids, ent = generate(model, prompt_ids, max_new_tokens, generator=g, **knobs)
        new = ids[:, prompt_ids.shape[1]:]
        rows.append({
            "setting": describe(knobs),
            "sample": tokenizer.decode(new[0].tolist()),
            "entropy": round(ent.mean().item(), 2),
            "distinct-2": round(distinct_n(new, 2), 2),
            "repeat-4": round(repetition_rate(new, 4), 2),
            "ppl": round(perplexity(model, ids, prompt_ids.shape[1]).mean().item(), 1),
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
