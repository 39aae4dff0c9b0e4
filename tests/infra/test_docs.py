"""The README stays short and the documentation holds together: every relative link in README.md
and docs/*.md reaches a file and, when it names one, a heading; no page carries progress notes."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_MAX_LINES = 250
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", flags=re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+).+?\1", flags=re.DOTALL)
# [text](target) and ![alt](target), the target up to an optional "title".
_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", flags=re.MULTILINE)


def prose(text: str) -> str:
    """The page without its code: links and headings inside code are not links or headings."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to
    hyphens, and -1, -2... on repeats."""
    seen: dict[str, int] = {}
    result = set()
    for heading in _HEADING.findall(_FENCE.sub("", page.read_text())):
        text = re.sub(r"`([^`]*)`", r"\1", heading)
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def relative_links(page: Path) -> list[str]:
    links = _LINK.findall(prose(page.read_text()))
    return [link for link in links if not re.match(r"^[a-z][a-z0-9+.-]*:", link, re.IGNORECASE)]


def test_the_readme_fits_on_a_few_screens():
    # Given the README
    lines = README.read_text().splitlines()

    # Then a newcomer reads it in a few screens; the details live in docs/
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_the_readme_links_every_page_of_the_docs():
    # Given every page in docs/
    pages = {page.name for page in PAGES if page != README}

    # When the README's links are read
    linked = {Path(link.split("#")[0]).name for link in relative_links(README)}

    # Then a reader can reach each page from the README
    assert pages - linked == set()


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file_and_heading(page: Path):
    # Given a page's relative links (images included)
    broken = []
    for link in relative_links(page):
        path, _, fragment = link.partition("#")
        # When each is followed from the page's own folder
        target = (page.parent / unquote(path)).resolve() if path else page
        # Then the file exists and, for a link to a part of a page, that heading does too
        if not target.exists():
            broken.append(f"{link}: no file {target.relative_to(ROOT)}")
        elif fragment and target.suffix == ".md" and unquote(fragment) not in anchors(target):
            broken.append(f"{link}: no heading #{fragment} in {target.relative_to(ROOT)}")
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_no_page_carries_progress_notes(page: Path):
    # Given a page's prose
    text = prose(page.read_text())

    # Then it says what the service does, not which issue or item brought it
    notes = re.findall(
        r"(?im)^>\s*status\b.*|\bissues?\s*#?\d+|\bitems?\s+\d+\b"
        r"|(?<![\w&/-])#\d+\b",
        text,
    )
    assert notes == []
