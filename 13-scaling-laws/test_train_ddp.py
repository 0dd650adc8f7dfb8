"""train_ddp.py on real engines: 2 processes under torchrun (DDP, DeepSpeed ZeRO-2) take the same steps as
one plain process at the same global batch; on CPU over gloo unless two GPUs exist (`train_ddp.launch_plan`).
About 40 s on 2 idle cores (process start-up dominates).

Tolerance: the losses agree to atol 1e-4 over 20 AdamW steps. Two processes add the two halves' gradients in
another order than one process does (float rounding, ~1e-7 per step, measured 5e-7 after 20 steps); the
control (one process at HALF the global batch, i.e. what a wrong data split would train on) differs by > 1e-2.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_ddp

HERE = Path(__file__).resolve().parent
COMMON = ["--steps", "20", "--seq-len", "32", "--d-model", "32", "--n-layer", "2", "--n-head", "2",
          "--n-stories", "200"]
# never two ranks on one GPU: two CPU processes over gloo unless two GPUs exist; every run (the single-process
# reference included) on the same kind of device
_NPROC, _EXTRA = train_ddp.launch_plan(2, torch.cuda.device_count() if torch.cuda.is_available() else 0)
COMMON = COMMON + _EXTRA
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TORCH_CPP_LOG_LEVEL": "ERROR"}


def _run(tmp_path, name, args, nproc=None) -> dict:
    out = tmp_path / f"{name}.json"
    launcher = [sys.executable] if nproc is None else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    # --standalone: torchrun binds a free port itself (a port picked here and released before torchrun binds it
    # could be taken in between by another process, e.g. a notebook kernel under `pytest -n auto`)
    proc = subprocess.run([*launcher, str(HERE / "train_ddp.py"), *COMMON, *args, "--out", str(out)],
                          cwd=HERE, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def _run_here(args) -> dict:
    """One plain process, run inside this one (no launcher, no RANK): what `python train_ddp.py` computes, without
    the start-up of a fresh interpreter (CPU budget)."""
    assert "RANK" not in os.environ, "the in-process reference must not see a launcher's RANK"
    return train_ddp.main([*COMMON, *args])


@pytest.fixture(scope="module")
def single():
    return _run_here(["--global-batch", "8"])


def test_ddp_two_processes_equal_one_process(single, tmp_path):
    ddp = _run(tmp_path, "ddp", ["--global-batch", "8"], nproc=_NPROC)
    half = _run_here(["--global-batch", "4"])         # control: what one rank alone would train on
    assert ddp["world_size"] == 2 and ddp["local_batch"] == 4 and single["world_size"] == 1
    one, two, ctrl = (np.array(r["losses"]) for r in (single, ddp, half))
    assert one[-1] < one[0] - 1.0                                   # it trains
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-4)
    assert np.abs(ctrl - one).max() > 1e-2                          # the tolerance tells a wrong batch apart


@pytest.mark.parametrize("zero", [2])          # ZeRO-2 only (budget): it shards what ZeRO-1 shards, plus gradients
def test_deepspeed_zero_two_processes_equal_one_process(single, tmp_path, zero):
    # ZeRO-2 shards the AdamW states and the gradients across the two processes: the same steps as one process
    pytest.importorskip("deepspeed")
    ds = _run(tmp_path, "ds", ["--global-batch", "8", "--engine", "deepspeed", "--zero", str(zero)], nproc=_NPROC)
    assert ds["engine"] == "deepspeed" and ds["zero"] == zero and ds["world_size"] == 2
    np.testing.assert_allclose(np.array(ds["losses"]), np.array(single["losses"]), rtol=0, atol=1e-4)


def test_story_bytes_are_a_deterministic_byte_stream():
    a, b = train_ddp.story_bytes(5, seed=3), train_ddp.story_bytes(5, seed=3)
    assert a.dtype.is_floating_point is False and a.dim() == 1
    assert int(a.min()) >= 0 and int(a.max()) < 256
    assert bool((a == b).all()) and not bool((a[:200] == train_ddp.story_bytes(5, seed=4)[:200]).all())


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--global-batch", "0"], ["--engine", "horovod"],
                                  ["--zero", "3"]])
def test_bad_arguments_exit_with_a_usage_error(argv):
    with pytest.raises(SystemExit):
        train_ddp.parse_args(argv)


def test_main_trains_in_one_plain_process_without_a_launcher(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    result = train_ddp.main(["--steps", "2", "--global-batch", "3", "--seq-len", "8", "--d-model", "16",
                             "--n-layer", "1", "--n-head", "2", "--n-stories", "20"])
    assert result["world_size"] == 1 and result["local_batch"] == 3 and len(result["losses"]) == 2


def test_backend_is_nccl_with_cuda_and_gloo_without():
    # the selection only: the NCCL path itself needs a GPU and is not run on these CPU-only machines
    assert train_ddp.backend(True) == "nccl"
    assert train_ddp.backend(False) == "gloo"
    with pytest.raises(TypeError, match="cuda"):
        train_ddp.backend("yes")


def test_launch_plan_never_puts_two_processes_on_one_gpu():
    assert train_ddp.launch_plan(2, 0) == (2, ["--cpu"])          # CPU machine: gloo
    assert train_ddp.launch_plan(2, 1) == (2, ["--cpu"])          # one GPU: not two ranks on it
    assert train_ddp.launch_plan(2, 8) == (2, [])                 # enough GPUs: NCCL, one per rank
    with pytest.raises(ValueError, match="world"):
        train_ddp.launch_plan(0, 0)
    with pytest.raises(ValueError, match="cuda_devices"):
        train_ddp.launch_plan(2, True)
