"""Honesty training-data recipes (RAIT, Alignment for Honesty, preference pairs) and `hcnr honesty-data`."""

import argparse
import inspect
import json
import os
import random

import pytest

import hcnr_jax
from hcnr_jax.commands import honesty_data
from hcnr_jax.data import recipes as R
from hcnr_jax.data.benchmarks import example_id, order_key, split_of
from hcnr_jax.embedded import BUNDLED_DATA
from hcnr_jax.errors import DataError, HcnrError

IDK = R.A4H_IDK


def row(q, unans=0, answers=("Paris",), split="calibration", bench="kuq"):
    return dict(id=example_id(bench, q), benchmark=bench, question=q, unanswerable=unans,
                answers=list(answers) if unans != 1 else [], options=[], gold=-1, split=split)


def by_id(records):
    return {r["id"]: r for r in records}


def samples(k, m=10, right="It is Paris", wrong="It is Lyon."):
    """m sampled answers, k of them correct ("<right> #0" first), after one wrong one unless k == m."""
    good = [f"{right} #{j}" for j in range(k)]
    return [wrong, *good, *[wrong] * (m - 1 - k)] if k < m else good


# ---------------------------------------------------------------------------------------------
# Builders


def test_label_based_targets_and_seeded_order():
    rows = [row(f"Capital question {i}?", answers=(f"City{i}", "alias")) for i in range(6)]
    rows += [row(f"Unknowable question {i}?", unans=1) for i in range(4)]
    rows.append(row("Task question?", unans=-1, answers=("Answer",), bench="triviaqa"))
    out = R.label_based(rows, idk="no idea")
    assert [r["id"] for r in out] == sorted((r["id"] for r in rows), key=order_key)
    got = by_id(out)
    for r in rows:
        rec = got[r["id"]]
        want = "no idea" if r["unanswerable"] == 1 else r["answers"][0]
        assert (rec["prompt"], rec["response"], rec["known"]) == (r["question"], want, r["unanswerable"] != 1)
        assert rec["recipe"] == "label" and rec["benchmark"] == r["benchmark"]
    assert R.label_based(list(reversed(rows)), idk="no idea") == out  # input order does not matter
    assert R.label_based(rows[:1])[0]["response"] == "City0" and R.label_based(rows[6:7])[0]["response"] == IDK


def test_rait_keeps_correct_greedy_answers_only():
    rows = [row("Capital of France?"), row("Capital of Italy?", answers=("Rome",)),
            row("Who will win in 2090?", unans=1), row("Task?", unans=-1, answers=("42",), bench="triviaqa")]
    greedy = ["The capital is Paris.", "It is Milan.", "Paris, obviously.", "The answer is 42."]
    got = by_id(R.rait(rows, greedy))
    assert got[rows[0]["id"]]["response"] == "The capital is Paris." and got[rows[0]["id"]]["known"]
    assert got[rows[1]["id"]]["response"] == IDK and not got[rows[1]["id"]]["known"]
    assert got[rows[2]["id"]]["response"] == IDK and not got[rows[2]["id"]]["known"]  # unanswerable: always idk
    assert got[rows[3]["id"]]["response"] == "The answer is 42."
    assert by_id(R.rait(rows, greedy, idk="Unsure."))[rows[1]["id"]]["response"] == "Unsure."
    with pytest.raises(DataError, match="4 rows but 3 greedy"):
        R.rait(rows, greedy[:3])
    with pytest.raises(DataError, match="no gold answers"):
        R.rait([row("Why is the sky blue?", answers=())], ["Rayleigh scattering."])
    assert R.with_gold([row("Why is the sky blue?", answers=()), *rows]) == rows


def test_absolute_known_at_the_tau_boundary():
    rows = [row(f"Q{k}?") for k in range(4)] + [row("Unanswerable?", unans=1)]
    sampled = [samples(0), samples(1), samples(2), samples(10), []]  # unanswerable: no samples needed
    got = [by_id(R.absolute(rows, sampled, tau=t)) for t in (0.1, 0.2, 1.0)]
    acc = [0.0, 0.1, 0.2, 1.0]
    for k in range(4):
        rid = rows[k]["id"]
        assert got[0][rid]["expected_accuracy"] == pytest.approx(acc[k])
        assert [g[rid]["known"] for g in got] == [k >= 1, k >= 2, k == 3], k
        # target: the first correct sample
        assert got[0][rid]["response"] == ("It is Paris #0" if k else IDK)
    assert got[1][rows[1]["id"]]["response"] == IDK
    assert all(g[rows[4]["id"]]["response"] == IDK and g[rows[4]["id"]]["expected_accuracy"] is None for g in got)
    # A correct greedy answer is the preferred target; it does not make an unknown question known.
    greedy = ["Paris!", "Paris!", "Lyon.", "Paris!", "Paris!"]
    with_greedy = by_id(R.absolute(rows, sampled, greedy=greedy))
    assert [with_greedy[r["id"]]["response"] for r in rows] == [IDK, "Paris!", "It is Paris #0", "Paris!", IDK]
    for tau in (0.0, 1.5):
        with pytest.raises(DataError, match="tau"):
            R.absolute(rows, sampled, tau=tau)
    with pytest.raises(DataError, match="same number"):
        R.absolute(rows[:2], [samples(1), samples(1, m=5)])
    with pytest.raises(DataError, match="same number"):
        R.absolute(rows[:1], [[]])


NUM_LOW = ("I'm only about {}% confident to answer the question correctly, but based on my understanding and "
           "knowledge, here's what I think is correct.")
NUM_HIGH = ("I'm about {}% confident to answer the question correctly, and based on my understanding and "
            "knowledge, here's what I think is correct.")
VERB = {1: "I'm really not sure about this, but ", 2: "I'm really not sure about this, but ",
        3: "I'm not completely sure about this, but ", 4: "I'm not completely sure about this, but ",
        5: "I don't have strong feelings either way, but ", 6: "I don't have strong feelings either way, but ",
        7: "I'm fairly confident that ", 8: "I'm fairly confident that ",
        9: "I'm absolutely certain that ", 10: "I'm absolutely certain that "}


def test_confidence_expressions_per_bucket():
    rows = [row(f"Q{k}?") for k in range(11)] + [row("Unanswerable?", unans=1)]
    sampled = [samples(k, right="Paris") for k in range(11)] + [[]]
    num = by_id(R.confidence(rows, sampled, "num"))
    verb = by_id(R.confidence(rows, sampled, "verb"))
    for k in range(11):
        rid = rows[k]["id"]
        if k == 0:
            assert num[rid]["response"] == verb[rid]["response"] == IDK and not num[rid]["known"]
            continue
        pct = (NUM_LOW if k <= 5 else NUM_HIGH).format(10 * k)
        assert num[rid]["response"] == f"{pct} Paris #0", k
        assert verb[rid]["response"] == f"{VERB[k]}paris #0", k  # first letter lower-cased, as the paper
        assert num[rid]["recipe"] == "confidence-num" and verb[rid]["expected_accuracy"] == pytest.approx(k / 10)
    assert num[rows[-1]["id"]]["response"] == verb[rows[-1]["id"]]["response"] == IDK
    # m = 4: accuracies 1/4 .. 4/4 fall in the same ordered buckets; acronyms keep their case.
    assert R.confidence_expression(0.25, "num") == NUM_LOW.format(25)
    assert [R.confidence_expression(k / 4, "verb") for k in range(1, 5)] == [VERB[3], VERB[5], VERB[7], VERB[10]]
    usa = [row("Largest economy?", answers=("USA",))]
    assert R.confidence(usa, [["USA is."] * 10], "verb")[0]["response"] == VERB[10] + "USA is."
    # tau applies as in absolute
    assert R.confidence(rows[1:2], sampled[1:2], "num", tau=0.2)[0]["response"] == IDK
    with pytest.raises(DataError, match="style"):
        R.confidence(rows, sampled, "words")


def test_multisample_one_example_per_sample():
    rows = [row("France?"), row("Never?", unans=1), row("Italy?", answers=("Rome",))]
    sampled = [["Paris.", "Lyon.", "paris", "Nice."], ["whatever"], ["Milan.", "Turin.", "Naples.", "Venice."]]
    out = R.multisample(rows, sampled)
    assert len(out) == 12
    recs = {r["id"]: [x for x in out if x["id"] == r["id"]] for r in rows}
    assert [x["response"] for x in recs[rows[0]["id"]]] == ["Paris.", IDK, "paris", IDK]
    assert [x["known"] for x in recs[rows[0]["id"]]] == [True, False, True, False]
    assert all(x["expected_accuracy"] == 0.5 for x in recs[rows[0]["id"]])
    assert [x["response"] for x in recs[rows[1]["id"]]] == [IDK] * 4  # unanswerable: m copies of idk
    assert [x["response"] for x in recs[rows[2]["id"]]] == [IDK] * 4
    with pytest.raises(DataError, match="same number"):
        R.multisample(rows, [sampled[0], [], sampled[2][:3]])


def test_preference_pairs():
    rows = [row("France?"), row("Italy?", answers=("Rome",)), row("Never?", unans=1)]
    got = by_id(R.preference_pairs(rows, [True, False, True], ["Paris.", "Milan.", "In 2090."], idk="IDK."))
    assert (got[rows[0]["id"]]["chosen"], got[rows[0]["id"]]["rejected"]) == ("Paris.", "IDK.")
    assert (got[rows[1]["id"]]["chosen"], got[rows[1]["id"]]["rejected"]) == ("IDK.", "Milan.")
    assert (got[rows[2]["id"]]["chosen"], got[rows[2]["id"]]["rejected"]) == ("IDK.", "In 2090.")  # unanswerable
    assert [got[r["id"]]["known"] for r in rows] == [True, False, False]
    assert all(set(r) >= {"prompt", "chosen", "rejected", "id"} and "response" not in r for r in got.values())
    for bad in ("", "IDK."):
        with pytest.raises(DataError, match="non-empty text other than the idk"):
            R.preference_pairs(rows[:1], [False], [bad], idk="IDK.")
    with pytest.raises(DataError, match="known flags"):
        R.preference_pairs(rows, [True], ["a", "b", "c"])


BUILDERS = {
    "label": lambda rows: R.label_based(rows),
    "rait": lambda rows: R.rait(rows, ["Paris"] * len(rows)),
    "absolute": lambda rows: R.absolute(rows, [["Paris"]] * len(rows)),
    "confidence": lambda rows: R.confidence(rows, [["Paris"]] * len(rows), "verb"),
    "multisample": lambda rows: R.multisample(rows, [["Paris"]] * len(rows)),
    "dpo": lambda rows: R.preference_pairs(rows, [True] * len(rows), ["Paris"] * len(rows)),
}


@pytest.mark.parametrize("name", BUILDERS)
def test_builders_refuse_evaluation_rows_and_are_deterministic(name):
    rows = [row(f"Question {i}?") for i in range(5)] + [row(f"Unknown {i}?", unans=1) for i in range(3)]
    with pytest.raises(DataError, match="not in the calibration split"):
        BUILDERS[name]([*rows, row("Held out?", split="evaluation")])
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    out = BUILDERS[name](rows)
    assert out == BUILDERS[name](shuffled)
    assert [r["id"] for r in out] == sorted((r["id"] for r in out), key=order_key)


def test_balance_caps_the_majority_deterministically():
    recs = [{"id": f"x{i}", "known": i % 4 != 0} for i in range(40)]  # 10 unknown, 30 known
    out = R.balance(recs, "known", seed=0)
    assert sum(r["known"] for r in out) == 10 and sum(not r["known"] for r in out) == 10
    assert [r for r in recs if r in out] == out  # original order kept
    assert out == R.balance(recs, "known", seed=0) and out != R.balance(recs, "known", seed=1)
    # repeated ids (multisample) are distinct examples
    dup = [{"id": "a", "known": True}] * 3 + [{"id": "b", "known": False}] * 2
    assert len(R.balance(dup)) == 4
    assert R.balance(recs[1:4]) == recs[1:4]  # one class: nothing to cap
    with pytest.raises(DataError, match="no field 'known'"):
        R.balance([{"id": "a"}])


def test_prompt_based_instruction():
    text = R.prompt_based_instruction()
    assert text == ("Answer the question. If you don't know the answer to the question, it is appropriate to say "
                    "\"I apologize, but I'm not able to provide an answer to the question.\"")
    assert R.with_instruction(["Who wrote Hamlet?"]) == [f"{text}\nQ: Who wrote Hamlet?\nA:"]


def test_pools_are_calibration_rows_with_gold():
    got = R.pools(["kuq", "selfaware"], BUNDLED_DATA, limit=6)
    for name, rows in got.items():
        assert len(rows) == 6 and sum(r["unanswerable"] == 1 for r in rows) == 3
        assert all(r["split"] == "calibration" == split_of(name, r["question"]) for r in rows)
        assert all(r["unanswerable"] == 1 or r["answers"] for r in rows)
        assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), key=order_key)


# ---------------------------------------------------------------------------------------------
# The command


def parse(*argv):
    parser = argparse.ArgumentParser()
    honesty_data.add_parser(parser.add_subparsers())
    return parser.parse_args(["honesty-data", *argv])


@pytest.mark.parametrize("argv, error, match", [
    (["--recipe", "rait", "-n", "0"], HcnrError, "-n/--limit must be > 0"),
    (["--recipe", "absolute", "--samples", "0"], HcnrError, "--samples must be >= 1"),
    (["--recipe", "absolute", "--tau", "0"], HcnrError, r"--tau must be in \(0, 1\]"),
    (["--recipe", "absolute", "--tau", "1.01"], HcnrError, r"--tau must be in \(0, 1\]"),
    (["--recipe", "multisample", "--temperature", "-0.5"], HcnrError, "--temperature must be >= 0"),
    (["--recipe", "rait", "--max-new-tokens", "0"], HcnrError, "--max-new-tokens"),
    (["--recipe", "rait", "--batch-size", "0"], HcnrError, "--batch-size"),
    (["--recipe", "rait", "--idk-response", " "], HcnrError, "--idk-response"),
    (["--recipe", "rait", "--benchmarks", "kuq,nope"], DataError, r"--benchmarks: unknown benchmark\(s\) \['nope'\]"),
])
def test_command_validates_before_loading_a_model(argv, error, match, tmp_path):
    # The model path does not exist: a CheckpointError would mean it was loaded before validation.
    args = parse(*argv, "--model", str(tmp_path / "no_model"), "--out", str(tmp_path / "o.jsonl"))
    with pytest.raises(error, match=match):
        honesty_data.run(args)


def test_command_model_and_output_checks(tmp_path, monkeypatch):
    monkeypatch.delenv("HCNR_DATA_DIR", raising=False)  # FalseQA must be found nowhere
    monkeypatch.setenv("HCNR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "o.jsonl"
    with pytest.raises(HcnrError, match="--recipe rait needs --model"):
        honesty_data.run(parse("--recipe", "rait", "--out", str(out)))
    with pytest.raises(HcnrError, match="--recipe label uses gold answers only"):
        honesty_data.run(parse("--recipe", "label", "--model", "m", "--out", str(out)))
    out.write_text("keep me\n")
    with pytest.raises(HcnrError, match="already exists"):
        honesty_data.run(parse("--recipe", "rait", "--model", str(tmp_path / "m"), "--out", str(out)))
    assert out.read_text() == "keep me\n"
    with pytest.raises(HcnrError, match="is a directory"):
        honesty_data.run(parse("--recipe", "label", "--out", str(tmp_path), "--overwrite"))
    # Explicitly named benchmarks must be readable (the default list skips missing ones).
    with pytest.raises(DataError, match="not found"):
        honesty_data.run(parse("--recipe", "label", "--benchmarks", "kuq,falseqa", "--data-dir", str(BUNDLED_DATA),
                               "--out", str(tmp_path / "x.jsonl")))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_command_label_end_to_end_on_shipped_subsets(tmp_path, capsys, monkeypatch):
    out = tmp_path / "label.jsonl"
    # Default benchmarks: only kuq and selfaware are shipped; the others are skipped (the folders
    # searched after --data-dir, $HCNR_DATA_DIR and the user data folder, hold nothing here).
    monkeypatch.delenv("HCNR_DATA_DIR", raising=False)
    monkeypatch.setenv("HCNR_CACHE", str(tmp_path / "cache"))
    args = parse("--recipe", "label", "--data-dir", str(BUNDLED_DATA), "-n", "10", "--out", str(out))
    assert honesty_data.run(args) == 0
    recs = read_jsonl(out)
    assert len(recs) == 20 and {r["benchmark"] for r in recs} == {"kuq", "selfaware"}
    pools = R.pools(["kuq", "selfaware"], BUNDLED_DATA, limit=10)
    rows = {r["id"]: r for pool in pools.values() for r in pool}
    for rec in recs:
        r = rows[rec["id"]]
        assert rec["prompt"] == r["question"] and split_of(r["benchmark"], r["question"]) == "calibration"
        assert rec["response"] == (IDK if r["unanswerable"] == 1 else r["answers"][0])
    assert sum(r["response"] == IDK for r in recs) == 10
    printed = capsys.readouterr().out
    assert "kuq" in printed and "wrote 20 label examples" in printed and "falseqa" not in printed
    # --overwrite replaces; custom idk; --balance keeps equal classes
    args = parse("--recipe", "label", "--benchmarks", "selfaware", "--data-dir", str(BUNDLED_DATA), "-n", "9",
                 "--idk-response", "No idea.", "--balance", "--overwrite", "--out", str(out))
    assert honesty_data.run(args) == 0
    recs = read_jsonl(out)
    assert len(recs) == 8 and sum(r["response"] == "No idea." for r in recs) == 4
    # --seed (sampling, balance) leaves the split and the questions alone; there is no split seed.
    runs = {}
    for extra in ([], ["--seed", "3"]):
        args = parse("--recipe", "label", "--benchmarks", "kuq", "--data-dir", str(BUNDLED_DATA), "-n", "6",
                     "--overwrite", "--out", str(out), *extra)
        honesty_data.run(args)
        runs[tuple(extra)] = [r["id"] for r in read_jsonl(out)]
    assert runs[()] == runs[("--seed", "3")]
    with pytest.raises(SystemExit):
        parse("--recipe", "label", "--split-seed", "1", "--out", str(out))
    assert honesty_data.RECIPES == R.RECIPES


@pytest.mark.skipif(not os.environ.get("HCNR_DATA_DIR"), reason="HCNR_DATA_DIR (full benchmark files) not set")
def test_command_label_default_benchmarks_full_data(tmp_path):
    out = tmp_path / "label.jsonl"
    args = parse("--recipe", "label", "--data-dir", os.environ["HCNR_DATA_DIR"], "-n", "20", "--out", str(out))
    assert honesty_data.run(args) == 0
    recs = read_jsonl(out)
    assert {r["benchmark"] for r in recs} <= set(honesty_data.DEFAULT_BENCHMARKS)
    assert all(r["response"] for r in recs)


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    import tiny
    from transformers import AutoTokenizer

    from hcnr_jax.embedded import smollm2_gguf

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = tiny.hf_model("llama", vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=2)
    path = tiny.save_hf(model, tmp_path_factory.mktemp("tiny_chat"))
    tok.save_pretrained(path)
    return path


def tiny_args(model, out, recipe, *extra):
    return parse("--recipe", recipe, "--model", str(model), "--benchmarks", "kuq", "--data-dir", str(BUNDLED_DATA),
                 "-n", "4", "--max-new-tokens", "3", "--batch-size", "8", "--out", str(out), *extra)


def test_command_rait_end_to_end_tiny_model(tiny_chat_model, tmp_path):
    from hcnr_jax.data.samples import load_samples

    model = hcnr_jax.load_pretrained(tiny_chat_model)
    rows = R.pools(["kuq"], BUNDLED_DATA, limit=4)["kuq"]
    assert sum(r["unanswerable"] == 1 for r in rows) == 2
    greedy = hcnr_jax.generate(model, [r["question"] for r in rows], max_new_tokens=3, batch_size=8)
    out = tmp_path / "rait.jsonl"
    assert honesty_data.run(tiny_args(tiny_chat_model, out, "rait")) == 0
    assert read_jsonl(out) == R.rait(rows, greedy)  # the command's greedy answers are generate's
    assert len(load_samples(out, model.tokenizer)) == 4  # the trainer reads the file


class FakeGenerate:
    """Stands in for hcnr_jax.generation.generate: canned answers per question, calls recorded.
    Sampling calls answer the j-th copy of a question with ``sampled[q][j]``."""

    def __init__(self, greedy, sampled):
        self.greedy, self.sampled, self.calls = greedy, sampled, []

    def __call__(self, model, prompts, max_new_tokens, batch_size, progress=None, **kw):
        self.calls.append((list(prompts), max_new_tokens, batch_size, kw))
        if not kw.get("temperature"):
            return [self.greedy[p] for p in prompts]
        seen: dict[str, int] = {}
        out = []
        for p in prompts:
            out.append(self.sampled[p][seen.setdefault(p, 0)])
            seen[p] += 1
        return out


@pytest.fixture
def kuq4(monkeypatch):
    """4 shipped kuq rows (2 answerable, 2 unanswerable); the model loader is stubbed out."""
    monkeypatch.setattr(hcnr_jax.pretrained, "load_pretrained", lambda src: f"model:{src}")
    rows = R.pools(["kuq"], BUNDLED_DATA, limit=4)["kuq"]
    ans = [r for r in rows if r["unanswerable"] != 1]
    unans = [r for r in rows if r["unanswerable"] == 1]
    assert len(ans) == len(unans) == 2
    return rows, ans, unans


def test_command_dpo_pairs_drop_refused_unknowns(kuq4, monkeypatch, tmp_path, capsys):
    _, (a, b), (u, v) = kuq4
    greedy = {a["question"]: f"It is {a['answers'][0]}.", b["question"]: "Something wrong.",
              u["question"]: "I don't know.", v["question"]: "A confident made-up answer."}
    fake = FakeGenerate(greedy, {})
    monkeypatch.setattr(hcnr_jax.generation, "generate", fake)
    out = tmp_path / "dpo.jsonl"
    assert honesty_data.run(tiny_args("m", out, "dpo-pairs", "--idk-response", "IDK.")) == 0
    assert [(c[1], c[2], c[3]) for c in fake.calls] == [(3, 8, {})]  # one greedy call over every question
    assert sorted(fake.calls[0][0]) == sorted(greedy)
    got = by_id(read_jsonl(out))
    assert set(got) == {a["id"], b["id"], v["id"]}  # u's answer is already a refusal: nothing to reject
    ga = got[a["id"]]
    assert (ga["chosen"], ga["rejected"], ga["known"]) == (greedy[a["question"]], "IDK.", True)
    assert (got[b["id"]]["chosen"], got[b["id"]]["rejected"]) == ("IDK.", "Something wrong.")
    assert (got[v["id"]]["chosen"], got[v["id"]]["rejected"]) == ("IDK.", "A confident made-up answer.")
    assert "1 unknown questions dropped" in capsys.readouterr().out
    # Nothing left: an error, and no file.
    monkeypatch.setattr(hcnr_jax.generation, "generate", FakeGenerate(dict.fromkeys(greedy, ""), {}))
    with pytest.raises(DataError, match="no examples left"):
        honesty_data.run(tiny_args("m", tmp_path / "none.jsonl", "dpo-pairs"))
    assert not (tmp_path / "none.jsonl").exists()


def canned_answers(kuq4, monkeypatch):
    """Greedy and 5 sampled answers for kuq4's two answerable questions (the first known 3 times
    in 5), served by a `FakeGenerate` patched in; (rows, a, b, greedy, sampled, fake)."""
    rows, (a, b), _ = kuq4
    gold = a["answers"][0]
    greedy = {a["question"]: f"{gold} it is.", b["question"]: "Wrong."}
    sampled = {a["question"]: [f"Maybe {gold}."] * 3 + ["No."] * 2, b["question"]: ["No."] * 5}
    fake = FakeGenerate(greedy, sampled)
    monkeypatch.setattr(hcnr_jax.generation, "generate", fake)
    return rows, a, b, greedy, sampled, fake


def test_command_confidence_generates_greedy_and_m_samples(kuq4, monkeypatch, tmp_path):
    rows, a, b, greedy, sampled, fake = canned_answers(kuq4, monkeypatch)
    out = tmp_path / "conf.jsonl"
    args = tiny_args("m", out, "confidence-verb", "--samples", "5", "--temperature", "0.7", "--seed", "9")
    assert honesty_data.run(args) == 0
    # unanswerable questions are not generated; each answerable one is repeated m times in one call
    (p1, _, _, kw1), (p2, _, _, kw2) = fake.calls
    assert sorted(p1) == sorted(greedy) and kw1 == {}
    assert sorted(p2) == sorted([q for q in greedy for _ in range(5)])
    assert all(p2[i] == p2[i - i % 5] for i in range(10))
    assert kw2 == {"temperature": 0.7, "top_p": 1.0, "seed": 9}
    got = by_id(read_jsonl(out))
    target = greedy[a["question"]]  # 3/5 correct; the greedy answer is correct, so it is the target
    assert got[a["id"]]["response"] == "I don't have strong feelings either way, but " + target[0].lower() + target[1:]
    assert got[a["id"]]["expected_accuracy"] == 0.6 and got[b["id"]]["response"] == IDK
    assert read_jsonl(out) == R.confidence(rows, [sampled.get(r["question"], []) for r in rows], "verb",
                                           greedy=[greedy.get(r["question"], "") for r in rows])


@pytest.mark.skipif("temperature" not in inspect.signature(hcnr_jax.generate).parameters,
                    reason="generate has no sampling arguments yet")
def test_command_multisample_end_to_end_tiny_model(tiny_chat_model, tmp_path):
    model = hcnr_jax.load_pretrained(tiny_chat_model)
    rows = R.pools(["kuq"], BUNDLED_DATA, limit=4)["kuq"]
    answerable = [r for r in rows if r["unanswerable"] != 1]
    flat = hcnr_jax.generate(model, [r["question"] for r in answerable for _ in range(3)], max_new_tokens=3,
                             batch_size=8, temperature=1.0, top_p=1.0, seed=5)
    by_row = {r["id"]: flat[3 * j : 3 * j + 3] for j, r in enumerate(answerable)}
    assert len(set(flat)) > 1  # sampled, not three copies of one answer
    out = tmp_path / "multi.jsonl"
    assert honesty_data.run(tiny_args(tiny_chat_model, out, "multisample", "--samples", "3", "--seed", "5")) == 0
    recs = read_jsonl(out)
    assert recs == R.multisample(rows, [by_row.get(r["id"], []) for r in rows])
    assert len(recs) == 12 and sum(r["response"] == IDK for r in recs) >= 6  # 2 unanswerable x 3


def test_command_answers_file_shares_one_generation_pass_between_recipes(kuq4, monkeypatch, tmp_path, capsys):
    rows, _, _, greedy, sampled, fake = canned_answers(kuq4, monkeypatch)
    answers = tmp_path / "answers.json"

    def run(recipe, *extra):
        out = tmp_path / f"{recipe}.jsonl"
        assert honesty_data.run(tiny_args("m", out, recipe, "--samples", "5", "--answers", str(answers), *extra)) == 0
        return read_jsonl(out)

    verb = run("confidence-verb")
    assert len(fake.calls) == 2  # greedy + sampled
    absolute, multi = run("absolute"), run("multisample")
    assert len(fake.calls) == 2, "the second and third recipe must read the answers file, not generate"
    assert run("rait") == R.rait(rows, [greedy.get(r["question"], "") for r in rows])
    assert len(fake.calls) == 2
    samples = [sampled.get(r["question"], []) for r in rows]
    greedy_rows = [greedy.get(r["question"], "") for r in rows]
    assert verb == R.confidence(rows, samples, "verb", greedy=greedy_rows)
    assert absolute == R.absolute(rows, samples, 0.1, greedy=greedy_rows) and multi == R.multisample(rows, samples)
    # Other sampling settings: an error naming them; nothing generated or written.
    with pytest.raises(DataError, match=r"other settings \(temperature 1.0, now 0.7\)"):
        honesty_data.run(tiny_args("m", tmp_path / "x.jsonl", "absolute", "--samples", "5", "--answers",
                                   str(answers), "--temperature", "0.7"))
    assert len(fake.calls) == 2 and not (tmp_path / "x.jsonl").exists()
    answers.write_text("{not json")
    with pytest.raises(DataError, match="not an answers file"):
        honesty_data.run(tiny_args("m", tmp_path / "x.jsonl", "absolute", "--answers", str(answers)))
    with pytest.raises(HcnrError, match="must be different files"):
        honesty_data.run(tiny_args("m", answers, "absolute", "--answers", str(answers), "--overwrite"))
