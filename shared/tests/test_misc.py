"""Size switch, seeding, benchmarking and plotting helpers."""
import importlib
import io
import math
import time

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import shared  # noqa: E402
from shared import bench, plotting  # noqa: E402


def test_size_switch(monkeypatch):
    monkeypatch.setenv("LLMP_SIZE", "cpu")
    assert importlib.reload(shared).pick(cpu=1, gpu=2) == 1 and shared.device().type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)       # a GPU machine, as the size rule sees it
    assert importlib.reload(shared).device().type == "cpu"              # the cpu size runs on the CPU there too
    monkeypatch.setenv("LLMP_SIZE", "gpu")
    assert importlib.reload(shared).pick(cpu=1, gpu=2) == 2 and shared.device().type == "cuda"
    monkeypatch.delenv("LLMP_SIZE")
    assert importlib.reload(shared).SIZE == "gpu"                       # automatic: gpu only where CUDA is
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert importlib.reload(shared).SIZE == "cpu"
    monkeypatch.setenv("LLMP_SIZE", "gpu")                              # asked for, without a GPU: refused
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        importlib.reload(shared)
    monkeypatch.setenv("LLMP_SIZE", "tpu")
    with pytest.raises(ValueError, match="LLMP_SIZE"):
        importlib.reload(shared)
    monkeypatch.undo()
    importlib.reload(shared)


def test_pytest_pins_the_cpu_size_and_no_progress_bars(monkeypatch):
    import os
    assert os.environ["LLMP_PROGRESS"] == "0" and shared.progress_bars() is False   # root conftest.py
    if "LLMP_SIZE" in os.environ:            # unless a person set it by hand, the conftest pinned the cpu size
        assert os.environ["LLMP_SIZE"] in ("cpu", "gpu")
    monkeypatch.setenv("LLMP_PROGRESS", "1")
    assert shared.progress_bars() is True
    monkeypatch.setenv("LLMP_PROGRESS", "yes")
    with pytest.raises(ValueError, match="LLMP_PROGRESS"):
        shared.progress_bars()


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
    assert bench.rss_bytes() > 1_000_000
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


def test_tensor_bytes_counts_views_once():
    x = torch.zeros(10, 4)                                   # 160 bytes
    assert bench.tensor_bytes(x, x[:3], x.T, x.view(40)) == 160
    assert bench.tensor_bytes(x[:5]) == 80                   # a slice alone: only what it spans
    assert bench.tensor_bytes(x[:5], x[5:]) == 160           # two halves: the whole
    assert bench.tensor_bytes(x[:6], x[4:]) == 160           # overlapping halves: still the whole
    tied = torch.nn.Linear(4, 10, bias=False)
    emb = torch.nn.Embedding(10, 4)
    tied.weight = emb.weight
    assert bench.tensor_bytes(tied, emb) == 160


def test_setup_notebook_threads_and_timer(monkeypatch, capsys):
    monkeypatch.setenv("LLMP_THREADS", "1")
    before = torch.get_num_threads()
    try:
        timer = shared.setup_notebook(seed=0)
        assert torch.get_num_threads() == 1 and timer.seconds() >= 0 and str(timer).endswith("(1 thread)")
        shared.setup_notebook(seed=0, n_threads=2, show=False)
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="n_threads"):
            shared.setup_notebook(seed=0, n_threads=0)
        monkeypatch.setenv("LLMP_THREADS", "two")
        with pytest.raises(ValueError, match="LLMP_THREADS"):
            shared.threads()
    finally:
        torch.set_num_threads(before)
    assert "OMP_WAIT_POLICY: PASSIVE" in capsys.readouterr().out


def test_check_verdicts_and_table(capsys):
    from shared import checks

    checks.reset()
    assert shared.check("exact ints", [1, 2, 3], torch.tensor([1, 2, 3]))
    assert shared.check("close floats", torch.tensor([1.0, 2.0]), [1.0, 2.0 + 1e-7], atol=1e-6)
    assert shared.check("relative", [1000.0], [1000.5], rtol=1e-3)
    assert shared.check("masked logits", [float("-inf"), 1.0], [float("-inf"), 1.0])
    assert shared.check("strings", "abc", "abc")
    assert not shared.check("too far", [1.0], [1.1], atol=1e-3, raise_on_fail=False)
    with pytest.raises(AssertionError, match="too far again"):
        shared.check("too far again", [1.0], [1.1], atol=1e-3)
    with pytest.raises(ValueError, match="shapes differ"):
        shared.check("shapes", [1, 2], [1, 2, 3])
    with pytest.raises(AssertionError):
        shared.check("nan never passes", [float("nan")], [1.0], atol=1.0)
    out = capsys.readouterr().out
    assert "exact" in out and "ok" in out and "FAILED" in out
    table = shared.checks_table()
    assert [c.passed for c in table] == [True, True, True, True, True, False, False, False]
    assert table[1].max_abs_diff == pytest.approx(1e-7, rel=1e-3)
    assert "5 of 8 checks passed" in capsys.readouterr().out


def test_peak_rss_sees_a_short_lived_buffer():
    assert bench.large_allocations_from_os() in (True, False)
    with bench.PeakRSS() as mem:
        x = torch.ones(64 * 2**20 // 4)            # 64 MiB, written (so resident), then freed
        time.sleep(0.01)
        del x
    assert mem.peak_growth > 32 * 2**20
    with bench.PeakRSS() as idle:
        pass
    assert idle.peak_growth < 16 * 2**20
    with pytest.raises(ValueError):
        bench.PeakRSS(interval_s=0)
    with pytest.raises(ValueError):
        bench.large_allocations_from_os(-1)


def test_check_int_accepts_ints_and_names_the_argument():
    from shared.validate import check_int, check_ints
    assert check_int("n", 3) == 3 and check_int("n", 0, 0) == 0
    check_ints(1, a=1, b=7)
    with pytest.raises(TypeError, match=r"n_layer must be an int, got bool True"):
        check_int("n_layer", True, 1)                  # bool is an int subclass, refused on purpose
    with pytest.raises(TypeError, match=r"steps must be an int, got float 2.0"):
        check_int("steps", 2.0)
    with pytest.raises(ValueError, match=r"head_dim must be >= 2, got 1"):
        check_int("head_dim", 1, 2)
    with pytest.raises(ValueError, match=r"b must be >= 1, got 0"):
        check_ints(1, a=1, b=0)


def test_wilson_equals_scipy_and_validates():
    import numpy as np
    from scipy.stats import binomtest
    from shared.stats import wilson
    for k, n in [(0, 1), (0, 10), (3, 10), (10, 10), (37, 50), (512, 1000)]:
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        low, high = wilson(k, n, z=1.959963984540054)       # scipy uses the exact normal quantile
        assert abs(low - ref.low) < 1e-12 and abs(high - ref.high) < 1e-12, (k, n)
    assert wilson(np.int64(3), np.int64(10)) == wilson(3, 10)   # counts summed from arrays are accepted
    low, high = wilson(0, 5)
    assert low == 0.0 and 0 < high < 1                          # not empty at zero successes
    with pytest.raises(ValueError, match="successes must be <= n"):
        wilson(6, 5)
    with pytest.raises(ValueError, match="n must be >= 1"):
        wilson(0, 0)
    with pytest.raises(TypeError, match="successes must be an int"):
        wilson(2.5, 5)
    with pytest.raises(ValueError, match="z must be a number > 0"):
        wilson(1, 5, z=0)


def test_float_choice_and_tensor_checks():
    from shared.validate import check_choice, check_float, check_tensor
    assert check_float("p", 1, 0.0, 1.0, low_open=True) == 1.0
    for bad in (0.0, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"p must be a finite number in \(0.0, 1.0\]"):
            check_float("p", bad, 0.0, 1.0, low_open=True)
    with pytest.raises(TypeError, match="p must be a number"):
        check_float("p", True)
    assert check_float("lr", 3e-3, 0.0, low_open=True) == 3e-3
    assert check_choice("norm", "rms", ("rms", "layer")) == "rms"
    with pytest.raises(ValueError, match=r"norm must be one of \('rms', 'layer'\), got 'batch'"):
        check_choice("norm", "batch", ("rms", "layer"))
    x = torch.zeros(2, 3, dtype=torch.long)
    assert check_tensor("idx", x, dim=2, dtype=torch.long, shape=(None, 3)) is x
    with pytest.raises(TypeError, match="idx must be a torch.Tensor"):
        check_tensor("idx", [[0]])
    with pytest.raises(ValueError, match="2 dimensions"):
        check_tensor("idx", x[0], dim=2)
    with pytest.raises(TypeError, match="dtype torch.float32 or torch.float16"):
        check_tensor("idx", x, dtype=(torch.float32, torch.float16))
    with pytest.raises(ValueError, match=r"shape \(None, 4\)"):
        check_tensor("idx", x, shape=(None, 4))


def test_device_guard_catches_an_input_left_on_the_cpu():
    # The shape of 04's GPU bug (model moved to the device, a probe batch built on the CPU) without a GPU: the model
    # on `meta`; a helper that moves its batch passes the guard, one that forgets is stopped by it.
    from shared.model import GPT, GPTConfig
    from shared.validate import device_guard

    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, d_model=16)).to("meta")
    x = torch.randint(0, 50, (2, 8))

    def careful(m):
        logits, _ = m(x.to(next(m.parameters()).device))
        return logits.shape

    def careless(m):
        return m(x)[0].shape

    with device_guard(model):
        assert careful(model) == (2, 8, 50)
        with pytest.raises(ValueError, match="device mismatch.*on cpu.*on meta"):
            careless(model.blocks[0])                       # any submodule with weights is guarded
        with pytest.raises(ValueError, match="idx is on cpu, the model on meta"):
            careless(model)                                  # GPT.forward refuses it by itself too
    assert careful(model) == (2, 8, 50)                      # hooks removed on exit
    plain = torch.nn.Linear(4, 4).to("meta")
    with device_guard(plain), pytest.raises(ValueError, match="device mismatch"):
        plain(torch.zeros(1, 4))


def test_memory_bandwidth_and_matmul_flops_are_measured_and_validated():
    read, t = bench.memory_bandwidth(8 * 2**20, "read", repeats=3)
    copy, _ = bench.memory_bandwidth(8 * 2**20, "copy", repeats=3)
    assert 1e8 < read < 1e13 and 1e8 < copy < 1e13 and len(t.times) == 3     # bytes/s: plausible, not a constant
    flops, _ = bench.matmul_flops(128, repeats=3)
    assert 1e7 < flops < 1e14
    with pytest.raises(ValueError, match="kind must be one of"):
        bench.memory_bandwidth(kind="write")
    with pytest.raises(ValueError, match="nbytes must be >= 1048576"):
        bench.memory_bandwidth(1000)
    with pytest.raises(ValueError, match="n must be >= 16"):
        bench.matmul_flops(4)
