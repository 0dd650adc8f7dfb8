"""Tests for norms.py: references (torch, transformers, the shared model), gradients, placement, bad arguments."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

import norms
from shared.model import GPT, MLP, GPTConfig, RMSNorm as SharedRMSNorm, make_norm as shared_make_norm

ATOL = 1e-5     # float32 against torch's fused kernels: a few ulps of values of size ~1-3


def cfg(**kw):
    base = dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, d_model=32)
    return GPTConfig(**{**base, **kw})


@pytest.fixture
def x():
    return torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0)) * 2 + 0.5


# ---------------------------------------------------------------- norms against torch
def test_layer_norm_matches_torch(x):
    w, b = torch.randn(32), torch.randn(32)
    torch.testing.assert_close(norms.layer_norm(x, w, b, 1e-5), F.layer_norm(x, (32,), w, b, 1e-5),
                               atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(norms.LayerNorm(32)(x), torch.nn.LayerNorm(32)(x), atol=ATOL, rtol=1e-5)


def test_rms_norm_matches_torch_and_shared(x):
    w = torch.randn(32)
    torch.testing.assert_close(norms.rms_norm(x, w, 1e-6), F.rms_norm(x, (32,), w, 1e-6), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(norms.RMSNorm(32)(x), SharedRMSNorm(32)(x), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(norms.LayerNorm(32)(x), shared_make_norm(cfg(norm="layer"))(x), atol=ATOL, rtol=1e-5)


def test_dyt_is_the_papers_formula(x):
    m = norms.DyT(32, alpha0=0.7)
    with torch.no_grad():
        m.weight.uniform_(-1, 1), m.bias.uniform_(-1, 1)
    torch.testing.assert_close(m(x), torch.tanh(0.7 * x) * m.weight + m.bias)
    assert m(torch.full((1, 32), 1e6)).abs().max() <= (m.weight.abs() + m.bias.abs()).max() + 1e-6   # bounded


def test_norm_invariances(x):
    # LayerNorm: invariant to shift and scale of a row; RMSNorm: to scale only
    torch.testing.assert_close(norms.layer_norm(3 * x + 7, eps=0.0), norms.layer_norm(x, eps=0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(norms.rms_norm(3 * x, eps=0.0), norms.rms_norm(x, eps=0.0), atol=1e-5, rtol=0)
    assert not torch.allclose(norms.rms_norm(x + 7, eps=0.0), norms.rms_norm(x, eps=0.0), atol=1e-2)
    y = norms.rms_norm(x, eps=0.0)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(3, 5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fn", ["layer", "rms", "dyt"])
def test_norm_gradcheck(fn):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    f = {"layer": lambda x, w, b: norms.layer_norm(x, w, b, 1e-5),
         "rms": lambda x, w, b: norms.rms_norm(x, w, 1e-5) + 0 * b,
         "dyt": lambda x, w, b: norms.dyt(x, a, w, b)}[fn]
    assert torch.autograd.gradcheck(f, (x, w, b))


def test_eps_zero_on_zero_input_is_nan():
    z = torch.zeros(2, 8)
    assert torch.isnan(norms.rms_norm(z, eps=0.0)).all() and torch.isnan(norms.layer_norm(z, eps=0.0)).all()
    assert torch.isnan(F.rms_norm(z, (8,), eps=0.0)).all()                        # torch agrees
    assert torch.isinf(norms.rms_norm(torch.full((2, 8), 1e-23), eps=0.0)).all()  # x^2 underflows to 0
    assert torch.isfinite(norms.rms_norm(z, eps=1e-5)).all() and torch.isfinite(norms.layer_norm(z)).all()


# ---------------------------------------------------------------- activations
@pytest.mark.parametrize("name, reference", [
    ("relu", F.relu), ("gelu", lambda t: F.gelu(t, approximate="none")),
    ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh")), ("silu", F.silu),
    ("relu2", lambda t: F.relu(t) ** 2)])
def test_activations_match_torch(name, reference):
    t = torch.linspace(-8, 8, 1001)
    torch.testing.assert_close(norms.ACTIVATIONS[name](t), reference(t), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name, key", [("relu", "relu"), ("gelu", "gelu"), ("gelu_tanh", "gelu_new"),
                                       ("gelu_tanh", "gelu_pytorch_tanh"), ("silu", "silu"), ("relu2", "relu2")])
def test_activations_match_transformers(name, key):
    t = torch.linspace(-8, 8, 1001)
    torch.testing.assert_close(norms.ACTIVATIONS[name](t), ACT2FN[key](t), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "silu", "relu2"])
def test_activation_gradcheck(name):
    t = torch.randn(20, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    assert torch.autograd.gradcheck(norms.ACTIVATIONS[name], (t,))


def test_gelu_tanh_is_close_to_exact_but_not_equal():
    t = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    d = (norms.gelu(t) - norms.gelu_tanh(t)).abs().max().item()
    assert 1e-5 < d < 1e-3


# ---------------------------------------------------------------- MLPs and widths
def test_glu_width_matches_parameters():
    for d in (32, 64, 96, 768):
        w = norms.glu_width(d)
        assert abs(norms.mlp_weights(d, w, True) - norms.mlp_weights(d, 4 * d, False)) <= 3 * d   # +-1 column
    assert norms.glu_width(64) == 171 and norms.glu_width(96) == 256


def test_mlps_match_shared_mlp():
    c = cfg(act="swiglu", d_ff=48)
    ref = MLP(c)
    ours = norms.GLUMLP(32, 48, "silu")
    ours.load_state_dict(ref.state_dict())
    t = torch.randn(2, 4, 32)
    torch.testing.assert_close(ours(t), ref(t), atol=1e-6, rtol=1e-5)
    c = cfg(act="gelu")
    ref = MLP(c)
    ours = norms.PlainMLP(32, 128, "gelu")
    ours.load_state_dict(ref.state_dict())
    torch.testing.assert_close(ours(t), ref(t), atol=1e-6, rtol=1e-5)


def test_parameter_counts_of_gpt_variants():
    c = cfg(d_model=64)
    n = {m: norms.build_gpt(c, "rms", m).num_params() for m in ("gelu", "swiglu", "geglu", "relu2")}
    assert n["gelu"] == n["relu2"]
    assert abs(n["swiglu"] - n["gelu"]) / n["gelu"] < 0.002 and n["swiglu"] == n["geglu"]


# ---------------------------------------------------------------- GPT plumbing and placement
def test_build_gpt_with_our_rms_and_swiglu_equals_shared_gpt():
    c = cfg(d_ff=norms.glu_width(32))
    torch.manual_seed(0)
    ref = GPT(c)
    ours = norms.build_gpt(c, "rms", "swiglu", "pre", seed=0)
    ours.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(ours(idx)[0], ref(idx)[0], atol=1e-5, rtol=1e-5)


def test_post_norm_block_wiring():
    c = cfg()
    model = norms.build_gpt(c, "layer", "gelu", "post", seed=0)
    b = model.blocks[0]
    assert isinstance(b, norms.PostNormBlock)
    t = torch.randn(2, 16, 32)
    expect = b.norm1(t + b.attn(t))
    expect = b.norm2(expect + b.mlp(expect))
    torch.testing.assert_close(b(t), expect)
    # the post-norm output of a LayerNorm block has zero mean and unit variance per token (weight 1, bias 0)
    torch.testing.assert_close(b(t).mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)


def test_post_and_pre_are_the_same_function_without_norms():
    c = cfg()
    pre = norms.build_gpt(c, "none", "gelu", "pre", seed=3)
    post = norms.build_gpt(c, "none", "gelu", "post", seed=3)
    idx = torch.randint(0, 50, (2, 16))
    assert torch.equal(pre(idx)[0], post(idx)[0])


def test_post_norm_shares_modules_and_generates():
    c = cfg()
    model = norms.build_gpt(c, "rms", "swiglu", "pre", seed=0)
    attn = model.blocks[1].attn
    norms.to_post_norm(model)
    assert model.blocks[1].attn is attn
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 5, temperature=0)
    assert out.shape == (1, 8)


def test_inspection_helpers_shapes():
    c = cfg()
    model = norms.build_gpt(c, "dyt", "swiglu", "pre", seed=0)
    idx = torch.randint(0, 50, (2, 16))
    assert norms.residual_norms(model, idx).shape == (3,)
    g = norms.block_grad_norms(model, idx, idx)
    assert g.shape == (2,) and (g > 0).all()
    h = norms.mlp_hidden(model, idx)
    assert len(h) == 2 and h[0].shape == (2, 16, norms.glu_width(32))
    assert norms.residual_stream(model, idx).shape == (2, 16, 32)
    t = torch.ones(10, 8)
    t[:, 3] = 100
    idx_out, peak = norms.outlier_channels(t)
    assert idx_out.tolist() == [3] and peak.shape == (8,)


def test_unigram_entropy_and_broke():
    assert math.isclose(norms.unigram_entropy(torch.tensor([0, 1, 2, 3]), 4), math.log(4), rel_tol=1e-9)
    r = norms.Run("rms", "swiglu", "pre", 0, 1e-3, 0, val_loss=float("nan"))
    assert norms.broke(r, 5.0)
    r.val_loss = 2.0
    assert not norms.broke(r, 5.0) and norms.broke(r, 1.0)


def test_interleaved_times():
    out = norms.interleaved_times({"a": lambda: None, "b": lambda: sum(range(100))}, rounds=3, inner=2)
    assert set(out) == {"a", "b"} and out["a"].shape == (3,)


# ---------------------------------------------------------------- bad arguments
def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        norms.norm_factory("batch")
    with pytest.raises(TypeError, match="kind"):
        norms.make_norm(3, 8)
    with pytest.raises(ValueError, match="kind"):
        norms.mlp_factory("tanh")
    with pytest.raises(ValueError, match="eps"):
        norms.RMSNorm(8, eps=-1.0)
    with pytest.raises(TypeError, match="eps"):
        norms.LayerNorm(8, eps="small")
    with pytest.raises(ValueError, match="dim"):
        norms.LayerNorm(0)
    with pytest.raises(TypeError, match="dim"):
        norms.DyT(8.0)
    with pytest.raises(ValueError, match="alpha0"):
        norms.DyT(8, alpha0=0)
    with pytest.raises(ValueError, match="alpha0"):
        norms.norm_factory("dyt", alpha0=-1.0)
    with pytest.raises(ValueError, match="act"):
        norms.GLUMLP(8, 16, "swish")
    with pytest.raises(ValueError, match="placement"):
        norms.build_gpt(cfg(), "rms", "swiglu", "middle")
    with pytest.raises(TypeError, match="cfg"):
        norms.build_gpt({"d_model": 32})
    with pytest.raises(TypeError, match="model"):
        norms.to_post_norm(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="x"):
        norms.outlier_channels([1.0, 2.0])
    with pytest.raises(ValueError, match="fns"):
        norms.interleaved_times({})
    with pytest.raises(ValueError, match="plain_width"):
        norms.glu_width(8, plain_width=0)


def test_train_tracking_follows_shared_train():
    from shared.train import train
    c = cfg()
    tokens = torch.randint(0, 50, (2000,), generator=torch.Generator().manual_seed(5))
    probe = tokens[:32].view(2, 16)
    a = norms.build_gpt(c, "rms", "swiglu", "pre", seed=0)
    hist = train(a, tokens, None, steps=6, batch_size=4, seq_len=16, lr=1e-2, seed=3, progress=False)
    b = norms.build_gpt(c, "rms", "swiglu", "pre", seed=0)
    out = norms.train_tracking(b, tokens, probe, steps=6, batch_size=4, lr=1e-2, every=2, seed=3)
    torch.testing.assert_close(torch.tensor(out["loss"]), torch.tensor(hist.train_loss), atol=1e-6, rtol=0)
    assert out["res"].shape == (4, 3) and out["res_step"] == [0, 2, 4, 6] and out["failed_at"] is None
    for p, q in zip(a.parameters(), b.parameters()):                     # same weights at the end: same steps
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_train_tracking_details_and_probe_leaves_training_alone():
    c = cfg()
    tokens = torch.randint(0, 50, (2000,), generator=torch.Generator().manual_seed(5))
    probe = tokens[:32].view(2, 16)
    a = norms.build_gpt(c, "rms", "swiglu", "pre", seed=0)
    plain = norms.train_tracking(a, tokens, probe, steps=4, batch_size=4, lr=1e-2, every=2, seed=3)
    b = norms.build_gpt(c, "rms", "swiglu", "pre", seed=0)
    out = norms.train_tracking(b, tokens, probe, probe_targets=tokens[1:33].view(2, 16), steps=4, batch_size=4,
                               lr=1e-2, every=2, seed=3, keep=(0, 4))
    assert out["loss"] == plain["loss"]                                  # the probe's backward changes nothing
    assert out["hidden_std"].shape == (3, 2) and out["grad_std"].shape == (3, 2)
    assert set(out["hist"]) == {0, 4} and len(out["hist"][4]["hidden"]) == 2
    assert out["hist"][0]["hidden"][0].numel() == 32 * norms.glu_width(32)
    names = [n for n, p in b.named_parameters() if p.dim() == 2 and n != "tok_emb.weight"]
    assert list(out["update_ratio"]) == names and all(len(v) == 4 and all(0 < r < 1 for r in v)
                                                      for v in out["update_ratio"].values())
    with pytest.raises(ValueError, match="probe_targets"):
        norms.train_tracking(b, tokens, probe, probe_targets=probe[:1], steps=1, lr=1e-2)


def test_train_tracking_stops_at_a_non_finite_loss():
    c = cfg()
    tokens = torch.randint(0, 50, (2000,), generator=torch.Generator().manual_seed(5))
    model = norms.build_gpt(c, "none", "swiglu", "pre", seed=0)
    with torch.no_grad():
        model.tok_emb.weight.fill_(float("inf"))
    out = norms.train_tracking(model, tokens, tokens[:32].view(2, 16), steps=5, batch_size=4, lr=1e-2)
    assert out["failed_at"] == 0 and len(out["loss"]) == 1 and out["res_step"] == [0]


def test_build_gpt_passes_alpha0_to_every_dyt():
    model = norms.build_gpt(cfg(), "dyt", "swiglu", "pre", seed=0, alpha0=7.0)
    alphas = [m.alpha.item() for m in model.modules() if isinstance(m, norms.DyT)]
    assert len(alphas) == 2 * 2 + 1 and all(a == 7.0 for a in alphas)


def test_geglu_matches_gemma_mlp():
    # Gemma's MLP is GeGLU with GELU's tanh approximation (transformers maps hidden_act "gelu" to it too)
    from transformers import GemmaConfig
    from transformers.models.gemma.modeling_gemma import GemmaMLP
    ref = GemmaMLP(GemmaConfig(hidden_size=32, intermediate_size=norms.glu_width(32),
                               hidden_act="gelu_pytorch_tanh"))
    tanh_geglu = norms.GLUMLP(32, norms.glu_width(32), "gelu_tanh")
    exact_geglu = norms.make_mlp("geglu", 32)
    tanh_geglu.load_state_dict(ref.state_dict())
    exact_geglu.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(tanh_geglu(x), ref(x), atol=1e-6, rtol=1e-5)
        gap = (exact_geglu(x) - ref(x)).abs().max().item()
    assert 0 < gap < 1e-3                  # exact GELU: the same function up to the tanh approximation


def test_build_gpt_per_layer_alpha0():
    a0 = (9.0, 8.0, 7.0, 6.0, 5.0)
    model = norms.build_gpt(cfg(), "dyt", "gelu", "pre", seed=0, alpha0=a0)
    assert [m.alpha.item() for _, m in norms.norm_modules(model)] == list(a0)
    assert [n for n, _ in norms.norm_modules(model)][-1] == "final norm"
    # the per-layer init changes only the alphas: every other weight is the scalar-alpha model's
    ref = norms.build_gpt(cfg(), "dyt", "gelu", "pre", seed=0, alpha0=1.0)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if not n.endswith("alpha"):
            assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="one value per norm"):
        norms.build_gpt(cfg(), "dyt", "gelu", alpha0=(1.0, 2.0))
    with pytest.raises(ValueError, match="alpha0 must be a positive float"):
        norms.build_gpt(cfg(), "dyt", "gelu", alpha0=(1.0, 2.0, -1.0, 1.0, 1.0))


def test_model_facing_helpers_move_inputs_to_the_models_device():
    # the model on `meta` stands in for a GPU: an input left on the CPU would raise a device-mismatch ValueError
    from shared.validate import device_guard
    c = cfg()
    idx = torch.randint(0, 50, (2, 16))
    for placement in ("pre", "post"):
        model = norms.build_gpt(c, "rms", "swiglu", placement, seed=0).to("meta")
        with device_guard(model):
            assert norms.residual_norms(model, idx).shape == (3,)
            assert len(norms.mlp_hidden(model, idx)) == 2
            assert norms.residual_stream(model, idx).shape == (2, 16, 32)
            assert norms.block_grad_norms(model, idx, idx).shape == (2,)
            with pytest.raises((NotImplementedError, RuntimeError)):      # stops at its first .item() on meta
                norms.train_tracking(model, torch.randint(0, 50, (500,)), idx, probe_targets=idx, steps=2,
                                     batch_size=2, lr=1e-2, every=1)


def test_dyt_alpha_gain_multiplies_alphas_step_not_its_value():
    x = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(6))
    slow, fast = norms.DyT(16, alpha0=3.0), norms.DyT(16, alpha0=3.0, alpha_gain=100.0)
    assert fast.alpha.item() == pytest.approx(3.0) and "parametrizations.alpha.original" in dict(fast.named_parameters())
    torch.testing.assert_close(fast(x), slow(x))
    moved = {}
    for name, m in (("slow", slow), ("fast", fast)):
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        m(x).pow(2).sum().backward()
        opt.step()
        moved[name] = abs(m.alpha.item() - 3.0)
    # Adam's first step moves every trained tensor by lr: alpha by lr, and by gain * lr through the gain
    assert moved["slow"] == pytest.approx(1e-3, rel=1e-3) and moved["fast"] == pytest.approx(0.1, rel=1e-3)
    # the per-layer init reaches a gained alpha too, and the same model otherwise
    model = norms.build_gpt(cfg(), "dyt", "gelu", "pre", seed=0, alpha0=(9.0, 8.0, 7.0, 6.0, 5.0), alpha_gain=10.0)
    assert [m.alpha.item() for _, m in norms.norm_modules(model)] == pytest.approx([9.0, 8.0, 7.0, 6.0, 5.0])
    with pytest.raises(ValueError, match="alpha_gain"):
        norms.DyT(8, alpha_gain=0.0)
    with pytest.raises(TypeError, match="alpha_gain"):
        norms.norm_factory("dyt", alpha_gain="fast")
