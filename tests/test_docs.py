"""The documentation stands alone: every file a README or docs/ page points at (Markdown
links, images, reference definitions, HTML ``src``/``href``) exists inside the repository.

Web addresses are left alone (nothing is fetched at test time); code blocks and inline
code are not links.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])

_FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
_CODE = re.compile(r"(`+).+?\1", re.S)
_INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)")
_REFDEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
_HTML = re.compile(r"<(?:img|a|source)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.I)
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


def targets(text: str) -> list[str]:
    """The local targets a Markdown page points at, in order (anchors dropped)."""
    text = _CODE.sub("", _FENCE.sub("", text))
    found = _INLINE.findall(text) + _REFDEF.findall(text) + _HTML.findall(text)
    out = []
    for t in found:
        if _SCHEME.match(t) or t.startswith(("#", "//")):
            continue  # a web address, or a place in the same page
        path = unquote(t.split("#", 1)[0].split("?", 1)[0])
        if path:
            out.append(path)
    return out


def broken(page: Path, root: Path = ROOT) -> list[str]:
    """The targets of ``page`` that are missing, or that lie outside ``root``."""
    bad = []
    for t in targets(page.read_text(encoding="utf-8")):
        where = (root / t.lstrip("/")) if t.startswith("/") else (page.parent / t)
        where = where.resolve()
        if not where.is_relative_to(root.resolve()):
            bad.append(f"{t} (outside the repository)")
        elif not where.exists():
            bad.append(t)
    return bad


def test_the_checker_reads_every_kind_of_link_and_nothing_in_code():
    page = """See [the guide](docs/guide.md#setup) and ![plot](img/a%20b.png "a title").
[ref]: launch/x.toml
<img src="img/c.png" width=300> [web](https://example.org/x.md) [here](#layout)
Inline `[not](a-link.md)` and:
```
[nor](this.md)
```
[nested [brackets]](docs/y.md)
"""
    assert targets(page) == ["docs/guide.md", "img/a b.png", "docs/y.md", "launch/x.toml", "img/c.png"]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_file_a_page_points_at_exists(page: Path):
    assert page.is_file()
    assert broken(page) == [], f"{page.relative_to(ROOT)} points at missing files"


def test_a_missing_file_or_one_outside_the_repository_is_reported(tmp_path: Path):
    root = tmp_path / "repo"
    (root / "docs" / "img").mkdir(parents=True)
    (root / "docs" / "img" / "ok.png").write_bytes(b"")
    (tmp_path / "shared.md").write_text("outside")
    page = root / "docs" / "page.md"
    page.write_text("[ok](img/ok.png) [up](../docs/img/ok.png) [gone](no-such-file.md) [out](../../shared.md)\n")
    assert broken(page, root) == ["no-such-file.md", "../../shared.md (outside the repository)"]
