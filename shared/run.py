"""Re-execute notebooks in place so their committed outputs are fresh.

    python -m shared.run            # every NN-*/NN-*.ipynb, in order
    python -m shared.run 01 05      # only these folders

Each notebook runs from its own folder in a fresh kernel of the current Python, top to bottom; the time per
notebook is printed, and the first failing cell is shown with its error before the command exits non-zero.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .layout import ROOT, project_folders


def find_notebooks(prefixes: list[str]) -> list[Path]:
    folders = project_folders(ROOT)
    if prefixes:
        unknown = [x for x in prefixes if not any(f.name.startswith(x) for f in folders)]
        if unknown:
            raise SystemExit(f"no project folder starts with {unknown}; folders: {[f.name for f in folders]}")
        folders = [f for f in folders if any(f.name.startswith(x) for x in prefixes)]
    return [nb for f in folders for nb in sorted(f.glob("*.ipynb"))]


def execute(path: Path, timeout: int) -> float:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    try:
        client.execute()
    finally:
        nbformat.write(nb, path)  # keep what ran, including the error, so the failing cell can be inspected
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", help="folder number prefixes such as 01 02 (default: all)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell (default 900)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # kernels inherit it (see the root conftest.py)
    os.environ["LLMP_PROGRESS"] = "0"                       # no progress bar's text in the committed outputs
    notebooks = find_notebooks(args.folders)
    if not notebooks:
        print("no notebooks found")
        return 1
    total = 0.0
    for path in notebooks:
        rel = path.relative_to(ROOT)
        print(f"running {rel} ...", flush=True)
        try:
            seconds = execute(path, args.timeout)
        except Exception as exc:  # nbclient raises CellExecutionError with the cell source and traceback
            print(f"FAILED {rel}\n{exc}", file=sys.stderr)
            return 1
        total += seconds
        print(f"  ok in {seconds:.1f} s", flush=True)
    print(f"{len(notebooks)} notebook(s) in {total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
