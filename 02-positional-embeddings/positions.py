"""Positional information for attention, from scratch: sinusoidal, learned, RoPE, ALiBi and none.

Shapes: B batch, H heads, T sequence length, D model width, hd head width (D = H * hd).

Two families:
  * absolute, added to the token embeddings before the first block:
      ``sinusoidal_table(T, D)`` (fixed) and ``LearnedPositions(max_len, D)`` (trained) -> (T, D)
  * relative, applied inside every attention layer:
      RoPE rotates q and k by position-dependent angles (``rope_cos_sin`` + ``apply_rope``), so the score
      q(m)·k(n) depends only on m - n; ALiBi adds ``-slope_h * (m - n)`` to the scores (``alibi_bias``).
  * "none" (NoPE): nothing at all; only a causal mask can leak position.

``attention(q, k, v, scheme=...)`` is the explicit softmax attention with each relative scheme plugged in.
The rest are the small tasks and metrics the notebook uses to break things (first-token task,
permutation check, similarity-by-distance).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

SCHEMES = ("sinusoidal", "learned", "rope", "alibi", "none")


# ----------------------------------------------------------------------------------------------- validation
def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def _check_even(name: str, value) -> int:
    _check_positive_int(name, value)
    if value % 2:
        raise ValueError(f"{name} must be even (dimensions are used in (sin, cos) / rotation pairs), got {value}")
    return value


def _check_theta(theta) -> float:
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta > 1:
        raise ValueError(f"theta (the frequency base) must be a number > 1, got {theta!r}")
    return float(theta)


# ------------------------------------------------------------------------------------------------ absolute
def sinusoidal_table(T: int, d: int, base: float = 10000.0) -> torch.Tensor:
    """The fixed table of "Attention Is All You Need": returns (T, d) float32.

    PE[p, 2i] = sin(p / base^(2i/d)),  PE[p, 2i+1] = cos(p / base^(2i/d)),  i = 0 .. d/2 - 1.
    Pair i is a clock turning at angular speed base^(-2i/d) rad/position: fast clocks at low i, slow at high i.
    """
    _check_positive_int("T", T)
    _check_even("d", d)
    base = _check_theta(base)
    pos = torch.arange(T, dtype=torch.float64)[:, None]                       # (T, 1)
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)      # (d/2,)
    angle = pos * inv_freq                                                    # (T, d/2)
    table = torch.empty(T, d, dtype=torch.float64)
    table[:, 0::2] = angle.sin()
    table[:, 1::2] = angle.cos()
    return table.float()


class LearnedPositions(nn.Module):
    """A trained table of absolute positions (GPT-2 style): ``forward(T) -> (T, d)``.

    It knows only the ``max_len`` rows it was built with; asking for more raises ValueError, which is the
    learned table's hard failure at length extrapolation.
    """

    def __init__(self, max_len: int, d: int, init_std: float = 0.02):
        super().__init__()
        _check_positive_int("max_len", max_len)
        _check_positive_int("d", d)
        self.table = nn.Parameter(torch.randn(max_len, d) * init_std)          # (max_len, d)

    def forward(self, T: int) -> torch.Tensor:
        _check_positive_int("T", T)
        if T > self.table.shape[0]:
            raise ValueError(f"T={T} exceeds the learned table's max_len={self.table.shape[0]}: "
                             "a learned table has no rows for unseen positions")
        return self.table[:T]


# ---------------------------------------------------------------------------------------------------- RoPE
def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the RoPE angles, each (T, head_dim), in the rotate-half layout used by HF Llama.

    positions: 1-D (T,) integer or float tensor. Pair i is (dim i, dim i + head_dim/2), rotated by the angle
    positions * theta^(-2i/head_dim). Angles are computed in float64, then cast to ``dtype``.
    """
    _check_even("head_dim", head_dim)
    theta = _check_theta(theta)
    if not isinstance(positions, torch.Tensor) or positions.dim() != 1:
        raise ValueError(f"positions must be a 1-D tensor (T,), got "
                         f"{tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__}")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)   # (hd/2,)
    angle = positions.to(torch.float64)[:, None] * inv_freq                              # (T, hd/2)
    angle = torch.cat([angle, angle], dim=-1)                                            # (T, hd)
    return angle.cos().to(dtype), angle.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., hd) -> (..., hd): (x1, x2) -> (-x2, x1), i.e. a +90 degree turn of every pair (x1[i], x2[i])."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair of x by its position's angle: x (..., T, hd), cos/sin (T, hd) -> (..., T, hd).

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
    """Dot products of RoPE-rotated vectors: q (N, hd) at q_pos (N,), k (N, hd) at k_pos (N,) -> (N,).

    Used to check RoPE's defining property: the score depends on q_pos - k_pos only.
    """
    if q.shape != k.shape or q.dim() != 2:
        raise ValueError(f"q and k must both be (N, head_dim), got {tuple(q.shape)} and {tuple(k.shape)}")
    cq, sq = rope_cos_sin(q_pos, q.shape[-1], theta, q.dtype)
    ck, sk = rope_cos_sin(k_pos, k.shape[-1], theta, k.dtype)
    return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum(-1)


# --------------------------------------------------------------------------------------------------- ALiBi
def alibi_slopes(n_head: int) -> torch.Tensor:
    """The ALiBi paper's per-head slopes, (n_head,) float32.

    For n a power of two: the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8). Otherwise take the
    2^floor(log2 n) slopes of the nearest smaller power of two, then fill with every other slope of the next
    power of two (Press et al. 2022, their reference code).
    """
    _check_positive_int("n_head", n_head)

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    if n_head & (n_head - 1) == 0:
        slopes = geometric(n_head)
    else:
        lower = 2 ** int(math.floor(math.log2(n_head)))
        slopes = geometric(lower) + geometric(2 * lower)[0::2][: n_head - lower]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(n_head: int, T: int, causal: bool = True) -> torch.Tensor:
    """Additive attention bias (n_head, T, T): bias[h, m, n] = -slope_h * |m - n|.

    causal=True also puts -inf above the diagonal (n > m), so the result is the full mask+bias.
    """
    _check_positive_int("T", T)
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
    """Explicit softmax attention with a relative scheme inside: q, k, v (B, H, T, hd) -> (B, H, T, hd).

    scheme "rope" rotates q and k; "alibi" adds the per-head distance bias; "none", "sinusoidal" and
    "learned" add nothing here (absolute schemes act on the embeddings, before attention).
    return_weights=True also returns the (B, H, T, T) softmax weights.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v must share one (B, H, T, hd) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, hd = q.shape
    if scheme == "rope":
        cos, sin = rope_cos_sin(torch.arange(T), hd, theta, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scores = q @ k.transpose(-2, -1) / math.sqrt(hd)                            # (B, H, T, T)
    if scheme == "alibi":
        scores = scores + alibi_bias(H, T, causal=causal).to(q.dtype)           # mask included when causal
    elif causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    weights = scores.softmax(dim=-1)
    out = weights @ v                                                           # (B, H, T, hd)
    return (out, weights) if return_weights else out


# ---------------------------------------------------------------------------------------- measure & break
def similarity_by_distance(table: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between position vectors m and n as a function of |m - n|.

    table (T, d) -> (T,), entry k averages cos(table[m], table[m + k]) over all m. Entry 0 is 1.
    """
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[0] < 1:
        raise ValueError(f"table must be a (T, d) tensor with T >= 1, got "
                         f"{tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__}")
    unit = F.normalize(table.double(), dim=-1)
    sim = unit @ unit.T                                                         # (T, T)
    T = table.shape[0]
    return torch.stack([sim.diagonal(k).mean() for k in range(T)]).float()


def first_token_task(n_seqs: int, seq_len: int, vocab_size: int,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """An order task: every position must output the sequence's FIRST token.

    Returns x, y, each (n_seqs, seq_len) long. Tokens are distinct within a sequence (a random draw without
    replacement), so a model blind to order can do no better than guess one of seq_len tokens: chance 1/seq_len.
    """
    _check_positive_int("n_seqs", n_seqs)
    _check_positive_int("seq_len", seq_len)
    _check_positive_int("vocab_size", vocab_size)
    if seq_len > vocab_size:
        raise ValueError(f"seq_len={seq_len} must be <= vocab_size={vocab_size} (tokens are distinct)")
    noise = torch.rand(n_seqs, vocab_size, generator=generator)
    x = noise.argsort(dim=-1)[:, :seq_len]                                      # (N, T) distinct tokens
    y = x[:, :1].expand(-1, seq_len).clone()                                    # (N, T) all = first token
    return x, y


def order_accuracy(logits: torch.Tensor, y: torch.Tensor, skip_first: bool = True) -> float:
    """Fraction of correct argmax predictions: logits (N, T, V), y (N, T).

    skip_first drops position 0, where a causal model sees only the answer itself.
    """
    if logits.dim() != 3 or y.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (N, T, V) and y (N, T), got {tuple(logits.shape)} and {tuple(y.shape)}")
    start = 1 if skip_first else 0
    if logits.shape[1] <= start:
        raise ValueError(f"need T > {start} positions to score, got T={logits.shape[1]}")
    return (logits[:, start:].argmax(-1) == y[:, start:]).float().mean().item()


def permutation_gap(fn, idx: torch.Tensor, perm: torch.Tensor) -> float:
    """max |fn(idx[:, perm]) - fn(idx)[:, perm]|: 0 exactly when fn is permutation-equivariant.

    fn maps idx (B, T) to (B, T, ...); perm is a permutation of range(T).
    """
    if idx.dim() != 2:
        raise ValueError(f"idx must be (B, T), got shape {tuple(idx.shape)}")
    T = idx.shape[1]
    if perm.dim() != 1 or not torch.equal(perm.sort().values, torch.arange(T)):
        raise ValueError(f"perm must be a permutation of range({T}), got {perm.tolist()}")
    return (fn(idx[:, perm]) - fn(idx)[:, perm]).abs().max().item()


def fit_first_token(model: nn.Module, *, steps: int, seq_len: int, vocab_size: int, batch_size: int = 64,
                    lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Train ``model`` (idx (B, T) -> (logits (B, T, V), ...)) on fresh first-token batches with AdamW.

    Position 0 is left out of the loss (target -100) for every model alike. Returns the loss per step (nats).
    """
    _check_positive_int("steps", steps)
    _check_positive_int("batch_size", batch_size)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for _ in range(steps):
        x, y = first_token_task(batch_size, seq_len, vocab_size, generator)
        y[:, 0] = -100
        logits = model(x)[0]                                                   # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def loss_by_position(model: nn.Module, tokens: torch.Tensor, seq_len: int, n_windows: int = 64,
                     batch_size: int = 16, seed: int = 0) -> torch.Tensor:
    """Mean next-token loss (nats) at each position of windows of ``seq_len`` tokens: returns (seq_len,).

    tokens: 1-D stream. Windows start at seeded random offsets, so entry t is the loss with exactly t tokens
    of context; the mean of the first L entries is the loss of a model evaluated with windows of length L.
    model: idx (B, T) -> (logits (B, T, V), ...).
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D tensor, got shape {tuple(getattr(tokens, 'shape', ()))}")
    _check_positive_int("seq_len", seq_len)
    _check_positive_int("n_windows", n_windows)
    _check_positive_int("batch_size", batch_size)
    if len(tokens) < seq_len + 1:
        raise ValueError(f"tokens has {len(tokens)} entries, need at least seq_len + 1 = {seq_len + 1}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(tokens) - seq_len, (n_windows,), generator=generator)
    windows = torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])   # (N, seq_len + 1)
    was_training = model.training
    model.eval()
    total = torch.zeros(seq_len, dtype=torch.float64)
    for i in range(0, n_windows, batch_size):
        x, y = windows[i:i + batch_size, :-1], windows[i:i + batch_size, 1:]
        logits = model(x)[0]                                                    # (b, seq_len, V)
        nll = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")      # (b, seq_len)
        total += nll.double().sum(0)
    model.train(was_training)
    return (total / n_windows).float()
