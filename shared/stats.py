"""Small statistics the notebooks share.

    from shared.stats import wilson
    low, high = wilson(successes=37, n=50)   # 95 % interval of the fraction 37/50

Kept here so that every folder reports an accuracy's uncertainty the same way.
"""
from __future__ import annotations

import math
import operator

from shared.validate import check_int

__all__ = ["wilson"]


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (default 95 %, z = 1.96) of the fraction successes / n: (low, high).

    Unlike the normal interval p ± z·sqrt(p(1-p)/n) it is not empty at 0 or n successes and stays inside
    [0, 1] (clipped, against rounding). Raises TypeError for non-int counts, ValueError unless 0 <= successes <= n,
    n >= 1 and z > 0."""
    n, successes = _count("n", n, 1), _count("successes", successes, 0)
    if successes > n:
        raise ValueError(f"successes must be <= n, got successes={successes}, n={n}")
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not z > 0:
        raise ValueError(f"z must be a number > 0, got {z!r}")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _count(name: str, value, minimum: int) -> int:
    """An integer count (a numpy or torch integer scalar too, since counts are often sums of arrays)."""
    if not isinstance(value, bool) and hasattr(value, "__index__") and not isinstance(value, int):
        value = operator.index(value)
    return check_int(name, value, minimum)
