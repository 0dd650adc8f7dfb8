"""Self-attention from scratch: scaled dot-product attention, causal masks, multi-head attention,
and the measurements the notebook uses to look inside attention (entropy, head scores, leaks, saturation).

Shapes (the legend of `shared/model.py`): B batch, H heads, T (Tq, Tk) sequence lengths, C = d_model,
D = head_dim = C // H, L layers.
Mask convention (the repo's, and `torch.nn.functional.scaled_dot_product_attention`'s): a boolean mask means
"may attend": True where this query sees this key, False where it is forbidden. A float mask is ADDED to the
scores (use -inf to forbid a pair). Beware `nn.MultiheadAttention`, whose boolean `attn_mask` is the opposite.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.model import model_device
from shared.validate import check_int


# ----------------------------------------------------------------------------------------------------------
# argument checks, gathered: TypeError for a wrong type, ValueError for a wrong value; the message names the
# argument, what was given and what is allowed.

def _tensor(name: str, x, min_dim: int = 1, kind: str = "float") -> None:
    """x must be a tensor of `kind` ('float', 'int' or 'bool') with at least `min_dim` dims."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    ok = {"float": x.is_floating_point(), "bool": x.dtype == torch.bool,
          "int": not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool}[kind]
    if not ok:
        raise TypeError(f"{name} must have a {'floating' if kind == 'float' else kind} dtype, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(x.shape)}")


def _check_qkv(q, k, v, mask, is_causal) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        _tensor(name, x, min_dim=2)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the last dim (d_head), got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-2] != v.shape[:-2]:
        raise ValueError(f"q, k, v must have equal leading dims, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same number of keys Tk, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if is_causal and mask is not None:
        raise ValueError("pass either mask or is_causal=True, not both")
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"mask must be bool (True = may attend) or floating (additive), got {mask.dtype}")
    scores_shape = (*q.shape[:-1], k.shape[-2])
    try:
        ok = mask.dim() >= 2 and torch.broadcast_shapes(mask.shape, scores_shape) == scores_shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the scores' shape "
                         f"{scores_shape} (expected (..., Tq={q.shape[-2]}, Tk={k.shape[-2]}), size-1 dims allowed)")


def _check_scale(scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0 (or None for 1/sqrt(D)), got {scale!r}")


def _check_ids(name: str, ids, batch_shape=None) -> None:
    _tensor(name, ids, min_dim=1, kind="int")
    if batch_shape is not None and tuple(ids.shape) != tuple(batch_shape):
        raise ValueError(f"{name} must have shape {tuple(batch_shape)}, got {tuple(ids.shape)}")


# ----------------------------------------------------------------------------------------------------------
# masks and the core attention function

def causal_mask(t_q: int, t_k: int | None = None, device=None) -> torch.Tensor:
    """Boolean "may attend" mask (Tq, Tk): True where key j <= query i (top-left aligned, like SDPA's is_causal).

    >>> causal_mask(3).int().tolist()
    [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    t_k = t_q if t_k is None else t_k
    check_int("t_q", t_q, 1)
    check_int("t_k", t_k, 1)
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril()


def _mask_to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask (True = may attend) -> float mask of 0 / -inf; a float mask is returned as is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def attention_scores(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Raw scores q @ k^T * scale. q (..., Tq, D), k (..., Tk, D) -> (..., Tq, Tk).

    scale=None means 1/sqrt(D), the usual choice; scale=1.0 switches the scaling off (the notebook's Break).
    """
    for name, x in (("q", q), ("k", k)):
        _tensor(name, x, min_dim=2)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the last dim (d_head), got q {tuple(q.shape)} and k {tuple(k.shape)}")
    _check_scale(scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return (q @ k.transpose(-2, -1)) * scale


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | None = None, is_causal: bool = False,
                                 scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + mask) v, written out so the weights can be looked at.

    q (..., Tq, D), k (..., Tk, D), v (..., Tk, Dv) with equal leading dims (e.g. (B, H)).
    mask: bool "may attend" (True = this query sees this key) or float (added to the scores), broadcastable to
    (..., Tq, Tk). is_causal: use `causal_mask(Tq, Tk)`; cannot be combined with `mask` (as in SDPA).
    Returns (out (..., Tq, Dv), weights (..., Tq, Tk)); each row of weights sums to 1 and forbidden pairs
    get exactly 0. Raises ValueError when a query row may attend to no key (SDPA would silently return zeros).
    """
    _check_qkv(q, k, v, mask, is_causal)
    scores = attention_scores(q, k, scale)                              # (..., Tq, Tk)
    if is_causal:
        mask = causal_mask(*scores.shape[-2:], device=q.device)
    if mask is not None:
        scores = scores + _mask_to_additive(mask, scores.dtype)          # forbidden pairs: -inf
        if scores.device.type != "meta" and torch.isneginf(scores).all(dim=-1).any():   # the check that teaches: an empty row (meta: no values)
            raise ValueError("mask forbids every key for at least one query row: nothing to attend to")
    weights = torch.softmax(scores, dim=-1)                             # (..., Tq, Tk), exp(-inf) = 0 exactly
    return weights @ v, weights                                         # (..., Tq, Dv), (..., Tq, Tk)


# ----------------------------------------------------------------------------------------------------------
# multi-head attention

class MultiHeadAttention(nn.Module):
    """Multi-head self-attention: project, split into heads, attend, merge heads, project out.

    x (B, T, C) -> q, k, v (B, H, T, D) -> attention per head -> (B, T, C) -> o_proj -> (B, T, C).
    `forward(x, mask=None, is_causal=False, fast=False)` returns (out (B, T, C), weights (B, H, T, T)); `mask` is
    bool "may attend" (True = this query sees this key) or additive float. `fast=True` uses torch's fused SDPA
    and returns weights=None (same numbers to float tolerance, no (T, T) matrix kept).
    """

    def __init__(self, d_model: int, n_head: int, bias: bool = True):
        super().__init__()
        check_int("d_model", d_model, 1)
        check_int("n_head", n_head, 1)
        if d_model % n_head != 0:
            raise ValueError(f"d_model must be divisible by n_head, got d_model={d_model}, n_head={n_head}")
        self.d_model, self.n_head, self.d_head = d_model, n_head, d_model // n_head
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, H, T, D): each head sees its own D-slice of the channels."""
        b, t, _ = x.shape
        return x.view(b, t, self.n_head, self.d_head).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) -> (B, T, C): concatenate the heads' outputs along channels."""
        b, _, t, _ = x.shape
        return x.transpose(1, 2).contiguous().view(b, t, self.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False,
                fast: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        _tensor("x", x, min_dim=3)
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, T, d_model={self.d_model}), got {tuple(x.shape)}")
        q, k, v = (self.split_heads(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, T, D)
        if not fast:
            y, weights = scaled_dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
        else:      # fused kernel, no weights kept
            _check_qkv(q, k, v, mask, is_causal)
            y, weights = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal), None
        return self.o_proj(self.merge_heads(y)), weights

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "MultiHeadAttention":
        """Copy the weights of a `torch.nn.MultiheadAttention` (packed in_proj of shape (3C, C)) into ours."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be a torch.nn.MultiheadAttention, got {type(mha).__name__}")
        if not mha._qkv_same_embed_dim:
            raise ValueError("mha must use the same embed dim for q, k and v (kdim = vdim = embed_dim)")
        bias = mha.in_proj_bias is not None
        ours = cls(mha.embed_dim, mha.num_heads, bias=bias)
        projs = (ours.q_proj, ours.k_proj, ours.v_proj)
        with torch.no_grad():
            for proj, w in zip(projs, mha.in_proj_weight.chunk(3, dim=0)):
                proj.weight.copy_(w)
            ours.o_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                for proj, b in zip(projs, mha.in_proj_bias.chunk(3)):
                    proj.bias.copy_(b)
                ours.o_proj.bias.copy_(mha.out_proj.bias)
        return ours


# ----------------------------------------------------------------------------------------------------------
# a trained model's attention, recomputed with our function

def model_attention(model, idx: torch.Tensor, query_pos: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Every layer's attention weights of a `shared.model.GPT`, recomputed with `scaled_dot_product_attention`.

    One forward pass records each layer's attention input; `block.attn.project(x, start_pos=0)` (shared's one
    q/k/v projection, RoPE applied) gives q (B, H, T, D) and k (B, K, T, D); the K key heads are repeated for the
    H query heads (grouped-query attention). idx (B, T) long. Returns a list over layers of
    (B, H, T, T) weights, or with `query_pos` (B,) long of one query row per batch item (B, H, T): that query's
    weights, computed with a bool "may attend" mask (True for keys j <= query_pos[b]).
    """
    _check_ids("idx", idx)
    if idx.dim() != 2:
        raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
    if query_pos is not None:
        _check_ids("query_pos", query_pos, batch_shape=idx.shape[:1])
        if query_pos.min() < 0 or query_pos.max() >= idx.shape[1]:
            raise ValueError(f"query_pos must lie in [0, T={idx.shape[1]}), got {query_pos.min()}..{query_pos.max()}")
    dev = model_device(model)                                   # ids go where the model is
    idx = idx.to(dev)
    query_pos = None if query_pos is None else query_pos.to(dev)
    inputs = []
    hooks = [b.attn.register_forward_hook(lambda mod, args, out: inputs.append(args[0])) for b in model.blocks]
    try:
        with torch.no_grad():
            model(idx)
    finally:
        for h in hooks:
            h.remove()
    maps, rows = [], torch.arange(idx.shape[0], device=dev)
    for block, x in zip(model.blocks, inputs):
        with torch.no_grad():
            q, k, _ = block.attn.project(x, start_pos=0)                     # (B, H, T, D), (B, K, T, D)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)             # (B, H, T, D)
        if query_pos is None:
            maps.append(scaled_dot_product_attention(q, k, k, is_causal=True)[1])          # (B, H, T, T)
        else:
            may_attend = torch.arange(idx.shape[1], device=dev) <= query_pos[:, None]       # (B, T)
            q_rows = q[rows, :, query_pos][:, :, None]                                      # (B, H, 1, D)
            maps.append(scaled_dot_product_attention(q_rows, k, k, mask=may_attend[:, None, None])[1][:, :, 0])
    return maps


# ----------------------------------------------------------------------------------------------------------
# looking inside attention

def attention_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each attention row. weights (..., Tq, Tk) -> (..., Tq). 0 log 0 counts as 0.

    A row that puts all weight on one key has entropy 0; a uniform row over n keys has log(n).
    """
    _tensor("weights", weights, min_dim=2)
    return -torch.special.xlogy(weights, weights).sum(dim=-1)


def offset_targets(t: int, offset: int = 1) -> torch.Tensor:
    """Bool (T, T): True at (i, i - offset). offset=1: the key a 'previous-token head' reads; offset=0 (the
    token itself) and offset=2 are its neighbours, the control for a previous-token claim; offset=-1 is the
    next token (what a model without the causal mask can read)."""
    check_int("t", t, 1)
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if abs(offset) >= t:
        return torch.zeros(t, t, dtype=torch.bool)
    return torch.diag(torch.ones(t - abs(offset)), -offset).bool()


def previous_token_targets(t: int) -> torch.Tensor:
    """Bool (T, T): True at (i, i-1), the key a 'previous-token head' should attend to."""
    return offset_targets(t, 1)


def earlier_copy_targets(tokens: torch.Tensor, query_ok: torch.Tensor | None = None,
                         shift: int = 0) -> torch.Tensor:
    """Bool (B, T, T): True at (i, j) when key j is an earlier copy of the token at position i + shift.

    shift=0: j < i and tokens[j] == tokens[i] (a 'duplicate-token head' looks there).
    shift=1: j <= i and tokens[j] == tokens[i + 1], i.e. an earlier copy of the token about to be predicted.
    tokens (B, T) long. query_ok (B, T) bool optionally restricts which queries count.
    """
    _check_ids("tokens", tokens)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must have shape (B, T), got {tuple(tokens.shape)}")
    if shift not in (0, 1):
        raise ValueError(f"shift must be 0 (same token) or 1 (next token), got {shift!r}")
    if query_ok is not None:
        _tensor("query_ok", query_ok, kind="bool")
        if query_ok.shape != tokens.shape:
            raise ValueError(f"query_ok must have shape {tuple(tokens.shape)}, got {tuple(query_ok.shape)}")
    t = tokens.shape[1]
    wanted = tokens if shift == 0 else torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -1)], dim=1)
    targets = (wanted[:, :, None] == tokens[:, None, :]) & torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril(shift - 1)
    return targets if query_ok is None else targets & query_ok[:, :, None].to(tokens.device)


def head_score(weights: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """How much attention lands on the target keys, averaged over the queries that have a target.

    weights (B, H, T, T) (or (L, B, H, T, T)), targets bool broadcastable to (B, 1, T, T) / (T, T).
    Returns one score per head, shape (H,) (or (L, H)): the mean over (batch, query) rows with at least one
    target of the summed weight on the targets. 1 = the head does exactly that job.
    """
    _tensor("weights", weights, min_dim=4)
    _tensor("targets", targets, kind="bool")
    targets = targets.to(weights.device)                                 # masks may be built on the CPU
    if targets.dim() == 3:                                               # (B, T, T) -> (B, 1, T, T)
        targets = targets[:, None]
    on_target = (weights * targets).sum(-1)                             # (..., B, H, Tq)
    has_target = targets.any(-1).expand_as(on_target)                    # (..., B, H, Tq)
    if not has_target.any():
        raise ValueError("targets select no (query, key) pair: cannot score a head on nothing")
    dims = (-3, -1)                                                      # batch and query dims
    return (on_target * has_target).sum(dims) / has_target.sum(dims)


def instance_vs_category(rows: torch.Tensor, tokens: torch.Tensor, query_pos: torch.Tensor,
                         category_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Does a head read the right word, or any word of its category? The control for a 'recall head'.

    rows (..., B, H, T): one attention row per batch item, from the query at query_pos[b] (as returned by
    `model_attention(..., query_pos=)`, stacked over layers: (L, B, H, T)). tokens (B, T) long; query_pos (B,) long,
    each < T - 1: the query predicts tokens[b, query_pos[b] + 1], the answer. category_ids: 1-D long, the token
    ids of the answer's category (e.g. every colour word).
    Keys j <= query_pos[b] are split into the RIGHT word (earlier copies of the answer) and DISTRACTORS (other
    words of the category). Returns a dict of (..., B, H) tensors `right` and `distractor` (summed weight),
    `right_per_word` and `distractor_per_word` (divided by the number of such keys in that row; NaN where a
    row has none), and (B,) counts `n_right`, `n_distractor`. A head that attends to the category without
    preferring the instance has right_per_word ~ distractor_per_word; recall needs right_per_word to win.
    """
    _tensor("rows", rows, min_dim=3)
    _check_ids("tokens", tokens)
    if tokens.dim() != 2 or rows.shape[-3] != tokens.shape[0] or rows.shape[-1] != tokens.shape[1]:
        raise ValueError(f"rows (..., B, H, T) and tokens (B, T) disagree: {tuple(rows.shape)} vs {tuple(tokens.shape)}")
    _check_ids("query_pos", query_pos, batch_shape=tokens.shape[:1])
    _check_ids("category_ids", category_ids)
    if query_pos.min() < 0 or query_pos.max() >= tokens.shape[1] - 1:
        raise ValueError(f"query_pos must lie in [0, T-1={tokens.shape[1] - 1}) (the answer follows the query), "
                         f"got {query_pos.min()}..{query_pos.max()}")
    tokens, query_pos, category_ids = (t.to(rows.device) for t in (tokens, query_pos, category_ids))
    b = torch.arange(tokens.shape[0], device=rows.device)
    answer = tokens[b, query_pos + 1]                                              # (B,)
    visible = torch.arange(tokens.shape[1], device=rows.device) <= query_pos[:, None]   # (B, T) keys the query sees
    right = (tokens == answer[:, None]) & visible                                  # (B, T)
    distractor = torch.isin(tokens, category_ids) & visible & ~right               # (B, T)
    out = {"n_right": right.sum(-1), "n_distractor": distractor.sum(-1)}
    for name, keys in (("right", right), ("distractor", distractor)):
        mass = (rows * keys[:, None, :]).sum(-1)                                   # (..., B, H)
        out[name] = mass
        out[f"{name}_per_word"] = mass / out[f"n_{name}"][:, None]                 # 0/0 -> NaN: no such key
    return out


def mean_ci(x: torch.Tensor, dim: int = 0, z: float = 1.96) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over `dim` and the half-width z * SE of its normal-approximation confidence interval (95% for 1.96)."""
    _tensor("x", x)
    n = x.shape[dim]
    if n < 2:
        raise ValueError(f"need at least 2 samples along dim {dim} for a spread, got {n}")
    return x.mean(dim), z * x.std(dim) / math.sqrt(n)


def leak(fn: Callable[[torch.Tensor], torch.Tensor], idx: torch.Tensor, position: int,
         new_token: int) -> torch.Tensor:
    """How much each position's output moves when the token at `position` is replaced by `new_token`.

    fn maps idx (B, T) -> outputs (B, T, ...) (e.g. logits). Returns (T,) max |change| per position over batch
    and features. A causal model must show exactly 0 before `position`.
    """
    _check_ids("idx", idx)
    if idx.dim() != 2:
        raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
    t = idx.shape[1]
    if isinstance(position, bool) or not isinstance(position, int):
        raise TypeError(f"position must be an int, got {type(position).__name__}")
    if not 0 <= position < t:
        raise ValueError(f"position must be in [0, {t}), got {position}")
    changed = idx.clone()
    changed[:, position] = new_token
    if torch.equal(changed, idx):
        raise ValueError(f"new_token={new_token} equals the token already at position {position}: nothing changes")
    with torch.no_grad():
        before, after = fn(idx), fn(changed)
    if before.dim() < 2 or before.shape[:2] != idx.shape:
        raise ValueError(f"fn must return (B, T, ...) for idx {tuple(idx.shape)}, got {tuple(before.shape)}")
    return (after - before).abs().reshape(*idx.shape, -1).amax(dim=(0, 2))   # (T,)


def prefix_loss(logits_fn: Callable[[torch.Tensor], torch.Tensor], idx: torch.Tensor,
                targets: torch.Tensor) -> float:
    """Honest next-token loss: predict targets[:, t] from idx[:, :t+1] alone, one forward pass per prefix.

    idx, targets (B, T) long; logits_fn maps (B, t) -> (B, t, V). Returns mean cross-entropy in nats/token.
    For a causal model it equals the usual one-pass loss; a model that peeks at the future cannot peek here.
    """
    _check_ids("idx", idx)
    _check_ids("targets", targets)
    if idx.shape != targets.shape or idx.dim() != 2:
        raise ValueError(f"idx and targets must both be (B, T), got {tuple(idx.shape)} and {tuple(targets.shape)}")
    with torch.no_grad():
        last = torch.stack([logits_fn(idx[:, : t + 1])[:, -1] for t in range(idx.shape[1])], dim=1)  # (B, T, V)
    return F.cross_entropy(last.flatten(0, 1), targets.flatten()).item()


def saturation_sweep(d_heads: Sequence[int], n_keys: int = 64, n_queries: int = 256, scale: bool = True,
                     seed: int = 0) -> dict[str, list[float]]:
    """Softmax saturation vs head dimension for random unit-variance q, k (as after a norm layer at init).

    For each D in d_heads: q (n_queries, D), k (n_keys, D), v (n_keys, D) ~ N(0, 1); scores q k^T have
    variance D, or 1 with the 1/sqrt(D) scale. Returns lists (one value per D) of the mean attention entropy
    (nats), the mean largest weight per row, and the norm of the gradient reaching the scores (the softmax
    input, after any scaling) for a random upstream gradient on the output, sized so that the gradient on the
    weights is N(0, 1) per key at every D (per query row, averaged): a saturated softmax passes almost none back.
    """
    check_int("n_keys", n_keys, 1)
    check_int("n_queries", n_queries, 1)
    if len(d_heads) == 0:
        raise ValueError("d_heads must list at least one head dimension, got an empty sequence")
    for d in d_heads:
        check_int("d_heads[i]", d, 1)
    gen = torch.Generator().manual_seed(seed)
    out = {"entropy": [], "max_weight": [], "score_grad_norm": []}
    for d in d_heads:
        q, k, v = (torch.randn(n, d, generator=gen) for n in (n_queries, n_keys, n_keys))
        upstream = torch.randn(n_queries, d, generator=gen) / math.sqrt(d)   # so v_j . upstream ~ N(0, 1) for all D
        scores = (q @ k.T / (math.sqrt(d) if scale else 1.0)).requires_grad_(True)    # (Nq, Nk)
        weights = torch.softmax(scores, dim=-1)
        (weights @ v * upstream).sum().backward()                        # d loss / d scores lands in .grad
        out["entropy"].append(attention_entropy(weights.detach()).mean().item())
        out["max_weight"].append(weights.detach().amax(-1).mean().item())
        out["score_grad_norm"].append(scores.grad.norm(dim=-1).mean().item())
    return out


# ----------------------------------------------------------------------------------------------------------
# the positive control: induction heads in a 2-layer attention-only model on repeated random tokens

class NoMLP(nn.Module):
    """A block's MLP slot left empty: returns zeros (B, T, C), so the residual stream gets attention only.
    Hand it to `GPT(cfg, mlp_factory=lambda cfg, i: NoMLP())` for an attention-only transformer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def repeated_random_batch(gen: torch.Generator, batch_size: int, seq_len: int, vocab_size: int,
                          min_period: int, max_period: int, loss_on_repeat_only: bool = True):
    """The canonical induction task: uniform random tokens whose last p tokens repeat the p before them.

    Each row draws its own period p in [min_period, max_period], so no fixed positional offset solves it: the
    model must find where the current token occurred before and read the token after it. Returns x, y (B, T)
    with T = seq_len (y = x shifted by one) and repeat (B, T) bool, True where y is a token of the second copy
    (predictable from context). With loss_on_repeat_only, y is -100 elsewhere (unpredictable positions carry no
    gradient; evaluation uses the plain targets of `loss_on_repeat_only=False`).
    """
    check_int("batch_size", batch_size, 1)
    check_int("vocab_size", vocab_size, 2)
    check_int("min_period", min_period, 1)
    check_int("max_period", max_period, min_period)
    check_int("seq_len", seq_len, 2 * max_period)
    n = seq_len + 1                                                               # x and y from one row of n
    raw = torch.randint(0, vocab_size, (batch_size, n), generator=gen)
    p = torch.randint(min_period, max_period + 1, (batch_size, 1), generator=gen)  # (B, 1) period per row
    pos = torch.arange(n)[None]                                                   # (1, n)
    second = pos >= n - p                                                         # (B, n) the second copy
    rows = torch.gather(raw, 1, torch.where(second, pos - p, pos))                # copy the p tokens before
    x, y, repeat = rows[:, :-1], rows[:, 1:].clone(), second[:, 1:]
    if loss_on_repeat_only:
        y[~repeat] = -100
    return x, y, repeat


def per_token_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (nats) at every position: x, y (B, T) long -> (B, T). Runs in no_grad."""
    _check_ids("x", x)
    _check_ids("y", y)
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"x and y must both be (B, T), got {tuple(x.shape)} and {tuple(y.shape)}")
    dev = model_device(model)                                      # the batch goes where the model is
    with torch.no_grad():
        logits = model(x.to(dev))[0]                                              # (B, T, V)
    return F.cross_entropy(logits.transpose(1, 2), y.to(dev), reduction="none")  # (B, T)


def greedy_ablation(metric: Callable[[], float], heads: Sequence[tuple[int, int]], stop: float,
                    ablate: Callable) -> tuple[dict, list]:
    """Which heads carry a behaviour: ablate each head alone, then cumulatively in order of harm until the metric
    falls to `stop` (e.g. the control's level) or every head is off.

    metric() -> float (higher = the behaviour is intact), measured on the model as it is when called;
    ablate(list of (layer, head)) -> a context manager that switches those heads off (e.g.
    `functools.partial(zoo.ablate_heads, model)`). Returns ({head: metric with that head alone off},
    [(heads off so far, metric), ...]).
    """
    heads = list(heads)
    if not heads:
        raise ValueError("heads is empty: nothing to ablate")
    single = {}
    for h in heads:
        with ablate([h]):
            single[h] = metric()
    order, cumulative = sorted(heads, key=lambda h: single[h]), []
    for k in range(1, len(order) + 1):
        with ablate(order[:k]):
            cumulative.append((order[:k], metric()))
        if cumulative[-1][1] <= stop:
            break
    return single, cumulative
