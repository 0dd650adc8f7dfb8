"""Tests for serving.py (paged KV cache, paged forward, continuous batching) and stack_bench's argument checks.

References: the shared GPT's own forward (logits, atol 1e-5), `Attention.project` (atol 1e-6) and one-request-at-a-
time greedy decoding with `shared.model.decode` (token ids, exact). The test model is a small random GPT with a
large init so that its greedy choices are decisive (no near-ties that float rounding of a batched matmul could flip).
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

import stack_bench
from serving import (Engine, OutOfBlocksError, PagedKVCache, Request, forward_paged, mixed_workload, project_at,
                     reference_outputs)
from shared.model import GPT, GPTConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, block_size=96, n_layer=2, n_head=4, n_kv_head=2, d_model=32, init_std=0.3)
    return GPT(cfg).eval()


def workload(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 97, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    new = [int(x) for x in torch.randint(1, 30, (n,), generator=g)]
    return prompts, new


# ---------------------------------------------------------------------------------------------- the cache
def test_block_tables_free_list_and_reuse():
    c = PagedKVCache(n_layer=1, n_kv_head=1, head_dim=2, num_blocks=4, block_size=4)
    c.reserve(0, 5)                      # 2 blocks
    c.reserve(1, 4)                      # exactly 1 block
    assert c.tables == {0: [0, 1], 1: [2]} and list(c.free) == [3]
    c.lengths[0], c.lengths[1] = 5, 4
    assert c.blocks_needed(0, 3) == 0 and c.blocks_needed(0, 4) == 1 and c.blocks_needed(1, 1) == 1
    assert c.reserved_slots - c.stored_tokens == 3
    c.release(0)
    assert list(c.free) == [3, 0, 1] and 0 not in c.tables
    c.reserve(2, 9)                      # 3 blocks: every freed block is reused
    assert sorted(c.tables[2]) == [0, 1, 3] and not c.free


def test_out_of_blocks_takes_nothing():
    c = PagedKVCache(1, 1, 2, num_blocks=2, block_size=2)
    c.reserve(0, 3)
    with pytest.raises(OutOfBlocksError, match="needs 1 more blocks, 0 are free"):
        c.reserve(1, 1)
    assert 1 not in c.tables and c.used_blocks == 2


def test_write_read_through_table_roundtrip():
    c = PagedKVCache(n_layer=2, n_kv_head=2, head_dim=3, num_blocks=5, block_size=2)
    c.reserve(7, 1)
    c.reserve(3, 5)                      # seq 3 gets non-contiguous blocks after seq 7's
    k, v = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    c.write(1, 3, 0, k[:, :4], v[:, :4])
    c.write(1, 3, 4, k[:, 4:], v[:, 4:])
    k_back, v_back = c.read(1, 3, 5)
    torch.testing.assert_close(k_back, k, atol=0, rtol=0)
    torch.testing.assert_close(v_back, v, atol=0, rtol=0)
    assert torch.equal(c.slots(3, 0, 5), torch.tensor([2, 3, 4, 5, 6]))
    with pytest.raises(OutOfBlocksError, match="not reserved"):
        c.write(1, 3, 5, k[:, :2], v[:, :2])


def test_cache_bad_arguments():
    with pytest.raises(ValueError, match="num_blocks must be >= 1"):
        PagedKVCache(1, 1, 2, num_blocks=0, block_size=2)
    with pytest.raises(TypeError, match="block_size must be an int"):
        PagedKVCache(1, 1, 2, num_blocks=2, block_size=2.0)
    with pytest.raises(TypeError, match="dtype"):
        PagedKVCache(1, 1, 2, 2, 2, dtype=torch.int64)
    c = PagedKVCache(1, 1, 2, 2, 2)
    with pytest.raises(KeyError, match="holds no blocks"):
        c.release(5)
    with pytest.raises(ValueError, match="n_new must be >= 0"):
        c.reserve(0, -1)


# ---------------------------------------------------------------------------------------------- the forward
def test_project_at_equals_project(model):
    x = torch.randn(1, 6, model.cfg.d_model)
    attn = model.blocks[1].attn
    for a, b in zip(project_at(attn, x, torch.arange(3, 9)), attn.project(x, start_pos=3)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_forward_paged_matches_model(model):
    pa, pb = [1, 2, 3, 4, 5, 6, 7], [9]                      # a prompt spanning blocks, and a length-1 prompt
    c = PagedKVCache.for_model(model, num_blocks=8, block_size=3)
    c.reserve(0, len(pa))
    c.reserve(1, len(pb))
    with torch.no_grad():
        out = forward_paged(model, c, [0, 1], [torch.tensor(pa), torch.tensor(pb)])
        ref = torch.stack([model(torch.tensor([p]))[0][0, -1] for p in (pa, pb)])
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        c.reserve(0, 1)
        c.reserve(1, 2)
        out = forward_paged(model, c, [1, 0], [torch.tensor([4, 5]), torch.tensor([11])])   # chunk of 2, decode
        ref = torch.stack([model(torch.tensor([p]))[0][0, -1] for p in (pb + [4, 5], pa + [11])])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert c.lengths == {0: 8, 1: 3}


def test_forward_paged_refuses_unreserved(model):
    c = PagedKVCache.for_model(model, num_blocks=2, block_size=2)
    c.reserve(0, 2)
    with pytest.raises(OutOfBlocksError):
        forward_paged(model, c, [0], [torch.tensor([1, 2, 3])])
    with pytest.raises(ValueError, match="one chunk per sequence"):
        forward_paged(model, c, [0], [])


# ---------------------------------------------------------------------------------------------- the engine
@pytest.mark.parametrize("policy,num_blocks,max_batch", [("continuous", 64, 4), ("static", 64, 4),
                                                          ("continuous", 12, 4), ("continuous", 64, 1)])
def test_engine_tokens_equal_sequential_greedy(model, policy, num_blocks, max_batch):
    prompts, new = workload()
    ref = reference_outputs(model, mixed_workload(prompts, new))
    engine = Engine(model, num_blocks=num_blocks, block_size=4, max_batch=max_batch, policy=policy)
    done = engine.run(mixed_workload(prompts, new))
    assert [r.output for r in done] == ref
    assert engine.cache.used_blocks == 0 and not engine.cache.tables       # no leaks
    assert all(s.running <= max_batch for s in engine.trace)
    # every new token comes from a prefill (the first after each admission) or a decode step
    assert sum(s.decode_tokens for s in engine.trace) + sum(r.prefills for r in done) == sum(new)
    if num_blocks == 12:                                                  # small pool: preempted, recomputed
        assert sum(s.preempted for s in engine.trace) > 0 and sum(s.recomputed_tokens for s in engine.trace) > 0


def test_continuous_not_slower_than_static_and_arrivals(model):
    prompts, new = workload(12, seed=1)
    steps = {}
    for policy in ("static", "continuous"):
        e = Engine(model, num_blocks=64, block_size=4, max_batch=4, policy=policy)
        e.run(mixed_workload(prompts, new))
        steps[policy] = len(e.trace)
    assert steps["continuous"] <= steps["static"]
    e = Engine(model, num_blocks=64, block_size=4, max_batch=4)
    done = e.run(mixed_workload(prompts, new, arrivals=list(range(0, 24, 2))))
    assert all(r.admitted >= r.arrival and r.finished >= r.first_token >= r.admitted for r in done)
    assert [r.output for r in done] == reference_outputs(model, mixed_workload(prompts, new))


def test_engine_bad_arguments(model):
    with pytest.raises(ValueError, match="policy must be one of"):
        Engine(model, num_blocks=4, policy="eager")
    with pytest.raises(TypeError, match="shared.model.GPT"):
        Engine(torch.nn.Linear(2, 2), num_blocks=4)
    e = Engine(model, num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="could never finish"):
        e.add(Request(0, [1, 2, 3], 10))                                   # needs 3 blocks, pool has 2
    with pytest.raises(ValueError, match="exceeds the model's context"):
        Engine(model, num_blocks=64, block_size=4).add(Request(0, [1] * 90, 10))
    with pytest.raises(TypeError, match="must be a Request"):
        e.add({"prompt": [1]})
    with pytest.raises(RuntimeError, match="nothing to run"):
        e.step()
    with pytest.raises(TypeError, match="non-empty list"):
        Request(0, [], 3)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        Request(0, [1], 0)
    with pytest.raises(ValueError, match="same length"):
        mixed_workload([[1], [2]], [3])


# ---------------------------------------------------------------------------------------------- the harness
def test_harness_arguments_and_skips(tmp_path):
    with pytest.raises(ValueError, match="stack must be one of"):
        stack_bench.run_stack("tensorrt", tmp_path, [[1, 2]], 4)
    with pytest.raises(ValueError, match="same length"):
        stack_bench.run_stack("hf", tmp_path, [[1, 2], [3]], 4)
    with pytest.raises(ValueError, match="max_new must be an int >= 1"):
        stack_bench.run_stack("hf", tmp_path, [[1, 2]], 0)
    with pytest.raises(ValueError, match="only the stacks"):
        stack_bench.run_stack("onnx", tmp_path, [[1, 2]], 4, mixed=([[1]], [2]))
    with pytest.raises(ValueError, match="mixed must be"):
        stack_bench.run_stack("hf", tmp_path, [[1, 2]], 4, mixed=([[1], []], [2, 3]))
    skipped = stack_bench.skipped_stacks()
    assert skipped and all(isinstance(r, str) and r for r in skipped.values())
    cpu_skipped = set(skipped) & set(stack_bench.CPU_STACKS)
    assert cpu_skipped <= {"vllm"}                                  # vllm: only when its environment is missing
    assert set(stack_bench.STACKS) == set(stack_bench.CPU_STACKS) | set(stack_bench.GPU_STACKS)
    assert set(stack_bench.HANDICAPS) == set(stack_bench.STACKS)       # every row names what it carries
    for bad in ([], [[1, 2], [3]], [[1]], "12"):
        with pytest.raises(ValueError, match="score must be"):
            stack_bench.run_stack("hf", tmp_path, [[1, 2]], 4, score=bad)


def test_kv_bytes_per_token_from_config(tmp_path):
    """2 (k, v) x layers x KV heads x head_dim x 4 bytes; head_dim from hidden_size when the config has none."""
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 8, "num_key_value_heads": 2,
                                                      "hidden_size": 128, "num_hidden_layers": 3}))
    assert stack_bench.kv_bytes_per_token(tmp_path) == 2 * 3 * 2 * 16 * 4
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 8, "hidden_size": 128, "head_dim": 64,
                                                      "num_hidden_layers": 2}))
    assert stack_bench.kv_bytes_per_token(tmp_path, dtype_bytes=2) == 2 * 2 * 8 * 64 * 2


def test_vllm_skipped_with_reason_without_its_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMP_VLLM_VENV", str(tmp_path / "nowhere"))
    assert stack_bench.vllm_python() is None
    assert "vllm_env.sh" in stack_bench.skipped_stacks()["vllm"]
    with pytest.raises(FileNotFoundError, match="vllm_env.sh"):
        stack_bench.run_stack("vllm", tmp_path / "hf", [[1, 2]], 4)


# ---------------------------------------------------------------------------------------------- the GPU path
@pytest.fixture
def gpu_world(monkeypatch, tmp_path):
    """Pretend: CUDA present or not, exllamav2 importable or not, a CUDA vLLM python configured or not."""
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def world(cuda, exllamav2, vllm_cuda):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FakeGPU")
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: (object() if exllamav2 else None) if name == "exllamav2"
                            else real_find_spec(name, *a))
        if vllm_cuda:
            python = tmp_path / "cuda-env" / "bin" / "python"
            python.parent.mkdir(parents=True, exist_ok=True)
            python.write_text("")
            monkeypatch.setenv("LLMP_VLLM_CUDA_PYTHON", str(python))
        else:
            monkeypatch.delenv("LLMP_VLLM_CUDA_PYTHON", raising=False)
    return world


@pytest.mark.parametrize("cuda,exllamav2,vllm_cuda,runs", [
    (False, True, True, set()),                         # no GPU: both skipped, whatever is installed
    (True, False, False, set()),                        # GPU, neither installed
    (True, True, False, {"exllamav2"}),
    (True, False, True, {"vllm-cuda"}),
    (True, True, True, {"vllm-cuda", "exllamav2"}),
])
def test_gpu_stack_selection(gpu_world, cuda, exllamav2, vllm_cuda, runs):
    gpu_world(cuda, exllamav2, vllm_cuda)
    skipped = stack_bench.skipped_stacks()
    assert set(stack_bench.GPU_STACKS) - set(skipped) == runs
    for stack in set(stack_bench.GPU_STACKS) - runs:                # every skip names its reason
        reason = skipped[stack]
        assert ("no CUDA GPU" in reason) if not cuda else (
            "LLMP_VLLM_CUDA_PYTHON" in reason if stack == "vllm-cuda" else "EXL2" in reason)


def test_gpu_rows_written_only_with_cuda(gpu_world, monkeypatch, tmp_path):
    calls = []

    def fake_run_stack(stack, model_dir, prompts, max_new, **kw):
        calls.append(stack)
        if stack == "exllamav2":
            raise RuntimeError("stack exllamav2 failed: head size")   # a failure becomes a row, not a crash
        return {"tokens_b8": [[1, 2]], "ttft_s": [0.1]}
    monkeypatch.setattr(stack_bench, "run_stack", fake_run_stack)
    out = tmp_path / "results_gpu.json"
    gpu_world(False, True, True)
    assert stack_bench.run_gpu_rows(tmp_path, [[5]], 2, [[1, 2]], out=out) == {} and not out.exists() and not calls
    gpu_world(True, True, True)
    rows = stack_bench.run_gpu_rows(tmp_path, [[5]], 2, [[1, 2]], out=out)
    assert calls == ["vllm-cuda", "exllamav2"] and rows["vllm-cuda"]["tokens_equal_reference"]
    assert "head size" in rows["exllamav2"]["error"]
    saved = json.loads(out.read_text())
    assert saved["device"] == "FakeGPU" and "GPU" in saved["label"] and set(saved["rows"]) == set(rows)


def test_child_process_interpreter_and_environment(gpu_world, monkeypatch, tmp_path):
    """One function builds every stack's process: our python for ours, vLLM's for the vllm stacks, no PYTHONPATH."""
    monkeypatch.setenv("PYTHONPATH", "/ours")
    python, env = stack_bench._child_env("hf", 2)
    assert str(python) == sys.executable and env["OMP_NUM_THREADS"] == "2" and env["PYTHONPATH"] == "/ours"
    assert "DS_ACCELERATOR" not in env or env["DS_ACCELERATOR"] == os.environ.get("DS_ACCELERATOR")
    python, env = stack_bench._child_env("deepspeed", 1)
    assert env["DS_ACCELERATOR"] == "cpu"              # a CUDA host must not move its model to cuda:0
    gpu_world(True, False, True)
    python, env = stack_bench._child_env("vllm-cuda", 1)
    assert python == stack_bench.vllm_cuda_python() and "PYTHONPATH" not in env
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and "VLLM_CPU_KVCACHE_SPACE" not in env   # CPU-only key
    monkeypatch.setattr(stack_bench, "vllm_python", lambda: Path(sys.executable))
    python, env = stack_bench._child_env("vllm", 1)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    gpu_world(True, False, False)
    with pytest.raises(FileNotFoundError, match="LLMP_VLLM_CUDA_PYTHON"):
        stack_bench.run_stack("vllm-cuda", tmp_path / "hf", [[1, 2]], 4)


def test_vllm_env_sh_asks_the_harness_for_its_default(monkeypatch):
    """vllm_env.sh's default venv is the one vllm_python() looks in (printed by `stack_bench.py vllm-venv`)."""
    import subprocess

    monkeypatch.setenv("LLMP_VLLM_VENV", "/tmp/some-venv")
    out = subprocess.run(["bash", str(stack_bench.HERE / "vllm_env.sh")], env={**os.environ, "LLMP_SKIP_VLLM": "1"},
                         capture_output=True, text=True, check=True).stdout
    assert "/tmp/some-venv" in out and stack_bench.vllm_venv() == Path("/tmp/some-venv")
    monkeypatch.delenv("LLMP_VLLM_VENV")
    env = {k: v for k, v in os.environ.items() if k != "LLMP_VLLM_VENV"}
    out = subprocess.run([sys.executable, str(stack_bench.HERE / "stack_bench.py"), "vllm-venv"], capture_output=True,
                         text=True, check=True, env=env).stdout
    assert Path(out.strip()) == stack_bench.vllm_venv() == stack_bench.HERE.parent / ".venv-vllm"


def tiny_llama(path, head_dim=8, seed=0):
    """A small random 🤗 Llama folder (GQA, RoPE, tied embeddings) with decisive logits (large init)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=61, hidden_size=4 * head_dim, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=64,
                      tie_word_embeddings=True, initializer_range=0.3, eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("factor", [4, 2])
def test_pad_head_dim_is_exact(tmp_path, factor):
    """The padded folder computes the same function: logits vs the original (atol 1e-5), greedy tokens equal."""
    from transformers import LlamaForCausalLM

    original = tiny_llama(tmp_path / "orig", head_dim=10)
    out = stack_bench.pad_head_dim(tmp_path / "orig", tmp_path / "pad", factor)
    padded = LlamaForCausalLM.from_pretrained(out).eval()
    assert padded.config.head_dim == 10 * factor
    assert padded.model.layers[0].self_attn.q_proj.weight.shape == (4 * 10 * factor, 40)
    ids = torch.randint(0, 61, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = original(ids).logits, padded(ids).logits
        assert (a - b).abs().max() < 1e-5
        kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(original.generate(ids[:, :5], **kw), padded.generate(ids[:, :5], **kw))


def test_vllm_model_dir_picks_a_power_of_four(tmp_path):
    tiny_llama(tmp_path / "m", head_dim=10)
    folder, factor = stack_bench.vllm_model_dir(tmp_path / "m", [32, 40, 64])
    assert factor == 4 and folder.name == "m-vllm" and json.loads((folder / "config.json").read_text())["head_dim"] == 40
    assert stack_bench.vllm_model_dir(tmp_path / "m", [10, 32]) == (tmp_path / "m", 1)
    with pytest.raises(ValueError, match="no power-of-4 multiple"):
        stack_bench.vllm_model_dir(tmp_path / "m", [32, 64])
    with pytest.raises(ValueError, match="factor must be an int >= 1"):
        stack_bench.pad_head_dim(tmp_path / "m", tmp_path / "x", 0)


# ---------------------------------------------------------------------------------------------- prefix caching
def test_prefix_blocks_shared_and_freed():
    c = PagedKVCache(1, 1, 2, num_blocks=6, block_size=2, prefix_caching=True)
    prompt = [5, 6, 7, 8, 9]
    assert c.match_prefix(0, prompt) == 0
    c.reserve(0, 5)
    c.lengths[0] = 5
    c.register_prefix(0, prompt)                               # blocks holding [5,6] and [7,8] published
    assert c.match_prefix(1, prompt + [1]) == 4                # two whole blocks; never the last token
    assert c.tables[1] == c.tables[0][:2] and c.refcount[c.tables[0][0]] == 2
    assert c.match_prefix(2, [5, 6, 0, 0, 1]) == 2             # the chain breaks at the second block
    assert PagedKVCache(1, 1, 2, 6, 2).match_prefix(0, prompt) == 0    # off: no sharing
    for seq in (0, 1, 2):
        c.release(seq)
    assert c.used_blocks == 0 and sum(c.refcount) == 0
    assert c.match_prefix(3, prompt) == 4                      # freed blocks keep their prefix until reused
    with pytest.raises(ValueError, match="already holds blocks"):
        c.match_prefix(3, prompt)
    with pytest.raises(TypeError, match="prefix_caching must be a bool"):
        PagedKVCache(1, 1, 2, 6, 2, prefix_caching=1)


@pytest.mark.parametrize("pool", ["ample", "tight"])
def test_engine_prefix_caching_equal_tokens_fewer_prefill(model, pool):
    system = list(range(1, 17))                                # a 16-token shared system prompt
    prompts, new = workload(10, seed=2)
    prompts = [system + p for p in prompts]
    longest = max(-(-(len(p) + n - 1) // 4) for p, n in zip(prompts, new))
    num_blocks = 64 if pool == "ample" else longest + 2         # tight: preemptions while prefixes are shared
    ref = reference_outputs(model, mixed_workload(prompts, new))
    work = {}
    for pc in (False, True):
        e = Engine(model, num_blocks=num_blocks, block_size=4, max_batch=4, prefix_caching=pc)
        done = e.run(mixed_workload(prompts, new, arrivals=list(range(10))))
        assert [r.output for r in done] == ref
        assert e.cache.used_blocks == 0 and sum(e.cache.refcount) == 0
        work[pc] = (sum(s.prefill_tokens for s in e.trace), sum(s.prefix_hit_tokens for s in e.trace),
                    sum(s.preempted for s in e.trace))
    assert work[False][1] == 0 and work[True][1] > 0
    if pool == "ample":                                          # no preemption: every prompt token accounted once
        assert work[True][2] == work[False][2] == 0
        assert work[True][0] + work[True][1] == work[False][0] == sum(map(len, prompts))
    else:
        assert work[False][2] > 0 and work[True][2] > 0


# ---------------------------------------------------------------------------------------------- online serving
def test_serving_metrics_by_hand():
    """Two requests, times chosen so every number can be checked by hand."""
    times = [[0.10, 0.12, 0.16], [0.50, 0.51]]          # request 0: TTFT 0.1, ITL 0.02 0.04; request 1: TTFT 0.2
    m = stack_bench.serving_metrics(times, [0.0, 0.3], slo_ttft_s=0.15, slo_tpot_s=0.05, quantiles=(0.5, 1.0))
    assert m["ttft_s"][1.0] == pytest.approx(0.2) and m["ttft_s"][0.5] == pytest.approx(0.15)
    assert m["itl_s"][1.0] == pytest.approx(0.04) and m["itl_s"][0.5] == pytest.approx(0.02)
    assert m["makespan_s"] == pytest.approx(0.51) and m["throughput_tok_s"] == pytest.approx(5 / 0.51)
    assert m["slo_met"] == 0.5 and m["goodput_req_s"] == pytest.approx(1 / 0.51)   # request 1 misses its TTFT
    with pytest.raises(ValueError, match="one entry per request"):
        stack_bench.serving_metrics([[0.1]], [0.0, 0.1], 1.0, 1.0)
    with pytest.raises(ValueError, match="precedes its arrival"):
        stack_bench.serving_metrics([[0.1]], [0.2], 1.0, 1.0)
    with pytest.raises(ValueError, match="SLO bounds"):
        stack_bench.serving_metrics([[0.1]], [0.0], 0.0, 1.0)


def test_online_arguments(tmp_path):
    with pytest.raises(ValueError, match="pass mixed"):
        stack_bench.run_stack("hf", tmp_path, [[1, 2]], 4, arrivals=[[0.0]])
    with pytest.raises(ValueError, match="non-decreasing"):
        stack_bench.run_stack("hf", tmp_path, [[1, 2]], 4, mixed=([[1], [2]], [2, 3]), arrivals=[[0.5, 0.1]])
    with pytest.raises(ValueError, match="one time per request"):
        stack_bench.run_stack("hf", tmp_path, [[1, 2]], 4, mixed=([[1], [2]], [2, 3]), arrivals=[[0.0]])


@pytest.mark.parametrize("stack", ["ours-paged", "hf"])
def test_online_serving_tokens_and_times(tmp_path, stack):
    """In process: requests submitted at wall-clock arrival times get the tokens of the offline path, one time
    per token, none before the request arrived, non-decreasing."""
    tiny_llama(tmp_path / "m", head_dim=8)
    stack_bench._EXTRA.clear()
    stack_bench._load(stack, str(tmp_path / "m"), threads=1, max_batch=2)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 61, (n,), generator=g).tolist() for n in (3, 5, 4)]
    new = [4, 2, 3]
    arrivals = [0.0, 0.01, 0.02]
    times, outs = stack_bench._EXTRA["online"](prompts, new, arrivals)
    assert outs == stack_bench._EXTRA["mixed"](prompts, new)
    assert [len(t) for t in times] == new
    assert all(t[0] >= a and t == sorted(t) for t, a in zip(times, arrivals))


# ---------------------------------------------------------------------------------------------- GPU-ready, server, timing regime
def test_model_facing_functions_move_inputs_to_the_model_device():
    """The model on `meta` inside `device_guard`: no input is left on the CPU (a meta tensor has no values, so a
    function may stop at its first read of one: that error is allowed, a device mismatch is not)."""
    from shared.validate import device_guard

    torch.manual_seed(0)
    meta = GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=1, n_head=2, d_model=16)).to("meta").eval()
    calls = [lambda: reference_outputs(meta, mixed_workload([[1, 2, 3]], [2])),
             lambda: Engine(meta, num_blocks=4, block_size=4, max_batch=2).run(mixed_workload([[1, 2], [3]], [2, 2])),
             lambda: forward_paged(meta, _reserved(PagedKVCache.for_model(meta, 4, 4), 0, 3), [0],
                                   [torch.tensor([1, 2, 3])])]
    with device_guard(meta):
        for call in calls:
            try:
                call()
            except (NotImplementedError, RuntimeError):      # the first read of a meta value; a device
                pass                                            # mismatch would be the guard's ValueError


def _reserved(cache, seq, n):
    cache.reserve(seq, n)
    return cache


def test_prom_counter_sums_a_counter():
    page = ('# HELP vllm:prefix_cache_hits_total x\nvllm:prefix_cache_hits_total{engine="0",model_name="m"} 96.0\n'
            'vllm:prefix_cache_hits_total{engine="1",model_name="m"} 4.0\nvllm:prefix_cache_queries_total 200.0\n')
    assert stack_bench.prom_counter(page, "vllm:prefix_cache_hits") == 100.0
    assert stack_bench.prom_counter(page, "vllm:prefix_cache_queries") == 200.0
    with pytest.raises(ValueError, match="not on the /metrics page"):
        stack_bench.prom_counter(page, "vllm:nope")
    with pytest.raises(TypeError, match="must be strings"):
        stack_bench.prom_counter(None, "x")


def test_serve_vllm_and_big_arguments(tmp_path):
    with pytest.raises(ValueError, match="non-empty list"):
        stack_bench.serve_vllm(tmp_path, [], 4)
    with pytest.raises(ValueError, match="one such int per prompt"):
        stack_bench.serve_vllm(tmp_path, [[1], [2]], [4])
    with pytest.raises(ValueError, match="one time >= 0"):
        stack_bench.serve_vllm(tmp_path, [[1], [2]], 4, arrivals=[0.0])
    with pytest.raises(ValueError, match="block_size must be an int"):
        stack_bench.serve_vllm(tmp_path, [[1]], 4, block_size=0)
    good = dict(model_dir=tmp_path, prompts=[[1, 2]], max_new=4, repeats=1, long=[1] * 8, long_repeats=1)
    with pytest.raises(ValueError, match="big must be a dict"):
        stack_bench.run_stack("hf", tmp_path, [[1, 2]], 4, big={"model_dir": tmp_path})
    with pytest.raises(ValueError, match="equally long"):
        stack_bench.run_stack("hf", tmp_path, [[1, 2]], 4, big={**good, "prompts": [[1], [1, 2]]})
    with pytest.raises(ValueError, match=r"big\['repeats'\] must be an int"):
        stack_bench.run_stack("hf", tmp_path, [[1, 2]], 4, big={**good, "repeats": 0})
