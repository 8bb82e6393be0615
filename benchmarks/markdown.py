"""Generated sections of markdown files (docs and README), between named markers.

A benchmark writes its tables between `<!-- NAME:begin -->` and `<!-- NAME:end -->`, so the
numbers a reader sees are always the last run's, never hand-copied.
"""

from __future__ import annotations

from pathlib import Path


def replace_marked(path: Path, name: str, text: str, *, append: bool = False) -> None:
    """Replace the block between the `name` markers of `path` with `text`.

    Without the markers: append a new marked block when `append`, else raise (a typo in a
    doc's marker should not silently add a second copy of the table).
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    body = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        _, tail = rest.split(end, 1)
        new = f"{head}{body}{tail}"
    elif append:
        new = f"{old.rstrip()}\n\n{body}\n"
    else:
        raise ValueError(f"{path} has no {begin} ... {end} markers")
    path.write_text(new, encoding="utf-8")
