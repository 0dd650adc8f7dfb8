"""The thin package every LLM Projects notebook imports.

Importing it sets the offline switches of the Hugging Face libraries (the product never downloads anything at
run time) and OpenMP's passive wait policy (below). `setup_notebook` does the rest of a notebook's setup cell:
threads, seeds, quiet libraries, plot style, a run timer; `check` records every comparison with a reference.
"""
from __future__ import annotations

import logging
import os
import random
import warnings

# Offline and quiet before transformers/datasets/tokenizers are imported anywhere.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # OpenMP threads that wait for work spin on their core by default. On a 2-core machine with anything else
    # running, two torch threads then stall each other: a tiny GPT's training step measured 6x slower
    # (2.2k vs 12.7k tokens/s at 1 thread); PASSIVE restored 12.1k. It only works if set before torch loads,
    # hence here, and in the root conftest.py for nbval's kernels.
    "OMP_WAIT_POLICY": "PASSIVE",
}.items():
    os.environ.setdefault(_key, _value)

import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from .checks import check, checks_table  # noqa: E402

__all__ = ["SIZE", "pick", "device", "progress_bars", "seed_everything", "setup_notebook", "versions", "threads", "RunTimer",
           "check", "checks_table"]

_SIZES = ("cpu", "gpu")


def _resolve_size() -> str:
    """`LLMP_SIZE` if set, else `gpu` when CUDA is available, else `cpu`.

    The gpu size is only ever chosen where the notebook really runs on the GPU: `LLMP_SIZE=gpu` on a machine
    without CUDA is refused here (the gpu configs are sized for one modern GPU; on 2 CPU cores they would run for
    hours to days per notebook). `pytest --nbval` pins `LLMP_SIZE=cpu` (root conftest.py): the committed outputs
    are the cpu size's, whatever the machine.
    """
    size = os.environ.get("LLMP_SIZE", "").strip().lower()
    cuda = torch.cuda.is_available()
    if not size:
        return "gpu" if cuda else "cpu"
    if size not in _SIZES:
        raise ValueError(f"LLMP_SIZE must be one of {_SIZES}, got {size!r}")
    if size == "gpu" and not cuda:
        raise RuntimeError("LLMP_SIZE=gpu needs a CUDA GPU and none is visible (torch.cuda.is_available() is False): "
                           "the gpu configs would run on this CPU for hours to days per notebook. Unset LLMP_SIZE "
                           "(or set it to cpu) to run the cpu size.")
    return size


SIZE: str = _resolve_size()


def pick(*, cpu, gpu):
    """The value for the current size config: `pick(cpu=64, gpu=1024)`."""
    return gpu if SIZE == "gpu" else cpu


def device() -> torch.device:
    """Where models, batches and generators go: CUDA at the gpu size, else the CPU.

    Size and device move together: at the cpu size (the default without CUDA, and what `pytest --nbval` pins)
    everything runs on the CPU even on a GPU machine, so the outputs are the committed ones.
    """
    return torch.device("cuda" if SIZE == "gpu" else "cpu")


def progress_bars() -> bool:
    """Whether long loops show a tqdm bar: yes when a person runs a notebook, no under `pytest --nbval` and
    `python -m shared.run` (both set `LLMP_PROGRESS=0`: a bar's text would land in compared or committed output)."""
    value = os.environ.get("LLMP_PROGRESS", "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"LLMP_PROGRESS must be 0 or 1, got {value!r}")
    return value == "1"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) with one integer."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def quiet() -> None:
    """Silence what makes strict nbval flaky: progress bars, library warnings and log lines."""
    for key, value in {
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TORCH_CPP_LOG_LEVEL": "ERROR",
    }.items():
        os.environ[key] = value
    if not progress_bars():            # our own bars (shared.train, zoo builds) stay on for a person at a notebook
        os.environ["TQDM_DISABLE"] = "1"
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - datasets is a pinned requirement
        pass
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def versions() -> dict[str, str]:
    """Versions of the packages the notebooks lean on, for the setup cell."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in ("torch", "numpy", "transformers", "tokenizers", "datasets", "tiktoken", "matplotlib"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def threads() -> int:
    """The torch thread count the kit uses: `LLMP_THREADS` if set, else 2 (or 1 on a one-core machine).

    Two threads with the passive wait policy are the measured best on this repo's tiny models: idle, 24-28k vs
    16-19k tokens/s for one thread; with another process busy, 12.1k vs 12.7k. More threads do not help matrices
    of width 64-256 and make timings noisier.
    """
    value = os.environ.get("LLMP_THREADS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"LLMP_THREADS must be a positive integer, got {value!r}")
        return int(value)
    return max(1, min(2, os.cpu_count() or 1))


class RunTimer:
    """Wall and process-CPU seconds since the setup cell, for a notebook's closing line."""

    def __init__(self):
        self.wall_start, self.cpu_start = time.perf_counter(), time.process_time()

    def seconds(self) -> float:
        return time.perf_counter() - self.wall_start

    def cpu_seconds(self) -> float:
        return time.process_time() - self.cpu_start

    def __str__(self) -> str:
        n = torch.get_num_threads()
        return f"{self.seconds():.0f} s wall, {self.cpu_seconds():.0f} s CPU ({n} thread{'s' if n != 1 else ''})"


def setup_notebook(seed: int = 0, *, n_threads: int | None = None, show: bool = True) -> RunTimer:
    """One call for a notebook's setup cell: threads, seeds, quiet libraries, plot style; returns a `RunTimer`.

    `n_threads` defaults to `threads()`; pass 1 only for a stated reason (e.g. timing on the process CPU clock).
    Put it in a cell whose first line is `# NBVAL_IGNORE_OUTPUT`: what it prints differs between machines.
    """
    timer = RunTimer()
    n_threads = threads() if n_threads is None else n_threads
    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1:
        raise ValueError(f"n_threads must be a positive int, got {n_threads!r}")
    torch.set_num_threads(n_threads)
    quiet()
    seed_everything(seed)
    from . import checks, plotting

    checks.reset()
    plotting.use_style()
    if show:
        line = "  ".join(f"{k} {v}" for k, v in versions().items())
        print(line)
        print(f"size config: {SIZE}   device: {device()}   torch threads: {torch.get_num_threads()}   "
              f"OMP_WAIT_POLICY: {os.environ.get('OMP_WAIT_POLICY')}")
    return timer
