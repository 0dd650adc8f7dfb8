"""Fine-tuning on tasks whose answers are known exactly: story-fact questions, a chat template with role tokens,
completion-only SFT, a minimal LoRA linear, exact-match grading, and the preference losses (Bradley-Terry, DPO).

Every story of `shared.data.stories` carries its facts (name, animal, colour, object), so a question about a story
has one right answer and a model's reply can be graded by string equality. The fact sentence
"Tom the bear had a green map." holds all four facts; four question types ask for one each, so a model must read
the instruction to know which word to give back.

Shapes: B batch, T tokens, V vocabulary, C = d_in, O = d_out, r = LoRA rank.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from shared.model import model_device  # re-exported: one device rule for the repository
from shared.stats import wilson  # noqa: F401  (re-exported: the notebook calls ft.wilson)

__all__ = ["TASKS", "ROLE_TOKENS", "CHAT_TEMPLATE", "fact_sentence", "qa_examples", "add_chat_tokens", "collate",
           "completion_loss", "finetune", "generate_answers", "grade", "exact_match", "answer_loss", "evaluate_qa", "category_prior_answers", "prior_answer_loss",
           "LoRALinear", "trainable_parameters", "adamw_state_bytes", "wilson", "sequence_logprobs",
           "bradley_terry_loss", "dpo_loss", "true_preference", "preference_pairs", "frequency_ranker", "pair_batches",
           "masked_mean", "gae", "kl_estimate", "ppo_policy_loss", "ppo_value_loss", "PolicyWithValue",
           "sample_responses", "response_logprobs", "rlhf_rewards", "ppo_step", "model_device", "to_device",
           "to_chat_model", "new_reward_model", "reward_scores", "ranked_chosen_first", "train_reward_model",
           "truly_ranked", "rollout_sequences", "score_sequences", "decode_replies", "wrong_type", "grade_greedy",
           "run_ppo"]

# task -> (question template, answer field). Templates use the row's fields.
TASKS: dict[str, tuple[str, str]] = {
    "colour": ("What colour was the {object}?", "colour"),
    "object": ("What did {name} have?", "object"),
    "animal": ("What animal was {name}?", "animal"),
    "name": ("Who had the {object}?", "name"),
}
ROLE_TOKENS = ("<|user|>", "<|assistant|>")
# A chat template (Jinja, as transformers renders it): user turns in <|user|>, replies in <|assistant|> ... eos.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|> {{ m['content'] }}<|endoftext|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
FORMATS = ("chat", "plain")


def to_device(batch: dict, model) -> dict:
    """A copy of a dict of tensors (others kept as they are) moved to `model`'s device."""
    if not isinstance(batch, dict):
        raise TypeError(f"batch must be a dict of tensors, got {type(batch).__name__}")
    dev = model_device(model)
    return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}


def _check_examples(examples) -> None:
    if not isinstance(examples, (list, tuple)):
        raise TypeError(f"examples must be a list of dicts, got {type(examples).__name__}")
    if len(examples) == 0:
        raise ValueError("examples is empty")
    for key in ("prompt", "completion"):
        if key not in examples[0]:
            raise ValueError(f"each example needs the keys 'prompt' and 'completion', got {sorted(examples[0])}")


def fact_sentence(row: dict) -> str:
    """'Tom the bear had a green map.': the four facts of a story row in one sentence of story words."""
    return f"{row['name']} the {row['animal']} had a {row['colour']} {row['object']}."


def qa_examples(rows, tasks=None, fmt: str = "chat", eos: str = "<|endoftext|>") -> list[dict]:
    """One example per (row, task): dict(prompt, completion, answer, task).

    fmt="chat":  prompt "<|user|>{fact}\\n{question}<|assistant|>", completion " {answer}<|endoftext|>"
    (the same string `CHAT_TEMPLATE` renders); fmt="plain": prompt "{fact}\\nquestion: {question}\\nanswer:".
    """
    tasks = list(TASKS) if tasks is None else list(tasks)
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {list(TASKS)}, got {tasks}")
    out = []
    for row in rows:
        fact = fact_sentence(row)
        for task in tasks:
            template, field = TASKS[task]
            question, answer = template.format(**row), row[field]
            if fmt == "chat":
                prompt = f"{ROLE_TOKENS[0]}{fact}\n{question}{ROLE_TOKENS[1]}"
            else:
                prompt = f"{fact}\nquestion: {question}\nanswer:"
            out.append({"prompt": prompt, "completion": f" {answer}{eos}", "answer": answer, "task": task})
    return out


def add_chat_tokens(tokenizer) -> int:
    """Add the role tokens as special tokens and set `CHAT_TEMPLATE`; returns how many tokens were new.
    The model's embedding must then grow to `len(tokenizer)` (`resize_token_embeddings`)."""
    added = tokenizer.add_special_tokens({"additional_special_tokens": list(ROLE_TOKENS)})
    tokenizer.chat_template = CHAT_TEMPLATE
    return added


def collate(tokenizer, examples, loss_on: str = "completion") -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask (B, T) and labels (B, T), -100 where no loss is taken.

    loss_on="completion" keeps the loss on the answer tokens only; "all" on every real token (prompt too).
    """
    _check_examples(examples)
    if loss_on not in ("completion", "all"):
        raise ValueError(f"loss_on must be 'completion' or 'all', got {loss_on!r}")
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    prompts, completions = [enc(e["prompt"]) for e in examples], [enc(e["completion"]) for e in examples]
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    B = len(examples)
    ids = torch.full((B, T), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        seq = torch.tensor(p + c, dtype=torch.long)
        ids[i, :len(seq)], mask[i, :len(seq)] = seq, 1
        start = 0 if loss_on == "all" else len(p)
        labels[i, start:len(seq)] = seq[start:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def completion_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions: logits (B, T, V) predict labels shifted by one.

    Position t's logits score token t+1; positions whose label is -100 (prompt, padding) carry no loss."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"need logits (B, T, V) and labels (B, T), got {tuple(logits.shape)}, {tuple(labels.shape)}")
    pred, target = logits[:, :-1].float(), labels[:, 1:]
    keep = target != -100
    if not keep.any():
        raise ValueError("no labelled token in the batch")
    return F.cross_entropy(pred[keep], target[keep])


def finetune(model, tokenizer, examples, *, steps: int, batch_size: int = 16, lr: float = 1e-3,
             warmup: int = 10, seed: int = 0, loss_on: str = "completion", callback=None,
             callback_every: int = 0) -> tuple[list[float], torch.optim.Optimizer]:
    """AdamW (no weight decay) on the model's trainable parameters, batches drawn with a seeded generator,
    linear warm-up then cosine decay to 10 %. Returns (training loss per step, the optimiser, whose state is what
    fine-tuning holds in memory besides the model). Leaves the model in eval mode.
    `callback(step)` runs every `callback_every` steps (model in eval mode during the call)."""
    _check_examples(examples)
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"steps and batch_size must be >= 1 and lr > 0, got {steps}, {batch_size}, {lr}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = lambda s: min(1.0, (s + 1) / max(1, warmup)) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(examples), (batch_size,), generator=gen).tolist()
        batch = to_device(collate(tokenizer, [examples[i] for i in idx], loss_on), model)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = completion_loss(logits, batch["labels"])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if callback is not None and callback_every and len(losses) % callback_every == 0:
            model.eval()
            callback(len(losses))
            model.train()
    model.eval()
    return losses, opt


@torch.no_grad()
def generate_answers(model, tokenizer, prompts, max_new_tokens: int = 4, batch_size: int = 256) -> list[str]:
    """Greedy replies (decoded, special tokens kept) to a list of prompt strings; left padding for the batch."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        out = []
        for i in range(0, len(prompts), batch_size):
            enc = to_device(dict(tokenizer(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True,
                                           add_special_tokens=False)), model)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return out


def _reply(text: str, eos: str) -> tuple[str, bool]:
    """(the reply up to the end-of-text token, whether that token came)."""
    ended = eos in text
    return text.split(eos)[0].replace("<|pad|>", "").strip(), ended


def grade(model, tokenizer, examples, max_new_tokens: int = 4) -> dict[str, list]:
    """Greedy replies graded two ways, per example:
    exact: the reply is exactly the answer, then end-of-text (the model read the story's fact);
    type:  the reply is one word of the asked field's category, then end-of-text (it read the instruction:
           any colour for a colour question, right or wrong)."""
    from shared.data import CATEGORIES

    _check_examples(examples)
    texts = generate_answers(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens)
    replies = [_reply(t, tokenizer.eos_token) for t in texts]
    return {"replies": [r for r, _ in replies],
            "exact": [r == e["answer"] and ended for (r, ended), e in zip(replies, examples)],
            "type": [r in CATEGORIES[TASKS[e["task"]][1]] and ended for (r, ended), e in zip(replies, examples)]}


def exact_match(model, tokenizer, examples, max_new_tokens: int = 4) -> list[bool]:
    """True where the greedy reply is exactly the answer followed by end-of-text (nothing more, nothing less)."""
    return grade(model, tokenizer, examples, max_new_tokens)["exact"]


@torch.no_grad()
def answer_loss(model, tokenizer, examples) -> float:
    """Completion-only loss (nats per answer token, averaged over all answer tokens) of `examples` in one batch,
    teacher-forced; the model's train/eval mode is left as it is."""
    _check_examples(examples)
    b = to_device(collate(tokenizer, examples), model)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return completion_loss(logits, b["labels"]).item()


def evaluate_qa(model, tokenizer, examples, max_new_tokens: int = 4) -> dict:
    """Held-out grading of a question-answering model: the fraction of greedy replies of the right type and exactly
    right (`grade`), the answer loss (`answer_loss`), and the replies."""
    g = grade(model, tokenizer, examples, max_new_tokens)
    return {"type": sum(g["type"]) / len(examples), "exact": sum(g["exact"]) / len(examples),
            "loss": answer_loss(model, tokenizer, examples), "replies": g["replies"]}


def category_prior_answers(train_rows, examples) -> list[bool]:
    """The control that reads no story: always answer the asked field's most frequent training value.
    Returns exact-match per example; what a model scores by learning the format and the priors only."""
    from collections import Counter

    best = {task: Counter(r[field] for r in train_rows).most_common(1)[0][0] for task, (_, field) in TASKS.items()}
    return [best[e["task"]] == e["answer"] for e in examples]


def prior_answer_loss(train_rows, examples) -> float:
    """The loss (nats per completion token) of a model that knows the format and each field's training
    frequencies but reads no story: -log q(answer) on the answer token, 0 on end-of-text, averaged over both."""
    from collections import Counter

    freq = {task: Counter(r[field] for r in train_rows) for task, (_, field) in TASKS.items()}
    nll = [-math.log(freq[e["task"]][e["answer"]] / sum(freq[e["task"]].values())) for e in examples]
    return sum(nll) / len(nll) / 2


class LoRALinear(nn.Module):
    """y = x W^T + (alpha / r) * (x A^T) B^T with W (O, C) frozen, A (r, C), B (O, r) trained; B starts at zero.

    The update B A has rank <= r and r (C + O) parameters instead of C O. `merged_weight()` = W + (alpha/r) B A
    gives the same outputs with no extra matmul at inference."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if base.bias is not None:
            raise ValueError("base must have no bias (the shared GPT's linears have none)")
        self.base = base
        self.base.weight.requires_grad_(False)
        self.r, self.scale = r, alpha / r
        self.A = nn.Parameter(torch.randn(r, base.in_features) / math.sqrt(base.in_features))  # (r, C)
        self.B = nn.Parameter(torch.zeros(base.out_features, r))                                 # (O, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x (..., C) -> (..., O)
        return self.base(x) + self.scale * (x @ self.A.T) @ self.B.T

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scale * self.B @ self.A   # (O, C)


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adamw_state_bytes(optimizer) -> int:
    """Bytes held in the optimiser's state tensors (AdamW: exp_avg and exp_avg_sq per trained parameter, and a
    scalar step), read from `optimizer.state` after at least one step."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if torch.is_tensor(v))


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """Sum of log p(token) over each sequence's labelled tokens: (B,), on the model's device. The quantity DPO's
    ratios are built of."""
    batch = to_device(batch, model)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)          # (B, T-1, V)
    target = batch["labels"][:, 1:]
    keep = target != -100
    token_logp = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)   # (B, T-1)
    return (token_logp * keep).sum(-1)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected), averaged: the reward model's loss under the Bradley-Terry model
    P(chosen beats rejected) = sigmoid(r_chosen - r_rejected)."""
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"shapes differ: {tuple(r_chosen.shape)} vs {tuple(r_rejected.shape)}")
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """-log sigmoid(beta [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]), averaged over the batch.
    Inputs are sequence log-probabilities (B,); beta * log(pi / ref) is DPO's implicit reward."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


def true_preference(reply: str, answer: str) -> float:
    """The known preference function: 1 for exactly the answer, 0.5 for the answer followed by more words
    (correct but rambling), 0 otherwise (wrong)."""
    if not isinstance(reply, str) or not isinstance(answer, str):
        raise TypeError("reply and answer must be strings")
    words = reply.split()
    if words == [answer]:
        return 1.0
    if words[:1] == [answer]:
        return 0.5
    return 0.0


PAIR_KINDS = ("rambling", "wrong type", "wrong value")


def preference_pairs(examples, categories: dict, seed: int = 0, kinds=PAIR_KINDS,
                     eos: str = "<|endoftext|>", chosen_rambling: float = 0.0) -> list[dict]:
    """One preference pair per example, labelled by `true_preference`: chosen = the concise right answer
    (preference 1); rejected, of a seeded random kind among `kinds`:
      "rambling":    the right answer repeated three times (preference 0.5: right but wordy),
      "wrong type":  a word of another field's category (0: did not read the instruction),
      "wrong value": another word of the asked category (0: read the instruction, not the fact).
    `chosen_rambling` (a probability, allowed only without the "rambling" kind): the chosen side is instead the
    right answer repeated three times (0.5, still preferred to a wrong word), so the data set's chosen answers are
    longer than its rejected ones without any pair saying that wordiness loses: a reward model's length blind spot.
    Returns dicts prompt, chosen, rejected (completion strings ending in `eos`), kind, answer."""
    import random

    _check_examples(examples)
    kinds = tuple(kinds)
    if not kinds or any(k not in PAIR_KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {PAIR_KINDS}, got {kinds}")
    if isinstance(chosen_rambling, bool) or not isinstance(chosen_rambling, (int, float)) \
            or not 0 <= chosen_rambling <= 1:
        raise ValueError(f"chosen_rambling must be a probability in [0, 1], got {chosen_rambling!r}")
    if chosen_rambling > 0 and "rambling" in kinds:
        raise ValueError("chosen_rambling > 0 needs kinds without 'rambling' (a rambling chosen answer is not "
                         "preferred to a rambling rejected one)")
    fields = [field for _, field in TASKS.values()]
    missing = [f for f in fields if f not in categories]
    if missing:
        raise ValueError(f"categories lacks the fields {missing}")
    rng = random.Random(seed)
    out = []
    for e in examples:
        field = TASKS[e["task"]][1]
        kind = rng.choice(kinds)
        if kind == "rambling":
            bad = " ".join([e["answer"]] * 3)
        elif kind == "wrong type":
            bad = rng.choice(categories[rng.choice([f for f in fields if f != field])])
        else:
            bad = rng.choice([w for w in categories[field] if w != e["answer"]])
        good = " ".join([e["answer"]] * 3) if chosen_rambling and rng.random() < chosen_rambling else e["answer"]
        out.append({"prompt": e["prompt"], "chosen": f" {good}{eos}", "rejected": f" {bad}{eos}",
                    "kind": kind, "answer": e["answer"], "task": e["task"]})
    return out


def frequency_ranker(train_rows, pairs, eos: str = "<|endoftext|>") -> list[float]:
    """The control for a reward model that reads no story: rank a pair by how often each side's first word is the
    asked field's value in the training stories (a frequency prior, Zipf-like for these fields). Per pair: 1 if
    that puts the chosen side first, 0.5 on a tie (same first word, or equally frequent), 0 otherwise. On
    wrong-value pairs it scores above 0.5 whenever the right values are the frequent ones: the level a reward
    model must beat before it can be said to read the fact."""
    from collections import Counter

    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise ValueError("pairs must be a non-empty list of dicts with task, chosen, rejected")
    freq = {task: Counter(r[field] for r in train_rows) for task, (_, field) in TASKS.items()}
    first = lambda s: (s.replace(eos, "").split() or [""])[0]
    out = []
    for p in pairs:
        f = freq[p["task"]]
        c, r = f[first(p["chosen"])], f[first(p["rejected"])]
        out.append(1.0 if c > r else 0.5 if c == r else 0.0)
    return out


def pair_batches(tokenizer, pairs) -> tuple[dict, dict]:
    """(chosen batch, rejected batch) from `collate`: labels on the completion tokens only."""
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise ValueError("pairs must be a non-empty list of dicts with prompt, chosen, rejected")
    return tuple(collate(tokenizer, [{"prompt": p["prompt"], "completion": p[key]} for p in pairs])
                 for key in ("chosen", "rejected"))


# ----------------------------------------------------------------------------------------------------------------
# PPO, written out (trl >= 1.13 has no PPO trainer). Shapes: B rollouts, P prompt tokens (left-padded), K response
# tokens (right-padded after end-of-text). A response token t is an action; the state before it is the prompt plus
# the response tokens before t, read at sequence position P - 1 + t.

def _check_same_shape(**tensors) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes must match, got {shapes}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (x and mask of one shape)."""
    _check_same_shape(x=x, mask=mask)
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (B, K) response tokens whose mask is a prefix of ones.

    delta_t = r_t + gamma V_{t+1} - V_t (V after the last token = 0: the episode ends), A_t = sum_l (gamma lam)^l
    delta_{t+l}. lam = 1: the discounted return minus V_t (Monte Carlo); lam = 0: the one-step TD error.
    Returns (advantages, returns = advantages + values), zero where mask is 0."""
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    mask = mask.to(values.dtype)
    B, K = rewards.shape
    adv = torch.zeros_like(values)
    running = values.new_zeros(B)
    for t in reversed(range(K)):
        alive = mask[:, t + 1] if t + 1 < K else values.new_zeros(B)   # a next token exists
        next_value = values[:, t + 1] * alive if t + 1 < K else values.new_zeros(B)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * alive * running) * mask[:, t]
        adv[:, t] = running
    return adv, (adv + values) * mask


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from log-probabilities of tokens *sampled from pi*:
    k1 = log pi - log ref (unbiased, can be negative: the penalty RLHF puts in the reward), k3 = (ref/pi - 1) -
    log(ref/pi) (unbiased and >= 0, lower variance when the two are close)."""
    _check_same_shape(logp=logp, ref_logp=ref_logp)
    log_ratio = ref_logp - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"kind must be 'k1' or 'k3', got {kind!r}")


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate: -E[min(ratio A, clip(ratio, 1 - eps, 1 + eps) A)], ratio = pi / pi_old per token.
    Returns (loss, clip fraction = share of tokens where the clipped term is the one taken, so no gradient)."""
    _check_same_shape(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    ratio = torch.exp(logp - old_logp)
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)
    return masked_mean(torch.maximum(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> torch.Tensor:
    """0.5 E[max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)]: the value moves at most eps per batch."""
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


class PolicyWithValue(nn.Module):
    """A causal LM (a 🤗 `...ForCausalLM`) and a value head: a linear layer (C -> 1, zero at start) reading the
    LM's last hidden state, detached (the head is a probe of the policy's features; its loss does not move the
    policy). forward -> logits (B, T, V), values (B, T)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(lm.config.hidden_size, 1, device=model_device(lm))
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, position_ids=None):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=True)
        return out.logits, self.value_head(out.hidden_states[-1].detach()).squeeze(-1)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)   # left padding: the first real token is position 0


@torch.no_grad()
def sample_responses(lm, prompts, max_new_tokens: int, eos_id: int, pad_id: int, generator=None,
                     temperature: float = 1.0, use_cache: bool = True) -> dict[str, torch.Tensor]:
    """Sample replies from the full softmax (no top-k) to token-id prompts (a list of lists), left-padded;
    temperature=0: greedy (the argmax token). use_cache: after the prompt, feed only the new token and the
    model's key/value cache (the same distribution as recomputing the whole sequence, to float rounding; faster).

    Returns input_ids (B, P + K), attention_mask (B, P + K), response (B, K) and response_mask (B, K): 1 on the
    tokens up to and including the first end-of-text, pad after it; P = the longest prompt."""
    from shared.validate import check_int

    check_int("max_new_tokens", max_new_tokens, 1)
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(len(p) for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    from shared.model import draw

    P, dev = max(len(p) for p in prompts), model_device(lm)
    ids = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], device=dev)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=dev)
    alive = torch.ones(len(prompts), dtype=torch.bool, device=dev)
    past = None
    for _ in range(max_new_tokens):
        if use_cache:
            new = ids if past is None else ids[:, -1:]
            out = lm(input_ids=new, attention_mask=mask, position_ids=_positions(mask)[:, -new.shape[1]:],
                     cache=past, use_cache=True)
            past = out.cache
        else:
            out = lm(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False)
        logits = out.logits[:, -1].float()
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            nxt = draw(torch.softmax(logits / temperature, -1), generator)
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, alive.long()[:, None]], 1)
        alive &= nxt != eos_id
    return {"input_ids": ids, "attention_mask": mask, "response": ids[:, P:], "response_mask": mask[:, P:]}


def response_logprobs(model, rollout: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(response token) (B, K) under `model` (a `PolicyWithValue` or a plain causal LM), and the values
    V(state before each token) (B, K) for a `PolicyWithValue` (None for a plain LM)."""
    rollout = to_device(rollout, model)
    ids, mask, K = rollout["input_ids"], rollout["attention_mask"], rollout["response"].shape[1]
    pos = _positions(mask)
    if isinstance(model, PolicyWithValue):
        logits, values = model(ids, mask, pos)
        values = values[:, -K - 1:-1]
    else:
        logits, values = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits, None
    logp = torch.log_softmax(logits[:, -K - 1:-1].float(), -1)                   # (B, K, V)
    return logp.gather(-1, rollout["response"].unsqueeze(-1)).squeeze(-1), values


def rlhf_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                 beta: float) -> torch.Tensor:
    """Per-token rewards (B, K): -beta * (log pi - log ref) on every response token, plus the reward model's score
    (B,) on the last response token. beta = 0: the reward model alone."""
    _check_same_shape(logp=logp, ref_logp=ref_logp, mask=mask)
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    rewards = -beta * kl_estimate(logp, ref_logp) * mask
    last = (mask.sum(1) - 1).clamp(min=0).long()
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def ppo_step(policy: PolicyWithValue, ref, optimizer, rollout: dict, scores: torch.Tensor, *, beta: float,
             gamma: float = 1.0, lam: float = 0.95, clip: float = 0.2, epochs: int = 4,
             vf_coef: float = 0.5) -> dict[str, float]:
    """One PPO update on one batch of rollouts: old log-probs, values and the reference's log-probs under no
    grad; KL-penalised per-token rewards; GAE; whitened advantages; `epochs` passes of the clipped surrogate plus
    the clipped value loss over the whole batch. Returns the batch's statistics (mean score, KL (k1 summed over
    the response, averaged over rollouts), clip fraction and losses of the last epoch)."""
    from shared.validate import check_int

    check_int("epochs", epochs, 1)
    rollout, scores = to_device(rollout, policy), scores.to(model_device(policy))
    mask = rollout["response_mask"].float()
    with torch.no_grad():
        policy.eval()
        old_logp, old_values = response_logprobs(policy, rollout)
        ref_logp, _ = response_logprobs(ref, rollout)
        rewards = rlhf_rewards(scores, old_logp, ref_logp, mask, beta)
        adv, returns = gae(rewards, old_values, mask, gamma, lam)
        mean, std = masked_mean(adv, mask), masked_mean((adv - masked_mean(adv, mask)) ** 2, mask).sqrt()
        adv = (adv - mean) / (std + 1e-8) * mask
    policy.train()
    for _ in range(epochs):
        logp, values = response_logprobs(policy, rollout)
        pg_loss, clipfrac = ppo_policy_loss(logp, old_logp, adv, mask, clip)
        v_loss = ppo_value_loss(values, old_values, returns, mask, clip)
        (pg_loss + vf_coef * v_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    policy.eval()
    kl = (kl_estimate(old_logp, ref_logp) * mask).sum(1).mean()
    return {"score": scores.float().mean().item(), "kl": kl.item(), "clipfrac": clipfrac.item(),
            "pg_loss": pg_loss.item(), "v_loss": v_loss.item(), "length": mask.sum(1).mean().item()}


# ----------------------------------------------------------------------------------------------------------------
# The notebook's plumbing: the chat model, the reward model's training and scoring, grading rollouts, a PPO run.

def to_chat_model(model, tokenizer, seed: int = 0):
    """The shared GPT as a 🤗 `LlamaForCausalLM` (`shared.hf.to_hf`), its embedding grown to `len(tokenizer)` (the
    new rows, e.g. role tokens, drawn with `seed` around the mean embedding), on `model`'s device, in eval mode."""
    from shared import hf

    m = hf.to_hf(model, tokenizer)
    torch.manual_seed(seed)
    m.resize_token_embeddings(len(tokenizer))
    return m.to(model_device(model)).eval()


def new_reward_model(lm, seed: int):
    """A reward model: `LlamaForSequenceClassification` (one scalar output) carrying `lm`'s body weights, under a
    fresh head drawn with `seed` (the only weights not loaded), on `lm`'s device.
    Returns (reward model, the names of the weights not taken from `lm`)."""
    from transformers import LlamaForSequenceClassification

    if not hasattr(lm, "config") or not hasattr(lm, "state_dict"):
        raise TypeError(f"lm must be a 🤗 causal LM, got {type(lm).__name__}")
    torch.manual_seed(seed)
    m = LlamaForSequenceClassification(type(lm.config)(**{**lm.config.to_dict(), "num_labels": 1}))
    missing = m.load_state_dict({k: v for k, v in lm.state_dict().items() if k.startswith("model.")}, strict=False)
    return m.to(model_device(lm)), missing.missing_keys


def reward_scores(reward_model, batch: dict) -> torch.Tensor:
    """The reward model's scalar per sequence of a right-padded batch (its score at the last real token): (B,)."""
    batch = to_device(batch, reward_model)
    return reward_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)


@torch.no_grad()
def ranked_chosen_first(reward_model, chosen: dict, rejected: dict):
    """Per pair, whether the reward model scores the chosen side above the rejected one: a numpy bool array."""
    reward_model.eval()
    return (reward_scores(reward_model, chosen) > reward_scores(reward_model, rejected)).cpu().numpy()


def train_reward_model(reward_model, tokenizer, pairs, *, steps: int, batch_size: int, seed: int,
                       lr: float = 1e-3) -> list[float]:
    """Bradley-Terry training with AdamW (no weight decay) on `pairs` (`preference_pairs`), batches drawn with a
    seeded generator. Returns the loss per step; leaves the model in train mode."""
    from shared.validate import check_int

    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1)
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise ValueError("pairs must be a non-empty list of preference pairs")
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    opt = torch.optim.AdamW(reward_model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    reward_model.train()
    for _ in range(steps):
        idx = torch.randint(len(pairs), (batch_size,), generator=gen).tolist()
        bc, br = pair_batches(tokenizer, [pairs[i] for i in idx])
        loss = bradley_terry_loss(reward_scores(reward_model, bc), reward_scores(reward_model, br))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def truly_ranked(pair: dict, eos: str = "<|endoftext|>") -> bool:
    """The true preference function ranks the pair's chosen answer above its rejected one."""
    pref = lambda side: true_preference(pair[side].replace(eos, ""), pair["answer"])
    return pref("chosen") > pref("rejected")


def rollout_sequences(prompts, rollout: dict) -> list[list[int]]:
    """Prompt token ids + the reply's tokens up to its end-of-text, per rollout (python lists)."""
    if len(prompts) != rollout["response"].shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {rollout['response'].shape[0]} rollouts")
    resp, rmask = rollout["response"].cpu(), rollout["response_mask"].cpu()
    return [list(p) + r[:int(m.sum())].tolist() for p, r, m in zip(prompts, resp, rmask)]


@torch.no_grad()
def score_sequences(reward_model, seqs, pad_id: int) -> torch.Tensor:
    """The reward model's score of each token-id sequence (prompt + reply), right-padded into one batch: (B,) on
    the CPU."""
    if not isinstance(seqs, (list, tuple)) or not seqs or not all(len(s) for s in seqs):
        raise ValueError("seqs must be a non-empty list of non-empty token-id lists")
    T = max(map(len, seqs))
    ids = torch.tensor([list(s) + [pad_id] * (T - len(s)) for s in seqs])
    return reward_scores(reward_model, {"input_ids": ids, "attention_mask": (ids != pad_id).long()}).cpu()


def decode_replies(tokenizer, rollout: dict) -> list[str]:
    """Each rollout's reply as text: its tokens up to (not including) the end-of-text, stripped."""
    eos, out = tokenizer.eos_token_id, []
    for r, m in zip(rollout["response"].cpu(), rollout["response_mask"].cpu()):
        t = r[:int(m.sum())].tolist()
        out.append(tokenizer.decode(t[:-1] if t[-1:] == [eos] else t).strip())
    return out


def wrong_type(replies, examples, categories: dict):
    """Per reply, whether it is not one word of the asked field's category (numpy bool array)."""
    import numpy as np

    if len(replies) != len(examples):
        raise ValueError(f"{len(replies)} replies for {len(examples)} examples")
    return np.array([r not in categories[TASKS[e["task"]][1]] for r, e in zip(replies, examples)])


def grade_greedy(lm, tokenizer, prompts, examples, reward_model, categories: dict, max_new_tokens: int = 4) -> dict:
    """Greedy replies of `lm` to token-id `prompts` (the questions of `examples`), graded by a reward model
    (its scores and their mean, `reward`) and by the true preference (`true`, per question); `wrong_type` and
    `wordy` (more than one word) per reply; and the replies."""
    import numpy as np

    ro = sample_responses(lm, prompts, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, temperature=0)
    replies = decode_replies(tokenizer, ro)
    scores = score_sequences(reward_model, rollout_sequences(prompts, ro), tokenizer.pad_token_id).numpy()
    return {"reward": float(scores.mean()), "scores": scores, "replies": replies,
            "true": np.array([true_preference(r, e["answer"]) for r, e in zip(replies, examples)]),
            "wrong_type": wrong_type(replies, examples, categories),
            "wordy": np.array([len(r.split()) > 1 for r in replies])}


def run_ppo(sft_model, ref_model, reward_model, tokenizer, train_examples, eval_examples, categories: dict, *,
            beta: float, seed: int, steps: int, batch_size: int, lr: float, eval_every: int,
            max_new_tokens: int = 4, start_eval: dict | None = None) -> tuple[list[dict], dict]:
    """PPO (`ppo_step`: 4 epochs, clip 0.2, gamma 1, lambda 0.95) from a copy of `sft_model` with a value head, on
    `reward_model`'s score, with the KL penalty `beta` to `ref_model`. AdamW: lr for the LM, 10 lr for the value
    head (it starts at zero). Prompts and the sampling are seeded by `seed`. Every `eval_every` steps the greedy
    replies to `eval_examples` are graded (`grade_greedy`); step 0 is `start_eval` when given.
    Returns (per-step statistics with the sampled batch's mean true preference `true`, {step: grading})."""
    import copy

    import numpy as np
    from shared.validate import check_int

    for name, v in (("steps", steps), ("batch_size", batch_size), ("eval_every", eval_every)):
        check_int(name, v, 1)
    enc = lambda e: tokenizer(e["prompt"], add_special_tokens=False)["input_ids"]
    prompts, eval_prompts = [enc(e) for e in train_examples], [enc(e) for e in eval_examples]
    grade_ = lambda lm: grade_greedy(lm, tokenizer, eval_prompts, eval_examples, reward_model, categories,
                                     max_new_tokens)
    torch.manual_seed(seed)
    policy = PolicyWithValue(copy.deepcopy(sft_model))
    opt = torch.optim.AdamW([{"params": policy.lm.parameters(), "lr": lr},
                             {"params": policy.value_head.parameters(), "lr": 10 * lr}], weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    hist, evals = [], {0: start_eval if start_eval is not None else grade_(sft_model)}
    for step in range(1, steps + 1):
        idx = torch.randint(len(prompts), (batch_size,), generator=gen).tolist()
        batch_prompts = [prompts[i] for i in idx]
        ro = sample_responses(policy.lm, batch_prompts, max_new_tokens, tokenizer.eos_token_id,
                              tokenizer.pad_token_id, generator=gen)
        scores = score_sequences(reward_model, rollout_sequences(batch_prompts, ro), tokenizer.pad_token_id)
        stats = ppo_step(policy, ref_model, opt, ro, scores, beta=beta, gamma=1.0, lam=0.95, clip=0.2, epochs=4)
        stats["true"] = float(np.mean([true_preference(r, train_examples[i]["answer"])
                                       for r, i in zip(decode_replies(tokenizer, ro), idx)]))
        hist.append(stats)
        if step % eval_every == 0:
            evals[step] = grade_(policy.lm)
    return hist, evals
