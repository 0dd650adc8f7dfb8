"""Data-parallel training of the shared GPT on the stories: one process, torchrun + DDP, or DeepSpeed ZeRO.

    python train_ddp.py --steps 20 --global-batch 8 --out one.json                      # one process, no DDP
    torchrun --standalone --nproc_per_node=2 train_ddp.py --steps 20 --global-batch 8 --out ddp.json
    torchrun --standalone --nproc_per_node=2 train_ddp.py --engine deepspeed --zero 2 --out ds.json
    # two machines, 8 GPUs each (run on every node with its --node_rank; NCCL is picked when CUDA is present):
    torchrun --nnodes=2 --node_rank=0 --master_addr=node0.example --master_port=29500 --nproc_per_node=8 \\
        train_ddp.py --steps 2000 --global-batch 256 --d-model 256 --n-layer 8 --out run.json

Every process draws the SAME global batch of `--global-batch` windows from one seeded generator and trains on
its own contiguous slice of `global_batch / world_size` rows. DDP averages the gradients over processes, and
the mean of equal-sized slices' mean losses is the global batch's mean loss, so N processes take the same
optimizer steps as one process on the whole batch, up to the order of float additions. That is what
`test_train_ddp.py` checks. Rank 0 writes the per-step global loss (the all-reduced mean) to `--out` as JSON.

Tokens are the stories' UTF-8 bytes (vocabulary 256): no tokenizer to train or share between processes.
Gloo on CPU, NCCL on GPU. DeepSpeed runs on its CPU accelerator here; our torch AdamW goes in as a client optimizer
(nothing to JIT-compile), and its shared-memory all-reduce is switched off unless `--ds-shm` (gloo does the
collectives). Launched without torchrun (no RANK in the environment) it trains in one plain process.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=("ddp", "deepspeed"), default="ddp")
    p.add_argument("--zero", type=int, choices=(0, 1, 2), default=1, help="DeepSpeed ZeRO stage")
    p.add_argument("--ds-shm", action="store_true",
                   help="let DeepSpeed JIT-compile its shared-memory all-reduce for CPU (slow first start)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--global-batch", type=int, default=8, help="windows per step, summed over all processes")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--n-stories", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--out", default=None, help="JSON file for rank 0's losses")
    p.add_argument("--cpu", action="store_true", help="run on the CPU with gloo even where CUDA is present")
    args = p.parse_args(argv)
    for name in ("steps", "global_batch", "seq_len", "n_stories", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def backend(cuda: bool) -> str:
    """The torch.distributed backend: NCCL when CUDA is present (GPU-to-GPU collectives over NVLink/InfiniBand),
    gloo on CPU. The NCCL path needs a GPU; it was not run on the CPU-only machines this folder was built on."""
    if not isinstance(cuda, bool):
        raise TypeError(f"cuda must be a bool (torch.cuda.is_available()), got {type(cuda).__name__}")
    return "nccl" if cuda else "gloo"


def launch_plan(world: int = 2, cuda_devices: int = 0) -> tuple[int, list[str]]:
    """(nproc_per_node, extra script arguments) for a `world`-process run on this machine: one process per GPU
    (NCCL) when at least `world` GPUs exist, otherwise `world` CPU processes over gloo (`--cpu`), never two
    processes on one GPU. `cuda_devices`: torch.cuda.device_count() (0 without CUDA)."""
    for name, v, lo in (("world", world, 1), ("cuda_devices", cuda_devices, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return (world, []) if cuda_devices >= world else (world, ["--cpu"])


def story_bytes(n_stories: int, seed: int = 0):
    """1-D long tensor of the UTF-8 bytes of n_stories stories, each followed by a newline (vocabulary 256)."""
    import torch

    from shared.data import StoryGenerator
    text = "".join(s.text + "\n" for s in StoryGenerator(seed=seed).samples(n_stories))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist

    from shared.data import random_windows
    from shared.model import GPT, GPTConfig
    from shared.train import make_optimizer

    torch.set_num_threads(args.threads)
    distributed = "RANK" in os.environ
    use_cuda = torch.cuda.is_available() and not args.cpu
    if distributed and args.engine == "ddp":
        dist.init_process_group(backend(use_cuda))
    elif args.engine == "deepspeed":
        import deepspeed
        if not args.ds_shm:      # skip the JIT build (30-65 s) of DeepSpeed's shared-memory all-reduce: gloo does it
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if not distributed:                                   # a lone DeepSpeed process still wants these
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
        deepspeed.init_distributed(dist_backend=backend(use_cuda))
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if args.global_batch % world:
        raise ValueError(f"--global-batch ({args.global_batch}) must be divisible by the number of processes ({world})")
    local_batch = args.global_batch // world
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    tokens = story_bytes(args.n_stories, seed=args.seed)
    cfg = GPTConfig(vocab_size=256, block_size=args.seq_len, n_layer=args.n_layer, n_head=args.n_head,
                    d_model=args.d_model)
    torch.manual_seed(args.seed)                              # same initial weights on every rank
    model = GPT(cfg).to(device)

    if args.engine == "deepspeed":
        import deepspeed
        # Our AdamW (decay on matrices only, as the single-process run) handed to DeepSpeed as a client
        # optimizer: ZeRO-1 shards its states, ZeRO-2 also the gradients, across processes.
        ds_config = {"train_batch_size": args.global_batch, "train_micro_batch_size_per_gpu": local_batch,
                     "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                     "zero_optimization": {"stage": args.zero}, "zero_allow_untested_optimizer": True}
        opt = make_optimizer(model, args.lr, weight_decay=0.1, betas=(0.9, 0.95))
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    else:
        engine = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
                  if world > 1 else model)
        opt = make_optimizer(model, args.lr, weight_decay=0.1, betas=(0.9, 0.95))

    g = torch.Generator().manual_seed(args.seed)              # identical stream of global batches on every rank
    losses, start = [], time.perf_counter()
    for _ in range(args.steps):
        x, y = random_windows(tokens, args.seq_len, args.global_batch, g)          # (global B, T), same everywhere
        x, y = (t[rank * local_batch:(rank + 1) * local_batch].to(device) for t in (x, y))   # this rank's rows
        _, loss = engine(x, y)
        if args.engine == "deepspeed":
            engine.backward(loss)
            engine.step()
        else:
            opt.zero_grad(set_to_none=True)
            loss.backward()                                   # DDP: gradients all-reduced (mean) during backward
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        mean_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= world
        losses.append(mean_loss.item())
    result = {"engine": args.engine, "zero": args.zero if args.engine == "deepspeed" else None,
              "world_size": world, "global_batch": args.global_batch, "local_batch": local_batch,
              "device": str(device), "losses": losses, "seconds": time.perf_counter() - start,
              "params": model.num_params()}
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)
    # Tear down in order, before the interpreter does. DeepSpeed (0.18+) switches Python's cyclic garbage collector
    # off while an engine lives; without destroy() the engine and the process groups it references are only
    # finalised during interpreter shutdown, in no set order (a rank once aborted there: "terminate called without
    # an active exception").
    if args.engine == "deepspeed":
        engine.destroy()
    del engine, opt
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
