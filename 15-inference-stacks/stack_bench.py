"""One benchmark harness over the inference stacks installed here, each stack in its own process.

`python stack_bench.py STACK MODEL_DIR PROMPTS_JSON MAX_NEW OUT_JSON` loads the model folder written by
`shared.hf.save_hf` into one stack, decodes the prompts greedily for exactly MAX_NEW tokens (end-of-text is not
a stop, so every stack produces the same number of tokens), and writes a JSON of measurements and token ids.
`run_stack(...)` starts that process from a notebook; a stack per process keeps its memory (peak RSS) its own
and its imports (onnxruntime, ctranslate2, ...) out of the notebook's kernel.

Protocol, the same for every stack: load (timed), one untimed warm-up, then
- batch 1 (the first prompt), `repeats` times: time to first token (TTFT: prompt in -> first new token chosen)
  and the inter-token latencies (ITL: between consecutive tokens), from a clock read each time a token is chosen;
- batch 8 (all prompts, equal lengths, so no stack needs padding), `repeats` times: new tokens / second.
Torch, ONNX Runtime and CTranslate2 are each given `threads` intra-op threads.

Stacks: "ours-nocache" (shared `decode`, the whole prefix re-run every step), "ours-cache" (shared `decode` with its
KV cache), "ours-paged" (this folder's continuous batcher, `serving.Engine`), "hf" (transformers `generate`),
"onnx" (`torch.onnx.export(dynamo=True)` of the Llama model without past key/values, driven by our own greedy
loop that re-runs the whole prefix every step), "ct2" (CTranslate2, converted by its TransformersConverter),
"deepspeed" (`deepspeed.init_inference` on its CPU accelerator, world size 1, without kernel injection since its
fused inference kernels are CUDA-only: its engine wraps the same 🤗 module and calls its `generate`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

STACKS = ("ours-nocache", "ours-cache", "ours-paged", "hf", "deepspeed", "onnx", "ct2")
HERE = Path(__file__).resolve().parent


def skipped_stacks() -> dict[str, str]:
    """Stacks the harness knows but cannot run in this environment: name -> the reason, checked, not assumed."""
    import torch

    cuda = torch.cuda.is_available()
    reasons = {}
    if importlib.util.find_spec("vllm") is None:
        reasons["vllm-cpu"] = ("vllm is not installed in this environment: it pins transformers<5.20 and brings "
                               "CUDA torchvision/torchaudio, so it needs an environment of its own (not built here)")
    if not cuda:
        reasons["vllm-cuda"] = "no CUDA GPU on this machine"
        reasons["exllamav2"] = "no CUDA GPU on this machine (ExLlama kernels are CUDA-only)"
    elif importlib.util.find_spec("exllamav2") is None:
        reasons["exllamav2"] = "exllamav2 is not installed"
    if shutil.which("llama-cli") is None and importlib.util.find_spec("llama_cpp") is None:
        reasons["llama.cpp"] = "neither llama-cli nor llama-cpp-python is installed"
    return reasons


def run_stack(stack: str, model_dir: str | Path, prompts: list[list[int]], max_new: int, threads: int = 1,
              repeats: int = 3, timeout: float = 300.0) -> dict:
    """Run one stack in a fresh Python process and return its measurements (see the module docstring)."""
    if stack not in STACKS:
        raise ValueError(f"stack must be one of {STACKS}, got {stack!r}")
    if not isinstance(prompts, list) or not prompts or len({len(p) for p in prompts}) != 1:
        raise ValueError("prompts must be a non-empty list of token-id lists, all of the same length")
    for name, value in (("max_new", max_new), ("threads", threads), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    work = Path(model_dir).parent
    args_file, out_file = work / f"{stack}.args.json", work / f"{stack}.out.json"
    args_file.write_text(json.dumps({"prompts": prompts, "max_new": max_new, "threads": threads,
                                     "repeats": repeats}))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(HERE / "stack_bench.py"), stack, str(model_dir), str(args_file),
                           str(out_file)], capture_output=True, text=True, env=env, timeout=timeout, cwd=HERE)
    if done.returncode:
        raise RuntimeError(f"stack {stack} failed:\n{done.stderr[-3000:]}")
    result = json.loads(out_file.read_text())
    result["process_s"] = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------------------- in the child
_IMPORTED = 0.0     # clock when a stack's libraries were imported (load time = imports + reading the model)


def _imported() -> None:
    global _IMPORTED
    _IMPORTED = time.perf_counter()


def _peak_rss() -> int:
    """This process's peak resident memory (VmHWM, bytes). Not ru_maxrss: Linux carries that over from the
    parent across fork + exec, so every child would report at least the notebook kernel's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _greedy_loop(step_fn, prompts, max_new, stamps):
    """Greedy decoding driven by `step_fn(ids (B, T) list) -> next ids (B,)`; a clock read per chosen token."""
    ids = [list(p) for p in prompts]
    for _ in range(max_new):
        nxt = step_fn(ids)
        stamps.append(time.perf_counter())
        for row, t in zip(ids, nxt):
            row.append(int(t))
    return [row[len(p):] for row, p in zip(ids, prompts)]


def _load(stack, model_dir, threads):
    """Returns generate(prompts, max_new, stamps) -> new token ids per prompt; `stamps` gets a time per token."""
    if stack in ("ours-nocache", "ours-cache", "ours-paged", "hf"):
        import torch

        torch.set_num_threads(threads)
    if stack in ("ours-nocache", "ours-cache"):
        import torch
        from shared.hf import from_hf
        from shared.model import decode
        from transformers import LlamaForCausalLM  # noqa: F401  (what from_hf reads the folder with)

        _imported()
        model = from_hf(model_dir)
        use_cache = stack == "ours-cache"

        def generate(prompts, max_new, stamps):
            def pick(logits, ids):
                stamps.append(time.perf_counter())
                return logits.argmax(dim=-1)
            out = decode(model, torch.tensor(prompts), max_new, pick, use_cache=use_cache)
            return out[:, len(prompts[0]):].tolist()
        return generate
    if stack == "ours-paged":
        import serving
        from shared.hf import from_hf
        from transformers import LlamaForCausalLM  # noqa: F401  (what from_hf reads the folder with)

        _imported()
        model = from_hf(model_dir)

        def generate(prompts, max_new, stamps):
            need = len(prompts) * (-(-(len(prompts[0]) + max_new) // 16))
            engine = serving.Engine(model, num_blocks=need, block_size=16, max_batch=len(prompts))
            for r in serving.mixed_workload(prompts, [max_new] * len(prompts)):
                engine.add(r)
            while engine.busy:
                engine.step()
                stamps.append(time.perf_counter())
            return [r.output for r in sorted(engine.done, key=lambda r: r.rid)]
        return generate
    if stack in ("hf", "deepspeed"):
        import torch
        from transformers import LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

        if stack == "deepspeed":     # one process, world size 1: DeepSpeed wants the torch.distributed variables
            import socket

            with socket.socket() as sock:                    # a free port, not a fixed one another job may hold
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                              WORLD_SIZE="1")
            import deepspeed
        _imported()
        model = LlamaForCausalLM.from_pretrained(model_dir).eval()
        model.generation_config.eos_token_id = None          # exactly max_new tokens, like every other stack
        if stack == "deepspeed":     # CPU accelerator; its fused inference kernels are CUDA-only: no injection
            model = deepspeed.init_inference(model, dtype=torch.float32, replace_with_kernel_inject=False)

        class Stamp(LogitsProcessor):
            def __init__(self, stamps):
                self.stamps = stamps

            def __call__(self, input_ids, scores):
                self.stamps.append(time.perf_counter())
                return scores

        def generate(prompts, max_new, stamps):
            with torch.no_grad():
                out = model.generate(torch.tensor(prompts), attention_mask=torch.ones(len(prompts), len(prompts[0]),
                                     dtype=torch.long), max_new_tokens=max_new, do_sample=False,
                                     logits_processor=LogitsProcessorList([Stamp(stamps)]), pad_token_id=0)
            return out[:, len(prompts[0]):].tolist()
        return generate
    if stack == "onnx":
        import numpy as np
        import onnxruntime as ort

        _imported()
        onnx_path = Path(model_dir).parent / "model.onnx"
        if not onnx_path.exists():
            raise FileNotFoundError(f"{onnx_path}: run `stack_bench.py export-onnx MODEL_DIR` first")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])

        def step(ids):   # no past key/values: the whole prefix is re-run every step
            logits = session.run(["logits"], {"input_ids": np.array(ids, dtype=np.int64)})[0]
            return logits[:, -1].argmax(-1)

        def generate(prompts, max_new, stamps):
            return _greedy_loop(step, prompts, max_new, stamps)
        return generate
    if stack == "ct2":
        import ctranslate2
        from tokenizers import Tokenizer

        _imported()
        ct2_dir = Path(model_dir).parent / "ct2"
        if not ct2_dir.exists():
            raise FileNotFoundError(f"{ct2_dir}: run `stack_bench.py convert-ct2 MODEL_DIR` first")
        tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))   # ids -> token strings, for CT2
        gen = ctranslate2.Generator(str(ct2_dir), device="cpu", compute_type="float32", intra_threads=threads,
                                    inter_threads=1)

        def generate(prompts, max_new, stamps):
            start = [[tok.id_to_token(t) for t in p] for p in prompts]
            def stamp(step):     # called by the decoding loop for each token it chooses (batch 1: one per step)
                if step.batch_id == 0:
                    stamps.append(time.perf_counter())
                return False

            results = gen.generate_batch(start, max_length=max_new, sampling_topk=1, end_token=[],  # no stop token
                                         include_prompt_in_result=False, callback=stamp)
            return [r.sequences_ids[0] for r in results]
        return generate
    raise ValueError(f"unknown stack {stack!r}")


def _export_onnx(model_dir: str) -> None:
    """The saved Llama model as ONNX (dynamo exporter): input_ids (B, T) -> logits (B, T, V), no past KV."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    model.eval()

    class LogitsOnly(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=256)
    example = torch.zeros(2, 8, dtype=torch.long)
    torch.onnx.export(LogitsOnly(model), (example,), str(Path(model_dir).parent / "model.onnx"), dynamo=True,
                      input_names=["input_ids"], output_names=["logits"],
                      dynamic_shapes={"input_ids": {0: batch, 1: seq}}, verbose=False)


def _convert_ct2(model_dir: str) -> None:
    import ctranslate2

    out = Path(model_dir).parent / "ct2"
    ctranslate2.converters.TransformersConverter(model_dir).convert(str(out), force=True)
    # Our tokenizer has no BOS token; the converter writes null, which the loader refuses. No prompt here starts
    # with a BOS, so any string will do: name the end-of-text token.
    config = json.loads((out / "config.json").read_text())
    if config.get("bos_token") is None:
        config["bos_token"] = config.get("eos_token") or "<|endoftext|>"
        (out / "config.json").write_text(json.dumps(config, indent=2))


def main(argv: list[str]) -> None:
    if argv[0] in ("export-onnx", "convert-ct2"):
        t0 = time.perf_counter()
        (_export_onnx if argv[0] == "export-onnx" else _convert_ct2)(argv[1])
        print(json.dumps({"seconds": time.perf_counter() - t0}))
        return
    stack, model_dir, args_file, out_file = argv
    args = json.loads(Path(args_file).read_text())
    prompts, max_new, threads, repeats = args["prompts"], args["max_new"], args["threads"], args["repeats"]
    t0 = time.perf_counter()
    generate = _load(stack, model_dir, threads)
    load_s = time.perf_counter() - t0
    import_s = _IMPORTED - t0                                      # of which: importing the libraries
    generate(prompts[:1], 2, [])                                   # warm-up
    ttft, itl, b1, tokens_b1 = [], [], [], None
    for _ in range(repeats):
        stamps = []
        t0 = time.perf_counter()
        tokens_b1 = generate(prompts[:1], max_new, stamps)
        end = time.perf_counter()
        ttft.append(stamps[0] - t0)
        itl.append(statistics.median(b - a for a, b in zip(stamps, stamps[1:])))
        b1.append(max_new / (end - t0))
    b8, tokens_b8 = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens_b8 = generate(prompts, max_new, [])
        b8.append(len(prompts) * max_new / (time.perf_counter() - t0))
    Path(out_file).write_text(json.dumps({
        "stack": stack, "load_s": load_s, "ttft_s": ttft, "itl_s": itl, "tok_per_s_b1": b1, "tok_per_s_b8": b8,
        "tokens_b1": tokens_b1, "tokens_b8": tokens_b8, "threads": threads,
        "import_s": import_s, "peak_rss_bytes": _peak_rss()}))


if __name__ == "__main__":
    main(sys.argv[1:])
