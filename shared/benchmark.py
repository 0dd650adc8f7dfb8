"""Training speed of the shared GPT next to two references of the same shape, in one process.

    python -m shared.benchmark                  # 1 thread, 4 layers, d 128, 4 heads, vocab 1024, T 128, B 32
    python -m shared.benchmark --threads 2 --rounds 5

Each model is trained with AdamW on random tokens; the rounds interleave the models (ours, HF Llama, HF GPT-2,
ours, ...) so a machine that gets busier or quieter half-way slows all three alike, and the ratios are medians
over rounds. Time is this process's CPU time by default (robust to other processes; use 1 thread). References: `transformers`' `LlamaForCausalLM` (same architecture as ours: RMSNorm, RoPE, SwiGLU)
and `GPT2LMHeadModel` (the plain GPT: learned positions, LayerNorm, GELU, biases; the shape of nanoGPT).
Not a test: timings depend on the machine. Targets: ours >= 1.1x HF Llama and >= 1.0x the plain GPT.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from . import quiet
from .model import GPT, GPTConfig


def build_models(n_layer: int, d_model: int, n_head: int, vocab: int, seq_len: int) -> dict[str, torch.nn.Module]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from .hf import to_hf

    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=vocab, block_size=seq_len, n_layer=n_layer, n_head=n_head, d_model=d_model))
    llama = to_hf(ours).train()                       # the same weights, so the same FLOPs
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=seq_len, n_embd=d_model, n_layer=n_layer,
                                      n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      attn_implementation="sdpa"))
    return {"shared GPT": ours, "HF Llama": llama, "HF GPT-2 (plain GPT)": gpt2}


def step_fn(model: torch.nn.Module, batch: torch.Tensor):
    """One AdamW training step on `batch` (B, T): forward, next-token loss, backward, update."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    is_ours = isinstance(model, GPT)

    def step():
        if is_ours:
            _, loss = model(batch[:, :-1], batch[:, 1:])
        else:
            logits = model(input_ids=batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model per round")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--clock", choices=("process", "wall"), default="process",
                        help="process: this process's CPU seconds (steady on a busy machine; with several threads it "
                             "adds their times up, so compare at equal threads); wall: elapsed time")
    args = parser.parse_args(argv)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    quiet()
    torch.set_num_threads(args.threads)
    models = build_models(args.layers, args.d_model, args.heads, args.vocab, args.seq_len + 1)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    steps = {name: step_fn(m, batch) for name, m in models.items()}
    for step in steps.values():                       # warm-up: allocator, kernels, AdamW state
        step(), step()
    tokens = args.batch * args.seq_len * args.steps
    rates = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = clock()
            for _ in range(args.steps):
                step()
            rates[name].append(tokens / (clock() - t0))
    ours = rates["shared GPT"]
    print(f"{args.clock} clock, threads {args.threads}, {args.layers} layers, d {args.d_model}, {args.heads} heads, vocab {args.vocab}, "
          f"T {args.seq_len}, B {args.batch}; {args.rounds} rounds x {args.steps} steps")
    result = {}
    for name, r in rates.items():
        ratio = statistics.median(a / b for a, b in zip(ours, r))
        result[name] = ratio
        print(f"{name:<22} {statistics.median(r):9,.0f} tokens/s (min {min(r):,.0f}, max {max(r):,.0f})   "
              f"ours / this: {ratio:.2f}x")
    return result


if __name__ == "__main__":
    main()
