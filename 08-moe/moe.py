"""A sparse mixture-of-experts (MoE) feed-forward layer, from scratch, for the shared GPT.

One MoE layer replaces a block's MLP: a linear *router* scores every token against `E` experts (SwiGLU MLPs of
width `d_ff`), each token goes to its `top_k` best experts, and the experts' outputs are summed with the
router's (renormalised) softmax weights. Only `top_k` of the `E` experts run per token: the layer holds `E` times
the parameters of one expert but spends the FLOPs of `top_k`.

- `route`: softmax over experts -> top-k -> renormalised weights (Mixtral's router).
- `MoE`: the layer; three dispatches that compute the same function: `sparse` (tokens gathered per expert,
  results scattered back with `index_add_`), `dense` (every expert on every token, zero weight outside the top-k:
  the reference), `loop` (a Python loop over tokens: the brute force). Optional capacity factor: an expert takes
  at most `capacity(...)` tokens per batch, the overflow is dropped (its MoE output is zero; the residual passes).
- `load_balancing_loss` (Switch/GShard) and `router_z_loss` (ST-MoE); `MoEGPT` adds them to the training loss.
- `to_mixtral`: export an `MoEGPT` to `transformers.MixtralForCausalLM` (weights copied, fused expert layout).
- `flops_per_token`: training FLOPs per token by formula (tests check it against `FlopCounterMode`).
- `usage_entropy`, `mutual_information`: routing statistics.

Shapes: B batch, T tokens, C = d_model, N = B*T flattened tokens, E experts, k = top_k, F = d_ff per expert.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.model import GPT, GPTConfig, MLP, load_weights, model_device
from shared.hf import llama_config_kwargs
from shared.validate import check_int

DISPATCHES = ("sparse", "dense", "loop")


def _check_moe_args(d_model, d_ff, n_experts, top_k, capacity_factor, dispatch) -> None:
    for name, value in (("d_model", d_model), ("d_ff", d_ff), ("n_experts", n_experts), ("top_k", top_k)):
        check_int(name, value, 1)
    if top_k > n_experts:
        raise ValueError(f"top_k must be <= n_experts ({n_experts}), got {top_k}")
    if capacity_factor is not None and (isinstance(capacity_factor, bool) or
                                        not isinstance(capacity_factor, (int, float)) or capacity_factor <= 0):
        raise ValueError(f"capacity_factor must be a positive number or None, got {capacity_factor!r}")
    if dispatch not in DISPATCHES:
        raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")


def _check_router_scale(router_scale) -> None:
    """router_scale s multiplies the router logits, and the router weights start s times smaller (the same logits at
    init). Under Adam (whose step is invariant to the gradient's scale) the weights move at the same per-element
    speed, so the logits move s times faster: a router learning rate s times the rest's."""
    if isinstance(router_scale, bool) or not isinstance(router_scale, (int, float)) or not router_scale > 0:
        raise ValueError(f"router_scale must be a positive number, got {router_scale!r}")


# ----------------------------------------------------------------------------------------------------------
# Routing and the auxiliary losses
def route(logits: torch.Tensor, top_k: int, renormalize: bool = True):
    """Router logits (N, E) -> probs (N, E) softmax, weights (N, k), experts (N, k) long.

    The k largest probabilities of each token, renormalised to sum to 1 (Mixtral). Without renormalisation the
    weights are the raw probabilities (Switch's top-1 gate: with k = 1 and renormalisation the weight is always
    1 and the router gets no gradient from the language-model loss)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, E), got shape {tuple(logits.shape)}")
    check_int("top_k", top_k, 1)
    if top_k > logits.shape[1]:
        raise ValueError(f"top_k must be <= n_experts ({logits.shape[1]}), got {top_k}")
    probs = logits.float().softmax(dim=-1)                          # (N, E)
    weights, experts = probs.topk(top_k, dim=-1)                     # (N, k) each, best first
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights.to(logits.dtype), experts


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch/GShard balancing loss E * sum_e f_e * P_e (a scalar; 1.0 when routing is uniform).

    f_e: fraction of the N*k token->expert assignments that went to expert e (not differentiable);
    P_e: mean router probability of expert e (carries the gradient). Minimised, it pushes probability mass
    away from over-used experts. Equals transformers' `load_balancing_loss_func` / top_k for one layer."""
    if probs.dim() != 2 or experts.dim() != 2 or probs.shape[0] != experts.shape[0]:
        raise ValueError(f"probs (N, E) and experts (N, k) must agree, got {tuple(probs.shape)}, {tuple(experts.shape)}")
    counts = torch.bincount(experts.reshape(-1), minlength=n_experts).to(probs.dtype)   # (E,)
    f = counts / experts.numel()
    P = probs.mean(dim=0)
    return n_experts * (f * P).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small (stable softmax)."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def capacity(n_tokens: int, n_experts: int, top_k: int, factor: float) -> int:
    """Slots per expert: ceil(factor * n_tokens * top_k / n_experts) (factor 1 = exactly a uniform share)."""
    return math.ceil(factor * n_tokens * top_k / n_experts)


# ----------------------------------------------------------------------------------------------------------
class MoE(nn.Module):
    """Top-k mixture of SwiGLU experts: forward(x (B, T, C)) -> (B, T, C).

    Parameters: `router.weight` (E, C); experts stacked as `w_gate`, `w_up` (E, F, C) and `w_down` (E, C, F):
    expert e computes w_down[e] @ (silu(w_gate[e] @ x) * (w_up[e] @ x)).
    After each forward: `aux_loss` (balancing) and `z_loss` (tensors, differentiable), `last_logits` (N, E),
    `last_experts` (N, k), `last_counts` (E,) assignments per expert, `last_dropped` assignments dropped for
    capacity (int). In training mode with `log_usage`, `usage_log` gets one (E,) count vector per forward.
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int = 2, *, renormalize: bool = True,
                 capacity_factor: float | None = None, dispatch: str = "sparse", init_std: float = 0.02,
                 down_std: float | None = None, router_scale: float = 1.0):
        super().__init__()
        _check_moe_args(d_model, d_ff, n_experts, top_k, capacity_factor, dispatch)
        _check_router_scale(router_scale)
        self.router_scale = float(router_scale)
        self.d_model, self.d_ff, self.n_experts, self.top_k = d_model, d_ff, n_experts, top_k
        self.renormalize, self.capacity_factor, self.dispatch = renormalize, capacity_factor, dispatch
        E, Fd, C = n_experts, d_ff, d_model
        self.router = nn.Linear(C, E, bias=False)
        self.w_gate = nn.Parameter(torch.randn(E, Fd, C) * init_std)
        self.w_up = nn.Parameter(torch.randn(E, Fd, C) * init_std)
        self.w_down = nn.Parameter(torch.randn(E, C, Fd) * (init_std if down_std is None else down_std))
        nn.init.normal_(self.router.weight, std=init_std / self.router_scale)   # the same logits at init, any scale
        self.log_usage = False
        self.usage_log: list[torch.Tensor] = []
        self.aux_loss = self.z_loss = None
        self.last_logits = self.last_experts = self.last_counts = None
        self.last_dropped = 0

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU on x (..., C) -> (..., C)."""
        return F.linear(F.silu(F.linear(x, self.w_gate[e])) * F.linear(x, self.w_up[e]), self.w_down[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (B, T, {self.d_model}), got shape {tuple(x.shape)}")
        B, T, C = x.shape
        flat = x.reshape(-1, C)                                       # (N, C)
        logits = self.router(flat)                                    # (N, E)
        if self.router_scale != 1.0:
            logits = logits * self.router_scale                       # a "hot" router (see _check_router_scale)
        probs, weights, experts = route(logits, self.top_k, self.renormalize)
        self.aux_loss = load_balancing_loss(probs, experts, self.n_experts)
        self.z_loss = router_z_loss(logits)
        keep = self._capacity_mask(experts)                          # (N, k) bool
        self.last_logits, self.last_experts = logits.detach(), experts
        self.last_counts = torch.bincount(experts.reshape(-1), minlength=self.n_experts)
        self.last_dropped = int((~keep).sum()) if keep is not None else 0
        if self.training and self.log_usage:
            self.usage_log.append(self.last_counts.clone())
        if keep is not None:
            weights = weights * keep                                  # a dropped assignment contributes nothing
        out = {"sparse": self._sparse, "dense": self._dense, "loop": self._loop}[self.dispatch](flat, weights, experts)
        return out.reshape(B, T, C)

    def _capacity_mask(self, experts: torch.Tensor) -> torch.Tensor | None:
        """(N, k) True where the assignment fits its expert's capacity; first come (in token order) first served."""
        if self.capacity_factor is None:
            return None
        cap = capacity(experts.shape[0], self.n_experts, self.top_k, self.capacity_factor)
        one_hot = F.one_hot(experts, self.n_experts)                  # (N, k, E)
        # rank of each assignment among those of the same expert, counted over tokens in order (slot-major per token)
        position = one_hot.reshape(-1, self.n_experts).cumsum(dim=0).reshape(one_hot.shape) - 1
        return (position * one_hot).sum(-1) < cap                      # (N, k)

    def _sparse(self, flat, weights, experts):
        """Gather each expert's tokens, run the expert once on them, scatter back with index_add_."""
        out = torch.zeros_like(flat)
        k = self.top_k
        assignment = experts.reshape(-1)                              # (N*k,) expert of each (token, slot)
        order = torch.argsort(assignment, stable=True)                # assignments grouped by expert
        counts = torch.bincount(assignment, minlength=self.n_experts).tolist()
        gate = weights.reshape(-1)[order]                             # (N*k,)
        token = order // k                                            # token of each sorted assignment
        for e, (tok, g) in enumerate(zip(token.split(counts), gate.split(counts))):
            if len(tok):
                out.index_add_(0, tok, self.expert(e, flat[tok]) * g[:, None])
        return out

    def _dense(self, flat, weights, experts):
        """Every expert on every token (E x the FLOPs), mixed by a (N, E) gate that is zero outside the top-k."""
        gate = torch.zeros(flat.shape[0], self.n_experts, dtype=flat.dtype, device=flat.device)
        gate.scatter_add_(1, experts, weights)                         # (N, E)
        h = F.silu(torch.einsum("nc,efc->enf", flat, self.w_gate)) * torch.einsum("nc,efc->enf", flat, self.w_up)
        y = torch.einsum("enf,ecf->enc", h, self.w_down)              # (E, N, C)
        return torch.einsum("enc,ne->nc", y, gate)

    def _loop(self, flat, weights, experts):
        """The brute force: for each token, for each of its k experts, add weight * expert(token)."""
        rows = []
        for n in range(flat.shape[0]):
            y = torch.zeros_like(flat[n])
            for j in range(self.top_k):
                y = y + weights[n, j] * self.expert(int(experts[n, j]), flat[n])
            rows.append(y)
        return torch.stack(rows) if rows else torch.zeros_like(flat)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, n_experts={self.n_experts}, top_k={self.top_k}, "
                f"capacity_factor={self.capacity_factor}, dispatch={self.dispatch!r}, router_scale={self.router_scale}")


def dense_mix(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """sum_e softmax(router(x))_e * expert_e(x), every expert on every token: x (B, T, C) -> (B, T, C).

    The soft mixture a top-k MoE with k = E must equal (renormalising all E probabilities changes nothing)."""
    probs = (moe.router(x) * moe.router_scale).float().softmax(-1).to(x.dtype)                       # (B, T, E)
    return sum(probs[..., e:e + 1] * moe.expert(e, x) for e in range(moe.n_experts))


# ----------------------------------------------------------------------------------------------------------
class MoEGPT(GPT):
    """The shared GPT with an `MoE` in every block (through `mlp_factory`) and the auxiliary losses in its loss.

    forward(idx, targets) -> (logits, loss). In training mode the loss is
    cross-entropy + aux_coef * sum_layers balancing + z_coef * sum_layers z-loss, so `shared.train.train`
    optimises all three; in eval mode (validation) it is the plain cross-entropy. `last_ce` keeps the last
    cross-entropy (detached)."""

    def __init__(self, cfg: GPTConfig, *, n_experts: int, top_k: int = 2, d_ff: int | None = None,
                 aux_coef: float = 0.01, z_coef: float = 1e-3, renormalize: bool = True,
                 capacity_factor: float | None = None, dispatch: str = "sparse", router_scale: float = 1.0):
        d_ff = cfg.d_ff if d_ff is None else d_ff
        _check_router_scale(router_scale)
        _check_moe_args(cfg.d_model, d_ff, n_experts, top_k, capacity_factor, dispatch)
        if aux_coef < 0 or z_coef < 0:
            raise ValueError(f"aux_coef and z_coef must be >= 0, got {aux_coef}, {z_coef}")
        self.aux_coef, self.z_coef = aux_coef, z_coef
        down_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)          # GPT-2's residual scaling, as shared's MLP

        def factory(c, i):
            return MoE(c.d_model, d_ff, n_experts, top_k, renormalize=renormalize, capacity_factor=capacity_factor,
                       dispatch=dispatch, init_std=c.init_std, down_std=down_std, router_scale=router_scale)

        super().__init__(cfg, mlp_factory=factory)
        if router_scale != 1.0:                      # GPT's init reset every Linear: start the hot router's logits cool
            for m in self.moe_layers():
                nn.init.normal_(m.router.weight, std=cfg.init_std / router_scale)
        self.last_ce = None

    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.blocks]

    def set(self, **attrs) -> "MoEGPT":
        """Set attributes on every MoE layer (e.g. capacity_factor=1.0, dispatch='dense', log_usage=True)."""
        for m in self.moe_layers():
            for key, value in attrs.items():
                if not hasattr(m, key):
                    raise ValueError(f"MoE has no attribute {key!r}")
                setattr(m, key, value)
        return self

    def forward(self, idx, targets=None, start_pos: int = 0, caches=None):
        logits, loss = super().forward(idx, targets, start_pos, caches)
        if loss is not None:
            self.last_ce = loss.detach()
            if self.training:
                layers = self.moe_layers()
                loss = (loss + self.aux_coef * sum(m.aux_loss for m in layers)
                        + self.z_coef * sum(m.z_loss for m in layers))
        return logits, loss

    def dropped_fraction(self) -> float:
        """Fraction of token->expert assignments dropped for capacity in the last forward, over all layers."""
        layers = self.moe_layers()
        return sum(m.last_dropped for m in layers) / sum(m.last_experts.numel() for m in layers)


# ----------------------------------------------------------------------------------------------------------
# Export to transformers' Mixtral
def mixtral_config(model: MoEGPT, tokenizer=None):
    """The `MixtralConfig` of an `MoEGPT` (no sliding window, no router jitter)."""
    from transformers import MixtralConfig

    m = model.moe_layers()[0]
    kwargs = {**llama_config_kwargs(model.cfg, tokenizer), "intermediate_size": m.d_ff}   # the experts' width
    return MixtralConfig(
        **kwargs, num_local_experts=m.n_experts, num_experts_per_tok=m.top_k, sliding_window=None,
        router_jitter_noise=0.0, output_router_logits=False, router_aux_loss_coef=model.aux_coef)


def mixtral_state_dict(model: MoEGPT) -> dict[str, torch.Tensor]:
    """Our weights under Mixtral's names; experts fused as gate_up_proj (E, 2F, C) = [w_gate; w_up], down_proj (E, C, F)."""
    ours = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": ours["tok_emb.weight"], "model.norm.weight": ours["norm.weight"]}
    if not model.cfg.tie_embeddings:
        out["lm_head.weight"] = ours["lm_head.weight"]
    for i in range(model.cfg.n_layer):
        a, b = f"blocks.{i}.", f"model.layers.{i}."
        out[b + "input_layernorm.weight"] = ours[a + "norm1.weight"]
        out[b + "post_attention_layernorm.weight"] = ours[a + "norm2.weight"]
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{b}self_attn.{p}.weight"] = ours[f"{a}attn.{p}.weight"]
        out[b + "mlp.gate.weight"] = ours[a + "mlp.router.weight"] * model.blocks[i].mlp.router_scale
        out[b + "mlp.experts.gate_up_proj"] = torch.cat([ours[a + "mlp.w_gate"], ours[a + "mlp.w_up"]], dim=1)
        out[b + "mlp.experts.down_proj"] = ours[a + "mlp.w_down"]
    return out


def to_mixtral(model: MoEGPT, tokenizer=None):
    """A `MixtralForCausalLM` (eval mode, float32) with the weights of an `MoEGPT` copied in.

    Mixtral always renormalises the top-k weights and has no capacity limit: a model routed otherwise is refused."""
    from transformers import MixtralForCausalLM

    if not isinstance(model, MoEGPT):
        raise TypeError(f"model must be an MoEGPT, got {type(model).__name__}")
    cfg, m = model.cfg, model.moe_layers()[0]
    wrong = [f"{k}={getattr(cfg, k)!r} (need {v!r})" for k, v in
             (("pos", "rope"), ("norm", "rms"), ("causal", True)) if getattr(cfg, k) != v]
    if not m.renormalize:
        wrong.append("renormalize=False (Mixtral renormalises the top-k weights)")
    if m.capacity_factor is not None:
        wrong.append(f"capacity_factor={m.capacity_factor} (Mixtral drops no tokens)")
    if wrong:
        raise ValueError("this MoEGPT cannot be exported to Mixtral: " + ", ".join(wrong))
    hf = MixtralForCausalLM(mixtral_config(model, tokenizer))
    load_weights(hf, mixtral_state_dict(model), tied=cfg.tie_embeddings)
    if cfg.tie_embeddings:
        hf.tie_weights()
    return hf.to(model_device(model)).eval()                        # on our model's device, like shared.hf.to_hf


def load_into_hf_block(moe: MoE, block) -> None:
    """Copy an `MoE`'s weights into a transformers `MixtralSparseMoeBlock` (router -> gate, fused experts)."""
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight * moe.router_scale)
        block.experts.gate_up_proj.copy_(torch.cat([moe.w_gate, moe.w_up], dim=1))
        block.experts.down_proj.copy_(moe.w_down)


# ----------------------------------------------------------------------------------------------------------
# FLOPs and routing statistics
def flops_per_token(cfg: GPTConfig, *, seq_len: int, n_experts: int | None = None, top_k: int = 1,
                    d_ff: int | None = None, backward: bool = True) -> int:
    """Matmul FLOPs per token of one forward (+ backward = 2x forward when `backward`) of a GPT.

    2 FLOPs per multiply-add of every weight a token actually uses: attention projections, the MLP (dense: one
    SwiGLU of width cfg.d_ff; MoE: top_k experts of width d_ff, plus the router), the LM head; plus the
    attention core, 2 * 2 * seq_len * C per token per layer (scores and weighted sum over the full window, which
    is what a dense kernel computes; `FlopCounterMode` does not see CPU SDPA, so the tests check the rest)."""
    C, L = cfg.d_model, cfg.n_layer
    attn = 2 * C * (cfg.n_head * cfg.head_dim) * 2 + 2 * C * (cfg.n_kv_head * cfg.head_dim) * 2
    if n_experts is None:
        mlp = 2 * 3 * C * cfg.d_ff
    else:
        mlp = 2 * 3 * C * (cfg.d_ff if d_ff is None else d_ff) * top_k + 2 * C * n_experts
    core = 2 * 2 * seq_len * C
    forward = L * (attn + mlp + core) + 2 * C * cfg.vocab_size
    return forward * (3 if backward else 1)


def usage_entropy(counts: torch.Tensor) -> float:
    """Entropy (nats) of the expert-usage distribution counts (E,): log(E) when balanced, 0 when collapsed."""
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def mutual_information(a: Sequence[int] | torch.Tensor, b: Sequence[int] | torch.Tensor) -> float:
    """Plug-in mutual information I(A; B) in bits between two equal-length integer label sequences."""
    a, b = torch.as_tensor(a, dtype=torch.long), torch.as_tensor(b, dtype=torch.long)
    if a.shape != b.shape or a.dim() != 1 or len(a) == 0:
        raise ValueError(f"a and b must be non-empty 1-D sequences of equal length, got {tuple(a.shape)}, {tuple(b.shape)}")
    if a.min() < 0 or b.min() < 0:
        raise ValueError("labels must be non-negative integers")
    joint = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    joint.index_put_((a, b), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    return float((joint[nz] * (joint[nz] / (pa @ pb)[nz]).log2()).sum())


@torch.no_grad()
def collect_routing(model: MoEGPT, tokens: torch.Tensor, seq_len: int, batch_size: int = 32):
    """Route a 1-D token stream through the model in consecutive windows (eval mode).

    Returns (ids (N,), experts: list over layers of (N, k)): each input token and the experts it went to."""
    if tokens.dim() != 1 or len(tokens) < seq_len:
        raise ValueError(f"tokens must be 1-D with >= seq_len ({seq_len}) entries, got shape {tuple(tokens.shape)}")
    was_training = model.training
    model.eval()
    n = len(tokens) // seq_len
    windows = tokens[: n * seq_len].view(n, seq_len)
    per_layer = [[] for _ in model.moe_layers()]
    dev = model_device(model)
    for i in range(0, n, batch_size):
        model(windows[i:i + batch_size].to(dev))
        for store, m in zip(per_layer, model.moe_layers()):
            store.append(m.last_experts.cpu())                   # results on the CPU, like the ids they pair with
    model.train(was_training)
    return windows.reshape(-1), [torch.cat(s) for s in per_layer]


# ----------------------------------------------------------------------------------------------------------
# A parameter-bound task: a random lookup table (key token -> value token)
def fact_table(n_keys: int, n_values: int, seed: int = 0) -> torch.Tensor:
    """A random table (n_keys,) of values in [0, n_values): fact i says "key i -> value table[i]".

    In a model's vocabulary key i is token i and value v is token n_keys + v. Nothing about one key predicts another
    key's value, so the only way to know the table is to store it: about n_keys * log2(n_values) bits."""
    check_int("n_keys", n_keys, 1)
    check_int("n_values", n_values, 2)
    return torch.randint(0, n_values, (n_keys,), generator=torch.Generator().manual_seed(seed))


def fact_batch(table: torch.Tensor, batch_size: int, generator: torch.Generator):
    """batch_size facts drawn uniformly: x (B, 1) key tokens, y (B, 1) value tokens (n_keys + value)."""
    check_int("batch_size", batch_size, 1)
    if table.dim() != 1 or len(table) == 0:
        raise ValueError(f"table must be a non-empty 1-D tensor, got shape {tuple(table.shape)}")
    keys = torch.randint(0, len(table), (batch_size,), generator=generator)
    return keys[:, None], (len(table) + table[keys])[:, None]


def freeze_random_embeddings(model: GPT, seed: int = 0) -> GPT:
    """Replace the (tied) token embeddings by fixed random vectors (std 1/sqrt(C)) and freeze them.

    Then no key has an embedding of its own to learn: the table must be stored in the blocks (attention on a
    single token is a linear map of it; the MLP is the only non-linear store)."""
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a shared GPT, got {type(model).__name__}")
    w = model.tok_emb.weight
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w.copy_(torch.randn(w.shape, generator=g) * w.shape[1] ** -0.5)
    w.requires_grad_(False)
    return model


@torch.no_grad()
def fact_eval(model: GPT, table: torch.Tensor) -> tuple[float, float]:
    """(bits per fact, accuracy) over the whole table: the cross-entropy of the value given the key, in bits
    (the exact floor is 0: the table is deterministic), and the fraction of keys whose argmax is the value."""
    if table.dim() != 1 or len(table) == 0:
        raise ValueError(f"table must be a non-empty 1-D tensor, got shape {tuple(table.shape)}")
    was_training = model.training
    model.eval()
    dev = model_device(model)
    x = torch.arange(len(table), device=dev)[:, None]
    y = (len(table) + table.to(dev))[:, None]
    logits, loss = model(x, y)
    model.train(was_training)
    return loss.item() / math.log(2), (logits[:, 0].argmax(-1) == y[:, 0]).double().mean().item()
