"""Tests for scaling.py: closed forms vs the module and FlopCounterMode, fits on known curves, bad arguments."""
import math

import numpy as np
import pytest
import torch

import scaling
from shared.model import GPT, GPTConfig


SHAPES = [dict(d_model=16, n_layer=1, n_head=2), dict(d_model=48, n_layer=2, n_head=3),
          dict(d_model=64, n_layer=3, n_head=4)]


@pytest.mark.parametrize("shape", SHAPES)
def test_non_embedding_params_equal_module_count(shape):
    cfg = scaling.config(**shape, vocab_size=97, seq_len=16)
    model = GPT(cfg)
    assert scaling.non_embedding_params(cfg) == model.num_params(non_embedding=True)
    assert scaling.matrix_params(cfg) == sum(p.numel() for p in model.parameters() if p.dim() == 2) \
        - model.tok_emb.weight.numel()


def test_non_embedding_params_with_grouped_kv_heads():
    cfg = GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=4, n_kv_head=2, d_model=32)
    assert scaling.non_embedding_params(cfg) == GPT(cfg).num_params(non_embedding=True)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_train_flops_total_equals_flop_counter_exactly(shape):
    # FLOP counts are integers: the closed form must match the counter exactly (rtol 0)
    cfg = scaling.config(**shape, vocab_size=97, seq_len=16)
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(0, 97, (3, 16))
    counted = scaling.count_step_flops(model, x, x)
    terms = scaling.train_flops(cfg, x.numel())
    assert counted == terms["total"]
    assert terms["6ND"] < counted                            # 6ND leaves out the LM head and attention
    # the terms add up: 6ND over-counts only the norm gains (no matmul), by 6 * D * (2L + 1) * C
    extra = 6 * x.numel() * (2 * cfg.n_layer + 1) * cfg.d_model
    assert terms["6ND"] + terms["lm_head"] + terms["attention"] - counted == extra


def test_flash_attention_is_invisible_to_the_counter_on_cpu():
    cfg = scaling.config(32, 2, 2, vocab_size=64, seq_len=16)
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(0, 64, (2, 16))
    terms = scaling.train_flops(cfg, x.numel())
    assert scaling.count_step_flops(model, x, x, math_attention=False) == terms["total"] - terms["attention"]


def test_flops_scale_linearly_in_tokens():
    cfg = scaling.config(32, 2, 2, vocab_size=64, seq_len=16)
    a, b = scaling.train_flops(cfg, 1000), scaling.train_flops(cfg, 3000)
    assert all(math.isclose(3 * a[k], b[k]) for k in a)


def test_fit_recovers_a_known_curve():
    n = np.geomspace(1e3, 1e5, 6)
    true = scaling.LossFit(E=0.3, A=5.0, alpha=0.4, floor=True)
    fit = scaling.fit_loss_curve(n, true.predict(n))
    assert fit.E == pytest.approx(0.3, rel=1e-4)
    assert fit.A == pytest.approx(5.0, rel=1e-3)
    assert fit.alpha == pytest.approx(0.4, rel=1e-4)
    pure = scaling.fit_loss_curve(n, 5.0 * n ** -0.4, floor=False)
    assert pure.E == 0.0 and pure.alpha == pytest.approx(0.4, rel=1e-5)


def test_pure_power_law_over_predicts_gains_when_there_is_a_floor():
    n = np.geomspace(1e3, 1e5, 6)
    true = scaling.LossFit(E=0.3, A=5.0, alpha=0.4, floor=True)
    pure = scaling.fit_loss_curve(n, true.predict(n), floor=False)
    assert pure.predict(1e7) < true.predict(1e7) - 0.05       # extrapolates below the floor it cannot see


def test_bootstrap_spread_covers_the_truth_on_noisy_points():
    rng = np.random.default_rng(1)
    n = np.repeat(np.geomspace(1e3, 1e5, 6), 2)
    true = scaling.LossFit(E=0.3, A=5.0, alpha=0.4, floor=True)
    loss = true.predict(n) * (1 + 0.01 * rng.standard_normal(len(n)))
    fits = scaling.bootstrap_fit(n, loss, n_boot=100, seed=0)
    alphas, floors = np.array([f.alpha for f in fits]), np.array([f.E for f in fits])
    assert len(fits) == 100
    assert np.quantile(alphas, 0.02) < 0.4 < np.quantile(alphas, 0.98)
    assert np.quantile(floors, 0.02) < 0.3 < np.quantile(floors, 0.98)
    same = scaling.bootstrap_fit(n, true.predict(n), n_boot=5, seed=0)     # noiseless: every resample agrees
    assert np.allclose([f.alpha for f in same], 0.4, rtol=1e-3)


def test_units_round_trip_and_known_value():
    assert scaling.nats_per_token_to_bits_per_char(math.log(2), 10, 10) == pytest.approx(1.0)
    assert scaling.nats_per_token_to_bits_per_char(math.log(2), 10, 40) == pytest.approx(0.25)   # 4 chars/token
    b = scaling.nats_per_token_to_bits_per_char(1.7, 123, 456)
    assert scaling.bits_per_char_to_nats_per_token(b, 123, 456) == pytest.approx(1.7, rel=1e-12)


@pytest.mark.parametrize("args, exc", [((0, 1, 1, 10, 8), ValueError), ((16.0, 1, 1, 10, 8), TypeError),
                                       ((16, 1, 3, 10, 8), ValueError), ((16, True, 1, 10, 8), TypeError)])
def test_config_bad_arguments(args, exc):
    with pytest.raises(exc):
        scaling.config(*args)


def test_closed_forms_refuse_other_recipes():
    with pytest.raises(TypeError, match="GPTConfig"):
        scaling.non_embedding_params({"d_model": 16})
    with pytest.raises(ValueError, match="swiglu"):
        scaling.train_flops(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, d_model=8, act="gelu"), 10)
    with pytest.raises(ValueError, match="n_tokens"):
        scaling.train_flops(scaling.config(8, 1, 1, 10, 8), 0)


def test_fit_bad_arguments():
    with pytest.raises(ValueError, match="3 distinct"):
        scaling.fit_loss_curve([1e3, 1e3, 1e4], [1.0, 1.1, 0.9])
    with pytest.raises(ValueError, match="one length"):
        scaling.fit_loss_curve([1e3, 1e4, 1e5], [1.0, 0.9])
    with pytest.raises(ValueError, match="finite"):
        scaling.fit_loss_curve([1e3, 1e4, 1e5], [1.0, -0.9, 0.8])
    with pytest.raises(ValueError, match="min_sizes"):
        scaling.bootstrap_fit([1e3, 1e4, 1e5], [1.0, 0.9, 0.8], min_sizes=4)
    with pytest.raises(ValueError, match="n_tokens"):
        scaling.nats_per_token_to_bits_per_char(1.0, 0, 10)


def test_count_step_flops_shape_mismatch():
    model = GPT(scaling.config(8, 1, 1, 10, 8))
    with pytest.raises(ValueError, match="one shape"):
        scaling.count_step_flops(model, torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 7, dtype=torch.long))


def test_recall_and_name_positions_on_a_story():
    from shared import data
    from shared.tokenizer import train_tokenizer
    stories = data.StoryGenerator(seed=0).samples(200)
    tok = train_tokenizer([s.text for s in stories], 1024)
    s = stories[0]
    ids = tok(s.text, add_special_tokens=False)["input_ids"]
    rec = scaling.recall_positions(tok, s.text, s.colour, s.object)
    assert tok.decode([ids[i] for i in rec]).strip() == f"{s.colour} {s.object}"
    assert rec[-1] > len(ids) // 2                                   # the recall is in the last sentence
    names = scaling.name_repeat_positions(tok, s.text, s.name)
    assert len(names) == s.text.count(s.name) - 1 and all(tok.decode([ids[i]]).strip() == s.name for i in names)
    with pytest.raises(ValueError, match="no recall"):
        scaling.recall_positions(tok, s.text, "plaid", s.object)
    with pytest.raises(TypeError):
        scaling.recall_positions(tok, None, s.colour, s.object)


def test_story_token_losses_match_the_model_loss():
    from shared import data
    from shared.tokenizer import train_tokenizer
    stories = [s.text for s in data.StoryGenerator(seed=1).samples(50)]
    tok = train_tokenizer(stories, 1024)
    torch.manual_seed(0)
    model = GPT(scaling.config(16, 1, 1, len(tok), 64)).eval()
    losses = scaling.story_token_losses(model, tok, stories[:3], batch_size=2)     # padded batches
    for text, l in zip(stories[:3], losses):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        x = torch.tensor([[tok.eos_token_id] + ids[:-1]])
        with torch.no_grad():
            ref = model(x, torch.tensor([ids]))[1]
        assert l.shape == (len(ids),)
        torch.testing.assert_close(l.mean(), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError):
        scaling.story_token_losses(model, tok, "one story")


# ---------------------------------------------------------------------------------------------------------
# WSD branches, memory formula, L(D) interpolation, IsoFLOP parabola
def test_wsd_lr_shape():
    lrs = [scaling.wsd_lr(s, 25, 1.0, 10) for s in range(25)]
    assert lrs[:10] == pytest.approx([0.1 * (i + 1) for i in range(10)])
    assert lrs[10:20] == [1.0] * 10                       # stable until the last 20% (5 steps)
    assert lrs[20:] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    with pytest.raises(ValueError, match="step"):
        scaling.wsd_lr(25, 25, 1.0, 10)


def _tiny_streams():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 50, (4000,), generator=g)


def test_wsd_branch_equals_fresh_run():
    tokens = _tiny_streams()
    ev = lambda m: float(sum(p.double().sum() for p in m.parameters()))      # a fingerprint of the weights
    cfg = scaling.config(16, 1, 1, 50, 16)
    torch.manual_seed(0)
    long = scaling.train_wsd(GPT(cfg), tokens, ev, ends=(10, 20), batch_size=4, seq_len=16, lr=1e-2, warmup=2)
    torch.manual_seed(0)
    short = scaling.train_wsd(GPT(cfg), tokens, ev, ends=(10,), batch_size=4, seq_len=16, lr=1e-2, warmup=2)
    assert long.cooled[10] == short.cooled[10]                 # exact: same batches, same rates, same state
    assert set(long.uncooled) == {10} and long.uncooled[10] != long.cooled[10]
    assert len(long.train_loss) == 20
    torch.manual_seed(0)                                       # mid_run=False: no uncooled points, same run
    quiet = scaling.train_wsd(GPT(cfg), tokens, ev, ends=(10, 20), batch_size=4, seq_len=16, lr=1e-2, warmup=2,
                              mid_run=False)
    assert quiet.uncooled == {} and quiet.cooled == long.cooled


def test_wsd_bad_arguments():
    tokens = _tiny_streams()
    model = GPT(scaling.config(16, 1, 1, 50, 16))
    with pytest.raises(TypeError, match="evaluate"):
        scaling.train_wsd(model, tokens, 3, ends=(10,), batch_size=4, seq_len=16, lr=1e-2)
    with pytest.raises(ValueError, match="warm-up"):
        scaling.train_wsd(model, tokens, lambda m: 0.0, ends=(4, 20), batch_size=4, seq_len=16, lr=1e-2, warmup=5)
    with pytest.raises(ValueError, match="cooldown"):
        scaling.train_wsd(model, tokens, lambda m: 0.0, ends=(10,), batch_size=4, seq_len=16, lr=1e-2, cooldown=1.5)
    with pytest.raises(TypeError, match="ends"):
        scaling.train_wsd(model, tokens, lambda m: 0.0, ends=(10.5,), batch_size=4, seq_len=16, lr=1e-2)
    with pytest.raises(TypeError, match="mid_run"):
        scaling.train_wsd(model, tokens, lambda m: 0.0, ends=(10,), batch_size=4, seq_len=16, lr=1e-2, mid_run=1)


@pytest.mark.parametrize("width,n_layer,n_head", [(16, 1, 1), (48, 2, 3), (32, 3, 2)])
def test_activation_formula_matches_saved_tensors(width, n_layer, n_head):
    cfg = scaling.config(width, n_layer, n_head, 97, 32)
    torch.manual_seed(0)
    x, y = torch.randint(0, 97, (3, 32)), torch.randint(0, 97, (3, 32))
    assert scaling.training_memory(cfg, 3)["activations"] == scaling.saved_tensor_bytes(GPT(cfg), x, y)


def test_training_memory_parameter_terms():
    cfg = scaling.config(16, 1, 1, 97, 32)
    mem = scaling.training_memory(cfg, 2)
    n = sum(p.numel() for p in GPT(cfg).parameters())
    assert (mem["params"], mem["grads"], mem["adam"]) == (4 * n, 4 * n, 8 * n)
    assert mem["transient"] == 3 * 4 * 97 * 2 * 32
    with pytest.raises(ValueError, match="multi-head"):
        scaling.training_memory(GPTConfig(vocab_size=97, block_size=32, n_layer=1, n_head=2, n_kv_head=1,
                                          d_model=16), 2)
    with pytest.raises(TypeError, match="batch_size"):
        scaling.training_memory(cfg, 2.0)


def test_loss_at_tokens_interpolates_in_log_d():
    assert scaling.loss_at_tokens([100, 400], [2.0, 1.0], 200) == pytest.approx(1.5)   # midpoint in log D
    assert scaling.loss_at_tokens([100, 400], [2.0, 1.0], 100) == 2.0
    with pytest.raises(ValueError, match="outside"):
        scaling.loss_at_tokens([100, 400], [2.0, 1.0], 500)
    with pytest.raises(ValueError, match="increasing"):
        scaling.loss_at_tokens([400, 100], [2.0, 1.0], 200)


def test_fit_isoflop_finds_the_minimum():
    n = np.geomspace(1e3, 1e5, 6)
    loss = 0.05 * (np.log(n) - np.log(7e3)) ** 2 + 1.0
    fit = scaling.fit_isoflop(n, loss)
    assert fit.n_opt == pytest.approx(7e3, rel=1e-6)
    assert np.isnan(scaling.fit_isoflop(n, -loss).n_opt)      # opens downward: no minimum
    with pytest.raises(ValueError, match="3 distinct"):
        scaling.fit_isoflop([1, 1, 2], [1, 2, 3])


def test_isoflop_minimum_fits_locally_and_reports_edges():
    n = np.geomspace(1e3, 1e5, 9)
    x = np.log(n) - np.log(7e3)
    loss = 0.05 * x ** 2 + 1.0 + 0.2 * np.maximum(x - 1, 0) ** 3      # a parabola near 7e3, far from it off the mark
    m = scaling.isoflop_minimum(n, loss, half_width=1)
    assert m["bracketed"] and m["interior"] and m["window"] == (m["best"] - 1, m["best"] + 1)
    assert m["n_opt"] == pytest.approx(7e3, rel=0.1)
    whole = scaling.fit_isoflop(n, loss)                             # the far points drag a global parabola
    assert abs(np.log(whole.n_opt / 7e3)) > abs(np.log(m["n_opt"] / 7e3))
    edge = scaling.isoflop_minimum(n[4:], loss[4:])                  # best size at the slice's edge: no minimum
    assert not edge["bracketed"] and edge["fit"] is None and np.isnan(edge["n_opt"]) and not edge["interior"]
    with pytest.raises(ValueError, match="increasing"):
        scaling.isoflop_minimum([3, 2, 1], [1, 0, 1])
    with pytest.raises(ValueError, match="half_width"):
        scaling.isoflop_minimum(n, loss, half_width=0)


def test_fit_with_the_floor_fixed_recovers_a_known_curve_and_flags_bounds():
    n = np.geomspace(1e3, 1e5, 6)
    truth = scaling.LossFit(E=0.3, A=50.0, alpha=0.6, floor=True)
    fixed = scaling.fit_loss_curve(n, truth.predict(n), E=0.3)
    assert fixed.E_fixed and fixed.E == 0.3 and fixed.on_bound == ()
    np.testing.assert_allclose([fixed.A, fixed.alpha], [50.0, 0.6], rtol=1e-9)
    slope, icpt = np.polyfit(np.log(n), np.log(truth.predict(n) - 0.3), 1)      # the reference: a straight line
    assert math.isclose(fixed.alpha, -slope) and math.isclose(fixed.A, math.exp(icpt))
    # a pure power law has no floor: the free fit pins E at its lower bound and says so
    free = scaling.fit_loss_curve(n, 5.0 * n ** -0.3)
    assert "E" in free.on_bound and free.E < 1e-4
    boots = scaling.bootstrap_fit(np.repeat(n, 2), np.repeat(truth.predict(n), 2), n_boot=5, E=0.3)
    assert all(b.E == 0.3 and b.E_fixed for b in boots)
    with pytest.raises(ValueError, match="above the fixed E"):
        scaling.fit_loss_curve(n, truth.predict(n), E=0.35)
    with pytest.raises(ValueError, match="floor=False"):
        scaling.fit_loss_curve(n, truth.predict(n), floor=False, E=0.1)
    with pytest.raises(ValueError, match="E must be"):
        scaling.fit_loss_curve(n, truth.predict(n), E=-1.0)


def test_wsd_probes_evaluate_the_main_run_and_change_nothing_else():
    cfg = scaling.config(16, 1, 1, 97, 16)
    tokens = torch.randint(0, 97, (2000,), generator=torch.Generator().manual_seed(0))
    calls = []

    def ev(m):
        calls.append(1)
        return float(sum(p.sum() for p in m.parameters()))
    kw = dict(ends=(10, 20), batch_size=2, seq_len=16, lr=1e-3, warmup=2, seed=0)
    torch.manual_seed(0)
    plain = scaling.train_wsd(GPT(cfg), tokens, ev, **kw)
    torch.manual_seed(0)
    probed = scaling.train_wsd(GPT(cfg), tokens, ev, probes=(5, 12), **kw)
    assert probed.cooled == plain.cooled and probed.train_loss == plain.train_loss
    assert set(probed.uncooled) == {5, 10, 12} and probed.uncooled[10] == plain.uncooled[10]
    with pytest.raises(ValueError, match="probes"):
        scaling.train_wsd(GPT(cfg), tokens, ev, probes=(20,), **kw)


def test_model_facing_helpers_move_their_inputs_to_the_model_device():
    # the model on `meta` (no values): a helper that left a batch on the CPU is stopped by the guard with a
    # device-mismatch ValueError; one that moves it may still stop at its first read of a value, which is fine
    from shared.tokenizer import train_tokenizer
    from shared.validate import device_guard
    cfg = scaling.config(16, 1, 1, 97, 16)
    model = GPT(cfg).to("meta")
    x = torch.randint(0, 97, (2, 16))
    tokens = torch.randint(0, 97, (500,))
    tok = train_tokenizer(["the cat sat on the mat"] * 20, 300)
    calls = [lambda: scaling.count_step_flops(model, x, x),
             lambda: scaling.saved_tensor_bytes(model, x, x),
             lambda: scaling.story_token_losses(model, tok, ["the cat sat"]),
             lambda: scaling.train_wsd(model, tokens, lambda m: 0.0, ends=(4,), batch_size=2, seq_len=8,
                                       lr=1e-3, warmup=1)]
    with device_guard(model):
        for call in calls:
            try:
                call()
            except (NotImplementedError, RuntimeError) as e:      # a value read on meta, after the device plumbing
                assert "device mismatch" not in str(e)
