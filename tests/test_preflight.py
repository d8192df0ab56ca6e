"""Validation before any weight is read (docs/errors.md, "Checked first"): settings, output paths,
every data file, the models' configs (each through one schema, then against each other), weights.

Each case breaks one input and, where it matters, also the weights (a safetensors file cut in
half): the message must then be about the input checked first, which proves the weights were never
read. As in tests/test_bad_inputs.py: exit status 2, one line naming the file and field, no
traceback, nothing written, every input byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from hcnr_jax.cli import main

CASES: dict[str, Callable[[Path], tuple[list[str], list[str]]]] = {}


def case(name: str):
    def register(fn):
        CASES[name] = fn
        return fn
    return register


def _edit_config(model: Path, **changes: object) -> Path:
    f = model / "config.json"
    cfg = json.loads(f.read_text())
    cfg.update(changes)
    f.write_text(json.dumps(cfg))
    return f


def _cut_weights(model: Path) -> None:
    """Half of model.safetensors: reading any weight would fail with another message."""
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _data(root: Path, name: str, lines: list[str]) -> Path:
    p = root / name
    p.write_text("".join(line + "\n" for line in lines))
    return p


GOOD = '{"input_ids": [1, 5, 7, 9], "loss_mask": [0, 0, 1, 1]}'


# --- settings and outputs --------------------------------------------------------------------------

@case("convert/max-shard-size-nan")
def _(r):
    return ["convert", str(r / "m"), str(r / "out"), "--max-shard-size", "nan"], ["--max-shard-size nan"]


@case("convert/max-shard-size-negative")
def _(r):
    return ["convert", str(r / "m"), str(r / "out"), "--max-shard-size", "-1"], ["--max-shard-size -1.0", "positive"]


@case("convert/out-is-src")
def _(r):
    return ["convert", str(r / "m"), str(r / "m"), "--overwrite"], [f"{r / 'm'}: the output is the SRC input"]


@case("calib/existing-output")
def _(r):
    out = _data(r, "c.jsonl", ['{"prompt": "mine", "response": "x"}'])
    return ["calib", "--kind", "honesty", "-n", "2", "--out", str(out)], [f"--out {out}: already exists", "--overwrite"]


@case("plan/existing-output")
def _(r):
    out = _data(r, "plan.json", ["{}"])
    return ["plan", "--config", str(r / "m"), "--out", str(out)], [f"--out {out}: already exists"]


@case("merge/out-is-base")
def _(r):
    return (["merge", "--base", str(r / "m"), "--finetuned", str(r / "m2"), "--alpha", "0.5", "--out", str(r / "m"),
             "--overwrite"], [f"{r / 'm'}: the output is the --base input"])


# --- config.json, tokenizer.json, adapter_config.json: one schema -------------------------------------

@case("convert/config-is-a-list")
def _(r):
    (r / "m" / "config.json").write_text("[1, 2]")
    return ["convert", str(r / "m"), str(r / "out")], [f"{r / 'm' / 'config.json'}: expected a JSON object", "list"]


@case("convert/hidden-size-a-string")
def _(r):
    f = _edit_config(r / "m", hidden_size="48")
    _cut_weights(r / "m")
    return ["convert", str(r / "m"), str(r / "out")], [str(f), 'field hidden_size is "48"', "an integer >= 1"]


@case("convert/rope-scaling-a-string")
def _(r):
    f = _edit_config(r / "m", rope_scaling="linear")
    return ["convert", str(r / "m"), str(r / "out")], [str(f), 'field rope_scaling is "linear"', "a JSON object"]


@case("convert/rope-scaling-factor-negative")
def _(r):
    f = _edit_config(r / "m", rope_scaling={"rope_type": "linear", "factor": -2.0})
    return ["convert", str(r / "m"), str(r / "out")], [str(f), "field rope_scaling.factor is -2.0"]


@case("convert/heads-not-a-multiple")
def _(r):
    f = _edit_config(r / "m", num_key_value_heads=4)
    return ["convert", str(r / "m"), str(r / "out")], [str(f), "num_attention_heads 6", "num_key_value_heads 4"]


@case("convert/tokenizer-truncated")
def _(r):
    tok = r / "m" / "tokenizer.json"
    tok.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b"')
    _cut_weights(r / "m")
    return ["convert", str(r / "m"), str(r / "out")], [str(tok), "invalid JSON"]


@case("convert/tokenizer-added-token-without-id")
def _(r):
    tok = r / "m" / "tokenizer.json"
    tok.write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}},
                               "added_tokens": [{"content": "<s>"}]}))
    return ["convert", str(r / "m"), str(r / "out")], [str(tok), "field added_tokens"]


@case("convert/adapter-rank-a-string")
def _(r):
    cfg = r / "adapter" / "adapter_config.json"
    cfg.write_text(json.dumps({"peft_type": "LORA", "r": "8", "lora_alpha": 16, "target_modules": ["q_proj"]}))
    _cut_weights(r / "m")  # the adapter's settings come before the base's weights
    return ["convert", f"{r / 'm'}+{r / 'adapter'}", str(r / "out")], [str(cfg), 'field r is "8"']


# --- data files before any model; models against each other by name ---------------------------------

@case("repair/data-error-before-the-model")
def _(r):
    bad = _data(r, "hon.jsonl", [GOOD, GOOD, '{"input_ids": [1, 2], "loss_mask": [0]}'])
    _cut_weights(r / "m")
    return (["repair", "--base", str(r / "m"), "--finetuned", str(r / "m"), "--honesty-data", str(bad),
             "--out", str(r / "out")], [f"{bad}:3", "loss_mask"])


@case("repair/data-error-on-the-last-line")
def _(r):
    # --limit 1 uses one sample, but the whole file is checked.
    bad = _data(r, "task.jsonl", [GOOD, '{"prompt": "q", "response": 7}'])
    return (["repair", "--base", str(r / "m"), "--finetuned", str(r / "m"), "--task-data", str(bad), "--limit", "1",
             "--out", str(r / "out")], [f"{bad}:2", "'prompt' and 'response' must be strings"])


@case("repair/token-id-outside-the-vocabulary")
def _(r):
    bad = _data(r, "hon.jsonl", [GOOD, '{"input_ids": [1, 5000], "loss_mask": [0, 1]}'])
    _cut_weights(r / "m")
    return (["repair", "--base", str(r / "m"), "--finetuned", str(r / "m"), "--honesty-data", str(bad),
             "--out", str(r / "out")], [f"{bad}:2", "token id 5000 is outside the vocabulary"])


@case("repair/sizes-differ")
def _(r):
    _edit_config(r / "m2", hidden_size=64, intermediate_size=96)
    _cut_weights(r / "m")
    return (["repair", "--base", str(r / "m"), "--finetuned", str(r / "m2"), "--out", str(r / "out")],
            [f"--base {r / 'm'} vs --finetuned {r / 'm2'}", "hidden_size 48 vs 64", "intermediate_size 72 vs 96"])


@case("repair/families-differ")
def _(r):
    _edit_config(r / "m2", model_type="llama", architectures=["LlamaForCausalLM"])
    return (["repair", "--base", str(r / "m"), "--finetuned", str(r / "m2"), "--out", str(r / "out")],
            ["architectures differ: model_type qwen2 vs llama"])


@case("merge/sizes-differ")
def _(r):
    _edit_config(r / "m2", num_hidden_layers=2, layer_types=None)
    return (["merge", "--base", str(r / "m"), "--finetuned", str(r / "m2"), "--alpha", "0.5", "--out", str(r / "out")],
            ["num_hidden_layers 3 vs 2"])


@case("stats/data-error-before-the-model")
def _(r):
    bad = _data(r, "d.jsonl", [GOOD, "[1, 2, 3]"])
    _cut_weights(r / "m")
    return (["stats", "--model", str(r / "m"), "--data", str(bad), "--kind", "fisher", "--out", str(r / "out")],
            [f"{bad}:2", "expected a JSON object, got list"])


@case("train/data-error-before-the-model")
def _(r):
    bad = _data(r, "d.jsonl", ['{"prompt": "q", "response": "a"}', '{"prompt": "q"}'])
    _cut_weights(r / "m")
    return (["train", "--model", str(r / "m"), "--data", str(bad), "--out", str(r / "out")],
            [f"{bad}:2", "expected keys prompt/response"])


@case("train/pair-missing-field")
def _(r):
    bad = _data(r, "p.jsonl", ['{"prompt": "q", "chosen": "a", "rejected": "b"}', '{"prompt": "q", "chosen": "a"}'])
    _cut_weights(r / "m")
    return (["train", "--model", str(r / "m"), "--data", str(bad), "--objective", "dpo", "--out", str(r / "out")],
            [f"{bad}:2", "missing field 'rejected'"])


# --- the test ------------------------------------------------------------------------------------------

@pytest.fixture
def root(tmp_path, tiny_dirs):
    r = tmp_path / "ws"
    shutil.copytree(tiny_dirs["qwen2"][1], r / "m")
    shutil.copytree(tiny_dirs["qwen2"][1], r / "m2")
    (r / "adapter").mkdir()
    return r


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("name", list(CASES))
def test_checked_first(root, capsys, name):
    argv, needles = CASES[name](root)
    before = _snapshot(root)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hcnr {argv[0]}: error: "), err
    missing = [n for n in needles if n not in lines[0]]
    assert not missing, f"{missing} not in: {lines[0]}"
    assert _snapshot(root) == before, "inputs changed, or something was written"


def test_every_real_config_passes_the_schema(tiny_dirs):
    """The schema accepts what transformers writes for every family (and its tokenizer files)."""
    from hcnr_jax.preflight import model_config

    for family, (_, d) in tiny_dirs.items():
        assert model_config(d).model_type == json.loads((Path(d) / "config.json").read_text())["model_type"], family


def test_overwrite_replaces_for_calib_and_plan(tmp_path, capsys):
    out = tmp_path / "c.jsonl"
    out.write_text("old\n")
    assert main(["calib", "--kind", "honesty", "-n", "2", "--out", str(out), "--overwrite"]) == 0
    assert len(out.read_text().splitlines()) == 2
