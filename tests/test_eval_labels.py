"""The shipped hand labels and the default detector's agreement with them."""

from collections import Counter

import pytest

from hcnr_jax.errors import DataError
from hcnr_jax.eval.data import REFUSAL_BENCHMARKS
from hcnr_jax.eval.labels import agreement, load_labels
from hcnr_jax.eval.refusal import RefusalDetector


def test_labels_cover_the_benchmarks():
    rows = load_labels()
    assert len(rows) >= 150
    per = Counter(r["benchmark"] for r in rows)
    assert set(per) == set(REFUSAL_BENCHMARKS) and min(per.values()) >= 25
    assert len({(r["benchmark"], r["id"], r.get("system", "none")) for r in rows}) == len(rows)
    assert all(r["question"] and "response" in r for r in rows)
    labels = Counter(r["label"] for r in rows)
    assert labels["refused"] >= 10 and labels["answered"] >= 50


def test_default_detector_agrees_with_hand_labels():
    """Regression floor: the measured values are in the report; a change to the rules that
    makes the detector worse than this fails here."""
    a = agreement(load_labels(), RefusalDetector())
    assert a["precision"] >= 0.75  # measured 0.833 (5 of 6)
    assert a["recall"] >= 0.3  # measured 0.357 (5 of 14): paraphrased hedges ("a topic of debate") are missed
    assert a["accuracy"] >= 0.85  # measured 0.907 (3-way)


def test_bad_label_is_named(tmp_path):
    p = tmp_path / "l.jsonl"
    p.write_text('{"benchmark": "kuq", "id": "x", "question": "q", "response": "r", "label": "maybe"}\n')
    with pytest.raises(DataError, match=r"l\.jsonl:1"):
        load_labels(p)
