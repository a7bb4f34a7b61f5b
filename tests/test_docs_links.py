"""The repository documents itself: no pointer leaves the checkout, every `docs/methods.md §N` or
`docs/checkpoints.md §N` citation names a section that exists, and every `docs/<name>.md` the README,
the docs and pyproject.toml mention is there. A clone has no sibling "shared" folder, so a citation that
points there is a dead link."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".yaml", ".sh", ".toml"}
SKIP_DIRS = {".git", ".venv", "cache", ".cache", "__pycache__", "build", "dist"}
# Built from parts so that this file does not match itself.
OUTSIDE = re.compile(re.escape("..") + "/shared|/work/" + "shared")
CITATION = re.compile(r"docs/(methods|checkpoints)\.md((?:[ \t]*(?:,|/|and)?[ \t]*§\d+(?:\.\d+)?)+)")
SECTION_ID = re.compile(r"§(\d+(?:\.\d+)?)")
HEADING = re.compile(r"^#{2,4} §(\d+(?:\.\d+)?)\b", flags=re.M)
DOC_PATH = re.compile(r"docs/[\w./-]+?\.md\b")


def repo_files() -> list[Path]:
    """Every *.py, *.md, *.yaml, *.sh and *.toml of the checkout (results/ included), outside the venv and caches."""
    out = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if path.suffix in SUFFIXES and path.is_file() and not SKIP_DIRS.intersection(rel.parts[:-1]) \
                and not any(p.endswith(".egg-info") for p in rel.parts):
            out.append(path)
    return sorted(out)


def citations(text: str) -> list[tuple[str, str]]:
    """(file stem, section id) for each section a `docs/methods.md §a, §b` style citation names."""
    return [(m.group(1), s) for m in CITATION.finditer(text) for s in SECTION_ID.findall(m.group(2))]


def sections(stem: str) -> set[str]:
    return set(HEADING.findall((ROOT / "docs" / f"{stem}.md").read_text()))


def test_no_pointer_outside_the_repository():
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in repo_files()
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "paths outside the repository (cite docs/ instead):\n" + "\n".join(hits)


def test_citation_parser():
    """The parser reads lists and stops at the first non-section word; a made-up section is caught."""
    assert citations("see docs/methods.md §0.2, §5.3 and §11.17 / §8: text §9") == [
        ("methods", "0.2"), ("methods", "5.3"), ("methods", "11.17"), ("methods", "8")]
    assert citations("docs/methods.md §6.3-6.6") == [("methods", "6.3")]
    assert "6.3" in sections("methods") and "99.1" not in sections("methods")


def test_every_cited_section_exists():
    known = {stem: sections(stem) for stem in ("methods", "checkpoints")}
    found, missing = 0, []
    for path in repo_files():
        for stem, sec in citations(path.read_text(errors="replace")):
            found += 1
            if sec not in known[stem]:
                missing.append(f"{path.relative_to(ROOT)}: docs/{stem}.md §{sec}")
    assert found > 100, f"only {found} citations found: the parser no longer matches how the code cites"
    assert not missing, "cited sections that docs/ lacks:\n" + "\n".join(missing)


def test_methods_reference_keeps_its_numbering():
    """The numbering the code cites: §0.1-§0.3, §1-§12, and one heading per numerical invariant §11.1-§11.18."""
    have = sections("methods")
    want = {"0", "0.1", "0.2", "0.3", *map(str, range(1, 13)), *(f"5.{i}" for i in range(1, 5)),
            *(f"6.{i}" for i in range(1, 8)), "10.1", "10.2", *(f"11.{i}" for i in range(1, 19))}
    assert want <= have, sorted(want - have)


@pytest.mark.parametrize("name", ["README.md", "pyproject.toml",
                                  *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))])
def test_mentioned_docs_exist(name):
    mentioned = set(DOC_PATH.findall((ROOT / name).read_text()))
    missing = sorted(m for m in mentioned if not (ROOT / m).is_file())
    assert not missing, f"{name} mentions files that do not exist: {missing}"
