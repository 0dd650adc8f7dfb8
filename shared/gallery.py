"""The README's results gallery, generated from the committed notebooks (never re-executed).

Every notebook has one cell tagged `headline` (its figure is the project's picture) and one tagged `results`,
which calls `show_results(claim, numbers)`. `python -m shared.gallery` reads each committed notebook, writes the
headline figure as a thumbnail under `docs/gallery/`, and rewrites the README section between the markers;
`shared/tests/test_gallery.py` fails when the README differs from what the notebooks say.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import numbers as _numbers
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .layout import ROOT, project_folders


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


# ----------------------------------------------------------------------------------------------------------
# The generator: committed notebooks -> thumbnails + README section.
THUMBS = Path("docs") / "gallery"               # relative to the repo root
START, END = "<!-- gallery:start -->", "<!-- gallery:end -->"
THUMB_WIDTH = 480                                # pixels: enough to read a figure's shape, small in bytes


@dataclass
class Entry:
    folder: str                                  # e.g. "05-sampling"
    title: str                                   # from the folder README's first heading
    notebook: str | None = None                  # path relative to the root, None if not built yet
    claim: str = ""
    numbers: list[tuple[str, str]] = field(default_factory=list)
    png: bytes | None = None                     # the headline figure as committed
    problems: list[str] = field(default_factory=list)


def _title(folder: Path) -> str:
    """'Sampling' from a README starting '# 05 · Sampling: temperature, ...'; else the folder's words."""
    readme = folder / "README.md"
    first = readme.read_text().splitlines()[0] if readme.is_file() else ""
    match = re.match(r"^#\s*\d\d\s*·\s*([^:]+)", first)
    return match.group(1).strip() if match else folder.name[3:].replace("-", " ")


def _tagged(cells: list[dict], tag: str) -> list[dict]:
    return [c for c in cells if tag in c.get("metadata", {}).get("tags", [])]


def _stdout(cell: dict) -> str:
    return "".join("".join(o.get("text", "")) for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")


def read_entry(folder: Path, root: Path = ROOT) -> Entry:
    """What the gallery shows for one folder, read from its committed notebook (never executed here)."""
    entry = Entry(folder.name, _title(folder))
    notebooks = sorted(folder.glob(f"{folder.name[:2]}-*.ipynb"))
    if not notebooks:
        return entry
    path = notebooks[0]
    entry.notebook = path.relative_to(root).as_posix()
    cells = json.loads(path.read_text())["cells"]
    headline, results = _tagged(cells, "headline"), _tagged(cells, "results")
    if len(headline) != 1 or len(results) != 1:
        entry.problems.append(f"needs exactly one 'headline' and one 'results' cell, has {len(headline)} and "
                              f"{len(results)}")
    if headline:
        pngs = [o["data"]["image/png"] for o in headline[0].get("outputs", []) if "image/png" in o.get("data", {})]
        if pngs:
            entry.png = base64.b64decode("".join(pngs[0]) if isinstance(pngs[0], list) else pngs[0])
        else:
            entry.problems.append("the 'headline' cell has no PNG output")
    if results:
        for line in _stdout(results[0]).splitlines():
            key, sep, value = line.partition(": ")
            if not sep:
                continue
            if key == "claim":
                entry.claim = value.strip()
            else:
                entry.numbers.append((key.strip(), value.strip()))
        if not entry.claim:
            entry.problems.append("the 'results' cell printed no 'claim: ...' line (use shared.gallery.show_results)")
    return entry


def thumbnail(png: bytes, width: int = THUMB_WIDTH) -> bytes:
    """A smaller PNG of the figure (aspect kept), palette-quantised to stay light."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    height = max(1, round(img.height * width / img.width))
    small = img.resize((width, height), Image.LANCZOS).quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    small.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _thumb_name(entry: Entry) -> str:
    return (THUMBS / f"{entry.folder[:2]}.png").as_posix()


def render(entries: list[Entry]) -> str:
    """The README section (between the markers) for these entries."""
    lines = [START,
             "<!-- generated by `python -m shared.gallery` from the committed notebooks; do not edit by hand -->",
             "", "| project | headline figure | what it shows (numbers from the committed run) |",
             "| --- | --- | --- |"]
    for e in entries:
        title = e.title
        if e.notebook is None:
            lines.append(f"| **{e.folder[:2]}** {title} | not built yet | — |")
            continue
        link = f"[**{e.folder[:2]}** {title}]({e.notebook})"
        if e.png is None:
            picture = "no headline figure yet"
        else:
            digest = hashlib.sha256(e.png).hexdigest()[:12]
            picture = f'<a href="{e.notebook}"><img src="{_thumb_name(e)}" width="{THUMB_WIDTH}" alt="{title}"></a>' \
                      f"<!-- {digest} -->"
        numbers = "<br>".join(f"{k}: **{v}**" for k, v in e.numbers)
        text = e.claim.replace("|", "\\|") + (f"<br>{numbers}" if numbers else "")
        lines.append(f"| {link} | {picture} | {text or 'no results cell yet'} |")
    lines.append(END)
    return "\n".join(lines)


def replace_section(readme: str, section: str) -> str:
    if START not in readme or END not in readme:
        raise ValueError(f"README lacks the gallery markers {START} ... {END}")
    head, rest = readme.split(START, 1)
    return head + section + rest.split(END, 1)[1]


def build(root: Path = ROOT, write: bool = True) -> tuple[str, list[Entry]]:
    """Read every folder's notebook; write thumbnails and the README section (unless write=False)."""
    entries = [read_entry(f, root) for f in project_folders(root)]
    readme_path = root / "README.md"
    new = replace_section(readme_path.read_text(), render(entries))
    if write:
        (root / THUMBS).mkdir(parents=True, exist_ok=True)
        wanted = set()
        for e in entries:
            if e.png is not None:
                target = root / _thumb_name(e)
                wanted.add(target.name)
                data = thumbnail(e.png)
                if not target.exists() or target.read_bytes() != data:
                    target.write_bytes(data)
        for stale in (root / THUMBS).glob("*.png"):
            if stale.name not in wanted:
                stale.unlink()
        readme_path.write_text(new)
    return new, entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report whether the README is up to date")
    args = parser.parse_args(argv)
    new, entries = build(write=not args.check)
    for e in entries:
        for p in e.problems:
            print(f"{e.folder}: {p}", file=sys.stderr)
    if args.check:
        same = new == (ROOT / "README.md").read_text()
        print("README gallery is up to date" if same else "README gallery is stale: run python -m shared.gallery")
        return 0 if same else 1
    total = sum(p.stat().st_size for p in (ROOT / THUMBS).glob("*.png"))
    print(f"gallery: {sum(e.notebook is not None for e in entries)} notebooks, thumbnails {total:,} bytes "
          f"in {THUMBS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
