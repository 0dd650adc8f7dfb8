"""Key/value caching for autoregressive decoding, written from the shared GPT's parts.

A decoder's keys and values for token t never change once t is in the context (causal attention: later
tokens cannot influence earlier ones). So instead of re-running the whole prefix for every new token
(`generate_naive`), we run the prompt once ("prefill"), store every layer's keys/values in a preallocated
buffer (`KVCache`), and then feed one token per step (`generate_cached`), attending to the stored keys.

The model is `shared.model.GPT` with RoPE: its modules `tok_emb`, `blocks[i].norm1 / attn / norm2 / mlp`, `norm`,
`lm_head` are reused, and each attention's own `project` gives the queries, keys and values; only the
attention's bookkeeping (`attend`) is ours.

Shapes: B batch, T new tokens in this call, L tokens in the cache after it, C = d_model, H query heads,
K key/value heads (GQA: K divides H), D = head_dim, V vocab, N layers, S cache capacity.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from shared.model import GPT, Attention, model_device
from shared.validate import check_ints

__all__ = ["CacheOverflowError", "KVCache", "kv_cache_bytes", "attend", "forward_cached", "generate_cached",
           "generate_naive", "step_flops", "measure_cache_rss", "rss_is_measurable"]


class CacheOverflowError(ValueError):
    """Appending would write past the preallocated capacity of a `KVCache`."""


# ---------------------------------------------------------------------------------------------- validators
def _check_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__} {dtype!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype (float32, bfloat16, ...), got {dtype}")


def _check_model(model) -> None:
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a shared.model.GPT, got {type(model).__name__}")
    if model.cfg.pos != "rope" or not model.cfg.causal:
        raise ValueError(f"model must be a causal RoPE GPT for the cached loop, got pos={model.cfg.pos!r} "
                         f"causal={model.cfg.causal}")
    custom = [type(b.attn).__name__ for b in model.blocks if not isinstance(b.attn, Attention)]
    if custom:   # we call project/o_proj ourselves: a plug-in attention would be bypassed
        raise TypeError(f"model must use shared's Attention in every block for the cached loop, got {custom}")


def _check_ids(name: str, ids) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long:
        what = f"a {ids.dtype} tensor" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"{name} must be a long tensor of token ids, got {what}")
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"{name} must be (B, T >= 1) token ids, got shape {tuple(ids.shape)}")


def _check_loop(model, prompt, max_new_tokens) -> None:
    _check_model(model)
    _check_ids("prompt", prompt)
    check_ints(1, max_new_tokens=max_new_tokens)


# ---------------------------------------------------------------------------------------------- the cache
def kv_cache_bytes(n_layer: int, n_kv_head: int, head_dim: int, length: int, dtype: torch.dtype = torch.float32,
                   batch_size: int = 1) -> int:
    """Bytes of a key/value cache: 2 (k and v) x N x B x K x D x length x bytes-per-element."""
    check_ints(1, n_layer=n_layer, n_kv_head=n_kv_head, head_dim=head_dim, batch_size=batch_size)
    check_ints(0, length=length)
    _check_dtype(dtype)
    return 2 * n_layer * batch_size * n_kv_head * head_dim * length * dtype.itemsize


class KVCache:
    """Preallocated keys and values for every layer: `k`, `v` each (N, B, K, S, D), filled left to right.

    `append(layer, k_new, v_new)` writes T new positions of one layer and returns views of everything that
    layer has stored so far, (B, K, L, D). Each layer keeps its own fill level; between forward passes all
    layers hold the same number of tokens, `length`. Writing past `capacity` raises `CacheOverflowError`.
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        check_ints(1, n_layer=n_layer, batch_size=batch_size, n_kv_head=n_kv_head, head_dim=head_dim,
                    capacity=capacity)
        _check_dtype(dtype)
        shape = (n_layer, batch_size, n_kv_head, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)    # zeros: every page is written (and resident)
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
        """numel x element size of the two buffers: a check of their shapes, not a measurement of memory
        (`measure_cache_rss` measures what the operating system actually gives the process)."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def reset(self) -> None:
        """Forget every stored token (the buffers are kept and simply overwritten next time)."""
        self.truncate(0)

    def truncate(self, length: int) -> None:
        """Keep only the first `length` tokens of every layer (e.g. to re-time one step, or drop rejected drafts)."""
        check_ints(0, length=length)
        if length > min(self._filled):
            raise ValueError(f"length must be <= the tokens stored ({min(self._filled)}), got {length}")
        self._filled = [length] * len(self._filled)

    def fill_random(self, length: int, generator: torch.Generator | None = None) -> None:
        """Store `length` tokens of random keys and values in every layer (for timing: what a step costs depends on
        how many tokens it reads, not on their values; a real prefill of 64 x 4096 tokens would take minutes)."""
        check_ints(0, length=length)
        if length > self.capacity:
            raise CacheOverflowError(f"cache capacity is {self.capacity} tokens, cannot fill {length}")
        for buf in (self.k, self.v):
            buf[:, :, :, :length].normal_(generator=generator)
        self._filled = [length] * len(self._filled)

    def append(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k_new, v_new (B, K, T, D) for `layer`; return that layer's keys, values so far (B, K, L, D)."""
        self._check_append(layer, k_new, v_new)
        S = self.capacity
        start, T = self._filled[layer], k_new.shape[2]
        if start + T > S:   # a plain tensor would silently drop the write: refuse instead
            raise CacheOverflowError(f"cache capacity is {S} tokens; layer {layer} holds {start} and cannot take "
                                     f"{T} more: allocate capacity >= prompt + max_new_tokens")
        self.k[layer, :, :, start:start + T] = k_new
        self.v[layer, :, :, start:start + T] = v_new
        self._filled[layer] = start + T
        return self.k[layer, :, :, :start + T], self.v[layer, :, :, :start + T]

    def _check_append(self, layer, k_new, v_new) -> None:
        n_layer, B, K, _, D = self.k.shape
        check_ints(0, layer=layer)
        if layer >= n_layer:
            raise ValueError(f"layer must be < n_layer={n_layer}, got {layer}")
        if not isinstance(k_new, torch.Tensor) or not isinstance(v_new, torch.Tensor):
            raise TypeError(f"k_new and v_new must be tensors, got {type(k_new).__name__}, {type(v_new).__name__}")
        if k_new.shape != v_new.shape or k_new.dim() != 4 or k_new.shape[:2] != (B, K) or k_new.shape[3] != D:
            raise ValueError(f"k_new and v_new must both be (B={B}, K={K}, T, D={D}), "
                             f"got {tuple(k_new.shape)} and {tuple(v_new.shape)}")


# ---------------------------------------------------------------------------------------------- the loops
def attend(attn: Attention, x: torch.Tensor, cache: KVCache, layer: int, start_pos: int) -> torch.Tensor:
    """One attention layer on T new positions, x (B, T, C) -> (B, T, C), reading/writing the cache.

    `attn.project` gives q (B, H, T, D) and k, v (B, K, T, D), rotated by RoPE at positions start_pos ... ;
    the new k, v go into the cache, and the queries attend to everything stored."""
    B, T, _ = x.shape
    H, K, D = attn.cfg.n_head, attn.cfg.n_kv_head, attn.cfg.head_dim
    q, k, v = attn.project(x, start_pos)                                # RoPE at absolute positions
    k_all, v_all = cache.append(layer, k, v)                            # (B, K, L, D), L = past + T
    L = k_all.shape[2]
    mask = None
    if T > 1:  # new query i sits in slot L - T + i and may see keys 0 .. L - T + i
        q_slot = torch.arange(L - T, L, device=x.device)[:, None]
        mask = torch.arange(L, device=x.device)[None, :] <= q_slot      # (T, L) bool, True = may attend
    y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=K != H)   # (B, H, T, D)
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


def forward_cached(model: GPT, idx: torch.Tensor, cache: KVCache, rope_start: int | None = None) -> torch.Tensor:
    """Run T new tokens idx (B, T) through `model`, appending their keys/values to `cache`: logits (B, T, V).

    The tokens occupy cache slots L_past .. L_past + T - 1 and, by default, the same RoPE positions.
    `rope_start` overrides the first RoPE position (only to demonstrate the bug of not advancing it).
    """
    _check_model(model)
    _check_ids("idx", idx)
    if idx.shape[0] != cache.k.shape[1]:
        raise ValueError(f"idx has batch {idx.shape[0]} but the cache was built for batch {cache.k.shape[1]}")
    start = cache.length if rope_start is None else rope_start
    check_ints(0, rope_start=start)
    x = model.tok_emb(idx.to(model_device(model)))              # (B, T, C): ids go where the model is
    for layer, block in enumerate(model.blocks):
        x = x + attend(block.attn, block.norm1(x), cache, layer, start)
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
    _check_loop(model, prompt, max_new_tokens)
    prompt = prompt.to(model_device(model))
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
    _check_loop(model, prompt, max_new_tokens)
    was_training = model.training
    model.eval()
    idx, step_logits = prompt.to(model_device(model)), []
    for _ in range(max_new_tokens):
        logits = model(idx)[0][:, -1]                                   # (B, V): only the last row is used
        step_logits.append(logits)
        idx = torch.cat([idx, logits.argmax(dim=-1, keepdim=True)], dim=1)
    model.train(was_training)
    return (idx, torch.stack(step_logits, dim=1)) if return_logits else idx


# ---------------------------------------------------------------------------------------------- the costs
def step_flops(cfg, context: int, cached: bool, batch_size: int = 1) -> int:
    """Matmul FLOPs (2 per multiply-add) of one decoding step whose attention sees `context` keys.

    Naive: the forward runs all `context` tokens (T = context), each attending to `context` keys (SDPA
    computes the full square, the causal mask only zeroes it). Cached: one token (T = 1) against `context` keys.
    Per layer: projections 2T(C·HD + 2·C·KD + HD·C), MLP 2T·3·C·F (SwiGLU), attention 2·2·T·context·H·D;
    plus the LM head 2T·C·V. Embedding lookups, norms and softmax are not matmuls and are left out.
    """
    check_ints(1, context=context, batch_size=batch_size)
    if cfg.act != "swiglu":
        raise ValueError(f"cfg.act must be 'swiglu' (step_flops counts a SwiGLU MLP), got {cfg.act!r}")
    C, H, K, D, F_ = cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ff
    T = 1 if cached else context
    per_layer = 2 * T * (C * H * D + 2 * C * K * D + H * D * C) + 2 * T * 3 * C * F_ + 4 * T * context * H * D
    return batch_size * (cfg.n_layer * per_layer + 2 * T * C * cfg.vocab_size)


_RSS_SCRIPT = """
import json, sys
import torch
from kv_cache import KVCache
try:
    import psutil
    rss = psutil.Process().memory_info
    resident = lambda: rss().rss
except ImportError:                              # Linux without psutil: pages resident, from /proc
    import os
    resident = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
torch.set_num_threads(1)
args = json.loads(sys.argv[1])
KVCache(1, 1, 1, 8, 8).k.add_(1)                 # warm up: the first op allocates torch's own state,
torch.zeros(1 << 16).add_(1)                     # and the first block taken by mmap some one-off state (70-200 KiB)
kept, growth = [], {}
for dtype in args.pop("dtypes"):
    growth[dtype] = []
    for length in args["lengths"]:               # kept alive: no freed memory is handed out again
        before = resident()
        kept.append(KVCache(args["n_layer"], args["batch_size"], args["n_kv_head"], args["head_dim"], length,
                            dtype=getattr(torch, dtype)))
        growth[dtype].append(resident() - before)
print(json.dumps(growth))
"""


def rss_is_measurable() -> tuple[bool, str]:
    """Whether `measure_cache_rss` can be trusted here, and why: it needs Linux's resident-set accounting and glibc's
    MALLOC_MMAP_THRESHOLD_ (every big block straight from the OS); another allocator (macOS, musl) may hand out
    reused memory that never shows as growth."""
    import platform

    if sys.platform != "linux":
        return False, f"resident-memory growth is read on Linux only (this is {sys.platform})"
    libc = platform.libc_ver()[0]
    if libc != "glibc":
        return False, f"needs glibc's MALLOC_MMAP_THRESHOLD_ (this C library: {libc or 'unknown'})"
    return True, "Linux, glibc"


def measure_cache_rss(n_layer: int, n_kv_head: int, head_dim: int, lengths: list[int],
                      dtypes: tuple[torch.dtype, ...] = (torch.float32,), batch_size: int = 1) -> dict:
    """Resident memory (bytes) the operating system adds to a process when a `KVCache` of each length is built:
    {dtype: [bytes per length]}.

    A measurement independent of `kv_cache_bytes`: the process's resident set size (psutil, or /proc without
    it) before and after each allocation. It runs in a fresh Python process told to take every block of
    128 KiB or more straight from the operating system (glibc's MALLOC_MMAP_THRESHOLD_), so that no memory
    freed earlier can be handed out again without showing in the RSS; in a long-lived kernel the allocator
    reuses freed blocks and the growth may read 0. Pages are 4 KiB: a cache of a few KiB reads coarsely.
    """
    check_ints(1, n_layer=n_layer, n_kv_head=n_kv_head, head_dim=head_dim, batch_size=batch_size)
    if not isinstance(lengths, (list, tuple)) or not lengths:
        raise TypeError(f"lengths must be a non-empty list of ints, got {lengths!r}")
    check_ints(1, **{f"lengths[{i}]": n for i, n in enumerate(lengths)})
    if not isinstance(dtypes, (list, tuple)) or not dtypes:
        raise TypeError(f"dtypes must be a non-empty tuple of torch dtypes, got {dtypes!r}")
    for dtype in dtypes:
        _check_dtype(dtype)
    names = [str(d).removeprefix("torch.") for d in dtypes]
    args = dict(n_layer=n_layer, batch_size=batch_size, n_kv_head=n_kv_head, head_dim=head_dim,
                lengths=list(lengths), dtypes=names)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    done = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, json.dumps(args)], cwd=Path(__file__).parent,
                          capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"the measuring process failed:\n{done.stderr[-2000:]}")
    growth = json.loads(done.stdout.strip().splitlines()[-1])
    return {dtype: growth[name] for dtype, name in zip(dtypes, names)}
