"""Size switch, seeding, benchmarking and plotting helpers."""
import importlib
import io
import math

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import shared  # noqa: E402
from shared import bench, plotting  # noqa: E402


def test_size_switch(monkeypatch):
    monkeypatch.setenv("LLMP_SIZE", "gpu")
    assert importlib.reload(shared).pick(cpu=1, gpu=2) == 2
    monkeypatch.setenv("LLMP_SIZE", "cpu")
    assert importlib.reload(shared).pick(cpu=1, gpu=2) == 1
    monkeypatch.setenv("LLMP_SIZE", "tpu")
    with pytest.raises(ValueError, match="LLMP_SIZE"):
        importlib.reload(shared)
    monkeypatch.delenv("LLMP_SIZE")
    importlib.reload(shared)
    assert shared.device().type in ("cpu", "cuda")


def test_seed_everything_repeats_draws():
    shared.seed_everything(3)
    a = torch.rand(3)
    shared.seed_everything(3)
    assert torch.equal(a, torch.rand(3))
    with pytest.raises(TypeError):
        shared.seed_everything(1.5)


def test_setup_notebook_prints_versions(capsys):
    shared.setup_notebook(seed=0)
    out = capsys.readouterr().out
    assert "torch" in out and "size config" in out


def test_timeit_counts_repeats():
    calls = []
    t = bench.timeit(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and len(t.times) == 5 and t.lo <= t.median <= t.hi
    ticks = iter(range(100))
    t = bench.timeit(lambda: None, warmup=0, repeats=3, clock=lambda: float(next(ticks)))
    assert t.times == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        bench.timeit(lambda: None, repeats=0)


def test_tensor_bytes():
    lin = torch.nn.Linear(10, 4, bias=False)
    assert bench.tensor_bytes(lin) == 40 * 4
    x = torch.zeros(5, dtype=torch.bfloat16)
    assert bench.tensor_bytes(x, x) == 10          # the same tensor once
    assert bench.tensor_bytes([x, torch.zeros(2)]) == 18
    assert bench.tensor_bytes([x, [x]], x) == 10    # counted once however it is nested
    assert bench.tensor_bytes(torch.empty(2**20, device="meta"), torch.empty(2**20, device="meta")) == 2**23
    assert bench.peak_rss_bytes() > 1_000_000
    with pytest.raises(TypeError):
        bench.tensor_bytes("x")


def test_plot_helpers():
    fig, (a, b) = plt.subplots(1, 2)
    plotting.heatmap(a, torch.eye(3), ["a", "b", "c"], ["a", "b", "c"], title="eye")
    x = [1, 10, 100, 1000]
    slope, intercept = plotting.loglog_fit(b, x, [3 * v ** -0.5 for v in x])
    assert slope == pytest.approx(-0.5) and math.exp(intercept) == pytest.approx(3)
    plotting.floor_line(b, 0.3)
    fig.savefig(io.BytesIO(), format="png")
    plt.close(fig)
    with pytest.raises(ValueError):
        plotting.heatmap(a, torch.eye(3), ["a"], None)
    with pytest.raises(ValueError):
        plotting.loglog_fit(b, [1, 2], [0, 1])
