"""The documentation: the MkDocs site builds with strict link checking, and the README stays short
and points only at files that exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250
_FENCE = re.compile(r"^(```|~~~).*?^(```|~~~)[ \t]*$", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`+[^`]+?`+")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _relative_links(markdown: str) -> list[str]:
    text = _INLINE_CODE.sub("", _FENCE.sub("", markdown))
    targets = [match.group(1) for match in _LINK.finditer(text)]
    return [t for t in targets if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^#", t)]


def test_docs_site_builds_strict_without_warnings(tmp_path):
    # mkdocs is a dev dependency (pyproject.toml), so this never skips: a missing mkdocs is a failure.
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    assert (tmp_path / "site" / "index.html").is_file()
    # The repository files the pages link to are part of the site (docs/hooks.py).
    assert (tmp_path / "site" / "repo" / "benchmarks" / "results" / "quant.html").is_file()


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the reference belongs in docs/"


def test_readme_relative_links_point_at_existing_files():
    links = _relative_links((REPO / "README.md").read_text(encoding="utf-8"))
    assert links, "README.md links to no file at all"
    missing = [link for link in links if not (REPO / link.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_link_finder_sees_links_and_skips_code():
    text = ("[a](docs/a.md) ![b](docs/b.png) [c](https://x.org) [d](#top) `[e](no.md)`\n"
            "```\n[f](no.md)\n```\n[g](docs/g.md#part)\n")
    assert _relative_links(text) == ["docs/a.md", "docs/b.png", "docs/g.md#part"]
