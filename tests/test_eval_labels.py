"""The shipped hand labels, the Wilson intervals, and the detectors' agreement with the labels."""

import json
import math
from collections import Counter

import pytest

from hcnr_jax.data.benchmarks import REFUSAL_BENCHMARKS
from hcnr_jax.errors import DataError
from hcnr_jax.eval.labels import (
    MODELS,
    REQUIRED,
    agreement,
    half_of,
    halves,
    key_of,
    load_labels,
    main,
    model_groups,
    model_of,
    pr_table,
    source_of,
)
from hcnr_jax.eval.metrics import refused_counts, wilson
from hcnr_jax.eval.refusal import VERDICTS, RefusalDetector

SMOLLM2_COUNTS = {"none": 300, "cautious": 180, "strict": 80}
TRAINED_COUNTS = {"m0": 94, "m1": 60, "hcnr": 94, "rait": 60}
# The evidence rows' labels (experiments/label_evidence.py): 100 each, with a `degenerate` flag.
EVIDENCE_COUNTS = {"hcnr_s0": 215, "merge": 215, "layers": 215, "hcnr_chosen": 115, "rait_gold": 40,
                   "dpo": 80}  # four blind batches


def smollm2_rows():
    return [r for r in load_labels() if model_of(r) == "smollm2"]


def test_labels_file_is_valid():
    """Every row has the required fields and a label in VERDICTS; (benchmark, id, system, model) is
    unique (so no (id, source) pair twice); source models and sizes as labels/README.md says."""
    rows = load_labels()
    assert len(rows) == 560 + sum(TRAINED_COUNTS.values()) + sum(EVIDENCE_COUNTS.values())
    for r in rows:
        assert all(r.get(f) not in (None, "") for f in ("benchmark", "id", "question", "label"))
        assert isinstance(r["response"], str) and r["label"] in VERDICTS
        # -1: task set (HotpotQA), no answerability label (hcnr_jax.data.benchmarks)
        assert r["unanswerable"] in ((-1,) if r["benchmark"] == "hotpotqa" else (0, 1))
        assert model_of(r) in MODELS
        assert set(r) <= set(REQUIRED) | {"unanswerable", "system", "source_model", "degenerate"}
        assert ("degenerate" in r) == (model_of(r) in EVIDENCE_COUNTS)
        assert "system" not in r or model_of(r) == "smollm2"  # the trained models had no system prompt
    assert len({key_of(r) for r in rows}) == len(rows)
    assert len({(r["id"], source_of(r)) for r in rows}) == len(rows)
    assert Counter(source_of(r) for r in rows) == SMOLLM2_COUNTS | TRAINED_COUNTS | EVIDENCE_COUNTS
    per = Counter(r["benchmark"] for r in rows)
    assert set(per) == set(REFUSAL_BENCHMARKS) | {"hotpotqa", "general"} and min(per[b] for b in REFUSAL_BENCHMARKS) >= 25
    labels = Counter(r["label"] for r in rows)
    assert labels["refused"] >= 30 and labels["answered"] >= 50
    # the trained-model rows: a seeded sample spread over the benchmarks (17 / 11 per refusal benchmark)
    for m, n in TRAINED_COUNTS.items():
        b = Counter(r["benchmark"] for r in rows if model_of(r) == m)
        assert set(b) == set(REFUSAL_BENCHMARKS) | {"hotpotqa"}
        assert {b[x] for x in REFUSAL_BENCHMARKS} == {17 if n == 94 else 11}


@pytest.mark.parametrize(("k", "n", "lo", "hi"), [
    # n = 10: hand-computed (0/10: upper z^2 / (n + z^2) = 3.8415 / 13.8415).
    (0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0),
    # Newcombe (1998), Stat. Med. 17:857, Table I, method 3 (Wilson score, no continuity correction).
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
])
def test_wilson_interval_known_values(k, n, lo, hi):
    a, b = wilson(k, n)
    assert a == pytest.approx(lo, abs=5e-5) and b == pytest.approx(hi, abs=5e-5)


def test_wilson_edge_cases():
    assert all(math.isnan(x) for x in wilson(0, 0))
    assert wilson(3, 10, confidence=0.99)[0] < wilson(3, 10)[0] < 0.3 < wilson(3, 10)[1] < wilson(3, 10, 0.99)[1]


def test_refused_counts():
    hand = ["refused", "refused", "refused", "answered", "undetermined", "answered"]
    pred = ["refused", "refused", "answered", "refused", "refused", "undetermined"]
    c = refused_counts(hand, pred)
    assert (c["n"], c["n_refused"], c["tp"], c["fp"], c["fn"]) == (6, 3, 2, 2, 1)
    assert c["precision"] == 0.5 and c["recall"] == pytest.approx(2 / 3)
    assert c["precision_ci"] == wilson(2, 4) and c["recall_ci"] == wilson(2, 3)
    none = refused_counts(["answered"], ["answered"])
    assert math.isnan(none["precision"]) and math.isnan(none["recall"])
    with pytest.raises(ValueError):
        refused_counts(["refused"], [])


def test_grouping_per_source_model():
    rows = [{"label": "refused"}, {"label": "answered", "source_model": "m0"},
            {"label": "refused", "source_model": "hcnr"}, {"label": "refused", "source_model": "m0", "system": "x"}]
    assert [model_of(r) for r in rows] == ["smollm2", "m0", "hcnr", "m0"]
    assert [source_of(r) for r in rows] == ["none", "m0", "hcnr", "m0"]
    g = model_groups(rows)
    assert g == {"smollm2": [0], "m0": [1, 3], "hcnr": [2], "trained": [1, 2, 3], "all": [0, 1, 2, 3]}
    t = {(x["detector"], x["group"]): x for x in
         pr_table(rows, {"d": ["refused", "refused", "answered", "refused"]})}
    assert (t["d", "m0"]["tp"], t["d", "m0"]["fp"], t["d", "m0"]["fn"]) == (1, 1, 0)
    assert (t["d", "hcnr"]["tp"], t["d", "hcnr"]["fn"]) == (0, 1)
    assert (t["d", "trained"]["n"], t["d", "all"]["tp"]) == (3, 2)


def test_default_detector_agrees_with_smollm2_labels():
    """Regression floor on the 560 SmolLM2 labels: the measured values are in
    docs/refusal_detectors.md; a change to the rules that makes the detector worse fails here."""
    a = agreement(smollm2_rows(), RefusalDetector())
    # Before the SmolLM2 rules (refusal.SMOLLM2): precision 0.700, recall 0.194 (7 of 36), F1 0.304.
    assert a["precision"] >= 0.8  # measured 0.875 (21 of 24)
    assert a["recall"] >= 0.52  # measured 0.583 (21 of 36): FalseQA "No, X is not Y" rebuttals are missed
    assert a["f1"] >= 0.65  # measured 0.700
    assert a["accuracy"] >= 0.85  # measured 0.893 (3-way)


def test_default_detector_on_trained_models():
    """The 1,188 labels of M0 / M1 / HCNR / RAIT and evidence-row responses (labelled blind, never used for rules)."""
    rows = [r for r in load_labels() if model_of(r) != "smollm2"]
    pred = [d.verdict for d in RefusalDetector().detect_all([r["response"] for r in rows],
                                                            [r["question"] for r in rows])]
    c = refused_counts([r["label"] for r in rows], pred)
    assert c["n_refused"] == 223
    assert c["precision"] >= 0.95  # measured 1.000 (219 of 219), 95% CI [0.983, 1.000]
    assert c["recall"] >= 0.95  # measured 0.982 (219 of 223), 95% CI [0.955, 0.993]


def test_halves_are_fixed_and_held_out_numbers_stable():
    """The development / held-out split is a seeded hash of the id: fixed, so the held-out half
    stays unseen by rule changes; its numbers are the ones to quote."""
    rows = smollm2_rows()
    assert [half_of(r) for r in rows[:3]] == ["development", "development", "held_out"]
    h = halves(rows)
    assert (len(h["development"]), len(h["held_out"])) == (296, 264)
    assert sum(r["label"] == "refused" for r in h["held_out"]) == 13
    # a question labelled under several system prompts / models is in one half only
    by_q: dict = {}
    for r in load_labels():
        by_q.setdefault((r["benchmark"], r["id"]), set()).add(half_of(r))
    assert all(len(v) == 1 for v in by_q.values())
    a = agreement(h["held_out"], RefusalDetector())
    # Before the SmolLM2 rules: precision 1.000 (3 of 3), recall 0.231 (3 of 13), F1 0.375.
    assert a["precision"] >= 0.8  # measured 0.875 (7 of 8)
    assert a["recall"] >= 0.45  # measured 0.538 (7 of 13)
    assert a["f1"] >= 0.6  # measured 0.667


def test_report_prints_models_halves_and_sources(capsys, tmp_path):
    out_json = tmp_path / "t" / "table.json"
    main(["--json", str(out_json)])
    out = capsys.readouterr().out
    for row in ("| default | trained | 1188 | 223 | 219 | 0 | 4 | 1.000 [0.983, 1.000] | 0.982 [0.955, 0.993] |",
                "| default | smollm2 | 560 | 36 | 21 | 3 | 15 | 0.875 [0.690, 0.957] | 0.583 [0.422, 0.729] |",
                "| default | m1 | 60 | 0 | 0 | 0 | 0 | n/a | n/a |",
                "| half=held_out | 813 | 120 |", "| model=m0 | 94 | 42 |", "| system=cautious | 180 |",
                "| system=strict | 80 |", "| system=none | 300 |", "| benchmark=kuq | 298 |"):
        assert row in out
    t = json.loads(out_json.read_text())
    assert t["n"] == 1748 and t["source_models"] == {"smollm2": 560} | TRAINED_COUNTS | EVIDENCE_COUNTS
    rows = {(x["detector"], x["group"]): x for x in t["by_model"]}
    assert {d for d, _ in rows} == {"default", "selfaware", "alignment_for_honesty", "unknownbench"}
    assert (rows["default", "hcnr"]["tp"], rows["default", "hcnr"]["fn"]) == (6, 1)
    assert rows["default", "m1"]["precision"] is None and rows["default", "m1"]["precision_ci"] == [None, None]


def test_bad_rows_are_named(tmp_path):
    p = tmp_path / "l.jsonl"
    p.write_text('{"benchmark": "kuq", "id": "x", "question": "q", "response": "r", "label": "maybe"}\n')
    with pytest.raises(DataError, match=r"l\.jsonl:1"):
        load_labels(p)
    good = {"benchmark": "kuq", "id": "x", "question": "q", "response": "r", "label": "refused"}
    p.write_text(json.dumps(good) + "\n" + json.dumps(good | {"source_model": "m0"}) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(DataError, match=r"l\.jsonl:3: .* already labelled on line 1"):
        load_labels(p)
    p.write_text(json.dumps(good | {"source_model": "m7"}) + "\n")
    with pytest.raises(DataError, match="source_model 'm7'"):
        load_labels(p)
    p.write_text(json.dumps({k: v for k, v in good.items() if k != "response"}) + "\n")
    with pytest.raises(DataError, match=r"missing field.*response"):
        load_labels(p)
