"""Tests of shared.model: shapes, causality, cache, options, hooks and config errors."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shared.model as model_mod
from shared.model import GPT, GPTConfig, alibi_slopes, apply_rope, rope_cos_sin, sinusoidal_table


def tiny(**kw):
    base = dict(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_kv_head=2, d_model=32)
    base.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**base)).eval()


ALL_POS = ["rope", "learned", "sinusoidal", "alibi", "none"]


@pytest.mark.parametrize("pos", ALL_POS)
@pytest.mark.parametrize("norm,act", [("rms", "swiglu"), ("layer", "gelu"), ("rms", "relu")])
def test_shapes_and_loss(pos, norm, act):
    m = tiny(pos=pos, norm=norm, act=act)
    x, y = torch.randint(0, 50, (3, 17)), torch.randint(0, 50, (3, 17))
    logits, loss = m(x, y)
    assert logits.shape == (3, 17, 50)
    assert loss.shape == () and torch.isfinite(loss)
    # untrained model with small init: loss close to log(V)
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5


@pytest.mark.parametrize("pos", ALL_POS)
def test_causality_future_token_never_changes_earlier_logits(pos):
    m = tiny(pos=pos)
    x = torch.randint(0, 50, (2, 20))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % 50
    with torch.no_grad():
        a, b = m(x)[0], m(y)[0]
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-4


def test_non_causal_model_leaks_the_future():
    m = tiny(causal=False)
    x = torch.randint(0, 50, (1, 10))
    y = x.clone()
    y[0, 9] = (y[0, 9] + 1) % 50
    with torch.no_grad():
        assert (m(x)[0][0, 0] - m(y)[0][0, 0]).abs().max() > 1e-5


@pytest.mark.parametrize("pos", ALL_POS)
def test_cached_forward_equals_full_forward(pos):
    m = tiny(pos=pos)
    x = torch.randint(0, 50, (2, 20))
    caches = [{} for _ in m.blocks]
    with torch.no_grad():
        full = m(x)[0]
        parts = [m(x[:, :7], caches=caches)[0], m(x[:, 7:8], start_pos=7, caches=caches)[0],
                 m(x[:, 8:], start_pos=8, caches=caches)[0]]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_generate_cached_equals_uncached_and_respects_seed():
    m = tiny()
    x = torch.randint(0, 50, (2, 4))
    assert torch.equal(m.generate(x, 20, temperature=0), m.generate(x, 20, temperature=0, use_cache=False))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = m.generate(x, 20, temperature=1.0, top_k=5, generator=g1)
    b = m.generate(x, 20, temperature=1.0, top_k=5, generator=g2, use_cache=False)
    assert torch.equal(a, b) and a.shape == (2, 24)
    # past block_size: falls back to a sliding window, still returns the right length
    assert m.generate(x, 40, temperature=0).shape == (2, 44)


@pytest.mark.parametrize("pos", ALL_POS)
def test_attention_maps_match_sdpa_path_and_are_causal(pos):
    m = tiny(pos=pos)
    x = torch.randint(0, 50, (2, 9))
    maps = m.attention_maps(x)
    assert len(maps) == 2 and maps[0].shape == (2, 4, 9, 9)
    torch.testing.assert_close(maps[1].sum(-1), torch.ones(2, 4, 9), rtol=0, atol=1e-5)
    assert maps[0].triu(1).abs().max() == 0
    for b in m.blocks:   # the flag is reset
        assert not b.attn.store_weights


def test_gqa_parameter_count_and_mqa():
    full = tiny(n_kv_head=4).num_params()
    gqa = tiny(n_kv_head=2).num_params()
    mqa = tiny(n_kv_head=1).num_params()
    # k and v projections shrink by (4 - K) * head_dim * d_model each, per layer
    assert full - gqa == 2 * 2 * (2 * 8 * 32)
    assert gqa - mqa == 2 * 2 * (1 * 8 * 32)


def test_tied_and_untied_embeddings():
    m = tiny()
    assert m.lm_head.weight.data_ptr() == m.tok_emb.weight.data_ptr()
    u = tiny(tie_embeddings=False)
    assert u.lm_head.weight.data_ptr() != u.tok_emb.weight.data_ptr()
    assert u.num_params() == m.num_params() + 50 * 32


def test_plugin_hooks_are_used():
    class Doubler(nn.Module):
        def __init__(self, cfg, layer_idx):
            super().__init__()
            self.layer_idx = layer_idx

        def forward(self, x, start_pos=0, cache=None):
            return 2 * x

    m = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=3, n_head=2, d_model=8), attn_factory=Doubler,
            mlp_factory=lambda cfg, i: nn.Identity(), norm_factory=lambda cfg: nn.Identity())
    assert [b.attn.layer_idx for b in m.blocks] == [0, 1, 2]
    x = torch.randint(0, 20, (1, 5))
    emb = m.tok_emb(x)
    # each block: x + 2x, then + x (identity MLP): x -> 6x; three blocks -> 216x
    torch.testing.assert_close(m(x)[0], m.lm_head(216 * emb))


def test_rope_rotation_preserves_norm_and_is_relative():
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m, n):
        cm, sm = rope_cos_sin(torch.tensor([m]), 8)
        cn, sn = rope_cos_sin(torch.tensor([n]), 8)
        return (apply_rope(q, cm, sm) * apply_rope(k, cn, sn)).sum()

    torch.testing.assert_close(score(5, 2), score(105, 102), rtol=1e-5, atol=1e-5)
    c, s = rope_cos_sin(torch.tensor([37]), 8)
    torch.testing.assert_close(apply_rope(q, c, s).norm(), q.norm())


def test_alibi_slopes_closed_form():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # non-power of two: the 4 slopes of 4 heads, then every other slope of 8 heads
    assert torch.allclose(alibi_slopes(6), torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]))


def test_sinusoidal_positions_are_scaled_like_token_embeddings():
    m = tiny(pos="sinusoidal", d_model=64)
    torch.testing.assert_close(m.pos_table, sinusoidal_table(32, 64) * m.cfg.init_std)
    ratio = m.pos_table.pow(2).mean().sqrt() / m.tok_emb.weight.pow(2).mean().sqrt()
    assert 0.3 < ratio < 3     # neither drowns the other at initialisation
    with pytest.raises(ValueError, match="positive int"):
        alibi_slopes(2.5)


def test_sinusoidal_table_formula():
    t = sinusoidal_table(10, 6)
    assert t.shape == (10, 6)
    assert abs(t[3, 2].item() - torch.sin(torch.tensor(3 / 10000 ** (2 / 6))).item()) < 1e-6
    assert abs(t[3, 3].item() - torch.cos(torch.tensor(3 / 10000 ** (2 / 6))).item()) < 1e-6


@pytest.mark.parametrize("kw,match", [
    (dict(d_model=30, n_head=4), "divisible by n_head"),
    (dict(n_head=4, n_kv_head=3), "divisible by n_kv_head"),
    (dict(pos="absolute"), "pos must be one of"),
    (dict(norm="batch"), "norm must be one of"),
    (dict(act="tanh"), "act must be one of"),
    (dict(n_layer=0), "n_layer must be a positive int"),
    (dict(vocab_size=-1), "vocab_size must be a positive int"),
    (dict(d_model=12, n_head=4, pos="rope"), "head_dim must be even"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_configs_raise(kw, match):
    base = dict(vocab_size=50, block_size=32, n_layer=2, n_head=4, d_model=32)
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        GPTConfig(**base)


def test_bad_inputs_raise():
    m = tiny(pos="learned")
    with pytest.raises(ValueError, match="long tensor"):
        m(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 50\)"):
        m(torch.tensor([[3, 50]]))
    with pytest.raises(ValueError, match="cover 32 tokens"):
        m(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="targets shape"):
        m(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        m.generate(torch.zeros(1, 3, dtype=torch.long), 2, temperature=-1)
    with pytest.raises(ValueError, match="unknown GPTConfig options"):
        GPTConfig.from_dict({"vocab_size": 5, "colour": "red"})
    with pytest.raises(TypeError):
        GPT({"vocab_size": 5})


def test_rope_table_rows_equal_rope_cos_sin():
    for start, length in ((0, 5), (3, 300), (700, 4)):
        cos, sin = model_mod.rope_table(start, length, 8, 10000.0, "cpu", torch.float32)
        ref_cos, ref_sin = rope_cos_sin(torch.arange(start, start + length), 8)
        torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-6)


def test_project_is_what_forward_attends_with():
    m = tiny()
    attn = m.blocks[0].attn
    x = torch.randn(2, 6, 32)
    q, k, v = attn.project(x, start_pos=3)
    assert q.shape == (2, 4, 6, 8) and k.shape == v.shape == (2, 2, 6, 8)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(attn.o_proj(y.transpose(1, 2).reshape(2, 6, 32)), attn(x, start_pos=3))


def test_decode_is_one_loop_with_pluggable_pickers():
    m = tiny()
    x = torch.randint(0, 50, (2, 4))
    seen = []

    def first_token_then_greedy(logits, ids):
        seen.append(ids.shape[1])
        return logits.argmax(-1)

    out = model_mod.decode(m, x, 5, first_token_then_greedy)
    assert seen == [4, 5, 6, 7, 8] and torch.equal(out, m.generate(x, 5, temperature=0))
    # window: the model never sees more than `window` tokens; cache or not, the same tokens
    lengths = []
    hook = m.register_forward_pre_hook(lambda mod, args, kw: lengths.append(args[0].shape[1]), with_kwargs=True)
    short = model_mod.decode(m, x, 8, model_mod.greedy_next, window=6, use_cache=False)
    hook.remove()
    assert max(lengths) == 6
    assert torch.equal(short, model_mod.decode(m, x, 8, model_mod.greedy_next, window=6))
    long = model_mod.decode(m, x, 40, model_mod.greedy_next, window=64)     # past block_size 32: allowed for RoPE
    assert torch.equal(long, model_mod.decode(m, x, 40, model_mod.greedy_next, window=64, use_cache=False))
    with pytest.raises(ValueError, match="longer than the position table"):
        model_mod.decode(tiny(pos="learned"), x, 2, model_mod.greedy_next, window=64)
    with pytest.raises(ValueError, match="window"):
        model_mod.decode(m, x, 2, model_mod.greedy_next, window=0)
    with pytest.raises(TypeError, match="use_cache needs a shared GPT"):
        model_mod.decode(torch.nn.Linear(2, 2), x, 2, model_mod.greedy_next, use_cache=True)
    with pytest.raises(ValueError, match="idx"):
        model_mod.decode(m, x[0], 2, model_mod.greedy_next)


def test_draw_follows_the_generator_and_checks_shape():
    from shared.model import draw
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]]).repeat(200, 1)
    a = draw(probs, torch.Generator().manual_seed(5))
    assert torch.equal(a, draw(probs, torch.Generator().manual_seed(5)))       # seeded: the same draws
    assert a.shape == (400,) and a.device == probs.device and bool((a[0::2] == 1).all())
    share = (a[1::2] == 2).float().mean().item()
    assert abs(share - 0.5) < 5 * (0.25 / 200) ** 0.5                            # frequencies follow probs
    with pytest.raises(ValueError, match=r"\(B, V\)"):
        draw(torch.tensor([0.5, 0.5]))


def test_model_device_is_where_the_weights_are_or_the_cpu():
    from shared.model import model_device

    assert model_device(torch.nn.Linear(2, 2).to("meta")).type == "meta"
    assert model_device(torch.nn.BatchNorm1d(2, affine=False).to("meta")).type == "meta"   # buffers only
    assert model_device(lambda x: x).type == "cpu"                                       # no weights at all


def test_rebuild_copies_weights_into_other_modules():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=4, n_kv_head=2, d_model=32)
    model = GPT(cfg).train()
    idx = torch.randint(0, 40, (2, 16))

    class Halved(model_mod.Attention):           # the same parameters read differently: outputs must change
        def forward(self, x, *args, **kwargs):
            return 0.5 * super().forward(x, *args, **kwargs)

    same, halved = model_mod.rebuild(model), model_mod.rebuild(model, attn_factory=Halved)
    assert not same.training and same.cfg == model.cfg and same.cfg is not model.cfg
    with torch.no_grad():
        torch.testing.assert_close(same(idx)[0], model.eval()(idx)[0], rtol=0, atol=0)
        assert not torch.allclose(halved(idx)[0], same(idx)[0])
    same.tok_emb.weight.data.zero_()                 # a copy: the original's weights are untouched
    assert model.tok_emb.weight.abs().sum() > 0
    assert model_mod.rebuild(model.to("meta")).tok_emb.weight.device.type == "meta"   # on the model's device

    class Renamed(nn.Module):                        # other parameter names: strict loading refuses
        def __init__(self, cfg, i):
            super().__init__()
            self.other = nn.Linear(cfg.d_model, cfg.d_model)

        def forward(self, x, *args, **kwargs):
            return self.other(x)
    with pytest.raises(RuntimeError, match="do not fit"):
        model_mod.rebuild(GPT(cfg), attn_factory=Renamed)
    with pytest.raises(TypeError, match="GPT"):
        model_mod.rebuild(nn.Linear(2, 2))
