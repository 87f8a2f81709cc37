"""Code blocks of the docs, found where they are, so that tests run them as written.

Convention (the docs may move between README.md and docs/*.md):
- a fenced block right after a line `<!-- snippet: NAME -->` is the snippet NAME, in whichever of `DOCS` holds it;
- without such a marker, a snippet is the ```python block, under a heading (any level) whose text starts with the
  given heading, whose code contains a given string (e.g. the block under "Several vector columns" that holds
  `list_dot_product`).
Every distinct block found is returned (the same text in two files counts once); none found is an error.
"""

from __future__ import annotations

import ast
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/vectors.md")
_MARKER = re.compile(r"^<!--\s*snippet:\s*([\w.-]+)\s*-->\s*$")
_HEADING = re.compile(r"^(#+)\s+(.*)$")
_FENCE = re.compile(r"^```(\w*)\s*$")


def _blocks(text: str):
    """(marker name or None, heading path, language, code) of each fenced block of a Markdown text."""
    headings: list[tuple[int, str]] = []
    marker, lines, i = None, text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            yield marker, [h for _, h in headings], fence.group(1), "\n".join(lines[i + 1:end]) + "\n"
            marker, i = None, end + 1
            continue
        found = _MARKER.match(line)
        if found:
            marker = found.group(1)
        elif _HEADING.match(line):
            level, title = len(_HEADING.match(line).group(1)), _HEADING.match(line).group(2)
            headings = [h for h in headings if h[0] < level] + [(level, title)]
            marker = None
        elif line.strip():
            marker = None
        i += 1


def snippets(name: str, heading: str, contains: str) -> list[tuple[str, str]]:
    """(file, code) of every distinct block that is the snippet `name` (marked), else the ```python block under
    `heading` that contains `contains`."""
    marked, by_heading = {}, {}
    for doc in DOCS:
        path = REPO / doc
        if not path.exists():
            continue
        for mark, heads, lang, code in _blocks(path.read_text(encoding="utf-8")):
            if mark == name:
                marked.setdefault(code, doc)
            elif lang == "python" and contains in code and any(h.startswith(heading) for h in heads):
                by_heading.setdefault(code, doc)
    found = marked or by_heading
    if not found:
        raise LookupError(f"no snippet {name!r} (marker `<!-- snippet: {name} -->`, or a python block under "
                          f"{heading!r} holding {contains!r}) in {', '.join(DOCS)}")
    return [(doc, code) for code, doc in found.items()]


def run(code: str, namespace: dict) -> object:
    """Execute `code` in `namespace`, as an interactive session would: the value of a last bare expression is
    returned (None otherwise)."""
    tree = ast.parse(code)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, "<snippet>", "exec"), namespace)  # noqa: S102 - the docs' own code, run as documented
    if last is None:
        return None
    return eval(compile(ast.Expression(last.value), "<snippet>", "eval"), namespace)  # noqa: S307
