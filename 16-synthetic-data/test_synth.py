"""Tests for synth.py: MinHash bit for bit against datasketch, LSH banding against datasketch's index and the
S-curve, brute-force Jaccard by hand, the quality scores against the generator's truth, splits, contamination."""
import math
import random

import numpy as np
import pytest

import synth
from shared import data

REAL = list(data.stories(n_train=60, n_val=0, n_test=0, seed=5)["train"]["text"])


def test_minhash_equals_datasketch_bitwise():
    datasketch = pytest.importorskip("datasketch")
    sets = [synth.shingles(t) for t in REAL[:20]] + [{"one"}]
    ours = synth.minhash_signatures(sets, num_perm=64, seed=3)
    for s, row in zip(sets, ours):
        m = datasketch.MinHash(num_perm=64, seed=3)
        m.update_batch([x.encode() for x in s])
        np.testing.assert_array_equal(row, m.hashvalues)           # exact, tolerance 0


def test_lsh_pairs_equal_datasketch_index():
    datasketch = pytest.importorskip("datasketch")
    rng = random.Random(0)
    texts = REAL[:30] + [synth.corrupt(t, "typo", rng) for t in REAL[:10]] + REAL[:3]
    sets = [synth.shingles(t) for t in texts]
    sig = synth.minhash_signatures(sets, num_perm=128)
    ours = synth.lsh_pairs(sig, 16, 8)
    lsh = datasketch.MinHashLSH(num_perm=128, params=(16, 8))
    hashes = []
    for i, s in enumerate(sets):
        m = datasketch.MinHash(num_perm=128)
        m.update_batch([x.encode() for x in s])
        hashes.append(m)
        lsh.insert(i, m)
    theirs = {(min(i, j), max(i, j)) for i, m in enumerate(hashes) for j in lsh.query(m) if j != i}
    assert ours == theirs
    assert {(i, 40 + i) for i in range(3)} <= ours                   # exact copies always collide


def test_jaccard_by_hand_and_estimate():
    sets = [{"a", "b", "c"}, {"b", "c", "d"}, {"x"}, {"a", "b", "c"}]
    jac = synth.jaccard_matrix(sets)
    assert jac[0, 1] == pytest.approx(0.5) and jac[0, 2] == 0 and jac[0, 3] == 1
    assert synth.jaccard_pairs(jac, 0.5) == {(0, 1), (0, 3), (1, 3)}
    # the MinHash estimate of J is unbiased with standard error sqrt(J(1-J)/P): 5 sigma
    a, b = set(range(300)), set(range(100, 400))                     # J = 200/400 = 0.5
    sig = synth.minhash_signatures([{str(x) for x in a}, {str(x) for x in b}], num_perm=1024)
    est = (sig[0] == sig[1]).mean()
    assert abs(est - 0.5) < 5 * math.sqrt(0.25 / 1024)


def test_s_curve_closed_form():
    assert synth.s_curve(1.0, 20, 5) == 1.0 and synth.s_curve(0.0, 20, 5) == 0.0
    assert synth.s_curve(0.5, 1, 1) == pytest.approx(0.5)
    assert synth.s_curve(0.5, 2, 2) == pytest.approx(1 - 0.75 ** 2)


def test_exact_duplicates_normalise():
    texts = ["Mia had a kite.", "mia  had a KITE", "Tom had a kite."]
    assert synth.exact_duplicates(texts) == [0, 0, 2]
    assert synth.normalise("  A,b.  C ") == "a b c"


def test_quality_on_real_and_corrupted():
    floor = data.entropy_rate(n=500)[0]
    q = synth.quality(REAL, floor)
    assert q["valid"] == q["valid_but_recall"] == len(REAL)
    assert abs(q["gap"]) < 0.05                                       # real stories sit at the entropy rate
    rng = random.Random(1)
    typo = [synth.corrupt(t, "typo", rng, rate=0.2) for t in REAL]
    assert synth.quality(typo)["valid"] == 0
    reworded = [synth.augment(t, "reword", rng) for t in REAL]
    assert synth.quality(reworded)["valid"] == 0
    swapped = [synth.augment(t, "swap_name", rng) for t in REAL]
    assert synth.quality(swapped)["valid"] == len(REAL)                # an entity swap stays in distribution


def test_repair_recall_fixes_only_the_recall():
    t = REAL[0]
    f = synth.story_fields(t)
    wrong = "blue" if f["colour"] != "blue" else "red"
    broken = t.replace(f"the {f['colour']} {f['object']}. ", f"the {wrong} {f['object']}. ")
    assert math.isinf(data.story_logprob(broken))
    assert synth.repair_recall(broken) == t


def test_corrupt_and_augment_kinds():
    rng = random.Random(0)
    t = REAL[1]
    assert len(synth.sentences(synth.corrupt(t, "drop", rng))) == len(synth.sentences(t)) - 1
    assert len(synth.sentences(synth.corrupt(t, "duplicate", rng))) == len(synth.sentences(t)) + 1
    with pytest.raises(ValueError, match="kind"):
        synth.corrupt(t, "shuffle", rng)
    with pytest.raises(ValueError, match="kind"):
        synth.augment(t, "translate", rng)


def test_components_and_group_split():
    groups = synth.components(6, [(0, 1), (1, 2), (4, 5)])
    assert groups[0] == groups[1] == groups[2] and groups[4] == groups[5] and len(set(groups)) == 3
    train, val = synth.group_split(groups, 0.5, seed=0)
    assert sorted(train + val) == list(range(6))
    assert not {groups[i] for i in train} & {groups[i] for i in val}
    with pytest.raises(ValueError, match="val_fraction"):
        synth.group_split(groups, 1.0)


def test_ngram_contamination():
    a = "one two three four five six"
    assert synth.ngram_contamination([a], ["zero two three four five nine", "six five four"], n=4) == [True, False]
    assert synth.ngram_contamination([], [a], n=2) == [False]
    with pytest.raises(ValueError, match="n must"):
        synth.ngram_contamination([a], [a], n=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="k must"):
        synth.shingles("a b", k=0)
    with pytest.raises(ValueError, match="num_perm"):
        synth.minhash_signatures([{"a"}], num_perm=0)
    with pytest.raises(ValueError, match="non-empty"):
        synth.minhash_signatures([set()])
    with pytest.raises(ValueError, match="exceeds num_perm"):
        synth.lsh_pairs(np.zeros((2, 8), dtype=np.uint32), 3, 3)
    with pytest.raises(ValueError, match="texts"):
        synth.quality([])


def test_opening_and_text_batches():
    from shared import zoo  # noqa: F401  (tokenizer only: a tiny BPE trained here)
    from shared.tokenizer import train_tokenizer
    assert synth.opening(REAL[0]) == " ".join(synth.sentences(REAL[0])[:3])
    assert synth.opening("One. Two.", 1) == "One."
    tok = train_tokenizer(REAL, vocab_size=300)
    texts = [synth.opening(t) for t in REAL[:5]]
    fn = synth.text_batches(tok, texts, 5)
    import torch
    x, y = fn(torch.Generator().manual_seed(0))
    lens = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert x.shape == y.shape == (5, max(lens))
    assert sorted((y != -100).sum(1).tolist()) == sorted(lens)          # every token of every text is a target
    assert (x[:, 0] == tok.eos_token_id).all()                            # read after end-of-text
    for xi, yi in zip(x, y):                                              # y is x shifted by one
        n = int((yi != -100).sum())
        assert torch.equal(xi[1:n], yi[:n - 1]) and (yi[n:] == -100).all()
    epoch = synth.text_batches(tok, texts, 2, epochs=True)              # epochs: each text once per pass
    g = torch.Generator().manual_seed(1)
    seen = [tuple(row.tolist()) for _ in range(5) for row in epoch(g)[0]]   # 10 rows = 2 passes over 5 texts
    rows = sorted(tuple(r.tolist()) for r in x)
    assert sorted(seen) == sorted(rows * 2)
    with pytest.raises(ValueError):
        synth.text_batches(tok, texts, 6)
    with pytest.raises(ValueError):
        synth.text_batches(tok, [], 1)
    with pytest.raises(ValueError):
        synth.opening(REAL[0], 0)
    with pytest.raises(TypeError):
        synth.opening(None)


def test_diversity_by_hand():
    d = synth.diversity([0.25] * 4, [0.25] * 4, draws=2)
    assert d["effective"] == pytest.approx(4.0)
    assert d["expected_distinct"] == pytest.approx(4 * (1 - 0.75 ** 2))
    assert d["kl_bits"] == pytest.approx(0.0, abs=1e-12)
    assert d["tail"] == pytest.approx(0.5)
    d = synth.diversity([0.5, 0.5, 0.0, 0.0], [0.4, 0.3, 0.2, 0.1])
    assert d["effective"] == pytest.approx(2.0) and d["kl_bits"] == math.inf and d["tail"] == 0.0
    d = synth.diversity([0.5, 0.25, 0.25], [0.5, 0.25, 0.25])
    assert d["kl_bits"] == pytest.approx(0.0, abs=1e-12)
    assert synth.diversity([0.2, 0.8], [0.8, 0.2])["kl_bits"] == pytest.approx(0.6 * math.log2(4))
    for bad in ([], [0.5, 0.6], [-0.1, 1.1], [[0.5, 0.5]]):
        with pytest.raises(ValueError):
            synth.diversity(bad)
    with pytest.raises(ValueError):
        synth.diversity([0.5, 0.5], [1.0])
    with pytest.raises(ValueError):
        synth.diversity([0.5, 0.5], draws=0)


def test_story_bits_against_per_story_loss():
    import torch
    from shared.model import GPT, GPTConfig
    from shared.tokenizer import train_tokenizer
    tok = train_tokenizer(REAL, vocab_size=300)
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=len(tok), block_size=256, n_layer=1, n_head=2, n_kv_head=2, d_model=16)).eval()
    texts = REAL[:7]
    bits = synth.story_bits(m, tok, texts, batch_size=3)                 # batched, padded
    ref = synth.story_bits_per_char(m, tok, texts) * np.array([len(t) for t in texts])   # one story at a time
    np.testing.assert_allclose(bits, ref, rtol=1e-4)
    with pytest.raises(ValueError):
        synth.story_bits(m, tok, [])
    with pytest.raises(ValueError):
        synth.story_bits(m, tok, texts, batch_size=0)


def test_model_readers_move_their_batches_to_the_models_device():
    # The GPU rule without a GPU: the model on `meta`, batches built on the CPU; inside device_guard an input that
    # reaches a layer on another device raises a ValueError. Each reader gets through the model and stops at its
    # first read of a value (a meta tensor has none).
    import torch
    from shared.model import GPT, GPTConfig
    from shared.tokenizer import train_tokenizer
    from shared.validate import device_guard
    tok = train_tokenizer(REAL, vocab_size=300)
    m = GPT(GPTConfig(vocab_size=len(tok), block_size=256, n_layer=1, n_head=2, n_kv_head=2, d_model=16)).to("meta")
    texts = REAL[:2]
    with device_guard(m):
        for read in (lambda: synth.story_bits(m, tok, texts), lambda: synth.story_bits_per_char(m, tok, texts),
                     lambda: synth.greedy_reproduces(m, tok, texts),
                     lambda: synth.sample_stories(m, tok, 2, max_new_tokens=3)):
            with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
                read()
