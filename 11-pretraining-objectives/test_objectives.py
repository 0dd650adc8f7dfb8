"""Tests for objectives.py: masks vs loops, the plug-in attention vs the shared GPT, the four transforms,
BERT's corruption statistics (sigma bounds, and transformers' collator), the story-prefix floor, bad arguments."""
import math

import pytest
import torch

import objectives as ob
from shared import data, zoo
from shared.model import GPT, GPTConfig, greedy_next


@pytest.fixture(scope="module")
def tok():
    return ob.add_objective_tokens(zoo.load("stories-base")[1])


@pytest.fixture(scope="module")
def special(tok):
    return ob.SpecialIds.from_tokenizer(tok)


@pytest.fixture(scope="module")
def stream(tok):
    return data.encode_corpus(tok, list(data.stories(n_train=200, n_val=1, n_test=1)["train"]["text"]))


def tiny_cfg(vocab=50, **kw):
    return GPTConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=4, n_kv_head=2, d_model=32, **kw)


# ---------------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("T", [1, 2, 5, 16])
def test_prefix_mask_matches_loops_and_edges(T):
    for p in range(T + 3):
        assert torch.equal(ob.prefix_lm_mask(T, p)[0], ob.prefix_lm_mask_brute(T, p))
    assert torch.equal(ob.prefix_lm_mask(T, 0)[0], torch.ones(T, T).tril().bool())
    assert torch.equal(ob.prefix_lm_mask(T, T)[0], torch.ones(T, T, dtype=torch.bool))
    assert torch.equal(ob.causal_mask(T), ob.prefix_lm_mask_brute(T, 0))
    assert ob.full_mask(T).all()


def test_cached_mask_rows_are_the_last_rows_of_the_full_mask():
    full = ob.prefix_lm_mask(10, 4)[0]
    assert torch.equal(ob.prefix_lm_mask(3, 4, T_k=10)[0], full[-3:])
    assert torch.equal(ob.prefix_lm_mask(1, 4, T_k=10)[0], full[-1:])


def test_mask_bad_arguments():
    with pytest.raises(ValueError, match="T must be"):
        ob.prefix_lm_mask(0, 0)
    with pytest.raises(ValueError, match="prefix_len must be >= 0"):
        ob.prefix_lm_mask(4, -1)
    with pytest.raises(TypeError, match="prefix_len must be an int"):
        ob.prefix_lm_mask(4, 1.5)
    with pytest.raises(ValueError, match="T_k must be >= T"):
        ob.prefix_lm_mask(4, 0, T_k=2)


# ---------------------------------------------------------------------------------------------------- attention
def test_plugin_matches_shared_causal_and_bidirectional_gpt():
    torch.manual_seed(0)
    model, ctx = ob.build_model(tiny_cfg())
    causal, bidir = GPT(tiny_cfg()).eval(), GPT(tiny_cfg(causal=False)).eval()
    causal.load_state_dict(model.state_dict())
    bidir.load_state_dict(model.state_dict())
    x = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ob.forward_masked(model, ctx, x, 0), causal(x)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(ob.forward_masked(model, ctx, x, 20), bidir(x)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.eval()(x)[0], causal(x)[0], atol=1e-5, rtol=0)   # ctx unset: causal
    assert ctx.prefix_len is None                                                         # forward_masked restores it


def test_prefix_attention_sees_prefix_future_but_not_suffix_future():
    torch.manual_seed(0)
    model, ctx = ob.build_model(tiny_cfg())
    x = torch.randint(0, 50, (1, 16))
    y, z = x.clone(), x.clone()
    y[0, 10] = (y[0, 10] + 1) % 50              # a suffix token (prefix 6)
    z[0, 3] = (z[0, 3] + 1) % 50                # a prefix token
    a, b, c = (ob.forward_masked(model, ctx, t, 6) for t in (x, y, z))
    assert torch.equal(a[0, :10], b[0, :10])
    assert ((a[0, :3] - c[0, :3]).abs().amax(-1) > 1e-7).all()


def test_prefix_generation_with_cache_equals_rerun():
    torch.manual_seed(0)
    model, ctx = ob.build_model(tiny_cfg())
    prompt = torch.randint(0, 50, (2, 7))
    out = ob.generate(model, ctx, prompt, 6, greedy_next, prefix_len=7)
    ids = prompt                                  # reference: re-run the whole sequence for every token
    for _ in range(6):
        nxt = ob.forward_masked(model, ctx, ids, 7)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(out, ids)


# ---------------------------------------------------------------------------------------------------- transforms
def test_causal_and_prefix_targets():
    w = torch.arange(10)[None].repeat(3, 1)
    x, y, p = ob.causal_lm(w)
    assert torch.equal(x, w[:, :-1]) and torch.equal(y, w[:, 1:]) and (p == 0).all()
    x, y, p = ob.prefix_lm(w, prefix_len=4)
    assert (y[:, :3] == -100).all() and torch.equal(y[:, 3:], w[:, 4:]) and (p == 4).all()
    _, y, p = ob.prefix_lm(w, torch.Generator().manual_seed(0))
    for row, pl in zip(y, p):
        assert 1 <= pl <= 8 and (row[: pl - 1] == -100).all() and (row[pl - 1:] >= 0).all()


def test_mlm_statistics_within_sigma_and_match_transformers(tok, special, stream):
    from transformers import DataCollatorForLanguageModeling

    ids = stream[: 64 * 128].view(64, 128).repeat(6, 1)
    ours_in, ours_lab = ob.mlm_corrupt(ids, special, torch.Generator().manual_seed(0))
    hf = DataCollatorForLanguageModeling(tokenizer=tok, mlm_probability=0.15, seed=0)(
        [{"input_ids": r} for r in ids.tolist()])
    ok = ~torch.isin(ids, torch.tensor(special.special))
    for inputs, labels in ((ours_in, ours_lab), (hf["input_ids"], hf["labels"])):
        sel = labels != -100
        assert not (sel & ~ok).any(), "a special token was selected"
        assert torch.equal(labels[sel], ids[sel])
        n_ok, n_sel = int(ok.sum()), int(sel.sum())
        assert abs(n_sel / n_ok - 0.15) < 4 * math.sqrt(0.15 * 0.85 / n_ok)
        masked = (inputs[sel] == special.mask).float().mean().item()
        kept = (inputs[sel] == ids[sel]).float().mean().item()
        assert abs(masked - 0.8) < 4 * math.sqrt(0.16 / n_sel)
        assert abs(kept - 0.1) < 4 * math.sqrt(0.09 / n_sel)
        assert abs(1 - masked - kept - 0.1) < 4 * math.sqrt(0.09 / n_sel)
        assert (inputs[~sel] == ids[~sel]).all()


def test_mlm_all_mask_variant_and_bad_probs(special):
    ids = torch.randint(2, 700, (8, 64))
    x, y = ob.mlm_corrupt(ids, special, torch.Generator().manual_seed(0), mask_prob=1.0, random_prob=0.0)
    assert (x[y != -100] == special.mask).all()
    with pytest.raises(ValueError, match="mlm_probability"):
        ob.mlm_corrupt(ids, special, mlm_probability=1.5)
    with pytest.raises(ValueError, match="mask_prob \\+ random_prob"):
        ob.mlm_corrupt(ids, special, mask_prob=0.8, random_prob=0.3)


def test_fim_rows_are_a_rearrangement(special):
    w = torch.randint(2, 700, (32, 41))
    x, y, p = ob.fim_psm(w, special, torch.Generator().manual_seed(0), fim_rate=1.0)
    assert x.shape == (32, 40) and (p == 0).all()
    rows = torch.cat([x, y[:, -1:]], dim=1)
    for r, orig in zip(rows.tolist(), w):
        s, m = r.index(special.fim_suffix), r.index(special.fim_middle)
        assert r[0] == special.fim_prefix
        assert r[1:s] + r[m + 1:] + r[s + 1:m] == orig[:38].tolist()
    x0, _, _ = ob.fim_psm(w, special, fim_rate=0.0)
    assert torch.equal(x0, w[:, :-1])
    with pytest.raises(ValueError, match="at least 5 tokens"):
        ob.fim_psm(w[:, :4], special)


def test_batch_fn_sets_context_and_rejects_unknown(special, stream):
    ctx = ob.MaskContext()
    for name, expect in (("causal", 0), ("mlm", 32), ("leak", 32)):
        x, y = ob.batch_fn(name, stream, ctx, special, seq_len=32, batch_size=4)(torch.Generator().manual_seed(0))
        assert x.shape == y.shape == (4, 32) and (ctx.prefix_len == expect).all()
    with pytest.raises(ValueError, match="objective must be one of"):
        ob.batch_fn("span", stream, ctx, special, seq_len=32, batch_size=4)


def test_tokenizer_and_special_ids(tok, special):
    assert len(tok) == 785 and tok.mask_token == ob.MASK
    assert special.mask not in (special.fim_prefix, special.fim_suffix, special.fim_middle)
    with pytest.raises(ValueError, match="add_objective_tokens"):
        ob.SpecialIds.from_tokenizer(zoo.load("stories-base")[1])
    with pytest.raises(TypeError, match="Hugging Face tokenizer"):
        ob.add_objective_tokens("gpt2")


# ---------------------------------------------------------------------------------------------------- floor
def test_story_prefix_logprob_against_the_generator():
    """Swapping the planted colour (and its recall) changes the story's exact log-probability by exactly the
    difference of our two prefix log-probabilities: our Zipf accounting is the generator's."""
    ds = data.stories(n_train=30, n_val=1, n_test=1)["train"]
    colours = data.CATEGORIES["colour"]
    for row in ds:
        text, colour = row["text"], row["colour"]
        other = colours[(colours.index(colour) + 1) % len(colours)]
        swapped = text.replace(f"had a {colour} ", f"had a {other} ", 1).replace(
            f" the {colour} {row['object']}. ", f" the {other} {row['object']}. ")
        delta_story = data.story_logprob(swapped) - data.story_logprob(text)
        delta_prefix = ob.story_prefix(swapped)[1] - ob.story_prefix(text)[1]
        assert math.isclose(delta_story, delta_prefix, abs_tol=1e-9)
        assert ob.story_prefix(text)[1] > row["logprob"]        # the set-up is likelier than the whole story
    assert ob.OPENERS == data._OPENER.options                   # the one private name we mirror
    with pytest.raises(ValueError, match="not a story set-up"):
        ob.story_prefix("Hello there.")


def test_eval_set_and_scores(tok, special):
    s = data.stories(n_train=1, n_val=12, n_test=1)["validation"]
    stream = data.encode_corpus(tok, list(s["text"]))
    ev = ob.make_eval_set(tok, list(s["text"]), list(s["logprob"]), stream, 128, 5)
    assert len(ev.rows) == 5 and (ev.floor_nats > 0).all()
    for i in range(5):
        colour = tok.convert_ids_to_tokens(int(ev.rows[i, ev.plant[i]])).lstrip("Ġ")
        assert colour == s[i]["colour"] and int(ev.rows[i, ev.end[i]]) == tok.eos_token_id
    torch.manual_seed(0)
    model, ctx = ob.build_model(tiny_cfg(vocab=len(tok)))
    for how in ("causal", "prefix", "pll"):
        lp, hit = ob.suffix_scores(model, ctx, ev, how, special.mask)
        assert lp.shape == hit.shape == (ev.n_suffix_tokens,) and (lp <= 0).all()
    for how in ("causal", "prefix", "mlm", "fim"):
        c, o = ob.infill_hits(model, ctx, ev, how, special)
        assert c.shape == o.shape == (5,)
    with pytest.raises(ValueError, match="how must be"):
        ob.infill_hits(model, ctx, ev, "span", special)


def test_zipf_logprobs_sum_to_one():
    assert math.isclose(float(ob.zipf_logprobs(7).exp().sum()), 1.0, abs_tol=1e-12)


def test_iterative_unmask_fills_every_mask_and_keeps_the_rest(special):
    torch.manual_seed(0)
    model, ctx = ob.build_model(tiny_cfg(vocab=special.vocab_size))
    ids = torch.randint(2, 700, (3, 12))
    ids[:, 4:9] = special.mask
    out = ob.iterative_unmask(model, ctx, ids, special.mask, per_step=2)
    assert not (out == special.mask).any()
    assert torch.equal(out[:, :4], ids[:, :4]) and torch.equal(out[:, 9:], ids[:, 9:])


def test_corruption_accuracy_keys_and_range(special):
    torch.manual_seed(0)
    model, ctx = ob.build_model(tiny_cfg(vocab=special.vocab_size))
    acc = ob.corruption_accuracy(model, ctx, torch.randint(2, 700, (4, 32)), special, torch.Generator().manual_seed(0))
    assert set(acc) == {"mask", "real", "random"} and all(0.0 <= v <= 1.0 for v in acc.values())
    with pytest.raises(ValueError, match="rate"):
        ob.corruption_accuracy(model, ctx, torch.zeros(1, 4, dtype=torch.long), special, rate=2.0)


@pytest.fixture(scope="module")
def small_ev(tok):
    s = data.stories(n_train=1, n_val=12, n_test=1)["validation"]
    stream = data.encode_corpus(tok, list(s["text"]))
    return s, ob.make_eval_set(tok, list(s["text"]), list(s["logprob"]), stream, 128, 5)


def test_name_slots_point_at_the_hero_repeated_two_to_the_right(tok, small_ev):
    s, ev = small_ev
    slot = ob.name_slots(tok, ev.rows)
    for i in range(5):
        assert tok.convert_ids_to_tokens(int(ev.rows[i, slot[i]])).lstrip("Ġ") == s[i]["name"]
        assert int(ev.rows[i, slot[i] + 2]) == int(ev.rows[i, slot[i]])
    with pytest.raises(ValueError, match="named"):
        ob.name_slots(tok, torch.zeros(1, 10, dtype=torch.long))


def test_slot_logprob_against_pll_and_an_unpadded_fim_prompt(tok, special, small_ev):
    _, ev = small_ev
    slot = ob.name_slots(tok, ev.rows)
    torch.manual_seed(0)
    model, ctx = ob.build_model(tiny_cfg(vocab=len(tok)))
    for how in ("causal", "prefix", "mlm", "fim"):
        lp = ob.slot_logprob(model, ctx, ev, slot, how, special)
        assert lp.shape == (5,) and (lp <= 0).all()
    mlm = ob.slot_logprob(model, ctx, ev, slot, "mlm", special)
    for i in range(5):   # MLM at one masked position == the PLL term of that position
        pll, _ = ob.pseudo_log_likelihood(model, ctx, ev.rows[i], slot[i:i + 1], special.mask)
        assert torch.allclose(mlm[i], pll[0], atol=1e-5)
    fim = ob.slot_logprob(model, ctx, ev, slot, "fim", special)
    i = 3                # padding the batch to one length must not change the answer (causal: pads come after)
    p = ob.fim_prompt(ev.rows[i, :slot[i]], ev.rows[i, slot[i] + 1:ev.end[i] + 1], special)
    ref = ob.forward_masked(model, ctx, p[None], 0)[0, -1].log_softmax(-1)[ev.rows[i, slot[i]]]
    assert torch.allclose(fim[i], ref, atol=1e-5)
    with pytest.raises(ValueError, match="slot"):
        ob.slot_logprob(model, ctx, ev, slot[:2], "mlm", special)
    with pytest.raises(ValueError, match="how must be"):
        ob.slot_logprob(model, ctx, ev, slot, "span", special)


def test_leak_scoring_reads_the_target_and_causal_does_not(tok, special, small_ev):
    _, ev = small_ev
    torch.manual_seed(0)
    model, ctx = ob.build_model(tiny_cfg(vocab=len(tok)))
    changed = ev.rows.clone()
    b, t = 0, int(ev.prefix_end[0]) + 3
    changed[b, t] = (changed[b, t] + 1) % len(tok)
    for how, moves in (("causal", False), ("prefix", False), ("leak", True)):
        a = ob.forward_masked(model, ctx, ev.rows, ev.rows.shape[1] if how == "leak" else 0)[b, t - 1]
        c = ob.forward_masked(model, ctx, changed, ev.rows.shape[1] if how == "leak" else 0)[b, t - 1]
        assert bool((a - c).abs().max() > 1e-6) == moves
    lp, hit = ob.suffix_scores(model, ctx, ev, "leak")
    assert lp.shape == (ev.n_suffix_tokens,) and (lp <= 0).all()
    with pytest.raises(ValueError, match="how must be"):
        ob.suffix_scores(model, ctx, ev, "bidirectional")


def test_grade_continuation_on_generator_stories():
    for st in data.stories(n_train=1, n_val=20, n_test=1)["validation"]:
        prefix, _ = ob.story_prefix(st["text"])
        g = ob.grade_continuation(st["text"][len(prefix):], st["name"], st["colour"], st["object"])
        assert g["valid"] == g["sentences"] >= 4 and g["recall_right"]
    g = ob.grade_continuation(" The weather was sunny. The weather was a cat. Later, Mia found the red cup.", "Mia",
                              "red", "ball")
    assert g == dict(sentences=3, valid=2, recall_right=False)
    assert ob.grade_continuation(" Soon Tom felt happy.", "Mia", "red", "ball")["valid"] == 0   # wrong hero
    with pytest.raises(TypeError):
        ob.grade_continuation(3, "Mia", "red", "ball")


def test_spm_rows_are_a_rearrangement_and_the_prompt_continues_the_prefix(special):
    w = torch.randint(2, 700, (16, 41))
    x, y, _ = ob.fim_psm(w, special, torch.Generator().manual_seed(0), fim_rate=1.0, order="spm")
    rows = torch.cat([x, y[:, -1:]], dim=1)
    for r, orig in zip(rows.tolist(), w):
        assert r[:2] == [special.fim_prefix, special.fim_suffix]
        m = r.index(special.fim_middle)
        suffix, prefix_middle = r[2:m], r[m + 1:]          # prefix and middle are contiguous: the original's start
        assert prefix_middle + suffix == orig[:38].tolist()
    p = ob.fim_prompt(torch.tensor([5, 6]), torch.tensor([7]), special, "spm")
    assert p.tolist() == [special.fim_prefix, special.fim_suffix, 7, special.fim_middle, 5, 6]
    with pytest.raises(ValueError, match="order must be"):
        ob.fim_psm(w, special, order="mps")
    with pytest.raises(ValueError, match="order must be"):
        ob.fim_prompt(torch.tensor([5]), torch.tensor([7]), special, "mps")


def test_valid_prefix_against_the_generator():
    for st in data.stories(n_train=1, n_val=10, n_test=1)["validation"]:
        setup, setup_lp = ob.story_prefix(st["text"])
        cont = st["text"][len(setup):]
        n, lp = ob.valid_prefix(setup, cont)                 # a whole story: all of it, its exact log p
        assert n == len(cont) and math.isclose(lp, st["logprob"] - setup_lp, abs_tol=1e-9)
        cut = cont.index(".", cont.index(".") + 1) + 1       # two sentences, then garbage
        n2, lp2 = ob.valid_prefix(setup, cont[:cut] + " near had. The weather was sunny.")
        assert n2 == cut and lp <= lp2 < 0                    # a prefix is at least as likely as the whole
    assert ob.valid_prefix(setup, " near had.") == (0, 0.0)
    with pytest.raises(ValueError, match="set-up"):
        ob.valid_prefix("Hello.", " The end.")
    with pytest.raises(TypeError):
        ob.valid_prefix(setup, None)


def test_model_facing_helpers_move_inputs_to_the_model_device(tok, special, small_ev):
    # GPU-ready: the model on `meta`, every helper inside device_guard; a helper may stop at its first read of a
    # value (meta tensors have none), never at a device mismatch (ValueError).
    from shared.validate import device_guard

    _, ev = small_ev
    model, ctx = ob.build_model(tiny_cfg(vocab=len(tok)))
    model = model.to("meta")
    slot = ob.name_slots(tok, ev.rows)
    calls = [lambda: ob.forward_masked(model, ctx, ev.rows, 0),
             lambda: ob.slot_logprob(model, ctx, ev, slot, "fim_spm", special),
             lambda: ob.slot_logprob(model, ctx, ev, slot, "mlm", special),
             lambda: ob.suffix_scores(model, ctx, ev, "prefix"),
             lambda: ob.suffix_scores(model, ctx, ev, "pll", special.mask),
             lambda: ob.corruption_accuracy(model, ctx, ev.rows, special),
             lambda: ob.iterative_unmask(model, ctx, ev.rows[:1, :8].clone().fill_(special.mask), special.mask),
             lambda: ob.generate(model, ctx, ev.rows[:1, :5], 2, greedy_next, prefix_len=5)]
    with device_guard(model):
        for call in calls:
            try:
                call()
            except (NotImplementedError, RuntimeError) as e:     # a value read on meta: the plumbing held so far
                assert "device mismatch" not in str(e)
