"""Every from-scratch piece is compared with a trusted reference: `check` does it one way in every notebook.

    shared.check("RoPE vs HF Llama", ours, theirs, atol=1e-5)      # prints: RoPE vs HF Llama ... ok
    shared.checks_table()                                          # every check of this run, with its raw diff

The printed verdict depends only on whether the difference is inside the stated tolerance, so it is stable
across machines (nbval compares it); the raw differences, which are float noise, go in `checks_table()`, printed
in a cell marked `# NBVAL_IGNORE_OUTPUT`. A failed check raises, so a notebook cannot carry on past a broken piece.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Check:
    name: str
    max_abs_diff: float       # max |ours - reference| (0 for an exact match of integers/strings)
    atol: float
    rtol: float
    passed: bool


_CHECKS: list[Check] = []


def reset() -> None:
    """Forget the recorded checks (`setup_notebook` calls it)."""
    _CHECKS.clear()


def _as_array(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.double() if x.is_floating_point() else x).numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # numpy accepts nearly everything; ragged lists it does not
        raise TypeError(f"{name} must be a tensor, array, number or (nested) list, got {type(x).__name__}") from exc


def _max_diff(ours, reference) -> float:
    if isinstance(ours, str) or isinstance(reference, str):
        return 0.0 if ours == reference else math.inf
    a, b = _as_array(ours, "ours"), _as_array(reference, "reference")
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: ours {a.shape} vs reference {b.shape}")
    if a.size == 0:
        return 0.0
    if a.dtype.kind in "biu" and b.dtype.kind in "biu":
        return float(np.abs(a.astype(np.int64) - b.astype(np.int64)).max())
    a, b = a.astype(np.float64), b.astype(np.float64)
    same_inf = np.isinf(a) & (a == b)                                   # -inf == -inf (masked logits)
    with np.errstate(invalid="ignore"):
        diff = np.where(same_inf, 0.0, np.abs(a - b))
    return float(np.nan_to_num(diff, nan=math.inf).max())


def check(name: str, ours, reference, *, atol: float = 0.0, rtol: float = 0.0, raise_on_fail: bool = True) -> bool:
    """Compare `ours` with `reference` elementwise: |ours - ref| <= atol + rtol * |ref| everywhere.

    Accepts tensors, arrays, numbers, nested lists and strings (strings: exact). With atol = rtol = 0 the check
    is exact equality. Prints one line (name, tolerance, verdict), records the raw max difference for
    `checks_table`, and raises AssertionError on a failure unless `raise_on_fail=False`. Returns the verdict.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    if atol < 0 or rtol < 0:
        raise ValueError(f"atol and rtol must be >= 0, got {atol}, {rtol}")
    diff = _max_diff(ours, reference)
    if rtol:
        a = np.asarray(_as_array(ours, "ours"), dtype=np.float64)
        b = np.asarray(_as_array(reference, "reference"), dtype=np.float64)
        finite = np.isfinite(b)
        passed = bool(np.all(np.where(finite, np.abs(a - b) <= atol + rtol * np.abs(b), a == b)))
    else:
        passed = diff <= atol
    _CHECKS.append(Check(name, diff, atol, rtol, passed))
    tol = "exact" if atol == 0 and rtol == 0 else " ".join(
        f"{k} {v:.0e}" for k, v in (("atol", atol), ("rtol", rtol)) if v)
    print(f"{name:<52} {tol:>18}  {'ok' if passed else 'FAILED'}")
    if not passed and raise_on_fail:
        raise AssertionError(f"check {name!r} failed: max |diff| {diff:.3g} outside atol {atol:g} rtol {rtol:g}")
    return passed


def checks_table(show: bool = True) -> list[Check]:
    """Every check recorded since setup, with its raw max |diff|: print it in a `# NBVAL_IGNORE_OUTPUT` cell."""
    if show:
        width = max([52] + [len(c.name) for c in _CHECKS])              # long names keep the columns aligned
        print(f"{'check':<{width}} {'max |diff|':>11} {'atol':>7} {'rtol':>7}  verdict")
        for c in _CHECKS:
            print(f"{c.name:<{width}} {c.max_abs_diff:11.2e} {c.atol:7.0e} {c.rtol:7.0e}  {'ok' if c.passed else 'FAILED'}")
        print(f"{sum(c.passed for c in _CHECKS)} of {len(_CHECKS)} checks passed")
    return list(_CHECKS)
