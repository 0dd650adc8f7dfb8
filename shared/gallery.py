"""The README's results gallery, generated from the committed notebooks (never re-executed).

Every notebook has one cell tagged `headline` (its figure is the project's picture) and one tagged `results`,
which calls `show_results(claim, numbers)`. `python -m shared.gallery` reads each committed notebook, writes the
headline figure as a thumbnail under `docs/gallery/`, and rewrites the README section between the markers;
`shared/tests/test_gallery.py` fails when the README differs from what the notebooks say.
"""
from __future__ import annotations

import numbers as _numbers


def show_results(claim: str, numbers: dict) -> None:
    """Print a project's headline claim and its key numbers, one per line, in the form the gallery reads.

    `claim`: one sentence with no machine-dependent number in it. `numbers`: a few name -> value pairs,
    rounded by the caller to what survives another machine and another zoo seed (nbval compares this output).
    """
    if not isinstance(claim, str) or not claim.strip() or "\n" in claim:
        raise ValueError(f"claim must be one non-empty line, got {claim!r}")
    if not isinstance(numbers, dict) or not numbers:
        raise TypeError("numbers must be a non-empty dict of name -> value")
    print(f"claim: {claim.strip()}")
    for name, value in numbers.items():
        if not isinstance(name, str) or ":" in name or "\n" in name:
            raise ValueError(f"number names must be strings without ':' or newlines, got {name!r}")
        if not isinstance(value, (_numbers.Number, str, bool)):
            raise TypeError(f"{name}: values must be numbers, booleans or short strings, got {type(value).__name__}")
        print(f"{name}: {value}")
