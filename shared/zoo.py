"""The model zoo: `load(name)` returns a trained (model, tokenizer), training it on first use.

Checkpoints live in `$LLMP_CACHE` (default `~/.cache/llm-projects`), one folder per name and recipe hash:
`model.safetensors`, `config.json`, `meta.json` (recipe, hash, sha256 of the weights, measured metrics) and
`tokenizer/`. A changed recipe gets a new hash and so retrains. Writes are atomic (build in a temporary folder,
then rename) and serialised by a file lock, so two processes asking at once train once and never see a half
written entry; an entry whose weights do not match their recorded sha256 (truncated, corrupted) is rebuilt.
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

TRAIN_THREADS = 2  # torch threads used to train every entry (see _build)
ZOO_VERSION = 2   # bump when the training code changes in a way that should invalidate every checkpoint

RECIPES: dict[str, dict] = {
    # The base model every notebook can use: ~1.3M parameters, Llama-shaped, trained ~2.7 min on 2 CPU cores.
    "stories-base": {
        "data": {"corpus": "stories", "n_train": 20000, "n_val": 1000, "seed": 0},
        "tokenizer": {"vocab_size": 1024},   # an upper bound: the stories run out of merges at 781 tokens
        "model": {"block_size": 256, "n_layer": 4, "n_head": 4, "n_kv_head": 2, "d_model": 160},
        "train": {"steps": 450, "batch_size": 16, "lr": 3e-3, "seed": 0},
    },
}


def cache_dir() -> Path:
    return Path(os.environ.get("LLMP_CACHE") or Path.home() / ".cache" / "llm-projects")


RECIPE_KEYS = {
    "data": {"corpus", "n_train", "n_val", "n_test", "seed", "min_recall", "max_recall"},  # recall: stories only
    "tokenizer": {"vocab_size"},
    "train": set(inspect.signature(train_loop).parameters) - {"model", "train_tokens", "val_tokens", "progress"},
}


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


def entry_dir(name: str) -> Path:
    return cache_dir() / f"{name}-{recipe_hash(_recipe(name))}"


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


def _build(name: str, recipe: dict, out: Path) -> None:
    """Train the recipe from scratch and write the entry into `out`."""
    from safetensors.torch import save_file

    from . import data, seed_everything
    from .model import GPT, GPTConfig
    from .tokenizer import train_tokenizer
    from .train import evaluate_stream, train

    ds = corpus(recipe)
    tok = train_tokenizer(ds["train"]["text"], recipe["tokenizer"]["vocab_size"])
    train_ids = data.encode_corpus(tok, ds["train"]["text"])
    val_ids = data.encode_corpus(tok, ds["validation"]["text"])
    cfg = GPTConfig(vocab_size=len(tok), **recipe["model"])
    t = dict(recipe["train"])
    seed_everything(t.get("seed", 0))
    model = GPT(cfg)
    # The thread count changes how float sums are split, hence the trained bits: pin it (CI has 2 cores), so a
    # notebook that set 1 thread before triggering training still gets the same checkpoint.
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        hist = train(model, train_ids, val_ids, progress=False, **t)
        val_loss = evaluate_stream(model, val_ids, cfg.block_size)
    finally:
        torch.set_num_threads(threads)
    meta = {"name": name, "recipe": recipe, "hash": recipe_hash(recipe), "params": model.num_params(),
            "train_seconds": round(hist.seconds, 1), "tokens_per_sec": round(hist.tokens_per_sec),
            "train_tokens": len(train_ids), "final_train_loss": hist.train_loss[-1],
            "val_loss": val_loss, "val_tokens": len(val_ids), "torch": torch.__version__}
    if recipe["data"]["corpus"] == "stories":
        n_chars = sum(ds["validation"]["n_chars"])
        recall = {k: recipe["data"][k] for k in ("min_recall", "max_recall") if k in recipe["data"]}
        floor, floor_se = data.entropy_rate(**recall)
        meta.update(val_bits_per_char=data.bits_per_char(val_loss, len(val_ids) - 1, n_chars),
                    entropy_bits_per_char=floor, entropy_bits_per_char_se=floor_se,
                    val_floor_bits_per_char=-sum(ds["validation"]["logprob"]) / math.log(2) / n_chars)
    out.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (cfg.tie_embeddings and k == "lm_head.weight")}
    save_file(state, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    tok.save_pretrained(out / "tokenizer")
    meta["sha256"] = _sha256(out / "model.safetensors")
    (out / "meta.json").write_text(json.dumps(meta, indent=1))   # written last: its presence marks completeness


def ensure(name: str) -> Path:
    """The folder of a valid entry for `name`, training it first if needed (under a lock)."""
    from filelock import FileLock

    entry = entry_dir(name)
    if _is_valid(entry):
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry.parent / f"{entry.name}.lock")):
        if _is_valid(entry):          # another process finished it while we waited
            return entry
        tmp = entry.parent / f".tmp-{entry.name}-{uuid.uuid4().hex[:8]}"
        try:
            _build(name, _recipe(name), tmp)
            if entry.exists():        # a broken entry: replace it
                shutil.rmtree(entry)
            os.replace(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry


def load(name: str = "stories-base", device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer) for a zoo entry; trains and caches it on first use."""
    from safetensors.torch import load_file

    from .model import GPT, GPTConfig
    from .tokenizer import load_tokenizer

    entry = ensure(name)
    cfg = GPTConfig.from_dict(json.loads((entry / "config.json").read_text()))
    model = GPT(cfg)
    missing, unexpected = model.load_state_dict(load_file(entry / "model.safetensors"), strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {entry.name} does not fit the model: missing {missing}, "
                           f"unexpected {unexpected}")
    return model.to(device).eval(), load_tokenizer(entry / "tokenizer")


def meta(name: str = "stories-base") -> dict:
    """The entry's metadata: recipe, parameter count, training time, validation loss and bits/char vs floor."""
    return json.loads((ensure(name) / "meta.json").read_text())


if __name__ == "__main__":   # python -m shared.zoo [name]: build (if needed) and print the metadata
    import sys

    t0 = time.perf_counter()
    for n in sys.argv[1:] or ["stories-base"]:
        m = meta(n)
        print(json.dumps({k: v for k, v in m.items() if k != "recipe"}, indent=1))
    print(f"{time.perf_counter() - t0:.1f} s")
