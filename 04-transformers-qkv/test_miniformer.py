"""Tests of miniformer.py: references (PyTorch's attention and encoder layer, shared.model.GPT), invariants
(causality, rows summing to one, parameter counts), the Q/K/V ablations, and argument errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from miniformer import (Block, CausalSelfAttention, MiniConfig, MiniFormer, block_grad_norms, causal_mask,
                        grad_norms_on_batch, head_scores, induction_batch, induction_chance, load_from_gpt,
                        loss_and_accuracy, overfit_one_batch, torch_reference_block, xavier_init_)

# fp32 sums of ~64 products in a different order: differences ~1e-7, so 1e-5 is tight but safe.
TOL = dict(rtol=1e-5, atol=1e-5)


def tiny(**kw):
    base = dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, d_model=32)
    base.update(kw)
    return MiniConfig(**base)


# ---------------------------------------------------------------- references
def test_attention_matches_scaled_dot_product_attention():
    torch.manual_seed(0)
    attn = CausalSelfAttention(tiny())
    x = torch.randn(3, 11, 32)
    out = attn(x)
    B, T, C = x.shape
    heads = lambda t: t.view(B, T, 4, 8).transpose(1, 2)
    ref = F.scaled_dot_product_attention(heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x)),
                                         is_causal=True)
    ref = attn.o_proj(ref.transpose(1, 2).reshape(B, T, C))
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("placement", ["pre", "post"])
@pytest.mark.parametrize("bias", [False, True])
def test_block_matches_torch_transformer_encoder_layer(placement, bias):
    torch.manual_seed(1)
    block = Block(tiny(placement=placement, bias=bias)).eval()
    with torch.no_grad():  # non-trivial norm weights and biases so every parameter matters
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    ref = torch_reference_block(block)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        # nn.TransformerEncoderLayer's bool mask is True = masked: the opposite of ours, hence ~
        torch.testing.assert_close(block(x), ref(x, src_mask=~causal_mask(9), is_causal=True), **TOL)


def _gpt_alike(n_layer, seed):
    from shared.model import GPT, GPTConfig
    torch.manual_seed(seed)
    gcfg = GPTConfig(vocab_size=50, block_size=16, n_layer=n_layer, n_head=4, n_kv_head=4, d_model=32,
                     d_ff=128, pos="learned", norm="layer", act="gelu")
    return GPT(gcfg).eval()


@pytest.mark.parametrize("n_layer", [1, 3])
def test_stack_equals_shared_gpt_after_weight_copy(n_layer):
    gpt = _gpt_alike(n_layer, seed=2)
    with torch.no_grad():  # perturb norms too, so a missed copy cannot hide behind all-ones weights
        for name, p in gpt.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    mini = load_from_gpt(MiniFormer(tiny(n_layer=n_layer, d_ff=128)), gpt).eval()
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (lg, lossg), (lm, lossm) = gpt(idx, idx), mini(idx, idx)
    torch.testing.assert_close(lm, lg, **TOL)
    torch.testing.assert_close(lossm, lossg, **TOL)


def test_load_from_gpt_rejects_a_model_built_differently():
    gpt = _gpt_alike(2, seed=0)
    with pytest.raises(ValueError, match="not built alike"):
        load_from_gpt(MiniFormer(tiny(n_layer=3, d_ff=128)), gpt)
    with pytest.raises(TypeError, match="mini must be a MiniFormer"):
        load_from_gpt(gpt, gpt)


def test_causal_mask_means_may_attend_like_sdpa():
    # SDPA's bool attn_mask is True = may attend: our mask must give is_causal's result when passed as it
    assert causal_mask(3).int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(5)),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True), **TOL)
    with pytest.raises(ValueError, match="T must be >= 1"):
        causal_mask(0)


def test_overfit_one_batch_is_plain_adam():
    # the shared loop with warmup=0, min_lr_ratio=1, no decay, no clipping, betas (0.9, 0.999) is torch's Adam
    torch.manual_seed(0)
    a = MiniFormer(tiny(n_layer=1))
    b = MiniFormer(tiny(n_layer=1))
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    y = x.roll(-1, 1)
    losses = overfit_one_batch(a, x, y, steps=5, lr=1e-2)
    opt = torch.optim.Adam(b.parameters(), lr=1e-2)
    ref = []
    for _ in range(5):
        loss = b(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref.append(loss.item())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- invariants
def test_shapes_and_initial_loss_near_log_vocab():
    torch.manual_seed(0)
    model = MiniFormer(tiny())
    idx, targets = torch.randint(0, 50, (2, 4, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (4, 16, 50)
    # small init -> near-uniform predictions -> loss close to ln V (targets independent of idx: with tied
    # embeddings the current token itself gets a slightly higher logit)
    assert abs(loss.item() - math.log(50)) < 0.1
    assert model(idx)[1] is None
    states = model.residual_stream(idx)
    assert len(states) == 3 and all(s.shape == (4, 16, 32) for s in states)


def test_causality_future_tokens_do_not_change_the_past():
    torch.manual_seed(0)
    model = MiniFormer(tiny(n_layer=3)).eval()
    idx = torch.randint(0, 50, (1, 12))
    changed = idx.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 50
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4


def test_attention_maps_are_causal_distributions():
    torch.manual_seed(0)
    model = MiniFormer(tiny(n_layer=2)).eval()
    maps = model.attention_maps(torch.randint(0, 50, (2, 10)))
    assert len(maps) == 2 and maps[0].shape == (2, 4, 10, 10)
    for w in maps:
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 10), rtol=0, atol=1e-6)
        assert w.masked_select(~causal_mask(10)).abs().max() == 0     # no weight where attending is not allowed


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_no_residual_block_is_the_plain_composition(placement):
    torch.manual_seed(0)
    block = Block(tiny(residual=False, placement=placement))
    x = torch.randn(2, 8, 32)
    if placement == "pre":
        expected = block.mlp(block.norm2(block.attn(block.norm1(x))))
    else:
        expected = block.norm2(block.mlp(block.norm1(block.attn(x))))
    torch.testing.assert_close(block(x), expected, rtol=0, atol=0)


def test_parameter_count_closed_form():
    V, T, C, L, F_ = 50, 16, 32, 2, 128
    per_block = 4 * C * C + 2 * C * F_ + 2 * 2 * C      # q,k,v,o + up,down + two LayerNorms (weight, bias)
    expected = V * C + T * C + L * per_block + 2 * C    # tied head; final LayerNorm
    assert MiniFormer(tiny()).num_params() == expected


# ---------------------------------------------------------------- Q/K/V ablations
def test_qkv_variants_change_exactly_what_they_say():
    C = 32
    full = MiniFormer(tiny()).num_params()
    tied = MiniFormer(tiny(qkv="tied_qk"))
    assert tied.blocks[0].attn.k_proj is tied.blocks[0].attn.q_proj
    assert tied.num_params() == full - 2 * C * C
    assert MiniFormer(tiny(qkv="identity_v")).num_params() == full - 2 * C * C
    assert MiniFormer(tiny(qkv="no_o")).num_params() == full - 2 * C * C
    assert MiniFormer(tiny(qkv="uniform_attn")).num_params() == full - 2 * 2 * C * C


def test_tied_qk_scores_are_symmetric():
    torch.manual_seed(0)
    attn = CausalSelfAttention(tiny(qkv="tied_qk"))
    x = torch.randn(1, 6, 32)
    q = attn._heads(attn.q_proj(x))
    k = attn._heads(attn.k_proj(x))
    scores = q @ k.transpose(-2, -1)
    torch.testing.assert_close(scores, scores.transpose(-2, -1), rtol=0, atol=1e-6)


def test_uniform_attn_averages_the_visible_past():
    torch.manual_seed(0)
    attn = CausalSelfAttention(tiny(qkv="uniform_attn"))
    x = torch.randn(2, 6, 32)
    out, weights = attn(x, return_weights=True)
    expected = causal_mask(6).float() / torch.arange(1, 7)[:, None]           # row i: 1/(i+1) on keys 0..i
    torch.testing.assert_close(weights, expected.expand(2, 4, 6, 6), rtol=0, atol=1e-7)
    mean_past = attn.v_proj(x).cumsum(1) / torch.arange(1, 7)[None, :, None]  # (B, T, C) running mean of values
    torch.testing.assert_close(out, attn.o_proj(mean_past), **TOL)


# ---------------------------------------------------------------- the induction task
def test_induction_batch_layout():
    g = torch.Generator().manual_seed(0)
    x, y = induction_batch(g, 64, 32, 40, 6, 14)
    assert x.shape == y.shape == (64, 32) and x.dtype == torch.long
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        P = next(i for i, t in enumerate(row_x) if t in row_x[:i])            # first repeat = len(S)
        S = row_x[:P]
        assert 6 <= P <= 14 and len(set(S)) == P                              # distinct segment of random length
        scored = [i for i, t in enumerate(row_y) if t != -100]
        assert scored == list(range(P, 32, 2))                                # every query, nothing else
        for i in scored:                                                      # the answer follows the query in S
            assert row_x[i] in S[:-1] and row_y[i] == S[S.index(row_x[i]) + 1]
    with pytest.raises(ValueError, match="min_len <= max_len"):
        induction_batch(g, 2, 32, 40, 10, 8)
    with pytest.raises(ValueError, match="min_len <= max_len"):
        induction_batch(g, 2, 12, 40, 6, 14)                                  # no room for a query


def test_induction_chance_against_brute_force():
    x, y = induction_batch(torch.Generator().manual_seed(1), 32, 24, 30, 3, 8)
    losses = []
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        P = next(i for i, t in enumerate(row_x) if t in row_x[:i])
        for i, t in enumerate(row_y):
            if t != -100:                                                     # answers: S[1:], minus the query
                losses.append(math.log(len(set(row_x[1:P]) - {row_x[i]})))
    loss, acc = induction_chance(x, y)
    assert loss == pytest.approx(sum(losses) / len(losses), abs=1e-5)
    assert acc == pytest.approx(sum(math.exp(-l) for l in losses) / len(losses), abs=1e-5)


def test_an_oracle_scores_and_head_scores_find_planted_patterns():
    x, y = induction_batch(torch.Generator().manual_seed(2), 8, 20, 30, 4, 6)
    scored = y != -100

    class Oracle(torch.nn.Module):                                            # logits: the true answer wins
        def forward(self, idx, targets):
            logits = torch.zeros(*idx.shape, 30)
            logits[scored] = F.one_hot(y[scored], 30).float() * 20
            return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    loss, acc = loss_and_accuracy(Oracle(), x, y)
    assert acc == 1.0 and loss < 1e-6
    T = 20
    prev_map = torch.zeros(T, T)
    prev_map[0, 0] = 1
    prev_map[torch.arange(1, T), torch.arange(T - 1)] = 1                     # every query on i - 1
    uniform = causal_mask(T).float() / torch.arange(1, T + 1)[:, None]
    induction = torch.zeros(8, T, T)                                          # a query on the token after its earlier copy
    for b, row in enumerate(x.tolist()):
        for i in range(T):
            after = [j + 1 for j in range(i) if row[j] == row[i]]
            induction[b, i, after if after else [i]] = 1.0 / max(1, len(after))
    maps = [torch.stack([prev_map.expand(8, T, T), uniform.expand(8, T, T)], 1),
            torch.stack([uniform.expand(8, T, T), induction], 1)]              # 2 layers, (B, H=2, T, T) each
    prev, ind = head_scores(maps, x)
    assert prev.shape == ind.shape == (2, 2)
    assert prev[0, 0] == pytest.approx(1.0) and prev[0, 1] < 0.3      # the planted head, not the uniform one
    assert ind[1, 1] == pytest.approx(1.0) and ind[1, 0] < 0.3 and ind[0].max() < 0.5


def test_xavier_init_is_variance_preserving():
    torch.manual_seed(0)
    model = xavier_init_(MiniFormer(tiny(d_model=64, d_ff=256, n_layer=4)))
    for name, p in model.blocks.named_parameters():
        if p.dim() == 2:
            assert p.std().item() == pytest.approx(1 / math.sqrt(p.shape[1]), rel=0.1), name
    with pytest.raises(TypeError, match="model must be a MiniFormer"):
        xavier_init_(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- training sanity
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_overfits_one_batch(placement):
    torch.manual_seed(0)
    model = MiniFormer(tiny(placement=placement, n_layer=1, d_model=16, n_head=2))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (2, 12), generator=g)
    y = torch.randint(0, 50, (2, 12), generator=g)   # random targets: only memorisation can fit them
    losses = overfit_one_batch(model, x, y, steps=150, lr=2e-2)
    assert losses[0] > 3.5 and losses[-1] < 0.1


def test_grad_norms_per_block():
    torch.manual_seed(0)
    model = MiniFormer(tiny(n_layer=3))
    x = torch.randint(0, 50, (2, 16))
    with pytest.raises(ValueError, match="no gradients"):
        block_grad_norms(model)
    norms = grad_norms_on_batch(model, x, x)
    assert norms.shape == (3,) and bool((norms > 0).all())
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- argument errors
@pytest.mark.parametrize("kw, err, match", [
    (dict(d_model=30), ValueError, "divisible by n_head"),
    (dict(n_layer=0), ValueError, "n_layer must be >= 1"),
    (dict(n_head=2.0), TypeError, "n_head must be an int"),
    (dict(norm="batch"), ValueError, "norm must be one of"),
    (dict(placement="middle"), ValueError, "placement must be one of"),
    (dict(qkv="no_q"), ValueError, "qkv must be one of"),
    (dict(residual=1), TypeError, "residual must be a bool"),
    (dict(init_std=0), ValueError, "init_std"),
])
def test_bad_config(kw, err, match):
    with pytest.raises(err, match=match):
        tiny(**kw)


def test_bad_inputs():
    model = MiniFormer(tiny())
    ok = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(TypeError, match="idx must be a torch.long"):
        model(ok.float())
    with pytest.raises(ValueError, match="more than block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        model(torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="idx values must lie in"):
        model(torch.full((1, 4), 50))
    with pytest.raises(ValueError, match="targets must be"):
        model(ok, ok[:, :4])
    with pytest.raises(TypeError, match="cfg must be a MiniConfig"):
        MiniFormer({"vocab_size": 5})
    with pytest.raises(ValueError, match="steps must be >= 1"):
        overfit_one_batch(model, ok, ok, steps=0)
    with pytest.raises(ValueError, match="lr must be"):
        overfit_one_batch(model, ok, ok, lr=-1.0)
    with pytest.raises(ValueError, match="standard block"):
        torch_reference_block(Block(tiny(qkv="no_o")))


def test_helpers_move_their_batches_to_the_models_device():
    import miniformer as mf

    # The GPU rule without a GPU: the model on `meta`, batches built on the CPU (as the notebook's probe batch once
    # was); inside device_guard a helper that forgot to move its inputs raises a device-mismatch ValueError.
    from shared.validate import device_guard

    model = mf.MiniFormer(mf.MiniConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, d_model=8)).to("meta")
    x = torch.randint(0, 16, (2, 8))
    with device_guard(model):
        assert mf.grad_norms_on_batch(model, x, x).shape == (2,)
        with pytest.raises(RuntimeError, match="meta"):    # gets as far as reading a value: .item() on meta
            mf.loss_and_accuracy(model, x, x)
        prev, ind = mf.head_scores(model.attention_maps(x.to("meta")), x)
        assert prev.shape == ind.shape == (2, 2)
