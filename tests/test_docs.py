"""The repository stands alone: nothing in it cites a document that is not in it, and every
relative link of the README and of docs/ leads to a file that exists.

The design notes and reference sheets the project started from lived outside the repository;
citations of them (by file name, or as `reference/<name>.md`) are flagged unless the named file is
tracked here. Facts are cited by paper or official repository instead (docs/architecture.md).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("bigssl", "recipes", "slurm", "tools", "tests", "docs", ".ci")
CHECKED_FILES = ("README.md", "pyproject.toml")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".sbatch", ".txt", ".cfg", ""}

# Built from pieces so that this file does not cite what it looks for. A citation is a path that
# ends in one of the outside documents' names, or any .md path under a `reference/` directory.
_OUTSIDE_NAMES = "|".join(["design", "methods", "stack", "slurm-ci", r"anchors[\w-]*"])
CITATION = re.compile(r"[\w./-]*(?:\b(?:" + _OUTSIDE_NAMES + r")|\breference/[\w./-]+?)\.md\b")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)  # links are not looked for in code


def tracked_files() -> list[Path]:
    """The checked files git tracks; without git (an unpacked archive), every file on disk."""
    try:
        listing = subprocess.run(["git", "ls-files", "-z", "--", *CHECKED, *CHECKED_FILES], cwd=ROOT,
                                 capture_output=True, check=True, timeout=60).stdout.decode()
        paths = [ROOT / name for name in listing.split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        paths = [p for d in CHECKED for p in (ROOT / d).rglob("*") if p.is_file()]
        paths += [ROOT / name for name in CHECKED_FILES]
    return sorted(p for p in paths if p.is_file() and p.suffix in TEXT_SUFFIXES)


def missing_citations(text: str, exists) -> list[str]:
    """The cited document paths in `text` for which `exists(path)` is false."""
    return [match.group(0) for match in CITATION.finditer(text) if not exists(match.group(0))]


def in_repository(tracked: set[str]):
    """A cited path exists when some tracked file's path ends with it (citations are often
    relative to the citing file, or to the repository root)."""

    def exists(cited: str) -> bool:
        cited = cited.lstrip("./")
        return any(path == cited or path.endswith("/" + cited) for path in tracked)

    return exists


def relative_links(markdown: str) -> list[str]:
    """Link targets that point into the repository: not URLs, not mail, not in-page anchors."""
    targets = []
    for match in LINK.finditer(CODE.sub("", markdown)):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def test_the_citation_pattern_finds_outside_documents_and_passes_tracked_ones():
    outside = "reference" + "/methods" + ".md"
    text = (f"see {outside} §2.1, /work/shared/{'design'}.md §3, {'stack'}.md, {'anchors'}-2026-12.md, "
            "and docs/architecture.md")
    tracked = {"docs/architecture.md", "README.md"}
    found = missing_citations(text, in_repository(tracked))
    assert found == [outside, f"/work/shared/{'design'}.md", f"{'stack'}.md", f"{'anchors'}-2026-12.md"]
    assert missing_citations("(see docs/architecture.md and slurm/README.md)", in_repository(
        {"docs/architecture.md", "slurm/README.md"})) == []


def test_no_file_cites_a_document_outside_the_repository():
    files = tracked_files()
    assert any(p.name == "README.md" for p in files) and len(files) > 50
    tracked = {p.relative_to(ROOT).as_posix() for p in files}
    problems = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        problems += [f"{path.relative_to(ROOT)}: {cited}" for cited in missing_citations(text, in_repository(tracked))]
    assert not problems, "cites documents that are not in the repository:\n" + "\n".join(problems)


def test_relative_links_find_links_and_skip_urls_and_anchors():
    text = ("[a](docs/x.md) [b](https://example.org/y.md) [c](#measured) [d](../slurm/README.md#top \"t\")"
            " `x[0](y)` and\n```\n[e](code.md)\n```")
    assert relative_links(text) == ["docs/x.md", "../slurm/README.md"]


@pytest.mark.parametrize("page", ["README.md", *sorted(p.relative_to(ROOT).as_posix()
                                                        for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_point_to_existing_files(page: str):
    path = ROOT / page
    broken = [target for target in relative_links(path.read_text(encoding="utf-8"))
              if not (path.parent / target).exists()]
    assert not broken, f"{page}: broken relative links: {broken}"
