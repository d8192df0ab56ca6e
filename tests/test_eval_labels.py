"""The shipped hand labels and the default detector's agreement with them."""

from collections import Counter

import pytest

from hcnr_jax.errors import DataError
from hcnr_jax.eval.data import REFUSAL_BENCHMARKS
from hcnr_jax.eval.labels import agreement, half_of, halves, load_labels, main, source_of
from hcnr_jax.eval.refusal import RefusalDetector


def test_labels_cover_the_benchmarks():
    rows = load_labels()
    assert len(rows) >= 150
    per = Counter(r["benchmark"] for r in rows)
    assert set(per) == set(REFUSAL_BENCHMARKS) and min(per.values()) >= 25
    assert len({(r["benchmark"], r["id"], r.get("system", "none")) for r in rows}) == len(rows)
    assert all(r["question"] and "response" in r for r in rows)
    labels = Counter(r["label"] for r in rows)
    assert labels["refused"] >= 30 and labels["answered"] >= 50
    assert Counter(source_of(r) for r in rows) == {"none": 300, "cautious": 180, "strict": 80}


def test_default_detector_agrees_with_hand_labels():
    """Regression floor on all 560 labels: the measured values are in the report; a change to the
    rules that makes the detector worse than this fails here."""
    a = agreement(load_labels(), RefusalDetector())
    # Before the SmolLM2 rules (refusal.SMOLLM2): precision 0.700, recall 0.194 (7 of 36), F1 0.304.
    assert a["precision"] >= 0.8  # measured 0.875 (21 of 24)
    assert a["recall"] >= 0.52  # measured 0.583 (21 of 36): FalseQA "No, X is not Y" rebuttals are missed
    assert a["f1"] >= 0.65  # measured 0.700
    assert a["accuracy"] >= 0.85  # measured 0.893 (3-way)


def test_halves_are_fixed_and_held_out_numbers_stable():
    """The development / held-out split is a seeded hash of the id: fixed, so the held-out half
    stays unseen by rule changes; its numbers are the ones to quote."""
    rows = load_labels()
    assert [half_of(r) for r in rows[:3]] == ["development", "development", "held_out"]
    h = halves(rows)
    assert (len(h["development"]), len(h["held_out"])) == (296, 264)
    assert sum(r["label"] == "refused" for r in h["held_out"]) == 13
    # a question labelled under several system prompts is in one half only
    by_q: dict = {}
    for r in rows:
        by_q.setdefault((r["benchmark"], r["id"]), set()).add(half_of(r))
    assert all(len(v) == 1 for v in by_q.values())
    a = agreement(h["held_out"], RefusalDetector())
    # Before the SmolLM2 rules: precision 1.000 (3 of 3), recall 0.231 (3 of 13), F1 0.375.
    assert a["precision"] >= 0.8  # measured 0.875 (7 of 8)
    assert a["recall"] >= 0.45  # measured 0.538 (7 of 13)
    assert a["f1"] >= 0.6  # measured 0.667


def test_report_prints_held_out_half_and_sources(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["labels"])
    main()
    out = capsys.readouterr().out
    for row in ("| half=held_out | 264 | 13 |", "| half=development | 296 | 23 |", "| system=cautious | 180 |",
                "| system=strict | 80 |", "| system=none | 300 |", "| benchmark=kuq | 112 |"):
        assert row in out


def test_bad_label_is_named(tmp_path):
    p = tmp_path / "l.jsonl"
    p.write_text('{"benchmark": "kuq", "id": "x", "question": "q", "response": "r", "label": "maybe"}\n')
    with pytest.raises(DataError, match=r"l\.jsonl:1"):
        load_labels(p)
