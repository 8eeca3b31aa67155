"""README.md and docs/*.md cite only what the repository holds (issue 26): every relative link (and the
heading an anchor names) and every repository path cited in backticks exists, as committed files, not
git-ignored ones. A results file a page quotes must be committed with it."""
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGES = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                               if f.endswith(".md"))
TOP = ("nodes/", "glm_image_core/", "js/", "workflows/", "tests/", "bench/", "scripts/", "docs/", ".ci/")
LINK = re.compile(r"\]\(([^)\s]+)\)")
CITED = re.compile(r"`([^`\s]+)`")

pytestmark = pytest.mark.core


def tracked() -> set:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = set(out.split())
    return files | {os.path.dirname(f) for f in files} | {d for f in files for d in _parents(f)}


def _parents(path: str):
    while "/" in path:
        path = path.rsplit("/", 1)[0]
        yield path


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    h = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return h.replace(" ", "-")


def anchors(path: str) -> set:
    """The anchors of a page: its headings' slugs and its explicit <a id="..."> anchors."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")} | \
        set(re.findall(r'<a (?:id|name)="([^"]+)"', text))


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_and_anchor_exists(page):
    files = tracked()
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        text = f.read()
    here = os.path.dirname(page)
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(here, path)) if path else page
        if full not in files:
            bad.append(f"{target}: {full} is not in the repository")
        elif anchor and full.endswith(".md") and anchor not in anchors(full):
            bad.append(f"{target}: no heading '{anchor}' in {full}")
    assert not bad, f"{page}: " + "; ".join(bad)


@pytest.mark.parametrize("page", PAGES)
def test_every_cited_repository_path_exists(page):
    files = tracked()
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        text = f.read()
    bad = []
    for cited in CITED.findall(text):
        path = cited.rstrip(".,:;)").split("::")[0]
        if not path.startswith(TOP) or any(c in path for c in "*<>{}$|"):
            continue
        if path.rstrip("/") not in files:
            bad.append(path)
    assert not bad, f"{page} cites paths the repository does not hold: {sorted(set(bad))}"
