"""Tests for positions.py: references (HF Llama RoPE, the ALiBi closed form, the sinusoid formula),
the properties that define each scheme, and the argument checks."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from shared.train import train

import positions as P


# ------------------------------------------------------------------------------------------------ sinusoidal
def test_sinusoidal_matches_formula_elementwise():
    T, d = 13, 10
    table = P.sinusoidal_table(T, d)
    assert table.shape == (T, d) and table.dtype == torch.float32
    for p in range(T):
        for i in range(d // 2):
            angle = p / 10000 ** (2 * i / d)
            assert math.isclose(table[p, 2 * i].item(), math.sin(angle), abs_tol=1e-6)
            assert math.isclose(table[p, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-6)


def test_sinusoidal_row_zero_and_norm():
    table = P.sinusoidal_table(50, 16)
    torch.testing.assert_close(table[0, 0::2], torch.zeros(8))
    torch.testing.assert_close(table[0, 1::2], torch.ones(8))
    # every row is d/2 (sin, cos) pairs of unit length: |row|^2 = d/2
    torch.testing.assert_close(table.pow(2).sum(-1), torch.full((50,), 8.0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("T, d, exc", [(0, 8, ValueError), (4, 7, ValueError), (4, 0, ValueError),
                                       (4.0, 8, TypeError), (True, 8, TypeError), (-3, 8, ValueError)])
def test_sinusoidal_bad_args(T, d, exc):
    with pytest.raises(exc):
        P.sinusoidal_table(T, d)


def test_sinusoidal_bad_base():
    with pytest.raises(ValueError, match="theta"):
        P.sinusoidal_table(4, 8, base=1.0)


# --------------------------------------------------------------------------------------------------- learned
def test_learned_positions_shape_grad_and_limit():
    torch.manual_seed(0)
    learned = P.LearnedPositions(max_len=16, d_model=8)
    out = learned(10)
    assert out.shape == (10, 8)
    out.sum().backward()
    assert learned.table.grad[:10].abs().sum() > 0 and learned.table.grad[10:].abs().sum() == 0
    with pytest.raises(ValueError, match="max_len=16"):
        learned(17)
    with pytest.raises(ValueError):
        learned(0)
    with pytest.raises(ValueError):
        P.LearnedPositions(0, 8)


# ------------------------------------------------------------------------------------------------------ RoPE
@pytest.mark.parametrize("D, T, start, theta", [(8, 16, 0, 10000.0), (32, 64, 0, 10000.0), (16, 200, 0, 500000.0),
                                                (8, 10, 37, 10000.0)])
def test_rope_matches_hf_llama(D, T, start, theta):
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, T, D), torch.randn(2, 3, T, D)
    positions = torch.arange(start, start + T)
    q_ref, k_ref = P.hf_llama_rope(q, k, positions, theta)
    cos, sin = P.rope_cos_sin(positions, D, theta)
    # HF builds angles in float32 (error ~ position * 6e-8 rad); ours in float64, so allow a few 1e-5.
    torch.testing.assert_close(P.apply_rope(q, cos, sin), q_ref, rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(P.apply_rope(k, cos, sin), k_ref, rtol=1e-5, atol=5e-5)


def test_rope_is_a_rotation_of_pairs():
    torch.manual_seed(1)
    D, T = 12, 9
    x = torch.randn(T, D, dtype=torch.float64)
    cos, sin = P.rope_cos_sin(torch.arange(T), D, dtype=torch.float64)
    y = P.apply_rope(x, cos, sin)
    # norms preserved, position 0 untouched, and pair (0, D/2) at position 1 turned by exactly 1 radian
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y[0], x[0])
    a, b = x[1, 0].item(), x[1, D // 2].item()
    assert math.isclose(y[1, 0].item(), a * math.cos(1) - b * math.sin(1), abs_tol=1e-12)
    assert math.isclose(y[1, D // 2].item(), b * math.cos(1) + a * math.sin(1), abs_tol=1e-12)


def test_rope_score_depends_only_on_offset():
    torch.manual_seed(2)
    N, D = 200, 16
    q, k = torch.randn(N, D, dtype=torch.float64), torch.randn(N, D, dtype=torch.float64)
    m, n = torch.randint(0, 512, (N,)), torch.randint(0, 512, (N,))
    shift = torch.randint(-300, 3000, (N,))
    base = P.rope_scores(q, k, m, n)
    shifted = P.rope_scores(q, k, m + shift, n + shift)
    torch.testing.assert_close(shifted, base, rtol=0, atol=1e-9)
    # and the score does change with the offset itself (otherwise the check above is vacuous)
    assert (P.rope_scores(q, k, m + 1, n) - base).abs().max() > 1e-2


def test_rope_bad_args():
    with pytest.raises(ValueError, match="head_dim must be even"):
        P.rope_cos_sin(torch.arange(4), 7)
    with pytest.raises(ValueError, match="head_dim"):
        P.rope_cos_sin(torch.arange(4), 0)
    with pytest.raises(ValueError, match="positions"):
        P.rope_cos_sin(torch.arange(4)[None], 8)
    cos, sin = P.rope_cos_sin(torch.arange(4), 8)
    with pytest.raises(ValueError, match="cos and sin"):
        P.apply_rope(torch.randn(2, 5, 8), cos, sin)
    with pytest.raises(ValueError, match="even head_dim"):
        P.apply_rope(torch.randn(2, 4, 7), cos, sin)
    with pytest.raises(ValueError, match="q and k"):
        P.rope_scores(torch.randn(3, 8), torch.randn(4, 8), torch.arange(3), torch.arange(4))


# ----------------------------------------------------------------------------------------------------- ALiBi
@pytest.mark.parametrize("n_head", [1, 2, 3, 4, 5, 6, 8, 12, 16, 20, 32])
def test_alibi_slopes_closed_form(n_head):
    torch.testing.assert_close(P.alibi_slopes(n_head), torch.tensor(P.alibi_slopes_paper(n_head), dtype=torch.float32),
                               rtol=1e-6, atol=0)


def test_alibi_slopes_known_values():
    torch.testing.assert_close(P.alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    assert P.alibi_slopes_paper(8) == [2.0 ** -i for i in range(1, 9)]          # the reference itself
    # 6 heads: the 4-head slopes (2^-2, 2^-4, 2^-6, 2^-8) then 2^-1, 2^-3 from the 8-head sequence
    torch.testing.assert_close(P.alibi_slopes(6), torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8,
                                                                2.0 ** -1, 2.0 ** -3]))


def test_alibi_bias_values_and_mask():
    bias = P.alibi_bias(4, 5, causal=True)
    assert bias.shape == (4, 5, 5)
    slopes = P.alibi_slopes(4)
    for h in range(4):
        for m in range(5):
            for n in range(5):
                expected = -slopes[h].item() * (m - n) if n <= m else float("-inf")
                assert bias[h, m, n].item() == pytest.approx(expected)
    torch.testing.assert_close(P.alibi_bias(4, 5, causal=False), P.alibi_bias(4, 5, causal=False).transpose(1, 2))


@pytest.mark.parametrize("n_head", [0, -1])
def test_alibi_bad_args(n_head):
    with pytest.raises(ValueError, match="n_head"):
        P.alibi_slopes(n_head)
    with pytest.raises(TypeError, match="n_head"):
        P.alibi_slopes(2.0)
    with pytest.raises(ValueError, match="T"):
        P.alibi_bias(4, 0)


# ------------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("scheme", ["none", "rope", "alibi", "sinusoidal"])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_sdpa(scheme, causal):
    torch.manual_seed(3)
    B, H, T, D = 2, 4, 11, 8
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    ours = P.attention(q, k, v, scheme=scheme, causal=causal)
    if scheme == "rope":
        cos, sin = P.rope_cos_sin(torch.arange(T), D)
        q, k = P.apply_rope(q, cos, sin), P.apply_rope(k, cos, sin)
    if scheme == "alibi":
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=P.alibi_bias(H, T, causal=causal))
    else:
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_attention_weights_rows_sum_to_one_and_bad_args():
    q = torch.randn(1, 2, 6, 4)
    _, w = P.attention(q, q, q, scheme="alibi", return_weights=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 6))
    assert torch.all(w[0, :, 0, 1:] == 0)
    with pytest.raises(ValueError, match="scheme"):
        P.attention(q, q, q, scheme="xpos")
    with pytest.raises(ValueError, match="B, H, T, D"):
        P.attention(q, q[..., :2], q)


def test_unmasked_nope_attention_is_permutation_equivariant_and_rope_is_not():
    torch.manual_seed(4)
    x = torch.randn(1, 2, 10, 8)
    perm = torch.randperm(10)
    nope = (P.attention(x[:, :, perm], x[:, :, perm], x[:, :, perm], causal=False)
            - P.attention(x, x, x, causal=False)[:, :, perm]).abs().max()
    rope = (P.attention(x[:, :, perm], x[:, :, perm], x[:, :, perm], scheme="rope", causal=False)
            - P.attention(x, x, x, scheme="rope", causal=False)[:, :, perm]).abs().max()
    assert nope < 1e-5 and rope > 1e-2


# ---------------------------------------------------------------------------------------- measure & break
def test_similarity_by_distance():
    sim = P.similarity_by_distance(P.sinusoidal_table(64, 32))
    assert sim.shape == (64,)
    assert sim[0].item() == pytest.approx(1.0, abs=1e-6)
    # nearby sinusoidal positions are more alike than distant ones
    assert sim[1] > sim[8] > sim[32]
    # a constant table ("none") is identical at every distance
    torch.testing.assert_close(P.similarity_by_distance(torch.ones(5, 3)), torch.ones(5))
    with pytest.raises(ValueError, match="table"):
        P.similarity_by_distance(torch.ones(5))


def test_order_tasks_distinct_uniform_and_targets():
    generator = torch.Generator().manual_seed(0)
    N, T, V = 20000, 6, 10
    x, y = P.order_task("first", N, T, V, generator)
    assert x.shape == y.shape == (N, T) and x.dtype == torch.long
    assert all(len(set(row)) == T for row in x[:500].tolist())
    assert torch.all(y[:, 0] == -100) and torch.equal(y[:, 1:], x[:, :1].expand(N, T - 1))
    # each token is first with probability 1/V: counts within 5 sigma of the binomial mean
    counts = torch.bincount(x[:, 0], minlength=V).double()
    mean, sigma = N / V, math.sqrt(N * (1 / V) * (1 - 1 / V))
    assert (counts - mean).abs().max() < 5 * sigma
    x, y = P.order_task("previous", 4, T, V, torch.Generator().manual_seed(1))
    assert torch.all(y[:, 0] == -100) and torch.all(y[:, -1] == -100) and torch.equal(y[:, 1:-1], x[:, :-2])


def test_order_task_bad_args():
    with pytest.raises(ValueError, match="seq_len=11"):
        P.order_task("first", 4, 11, 10)
    with pytest.raises(ValueError, match="n_seqs"):
        P.order_task("first", 0, 3, 10)
    with pytest.raises(TypeError, match="vocab_size"):
        P.order_task("first", 4, 3, "10")
    with pytest.raises(ValueError, match="task"):
        P.order_task("last", 4, 3, 10)
    with pytest.raises(ValueError, match="seq_len must be >= 3"):
        P.order_task("previous", 4, 2, 10)


def test_order_accuracy():
    y = torch.tensor([[-100, 3, 3, 3]])
    logits = F.one_hot(torch.tensor([[3, 3, 1, 1]]), 5).float()
    assert P.order_accuracy(logits, y) == pytest.approx(1 / 3)             # position 0 is not scored
    with pytest.raises(ValueError, match="logits"):
        P.order_accuracy(logits[0], y)
    with pytest.raises(ValueError, match="no scored position"):
        P.order_accuracy(logits, torch.full_like(y, -100))


def test_permutation_gap():
    idx = torch.arange(12).view(2, 6)
    perm = torch.tensor([5, 0, 2, 1, 4, 3])
    table = torch.randn(20, 3)
    assert P.permutation_gap(lambda i: table[i], idx, perm) == 0.0                       # per-token map
    assert P.permutation_gap(lambda i: table[i].cumsum(1), idx, perm) > 0                # order-aware map
    with pytest.raises(ValueError, match="permutation"):
        P.permutation_gap(lambda i: table[i], idx, torch.tensor([0, 0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="idx"):
        P.permutation_gap(lambda i: table[i], idx[0], perm)


class TinyOrderModel(nn.Module):
    """A one-layer order-aware model: embeddings + learned positions + causal attention; (logits, loss)."""

    def __init__(self, V, T, d=32):
        super().__init__()
        self.emb, self.pos, self.out = nn.Embedding(V, d), P.LearnedPositions(T, d, init_std=1.0), nn.Linear(d, V)
        self.qk = nn.Linear(d, 2 * d)

    def forward(self, idx, targets=None):
        x = self.emb(idx) + self.pos(idx.shape[1])
        q, k = self.qk(x).chunk(2, -1)
        logits = self.out(P.attention(q[:, None], k[:, None], x[:, None], causal=True)[:, 0])
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss


def test_order_batches():
    batch = P.order_batches("first", 8, 5, 9)
    x, y = batch(torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 5)
    assert torch.all(y[:, 0] == -100) and torch.equal(y[:, 1:], x[:, :1].expand(8, 4))
    x2, _ = batch(torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)                                                  # seeded by the caller's generator
    with pytest.raises(ValueError, match="seq_len=6"):
        P.order_batches("first", 8, 6, 5)
    with pytest.raises(TypeError, match="batch_size"):
        P.order_batches("first", 8.0, 5, 9)


def test_first_token_task_learned_through_shared_train():
    torch.manual_seed(0)
    V, T = 12, 6
    model = TinyOrderModel(V, T)
    history = train(model, P.order_batches("first", 64, T, V), steps=150, seq_len=T, lr=1e-2, warmup=0,
                    min_lr_ratio=1.0, weight_decay=0.0, grad_clip=None, progress=False)
    losses = history.train_loss
    assert len(losses) == 150 and losses[-1] < 0.5 * losses[0]
    x, y = P.order_task("first", 1000, T, V, torch.Generator().manual_seed(1))
    with torch.no_grad():
        accuracy = P.order_accuracy(model(x)[0], y)
    assert accuracy > 3 / T   # an order-blind model can reach 1/(T-1) at best


def _best_blind(T, orbit_of, answer, scored):
    """Brute force over all orderings of T tokens (V = T): a blind model gives the same output to every
    (sequence, position) in one orbit; the best deterministic answer per orbit is its most frequent target, the
    best distribution is the targets' frequencies. Returns (accuracy, loss) over the scored positions."""
    import itertools
    from collections import Counter, defaultdict
    targets = defaultdict(Counter)
    for seq in itertools.permutations(range(T)):
        for t in scored:
            targets[orbit_of(seq, t)][answer(seq, t)] += 1
    n = math.factorial(T) * len(scored)
    accuracy = sum(max(c.values()) for c in targets.values()) / n
    loss = -sum(k * math.log(k / sum(c.values())) for c in targets.values() for k in c.values()) / n
    return accuracy, loss


@pytest.mark.parametrize("task", P.TASKS)
@pytest.mark.parametrize("T", [3, 4, 5, 6])
def test_order_bounds_match_brute_force(task, T):
    bounds = P.order_bounds(task, T)
    answer = (lambda seq, t: seq[0]) if task == "first" else (lambda seq, t: seq[t - 1])
    scored = range(1, T) if task == "first" else range(1, T - 1)
    # order-blind: the output at t depends on the set of tokens (always all V = T here) and the own token only
    acc, loss = _best_blind(T, lambda seq, t: seq[t], answer, scored)
    assert acc == pytest.approx(bounds["order-blind"]["accuracy"]) and loss == pytest.approx(bounds["order-blind"]["loss"])
    # direction-blind: (x, t) and (reversed x, T-1-t) share one output
    acc, loss = _best_blind(T, lambda seq, t: min((seq, t), (seq[::-1], T - 1 - t)), answer, scored)
    assert acc == pytest.approx(bounds["direction-blind"]["accuracy"])
    assert loss == pytest.approx(bounds["direction-blind"]["loss"])


def test_order_bounds_bad_args():
    with pytest.raises(ValueError, match="seq_len"):
        P.order_bounds("first", 1)
    with pytest.raises(ValueError, match="seq_len"):
        P.order_bounds("previous", 2)
    with pytest.raises(ValueError, match="task"):
        P.order_bounds("middle", 5)


def test_attention_entropy():
    weights = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.25] * 4])
    torch.testing.assert_close(P.attention_entropy(weights),
                               torch.tensor([0.0, math.log(2), math.log(4)], dtype=torch.float64))
    causal = torch.ones(5, 5).tril()
    torch.testing.assert_close(P.attention_entropy(causal / causal.sum(-1, keepdim=True)),
                               torch.log(torch.arange(1, 6, dtype=torch.float64)))   # uniform prefix: ln(t+1)
    with pytest.raises(ValueError, match="weights"):
        P.attention_entropy(torch.ones(3))
    with pytest.raises(TypeError, match="weights"):
        P.attention_entropy([[1.0]])


def test_principal_components():
    torch.manual_seed(0)
    X = torch.randn(40, 3, dtype=torch.float64) @ torch.diag(torch.tensor([5.0, 2.0, 0.5], dtype=torch.float64))
    X = X @ torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0].T        # rotate: axes not the basis
    coords, explained = P.principal_components(X, k=3)
    assert coords.shape == (40, 3) and explained.shape == (3,)
    centred = X - X.mean(0)
    # a rotation of the centred data: distances kept; variances = eigenvalues of the covariance, descending
    torch.testing.assert_close(torch.cdist(coords, coords), torch.cdist(centred, centred))
    eig = torch.linalg.eigvalsh(centred.T @ centred).flip(0)
    torch.testing.assert_close(explained, eig / eig.sum())
    assert explained[0] > explained[1] > explained[2]
    coords, explained = P.principal_components(torch.ones(5, 4), k=3)          # a constant set: one point
    assert coords.abs().max() == 0 and explained.abs().max() == 0
    coords, _ = P.principal_components(torch.randn(2, 4), k=3)                 # fewer axes than k: zero-padded
    assert coords.shape == (2, 3) and coords[:, 2].abs().max() == 0
    with pytest.raises(TypeError, match="vectors"):
        P.principal_components([[1.0, 2.0]])
    with pytest.raises(ValueError, match="k"):
        P.principal_components(torch.ones(5, 4), k=0)


def test_loss_by_position_matches_mean_loss_and_bad_args():
    torch.manual_seed(0)
    V, T = 7, 5
    model = TinyOrderModel(V, T)
    tokens = torch.randint(0, V, (200,))
    per_position = P.loss_by_position(model, tokens, T, n_windows=10, batch_size=4, seed=3)
    assert per_position.shape == (T,)
    # the same windows scored with the library's mean cross-entropy give the mean of the per-position curve
    g = torch.Generator().manual_seed(3)
    starts = torch.randint(len(tokens) - T, (10,), generator=g)
    windows = torch.stack([tokens[s:s + T + 1] for s in starts.tolist()])
    with torch.no_grad():
        logits = model(windows[:, :-1])[0]
    reference = F.cross_entropy(logits.reshape(-1, V), windows[:, 1:].reshape(-1))
    torch.testing.assert_close(per_position.mean(), reference, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="seq_len \\+ 1"):
        P.loss_by_position(model, tokens[:5], T)
    with pytest.raises(ValueError, match="1-D"):
        P.loss_by_position(model, tokens[None], T)
    with pytest.raises(ValueError, match="n_windows"):
        P.loss_by_position(model, tokens, T, n_windows=0)


def _tiny_gpt(pos, n_layer, V=11, T=24, seed=0):
    from shared.model import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=n_layer, n_head=2, d_model=16, pos=pos)).eval()
    for p in model.parameters():                      # random weights large enough that attention is not uniform
        p.data.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("pos", ["none", "rope", "alibi"])
def test_attention_window_limits_each_query_and_restores(pos):
    from shared.model import Attention

    model, x = _tiny_gpt(pos, 2), torch.randint(0, 11, (3, 24))
    with torch.no_grad():
        full = model(x)[0]
        with P.attention_window(model, 24):           # a window as long as the input: the plain model
            torch.testing.assert_close(model(x)[0], full, rtol=1e-5, atol=1e-5)
        with P.attention_window(model, 4):
            windowed = model(x)[0]
            x2 = x.clone()
            x2[:, :10] = (x2[:, :10] + 1) % 11         # change tokens 0..9: with 2 layers of 4 keys, position t sees
            changed = model(x2)[0]                     # tokens t-6..t only, so positions >= 16 cannot move
            maps = model.attention_maps(x)
    assert all(type(b.attn) is Attention for b in model.blocks)              # class restored on exit
    torch.testing.assert_close(changed[:, 16:], windowed[:, 16:], rtol=1e-5, atol=1e-5)
    assert (changed[:, :10] - windowed[:, :10]).abs().max() > 1e-3
    assert (windowed[:, 10:] - full[:, 10:]).abs().max() > 1e-3              # the window did cut something
    q, k = torch.arange(24)[:, None], torch.arange(24)[None]
    assert all(a[..., (q - k >= 4) | (k > q)].abs().max() == 0 for a in maps)   # no weight outside the band


def test_attention_window_bad_args():
    with pytest.raises(ValueError, match="window"):
        with P.attention_window(_tiny_gpt("none", 1), 0):
            pass
    with pytest.raises(TypeError, match="shared.model GPT"):
        with P.attention_window(nn.Linear(2, 2), 4):
            pass


@pytest.mark.parametrize("pos", ["none", "rope"])
def test_sliding_window_loss_matches_windowed_attention_for_one_layer(pos):
    # One layer: query e limited to its last W keys sees exactly the tokens of the fresh re-run, at the same
    # relative offsets, so the two losses agree; with two layers NoPE's keys differ (they averaged other prefixes).
    T, W = 24, 6
    tokens = torch.randint(0, 11, (300,), generator=torch.Generator().manual_seed(1))
    one = _tiny_gpt(pos, 1)
    ends, rerun = P.sliding_window_loss(one, tokens, T, W, stride=3, n_windows=8, batch_size=5, seed=2)
    assert ends.tolist() == list(range(W - 1, T, 3)) and rerun.shape == ends.shape
    with P.attention_window(one, W):
        banded = P.loss_by_position(one, tokens, T, n_windows=8, seed=2)
    torch.testing.assert_close(rerun, banded[ends], rtol=1e-4, atol=1e-4)
    # at the full length and stride 1 the re-run is the plain loss at the last position
    _, last = P.sliding_window_loss(one, tokens, T, T, stride=1, n_windows=8, seed=2)
    torch.testing.assert_close(last, P.loss_by_position(one, tokens, T, n_windows=8, seed=2)[-1:], rtol=1e-4, atol=1e-4)
    if pos == "none":
        two = _tiny_gpt(pos, 2)
        _, rerun2 = P.sliding_window_loss(two, tokens, T, W, stride=3, n_windows=8, seed=2)
        with P.attention_window(two, W):
            banded2 = P.loss_by_position(two, tokens, T, n_windows=8, seed=2)
        assert (rerun2[1:] - banded2[ends][1:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="window"):
        P.sliding_window_loss(one, tokens, T, T + 1, stride=1)
    with pytest.raises(ValueError, match="stride"):
        P.sliding_window_loss(one, tokens, T, W, stride=0)


def test_model_facing_helpers_move_inputs_to_the_models_device():
    # The model on `meta` (no GPU needed): every batch a helper builds must reach it on `meta`; the helpers may stop
    # at their first read of a value (meta tensors have none), which is not a device mismatch.
    from shared.validate import device_guard

    model = _tiny_gpt("none", 2).to("meta")
    tokens = torch.randint(0, 11, (200,))
    calls = [lambda: P.loss_by_position(model, tokens, 24, n_windows=4),
             lambda: P.sliding_window_loss(model, tokens, 24, 6, stride=6, n_windows=4)]
    with device_guard(model):
        for call in calls:
            try:
                call()
            except (NotImplementedError, RuntimeError) as err:
                assert "device" not in str(err).lower() or "meta" in str(err).lower(), err
        with P.attention_window(model, 6):
            assert model(tokens[:24][None].to("meta"))[0].shape == (1, 24, 11)
