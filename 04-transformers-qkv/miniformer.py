"""miniformer: a transformer block built from its parts, and a stack of them.

The pieces, in the order the notebook builds them:

* ``CausalSelfAttention`` -- explicit softmax(Q K^T / sqrt(d_head)) V with a causal mask, and four Q/K/V
  ablations (tie Q and K, identity V, uniform attention (no Q and K), no output projection).
* ``MLP`` -- Linear -> GELU -> Linear, the position-wise feed-forward layer.
* ``Block`` -- attention and MLP joined by residual connections and normalisation, in the pre-norm
  (``x + f(norm(x))``, GPT-2/Llama) or post-norm (``norm(x + f(x))``, the 2017 Transformer) placement,
  with the residual connections optionally switched off.
* ``MiniFormer`` -- token + learned position embeddings, N blocks, a final norm and a tied LM head;
  ``forward(idx, targets) -> (logits, loss)`` like ``shared.model.GPT``, so ``shared.train.train`` trains it.

Module names follow ``shared.model.GPT`` (``tok_emb``, ``pos_emb``, ``blocks[i].norm1/.attn/.norm2/.mlp``,
``q_proj k_proj v_proj o_proj``, ``up_proj down_proj``, ``norm``, ``lm_head``) so a GPT's state dict loads
into a MiniFormer configured alike (see ``load_from_gpt``).

Shapes (the legend of ``shared.model``): B batch, T time (tokens), C = d_model, H heads, D = head_dim = C // H,
V vocabulary.

Mask convention (as in ``03/attention.py`` and ``F.scaled_dot_product_attention``): a boolean mask is True where a
query MAY attend to a key. Only PyTorch's ``nn.TransformerEncoderLayer`` wants the opposite (True = masked); the
conversion is written out where that layer is called.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.model import model_device
from shared.train import train
from shared.validate import check_int

NORMS = ("layer", "rms", "none")
PLACEMENTS = ("pre", "post")
QKV_VARIANTS = ("full", "tied_qk", "identity_v", "uniform_attn", "no_o")


# ----------------------------------------------------------------------------------------------------------
# argument checks, gathered here so that the classes below read as the math (TypeError: wrong type,
# ValueError: wrong value; every message names the argument, what was given and what is allowed)

def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_config(cfg: "MiniConfig") -> None:
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "d_ff"):
        check_int(name, getattr(cfg, name), 1)
    if cfg.d_model % cfg.n_head:
        raise ValueError(f"d_model must be divisible by n_head, got d_model={cfg.d_model}, n_head={cfg.n_head}")
    _check_choice("norm", cfg.norm, NORMS)
    _check_choice("placement", cfg.placement, PLACEMENTS)
    _check_choice("qkv", cfg.qkv, QKV_VARIANTS)
    if not isinstance(cfg.residual, bool):
        raise TypeError(f"residual must be a bool, got {type(cfg.residual).__name__}")
    _check_positive("init_std", cfg.init_std)


def _check_idx(cfg: "MiniConfig", idx, targets=None) -> None:
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long:
        raise TypeError(f"idx must be a torch.long tensor, got {getattr(idx, 'dtype', type(idx).__name__)}")
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must have shape (B, T) with T >= 1, got {tuple(idx.shape)}")
    if idx.shape[1] > cfg.block_size:
        raise ValueError(f"idx has T={idx.shape[1]} tokens, more than block_size={cfg.block_size}")
    if idx.numel() and idx.device.type != "meta" and (idx.min() < 0 or idx.max() >= cfg.vocab_size):   # meta: no values
        raise ValueError(f"idx values must lie in [0, {cfg.vocab_size}), got [{idx.min()}, {idx.max()}]")
    if targets is not None and (not isinstance(targets, torch.Tensor) or targets.shape != idx.shape):
        raise ValueError(f"targets must be a tensor of shape {tuple(idx.shape)}, got {getattr(targets, 'shape', targets)}")


def _check_type(name: str, value, cls: type) -> None:
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")


@dataclass
class MiniConfig:
    """Hyper-parameters of a MiniFormer (defaults: the tiny size the notebook trains).

    qkv: "full" (standard attention), "tied_qk" (K uses Q's matrix: symmetric scores), "identity_v"
    (W_V = I: head h's value is the fixed slice x[..., h*D:(h+1)*D] of the block's input; W_O still mixes),
    "uniform_attn" (no W_Q, W_K: every query averages its visible past with equal weights, the attention that
    small random Q and K give), "no_o" (W_O = I: head h writes straight into channels h*D:(h+1)*D of the
    residual stream).
    """
    vocab_size: int
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    d_ff: int | None = None        # None -> 4 * d_model
    norm: str = "layer"            # layer | rms | none
    placement: str = "pre"         # pre | post
    residual: bool = True
    qkv: str = "full"
    bias: bool = False             # biases in the Linear layers (LayerNorm always keeps its own, as in GPT-2)
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self):
        if self.d_ff is None and isinstance(self.d_model, int):
            self.d_ff = 4 * self.d_model
        _check_config(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


def make_norm(cfg: MiniConfig) -> nn.Module:
    """The normalisation layer of cfg.norm: (B, T, C) -> (B, T, C). Library layers, not hand-written."""
    if cfg.norm == "layer":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    if cfg.norm == "rms":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.Identity()


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention written out: (B, T, C) -> (B, T, C).

    q = x Wq, k = x Wk, v = x Wv (B, T, C), each split into H heads of size D; scores = q k^T / sqrt(D)
    (B, H, T, T), -inf where ``causal_mask`` forbids (the future); weights = softmax(scores);
    out = (weights v) (B, H, T, D), heads concatenated back to (B, T, C), then Wo.
    """

    def __init__(self, cfg: MiniConfig):
        super().__init__()
        self.n_head, self.head_dim, self.variant = cfg.n_head, cfg.head_dim, cfg.qkv
        C = cfg.d_model
        # uniform_attn: no Q and K at all, every score is 0, so each query averages its visible past.
        self.q_proj = None if cfg.qkv == "uniform_attn" else nn.Linear(C, C, bias=cfg.bias)
        # tied_qk: K *is* Q's matrix, so score(i, j) = q_i . q_j is symmetric in i and j.
        self.k_proj = self.q_proj if cfg.qkv in ("tied_qk", "uniform_attn") else nn.Linear(C, C, bias=cfg.bias)
        # identity_v: no learned "what to send": head h's value is the fixed channel slice h*D:(h+1)*D of the
        # block's input (W_O below still mixes the heads' outputs).
        self.v_proj = nn.Identity() if cfg.qkv == "identity_v" else nn.Linear(C, C, bias=cfg.bias)
        # no_o: heads are written back without the mixing matrix Wo.
        self.o_proj = nn.Identity() if cfg.qkv == "no_o" else nn.Linear(C, C, bias=cfg.bias)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, C = t.shape
        return t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)          # (B, H, T, D)

    def forward(self, x: torch.Tensor, return_weights: bool = False):
        """x (B, T, C) -> out (B, T, C); with return_weights also the (B, H, T, T) attention weights."""
        B, T, C = x.shape
        v = self._heads(self.v_proj(x))
        if self.q_proj is None:                                               # uniform_attn
            scores = x.new_zeros(B, self.n_head, T, T)
        else:
            q, k = self._heads(self.q_proj(x)), self._heads(self.k_proj(x))
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)       # (B, H, T, T)
        allowed = causal_mask(T, device=x.device)                              # (T, T) True = may attend
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)  # rows sum to 1
        out = (weights @ v).transpose(1, 2).reshape(B, T, C)                  # (B, T, C) heads concatenated
        out = self.o_proj(out)
        return (out, weights) if return_weights else out


class MLP(nn.Module):
    """Position-wise feed-forward: (B, T, C) -> up (B, T, d_ff) -> GELU -> down (B, T, C)."""

    def __init__(self, cfg: MiniConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    """One transformer block: (B, T, C) -> (B, T, C).

    pre-norm : x = x + attn(norm1(x));  x = x + mlp(norm2(x))     (the residual stream is never normalised)
    post-norm: x = norm1(x + attn(x));  x = norm2(x + mlp(x))     (the 2017 Transformer)
    residual=False drops the ``x +`` so each sub-layer's output replaces its input.
    """

    def __init__(self, cfg: MiniConfig):
        super().__init__()
        self.placement, self.residual = cfg.placement, cfg.residual
        self.norm1, self.attn = make_norm(cfg), CausalSelfAttention(cfg)
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)

    def _sublayer(self, x, norm, fn):
        if self.placement == "pre":
            y = fn(norm(x))
            return x + y if self.residual else y
        return norm(x + fn(x)) if self.residual else norm(fn(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._sublayer(x, self.norm1, self.attn)
        return self._sublayer(x, self.norm2, self.mlp)


class MiniFormer(nn.Module):
    """A decoder-only transformer: idx (B, T) -> logits (B, T, V).

    tok_emb (V, C) + pos_emb (block_size, C) -> n_layer Blocks -> final norm (pre-norm only: post-norm
    blocks already end in a norm) -> lm_head (tied to tok_emb).
    """

    def __init__(self, cfg: MiniConfig):
        super().__init__()
        _check_type("cfg", cfg, MiniConfig)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg) if cfg.placement == "pre" else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight                               # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():   # GPT-2: shrink residual-branch outputs with depth
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Distinct parameters (a tied matrix counted once), trainable or not."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def residual_stream(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """The hidden state after the embeddings and after every block: n_layer + 1 tensors (B, T, C)."""
        _check_idx(self.cfg, idx)
        T = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))  # (B, T, C)
        states = [x]
        for block in self.blocks:
            x = block(x)
            states.append(x)
        return states

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, T) long -> (logits (B, T, V), loss: mean cross-entropy in nats/token or None)."""
        _check_idx(self.cfg, idx, targets)
        x = self.norm(self.residual_stream(idx)[-1])
        logits = self.lm_head(x)                                                # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Softmax weights of every layer: a list of n_layer tensors (B, H, T, T)."""
        maps = []
        x = self.residual_stream(idx)[0]
        for block in self.blocks:
            # re-run the block's attention on the same input it sees in forward, keeping its weights
            h = block.norm1(x) if block.placement == "pre" else x
            maps.append(block.attn(h, return_weights=True)[1])
            x = block(x)
        return maps


def load_from_gpt(mini: MiniFormer, gpt: nn.Module) -> MiniFormer:
    """Copy a shared.model.GPT's weights into ``mini`` (same module names, so a strict state-dict load).

    Raises ValueError naming the missing / unexpected keys or mismatched shapes if the two are not built alike.
    """
    _check_type("mini", mini, MiniFormer)
    source = {k: v for k, v in gpt.state_dict().items()}
    target = mini.state_dict()
    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    shapes = [f"{k}: {tuple(source[k].shape)} vs {tuple(target[k].shape)}"
              for k in set(source) & set(target) if source[k].shape != target[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"gpt and mini are not built alike: missing {missing}, unexpected {unexpected}, "
                         f"shape mismatches {shapes}")
    mini.load_state_dict(source, strict=True)
    return mini


def xavier_init_(model: MiniFormer) -> MiniFormer:
    """Re-initialise every Linear of the blocks with std 1/sqrt(fan_in) (variance-preserving, the 2017 Transformer's
    scale and the setting of Xiong et al. 2020's post-norm analysis), without GPT-2's 1/sqrt(2 n_layer) shrink of
    the residual branches. In place; returns the model. Embeddings and the tied head keep their init."""
    _check_type("model", model, MiniFormer)
    with torch.no_grad():
        for module in model.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=1 / math.sqrt(module.in_features))
    return model


def block_grad_norms(model: MiniFormer) -> torch.Tensor:
    """L2 norm of the gradient of each block's parameters after a backward pass: (n_layer,)."""
    norms = []
    for i, block in enumerate(model.blocks):
        grads = [p.grad.flatten() for p in block.parameters() if p.grad is not None]
        if not grads:
            raise ValueError(f"block {i} has no gradients: call loss.backward() first")
        norms.append(torch.cat(grads).norm())
    return torch.stack(norms)


def grad_norms_on_batch(model: MiniFormer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-block gradient norms (n_layer,) of the loss on one batch x, y (B, T); leaves no grads behind."""
    dev = model_device(model)                      # the batch goes where the model is
    model.zero_grad(set_to_none=True)
    _, loss = model(x.to(dev), y.to(dev))
    loss.backward()
    norms = block_grad_norms(model).detach()
    model.zero_grad(set_to_none=True)
    return norms


def overfit_one_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 200,
                      lr: float = 3e-3) -> list[float]:
    """Train on the single batch (x, y) (B, T) for ``steps``; returns the loss of every step (nats/token).

    An end-to-end sanity check: a working model memorises one batch, so the loss must go to ~0. Plain Adam
    (constant lr, no warm-up, no weight decay, no clipping) through the repo's one training loop.
    """
    check_int("steps", steps, 1)
    _check_positive("lr", lr)
    hist = train(model, lambda g: (x, y), steps=steps, lr=lr, warmup=0, min_lr_ratio=1.0, weight_decay=0.0,
                 grad_clip=None, betas=(0.9, 0.999), batch_size=x.shape[0], seq_len=x.shape[-1], progress=False)
    return hist.train_loss


def torch_reference_block(block: Block) -> nn.TransformerEncoderLayer:
    """PyTorch's own ``nn.TransformerEncoderLayer`` carrying ``block``'s weights: the trusted reference.

    ``norm_first=True`` is pre-norm, ``False`` post-norm. Call it with ``src_mask=~causal_mask(T)`` and
    ``is_causal=True``: this layer's boolean mask means the opposite of ours (True = masked), hence the ``~``.
    Only for the standard block (LayerNorm, residual, qkv="full").
    """
    _check_type("block", block, Block)
    attn, mlp = block.attn, block.mlp
    if attn.variant != "full" or not block.residual or not isinstance(block.norm1, nn.LayerNorm):
        raise ValueError("torch_reference_block needs a standard block: qkv='full', residual=True, norm='layer'")
    C, d_ff = attn.q_proj.in_features, mlp.up_proj.out_features
    ref = nn.TransformerEncoderLayer(C, attn.n_head, dim_feedforward=d_ff, dropout=0.0, activation="gelu",
                                     layer_norm_eps=block.norm1.eps, batch_first=True,
                                     norm_first=block.placement == "pre", bias=True)
    zero = lambda n: torch.zeros(n)                     # a bias-free Linear is one whose bias is zero
    bias_of = lambda lin: lin.bias if lin.bias is not None else zero(lin.out_features)
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        ref.self_attn.out_proj.weight.copy_(attn.o_proj.weight)
        ref.linear1.weight.copy_(mlp.up_proj.weight)
        ref.linear2.weight.copy_(mlp.down_proj.weight)
        ref.norm1.weight.copy_(block.norm1.weight)
        ref.norm2.weight.copy_(block.norm2.weight)
        ref.self_attn.in_proj_bias.copy_(torch.cat([bias_of(attn.q_proj), bias_of(attn.k_proj), bias_of(attn.v_proj)]))
        ref.self_attn.out_proj.bias.copy_(bias_of(attn.o_proj))
        ref.linear1.bias.copy_(bias_of(mlp.up_proj))
        ref.linear2.bias.copy_(bias_of(mlp.down_proj))
        ref.norm1.bias.copy_(block.norm1.bias)
        ref.norm2.bias.copy_(block.norm2.bias)
    return ref.eval()


def causal_mask(T: int, device=None) -> torch.Tensor:
    """(T, T) bool mask, True where query i may attend to key j (j <= i): the past and itself, not the future.

    >>> causal_mask(3).int().tolist()
    [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    check_int("T", T, 1)
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


# ----------------------------------------------------------------------------------------------------------
# a task that needs two layers: look-up by induction

def induction_batch(generator: torch.Generator, batch_size: int, seq_len: int, vocab_size: int,
                    min_len: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences that only an induction head can finish: x, y (B, T), y = -100 except where scored.

    Each row starts with a segment S of P distinct random tokens (P uniform in [min_len, max_len], so no fixed
    offset or position finds the answer), then query/answer pairs: a query is a random token of S (not its last),
    its answer the token that followed it in S. Only the answers are scored (y at a query position). Finding the
    answer needs two hops that one attention layer cannot chain: find the earlier copy of the query, then read the
    token *after* it; a position only knows its predecessor after an earlier layer has copied it there
    (a previous-token head). Chance for a model without that: ``induction_chance``.
    """
    check_int("max_len", max_len, 2)
    check_int("min_len", min_len, 2)
    if not min_len <= max_len <= min(vocab_size, seq_len - 2):
        raise ValueError(f"need 2 <= min_len <= max_len <= min(vocab_size, seq_len - 2), got min_len={min_len}, "
                         f"max_len={max_len}, vocab_size={vocab_size}, seq_len={seq_len}")
    B, T = batch_size, seq_len
    P = torch.randint(min_len, max_len + 1, (B, 1), generator=generator)                   # (B, 1) length of S
    S = torch.rand(B, vocab_size, generator=generator).argsort(dim=1)[:, :max_len]          # (B, max_len) distinct
    n_pairs = (T + 1) // 2
    query = (torch.rand(B, n_pairs, generator=generator) * (P - 1)).long()                 # (B, n) index in 0..P-2
    pairs = torch.stack([query, query + 1], dim=-1).flatten(1)                             # (B, 2n) q, answer
    t = torch.arange(T + 1)
    k = t[None, :] - P                                                                     # (B, T+1) index into pairs
    src = torch.where(k < 0, t[None, :].clamp(max=max_len - 1), pairs.gather(1, k.clamp(0, 2 * n_pairs - 1)))
    seq = S.gather(1, src)                                                                 # (B, T+1)
    x, y = seq[:, :-1], seq[:, 1:].clone()
    scored = (k[:, :-1] >= 0) & (k[:, :-1] % 2 == 0)                                       # x is a query
    y[~scored] = -100
    return x, y


def induction_chance(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(loss in nats, accuracy) of the best guess without induction on ``induction_batch`` rows x, y (B, T):
    uniform over the tokens of S that can be an answer (all but S's first, since an answer follows something)
    except the query itself. Averaged over scored positions."""
    B, T = x.shape
    seen = (x[:, :, None] == x[:, None, :]).tril(-1).any(-1)                               # (B, T) a repeat
    P = seen.float().argmax(dim=1)                                                         # (B,) first repeat = len(S)
    first = x[:, 0]                                                                        # (B,)
    n_cand = (P[:, None] - 1 - (x != first[:, None]).long()).float()                       # (B, T)
    n_cand = n_cand[y != -100]
    return n_cand.log().mean().item(), n_cand.reciprocal().mean().item()


@torch.no_grad()
def loss_and_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean loss (nats) and top-1 accuracy of ``model`` on the scored positions (y != -100) of x, y (B, T)."""
    was_training = model.training
    model.eval()
    dev = model_device(model)
    x, y = x.to(dev), y.to(dev)
    logits, loss = model(x, y)
    scored = y != -100
    acc = (logits.argmax(-1)[scored] == y[scored]).float().mean().item()
    model.train(was_training)
    return loss.item(), acc


def head_scores(maps: list[torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two attention patterns per layer and head, from ``attention_maps`` (each (B, H, T, T)) on rows x (B, T):

    previous-token score: mean weight a query puts on the position just before it;
    induction score: mean weight a query that repeats an earlier token puts on the position right *after* that
    earlier copy (where the answer sits). Returns two (n_layer, H) tensors in [0, 1].
    """
    W = torch.stack(maps)                                                                  # (L, B, H, T, T)
    x = x.to(W.device)
    T = x.shape[1]
    prev = W.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(1, 3))                        # (L, H)
    same = (x[:, :, None] == x[:, None, :]).tril(-1)                                       # (B, T, T) j < i, same token
    target = torch.zeros_like(same)
    target[:, :, 1:] = same[:, :, :-1]                                                     # j+1 where x[j] == x[i]
    target &= torch.ones(T, T, dtype=torch.bool, device=W.device).tril()                                    # visible only
    rows = target.any(-1)                                                                  # (B, T) has a target
    mass = (W * target[None, :, None]).sum(-1)                                             # (L, B, H, T)
    ind = (mass * rows[None, :, None]).sum(dim=(1, 3)) / rows.sum()                        # (L, H)
    return prev, ind
