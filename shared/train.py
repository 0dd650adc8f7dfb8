"""A small deterministic training loop: AdamW, linear warm-up + cosine decay, gradient clipping, validation.

Works for any module whose `forward(idx, targets)` returns `(logits, loss)`. `train_step` is the one optimizer
step every loop in the repo takes (this file's `train`, and the folders' loops that record something else per
step); `lr_at` is the schedule (warm-up, an optional constant stretch, cosine decay: WSD when `decay_start` is set).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .data import random_windows
from .model import model_device


@dataclass
class History:
    step: list[int] = field(default_factory=list)          # steps at which train_loss/lr were recorded (every step)
    train_loss: list[float] = field(default_factory=list)  # nats/token of that step's batch
    lr: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)    # nats/token, mean over eval_batches fixed windows
    tokens_per_sec: float = 0.0                             # training throughput, evaluation time excluded
    seconds: float = 0.0                                    # wall time of the whole call


def lr_at(step: int, steps: int, lr: float, warmup: int, min_lr_ratio: float, decay_start: int | None = None) -> float:
    """Linear warm-up for `warmup` steps, constant lr until `decay_start` (default: the end of warm-up), then cosine
    decay from lr to lr * min_lr_ratio at the last step. With `decay_start` late this is warm-up/stable/decay (WSD)."""
    start = warmup if decay_start is None else max(warmup, decay_start)
    if step < warmup:
        return lr * (step + 1) / warmup
    if step < start:
        return lr
    progress = (step - start) / max(1, steps - start - 1)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_step(model, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               grad_clip: float | None = 1.0) -> torch.Tensor:
    """One optimizer step on the batch (x, y), both (B, T) on the model's device: forward, backward, clip the global
    gradient norm to `grad_clip` (None or 0: no clipping), step. Returns the batch's loss, detached (a 0-d tensor:
    read it with `.item()` only when needed, each read is a host sync)."""
    _, loss = model(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.detach()


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, seq_len: int, batch_size: int = 32, n_batches: int = 20,
             seed: int = 0) -> float:
    """Mean loss (nats/token) over n_batches windows drawn with a fixed seed, so calls are comparable."""
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    dev = model_device(model)
    losses = []
    for _ in range(n_batches):
        x, y = random_windows(tokens, seq_len, batch_size, g)
        losses.append(model(x.to(dev), y.to(dev))[1])
    model.train(was_training)
    return torch.stack(losses).mean().item()


def make_optimizer(model, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, biases or other 1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=lr, betas=betas)


def _check_train_args(model, train_tokens, steps, lr, batch_size, seq_len) -> int:
    if not (callable(train_tokens) or isinstance(train_tokens, torch.Tensor)):
        raise TypeError(f"train_tokens must be a 1-D token tensor or a callable generator -> (x, y), "
                        f"got {type(train_tokens).__name__}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if lr <= 0 or batch_size < 1:
        raise ValueError(f"lr must be > 0 and batch_size >= 1, got {lr}, {batch_size}")
    if seq_len is None:
        if not hasattr(model, "cfg"):
            raise ValueError("seq_len is required for a model without a `cfg.block_size`")
        seq_len = model.cfg.block_size
    return seq_len


def train(model, train_tokens: torch.Tensor, val_tokens: torch.Tensor | None = None, *, steps: int,
          batch_size: int = 32, seq_len: int | None = None, lr: float = 3e-3, warmup: int | None = None,
          min_lr_ratio: float = 0.1, weight_decay: float = 0.1, grad_clip: float | None = 1.0,
          eval_every: int | None = None, eval_batches: int = 20, seed: int = 0, progress: bool = True,
          betas: tuple[float, float] = (0.9, 0.95), decay_start: int | None = None,
          lr_schedule=None, on_step=None) -> History:
    """Train in place on random windows of `train_tokens`; returns a History.

    `train_tokens` is a 1-D token stream, or a callable `generator -> (x, y)` that makes each batch itself (a
    synthetic task: 02's first-token task, 04's one memorised batch); then `batch_size`/`seq_len` only count
    tokens/s, and the caller's targets may use -100 for positions left out of the loss.
    Deterministic for a given seed and thread count: batches come from a seeded generator, and the model's
    initial weights are whatever the caller built (seed before building it). `seq_len` defaults to the model's
    `cfg.block_size`. Validation (every `eval_every` steps and at the end) uses fixed windows of `val_tokens`.
    The learning rate follows `lr_at` (warm-up, constant until `decay_start`, cosine to `lr * min_lr_ratio`), or
    `lr_schedule(step) -> lr` when given. `on_step(step, model, loss)` runs after each optimizer step (loss: the
    detached 0-d batch loss), e.g. to probe the model every N steps; it must not draw from the batch generator.
    """
    seq_len = _check_train_args(model, train_tokens, steps, lr, batch_size, seq_len)
    for name, fn in (("lr_schedule", lr_schedule), ("on_step", on_step)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
    next_batch = train_tokens if callable(train_tokens) else \
        (lambda gen: random_windows(train_tokens, seq_len, batch_size, gen))
    warmup = max(1, steps // 20) if warmup is None else warmup
    eval_every = eval_every or max(1, steps // 10)
    dev = model_device(model)
    opt = make_optimizer(model, lr, weight_decay, betas)
    g = torch.Generator().manual_seed(seed)
    hist, start, train_time = History(), time.perf_counter(), 0.0
    # Each step's loss is copied into one preallocated tensor: one host sync at the end, not per step. Keeping each
    # step's own loss tensor instead (a list of loss.detach()) grew resident memory on CPU by about the logits'
    # size every step (measured: +5.6 MB/step at 8x256 tokens, vocab 781; ~12 GB over 2400 steps), flat with this.
    losses = torch.empty(steps, device=dev)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="train", leave=False)
    model.train()
    for step in range(steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_schedule(step) if lr_schedule else lr_at(step, steps, lr, warmup, min_lr_ratio, decay_start)
        x, y = next_batch(g)
        loss = train_step(model, opt, x.to(dev), y.to(dev), grad_clip)
        if dev.type == "cuda":
            torch.cuda.synchronize()          # kernels run asynchronously: time the step, not its launch
        train_time += time.perf_counter() - t0
        losses[step] = loss
        if on_step is not None:
            on_step(step, model, loss)
            model.train()
        hist.lr.append(opt.param_groups[0]["lr"])
        if val_tokens is not None and ((step + 1) % eval_every == 0 or step == steps - 1):
            hist.val_step.append(step + 1)
            hist.val_loss.append(evaluate(model, val_tokens, seq_len, batch_size, eval_batches, seed=1))
            model.train()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    hist.step, hist.train_loss = list(range(steps)), losses.tolist()
    hist.tokens_per_sec = steps * x.numel() / max(train_time, 1e-9)
    hist.seconds = time.perf_counter() - start
    return hist


@torch.no_grad()
def evaluate_stream(model, tokens: torch.Tensor, seq_len: int, batch_size: int = 32) -> float:
    """Mean loss (nats/token) over ALL of `tokens`, cut into consecutive windows of seq_len (+1 for targets).

    Every token after the first is predicted exactly once (each window restarts its context), so
    `loss * n_predicted` is the whole stream's code length: use it to convert to bits per character.
    """
    if tokens.dim() != 1 or len(tokens) < 2:
        raise ValueError(f"tokens must be 1-D with >= 2 entries, got shape {tuple(tokens.shape)}")
    was_training = model.training
    model.eval()
    dev = model_device(model)
    n_full = (len(tokens) - 1) // seq_len
    windows = tokens[: n_full * seq_len + 1]
    x_all = windows[:-1].view(n_full, seq_len)                     # (N, seq_len)
    y_all = windows[1:].view(n_full, seq_len)
    total, count = 0.0, 0
    for i in range(0, n_full, batch_size):
        x, y = x_all[i:i + batch_size].to(dev), y_all[i:i + batch_size].to(dev)
        total += model(x, y)[1].item() * y.numel()
        count += y.numel()
    tail = tokens[n_full * seq_len:]                               # leftover tokens, one shorter window
    if len(tail) >= 2:
        total += model(tail[:-1][None].to(dev), tail[1:][None].to(dev))[1].item() * (len(tail) - 1)
        count += len(tail) - 1
    model.train(was_training)
    return total / count
