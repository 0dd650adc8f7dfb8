"""The thin package every LLM Projects notebook imports.

Importing it sets the offline switches of the Hugging Face libraries (the product never downloads anything at
run time). `setup_notebook` does the rest of a notebook's setup cell: seeds, quiet libraries, plot style.
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
}.items():
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402
import torch  # noqa: E402

__all__ = ["SIZE", "pick", "device", "seed_everything", "setup_notebook", "versions"]

_SIZES = ("cpu", "gpu")


def _resolve_size() -> str:
    """`LLMP_SIZE` if set, else `gpu` when CUDA is available, else `cpu`."""
    size = os.environ.get("LLMP_SIZE", "").strip().lower()
    if not size:
        return "gpu" if torch.cuda.is_available() else "cpu"
    if size not in _SIZES:
        raise ValueError(f"LLMP_SIZE must be one of {_SIZES}, got {size!r}")
    return size


SIZE: str = _resolve_size()


def pick(*, cpu, gpu):
    """The value for the current size config: `pick(cpu=64, gpu=1024)`."""
    return gpu if SIZE == "gpu" else cpu


def device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
        "TQDM_DISABLE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TORCH_CPP_LOG_LEVEL": "ERROR",
    }.items():
        os.environ[key] = value
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


def setup_notebook(seed: int = 0, *, show: bool = True) -> None:
    """One call for a notebook's setup cell: seeds, quiet libraries, plot style, and a versions line.

    Put it in a cell whose first line is `# NBVAL_IGNORE_OUTPUT`: what it prints differs between machines.
    """
    quiet()
    seed_everything(seed)
    from . import plotting

    plotting.use_style()
    if show:
        line = "  ".join(f"{k} {v}" for k, v in versions().items())
        print(line)
        print(f"size config: {SIZE}   device: {device()}   torch threads: {torch.get_num_threads()}")
