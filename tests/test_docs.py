"""Doc tests: the ```python blocks of README.md and docs/**/*.md run, in order, one namespace per file.

A block preceded by ``<!-- doctest: skip (reason) -->`` is not run (it needs a network, a GPU, vLLM
or a long run; keep these few and give the reason). ``<!-- doctest: slow -->`` before a block marks
its file's test ``slow``. A file whose blocks load the embedded model is marked ``real_model``.
Blocks run with the repository root as working directory and the output discarded.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"(?P<marker><!--\s*doctest:\s*(?P<what>[^>]*?)\s*-->\s*\n)?```python\n(?P<code>.*?)```", re.S)
REAL_MODEL = re.compile(r"load_model\(|\bLLM\(|model_dir\(")


@dataclass
class Block:
    line: int
    code: str
    skip: str | None          # the reason, when skipped
    slow: bool


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    found = []
    for m in FENCE.finditer(text):
        what = (m.group("what") or "").strip()
        if what and not (what == "slow" or re.fullmatch(r"skip \(.+\)", what)):
            raise ValueError(f"{path}: unknown doctest marker {what!r}; use 'skip (reason)' or 'slow'.")
        found.append(Block(text.count("\n", 0, m.start("code")) + 1, m.group("code"),
                           what[6:-1] if what.startswith("skip") else None, what == "slow"))
    return found


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _params():
    params = []
    for path in doc_files():
        found = blocks(path)
        if not found:
            continue
        marks = []
        if any(b.slow for b in found):
            marks.append(pytest.mark.slow)
        if any(REAL_MODEL.search(b.code) for b in found if b.skip is None):
            marks.append(pytest.mark.real_model)
        params.append(pytest.param(path, marks=marks, id=str(path.relative_to(REPO))))
    return params


def test_the_markers_parse_and_the_skip_list_stays_small():
    skipped = [(p.name, b.line, b.skip) for p in doc_files() for b in blocks(p) if b.skip]
    assert len(skipped) <= 6, skipped
    assert blocks(REPO / "README.md"), "the README has python examples"


@pytest.mark.parametrize("path", _params())
def test_python_blocks_run(path, monkeypatch):
    monkeypatch.chdir(REPO)
    namespace: dict = {"__name__": f"doctest_{path.stem}"}
    for block in blocks(path):
        if block.skip:
            continue
        code = compile(block.code, f"{path.relative_to(REPO)}:{block.line}", "exec")
        with contextlib.redirect_stdout(io.StringIO()):
            exec(code, namespace)


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_at_files_and_headings(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md":
            headings = {_slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)}
            if anchor not in headings:
                broken.append(target)
    assert not broken, f"{path.name}: broken links {broken}"
