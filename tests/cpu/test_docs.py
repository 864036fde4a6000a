"""The documentation: the mkdocs site builds with --strict, and every relative link in README.md and docs/*.md
points to a file that exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*(?:<([^>]+)>|([^)\s]+))(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
EXTERNAL = re.compile(r"^([a-z][a-z0-9+.-]*:|//|#)", re.I)
MACHINE_PATHS = ("/work/", "/tmp/", "/root/", "/home/", "/usr/", "C:\\")


def relative_links(text: str) -> list[str]:
    """The link targets of a Markdown page that name a file of this repository (code is not Markdown, so fenced
    blocks and code spans are left out; URLs, mail addresses and same-page anchors are not files)."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    targets = [a or b for a, b in LINK.findall(text)] + REFERENCE.findall(text)
    return [t for t in targets if not EXTERNAL.match(t)]


def test_link_extraction():
    text = ("See [a](docs/a.md#part), ![b](img/b.png \"title\"), [c](https://x.org/c.md), [d](#here), "
            "`[e](not/a/link.md)`, [f](<docs/f g.md>)\n\n```\n[g](code/g.md)\n```\n[h]: ../h.md\n")
    assert relative_links(text) == ["docs/a.md#part", "img/b.png", "docs/f g.md", "../h.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files(page):
    missing = []
    for target in relative_links(page.read_text(encoding="utf-8")):
        path = target.split("#", 1)[0].split("?", 1)[0]
        if path and not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_machine_paths(page):
    text = page.read_text(encoding="utf-8")
    assert not [p for p in MACHINE_PATHS if p in text], f"{page.relative_to(ROOT)} names a folder of some machine"


def test_every_page_is_in_the_nav():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages and all(f": {name}" in config for name in pages), "a page of docs/ is missing from mkdocs.yml's nav"


def test_mkdocs_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (it is in the dev extra: pip install -e '.[dev]')")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    built = {p.name for p in (tmp_path / "site").glob("*.html")}
    assert {f"{p.stem}.html" for p in (ROOT / "docs").glob("*.md")} <= built
