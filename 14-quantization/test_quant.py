"""Tests for quant.py: hand-checkable cases, PyTorch's quantiser and the `gguf` package as references, error
bounds, packing round trips, QuantLinear, the whole-model byte count, and the argument checks. CPU, a few seconds."""
import warnings

import gguf
import gguf.quants
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import quant
from shared.model import GPT, GPTConfig


def rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ---------------------------------------------------------------------------------------------- hand cases
def test_hand_example_per_tensor_and_per_channel():
    W = torch.tensor([[1.75, -0.60, 0.30, -1.00], [0.07, -0.03, 0.01, 0.00]])
    pt = quant.quantize(W, 4, "tensor")
    assert pt.codes().tolist() == [[7, -2, 1, -4], [0, 0, 0, 0]]
    assert pt.packed.tolist() == [0x6F, 0x49, 0x88, 0x88] and pt.nbytes == 4 + 2
    pc = quant.quantize(W, 4, "channel")
    assert pc.codes().tolist() == [[7, -2, 1, -4], [7, -3, 1, 0]]
    torch.testing.assert_close(pc.dequantize()[1], W[1], atol=1e-4, rtol=0)   # row 1 survives per-channel
    assert pc.scale.dtype == torch.float16 and pc.scale.shape == (2, 1, 1)


def test_zero_point_hand_example():
    W = torch.tensor([[0.0, 1.5, 3.0, 0.3]])                               # all >= 0: min clamps to 0 -> z = 0
    q = quant.quantize(W, 4, "tensor", symmetric=False)
    assert q.zero.item() == 0 and float(q.scale) == float(torch.tensor(0.2).half())   # 3.0 / 15 in fp16
    assert q.codes().tolist() == [[0, 8, 15, 2]]                           # 1.5/0.19995 = 7.502 -> 8
    W2 = torch.tensor([[-1.0, 0.0, 2.0]])
    q2 = quant.quantize(W2, 8, "tensor", symmetric=False)
    assert q2.zero.item() == 85 and q2.dequantize()[0, 1].item() == 0.0   # 0 is exactly representable
    torch.testing.assert_close(q2.dequantize(), W2, atol=float(q2.scale) / 2 + 1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- references
@pytest.mark.parametrize("shape, seed", [((7, 33), 0), ((64, 96), 1), ((1, 5), 2)] + [((300, 200), s) for s in range(8)])
def test_int8_matches_torch_quantizers(shape, seed):
    w = rand(*shape, seed=seed, scale=0.02)                                # near-ties do occur at this size
    q8 = quant.quantize(w, 8, "channel")
    qa = quant.quantize(w, 8, "tensor", symmetric=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.quantize_per_channel(w, q8.scale.flatten().double(), torch.zeros(shape[0], dtype=torch.long), 0,
                                         torch.qint8)
        ref_a = torch.quantize_per_tensor(w, float(qa.scale), int(qa.zero), torch.quint8)
    assert torch.equal(q8.codes().to(torch.int8), ref.int_repr())
    assert torch.equal(qa.codes().to(torch.uint8), ref_a.int_repr())
    torch.testing.assert_close(q8.dequantize(), ref.dequantize(), atol=1e-7, rtol=0)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("case", ["randn", "ties", "zeros", "constant", "outlier", "tiny"])
def test_gguf_bytes_identical(qtype, case):
    w = {"randn": rand(16, 96, seed=3),
         "ties": torch.randint(-16, 17, (8, 64), generator=torch.Generator().manual_seed(1)).float() / 4,
         "zeros": torch.zeros(2, 32),
         "constant": torch.full((3, 64), -0.75),
         "outlier": rand(4, 128, seed=5).index_fill_(1, torch.tensor([7]), 300.0),
         "tiny": rand(4, 32, seed=6, scale=1e-6)}[case]
    gtype = getattr(gguf.GGMLQuantizationType, qtype)
    ours = quant.gguf_quantize(w, qtype).numpy()
    theirs = gguf.quants.quantize(w.numpy(), gtype)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype and np.array_equal(ours, theirs)
    back = quant.gguf_dequantize(torch.from_numpy(theirs), qtype, tuple(w.shape)).numpy()
    assert np.array_equal(back, gguf.quants.dequantize(theirs, gtype))
    assert quant.GGUFTensor.from_float(w, qtype).nbytes == w.numel() // 32 * quant.GGUF_BLOCK_BYTES[qtype]


# ---------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity", ["tensor", "channel", 32, 50, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_bound_range_and_bytes(bits, granularity, symmetric):
    w = rand(12, 160, seed=bits)
    q = quant.quantize(w, bits, granularity, symmetric)
    codes = q.codes()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        assert codes.min() >= -qmax and codes.max() <= qmax
    else:
        assert codes.min() >= 0 and codes.max() <= 2 ** bits - 1
    err = (w - q.dequantize()).abs()
    step = q.per_weight(q.scale.float())
    # half a step, plus the fp16 rounding of the scale at the clipped extreme (< 1 step relative 2^-11 * qmax)
    assert (err <= step * 0.5 + step * 2 ** -10 * 2 ** bits).all()
    n_groups = {"tensor": 1, "channel": 12}.get(granularity, 12 * -(-160 // granularity) if isinstance(granularity, int) else 0)
    expected = -(-12 * 160 * bits // 8) + 2 * n_groups + (0 if symmetric else n_groups)
    assert q.nbytes == expected


def test_finer_granularity_is_more_accurate_on_outlier():
    w = rand(32, 128, seed=9)
    w[:, 5] *= 50                                                          # one outlier input column
    err = {g: quant.quant_error(w, quant.quantize(w, 4, g)) for g in ("tensor", "channel", 32)}
    assert err[32] < 0.75 * err["channel"] and err["channel"] < err["tensor"]                                 # the column hits every row's scale


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 3, 8, 17])
def test_pack_unpack_round_trip(bits, n):
    codes = torch.randint(0, 2 ** bits, (n,), generator=torch.Generator().manual_seed(n))
    packed = quant.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n * bits // 8)
    assert torch.equal(quant.unpack_bits(packed, bits, n), codes.to(torch.int32))


def test_partial_last_group_has_its_own_scale():
    w = torch.zeros(2, 10)
    w[:, 0] = 7.0                                                          # big value in the first full group
    w[:, 8:] = torch.tensor([[0.7, -0.3], [0.07, 0.0]])                   # the short last group (2 of 4)
    q = quant.quantize(w, 4, 4)
    assert q.scale.shape == (2, 3, 1)
    torch.testing.assert_close(q.scale[:, 2, 0].float(), torch.tensor([0.1, 0.01]), rtol=1e-3, atol=0)
    torch.testing.assert_close(q.dequantize(), w, atol=1e-3, rtol=0)


def test_all_zero_weight_gives_zero():
    q = quant.quantize(torch.zeros(3, 8), 4, 4)
    assert torch.equal(q.dequantize(), torch.zeros(3, 8))


def test_quant_linear_matches_dequantised_linear():
    lin = torch.nn.Linear(64, 24, bias=False)
    torch.nn.init.normal_(lin.weight, std=0.1, generator=torch.Generator().manual_seed(0))
    x = rand(3, 5, 64, seed=1)
    for quantizer in (lambda w: quant.quantize(w, 4, 32), lambda w: quant.GGUFTensor.from_float(w, "Q4_0")):
        ql = quant.QuantLinear.from_linear(lin, quantizer)
        torch.testing.assert_close(ql(x), F.linear(x, ql.qweight.dequantize()), atol=1e-6, rtol=0)
        assert ql(x).shape == (3, 5, 24)
    int8 = quant.QuantLinear.from_linear(lin, lambda w: quant.quantize(w, 8, "channel"))
    assert (int8(x) - lin(x)).norm() / lin(x).norm() < 0.01               # int8 within 1% of the float layer


def test_quantize_model_counts_bytes_and_ties():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_kv_head=1, d_model=32)
    model = GPT(cfg).eval()
    fp, fp_bytes = quant.quantize_model(model, quant.FloatTensor.from_float)
    assert fp_bytes == 4 * model.num_params()                              # tied embedding counted once
    q4, q4_bytes = quant.quantize_model(model, lambda w: quant.GGUFTensor.from_float(w, "Q4_0"))
    n_w = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    assert q4_bytes == n_w // 32 * 18 + 4 * (model.num_params() - n_w)
    assert q4.lm_head.weight is q4.tok_emb.weight                          # tie survives the copy
    assert not torch.equal(q4.tok_emb.weight, model.tok_emb.weight)        # the original is untouched...
    assert torch.equal(fp.tok_emb.weight, model.tok_emb.weight)            # ...and fp32 is the identity
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    nll = quant.token_nlls(model, torch.randint(0, 64, (50,), generator=torch.Generator().manual_seed(1)), 16)
    assert nll.shape == (3, 16) and (nll > 0).all()
    with torch.no_grad():
        assert torch.equal(fp(idx)[0], model(idx)[0])


# ---------------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kwargs, err, match", [
    (dict(bits=5), ValueError, "bits"), (dict(bits=8.0), TypeError, "bits"), (dict(bits=True), TypeError, "bits"),
    (dict(granularity="row"), ValueError, "granularity"), (dict(granularity=0), ValueError, "granularity"),
    (dict(granularity=1.5), TypeError, "granularity"), (dict(symmetric=1), TypeError, "symmetric")])
def test_quantize_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        quant.quantize(torch.ones(2, 4), **kwargs)


@pytest.mark.parametrize("w, err", [(torch.ones(4), ValueError), (torch.ones(0, 4), ValueError),
                                    (torch.ones(2, 4, dtype=torch.long), TypeError), ([[1.0]], TypeError),
                                    (torch.tensor([[1.0, float("nan")]]), ValueError)])
def test_quantize_bad_weights(w, err):
    with pytest.raises(err, match="w must"):
        quant.quantize(w, 8)


def test_gguf_bad_arguments():
    with pytest.raises(ValueError, match="divisible by 32"):
        quant.gguf_quantize(torch.ones(2, 40), "Q8_0")
    with pytest.raises(ValueError, match="qtype"):
        quant.gguf_quantize(torch.ones(2, 32), "Q4_K")
    with pytest.raises(ValueError, match="bytes"):
        quant.gguf_dequantize(torch.zeros(10, dtype=torch.uint8), "Q8_0", (1, 32))
    with pytest.raises(ValueError, match="codes must lie"):
        quant.pack_bits(torch.tensor([16]), 4)
    with pytest.raises(TypeError, match="qweight"):
        quant.QuantLinear(torch.ones(2, 2))
    with pytest.raises(TypeError, match="quantizer"):
        quant.quantize_model(torch.nn.Linear(2, 2), "int4")


# ---------------------------------------------------------------------------------------------- .gguf files
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_write_gguf_loads_in_transformers(tmp_path, qtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, d_model=64)
    model = GPT(cfg).eval()
    n_bytes = quant.write_gguf(model, tmp_path / "m.gguf", qtype)
    ours, counted = quant.quantize_model(model, lambda w: quant.GGUFTensor.from_float(w, qtype))
    assert n_bytes == counted                                              # the file holds exactly the counted bytes
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    idx = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():                                                  # same weights, HF's kernels: float noise
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], atol=1e-5, rtol=0)


def test_write_gguf_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="GPT"):
        quant.write_gguf(torch.nn.Linear(2, 2), tmp_path / "x.gguf", "Q8_0")
    cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_kv_head=1, d_model=32)
    with pytest.raises(ValueError, match="qtype"):
        quant.write_gguf(GPT(cfg), tmp_path / "x.gguf", "F16")


# ---- codebook (NF4 / FP4) reference, runtime adapters ----

@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(64, 64), (128, 64), (160, 448)])
def test_codebook_matches_bitsandbytes_where_rows_are_whole_blocks(qtype, shape):
    """Our definition equals bitsandbytes's CPU quantiser exactly (atol 1e-6) when the row length is a multiple of
    the block size (64); the notebook shows it does not for rows of 160 (bitsandbytes 0.50.2)."""
    bF = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    w = torch.randn(shape)
    q, state = bF.quantize_4bit(w, blocksize=64, quant_type=qtype)
    ours = quant.codebook_quantize(w, bF.get_4bit_type(qtype, device="cpu"))
    torch.testing.assert_close(bF.dequantize_4bit(q, state).float(), ours, atol=1e-6, rtol=0)


def test_codebook_hand_example_and_zero_block():
    code = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    w = torch.tensor([[2.0, 0.9, -2.0, 0.2], [0.0, 0.0, 0.0, 0.0]])
    # block 0: absmax 2 -> scaled (1, .45, -1, .1) -> levels (1, .5, -1, 0) -> (2, 1, -2, 0); block 1 stays 0
    out = quant.codebook_quantize(w, code, blocksize=4)
    torch.testing.assert_close(out, torch.tensor([[2.0, 1.0, -2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]), atol=0, rtol=0)


@pytest.mark.parametrize("kwargs, err", [(dict(blocksize=3), ValueError), (dict(blocksize=0), ValueError),
                                          (dict(code=torch.tensor([1.0])), ValueError)])
def test_codebook_bad_arguments(kwargs, err):
    args = dict(w=torch.randn(4, 8), code=torch.tensor([-1.0, 0.0, 1.0]), blocksize=4) | kwargs
    with pytest.raises(err):
        quant.codebook_quantize(**args)
    with pytest.raises(TypeError):
        quant.codebook_quantize(torch.ones(4, 8, dtype=torch.long), torch.tensor([-1.0, 1.0]), 4)


def test_logits_module_and_stored_bytes():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_kv_head=1, d_model=16))
    wrapped = quant.LogitsModule(lambda idx: model(idx)[0].detach().numpy())     # numpy out, like ONNX Runtime
    tokens = torch.randint(0, 32, (40,))
    torch.testing.assert_close(quant.token_nlls(wrapped, tokens, 8), quant.token_nlls(model, tokens, 8))
    sd = model.state_dict()
    all_bytes = sum(t.numel() * t.element_size() for t in sd.values())
    tied = [k for k, t in sd.items() if t.data_ptr() == model.tok_emb.weight.data_ptr()]
    assert len(tied) == 2                                                         # embedding and output head share
    assert quant.stored_bytes(model) == all_bytes - model.tok_emb.weight.numel() * 4
    with pytest.raises(TypeError):
        quant.LogitsModule(3)
    with pytest.raises(TypeError):
        quant.stored_bytes(torch.ones(3))


def test_ort_logits_on_a_tiny_onnx_graph(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4).eval()
    path = str(tmp_path / "emb.onnx")
    torch.onnx.export(emb, (torch.zeros(1, 3, dtype=torch.long),), path, dynamo=True, input_names=["input_ids"],
                      dynamic_shapes={"input": {0: torch.export.Dim("b"), 1: torch.export.Dim("t")}}, verbose=False)
    fn = quant.ort_logits(ort.InferenceSession(path, providers=["CPUExecutionProvider"]))
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    torch.testing.assert_close(fn(idx), emb(idx).detach(), atol=1e-6, rtol=0)


def test_input_channel_absmax_sees_every_linear_input():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(10, 6), torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    idx = torch.randint(0, 10, (2, 5))
    stats = quant.input_channel_absmax(net, idx)
    assert sorted(stats) == ["1", "3"]
    with torch.no_grad():
        e = net[0](idx)
        h = net[2](net[1](e))
    torch.testing.assert_close(stats["1"], e.abs().amax(dim=(0, 1)))
    torch.testing.assert_close(stats["3"], h.abs().amax(dim=(0, 1)))
    assert not net[1]._forward_hooks                                   # hooks removed
    with pytest.raises(TypeError, match="token ids"):
        quant.input_channel_absmax(net, idx.float())
    with pytest.raises(ValueError, match="no nn.Linear"):
        quant.input_channel_absmax(torch.nn.Embedding(10, 6), idx)


# ---------------------------------------------------------------------------------------------- QAT: fake quant + STE
@pytest.mark.parametrize("granularity", ["tensor", "channel", 32, 24])
def test_fake_quant_value_equals_quantize_and_ste_is_identity(granularity):
    w = rand(6, 40, seed=3).requires_grad_()
    out = quant.fake_quant(w, 4, granularity)
    torch.testing.assert_close(out.detach(), quant.quantize(w.detach(), 4, granularity).dequantize(), atol=0, rtol=0)
    out.backward(torch.arange(240.).view(6, 40))
    torch.testing.assert_close(w.grad, torch.arange(240.).view(6, 40))          # clip = 1: nothing clipped


def test_fake_quant_clipped_range_by_hand():
    w = torch.tensor([[1.0, -0.2, 0.45, -0.8]], requires_grad=True)
    out = quant.fake_quant(w, 4, "tensor", clip=0.5)                            # s = fp16(0.5 / 7), range +-7 s
    s = float(torch.tensor(0.5 / 7).half())
    torch.testing.assert_close(out.detach(), torch.tensor([[7 * s, -3 * s, 6 * s, -7 * s]]), atol=0, rtol=0)
    out.sum().backward()
    assert w.grad.tolist() == [[0.0, 1.0, 1.0, 0.0]]                            # zero gradient where clipped
    with pytest.raises(ValueError, match="clip"):
        quant.fake_quant(w, 4, "tensor", clip=0)
    with pytest.raises(ValueError, match="bits"):
        quant.fake_quant(w, 5, "tensor")


def test_fake_quant_model_keep_leaves_named_weights_float():
    net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 3))
    x = rand(2, 6, seed=7)
    kept = quant.FakeQuantModel(net, 2, "tensor", keep=("1.weight",))
    want = F.linear(F.linear(x, quant.quantize(net[0].weight.detach(), 2, "tensor").dequantize(), net[0].bias),
                    net[1].weight, net[1].bias)
    torch.testing.assert_close(kept(x), want)
    with pytest.raises(ValueError, match="keep"):
        quant.FakeQuantModel(net, 2, "tensor", keep=("nope",))


def test_fake_quant_model_forward_and_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_kv_head=1, d_model=16))
    idx = torch.randint(0, 32, (2, 8))
    qat = quant.FakeQuantModel(model, 4, "tensor")
    fake, _ = quant.quantize_model(model, lambda w: quant.quantize(w, 4, "tensor"))
    logits, loss = qat(idx, idx)
    torch.testing.assert_close(logits, fake(idx)[0], atol=1e-6, rtol=0)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert model.tok_emb.weight is model.lm_head.weight                         # the tie survives
    assert sum(1 for _ in qat.parameters()) == sum(1 for _ in model.parameters())
    with pytest.raises(TypeError):
        quant.FakeQuantModel(3)


# ---------------------------------------------------------------------------------------------- AWQ / GPTQ
def test_linear_inputs_are_the_inputs():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(10, 6), torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    idx = torch.randint(0, 10, (2, 5))
    xs = quant.linear_inputs(net, idx)
    with torch.no_grad():
        torch.testing.assert_close(xs["1"], net[0](idx).flatten(0, 1))
    assert xs["3"].shape == (10, 4) and list(quant.linear_inputs(net, idx, names=["3"])) == ["3"]
    with pytest.raises(ValueError, match="no nn.Linear"):
        quant.linear_inputs(net, idx, names=["x"])


def test_awq_alpha_zero_is_rtn_and_search_protects_a_salient_channel():
    w = rand(16, 64, seed=1)
    x = rand(256, 64, seed=2)
    x[:, 5] *= 30.0                                                             # one salient input channel
    rtn = lambda m: quant.quantize(m, 4, 64)
    torch.testing.assert_close(quant.awq_quantize(w, torch.ones(64), rtn), rtn(w).dequantize(), atol=0, rtol=0)
    r = quant.awq_search(w, x, rtn)
    assert len(r.errors) == len(r.alphas) == 11 and r.alpha > 0 and min(r.errors) < 0.8 * r.errors[0]
    assert r.scale.shape == (64,) and int(r.scale.argmax()) == 5
    with pytest.raises(ValueError, match="calibration"):
        quant.awq_search(w, x[:, :10], rtn)
    with pytest.raises(ValueError, match="s must be"):
        quant.awq_quantize(w, -torch.ones(64), rtn)


def _gptq_by_least_squares(w, x, bits, group):
    """GPTQ's definition: quantise column i, then refit the columns not yet quantised by least squares so that
    x W'^T matches x W^T given the fixed ones (what GPTQ's inverse-Hessian update computes in closed form)."""
    w, x = w.double(), x.double()
    qmax, (R, C) = 2 ** (bits - 1) - 1, w.shape
    target, out, cur = x @ w.T, torch.zeros_like(w), w.clone()
    for i in range(C):
        resid = target - x[:, :i] @ out[:, :i].T
        cur[:, i:] = torch.linalg.lstsq(x[:, i:], resid).solution.T
        if i % group == 0:
            scale = (cur[:, i:i + group].abs().amax(dim=1).float() / qmax).half().double()
        out[:, i] = torch.round(cur[:, i] / scale).clamp(-qmax, qmax) * scale
    return out.float()


def test_gptq_equals_sequential_least_squares_and_identity_hessian_is_rtn():
    w = rand(5, 12, seed=4)
    x = rand(200, 12, seed=5) @ (torch.eye(12) + 0.5 * rand(12, 12, seed=6))    # correlated inputs
    torch.testing.assert_close(quant.gptq_quantize(w, x, 4, 4, damp=0.0), _gptq_by_least_squares(w, x, 4, 4),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(quant.gptq_quantize(w, torch.eye(12), 4, 4), quant.quantize(w, 4, 4).dequantize(),
                               atol=0, rtol=0)
    err = lambda wq: float(((x @ (wq - w).T) ** 2).sum())
    assert err(quant.gptq_quantize(w, x, 4, 4)) < err(quant.quantize(w, 4, 4).dequantize())
    with pytest.raises(ValueError, match="damp"):
        quant.gptq_quantize(w, x, 4, 4, damp=-1)
    with pytest.raises(ValueError, match="group"):
        quant.gptq_quantize(w, x, 4, "channel")


def test_stored_bytes_counts_torchao_subclass_parts():
    pytest.importorskip("torchao")
    import contextlib
    import io
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False))
    quantize_(net, Int8WeightOnlyConfig())
    w = net[0].weight
    parts = [getattr(w, n) for n in w.__tensor_flatten__()[0]]
    assert any(p.dtype == torch.int8 and p.shape == (32, 64) for p in parts)
    assert quant.stored_bytes(net) == sum(p.numel() * p.element_size() for p in parts) < 32 * 64 * 4


# ---------------------------------------------------------------------------------------------- int3, metrics, W8A8
def test_int3_packing_by_hand():
    # codes 5, 2, 7 (0b101, 0b010, 0b111) -> stream 101 010 111 (LSB first) -> bytes 0b11010101, 0b00000001
    assert quant.pack_bits(torch.tensor([5, 2, 7]), 3).tolist() == [0b11010101, 0b1]
    q = quant.quantize(torch.tensor([[0.3, -0.1, 0.2, 0.0]]), 3, "channel")
    assert q.codes().tolist() == [[3, -1, 2, 0]] and q.nbytes == 2 + 2


def _tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, d_model=16)).eval()


def test_window_metrics_against_a_direct_computation():
    model, other = _tiny_gpt(0), _tiny_gpt(1)
    tokens = torch.randint(0, 64, (50,), generator=torch.Generator().manual_seed(2))
    ref = quant.window_metrics(model, tokens, 16, keep_logp=True)
    self_cmp = quant.window_metrics(model, ref_logp=ref["logp"], tokens=tokens, seq_len=16)
    assert torch.allclose(self_cmp["kl"], torch.zeros(3), atol=1e-6) and torch.equal(self_cmp["top1"], torch.ones(3))
    torch.testing.assert_close(ref["nll"], quant.token_nlls(model, tokens, 16).mean(dim=1), rtol=1e-5, atol=1e-6)
    m = quant.window_metrics(other, tokens, 16, ref_logp=ref["logp"])
    x = tokens[:48].view(3, 16)
    with torch.no_grad():
        p, q = F.softmax(model(x)[0], -1), F.softmax(other(x)[0], -1)
    torch.testing.assert_close(m["kl"], (p * (p / q).log()).sum(-1).mean(1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m["top1"], (p.argmax(-1) == q.argmax(-1)).float().mean(1))
    with pytest.raises(ValueError, match="ref_logp"):
        quant.window_metrics(other, tokens, 16, ref_logp=ref["logp"][:2])


def test_paired_mean_and_standard_error():
    a, b = torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([0.0, 1.0, 1.0, 2.0])
    d = torch.tensor([1.0, 1.0, 2.0, 4.0])
    m, se = quant.paired(a, b, scale=2.0)
    assert m == pytest.approx(2 * 2.0) and se == pytest.approx(2 * float(d.std()) / 2)
    with pytest.raises(ValueError, match="b must"):
        quant.paired(a, b[:3])
    with pytest.raises(ValueError, match="a must"):
        quant.paired(torch.tensor([1.0]))


def test_quantize_activations_by_hand():
    x = torch.tensor([[1.0, -0.5, 0.2], [100.0, 0.4, -0.3]])
    per_token = quant.quantize_activations(x, 8, "token")
    torch.testing.assert_close(per_token[0], torch.round(x[0] * 127) / 127)
    per_tensor = quant.quantize_activations(x, 8, "tensor")                 # one scale 100/127: row 0 coarse
    torch.testing.assert_close(per_tensor, torch.round(x * 1.27) / 1.27)
    assert (per_tensor[0] - x[0]).abs().max() > 10 * (per_token[0] - x[0]).abs().max()
    for kwargs, err in ((dict(granularity="channel"), ValueError), (dict(bits=5), ValueError)):
        with pytest.raises(err):
            quant.quantize_activations(x, **kwargs)
    with pytest.raises(TypeError):
        quant.quantize_activations(torch.ones(2, 2, dtype=torch.long))


def test_smoothquant_scales_and_w8a8_model():
    w = rand(6, 4, seed=3)
    a = torch.tensor([1.0, 4.0, 0.25, 9.0])
    s = quant.smoothquant_scales(a, w, alpha=0.5)
    torch.testing.assert_close(s, a.sqrt() / w.abs().amax(0).sqrt())
    assert torch.equal(quant.smoothquant_scales(a, w, alpha=1.0), a)
    with pytest.raises(ValueError, match="alpha"):
        quant.smoothquant_scales(a, w, alpha=2)
    with pytest.raises(ValueError, match="act_absmax"):
        quant.smoothquant_scales(a[:3], w)
    model = _tiny_gpt(0)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    ident = lambda w: quant.FloatTensor.from_float(w)
    # 16-bit-free check: with float weights and smoothing, only the activation rounding remains
    m8 = quant.w8a8_model(model, ident, "token")
    with torch.no_grad():
        ref, got = model(idx)[0], m8(idx)[0]
    assert 0 < (ref - got).abs().max() < 0.05
    assert m8.lm_head.weight is m8.tok_emb.weight                            # tie kept without smoothing
    lin = "blocks.0.mlp.down_proj"
    sm = {lin: torch.rand(model.get_submodule(lin).in_features, generator=torch.Generator().manual_seed(5)) + 0.5}
    smoothed = quant.w8a8_model(model, ident, "token", act_bits=8, smooth=sm)
    with torch.no_grad():
        torch.testing.assert_close(smoothed(idx)[0], ref, atol=0.05, rtol=0)  # x/s times W diag(s): same layer
    with pytest.raises(ValueError, match="smooth"):
        quant.w8a8_model(model, ident, smooth={"nope": torch.ones(3)})
    with pytest.raises(TypeError):
        quant.w8a8_model(model, "int8")


def test_stored_state_adds_up_to_the_counted_bytes_and_writes_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_kv_head=1, d_model=32)).eval()
    for quantizer in (quant.FloatTensor.from_float, lambda w: quant.quantize(w, 4, 32),
                      lambda w: quant.quantize(w, 2, 32, symmetric=False), lambda w: quant.GGUFTensor.from_float(w, "Q4_0")):
        state = quant.stored_state(model, quantizer)
        counted = quant.quantize_model(model, quantizer)[1]
        assert sum(t.numel() * t.element_size() for t in state.values()) == counted
        path = tmp_path / "m.safetensors"
        save_file(state, str(path))
        size, header = path.stat().st_size, int.from_bytes(path.read_bytes()[:8], "little")
        assert size == 8 + header + counted                                   # the file: header + these bytes
        back = load_file(str(path))
        assert all(torch.equal(back[k], v) for k, v in state.items())
    state = quant.stored_state(model, lambda w: quant.quantize(w, 4, 32))
    assert "tok_emb.weight.codes" in state and not any(k.startswith("lm_head") for k in state)   # tied: once
    q = quant.quantize(model.tok_emb.weight.detach(), 4, 32)
    assert torch.equal(state["tok_emb.weight.codes"], q.packed) and state["tok_emb.weight.scale"].dtype == torch.float16
    with pytest.raises(TypeError, match="quantizer returned"):
        quant.stored_state(model, lambda w: w)
    with pytest.raises(TypeError, match="model"):
        quant.stored_state("model", quant.FloatTensor.from_float)


def test_model_facing_helpers_move_their_inputs_to_the_models_device():
    # The model on `meta` (no GPU needed): every helper that feeds it must move its CPU tokens there first;
    # device_guard raises a ValueError on an input left on the CPU. A helper may stop at its first read of a
    # value (meta tensors have none): that NotImplementedError/RuntimeError means the plumbing held so far.
    from shared.validate import device_guard

    model = _tiny_gpt(0).to("meta")
    tokens = torch.randint(0, 64, (50,), generator=torch.Generator().manual_seed(2))
    idx = tokens[:32].view(2, 16)
    calls = [lambda: quant.window_metrics(model, tokens, 16, keep_logp=True),
             lambda: quant.window_metrics(model, tokens, 16, ref_logp=torch.zeros(3, 16, 64)),
             lambda: quant.token_nlls(model, tokens, 16),
             lambda: quant.linear_inputs(model, idx),
             lambda: quant.input_channel_absmax(model, idx),
             lambda: quant.w8a8_model(model, quant.FloatTensor.from_float, "token")(idx.to("meta")),
             lambda: quant.FakeQuantModel(model, 4, 32)(idx.to("meta"))]
    with device_guard(model):
        for call in calls:
            try:
                call()
            except (NotImplementedError, RuntimeError) as e:          # a value read on meta, not a device mismatch
                assert "device" not in str(e).lower() or "meta" in str(e).lower()
