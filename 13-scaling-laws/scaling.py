"""Scaling laws on tiny models: parameter and FLOP accounting, power-law fits with an irreducible term, bootstrap.

The pieces a scaling study needs, small enough to read in one sitting:

- `config(d_model, n_layer, n_head, vocab_size, seq_len)`: the one recipe of shapes the sweep uses (shared GPT).
- `non_embedding_params(cfg)`: N as Kaplan et al. (2020) count it, in closed form (checked against the module).
- `train_flops(cfg, n_tokens)`: training FLOPs of `n_tokens` tokens, split into the terms 6·N·D leaves out
  (the LM head's matmul and attention's score/value products), checked against `FlopCounterMode`.
- `count_step_flops(model, x, y)`: FLOPs of one forward + backward as PyTorch's `FlopCounterMode` counts them.
- `fit_loss_curve(n, loss, floor=True)`: L(N) = E + A·N^-alpha (or the pure power law A·N^-alpha) by least squares.
- `bootstrap_fit(n, loss, ...)`: the fit redone on resampled points, for an uncertainty of alpha and E.
- `nats_per_token_to_bits_per_char` / `bits_per_char_to_nats_per_token`: the unit change that compares a fitted
  E with the corpus's entropy floor.

Shapes: B batch, T tokens per window (seq_len), C = d_model, V vocab, L = n_layer. "FLOPs" are floating-point
operations (a multiply-add is 2), not per second.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import curve_fit
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from shared.model import GPTConfig


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def config(d_model: int, n_layer: int, n_head: int, vocab_size: int, seq_len: int) -> GPTConfig:
    """The sweep's recipe: a shared Llama-shaped GPT (RoPE, RMSNorm, SwiGLU, tied embeddings) of this shape."""
    for name, value in (("d_model", d_model), ("n_layer", n_layer), ("n_head", n_head),
                        ("vocab_size", vocab_size), ("seq_len", seq_len)):
        _positive_int(name, value)
    return GPTConfig(vocab_size=vocab_size, block_size=seq_len, n_layer=n_layer, n_head=n_head, d_model=d_model)


def _check_cfg(cfg) -> GPTConfig:
    if not isinstance(cfg, GPTConfig):
        raise TypeError(f"cfg must be a GPTConfig, got {type(cfg).__name__}")
    if cfg.act != "swiglu" or cfg.pos not in ("rope", "none", "alibi") or not cfg.tie_embeddings or cfg.norm != "rms":
        raise ValueError("the closed forms here cover the sweep's recipe: swiglu, rms norm, tied embeddings, "
                         f"no position table; got act={cfg.act!r} norm={cfg.norm!r} pos={cfg.pos!r} "
                         f"tie_embeddings={cfg.tie_embeddings}")
    return cfg


def matrix_params(cfg: GPTConfig) -> int:
    """Weights of the blocks' matrices only (what multiplies activations): per layer q, k, v, o and SwiGLU's three."""
    cfg = _check_cfg(cfg)
    C, D, K = cfg.d_model, cfg.head_dim, cfg.n_kv_head
    attn = C * C + 2 * C * K * D + C * C                      # q_proj, k_proj + v_proj (GQA-aware), o_proj
    mlp = 3 * C * cfg.d_ff                                    # gate_proj, up_proj, down_proj
    return cfg.n_layer * (attn + mlp)


def non_embedding_params(cfg: GPTConfig) -> int:
    """N: every parameter except the token embedding (= the tied LM head): matrices plus the RMSNorm gains."""
    cfg = _check_cfg(cfg)
    return matrix_params(cfg) + (2 * cfg.n_layer + 1) * cfg.d_model


def train_flops(cfg: GPTConfig, n_tokens: int) -> dict[str, float]:
    """Training FLOPs (forward + backward = 3 x forward) for n_tokens tokens in windows of cfg.block_size.

    Returns the terms: `6ND` (Kaplan's approximation, N = non-embedding params), `lm_head` (6·C·V per token: the
    tied embedding is left out of N but its matmul is real work), `attention` (12·L·T·C per token: Q·K^T and
    weights·V over the full T x T square, as the math kernel computes them; a causal kernel could skip half),
    and `total` = 6·N_matrix·D + lm_head + attention, the matmul FLOPs exactly (norm gains do no matmul).
    """
    cfg = _check_cfg(cfg)
    _positive_int("n_tokens", n_tokens)
    N, T = non_embedding_params(cfg), cfg.block_size
    terms = {"6ND": 6.0 * N * n_tokens,
             "lm_head": 6.0 * cfg.d_model * cfg.vocab_size * n_tokens,
             "attention": 12.0 * cfg.n_layer * T * cfg.d_model * n_tokens}
    terms["total"] = 6.0 * matrix_params(cfg) * n_tokens + terms["lm_head"] + terms["attention"]
    return terms


def count_step_flops(model, x: torch.Tensor, y: torch.Tensor, math_attention: bool = True) -> int:
    """FLOPs of one training step's forward + backward as `torch.utils.flop_counter.FlopCounterMode` counts them.

    x, y: (B, T) token ids. With `math_attention` the attention runs on SDPA's math backend (plain bmm, which the
    counter sees); PyTorch's fused CPU flash kernel is not in the counter's table and would count as 0 FLOPs.
    Gradients are left in the model: zero them before training with it.
    """
    if x.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"x and y must be (B, T) of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    backends = [SDPBackend.MATH] if math_attention else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(backends), FlopCounterMode(display=False) as counter:
        _, loss = model(x, y)
        loss.backward()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------------------
# Fits
@dataclass
class LossFit:
    """L(N) = E + A * N^-alpha (E = 0 for the pure power law). `predict(n)` evaluates it."""
    E: float
    A: float
    alpha: float
    floor: bool

    def predict(self, n) -> np.ndarray:
        return self.E + self.A * np.asarray(n, dtype=float) ** -self.alpha


def _check_points(n, loss) -> tuple[np.ndarray, np.ndarray]:
    n, loss = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)
    if n.ndim != 1 or n.shape != loss.shape:
        raise ValueError(f"n and loss must be 1-D of one length, got shapes {n.shape} and {loss.shape}")
    if len(np.unique(n)) < 3:
        raise ValueError(f"a fit of 3 parameters needs at least 3 distinct sizes, got {len(np.unique(n))}")
    if np.any(n <= 0) or np.any(loss <= 0) or not np.all(np.isfinite(loss)):
        raise ValueError("sizes must be > 0 and losses finite and > 0")
    return n, loss


def fit_loss_curve(n, loss, floor: bool = True) -> LossFit:
    """Least-squares fit of L(N) = E + A·N^-alpha (floor=True) or A·N^-alpha (floor=False) to points (n_i, loss_i).

    Fitted in the variable log N (A is parametrised as exp(a + alpha·log n_ref) around the geometric-mean size so
    the parameters are of order 1); E is bounded to [0, min(loss)), alpha to [0, 3]. Residuals are in loss units
    for both forms, so the two fits are judged by one criterion.
    """
    n, loss = _check_points(n, loss)
    x = np.log(n) - np.log(n).mean()                          # centred log-size: the fit is well conditioned

    if floor:
        def f(x, E, a, alpha):
            return E + np.exp(a - alpha * x)
        p0 = (0.5 * loss.min(), math.log(max(loss.mean() - 0.5 * loss.min(), 1e-3)), 0.5)
        bounds = ([0.0, -20.0, 0.0], [loss.min() * (1 - 1e-9), 20.0, 3.0])
    else:
        def f(x, a, alpha):
            return np.exp(a - alpha * x)
        p0 = (math.log(loss.mean()), 0.3)
        bounds = ([-20.0, 0.0], [20.0, 3.0])
    params, _ = curve_fit(f, x, loss, p0=p0, bounds=bounds, maxfev=20000)
    E, a, alpha = params if floor else (0.0, *params)
    A = math.exp(a + alpha * np.log(n).mean())                # back to A·N^-alpha in raw N
    return LossFit(E=float(E), A=float(A), alpha=float(alpha), floor=floor)


def bootstrap_fit(n, loss, n_boot: int = 200, seed: int = 0, floor: bool = True,
                  min_sizes: int = 4) -> list[LossFit]:
    """Refit on `n_boot` resamples (with replacement) of the (size, loss) points; resamples with fewer than
    `min_sizes` distinct sizes are drawn again. Spread of the returned fits' alpha/E = the fit's uncertainty."""
    n, loss = _check_points(n, loss)
    _positive_int("n_boot", n_boot)
    if not 3 <= min_sizes <= len(np.unique(n)):
        raise ValueError(f"min_sizes must be in [3, {len(np.unique(n))}] (distinct sizes), got {min_sizes}")
    rng = np.random.default_rng(seed)
    fits = []
    while len(fits) < n_boot:
        i = rng.integers(0, len(n), len(n))
        if len(np.unique(n[i])) >= min_sizes:
            fits.append(fit_loss_curve(n[i], loss[i], floor=floor))
    return fits


# ----------------------------------------------------------------------------------------------------------
# Units
def nats_per_token_to_bits_per_char(loss: float, n_tokens: int, n_chars: int) -> float:
    """A loss in nats per predicted token over a stream of n_tokens tokens and n_chars characters -> bits/char."""
    _positive_int("n_tokens", n_tokens)
    _positive_int("n_chars", n_chars)
    return loss * n_tokens / n_chars / math.log(2)


def bits_per_char_to_nats_per_token(bpc: float, n_tokens: int, n_chars: int) -> float:
    """The inverse of `nats_per_token_to_bits_per_char`."""
    _positive_int("n_tokens", n_tokens)
    _positive_int("n_chars", n_chars)
    return bpc * n_chars * math.log(2) / n_tokens


# ----------------------------------------------------------------------------------------------------------
# Where the loss above the floor sits: per-story scoring with the full story as context
def _token_indices(tokenizer, text: str, spans: list[tuple[int, int]]) -> list[int]:
    """Indices of the tokens of `tokenizer(text)` that overlap any character span [lo, hi)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [i for i, (s, e) in enumerate(offsets) if any(s < hi and e > lo for lo, hi in spans)]


def recall_positions(tokenizer, text: str, colour: str, obj: str) -> list[int]:
    """Token indices (in `tokenizer(text)`) of the recalled "<colour> <object>" in a story's last sentence.

    Those tokens are fully determined by the story so far (the generator gives them probability 1), so every bit
    a model spends on them is excess over the entropy floor: the cost of not recalling the planted object.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    start = text.rfind(f" the {colour} {obj}.")
    if start < 0:
        raise ValueError(f"no recall ' the {colour} {obj}.' in the story")
    a = start + len(" the ")
    return _token_indices(tokenizer, text, [(a, a + len(colour)), (a + len(colour) + 1, a + len(colour) + 1 + len(obj))])


def name_repeat_positions(tokenizer, text: str, name: str) -> list[int]:
    """Token indices of the protagonist's name after its first occurrence (the generator writes it as a literal).

    Approximate in one case: a filler's second character ("In the park, Mia met Tom the fox") is drawn at random
    and can, rarely (1 in 24), be the protagonist's own name; that occurrence is counted here too.
    """
    if not isinstance(text, str) or not isinstance(name, str) or not name:
        raise TypeError("text and name must be non-empty str")
    starts, k = [], text.find(name)
    while k >= 0:
        if (k == 0 or not text[k - 1].isalpha()) and not text[k + len(name):k + len(name) + 1].isalpha():
            starts.append(k)
        k = text.find(name, k + 1)
    if not starts:
        raise ValueError(f"name {name!r} not in the story")
    return _token_indices(tokenizer, text, [(k, k + len(name)) for k in starts[1:]])


@torch.no_grad()
def story_token_losses(model, tokenizer, texts: list[str], batch_size: int = 50) -> list[torch.Tensor]:
    """Each story scored as its own sequence after an end-of-text token: a list of (len(ids),) losses in nats.

    Unlike windows cut from a stream, every token sees the whole story before it, as the entropy floor assumes.
    """
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of str")
    eos = tokenizer.eos_token_id
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(ids), batch_size):
        chunk = ids[i:i + batch_size]
        T = max(len(c) for c in chunk)
        x = torch.full((len(chunk), T), eos, dtype=torch.long)          # (B, T): eos, story[:-1], padding
        y = torch.full((len(chunk), T), -100, dtype=torch.long)         # (B, T): story, ignored padding
        for j, c in enumerate(chunk):
            x[j, 1:len(c)] = torch.tensor(c[:-1])
            y[j, :len(c)] = torch.tensor(c)
        logits, _ = model(x)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, ignore_index=-100, reduction="none")
        out.extend(nll[j, :len(c)] for j, c in enumerate(chunk))
    model.train(was_training)
    return out
