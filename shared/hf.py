"""Bridge between the shared GPT (Llama-shaped config) and `transformers.LlamaForCausalLM`.

Our module names mirror Llama's, so the bridge is a renaming of state-dict keys. It lets peft, trl, ONNX,
GGUF, vLLM and friends run on our own tiny models.
"""
from __future__ import annotations

from pathlib import Path

from .model import GPT, GPTConfig, Attention, MLP, RMSNorm, load_weights, model_device


def _check_llama_shaped(model: GPT) -> None:
    cfg = model.cfg
    wrong = [f"{k}={getattr(cfg, k)!r} (need {v!r})" for k, v in
             (("pos", "rope"), ("norm", "rms"), ("act", "swiglu"), ("causal", True)) if getattr(cfg, k) != v]
    if wrong:
        raise ValueError("only Llama-shaped models can be exported: " + ", ".join(wrong))
    for b in model.blocks:
        if type(b.attn) is not Attention or type(b.mlp) is not MLP or type(b.norm1) is not RMSNorm:
            raise ValueError("only models built from shared's Attention, MLP and RMSNorm can be exported")


def llama_config_kwargs(cfg: GPTConfig, tokenizer=None) -> dict:
    """The keyword arguments of a Llama-family config (LlamaConfig, MixtralConfig, ...) that a GPTConfig fixes:
    sizes, RoPE, RMSNorm eps, SwiGLU, tying, init, and the tokenizer's special ids when one is given."""
    special = {}
    if tokenizer is not None:
        special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                   "bos_token_id": tokenizer.bos_token_id}
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, hidden_act="silu",
        tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std, **special)


def llama_config(cfg: GPTConfig, tokenizer=None):
    from transformers import LlamaConfig

    return LlamaConfig(**llama_config_kwargs(cfg, tokenizer), attention_bias=False, mlp_bias=False)


def _key_map(n_layer: int) -> dict[str, str]:
    """Our state-dict key -> Llama's."""
    keys = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "lm_head.weight": "lm_head.weight"}
    for i in range(n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        keys[ours + "norm1.weight"] = theirs + "input_layernorm.weight"
        keys[ours + "norm2.weight"] = theirs + "post_attention_layernorm.weight"
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            keys[f"{ours}attn.{p}.weight"] = f"{theirs}self_attn.{p}.weight"
        for p in ("gate_proj", "up_proj", "down_proj"):
            keys[f"{ours}mlp.{p}.weight"] = f"{theirs}mlp.{p}.weight"
    return keys


def to_hf(model: GPT, tokenizer=None):
    """A `LlamaForCausalLM` (eval mode, float32) with our weights copied in, on our model's device."""
    from transformers import LlamaForCausalLM

    if not isinstance(model, GPT):
        raise TypeError(f"model must be a shared.model.GPT, got {type(model).__name__}")
    _check_llama_shaped(model)
    hf = LlamaForCausalLM(llama_config(model.cfg, tokenizer))
    ours = model.state_dict()
    theirs = {v: ours[k].detach().clone() for k, v in _key_map(model.cfg.n_layer).items()}
    load_weights(hf, theirs, tied=model.cfg.tie_embeddings)
    if model.cfg.tie_embeddings:
        hf.tie_weights()
    return hf.to(model_device(model)).eval()


def save_hf(model: GPT, tokenizer, path: str | Path) -> Path:
    """Write a folder that `LlamaForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load offline."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    to_hf(model, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _check_representable(c) -> None:
    """Refuse a Llama config the shared GPT cannot express, rather than converting it into another model."""
    rope = dict(getattr(c, "rope_parameters", None) or {})
    problems = []
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type={rope.get('rope_type')!r} (scaled RoPE; only 'default' is supported)")
    if getattr(c, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={c.hidden_act!r} (the shared SwiGLU uses silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(c, flag, False):
            problems.append(f"{flag}=True (the shared GPT's linear layers have no bias)")
    if getattr(c, "pretraining_tp", 1) not in (None, 1):
        problems.append(f"pretraining_tp={c.pretraining_tp}")
    if problems:
        raise ValueError("this Llama config cannot be represented by shared.model.GPT: " + "; ".join(problems))


def from_hf(hf_model_or_path) -> GPT:
    """A shared GPT from a `LlamaForCausalLM` (or a folder holding one)."""
    from transformers import LlamaForCausalLM

    hf = hf_model_or_path
    if isinstance(hf, (str, Path)):
        hf = LlamaForCausalLM.from_pretrained(str(hf))
    c = hf.config
    _check_representable(c)
    theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        raise ValueError("head_dim * num_attention_heads must equal hidden_size for the shared GPT")
    cfg = GPTConfig(vocab_size=c.vocab_size, block_size=c.max_position_embeddings, n_layer=c.num_hidden_layers,
                    n_head=c.num_attention_heads, n_kv_head=c.num_key_value_heads, d_model=c.hidden_size,
                    d_ff=c.intermediate_size, norm_eps=c.rms_norm_eps, rope_theta=float(theta),
                    tie_embeddings=bool(c.tie_word_embeddings))
    model = GPT(cfg)
    theirs = hf.state_dict()
    state = {k: theirs[v] for k, v in _key_map(cfg.n_layer).items() if v in theirs}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return load_weights(model, state).eval()
