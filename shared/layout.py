"""What a project folder is, written once: `NN-<slug>/` at the repository root (`run`, `gallery` and the layout
tests all ask this module)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent          # the repository (shared is installed editable)
PROJECT_FOLDER = re.compile(r"^\d\d-[a-z0-9-]+$")


def project_folders(root: Path = ROOT) -> list[Path]:
    """The project folders under `root`, in order (01-..., 02-..., ...)."""
    return sorted(p for p in Path(root).iterdir() if p.is_dir() and PROJECT_FOLDER.match(p.name))
