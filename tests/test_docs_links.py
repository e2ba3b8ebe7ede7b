"""The user docs point at things that exist: relative links and their #anchors resolve, every
metric name they mention is in the metric contract, and every module the README's layout
section should list is listed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy.metrics.schema import ALL

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    headings = re.findall(r"^#+\s+(.+)$", path.read_text(encoding="utf-8"), re.MULTILINE)
    return {github_anchor(h) for h in headings}


def broken_links(doc: Path) -> list[str]:
    broken: list[str] = []
    text = doc.read_text(encoding="utf-8")
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s)://, mailto: - not checked offline
        file_part, _, anchor = target.partition("#")
        linked = (doc.parent / file_part).resolve() if file_part else doc
        if not linked.exists():
            broken.append(f"{doc.name}: {target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{doc.name}: {target} (no such heading)")
    return broken


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path) -> None:
    assert broken_links(doc) == []


def test_readme_links_every_docs_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {Path(t.partition("#")[0]).name for t in LINK.findall(readme)}
    assert sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.name not in linked) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_metric_names_mentioned_exist(doc: Path) -> None:
    exported = {spec.name for spec in ALL}
    mentioned = set(re.findall(r"\bhangup_[a-z_]*[a-z]\b", doc.read_text(encoding="utf-8")))
    unknown = sorted(n for n in mentioned if HISTOGRAM_SUFFIX.sub("", n) not in exported)
    assert unknown == []


def test_readme_layout_lists_every_module() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    proxy = ROOT / "proxy"
    modules = [p.name for p in proxy.glob("*.py") if not p.name.startswith("__")]
    packages = [f"{p.name}/" for p in proxy.iterdir() if (p / "__init__.py").exists()]
    missing = sorted(m for m in [*modules, *packages] if not re.search(rf"`(proxy/)?{m}`", layout))
    assert missing == []
