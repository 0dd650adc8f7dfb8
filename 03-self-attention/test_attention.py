"""Tests for attention.py: reference equality (SDPA, nn.MultiheadAttention), mask properties, analysis helpers,
and the argument errors. Tolerances: float32 attention of O(1) values, rtol=1e-5 / atol=1e-6 unless stated."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import (MultiHeadAttention, NoMLP, attention_entropy, attention_scores, causal_mask,
                       earlier_copy_targets, greedy_ablation, head_score, instance_vs_category, leak, mean_ci,
                       model_attention, offset_targets, per_token_loss, prefix_loss, previous_token_targets,
                       repeated_random_batch, saturation_sweep, scaled_dot_product_attention)
from shared.model import GPT, GPTConfig

TOL = dict(rtol=1e-5, atol=1e-6)


def qkv(b=2, h=3, tq=5, tk=5, d=8, dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, tq, d, generator=g), torch.randn(b, h, tk, d, generator=g),
            torch.randn(b, h, tk, dv or d, generator=g))


# ---------------------------------------------------------------- reference equality

def test_hand_example():
    # one query, three keys: scores are dot products / sqrt(2), softmax by hand, weighted sum of values
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    out, w = scaled_dot_product_attention(q, k, v)
    s = [1 / math.sqrt(2), 0.0, 1 / math.sqrt(2)]
    z = sum(math.exp(x) for x in s)
    p = [math.exp(x) / z for x in s]
    torch.testing.assert_close(w[0], torch.tensor(p), **TOL)
    torch.testing.assert_close(out[0], torch.tensor([p[0] + 2 * p[2], p[1] + 2 * p[2]]), **TOL)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("tq,tk", [(5, 5), (1, 1), (3, 7)])
def test_matches_sdpa(is_causal, tq, tk):
    q, k, v = qkv(tq=tq, tk=tk, dv=4)
    ours, _ = scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    torch.testing.assert_close(ours, ref, **TOL)


@pytest.mark.parametrize("kind", ["bool", "float", "broadcast"])
def test_matches_sdpa_with_mask(kind):
    q, k, v = qkv(tq=4, tk=6)
    g = torch.Generator().manual_seed(1)
    if kind == "bool":
        mask = torch.rand(2, 3, 4, 6, generator=g) > 0.4
        mask[..., 0] = True                                    # every row keeps at least one key
    elif kind == "float":
        mask = torch.randn(2, 3, 4, 6, generator=g)            # additive bias (e.g. ALiBi-like)
    else:
        mask = torch.rand(1, 1, 4, 6, generator=g) > 0.5
        mask[..., -1] = True
    ours, _ = scaled_dot_product_attention(q, k, v, mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, ref, **TOL)


def test_custom_scale_matches_sdpa():
    q, k, v = qkv()
    ours, _ = scaled_dot_product_attention(q, k, v, scale=1.0)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, scale=1.0), **TOL)


def test_weights_rows_sum_to_one_and_mask_is_exactly_zero():
    q, k, v = qkv(tq=6, tk=6)
    _, w = scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 6), **TOL)
    assert (w[..., ~causal_mask(6)] == 0).all()                # exactly zero, not merely small
    assert (w[..., causal_mask(6)] > 0).all()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_mha_matches_torch_multihead_attention(bias, causal):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(32, 4, bias=bias, batch_first=True).eval()
    ours = MultiHeadAttention.from_torch(ref).eval()
    x = torch.randn(2, 7, 32)
    # nn.MultiheadAttention's bool mask is True where attention is FORBIDDEN: the opposite convention
    torch_mask = ~causal_mask(7) if causal else None
    with torch.no_grad():
        y_ref, w_ref = ref(x, x, x, attn_mask=torch_mask, need_weights=True, average_attn_weights=False)
        y, w = ours(x, is_causal=causal)
        y_fast, w_fast = ours(x, is_causal=causal, fast=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    assert w_fast is None


def test_mha_shapes_and_head_split_roundtrip():
    mha = MultiHeadAttention(12, 3)
    x = torch.randn(2, 5, 12)
    assert mha.split_heads(x).shape == (2, 3, 5, 4)
    torch.testing.assert_close(mha.merge_heads(mha.split_heads(x)), x, rtol=0, atol=0)
    y, w = mha(x)
    assert y.shape == (2, 5, 12) and w.shape == (2, 3, 5, 5)


def test_causal_mha_output_ignores_future():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2).eval()
    emb = nn.Embedding(10, 16)
    idx = torch.randint(0, 10, (3, 8))
    lk = leak(lambda i: mha(emb(i), is_causal=True)[0], idx, position=5, new_token=int((idx[0, 5] + 1) % 10))
    assert lk.shape == (8,)
    assert (lk[:5] == 0).all() and lk[5] > 0
    lk_open = leak(lambda i: mha(emb(i))[0], idx, position=5, new_token=int((idx[0, 5] + 1) % 10))
    assert lk_open[:5].min() > 0


# ---------------------------------------------------------------- analysis helpers

def test_entropy_closed_forms():
    w = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]])
    torch.testing.assert_close(attention_entropy(w), torch.tensor([[0.0, math.log(2), math.log(3)]]), **TOL)


def test_previous_token_and_copy_targets():
    assert previous_token_targets(3).int().tolist() == [[0, 0, 0], [1, 0, 0], [0, 1, 0]]
    tokens = torch.tensor([[7, 1, 7, 2, 7]])
    t = earlier_copy_targets(tokens)
    assert t[0, 2].int().tolist() == [1, 0, 0, 0, 0]
    assert t[0, 4].int().tolist() == [1, 0, 1, 0, 0]
    assert not t[0, 1].any() and not t[0, 0].any()
    only_last = torch.tensor([[False, False, False, False, True]])
    assert earlier_copy_targets(tokens, only_last)[0, :4].sum() == 0
    nxt = earlier_copy_targets(tokens, shift=1)                       # query i looks for copies of tokens[i+1]
    assert nxt[0, 1].int().tolist() == [1, 0, 0, 0, 0]                # before the 2nd 7: the 1st 7
    assert nxt[0, 3].int().tolist() == [1, 0, 1, 0, 0]                # before the 3rd 7: both earlier 7s
    assert not nxt[0, 4].any() and not nxt[0, 0].any()                # last query has no next token


def test_offset_targets():
    assert offset_targets(3, 0).int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert offset_targets(3, 2).int().tolist() == [[0, 0, 0], [0, 0, 0], [1, 0, 0]]
    assert torch.equal(offset_targets(4, -1), previous_token_targets(4).T)      # next token = transpose
    assert not offset_targets(3, 3).any()


def test_model_attention_matches_the_models_own_maps():
    # reference: GPT.attention_maps (explicit softmax inside shared.model); ours goes through Attention.project
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_kv_head=2, d_model=32)).eval()
    idx = torch.randint(0, 50, (3, 9))
    with torch.no_grad():
        ref = model.attention_maps(idx)
    ours = model_attention(model, idx)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    qp = torch.tensor([0, 4, 8])
    rows = model_attention(model, idx, query_pos=qp)                      # one query row per batch item
    for a, b in zip(rows, ref):
        torch.testing.assert_close(a, b[torch.arange(3), :, qp], rtol=1e-5, atol=1e-6)
        assert (a[1, :, 5:] == 0).all()                                   # keys after the query: exactly 0


def test_instance_vs_category_separates_recall_from_category_attention():
    # tokens: category {1, 2, 3}; the query at position 4 predicts token 2 (the right word at key 1);
    # keys 0 and 3 are distractors of the same category, key 2 is outside it.
    tokens = torch.tensor([[1, 2, 9, 3, 9, 2]])
    recall = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0])                # reads the right word only
    category = torch.tensor([1 / 3, 1 / 3, 0.0, 1 / 3, 0.0, 0.0])        # reads the category, no preference
    rows = torch.stack([recall, category])[None]                          # (B=1, H=2, T=6)
    s = instance_vs_category(rows, tokens, torch.tensor([4]), torch.tensor([1, 2, 3]))
    assert s["n_right"].tolist() == [1] and s["n_distractor"].tolist() == [2]
    torch.testing.assert_close(s["right"], torch.tensor([[1.0, 1 / 3]]))
    torch.testing.assert_close(s["distractor"], torch.tensor([[0.0, 2 / 3]]))
    torch.testing.assert_close(s["right_per_word"], s["distractor_per_word"] + torch.tensor([[1.0, 0.0]]))


def test_mean_ci():
    x = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    m, h = mean_ci(x, dim=0)
    torch.testing.assert_close(m, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(h, torch.tensor([1.96 * math.sqrt(2) / math.sqrt(2), 0.0]))


def test_head_score_perfect_and_uniform_heads():
    t = 6
    prev = torch.zeros(1, 2, t, t)
    prev[0, 0, 0, 0] = 1.0
    prev[0, 0, torch.arange(1, t), torch.arange(t - 1)] = 1.0           # head 0: exact previous-token head
    prev[0, 1] = causal_mask(t).float() / causal_mask(t).sum(-1, keepdim=True)  # head 1: uniform over the past
    s = head_score(prev, previous_token_targets(t))
    assert s.shape == (2,)
    assert s[0].item() == pytest.approx(1.0)
    expected_uniform = sum(1 / (i + 1) for i in range(1, t)) / (t - 1)
    assert s[1].item() == pytest.approx(expected_uniform)


def test_saturation_sweep_direction():
    dims = [4, 64, 1024]
    raw = saturation_sweep(dims, scale=False)
    scaled = saturation_sweep(dims, scale=True)
    # without scaling the softmax saturates as D grows; with it, entropy stays near log(64) - 1/2
    assert raw["max_weight"][-1] > 0.8 > raw["max_weight"][0]
    assert raw["entropy"][-1] < 0.5 * raw["entropy"][0]
    assert max(scaled["entropy"]) - min(scaled["entropy"]) < 0.15
    assert raw["score_grad_norm"][-1] < 0.5 * scaled["score_grad_norm"][-1]


def test_prefix_loss_equals_one_pass_loss_for_causal_model():
    torch.manual_seed(0)
    emb, mha, head = nn.Embedding(11, 16), MultiHeadAttention(16, 4), nn.Linear(16, 11)
    fn = lambda i: head(mha(emb(i), is_causal=True)[0])
    x, y = torch.randint(0, 11, (2, 6)), torch.randint(0, 11, (2, 6))
    with torch.no_grad():
        one_pass = F.cross_entropy(fn(x).flatten(0, 1), y.flatten()).item()
    assert prefix_loss(fn, x, y) == pytest.approx(one_pass, rel=1e-5)


# ---------------------------------------------------------------- argument errors

def test_errors_shapes_and_types():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="last dim"):
        scaled_dot_product_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="number of keys"):
        scaled_dot_product_attention(q, k, v[..., :3, :])
    with pytest.raises(ValueError, match="leading dims"):
        scaled_dot_product_attention(q, k[:1], v[:1])
    with pytest.raises(TypeError, match="floating"):
        scaled_dot_product_attention(q.long(), k, v)
    with pytest.raises(TypeError, match="torch.Tensor"):
        scaled_dot_product_attention(q.tolist(), k, v)
    with pytest.raises(ValueError, match="at least 2 dims"):
        attention_scores(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="scale"):
        attention_scores(q, k, scale=-1.0)
    with pytest.raises(TypeError, match="scale"):
        attention_scores(q, k, scale="1")


def test_errors_masks():
    q, k, v = qkv(tq=4, tk=6)
    with pytest.raises(ValueError, match="does not broadcast"):
        scaled_dot_product_attention(q, k, v, mask=torch.ones(6, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        scaled_dot_product_attention(q, k, v, mask=torch.ones(6, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        scaled_dot_product_attention(q, k, v, mask=torch.ones(4, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="not both"):
        scaled_dot_product_attention(q, k, v, mask=torch.ones(4, 6, dtype=torch.bool), is_causal=True)
    empty_row = torch.ones(4, 6, dtype=torch.bool)
    empty_row[2] = False
    with pytest.raises(ValueError, match="nothing to attend to"):
        scaled_dot_product_attention(q, k, v, mask=empty_row)
    with pytest.raises(ValueError, match="t_q"):
        causal_mask(0)


def test_errors_mha():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="n_head"):
        MultiHeadAttention(10, 0)
    with pytest.raises(TypeError, match="d_model"):
        MultiHeadAttention(10.0, 2)
    mha = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match="d_model=8"):
        mha(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="at least 3 dims"):
        mha(torch.randn(3, 8))
    with pytest.raises(TypeError, match="MultiheadAttention"):
        MultiHeadAttention.from_torch(nn.Linear(4, 4))


def test_errors_analysis_helpers():
    idx = torch.randint(0, 5, (1, 4))
    with pytest.raises(ValueError, match="position"):
        leak(lambda i: i[..., None].float(), idx, position=4, new_token=0)
    with pytest.raises(ValueError, match="nothing changes"):
        leak(lambda i: i[..., None].float(), idx, position=1, new_token=int(idx[0, 1]))
    with pytest.raises(ValueError, match="select no"):
        head_score(torch.rand(1, 2, 3, 3), torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        head_score(torch.rand(1, 2, 3, 3), torch.zeros(3, 3))
    with pytest.raises(TypeError, match="tokens"):
        earlier_copy_targets(torch.rand(1, 4))
    with pytest.raises(ValueError, match="tokens"):
        earlier_copy_targets(torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="position"):
        leak(lambda i: i[..., None].float(), idx, position=1.0, new_token=0)
    with pytest.raises(TypeError, match="offset"):
        offset_targets(3, 1.0)
    with pytest.raises(ValueError, match="2 samples"):
        mean_ci(torch.ones(1, 3))
    rows, toks = torch.rand(2, 1, 4), torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="query_pos"):
        instance_vs_category(rows, toks, torch.tensor([0, 3]), torch.tensor([1]))
    with pytest.raises(TypeError, match="category_ids"):
        instance_vs_category(rows, toks, torch.tensor([0, 1]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="disagree"):
        instance_vs_category(rows[:1], toks, torch.tensor([0, 1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="shift"):
        earlier_copy_targets(torch.zeros(1, 4, dtype=torch.long), shift=2)
    with pytest.raises(ValueError, match="query_ok"):
        earlier_copy_targets(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="empty"):
        saturation_sweep([])
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        prefix_loss(lambda i: i, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


# ---------------------------------------------------------------- the induction toy and ablation helpers

def test_repeated_random_batch_repeats_with_each_rows_period():
    g = torch.Generator().manual_seed(0)
    x, y, rep = repeated_random_batch(g, 64, 32, 50, 8, 16, loss_on_repeat_only=False)
    assert x.shape == y.shape == rep.shape == (64, 32)
    torch.testing.assert_close(x[:, 1:], y[:, :-1])                           # y is x shifted by one
    full = torch.cat([x, y[:, -1:]], 1)                                       # the 33 tokens of each row
    periods = rep.sum(1)                                                      # second-copy length = period
    assert periods.min() >= 8 and periods.max() <= 16 and len(set(periods.tolist())) > 3
    for b in range(64):
        p = int(periods[b])
        torch.testing.assert_close(full[b, -p:], full[b, -2 * p:-p])          # the last p repeat the p before
        assert not rep[b, : 32 - p].any() and rep[b, 32 - p:].all()
    _, y_masked, _ = repeated_random_batch(torch.Generator().manual_seed(0), 64, 32, 50, 8, 16)
    assert (y_masked[~rep] == -100).all() and torch.equal(y_masked[rep], y[rep])


@pytest.mark.parametrize("kwargs", [dict(seq_len=31), dict(min_period=0), dict(max_period=7), dict(vocab_size=1)])
def test_repeated_random_batch_bad_arguments(kwargs):
    args = dict(batch_size=2, seq_len=32, vocab_size=10, min_period=8, max_period=16) | kwargs
    with pytest.raises(ValueError):
        repeated_random_batch(torch.Generator(), **args)


def test_no_mlp_gives_attention_only_blocks_and_per_token_loss():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, d_model=16), mlp_factory=lambda c, i: NoMLP())
    x = torch.randint(0, 20, (3, 8))
    h = m.blocks[0].norm2(torch.randn(3, 8, 16))
    assert torch.equal(m.blocks[0].mlp(h), torch.zeros_like(h))
    y = torch.randint(0, 20, (3, 8))
    ce = per_token_loss(m, x, y)
    assert ce.shape == (3, 8)
    torch.testing.assert_close(ce.mean(), m(x, y)[1], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        per_token_loss(m, x, y[:, :-1])


def test_greedy_ablation_orders_by_harm_and_stops_at_the_control():
    # a fake "model": the metric is 1 minus the summed harm of the heads switched off
    harm = {(0, 0): 0.5, (0, 1): 0.0, (1, 0): 0.3, (1, 1): 0.1}
    off = []

    class Off:
        def __init__(self, heads):
            self.heads = heads

        def __enter__(self):
            off.extend(self.heads)

        def __exit__(self, *exc):
            del off[-len(self.heads):]

    single, cumulative = greedy_ablation(lambda: 1 - sum(harm[h] for h in off), list(harm), 0.25, Off)
    assert single == {h: 1 - v for h, v in harm.items()}
    assert [c[0] for c in cumulative] == [[(0, 0)], [(0, 0), (1, 0)]]        # most harmful first, stop at <= 0.25
    assert cumulative[-1][1] == pytest.approx(0.2) and off == []
    with pytest.raises(ValueError):
        greedy_ablation(lambda: 1.0, [], 0.0, Off)


def test_model_readers_move_cpu_inputs_to_the_models_device():
    # The GPU rule without a GPU: the model on `meta`, ids and masks built on the CPU; inside device_guard an input
    # that reaches a layer on another device raises a ValueError, and the scores accept CPU masks for meta weights.
    import attention as att
    from shared.validate import device_guard

    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, d_model=16)).to("meta")
    x = torch.randint(0, 32, (3, 8))
    with device_guard(model):
        maps = att.model_attention(model, x)
        rows = att.model_attention(model, x, query_pos=torch.tensor([2, 3, 4]))
        assert maps[0].shape == (3, 2, 8, 8) and maps[0].device.type == "meta" and rows[0].shape == (3, 2, 8)
        assert att.per_token_loss(model, x, x).shape == (3, 8)
        for targets in (att.offset_targets(8, 1), att.earlier_copy_targets(x, shift=1)):
            with pytest.raises(RuntimeError, match="meta"):    # past the product with CPU masks: reads a value
                att.head_score(torch.stack(maps), targets)
        split = att.instance_vs_category(torch.stack(rows), x, torch.tensor([2, 3, 4]), torch.tensor([1, 2]))
        assert split["right"].shape == (2, 3, 2)
