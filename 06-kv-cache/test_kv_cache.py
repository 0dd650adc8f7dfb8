"""Tests for kv_cache.py: the cache's bookkeeping, cached == uncached == shared.generate == HF generate,
the FLOP formula against torch's FlopCounterMode, and the argument checks. Tiny random models, a few seconds."""
import platform
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from kv_cache import (CacheOverflowError, KVCache, attend, forward_cached, generate_cached, generate_naive,
                      kv_cache_bytes, measure_cache_rss, rss_is_measurable, step_flops)
from shared.model import GPT, Attention, GPTConfig

# float32 reference vs cached path: same math, different summation order -> ~1e-6; 1e-4 leaves room.
ATOL, RTOL = 1e-4, 1e-4


def tiny_gpt(n_head=4, n_kv_head=2, seed=0, init_std=0.02, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=n_head, n_kv_head=n_kv_head, d_model=32,
                    init_std=init_std, **kw)
    return GPT(cfg).eval()


def prompt(B=2, T=5, seed=1, vocab=97):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- the cache
def test_append_stores_and_returns_views():
    cache = KVCache(n_layer=2, batch_size=1, n_kv_head=2, head_dim=4, capacity=6)
    k1, v1 = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    k_all, v_all = cache.append(0, k1, v1)
    assert k_all.shape == (1, 2, 3, 4) and torch.equal(k_all, k1) and torch.equal(v_all, v1)
    cache.append(1, k1, v1)
    assert cache.length == 3
    k2, v2 = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4)
    k_all, _ = cache.append(0, k2, v2)
    assert torch.equal(k_all, torch.cat([k1, k2], dim=2))
    assert k_all.data_ptr() == cache.k[0].data_ptr()     # a view into the preallocated buffer, not a copy
    with pytest.raises(RuntimeError, match="different lengths"):
        cache.length                                     # layer 1 has not caught up yet
    cache.append(1, k2, v2)
    assert cache.length == 4
    cache.truncate(2)
    assert cache.length == 2
    with pytest.raises(ValueError, match="length must be <= the tokens stored"):
        cache.truncate(3)
    cache.reset()
    assert cache.length == 0 and cache.capacity == 6


def test_overflow_raises_and_leaves_cache_intact():
    cache = KVCache(1, 1, 1, 2, capacity=3)
    cache.append(0, torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    with pytest.raises(CacheOverflowError, match="capacity is 3"):
        cache.append(0, torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    assert issubclass(CacheOverflowError, ValueError)
    assert cache.length == 2 and torch.equal(cache.k[0, 0, 0, 2], torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_measured_bytes_equal_formula(dtype):
    cache = KVCache(n_layer=3, batch_size=2, n_kv_head=2, head_dim=8, capacity=17, dtype=dtype)
    assert cache.nbytes == kv_cache_bytes(3, 2, 8, 17, dtype, batch_size=2) == 2 * 3 * 2 * 2 * 8 * 17 * dtype.itemsize


def test_for_model_shapes_follow_config():
    model = tiny_gpt(n_head=4, n_kv_head=1)
    cache = KVCache.for_model(model, batch_size=3, capacity=10)
    assert cache.k.shape == (2, 3, 1, 10, 8) and cache.k.dtype == torch.float32


@pytest.mark.parametrize("kwargs, err", [
    (dict(capacity=0), ValueError), (dict(capacity=2.0), TypeError), (dict(n_layer=True), TypeError),
    (dict(dtype=torch.int64), ValueError), (dict(dtype="float32"), TypeError), (dict(head_dim=-1), ValueError)])
def test_cache_bad_arguments(kwargs, err):
    args = dict(n_layer=1, batch_size=1, n_kv_head=1, head_dim=2, capacity=4) | kwargs
    with pytest.raises(err, match=next(iter(kwargs))):
        KVCache(**args)


def test_append_bad_arguments():
    cache = KVCache(2, 1, 2, 4, capacity=4)
    good = torch.zeros(1, 2, 1, 4)
    with pytest.raises(ValueError, match="layer must be < n_layer"):
        cache.append(2, good, good)
    with pytest.raises(ValueError, match=r"\(B=1, K=2, T, D=4\)"):
        cache.append(0, torch.zeros(1, 4, 1, 4), torch.zeros(1, 4, 1, 4))    # H heads instead of K
    with pytest.raises(ValueError, match="k_new and v_new"):
        cache.append(0, good, torch.zeros(1, 2, 2, 4))


def test_rss_growth_measures_the_formula_and_sees_a_wrong_shape():
    lengths = [512, 4096]
    measured = measure_cache_rss(2, 2, 64, lengths, dtypes=(torch.float32, torch.bfloat16))
    for dtype, growth in measured.items():
        for L, grown in zip(lengths, growth):
            expected = kv_cache_bytes(2, 2, 64, L, dtype)
            assert abs(grown - expected) <= 2**16 + 0.01 * expected, (dtype, L, grown, expected)
    # a cache with H = 2 x K heads would be told apart: the measurement is not the formula restated
    assert measure_cache_rss(2, 4, 64, [4096])[torch.float32][0] > 1.9 * kv_cache_bytes(2, 2, 64, 4096)
    with pytest.raises(TypeError, match="lengths"):
        measure_cache_rss(1, 1, 8, [])
    with pytest.raises(ValueError, match=r"lengths\[1\]"):
        measure_cache_rss(1, 1, 8, [4, 0])


def test_kv_cache_bytes_bad_arguments():
    with pytest.raises(ValueError, match="length"):
        kv_cache_bytes(1, 1, 1, -1)
    with pytest.raises(TypeError, match="dtype"):
        kv_cache_bytes(1, 1, 1, 1, dtype="float32")
    assert kv_cache_bytes(1, 1, 1, 0) == 0


# ---------------------------------------------------------------------------------------------- the loops
def test_prefill_logits_equal_model_forward_and_chunking_does_not_matter():
    model, idx = tiny_gpt(), prompt(T=9)
    with torch.no_grad():
        ref = model(idx)[0]
        cache = KVCache.for_model(model, 2, 9)
        whole = forward_cached(model, idx, cache)
        cache.reset()                                     # same tokens fed as 4 + 1 + 4: offset causal mask
        parts = torch.cat([forward_cached(model, idx[:, :4], cache), forward_cached(model, idx[:, 4:5], cache),
                           forward_cached(model, idx[:, 5:], cache)], dim=1)
    torch.testing.assert_close(whole, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(parts, ref, atol=ATOL, rtol=RTOL)
    assert cache.length == 9


@pytest.mark.parametrize("n_head, n_kv_head", [(4, 4), (4, 2), (4, 1)])   # MHA, GQA, MQA
@pytest.mark.parametrize("T0, n_new", [(1, 1), (1, 12), (7, 20)])
def test_cached_equals_naive(n_head, n_kv_head, T0, n_new):
    model, idx = tiny_gpt(n_head, n_kv_head, init_std=0.3), prompt(T=T0)   # sharper attention than 0.02
    cached, cached_logits = generate_cached(model, idx, n_new, return_logits=True)
    naive, naive_logits = generate_naive(model, idx, n_new, return_logits=True)
    assert cached.shape == (2, T0 + n_new) and cached_logits.shape == (2, n_new, 97)
    assert torch.equal(cached, naive)
    torch.testing.assert_close(cached_logits, naive_logits, atol=ATOL, rtol=RTOL)
    assert torch.equal(cached, model.generate(idx, n_new, temperature=0))        # shared's torch.cat cache


def test_cached_equals_transformers_generate():
    from shared.hf import to_hf

    model, idx = tiny_gpt(init_std=0.3), prompt(T=6)
    hf = to_hf(model)
    hf.generation_config.eos_token_id = None     # a random model may emit any id: never stop early
    with torch.no_grad():
        theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=15, do_sample=False,
                             pad_token_id=0)
    assert torch.equal(generate_cached(model, idx, 15), theirs)


def test_attend_equals_the_attention_module_and_reads_only_the_filled_slots():
    model = tiny_gpt(init_std=0.3)
    attn, x = model.blocks[0].attn, torch.randn(2, 6, 32)
    with torch.no_grad():
        ref = attn(x)                                                  # shared's own forward, start_pos 0
        big = KVCache.for_model(model, 2, capacity=50)                 # much more room than used
        ours = torch.cat([attend(attn, x[:, :4], big, 0, 0), attend(attn, x[:, 4:], big, 0, 4)], dim=1)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)


def test_decoding_runs_past_block_size():
    model, idx = tiny_gpt(init_std=0.3), prompt(T=5)                   # block_size 64: RoPE takes any length
    cached = generate_cached(model, idx, 80)
    assert torch.equal(cached, generate_naive(model, idx, 80))
    assert torch.equal(cached, model.generate(idx, 80, temperature=0, window=85))


def test_given_cache_is_reused_and_too_small_cache_overflows():
    model, idx = tiny_gpt(), prompt(T=4)
    cache = KVCache.for_model(model, 2, capacity=4 + 10 - 1)      # exactly enough: the last token is not fed
    first = generate_cached(model, idx, 10, cache)
    assert cache.length == 13
    assert torch.equal(generate_cached(model, idx, 10, cache), first)   # reset on entry, same answer
    with pytest.raises(CacheOverflowError, match="capacity is 13"):
        generate_cached(model, idx, 11, cache)


def test_not_advancing_rope_changes_decoding_but_not_prefill():
    model, idx = tiny_gpt(init_std=0.3), prompt(T=6)
    _, good = generate_cached(model, idx, 8, return_logits=True)
    _, bad = generate_cached(model, idx, 8, advance_rope=False, return_logits=True)
    torch.testing.assert_close(bad[:, 0], good[:, 0], atol=0, rtol=0)   # step 0 comes from the prefill
    assert (bad[:, 1:] - good[:, 1:]).abs().amax() > 1e-2


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("context", [1, 5, 33])
def test_step_flops_match_flop_counter(cached, context):
    model = tiny_gpt(n_kv_head=2)
    with torch.no_grad():
        cache = KVCache.for_model(model, 1, context)
        if cached and context > 1:
            forward_cached(model, torch.zeros(1, context - 1, dtype=torch.long), cache)
        idx = torch.zeros(1, 1 if cached else context, dtype=torch.long)
        # the math SDPA backend is made of matmuls the counter sees; CPU's fused kernel is not counted
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            forward_cached(model, idx, cache) if cached else model(idx)
    assert counter.get_total_flops() == step_flops(model.cfg, context, cached)


# ---------------------------------------------------------------------------------------------- bad inputs
class Wrapped(torch.nn.Module):
    """A plug-in attention (attn_factory): the cached loop cannot see inside it and must refuse it."""

    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.inner = Attention(cfg, layer_idx)

    def forward(self, x, start_pos=0, cache=None):
        return self.inner(x, start_pos, cache)


def test_loops_restore_training_mode():
    model = tiny_gpt().train()
    generate_cached(model, prompt(), 2)
    generate_naive(model, prompt(), 2)
    assert model.training


def test_loop_bad_arguments():
    model = tiny_gpt()
    with pytest.raises(TypeError, match="model must be a shared.model.GPT"):
        generate_cached(torch.nn.Linear(2, 2), prompt(), 3)
    with pytest.raises(ValueError, match="causal RoPE"):
        generate_cached(tiny_gpt(pos="learned"), prompt(), 3)
    plugged = GPT(model.cfg, attn_factory=lambda cfg, i: Wrapped(cfg, i))
    with pytest.raises(TypeError, match="shared's Attention"):
        generate_cached(plugged, prompt(), 3)
    with pytest.raises(ValueError, match=r"prompt must be \(B, T >= 1\)"):
        generate_cached(model, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(TypeError, match="prompt must be a long tensor"):
        generate_naive(model, torch.zeros(1, 3), 3)
    with pytest.raises(TypeError, match="prompt must be a long tensor"):
        generate_naive(model, [[1, 2]], 3)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate_cached(model, prompt(), 0)
    with pytest.raises(TypeError, match="max_new_tokens must be an int"):
        generate_naive(model, prompt(), 2.5)
    with pytest.raises(ValueError, match="batch"):
        forward_cached(model, prompt(B=3), KVCache.for_model(model, 2, 8))
    with pytest.raises(ValueError, match="SwiGLU"):
        step_flops(GPTConfig(vocab_size=8, act="gelu"), 4, True)


def test_fill_random_marks_the_cache_filled_with_values_and_checks_capacity():
    cache = KVCache(2, 3, 2, 4, capacity=16)
    cache.fill_random(10, torch.Generator().manual_seed(0))
    assert cache.length == 10
    assert cache.k[:, :, :, :10].abs().sum() > 0 and cache.v[:, :, :, 10:].abs().sum() == 0
    k, _ = cache.append(1, torch.zeros(3, 2, 1, 4), torch.zeros(3, 2, 1, 4))
    assert k.shape == (3, 2, 11, 4)
    with pytest.raises(CacheOverflowError, match="cannot fill 17"):
        cache.fill_random(17)
    with pytest.raises(ValueError, match="length must be >= 0"):
        cache.fill_random(-1)


def test_rss_is_measurable_says_why():
    ok, why = rss_is_measurable()
    assert isinstance(ok, bool) and why
    if sys.platform == "linux" and platform.libc_ver()[0] == "glibc":
        assert ok


def test_decoding_loops_move_cpu_prompts_to_the_models_device():
    # The GPU rule without a GPU: the model on `meta`, the prompt built on the CPU; inside device_guard an input on
    # another device than a layer raises a ValueError. Greedy decoding reads no value, so both loops run to the end.
    from shared.validate import device_guard

    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, d_model=16)).to("meta")
    prompt = torch.zeros((2, 3), dtype=torch.long)
    with device_guard(model):
        for loop in (generate_cached, generate_naive):
            out = loop(model, prompt, 4)
            assert out.shape == (2, 7) and out.device.type == "meta"
