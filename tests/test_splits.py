"""No leak between calibration, development, training and evaluation rows, whatever the seed.

The split is fixed (one function of benchmark and question); a seed only changes which calibration
rows are drawn. Checked through the CLI (`hcnr calib --seed S`) at several seeds on every benchmark
that can be drawn from, and for the training sets of M0, M1 and the baselines. With the full files
(``$HCNR_DATA_DIR``) every benchmark is checked; without them, the shipped subsets.
"""

import os
from pathlib import Path

import pytest

from hcnr_jax.cli import main as cli_main
from hcnr_jax.data import benchmarks, calibration
from hcnr_jax.data.jsonl import read_jsonl
from hcnr_jax.data.recipes import pools
from hcnr_jax.embedded import BUNDLED, BUNDLED_DATA
from hcnr_jax.errors import DataError

FULL = Path(os.environ["HCNR_DATA_DIR"]) if os.environ.get("HCNR_DATA_DIR") else None
DATA = FULL or BUNDLED_DATA
# Benchmarks with gold answers on their answerable rows (honesty calibration needs them) / task sets.
HONESTY = ("refunq", "kuq", "selfaware") if FULL else ("kuq", "selfaware")
TASKS = ("hotpotqa", "medmcqa", "triviaqa") if FULL else ("hotpotqa",)
SEEDS = range(5)


def _questions(name: str, *splits: str) -> set[str]:
    ds = benchmarks.load_benchmark(name, DATA)
    return {benchmarks.normalise(q) for q, s in zip(ds["question"], ds["split"], strict=True) if s in splits}


def test_split_is_fixed_per_question_with_a_development_tail():
    qs = [f"question number {i}?" for i in range(4000)]
    sides = [benchmarks.split_of("kuq", q) for q in qs]
    pool = sum(s != "evaluation" for s in sides) / len(qs)
    dev = sides.count("development") / max(1, sum(s != "evaluation" for s in sides))
    assert 0.22 < pool < 0.28 and 0.15 < dev < 0.25
    # Normalisation: case, spacing and trailing punctuation do not move a question.
    assert benchmarks.split_of("kuq", "  Question NUMBER 7 ") == sides[7]
    # The development rows are the tail of the seed-0 order of the pool.
    ids = sorted((benchmarks.order_key(benchmarks.example_id("kuq", q)), s) for q, s in zip(qs, sides, strict=True)
                 if s != "evaluation")
    first_dev = next(i for i, (_, s) in enumerate(ids) if s == "development")
    assert all(s == "development" for _, s in ids[first_dev:])


@pytest.mark.parametrize("kind,names", [("honesty", HONESTY), ("task", TASKS)])
def test_calib_seeds_never_draw_evaluation_or_development_rows(kind, names, tmp_path):
    held_out = set().union(*(_questions(n, "evaluation", "development") for n in names))
    drawn = {}
    for seed in SEEDS:
        for name in names:
            out = tmp_path / f"{kind}_{name}_{seed}.jsonl"
            n = 32 if kind == "honesty" else 16
            argv = ["calib", "--kind", kind, "--benchmarks", name, "-n", str(n), "--seed", str(seed),
                    "--data-dir", str(DATA), "--out", str(out)]
            assert cli_main(argv) == 0
            prompts = {benchmarks.normalise(r["prompt"]) for _, r in read_jsonl(out)}
            assert len(prompts) == n and not prompts & held_out, (name, seed)
            drawn[name, seed] = prompts
    # A seed changes which rows are drawn (it is not ignored).
    for name in names:
        assert drawn[name, 0] != drawn[name, 1], name


def test_the_seed_zero_draw_is_the_shipped_calibration():
    """Seed 0 draws what it drew before the development split existed: the head of the fixed order."""
    pool = [r for r in benchmarks.load_benchmark("hotpotqa", BUNDLED_DATA) if r["split"] == "calibration"]
    shipped = [r["prompt"] for _, r in read_jsonl(BUNDLED / "calibration" / "task.jsonl")]
    assert [s["prompt"] for s in calibration.task_samples(pool, 128)] == shipped
    assert [s["prompt"] for s in calibration.task_samples(pool, 128, seed=3)] != shipped


def test_builders_reject_development_rows():
    row = dict(id="kuq-1", question="q?", unanswerable=1, answers=[], split="development")
    with pytest.raises(DataError, match="development or evaluation split"):
        calibration.honesty_samples({"kuq": [row]}, 2)
    with pytest.raises(DataError, match="development or evaluation split"):
        calibration.training_rows([row], 1)


@pytest.mark.skipif(FULL is None, reason="HCNR_DATA_DIR (the full benchmark files) not set")
def test_training_sets_of_m0_m1_and_baselines_never_touch_evaluation_or_development():
    """M0: 300 questions per honesty benchmark; M1: 1,000 HotpotQA; baselines: 170 per pool
    (experiments/make_models.py, experiments/reproduce.py); the second task: 800 MedMCQA."""
    m0 = {n: (300, n) for n in ("falseqa", "nec", "refunq", "kuq", "selfaware")}
    for name, (size, _) in {**m0, "hotpotqa": (1000, 0), "medmcqa": (800, 0)}.items():
        pool = [r for r in benchmarks.load_benchmark(name, FULL) if r["split"] == "calibration"]
        picked = {benchmarks.normalise(r["question"]) for r in calibration.training_rows(pool, size, name)}
        assert len(picked) == size and not picked & _questions(name, "evaluation", "development"), name
    baseline = pools(["kuq", "selfaware", "hotpotqa"], FULL, limit=170)
    for name, rows in baseline.items():
        assert len(rows) == 170
        assert not {benchmarks.normalise(r["question"]) for r in rows} & _questions(name, "evaluation", "development")


def test_general_questions_are_evaluation_only():
    ds = benchmarks.load_benchmark("general")
    assert set(ds["split"]) == {"evaluation"} and sorted(set(ds["unanswerable"])) == [0, 1]
    assert sum(ds["unanswerable"]) >= 40 and len(ds) - sum(ds["unanswerable"]) >= 40
    assert all(a for a, u in zip(ds["answers"], ds["unanswerable"], strict=True) if u == 0)


def test_calib_development_split_draws_only_development_rows(tmp_path):
    """`hcnr calib --split development`: the data `--choose` decides on, disjoint from everything else."""
    out = tmp_path / "dev.jsonl"
    name = "hotpotqa" if FULL else "medmcqa"
    ds = benchmarks.load_benchmark(name, DATA)
    if "development" not in ds["split"]:
        pytest.skip(f"no development rows in the {name} data found")
    n = min(8, ds["split"].count("development"))
    assert cli_main(["calib", "--kind", "task", "--benchmarks", name, "-n", str(n), "--split", "development",
                     "--data-dir", str(DATA), "--out", str(out)]) == 0
    prompts = {benchmarks.normalise(r["prompt"]) for _, r in read_jsonl(out)}
    assert len(prompts) == n and prompts <= _questions(name, "development")
