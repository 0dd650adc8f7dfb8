"""Tests for sampling.py: equality with transformers' logits processors (ties included), frequency tests
with sigma bounds, exact reductions, metrics on hand-made sequences, and bad arguments."""
import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
    TopKLogitsWarper, TopPLogitsWarper)

import sampling as S
from shared.model import decode

torch.set_num_threads(1)   # tiny tensors: one thread is as fast, and immune to OpenMP stalls on a busy 2-core box


def random_logits(seed, B=64, V=50, ties=False):
    """(B, V) logits; with ties=True they are rounded to 0.5 so many logits are exactly equal."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * 3
    return torch.round(x * 2) / 2 if ties else x


def dummy_ids(B, L=5, V=50, seed=0):
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


# --- equality with transformers ---------------------------------------------------------------------------

@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("t", [0.1, 0.7, 1.0, 2.5])
def test_temperature_matches_hf(t, ties):
    x = random_logits(0, ties=ties)
    torch.testing.assert_close(S.apply_temperature(x, t), TemperatureLogitsWarper(t)(dummy_ids(64), x),
                               rtol=0, atol=0)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 2, 5, 49, 50, 80])
def test_top_k_matches_hf(k, ties):
    x = random_logits(1, ties=ties)
    assert torch.equal(S.top_k_filter(x, k), TopKLogitsWarper(k)(dummy_ids(64), x))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.99, 1.0])
def test_top_p_matches_hf(p, ties):
    x = random_logits(2, ties=ties)
    assert torch.equal(S.top_p_filter(x, p), TopPLogitsWarper(p)(dummy_ids(64), x))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("m", [0.0, 0.05, 0.2, 0.5, 1.0])
def test_min_p_matches_hf(m, ties):
    x = random_logits(3, ties=ties)
    assert torch.equal(S.min_p_filter(x, m), MinPLogitsWarper(m)(dummy_ids(64), x))


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.3, 3.0])
def test_repetition_penalty_matches_hf(penalty):
    x = random_logits(4)
    prev = dummy_ids(64, L=12, seed=4)                                   # contains repeats within rows
    torch.testing.assert_close(S.apply_repetition_penalty(x, prev, penalty),
                               RepetitionPenaltyLogitsProcessor(penalty)(prev, x.clone()), rtol=0, atol=0)


@pytest.mark.parametrize("ties", [False, True])
def test_composed_pipeline_matches_hf_list(ties):
    x = random_logits(5, ties=ties)
    prev = dummy_ids(64, L=8, seed=5)
    hf = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.8),
                              TopKLogitsWarper(20), TopPLogitsWarper(0.9), MinPLogitsWarper(0.05)])
    mine = S.filter_logits(x, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05,
                           repetition_penalty=1.2, prev_ids=prev)
    assert torch.equal(mine, hf(prev, x.clone()))


def test_one_dimensional_logits_work_like_a_row():
    x = random_logits(6, B=1)
    assert torch.equal(S.top_p_filter(x[0], 0.7), S.top_p_filter(x, 0.7)[0])
    assert torch.equal(S.top_k_filter(x[0], 3), S.top_k_filter(x, 3)[0])
    assert S.sample(x[0], generator=torch.Generator().manual_seed(0)).shape == ()


# --- the worked example, by hand --------------------------------------------------------------------------

def test_hand_example():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert torch.isfinite(S.top_k_filter(logits, 2)).tolist() == [True, True, False, False]
    # top-p 0.8: 0.5 + 0.3 = 0.8 >= 0.8 -> two tokens; 0.81 needs the third
    assert torch.isfinite(S.top_p_filter(logits, 0.79)).tolist() == [True, True, False, False]
    assert torch.isfinite(S.top_p_filter(logits, 0.81)).tolist() == [True, True, True, False]
    # min-p 0.2: threshold 0.2 * 0.5 = 0.1 -> drops only 0.05
    assert torch.isfinite(S.min_p_filter(logits, 0.2)).tolist() == [True, True, True, False]
    kept = S.top_k_filter(logits, 2).softmax(-1)
    torch.testing.assert_close(kept, torch.tensor([0.625, 0.375, 0, 0]), rtol=1e-6, atol=1e-7)
    # entropy of a fair coin, of a uniform over 4 and of a one-hot
    torch.testing.assert_close(S.entropy(kept.new_tensor([0.0, 0.0, -math.inf])), torch.tensor(math.log(2)))
    torch.testing.assert_close(S.entropy(torch.zeros(4)), torch.tensor(math.log(4)))
    assert S.entropy(torch.tensor([0.0, -math.inf])).item() == 0.0


# --- frequency tests: 100k draws, within 5 standard errors ------------------------------------------------

@pytest.mark.parametrize("knobs", [dict(), dict(temperature=0.5), dict(temperature=2.0), dict(top_k=3),
                                   dict(top_p=0.8), dict(min_p=0.2), dict(temperature=1.5, top_k=5, top_p=0.9)])
def test_frequencies_match_filtered_distribution(knobs):
    n = 100_000
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    p = S.filter_logits(logits, **knobs).softmax(-1)
    draws = S.sample(logits.expand(n, -1), generator=torch.Generator().manual_seed(0), **knobs)
    freq = torch.bincount(draws, minlength=8).double() / n
    se = torch.sqrt(p.double() * (1 - p.double()) / n)
    assert torch.all((freq - p).abs() <= 5 * se + 1e-12), (freq, p)
    assert torch.all(freq[p == 0] == 0)                                  # filtered tokens are never drawn


# --- exact reductions and limits --------------------------------------------------------------------------

def test_top_p_one_and_top_k_vocab_are_plain_sampling():
    x = random_logits(7, B=256, V=40, ties=True)
    plain = S.sample(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(plain, S.sample(x, top_p=1.0, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(plain, S.sample(x, top_k=40, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(plain, S.sample(x, min_p=0.0, generator=torch.Generator().manual_seed(1)))


def test_top_k_one_and_tiny_temperature_are_greedy():
    x = random_logits(8)
    greedy = S.sample(x, greedy=True)
    assert torch.equal(greedy, x.argmax(-1))
    assert torch.equal(S.sample(x, top_k=1, generator=torch.Generator().manual_seed(0)), greedy)
    assert torch.equal(S.sample(x, temperature=1e-3, generator=torch.Generator().manual_seed(0)), greedy)
    assert torch.equal(S.sample(x, temperature=0, greedy=True), greedy)


def test_entropy_rises_with_temperature():
    x = random_logits(9)
    h = torch.stack([S.entropy(S.apply_temperature(x, t)) for t in (0.25, 0.5, 1.0, 2.0, 4.0)])
    assert torch.all(h[1:] > h[:-1])
    assert torch.all(h[-1] <= math.log(50) + 1e-5)


def test_repetition_penalty_lowers_seen_tokens_only():
    x = random_logits(10, B=2, V=6)
    prev = torch.tensor([[0, 0, 3], [5, 1, 1]])
    out = S.apply_repetition_penalty(x, prev, 2.0)
    seen = torch.zeros(2, 6, dtype=torch.bool).scatter(1, prev, True)
    assert torch.all(out[seen] < x[seen]) and torch.equal(out[~seen], x[~seen])


# --- metrics ----------------------------------------------------------------------------------------------

def test_distinct_and_repetition_by_hand():
    seq = [1, 2, 3, 1, 2, 3, 1, 2]
    assert S.distinct_n(seq, 1) == 3 / 8
    assert S.distinct_n(seq, 2) == 3 / 7                                 # (1,2) (2,3) (3,1)
    assert S.repetition_rate(seq, 2) == 4 / 7
    assert S.distinct_n([[1, 2], [1, 2]], 2) == 0.5                      # pooled over sequences
    assert S.repetition_rate([[1, 2], [1, 2]], 2) == 0.0                 # but repeats count per sequence
    assert S.distinct_n(torch.arange(10), 4) == 1.0 and S.repetition_rate(torch.arange(10), 4) == 0.0
    assert math.isnan(S.distinct_n([1, 2], 3))


def test_longest_copy_by_hand():
    assert S.longest_copy([9, 1, 2, 3, 1, 2, 3, 1, 2, 8]) == (5, 3)      # "1 2 3 1 2" copies 3 back
    assert S.longest_copy([5, 5, 5, 5]) == (3, 1)
    assert S.longest_copy([1, 2, 3, 4]) == (0, 0)
    assert S.longest_copy([1, 2, 1, 3]) == (1, 2)
    assert S.longest_copy([7, 1, 2, 3, 8, 1, 2, 3, 9]) == (3, 4)         # a phrase said twice
    with pytest.raises(ValueError, match="one sequence"):
        S.longest_copy([[1, 2], [3, 4]])


class Bigram(torch.nn.Module):
    """A fixed bigram 'model': logits of the next token depend on the current one only."""

    def __init__(self, V=7, seed=0):
        super().__init__()
        self.table = torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * 2

    def forward(self, idx):
        return self.table[idx], None                                     # (B, T, V)


def test_generate_and_perplexity_on_a_bigram():
    m = Bigram()
    prompt = torch.zeros(3, 1, dtype=torch.long)
    ids, ent = S.generate(m, prompt, 20, generator=torch.Generator().manual_seed(0), temperature=1.0)
    assert ids.shape == (3, 21) and ent.shape == (3, 20)
    torch.testing.assert_close(ent, S.entropy(m.table[ids[:, :-1]].reshape(-1, 7)).reshape(3, 20))
    # perplexity by hand: exp(mean NLL) under the bigram table
    logp = torch.log_softmax(m.table, -1)[ids[:, :-1], ids[:, 1:]]
    torch.testing.assert_close(S.perplexity(m, ids, 1), torch.exp(-logp.mean(1)), rtol=1e-5, atol=1e-6)
    g_ids, g_ent = S.generate(m, prompt, 5, greedy=True)
    assert torch.equal(g_ids[:, 1], m.table[0].argmax().expand(3)) and g_ent.abs().sum() == 0
    # same seed, same draws
    again, _ = S.generate(m, prompt, 20, generator=torch.Generator().manual_seed(0), temperature=1.0)
    assert torch.equal(ids, again)
    # the Sampler's recorded log-probs are the model's plain ones: its perplexity is S.perplexity's
    pick = S.Sampler(generator=torch.Generator().manual_seed(0), temperature=0.7, top_k=3)
    ids = decode(m, prompt, 20, pick)                                    # a Bigram is no GPT: no cache
    torch.testing.assert_close(pick.step_logprob().mean(1).neg().exp(), S.perplexity(m, ids, 1))
    assert S.generate(m, prompt, 0)[1].shape == (3, 0)


def test_perplexity_stops_at_the_first_stop_id():
    m = Bigram()
    ids = torch.tensor([[0, 1, 2, 3, 2, 4], [0, 1, 1, 1, 1, 1]])
    logp = torch.log_softmax(m.table, -1)[ids[:, :-1], ids[:, 1:]]     # (2, 5)
    cut = S.perplexity(m, ids, 1, stop_id=3)                             # row 0 counts tokens 1..3 only
    torch.testing.assert_close(cut[0], torch.exp(-logp[0, :3].mean()))
    torch.testing.assert_close(cut[1], torch.exp(-logp[1].mean()))      # no stop: the whole row
    assert S.stop_mask(ids, 2).tolist() == [[True, True, True, False, False, False], [True] * 6]


def test_describe_keeps_every_knob_that_acts():
    assert S.describe(dict(greedy=True)) == "greedy"
    assert S.describe(dict(greedy=True, repetition_penalty=1.3)) == "greedy repetition_penalty=1.3"
    assert S.describe(dict(temperature=0.7, top_p=0.9)) == "T=0.7 top_p=0.9"
    assert S.describe(dict(temperature=1.0, top_k=5, repetition_penalty=1.2)) == "T=1 top_k=5 repetition_penalty=1.2"


# --- bad arguments ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, exc, words", [
    (lambda x: S.apply_temperature(x, 0.0), ValueError, "temperature"),
    (lambda x: S.apply_temperature(x, -1), ValueError, "temperature"),
    (lambda x: S.sample(x, temperature=0), ValueError, "greedy=True"),
    (lambda x: S.apply_temperature(x, "hot"), TypeError, "temperature"),
    (lambda x: S.top_k_filter(x, 0), ValueError, "top_k"),
    (lambda x: S.top_k_filter(x, 2.5), TypeError, "top_k"),
    (lambda x: S.top_k_filter(x, True), TypeError, "top_k"),
    (lambda x: S.top_p_filter(x, 0.0), ValueError, "top_p"),
    (lambda x: S.top_p_filter(x, 1.5), ValueError, "top_p"),
    (lambda x: S.top_p_filter(x, float("nan")), ValueError, "top_p"),
    (lambda x: S.min_p_filter(x, -0.1), ValueError, "min_p"),
    (lambda x: S.apply_repetition_penalty(x, torch.tensor([[0, 99]] * 4), 1.2), ValueError, "prev_ids"),
    (lambda x: S.apply_repetition_penalty(x, torch.tensor([[0.0]] * 4), 1.2), TypeError, "prev_ids"),
    (lambda x: S.apply_repetition_penalty(x, torch.tensor([[0]] * 3), 1.2), ValueError, "prev_ids"),
    (lambda x: S.apply_repetition_penalty(x, torch.tensor([[0]] * 4), 0.0), ValueError, "penalty"),
    (lambda x: S.filter_logits(x, repetition_penalty=1.2), ValueError, "prev_ids"),
    (lambda x: S.sample(x, greedy=1), TypeError, "greedy"),
    (lambda x: S.sample(x, generator=0), TypeError, "generator"),
    (lambda x: S.sample(x[None]), ValueError, "shape"),
    (lambda x: S.sample(x.long()), TypeError, "dtype"),
    (lambda x: S.sample(x[:, :0]), ValueError, "non-empty"),
    (lambda x: S.sample(x.tolist()), TypeError, "torch.Tensor"),
    (lambda x: S.entropy(torch.tensor([0.0, float("nan")])), ValueError, "NaN"),
    (lambda x: S.distinct_n([1, 2, 3], 0), ValueError, "n must"),
    (lambda x: S.perplexity(Bigram(), torch.zeros(1, 4, dtype=torch.long), 4), ValueError, "prompt_len"),
    (lambda x: S.perplexity(Bigram(), torch.zeros(1, 4), 1), TypeError, "ids"),
    (lambda x: S.Sampler(temprature=0.5), TypeError, "unknown knob"),
    (lambda x: S.Sampler(top_p=0), ValueError, "top_p"),
    (lambda x: S.Sampler(greedy=True, top_k=2.5), TypeError, "top_k"),
    (lambda x: S.Sampler(greedy=True, temperature=-1), ValueError, "temperature"),
    (lambda x: S.repetition_rate([1, 2, 3], 1.5), TypeError, "n must"),
])
def test_bad_arguments_raise(call, exc, words):
    with pytest.raises(exc, match=words):
        call(random_logits(11, B=4, V=10))


def tiny_gpt():
    from shared.model import GPT, GPTConfig
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=24, n_layer=2, n_head=2, d_model=32, init_std=0.3)
    return GPT(cfg).eval()


def test_generate_matches_gpt_generate_and_cache_is_transparent():
    m = tiny_gpt()
    prompt = torch.randint(0, 64, (4, 5), generator=torch.Generator().manual_seed(1))
    ref = m.generate(prompt, 12, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(2))
    mine, ent = S.generate(m, prompt, 12, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(2))
    assert torch.equal(mine, ref)
    slow, ent_slow = S.generate(m, prompt, 12, temperature=0.8, top_k=10, use_cache=False,
                                generator=torch.Generator().manual_seed(2))
    assert torch.equal(mine, slow)
    torch.testing.assert_close(ent, ent_slow, rtol=1e-4, atol=1e-5)
    # past block_size (24) the loop slides its window instead of failing
    long, _ = S.generate(m, prompt, 30, greedy=True)
    assert long.shape == (4, 35)


def test_generate_bad_arguments():
    m = Bigram()
    with pytest.raises(ValueError, match="prompt_ids"):
        S.generate(m, torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="T0 = 0"):
        S.generate(m, torch.zeros(1, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        S.generate(m, torch.zeros(1, 1, dtype=torch.long), -1)
    with pytest.raises(TypeError, match="prompt_ids"):
        S.generate(m, [[0, 1]], 2)
    with pytest.raises(TypeError, match="use_cache"):                  # decode caches only a shared GPT
        S.generate(m, torch.zeros(1, 1, dtype=torch.long), 2, use_cache=True)


# --- coherence without the model ------------------------------------------------------------------------------

def test_judge_story_splits_finished_grammar_and_recall():
    from shared.data import StoryGenerator, story_logprob
    st = StoryGenerator(seed=3).sample()
    cut = st.text.index(f"{st.colour} {st.object}.") + len(f"{st.colour} {st.object}.")
    prompt, rest, plant = st.text[:cut], st.text[cut:], (st.colour, st.object)
    real = S.judge_story(prompt, rest, plant)
    assert real["finished"] and real["grammatical"] and real["valid"] and real["pair_right"]
    assert real["logprob"] == pytest.approx(st.logprob) and real["logprob"] == story_logprob(st.text)
    other = next(o for o in ("ball", "key", "map", "shoe") if o != st.object)
    wrong = S.judge_story(prompt, rest.replace(f"the {st.colour} {st.object}.", f"the {st.colour} {other}."), plant)
    assert wrong["grammatical"] and not wrong["valid"] and not wrong["object_right"]
    assert wrong["recalled"] == (st.colour, other) and wrong["logprob"] == real["logprob"]
    broken = S.judge_story(prompt, rest.replace(" felt ", " felt felt ", 1), plant)
    assert broken["finished"] and not broken["grammatical"] and broken["logprob"] == -math.inf
    unfinished = S.judge_story(prompt, None, plant)
    assert not unfinished["finished"] and not unfinished["grammatical"] and unfinished["recalled"] is None
    with pytest.raises(TypeError, match="planted"):
        S.judge_story(prompt, rest, ["red", "ball"])


def test_permutation_chance_by_hand():
    planted = [("red", "ball"), ("red", "ball"), ("blue", "key")]
    # a decoder that always says "red ball": opening 0 matches openings 1 and 2 (2/2), opening 1 likewise,
    # opening 2 none -> (1 + 1 + 0) / 3
    assert S.permutation_chance([("red", "ball")] * 3, planted) == pytest.approx(2 / 3)
    # a perfect recaller: opening 0 matched by opening 1 (1/2), 1 by 0 (1/2), 2 by nobody -> 1/3
    assert S.permutation_chance(planted, planted) == pytest.approx(1 / 3)
    assert S.permutation_chance([None, None, None], planted) == 0.0
    assert S.permutation_chance([("x", "ball"), None, None], planted, key=lambda p: p[1]) == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="same length"):
        S.permutation_chance([None], planted)


def test_generate_and_perplexity_move_cpu_batches_to_the_models_device():
    # The GPU rule without a GPU: the model on `meta`, prompts built on the CPU; inside device_guard any input that
    # reaches a layer on another device raises a ValueError. generate gets through the model's forward and stops at
    # the sampler's first read of a value (its NaN check), which a meta tensor does not have.
    from shared.model import GPT, GPTConfig
    from shared.validate import device_guard

    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, d_model=16)).to("meta")
    prompt = torch.zeros((2, 3), dtype=torch.long)
    with device_guard(model):
        with pytest.raises(RuntimeError, match="meta"):
            S.generate(model, prompt, 4, greedy=True)
        assert S.perplexity(model, torch.zeros((2, 6), dtype=torch.long), 2).shape == (2,)
