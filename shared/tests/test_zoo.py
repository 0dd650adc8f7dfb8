"""The zoo: trains once, caches, survives concurrent callers and corrupted files, retrains on recipe change."""
import json
import multiprocessing as mp

import pytest
import torch

from shared import zoo

TINY = {"data": {"corpus": "stories", "n_train": 200, "n_val": 40, "seed": 0},
        "tokenizer": {"vocab_size": 300},
        "model": {"block_size": 32, "n_layer": 1, "n_head": 2, "d_model": 32},
        "train": {"steps": 3, "batch_size": 4, "seed": 0}}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMP_CACHE", str(tmp_path))
    zoo.register("tiny-test", TINY)
    yield tmp_path
    zoo.RECIPES.pop("tiny-test", None)


def _count_builds(monkeypatch):
    calls = []
    real = zoo._build
    monkeypatch.setattr(zoo, "_build", lambda *a: (calls.append(a[0]), real(*a))[1])
    return calls


def test_trains_once_then_loads_from_cache(cache, monkeypatch):
    calls = _count_builds(monkeypatch)
    m1, tok = zoo.load("tiny-test")
    m2, _ = zoo.load("tiny-test")
    assert calls == ["tiny-test"]
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    meta = zoo.meta("tiny-test")
    assert meta["params"] == m1.num_params() and meta["hash"] == zoo.recipe_hash(TINY)
    assert meta["val_bits_per_char"] > meta["entropy_bits_per_char"] > 0
    assert not m1.training and len(tok) == m1.cfg.vocab_size


def test_same_recipe_same_weights_in_a_fresh_cache(cache, tmp_path_factory, monkeypatch):
    m1, _ = zoo.load("tiny-test")
    monkeypatch.setenv("LLMP_CACHE", str(tmp_path_factory.mktemp("other")))
    m2, _ = zoo.load("tiny-test")
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_corrupted_checkpoint_is_rebuilt(cache, monkeypatch):
    zoo.load("tiny-test")
    weights = zoo.entry_dir("tiny-test") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])    # truncated
    calls = _count_builds(monkeypatch)
    model, _ = zoo.load("tiny-test")
    assert calls == ["tiny-test"] and model.num_params() > 0


def test_recipe_change_retrains_under_a_new_hash(cache, monkeypatch):
    zoo.load("tiny-test")
    old = zoo.entry_dir("tiny-test")
    changed = json.loads(json.dumps(TINY))
    changed["train"]["steps"] = 4
    zoo.register("tiny-test", changed)
    calls = _count_builds(monkeypatch)
    zoo.load("tiny-test")
    assert calls == ["tiny-test"] and zoo.entry_dir("tiny-test") != old


def _load_in_child(cache_dir, queue):
    import os

    os.environ["LLMP_CACHE"] = cache_dir
    from shared import zoo as z

    z.register("tiny-test", TINY)
    built = []
    real = z._build
    z._build = lambda *a: (built.append(1), real(*a))[1]
    z.load("tiny-test")
    queue.put(len(built))


def test_two_processes_at_once_train_once(cache):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=(str(cache), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    builds = sorted(queue.get(timeout=5) for _ in procs)
    assert builds == [0, 1]                     # the lock made the second wait, then load
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert len(entries) == 1 and not any(p.name.startswith(".tmp") for p in cache.iterdir())


def test_unknown_names_and_bad_recipes():
    with pytest.raises(KeyError, match="unknown zoo model"):
        zoo.load("no-such-model")
    with pytest.raises(ValueError, match="missing"):
        zoo.register("bad", {"data": {}})
    with pytest.raises(ValueError):
        zoo.register("a/b", TINY)
    for section, key in (("model", "n_layers"), ("train", "step"), ("data", "size"), ("tokenizer", "vocab")):
        bad = json.loads(json.dumps(TINY))
        bad[section][key] = 1
        with pytest.raises(ValueError, match=f"unknown {section} keys \\['{key}'\\]"):
            zoo.register("bad", bad)
    with pytest.raises(ValueError, match="unknown \\['extra'\\]"):
        zoo.register("bad", dict(TINY, extra={}))


def test_seed_override_changes_the_recipe_and_its_folder(cache, monkeypatch):
    plain = zoo.entry_dir("tiny-test")
    monkeypatch.setenv("LLMP_ZOO_SEED", "1")
    other = zoo.entry_dir("tiny-test")
    assert other != plain and zoo._recipe("tiny-test")["train"]["seed"] == 1
    assert zoo.RECIPES["tiny-test"]["train"]["seed"] == 0            # the registered recipe is untouched
    monkeypatch.setenv("LLMP_ZOO_SEED", "x")
    with pytest.raises(ValueError, match="LLMP_ZOO_SEED"):
        zoo.entry_dir("tiny-test")


def test_recipe_may_fix_the_recall_distance_range():
    recipe = {**TINY, "data": {**TINY["data"], "min_recall": 2, "max_recall": 3}}
    zoo.register("tiny-recall-test", recipe)
    try:
        ds = zoo.corpus("tiny-recall-test")
        assert set(ds["train"]["recall_distance"]) == {2, 3}
        assert set(zoo.corpus(TINY)["train"]["recall_distance"]) > {2, 3}      # default range: 1..8
        assert zoo.recipe_hash(recipe) != zoo.recipe_hash(TINY)
    finally:
        zoo.RECIPES.pop("tiny-recall-test", None)
