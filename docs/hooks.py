"""MkDocs hooks: repository files outside ``docs/`` that the pages link to become part of the site.

The pages link to benchmark results, model reports and example configs where they live in the
repository (``../benchmarks/results/quant.md`` from ``docs/benchmarks.md``), so the links also work
when the Markdown is read on a forge. MkDocs only knows the files under ``docs/``; without these
hooks every such link would be "not found" under ``mkdocs build --strict``.

- ``on_files`` adds the files under ``REPO_GLOBS`` to the site under ``repo/`` (``repo/benchmarks/
  results/quant.md``): Markdown becomes a page (not in the nav), everything else is copied as is.
- ``on_page_markdown`` rewrites a relative link that leaves ``docs/`` into a link to that copy.

Nothing is turned off: a link to a repository file that is not added, or does not exist, is left
as written, and MkDocs reports it as a broken link as it does for any other.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files, InclusionLevel

REPO = Path(__file__).resolve().parent.parent
PREFIX = "repo"
# What the pages may link to outside docs/: results, model reports and manifests, example configs.
REPO_GLOBS = (
    "benchmarks/results/**/*.md",
    "benchmarks/results/**/*.png",
    "models/**/*.md",
    "models/**/*.json",
    "configs/**/*.md",
    "configs/**/*.toml",
    "configs/**/*.conf",
    "configs/**/*.yml",
    "configs/**/*.json",
    "configs/**/*.service",
    "configs/mosquitto/acl",
)
# Inline code (left alone), or a Markdown link or image: [text](target) / ![alt](target).
_LINK = re.compile(r"(?P<code>(`+)[^`]+?\2)|(!?\[[^\]\n]*\]\()([^)\s]+)(\))")
_FENCE = re.compile(r"^(```|~~~)", re.MULTILINE)


def on_files(files: Files, config: Any) -> Files:
    for pattern in REPO_GLOBS:
        for path in sorted(REPO.glob(pattern)):
            if not path.is_file():
                continue
            src_uri = f"{PREFIX}/{path.relative_to(REPO).as_posix()}"
            if files.get_file_from_path(src_uri) is None:
                files.append(File.generated(config, src_uri, abs_src_path=str(path),
                                            inclusion=InclusionLevel.NOT_IN_NAV))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if page.file.abs_src_path is None or not _inside(Path(page.file.abs_src_path), Path(config["docs_dir"])):
        return markdown  # pages added from the repository keep their own (relative) links
    page_dir = Path(page.file.abs_src_path).parent
    docs_dir = Path(config["docs_dir"]).resolve()

    def rewrite(match: re.Match[str]) -> str:
        if match.group("code"):
            return match.group(0)
        target = match.group(4)
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^#|^/", target):
            return match.group(0)  # URL, anchor or absolute path: not ours
        path, sep, fragment = target.partition("#")
        resolved = (page_dir / path).resolve()
        if _inside(resolved, docs_dir) or not _inside(resolved, REPO):
            return match.group(0)
        site_target = f"{PREFIX}/{resolved.relative_to(REPO).as_posix()}"
        relative = posixpath.relpath(site_target, posixpath.dirname(page.file.src_uri) or ".")
        return f"{match.group(3)}{relative}{sep}{fragment}{match.group(5)}"

    # Leave fenced code blocks alone: what looks like a link there is code.
    parts = re.split(r"(^(?:```|~~~)[\s\S]*?^(?:```|~~~)[ \t]*$)", markdown, flags=re.MULTILINE)
    return "".join(part if _FENCE.match(part) else _LINK.sub(rewrite, part) for part in parts)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True
