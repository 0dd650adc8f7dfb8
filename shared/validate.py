"""Argument checks the project folders' helpers share: one wording for "expected an int >= k" everywhere.

    from shared.validate import check_int, check_ints
    n = check_int("n_merges", n_merges, 0)            # returns the value, so it can sit inside an expression
    check_ints(1, n_layer=n_layer, head_dim=head_dim)  # several at once, same lower bound

Wrong type -> TypeError, wrong value -> ValueError; the message names the argument, what was given and what is
allowed. `bool` is refused although it is an `int` subclass: `n_layer=True` is a bug, not a 1.
"""
from __future__ import annotations

__all__ = ["check_int", "check_ints"]


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
