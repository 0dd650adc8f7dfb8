"""The README's gallery says what the committed notebooks say, and every notebook carries its two tags."""
import base64
import io
import json
import shutil

import pytest

from shared import gallery

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def test_readme_gallery_matches_the_committed_notebooks():
    readme = (gallery.ROOT / "README.md").read_text()
    expected, entries = gallery.build(write=False)
    assert readme == expected, "README gallery is stale: run `python -m shared.gallery` and commit"
    for e in entries:
        if e.png is not None:
            assert (gallery.ROOT / gallery.THUMBS / f"{e.folder[:2]}.png").is_file(), f"thumbnail missing: {e.folder}"


def test_every_notebook_has_one_headline_and_one_results_cell():
    for folder in gallery.project_folders():
        entry = gallery.read_entry(folder)
        if entry.notebook is not None:
            assert entry.problems == [], f"{folder.name}: {entry.problems}"
            assert entry.png is not None and entry.claim and entry.numbers


def _png() -> str:
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [1, 0])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _fake_repo(tmp_path, number="0.38"):
    """A repo with README markers and one built folder (01) and one unbuilt (02)."""
    (tmp_path / "README.md").write_text(f"# x\n{gallery.START}\n{gallery.END}\nafter\n")
    built = tmp_path / "01-demo"
    built.mkdir()
    (built / "README.md").write_text("# 01 · Demo things: more words\n")
    cells = [
        {"cell_type": "code", "metadata": {"tags": ["headline"]}, "source": "plot()",
         "outputs": [{"output_type": "display_data", "data": {"image/png": _png(), "text/plain": "<Figure>"}}]},
        {"cell_type": "code", "metadata": {"tags": ["results"]}, "source": "show_results()",
         "outputs": [{"output_type": "stream", "name": "stdout",
                      "text": f"claim: Demo works.\nbits/char: {number}\n"}]},
    ]
    (built / "01-demo.ipynb").write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4,
                                                      "nbformat_minor": 5}))
    (tmp_path / "02-later").mkdir(exist_ok=True)
    return tmp_path


def test_generator_on_a_small_repo_and_the_drift_guard(tmp_path):
    root = _fake_repo(tmp_path)
    section, entries = gallery.build(root, write=True)
    readme = (root / "README.md").read_text()
    assert readme == section and readme.endswith("after\n")
    assert "Demo things" in readme and "bits/char: **0.38**" in readme and "Demo works." in readme
    assert "| **02** later | not built yet | — |" in readme                      # no broken image
    thumb = root / "docs" / "gallery" / "01.png"
    assert thumb.is_file() and 0 < thumb.stat().st_size < 60_000
    # A planted change of one number in a committed notebook: the README no longer matches -> the test fails.
    shutil.rmtree(root / "01-demo")
    _fake_repo(tmp_path, number="0.39")
    (root / "README.md").write_text(readme)
    regenerated, _ = gallery.build(root, write=False)
    assert regenerated != readme and "bits/char: **0.39**" in regenerated


def test_missing_tags_are_reported(tmp_path):
    root = _fake_repo(tmp_path)
    nb = json.loads((root / "01-demo" / "01-demo.ipynb").read_text())
    nb["cells"][0]["metadata"]["tags"] = []
    (root / "01-demo" / "01-demo.ipynb").write_text(json.dumps(nb))
    entry = gallery.read_entry(root / "01-demo", root)
    assert entry.png is None and "exactly one 'headline'" in entry.problems[0]


def test_show_results_format_and_errors(capsys):
    gallery.show_results("It works.", {"speedup": 16, "equal": True})
    assert capsys.readouterr().out == "claim: It works.\nspeedup: 16\nequal: True\n"
    with pytest.raises(ValueError, match="one non-empty line"):
        gallery.show_results("two\nlines", {"a": 1})
    with pytest.raises(TypeError, match="non-empty dict"):
        gallery.show_results("ok", {})
    with pytest.raises(TypeError, match="values must be"):
        gallery.show_results("ok", {"a": [1, 2]})
