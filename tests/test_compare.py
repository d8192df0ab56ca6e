"""`hcnr compare`: several models on the same examples in one before/after table, differences with
paired bootstrap intervals, written as markdown, JSON and a plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny
from test_eval_runner import GGUF, tiny_chat_model  # noqa: F401  (the fixture)

from hcnr_jax.cli import main
from hcnr_jax.embedded import BUNDLED_DATA
from hcnr_jax.errors import DataError
from hcnr_jax.eval.compare import compare
from hcnr_jax.eval.report import compare_table


@pytest.fixture(scope="module")
def other_chat_model(tmp_path_factory):
    """A second tiny chat model (other random weights, same tokenizer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    model = tiny.hf_model("llama", vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=2, seed=7)
    path = tiny.save_hf(model, tmp_path_factory.mktemp("other_chat") / "after")
    tok.save_pretrained(path)
    return path


def _task_records(gold: np.ndarray, name: str = "task:t") -> list[dict]:
    return [dict(model="model", benchmark=name, id=f"{name}#{i}", question="q", answers=["Paris"],
                 response="Paris" if i % 2 else "Rome", verdict="answered", gold_logprob=float(g))
            for i, g in enumerate(gold)]


def test_differences_are_paired():
    """B is A plus 0.1 nats on every example, and the examples differ a lot: the paired interval of
    the difference is exactly [0.1, 0.1] while each model's own interval is wide."""
    gold = np.random.default_rng(0).normal(-5, 2, 40)
    res = compare(["A", "B"], [_task_records(gold), _task_records(gold + 0.1)], resamples=200)
    row = next(r for r in res["rows"] if r["metric"] == "gold_loglik")
    d = row["differences"][0]
    assert d["difference"] == pytest.approx(0.1) and d["interval"] == pytest.approx([0.1, 0.1])
    lo, hi = row["intervals"][0]
    assert hi - lo > 0.5 and row["n"] == 40
    acc = next(r for r in res["rows"] if r["metric"] == "containment")
    assert acc["values"] == [0.5, 0.5] and acc["differences"][0]["interval"] == [0.0, 0.0]
    table = compare_table(res)
    assert "| task:t | gold log-lik (nats) | 40 | -" in table and "+0.100 (0.100 to 0.100) *" in table


def test_only_examples_every_model_answered_are_compared():
    gold = np.linspace(-3, -1, 10)
    res = compare(["A", "B"], [_task_records(gold), _task_records(gold)[2:]], resamples=0)
    row = next(r for r in res["rows"] if r["metric"] == "gold_loglik")
    assert row["n"] == 8 and row["values"][0] == pytest.approx(gold[2:].mean())
    with pytest.raises(DataError, match="at least two"):
        compare(["A"], [_task_records(gold)])


def test_cli_compare_two_models_then_from_their_eval_dirs(tiny_chat_model, other_chat_model, tmp_path,  # noqa: F811
                                                         capsys):
    task = tmp_path / "qa.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"Question {i}?", "response": f"Answer {i}"}) + "\n" for i in range(6)))
    common = ["--benchmarks", "kuq", "--limit", "4", "--task-data", str(task), "--max-new-tokens", "3",
              "--batch-size", "4", "--data-dir", str(BUNDLED_DATA), "--bootstrap", "100"]
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(tiny_chat_model), "--model", str(other_chat_model), *common,
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    before, after = tiny_chat_model.name, other_chat_model.name
    assert f"| benchmark | metric | N | {before} | {after} | {after} − {before} |" in printed
    res = json.loads((out / "compare.json").read_text())
    assert res["models"] == [before, after]
    assert {(r["benchmark"], r["metric"]) for r in res["rows"]} >= {("kuq", "f1"), ("kuq", "rf_delta"),
                                                                     ("task:qa", "containment"), ("task:qa", "gold_loglik")}
    for r in res["rows"]:
        v0, v1 = r["values"]
        if v0 is not None and v1 is not None:
            assert r["differences"][0]["difference"] == pytest.approx(v1 - v0)
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "compare.md").read_text() in printed
    for name in (before, after):
        assert (out / "models" / name / "metrics.json").is_file()
    # The same table from the two evaluations the command kept under models/.
    again = tmp_path / "cmp2"
    assert main(["compare", "--eval-dir", str(out / "models" / before), "--eval-dir", str(out / "models" / after),
                 "--bootstrap", "100", "--out", str(again)]) == 0
    assert json.loads((again / "compare.json").read_text())["rows"] == res["rows"]


@pytest.mark.parametrize(("flags", "needle"), [
    (["--model", "a"], "give at least two --model"),
    (["--model", "a", "--eval-dir", "b"], "give --model or --eval-dir, not both"),
    (["--model", "a", "--model", "b", "--name", "x"], "--name given 1 times for 2 models"),
    (["--eval-dir", "nowhere", "--eval-dir", "nowhere"], "nowhere: not an `hcnr eval` output folder (no examples.jsonl)")])
def test_cli_compare_bad_input(tmp_path, capsys, flags, needle):
    assert main(["compare", *flags, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and not (tmp_path / "o").exists()
