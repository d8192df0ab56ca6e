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


def test_bundled_files_are_package_data():
    """Every shipped file (benchmark subsets, calibration data, labels, the default --demos) is
    matched by a package-data pattern, expanded as setuptools does (recursive glob)."""
    import glob

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    pkg = ROOT / tool["package-dir"]["hcnr_jax"]
    matched = {Path(f) for pattern in tool["package-data"]["hcnr_jax"]
               for f in glob.glob(pattern, root_dir=pkg, recursive=True)}
    shipped = {rel for rel in (p.relative_to(pkg) for p in (pkg / "bundled").rglob("*") if p.is_file())
               if not any(part.startswith(".") or part == "__pycache__" for part in rel.parts)}
    assert Path("bundled/demos.jsonl") in shipped
    assert shipped <= matched, sorted(map(str, shipped - matched))
