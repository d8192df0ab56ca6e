"""Every subpackage of the library is declared in pyproject.toml, so a built wheel is complete."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_all_subpackages_declared():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(tool["packages"])
    dirs = {v: k for k, v in tool["package-dir"].items()}
    found = set()
    for top in dirs:
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((dirs[top], *rel)))
    assert found == declared
