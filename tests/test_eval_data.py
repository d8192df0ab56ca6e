"""Benchmark loaders, the data folder lookup, seeded splits, shipped subsets and calibration builders.

The full benchmark files are reached only through $HCNR_DATA_DIR (tests needing them skip without it)."""

import argparse
import json
import os
from pathlib import Path

import pytest

from hcnr_jax.data import benchmarks, calibration
from hcnr_jax.data.jsonl import read_jsonl
from hcnr_jax.embedded import BUNDLED_DATA, CALIBRATION_DIR
from hcnr_jax.errors import DataError
from hcnr_jax.eval.bundle import build_default_calibration

FULL = Path(os.environ["HCNR_DATA_DIR"]) if os.environ.get("HCNR_DATA_DIR") else None
NEEDS_FULL = pytest.mark.skipif(FULL is None, reason="HCNR_DATA_DIR (the full benchmark files) not set")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No $HCNR_DATA_DIR, and an empty user cache folder."""
    monkeypatch.delenv("HCNR_DATA_DIR", raising=False)
    monkeypatch.setenv("HCNR_CACHE", str(tmp_path / "cache"))
    return tmp_path


def write_kuq(folder, n):
    """A KUQ file of ``n`` known questions under ``folder``."""
    f = folder / "kuq" / "knowns_unknowns.jsonl"
    f.parent.mkdir(parents=True)
    f.write_text("".join(json.dumps({"question": f"q{i} in {folder.name}?", "answer": ["a"], "unknown": False}) + "\n"
                         for i in range(n)))
    return folder


def test_split_is_per_question():
    qs = [f"question number {i}?" for i in range(2000)]
    sides = [benchmarks.split_of("kuq", q) for q in qs]
    frac = sum(s != "evaluation" for s in sides) / len(qs)
    assert 0.2 < frac < 0.3
    # Normalisation: case, spacing and trailing punctuation do not move a question.
    assert benchmarks.split_of("kuq", "  Question NUMBER 7 ") == sides[7]
    assert [benchmarks.split_of("selfaware", q) for q in qs] != sides  # each benchmark has its own split


@pytest.mark.parametrize("name", ["kuq", "selfaware", "hotpotqa", "medmcqa"])
def test_shipped_subsets_load_and_never_overlap(name):
    ds = benchmarks.load_benchmark(name, BUNDLED_DATA)
    cal, ev = benchmarks.select(ds, "calibration"), benchmarks.select(ds, "evaluation")
    assert (len(cal) > 0) == (name != "medmcqa") and len(ev) >= 200
    assert not set(cal["id"]) & set(ev["id"])
    assert not {benchmarks.normalise(q) for q in cal["question"]} & {benchmarks.normalise(q) for q in ev["question"]}
    if name == "medmcqa":
        assert all(len(o) == 4 and 0 <= g < 4 for o, g in zip(ds["options"], ds["gold"], strict=True))
    if name in ("kuq", "selfaware"):
        assert set(ds["unanswerable"]) == {0, 1}


def test_select_balances_classes():
    ds = benchmarks.load_benchmark("selfaware", BUNDLED_DATA)
    sub = benchmarks.select(ds, "evaluation", 40)
    assert len(sub) == 40 and sum(sub["unanswerable"]) == 20
    assert sub["id"] == benchmarks.select(ds, "evaluation", 40)["id"]  # fixed order


@NEEDS_FULL
def test_subset_splits_like_full_file():
    full = benchmarks.load_benchmark("kuq", FULL)
    sub = benchmarks.load_benchmark("kuq", BUNDLED_DATA)
    side = dict(zip(full["id"], full["split"], strict=True))
    assert all(side[i] == s for i, s in zip(sub["id"], sub["split"], strict=True))
    # The shipped rows are the first rows of each side of the full file.
    assert benchmarks.select(sub, "evaluation", 100)["id"] == benchmarks.select(full, "evaluation", 100)["id"]


def test_shipped_calibration_is_rebuilt_identically_and_from_pools(tmp_path):
    assert build_default_calibration(BUNDLED_DATA, tmp_path) == (128, 128)
    for f in ("honesty.jsonl", "task.jsonl"):
        assert (tmp_path / f).read_text() == (CALIBRATION_DIR / f).read_text()
    hon = [r for _, r in read_jsonl(CALIBRATION_DIR / "honesty.jsonl")]
    assert sum(r["response"] == calibration.IDK_RESPONSE for r in hon) == 64
    eval_q = set()
    for b in ("kuq", "selfaware", "hotpotqa"):
        ds = benchmarks.load_benchmark(b, BUNDLED_DATA)
        eval_q |= {q for q, s in zip(ds["question"], ds["split"], strict=True) if s == "evaluation"}
    task = [r for _, r in read_jsonl(CALIBRATION_DIR / "task.jsonl")]
    assert not eval_q & {r["prompt"] for r in hon + task}
    assert all(set(r) == {"prompt", "response"} for r in hon + task)


def test_builders_reject_evaluation_rows_and_short_pools():
    row = dict(id="kuq-1", question="q?", unanswerable=1, answers=[], split="evaluation")
    with pytest.raises(DataError, match="not in the calibration split"):
        calibration.honesty_samples({"kuq": [row]}, 2)
    with pytest.raises(DataError, match="needed"):
        calibration.honesty_samples({"kuq": [{**row, "split": "calibration"}]}, 4)


def test_missing_benchmark_names_its_files_source_and_licence(clean_env):
    d = clean_env / "d"
    d.mkdir()
    with pytest.raises(DataError) as e:
        benchmarks.load_benchmark("nec", d)
    msg = str(e.value)
    for part in ("'nec'", "nec/NEC_answerable.json", "nec/NEC_unanswerable.json", str(d),
                 "https://github.com/genglinliu/UnknownBench/tree/7283e4218b9146275d3069306927c3289fad576a/data/NEC",
                 "licence: none stated", "HCNR_DATA_DIR", str(clean_env / "cache" / "data"), "hcnr data"):
        assert part in msg, part
    with pytest.raises(DataError, match="unknown benchmark"):
        benchmarks.load_benchmark("nope", d)
    with pytest.raises(DataError, match="not a directory"):
        benchmarks.load_benchmark("kuq", d / "typo")
    (d / "kuq").mkdir()
    (d / "kuq" / "knowns_unknowns.jsonl").write_text(json.dumps({"question": "", "answer": [], "unknown": True}))
    with pytest.raises(DataError, match="empty"):
        benchmarks.load_benchmark("kuq", d)


def test_every_benchmark_has_a_source_and_a_licence():
    for b in benchmarks.BENCHMARKS.values():
        # Our own sets (written for this project) ship in the package; every other one names its source.
        own = b.url.startswith("hcnr_jax/bundled/data/") and b.shipped and "this project" in b.licence
        assert (b.url.startswith("https://") or own) and b.licence and b.rows > 0 and b.files, b.name
        assert all(not f.startswith("/") and ".." not in f for f in b.files), b.name
        assert b.shipped == all((BUNDLED_DATA / f).is_file() for f in b.files), b.name


def test_lookup_order(clean_env, monkeypatch):
    """--data-dir, then $HCNR_DATA_DIR, then the user data folder, then the shipped subset."""
    given, env = write_kuq(clean_env / "given", 2), write_kuq(clean_env / "env", 3)
    shipped = len(benchmarks.load_benchmark("kuq", BUNDLED_DATA))
    assert shipped > 4 and benchmarks.locate("kuq").source == benchmarks.SHIPPED
    assert len(benchmarks.load_benchmark("kuq")) == shipped
    write_kuq(clean_env / "cache" / "data", 4)  # $HCNR_CACHE/data
    assert benchmarks.locate("kuq").source == "user data folder" and len(benchmarks.load_benchmark("kuq")) == 4
    monkeypatch.delenv("HCNR_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(clean_env / "xdg"))
    write_kuq(clean_env / "xdg" / "hcnr_jax" / "data", 6)  # an older version's folder: read while no new one
    assert len(benchmarks.load_benchmark("kuq")) == 6
    write_kuq(clean_env / "xdg" / "hcnr" / "data", 5)  # else $XDG_CACHE_HOME/hcnr/data
    assert len(benchmarks.load_benchmark("kuq")) == 5
    monkeypatch.setenv("HCNR_DATA_DIR", str(env))
    assert benchmarks.locate("kuq").source == "$HCNR_DATA_DIR" and len(benchmarks.load_benchmark("kuq")) == 3
    assert benchmarks.locate("kuq", given).source == "--data-dir" and len(benchmarks.load_benchmark("kuq", given)) == 2
    # A folder without the benchmark's files is passed over (here for SelfAware: the shipped subset).
    assert benchmarks.locate("selfaware", given).source == benchmarks.SHIPPED
    assert benchmarks.available(benchmarks.REFUSAL_BENCHMARKS, given) == ["kuq", "selfaware"]


def test_nothing_is_downloaded_unless_asked(clean_env, monkeypatch):
    calls = []
    real = benchmarks.datasets.load_dataset

    def spy(path, *args, **kwargs):
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(benchmarks.datasets, "load_dataset", spy)
    for name in benchmarks.available(benchmarks.BENCHMARKS):
        benchmarks.load_benchmark(name)
    assert calls and set(calls) == {"json"}  # local files only


def test_hub_is_an_explicit_opt_in(clean_env, monkeypatch):
    with pytest.raises(DataError, match="no Hugging Face Hub source"):
        benchmarks.load_benchmark("nec", benchmarks.HUB)
    calls = []
    local = benchmarks.datasets.load_dataset("json", data_files=str(BUNDLED_DATA / "kuq/knowns_unknowns.jsonl"),
                                       split="train")

    def fake_hub(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        if path != "json":
            raise ConnectionError("offline")
        return local

    monkeypatch.setattr(benchmarks.datasets, "load_dataset", fake_hub)
    with pytest.raises(DataError, match=r"amayuelas/KUQ.*ConnectionError: offline.*Offline\?"):
        benchmarks.load_benchmark("kuq", benchmarks.HUB)
    assert calls[-1] == ("amayuelas/KUQ", None, {"split": "train", "data_files": "knowns_unknowns.jsonl"})
    # The Hub's rows go through the same reader as the local file's.
    monkeypatch.setattr(benchmarks.datasets, "load_dataset", lambda *a, **k: local)
    hub = benchmarks.load_benchmark("kuq", benchmarks.HUB)
    assert hub["id"] == benchmarks.load_benchmark("kuq", BUNDLED_DATA)["id"]
    assert benchmarks.locate("kuq", benchmarks.HUB).describe() == "hub"


def test_eval_defaults_to_the_available_benchmarks(clean_env):
    from hcnr_jax.commands.eval import resolve_benchmarks

    assert resolve_benchmarks(None, None) == ("kuq", "selfaware")
    assert resolve_benchmarks(("all",), None) == ("kuq", "selfaware", "general", "hotpotqa", "medmcqa", "catalog")
    assert resolve_benchmarks(("medmcqa",), None) == ("medmcqa",)
    with pytest.raises(DataError, match=r"'triviaqa'.*triviaqa_sm_sub\.jsonl"):
        resolve_benchmarks(("kuq", "triviaqa"), None)
    assert resolve_benchmarks(None, benchmarks.HUB) == ("kuq",)  # the refusal benchmark with a Hub source
    with pytest.raises(DataError, match="not a directory"):  # a mistyped --data-dir is named, not skipped
        resolve_benchmarks(None, str(clean_env / "typo"))


@NEEDS_FULL
@pytest.mark.parametrize("name", ["falseqa", "nec", "refunq", "puqa", "pkqa", "nonambigqa", "triviaqa"])
def test_unshipped_benchmarks_load(name):
    ds = benchmarks.load_benchmark(name, FULL)
    assert len(ds) > 900 and all(q for q in ds["question"][:50])
    if name in ("falseqa", "nec", "refunq"):
        assert set(ds["unanswerable"]) == {0, 1}
    if name == "triviaqa":
        assert not any(q.startswith("Question:") or q.endswith("Answer:") for q in ds["question"])


def test_hcnr_data_lists_every_benchmark(clean_env, capsys):
    from hcnr_jax.commands import benchmarks as data_cmd

    parser = argparse.ArgumentParser()
    data_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["data"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in out.splitlines()
            if ln.startswith("| ") and ln.split("|")[1].strip() in benchmarks.BENCHMARKS}
    assert set(rows) == set(benchmarks.BENCHMARKS)
    for name, (kind, where, n, full, files, url, licence, hub) in rows.items():
        b = benchmarks.BENCHMARKS[name]
        assert (kind, full, files, url, licence) == (b.kind, str(b.rows), ", ".join(b.files), b.url, b.licence)
        assert hub == (b.hub.repo if b.hub else "")
        if b.shipped:
            assert where == benchmarks.SHIPPED and int(n) == len(benchmarks.load_benchmark(name, BUNDLED_DATA))
        else:
            assert (where, n) == ("no", "")
    assert str(clean_env / "cache" / "data") in out


def test_bundle_never_rebuilds_a_subset_from_itself(clean_env):
    from hcnr_jax.eval.bundle import write_subset

    with pytest.raises(DataError, match="full kuq file is needed"):
        write_subset("kuq", clean_env, clean_env / "out")
