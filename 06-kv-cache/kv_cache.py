"""Key/value caching for autoregressive decoding, written from the shared GPT's parts.

A decoder's keys and values for token t never change once t is in the context (causal attention: later
tokens cannot influence earlier ones). So instead of re-running the whole prefix for every new token
(`generate_naive`), we run the prompt once ("prefill"), store every layer's keys/values in a preallocated
buffer (`KVCache`), and then feed one token per step (`generate_cached`), attending to the stored keys.

The model is `shared.model.GPT` with RoPE: its modules `tok_emb`, `blocks[i].norm1 / attn (q_proj k_proj
v_proj o_proj) / norm2 / mlp`, `norm`, `lm_head` are reused; only the attention's bookkeeping is ours.

Shapes: B batch, T new tokens in this call, L tokens in the cache after it, C = d_model, H query heads,
K key/value heads (GQA: K divides H), D = head_dim, V vocab, N layers, S cache capacity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.model import GPT, Attention, apply_rope, rope_cos_sin

__all__ = ["CacheOverflowError", "KVCache", "kv_cache_bytes", "forward_cached", "generate_cached",
           "generate_naive", "step_flops"]


class CacheOverflowError(ValueError):
    """Appending would write past the preallocated capacity of a `KVCache`."""


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def kv_cache_bytes(n_layer: int, n_kv_head: int, head_dim: int, length: int, dtype: torch.dtype = torch.float32,
                   batch_size: int = 1) -> int:
    """Bytes of a key/value cache: 2 (k and v) x N x B x K x D x length x bytes-per-element."""
    for name, value, minimum in (("n_layer", n_layer, 1), ("n_kv_head", n_kv_head, 1), ("head_dim", head_dim, 1),
                                 ("length", length, 0), ("batch_size", batch_size, 1)):
        _check_int(name, value, minimum)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    return 2 * n_layer * batch_size * n_kv_head * head_dim * length * dtype.itemsize


class KVCache:
    """Preallocated keys and values for every layer: `k`, `v` each (N, B, K, S, D), filled left to right.

    `append(layer, k_new, v_new)` writes T new positions of one layer and returns views of everything that
    layer has stored so far, (B, K, L, D). Each layer keeps its own fill level; between forward passes all
    layers hold the same number of tokens, `length`. Writing past `capacity` raises `CacheOverflowError`.
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        for name, value in (("n_layer", n_layer), ("batch_size", batch_size), ("n_kv_head", n_kv_head),
                            ("head_dim", head_dim), ("capacity", capacity)):
            _check_int(name, value, 1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        shape = (n_layer, batch_size, n_kv_head, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._filled = [0] * n_layer                 # tokens stored, per layer

    @classmethod
    def for_model(cls, model: GPT, batch_size: int, capacity: int, dtype: torch.dtype | None = None) -> "KVCache":
        """A cache shaped for `model` (its layers, kv-heads and head_dim), in the model's dtype by default."""
        _check_model(model)
        weight = model.tok_emb.weight
        cfg = model.cfg
        return cls(cfg.n_layer, batch_size, cfg.n_kv_head, cfg.head_dim, capacity,
                   dtype=dtype or weight.dtype, device=weight.device)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def length(self) -> int:
        """Tokens stored in every layer (raises if a forward pass was interrupted half-way)."""
        if len(set(self._filled)) != 1:
            raise RuntimeError(f"layers hold different lengths {self._filled}: a forward pass did not finish")
        return self._filled[0]

    @property
    def nbytes(self) -> int:
        """Bytes allocated by the two buffers (measured from the tensors, not from a formula)."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def reset(self) -> None:
        """Forget every stored token (the buffers are kept and simply overwritten next time)."""
        self.truncate(0)

    def truncate(self, length: int) -> None:
        """Keep only the first `length` tokens of every layer (e.g. to re-time one step, or drop rejected drafts)."""
        _check_int("length", length, 0)
        if length > min(self._filled):
            raise ValueError(f"length must be <= the tokens stored ({min(self._filled)}), got {length}")
        self._filled = [length] * len(self._filled)

    def append(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k_new, v_new (B, K, T, D) for `layer`; return that layer's keys, values so far (B, K, L, D)."""
        n_layer, B, K, S, D = self.k.shape
        _check_int("layer", layer, 0)
        if layer >= n_layer:
            raise ValueError(f"layer must be < n_layer={n_layer}, got {layer}")
        if k_new.shape != v_new.shape or k_new.dim() != 4 or k_new.shape[:2] != (B, K) or k_new.shape[3] != D:
            raise ValueError(f"k_new and v_new must both be (B={B}, K={K}, T, D={D}), "
                             f"got {tuple(k_new.shape)} and {tuple(v_new.shape)}")
        start, T = self._filled[layer], k_new.shape[2]
        if start + T > S:
            raise CacheOverflowError(f"cache capacity is {S} tokens; layer {layer} holds {start} and cannot take "
                                     f"{T} more: allocate capacity >= prompt + max_new_tokens")
        self.k[layer, :, :, start:start + T] = k_new
        self.v[layer, :, :, start:start + T] = v_new
        self._filled[layer] = start + T
        return self.k[layer, :, :, :start + T], self.v[layer, :, :, :start + T]


def _check_model(model) -> None:
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a shared.model.GPT, got {type(model).__name__}")
    if model.cfg.pos != "rope" or not model.cfg.causal:
        raise ValueError(f"the cached loop needs a causal RoPE model, got pos={model.cfg.pos!r} "
                         f"causal={model.cfg.causal}")
    custom = [type(b.attn).__name__ for b in model.blocks if not isinstance(b.attn, Attention)]
    if custom:   # we call q_proj/k_proj/v_proj/o_proj ourselves: a plug-in attention would be bypassed
        raise TypeError(f"the cached loop needs shared's Attention in every block, got {custom}")


def _check_idx(name: str, idx) -> None:
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long or idx.dim() != 2 or idx.shape[1] == 0:
        shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
        dtype = idx.dtype if isinstance(idx, torch.Tensor) else None
        raise ValueError(f"{name} must be a (B, T >= 1) long tensor of token ids, got {shape} dtype {dtype}")


def _attend(attn, x: torch.Tensor, cache: KVCache, layer: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One attention layer on T new positions, x (B, T, C) -> (B, T, C), reading/writing the cache."""
    cfg = attn.cfg
    B, T, _ = x.shape
    H, K, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    q = attn.q_proj(x).view(B, T, H, D).transpose(1, 2)                 # (B, H, T, D)
    k = attn.k_proj(x).view(B, T, K, D).transpose(1, 2)                 # (B, K, T, D)
    v = attn.v_proj(x).view(B, T, K, D).transpose(1, 2)                 # (B, K, T, D)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)             # rotate at absolute positions
    k_all, v_all = cache.append(layer, k, v)                            # (B, K, L, D), L = past + T
    L = k_all.shape[2]
    mask = None
    if T > 1:  # new query i sits at absolute position L - T + i and may see keys 0 .. L - T + i
        q_pos = torch.arange(L - T, L, device=x.device)[:, None]
        mask = torch.arange(L, device=x.device)[None, :] <= q_pos       # (T, L) bool, True = may attend
    y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=K != H)   # (B, H, T, D)
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


def forward_cached(model: GPT, idx: torch.Tensor, cache: KVCache, rope_start: int | None = None) -> torch.Tensor:
    """Run T new tokens idx (B, T) through `model`, appending their keys/values to `cache`: logits (B, T, V).

    The tokens occupy cache slots L_past .. L_past + T - 1 and, by default, the same RoPE positions.
    `rope_start` overrides the first RoPE position (only to demonstrate the bug of not advancing it).
    """
    _check_model(model)
    _check_idx("idx", idx)
    if idx.shape[0] != cache.k.shape[1]:
        raise ValueError(f"idx has batch {idx.shape[0]} but the cache was built for batch {cache.k.shape[1]}")
    start = cache.length if rope_start is None else rope_start
    _check_int("rope_start", start, 0)
    cfg = model.cfg
    T = idx.shape[1]
    x = model.tok_emb(idx)                                              # (B, T, C)
    cos, sin = rope_cos_sin(cfg.head_dim, torch.arange(start, start + T, device=idx.device), cfg.rope_theta, x.dtype)
    for layer, block in enumerate(model.blocks):
        x = x + _attend(block.attn, block.norm1(x), cache, layer, cos, sin)
        x = x + block.mlp(block.norm2(x))
    return model.lm_head(model.norm(x))                                 # (B, T, V)


@torch.no_grad()
def generate_cached(model: GPT, prompt: torch.Tensor, max_new_tokens: int, cache: KVCache | None = None, *,
                    advance_rope: bool = True, return_logits: bool = False):
    """Greedy decoding with a KV cache: prefill the prompt once, then feed one token per step.

    prompt (B, T0) -> tokens (B, T0 + max_new_tokens); with `return_logits` also the logits that chose each
    new token, (B, max_new_tokens, V). `cache` (emptied first) must hold T0 + max_new_tokens - 1 tokens;
    by default one of exactly that size is allocated. `advance_rope=False` is a deliberate bug: every decoded
    token is rotated as if it sat at position 0 (what calling a forward with its default start_pos=0 does).
    """
    _check_model(model)
    _check_idx("prompt", prompt)
    _check_int("max_new_tokens", max_new_tokens, 1)
    B, T0 = prompt.shape
    if cache is None:
        cache = KVCache.for_model(model, B, T0 + max_new_tokens - 1)
    cache.reset()
    was_training = model.training
    model.eval()
    logits = forward_cached(model, prompt, cache)[:, -1]               # prefill: (B, V) for the next token
    tokens, step_logits = [prompt], []
    for step in range(max_new_tokens):
        step_logits.append(logits)
        nxt = logits.argmax(dim=-1, keepdim=True)                       # (B, 1) greedy choice
        tokens.append(nxt)
        if step + 1 < max_new_tokens:                                   # the last token is never fed back
            logits = forward_cached(model, nxt, cache, rope_start=None if advance_rope else 0)[:, -1]
    model.train(was_training)
    out = torch.cat(tokens, dim=1)
    return (out, torch.stack(step_logits, dim=1)) if return_logits else out


@torch.no_grad()
def generate_naive(model: GPT, prompt: torch.Tensor, max_new_tokens: int, *, return_logits: bool = False):
    """Greedy decoding without a cache: re-run the model on the whole prefix for every new token.

    Same contract as `generate_cached`; uses the model's own forward, so it doubles as the reference.
    """
    _check_model(model)
    _check_idx("prompt", prompt)
    _check_int("max_new_tokens", max_new_tokens, 1)
    was_training = model.training
    model.eval()
    idx, step_logits = prompt, []
    for _ in range(max_new_tokens):
        logits = model(idx)[0][:, -1]                                   # (B, V): only the last row is used
        step_logits.append(logits)
        idx = torch.cat([idx, logits.argmax(dim=-1, keepdim=True)], dim=1)
    model.train(was_training)
    return (idx, torch.stack(step_logits, dim=1)) if return_logits else idx


def step_flops(cfg, context: int, cached: bool, batch_size: int = 1) -> int:
    """Matmul FLOPs (2 per multiply-add) of one decoding step whose attention sees `context` keys.

    Naive: the forward runs all `context` tokens (T = context), each attending to `context` keys (SDPA
    computes the full square, the causal mask only zeroes it). Cached: one token (T = 1) against `context` keys.
    Per layer: projections 2T(C·HD + 2·C·KD + HD·C), MLP 2T·3·C·F (SwiGLU), attention 2·2·T·context·H·D;
    plus the LM head 2T·C·V. Embedding lookups, norms and softmax are not matmuls and are left out.
    """
    _check_int("context", context, 1)
    _check_int("batch_size", batch_size, 1)
    if cfg.act != "swiglu":
        raise ValueError(f"step_flops counts a SwiGLU MLP, got act={cfg.act!r}")
    C, H, K, D, F_ = cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ff
    T = 1 if cached else context
    per_layer = 2 * T * (C * H * D + 2 * C * K * D + H * D * C) + 2 * T * 3 * C * F_ + 4 * T * context * H * D
    return batch_size * (cfg.n_layer * per_layer + 2 * T * C * cfg.vocab_size)
