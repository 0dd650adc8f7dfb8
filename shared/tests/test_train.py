"""The training loop: overfits one batch, is deterministic, follows its schedule, validates arguments."""
import pytest
import torch

from shared.model import GPT, GPTConfig
from shared.train import evaluate, evaluate_stream, lr_at, make_optimizer, train, train_step


def tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, d_model=32))


def test_overfits_one_batch():
    stream = torch.randint(0, 40, (17,), generator=torch.Generator().manual_seed(0))  # one window only
    m = tiny()
    hist = train(m, stream, steps=150, batch_size=4, lr=1e-2, progress=False, weight_decay=0.0)
    assert hist.train_loss[0] > 3.0 and hist.train_loss[-1] < 0.05
    assert not m.training


def test_deterministic_for_a_seed():
    stream = torch.randint(0, 40, (2000,), generator=torch.Generator().manual_seed(0))
    a, b = tiny(), tiny()
    ha = train(a, stream, stream, steps=20, batch_size=4, progress=False, seed=3)
    hb = train(b, stream, stream, steps=20, batch_size=4, progress=False, seed=3)
    assert ha.train_loss == hb.train_loss and ha.val_loss == hb.val_loss
    assert ha.val_step[-1] == 20 and len(ha.step) == 20 and ha.tokens_per_sec > 0
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)
    assert all(x >= y for x, y in zip(lrs[9:], lrs[10:]))


def test_lr_schedule_wsd_holds_then_decays():
    lrs = [lr_at(s, 100, 1.0, 10, 0.1, decay_start=60) for s in range(100)]
    assert lrs[9] == lrs[30] == lrs[60] == 1.0 and lrs[61] < 1.0     # warm-up, stable, decay
    assert lrs[-1] == pytest.approx(0.1)
    assert lr_at(50, 100, 1.0, 10, 0.1, decay_start=None) == lr_at(50, 100, 1.0, 10, 0.1, decay_start=10)


def test_train_step_is_the_loops_step_and_schedule_hooks_apply():
    """train() = warm-up/cosine lr + train_step on seeded windows: a hand loop of train_step reproduces it exactly;
    lr_schedule replaces the schedule and on_step sees every step."""
    stream = torch.randint(0, 40, (2000,), generator=torch.Generator().manual_seed(0))
    a, b = tiny(), tiny()
    seen = []
    ha = train(a, stream, steps=12, batch_size=4, progress=False, seed=5, lr_schedule=lambda s: 1e-3 * (s + 1),
               on_step=lambda step, model, loss: seen.append((step, loss.item())))
    assert [s for s, _ in seen] == list(range(12)) and [l for _, l in seen] == ha.train_loss
    opt = make_optimizer(b, 1.0, 0.1, (0.9, 0.95))
    g = torch.Generator().manual_seed(5)
    from shared.data import random_windows
    for step in range(12):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * (step + 1)
        x, y = random_windows(stream, 16, 4, g)
        assert train_step(b, opt, x, y).item() == ha.train_loss[step]
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(TypeError, match="on_step"):
        train(tiny(), stream, steps=1, progress=False, on_step=3)


def test_evaluate_and_evaluate_stream_agree_on_full_windows():
    m = tiny().eval()
    stream = torch.randint(0, 40, (16 * 8 + 1,), generator=torch.Generator().manual_seed(1))
    full = evaluate_stream(m, stream, 16)
    with torch.no_grad():
        direct = m(stream[:-1].view(8, 16), stream[1:].view(8, 16))[1].item()
    assert full == pytest.approx(direct, rel=1e-6)
    assert evaluate(m, stream, 16, batch_size=4, n_batches=3) > 0
    assert 0 < evaluate_stream(m, stream[:40], 16) < 10   # with a short tail window


def test_bad_arguments():
    stream = torch.randint(0, 40, (100,))
    with pytest.raises(ValueError, match="steps"):
        train(tiny(), stream, steps=0, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(tiny(), stream, steps=1, lr=0, progress=False)


def test_train_takes_a_batch_callable():
    m = tiny()
    x = torch.randint(0, 40, (4, 8), generator=torch.Generator().manual_seed(0))
    calls = []

    def one_batch(gen):                                   # the same batch every step: must be memorised
        calls.append(gen)
        return x, torch.roll(x, -1, 1)

    h = train(m, one_batch, steps=60, lr=1e-2, progress=False)
    assert len(calls) == 60 and isinstance(calls[0], torch.Generator)
    assert h.train_loss[-1] < 0.5 * h.train_loss[0] and h.tokens_per_sec > 0
    with pytest.raises(TypeError, match="train_tokens"):
        train(m, [1, 2, 3], steps=1, progress=False)


def test_training_memory_does_not_grow_with_steps():
    """Regression: keeping each step's loss tensor grew RSS by about the logits' size per step (~5 MB here)."""
    import psutil
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=781, block_size=256, n_layer=1, n_head=2, d_model=32)
    tokens = torch.randint(0, 781, (20_000,))
    proc = psutil.Process()
    train(GPT(cfg), tokens, steps=10, batch_size=8, seq_len=256, progress=False)    # warm the allocator
    before = proc.memory_info().rss
    hist = train(GPT(cfg), tokens, steps=80, batch_size=8, seq_len=256, progress=False)
    grown = proc.memory_info().rss - before
    assert len(hist.train_loss) == 80
    assert grown < 150 * 2**20, f"RSS grew {grown / 2**20:.0f} MB over 80 steps (a leak would be ~400 MB)"
