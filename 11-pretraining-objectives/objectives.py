"""Pre-training objectives on one shared GPT: causal LM, masked LM (BERT), prefix LM, fill-in-the-middle (PSM).

What differs between the objectives is only (1) how a window of text becomes inputs and targets and (2) which keys
each query may attend to. Both live here; the model is the shared `GPT` with one plug-in attention module,
`PrefixAttention`, which reads the attention rule of the current batch from a small `MaskContext` that the
batch function sets. Every rule used here is a prefix-LM mask:

    query i may attend to key j  <=>  j <= i  or  j < prefix_len          (True = may attend, as in SDPA)

prefix_len = 0 is the causal mask, prefix_len >= T the full (bidirectional) mask of BERT, anything between is
the prefix LM of T5/UniLM: bidirectional over the prefix, causal after it.

Shapes: B batch, T tokens, V vocab. Targets use -100 for positions left out of the loss (as `shared.train`).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared.model import Attention, GPT, GPTConfig, decode, model_device
from shared.stats import wilson  # noqa: F401  (re-exported: the notebook calls ob.wilson)

MASK, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|mask|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
OBJECTIVES = ("causal", "prefix", "mlm", "fim")


# ----------------------------------------------------------------------------------------------------------
# Tokenizer: the zoo's tokenizer plus a [MASK] token and the three FIM sentinels (on a copy).
def add_objective_tokens(tokenizer):
    """A copy of `tokenizer` with `<|mask|>` as its mask token and the FIM sentinels as special tokens.

    Every objective uses this one vocabulary, so every model has exactly the same size."""
    if not hasattr(tokenizer, "add_special_tokens"):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"mask_token": MASK, "additional_special_tokens": [FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE]})
    return tok


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the transforms need: mask, FIM sentinels, and all special ids (never selected for masking)."""
    mask: int
    fim_prefix: int
    fim_suffix: int
    fim_middle: int
    special: tuple[int, ...]
    vocab_size: int

    @classmethod
    def from_tokenizer(cls, tok) -> "SpecialIds":
        ids = tok.convert_tokens_to_ids([MASK, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE])
        if tok.unk_token_id is not None and tok.unk_token_id in ids:
            raise ValueError("tokenizer lacks the objective tokens: call add_objective_tokens first")
        if any(i is None for i in ids):
            raise ValueError("tokenizer lacks the objective tokens: call add_objective_tokens first")
        return cls(*ids, special=tuple(sorted(set(tok.all_special_ids))), vocab_size=len(tok))


# ----------------------------------------------------------------------------------------------------------
# Attention masks (True = this query may attend to this key)
def _check_prefix_len(prefix_len, T: int) -> torch.Tensor:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be an int >= 1, got {T!r}")
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, (int, torch.Tensor)):
        raise TypeError(f"prefix_len must be an int or a (B,) long tensor, got {type(prefix_len).__name__}")
    p = torch.as_tensor(prefix_len, dtype=torch.long).reshape(-1)        # (B,) or (1,)
    if (p < 0).any():
        raise ValueError(f"prefix_len must be >= 0, got {p.min().item()}")
    return p


def prefix_lm_mask(T: int, prefix_len, T_k: int | None = None) -> torch.Tensor:
    """(B, T, T_k) bool: query at absolute position T_k - T + i may see key j iff j <= that position or j < prefix_len.

    `prefix_len` is an int (B = 1) or a (B,) tensor. T_k > T is the cached-decoding case (queries are the last T
    positions). prefix_len 0 gives the causal mask, prefix_len >= T_k the full mask."""
    p = _check_prefix_len(prefix_len, T)
    T_k = T if T_k is None else T_k
    if T_k < T:
        raise ValueError(f"T_k must be >= T, got T_k={T_k}, T={T}")
    q_pos = torch.arange(T_k - T, T_k)[:, None]                          # (T, 1) absolute query positions
    k_pos = torch.arange(T_k)[None, :]                                   # (1, T_k)
    return (k_pos <= q_pos)[None] | (k_pos[None] < p[:, None, None])     # (B, T, T_k)


def causal_mask(T: int) -> torch.Tensor:
    """(T, T) lower-triangular: a token sees itself and the past."""
    return prefix_lm_mask(T, 0)[0]


def full_mask(T: int) -> torch.Tensor:
    """(T, T) all True: every token sees every token (BERT)."""
    return prefix_lm_mask(T, T)[0]


def prefix_lm_mask_brute(T: int, prefix_len: int) -> torch.Tensor:
    """The reference, from the words "bidirectional over the prefix, causal after", with two plain loops."""
    m = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            if i < prefix_len:                # a prefix query sees the whole prefix, nothing after it
                m[i, j] = j < prefix_len
            else:                             # a later query sees the past, itself included
                m[i, j] = j <= i
    return m


# ----------------------------------------------------------------------------------------------------------
# The plug-in attention: the shared projection, SDPA with the context's mask
class MaskContext:
    """What the batch function tells the attention layers: `prefix_len` (None: plain causal; int or (B,) tensor)."""

    def __init__(self):
        self.prefix_len = None

    def __repr__(self):
        return f"MaskContext(prefix_len={self.prefix_len!r})"


class PrefixAttention(Attention):
    """`shared.model.Attention` whose mask is the prefix-LM rule of `ctx.prefix_len` (set per batch).

    forward(x (B, T, C), start_pos, cache) -> (B, T, C). Queries/keys/values come from the parent's `project`
    (RoPE at absolute positions); with a cache the keys are past + new, and the rule uses absolute positions, so
    a prompt prefilled with prefix_len = len(prompt) is bidirectional and every decoded token is causal."""

    def __init__(self, cfg: GPTConfig, layer_idx: int, ctx: MaskContext):
        super().__init__(cfg, layer_idx)
        self.ctx = ctx

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: dict | None = None) -> torch.Tensor:
        if self.ctx.prefix_len is None:
            return super().forward(x, start_pos, cache)
        B, T, _ = x.shape
        cfg = self.cfg
        q, k, v = self.project(x, start_pos)                             # (B, H, T, D), (B, K, T, D) x2
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        mask = prefix_lm_mask(T, self.ctx.prefix_len, k.shape[2]).to(x.device)   # (B or 1, T, T_k)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None],
                                           dropout_p=cfg.dropout if self.training else 0.0,
                                           enable_gqa=cfg.n_kv_head != cfg.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def build_model(cfg: GPTConfig) -> tuple[GPT, MaskContext]:
    """The shared GPT with `PrefixAttention` in every block, and the context its layers read."""
    if not isinstance(cfg, GPTConfig):
        raise TypeError(f"cfg must be a GPTConfig, got {type(cfg).__name__}")
    ctx = MaskContext()
    return GPT(cfg, attn_factory=lambda c, i: PrefixAttention(c, i, ctx)), ctx


# ----------------------------------------------------------------------------------------------------------
# Data transforms: a batch of windows (B, T+1) -> inputs x (B, T), targets y (B, T), prefix_len (B,)
def _check_probs(**probs) -> None:
    for name, p in probs.items():
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")


def causal_lm(windows: torch.Tensor):
    """Next-token prediction everywhere, causal mask."""
    return windows[:, :-1], windows[:, 1:].clone(), torch.zeros(len(windows), dtype=torch.long)


def prefix_lm(windows: torch.Tensor, generator: torch.Generator | None = None, prefix_len=None):
    """A random split per row: the first p input tokens are a bidirectional prefix (no loss), the rest is causal
    next-token prediction. p ~ Uniform{1..T-1} unless `prefix_len` is given. Position p-1 predicts token p,
    which no prefix position can see (keys j < p only)."""
    x, y = windows[:, :-1], windows[:, 1:].clone()
    B, T = x.shape
    p = torch.randint(1, T, (B,), generator=generator) if prefix_len is None else _check_prefix_len(prefix_len, T).expand(B)
    y[torch.arange(T)[None, :] < (p[:, None] - 1)] = -100                # no loss inside the prefix
    return x, y, p.clone()


def mlm_corrupt(ids: torch.Tensor, special: SpecialIds, generator: torch.Generator | None = None,
                mlm_probability: float = 0.15, mask_prob: float = 0.8, random_prob: float = 0.1):
    """BERT's corruption of ids (B, T): select each non-special token with `mlm_probability`; of the selected,
    `mask_prob` become <|mask|>, `random_prob` a random ordinary token, the rest stay. Returns (inputs, labels),
    labels = original id at selected positions, else -100. Same algorithm as transformers'
    `DataCollatorForLanguageModeling.torch_mask_tokens` (which draws random tokens from the whole vocabulary,
    special ones included; we draw ordinary tokens only)."""
    _check_probs(mlm_probability=mlm_probability, mask_prob=mask_prob, random_prob=random_prob)
    if mask_prob + random_prob > 1.0 + 1e-12:
        raise ValueError(f"mask_prob + random_prob must be <= 1, got {mask_prob} + {random_prob}")
    labels, inputs = ids.clone(), ids.clone()
    is_special = torch.isin(ids, torch.tensor(special.special))
    selected = (torch.rand(ids.shape, generator=generator) < mlm_probability) & ~is_special
    labels[~selected] = -100
    u = torch.rand(ids.shape, generator=generator)                        # one draw decides mask / random / keep
    to_mask = selected & (u < mask_prob)
    to_random = selected & (u >= mask_prob) & (u < mask_prob + random_prob)
    ordinary = torch.tensor([i for i in range(special.vocab_size) if i not in special.special])
    random_ids = ordinary[torch.randint(len(ordinary), ids.shape, generator=generator)]
    inputs[to_mask] = special.mask
    inputs[to_random] = random_ids[to_random]
    return inputs, labels


def masked_lm(windows: torch.Tensor, special: SpecialIds, generator: torch.Generator | None = None, **probs):
    """MLM on the first T tokens of each window: corrupted inputs, labels at the same positions, full mask."""
    x, y = mlm_corrupt(windows[:, :-1], special, generator, **probs)
    return x, y, torch.full((len(windows),), x.shape[1], dtype=torch.long)


def fim_psm(windows: torch.Tensor, special: SpecialIds, generator: torch.Generator | None = None,
            fim_rate: float = 0.5, order: str = "psm"):
    """Fill-in-the-middle, prefix-suffix-middle order (Bavarian et al. 2022): with probability `fim_rate` a row's
    document (its first T - 2 tokens) is cut at two random points into prefix / middle / suffix and rearranged as

        <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle

    (T + 1 tokens), then trained as plain next-token prediction with the causal mask. Other rows stay causal LM.
    Same T + 1 tokens per row as every other objective. order="spm" is the paper's suffix-prefix-middle variant,
    <|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prefix middle: the middle continues the prefix directly."""
    _check_probs(fim_rate=fim_rate)
    if order not in ("psm", "spm"):
        raise ValueError(f"order must be 'psm' or 'spm', got {order!r}")
    B, T1 = windows.shape
    rows = windows.clone()
    doc_len = T1 - 3                                                       # 3 sentinels make it T + 1 again
    if doc_len < 2:
        raise ValueError(f"windows must hold at least 5 tokens for FIM, got {T1}")
    use = torch.rand(B, generator=generator) < fim_rate
    cuts = torch.sort(torch.randint(0, doc_len + 1, (B, 2), generator=generator), dim=1).values
    for b in torch.nonzero(use).flatten().tolist():
        doc = windows[b, :doc_len]
        i, j = cuts[b].tolist()
        rows[b] = torch.cat([fim_prompt(doc[:i], doc[j:], special, order), doc[i:j]])
    x, y = rows[:, :-1], rows[:, 1:].clone()
    return x, y, torch.zeros(B, dtype=torch.long)


def fim_prompt(prefix: torch.Tensor, suffix: torch.Tensor, special: SpecialIds, order: str = "psm") -> torch.Tensor:
    """1-D infilling prompt, the middle's first token comes next. PSM: <|fim_prefix|> prefix <|fim_suffix|> suffix
    <|fim_middle|>; SPM: <|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prefix."""
    pre, suf, mid = (torch.tensor([t]) for t in (special.fim_prefix, special.fim_suffix, special.fim_middle))
    if order == "psm":
        return torch.cat([pre, prefix, suf, suffix, mid])
    if order == "spm":
        return torch.cat([pre, suf, suffix, mid, prefix])
    raise ValueError(f"order must be 'psm' or 'spm', got {order!r}")


def batch_fn(objective: str, stream: torch.Tensor, ctx: MaskContext, special: SpecialIds, *, seq_len: int,
             batch_size: int, **kwargs):
    """A `shared.train.train` batch callable `generator -> (x, y)` for `objective`; it sets `ctx.prefix_len`
    as a side effect (the next forward pass reads it). Every objective reads B windows of seq_len + 1 tokens
    from `stream`: the same data and the same number of input tokens per step."""
    if objective not in OBJECTIVES + ("leak",):
        raise ValueError(f"objective must be one of {OBJECTIVES + ('leak',)}, got {objective!r}")

    def make(g: torch.Generator):
        starts = torch.randint(len(stream) - seq_len, (batch_size,), generator=g)
        windows = torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])   # (B, T+1)
        if objective == "causal":
            x, y, p = causal_lm(windows)
        elif objective == "prefix":
            x, y, p = prefix_lm(windows, g)
        elif objective == "leak":                     # the broken prefix LM: prefix targets, but every key visible
            x, y, _ = prefix_lm(windows, g)
            p = torch.full((batch_size,), seq_len)
        elif objective == "mlm":
            x, y, p = masked_lm(windows, special, g, **kwargs)
        else:
            x, y, p = fim_psm(windows, special, g, **kwargs)
        ctx.prefix_len = p
        return x, y

    return make


# ----------------------------------------------------------------------------------------------------------
# Scoring and sampling
@torch.no_grad()
def forward_masked(model: GPT, ctx: MaskContext, x: torch.Tensor, prefix_len) -> torch.Tensor:
    """Logits (B, T, V) of x (B, T) under the prefix-LM rule `prefix_len` (int or (B,) tensor). x goes to the
    model's device; the logits come back on the CPU, where every scorer here reads them."""
    model.eval()
    ctx.prefix_len = prefix_len
    try:
        return model(x.to(model_device(model)))[0].float().cpu()
    finally:
        ctx.prefix_len = None


@torch.no_grad()
def pseudo_log_likelihood(model: GPT, ctx: MaskContext, ids: torch.Tensor, positions: torch.Tensor,
                          mask_id: int, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """MLM scoring (Salazar et al. 2020): for each position t in `positions`, mask token t alone and read
    log p(ids[t] | all other tokens) with the full mask. Returns (log-probs (P,), argmax-correct (P,) bool).
    Not a normalised likelihood: every term sees the future."""
    rows = ids[None].repeat(len(positions), 1)
    rows[torch.arange(len(positions)), positions] = mask_id
    logps, hits = [], []
    for i in range(0, len(rows), chunk):
        part, pos = rows[i:i + chunk], positions[i:i + chunk]
        logits = forward_masked(model, ctx, part, part.shape[1])[torch.arange(len(part)), pos]   # (P, V)
        logps.append(logits.log_softmax(-1)[torch.arange(len(part)), ids[pos]])
        hits.append(logits.argmax(-1) == ids[pos])
    return torch.cat(logps), torch.cat(hits)


@torch.no_grad()
def generate(model: GPT, ctx: MaskContext, prompt: torch.Tensor, n: int, pick_next, prefix_len: int = 0):
    """Left-to-right decoding through `shared.model.decode` (cached): the prompt's first `prefix_len` tokens are a
    bidirectional prefix (prefix LM), every later token is causal."""
    ctx.prefix_len = prefix_len
    try:
        return decode(model, prompt, n, pick_next).cpu()                  # decode moves the prompt to the model
    finally:
        ctx.prefix_len = None


@torch.no_grad()
def iterative_unmask(model: GPT, ctx: MaskContext, ids: torch.Tensor, mask_id: int, per_step: int = 1) -> torch.Tensor:
    """MLM sampling: repeatedly fill the `per_step` masked positions the model is most confident about (greedy),
    until no <|mask|> is left. ids (B, T) -> (B, T)."""
    ids = ids.clone()
    while (ids == mask_id).any():
        logits = forward_masked(model, ctx, ids, ids.shape[1])
        logits[..., mask_id] = float("-inf")                               # never "fill" a mask with a mask
        conf, best = logits.softmax(-1).max(-1)                            # (B, T)
        conf = conf.masked_fill(ids != mask_id, -1.0)
        for b in range(len(ids)):
            k = min(per_step, int((ids[b] == mask_id).sum()))
            if k:
                top = conf[b].topk(k).indices
                ids[b, top] = best[b, top]
    return ids


def zipf_logprobs(n: int, exponent: float = 0.7) -> torch.Tensor:
    """log p(rank) for the story generator's choice lists: p(rank r) proportional to (r + 1) ** -exponent."""
    w = torch.arange(1, n + 1, dtype=torch.float64) ** -exponent
    return (w / w.sum()).log()


# ----------------------------------------------------------------------------------------------------------
# The yardsticks on whole validation stories
OPENERS = ("Once upon a time, ", "One day, ", "Long ago, ")
_PREFIX = re.compile(r"^(Once upon a time, |One day, |Long ago, )there was a (\w+) (\w+) named (\w+)\. \4 lived near "
                     r"the (\w+)\. \4 had a (\w+) (\w+)\.")


def story_prefix(text: str) -> tuple[str, float]:
    """The story's set-up up to the planted object ("... Mia had a red kite.") and its exact log-probability
    under the generator: seven independent Zipf choices (opener, size, animal, name, place, colour, object)."""
    from shared.data import CATEGORIES

    m = _PREFIX.match(text)
    if m is None:
        raise ValueError(f"not a story set-up: {text[:60]!r}")
    opener, size, animal, name, place, colour, obj = m.groups()
    logp = float(zipf_logprobs(3)[OPENERS.index(opener)])
    for cat, word in (("size", size), ("animal", animal), ("name", name), ("place", place), ("colour", colour),
                      ("object", obj)):
        logp += float(zipf_logprobs(len(CATEGORIES[cat]))[CATEGORIES[cat].index(word)])
    return m.group(0), logp


@dataclass
class EvalSet:
    """N validation stories as rows of the validation stream: rows (N, T) start at a story's first token;
    `plant` (N,) is the colour's index (the object follows), `prefix_end` (N,) the first suffix token, `end` (N,)
    the story's end-of-text index (suffix = prefix_end .. end-1); `floor_nats` (N,) = -log p(suffix | prefix)."""
    rows: torch.Tensor
    plant: torch.Tensor
    prefix_end: torch.Tensor
    end: torch.Tensor
    floor_nats: torch.Tensor

    @property
    def n_suffix_tokens(self) -> int:
        return int((self.end - self.prefix_end).sum())


def make_eval_set(tokenizer, texts, logprobs, stream: torch.Tensor, seq_len: int, n: int) -> EvalSet:
    """The first n stories of `texts` (whose token stream is `stream`, end-of-text after each) that fit seq_len."""
    eos = tokenizer.eos_token_id
    starts = [0] + (torch.nonzero(stream == eos).flatten() + 1).tolist()
    rows, plant, pe, end, floor = [], [], [], [], []
    for i, (text, lp) in enumerate(zip(texts, logprobs)):
        s = starts[i]
        length = starts[i + 1] - 1 - s                                   # story tokens, without end-of-text
        if length + 1 > seq_len or s + seq_len > len(stream):
            continue
        prefix_text, prefix_lp = story_prefix(text)
        n_prefix = len(tokenizer(prefix_text, add_special_tokens=False)["input_ids"])
        rows.append(stream[s:s + seq_len])
        plant.append(n_prefix - 3)                                       # colour, object, "."
        pe.append(n_prefix)
        end.append(length)
        floor.append(-(lp - prefix_lp))
        if len(rows) == n:
            break
    return EvalSet(torch.stack(rows), torch.tensor(plant), torch.tensor(pe), torch.tensor(end),
                   torch.tensor(floor, dtype=torch.float64))


def _suffix_positions(ev: EvalSet) -> tuple[torch.Tensor, torch.Tensor]:
    """(story index, token index) of every suffix token."""
    pairs = [(b, t) for b in range(len(ev.rows)) for t in range(int(ev.prefix_end[b]), int(ev.end[b]))]
    idx = torch.tensor(pairs)
    return idx[:, 0], idx[:, 1]


@torch.no_grad()
def suffix_scores(model: GPT, ctx: MaskContext, ev: EvalSet, how: str, mask_id: int | None = None):
    """Per suffix token: (log p of the true token (P,), argmax correct (P,)).

    how = "causal": left context only (causal mask); "prefix": the set-up is a bidirectional prefix, the suffix
    causal; "leak": every key visible, so position t-1 can read token t, its own target (the broken mask); "pll": MLM pseudo-log-likelihood, each suffix token masked alone with everything else visible."""
    b, t = _suffix_positions(ev)
    if how == "pll":
        if mask_id is None:
            raise ValueError("how='pll' needs mask_id")
        lps, hits = [], []
        for i in range(len(ev.rows)):
            sel = b == i
            lp, hit = pseudo_log_likelihood(model, ctx, ev.rows[i], t[sel], mask_id)
            lps.append(lp)
            hits.append(hit)
        return torch.cat(lps), torch.cat(hits)
    if how not in ("causal", "prefix", "leak"):
        raise ValueError(f"how must be 'causal', 'prefix', 'leak' or 'pll', got {how!r}")
    prefix_len = ev.prefix_end if how == "prefix" else ev.rows.shape[1] if how == "leak" else 0
    logits = forward_masked(model, ctx, ev.rows, prefix_len)                # (N, T, V)
    logp = logits[b, t - 1].log_softmax(-1)                                  # position t-1 predicts token t
    true = ev.rows[b, t]
    return logp[torch.arange(len(b)), true], logp.argmax(-1) == true


@torch.no_grad()
def infill_hits(model: GPT, ctx: MaskContext, ev: EvalSet, how: str, special: SpecialIds):
    """Is the planted colour / object (hidden) the model's top guess? Returns (colour hits (N,), object hits (N,)).

    "causal"/"prefix": left context only (everything before the colour; the object read after the true colour);
    "mlm": both masked, everything else visible; "fim": PSM prompt with the rest of the story as suffix."""
    N = len(ev.rows)
    c, ar = ev.plant, torch.arange(N)
    colour, obj = ev.rows[ar, c], ev.rows[ar, c + 1]
    if how in ("causal", "prefix"):
        logits = forward_masked(model, ctx, ev.rows, c if how == "prefix" else 0)
        return logits[ar, c - 1].argmax(-1) == colour, logits[ar, c].argmax(-1) == obj
    if how == "mlm":
        x = ev.rows.clone()
        x[ar, c] = special.mask
        x[ar, c + 1] = special.mask
        logits = forward_masked(model, ctx, x, x.shape[1])
        return logits[ar, c].argmax(-1) == colour, logits[ar, c + 1].argmax(-1) == obj
    if how != "fim":
        raise ValueError(f"how must be 'causal', 'prefix', 'mlm' or 'fim', got {how!r}")
    prompts = [torch.cat([fim_prompt(ev.rows[i, :c[i]], ev.rows[i, c[i] + 2:ev.end[i] + 1], special),
                          colour[i:i + 1]]) for i in range(N)]
    L = max(len(p) for p in prompts)
    x = torch.stack([F.pad(p, (0, L - len(p)), value=int(ev.rows[0, ev.end[0]])) for p in prompts])
    last = torch.tensor([len(p) - 2 for p in prompts])                 # the <|fim_middle|> position
    logits = forward_masked(model, ctx, x, 0)
    return logits[ar, last].argmax(-1) == colour, logits[ar, last + 1].argmax(-1) == obj


@torch.no_grad()
def corruption_accuracy(model: GPT, ctx: MaskContext, rows: torch.Tensor, special: SpecialIds,
                        generator: torch.Generator | None = None, rate: float = 0.15) -> dict[str, float]:
    """Top-1 accuracy of an MLM at recovering the original token at selected positions (rate of the non-special
    tokens of rows (N, T)) when the input there is <|mask|>, the real token, or a random ordinary token; all
    other positions are left intact and every key is visible."""
    _check_probs(rate=rate)
    sel = (torch.rand(rows.shape, generator=generator) < rate) & ~torch.isin(rows, torch.tensor(special.special))
    ordinary = torch.tensor([i for i in range(special.vocab_size) if i not in special.special])
    random_ids = ordinary[torch.randint(len(ordinary), rows.shape, generator=generator)]
    out = {}
    for name, fill in (("mask", torch.full_like(rows, special.mask)), ("real", rows), ("random", random_ids)):
        x = torch.where(sel, fill, rows)
        pred = forward_masked(model, ctx, x, x.shape[1]).argmax(-1)
        out[name] = float((pred[sel] == rows[sel]).float().mean())
    return out


# ----------------------------------------------------------------------------------------------------------
# A local infilling slot: the hero's name, repeated two tokens to its right ("named [Tom]. Tom lived near ...")
def name_slots(tokenizer, rows: torch.Tensor) -> torch.Tensor:
    """(N,) index of the hero's name in each story row: the token after " named". The same name is the token two
    to its right (". Tom"), so a model that can read the right context can copy it; the left context says nothing
    about it (the generator draws the name independently), so without the future the best is the name's prior."""
    named = tokenizer.convert_tokens_to_ids("Ġnamed")
    out = []
    for i, r in enumerate(rows):
        hit = (r == named).nonzero().flatten()
        if len(hit) == 0 or int(hit[0]) + 3 > len(r):
            raise ValueError(f"row {i} has no ' named X . X' set-up")
        out.append(int(hit[0]) + 1)
    return torch.tensor(out)


@torch.no_grad()
def slot_logprob(model: GPT, ctx: MaskContext, ev: EvalSet, slot: torch.Tensor, how: str,
                 special: SpecialIds) -> torch.Tensor:
    """log p(true token at `slot`) per story (N,), the token hidden and as much context as the objective reads:
    "causal" / "prefix": the left context only (the prefix LM reads it bidirectionally); "mlm": the slot is
    <|mask|>, everything else visible; "fim": PSM prompt, the rest of the story as suffix, read at <|fim_middle|>;
    "fim_spm": the same in SPM order, read after the prefix."""
    N = len(ev.rows)
    if slot.shape != (N,) or int(slot.min()) < 1 or int(slot.max()) >= ev.rows.shape[1]:
        raise ValueError(f"slot must be (N,) = ({N},) indices in [1, T), got shape {tuple(slot.shape)}")
    ar = torch.arange(N)
    true = ev.rows[ar, slot]
    if how in ("causal", "prefix"):
        logits = forward_masked(model, ctx, ev.rows, slot if how == "prefix" else 0)
        return logits[ar, slot - 1].log_softmax(-1)[ar, true]
    if how == "mlm":
        x = ev.rows.clone()
        x[ar, slot] = special.mask
        return forward_masked(model, ctx, x, x.shape[1])[ar, slot].log_softmax(-1)[ar, true]
    if how not in ("fim", "fim_spm"):
        raise ValueError(f"how must be 'causal', 'prefix', 'mlm', 'fim' or 'fim_spm', got {how!r}")
    order = "spm" if how == "fim_spm" else "psm"
    prompts = [fim_prompt(ev.rows[i, :slot[i]], ev.rows[i, slot[i] + 1:ev.end[i] + 1], special, order)
               for i in range(N)]
    L = max(len(p) for p in prompts)
    x = torch.stack([F.pad(p, (0, L - len(p)), value=int(ev.rows[0, ev.end[0]])) for p in prompts])
    last = torch.tensor([len(p) - 1 for p in prompts])                 # the prompt's last token predicts the middle
    return forward_masked(model, ctx, x, 0)[ar, last].log_softmax(-1)[ar, true]


# ----------------------------------------------------------------------------------------------------------
# Graded sample quality: sentence by sentence against the generator's templates
def _alt(cat: str) -> str:
    from shared.data import CATEGORIES
    return "(?:" + "|".join(CATEGORIES[cat]) + ")"


def sentence_patterns(name: str) -> list[re.Pattern]:
    """Every sentence the story generator can write after the set-up, for a hero called `name`: the eight
    fillers, the recall ("Later, Tom found the red kite."), "Tom felt happy." and "The end."."""
    n = re.escape(name)
    a = _alt
    forms = [f"The weather was {a('weather')}", f"A {a('colour')} {a('animal')} sat near the {a('place')}",
             f"There was a {a('colour')} {a('animal')} in the {a('place')}", f"Then the {a('animal')} felt {a('feeling')}",
             f"In the {a('place')}, {n} met {a('name')} the {a('animal')}", f"After lunch, {n} ate some {a('food')}",
             f"Every morning, {n} went to the {a('place')}", f"Soon {n} felt {a('feeling')}",
             f"Later, {n} {a('verb')} the {a('colour')} {a('object')}", f"{n} felt {a('feeling')}", "The end"]
    return [re.compile("^" + f + r"\.$") for f in forms]


def grade_continuation(text: str, name: str, colour: str, obj: str) -> dict:
    """A sample's continuation (the text after the set-up), graded: its sentences (split after each '.'), how
    many of them the generator could write for this hero, and whether a recall sentence names the planted
    colour and object. Returns dict(sentences, valid, recall_right)."""
    if not all(isinstance(v, str) for v in (text, name, colour, obj)):
        raise TypeError("text, name, colour and obj must be str")
    sents = [s.strip() for s in re.split(r"(?<=\.)\s", text.strip()) if s.strip()]
    pats = sentence_patterns(name)
    valid = sum(any(p.match(s) for p in pats) for s in sents)
    rec = re.search(rf"Later, {re.escape(name)} {_alt('verb')} the (\w+) (\w+)\.", text)
    return dict(sentences=len(sents), valid=valid,
                recall_right=bool(rec and rec.group(1) == colour and rec.group(2) == obj))


def valid_prefix(setup: str, continuation: str) -> tuple[int, float]:
    """The longest run of whole sentences at the start of `continuation` that the generator could write after
    `setup`, and its exact log-probability given the set-up: (characters of `continuation` kept, log p).

    Read with the generator's own parser (`shared.data`'s tape, used read-only): a text the generator cannot
    continue stops the tape exactly at its end, a wrong one earlier. A graded, exact measure of a sample: the
    valid share and its true log-probability per token, where whole-story validity is all or nothing."""
    from shared.data import _Mismatch, _story, _Tape

    if not isinstance(setup, str) or not isinstance(continuation, str):
        raise TypeError("setup and continuation must be str")

    class PrefixTape(_Tape):      # a text that ends inside a fixed literal (". Tom felt ") is a prefix, not wrong
        def emit(self, literal):
            if not self.text.startswith(literal, self.pos) and literal.startswith(self.text[self.pos:]):
                self.pos = len(self.text)
                raise _Mismatch("the text ends inside a literal")
            super().emit(literal)

    def read(text):
        tape = PrefixTape(text=text)
        try:
            _story(tape, 1, 8)
            tape.done()
        except _Mismatch:
            return tape.logp if tape.pos == len(text) else None
        return tape.logp

    base = read(setup)
    if base is None:
        raise ValueError(f"not a story set-up: {setup[:60]!r}")
    ends = [m.end() for m in re.finditer(r"\.", continuation)]
    for end in reversed(ends):
        lp = read(setup + continuation[:end])
        if lp is not None:
            return end, lp - base
    return 0, 0.0
