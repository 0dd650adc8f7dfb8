"""Tests for gqa.py: every attention path against references (stated tolerances), conversion, caches, errors."""
import pytest
import torch
import torch.nn.functional as F

import gqa
from shared.model import GPT, GPTConfig, decode, greedy_next, rebuild

ATOL = 1e-5   # float32 attention of unit-scale inputs computed in another order


def cfg(n_kv=8, **kw):
    return GPTConfig(**{**dict(vocab_size=97, block_size=64, n_layer=2, n_head=8, n_kv_head=n_kv, d_model=64), **kw})


@pytest.mark.parametrize("H,K,T,S", [(8, 8, 5, 5), (8, 2, 5, 9), (8, 1, 1, 7), (4, 2, 1, 1), (6, 3, 3, 3)])
def test_three_kernels_agree_with_sdpa_enable_gqa(H, K, T, S):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, H, T, 16, generator=g), torch.randn(2, K, S, 16, generator=g), torch.randn(2, K, S, 16, generator=g)
    mask = gqa.causal_mask(T, S)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    for fn in (gqa.attend_repeat, gqa.attend_grouped, gqa.attend_sdpa):
        torch.testing.assert_close(fn(q, k, v), ref, atol=ATOL, rtol=0)


def test_repeat_kv_matches_repeat_interleave_and_causal_mask_offsets():
    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(gqa.repeat_kv(x, 4), x.repeat_interleave(4, dim=1))
    assert gqa.causal_mask(1, 4).tolist() == [[True, True, True, True]]
    assert gqa.causal_mask(2, 3).tolist() == [[True, True, False], [True, True, True]]


@pytest.mark.parametrize("n_kv", [8, 4, 2, 1])
@pytest.mark.parametrize("kernel", gqa.KERNELS)
def test_module_equals_shared_attention_and_cached_decode_equals_recompute(n_kv, kernel):
    torch.manual_seed(0)
    ref = GPT(cfg(n_kv)).eval()
    ours = rebuild(ref, gqa.grouped_factory(kernel))
    idx = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], ref(idx)[0], atol=ATOL, rtol=0)
        # prefill + one token at a time through the per-layer cache dicts == one full forward
        caches = [{} for _ in ours.blocks]
        steps = [ours(idx[:, :7], caches=caches)[0]] + [ours(idx[:, t:t + 1], start_pos=t, caches=caches)[0]
                                                      for t in range(7, 20)]
        torch.testing.assert_close(torch.cat(steps, 1), ours(idx)[0], atol=ATOL, rtol=0)
    assert caches[0]["length"] == 20 and caches[0]["k"].shape[:2] == (3, n_kv)
    assert gqa.cache_bytes(caches) == gqa.kv_bytes_per_token(2, n_kv, 8) * 3 * 20
    assert gqa.cache_bytes(caches, allocated=True) == gqa.kv_bytes_per_token(2, n_kv, 8) * 3 * 32


def test_decode_with_cache_equals_without():
    torch.manual_seed(1)
    for factory in (gqa.grouped_factory("grouped"), gqa.latent_factory(16), gqa.latent_factory(16, absorbed=True)):
        model = GPT(cfg(2), attn_factory=factory).eval()
        prompt = torch.randint(0, 97, (2, 4))
        assert torch.equal(decode(model, prompt, 40, greedy_next), decode(model, prompt, 40, greedy_next, use_cache=False))


def test_hf_llama_with_num_key_value_heads():
    from shared.hf import to_hf
    torch.manual_seed(2)
    ref = GPT(cfg(2)).eval()
    ours = rebuild(ref, gqa.grouped_factory("grouped"))
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        theirs = to_hf(ref)(idx).logits
        torch.testing.assert_close(ours(idx)[0], theirs, atol=1e-4, rtol=0)


def test_latent_attention_with_identity_down_projection_is_mha():
    torch.manual_seed(3)
    mha = GPT(cfg(8, n_layer=1, pos="none")).eval()
    idx = torch.randint(0, 97, (2, 12))
    for absorbed in (False, True):
        mla = GPT(cfg(8, n_layer=1, pos="none"), attn_factory=gqa.latent_factory(64, absorbed=absorbed)).eval()
        state = {k: v for k, v in mha.state_dict().items() if "k_proj" not in k and "v_proj" not in k}
        a = mha.blocks[0].attn
        state.update({"blocks.0.attn.kv_down.weight": torch.eye(64), "blocks.0.attn.k_up.weight": a.k_proj.weight,
                      "blocks.0.attn.v_up.weight": a.v_proj.weight})
        mla.load_state_dict(state)
        with torch.no_grad():
            torch.testing.assert_close(mla(idx)[0], mha(idx)[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("pos,rope_dim", [("rope", 4), ("rope", None), ("none", 0)])
def test_absorbed_latent_attention_equals_naive_and_caches_rank_plus_rope_dims(pos, rope_dim):
    torch.manual_seed(5)
    naive = GPT(cfg(8, pos=pos), attn_factory=gqa.latent_factory(12, rope_dim)).eval()
    absorbed = rebuild(naive, gqa.latent_factory(12, rope_dim, absorbed=True))
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(absorbed(idx)[0], naive(idx)[0], atol=ATOL, rtol=0)
        caches = [{} for _ in absorbed.blocks]
        steps = [absorbed(idx[:, :6], caches=caches)[0]] + [absorbed(idx[:, t:t + 1], start_pos=t, caches=caches)[0]
                                                         for t in range(6, 20)]
        torch.testing.assert_close(torch.cat(steps, 1), naive(idx)[0], atol=ATOL, rtol=0)
    dr = absorbed.blocks[0].attn.rope_dim
    assert dr == (0 if pos == "none" else rope_dim or 4)            # default: head_dim // 2 = 4 with RoPE
    assert gqa.cache_bytes(caches) == gqa.latent_bytes_per_token(2, 12, dr) * 2 * 20


def test_uptrain_is_train_at_a_constant_rate_and_evaluates_at_each_budget():
    from shared.train import train
    tokens = torch.randint(0, 97, (2000,))
    torch.manual_seed(6)
    a = GPT(cfg(2)).train()
    b = rebuild(a).train()
    seen = []
    curve = gqa.uptrain(a, tokens, lambda m: seen.append(m.training) or float(len(seen)), (3, 1), lr=1e-3,
                        batch_size=2, seq_len=16, seed=3, progress=False)
    hist = train(b, tokens, steps=3, lr=1e-3, lr_schedule=lambda s: 1e-3, batch_size=2, seq_len=16, seed=3,
                 progress=False)
    assert list(curve) == [0, 1, 3] and hist.lr == [1e-3] * 3
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_bigram_model_matches_counts():
    tokens = torch.tensor([0, 1, 0, 1, 0, 2])                        # after 0: 1 twice, 2 once
    model = gqa.BigramModel(tokens, 3, smoothing=1.0)
    probs = model(torch.tensor([[0]]))[0][0, 0].exp()
    torch.testing.assert_close(probs, torch.tensor([1 / 6, 3 / 6, 2 / 6]))
    loss = model(torch.tensor([[0, 1]]), torch.tensor([[1, 0]]))[1]
    torch.testing.assert_close(loss, -(torch.tensor(3 / 6).log() + torch.tensor(3 / 5).log()) / 2)   # after 1: 0 twice


def test_conversion_mean_pools_and_keeps_function_when_heads_are_equal():
    torch.manual_seed(4)
    mha = GPT(cfg(8)).eval()
    conv = gqa.convert_to_gqa(mha, 2)
    w = mha.blocks[0].attn.k_proj.weight.view(8, 8, -1)
    torch.testing.assert_close(conv.blocks[0].attn.k_proj.weight.view(2, 8, -1), w.view(2, 4, 8, -1).mean(1))
    assert conv.cfg.n_kv_head == 2 and conv.blocks[0].attn.k_proj.weight.shape == (16, 64)
    # n_kv = n_head: nothing pooled; any grouping only reorders heads -> same function
    idx = torch.randint(0, 97, (2, 10))
    same = gqa.convert_to_gqa(mha, 8)
    shuffled_one_head_groups = [[h] for h in [3, 1, 0, 2, 7, 5, 6, 4]]
    with torch.no_grad():
        assert torch.equal(same(idx)[0], mha(idx)[0])
        torch.testing.assert_close(gqa.convert_to_gqa(mha, 8, groups=shuffled_one_head_groups)(idx)[0], mha(idx)[0],
                                   atol=ATOL, rtol=0)
    # heads made identical within groups {0,5},{1,2},... -> pooling them loses nothing, whatever the order
    groups = [[0, 5], [1, 2], [3, 7], [4, 6]]
    state = mha.state_dict()
    for i in range(2):
        for name in ("k_proj", "v_proj"):
            wk = state[f"blocks.{i}.attn.{name}.weight"].view(8, 8, -1)
            for g in groups:
                wk[g[1]] = wk[g[0]]
    mha.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(gqa.convert_to_gqa(mha, 4, groups=groups)(idx)[0], mha(idx)[0], atol=ATOL, rtol=0)
        dist = gqa.head_distances(mha, idx)
    assert gqa.similarity_groups(dist, 4)[0] == groups
    assert gqa.grouping_cost(dist[0], groups) < 1e-8
    first = gqa.convert_to_gqa(mha, 4, groups=groups, pool="first")
    with torch.no_grad():
        torch.testing.assert_close(first(idx)[0], mha(idx)[0], atol=ATOL, rtol=0)


def test_partitions_and_groupings():
    assert len(list(gqa.equal_partitions(8, 2))) == 105
    assert len(list(gqa.equal_partitions(8, 4))) == 35
    assert len(list(gqa.equal_partitions(8, 8))) == 1
    assert gqa.contiguous_groups(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    g = gqa.random_groups(8, 4, seed=0)
    assert sorted(h for grp in g for h in grp) == list(range(8)) and {len(x) for x in g} == {2}


def test_byte_formulas():
    assert gqa.kv_bytes_per_token(32, 8, 128, 2) == 131072            # Llama-3-8B, bf16: 128 KiB per token
    assert gqa.latent_bytes_per_token(60, 512, 64, 2) == 69120         # DeepSeek-V2: (512 + 64) x 60 layers x 2 B


@pytest.mark.parametrize("call,error", [
    (lambda: gqa.attend_grouped(torch.randn(1, 6, 2, 4), torch.randn(1, 4, 2, 4), torch.randn(1, 4, 2, 4)), ValueError),
    (lambda: gqa.attend_grouped(torch.randn(1, 4, 3, 4), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4)), ValueError),
    (lambda: gqa.attend_repeat(torch.randn(4, 2, 4), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4)), ValueError),
    (lambda: gqa.attend_sdpa(torch.randn(1, 4, 2, 4), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 3, 4)), ValueError),
    (lambda: gqa.GroupedAttention(cfg(2), kernel="flash"), ValueError),
    (lambda: gqa.GroupedAttention(cfg(2, pos="learned")), ValueError),
    (lambda: gqa.grouped_factory("nope"), ValueError),
    (lambda: gqa.latent_factory(0), ValueError),
    (lambda: gqa.LatentAttention(cfg(), rank=1.5), ValueError),
    (lambda: gqa.LatentAttention(cfg(), rank=8, rope_dim=0), ValueError),
    (lambda: gqa.LatentAttention(cfg(), rank=8, rope_dim=3), ValueError),
    (lambda: gqa.uptrain(GPT(cfg(2)), torch.zeros(100, dtype=torch.long), float, (), lr=1e-3), ValueError),
    (lambda: gqa.BigramModel(torch.zeros(1, dtype=torch.long), 3), ValueError),
    (lambda: gqa.convert_to_gqa("model", 2), TypeError),
    (lambda: gqa.convert_to_gqa(GPT(cfg(2)), 1), ValueError),
    (lambda: gqa.convert_to_gqa(GPT(cfg(8)), 3), ValueError),
    (lambda: gqa.convert_to_gqa(GPT(cfg(8)), 2, pool="max"), ValueError),
    (lambda: gqa.convert_to_gqa(GPT(cfg(8)), 2, groups=[[0, 1, 2, 3], [3, 4, 5, 6]]), ValueError),
    (lambda: gqa.convert_to_gqa(GPT(cfg(8)), 4, groups=[[0, 1, 2, 3], [4, 5, 6, 7]]), ValueError),
    (lambda: gqa.kv_bytes_per_token(0, 8, 128), ValueError),
    (lambda: gqa.latent_bytes_per_token(2, 32, rope_dim=-1), ValueError),
    (lambda: gqa.contiguous_groups(8, 3), ValueError),
    (lambda: list(gqa.equal_partitions(8, 3)), ValueError),
])
def test_bad_arguments_raise(call, error):
    with pytest.raises(error):
        call()


def test_cache_position_mismatch_raises():
    model = GPT(cfg(2), attn_factory=gqa.grouped_factory()).eval()
    caches = [{} for _ in model.blocks]
    with torch.no_grad():
        model(torch.zeros(1, 5, dtype=torch.long), caches=caches)
        with pytest.raises(ValueError, match="start_pos"):
            model(torch.zeros(1, 1, dtype=torch.long), start_pos=3, caches=caches)


def test_helpers_move_cpu_inputs_to_the_models_device():
    # The GPU rule without a GPU: the checkpoint on `meta`, the token ids on the CPU; inside device_guard an input on
    # another device than a layer raises a ValueError. The conversion builds its model on the checkpoint's device.
    from shared.validate import device_guard

    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, d_model=32)).to("meta")
    with device_guard(model):
        dist = gqa.head_distances(model, torch.randint(0, 50, (2, 16)))
    assert dist.shape == (2, 4, 4) and dist.device.type == "meta"
    converted = gqa.convert_to_gqa(model, 2)
    assert converted.tok_emb.weight.device.type == "meta"
    with device_guard(converted):
        assert converted(torch.randint(0, 50, (2, 16)).to("meta"))[0].shape == (2, 16, 50)
