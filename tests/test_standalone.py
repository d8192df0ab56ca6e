"""The repository stands alone: nothing a user gets points outside it.

Our machines and CI have a sibling folder with the full benchmark files and an internal spec; a
user who clones this repository has neither. So no tracked file outside tests/ and scripts/ may
name them: code defaults, links and docs point into docs/ and the data lookup (docs/data.md), and
tests reach the full data only through $HCNR_DATA_DIR.
"""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = (b"../shared", b"shared/data", b"METHOD.md")
ALLOWED_DIRS = ("tests/", "scripts/")


def _repository_files() -> list[str]:
    """Tracked files, plus new files not ignored (so a file is checked before its first commit)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [f for f in out.decode().split("\0") if f]


def test_no_file_points_outside_the_repository():
    files = _repository_files()
    assert "hcnr_jax/data/benchmarks.py" in files and "docs/method.md" in files
    hits = []
    for f in files:
        if f.startswith(ALLOWED_DIRS) or not (ROOT / f).is_file():
            continue
        text = (ROOT / f).read_bytes()
        hits += [f"{f}: {s.decode()}" for s in FORBIDDEN if s in text]
    assert not hits, "files that point outside the repository:\n" + "\n".join(hits)


def test_docs_links_resolve():
    """Relative links between the docs (and from the README into them) name files that exist."""
    import re

    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)}: broken link {target}"
