"""The repository's import rules, enforced.

pytest's default import mode puts each test file's folder on `sys.path` and imports the file, and the helper it
imports, under their bare module names. Two folders with an `attention.py`, or a folder `test_model.py` beside
`shared/tests/test_model.py`, would make one test silently import the other folder's module. So every Python
module name outside the `shared` package must be unique across the repository, and none may shadow `shared`.
Project folders never import each other, and `shared` never imports a project folder.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from shared.layout import ROOT, project_folders

EXEMPT = {"conftest.py", "__init__.py"}          # pytest and packages give these their own names


def bare_modules(root: Path) -> dict[str, list[Path]]:
    """Module name -> files, for every .py imported under its bare name: project folders and shared/tests."""
    found = defaultdict(list)
    folders = project_folders(root) + [root / "shared" / "tests"]
    for folder in folders:
        for path in folder.rglob("*.py"):
            if path.name not in EXEMPT and not any(part.startswith(".") for part in path.relative_to(root).parts):
                found[path.stem].append(path.relative_to(root))
    return found


def duplicate_module_names(root: Path) -> dict[str, list[Path]]:
    """Names that stand for two or more files, or that shadow the `shared` package."""
    return {name: paths for name, paths in bare_modules(root).items() if len(paths) > 1 or name == "shared"}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_module_names_are_unique_across_the_repo():
    assert duplicate_module_names(ROOT) == {}, "rename so every helper/test module name is unique (CONTRIBUTING.md)"


def test_the_guard_fails_on_a_planted_duplicate(tmp_path):
    for rel in ("07-a/attention.py", "09-b/attention.py", "08-c/test_model.py", "shared/tests/test_model.py",
                "10-d/shared.py", "10-d/norms.py", "shared/tests/conftest.py", "10-d/conftest.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    found = duplicate_module_names(tmp_path)
    assert set(found) == {"attention", "test_model", "shared"}
    assert sorted(map(str, found["attention"])) == ["07-a/attention.py", "09-b/attention.py"]


def test_imports_point_one_way():
    modules = bare_modules(ROOT)
    for name, paths in modules.items():
        for path in paths:
            folder = path.parts[0]
            foreign = {m for m in imported_roots(ROOT / path) & set(modules)
                       if all(p.parts[0] != folder for p in modules[m])}
            assert not foreign, f"{path} imports {sorted(foreign)} from another folder"
    for path in (ROOT / "shared").glob("*.py"):
        assert not imported_roots(path) & set(modules), f"shared/{path.name} imports a project folder's module"


def test_pytest_testpaths_list_every_project_folder():
    """pytest collects only `testpaths`: a new folder missing there would be skipped silently by CI."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert config["testpaths"] == ["shared"] + [p.name for p in project_folders(ROOT)], \
        "add the new project folder to pyproject.toml's testpaths (CONTRIBUTING.md: Adding notebook 17)"
