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


def test_preference_pairs_are_labelled_by_the_true_function():
    cats = {"colour": ["red", "blue", "green"], "object": ["map", "hat"], "animal": ["cat", "dog"],
            "name": ["Tom", "Mia"]}
    rows = [{"name": "Tom", "animal": "cat", "colour": "red", "object": "map"},
            {"name": "Mia", "animal": "dog", "colour": "blue", "object": "hat"}] * 10
    ex = ft.qa_examples(rows)
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
