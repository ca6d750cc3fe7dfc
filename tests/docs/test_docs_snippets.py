"""Run every ```python block of README.md and docs/**/*.md.

All the blocks of one page run in order in one namespace (a page may build on its earlier blocks), as one test
case, with the working directory in a temporary folder and Matplotlib on the Agg backend. A block preceded by the
line ``<!-- skip-snippet -->`` is not run (only for code that cannot run offline).
"""
import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP_MARK = "<!-- skip-snippet -->"
FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")

pytestmark = pytest.mark.docs


def doc_pages():
    """README.md, then every page under docs/, as paths relative to the repository."""
    pages = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
    return [page for page in pages if page.is_file()]


def extract_blocks(text):
    """Fenced code blocks of a Markdown text: a list of (first line number, language, code, skipped)."""
    lines = text.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        match = FENCE_OPEN.match(lines[index])
        if not match:
            index += 1
            continue
        indent, fence = match.group("indent"), match.group("fence")
        language = match.group("info").strip().split(" ")[0].lstrip(".").lower() if match.group("info") else ""
        previous = next((line.strip() for line in reversed(lines[:index]) if line.strip()), "")
        body, end = [], index + 1
        closing = re.compile(r"^[ \t]*" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}[ \t]*$")
        while end < len(lines) and not closing.match(lines[end]):
            body.append(lines[end][len(indent):] if lines[end].startswith(indent) else lines[end].lstrip())
            end += 1
        blocks.append((index + 1, language, textwrap.dedent("\n".join(body)) + "\n", previous == SKIP_MARK))
        index = end + 1
    return blocks


def python_blocks(page):
    """The ```python blocks of a page, in order."""
    return [block for block in extract_blocks(page.read_text(encoding="utf-8")) if block[1] in ("python", "py")]


PAGES = [page for page in doc_pages() if python_blocks(page)]


def test_snippet_extraction_handles_indentation_and_skips():
    """Indented fences (inside list items) are dedented; a block after the skip mark is flagged."""
    text = "\n".join(["a", "```python", "x = 1", "```", "- item", "", "  ```python", "  y = x + 1", "  ```",
                      SKIP_MARK, "```python", "raise RuntimeError", "```", "```bash", "ls", "```"])
    blocks = extract_blocks(text)
    assert [(language, code, skipped) for _, language, code, skipped in blocks] == [
        ("python", "x = 1\n", False), ("python", "y = x + 1\n", False), ("python", "raise RuntimeError\n", True),
        ("bash", "ls\n", False)]


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_page_snippets_run(page, tmp_path, monkeypatch):
    """Every block of the page runs without error, in order, in one namespace."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    import keras  # pylint: disable=import-outside-toplevel

    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    keras.backend.clear_session()
    namespace = {"__name__": "__docs_snippet__"}
    relative = page.relative_to(ROOT)
    try:
        for line, _, code, skipped in python_blocks(page):
            if skipped:
                continue
            try:
                exec(compile(code, f"{relative}:{line}", "exec"), namespace)  # pylint: disable=exec-used
            except Exception as error:  # pylint: disable=broad-except
                pytest.fail(f"{relative}, code block at line {line} raised {type(error).__name__}: {error}")
    finally:
        plt.close("all")
