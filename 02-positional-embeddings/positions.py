"""Positional information for attention, from scratch: sinusoidal, learned, RoPE, ALiBi and none.

Shapes use the legend of ``shared/model.py``: B batch, T tokens, C = d_model, H heads, D = head_dim (C = H * D),
V vocabulary.

Two families:
  * absolute, added to the token embeddings before the first block:
      ``sinusoidal_table(T, d_model)`` (fixed) and ``LearnedPositions(max_len, d_model)`` (trained) -> (T, C)
  * relative, applied inside every attention layer:
      RoPE rotates q and k by position-dependent angles (``rope_cos_sin`` + ``apply_rope``), so the score
      q(m)·k(n) depends only on m - n; ALiBi adds ``-slope_h * |m - n|`` to the scores (``alibi_bias``).
  * "none" (NoPE): nothing at all; only a causal mask can leak position.

``attention(q, k, v, scheme=...)`` is the explicit softmax attention with each relative scheme plugged in.
The references the notebook and the tests both compare with live here once: ``alibi_slopes_paper`` (the ALiBi
paper's code) and ``hf_llama_rope`` (transformers' Llama rotary embedding). The rest are the small task and
metrics the notebook uses to break things (two order tasks and the exact bounds of blind models, permutation gap,
similarity by distance, principal components, loss by position, attention entropy) and the two interventions
on a long context: ``attention_window`` (every query limited to its last keys) and ``sliding_window_loss``
(the model re-run on the last tokens, each at a position it had in training).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.model import Attention, model_device
from shared.validate import check_ints

SCHEMES = ("sinusoidal", "learned", "rope", "alibi", "none")


# ----------------------------------------------------------------------------------------------- validation
def _even(name: str, value) -> None:
    check_ints(1, **{name: value})
    if value % 2:
        raise ValueError(f"{name} must be even (dimensions come in (sin, cos) / rotation pairs), got {value}")


def _theta(theta) -> float:
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 1:
        raise ValueError(f"theta (the frequency base) must be a number > 1, got {theta!r}")
    return float(theta)


def _tensor(name: str, x, dims: int | None = None, min_rows: int = 0) -> None:
    """x must be a tensor (TypeError) with `dims` dimensions and at least `min_rows` rows (ValueError)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if (dims is not None and x.dim() != dims) or (x.dim() and x.shape[0] < min_rows):
        raise ValueError(f"{name} must be a {dims}-D tensor with at least {min_rows} rows, got shape {tuple(x.shape)}")


# ------------------------------------------------------------------------------------------------ absolute
def sinusoidal_table(T: int, d_model: int, base: float = 10000.0) -> torch.Tensor:
    """The fixed table of "Attention Is All You Need": returns (T, C) float32.

    PE[p, 2i] = sin(p / base^(2i/C)),  PE[p, 2i+1] = cos(p / base^(2i/C)),  i = 0 .. C/2 - 1.
    Pair i is a clock turning at angular speed base^(-2i/C) rad/position: fast clocks at low i, slow at high i.
    """
    check_ints(1, T=T)
    _even("d_model", d_model)
    base = _theta(base)
    pos = torch.arange(T, dtype=torch.float64)[:, None]                              # (T, 1)
    inv_freq = base ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)   # (C/2,)
    angle = pos * inv_freq                                                           # (T, C/2)
    table = torch.stack([angle.sin(), angle.cos()], dim=-1)                          # (T, C/2, 2): sin, cos
    return table.flatten(1).float()                                                  # (T, C) interleaved


class LearnedPositions(nn.Module):
    """A trained table of absolute positions (GPT-2 style): ``forward(T) -> (T, C)``.

    It knows only the ``max_len`` rows it was built with; asking for more raises ValueError, which is the
    learned table's hard failure at length extrapolation.
    """

    def __init__(self, max_len: int, d_model: int, init_std: float = 0.02):
        super().__init__()
        check_ints(1, max_len=max_len, d_model=d_model)
        self.table = nn.Parameter(torch.randn(max_len, d_model) * init_std)      # (max_len, C)

    def forward(self, T: int) -> torch.Tensor:
        check_ints(1, T=T)
        if T > self.table.shape[0]:        # the lesson: no row for a position never built
            raise ValueError(f"T={T} exceeds the learned table's max_len={self.table.shape[0]}: "
                             "a learned table has no rows for unseen positions")
        return self.table[:T]


# ---------------------------------------------------------------------------------------------------- RoPE
def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the RoPE angles, each (T, D), in the rotate-half layout used by HF Llama.

    positions: 1-D (T,) integer or float tensor. Pair i is (dim i, dim i + D/2), rotated by the angle
    positions * theta^(-2i/D). Angles are computed in float64, then cast to ``dtype``.
    """
    _even("head_dim", head_dim)
    theta = _theta(theta)
    _tensor("positions", positions, dims=1)
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)   # (D/2,)
    angle = positions.to(torch.float64)[:, None] * inv_freq                              # (T, D/2)
    angle = torch.cat([angle, angle], dim=-1)                                            # (T, D)
    return angle.cos().to(dtype), angle.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., D): (x1, x2) -> (-x2, x1), i.e. a +90 degree turn of every pair (x1[i], x2[i])."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair of x by its position's angle: x (..., T, D), cos/sin (T, D) -> (..., T, D).

    Per pair (a, b) at angle phi: (a cos phi - b sin phi, b cos phi + a sin phi), a plain 2-D rotation.
    """
    if x.dim() < 2 or x.shape[-1] % 2:
        raise ValueError(f"x must be (..., T, head_dim) with an even head_dim, got shape {tuple(x.shape)}")
    if cos.shape != sin.shape or cos.shape != x.shape[-2:]:
        raise ValueError(f"cos and sin must both be (T, head_dim) = {tuple(x.shape[-2:])}, "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    return x * cos + rotate_half(x) * sin


def rope_scores(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                theta: float = 10000.0) -> torch.Tensor:
    """Dot products of RoPE-rotated vectors: q (N, D) at q_pos (N,), k (N, D) at k_pos (N,) -> (N,).

    Used to check RoPE's defining property: the score depends on q_pos - k_pos only.
    """
    if q.shape != k.shape or q.dim() != 2:
        raise ValueError(f"q and k must both be (N, head_dim), got {tuple(q.shape)} and {tuple(k.shape)}")
    cq, sq = rope_cos_sin(q_pos, q.shape[-1], theta, q.dtype)
    ck, sk = rope_cos_sin(k_pos, k.shape[-1], theta, k.dtype)
    return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum(-1)


def hf_llama_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                  theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: transformers' ``LlamaRotaryEmbedding`` + ``apply_rotary_pos_emb`` on q, k (B, H, T, D).

    positions (T,). HF builds its angles in float32 (error ~ position * 6e-8 rad), ours in float64.
    """
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    B, H, T, D = q.shape
    config = LlamaConfig(hidden_size=H * D, num_attention_heads=H, head_dim=D,
                         max_position_embeddings=int(positions.max()) + 1,
                         rope_parameters={"rope_type": "default", "rope_theta": float(theta)})
    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None].expand(B, T))
    return apply_rotary_pos_emb(q, k, cos, sin)


# --------------------------------------------------------------------------------------------------- ALiBi
def alibi_slopes(n_head: int) -> torch.Tensor:
    """The ALiBi per-head slopes, (H,) float32, from their closed form.

    For H a power of two: the geometric sequence 2^(-8/H), 2^(-16/H), ..., 2^(-8). Otherwise take the
    2^floor(log2 H) slopes of the nearest smaller power of two, then fill with every other slope of the next
    power of two (Press et al. 2022; ``alibi_slopes_paper`` is their code).
    """
    check_ints(1, n_head=n_head)

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    if n_head & (n_head - 1) == 0:
        slopes = geometric(n_head)
    else:
        lower = 2 ** int(math.floor(math.log2(n_head)))
        slopes = geometric(lower) + geometric(2 * lower)[0::2][: n_head - lower]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_slopes_paper(n: int) -> list[float]:
    """The reference: ``get_slopes`` of github.com/ofirpress/attention_with_linear_biases, transcribed."""
    def get_slopes_power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        return [start * start ** i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return get_slopes_power_of_2(closest) + alibi_slopes_paper(2 * closest)[0::2][: n - closest]


def alibi_bias(n_head: int, T: int, causal: bool = True) -> torch.Tensor:
    """Additive attention bias (H, T, T): bias[h, m, n] = -slope_h * |m - n|.

    causal=True also puts -inf above the diagonal (n > m), so the result is the full mask+bias.
    """
    check_ints(1, T=T)
    slopes = alibi_slopes(n_head)                                              # (H,)
    pos = torch.arange(T)
    distance = (pos[:, None] - pos[None, :]).abs().float()                     # (T, T)
    bias = -slopes[:, None, None] * distance                                   # (H, T, T)
    if causal:
        bias = bias.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    return bias


# ------------------------------------------------------------------------------------------------ attention
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scheme: str = "none",
              causal: bool = True, theta: float = 10000.0, return_weights: bool = False):
    """Explicit softmax attention with a relative scheme inside: q, k, v (B, H, T, D) -> (B, H, T, D).

    scheme "rope" rotates q and k; "alibi" adds the per-head distance bias; "none", "sinusoidal" and
    "learned" add nothing here (absolute schemes act on the embeddings, before attention).
    return_weights=True also returns the (B, H, T, T) softmax weights.
    """
    _check_attention(q, k, v, scheme)
    B, H, T, D = q.shape
    if scheme == "rope":
        cos, sin = rope_cos_sin(torch.arange(T), D, theta, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)                             # (B, H, T, T)
    if scheme == "alibi":
        scores = scores + alibi_bias(H, T, causal=causal).to(q.dtype)           # mask included when causal
    elif causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    weights = scores.softmax(dim=-1)
    out = weights @ v                                                           # (B, H, T, D)
    return (out, weights) if return_weights else out


def _check_attention(q, k, v, scheme) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v must share one (B, H, T, D) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


# ---------------------------------------------------------------------------------------- measure & break
def similarity_by_distance(table: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between position vectors m and n as a function of |m - n|.

    table (T, C) -> (T,), entry k averages cos(table[m], table[m + k]) over all m. Entry 0 is 1.
    """
    _tensor("table", table, dims=2, min_rows=1)
    unit = F.normalize(table.double(), dim=-1)
    sim = unit @ unit.T                                                         # (T, T)
    return torch.stack([sim.diagonal(k).mean() for k in range(table.shape[0])]).float()


def principal_components(vectors: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Project N vectors (N, C) on their first k principal axes: returns coords (N, k) and the fraction of
    the variance each axis explains (k,). Centred, float64 SVD; a constant set has zero variance (fractions 0).
    """
    _tensor("vectors", vectors, dims=2, min_rows=1)
    check_ints(1, k=k)
    centred = vectors.double() - vectors.double().mean(0)
    U, S, _ = torch.linalg.svd(centred, full_matrices=False)                    # centred = U diag(S) Vh
    k_eff = min(k, S.numel())
    coords = torch.zeros(vectors.shape[0], k, dtype=torch.float64)
    coords[:, :k_eff] = U[:, :k_eff] * S[:k_eff]
    total = S.pow(2).sum()
    explained = torch.zeros(k, dtype=torch.float64)
    if total > 0:
        explained[:k_eff] = S[:k_eff].pow(2) / total
    return coords, explained


TASKS = ("first", "previous")


def order_task(task: str, n_seqs: int, seq_len: int, vocab_size: int,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tasks that need word order: returns x, y, each (N, T) long, y = -100 where a position is not scored.

    Tokens are distinct within a sequence (a random draw without replacement), so an answer is found only by
    knowing where it sits (see ``order_bounds``).
      * "first":    every position t = 1 .. T-1 must output the sequence's FIRST token x_0 (position 0 sees only
                    the answer itself under a causal mask, so it is left out for every model alike).
      * "previous": every interior position t = 1 .. T-2 must output its left neighbour x_{t-1} (position 0 has
                    none; position T-1 is left out so that every scored position has two neighbours).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    check_ints(1, n_seqs=n_seqs, seq_len=seq_len, vocab_size=vocab_size)
    if seq_len > vocab_size:
        raise ValueError(f"seq_len={seq_len} must be <= vocab_size={vocab_size} (tokens are distinct)")
    if task == "previous" and seq_len < 3:
        raise ValueError(f"seq_len must be >= 3 for the previous-token task (one interior position), got {seq_len}")
    noise = torch.rand(n_seqs, vocab_size, generator=generator)
    x = noise.argsort(dim=-1)[:, :seq_len]                                      # (N, T) distinct tokens
    y = torch.full_like(x, -100)
    if task == "first":
        y[:, 1:] = x[:, :1]                                                     # all = the first token
    else:
        y[:, 1:-1] = x[:, :-2]                                                  # the left neighbour
    return x, y


def order_batches(task: str, batch_size: int, seq_len: int, vocab_size: int):
    """A batch maker for ``shared.train.train``: ``generator -> (x, y)``, (B, T) each, fresh every call."""
    check_ints(1, batch_size=batch_size)
    order_task(task, 1, seq_len, vocab_size)                                    # validates the arguments once
    return lambda generator: order_task(task, batch_size, seq_len, vocab_size, generator)


def order_bounds(task: str, seq_len: int) -> dict[str, dict[str, float]]:
    """Best accuracy and mean loss (nats) over the scored positions for models blind in two ways.

    "order-blind" (permutation-equivariant: no positions, no mask): position t sees the set of tokens and its
    own token, which is never the answer in either task: best is uniform over the other T-1 tokens,
    accuracy 1/(T-1), loss ln(T-1).
    "direction-blind" (reversal-equivariant: symmetric ALiBi, no mask): position t of x and position T-1-t of
    reversed x get the same output.
      first task: their answers are x_0 and x_{T-1}, so at most one of the two is right (loss >= ln 2 each); only
      position T-1, whose mirror is the unscored position 0, can always be right: T/2 right answers out of T-1,
      accuracy T/(2(T-1)), loss (T-2)/(T-1) ln 2.
      previous task: their answers are x_{t-1} and x_{t+1}, the two neighbours, and every scored position's mirror
      is scored: accuracy 1/2, loss ln 2 (half on each neighbour).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    check_ints(1, seq_len=seq_len)
    if seq_len < (2 if task == "first" else 3):
        raise ValueError(f"seq_len must be >= {2 if task == 'first' else 3} for the {task} task, got {seq_len}")
    T = seq_len
    blind = {"order-blind": {"accuracy": 1 / (T - 1), "loss": math.log(T - 1)}}
    if task == "first":
        blind["direction-blind"] = {"accuracy": T / (2 * (T - 1)), "loss": (T - 2) / (T - 1) * math.log(2)}
    else:
        blind["direction-blind"] = {"accuracy": 0.5, "loss": math.log(2)}
    return blind


def order_accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of correct argmax predictions over the scored positions (y != -100): logits (N, T, V), y (N, T)."""
    if logits.dim() != 3 or y.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (N, T, V) and y (N, T), got {tuple(logits.shape)} and {tuple(y.shape)}")
    scored = y != -100
    if not scored.any():
        raise ValueError("y has no scored position (every entry is -100)")
    return (logits.argmax(-1) == y)[scored].float().mean().item()


def permutation_gap(fn, idx: torch.Tensor, perm: torch.Tensor) -> float:
    """max |fn(idx[:, perm]) - fn(idx)[:, perm]|: 0 exactly when fn is permutation-equivariant.

    fn maps idx (B, T) to (B, T, ...); perm is a permutation of range(T).
    """
    _tensor("idx", idx, dims=2)
    T = idx.shape[1]
    if perm.dim() != 1 or not torch.equal(perm.sort().values, torch.arange(T)):
        raise ValueError(f"perm must be a permutation of range({T}), got {perm.tolist()}")
    return (fn(idx[:, perm]) - fn(idx)[:, perm]).abs().max().item()


def _windows(tokens: torch.Tensor, seq_len: int, n_windows: int, seed: int) -> torch.Tensor:
    """(n_windows, seq_len + 1) slices of the 1-D stream at seeded random offsets (the same for every caller)."""
    _tensor("tokens", tokens, dims=1)
    check_ints(1, seq_len=seq_len, n_windows=n_windows)
    if len(tokens) < seq_len + 1:
        raise ValueError(f"tokens has {len(tokens)} entries, need at least seq_len + 1 = {seq_len + 1}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(tokens) - seq_len, (n_windows,), generator=generator)
    return torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def loss_by_position(model: nn.Module, tokens: torch.Tensor, seq_len: int, n_windows: int = 64,
                     batch_size: int = 16, seed: int = 0) -> torch.Tensor:
    """Mean next-token loss (nats) at each position of windows of ``seq_len`` tokens: returns (T,) on the CPU.

    tokens: 1-D stream. Windows start at seeded random offsets, so entry t is the loss with exactly t tokens
    of context; the mean of the first L entries is the loss of a model evaluated with windows of length L.
    model: idx (B, T) -> (logits (B, T, V), ...); batches go to the model's device.
    """
    check_ints(1, batch_size=batch_size)
    windows = _windows(tokens, seq_len, n_windows, seed).to(model_device(model))     # (N, T + 1)
    was_training = model.training
    model.eval()
    total = torch.zeros(seq_len, dtype=torch.float64)
    for i in range(0, n_windows, batch_size):
        x, y = windows[i:i + batch_size, :-1], windows[i:i + batch_size, 1:]
        logits = model(x)[0]                                                    # (b, T, V)
        nll = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")      # (b, T)
        total += nll.double().sum(0).cpu()
    model.train(was_training)
    return (total / n_windows).float()


@torch.no_grad()
def sliding_window_loss(model: nn.Module, tokens: torch.Tensor, seq_len: int, window: int, stride: int,
                        n_windows: int = 64, batch_size: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The model re-run from scratch on the last ``window`` tokens before each scored position.

    The windows of ``seq_len`` tokens are those of ``loss_by_position`` (same ``n_windows`` and ``seed``), so the
    two can be compared position by position. For each end position e = window - 1, window - 1 + stride, ... <
    seq_len, the tokens e - window + 1 .. e of each window are fed as a fresh sequence and only its last output
    is scored (the next token e + 1). Returns (ends (E,) long, mean loss at each end (E,)), both on the CPU: the
    loss at position e with ``window`` tokens of context, every token seen at a position it had in training.
    """
    check_ints(1, window=window, stride=stride, batch_size=batch_size)
    if window > seq_len:
        raise ValueError(f"window ({window}) must be <= seq_len ({seq_len})")
    windows = _windows(tokens, seq_len, n_windows, seed)                        # (N, T + 1)
    ends = torch.arange(window - 1, seq_len, stride)
    chunks = torch.cat([windows[:, e - window + 1:e + 2] for e in ends.tolist()])   # (E * N, window + 1)
    chunks = chunks.to(model_device(model))
    was_training = model.training
    model.eval()
    nll = []
    for i in range(0, len(chunks), batch_size):
        x, y = chunks[i:i + batch_size, :-1], chunks[i:i + batch_size, -1]
        nll.append(F.cross_entropy(model(x)[0][:, -1], y, reduction="none").double().cpu())
    model.train(was_training)
    return ends, torch.cat(nll).view(len(ends), n_windows).mean(1).float()


class _WindowedAttention(Attention):
    """shared.model's Attention with each query limited to the last ``window`` keys (itself included)."""

    window: int = 1

    def _bias(self, T: int, T_k: int, device, dtype) -> torch.Tensor:
        cfg = self.cfg
        bias = super()._bias(T, T_k, device, dtype)
        if bias is None:
            bias = torch.zeros(1, T, T_k, device=device, dtype=dtype)
        q_pos = torch.arange(T_k - T, T_k, device=device)[:, None]
        k_pos = torch.arange(T_k, device=device)[None, :]
        outside = q_pos - k_pos >= self.window
        if cfg.causal:
            outside = outside | (k_pos > q_pos)
        return bias.masked_fill(outside, float("-inf"))


@contextmanager
def attention_window(model: nn.Module, window: int):
    """Inside the block, every attention layer of a shared.model GPT lets query t see keys t - window + 1 .. t only.

    Nothing else changes (weights, positions, the whole long context still flows through the residual stream of
    each token). The layers get their own class back on exit.
    """
    check_ints(1, window=window)
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(type(b.attn) is Attention for b in blocks):
        raise TypeError("attention_window needs a shared.model GPT whose blocks use the built-in Attention")
    windowed = type("WindowedAttention", (_WindowedAttention,), {"window": window})
    try:
        for b in blocks:
            b.attn.__class__ = windowed
        yield model
    finally:
        for b in blocks:
            b.attn.__class__ = Attention


def attention_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each query's attention distribution: weights (..., T_q, T_k), rows summing to 1 ->
    (..., T_q). A query spreading evenly over n keys has entropy ln n; one looking at a single key has 0."""
    _tensor("weights", weights)
    if weights.dim() < 2:
        raise ValueError(f"weights must be (..., T_q, T_k), got shape {tuple(weights.shape)}")
    w = weights.double()
    return -(w * w.clamp_min(1e-300).log()).sum(-1)
