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


# ----------------------------------------------------------------------------------------------------------
# Shipped entries: committed weights, verified and loaded, never trained at run time.
SHIPPED_NAME = "stories-base"


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a shipped entry must never be trained at run time")
    monkeypatch.setattr(zoo, "_build", refuse)


@pytest.mark.parametrize("seed", zoo.SHIPPED[SHIPPED_NAME])
def test_shipped_seeds_load_without_training_and_recall(seed, monkeypatch, no_training):
    monkeypatch.setenv("LLMP_ZOO_SEED", str(seed))
    assert zoo.entry_dir(SHIPPED_NAME) == zoo.shipped_dir(SHIPPED_NAME, seed)
    model, tok = zoo.load(SHIPPED_NAME)
    meta = zoo.meta(SHIPPED_NAME)
    assert meta["hash"] == zoo.recipe_hash(zoo._recipe(SHIPPED_NAME)) and meta["params"] == model.num_params()
    assert not model.training and len(tok) == model.cfg.vocab_size and len(tok) == 781
    # Targets measured at build time on held-out stories and committed in meta.json: recall at every distance,
    # and the cost per token, hold for both seeds.
    met = zoo.targets_met(meta["targets"])
    assert met["recall"] and met["cost"]
    log = meta["training_log"]["loss_every_step"]
    assert len(log) == zoo.RECIPES[SHIPPED_NAME]["train"]["steps"] and log[-1] < log[0] / 3


# Seed 1 recalls the object at every distance but has not learned to recall the colour (its colour recall stays at
# the control), which keeps it 6.7 % over the floor, and its object recall is spread over 6 layer-0 heads: issue #49
# stays open on these two targets. The strict xfail turns into a failure the day a rebuilt seed 1 meets them.
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.xfail(
    strict=True, reason="seed 1: 6.7 % over the floor (no colour recall), 6 heads carry the recall"))])
def test_shipped_seeds_reach_the_floor_through_few_heads(seed):
    meta = json.loads((zoo.verify_shipped(SHIPPED_NAME, seed) / "meta.json").read_text())
    met = zoo.targets_met(meta["targets"])
    assert met["floor"] and met["heads"]


def test_report_prints_every_target_for_every_shipped_seed(no_training):
    text = zoo.report(SHIPPED_NAME)
    assert text.count("-> met") + text.count("-> NOT met") == 4 * len(zoo.SHIPPED[SHIPPED_NAME])
    assert text.count("seed ") >= len(zoo.SHIPPED[SHIPPED_NAME]) and "recall by filler sentences" in text


@pytest.fixture
def shipped_copy(tmp_path, monkeypatch):
    """The shipped folders copied to tmp_path, which becomes SHIPPED_DIR (so a test may damage them)."""
    import shutil

    shutil.copytree(zoo.SHIPPED_DIR, tmp_path / "zoo")
    monkeypatch.setattr(zoo, "SHIPPED_DIR", tmp_path / "zoo")
    return tmp_path / "zoo"


def test_corrupted_shipped_weights_are_refused_not_retrained(shipped_copy, no_training):
    weights = zoo.shipped_dir(SHIPPED_NAME, 0) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])                 # truncated
    with pytest.raises(RuntimeError, match="sha256.*python -m shared.zoo build stories-base --seed 0"):
        zoo.load(SHIPPED_NAME)
    (zoo.shipped_dir(SHIPPED_NAME, 0) / "model.safetensors").unlink()
    with pytest.raises(RuntimeError, match="model.safetensors is missing"):
        zoo.load(SHIPPED_NAME)


def test_an_edited_recipe_no_longer_matches_its_shipped_weights(monkeypatch, no_training):
    changed = json.loads(json.dumps(zoo.RECIPES[SHIPPED_NAME]))
    changed["train"]["lr"] *= 2
    monkeypatch.setitem(zoo.RECIPES, SHIPPED_NAME, changed)
    with pytest.raises(RuntimeError, match="recipe changed.*python -m shared.zoo build stories-base --seed 0"):
        zoo.load(SHIPPED_NAME)


def test_an_unshipped_seed_of_a_shipped_name_goes_to_the_cache(cache, monkeypatch):
    monkeypatch.setenv("LLMP_ZOO_SEED", "7")
    assert zoo.entry_dir(SHIPPED_NAME).parent == cache


def test_replay_follows_the_shipped_training_log():
    """Retrain the first 40 steps of seed 0 and compare with the committed log: catches a changed recipe, data,
    tokenizer, schedule or training step without a full rebuild. Bits differ across CPUs and thread counts, so the
    comparison has a tolerance: 0.02 nats at any step. Measured on the AMD EPYC that trained it: 2 threads against
    the 1-thread log differ by 5e-5; lr x 1.25 moves the first 40 losses by up to 0.36, another curriculum data seed
    by 0.05."""
    meta = json.loads((zoo.shipped_dir(SHIPPED_NAME, 0) / "meta.json").read_text())
    logged = meta["training_log"]["loss_every_step"][:40]
    replayed = zoo.replay(SHIPPED_NAME, steps=40, seed=0)
    assert max(abs(a - b) for a, b in zip(replayed, logged)) < 0.02


def test_a_build_leaves_the_callers_random_state_alone(cache):
    import random

    torch.manual_seed(123)
    random.seed(123)
    zoo.load("tiny-test")                               # cold cache: trains
    after_build = (torch.rand(3), random.random())
    torch.manual_seed(123)
    random.seed(123)
    zoo.load("tiny-test")                               # warm cache: loads
    after_load = (torch.rand(3), random.random())
    assert torch.equal(after_build[0], after_load[0]) and after_build[1] == after_load[1]


def test_curriculum_draws_its_first_steps_from_the_short_recall_corpus(cache):
    recipe = json.loads(json.dumps(TINY))
    recipe["data"]["curriculum"] = {"steps": 2, "seed": 5, "min_recall": 1, "max_recall": 1, "seq_len": 8,
                                    "batch_size": 3}
    zoo.register("tiny-curriculum-test", recipe)
    try:
        _, tok, train_ids, _, _, batches = zoo._prepare(zoo._recipe("tiny-curriculum-test"))
        g = torch.Generator().manual_seed(0)
        first = [batches(g)[0] for _ in range(3)]
        from shared import data
        short = data.encode_corpus(tok, data.stories(n_train=200, n_val=0, n_test=0, seed=5, min_recall=1,
                                                     max_recall=1)["train"]["text"])
        g = torch.Generator().manual_seed(0)
        expect = [data.random_windows(short, 8, 3, g)[0], data.random_windows(short, 8, 3, g)[0],
                  data.random_windows(train_ids, 32, 4, g)[0]]
        assert all(torch.equal(a, b) for a, b in zip(first, expect))
        bad = json.loads(json.dumps(recipe))
        bad["data"]["curriculum"] = {"steps": 2}
        with pytest.raises(ValueError, match="curriculum"):
            zoo.register("bad", bad)
        bad["data"]["curriculum"] = dict(recipe["data"]["curriculum"], steps=3)   # not before the last step
        with pytest.raises(ValueError, match="curriculum steps"):
            zoo.register("bad", bad)
    finally:
        zoo.RECIPES.pop("tiny-curriculum-test", None)


def test_ablate_heads_zeroes_one_head_and_restores_the_model():
    from shared.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, d_model=32)).eval()
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        plain = model(x)[0]
        with zoo.ablate_heads(model, [(1, 2)]):
            ablated = model(x)[0]
            o = model.blocks[1].attn.o_proj
            seen = {}
            h = o.register_forward_pre_hook(lambda m, a: seen.setdefault("in", a[0]))
            model(x)
            h.remove()
        after = model(x)[0]
    D = model.cfg.head_dim
    assert not torch.allclose(plain, ablated) and torch.equal(plain, after)
    assert torch.equal(seen["in"][..., 2 * D:3 * D], torch.zeros_like(seen["in"][..., 2 * D:3 * D]))
    assert seen["in"][..., :2 * D].abs().sum() > 0
    for bad in ([(2, 0)], [(0, 4)], [(0,)], [3]):                 # layer or head out of range, not a pair
        with pytest.raises(ValueError, match="layer, head"):
            zoo.ablate_heads(model, bad)


def test_flops_per_token_counts_matmuls():
    # 1 layer, d 32, 2 heads, SwiGLU d_ff 96, vocab 10: q,k,v,o 4*32*32 + mlp 3*32*96 + head 32*10; context 4
    cfg = {"block_size": 8, "n_layer": 1, "n_head": 2, "d_model": 32, "d_ff": 96}
    assert zoo.forward_flops_per_token(cfg, 10, 4) == 2 * (4 * 32 * 32 + 3 * 32 * 96 + 32 * 10) + 4 * 1 * 4 * 32


def test_load_puts_the_model_on_the_shared_device(monkeypatch, no_training):
    # The device rule: zoo.load follows shared.device() unless told otherwise (meta stands in for a GPU here).
    import shared

    monkeypatch.setattr(shared, "device", lambda: torch.device("meta"))
    model, _ = zoo.load(SHIPPED_NAME)
    assert next(model.parameters()).device.type == "meta"
    model, _ = zoo.load(SHIPPED_NAME, device="cpu")
    assert next(model.parameters()).device.type == "cpu"
