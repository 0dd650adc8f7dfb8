"""Tests for moe.py: references (transformers' Mixtral block and model, brute force, dense mix, FlopCounterMode),
routing invariants, capacity dropping, the aux losses reaching the training loss, and bad arguments."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import shared  # noqa: F401  (offline switches before transformers loads)
from shared.model import GPT, GPTConfig
from moe import (DISPATCHES, MoE, MoEGPT, capacity, collect_routing, dense_mix, flops_per_token, load_balancing_loss,
                 load_into_hf_block, mutual_information, route, router_z_loss, to_mixtral, usage_entropy,
                 fact_batch, fact_eval, fact_table, freeze_random_embeddings)

ATOL = 1e-5   # float32, a few hundred multiply-adds per output: observed differences are ~1e-9


def _hf_block(moe):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=moe.d_model, intermediate_size=moe.d_ff, num_local_experts=moe.n_experts,
                        num_experts_per_tok=moe.top_k, router_jitter_noise=0.0)
    block = MixtralSparseMoeBlock(cfg).eval()
    load_into_hf_block(moe, block)
    return block


@pytest.mark.parametrize("n_experts,top_k", [(8, 2), (4, 1), (4, 4), (3, 2)])
def test_equals_mixtral_block(n_experts, top_k):
    torch.manual_seed(0)
    moe = MoE(16, 24, n_experts, top_k).eval()
    x = torch.randn(2, 7, 16)
    block = _hf_block(moe)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), block(x), atol=ATOL, rtol=0)
        torch.testing.assert_close(moe.last_logits, block.gate(x.reshape(-1, 16))[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_dispatches_agree_with_loop(dispatch):
    torch.manual_seed(1)
    ref = MoE(16, 24, 6, 2, dispatch="loop")
    moe = MoE(16, 24, 6, 2, dispatch=dispatch)
    moe.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(moe(x), ref(x), atol=ATOL, rtol=0)


def test_top_k_equal_n_experts_is_dense_mix():
    torch.manual_seed(2)
    moe = MoE(16, 24, 5, 5)
    x = torch.randn(2, 4, 16)
    torch.testing.assert_close(moe(x), dense_mix(moe, x), atol=ATOL, rtol=0)


def test_every_token_visits_exactly_k_distinct_experts():
    torch.manual_seed(3)
    moe = MoE(16, 24, 8, 3)
    moe(torch.randn(4, 9, 16))
    e = moe.last_experts
    assert e.shape == (36, 3)
    assert all(len(set(row.tolist())) == 3 for row in e)
    assert int(moe.last_counts.sum()) == 36 * 3


def test_route_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs, w, e = route(logits, 2)
    assert e.tolist() == [[0, 1]]
    torch.testing.assert_close(w, torch.tensor([[1 / (1 + math.exp(-1)), 1 - 1 / (1 + math.exp(-1))]]))
    _, w_raw, _ = route(logits, 2, renormalize=False)
    torch.testing.assert_close(w_raw, probs[:, :2])


def test_balancing_loss_matches_hf_and_bounds():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(4)
    logits = torch.randn(50, 8)
    probs, _, experts = route(logits, 2)
    ours = load_balancing_loss(probs, experts, 8)
    torch.testing.assert_close(ours * 2, load_balancing_loss_func((logits,), 8, 2), atol=1e-6, rtol=0)
    uniform = torch.zeros(8, 8)   # every token probability 1/8, each expert chosen once per token as top-1
    assert load_balancing_loss(uniform.softmax(-1), torch.arange(8)[:, None], 8).item() == pytest.approx(1.0)
    collapsed = torch.full((8, 8), -30.0)
    collapsed[:, 0] = 30.0
    assert load_balancing_loss(collapsed.softmax(-1), torch.zeros(8, 1, dtype=torch.long), 8).item() == \
        pytest.approx(8.0, rel=1e-4)


def test_z_loss():
    logits = torch.zeros(3, 4)
    assert router_z_loss(logits).item() == pytest.approx(math.log(4) ** 2)


def test_capacity_drops_overflow_in_token_order():
    assert capacity(10, 4, 1, 1.0) == 3 and capacity(16, 8, 2, 1.25) == 5
    moe = MoE(4, 8, 2, 1, capacity_factor=1.0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0           # every token with x[0] > 0 prefers expert 0
    x = torch.zeros(1, 6, 4)
    x[0, :, 0] = 1.0                             # all 6 tokens want expert 0; capacity = 3
    y = moe(x)
    assert moe.last_dropped == 3
    full = MoE(4, 8, 2, 1)
    full.load_state_dict(moe.state_dict())
    y_full = full(x)
    torch.testing.assert_close(y[0, :3], y_full[0, :3])     # the first three are served
    assert y[0, 3:].abs().max() == 0                         # the overflow contributes nothing


def test_dropped_fraction_grows_as_capacity_shrinks():
    torch.manual_seed(5)
    moe = MoE(16, 24, 8, 2)
    x = torch.randn(4, 32, 16)
    dropped = []
    for f in (4.0, 1.5, 1.0, 0.5, 0.25):
        moe.capacity_factor = f
        moe(x)
        dropped.append(moe.last_dropped)
    assert dropped == sorted(dropped) and dropped[0] == 0 and dropped[-1] >= 0.75 * 128 * 2 - 8


def _tiny_cfg(**kw):
    return GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_kv_head=2, d_model=32, **kw)


def test_aux_losses_reach_training_loss_and_router_gradient():
    torch.manual_seed(6)
    model = MoEGPT(_tiny_cfg(), n_experts=4, top_k=2, d_ff=24, aux_coef=0.5, z_coef=0.1)
    idx = torch.randint(0, 50, (2, 16))
    model.train()
    _, loss = model(idx, idx)
    layers = model.moe_layers()
    expected = model.last_ce + 0.5 * sum(m.aux_loss for m in layers) + 0.1 * sum(m.z_loss for m in layers)
    torch.testing.assert_close(loss, expected)
    model.eval()
    _, val = model(idx, idx)
    torch.testing.assert_close(val, model.last_ce)          # validation: plain cross-entropy
    # the balancing loss alone gives the router a gradient
    model.train()
    model.zero_grad()
    model(idx, idx)
    sum(m.aux_loss for m in layers).backward()
    assert layers[0].router.weight.grad.abs().sum() > 0


def test_top1_renormalised_router_gets_no_lm_gradient():
    torch.manual_seed(7)
    model = MoEGPT(_tiny_cfg(), n_experts=4, top_k=1, d_ff=24, aux_coef=0, z_coef=0)
    idx = torch.randint(0, 50, (2, 16))
    model.train()
    model(idx, idx)[1].backward()
    g = model.moe_layers()[0].router.weight.grad
    g = 0.0 if g is None else g.abs().max().item()           # p / p = 1: only float rounding (~1e-12) is left
    switch = MoEGPT(_tiny_cfg(), n_experts=4, top_k=1, d_ff=24, aux_coef=0, z_coef=0, renormalize=False)
    switch.train()
    switch(idx, idx)[1].backward()
    assert switch.moe_layers()[0].router.weight.grad.abs().max().item() > 1e6 * g


@pytest.mark.parametrize("tie", [True, False])
def test_export_to_mixtral_equal_logits(tie):
    torch.manual_seed(8)
    model = MoEGPT(_tiny_cfg(tie_embeddings=tie), n_experts=4, top_k=2, d_ff=24).eval()
    hf = to_mixtral(model)
    idx = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)
    assert sum(p.numel() for p in hf.parameters()) == model.num_params()


def test_export_refuses_what_mixtral_cannot_express():
    with pytest.raises(ValueError, match="renormalize"):
        to_mixtral(MoEGPT(_tiny_cfg(), n_experts=4, top_k=1, renormalize=False))
    with pytest.raises(ValueError, match="capacity_factor"):
        to_mixtral(MoEGPT(_tiny_cfg(), n_experts=4, top_k=2, capacity_factor=1.0))
    with pytest.raises(TypeError):
        to_mixtral(GPT(_tiny_cfg()))


def _counted_flops(model, seq_len):
    idx = torch.randint(0, model.cfg.vocab_size, (2, seq_len))
    with FlopCounterMode(display=False) as counter:
        model(idx, idx)[1].backward()
    return counter.get_total_flops() / idx.numel()


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_flops_formula_matches_flop_counter(kind):
    torch.manual_seed(9)
    cfg = _tiny_cfg(tie_embeddings=False)
    T = 16
    if kind == "dense":
        model = GPT(cfg)
        formula = flops_per_token(cfg, seq_len=T)
    else:
        model = MoEGPT(cfg, n_experts=4, top_k=2, d_ff=24)
        formula = flops_per_token(cfg, seq_len=T, n_experts=4, top_k=2, d_ff=24)
    core = 3 * cfg.n_layer * 2 * 2 * T * cfg.d_model     # attention core: CPU SDPA is not seen by the counter
    # the counter skips the first layer's input-gradient of the embedding lookup (none exists) and nothing else
    assert _counted_flops(model, T) == pytest.approx(formula - core, rel=0.02)


def test_statistics():
    assert usage_entropy(torch.tensor([5, 5, 5, 5])) == pytest.approx(math.log(4))
    assert usage_entropy(torch.tensor([9, 0, 0])) == 0.0
    assert mutual_information([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert mutual_information([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        mutual_information([0, 1], [0])
    with pytest.raises(ValueError):
        mutual_information([], [])


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        MoE(16, 24, 4, 5)
    with pytest.raises(TypeError, match="n_experts"):
        MoE(16, 24, 4.0, 2)
    with pytest.raises(ValueError, match="d_ff"):
        MoE(16, 0, 4, 2)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(16, 24, 4, 2, capacity_factor=0)
    with pytest.raises(ValueError, match="dispatch"):
        MoE(16, 24, 4, 2, dispatch="fast")
    with pytest.raises(ValueError, match="x must be"):
        MoE(16, 24, 4, 2)(torch.randn(2, 8))
    with pytest.raises(ValueError, match="aux_coef"):
        MoEGPT(_tiny_cfg(), n_experts=4, aux_coef=-1)
    with pytest.raises(ValueError, match="no attribute"):
        MoEGPT(_tiny_cfg(), n_experts=4).set(nonsense=1)


def test_empty_and_single_token():
    moe = MoE(8, 16, 4, 2)
    assert moe(torch.randn(1, 1, 8)).shape == (1, 1, 8)
    assert moe(torch.randn(1, 0, 8)).shape == (1, 0, 8)
    moe.dispatch = "loop"
    assert moe(torch.randn(1, 0, 8)).shape == (1, 0, 8)


def test_collect_routing_shapes_and_consistency():
    torch.manual_seed(10)
    model = MoEGPT(_tiny_cfg(), n_experts=4, top_k=2, d_ff=24)
    tokens = torch.randint(0, 50, (70,))
    ids, per_layer = collect_routing(model, tokens, seq_len=16, batch_size=3)
    assert ids.shape == (64,) and len(per_layer) == 2 and per_layer[0].shape == (64, 2)
    model(ids.view(4, 16))                                   # one batch: the same routing
    assert torch.equal(model.moe_layers()[1].last_experts, per_layer[1])
    with pytest.raises(ValueError, match="seq_len"):
        collect_routing(model, tokens[:5], seq_len=16)


def test_router_scale_is_a_hot_router_and_exports():
    torch.manual_seed(11)
    hot = MoE(16, 24, 4, 2, router_scale=10.0).eval()
    cold = MoE(16, 24, 4, 2).eval()
    cold.load_state_dict(hot.state_dict())
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        hot(x)
        cold(x)
        torch.testing.assert_close(hot.last_logits, 10.0 * cold.last_logits)
        torch.testing.assert_close(hot(x), _hf_block(hot)(x), atol=ATOL, rtol=0)   # the scale folds into the gate
        full = MoE(16, 24, 4, 4, router_scale=3.0)
        torch.testing.assert_close(full(x), dense_mix(full, x), atol=ATOL, rtol=0)
    model = MoEGPT(_tiny_cfg(), n_experts=4, top_k=2, d_ff=24, router_scale=5.0).eval()
    idx = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], to_mixtral(model)(idx).logits, atol=1e-5, rtol=0)
    for bad in (0, -1.0, True, "2"):
        with pytest.raises(ValueError, match="router_scale"):
            MoE(16, 24, 4, 2, router_scale=bad)
        with pytest.raises(ValueError, match="router_scale"):
            MoEGPT(_tiny_cfg(), n_experts=4, router_scale=bad)


def test_fact_task():
    table = fact_table(64, 8, seed=3)
    assert table.shape == (64,) and int(table.min()) >= 0 and int(table.max()) < 8
    assert torch.equal(table, fact_table(64, 8, seed=3)) and not torch.equal(table, fact_table(64, 8, seed=4))
    x, y = fact_batch(table, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (32, 1)
    assert torch.equal(y[:, 0], 64 + table[x[:, 0]])                      # each target is its key's value token
    torch.manual_seed(0)
    model = freeze_random_embeddings(GPT(GPTConfig(vocab_size=72, block_size=1, n_layer=1, n_head=2, d_model=16)))
    assert not model.tok_emb.weight.requires_grad
    assert model.tok_emb.weight.std().item() == pytest.approx(16 ** -0.5, rel=0.1)
    bits, acc = fact_eval(model, table)
    assert 0.0 <= acc <= 1.0 and bits > 0
    # the loss equals the mean -log2 p(value | key) computed by hand
    with torch.no_grad():
        logp = model(torch.arange(64)[:, None])[0][:, 0].log_softmax(-1)
    assert bits == pytest.approx(-logp[torch.arange(64), 64 + table].mean().item() / math.log(2), rel=1e-5)
    with pytest.raises(ValueError, match="n_values"):
        fact_table(8, 1)
    with pytest.raises(ValueError, match="table"):
        fact_batch(torch.zeros(0, dtype=torch.long), 4, torch.Generator())
    with pytest.raises(ValueError, match="table"):
        fact_eval(model, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="GPT"):
        freeze_random_embeddings(torch.nn.Linear(2, 2))


def test_helpers_move_cpu_inputs_to_the_models_device():
    # The GPU rule without a GPU: the model on `meta`; inside device_guard an input left on the CPU raises a
    # ValueError naming the layer. A meta tensor has no values, so each helper may stop at its first read of one
    # (NotImplementedError/RuntimeError): that means every input reached the model on its device.
    from shared.validate import device_guard

    torch.manual_seed(0)
    table = fact_table(64, 8, seed=3)
    model = freeze_random_embeddings(GPT(GPTConfig(vocab_size=72, block_size=1, n_layer=1, n_head=2, d_model=16)))
    moe = MoEGPT(_tiny_cfg(), n_experts=4, top_k=2, d_ff=24)
    for m, call in ((model, lambda: fact_eval(model, table)),
                    (moe, lambda: collect_routing(moe, torch.randint(0, 50, (32,)), seq_len=16))):
        m.to("meta")
        with device_guard(m):
            try:
                call()
            except (NotImplementedError, RuntimeError) as err:
                assert "device" not in str(err).lower() or "meta" in str(err).lower(), err
