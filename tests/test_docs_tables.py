"""Every table of README.md's results section and experiments/RESULTS.md is what experiments/tables.py renders
from the committed JSON under experiments/results (fast: no model work).

A table lives between ``<!-- table:NAME -->`` / ``<!-- evidence:TASK -->`` markers; `python experiments/tables.py`
rewrites the blocks, `--check` names the stale ones.
"""

import copy
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = {"README.md": ("## Results", "\n## Use"), "experiments/RESULTS.md": (None, None)}
# Documents whose generated blocks are checked, beside typed tables that are not results (knobs, settings).
BLOCKS_ONLY = ("docs/scale.md", "experiments/results/plan_llama.md")


def _tables():
    spec = importlib.util.spec_from_file_location("tables", ROOT / "experiments" / "tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tables = _tables()


def _blocks():
    return [(doc, name, content) for doc in (*DOCS, *BLOCKS_ONLY)
            for name, content in tables.blocks((ROOT / doc).read_text())]


BLOCKS = [pytest.param(doc, name, content, id=f"{doc}:{name}") for doc, name, content in _blocks()]


def _section(doc: str) -> str:
    text, (start, end) = (ROOT / doc).read_text(), DOCS[doc]
    if start is not None:
        text = text[text.index(start):]
    if end is not None:
        text = text[: text.index(end, 1)]
    return text


@pytest.mark.parametrize("doc,name,content", BLOCKS)
def test_every_block_is_what_its_json_renders(doc, name, content):
    assert name in tables.RENDERERS, f"{doc}: block {name} has no renderer in experiments/tables.py"
    new = tables.render(name)
    if new is None:
        pytest.skip(f"{name}: {', '.join(tables.RENDERERS[name][0])} not written yet")
    assert content == new, f"{doc}: {name} differs from its JSON; run `python experiments/tables.py`"


def test_every_table_is_inside_a_block():
    for doc in DOCS:
        text = _section(doc)
        outside = tables.BLOCK.sub("", text)
        typed = [line for line in outside.split("\n") if line.startswith("|")]
        assert not typed, f"{doc}: table lines outside any generated block: {typed[:3]}"


def test_every_renderer_has_a_block():
    names = {name for _, name, _ in _blocks()}
    assert set(tables.RENDERERS) <= names, f"renderers without a block: {sorted(set(tables.RENDERERS) - names)}"


def test_a_block_without_a_renderer_fails():
    with pytest.raises(KeyError, match="no renderer"):
        tables.render("table:no-such-table")
    text = "<!-- table:no-such-table -->\n| x |\n<!-- /table:no-such-table -->\n"
    assert tables.blocks(text) == [("table:no-such-table", "| x |\n")]
    with pytest.raises(KeyError):
        tables.regenerate(text)


def _loaded(name):
    return [tables.load(s) for s in tables.RENDERERS[name][0]]


@pytest.mark.parametrize("name,path,value,shown", [
    ("table:models", ("scores", "m0", "avg_f1"), 0.123, "12.3 [58.4, 65.3]"),
    ("table:main", ("rows", "DPO", "avg_f1_ci"), [0.2, 0.3], "[20.0, 30.0]"),
    ("table:probes", ("results", "layers", "18", "M0->M1", "lobo", "mean"), 0.4321, "| 0.432 |"),
    ("table:demo", ("rows", "M1+HCNR", "avg_f1"), 0.5, "| 50.0 |"),
    ("evidence:hotpotqa", ("rows", "M0", "scores", "avg_f1"), 0.777, "77.7 [59.1, 68.5]"),
    ("table:bench-stats", ("results", 1, "seconds"), 8.25, "| hcnr | 8.25 |"),
    ("table:plans", ("steps", "fisher", "peak_bytes"), 3 * 2**30, "| 3.00 + 14.96 = 17.96 |"),
])
def test_a_changed_json_value_changes_the_table(name, path, value, shown):
    docs = _loaded(name)
    before = tables.RENDERERS[name][1](*docs)
    changed = copy.deepcopy(docs[0])
    node = changed
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    after = tables.RENDERERS[name][1](changed, *docs[1:])
    assert after != before and shown in after and shown not in before


def test_check_names_a_stale_block(tmp_path, monkeypatch, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text("x\n<!-- table:second-task -->\n| stale |\n<!-- /table:second-task -->\ny\n")
    monkeypatch.setattr(tables, "DOCS", (doc,))
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    assert tables.main(["--check"]) == 1
    assert "table:second-task" in capsys.readouterr().err
    assert doc.read_text().count("| stale |") == 1  # --check writes nothing
    assert tables.main([]) == 0
    assert tables.main(["--check"]) == 0
    st = json.loads((tables.RESULTS / "second_task.json").read_text())
    assert f"{100 * st['scores']['m0']['avg_f1']:.1f}" in doc.read_text()


def test_a_block_whose_json_is_not_written_is_left_alone(monkeypatch, capsys):
    monkeypatch.setattr(tables, "load", lambda source: None)
    text = "<!-- evidence:catalog -->\nkept\n<!-- /evidence:catalog -->\n"
    notes = []
    assert tables.regenerate(text, notes) == text
    assert notes and "not written yet" in notes[0]
