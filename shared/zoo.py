"""The model zoo: `load(name)` returns a trained (model, tokenizer).

Two kinds of entry, one layout (`model.safetensors` fp32, `config.json`, `tokenizer/`, `meta.json` with the recipe,
its hash, the weights' sha256, the training log and the measured metrics):
- **Shipped** (`SHIPPED`: the base model, seeds 0 and 1): committed under `zoo/NAME/seed-S/` in the repository and
  only ever loaded, never trained at run time. Loading checks the sha256 (a corrupted or truncated file is refused
  with a clear error, never silently retrained) and the recipe hash (a recipe edited in this file no longer matches
  its shipped weights: the error gives the rebuild command). `python -m shared.zoo build NAME --seed S` retrains one
  from scratch (progress bar) and rewrites its folder; `python -m shared.zoo report` prints the measured targets.
- **Cached** (every other recipe, e.g. a notebook's own model or a test's): trained on first use into
  `$LLMP_CACHE` (default `~/.cache/llm-projects`), one folder per name and recipe hash. A changed recipe gets a new
  hash and so retrains. Writes are atomic (build in a temporary folder, then rename) and serialised by a file lock,
  so two processes asking at once train once and never see a half written entry; a cached entry whose weights do
  not match their sha256 is rebuilt.
A build runs inside a saved and restored RNG state: a notebook's next unseeded draw is the same whether the zoo
trained something or loaded it.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path

import torch

from .train import train as train_loop

TRAIN_THREADS = 2  # torch threads used to train a cached entry (see _build); a shipped build records its own
ZOO_VERSION = 2   # bump when the training code changes in a way that should invalidate every checkpoint
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "zoo"   # the repository's committed weights

RECIPES: dict[str, dict] = {
    # The base model every notebook can use: ~0.5M parameters, Llama-shaped (2 layers, 8 heads of 16), and it
    # recalls the planted object at every distance the stories generate. What made recall learnable, where a
    # longer training of the first base never left the most-frequent-object guess: a distance curriculum (the first
    # `curriculum.steps` steps on stories that recall after 1-2 fillers, in 128-token windows, where the recall
    # circuit forms in a jump), more and smaller heads, and a high constant learning rate before a cosine cool-down
    # (warm-up/stable/decay). Shipped for seeds 0 and 1 (`python -m shared.zoo report` prints what they measure).
    "stories-base": {
        "data": {"corpus": "stories", "n_train": 20000, "n_val": 1000, "seed": 0,
                 "curriculum": {"steps": 1000, "seed": 1, "min_recall": 1, "max_recall": 2, "seq_len": 128,
                                "batch_size": 32}},
        "tokenizer": {"vocab_size": 1024},   # an upper bound: the stories run out of merges at 781 tokens
        "model": {"block_size": 256, "n_layer": 2, "n_head": 8, "n_kv_head": 8, "d_model": 128},
        "train": {"steps": 3000, "batch_size": 16, "lr": 5e-3, "warmup": 50, "decay_start": 2000,
                  "min_lr_ratio": 0.1, "seed": 0},
    },
}
SHIPPED: dict[str, tuple[int, ...]] = {"stories-base": (0, 1)}   # name -> seeds committed under SHIPPED_DIR
# The zoo's first base (1.3M parameters, 4 layers, 450 steps, no curriculum): it never recalled the planted object
# (0.146 against the most-frequent-object control 0.160). Every notebook has moved to the recall-capable base and its
# recipe is gone; its shape stays as the yardstick of the cost target (forward FLOPs per generated token).
V1_BASE_MODEL = {"block_size": 256, "n_layer": 4, "n_head": 4, "n_kv_head": 2, "d_model": 160}


def cache_dir() -> Path:
    return Path(os.environ.get("LLMP_CACHE") or Path.home() / ".cache" / "llm-projects")


RECIPE_KEYS = {
    # recall range and curriculum: stories only. curriculum = {"steps", "seed", "min_recall", "max_recall",
    # "seq_len", "batch_size"}: the first `steps` training steps draw batch_size windows of seq_len tokens from a
    # stories corpus of that recall range (same n_train, its own seed); later steps, the recipe's own.
    "data": {"corpus", "n_train", "n_val", "n_test", "seed", "min_recall", "max_recall", "curriculum"},
    "tokenizer": {"vocab_size"},
    "train": set(inspect.signature(train_loop).parameters) - {"model", "train_tokens", "val_tokens", "progress",
                                                               "lr_schedule", "on_step"},
}
CURRICULUM_KEYS = {"steps", "seed", "min_recall", "max_recall", "seq_len", "batch_size"}


def _check_recipe(name: str, recipe: dict) -> None:
    """Every section present, and no key that training would silently ignore (or crash on much later)."""
    from .model import GPTConfig

    missing = {"data", "tokenizer", "model", "train"} - set(recipe)
    unknown_sections = set(recipe) - {"data", "tokenizer", "model", "train"}
    if missing or unknown_sections:
        raise ValueError(f"recipe for {name!r} needs exactly the sections data, tokenizer, model, train; "
                         f"missing {sorted(missing)}, unknown {sorted(unknown_sections)}")
    allowed = dict(RECIPE_KEYS, model={f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size"})
    for section, keys in allowed.items():
        unknown = set(recipe[section]) - keys
        if unknown:
            raise ValueError(f"recipe for {name!r}: unknown {section} keys {sorted(unknown)}; allowed {sorted(keys)}")
    cur = recipe["data"].get("curriculum")
    if cur is not None:
        if recipe["data"].get("corpus") != "stories" or not isinstance(cur, dict) or set(cur) != CURRICULUM_KEYS:
            raise ValueError(f"recipe for {name!r}: a curriculum needs the stories corpus and exactly the keys "
                             f"{sorted(CURRICULUM_KEYS)}, got {cur!r}")
        if not 0 < cur["steps"] < recipe["train"].get("steps", 0):
            raise ValueError(f"recipe for {name!r}: curriculum steps must be in (0, train steps), got {cur['steps']}")


def register(name: str, recipe: dict) -> None:
    """Add (or replace) a recipe, e.g. a project's own small model or a tiny one in tests."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name must be a non-empty string without '/', got {name!r}")
    _check_recipe(name, recipe)
    RECIPES[name] = copy.deepcopy(recipe)


for _name, _r in RECIPES.items():
    _check_recipe(_name, _r)


def recipe_hash(recipe: dict) -> str:
    blob = json.dumps({"zoo_version": ZOO_VERSION, "recipe": recipe}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def seed_override() -> int | None:
    """`LLMP_ZOO_SEED`: train every zoo entry with this seed instead of its recipe's (init and batch order).

    It proves that a notebook's compared outputs and lessons hold for any honestly trained checkpoint, not just
    the bits of one: `LLMP_ZOO_SEED=1 pytest --nbval`. The seed is part of the recipe, hence of its hash and
    cache folder, so both checkpoints live side by side.
    """
    value = os.environ.get("LLMP_ZOO_SEED", "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(f"LLMP_ZOO_SEED must be a non-negative integer, got {value!r}")
    return int(value)


def _recipe(name: str) -> dict:
    if name not in RECIPES:
        raise KeyError(f"unknown zoo model {name!r}; known: {sorted(RECIPES)}")
    recipe = RECIPES[name]
    seed = seed_override()
    if seed is not None:
        recipe = copy.deepcopy(recipe)
        recipe["train"]["seed"] = seed
    return recipe


def shipped_dir(name: str, seed: int) -> Path:
    """Where the repository keeps the committed weights of `name` trained with `seed`."""
    return SHIPPED_DIR / name / f"seed-{seed}"


def _is_shipped(name: str, recipe: dict) -> bool:
    return recipe["train"].get("seed", 0) in SHIPPED.get(name, ())


def entry_dir(name: str) -> Path:
    """The folder `load(name)` reads: the shipped one for a shipped name and seed, else the cache's."""
    recipe = _recipe(name)
    if _is_shipped(name, recipe):
        return shipped_dir(name, recipe["train"].get("seed", 0))
    return cache_dir() / f"{name}-{recipe_hash(recipe)}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_valid(entry: Path) -> bool:
    try:
        meta = json.loads((entry / "meta.json").read_text())
        json.loads((entry / "config.json").read_text())
        return (entry / "tokenizer" / "tokenizer.json").is_file() and \
            _sha256(entry / "model.safetensors") == meta["sha256"]
    except (OSError, ValueError, KeyError):
        return False


def _rebuild_command(name: str, seed: int) -> str:
    return f"python -m shared.zoo build {name} --seed {seed}"


def verify_shipped(name: str, seed: int) -> Path:
    """The shipped folder of (name, seed) after checking it; raises RuntimeError (never retrains) if a file is
    missing, the weights' sha256 differs from meta.json (corrupted, truncated, a git-lfs pointer...), or the recipe
    in this file no longer hashes to the one the weights were trained from."""
    entry = shipped_dir(name, seed)
    recipe = copy.deepcopy(RECIPES[name])
    recipe["train"]["seed"] = seed
    fix = f"restore it (`git checkout -- {entry.relative_to(SHIPPED_DIR.parent)}`) or rebuild it: " \
          f"`{_rebuild_command(name, seed)}`"
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise RuntimeError(f"shipped zoo entry {name!r} seed {seed}: cannot read {entry / 'meta.json'} ({e}); "
                           f"{fix}") from None
    for f in ("model.safetensors", "config.json", "tokenizer/tokenizer.json"):
        if not (entry / f).is_file():
            raise RuntimeError(f"shipped zoo entry {name!r} seed {seed}: {f} is missing; {fix}")
    if _sha256(entry / "model.safetensors") != meta.get("sha256"):
        raise RuntimeError(f"shipped zoo entry {name!r} seed {seed}: model.safetensors does not match the sha256 "
                           f"in meta.json (corrupted or truncated); {fix}")
    if meta.get("hash") != recipe_hash(recipe):
        raise RuntimeError(f"shipped zoo entry {name!r} seed {seed} was trained from recipe {meta.get('hash')}, "
                           f"but shared/zoo.py's recipe now hashes to {recipe_hash(recipe)}: the recipe changed. "
                           f"Rebuild the weights: `{_rebuild_command(name, seed)}` (and commit them once)")
    return entry


def corpus(recipe_or_name):
    """The corpus a recipe trains on (a `DatasetDict`), e.g. `corpus('stories-base')['validation']`."""
    from . import data

    recipe = _recipe(recipe_or_name) if isinstance(recipe_or_name, str) else recipe_or_name
    spec = dict(recipe["data"])
    kind = spec.pop("corpus")
    if kind == "stories":
        recall = {k: spec[k] for k in ("min_recall", "max_recall") if k in spec}   # default: the generator's 1..8
        return data.stories(n_train=spec["n_train"], n_val=spec["n_val"], n_test=spec.get("n_test", 0),
                            seed=spec["seed"], **recall)
    if kind == "python_docs":
        return data.python_docs(seed=spec.get("seed", 0))
    raise ValueError(f"unknown corpus {kind!r}")


def _batches(recipe: dict, tok, train_ids: torch.Tensor):
    """The training batches: random windows of the corpus, or with a curriculum, of the curriculum's corpus for
    its first `steps` calls and of the main corpus after. Returns a stream (no curriculum) or a callable
    generator -> (x, y) for `train`."""
    from . import data

    cur = recipe["data"].get("curriculum")
    if cur is None:
        return train_ids
    first = data.encode_corpus(tok, data.stories(
        n_train=recipe["data"]["n_train"], n_val=0, n_test=0, seed=cur["seed"],
        min_recall=cur["min_recall"], max_recall=cur["max_recall"])["train"]["text"])
    seq_len, batch_size = recipe["model"]["block_size"], recipe["train"].get("batch_size", 32)
    calls = [0]

    def next_batch(gen):
        calls[0] += 1
        if calls[0] <= cur["steps"]:
            return data.random_windows(first, cur["seq_len"], cur["batch_size"], gen)
        return data.random_windows(train_ids, seq_len, batch_size, gen)
    return next_batch


class _SavedRNG:
    """Save Python's, NumPy's and torch's global RNG states (CPU, and every CUDA device when CUDA is in use) on
    entry and restore them on exit."""

    def __enter__(self):
        import random

        import numpy as np
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.states = random.getstate(), np.random.get_state(), torch.random.get_rng_state(), cuda

    def __exit__(self, *exc):
        import random

        import numpy as np
        random.setstate(self.states[0])
        np.random.set_state(self.states[1])
        torch.random.set_rng_state(self.states[2])
        if self.states[3] is not None:
            torch.cuda.set_rng_state_all(self.states[3])


def _prepare(recipe: dict):
    """Corpus, tokenizer, token streams, model config and the batch source of a recipe (no model yet)."""
    from . import data
    from .model import GPTConfig
    from .tokenizer import train_tokenizer

    ds = corpus(recipe)
    tok = train_tokenizer(ds["train"]["text"], recipe["tokenizer"]["vocab_size"])
    train_ids = data.encode_corpus(tok, ds["train"]["text"])
    val_ids = data.encode_corpus(tok, ds["validation"]["text"])
    cfg = GPTConfig(vocab_size=len(tok), **recipe["model"])
    return ds, tok, train_ids, val_ids, cfg, _batches(recipe, tok, train_ids)


def _new_model(cfg, seed: int):
    from . import seed_everything
    from .model import GPT

    seed_everything(seed)
    return GPT(cfg)


def _build(name: str, recipe: dict, out: Path, threads: int = TRAIN_THREADS, progress: bool = False,
           probe_every: int = 0) -> None:
    """Train the recipe from scratch and write the entry into `out` (inside a saved/restored RNG state).

    `probe_every` > 0 (stories only): score held-out recall every that many steps into the training log.
    """
    from . import data
    from .train import train

    with _SavedRNG():
        ds, tok, train_ids, val_ids, cfg, batches = _prepare(recipe)
        probes, on_step = [], None
        if probe_every and recipe["data"]["corpus"] == "stories":
            items = data.recall_items(tok, ds["validation"])
            bins = [(d, d + 1) for d in range(min(it.sentences for it in items), max(it.sentences for it in items) + 1, 2)]

            def on_step(step, model, loss):
                if (step + 1) % probe_every == 0:   # object recall per two filler sentences: [hits, n]
                    hits = data.recall_hits(model, items, tok.pad_token_id)
                    probes.append({"step": step + 1, "recall": {
                        f"{lo}-{hi}": [int(sum(h for h, it in zip(hits.tolist(), items) if lo <= it.sentences <= hi)),
                                       sum(1 for it in items if lo <= it.sentences <= hi)] for lo, hi in bins}})
        t = dict(recipe["train"])
        model = _new_model(cfg, t.get("seed", 0))
        # The thread count changes how float sums are split, hence the trained bits: pin it (CI has 2 cores), so a
        # notebook that set 1 thread before triggering training still gets the same checkpoint.
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        started = time.time()
        try:
            hist = train(model, batches, val_ids, progress=progress, on_step=on_step, **t)
        finally:
            torch.set_num_threads(previous)
        log = {"loss_every_step": [round(x, 4) for x in hist.train_loss], "recall_probes": probes,
               "val_step": hist.val_step, "val_loss": [round(x, 4) for x in hist.val_loss]}
        write_entry(out, name, recipe, model, tok, log, threads=threads, wall_seconds=time.time() - started,
                    assess_model=_is_shipped(name, recipe), ds=ds, val_ids=val_ids)


def replay(name: str, steps: int = 50, seed: int | None = None, threads: int = TRAIN_THREADS) -> list[float]:
    """The per-step training losses of the first `steps` steps of `name`'s recipe, retrained from scratch with the
    recipe's full learning-rate schedule: compare them with a shipped entry's `training_log` to catch recipe or
    code drift without a full rebuild (bits differ across CPUs and thread counts, so compare within a tolerance)."""
    from .train import lr_at, train
    from .validate import check_int

    check_int("steps", steps, 1)
    recipe = copy.deepcopy(_recipe(name))
    if seed is not None:
        recipe["train"]["seed"] = seed
    t = dict(recipe["train"])
    total = t.pop("steps")
    warmup = t.get("warmup", max(1, total // 20))
    with _SavedRNG():
        _, _, _, _, cfg, batches = _prepare(recipe)
        model = _new_model(cfg, t.get("seed", 0))
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            hist = train(model, batches, steps=min(steps, total), progress=False,
                         lr_schedule=lambda s: lr_at(s, total, t.get("lr", 3e-3), warmup, t.get("min_lr_ratio", 0.1),
                                                     t.get("decay_start")), **t)
        finally:
            torch.set_num_threads(previous)
    return hist.train_loss


def write_entry(out: Path, name: str, recipe: dict, model, tok, log: dict, threads: int, wall_seconds: float,
                assess_model: bool = False, notes: str | None = None, ds=None, val_ids=None) -> dict:
    """Write a trained model as a zoo entry (weights, config, tokenizer, meta.json with the log and the metrics).

    `ds` and `val_ids` (the recipe's corpus and its encoded validation split) are rebuilt when not given."""
    import platform

    from safetensors.torch import save_file

    from . import data
    from .model import state_dict_untied
    from .train import evaluate_stream

    cfg = model.cfg
    ds = corpus(recipe) if ds is None else ds
    val_ids = data.encode_corpus(tok, ds["validation"]["text"]) if val_ids is None else val_ids
    val_loss = evaluate_stream(model, val_ids, cfg.block_size)
    meta = {"name": name, "recipe": recipe, "hash": recipe_hash(recipe), "params": model.num_params(),
            "val_loss": val_loss, "val_tokens": len(val_ids), "torch": torch.__version__,
            "machine": {"cpu": _cpu_name(), "platform": platform.platform(), "threads": threads},
            "train_wall_seconds": round(wall_seconds, 1), "training_log": log}
    if notes:
        meta["notes"] = notes
    if recipe["data"]["corpus"] == "stories":
        n_chars = sum(ds["validation"]["n_chars"])
        recall = {k: recipe["data"][k] for k in ("min_recall", "max_recall") if k in recipe["data"]}
        floor, floor_se = data.entropy_rate(**recall)
        meta.update(val_bits_per_char=data.bits_per_char(val_loss, len(val_ids) - 1, n_chars),
                    entropy_bits_per_char=floor, entropy_bits_per_char_se=floor_se,
                    val_floor_bits_per_char=-sum(ds["validation"]["logprob"]) / math.log(2) / n_chars)
    if assess_model:
        meta["targets"] = assess(model, tok, recipe)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state_dict_untied(model), out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    tok.save_pretrained(out / "tokenizer")
    meta["sha256"] = _sha256(out / "model.safetensors")
    (out / "meta.json").write_text(json.dumps(meta, indent=1))   # written last: its presence marks completeness
    return meta


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


# ----------------------------------------------------------------------------------------------------------
# The base model's targets, measured on held-out stories (`report` prints them; a test checks them).
RECALL_LOWER_BOUND = 0.9     # Wilson lower bound of object recall, in every recall distance (filler sentences)
MAX_EXCESS_OVER_FLOOR = 0.05  # validation bits/char at most 5 % above the exact code length of those stories
MAX_COST_RATIO = 2.0         # forward FLOPs per generated token at most 2x the first base's
MAX_ABLATED_HEADS = 4        # ablating at most this many attention heads drops recall to the control


def ablate_heads(model, heads):
    """Context manager: the output of attention heads `heads` [(layer, head), ...] zeroed (the head's slice of the
    input of its layer's output projection), so a forward pass runs the model without them."""
    import contextlib

    def valid(item):
        return (isinstance(item, (tuple, list)) and len(item) == 2
                and 0 <= int(item[0]) < model.cfg.n_layer and 0 <= int(item[1]) < model.cfg.n_head)

    heads = list(heads)
    bad = [item for item in heads if not valid(item)]
    if bad:
        raise ValueError(f"heads must be (layer, head) pairs with 0 <= layer < {model.cfg.n_layer} and "
                         f"0 <= head < {model.cfg.n_head}, got {bad[0]!r}")
    heads = [(int(l), int(h)) for l, h in heads]

    @contextlib.contextmanager
    def ctx():
        D = model.cfg.head_dim
        handles = []
        for layer in {l for l, _ in heads}:
            cut = [h for l, h in heads if l == layer]

            def zero(module, args, cut=cut):
                (y,) = args
                y = y.clone()
                for h in cut:
                    y[..., h * D:(h + 1) * D] = 0
                return (y,)
            handles.append(model.blocks[layer].attn.o_proj.register_forward_pre_hook(zero))
        try:
            yield model
        finally:
            for h in handles:
                h.remove()
    return ctx()


def forward_flops_per_token(model_cfg: dict, vocab_size: int, context: int) -> int:
    """Matmul FLOPs of one forward token at `context` keys: 2 x (weights touched) + 4 x layers x context x d_model
    (scores and the weighted sum). Embedding lookups cost none; the tied LM head costs 2 x d_model x vocab."""
    from .model import GPTConfig, GPT

    cfg = GPTConfig(vocab_size=vocab_size, **model_cfg)
    with torch.device("meta"):
        n_matmul = GPT(cfg).num_params(non_embedding=True) - (2 * cfg.n_layer + 1) * cfg.d_model  # minus norms
    return 2 * (n_matmul + cfg.d_model * vocab_size) + 4 * cfg.n_layer * context * cfg.d_model


@torch.no_grad()
def assess(model, tok, recipe: dict, n_stories: int = 2000) -> dict:
    """The base model's four targets on `n_stories` fresh held-out stories (the corpus's test split):
    recall of the planted object per recall distance (Wilson interval, most-frequent-object control of the same
    items), bits/char over the exact floor, the fewest heads whose ablation drops recall to the control, and the
    forward FLOPs per token against the first base's."""
    from . import data
    from .stats import wilson
    from .train import evaluate_stream

    spec = recipe["data"]
    recall = {k: spec[k] for k in ("min_recall", "max_recall") if k in spec}
    test = data.stories(n_train=0, n_val=0, n_test=n_stories, seed=spec["seed"], **recall)["test"]
    items = data.recall_items(tok, test)
    hits = data.recall_hits(model, items, tok.pad_token_id)
    by_distance = {}
    for d in sorted({it.sentences for it in items}):
        idx = [i for i, it in enumerate(items) if it.sentences == d]
        k = int(hits[idx].sum())
        targets = [items[i].target for i in idx]
        mode = max(targets.count(t) for t in set(targets))
        lo, hi = wilson(k, len(idx))
        by_distance[str(d)] = {"hits": k, "n": len(idx), "wilson_lo": round(lo, 4), "wilson_hi": round(hi, 4),
                               "control": round(mode / len(idx), 4)}
    targets = [it.target for it in items]
    control = max(targets.count(t) for t in set(targets)) / len(items)
    # Ablation: single heads ranked by the recall they carry, then the top ones together until recall is at the
    # control (on the first 500 items, to keep a build's assessment under a minute).
    sub = items[:500]
    base_acc = data.recall_hits(model, sub, tok.pad_token_id).float().mean().item()
    heads = [(l, h) for l in range(model.cfg.n_layer) for h in range(model.cfg.n_head)]
    single = {}
    for lh in heads:
        with ablate_heads(model, [lh]):
            single[lh] = data.recall_hits(model, sub, tok.pad_token_id).float().mean().item()
    ranked = sorted(heads, key=lambda lh: single[lh])
    cumulative = []
    for k in range(1, len(ranked) + 1):
        with ablate_heads(model, ranked[:k]):
            acc = data.recall_hits(model, sub, tok.pad_token_id).float().mean().item()
        cumulative.append({"heads": [list(x) for x in ranked[:k]], "recall": round(acc, 4)})
        if acc <= control or k == 2 * MAX_ABLATED_HEADS:
            break
    test_ids = data.encode_corpus(tok, test["text"])
    n_chars = sum(test["n_chars"])
    bpc = data.bits_per_char(evaluate_stream(model, test_ids, model.cfg.block_size), len(test_ids) - 1, n_chars)
    floor = -sum(test["logprob"]) / math.log(2) / n_chars
    context = model.cfg.block_size // 2
    flops = forward_flops_per_token(recipe["model"], model.cfg.vocab_size, context)
    flops_v1 = forward_flops_per_token(V1_BASE_MODEL, model.cfg.vocab_size, context)
    needed = next((c for c in cumulative if c["recall"] <= control), None)
    return {
        "held_out_stories": n_stories,
        "recall_by_distance": by_distance,
        "recall_min_wilson_lo": min(v["wilson_lo"] for v in by_distance.values()),
        "recall_control": round(control, 4),
        "bits_per_char": round(bpc, 5), "floor_bits_per_char": round(floor, 5),
        "excess_over_floor": round(bpc / floor - 1, 5),
        "ablation": {"items": len(sub), "recall": round(base_acc, 4),
                     "single_head": {f"L{l}H{h}": round(single[(l, h)], 4) for l, h in heads},
                     "cumulative": cumulative,
                     "heads_to_control": None if needed is None else len(needed["heads"])},
        "flops_per_token": flops, "flops_per_token_v1_base": flops_v1, "cost_ratio": round(flops / flops_v1, 3),
        "context_for_flops": context,
    }


def targets_met(t: dict) -> dict:
    """Which of the four targets an `assess` result meets."""
    n = t["ablation"]["heads_to_control"]
    return {"recall": t["recall_min_wilson_lo"] >= RECALL_LOWER_BOUND,
            "floor": t["excess_over_floor"] <= MAX_EXCESS_OVER_FLOOR,
            "heads": n is not None and n <= MAX_ABLATED_HEADS,
            "cost": t["cost_ratio"] <= MAX_COST_RATIO}


def ensure(name: str) -> Path:
    """The folder of a valid entry for `name`: the verified shipped one, or a cached one (trained first if
    needed, under a lock)."""
    from filelock import FileLock

    recipe = _recipe(name)
    if _is_shipped(name, recipe):
        return verify_shipped(name, recipe["train"].get("seed", 0))
    entry = entry_dir(name)
    if _is_valid(entry):
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry.parent / f"{entry.name}.lock")):
        if _is_valid(entry):          # another process finished it while we waited
            return entry
        tmp = entry.parent / f".tmp-{entry.name}-{uuid.uuid4().hex[:8]}"
        try:
            _build(name, recipe, tmp)
            if entry.exists():        # a broken entry: replace it
                shutil.rmtree(entry)
            os.replace(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry


def build(name: str, seed: int | None = None, threads: int = TRAIN_THREADS, progress: bool = True) -> Path:
    """Retrain `name` from scratch (with `seed`, default the recipe's) and write its folder: the shipped folder
    for a shipped name and seed (replacing what is there), else the cache entry. Returns the folder."""
    recipe = copy.deepcopy(_recipe(name))
    if seed is not None:
        recipe["train"]["seed"] = seed
    seed = recipe["train"].get("seed", 0)
    out = shipped_dir(name, seed) if _is_shipped(name, recipe) else cache_dir() / f"{name}-{recipe_hash(recipe)}"
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        _build(name, recipe, tmp, threads=threads, progress=progress,
               probe_every=250 if _is_shipped(name, recipe) else 0)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load(name: str = "stories-base", device: str | torch.device | None = None):
    """(model in eval mode, tokenizer) for a zoo entry: a shipped entry loads in a second; any other trains and
    caches on first use. The model goes to `device`, by default `shared.device()` (the CPU at the cpu size)."""
    from safetensors.torch import load_file

    from .model import GPT, GPTConfig, load_weights
    from .tokenizer import load_tokenizer

    entry = ensure(name)
    cfg = GPTConfig.from_dict(json.loads((entry / "config.json").read_text()))
    model = GPT(cfg)
    try:
        load_weights(model, load_file(entry / "model.safetensors"))
    except RuntimeError as e:
        raise RuntimeError(f"checkpoint {entry}: {e}") from None
    from . import device as default_device

    return model.to(default_device() if device is None else device).eval(), load_tokenizer(entry / "tokenizer")


def meta(name: str = "stories-base") -> dict:
    """The entry's metadata: recipe, parameter count, training log, validation loss and bits/char vs floor (and,
    for a shipped entry, the measured targets)."""
    return json.loads((ensure(name) / "meta.json").read_text())


def report(name: str = "stories-base") -> str:
    """A table of the shipped seeds' measured targets (read from their meta.json)."""
    lines = [f"{name}: targets on held-out stories (recall Wilson lower bound >= {RECALL_LOWER_BOUND} at every "
             f"distance; bits/char <= {MAX_EXCESS_OVER_FLOOR:.0%} over the exact floor; <= {MAX_ABLATED_HEADS} "
             f"ablated heads drop recall to the control; <= {MAX_COST_RATIO}x the first base's FLOPs/token)"]
    for seed in SHIPPED.get(name, ()):
        m = json.loads((verify_shipped(name, seed) / "meta.json").read_text())
        t, ok = m["targets"], targets_met(m["targets"])
        per_d = " ".join(f"{d}:{v['hits']}/{v['n']}" for d, v in t["recall_by_distance"].items())
        lines += [f"seed {seed}: {m['params']:,} parameters, trained {m['train_wall_seconds']:.0f} s on "
                  f"{m['machine']['cpu']} ({m['machine']['threads']} thread(s))",
                  f"  recall by filler sentences {per_d}; min Wilson lower bound {t['recall_min_wilson_lo']:.3f} "
                  f"(control {t['recall_control']:.3f}) -> {'met' if ok['recall'] else 'NOT met'}",
                  f"  bits/char {t['bits_per_char']:.4f} vs floor {t['floor_bits_per_char']:.4f}: "
                  f"{t['excess_over_floor']:+.1%} -> {'met' if ok['floor'] else 'NOT met'}",
                  f"  heads ablated to reach the control: {t['ablation']['heads_to_control']} "
                  f"({', '.join('L%dH%d' % tuple(h) for h in t['ablation']['cumulative'][-1]['heads'])}) -> "
                  f"{'met' if ok['heads'] else 'NOT met'}",
                  f"  FLOPs/token at context {t['context_for_flops']}: {t['cost_ratio']:.2f}x the first base -> "
                  f"{'met' if ok['cost'] else 'NOT met'}"]
    return "\n".join(lines)


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m shared.zoo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    b = sub.add_parser("build", help="retrain an entry from scratch and write its folder")
    b.add_argument("name")
    b.add_argument("--seed", type=int, default=None)
    b.add_argument("--threads", type=int, default=TRAIN_THREADS)
    r = sub.add_parser("report", help="print the shipped seeds' measured targets")
    r.add_argument("name", nargs="?", default="stories-base")
    m = sub.add_parser("meta", help="load (or build) an entry and print its metadata")
    m.add_argument("names", nargs="*", default=["stories-base"])
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.command == "build":
        print(build(args.name, args.seed, args.threads))
    elif args.command == "report":
        print(report(args.name))
    else:
        for n in getattr(args, "names", None) or ["stories-base"]:
            info = meta(n)
            print(json.dumps({k: v for k, v in info.items() if k not in ("recipe", "training_log")}, indent=1))
    print(f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":   # python -m shared.zoo [build NAME --seed S | report [NAME] | meta [NAME ...]]
    main()
