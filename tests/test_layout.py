"""Issue 26's invariants, kept: no function over 80 lines and no private name imported from another
module in the package (scripts/layout.py measures both), and statistics options take a parsed mesh."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _layout():
    spec = importlib.util.spec_from_file_location("layout", ROOT / "scripts" / "layout.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_long_functions_and_no_borrowed_privates():
    layout = _layout()
    mods = layout.modules()
    assert "hcnr_jax.data.samples" in mods and "hcnr_jax.kernels.gram" in mods  # all three trees are read
    long = {m: layout.long_functions(p) for m, p in mods.items() if layout.long_functions(p)}
    borrowed = {m: layout.borrowed_privates(p) for m, p in mods.items() if layout.borrowed_privates(p)}
    assert not long, f"functions over 80 lines: {long}"
    assert not borrowed, f"private names imported from another module: {borrowed}"


def test_layout_finds_what_it_looks_for(tmp_path):
    layout = _layout()
    f = tmp_path / "m.py"
    f.write_text("from hcnr_jax.generation import _x, fine\n\ndef g():\n" + "    pass\n" * 81)
    assert layout.borrowed_privates(f) == ["hcnr_jax.generation._x"]
    assert layout.long_functions(f) == ["g (82)"]


def test_stats_options_take_a_parsed_mesh_only():
    from hcnr_jax.stats import StatsOptions

    with pytest.raises(TypeError, match=r"jax\.sharding\.Mesh"):
        StatsOptions(mesh="data=2")
    assert StatsOptions(mesh=None).mesh is None
