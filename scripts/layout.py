"""Print the package's layout: lines per module and the imports between hcnr_jax's modules.

    python scripts/layout.py [--json OUT]

Used for issue 26's before/after account (modules, line counts, import arrows,
private names imported from another module, functions over 80 lines).
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = {"hcnr_jax": ROOT / "hcnr_jax", "hcnr_jax.conversion": ROOT / "conversion", "hcnr_jax.kernels": ROOT / "kernels"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, base in TREES.items():
        for p in sorted(base.rglob("*.py")):
            if "bundled" in p.parts:
                continue
            rel = p.relative_to(base).with_suffix("")
            parts = [x for x in rel.parts if x != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "hcnr_jax" and parts and parts[0] in ("conversion", "kernels"):
                continue
            out[name] = p
    return out


def imports(path: Path, mods: dict[str, Path], me: str) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    pkg = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in mods:
                n = n.rsplit(".", 1)[0] if "." in n else ""
            if n and n != me:
                found.add(n)
    return found


def borrowed_privates(path: Path) -> list[str]:
    """``from hcnr_jax.x import _name``: a private name taken from another module."""
    tree = ast.parse(path.read_text())
    return [f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
            and n.module.startswith("hcnr_jax") for a in n.names if a.name.startswith("_") and not a.name.startswith("__")]


def long_functions(path: Path, limit: int = 80) -> list[str]:
    tree = ast.parse(path.read_text())
    return [f"{n.name} ({n.end_lineno - n.lineno + 1})" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > limit]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    mods = modules()
    rows = {m: {"lines": len(p.read_text().splitlines()), "imports": sorted(imports(p, mods, m)),
                "long_functions": long_functions(p),
                "borrowed_privates": borrowed_privates(p)} for m, p in mods.items()}
    total = sum(r["lines"] for r in rows.values())
    arrows = sum(len(r["imports"]) for r in rows.values())
    borrowed = sum(len(r["borrowed_privates"]) for r in rows.values())
    print(f"{len(rows)} modules, {total} lines, {arrows} import arrows, {borrowed} private names borrowed")
    for m, r in rows.items():
        lf = f"  long: {', '.join(r['long_functions'])}" if r["long_functions"] else ""
        lf += f"  borrows: {', '.join(r['borrowed_privates'])}" if r["borrowed_privates"] else ""
        print(f"{r['lines']:5d}  {m}{lf}")
    if args.json:
        Path(args.json).write_text(json.dumps({"modules": rows, "total_lines": total, "arrows": arrows,
                                          "borrowed_privates": borrowed}, indent=1) + "\n")


if __name__ == "__main__":
    main()
