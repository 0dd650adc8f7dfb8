"""Tests for long_context.py: band masks vs a brute-force loop, sliding-window attention vs full attention, the
rolling cache vs full recomputation, RoPE scaling tables vs transformers, tiled attention vs SDPA, bad arguments."""
import pytest
import torch
import torch.nn.functional as F

import long_context as lc
from shared.model import GPT, Attention, GPTConfig, decode, greedy_next


def tiny_cfg(**kw):
    base = dict(vocab_size=40, block_size=32, n_layer=2, n_head=4, n_kv_head=2, d_model=32)
    base.update(kw)
    return GPTConfig(**base)


@pytest.mark.parametrize("T,W,S", [(0, 1, 0), (1, 1, 0), (9, 1, 0), (12, 4, 0), (12, 4, 3), (10, 20, 2), (6, 2, 6)])
def test_band_mask_matches_loop(T, W, S):
    pos = torch.arange(T)
    assert torch.equal(lc.band_mask(pos, pos, W, S), lc.band_mask_loop(T, W, S))


def test_band_mask_offset_queries():
    # queries at positions 10..12 against keys 0..12: rows equal the last rows of the square mask
    m = lc.band_mask(torch.arange(10, 13), torch.arange(13), 4, 2)
    assert torch.equal(m, lc.band_mask_loop(13, 4, 2)[10:])


def test_band_mask_rows_bounded():
    m = lc.band_mask(torch.arange(50), torch.arange(50), 5, 3)
    assert int(m.sum(1).max()) == 8 and bool(m.diagonal().all())


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_band_mask_bad_window(bad, exc):
    with pytest.raises(exc, match="window"):
        lc.band_mask(torch.arange(3), torch.arange(3), bad)


def test_bad_sinks():
    with pytest.raises(ValueError, match="sinks"):
        lc.sliding_factory(4, -1)


def test_sliding_factory_per_layer():
    """A band in chosen layers only: those layers get SlidingWindowAttention, the others plain Attention; banding
    layer 1 alone changes logits only past the window, and banding every listed layer equals the all-layer band."""
    torch.manual_seed(0)
    cfg = tiny_cfg(block_size=40)
    full = GPT(cfg).eval()
    last = GPT(cfg, attn_factory=lc.sliding_factory(4, layers=[1])).eval()
    both = GPT(cfg, attn_factory=lc.sliding_factory(4, layers=(0, 1))).eval()
    every = GPT(cfg, attn_factory=lc.sliding_factory(4)).eval()
    assert [type(b.attn) for b in last.blocks] == [Attention, lc.SlidingWindowAttention]
    for m in (last, both, every):
        m.load_state_dict(full.state_dict())
    x = torch.randint(0, 40, (2, 40))
    with torch.no_grad():
        lf, ll = full(x)[0], last(x)[0]
        torch.testing.assert_close(ll[:, :4], lf[:, :4], atol=1e-5, rtol=0)      # inside the window: the same
        assert (ll[:, 4:] - lf[:, 4:]).abs().max() > 1e-3                         # past it: the band bites
        torch.testing.assert_close(both(x)[0], every(x)[0], atol=0, rtol=0)


def test_with_attention_copies_weights():
    """The copy reads the same weights through another attention: a wide band equals the original's logits, a
    narrow one differs past the window; training the copy leaves the original untouched."""
    torch.manual_seed(0)
    full = GPT(tiny_cfg(block_size=40)).train()
    x = torch.randint(0, 40, (2, 40))
    wide, narrow = lc.with_attention(full, lc.sliding_factory(40)), lc.with_attention(full, lc.sliding_factory(4))
    assert not wide.training and isinstance(narrow.blocks[0].attn, lc.SlidingWindowAttention)
    plain = lc.with_attention(wide)                                   # None: back to the shared Attention
    assert type(plain.blocks[0].attn) is Attention
    with torch.no_grad():
        ref = full.eval()(x)[0]
        torch.testing.assert_close(wide(x)[0], ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(plain(x)[0], ref, atol=1e-5, rtol=0)
        assert (narrow(x)[0][:, 4:] - ref[:, 4:]).abs().max() > 1e-3
        next(narrow.parameters()).add_(1.0)
    torch.testing.assert_close(full(x)[0], ref, atol=0, rtol=0)


def test_with_attention_rejects_non_gpt():
    with pytest.raises(TypeError, match="GPT"):
        lc.with_attention(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("layers", [[], [-1], [True], [0.5]])
def test_sliding_factory_bad_layers(layers):
    with pytest.raises(ValueError, match="layers"):
        lc.sliding_factory(4, layers=layers)


def test_sliding_factory_layer_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        GPT(tiny_cfg(), attn_factory=lc.sliding_factory(4, layers=[2]))


def test_sliding_rejects_unsupported_config():
    with pytest.raises(ValueError, match="pos"):
        lc.SlidingWindowAttention(tiny_cfg(pos="alibi"), 0, window=4)
    with pytest.raises(ValueError, match="causal"):
        lc.SlidingWindowAttention(tiny_cfg(causal=False), 0, window=4)


def test_wide_window_equals_full_attention():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    full = GPT(cfg).eval()
    sw = GPT(cfg, attn_factory=lc.sliding_factory(40)).eval()
    sw.load_state_dict(full.state_dict())
    x = torch.randint(0, 40, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(sw(x)[0], full(x)[0], atol=1e-5, rtol=0)


def test_narrow_window_matches_explicit_masked_attention():
    torch.manual_seed(0)
    cfg = tiny_cfg(n_layer=1)
    attn = lc.SlidingWindowAttention(cfg, 0, window=3, sinks=1).eval()
    x = torch.randn(1, 10, 32)
    with torch.no_grad():
        y = attn(x)
        attn.store_weights = True
        y_explicit = attn(x)
    torch.testing.assert_close(y, y_explicit, atol=1e-5, rtol=0)
    w = attn.last_weights[0, 0]
    assert torch.equal(w > 0, lc.band_mask_loop(10, 3, 1))


@pytest.mark.parametrize("W,S", [(1, 0), (5, 0), (5, 2), (6, 6)])
def test_streaming_equals_full_recompute(W, S):
    torch.manual_seed(1)
    model = GPT(tiny_cfg(), attn_factory=lc.sliding_factory(W, S)).eval()
    prompt = torch.randint(0, 40, (2, 4))
    a = decode(model, prompt, 40, greedy_next, window=10**9, use_cache=True)
    b = decode(model, prompt, 40, greedy_next, window=10**9, use_cache=False)
    assert torch.equal(a, b)


def test_rolling_cache_bounded_and_prompt_chunks():
    torch.manual_seed(2)
    cfg = tiny_cfg()
    model = GPT(cfg, attn_factory=lc.sliding_factory(6, 2)).eval()
    ids = torch.randint(0, 40, (1, 50))
    caches = [{} for _ in model.blocks]
    outs = []
    with torch.no_grad():
        for s in range(0, 50, 7):                                  # chunks longer than the window
            outs.append(model(ids[:, s:s + 7], start_pos=s, caches=caches)[0])
            for c in caches:
                assert c["k"].shape[2] <= 8 and c["k"].shape == c["v"].shape
        full = model(ids)[0]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=0)
    assert caches[0]["pos"].tolist() == [0, 1, 44, 45, 46, 47, 48, 49]
    assert lc.kv_cache_bytes_formula(2, 1, 2, 8, 8) == sum(c[k].numel() * 4 for c in caches for k in ("k", "v"))


@pytest.mark.parametrize("T,W,S", [(40, 8, 3), (30, 5, 1), (12, 4, 8)])
def test_renumbered_sinks_match_loop(T, W, S):
    """renumber=True: the sink scores use cache-slot positions; checked one query at a time on raw q/k."""
    import dataclasses
    torch.manual_seed(3)
    cfg = tiny_cfg()                                                # 4 query heads, 2 key/value heads
    attn = lc.SlidingWindowAttention(cfg, 0, window=W, sinks=S, renumber=True).eval()
    raw = lc.SlidingWindowAttention(dataclasses.replace(cfg, pos="none"), 0, window=W, sinks=S).eval()
    raw.load_state_dict(attn.state_dict())
    x = torch.randn(2, T, 32)
    with torch.no_grad():
        q, k, v = raw.project(x)                                   # no RoPE: the loop rotates by rank
        ref = lc.renumbered_attention_loop(q, k, v, W, S, cfg.rope_theta)
        ref = raw.o_proj(ref.transpose(1, 2).reshape(2, T, 32))
        torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=0)


def test_renumbering_changes_only_what_it_should():
    torch.manual_seed(4)
    cfg = tiny_cfg(n_layer=1)
    plain = lc.SlidingWindowAttention(cfg, 0, window=5, sinks=2).eval()
    renum = lc.SlidingWindowAttention(cfg, 0, window=5, sinks=2, renumber=True).eval()
    renum.load_state_dict(plain.state_dict())
    nosink = lc.SlidingWindowAttention(cfg, 0, window=5, renumber=True).eval()
    nosink.load_state_dict(plain.state_dict())
    x = torch.randn(1, 20, 32)
    with torch.no_grad():
        a, b = plain(x), renum(x)
        torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-5, rtol=0)       # p < S + W: nothing evicted yet
        assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3                          # past it, sinks move closer
        plain_band = lc.SlidingWindowAttention(cfg, 0, window=5).eval()
        plain_band.load_state_dict(plain.state_dict())
        torch.testing.assert_close(nosink(x), plain_band(x), atol=1e-6, rtol=0)  # no sinks: nothing to renumber


def test_renumbered_streaming_equals_full_recompute():
    torch.manual_seed(5)
    model = GPT(tiny_cfg(), attn_factory=lc.sliding_factory(5, 2, renumber=True)).eval()
    prompt = torch.randint(0, 40, (2, 4))
    a = decode(model, prompt, 40, greedy_next, window=10**9, use_cache=True)
    b = decode(model, prompt, 40, greedy_next, window=10**9, use_cache=False)
    assert torch.equal(a, b)


def test_renumber_bad_arguments():
    with pytest.raises(TypeError, match="renumber must be a bool"):
        lc.SlidingWindowAttention(tiny_cfg(), 0, window=4, sinks=1, renumber=1)
    with pytest.raises(ValueError, match="cfg.pos must be 'rope'"):
        lc.SlidingWindowAttention(tiny_cfg(pos="none"), 0, window=4, sinks=1, renumber=True)


@pytest.mark.parametrize("D", [8, 16, 64])
@pytest.mark.parametrize("factor", [1.0, 2.0, 4.0, 10.0])
def test_rope_tables_match_transformers(D, factor):
    L0 = 64
    L = int(L0 * factor)
    ref, _ = lc.hf_inv_freq("linear", D, 10000.0, L0, factor)
    torch.testing.assert_close(lc.linear_inv_freq(D, 10000.0, factor), ref, atol=0, rtol=1e-6)
    for seq_len in (L0 // 2, L, 3 * L):
        ref, _ = lc.hf_inv_freq("dynamic", D, 10000.0, L0, factor, seq_len=seq_len)
        torch.testing.assert_close(lc.dynamic_ntk_inv_freq(D, 10000.0, factor, seq_len, L0), ref, atol=0, rtol=1e-6)
    ref, ref_scale = lc.hf_inv_freq("yarn", D, 10000.0, L0, factor)
    ours, scale = lc.yarn_inv_freq(D, 10000.0, factor, L0)
    torch.testing.assert_close(ours, ref, atol=0, rtol=1e-6)
    assert scale == pytest.approx(ref_scale, abs=1e-12)


def test_dynamic_is_plain_up_to_trained_length():
    torch.testing.assert_close(lc.dynamic_ntk_inv_freq(32, 10000.0, 4.0, 50, 64), lc.rope_inv_freq(32, 10000.0))


def test_scaled_rope_plain_table_equals_shared_gpt():
    torch.manual_seed(3)
    cfg = tiny_cfg()
    full = GPT(cfg).eval()
    scaled = GPT(cfg, attn_factory=lc.ScaledRopeAttention).eval()
    scaled.load_state_dict(full.state_dict())
    x = torch.randint(0, 40, (2, 70))
    with torch.no_grad():
        torch.testing.assert_close(scaled(x)[0], full(x)[0], atol=1e-5, rtol=0)
        lc.set_rope_scaling(scaled, "linear", 32, 64)
        assert (scaled(x)[0] - full(x)[0]).abs().max() > 1e-4   # random init: small but far above float noise


def test_rope_bad_arguments():
    with pytest.raises(ValueError, match="factor"):
        lc.linear_inv_freq(16, 10000.0, 0.5)
    with pytest.raises(TypeError, match="factor"):
        lc.yarn_inv_freq(16, 10000.0, "2", 64)
    with pytest.raises(ValueError, match="head_dim"):
        lc.rope_inv_freq(15)
    with pytest.raises(ValueError, match="scaling"):
        lc.scaled_inv_freq("ntk", 16, 10000.0, 64, 128)
    with pytest.raises(ValueError, match="pos"):
        lc.ScaledRopeAttention(tiny_cfg(pos="none"))
    with pytest.raises(TypeError, match="ScaledRopeAttention"):
        lc.set_rope_scaling(GPT(tiny_cfg()), "linear", 32, 64)
    a = lc.ScaledRopeAttention(tiny_cfg())
    with pytest.raises(ValueError, match="inv_freq"):
        a.set_rope(torch.ones(3))
    with pytest.raises(ValueError, match="cache"):
        a(torch.randn(1, 2, 32), cache={})


@pytest.mark.parametrize("T,T_k,bq,bk,causal", [(1, 1, 4, 4, True), (37, 37, 8, 5, True), (20, 45, 7, 16, True),
                                               (33, 50, 64, 64, False), (16, 16, 1, 1, True)])
def test_tiled_attention_matches_sdpa(T, T_k, bq, bk, causal):
    torch.manual_seed(4)
    q = torch.randn(2, 3, T, 16)
    k, v = torch.randn(2, 2, 3, T_k, 16).unbind(0)
    mask = torch.ones(T, T_k, dtype=torch.bool).tril(T_k - T) if causal else None
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(lc.tiled_attention(q, k, v, bq, bk, causal=causal), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T,T_k,bq,bk,W", [(40, 40, 8, 8, 1), (40, 40, 8, 8, 5), (37, 37, 16, 7, 12), (20, 45, 7, 16, 9),
                                           (64, 64, 16, 16, 100)])
def test_tiled_band_matches_sdpa_and_explicit(T, T_k, bq, bk, W):
    torch.manual_seed(5)
    q = torch.randn(2, 3, T, 16)
    k, v = torch.randn(2, 2, 3, T_k, 16).unbind(0)
    mask = lc.band_mask(torch.arange(T_k - T, T_k), torch.arange(T_k), W)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(lc.tiled_attention(q, k, v, bq, bk, window=W), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lc.explicit_attention(q, k, v, window=W), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lc.explicit_attention(q, k, v), F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.ones(T, T_k, dtype=torch.bool).tril(T_k - T)), atol=1e-5, rtol=1e-5)


def test_tiled_attention_bad_arguments():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="causal"):
        lc.tiled_attention(q, q, q, window=2, causal=False)
    with pytest.raises(ValueError, match="window"):
        lc.tiled_attention(q, q, q, window=0)
    with pytest.raises(ValueError, match="need q"):
        lc.explicit_attention(q, torch.randn(1, 1, 4, 6), torch.randn(1, 1, 4, 6))
    with pytest.raises(ValueError, match="block_q"):
        lc.tiled_attention(q, q, q, block_q=0)
    with pytest.raises(ValueError, match="need q"):
        lc.tiled_attention(q, torch.randn(1, 1, 4, 6), torch.randn(1, 1, 4, 6))


# ---------------------------------------------------------------------------------------------------------
# Whole-model references: transformers' Mistral (sliding window) and Llama (rope_parameters)
def _hf_weights(cfg):
    from shared import hf as shf
    torch.manual_seed(0)
    base = GPT(cfg).eval()
    return base, shf.to_hf(base).state_dict()


@pytest.mark.parametrize("window", [4, 16])
def test_sliding_model_matches_mistral(window):
    from transformers import MistralConfig, MistralForCausalLM
    from shared import hf as shf
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_kv_head=2, d_model=32)
    base, sd = _hf_weights(cfg)
    mistral = MistralForCausalLM(MistralConfig(**shf.llama_config_kwargs(cfg), sliding_window=window)).eval()
    mistral.load_state_dict(sd)
    ours = GPT(cfg, attn_factory=lc.sliding_factory(window=window)).eval()
    ours.load_state_dict(base.state_dict())
    x = torch.randint(0, 50, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], mistral(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn"])
def test_scaled_rope_model_matches_llama(rope_type):
    from transformers import LlamaConfig, LlamaForCausalLM
    from shared import hf as shf
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_kv_head=2, d_model=32)
    base, sd = _hf_weights(cfg)
    L = 64
    params = {"rope_type": rope_type, "rope_theta": cfg.rope_theta, "factor": 1.0 if rope_type == "dynamic" else L / 16}
    if rope_type == "yarn":
        params["original_max_position_embeddings"] = 16
    llama = LlamaForCausalLM(LlamaConfig(**dict(shf.llama_config_kwargs(cfg), rope_parameters=params),
                                         attention_bias=False, mlp_bias=False)).eval()
    llama.load_state_dict(sd)
    ours = GPT(cfg, attn_factory=lc.ScaledRopeAttention).eval()
    ours.load_state_dict(base.state_dict())
    lc.set_rope_scaling(ours, rope_type, 16, L)
    x = torch.randint(0, 50, (2, L))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], llama(x).logits, atol=1e-5, rtol=0)


def test_loss_by_position_averages_to_the_loss():
    torch.manual_seed(6)
    model = GPT(tiny_cfg()).eval()
    stream = torch.randint(0, 40, (200,))
    per_pos = lc.loss_by_position(model, stream, 16, 3)
    assert per_pos.shape == (16,)
    x, y = stream[:48].view(3, 16), stream[1:49].view(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(per_pos.mean(), model(x, y)[1], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="need n_seq"):
        lc.loss_by_position(model, stream, 100, 2)
    with pytest.raises(TypeError, match="1-D"):
        lc.loss_by_position(model, stream.view(10, 20), 4, 1)


# ----------------------------------------------------------------------------------------------------------
# Recall at a distance
def _recall_setup(n=12, seed=3):
    from shared import data, zoo
    _, tok = zoo.load("stories-base")
    rows = data.stories(n_train=0, n_val=n, n_test=0, seed=seed)["validation"]
    return tok, rows, lc.recall_items(tok, rows)


def test_recall_items_point_at_the_planted_and_recalled_object():
    tok, rows, items = _recall_setup()
    assert len(items) == len(rows)
    for it, st in zip(items, rows):
        obj = tok.encode(" " + st["object"])
        assert len(obj) == 1 and it.target == obj[0]
        assert it.ids[it.query + 1] == it.target == it.ids[it.query - it.distance]
        assert tok.decode(list(it.ids[:it.query + 1])).endswith(f"the {st['colour']}")
        assert it.sentences == st["recall_distance"]
        assert it.target not in it.ids[it.query - it.distance + 1:it.query + 1]   # fillers never name the object
    by_sentences = {}
    for it in items:
        by_sentences.setdefault(it.sentences, []).append(it.distance)
    means = [sum(v) / len(v) for _, v in sorted(by_sentences.items())]
    assert means == sorted(means)                                                  # farther in sentences, in tokens
    with pytest.raises(ValueError, match="no planted"):
        lc.recall_items(tok, [dict(rows[0], object="zebra")])


class _Peek(torch.nn.Module):
    """A fake 'model' whose logits at t are one-hot on a token it is handed: checks recall_hits' indexing."""
    def __init__(self, answer, vocab):
        super().__init__()
        self.answer, self.vocab = answer, vocab

    def forward(self, x):
        return (F.one_hot(self.answer(x), self.vocab).float(),)


def test_recall_hits_scores_the_query_position():
    tok, rows, items = _recall_setup()
    V = len(tok)
    # predicting the query's own token (the colour) never hits; a model shown the true next token always does
    own = lc.recall_hits(_Peek(lambda x: x, V), items, tok.eos_token_id, batch_size=5)
    assert own.shape == (len(items),) and not own.any()
    table = {it.ids[:it.query + 1]: it.target for it in items}
    def oracle(x):
        out = torch.zeros_like(x)
        for b in range(x.shape[0]):
            row = tuple(x[b].tolist())
            for prefix, target in table.items():
                if row[:len(prefix)] == prefix:
                    out[b, len(prefix) - 1] = target
        return out
    assert lc.recall_hits(_Peek(oracle, V), items, tok.eos_token_id, batch_size=5).all()
    with pytest.raises(ValueError, match="empty"):
        lc.recall_hits(_Peek(oracle, V), [], 0)
    with pytest.raises(TypeError, match="batch_size"):
        lc.recall_hits(_Peek(oracle, V), items, 0, batch_size=2.0)


def test_band_sees_the_object_iff_distance_below_window():
    """A 1-layer model can only recall what its band shows it: with W <= distance the answer cannot depend on
    the planted object (swap it and the logits at the query do not move); with W > distance it can."""
    tok, rows, items = _recall_setup(n=4)
    cfg = GPTConfig(vocab_size=len(tok), block_size=128, n_layer=1, n_head=2, n_kv_head=1, d_model=32)
    torch.manual_seed(0)
    base = GPT(cfg).eval()
    it = items[0]
    x = torch.tensor([it.ids[:it.query + 1]])
    swapped = x.clone()
    swapped[0, it.query - it.distance] = (it.target + 1) % len(tok)
    for W, moves in ((it.distance, False), (it.distance + 1, True)):
        m = GPT(cfg, attn_factory=lc.sliding_factory(window=W)).eval()
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            diff = (m(x)[0][0, -1] - m(swapped)[0][0, -1]).abs().max().item()
        assert (diff > 1e-6) == moves, (W, diff)


def test_accuracy_by_bin_and_collapse():
    hits = torch.tensor([1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)
    dist = [1, 2, 3, 11, 12, 25, 40]
    assert lc.accuracy_by_bin(hits, dist, [0, 10, 20, 30, 50]) == [(2, 3), (1, 2), (0, 1), (1, 1)]
    assert lc.collapse_distance([0, 10, 20, 30], [0.9, 0.8, 0.2], 0.5) == 20
    assert lc.collapse_distance([0, 10, 20, 30], [0.1, 0.9, 0.2], 0.5) == 20     # must have been above first
    assert lc.collapse_distance([0, 10, 20], [0.9, 0.8], 0.5) is None            # never falls
    assert lc.collapse_distance([0, 10, 20], [0.1, 0.2], 0.5) is None            # never rises
    with pytest.raises(ValueError, match="same shape"):
        lc.accuracy_by_bin(hits, dist[:3], [0, 10])
    with pytest.raises(ValueError, match="increasing"):
        lc.accuracy_by_bin(hits, dist, [0, 0])
    with pytest.raises(ValueError, match="one accuracy per bin"):
        lc.collapse_distance([0, 10], [0.5, 0.5], 0.5)


def test_aligned_windows_start_with_the_fixed_token():
    stream = torch.arange(100, 300)
    x, y = lc.aligned_windows(stream, 16, 5, 7, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 16) and (x[:, 0] == 7).all()
    assert torch.equal(x[:, 1:], y[:, :-1])                                  # the rest: the stretch, shifted by one
    assert ((y[:, 1:] - y[:, :-1]) == 1).all()                               # consecutive tokens of the stream
    x2, _ = lc.aligned_windows(stream, 16, 5, 7, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)                                                # seeded
    with pytest.raises(ValueError, match="need at least"):
        lc.aligned_windows(stream[:10], 16, 1, 0)
    with pytest.raises(TypeError, match="1-D"):
        lc.aligned_windows(stream.view(2, 100), 4, 1, 0)
    with pytest.raises(ValueError):
        lc.aligned_windows(stream, 0, 1, 0)
    with pytest.raises(ValueError):
        lc.aligned_windows(stream, 4, 1, -1)


def test_aligned_loss_matches_cross_entropy():
    torch.manual_seed(0)
    model = GPT(tiny_cfg()).eval()
    stream = torch.randint(0, 40, (300,))
    per = lc.aligned_loss(model, stream, 12, 5, 3, seed=4, batch_size=2)      # batches of 2, 2, 1
    x, y = lc.aligned_windows(stream, 12, 5, 3, torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = F.cross_entropy(model(x)[0].transpose(1, 2), y, reduction="none")
    assert per.shape == (5, 12) and torch.allclose(per, ref, atol=1e-5)
    with pytest.raises(ValueError):
        lc.aligned_loss(model, stream, 12, 5, 3, batch_size=0)


def test_model_facing_helpers_keep_inputs_on_the_model_device():
    # The model on `meta` (no values): a helper that left a batch on the CPU raises the guard's device-mismatch
    # ValueError; one that moved it gets as far as its first read of a value (NotImplementedError/RuntimeError).
    from shared.validate import device_guard

    torch.manual_seed(0)
    base = GPT(tiny_cfg(), attn_factory=lc.ScaledRopeAttention).to("meta")
    stream = torch.randint(0, 40, (300,))
    calls = [
        lambda: lc.aligned_loss(base, stream, 12, 2, 3),
        lambda: lc.loss_by_position(base, stream, 12, 2),
        lambda: lc.with_attention(base, lc.sliding_factory(8, sinks=2, renumber=True))(
            torch.zeros(1, 12, dtype=torch.long, device="meta")),
        lambda: lc.set_rope_scaling(base, "yarn", 16, 64) or base(torch.zeros(1, 12, dtype=torch.long, device="meta")),
    ]
    for call in calls:
        with device_guard(base):
            try:
                call()
            except (NotImplementedError, RuntimeError) as exc:
                assert "device mismatch" not in str(exc)
    copy = lc.with_attention(base, lc.sliding_factory(8))
    assert next(copy.parameters()).device.type == "meta"                     # the copy lives on the model's device
    q = torch.zeros(1, 2, 20, 8, device="meta")
    assert lc.tiled_attention(q, q, q, 8, 8, window=6).device.type == "meta"
    assert lc.explicit_attention(q, q, q, window=6).device.type == "meta"
