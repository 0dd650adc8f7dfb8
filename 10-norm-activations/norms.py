"""Normalisation layers and MLP activations written out, and the pieces to ablate them in the shared GPT.

Norms act over the last dim C of x (..., C):
    LayerNorm  (x - mean) / sqrt(var + eps) * weight + bias          (var: biased, over C)
    RMSNorm    x / sqrt(mean(x^2) + eps) * weight                     (no centring, no bias)
    DyT        weight * tanh(alpha * x) + bias                        (Zhu et al. 2025, "Transformers without
                                                                       Normalization": alpha is one learned scalar)
    none       x                                                      (an identity with the same constructor)
Activations (elementwise): relu, relu2 = relu(x)^2, gelu (exact, erf), gelu_tanh (the tanh approximation),
silu = x * sigmoid(x). MLPs: `PlainMLP` down(act(up(x))) and `GLUMLP` down(act(gate(x)) * up(x)) (SwiGLU with
silu, GeGLU with gelu); their projections are named like the shared MLP's (`gate_proj`, `up_proj`, `down_proj`)
so the GPT's init (down_proj scaled by 1/sqrt(2 * n_layer)) treats them the same.

Parameter matching: a plain MLP of width 4C has 2 * C * 4C = 8 C^2 weights; a GLU has three matrices, so width
8/3 * C gives the same 8 C^2. `glu_width` rounds 8/3 * C to the nearest integer (the shared default rounds up to
a multiple of 32 instead, which at C = 64 is 12.5 % more weights).

Placement: the shared `Block` is pre-norm, x + f(norm(x)). `PostNormBlock` is the 2017 Transformer's
norm(x + f(x)); `to_post_norm(model)` swaps it in, reusing each block's modules.

Shapes: B batch, T tokens, C = d_model, F = MLP width.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

import shared
from shared.model import GPT, Block, GPTConfig, model_device
from shared.train import evaluate, train
from shared.validate import check_int

NORMS = ("layer", "rms", "dyt", "none")
ACTS = ("relu", "relu2", "gelu", "gelu_tanh", "silu")
MLPS = ("relu", "relu2", "gelu", "gelu_tanh", "silu", "swiglu", "geglu")
PLACEMENTS = ("pre", "post")


# ----------------------------------------------------------------------------------------------------------
# argument checks, gathered
def _check_choice(name: str, value, allowed: tuple) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {allowed}, got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_gain(gain) -> None:
    if isinstance(gain, bool) or not isinstance(gain, (int, float)):
        raise TypeError(f"alpha_gain must be a float, got {type(gain).__name__}")
    if not (math.isfinite(gain) and gain > 0):
        raise ValueError(f"alpha_gain must be a positive finite float, got {gain!r}")


def _check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if eps < 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite float >= 0, got {eps}")


def _check_tensor(x, dim: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the one normalised)")
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(f"x's last dim must be {dim}, got shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------------------------------------
# Norms: functions (the math), then modules
def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim; var is the biased (1/C) variance."""
    mean = x.mean(dim=-1, keepdim=True)                       # (..., 1)
    var = (x - mean).pow(2).mean(dim=-1, keepdim=True)        # (..., 1)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim: LayerNorm without the centring and the bias."""
    y = x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return y * weight if weight is not None else y


def dyt(x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dynamic Tanh: weight * tanh(alpha * x) + bias. No statistic of x is computed: each element alone."""
    y = torch.tanh(alpha * x)
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


class LayerNorm(nn.Module):
    """`layer_norm` with a learned weight (ones) and bias (zeros) of size C."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        check_int("dim", dim, 1)
        _check_eps(eps)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):                                     # (..., C) -> (..., C)
        return layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """`rms_norm` with a learned weight (ones) of size C."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        check_int("dim", dim, 1)
        _check_eps(eps)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class _Gain(nn.Module):
    """alpha = gain * a, a the trained tensor (a `torch.nn.utils.parametrize` parametrisation)."""

    def __init__(self, gain: float):
        super().__init__()
        self.gain = gain

    def forward(self, a):
        return self.gain * a

    def right_inverse(self, alpha):
        return alpha / self.gain


class DyT(nn.Module):
    """Dynamic Tanh: a learned scalar alpha (init `alpha0`, the paper's default 0.5), weight ones, bias zeros.

    `alpha_gain` g != 1 trains a = alpha / g instead of alpha (`self.alpha` still reads alpha). Adam's step does
    not depend on the gradient's scale, so it moves a by about lr per step and alpha by about g * lr: alpha gets
    g times the learning rate of every other weight, without a separate optimiser parameter group."""

    def __init__(self, dim: int, alpha0: float = 0.5, alpha_gain: float = 1.0):
        super().__init__()
        check_int("dim", dim, 1)
        if isinstance(alpha0, bool) or not isinstance(alpha0, (int, float)) or not alpha0 > 0:
            raise ValueError(f"alpha0 must be a positive float, got {alpha0!r}")
        _check_gain(alpha_gain)
        self.alpha = nn.Parameter(torch.tensor(float(alpha0)))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        if alpha_gain != 1:
            parametrize.register_parametrization(self, "alpha", _Gain(float(alpha_gain)))

    def forward(self, x):
        return dyt(x, self.alpha, self.weight, self.bias)


class NoNorm(nn.Module):
    """The identity, built like a norm (takes `dim`), for the 'no normalisation' runs."""

    def __init__(self, dim: int):
        super().__init__()
        check_int("dim", dim, 1)

    def forward(self, x):
        return x


def make_norm(kind: str, dim: int, eps: float = 1e-5, alpha0: float = 0.5, alpha_gain: float = 1.0) -> nn.Module:
    """One of NORMS as a module over C = dim (`alpha0`, `alpha_gain`: DyT's, ignored by the others)."""
    _check_choice("kind", kind, NORMS)
    if kind == "layer":
        return LayerNorm(dim, eps)
    if kind == "rms":
        return RMSNorm(dim, eps)
    return DyT(dim, alpha0, alpha_gain) if kind == "dyt" else NoNorm(dim)


def norm_factory(kind: str, alpha0: float = 0.5, alpha_gain: float = 1.0) -> Callable[[GPTConfig], nn.Module]:
    """`GPT(cfg, norm_factory=norm_factory("dyt"))`: every norm of the model (blocks and final) of this kind."""
    _check_choice("kind", kind, NORMS)
    if kind == "dyt":
        DyT(1, alpha0, alpha_gain)                             # validates alpha0 now, not at the first build
    return lambda cfg: make_norm(kind, cfg.d_model, cfg.norm_eps, alpha0, alpha_gain)


# ----------------------------------------------------------------------------------------------------------
# Activations and MLPs
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def relu(x):
    return torch.where(x > 0, x, torch.zeros_like(x))


def relu2(x):
    """Squared ReLU (Primer, So et al. 2021)."""
    return relu(x) ** 2


def gelu(x):
    """Exact GELU: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x):
    """GELU's tanh approximation (GPT-2's 'gelu_new'): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)))


def silu(x):
    """SiLU / Swish-1: x * sigmoid(x)."""
    return x * torch.sigmoid(x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": relu, "relu2": relu2, "gelu": gelu, "gelu_tanh": gelu_tanh, "silu": silu}
GLU_ACT = {"swiglu": "silu", "geglu": "gelu"}


def glu_width(d_model: int, plain_width: int | None = None) -> int:
    """GLU width with the weights of a plain MLP of `plain_width` (default 4 * d_model): round(2/3 * plain_width)."""
    check_int("d_model", d_model, 1)
    plain_width = 4 * d_model if plain_width is None else plain_width
    check_int("plain_width", plain_width, 1)
    return max(1, round(2 * plain_width / 3))


def mlp_weights(d_model: int, width: int, gated: bool) -> int:
    """Weights of an MLP without biases: (3 if gated else 2) * d_model * width."""
    return (3 if gated else 2) * d_model * width


class PlainMLP(nn.Module):
    """down(act(up(x))): (B, T, C) -> (B, T, F) -> (B, T, C)."""

    def __init__(self, d_model: int, width: int, act: str = "gelu"):
        super().__init__()
        check_int("d_model", d_model, 1)
        check_int("width", width, 1)
        _check_choice("act", act, ACTS)
        self.act_name, self.act = act, ACTIVATIONS[act]
        self.up_proj = nn.Linear(d_model, width, bias=False)
        self.down_proj = nn.Linear(width, d_model, bias=False)

    def forward(self, x):
        return self.down_proj(self.act(self.up_proj(x)))


class GLUMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with act='silu', GeGLU with act='gelu' (Shazeer 2020)."""

    def __init__(self, d_model: int, width: int, act: str = "silu"):
        super().__init__()
        check_int("d_model", d_model, 1)
        check_int("width", width, 1)
        _check_choice("act", act, ACTS)
        self.act_name, self.act = act, ACTIVATIONS[act]
        self.gate_proj = nn.Linear(d_model, width, bias=False)
        self.up_proj = nn.Linear(d_model, width, bias=False)
        self.down_proj = nn.Linear(width, d_model, bias=False)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def make_mlp(kind: str, d_model: int, width: int | None = None) -> nn.Module:
    """One of MLPS: a plain MLP (width default 4C) or a GLU (width default `glu_width`, parameter-matched)."""
    _check_choice("kind", kind, MLPS)
    if kind in GLU_ACT:
        return GLUMLP(d_model, width or glu_width(d_model), GLU_ACT[kind])
    return PlainMLP(d_model, width or 4 * d_model, kind)


def mlp_factory(kind: str, width: int | None = None) -> Callable[[GPTConfig, int], nn.Module]:
    """`GPT(cfg, mlp_factory=mlp_factory("swiglu"))`: every block's MLP of this kind (parameter-matched width)."""
    _check_choice("kind", kind, MLPS)
    return lambda cfg, layer_idx: make_mlp(kind, cfg.d_model, width)


# ----------------------------------------------------------------------------------------------------------
# Placement
class PostNormBlock(Block):
    """Post-norm (2017 Transformer): x = norm1(x + attn(x)); x = norm2(x + mlp(x)). The norm sits on the stream."""

    def forward(self, x, start_pos: int = 0, cache: dict | None = None):
        x = self.norm1(x + self.drop(self.attn(x, start_pos, cache)))
        return self.norm2(x + self.drop(self.mlp(x)))

    @classmethod
    def from_block(cls, block: Block) -> "PostNormBlock":
        """The same modules (shared, not copied) in the post-norm wiring."""
        if not isinstance(block, Block):
            raise TypeError(f"block must be a shared.model.Block, got {type(block).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.norm1, new.attn, new.norm2, new.mlp, new.drop = block.norm1, block.attn, block.norm2, block.mlp, block.drop
        return new


def to_post_norm(model: GPT) -> GPT:
    """Rewire every block of `model` to post-norm, in place (weights untouched); returns the model.

    The final norm before the LM head stays: with post-norm it normalises an already normalised stream (for
    LayerNorm/RMSNorm it is then nearly a learned per-channel scale)."""
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a shared GPT, got {type(model).__name__}")
    for i, block in enumerate(model.blocks):
        model.blocks[i] = PostNormBlock.from_block(block)
    return model


def norm_modules(model: GPT) -> list[tuple[str, nn.Module]]:
    """Every norm of the model in forward order: (block i norm1, block i norm2 for each block, final norm)."""
    mods = [(f"block {i} {n}", getattr(b, n)) for i, b in enumerate(model.blocks) for n in ("norm1", "norm2")]
    return mods + [("final norm", model.norm)]


def build_gpt(cfg: GPTConfig, norm: str = "rms", mlp: str = "swiglu", placement: str = "pre",
              seed: int = 0, alpha0: float | tuple[float, ...] = 0.5, alpha_gain: float = 1.0) -> GPT:
    """A shared GPT with our norm, MLP and placement, initialised from `seed`. `alpha0`: DyT's initial alpha, one
    float for every norm, or one per norm in `norm_modules` order (2 n_layer + 1 values: a per-layer init).
    `alpha_gain`: DyT's alpha trained at that multiple of the learning rate (see `DyT`)."""
    if not isinstance(cfg, GPTConfig):
        raise TypeError(f"cfg must be a GPTConfig, got {type(cfg).__name__}")
    _check_choice("norm", norm, NORMS)
    _check_choice("mlp", mlp, MLPS)
    _check_choice("placement", placement, PLACEMENTS)
    per_layer = isinstance(alpha0, (list, tuple))
    if per_layer:
        if len(alpha0) != 2 * cfg.n_layer + 1:
            raise ValueError(f"alpha0 needs one value per norm (2 n_layer + 1 = {2 * cfg.n_layer + 1}), got {len(alpha0)}")
        for a in alpha0:
            DyT(1, a)                                          # each must be a positive float
    torch.manual_seed(seed)
    model = GPT(cfg, mlp_factory=mlp_factory(mlp), norm_factory=norm_factory(norm, 1.0 if per_layer else alpha0, alpha_gain))
    if per_layer and norm == "dyt":
        with torch.no_grad():
            for (_, m), a in zip(norm_modules(model), alpha0):
                if parametrize.is_parametrized(m, "alpha"):     # stored as a / gain (the gain's right_inverse)
                    m.alpha = torch.tensor(float(a))
                else:
                    m.alpha.fill_(float(a))
    model = to_post_norm(model) if placement == "post" else model
    return model.to(shared.device())                          # the CPU at the cpu size: built there, moved nowhere


# ----------------------------------------------------------------------------------------------------------
# Looking inside: residual stream, gradients, activations
@torch.no_grad()
def residual_norms(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """RMS of the residual stream (mean over B, T of ||x_t|| / sqrt(C)) after the embedding and after each
    block: a tensor (n_layer + 1,)."""
    idx = idx.to(model_device(model))
    out = []
    hooks = [model.tok_emb.register_forward_hook(lambda m, i, o: out.append(o))]
    hooks += [b.register_forward_hook(lambda m, i, o: out.append(o)) for b in model.blocks]
    was_training = model.training
    model.eval()
    try:
        model(idx)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return torch.stack([x.pow(2).mean(-1).sqrt().mean() for x in out])


def block_grad_norms(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L2 norm of the loss gradient over each block's parameters, from one backward pass: (n_layer,)."""
    dev = model_device(model)
    model.zero_grad(set_to_none=True)
    _, loss = model(idx.to(dev), targets.to(dev))
    loss.backward()
    norms = []
    for b in model.blocks:
        grads = [p.grad for p in b.parameters() if p.grad is not None]
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)) if grads else torch.tensor(0.0, device=dev))
    model.zero_grad(set_to_none=True)
    return torch.stack(norms).detach()


@torch.no_grad()
def mlp_hidden(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    """Per block, the MLP's hidden activation (what `down_proj` reads): a list of (B, T, F)."""
    out = []
    hooks = [b.mlp.down_proj.register_forward_pre_hook(lambda m, i: out.append(i[0])) for b in model.blocks]
    try:
        model(idx.to(model_device(model)))
    finally:
        for h in hooks:
            h.remove()
    return out


@torch.no_grad()
def residual_stream(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The residual stream after the last block (what the final norm reads): (B, T, C)."""
    out = []
    h = model.blocks[-1].register_forward_hook(lambda m, i, o: out.append(o))
    try:
        model(idx.to(model_device(model)))
    finally:
        h.remove()
    return out[0]


def outlier_channels(x: torch.Tensor, factor: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Channels of x (..., C) whose max |value| exceeds `factor` x the median channel's max |value|.

    Returns (indices of the outlier channels, per-channel max |x| (C,)). 'Massive activations' (Sun et al. 2024)
    are such channels, orders of magnitude above the rest: what per-tensor int8 quantisation stumbles on."""
    _check_tensor(x)
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    peak = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0)      # (C,)
    return (peak > factor * peak.median()).nonzero().flatten(), peak


# ----------------------------------------------------------------------------------------------------------
# Runs
@dataclass
class Run:
    norm: str
    mlp: str
    placement: str
    seed: int
    lr: float
    warmup: int
    train_loss: list[float] = field(default_factory=list)
    val_loss: float = float("nan")
    seconds_per_step: float = float("nan")
    params: int = 0

    @property
    def name(self) -> str:
        return f"{self.placement}-{self.norm}-{self.mlp}"


def run(cfg: GPTConfig, train_tokens: torch.Tensor, val_tokens: torch.Tensor, *, norm: str, mlp: str,
        placement: str = "pre", seed: int = 0, steps: int, lr: float, warmup: int | None = None,
        batch_size: int = 16, eval_batches: int = 8, return_model: bool = False,
        alpha0: float | tuple[float, ...] = 0.5, alpha_gain: float = 1.0):
    """Build (seeded) and train one configuration with `shared.train.train`; batches follow the same seed, so
    two configurations with one seed see the same data in the same order. A non-finite loss is kept as is."""
    model = build_gpt(cfg, norm, mlp, placement, seed, alpha0, alpha_gain)
    hist = train(model, train_tokens, None, steps=steps, batch_size=batch_size, seq_len=cfg.block_size, lr=lr,
                 warmup=warmup, seed=seed, progress=False)
    val = evaluate(model, val_tokens, cfg.block_size, batch_size, eval_batches, seed=1)
    warmup = max(1, steps // 20) if warmup is None else warmup        # shared.train's default
    r = Run(norm, mlp, placement, seed, lr, warmup, hist.train_loss, val, hist.seconds / steps, model.num_params())
    return (r, model) if return_model else r


def broke(r: Run, ceiling: float) -> bool:
    """A run failed to train: a non-finite loss, or a final validation loss above `ceiling` (nats/token)."""
    return not math.isfinite(r.val_loss) or r.val_loss > ceiling


def unigram_entropy(tokens: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the tokens' own unigram distribution: what a model with no context reaches."""
    counts = torch.bincount(tokens, minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int = 30, inner: int = 20,
                      clock=time.perf_counter) -> dict[str, torch.Tensor]:
    """Time each callable `inner` times per round, alternating them round after round (so a machine's slow
    moments hit all of them alike): {name: (rounds,) seconds per call}."""
    if not fns:
        raise ValueError("fns must name at least one callable")
    check_int("rounds", rounds, 1)
    check_int("inner", inner, 1)
    out = {k: [] for k in fns}
    for fn in fns.values():
        fn()                                                   # warm-up
    for r in range(rounds):
        order = list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]
        for name, fn in order:
            t0 = clock()
            for _ in range(inner):
                fn()
            out[name].append((clock() - t0) / inner)
    return {k: torch.tensor(v) for k, v in out.items()}


class _Stop(Exception):
    """Raised from `on_step` to end a `shared.train.train` run at the first non-finite loss."""


def _probe(model: GPT, probe: torch.Tensor, probe_targets: torch.Tensor | None) -> dict:
    """One forward (and, with targets, backward) of the probe batch, hooked: the residual-stream RMS after the
    embedding and each block (n_layer + 1,); with targets also each block's MLP hidden activation (what
    `down_proj` reads) and the loss gradient with respect to each block's output, as lists of flat tensors."""
    if probe_targets is None:
        return {"res": residual_norms(model, probe)}
    probe, probe_targets = probe.to(model_device(model)), probe_targets.to(model_device(model))
    streams, hidden = [], []
    hooks = [model.tok_emb.register_forward_hook(lambda m, i, o: streams.append(o))]
    hooks += [b.register_forward_hook(lambda m, i, o: streams.append(o)) for b in model.blocks]
    hooks += [b.mlp.down_proj.register_forward_pre_hook(lambda m, i: hidden.append(i[0].detach()))
              for b in model.blocks]
    was_training = model.training
    model.eval()
    try:
        _, loss = model(probe, probe_targets)
        for t in streams:
            t.retain_grad()
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {"res": torch.stack([t.detach().pow(2).mean(-1).sqrt().mean() for t in streams]),
            "hidden": [h.flatten() for h in hidden],
            "grad": [t.grad.flatten() for t in streams[1:]]}


def train_tracking(model: GPT, train_tokens: torch.Tensor, probe: torch.Tensor, *, steps: int, lr: float,
                   batch_size: int = 16, warmup: int | None = None, every: int = 5, seed: int = 0,
                   probe_targets: torch.Tensor | None = None, keep: tuple[int, ...] = ()) -> dict:
    """Train with `shared.train.train` (its optimizer, schedule, clipping and seeded batches; `on_step` does the
    recording) and look inside on the fixed `probe` batch (B, T) at init and after every `every`-th step; stop at
    the first non-finite training loss.

    Returns {"loss": [per step], "res_step": [0, every, 2 every, ...], "res": (n_records, n_layer + 1) residual
    RMS, "failed_at": step or None}. With `probe_targets` (B, T) also, per record, "hidden_std" and "grad_std"
    (n_records, n_layer): the std of each block's MLP hidden activation and of the loss gradient with respect to
    each block's output; "update_ratio": {matrix name: [per step]} = std(W after - W before) / std(W after) for
    every weight matrix (Karpathy's update:data ratio); and "hist": {step: {"hidden": [...], "grad": [...]}} the
    flat per-block tensors at the steps in `keep` (0 = init)."""
    check_int("steps", steps, 1)
    check_int("every", every, 1)
    if probe_targets is not None and probe_targets.shape != probe.shape:
        raise ValueError(f"probe_targets must have the probe's shape {tuple(probe.shape)}, got {tuple(probe_targets.shape)}")
    out = {"loss": [], "res_step": [], "res": [], "failed_at": None}
    detail = probe_targets is not None
    if detail:
        out.update(hidden_std=[], grad_std=[], hist={}, update_ratio={})
    matrices = {n: p for n, p in model.named_parameters() if p.dim() == 2 and n != "tok_emb.weight"} if detail else {}
    before = {n: p.detach().clone() for n, p in matrices.items()}

    def record(step):
        r = _probe(model, probe, probe_targets)
        out["res_step"].append(step)
        out["res"].append(r["res"])
        if detail:
            out["hidden_std"].append(torch.stack([h.std() for h in r["hidden"]]))
            out["grad_std"].append(torch.stack([g.std() for g in r["grad"]]))
            if step in keep:
                out["hist"][step] = {"hidden": r["hidden"], "grad": r["grad"]}

    def on_step(step, m, loss):
        out["loss"].append(loss.item())
        if not math.isfinite(out["loss"][-1]):
            out["failed_at"] = step
            raise _Stop
        with torch.no_grad():
            for n, p in matrices.items():
                out["update_ratio"].setdefault(n, []).append(((p - before[n]).std() / p.std()).item())
                before[n].copy_(p)
        if (step + 1) % every == 0:
            record(step + 1)

    record(0)
    try:
        train(model, train_tokens, None, steps=steps, batch_size=batch_size, seq_len=model.cfg.block_size, lr=lr,
              warmup=warmup, seed=seed, progress=False, on_step=on_step)
    except _Stop:
        pass
    model.eval()
    for k in ("res", "hidden_std", "grad_std"):                # the records go to the CPU (for numpy, plots)
        if k in out:
            out[k] = torch.stack(out[k]).cpu()
    for step, h in out.get("hist", {}).items():
        out["hist"][step] = {k: [t.cpu() for t in v] for k, v in h.items()}
    return out
