"""Long context, built from scratch: band (sliding-window) attention with attention sinks, a rolling KV cache of
constant size, RoPE context extension (linear / dynamic NTK / YaRN inverse frequencies) and the online-softmax
tiled ("flash") attention.

Everything plugs into the shared GPT through `attn_factory` and reuses `shared.model.Attention.project` for the
q/k/v projections. Shapes: B batch, T new tokens, T_k keys, H query heads, K key/value heads, D head_dim.
A boolean mask means "may attend" (True = this query sees this key), as in `F.scaled_dot_product_attention`.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from shared.data import RecallItem, recall_hits, recall_items  # noqa: F401  (re-exported: the notebook's names)
from shared.model import Attention, GPTConfig, apply_rope, model_device, rebuild, rope_cos_sin
from shared.validate import check_int


# ----------------------------------------------------------------------------------------------------------
# Band (+ sink) masks
def band_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, sinks: int = 0) -> torch.Tensor:
    """May-attend mask (T, T_k) for queries at absolute positions q_pos (T,) and keys at k_pos (T_k,).

    A query at p sees a key at j when j <= p (causal) and either p - j < window (the band: the query itself and
    the window - 1 tokens before it) or j < sinks (the first `sinks` tokens of the stream, kept forever).
    """
    check_int("window", window, 1)
    check_int("sinks", sinks, 0)
    p, j = q_pos[:, None], k_pos[None, :]
    return (j <= p) & ((p - j < window) | (j < sinks))


def band_mask_loop(T: int, window: int, sinks: int = 0) -> torch.Tensor:
    """The same (T, T) mask written as a double loop over (query, key): the brute-force reference."""
    check_int("T", T, 0)
    mask = torch.zeros(T, T, dtype=torch.bool)
    for p in range(T):
        for j in range(T):
            if j > p:
                continue                                   # the future is never visible
            if p - j < window or j < sinks:
                mask[p, j] = True
    return mask


class SlidingWindowAttention(Attention):
    """Causal attention restricted to a band of `window` keys plus `sinks` first tokens (StreamingLLM).

    forward(x (B, T, C), start_pos, cache) -> (B, T, C). Keys carry RoPE at their absolute positions, so cached
    decoding computes exactly what a full forward under `band_mask` computes. With a `cache` dict the layer keeps
    a rolling KV cache: "k", "v" (B, K, n, D) and "pos" (n,) with n <= sinks + window after every call: the
    sink tokens and the last `window` tokens; everything else is evicted. Memory O(window + sinks), not O(T).

    `renumber=True` gives positions as StreamingLLM does: by slot in the cache, not in the stream. Sinks sit at
    0 .. S-1, the window right after them and the query last, so a query never sees a distance larger than
    S + W - 1. Distances to window keys are unchanged by this; only the query-to-sink distances shrink from p - j
    to min(p, S + W - 1) - j. So the sink scores use the query rotated back by p - min(p, S + W - 1) (RoPE
    rotations add up), everything else stays at absolute positions.
    """

    def __init__(self, cfg: GPTConfig, layer_idx: int = 0, window: int = 64, sinks: int = 0,
                 renumber: bool = False):
        if cfg.pos not in ("rope", "none"):
            raise ValueError(f"SlidingWindowAttention supports pos 'rope' or 'none', got {cfg.pos!r}")
        if not cfg.causal:
            raise ValueError("SlidingWindowAttention is causal: cfg.causal must be True")
        check_int("window", window, 1)
        check_int("sinks", sinks, 0)
        if not isinstance(renumber, bool):
            raise TypeError(f"renumber must be a bool, got {type(renumber).__name__}")
        if renumber and cfg.pos != "rope":
            raise ValueError(f"renumber=True re-rotates RoPE positions: cfg.pos must be 'rope', got {cfg.pos!r}")
        super().__init__(cfg, layer_idx)
        self.window, self.sinks, self.renumber = window, sinks, renumber

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: dict | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, D = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        q, k, v = self.project(x, start_pos)                            # RoPE at absolute positions
        q_pos = torch.arange(start_pos, start_pos + T, device=x.device)
        k_pos = q_pos
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
                k_pos = torch.cat([cache["pos"], q_pos])
            last = start_pos + T - 1                                    # evict all but sinks + last `window`
            keep = (k_pos < self.sinks) | (k_pos > last - self.window)
            cache["k"], cache["v"], cache["pos"] = k[:, :, keep], v[:, :, keep], k_pos[keep]
        mask = band_mask(q_pos, k_pos, self.window, self.sinks)        # (T, T_k)
        renumbered = self.renumber and self.sinks > 0
        if self.store_weights or renumbered:
            rep = H // K
            kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            scores = q @ kk.transpose(-2, -1)
            if renumbered:                                              # sink columns: query at its cache slot
                shift = q_pos.clamp(max=self.sinks + self.window - 1) - q_pos          # (T,) <= 0
                cos, sin = rope_cos_sin(shift, D, self.cfg.rope_theta, q.dtype)
                sink_scores = apply_rope(q, cos, sin) @ kk.transpose(-2, -1)
                scores = torch.where(k_pos < self.sinks, sink_scores, scores)
            scores = (scores / math.sqrt(D)).masked_fill(~mask, float("-inf"))
            w = scores.softmax(dim=-1)
            if self.store_weights:
                self.last_weights = w.detach()
            y = w @ vv
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=K != H)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


def sliding_factory(window: int, sinks: int = 0, renumber: bool = False, layers=None):
    """attn_factory for `GPT(cfg, attn_factory=...)`: a SlidingWindowAttention(window, sinks, renumber) in every
    layer, or only in the layer indices `layers` (the others keep full causal `Attention`: which layer needs the
    far context)."""
    check_int("window", window, 1)
    check_int("sinks", sinks, 0)
    if layers is not None:
        layers = tuple(layers)
        if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
            raise ValueError(f"layers must be a non-empty sequence of layer indices >= 0, got {layers!r}")

    def make(cfg, layer_idx):
        if layers is not None and max(layers) >= cfg.n_layer:
            raise ValueError(f"layers {layers} out of range for a model of {cfg.n_layer} layers")
        if layers is None or layer_idx in layers:
            return SlidingWindowAttention(cfg, layer_idx, window=window, sinks=sinks, renumber=renumber)
        return Attention(cfg, layer_idx)
    return make


# The same trained weights read through a band, sinks or a scaled RoPE table: shared.model.rebuild, under the name
# this notebook reads best (a new GPT with the model's config and a copy of its weights, on its device, in eval mode).
with_attention = rebuild


def renumbered_attention_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, sinks: int,
                              theta: float = 10000.0) -> torch.Tensor:
    """The reference for `renumber=True`, one query at a time: q (B, H, T, D), k, v (B, K, T, D) WITHOUT RoPE
    (K divides H: grouped heads are repeated). For query p: its visible keys (band + sinks), positions = their rank
    0 .. n-1 among them, the query at n-1; rotate, softmax, weighted sum. Returns (B, H, T, D)."""
    B, H, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (T, D) or H % k.shape[1]:
        raise ValueError(f"k, v must be (B, K, T, D) with K dividing H for q {tuple(q.shape)}, got {tuple(k.shape)}")
    k, v = k.repeat_interleave(H // k.shape[1], dim=1), v.repeat_interleave(H // k.shape[1], dim=1)
    out = torch.empty_like(q)
    for p in range(T):
        seen = [j for j in range(p + 1) if p - j < window or j < sinks]
        cos, sin = rope_cos_sin(torch.arange(len(seen), device=q.device), D, theta, q.dtype)
        kr = apply_rope(k[:, :, seen], cos, sin)
        qr = apply_rope(q[:, :, p:p + 1], cos[-1:], sin[-1:])
        w = (qr @ kr.transpose(-2, -1) / math.sqrt(D)).softmax(dim=-1)
        out[:, :, p] = (w @ v[:, :, seen])[:, :, 0]
    return out


def loss_by_position(model, stream: torch.Tensor, length: int, n_seq: int) -> torch.Tensor:
    """Mean next-token loss (nats) at each position 0 .. length-1 over `n_seq` consecutive chunks of `stream`
    (1-D token ids): position t scores token t+1 given tokens 0..t of its chunk. Returns (length,)."""
    check_int("length", length, 1)
    check_int("n_seq", n_seq, 1)
    if not isinstance(stream, torch.Tensor) or stream.dim() != 1:
        raise TypeError("stream must be a 1-D tensor of token ids")
    if len(stream) < n_seq * length + 1:
        raise ValueError(f"stream has {len(stream)} tokens, need n_seq * length + 1 = {n_seq * length + 1}")
    dev = model_device(model)
    x = stream[:n_seq * length].view(n_seq, length).to(dev)
    y = stream[1:n_seq * length + 1].view(n_seq, length).to(dev)
    with torch.no_grad():
        logits = model(x)[0]
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(0).cpu()


def aligned_windows(stream: torch.Tensor, length: int, n: int, first_token: int,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` windows of `length` tokens that all start with the same `first_token` (a BOS, as every document of a real
    LLM's training does), the rest a random stretch of the 1-D `stream`: x (n, length) = [first_token, s_0 ..
    s_{length-2}], y (n, length) = [s_0 .. s_{length-1}] (position 0 predicts the stretch's first token).
    `generator` (a CPU torch.Generator) picks the starts; the tensors are on the CPU."""
    check_int("length", length, 1)
    check_int("n", n, 1)
    check_int("first_token", first_token, 0)
    if not isinstance(stream, torch.Tensor) or stream.dim() != 1:
        raise TypeError("stream must be a 1-D tensor of token ids")
    if len(stream) < length + 1:
        raise ValueError(f"stream has {len(stream)} tokens, need at least length + 1 = {length + 1}")
    starts = torch.randint(0, len(stream) - length, (n,), generator=generator)
    y = torch.stack([stream[i:i + length] for i in starts.tolist()])
    x = torch.cat([torch.full((n, 1), first_token, dtype=y.dtype), y[:, :-1]], dim=1)
    return x, y


def aligned_loss(model, stream: torch.Tensor, length: int, n: int, first_token: int, seed: int = 1,
                 batch_size: int = 8) -> torch.Tensor:
    """Next-token loss (nats) at every position of `n` aligned windows (`aligned_windows`, starts drawn with `seed`):
    (n, length) on the CPU; its mean is the validation loss at `length`, its column means the loss by position."""
    check_int("batch_size", batch_size, 1)
    x, y = aligned_windows(stream, length, n, first_token, torch.Generator().manual_seed(seed))
    dev = model_device(model)
    out = []
    with torch.no_grad():
        for i in range(0, n, batch_size):
            logits = model(x[i:i + batch_size].to(dev))[0]
            out.append(F.cross_entropy(logits.transpose(1, 2), y[i:i + batch_size].to(dev), reduction="none").cpu())
    return torch.cat(out)


def kv_cache_bytes_formula(n_layer: int, batch: int, n_kv_head: int, head_dim: int, slots: int,
                           bytes_per_value: int = 4) -> int:
    """Bytes of a KV cache: keys + values, every layer: 2 * L * B * K * slots * D * bytes (positions not counted)."""
    return 2 * n_layer * batch * n_kv_head * slots * head_dim * bytes_per_value


# ----------------------------------------------------------------------------------------------------------
# RoPE context extension: inverse-frequency tables (D/2,), the same formulas as transformers' ROPE_INIT_FUNCTIONS
def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Plain RoPE: theta^(-2i/D) for i = 0 .. D/2 - 1."""
    check_int("head_dim", head_dim, 2)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if theta <= 0:
        raise ValueError(f"theta must be > 0, got {theta}")
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def _check_factor(factor) -> None:
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise TypeError(f"factor must be a number, got {type(factor).__name__}")
    if factor < 1:
        raise ValueError(f"factor must be >= 1 (1 = no scaling), got {factor}")


def linear_inv_freq(head_dim: int, theta: float, factor: float) -> torch.Tensor:
    """Position interpolation (Chen et al. 2023): positions divided by `factor`, i.e. every frequency / factor."""
    _check_factor(factor)
    return rope_inv_freq(head_dim, theta) / factor


def dynamic_ntk_inv_freq(head_dim: int, theta: float, factor: float, seq_len: int, trained_len: int) -> torch.Tensor:
    """Dynamic NTK-aware scaling: a larger base theta' = theta * (factor * L / L0 - (factor - 1))^(D / (D - 2)),
    with L = max(seq_len, trained_len). Up to the trained length nothing changes; beyond it the low frequencies
    are stretched most, the highest barely at all."""
    _check_factor(factor)
    check_int("seq_len", seq_len, 1)
    check_int("trained_len", trained_len, 1)
    L = max(seq_len, trained_len)
    base = theta * ((factor * L / trained_len) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return rope_inv_freq(head_dim, base)


def yarn_inv_freq(head_dim: int, theta: float, factor: float, trained_len: int, beta_fast: float = 32.0,
                  beta_slow: float = 1.0) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): per-frequency blend of extrapolation (fast dims, > beta_fast turns over the trained
    length: keep them) and interpolation (slow dims, < beta_slow turns: divide by factor), a linear ramp between;
    plus the attention temperature 0.1 ln(factor) + 1 that multiplies cos and sin. Returns (inv_freq, scale)."""
    _check_factor(factor)
    check_int("trained_len", trained_len, 1)
    D = head_dim
    extrapolation = rope_inv_freq(D, theta)
    interpolation = extrapolation / factor

    def dim_of(turns):  # the dimension index whose wavelength fits `turns` times into the trained length
        return D * math.log(trained_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), D - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(D // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)   # 0: fast, 1: slow
    inv_freq = extrapolation * (1 - ramp) + interpolation * ramp
    scale = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0
    return inv_freq, scale


def hf_inv_freq(rope_type: str, head_dim: int, theta: float, trained_len: int, factor: float = 1.0,
                seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """The reference: transformers' ROPE_INIT_FUNCTIONS[rope_type] on a LlamaConfig carrying these parameters
    (max_position_embeddings = trained_len, and original_max_position_embeddings = trained_len for YaRN)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": rope_type, "rope_theta": float(theta), "factor": float(factor)}
    if rope_type == "yarn":
        params["original_max_position_embeddings"] = trained_len
    cfg = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, head_dim=head_dim,
                      max_position_embeddings=trained_len, rope_parameters=params)
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu", seq_len=seq_len)
    return inv_freq.float(), float(scale)


SCALINGS = ("none", "linear", "dynamic", "yarn")


def scaled_inv_freq(scaling: str, head_dim: int, theta: float, trained_len: int, seq_len: int) -> tuple[torch.Tensor, float]:
    """(inv_freq, cos/sin scale) for evaluating at `seq_len` a model trained at `trained_len`.
    factor = max(1, seq_len / trained_len) for linear and YaRN; dynamic NTK uses factor 1 and the actual length."""
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    factor = max(1.0, seq_len / trained_len)
    if scaling == "none":
        return rope_inv_freq(head_dim, theta), 1.0
    if scaling == "linear":
        return linear_inv_freq(head_dim, theta, factor), 1.0
    if scaling == "dynamic":
        return dynamic_ntk_inv_freq(head_dim, theta, 1.0, seq_len, trained_len), 1.0
    return yarn_inv_freq(head_dim, theta, factor, trained_len)


class ScaledRopeAttention(Attention):
    """Full causal attention whose RoPE uses a given inverse-frequency table (and cos/sin scale).

    `project` is reused with RoPE switched off (a config copy with pos='none'); the rotation is then applied here
    with cos/sin of positions * inv_freq. Set the table with `set_rope(inv_freq, scale)`; plain RoPE's table gives
    exactly the shared Attention's output.
    """

    def __init__(self, cfg: GPTConfig, layer_idx: int = 0):
        if cfg.pos != "rope":
            raise ValueError(f"ScaledRopeAttention needs cfg.pos == 'rope', got {cfg.pos!r}")
        super().__init__(dataclasses.replace(cfg, pos="none"), layer_idx)
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta), persistent=False)
        self.scale = 1.0

    def set_rope(self, inv_freq: torch.Tensor, scale: float = 1.0) -> None:
        if inv_freq.shape != self.inv_freq.shape:
            raise ValueError(f"inv_freq must have shape {tuple(self.inv_freq.shape)}, got {tuple(inv_freq.shape)}")
        self.inv_freq, self.scale = inv_freq.to(self.inv_freq), float(scale)

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: dict | None = None) -> torch.Tensor:
        if cache is not None:
            raise ValueError("ScaledRopeAttention is for full-sequence evaluation: cache is not supported")
        B, T, _ = x.shape
        H, K, D = self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim
        q, k, v = self.project(x, start_pos)                            # no rotation yet (pos='none' copy)
        angles = torch.arange(start_pos, start_pos + T, device=x.device, dtype=torch.float32)[:, None] * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)                     # (T, D): rotate-half layout
        cos, sin = angles.cos() * self.scale, angles.sin() * self.scale
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=K != H)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


def set_rope_scaling(model, scaling: str, trained_len: int, seq_len: int) -> None:
    """Give every ScaledRopeAttention of `model` the table `scaled_inv_freq(scaling, ...)` for this length."""
    attns = [b.attn for b in model.blocks if isinstance(b.attn, ScaledRopeAttention)]
    if not attns:
        raise TypeError("model has no ScaledRopeAttention (build it with attn_factory=ScaledRopeAttention)")
    cfg = attns[0].cfg
    inv_freq, scale = scaled_inv_freq(scaling, cfg.head_dim, cfg.rope_theta, trained_len, seq_len)
    for a in attns:
        a.set_rope(inv_freq, scale)


# ----------------------------------------------------------------------------------------------------------
# Online-softmax tiled attention ("flash" algorithm, in plain PyTorch)
def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int = 64, block_k: int = 64,
                    causal: bool = True, window: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v without ever holding the (T, T_k) score matrix: q (B, H, T, D), k, v (B, H, T_k, D).

    For each block of queries, sweep blocks of keys keeping a running max m, running sum l and an unnormalised
    output acc; when a new block raises the max, rescale the old sum and output by exp(m_old - m_new). Memory per
    query block is O(block_q * block_k), not O(T * T_k). Causal: queries are the last T of the T_k keys.
    `window` (causal only): the band of `band_mask` without sinks; key blocks wholly older than the band are
    skipped, not masked, so time grows as T * window instead of T * T_k.
    """
    check_int("block_q", block_q, 1)
    check_int("block_k", block_k, 1)
    if window is not None:
        check_int("window", window, 1)
        if not causal:
            raise ValueError("window needs causal=True (a band looks back from each query)")
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"need q (B, H, T, D) and k, v (B, H, T_k, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    T, T_k, D = q.shape[2], k.shape[2], q.shape[3]
    offset = T_k - T
    out = torch.empty_like(q)
    for qs in range(0, T, block_q):
        qb = q[:, :, qs:qs + block_q] / math.sqrt(D)                     # (B, H, bq, D)
        q_pos = torch.arange(qs, qs + qb.shape[2], device=q.device) + offset
        m = torch.full(qb.shape[:3], float("-inf"), dtype=q.dtype, device=q.device)   # running max (B, H, bq)
        l = torch.zeros(qb.shape[:3], dtype=q.dtype, device=q.device)                 # running sum of exp
        acc = torch.zeros_like(qb)                                       # running sum of exp * v
        q_first, q_last = qs + offset, qs + qb.shape[2] - 1 + offset     # python ints: no read of a device value
        k_end = min(T_k, q_last + 1) if causal else T_k
        k_start = 0 if window is None else max(0, q_first - window + 1) // block_k * block_k
        for ks in range(k_start, k_end, block_k):
            s = qb @ k[:, :, ks:ks + block_k].transpose(-2, -1)           # (B, H, bq, bk)
            if causal:
                k_pos = torch.arange(ks, ks + s.shape[-1], device=q.device)
                hidden = k_pos[None, :] > q_pos[:, None]
                if window is not None:
                    hidden |= q_pos[:, None] - k_pos[None, :] >= window
                s = s.masked_fill(hidden, float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1))
            # a row that has seen no visible key yet (possible with a band) keeps m = -inf: shift it by 0 instead,
            # so exp(-inf - 0) = 0 rather than exp(-inf + inf) = NaN
            m_shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_shift[..., None])
            correction = torch.exp(m - m_shift)                         # 0 on a row's first visible block (m = -inf)
            l = l * correction + p.sum(dim=-1)
            acc = acc * correction[..., None] + p @ v[:, :, ks:ks + block_k]
            m = m_new
        out[:, :, qs:qs + block_q] = acc / l[..., None]
    return out


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(D)) v with the whole (B, H, T, T_k) score matrix held in memory (the textbook
    way, and what a band applied as a mask still costs); `window`: the band of `band_mask`, no sinks."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"need q (B, H, T, D) and k, v (B, H, T_k, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    T, T_k = q.shape[2], k.shape[2]
    q_pos, k_pos = torch.arange(T_k - T, T_k, device=q.device), torch.arange(T_k, device=q.device)
    visible = band_mask(q_pos, k_pos, window) if window is not None else k_pos[None, :] <= q_pos[:, None]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v


# ----------------------------------------------------------------------------------------------------------
# Recall of the planted object at a distance ("Mia had a red kite. ... Later, Mia found the red kite."): the items
# and their scoring live in shared.data (the zoo scores its base with them too); this folder bins them by distance.

def accuracy_by_bin(hits: torch.Tensor, distances, edges) -> list[tuple[int, int]]:
    """(successes, n) of `hits` (N,) bool per distance bin [edges[i], edges[i+1]) (len(edges) - 1 bins)."""
    d = torch.as_tensor(distances)
    if hits.shape != d.shape:
        raise ValueError(f"hits {tuple(hits.shape)} and distances {tuple(d.shape)} must have the same shape")
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"edges must be at least 2 increasing values, got {list(edges)}")
    return [(int(hits[(d >= lo) & (d < hi)].sum()), int(((d >= lo) & (d < hi)).sum()))
            for lo, hi in zip(edges, edges[1:])]


def collapse_distance(edges, accuracy, threshold: float) -> int | None:
    """Lower edge of the first distance bin whose accuracy falls below `threshold` after some bin was at or above
    it (None if it never rises above, or never falls): where recall collapses."""
    if len(accuracy) != len(edges) - 1:
        raise ValueError(f"need one accuracy per bin: {len(edges) - 1} bins, got {len(accuracy)}")
    seen = False
    for lo, a in zip(edges, accuracy):
        seen = seen or a >= threshold
        if seen and a < threshold:
            return int(lo)
    return None
