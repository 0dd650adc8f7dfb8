"""A tiny decoder-only transformer, Llama-shaped by default, in one readable file.

Default architecture: RMSNorm pre-norm, rotary positions (RoPE, Llama's rotate-half convention), SwiGLU MLP,
grouped-query attention (`n_kv_head` key/value heads shared by `n_head` query heads), no biases. Options let
later notebooks swap positions (`rope|learned|sinusoidal|alibi|none`), norm (`rms|layer`), activation
(`swiglu|gelu|relu`) and drop the causal mask. New ideas (MoE, grouped or windowed attention, other norms) plug in
through the `attn_factory`, `mlp_factory` and `norm_factory` hooks, not as more config flags.

`block_size` is the length the model is trained at (and the size of a learned/sinusoidal table); how much context
generation keeps is `decode`'s own `window` argument. `decode` is the one decoding loop: what differs between
greedy, sampling and 05's full sampler is only the `pick_next` callable it is given.

Shapes: B batch, T time (tokens), C = d_model, H query heads, K key/value heads, D = head_dim = C // H, V vocab.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

POSITIONS = ("rope", "learned", "sinusoidal", "alibi", "none")
NORMS = ("rms", "layer")
ACTIVATIONS = ("swiglu", "gelu", "relu")


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 256          # training length; learned/sinusoidal tables have this many rows (decode's window is separate)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None   # None: n_head (plain multi-head attention); 1: multi-query attention
    d_model: int = 128
    d_ff: int | None = None        # None: SwiGLU -> 8/3 * d_model rounded up to a multiple of 32; gelu/relu -> 4 * d_model
    pos: str = "rope"
    norm: str = "rms"
    act: str = "swiglu"
    causal: bool = True
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if not isinstance(self.n_kv_head, int) or self.n_kv_head <= 0:
            raise ValueError(f"n_kv_head must be a positive int or None, got {self.n_kv_head!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        for name, allowed in (("pos", POSITIONS), ("norm", NORMS), ("act", ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE rotates pairs of dimensions: head_dim must be even, got {self.head_dim}")
        if self.pos == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"sinusoidal positions need an even d_model, got {self.d_model}")
        if self.d_ff is None:
            self.d_ff = 32 * math.ceil(8 * self.d_model / 3 / 32) if self.act == "swiglu" else 4 * self.d_model
        if not isinstance(self.d_ff, int) or self.d_ff <= 0:
            raise ValueError(f"d_ff must be a positive int or None, got {self.d_ff!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("rope_theta, norm_eps and init_std must be positive")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig options: {sorted(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------
# Positions
def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, D) for integer `positions` (T,): frequency i (of D/2) repeated in both halves."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]   # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)                        # (T, D): rotate-half layout
    return angles.cos().to(dtype), angles.sin().to(dtype)


_ROPE_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rope_table(start: int, length: int, head_dim: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_cos_sin` for positions start .. start+length-1, sliced from a table kept per (D, theta, device, dtype).

    Every layer of every forward pass needs the same rows: computing them once saves a dozen small kernels per
    layer per step. The table grows by doubling; its rows are bitwise the rows `rope_cos_sin` computes.
    """
    key = (head_dim, float(theta), str(device), dtype)
    cos, sin = _ROPE_TABLES.get(key, (None, None))
    end = start + length
    if cos is None or cos.shape[0] < end:
        size = 1 << max(8, (end - 1).bit_length())
        cos, sin = rope_cos_sin(torch.arange(size, device=device), head_dim, theta, dtype)
        _ROPE_TABLES[key] = (cos, sin)
    return cos[start:end], sin[start:end]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + D/2]) of x (B, H, T, D) by the angles behind cos/sin (T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's per-head slopes: a geometric sequence 2^(-8/n), 2^(-16/n), ... (paper's rule for non-powers of 2)."""
    if not isinstance(n_head, int) or isinstance(n_head, bool) or n_head <= 0:
        raise ValueError(f"n_head must be a positive int, got {n_head!r}")

    def powers_of_two(n):
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_head).is_integer():
        return torch.tensor(powers_of_two(n_head))
    closest = 2 ** math.floor(math.log2(n_head))
    extra = powers_of_two(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(powers_of_two(closest) + extra)


def sinusoidal_table(n_positions: int, d_model: int, base: float = 10000.0) -> torch.Tensor:
    """The Transformer paper's table (n_positions, d_model): sin on even dims, cos on odd dims."""
    if n_positions <= 0 or d_model <= 0 or d_model % 2:
        raise ValueError(f"need n_positions > 0 and an even d_model > 0, got {n_positions}, {d_model}")
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    freq = base ** (-torch.arange(0, d_model, 2, dtype=torch.float32) / d_model)
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


# ----------------------------------------------------------------------------------------------------------
# Layers
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, over the last dim (Llama's normalisation, no mean subtraction)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # one fused kernel; equal (to float rounding) to x * rsqrt(mean(x^2) + eps) * weight
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def make_norm(cfg: GPTConfig) -> nn.Module:
    return RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.norm == "rms" else nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE/ALiBi, computed by `F.scaled_dot_product_attention`.

    forward(x (B,T,C), start_pos, cache) -> (B,T,C). `cache` is a dict holding this layer's past keys/values
    "k", "v" of shape (B, K, T_past, D); when given, the new keys/values are appended to it.
    """

    def __init__(self, cfg: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        H, K, D, C = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_model
        self.q_proj = nn.Linear(C, H * D, bias=False)
        self.k_proj = nn.Linear(C, K * D, bias=False)
        self.v_proj = nn.Linear(C, K * D, bias=False)
        self.o_proj = nn.Linear(H * D, C, bias=False)
        if cfg.pos == "alibi":
            self.register_buffer("slopes", alibi_slopes(H), persistent=False)
        self.store_weights = False    # set by GPT.attention_maps: compute softmax weights explicitly and keep them
        self.last_weights = None

    def project(self, x: torch.Tensor, start_pos: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, D), keys and values (B, K, T, D) of x (B, T, C), RoPE applied at absolute positions
        start_pos .. start_pos + T - 1. The one place the projection + head split lives (06's cache and 03's
        maps call it too)."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, K, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)   # (B, H, T, D)
        k = self.k_proj(x).view(B, T, K, D).transpose(1, 2)   # (B, K, T, D)
        v = self.v_proj(x).view(B, T, K, D).transpose(1, 2)   # (B, K, T, D)
        if cfg.pos == "rope":
            cos, sin = rope_table(start_pos, T, D, cfg.rope_theta, x.device, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: dict | None = None) -> torch.Tensor:
        cfg = self.cfg
        B, T, C = x.shape
        H, K, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        q, k, v = self.project(x, start_pos)
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        T_k = k.shape[2]                                        # keys seen: past + new
        bias = self._bias(T, T_k, x.device, q.dtype)             # None, or additive (H or 1, T, T_k)
        dropout = cfg.dropout if self.training else 0.0
        if self.store_weights:
            y = self._explicit(q, k, v, bias)
        elif bias is None:
            is_causal = cfg.causal and T > 1                     # one new query may see every cached key
            y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, dropout_p=dropout,
                                               enable_gqa=K != H)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, enable_gqa=K != H)
        y = y.transpose(1, 2).reshape(B, T, H * D)              # (B, T, C)
        return self.o_proj(y)

    def _bias(self, T: int, T_k: int, device, dtype) -> torch.Tensor | None:
        """Additive mask/bias (H|1, T, T_k) when SDPA's `is_causal` cannot express it (cache offset or ALiBi)."""
        cfg = self.cfg
        offset = T_k - T                                         # absolute position of the first query
        needs_offset_mask = cfg.causal and offset > 0 and T > 1
        if cfg.pos != "alibi" and not needs_offset_mask and not self.store_weights:
            return None
        q_pos = torch.arange(offset, T_k, device=device)[:, None]
        k_pos = torch.arange(T_k, device=device)[None, :]
        bias = torch.zeros(1, T, T_k, device=device, dtype=dtype)
        if cfg.pos == "alibi":
            distance = (q_pos - k_pos).abs().to(dtype)           # causal part only ever sees k <= q
            bias = -self.slopes.to(dtype)[:, None, None] * distance[None]
        if cfg.causal:
            bias = bias.masked_fill(k_pos > q_pos, float("-inf"))
        return bias

    def _explicit(self, q, k, v, bias):
        """softmax(q k^T / sqrt(D) + bias) v, written out so the weights can be kept for plotting."""
        rep = self.cfg.n_head // self.cfg.n_kv_head
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])   # (B, H, T, T_k)
        if bias is not None:
            scores = scores + bias
        weights = scores.softmax(dim=-1)
        self.last_weights = weights.detach()
        return weights @ v


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); or the classic down(act(up(x))) for gelu/relu."""

    def __init__(self, cfg: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.act = cfg.act
        if cfg.act == "swiglu":
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        if self.act == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        h = self.up_proj(x)
        return self.down_proj(F.gelu(h) if self.act == "gelu" else F.relu(h))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, cfg: GPTConfig, layer_idx: int, attn: nn.Module, mlp: nn.Module,
                 norm_factory: Callable[[GPTConfig], nn.Module]):
        super().__init__()
        self.norm1, self.attn = norm_factory(cfg), attn
        self.norm2, self.mlp = norm_factory(cfg), mlp
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, start_pos: int = 0, cache: dict | None = None):
        x = x + self.drop(self.attn(self.norm1(x), start_pos, cache))
        return x + self.drop(self.mlp(self.norm2(x)))


# ----------------------------------------------------------------------------------------------------------
class GPT(nn.Module):
    """Token embedding -> n_layer blocks -> final norm -> LM head (tied to the embedding by default)."""

    def __init__(self, cfg: GPTConfig, attn_factory: Callable | None = None, mlp_factory: Callable | None = None,
                 norm_factory: Callable | None = None):
        super().__init__()
        if not isinstance(cfg, GPTConfig):
            raise TypeError(f"cfg must be a GPTConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        attn_factory = attn_factory or Attention
        mlp_factory = mlp_factory or MLP
        norm_factory = norm_factory or make_norm
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos == "learned":
            self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        elif cfg.pos == "sinusoidal":
            # The raw table has entries of size ~0.7 while token embeddings start at std init_std (0.02): added
            # as is, position would drown token identity. Scale it to the embeddings' size (the Transformer
            # paper instead multiplies embeddings by sqrt(d_model)).
            table = sinusoidal_table(cfg.block_size, cfg.d_model) * cfg.init_std
            self.register_buffer("pos_table", table, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg, i, attn_factory(cfg, i), mlp_factory(cfg, i), norm_factory) for i in range(cfg.n_layer))
        self.norm = norm_factory(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():   # GPT-2: shrink residual-branch outputs with depth
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); `non_embedding` drops token/position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.cfg.pos == "learned":
                n -= self.pos_emb.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, start_pos: int = 0,
                caches: list[dict] | None = None):
        """idx (B, T) token ids -> (logits (B, T, V), mean cross-entropy in nats or None)."""
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx must be a (B, T) long tensor, got shape {tuple(idx.shape)} dtype {idx.dtype}")
        B, T = idx.shape
        if idx.device != self.tok_emb.weight.device:     # torch refuses this on a GPU, but not with a meta model
            raise ValueError(f"idx is on {idx.device}, the model on {self.tok_emb.weight.device}: move the batch "
                             f"to the model's device")
        if T and not idx.is_meta and (idx.min() < 0 or idx.max() >= self.cfg.vocab_size):   # meta: no values
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}), got min {idx.min().item()} "
                             f"max {idx.max().item()}")
        if self.cfg.pos in ("learned", "sinusoidal") and start_pos + T > self.cfg.block_size:
            raise ValueError(f"{self.cfg.pos} positions cover {self.cfg.block_size} tokens, got {start_pos + T}")
        x = self.tok_emb(idx)                                   # (B, T, C)
        if self.cfg.pos in ("learned", "sinusoidal"):
            pos = torch.arange(start_pos, start_pos + T, device=idx.device)
            x = x + (self.pos_emb(pos) if self.cfg.pos == "learned" else self.pos_table[pos])
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, start_pos, None if caches is None else caches[i])
        logits = self.lm_head(self.norm(x))                     # (B, T, V)
        loss = None
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Softmax attention weights of every layer, a list of (B, n_head, T, T), from one forward pass."""
        attns = [b.attn for b in self.blocks if isinstance(b.attn, Attention)]
        if len(attns) != len(self.blocks):
            raise TypeError("attention_maps needs the built-in Attention module in every block")
        for a in attns:
            a.store_weights = True
        try:
            self(idx)
            return [a.last_weights for a in attns]
        finally:
            for a in attns:
                a.store_weights, a.last_weights = False, None

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True,
                 window: int | None = None) -> torch.Tensor:
        """Append `max_new_tokens` tokens to idx (B, T): temperature=0 is greedy, else temperature/top-k sampling.

        A thin wrapper of `decode` (the one decoding loop; see there for `use_cache` and `window`)."""
        return decode(self, idx, max_new_tokens, sample_next(temperature, top_k, generator),
                      window=window, use_cache=use_cache)


# ----------------------------------------------------------------------------------------------------------
# Decoding: one loop for every notebook; what differs between decoders is only how the next token is picked.
PickNext = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (logits (B, V), ids so far (B, T)) -> (B,) ids


def model_device(model) -> torch.device:
    """Where `model` computes: the device of its first parameter or buffer, the CPU for a model without any (an
    oracle, a count table, a plain function). Helpers move their inputs here (the device rule)."""
    for tensors in (getattr(model, "parameters", None), getattr(model, "buffers", None)):
        first = next(tensors(), None) if callable(tensors) else None
        if first is not None:
            return first.device
    return torch.device("cpu")


def state_dict_untied(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as contiguous tensors, without `lm_head.weight` when the model ties it to the token embedding
    (one tensor under two names: safetensors refuses shared storage, and `load_weights` re-ties it)."""
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    return {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], tied: bool | None = None) -> nn.Module:
    """Load `state` into `model` strictly, except that a tied `lm_head.weight` may be absent (it is the token
    embedding). `tied` defaults to the model's `cfg.tie_embeddings`. Raises RuntimeError naming the missing and
    unexpected keys. The one place the tied-head rule lives (the zoo, the HF bridge and the folders call it)."""
    if tied is None:
        tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return model


def rebuild(model: GPT, attn_factory: Callable | None = None, mlp_factory: Callable | None = None) -> GPT:
    """A new GPT with `model`'s config and a copy of its weights whose attention (or MLP) modules come from
    `attn_factory` (`mlp_factory`; None: the shared `Attention`/`MLP`), on the model's device, in eval mode: the
    same trained weights read through another attention kernel, a band, a scaled RoPE table. Loading is strict
    (`load_weights`): a module whose parameter names differ from the default's raises."""
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a shared.model.GPT, got {type(model).__name__}")
    cfg = GPTConfig(**model.cfg.to_dict())                            # its own config object: nothing shared
    new = GPT(cfg, attn_factory=attn_factory, mlp_factory=mlp_factory).to(model_device(model))
    return load_weights(new, model.state_dict()).eval()


def greedy_next(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row: (B, V) -> (B,)."""
    return logits.argmax(dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from probs (B, V): (B,), on probs' device.

    A seeded `torch.Generator` lives on one device and `torch.multinomial` refuses probabilities on another, so the
    draw happens where the generator is (a CPU generator with CUDA logits samples on the CPU, then moves back):
    the same seed gives the same draws whichever device the model runs on.
    """
    if probs.dim() != 2:
        raise ValueError(f"probs must be (B, V), got shape {tuple(probs.shape)}")
    if generator is None or generator.device == probs.device:
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    return torch.multinomial(probs.to(generator.device), 1, generator=generator)[:, 0].to(probs.device)


def sample_next(temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> PickNext:
    """A picker drawing from softmax(logits / temperature), optionally kept to the top_k logits; 0 = greedy.
    (05-sampling builds the full sampler: top-p, min-p, repetition penalty.)"""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if temperature == 0:
        return greedy_next

    def pick(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return draw(logits.softmax(dim=-1), generator)

    return pick


@torch.no_grad()
def decode(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, pick_next: PickNext, *,
           window: int | None = None, use_cache: bool | None = None) -> torch.Tensor:
    """Autoregressive decoding: idx (B, T0) long -> (B, T0 + max_new_tokens), one `pick_next` call per token.

    `model(ids)` returns `(logits (B, T, V), _)`. The model sees at most `window` tokens: past that, the oldest
    are dropped (a sliding window, re-run in full each step). `window` defaults to a GPT's `cfg.block_size`
    (the length it was trained at) and is unlimited for other models; a GPT with learned/sinusoidal positions
    cannot take a window longer than its table. With `use_cache` (default: when `model` is a `GPT`) the prompt
    runs once and then one token per step, each layer's attention keeping its keys/values in a per-layer dict;
    once the context passes the window, decoding falls back to the sliding re-run. The prompt is moved to the
    model's device; the returned ids live there.
    """
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long or idx.shape[1] == 0:
        raise ValueError(f"idx must be a (B, T0 >= 1) long tensor, got {getattr(idx, 'shape', type(idx).__name__)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    is_gpt = isinstance(model, GPT)
    if window is None and is_gpt:
        window = model.cfg.block_size
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1 or None, got {window!r}")
        if is_gpt and model.cfg.pos in ("learned", "sinusoidal") and window > model.cfg.block_size:
            raise ValueError(f"{model.cfg.pos} positions cover {model.cfg.block_size} tokens: window {window} "
                             "is longer than the position table")
    use_cache = is_gpt if use_cache is None else use_cache
    if use_cache and not is_gpt:
        raise TypeError(f"use_cache needs a shared GPT (forward with start_pos and caches), got {type(model).__name__}")
    idx = idx.to(model_device(model))
    was_training = model.training
    model.eval()
    caches = [{} for _ in model.blocks] if use_cache else None
    fed = 0                                                   # tokens already inside the caches
    for _ in range(max_new_tokens):
        if caches is not None and (window is None or idx.shape[1] <= window):
            logits = model(idx[:, fed:], start_pos=fed, caches=caches)[0]
            fed = idx.shape[1]
        else:
            caches = None                                     # past the window: slide, re-running it in full
            logits = model(idx if window is None else idx[:, -window:])[0]
        nxt = pick_next(logits[:, -1, :], idx)                # (B,)
        idx = torch.cat([idx, nxt.reshape(-1, 1).to(idx.dtype)], dim=1)
    model.train(was_training)
    return idx
