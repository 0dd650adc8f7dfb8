"""Tests for finetune.py: task data and grading, the chat template, completion-only labels and loss (vs HF's
own loss), our LoRA linear vs peft's (and merging), the preference losses vs their closed forms, bad arguments.
Tiny random Llama models; a few seconds."""
import math

import pytest
import torch

import finetune as ft
from shared import hf
from shared.data import stories
from shared.model import GPT, GPTConfig
from shared.tokenizer import train_tokenizer

ATOL = 1e-5   # float32, same math in a different order: ~1e-7; 1e-5 leaves room


@pytest.fixture(scope="module")
def rows():
    return list(stories(n_train=40, n_val=4, n_test=0)["train"])


@pytest.fixture(scope="module")
def tok(rows):
    t = train_tokenizer([r["text"] for r in rows] + [e["prompt"] for e in ft.qa_examples(rows)], 400)
    ft.add_chat_tokens(t)
    return t


def tiny_hf(tok, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=len(tok), block_size=64, n_layer=2, n_head=2, n_kv_head=1, d_model=32)
    return hf.to_hf(GPT(cfg), tok)


def test_examples_have_exact_answers(rows):
    ex = ft.qa_examples(rows[:2])
    assert len(ex) == 2 * len(ft.TASKS)
    r = rows[0]
    by_task = {e["task"]: e for e in ex[:len(ft.TASKS)]}
    assert by_task["colour"]["answer"] == r["colour"] and by_task["name"]["answer"] == r["name"]
    assert by_task["object"]["prompt"] == f"<|user|>{ft.fact_sentence(r)}\nWhat did {r['name']} have?<|assistant|>"
    assert by_task["object"]["completion"] == f" {r['object']}<|endoftext|>"
    plain = ft.qa_examples(rows[:1], tasks=["animal"], fmt="plain")[0]
    assert plain["prompt"].endswith("\nanswer:") and "<|user|>" not in plain["prompt"]


def test_chat_template_renders_the_examples(rows, tok):
    e = ft.qa_examples(rows[:1], tasks=["colour"])[0]
    question = ft.TASKS["colour"][0].format(**rows[0])
    user = {"role": "user", "content": f"{ft.fact_sentence(rows[0])}\n{question}"}
    prompt = tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([user, {"role": "assistant", "content": e["answer"]}], tokenize=False)
    assert prompt == e["prompt"] and full == e["prompt"] + e["completion"]
    ids = tok(e["prompt"], add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|user|>") and ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")


def test_collate_masks_the_prompt(rows, tok):
    ex = ft.qa_examples(rows[:3])
    b = ft.collate(tok, ex)
    for i, e in enumerate(ex):
        n_prompt = len(tok(e["prompt"], add_special_tokens=False)["input_ids"])
        n_all = n_prompt + len(tok(e["completion"], add_special_tokens=False)["input_ids"])
        assert (b["labels"][i, :n_prompt] == -100).all() and (b["labels"][i, n_all:] == -100).all()
        assert (b["labels"][i, n_prompt:n_all] == b["input_ids"][i, n_prompt:n_all]).all()
        assert b["attention_mask"][i].sum() == n_all
    everything = ft.collate(tok, ex, loss_on="all")
    assert ((everything["labels"] != -100) == everything["attention_mask"].bool()).all()


def test_completion_loss_equals_hf_loss(rows, tok):
    m = tiny_hf(tok)
    b = ft.collate(tok, ft.qa_examples(rows[:4]))
    out = m(**b)
    torch.testing.assert_close(ft.completion_loss(out.logits, b["labels"]), out.loss, atol=ATOL, rtol=0)


def test_lora_linear_equals_peft_and_merges():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 7, bias=False))
    base_weight = net[0].weight.detach().clone()
    pm = get_peft_model(net, LoraConfig(r=3, lora_alpha=6, target_modules=["0"], lora_dropout=0.0))
    layer = pm.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)    # peft starts B at zero: make the update non-trivial
    ours = ft.LoRALinear(torch.nn.Linear(12, 7, bias=False), r=3, alpha=6)
    with torch.no_grad():
        ours.base.weight.copy_(base_weight)
        ours.A.copy_(layer.lora_A["default"].weight)
        ours.B.copy_(layer.lora_B["default"].weight)
    x = torch.randn(5, 12)
    torch.testing.assert_close(ours(x), pm(x), atol=ATOL, rtol=0)
    torch.testing.assert_close(x @ ours.merged_weight().T, ours(x), atol=ATOL, rtol=0)
    assert ft.trainable_parameters(ours) == 3 * (12 + 7)
    fresh = ft.LoRALinear(torch.nn.Linear(12, 7, bias=False), r=2, alpha=2)
    torch.testing.assert_close(fresh(x), fresh.base(x))    # B = 0 at init: the adapter starts as the identity update


def test_adamw_state_bytes_counts_two_moments():
    p = torch.nn.Parameter(torch.zeros(10, 3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    assert ft.adamw_state_bytes(opt) == 2 * 30 * 4 + 4   # exp_avg, exp_avg_sq (float32) and a scalar step


def test_preference_losses_closed_forms():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    want = (math.log1p(math.exp(-2.0)) + math.log(2.0)) / 2
    assert abs(ft.bradley_terry_loss(rc, rr).item() - want) < 1e-6
    # DPO with the policy equal to the reference: every margin is 0, loss log 2, whatever beta
    lp = torch.tensor([-3.0, -5.0])
    assert abs(ft.dpo_loss(lp, lp, lp, lp, beta=0.5).item() - math.log(2.0)) < 1e-6
    assert abs(ft.dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), torch.tensor([-1.0]),
                           beta=0.5).item() - math.log1p(math.exp(-1.0))) < 1e-6


def test_true_preference():
    assert ft.true_preference("red", "red") == 1.0
    assert ft.true_preference("red red kite", "red") == 0.5
    assert ft.true_preference("blue", "red") == 0.0 and ft.true_preference("", "red") == 0.0


def test_category_prior(rows):
    ex = ft.qa_examples(rows)
    hits = ft.category_prior_answers(rows, ex)
    assert len(hits) == len(ex) and 0 < sum(hits) < len(ex)
    one = [dict(rows[0]) for _ in range(3)]          # one value per field: the prior is certain, loss 0
    assert ft.prior_answer_loss(one, ft.qa_examples(one)) == 0.0


def test_bad_arguments(rows, tok):
    with pytest.raises(ValueError, match="fmt"):
        ft.qa_examples(rows[:1], fmt="xml")
    with pytest.raises(ValueError, match="tasks"):
        ft.qa_examples(rows[:1], tasks=["weather"])
    with pytest.raises(ValueError, match="loss_on"):
        ft.collate(tok, ft.qa_examples(rows[:1]), loss_on="prompt")
    with pytest.raises(ValueError, match="empty"):
        ft.collate(tok, [])
    with pytest.raises(TypeError, match="list"):
        ft.collate(tok, "text")
    with pytest.raises(ValueError, match="no labelled token"):
        ft.completion_loss(torch.zeros(1, 3, 5), torch.full((1, 3), -100))
    with pytest.raises(ValueError, match="logits"):
        ft.completion_loss(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="nn.Linear"):
        ft.LoRALinear(torch.nn.Conv1d(2, 2, 1), r=1, alpha=1)
    with pytest.raises(ValueError, match="r must be"):
        ft.LoRALinear(torch.nn.Linear(2, 2, bias=False), r=0, alpha=1)
    with pytest.raises(ValueError, match="beta"):
        ft.dpo_loss(*[torch.zeros(1)] * 4, beta=0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        ft.bradley_terry_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(TypeError, match="strings"):
        ft.true_preference(None, "red")
    with pytest.raises(ValueError, match="steps"):
        ft.finetune(tiny_hf(tok), tok, ft.qa_examples(rows[:1]), steps=0)
    with pytest.raises(TypeError, match="prompts"):
        ft.generate_answers(tiny_hf(tok), tok, "one prompt")


def test_finetune_runs_and_exact_match_grades(rows, tok):
    m = tiny_hf(tok)
    ex = ft.qa_examples(rows[:8])
    seen = []
    losses, opt = ft.finetune(m, tok, ex, steps=3, batch_size=4, lr=1e-3, seed=0, callback=seen.append,
                              callback_every=2)
    assert seen == [2]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert ft.adamw_state_bytes(opt) == 8 * ft.trainable_parameters(m) + 4 * len(opt.state)
    hits = ft.exact_match(m, tok, ex[:4])
    assert len(hits) == 4 and all(isinstance(h, bool) for h in hits)
    g = ft.grade(m, tok, ex[:4])
    assert g["exact"] == hits and len(g["type"]) == len(g["replies"]) == 4
    assert all(t or not e for t, e in zip(g["type"], g["exact"]))   # an exact answer is of the right type


def test_evaluate_qa_matches_grade_and_the_completion_loss(rows, tok):
    m = tiny_hf(tok).eval()
    ex = ft.qa_examples(rows[:3])
    r = ft.evaluate_qa(m, tok, ex)
    g = ft.grade(m, tok, ex)
    assert r["replies"] == g["replies"]
    assert r["type"] == sum(g["type"]) / len(ex) and r["exact"] == sum(g["exact"]) / len(ex)
    b = ft.collate(tok, ex)
    out = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    assert abs(r["loss"] - out.loss.item()) < ATOL          # HF's own labels= loss on the answer tokens
    with pytest.raises(ValueError):
        ft.answer_loss(m, tok, [])
    with pytest.raises(TypeError):
        ft.evaluate_qa(m, tok, ex[0])


PAIR_CATS = {"colour": ["red", "blue", "green"], "object": ["map", "hat"], "animal": ["cat", "dog"],
             "name": ["Tom", "Mia"]}


def two_story_examples(repeats: int) -> list[dict]:
    """Question/answer examples of two stories (Tom's red map, Mia's blue hat), `repeats` times over."""
    rows = [{"name": "Tom", "animal": "cat", "colour": "red", "object": "map"},
            {"name": "Mia", "animal": "dog", "colour": "blue", "object": "hat"}] * repeats
    return ft.qa_examples(rows)


def test_preference_pairs_are_labelled_by_the_true_function():
    cats, ex = PAIR_CATS, two_story_examples(10)
    pairs = ft.preference_pairs(ex, cats, seed=3)
    assert len(pairs) == len(ex) and {p["kind"] for p in pairs} == set(ft.PAIR_KINDS)
    want = {"rambling": 0.5, "wrong type": 0.0, "wrong value": 0.0}
    for p, e in zip(pairs, ex):
        strip = lambda s: s.replace("<|endoftext|>", "")
        assert ft.true_preference(strip(p["chosen"]), e["answer"]) == 1.0
        assert ft.true_preference(strip(p["rejected"]), e["answer"]) == want[p["kind"]]
        field = ft.TASKS[e["task"]][1]
        if p["kind"] == "wrong value":
            assert strip(p["rejected"]).strip() in cats[field]
        if p["kind"] == "wrong type":
            assert strip(p["rejected"]).strip() not in cats[field]
    assert ft.preference_pairs(ex, cats, seed=3) == pairs                       # seeded
    assert {p["kind"] for p in ft.preference_pairs(ex, cats, kinds=["rambling"])} == {"rambling"}
    with pytest.raises(ValueError, match="kinds"):
        ft.preference_pairs(ex, cats, kinds=["bogus"])
    with pytest.raises(ValueError, match="categories"):
        ft.preference_pairs(ex, {"colour": ["red"]})
    with pytest.raises(ValueError, match="non-empty"):
        ft.pair_batches(None, [])


def test_preference_pairs_with_a_rambling_chosen_side_still_follow_the_true_function():
    cats, ex = PAIR_CATS, two_story_examples(50)
    strip = lambda s: s.replace("<|endoftext|>", "")
    kinds = ("wrong type", "wrong value")
    pairs = ft.preference_pairs(ex, cats, seed=0, kinds=kinds, chosen_rambling=0.5)
    wordy = [len(strip(p["chosen"]).split()) > 1 for p in pairs]
    assert 0.35 < sum(wordy) / len(pairs) < 0.65                                # about half, seeded
    for p, e, w in zip(pairs, ex, wordy):
        chosen, rejected = ft.true_preference(strip(p["chosen"]), e["answer"]), ft.true_preference(strip(p["rejected"]), e["answer"])
        assert chosen == (0.5 if w else 1.0) and rejected == 0.0 and chosen > rejected   # labelled right
        assert len(strip(p["rejected"]).split()) == 1 and p["kind"] in kinds             # rejected: one wrong word
    every = ft.preference_pairs(ex, cats, seed=0, kinds=kinds, chosen_rambling=1.0)
    assert all(strip(p["chosen"]).split() == [e["answer"]] * 3 for p, e in zip(every, ex))
    none = ft.preference_pairs(ex, cats, seed=0, kinds=kinds, chosen_rambling=0.0)
    assert all(strip(p["chosen"]).split() == [e["answer"]] for p, e in zip(none, ex))
    with pytest.raises(ValueError, match="rambling"):
        ft.preference_pairs(ex, cats, chosen_rambling=0.5)                      # the default kinds include rambling
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match="chosen_rambling"):
            ft.preference_pairs(ex, cats, kinds=kinds, chosen_rambling=bad)


def test_frequency_ranker_prefers_the_frequent_value():
    rows = [{"name": "Tom", "animal": "cat", "colour": "red", "object": "map"}] * 3 + \
           [{"name": "Mia", "animal": "dog", "colour": "blue", "object": "hat"}]
    q = ft.qa_examples(rows[:1], tasks=["colour"])[0]
    pair = lambda chosen, rejected: {**q, "chosen": f" {chosen}<|endoftext|>", "rejected": f" {rejected}<|endoftext|>"}
    # red is the colour of 3 of 4 stories, blue of 1, green of none; 'cat' is no colour at all
    got = ft.frequency_ranker(rows, [pair("red", "blue"), pair("blue", "red"), pair("red", "red red red"),
                                     pair("blue", "cat"), pair("green", "cat")])
    assert got == [1.0, 0.0, 0.5, 1.0, 0.5]
    pairs = ft.preference_pairs(two_story_examples(5), PAIR_CATS, seed=0)
    assert all("task" in p for p in pairs) and len(ft.frequency_ranker(rows, pairs)) == len(pairs)
    with pytest.raises(ValueError, match="non-empty"):
        ft.frequency_ranker(rows, [])


# ---------------------------------------------------------------------------------------------------- PPO pieces

def test_gae_hand_example_and_closed_forms():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.5, 0.5]])
    m = torch.ones(1, 3)
    adv, ret = ft.gae(r, v, m, gamma=1.0, lam=1.0)           # Monte Carlo: return 1 everywhere, minus V
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5, 0.5]]))
    torch.testing.assert_close(ret, torch.ones(1, 3))
    adv, _ = ft.gae(r, v, m, gamma=1.0, lam=0.0)             # TD(0): delta_t = r_t + V_{t+1} - V_t
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.0, 0.5]]))
    # by hand, gamma = 0.9, lam = 0.5: deltas (0.45 - 0.5, 0.45 - 0.5, 1 - 0.5) = (-0.05, -0.05, 0.5)
    adv, _ = ft.gae(r, v, m, gamma=0.9, lam=0.5)
    a2 = 0.5
    a1 = -0.05 + 0.45 * a2
    a0 = -0.05 + 0.45 * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2]]))
    # brute force on random data with ragged masks: A_t = sum_l (gamma lam)^l delta_{t+l} within the response
    g = torch.Generator().manual_seed(0)
    B, K, gamma, lam = 5, 6, 0.95, 0.8
    r, v = torch.randn(B, K, generator=g), torch.randn(B, K, generator=g)
    lengths = [6, 1, 3, 4, 2]
    m = torch.tensor([[1.0] * n + [0.0] * (K - n) for n in lengths])
    adv, ret = ft.gae(r * m, v, m, gamma, lam)
    for b, n in enumerate(lengths):
        vv = list(v[b, :n]) + [0.0]
        delta = [r[b, t] + gamma * vv[t + 1] - vv[t] for t in range(n)]
        want = [sum((gamma * lam) ** l * delta[t + l] for l in range(n - t)) for t in range(n)]
        torch.testing.assert_close(adv[b, :n], torch.tensor(want), atol=1e-5, rtol=0)
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()
    torch.testing.assert_close(ret, (adv + v) * m)


def test_ppo_clipping():
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0]])
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.1]])
    old = torch.zeros(1, 5)
    logp = torch.log(ratio).requires_grad_(True)
    m = torch.ones(1, 5)
    loss, clipfrac = ft.ppo_policy_loss(logp, old, adv, m, clip=0.2)
    # per token -min(rA, clip(r) A): A>0, r=1.5 -> -1.2 (clipped); A>0, r=0.5 -> -0.5; A<0, r=1.5 -> 1.5;
    # A<0, r=0.5 -> 0.8 (clipped); A=2, r=1.1 -> -2.2
    want = torch.tensor([-1.2, -0.5, 1.5, 0.8, -2.2]).mean()
    torch.testing.assert_close(loss, want)
    assert clipfrac.item() == pytest.approx(2 / 5)
    loss.backward()
    grad = logp.grad[0]
    assert grad[0] == 0 and grad[3] == 0                          # clipped tokens pass no gradient
    torch.testing.assert_close(grad[[1, 2, 4]], torch.tensor([-0.5, 1.5, -2.2]) / 5)   # d(-rA)/dlogp = -rA / n
    # masked tokens do not count
    m2 = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]])
    loss2, cf2 = ft.ppo_policy_loss(torch.log(ratio), old, adv, m2, clip=0.2)
    torch.testing.assert_close(loss2, torch.tensor((-1.2 - 0.5) / 2))
    assert cf2.item() == pytest.approx(0.5)
    # value loss: the clipped value cannot move past old +- eps
    v, v_old, ret = torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]])
    torch.testing.assert_close(ft.ppo_value_loss(v, v_old, ret, torch.ones(1, 1), clip=0.2),
                               torch.tensor(0.5 * 1.8 ** 2))   # max(0, (0.2 - 2)^2)


def test_kl_estimators_against_the_closed_form():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g), 0)
    q = torch.softmax(torch.randn(6, generator=g), 0)
    kl = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, lq = p.log()[x], q.log()[x]
    for kind in ("k1", "k3"):
        est = ft.kl_estimate(lp, lq, kind)
        se = est.std().item() / math.sqrt(len(x))
        assert abs(est.mean().item() - kl) < 5 * se, (kind, est.mean().item(), kl, se)   # unbiased, 5 sigma
    assert (ft.kl_estimate(lp, lq, "k3") >= 0).all()
    assert ft.kl_estimate(lp, lq, "k3").var() < ft.kl_estimate(lp, lq, "k1").var()   # lower variance here
    assert (ft.kl_estimate(lp, lp, "k1") == 0).all() and (ft.kl_estimate(lp, lp, "k3") == 0).all()


def test_rlhf_rewards_put_the_score_on_the_last_token():
    logp, ref = torch.log(torch.tensor([[0.5, 0.5, 0.5]])), torch.log(torch.tensor([[0.25, 0.5, 1.0]]))
    m = torch.tensor([[1.0, 1.0, 0.0]])
    r = ft.rlhf_rewards(torch.tensor([3.0]), logp, ref, m, beta=0.5)
    torch.testing.assert_close(r, torch.tensor([[-0.5 * math.log(2), 3.0, 0.0]]))
    torch.testing.assert_close(ft.rlhf_rewards(torch.tensor([3.0]), logp, ref, m, beta=0.0),
                               torch.tensor([[0.0, 3.0, 0.0]]))


def test_sampling_logprobs_and_a_ppo_step(rows, tok):
    lm = tiny_hf(tok)
    prompts = [tok(e["prompt"], add_special_tokens=False)["input_ids"] for e in ft.qa_examples(rows[:3])[:5]]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ro = ft.sample_responses(lm, prompts, 4, eos, pad, generator=torch.Generator().manual_seed(0))
    K = ro["response"].shape[1]
    assert K == 4 and ro["input_ids"].shape == ro["attention_mask"].shape
    for resp, m in zip(ro["response"], ro["response_mask"]):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()                       # a prefix of ones
        assert (resp[n:] == pad).all() and (eos not in resp[:n - 1].tolist())
    seen = {True: [], False: []}                                   # the next-token logits each call computes

    class Recording(torch.nn.Module):                              # the model, its next-token logits recorded
        def __init__(self, use_cache):
            super().__init__()
            self.lm, self.use_cache = lm, use_cache

        def forward(self, **kw):
            out = self.lm(**kw)
            seen[self.use_cache].append(out.logits[:, -1])
            return out
    for temperature in (0.0, 1.0):                                 # the key/value cache changes nothing but speed
        seen[True].clear(), seen[False].clear()
        a, b = (ft.sample_responses(Recording(c), prompts, 4, eos, pad, generator=torch.Generator().manual_seed(0),
                                    temperature=temperature, use_cache=c) for c in (True, False))
        assert all(torch.equal(a[k], b[k]) for k in a), temperature
        torch.testing.assert_close(torch.stack(seen[True]), torch.stack(seen[False]), atol=1e-5, rtol=0)
    # left-padded log-probs equal the unpadded forward of each sequence alone
    logp, _ = ft.response_logprobs(lm, ro)
    for b, p in enumerate(prompts):
        seq = torch.tensor([p + ro["response"][b].tolist()])
        with torch.no_grad():
            lps = torch.log_softmax(lm(input_ids=seq).logits[0, len(p) - 1:-1], -1)
        want = lps.gather(-1, ro["response"][b][:, None]).squeeze(-1)
        n = int(ro["response_mask"][b].sum())
        torch.testing.assert_close(logp[b, :n], want[:n], atol=1e-4, rtol=0)
    policy = ft.PolicyWithValue(tiny_hf(tok))
    ref = tiny_hf(tok)
    lp0, v0 = ft.response_logprobs(policy, ro)
    assert v0.shape == (5, K) and (v0 == 0).all()                    # the value head starts at zero
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    stats = ft.ppo_step(policy, ref, opt, ro, torch.randn(5, generator=torch.Generator().manual_seed(1)), beta=0.1,
                        epochs=2)
    assert set(stats) >= {"score", "kl", "clipfrac", "pg_loss", "v_loss"} and abs(stats["kl"]) < 1e-5   # policy == ref
    lp1, v1 = ft.response_logprobs(policy, ro)
    assert not torch.allclose(lp0, lp1) and not (v1 == 0).all()     # both the policy and the value head moved
    with pytest.raises(ValueError, match="max_new_tokens"):
        ft.sample_responses(lm, prompts, 0, eos, pad)
    with pytest.raises(ValueError, match="epochs"):
        ft.ppo_step(policy, ref, opt, ro, torch.zeros(5), beta=0.1, epochs=0)
    with pytest.raises(ValueError, match="beta"):
        ft.rlhf_rewards(torch.zeros(1), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), beta=-1)
    with pytest.raises(ValueError, match="kind"):
        ft.kl_estimate(torch.zeros(2), torch.zeros(2), "k2")
    with pytest.raises(ValueError, match="shapes"):
        ft.gae(torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1, 2))


def test_reward_model_plumbing_trains_scores_and_ranks(rows, tok):
    from shared.data import CATEGORIES

    lm = tiny_hf(tok)
    rm, missing = ft.new_reward_model(lm, seed=0)
    assert missing == ["score.weight"]                          # only the head is new
    assert torch.equal(rm.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    rm_again, _ = ft.new_reward_model(lm, seed=0)
    assert torch.equal(rm.score.weight, rm_again.score.weight)  # the head is seeded
    ex = ft.qa_examples(rows[:8])
    pairs = ft.preference_pairs(ex, CATEGORIES, seed=0)
    assert all(ft.truly_ranked(p) for p in pairs)
    flipped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
    assert not any(ft.truly_ranked(p) for p in flipped)
    losses = ft.train_reward_model(rm, tok, pairs, steps=3, batch_size=4, seed=0)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    bc, br = ft.pair_batches(tok, pairs)
    ranked = ft.ranked_chosen_first(rm, bc, br)
    with torch.no_grad():
        assert (ranked == (ft.reward_scores(rm, bc) > ft.reward_scores(rm, br)).numpy()).all()
        # score_sequences on unpadded token lists == reward_scores on the right-padded batch
        seqs = [ids[m.bool()].tolist() for ids, m in zip(bc["input_ids"], bc["attention_mask"])]
        torch.testing.assert_close(ft.score_sequences(rm, seqs, tok.pad_token_id), ft.reward_scores(rm, bc))
    assert ft.ranked_chosen_first(rm, bc, bc).sum() == 0        # a tie is not a win
    with pytest.raises(ValueError, match="non-empty"):
        ft.train_reward_model(rm, tok, [], steps=1, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="non-empty"):
        ft.score_sequences(rm, [], tok.pad_token_id)
    with pytest.raises(TypeError, match="causal LM"):
        ft.new_reward_model(torch.nn.Linear(2, 2), seed=0)


def test_rollout_helpers_and_a_short_ppo_run(rows, tok):
    from shared.data import CATEGORIES

    lm = tiny_hf(tok)
    ex = ft.qa_examples(rows[:4])
    prompts = [tok(e["prompt"], add_special_tokens=False)["input_ids"] for e in ex]
    ro = ft.sample_responses(lm, prompts, 3, tok.eos_token_id, tok.pad_token_id, temperature=0)
    seqs = ft.rollout_sequences(prompts, ro)
    replies = ft.decode_replies(tok, ro)
    for p, s, r, resp, m in zip(prompts, seqs, replies, ro["response"], ro["response_mask"]):
        assert s[:len(p)] == p and len(s) == len(p) + int(m.sum())
        kept = resp[:int(m.sum())].tolist()
        assert r == tok.decode([t for t in kept if t != tok.eos_token_id]).strip()
    assert list(ft.wrong_type(["red", "Tom"], [{"task": "colour"}, {"task": "colour"}], CATEGORIES)) == [False, True]
    with pytest.raises(ValueError, match="replies for"):
        ft.wrong_type(["red"], [], CATEGORIES)
    with pytest.raises(ValueError, match="prompts for"):
        ft.rollout_sequences(prompts[:1], ro)
    rm, _ = ft.new_reward_model(lm, seed=0)
    g = ft.grade_greedy(lm, tok, prompts, ex, rm, CATEGORIES, max_new_tokens=3)
    assert g["replies"] == replies and g["true"].shape == (len(ex),) and g["scores"].shape == (len(ex),)
    assert g["wordy"].tolist() == [len(r.split()) > 1 for r in replies]
    ref = ft.to_chat_model(GPT(GPTConfig(vocab_size=len(tok) - 2, block_size=64, n_layer=2, n_head=2, n_kv_head=1,
                                         d_model=32)), tok)
    assert ref.get_input_embeddings().weight.shape[0] == len(tok)     # grown by the two role tokens
    hist, evals = ft.run_ppo(lm, lm, rm, tok, ex, ex[:2], CATEGORIES, beta=0.1, seed=0, steps=2, batch_size=2,
                             lr=1e-3, eval_every=2, max_new_tokens=3)
    assert len(hist) == 2 and sorted(evals) == [0, 2] and 0 <= hist[0]["true"] <= 1
    with pytest.raises(ValueError):
        ft.run_ppo(lm, lm, rm, tok, ex, ex, CATEGORIES, beta=0.1, seed=0, steps=0, batch_size=2, lr=1e-3,
                   eval_every=1)


def test_model_facing_helpers_move_inputs_to_the_model_device(rows, tok):
    # The GPU-ready check without a GPU: each model on `meta`, every helper run inside device_guard. A helper that
    # left a batch on the CPU would raise the guard's ValueError; reaching a value read (.item(), .numpy(), a
    # data-dependent op) on meta raises NotImplementedError/RuntimeError instead: the device plumbing held so far.
    from shared.data import CATEGORIES
    from shared.validate import device_guard

    ex = ft.qa_examples(rows[:2])
    prompts = [tok(e["prompt"], add_special_tokens=False)["input_ids"] for e in ex]
    lm = tiny_hf(tok).to("meta")
    rm, _ = ft.new_reward_model(tiny_hf(tok), seed=0)
    rm = rm.to("meta")
    bc, br = ft.pair_batches(tok, ft.preference_pairs(ex, CATEGORIES, seed=0))
    value_reads = (NotImplementedError, RuntimeError)
    calls = [
        lambda: ft.finetune(lm, tok, ex, steps=1, batch_size=2),
        lambda: ft.answer_loss(lm, tok, ex),
        lambda: ft.generate_answers(lm, tok, [e["prompt"] for e in ex]),
        lambda: ft.sequence_logprobs(lm, bc),
        lambda: ft.sample_responses(lm, prompts, 2, tok.eos_token_id, tok.pad_token_id, temperature=0),
        lambda: ft.sample_responses(lm, prompts, 2, tok.eos_token_id, tok.pad_token_id,
                                    generator=torch.Generator().manual_seed(0)),
        lambda: ft.reward_scores(rm, bc),
        lambda: ft.ranked_chosen_first(rm, bc, br),
        lambda: ft.score_sequences(rm, prompts, tok.pad_token_id),
        lambda: ft.train_reward_model(rm, tok, ft.preference_pairs(ex, CATEGORIES), steps=1, batch_size=2, seed=0),
    ]
    for call in calls:
        for model in (lm, rm):
            with device_guard(model):
                try:
                    call()
                except value_reads as err:
                    assert "device mismatch" not in str(err)
    policy = ft.PolicyWithValue(lm)
    assert policy.value_head.weight.device.type == "meta"             # the head follows the LM
    cpu_ro = ft.sample_responses(tiny_hf(tok), prompts, 2, tok.eos_token_id, tok.pad_token_id, temperature=0)
    with device_guard(policy):
        try:
            ft.response_logprobs(policy, cpu_ro)                      # a CPU rollout, a meta policy
        except value_reads as err:
            assert "device mismatch" not in str(err)
    vals = torch.zeros(2, 3, device="meta")
    adv, _ = ft.gae(vals, vals, torch.ones(2, 3, device="meta"))
    assert adv.device.type == "meta"
