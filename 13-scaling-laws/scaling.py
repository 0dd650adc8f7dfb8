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

from shared.model import GPTConfig, model_device
from shared.validate import check_int


def config(d_model: int, n_layer: int, n_head: int, vocab_size: int, seq_len: int) -> GPTConfig:
    """The sweep's recipe: a shared Llama-shaped GPT (RoPE, RMSNorm, SwiGLU, tied embeddings) of this shape."""
    for name, value in (("d_model", d_model), ("n_layer", n_layer), ("n_head", n_head),
                        ("vocab_size", vocab_size), ("seq_len", seq_len)):
        check_int(name, value, 1)
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
    check_int("n_tokens", n_tokens, 1)
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
    dev = model_device(model)
    x, y = x.to(dev), y.to(dev)
    backends = [SDPBackend.MATH] if math_attention else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(backends), FlopCounterMode(display=False) as counter:
        _, loss = model(x, y)
        loss.backward()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------------------
# Fits
@dataclass
class LossFit:
    """L(N) = E + A * N^-alpha (E = 0 for the pure power law). `predict(n)` evaluates it. `on_bound` names the
    fitted parameters that ended on a bound of the fit (a value there is the bound's, not the data's);
    `E_fixed` is True when E was given, not fitted."""
    E: float
    A: float
    alpha: float
    floor: bool
    on_bound: tuple = ()
    E_fixed: bool = False

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


def fit_loss_curve(n, loss, floor: bool = True, E: float | None = None) -> LossFit:
    """Least-squares fit of L(N) = E + A·N^-alpha (floor=True) or A·N^-alpha (floor=False) to points (n_i, loss_i).

    Free E: fitted in the variable log N (A is parametrised as exp(a + alpha·log n_ref) around the geometric-mean
    size so the parameters are of order 1); E is bounded to [0, min(loss)), alpha to [0, 3]; residuals in loss
    units for both forms. Parameters that end on a bound are listed in `on_bound`.
    Fixed E (`E=` a known floor, e.g. the corpus's entropy rate): a straight line through log(L - E) vs log N
    (ordinary least squares, i.e. relative errors on the excess), every loss must lie above E.
    """
    n, loss = _check_points(n, loss)
    if E is not None:
        if not floor:
            raise ValueError("E is given but floor=False: a fixed E needs the floor form")
        if isinstance(E, bool) or not isinstance(E, (int, float, np.floating)) or not math.isfinite(E) or E < 0:
            raise ValueError(f"E must be a finite number >= 0, got {E!r}")
        if np.any(loss <= E):
            raise ValueError(f"every loss must lie above the fixed E = {E}, the lowest is {loss.min()}")
        slope, intercept = np.polyfit(np.log(n), np.log(loss - E), 1)
        return LossFit(E=float(E), A=float(math.exp(intercept)), alpha=float(-slope), floor=True, E_fixed=True)
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
    tol = 1e-4 * loss.min()                                   # "on a bound": within 0.01 % of the loss scale
    on_bound = tuple(name for name, hit in (
        ("E", floor and (E <= tol or E >= loss.min() - tol)),
        ("alpha", alpha <= 1e-6 or alpha >= 3 - 1e-6)) if hit)
    return LossFit(E=float(E), A=float(A), alpha=float(alpha), floor=floor, on_bound=on_bound)


def bootstrap_fit(n, loss, n_boot: int = 200, seed: int = 0, floor: bool = True,
                  min_sizes: int = 4, E: float | None = None) -> list[LossFit]:
    """Refit on `n_boot` resamples (with replacement) of the (size, loss) points; resamples with fewer than
    `min_sizes` distinct sizes are drawn again. Spread of the returned fits' alpha/E = the fit's uncertainty."""
    n, loss = _check_points(n, loss)
    check_int("n_boot", n_boot, 1)
    if not 3 <= min_sizes <= len(np.unique(n)):
        raise ValueError(f"min_sizes must be in [3, {len(np.unique(n))}] (distinct sizes), got {min_sizes}")
    rng = np.random.default_rng(seed)
    fits = []
    while len(fits) < n_boot:
        i = rng.integers(0, len(n), len(n))
        if len(np.unique(n[i])) >= min_sizes:
            fits.append(fit_loss_curve(n[i], loss[i], floor=floor, E=E))
    return fits


# ----------------------------------------------------------------------------------------------------------
# Units
def nats_per_token_to_bits_per_char(loss: float, n_tokens: int, n_chars: int) -> float:
    """A loss in nats per predicted token over a stream of n_tokens tokens and n_chars characters -> bits/char."""
    check_int("n_tokens", n_tokens, 1)
    check_int("n_chars", n_chars, 1)
    return loss * n_tokens / n_chars / math.log(2)


def bits_per_char_to_nats_per_token(bpc: float, n_tokens: int, n_chars: int) -> float:
    """The inverse of `nats_per_token_to_bits_per_char`."""
    check_int("n_tokens", n_tokens, 1)
    check_int("n_chars", n_chars, 1)
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
    dev = model_device(model)
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
        with torch.no_grad():
            logits, _ = model(x.to(dev))
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y.to(dev), ignore_index=-100,
                                                reduction="none").cpu()
        out.extend(nll[j, :len(c)] for j, c in enumerate(chunk))
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------------------
# Loss at several token counts from one run: warm-up, stable, decay (WSD) with cooldown branches
def wsd_lr(step: int, end: int, lr: float, warmup: int, cooldown: float = 0.2) -> float:
    """Learning rate at `step` (0-based) of a warm-up-stable-decay run of `end` steps.

    Linear warm-up over `warmup` steps, constant `lr`, then the last round(cooldown·end) steps decay linearly
    (to lr / n_decay at the last step). Unlike a cosine, the rate until the decay does not depend on `end`: a
    run to D tokens and a longer run share their first end - n_decay steps exactly, so one long run can branch
    off an honest (fully cooled) run of every shorter length.
    """
    n_decay = max(1, round(cooldown * end))
    start = end - n_decay
    if not 0 <= step < end:
        raise ValueError(f"step must be in [0, {end}), got {step}")
    if step < warmup:
        return lr * (step + 1) / warmup
    if step < start:
        return lr
    return lr * (end - step) / n_decay


@dataclass
class WSDRun:
    """What `train_wsd` measured. cooled[S]: evaluate() after a full WSD run of S steps (a branch, or the main
    run for the last S); uncooled[S]: evaluate() of the main run at step S, still at constant rate (no decay); seconds: time in training steps (process CPU seconds on the
    CPU, synchronised wall seconds on CUDA)."""
    cooled: dict
    uncooled: dict
    train_loss: list
    seconds: float


def train_wsd(model, tokens: torch.Tensor, evaluate, *, ends, batch_size: int, seq_len: int, lr: float,
              warmup: int | None = None, cooldown: float = 0.2, weight_decay: float = 0.1,
              grad_clip: float | None = 1.0, seed: int = 0, betas=(0.9, 0.95),
              mid_run: bool = True, probes=()) -> WSDRun:
    """Train `model` in place for max(ends) steps with a WSD schedule; branch a cooldown for every shorter end.

    Each branch starts from a copy of the model, the AdamW state and the batch generator at step
    S - round(cooldown·S) and decays to step S: it is, step for step, the run a fresh WSD training of S steps
    would do (same batches, same rates), at the cost of its decay steps only. `evaluate(model) -> float` is
    called on every branch's end (cooled) and, if `mid_run`, on the main run as it passes each shorter end
    (uncooled; `mid_run=False` skips those evaluations, which change nothing else). `probes`: further steps at
    which the main run is evaluated (uncooled, stored in `run.uncooled` too; they change nothing else).
    Batches: random windows (B, seq_len) of `tokens` from a generator seeded with `seed`, as `shared.train` draws
    them; AdamW with decay on matrices only (`shared.train.make_optimizer`).
    """
    import copy
    import time

    from shared.data import random_windows
    from shared.train import make_optimizer, train_step

    if not callable(evaluate):
        raise TypeError(f"evaluate must be a callable model -> float, got {type(evaluate).__name__}")
    ends = sorted({check_int("each of ends", e, 1) for e in ends})
    if not ends:
        raise ValueError("ends must hold at least one step count")
    if not isinstance(mid_run, bool):
        raise TypeError(f"mid_run must be a bool, got {type(mid_run).__name__}")
    if not 0 < cooldown < 1:
        raise ValueError(f"cooldown must be a fraction in (0, 1), got {cooldown}")
    last = ends[-1]
    probes = {check_int("each of probes", p, 1) for p in probes}
    if any(p >= last for p in probes):
        raise ValueError(f"probes must lie before the last end {last}, got {sorted(probes)}")
    warmup = max(1, last // 20) if warmup is None else warmup
    forks = {e - max(1, round(cooldown * e)): e for e in ends[:-1]}
    if min(forks, default=warmup) < warmup:
        raise ValueError(f"every branch must start after the warm-up ({warmup} steps): shortest end {ends[0]} "
                         f"with cooldown {cooldown} forks at step {min(forks)}")

    dev = model_device(model)                              # branches are copies of the model: the same device
    on_gpu = dev.type == "cuda"

    def _sync(m):                                          # a GPU runs asynchronously: wait before the clock
        if on_gpu:
            torch.cuda.synchronize()

    # on the CPU the process's CPU time (a loaded machine stretches wall time, not the work); on a GPU wall time
    clock = time.perf_counter if on_gpu else time.process_time

    def step_once(m, opt, g, step, end):
        for group in opt.param_groups:
            group["lr"] = wsd_lr(step, end, lr, warmup, cooldown)
        x, y = random_windows(tokens, seq_len, batch_size, g)
        return train_step(m, opt, x.to(dev), y.to(dev), grad_clip)             # the shared optimizer step

    opt = make_optimizer(model, lr, weight_decay, betas)
    g = torch.Generator().manual_seed(seed)
    run, losses, seconds = WSDRun({}, {}, [], 0.0), [], 0.0
    model.train()
    for step in range(last):
        if step in forks:                                  # branch: copy model, optimizer state and data stream
            end = forks[step]
            m2 = copy.deepcopy(model)
            opt2 = make_optimizer(m2, lr, weight_decay, betas)
            opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
            g2 = torch.Generator()
            g2.set_state(g.get_state())
            t0 = clock()
            for s in range(step, end):
                step_once(m2, opt2, g2, s, end)
            _sync(m2)
            seconds += clock() - t0
            run.cooled[end] = float(evaluate(m2))
            model.train()
        if (mid_run and step in ends and step < last - max(1, round(cooldown * last)) + 1) or step in probes:
            run.uncooled[step] = float(evaluate(model))    # main run at step S, still at the constant rate
            model.train()
        t0 = clock()
        losses.append(step_once(model, opt, g, step, last))
        _sync(model)
        seconds += clock() - t0
    run.cooled[last] = float(evaluate(model))
    run.train_loss = torch.stack(losses).cpu().tolist()
    run.seconds = seconds
    return run


# ----------------------------------------------------------------------------------------------------------
# Memory of one training step
def training_memory(cfg: GPTConfig, batch_size: int) -> dict[str, int]:
    """Bytes a training step holds at its peak (fp32, AdamW), by formula, for (batch_size, cfg.block_size) windows.

    `params`, `grads` (one per parameter), `adam` (exp_avg and exp_avg_sq: two per parameter) count every
    parameter (embedding included). `activations` = what autograd saves for the backward pass, per token:
    L·(10·C + 4·d_ff + H + 2) + 3·C + 1 + V floats (per layer: ten C-wide tensors (the residual stream, the two
    norm outputs and their 2-D copies for the matmuls, q and k after RoPE, v, the merged heads), four d_ff-wide
    ones (gate, up, SiLU(gate), their product), the attention log-sum-exp per head and the two norms' 1/rms;
    after the blocks the final norm's input, output and 2-D copy and its 1/rms, and the V log-probabilities),
    plus 16 bytes per token of int64 inputs and targets, the cached RoPE cos/sin tables and the loss's scalar
    weight. `transient`: 3·V floats per token alive at the start of backward, the (B, T, V) logits the caller
    still holds and the two gradients of that size the loss's backward makes (w.r.t. the log-probabilities
    and the logits); at this vocabulary and width they are a large share of the peak.
    """
    cfg = _check_cfg(cfg)
    check_int("batch_size", batch_size, 1)
    C, H, L, V, T = cfg.d_model, cfg.n_head, cfg.n_layer, cfg.vocab_size, cfg.block_size
    if cfg.n_kv_head != cfg.n_head:
        raise ValueError("the activation count covers plain multi-head attention (n_kv_head == n_head)")
    n_params = matrix_params(cfg) + (2 * L + 1) * C + V * C
    tokens = batch_size * T
    per_token = L * (10 * C + 4 * cfg.d_ff + H + 2) + 3 * C + 1 + V
    rope_rows = 1 << max(8, (T - 1).bit_length())           # shared.model's cached table (grows by doubling)
    return {"params": 4 * n_params, "grads": 4 * n_params, "adam": 8 * n_params,
            "activations": 4 * per_token * tokens + 16 * tokens + 2 * 4 * rope_rows * cfg.head_dim + 4,
            "transient": 3 * 4 * V * tokens}


def saved_tensor_bytes(model, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in `model(x, y)` (parameters left out).

    The measurement `training_memory`'s activation formula is checked against: counted by a
    `torch.autograd.graph.saved_tensors_hooks` pack hook, each storage once.
    """
    if x.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"x and y must be (B, T) of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    dev = model_device(model)
    x, y = x.to(dev), y.to(dev)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y)
    return sum(seen.values())


# ----------------------------------------------------------------------------------------------------------
# L(D) and IsoFLOP slices
def loss_at_tokens(d_points, losses, d: float) -> float:
    """L at d tokens, interpolated linearly in log D between the two measured points around it (no extrapolation).

    d_points: increasing token counts with a measured (honest, fully trained) loss each."""
    d_points, losses = np.asarray(d_points, dtype=float), np.asarray(losses, dtype=float)
    if d_points.ndim != 1 or d_points.shape != losses.shape or len(d_points) < 2 or np.any(np.diff(d_points) <= 0):
        raise ValueError("d_points must be 1-D, increasing, >= 2 points, one loss each")
    if not d_points[0] <= d <= d_points[-1]:
        raise ValueError(f"d = {d:g} is outside the measured range [{d_points[0]:g}, {d_points[-1]:g}]")
    return float(np.interp(np.log(d), np.log(d_points), losses))


@dataclass
class IsoFLOPFit:
    """A parabola L = a·(log N)^2 + b·log N + c through an IsoFLOP slice; `n_opt` at its minimum."""
    a: float
    b: float
    c: float

    @property
    def n_opt(self) -> float:
        return float(np.exp(-self.b / (2 * self.a))) if self.a > 0 else float("nan")

    def predict(self, n) -> np.ndarray:
        x = np.log(np.asarray(n, dtype=float))
        return self.a * x ** 2 + self.b * x + self.c


def fit_isoflop(n, loss) -> IsoFLOPFit:
    """Least-squares parabola in log N through the (N, L) points of one compute budget (Chinchilla approach 2).
    A minimum exists only if the parabola opens upward (a > 0); `n_opt` is NaN otherwise."""
    n, loss = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)
    if n.ndim != 1 or n.shape != loss.shape or len(np.unique(n)) < 3 or np.any(n <= 0):
        raise ValueError("need >= 3 distinct sizes N > 0, one loss each")
    a, b, c = np.polyfit(np.log(n), loss, 2)
    return IsoFLOPFit(float(a), float(b), float(c))


def isoflop_minimum(n, loss, half_width: int = 2) -> dict:
    """The minimum of one IsoFLOP slice, fitted locally (Chinchilla approach 2 near its optimum).

    n, loss: the slice's sizes (increasing) and losses. The best sampled size must have a sampled size on each
    side (`bracketed`); the parabola in log N is then fitted by least squares to it and up to `half_width`
    neighbours on each side (a slice spanning decades of N is not one parabola: its far, under-trained points
    would set the vertex). `interior` is True if the parabola opens upward and its vertex lies strictly inside
    the window's sizes. Returns {best, bracketed, window (i0, i1), fit (None unless bracketed), n_opt, interior}.
    """
    check_int("half_width", half_width, 1)
    n, loss = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)
    if n.ndim != 1 or n.shape != loss.shape or len(n) < 3 or np.any(np.diff(n) <= 0) or np.any(n <= 0):
        raise ValueError(f"n must be >= 3 increasing sizes > 0 with one loss each, got n={n.tolist()}")
    best = int(np.argmin(loss))
    out = dict(best=best, bracketed=0 < best < len(n) - 1, window=None, fit=None, n_opt=float("nan"),
               interior=False)
    if out["bracketed"]:
        i0, i1 = max(0, best - half_width), min(len(n), best + half_width + 1)
        fit = fit_isoflop(n[i0:i1], loss[i0:i1])
        out.update(window=(i0, i1 - 1), fit=fit, n_opt=fit.n_opt,
                   interior=bool(fit.a > 0 and n[i0] < fit.n_opt < n[i1 - 1]))
    return out


def measure_training_peaks(widths, vocab_size: int, seq_len: int, batch_size: int, n_layer: int = 1) -> dict:
    """Peak growth of resident memory (bytes) over building each width's model and three AdamW training steps.

    Meant to run in a FRESH process (`python -c`): a long-lived process's heap history adds tens of MB of noise
    to RSS. Big allocations are served by mmap (`shared.bench.large_allocations_from_os`) so freed tensors leave
    RSS; one warm-up model trains first, so first-call allocations are not charged to the first width.
    Returns {width: bytes}.
    """
    from shared import bench
    from shared.model import GPT
    from shared.train import make_optimizer

    bench.large_allocations_from_os()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)      # (B, T) inputs
    y = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)      # (B, T) targets

    def three_steps(cfg):
        torch.manual_seed(0)
        model = GPT(cfg)
        opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
        for _ in range(3):
            logits, loss = model(x, y)                 # the caller holds the logits through backward, as train does
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    three_steps(config(32, n_layer, 2, vocab_size, seq_len))
    peaks = {}
    for w in widths:
        with bench.PeakRSS() as peak:
            three_steps(config(w, n_layer, max(1, w // 16), vocab_size, seq_len))
        peaks[w] = peak.peak_growth
    return peaks
