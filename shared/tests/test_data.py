"""The story corpus: exact log-probabilities by replay, determinism, rejection, entropy rate; batching."""
import math

import pytest
import torch

from shared import data


def test_rescoring_from_text_matches_generation_exactly():
    stories = data.StoryGenerator(seed=11).samples(5000)
    for s in stories:
        assert data.story_logprob(s.text) == s.logprob     # same floats in the same order: exact
    assert len({s.recall_distance for s in stories}) == 8  # every distance 1..8 occurs


def test_other_recall_ranges_replay_too():
    for s in data.StoryGenerator(seed=3, min_recall=0, max_recall=2).samples(500):
        assert data.story_logprob(s.text, 0, 2) == s.logprob
        assert 0 <= s.recall_distance <= 2
    long_story = next(s for s in data.StoryGenerator(seed=4).samples(200) if s.recall_distance > 2)
    assert data.story_logprob(long_story.text, 0, 2) == float("-inf")   # too many fillers for that range


def test_impossible_texts_get_minus_infinity():
    s = data.StoryGenerator(seed=5).sample()
    broken = [s.text + " ", s.text[:-1], s.text.replace(s.colour, "plaid"), "", "hello world",
              s.text.replace("Later, " + s.name, "Later, Zorro"),
              s.text.replace(f"the {s.colour} {s.object}.", f"the {s.colour} tractor.")]
    for text in broken:
        assert data.story_logprob(text) == float("-inf")
    with pytest.raises(TypeError):
        data.story_logprob(None)


def test_probabilities_are_normalised_on_a_tiny_grammar():
    # With every story as likely as its logprob says, the empirical frequency of the most common story
    # matches exp(logprob) within 5 standard errors (a sanity check of the sampler against the scorer).
    n = 20000
    g = data.StoryGenerator(seed=9, min_recall=0, max_recall=0)
    texts = [g.sample().text for _ in range(n)]
    prefix = "Once upon a time, there was a little cat named Mia."
    hits = sum(t.startswith(prefix) for t in texts)
    # p(prefix) = product of the first choices: opener, size, animal, name (each the top-ranked option)
    p = math.exp(sum(c.logp[0] for c in (data._OPENER, data._SIZE, data._ANIMAL, data._NAME)))
    se = math.sqrt(p * (1 - p) / n)
    assert abs(hits / n - p) < 5 * se


def test_deterministic_per_seed_and_splits_differ():
    a = data.stories(n_train=50, n_val=10, n_test=10, seed=1)
    b = data.stories(n_train=50, n_val=10, n_test=10, seed=1)
    assert a["train"]["text"] == b["train"]["text"]
    assert a["train"]["text"][:10] != a["validation"]["text"]
    assert set(a["train"].column_names) >= {"text", "logprob", "n_chars", "recall_distance", "name", "object"}
    assert all(n == len(t) for n, t in zip(a["test"]["n_chars"], a["test"]["text"]))


def test_recall_sentence_repeats_the_planted_object():
    for s in data.StoryGenerator(seed=2).samples(200):
        assert f"{s.name} had a {s.colour} {s.object}." in s.text
        assert f" the {s.colour} {s.object}. " in s.text.split("Later, ")[1]


def test_entropy_rate_and_units():
    rate, se = data.entropy_rate(n=2000, seed=1)
    rate2, _ = data.entropy_rate(n=2000, seed=2)
    assert 0.1 < rate < 1.0 and 0 < se < 0.01
    assert abs(rate - rate2) < 5 * math.sqrt(2) * se
    assert data.bits_per_char(math.log(2), 10, 10) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        data.bits_per_char(1.0, 0, 10)


def test_word_categories():
    assert data.word_category("Mia") == "name" and data.word_category(" kite") == "object"
    assert data.word_category("the") is None
    words = [w for ws in data.CATEGORIES.values() for w in ws]
    assert len(words) == len(set(words)) and 150 < len(words) < 400


def test_python_docs_is_real_prose():
    ds = data.python_docs()
    assert {"train", "validation", "test"} == set(ds)
    text = " ".join(ds["train"]["text"])
    assert len(text) > 300_000 and " the " in text
    assert not set(ds["train"]["topic"]) & set(ds["validation"]["topic"])


def test_encode_corpus_and_random_windows(story_tokenizer):
    texts = ["Mia had a cat.", "Tom had a dog."]
    ids = data.encode_corpus(story_tokenizer, texts)
    assert ids.dtype == torch.long and (ids == story_tokenizer.eos_token_id).sum() == 2
    assert story_tokenizer.decode(ids) == "Mia had a cat.<|endoftext|>Tom had a dog.<|endoftext|>"
    stream = torch.arange(100)
    x, y = data.random_windows(stream, 8, 5, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 8)
    assert torch.equal(y, x + 1)
    x2, _ = data.random_windows(stream, 8, 5, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    x3, _ = data.random_windows(torch.arange(9), 8, 3)   # exactly seq_len+1 tokens: one possible window
    assert torch.equal(x3[0], torch.arange(8))
    with pytest.raises(ValueError, match="at least seq_len"):
        data.random_windows(torch.arange(8), 8, 1)
    with pytest.raises(ValueError, match="1-D"):
        data.random_windows(torch.zeros(2, 50, dtype=torch.long), 8, 1)
    with pytest.raises(TypeError):
        data.encode_corpus(story_tokenizer, "one string")


def test_bad_generator_arguments():
    with pytest.raises(ValueError, match="min_recall"):
        data.StoryGenerator(min_recall=5, max_recall=2)
    with pytest.raises(ValueError):
        data.StoryGenerator(min_recall=-1)


def test_story_streams(story_tokenizer):
    s = data.story_streams(story_tokenizer, n_train=50, n_val=20, n_test=5)
    assert s.train.dtype == torch.long and s.test is not None and len(s.texts["validation"]) == 20
    assert (s.validation == story_tokenizer.eos_token_id).sum() == 20          # one end-of-text per story
    chars = sum(s.texts["validation"]["n_chars"])
    assert s.bits_per_char(1.0) == pytest.approx((len(s.validation) - 1) / chars / math.log(2))
    assert 0.2 < s.floor_bits_per_char < 0.35 and s.floor_se > 0 and s.val_floor_bits_per_char > 0
    assert data.story_streams(story_tokenizer, n_train=5, n_val=2).test is None
    with pytest.raises(ValueError, match="split"):
        data.story_streams(story_tokenizer, n_train=5, n_val=2).bits_per_char(1.0, "test")
