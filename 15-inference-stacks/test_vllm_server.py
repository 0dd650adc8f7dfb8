"""vLLM for real, through its OpenAI-compatible server (runs only where vLLM's own environment exists).

`stack_bench.serve_vllm` starts `vllm.entrypoints.openai.api_server` on 127.0.0.1 (a free port) in `.venv-vllm`,
waits for /health, sends 8 streamed greedy completions at once and stops the server by PID. The server needs about a
minute to become ready on 2 cores, which is why this lives in a test and not in the notebook. Reference: 🤗 `generate`
(fp32, greedy) on the same random model, here, in our environment: token ids must be equal.
"""
import pytest
import torch

import stack_bench
from test_serving import tiny_llama

pytestmark = pytest.mark.skipif(stack_bench.vllm_python() is None,
                                reason=f"no vLLM environment: {stack_bench.VLLM_ENV_REASON}")


def test_openai_server_tokens_equal_hf(tmp_path):
    model = tiny_llama(tmp_path / "hf", head_dim=40)          # 40: vLLM's CPU kernel needs the padded copy
    (tmp_path / "hf" / "tokenizer.json").write_text(_word_level_tokenizer(61))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 61, (6,), generator=g).tolist() for _ in range(8)]
    with torch.no_grad():
        ref = model.generate(torch.tensor(prompts), max_new_tokens=16, do_sample=False, pad_token_id=0)[:, 6:].tolist()
    served = stack_bench.serve_vllm(tmp_path / "hf", prompts, 16, threads=1, ready_timeout=240)
    assert served["tokens"] == ref
    assert all(0 < t <= lat for t, lat in zip(served["ttft_s"], served["latency_s"]))
    assert served["returncode"] is not None                    # stopped, not left running
    print({k: v for k, v in served.items() if k != "tokens"})


def _word_level_tokenizer(vocab_size: int) -> str:
    """A tokenizer.json vLLM can load for detokenizing: one word per id."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w1"))
    tok.pre_tokenizer = Whitespace()
    return tok.to_str()
