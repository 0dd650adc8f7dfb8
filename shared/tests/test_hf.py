"""The HF bridge: our GPT <-> transformers.LlamaForCausalLM, equal logits both ways."""
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from shared.hf import from_hf, llama_config, save_hf, to_hf
from shared.model import GPT, GPTConfig

# Both sides run the same float32 ops in a different order: 1e-5 absolute covers that, a wrong weight does not.
TOL = dict(rtol=1e-5, atol=1e-5)


def model(tie=True, n_kv_head=2, vocab=400):
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=vocab, block_size=64, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=64,
                      tie_embeddings=tie, rope_theta=5000.0))
    for p in m.parameters():   # move off the init so norms and every matrix matter
        p.data.add_(0.05 * torch.randn_like(p))
    return m.eval()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_logits_equal_both_ways(tie, n_kv_head, tmp_path, story_tokenizer):
    ours = model(tie, n_kv_head, vocab=len(story_tokenizer))
    x = torch.randint(0, len(story_tokenizer), (2, 40))
    hf = to_hf(ours, story_tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x)[0], **TOL)
    save_hf(ours, story_tokenizer, tmp_path)
    hf2 = LlamaForCausalLM.from_pretrained(tmp_path)
    back = from_hf(tmp_path)
    assert back.cfg == ours.cfg
    with torch.no_grad():
        torch.testing.assert_close(hf2(x).logits, ours(x)[0], **TOL)
        torch.testing.assert_close(back(x)[0], ours(x)[0], **TOL)


def test_greedy_generation_equal(story_tokenizer):
    ours = model(vocab=len(story_tokenizer))
    hf = to_hf(ours)   # no tokenizer: no eos id, so HF generates the full length like ours
    x = torch.randint(2, len(story_tokenizer), (1, 6))
    a = ours.generate(x, 25, temperature=0)
    b = hf.generate(x, max_new_tokens=25, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(a, b)


def test_tokenizer_round_trip_through_autotokenizer(tmp_path, story_tokenizer):
    save_hf(model(vocab=len(story_tokenizer)), story_tokenizer, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "Mia had a red kite.<|endoftext|>Later, Mia found the red kite."
    assert tok(text)["input_ids"] == story_tokenizer(text)["input_ids"]
    assert tok.eos_token_id == story_tokenizer.eos_token_id and tok.pad_token == "<|pad|>"


def test_non_llama_shapes_are_refused():
    for kw in (dict(pos="alibi"), dict(norm="layer"), dict(act="gelu"), dict(causal=False)):
        m = GPT(GPTConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, d_model=8, **kw))
        with pytest.raises(ValueError, match="Llama-shaped"):
            to_hf(m)
    with pytest.raises(TypeError):
        to_hf(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("change, words", [
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "rope_type='linear'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(mlp_bias=True), "mlp_bias=True"),
])
def test_from_hf_refuses_what_it_cannot_represent(change, words):
    from transformers import LlamaForCausalLM

    cfg = llama_config(model().cfg)
    for key, value in change.items():
        setattr(cfg, key, value)
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        from_hf(LlamaForCausalLM(cfg))
