"""Benchmark loaders, seeded splits, shipped subsets and calibration builders."""

import json

import pytest

from hcnr_jax.data import read_jsonl
from hcnr_jax.embedded import CALIBRATION_DIR
from hcnr_jax.errors import DataError
from hcnr_jax.eval import calibration, data
from hcnr_jax.eval.bundle import build_default_calibration

FULL = data.DEFAULT_DATA_DIR


def test_split_is_per_question_and_seeded():
    qs = [f"question number {i}?" for i in range(2000)]
    sides = [data.split_of("kuq", q) for q in qs]
    frac = sides.count("calibration") / len(qs)
    assert 0.2 < frac < 0.3
    # Normalisation: case, spacing and trailing punctuation do not move a question.
    assert data.split_of("kuq", "  Question NUMBER 7 ") == sides[7]
    assert [data.split_of("kuq", q, seed=1) for q in qs] != sides


@pytest.mark.parametrize("name", ["kuq", "selfaware", "hotpotqa", "medmcqa"])
def test_shipped_subsets_load_and_never_overlap(name):
    ds = data.load_benchmark(name, data.BUNDLED_DATA)
    cal, ev = data.select(ds, "calibration"), data.select(ds, "evaluation")
    assert (len(cal) > 0) == (name != "medmcqa") and len(ev) >= 200
    assert not set(cal["id"]) & set(ev["id"])
    assert not {data.normalise(q) for q in cal["question"]} & {data.normalise(q) for q in ev["question"]}
    if name == "medmcqa":
        assert all(len(o) == 4 and 0 <= g < 4 for o, g in zip(ds["options"], ds["gold"], strict=True))
    if name in ("kuq", "selfaware"):
        assert set(ds["unanswerable"]) == {0, 1}


def test_select_balances_classes():
    ds = data.load_benchmark("selfaware", data.BUNDLED_DATA)
    sub = data.select(ds, "evaluation", 40)
    assert len(sub) == 40 and sum(sub["unanswerable"]) == 20
    assert sub["id"] == data.select(ds, "evaluation", 40)["id"]  # fixed order


@pytest.mark.skipif(not FULL.is_dir(), reason="needs ../shared/data")
def test_subset_splits_like_full_file():
    full = data.load_benchmark("kuq", FULL)
    sub = data.load_benchmark("kuq", data.BUNDLED_DATA)
    side = dict(zip(full["id"], full["split"], strict=True))
    assert all(side[i] == s for i, s in zip(sub["id"], sub["split"], strict=True))
    # The shipped rows are the first rows of each side of the full file.
    assert data.select(sub, "evaluation", 100)["id"] == data.select(full, "evaluation", 100)["id"]


def test_shipped_calibration_is_rebuilt_identically_and_from_pools(tmp_path):
    assert build_default_calibration(data.BUNDLED_DATA, tmp_path) == (128, 128)
    for f in ("honesty.jsonl", "task.jsonl"):
        assert (tmp_path / f).read_text() == (CALIBRATION_DIR / f).read_text()
    hon = [r for _, r in read_jsonl(CALIBRATION_DIR / "honesty.jsonl")]
    assert sum(r["response"] == calibration.IDK_RESPONSE for r in hon) == 64
    eval_q = set()
    for b in ("kuq", "selfaware", "hotpotqa"):
        ds = data.load_benchmark(b, data.BUNDLED_DATA)
        eval_q |= {q for q, s in zip(ds["question"], ds["split"], strict=True) if s == "evaluation"}
    task = [r for _, r in read_jsonl(CALIBRATION_DIR / "task.jsonl")]
    assert not eval_q & {r["prompt"] for r in hon + task}
    assert all(set(r) == {"prompt", "response"} for r in hon + task)


def test_builders_reject_evaluation_rows_and_short_pools():
    row = dict(id="kuq-1", question="q?", unanswerable=1, answers=[], split="evaluation")
    with pytest.raises(DataError, match="not in the calibration pool"):
        calibration.honesty_samples({"kuq": [row]}, 2)
    with pytest.raises(DataError, match="needed"):
        calibration.honesty_samples({"kuq": [{**row, "split": "calibration"}]}, 4)


def test_missing_file_and_bad_benchmark_are_named(tmp_path):
    with pytest.raises(DataError, match=r"knowns_unknowns\.jsonl"):
        data.load_benchmark("kuq", tmp_path)
    with pytest.raises(DataError, match="unknown benchmark"):
        data.load_benchmark("nope", tmp_path)
    (tmp_path / "kuq").mkdir()
    (tmp_path / "kuq" / "knowns_unknowns.jsonl").write_text(json.dumps({"question": "", "answer": [], "unknown": True}))
    with pytest.raises(DataError, match="empty"):
        data.load_benchmark("kuq", tmp_path)


@pytest.mark.skipif(not FULL.is_dir(), reason="needs ../shared/data")
@pytest.mark.parametrize("name", ["falseqa", "nec", "refunq", "puqa", "pkqa", "nonambigqa", "triviaqa"])
def test_unshipped_benchmarks_load(name):
    ds = data.load_benchmark(name, FULL)
    assert len(ds) > 900 and all(q for q in ds["question"][:50])
    if name in ("falseqa", "nec", "refunq"):
        assert set(ds["unanswerable"]) == {0, 1}
    if name == "triviaqa":
        assert not any(q.startswith("Question:") or q.endswith("Answer:") for q in ds["question"])
