"""Grouped-query attention from scratch: MHA -> GQA -> MQA, checkpoint conversion, and a latent (MLA) cache.

H query heads share K key/value heads in groups of G = H // K (K = H: multi-head, K = 1: multi-query). The cache
keeps only the K key/value heads, so its bytes per token fall by G. Two ways to compute the same thing:

* `attend_repeat`: copy each key/value head G times (`repeat_kv`, what HF Llama does) and run plain MHA;
* `attend_grouped`: view the queries as (B, K, G, T, D) and contract with the un-repeated keys in one einsum:
  the repeat is never materialised, and a decode step reads each cached head once.

`GroupedAttention` plugs into `shared.model.GPT(cfg, attn_factory=...)` (same parameter names as shared's
`Attention`, so checkpoints load both ways) and keeps its cache in preallocated buffers that grow by doubling.
`LatentAttention` caches one low-rank latent and one small RoPE key per token (DeepSeek-V2's multi-head latent
attention), naive (keys rebuilt from the latents every step) or absorbed (key up-projection folded into the query).
`convert_to_gqa` mean-pools a trained checkpoint's key/value heads (Ainslie et al. 2023).

Shapes: B batch, T new tokens, S keys (cached + new), C = d_model, H query heads, K key/value heads,
G = H // K queries per key/value head, D head_dim, R latent rank, Dr the latent attention's RoPE key dims.
"""
from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.model import GPT, Attention, GPTConfig, apply_rope, model_device, rope_table
from shared.train import train

KERNELS = ("grouped", "repeat", "sdpa")


# ----------------------------------------------------------------------------------------------------------
# The attention core: three ways, one result
def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Validate (B, H, T, D) queries against (B, K, S, D) keys/values; return G = H // K."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, heads, tokens, head_dim), got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (B, H, T, D), (Bk, K, S, Dk) = q.shape, k.shape
    if B != Bk or D != Dk:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head_dim")
    if K == 0 or H % K:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({K})")
    if T > S:
        raise ValueError(f"more queries ({T}) than keys ({S}): the newest T keys must include the queries' own")
    return H // K


def causal_mask(T: int, S: int, device=None) -> torch.Tensor:
    """(T, S) bool, True = may attend: query i sits at absolute position S - T + i and sees keys 0..S - T + i."""
    q_pos = torch.arange(S - T, S, device=device)[:, None]
    return torch.arange(S, device=device)[None, :] <= q_pos


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, K, S, D) -> (B, K * n_rep, S, D): head j is copied to heads j*n_rep .. j*n_rep + n_rep - 1 (HF's order)."""
    if n_rep == 1:
        return x
    B, K, S, D = x.shape
    return x[:, :, None].expand(B, K, n_rep, S, D).reshape(B, K * n_rep, S, D)   # a real copy: G x the bytes


def attend_repeat(q, k, v, causal: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v with every key/value head repeated G times: (B,H,T,D), (B,K,S,D) x2 -> (B,H,T,D)."""
    G = _check_qkv(q, k, v)
    k, v = repeat_kv(k, G), repeat_kv(v, G)                           # (B, H, S, D): materialised
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])          # (B, H, T, S)
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    return scores.softmax(dim=-1) @ v


def attend_grouped(q, k, v, causal: bool = True) -> torch.Tensor:
    """The same result without repeating: queries viewed as (B, K, G, T, D), one einsum per product.

    einsum folds (G, T) into the rows of a batched matmul over (B, K): each key/value head is read once
    for all G queries of its group, which is what makes a decode step's memory traffic fall with K.
    """
    G = _check_qkv(q, k, v)
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    qg = q.view(B, K, G, T, D)                                          # a view, no copy
    scores = torch.einsum("bkgtd,bksd->bkgts", qg, k) / math.sqrt(D)    # (B, K, G, T, S)
    if causal:
        scores = scores.masked_fill(~causal_mask(T, S, q.device), float("-inf"))
    out = torch.einsum("bkgts,bksd->bkgtd", scores.softmax(dim=-1), v)  # (B, K, G, T, D)
    return out.reshape(B, H, T, D)


def attend_sdpa(q, k, v, causal: bool = True) -> torch.Tensor:
    """PyTorch's fused kernel with `enable_gqa=True` (the reference)."""
    G = _check_qkv(q, k, v)
    T, S = q.shape[2], k.shape[2]
    mask = causal_mask(T, S, q.device) if causal and T > 1 else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=G > 1)


_ATTEND = {"grouped": attend_grouped, "repeat": attend_repeat, "sdpa": attend_sdpa}


# ----------------------------------------------------------------------------------------------------------
# A cache that grows by doubling (no torch.cat copy of the whole past at every step)
def _append(cache: dict, names: Sequence[str], new: Sequence[torch.Tensor], start_pos: int) -> list[torch.Tensor]:
    """Write `new` tensors (B, ..., T, last) at time positions [length, length + T) of buffers `cache[name]`.

    Time is axis -2. Buffers are `torch.empty` with room to spare, doubled when full (old contents copied):
    amortised O(1) per token. Returns views of everything stored so far. `cache["length"]` counts tokens.
    """
    length = cache.get("length", 0)
    if start_pos != length:
        raise ValueError(f"start_pos ({start_pos}) must equal the number of cached tokens ({length}): "
                         "RoPE positions and cache slots would disagree")
    T = new[0].shape[-2]
    end = length + T
    for name, x in zip(names, new):
        buf = cache.get(name)
        if buf is None or buf.shape[-2] < end:
            capacity = max(16, 1 << (end - 1).bit_length())
            grown = x.new_empty(*x.shape[:-2], capacity, x.shape[-1])
            if buf is not None:
                grown[..., :length, :] = buf[..., :length, :]
            cache[name] = buf = grown
        buf[..., length:end, :] = x
    cache["length"] = end
    return [cache[name][..., :end, :] for name in names]


def cache_bytes(caches: Sequence[dict], allocated: bool = False) -> int:
    """Bytes of the cached tensors in a list of per-layer cache dicts: the filled part, or the whole buffers."""
    total = 0
    for cache in caches:
        for t in cache.values():
            if isinstance(t, torch.Tensor):
                n = t.numel() if allocated else t.numel() // t.shape[-2] * cache["length"]
                total += n * t.element_size()
    return total


# ----------------------------------------------------------------------------------------------------------
# Modules that plug into shared.model.GPT
class GroupedAttention(Attention):
    """Causal grouped-query attention written out: x (B, T, C) -> (B, T, C), RoPE on q and k.

    `kernel`: "grouped" (einsum, no repeat), "repeat" (copy K/V heads G times) or "sdpa" (PyTorch, enable_gqa).
    A subclass of shared's `Attention`: the same parameters (q_proj, k_proj, v_proj, o_proj, so state dicts are
    interchangeable) and the same q/k/v projection (`project`); what differs, and what this folder teaches, is how
    the H query heads meet the K key/value heads (`_ATTEND[kernel]`) and the preallocated cache.
    `cache`: a per-layer dict; the module keeps preallocated buffers "k", "v" (B, K, capacity, D) and "length".
    """

    def __init__(self, cfg: GPTConfig, layer_idx: int = 0, kernel: str = "grouped"):
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if cfg.pos not in ("rope", "none"):
            raise ValueError(f"GroupedAttention supports pos='rope' or 'none', got {cfg.pos!r}")
        super().__init__(cfg, layer_idx)
        self.kernel = kernel

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: dict | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, start_pos)                             # (B, H, T, D), (B, K, T, D) x 2
        if cache is not None:
            k, v = _append(cache, ("k", "v"), (k, v), start_pos)        # (B, K, S, D): past + new
        y = _ATTEND[self.kernel](q, k, v, causal=self.cfg.causal)         # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def fill_cache(self, cache: dict, batch_size: int, length: int, generator: torch.Generator | None = None):
        """Put `length` random tokens' keys/values in `cache` (for timing a decode step at a long context)."""
        K, D = self.cfg.n_kv_head, self.cfg.head_dim
        dtype = self.q_proj.weight.dtype
        kv = [torch.randn(batch_size, K, length, D, generator=generator, dtype=dtype) for _ in range(2)]
        _append(cache, ("k", "v"), kv, 0)


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2), x (B, T, C) -> (B, T, C), in two equal forms.

    The cache holds, per token, one latent c = x W_down of R numbers and one RoPE key k_r of `rope_dim` = Dr numbers
    shared by all heads ("decoupled RoPE"): R + Dr numbers, not 2 K D. Head h scores a cached token by
    q_h . (W_k_up,h c) + q_r,h . k_r (scale 1 / sqrt(D + Dr)) and reads the value W_v_up,h c.

    * `absorbed=False` (naive): every step rebuilds all H heads' keys and values from every cached latent
      (2 R H D multiply-adds per cached token per step), then runs plain multi-head attention.
    * `absorbed=True`: the key up-projection is folded into the query, q_lat,h = W_k_up,h^T q_h (R numbers, once per
      new token), so scores are q_lat . c + q_r . k_r: MQA with one key "head" of R + Dr dims read straight from the
      cache; the value up-projection is applied once to the attention-weighted latent (H, R) -> (H, D).
      Keys are never rebuilt, which is why the RoPE part must be decoupled: a rotation between W_k_up and the
      query would depend on the key's position and could not be folded.

    Simplifications vs DeepSeek-V2: no low-rank query compression, no norm on the latent.
    `rope_dim` defaults to head_dim // 2 (DeepSeek: 64 of 128) with pos='rope', 0 with pos='none'.
    """

    def __init__(self, cfg: GPTConfig, layer_idx: int = 0, rank: int = 32, rope_dim: int | None = None,
                 absorbed: bool = False):
        super().__init__()
        if cfg.pos not in ("rope", "none"):
            raise ValueError(f"LatentAttention supports pos='rope' or 'none', got {cfg.pos!r}")
        rope_dim = (cfg.head_dim // 2 if cfg.pos == "rope" else 0) if rope_dim is None else rope_dim
        _check_latent(rank, rope_dim, cfg.pos)
        self.cfg, self.layer_idx, self.rank, self.rope_dim, self.absorbed = cfg, layer_idx, rank, rope_dim, absorbed
        H, D, C = cfg.n_head, cfg.head_dim, cfg.d_model
        self.q_proj = nn.Linear(C, H * D, bias=False)             # content part of the queries
        self.kv_down = nn.Linear(C, rank, bias=False)             # x -> latent c (cached)
        self.k_up = nn.Linear(rank, H * D, bias=False)            # c -> keys of all heads (naive) / folded into q
        self.v_up = nn.Linear(rank, H * D, bias=False)            # c -> values of all heads
        if rope_dim:
            self.q_rope = nn.Linear(C, H * rope_dim, bias=False)  # rotated query part, per head
            self.k_rope = nn.Linear(C, rope_dim, bias=False)      # rotated key part, one for all heads (cached)
        self.o_proj = nn.Linear(H * D, C, bias=False)

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: dict | None = None) -> torch.Tensor:
        cfg = self.cfg
        B, T, C = x.shape
        H, D, R, Dr = cfg.n_head, cfg.head_dim, self.rank, self.rope_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)              # (B, H, T, D)
        new = self.kv_down(x)                                             # (B, T, R)
        qr = None
        if Dr:
            cos, sin = rope_table(start_pos, T, Dr, cfg.rope_theta, x.device, x.dtype)
            qr = apply_rope(self.q_rope(x).view(B, T, H, Dr).transpose(1, 2), cos, sin)   # (B, H, T, Dr)
            new = torch.cat([new, apply_rope(self.k_rope(x), cos, sin)], -1)               # (B, T, R + Dr)
        if cache is not None:
            (new,) = _append(cache, ("latent",), (new,), start_pos)      # (B, S, R + Dr): past + new
        latent = new
        S = latent.shape[1]
        mask = causal_mask(T, S, x.device) if cfg.causal and T > 1 else None
        if self.absorbed:
            w_k = self.k_up.weight.view(H, D, R)
            q_lat = torch.einsum("bhtd,hdr->bhtr", q, w_k)                # (B, H, T, R): W_k_up folded into q
            q_all = q_lat if qr is None else torch.cat([q_lat, qr], -1)   # (B, H, T, R + Dr)
            scores = (q_all.reshape(B, H * T, R + Dr) @ latent.transpose(1, 2)).view(B, H, T, S)
            scores = scores / math.sqrt(D + Dr)                           # one "key head" for all H queries
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            o_lat = scores.softmax(-1).view(B, H * T, S) @ latent[..., :R]                  # (B, H*T, R)
            y = torch.einsum("bhtr,hdr->bhtd", o_lat.view(B, H, T, R), self.v_up.weight.view(H, D, R))
        else:
            c = latent[..., :R]
            k = self.k_up(c).view(B, S, H, D).transpose(1, 2)            # (B, H, S, D), rebuilt every step
            v = self.v_up(c).view(B, S, H, D).transpose(1, 2)
            if qr is not None:
                q = torch.cat([q, qr], -1)                                # (B, H, T, D + Dr)
                k = torch.cat([k, latent[:, None, :, R:].expand(B, H, S, Dr)], -1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale 1 / sqrt(D + Dr)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))

    def fill_cache(self, cache: dict, batch_size: int, length: int, generator: torch.Generator | None = None):
        """Put `length` random tokens' latents (and RoPE keys) in `cache` (for timing a decode step at a long context)."""
        c = torch.randn(batch_size, length, self.rank + self.rope_dim, generator=generator,
                        dtype=self.q_proj.weight.dtype)
        _append(cache, ("latent",), (c,), 0)


def _check_latent(rank, rope_dim, pos: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if isinstance(rope_dim, bool) or not isinstance(rope_dim, int) or rope_dim < 0 or rope_dim % 2:
        raise ValueError(f"rope_dim must be an even int >= 0, got {rope_dim!r}")
    if pos == "rope" and rope_dim == 0:
        raise ValueError("pos='rope' needs rope_dim > 0: keys rebuilt from the latent carry no position "
                         "(DeepSeek-V2's decoupled RoPE key)")


def grouped_factory(kernel: str = "grouped") -> Callable[[GPTConfig, int], GroupedAttention]:
    """attn_factory for `GPT(cfg, attn_factory=...)` building `GroupedAttention(cfg, i, kernel)`."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return lambda cfg, layer_idx: GroupedAttention(cfg, layer_idx, kernel)


def latent_factory(rank: int, rope_dim: int | None = None,
                   absorbed: bool = False) -> Callable[[GPTConfig, int], LatentAttention]:
    """attn_factory building `LatentAttention(cfg, i, rank, rope_dim, absorbed)`."""
    _check_latent(rank, 0 if rope_dim is None else rope_dim, "none")
    return lambda cfg, layer_idx: LatentAttention(cfg, layer_idx, rank, rope_dim, absorbed)


# ----------------------------------------------------------------------------------------------------------
# Cache size formulas
def kv_bytes_per_token(n_layer: int, n_kv_head: int, head_dim: int, bytes_per_value: int = 4) -> int:
    """2 (k and v) x layers x kv heads x head_dim x bytes: the GQA cache's bytes per token (per sequence)."""
    for name, value in (("n_layer", n_layer), ("n_kv_head", n_kv_head), ("head_dim", head_dim),
                        ("bytes_per_value", bytes_per_value)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return 2 * n_layer * n_kv_head * head_dim * bytes_per_value


def latent_bytes_per_token(n_layer: int, rank: int, rope_dim: int = 0, bytes_per_value: int = 4) -> int:
    """layers x (latent rank + decoupled RoPE key dims) x bytes: an MLA cache's bytes per token."""
    for name, value in (("n_layer", n_layer), ("rank", rank), ("bytes_per_value", bytes_per_value)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(rope_dim, bool) or not isinstance(rope_dim, int) or rope_dim < 0:
        raise ValueError(f"rope_dim must be an int >= 0, got {rope_dim!r}")
    return n_layer * (rank + rope_dim) * bytes_per_value


# ----------------------------------------------------------------------------------------------------------
# MHA -> GQA -> MQA conversion of a trained checkpoint
def contiguous_groups(n_head: int, n_kv_head: int) -> list[list[int]]:
    """Heads 0..G-1 form group 0, G..2G-1 group 1, ...: the grouping GQA uses by default."""
    if n_kv_head < 1 or n_head % n_kv_head:
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
    G = n_head // n_kv_head
    return [list(range(g * G, (g + 1) * G)) for g in range(n_kv_head)]


def random_groups(n_head: int, n_kv_head: int, seed: int) -> list[list[int]]:
    """A uniformly random partition of the heads into n_kv_head groups of equal size."""
    heads = list(range(n_head))
    random.Random(seed).shuffle(heads)
    G = n_head // n_kv_head
    return sorted(sorted(heads[g * G:(g + 1) * G]) for g in range(n_kv_head))


def _check_groups(groups, n_head: int) -> list[list[int]]:
    groups = [list(map(int, g)) for g in groups]
    sizes = {len(g) for g in groups}
    if len(sizes) != 1 or sorted(h for g in groups for h in g) != list(range(n_head)):
        raise ValueError(f"groups must split heads 0..{n_head - 1} into equal-size groups, got {groups}")
    return groups


def convert_to_gqa(model: GPT, n_kv_head: int, groups=None, pool: str = "mean") -> GPT:
    """A new shared GPT with `n_kv_head` key/value heads from a multi-head checkpoint (Ainslie et al. 2023).

    Each group's key (and value) projection is the mean of its heads' projections (`pool="mean"`) or the first
    head's (`pool="first"`). `groups`: one partition of the heads for all layers, or a list with one per layer
    (default contiguous); the query heads (rows of q_proj, columns of o_proj) are reordered so that each group's
    queries are adjacent, as GQA's head h -> kv head h // G mapping requires: a reordering that changes nothing.
    """
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a shared.model.GPT, got {type(model).__name__}")
    cfg = model.cfg
    H, D = cfg.n_head, cfg.head_dim
    if cfg.n_kv_head != H:
        raise ValueError(f"converting needs a multi-head checkpoint (n_kv_head == n_head == {H}), "
                         f"got n_kv_head={cfg.n_kv_head}")
    if isinstance(n_kv_head, bool) or not isinstance(n_kv_head, int) or n_kv_head < 1 or H % n_kv_head:
        raise ValueError(f"n_kv_head must be a positive divisor of n_head={H}, got {n_kv_head!r}")
    if pool not in ("mean", "first"):
        raise ValueError(f"pool must be 'mean' or 'first', got {pool!r}")
    if groups is None:
        groups = contiguous_groups(H, n_kv_head)
    per_layer = groups if groups and isinstance(groups[0][0], (list, tuple)) else [groups] * cfg.n_layer
    if len(per_layer) != cfg.n_layer:
        raise ValueError(f"need one grouping per layer ({cfg.n_layer}), got {len(per_layer)}")
    new = GPT(GPTConfig(**{**cfg.to_dict(), "n_kv_head": n_kv_head})).to(model_device(model))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, layer_groups in enumerate(per_layer):
        layer_groups = _check_groups(layer_groups, H)
        if len(layer_groups) != n_kv_head:
            raise ValueError(f"layer {i}: need {n_kv_head} groups, got {len(layer_groups)}")
        order = [h for g in layer_groups for h in g]                      # new query head j = old head order[j]
        p = f"blocks.{i}.attn."
        wq = state[p + "q_proj.weight"].view(H, D, -1)                    # (H, D, C)
        state[p + "q_proj.weight"] = wq[order].reshape(H * D, -1)
        wo = state[p + "o_proj.weight"].view(cfg.d_model, H, D)           # (C, H, D)
        state[p + "o_proj.weight"] = wo[:, order].reshape(cfg.d_model, H * D)
        for name in ("k_proj", "v_proj"):
            w = state[p + name + ".weight"].view(H, D, -1)                # (H, D, C)
            pooled = [w[g].mean(0) if pool == "mean" else w[g[0]] for g in layer_groups]
            state[p + name + ".weight"] = torch.cat(pooled, 0)            # (K * D, C)
    new.load_state_dict(state)
    return new.eval()


@torch.no_grad()
def head_distances(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """(n_layer, H, H): mean over tokens of ||k_h - k_h'||^2 + ||v_h - v_h'||^2 for every pair of heads.

    Keys are taken before RoPE (RoPE rotates every head alike at a position, so distances are unchanged).
    What mean-pooling a group loses is sum_group (1 / 2G) sum_{h, h' in group} distance(h, h').
    """
    cfg = model.cfg
    H, D = cfg.n_head, cfg.head_dim
    inputs = {}
    hooks = [b.attn.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
             for i, b in enumerate(model.blocks)]
    try:
        model.eval()(idx.to(model_device(model)))
    finally:
        for h in hooks:
            h.remove()
    out = []
    for i, block in enumerate(model.blocks):
        x = inputs[i].reshape(-1, cfg.d_model)                              # (N, C)
        kv = torch.cat([block.attn.k_proj(x).view(-1, H, D), block.attn.v_proj(x).view(-1, H, D)], -1)  # (N, H, 2D)
        out.append(((kv[:, :, None] - kv[:, None]) ** 2).sum(-1).mean(0))                  # (H, H)
    return torch.stack(out)


def equal_partitions(n: int, group_size: int):
    """Every way to split 0..n-1 into groups of `group_size` (unordered): 105 for n=8 in pairs, 35 in fours."""
    if group_size < 1 or n % group_size:
        raise ValueError(f"n ({n}) must be a multiple of group_size ({group_size})")

    def rec(rest):
        if not rest:
            yield []
            return
        first = rest[0]
        for others in itertools.combinations(rest[1:], group_size - 1):
            group = [first, *others]
            remaining = [h for h in rest if h not in group]
            for tail in rec(remaining):
                yield [group, *tail]

    yield from rec(list(range(n)))


def grouping_cost(distances: torch.Tensor, groups) -> float:
    """Mean-pooling loss of one grouping for one layer's (H, H) distances: sum_g (1/2G) sum_{h,h' in g} d."""
    return float(sum(distances[g][:, g].sum() / (2 * len(g)) for g in groups))


def similarity_groups(distances: torch.Tensor, n_kv_head: int, worst: bool = False) -> list[list[list[int]]]:
    """Per layer, the partition into n_kv_head equal groups with the least (or, `worst`, the most) pooling loss.

    Exhaustive search (fine for <= 12 heads). distances: (n_layer, H, H) from `head_distances`.
    """
    n_layer, H, _ = distances.shape
    if H > 12:
        raise ValueError(f"exhaustive search is for <= 12 heads, got {H}")
    parts = list(equal_partitions(H, H // n_kv_head))
    pick = max if worst else min
    return [pick(parts, key=lambda p: grouping_cost(distances[i], p)) for i in range(n_layer)]


# ----------------------------------------------------------------------------------------------------------
# Uptraining, and the control for "what attention gives"
def uptrain(model: nn.Module, train_tokens: torch.Tensor, val: Callable[[nn.Module], float],
            eval_at: Sequence[int], lr: float, **train_kw) -> dict[int, float]:
    """Continue training `model` in place at the constant learning rate `lr` for max(eval_at) steps; return
    {step: val(model)} at step 0 and after every step count in `eval_at`.

    Pass the learning rate pre-training ended with, so that uptraining continues the schedule instead of jumping
    (`shared.train.train` with `lr_schedule`, a fresh AdamW, no warm-up). The rate being constant, the loss after n
    steps is that of an n-step budget: one run gives every budget. `train_kw`: other arguments of `train`.
    """
    eval_at = sorted({int(n) for n in eval_at})
    if not eval_at or eval_at[0] < 1:
        raise ValueError(f"eval_at must be step counts >= 1, got {eval_at}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    curve = {0: val(model)}

    def on_step(step, m, loss):
        if step + 1 in eval_at:
            curve[step + 1] = val(m)

    train(model, train_tokens, steps=eval_at[-1], lr=lr, lr_schedule=lambda step: lr, on_step=on_step, **train_kw)
    return curve


class BigramModel(nn.Module):
    """The best a model without attention can do, estimated: p(next | current token) from counts of a token stream
    (plus `smoothing` per pair). idx (B, T) -> logits (B, T, V) and the mean cross-entropy, like a shared GPT, so
    `shared.train.evaluate` scores it on the same windows. A transformer whose attention is removed sees only the
    current token at each position: its loss cannot beat this table's (up to the estimate's error)."""

    def __init__(self, tokens: torch.Tensor, vocab_size: int, smoothing: float = 0.1):
        super().__init__()
        if tokens.dim() != 1 or len(tokens) < 2:
            raise ValueError(f"tokens must be 1-D with >= 2 entries, got shape {tuple(tokens.shape)}")
        if not smoothing > 0:
            raise ValueError(f"smoothing must be > 0, got {smoothing!r}")
        counts = torch.full((vocab_size, vocab_size), float(smoothing))
        counts.index_put_((tokens[:-1], tokens[1:]), torch.ones(len(tokens) - 1), accumulate=True)
        self.log_probs = nn.Parameter((counts / counts.sum(1, keepdim=True)).log(), requires_grad=False)  # (V, V)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.log_probs[idx]                                          # (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss
