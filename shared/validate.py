"""Argument checks the project folders' helpers share: one wording for "expected an int >= k" everywhere.

    from shared.validate import check_int, check_ints, check_float, check_choice, check_tensor, device_guard
    n = check_int("n_merges", n_merges, 0)            # returns the value, so it can sit inside an expression
    check_ints(1, n_layer=n_layer, head_dim=head_dim)  # several at once, same lower bound
    p = check_float("top_p", top_p, 0.0, 1.0, low_open=True)        # a float (or int) in (0, 1]
    kind = check_choice("norm", norm, ("rms", "layer"))
    check_tensor("logits", logits, dim=2, dtype=torch.float32)
    with device_guard(model): ...                      # every tensor reaching the model is on its device

Wrong type -> TypeError, wrong value -> ValueError; the message names the argument, what was given and what is
allowed. `bool` is refused although it is an `int` subclass: `n_layer=True` is a bug, not a 1.
"""
from __future__ import annotations

import contextlib
import itertools
import math

__all__ = ["check_int", "check_ints", "check_float", "check_choice", "check_tensor", "device_guard"]


def check_int(name: str, value, minimum: int | None = None) -> int:
    """`value` must be an int (not a bool) and, if `minimum` is given, >= minimum. Returns `value`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_ints(minimum: int | None, **values) -> None:
    """`check_int(name, value, minimum)` for each keyword argument."""
    for name, value in values.items():
        check_int(name, value, minimum)


def check_float(name: str, value, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> float:
    """`value` must be a finite real number (int or float, not bool) within [low, high] (an end is excluded when
    `low_open`/`high_open`; None = unbounded). Returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or too_low or too_high:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value}")
    return value


def check_choice(name: str, value, choices):
    """`value` must be one of `choices`. Returns it."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_tensor(name: str, value, *, dim: int | None = None, dtype=None, shape: tuple | None = None):
    """`value` must be a torch.Tensor, with `dim` dimensions, of `dtype` (a dtype or a tuple of them) and of
    `shape` (None entries match any size) when given. Returns it."""
    import torch

    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(value.shape)}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if dtype is not None and value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {value.dtype}")
    if shape is not None and (len(shape) != value.dim()
                              or any(want is not None and want != got for want, got in zip(shape, value.shape))):
        raise ValueError(f"{name} must have shape {tuple(shape)} (None: any), got {tuple(value.shape)}")
    return value


@contextlib.contextmanager
def device_guard(model):
    """Inside the block, every tensor passed to a submodule of `model` must sit on that submodule's device (the
    device of its own parameters or buffers); otherwise a ValueError names the module and both devices.

    torch itself refuses CPU inputs to a CUDA layer, but only on a GPU machine. For a test without one, put the
    model on the `meta` device (shapes, no values) and run a helper inside the guard: an input the helper forgot
    to move to the model's device is then caught. The helper may still stop later at its first read of a value
    (`.item()`, `.numpy()`), which a meta tensor does not have: that error means the device plumbing held so far.
    """
    import torch

    def first_device(module):
        for t in itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)):
            return t.device
        return None

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                yield from tensors(item)
        elif isinstance(obj, dict):
            for item in obj.values():
                yield from tensors(item)

    def check(module, args, kwargs, name):
        dev = first_device(module)
        for t in tensors((args, kwargs)):
            if dev is not None and t.device != dev:
                raise ValueError(f"device mismatch: a {tuple(t.shape)} input on {t.device} reached "
                                 f"{name or 'the model'} ({type(module).__name__}) on {dev}; move inputs to the "
                                 f"model's device (shared.model.model_device(model))")

    handles = []
    try:
        for name, module in model.named_modules():
            if first_device(module) is not None:
                handles.append(module.register_forward_pre_hook(
                    lambda m, a, k, name=name: check(m, a, k, name), with_kwargs=True))
        yield model
    finally:
        for h in handles:
            h.remove()
