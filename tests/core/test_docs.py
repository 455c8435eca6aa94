"""The project's documents are self-contained: no tracked file cites a document that is not in the
repository, every markdown link resolves, every section a citation names exists, and the README
stays a front door."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Documents that live outside the repository. The names are assembled so that this file does not
# cite them itself (a sweep of the citations must not rewrite the check).
OUTSIDE = [re.compile(p) for p in (
    # shared/wheels/ holds packages CI installs (rllm is not on the registry), not documents
    "AXPO" + "_SPEC", "FIELD" + "_NOTES", r"(?<![\w.-])shared" + "/(?!wheels/)", "seed-axpo" + "-paper", r"\bSTYLE" + r"\.md",
)]

CITED_SECTION = re.compile(r"docs/(algorithm|upstream)\.md[,:]? §\s?(\d+[a-z]?)(?:\s?[–-]\s?§?(\d+[a-z]?))?")
MD_LINK = re.compile(r"\[[^\]]*\]\(([^)#\s]+)(?:#[^)]*)?\)")


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]


def text_files() -> dict[Path, str]:
    texts = {}
    for path in tracked_files():
        try:
            texts[path] = path.read_text()
        except UnicodeDecodeError:  # images
            continue
    return texts


def test_no_tracked_file_cites_a_document_outside_the_repository():
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()[:90]}"
             for path, text in text_files().items() if path != Path(__file__).resolve()
             for n, line in enumerate(text.splitlines(), 1) if any(p.search(line) for p in OUTSIDE)]
    assert not found, "cite docs/algorithm.md or docs/upstream.md instead:\n" + "\n".join(found)


def sections(doc: str) -> set[str]:
    """Section numbers of a doc's headings (``## §6. Advantages`` -> ``6``)."""
    return set(re.findall(r"^#+ §(\d+[a-z]?)\b", (ROOT / "docs" / doc).read_text(), re.M))


def test_every_cited_section_exists():
    known = {"algorithm": sections("algorithm.md"), "upstream": sections("upstream.md")}
    assert {"1", "2", "6", "8", "9"} <= known["algorithm"] and {"1", "1b", "2", "2b", "4", "5"} <= known["upstream"]
    missing = [f"{path.relative_to(ROOT)}: docs/{doc}.md §{n}"
               for path, text in text_files().items() for m in CITED_SECTION.finditer(text)
               for doc, n in [(m.group(1), m.group(2)), (m.group(1), m.group(3))] if n and n not in known[doc]]
    assert not missing, "\n".join(missing)


def test_every_markdown_link_resolves():
    broken = []
    for path, text in text_files().items():
        if path.suffix != ".md":
            continue
        for target in MD_LINK.findall(text):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not broken, "\n".join(broken)


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    for command in ("make main", "make test", "axpo-rllm train", "axpo-rllm eval", "axpo-rllm data"):
        assert command in readme, command
    for page in ("algorithm", "environment", "integration", "data", "benchmarks", "layout", "upstream"):
        assert f"(docs/{page}.md)" in readme, page
