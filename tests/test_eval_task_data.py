"""`hcnr eval --task-data FILE`: the user's own {"prompt", "response"} task, scored by contained and
exact match and by the gold response's log-likelihood, with bootstrap intervals; the output written
whole at the end, a stopped evaluation resumed from the user cache without any flag."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
from test_eval_runner import (
    strict_json,
    tiny_chat_model,  # noqa: F401  (the fixture)
)

import hcnr_jax
from hcnr_jax.cli import main
from hcnr_jax.data.answers import contains_answer, exact_match
from hcnr_jax.eval.runner import read_records
from hcnr_jax.user_cache import user_cache_dir

ROWS = [("What is the capital of France?", "Paris"), ("Who wrote Hamlet?", "William Shakespeare"),
        ("What is 2 + 2?", "4"), ("What colour is a clear sky?", "blue"), ("Name a prime number.", "7")]


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "my_task.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in ROWS))
    return path


def _eval(model, task, out, *flags):
    return main(["eval", "--model", str(model), "--task-data", str(task), "--benchmarks", "none",
                 "--max-new-tokens", "3", "--batch-size", "2", "--bootstrap", "100", "--out", str(out), *flags])


def _eval_runs() -> list[str]:
    runs = user_cache_dir() / "runs"
    return [p.name for p in runs.iterdir() if p.name.startswith("eval-")] if runs.exists() else []


def test_task_data_scores_and_intervals(tiny_chat_model, task_file, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "ev"
    assert _eval(tiny_chat_model, task_file, out) == 0
    printed = capsys.readouterr().out
    recs = read_records(out / "examples.jsonl")
    assert [r["benchmark"] for r in recs] == ["task:my_task"] * 5
    assert [(r["question"], r["answers"]) for r in recs] == [(p, [r]) for p, r in ROWS]
    m = strict_json(out / "metrics.json")["results"]["model"]["task:my_task"]
    cont = [contains_answer(r["response"], r["answers"]) for r in recs]
    em = [exact_match(r["response"], r["answers"]) for r in recs]
    assert m["n"] == 5 and m["containment"] == pytest.approx(np.mean(cont)) and m["exact_match"] == pytest.approx(np.mean(em))
    # The gold log-likelihood is the mean over rows of the gold response's mean token log-probability.
    from hcnr_jax.eval.likelihood import response_logprobs

    lp = response_logprobs(hcnr_jax.load_pretrained(tiny_chat_model), [{"prompt": p, "response": r} for p, r in ROWS])
    assert m["gold_loglik"] == pytest.approx(float(np.mean(np.round(lp, 5))), abs=1e-5) and m["gold_loglik"] < 0
    lo, hi = m["gold_loglik_ci"]
    assert lo <= m["gold_loglik"] <= hi and lo < hi
    assert len(m["containment_ci"]) == 2 and len(m["exact_match_ci"]) == 2
    # The table's rows carry the model's name, not "model".
    label = tiny_chat_model.name
    assert any(line.startswith("| ") and label in line.split("|")[1] and "task:my_task" in line
               for line in printed.splitlines())
    assert "| model | task:my_task |" not in (out / "table.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["examples.jsonl", "metrics.json", "settings.json", "table.md"]
    assert not _eval_runs()  # the records went with the run


@pytest.mark.parametrize(("line", "needle"), [
    ('{"prompt": "Q?"}', 'field "response" must be a non-empty string (got missing)'),
    ('{"prompt": "", "response": "A"}', 'field "prompt" must be a non-empty string'),
    ('["Q?", "A"]', 'expected a JSON object with "prompt" and "response"'),
    ('{"prompt": "Q?", "response": ', "invalid JSON")])
def test_a_bad_task_line_is_one_line_naming_file_line_and_field(tiny_chat_model, tmp_path, capsys, line,  # noqa: F811
                                                                needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q?", "response": "A"}\n' + line + "\n")
    assert _eval(tiny_chat_model, bad, tmp_path / "ev") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"hcnr eval: error: {bad}:2: ") and needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ev").exists()


def test_an_existing_out_needs_overwrite(tiny_chat_model, task_file, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "ev"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert _eval(tiny_chat_model, task_file, out) == 2
    assert "already exists" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep"
    assert _eval(tiny_chat_model, task_file, out, "--overwrite") == 0 and not (out / "mine.txt").exists()


def test_ctrl_c_then_the_same_command_resumes_from_the_user_cache(tiny_chat_model, task_file, tmp_path,  # noqa: F811
                                                                  capsys, monkeypatch):
    from hcnr_jax.eval import runner

    real, calls = runner.generate_ids, []

    def generate_then_ctrl_c(*a, **k):
        calls.append(1)
        result = real(*a, **k)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(runner, "generate_ids", generate_then_ctrl_c)
    out = tmp_path / "ev"
    assert _eval(tiny_chat_model, task_file, out) == 130
    err = capsys.readouterr().err
    assert "after 2 of 5 examples" in err and "rerun the same command to resume" in err, err
    assert not out.exists() and len(_eval_runs()) == 1
    assert _eval(tiny_chat_model, task_file, out) == 0
    assert "resuming the stopped evaluation" in capsys.readouterr().out
    assert len(calls) == 1 + 2  # the first batch is not generated again: 3 of 5 rows left, batches of 2
    assert len(read_records(out / "examples.jsonl")) == 5 and not _eval_runs()


def test_a_bfloat16_model_is_scored_in_float32_on_a_cpu(tiny_chat_model, task_file, tmp_path):  # noqa: F811
    """On a CPU the weights are upcast (exactly) and computed in float32: a bfloat16 model's gold
    log-likelihoods equal those of its float32 copy, value for value."""
    bf16, f32 = tmp_path / "bf16", tmp_path / "f32"
    assert main(["convert", str(tiny_chat_model), str(bf16), "--dtype", "bfloat16"]) == 0
    assert main(["convert", str(bf16), str(f32), "--dtype", "float32"]) == 0
    got = {}
    for name, model in (("bf16", bf16), ("f32", f32)):
        assert _eval(model, task_file, tmp_path / f"ev_{name}", "--no-cache") == 0
        got[name] = [r["gold_logprob"] for r in read_records(tmp_path / f"ev_{name}" / "examples.jsonl")]
    assert got["bf16"] == got["f32"]
    bf16_compute = hcnr_jax.load_pretrained(bf16)  # computing in bfloat16 would give other numbers
    from hcnr_jax.eval.likelihood import response_logprobs

    lp = response_logprobs(bf16_compute, [{"prompt": p, "response": r} for p, r in ROWS])
    assert [round(float(x), 5) for x in lp] != got["f32"]
