"""Rebuild the shipped data: licensed benchmark subsets (original file formats) and the default
calibration files. Run from the repository: ``python -m hcnr_jax.eval.bundle --data-dir DIR``, DIR
the folder holding the full benchmark files (docs/data.md).

Subsets keep each file's own format, so `hcnr_jax.data.benchmarks` reads them with the same readers
and, because the split is a function of the question alone, they split exactly like the full files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hcnr_jax.data.benchmarks import (
    BENCHMARKS,
    SHARED_QUESTIONS,
    example_id,
    load_benchmark,
    locate,
    question_key,
    raw_rows,
    select,
    shared_questions,
)
from hcnr_jax.data.calibration import honesty_samples, task_samples
from hcnr_jax.data.jsonl import write_jsonl
from hcnr_jax.embedded import BUNDLED_DATA, CALIBRATION_DIR
from hcnr_jax.errors import DataError
from hcnr_jax.io import atomic_write_text

# Rows shipped per benchmark: (calibration pool, evaluation split).
# Rows shipped per benchmark: (calibration pool, evaluation split, development split).
SUBSET = {"kuq": (96, 200, 48), "selfaware": (96, 200, 48), "hotpotqa": (160, 200, 64), "medmcqa": (0, 200, 0)}
DEV_SAMPLES = 64  # development samples of each kind shipped for the demo's --choose (honesty, task)


def subset_ids(name: str, data_dir: Path) -> set[str]:
    ds = load_benchmark(name, data_dir)
    n_cal, n_eval, n_dev = SUBSET[name]
    return (set(select(ds, "calibration", n_cal)["id"]) | set(select(ds, "evaluation", n_eval)["id"])
            | set(select(ds, "development", n_dev)["id"] if n_dev else []))


def write_subset(name: str, data_dir: Path, out_dir: Path) -> int:
    """Copy the rows of ``name`` whose ids are in the shipped subset, in the source's own format."""
    if locate(name, data_dir).root != data_dir:  # never rebuild a subset from the shipped subset itself
        raise DataError(f"{data_dir}: {BENCHMARKS[name].files[0]} not found (the full {name} file is needed)")
    keep = subset_ids(name, data_dir)
    (file,) = BENCHMARKS[name].files
    src, dst = data_dir / file, out_dir / file
    if name in ("kuq", "medmcqa"):
        lines = [ln for ln in src.read_text(encoding="utf-8").split("\n") if ln.strip()]
        rows = [json.loads(ln) for ln in lines]
        if name == "medmcqa":
            rows = [{k: v for k, v in r.items() if k != "exp"} for r in rows]  # explanations: not needed, large
        kept = [r for r in rows if example_id(name, r["question"]) in keep]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
    elif name == "selfaware":
        obj = json.loads(src.read_text(encoding="utf-8"))
        kept = obj["example"] = [r for r in obj["example"] if example_id(name, r["question"]) in keep]
        obj["quantity"] = len(kept)
        text = json.dumps(obj, ensure_ascii=False, indent=1)
    else:
        kept = [r for r in json.loads(src.read_text(encoding="utf-8")) if example_id(name, r["question"]) in keep]
        text = json.dumps(kept, ensure_ascii=False)
    atomic_write_text(dst, text)
    return len(kept)


def build_default_calibration(data_dir: Path | None, out_dir: Path, n: int = 128) -> tuple[int, int]:
    """The default D_hon (KUQ + SelfAware pools) and D_task (HotpotQA pool) of `hcnr repair`, and the
    development samples of `hcnr demo`'s choice of alpha (``dev_honesty.jsonl``, ``dev_task.jsonl``:
    the same benchmarks' development splits)."""
    dev = {b: [r for r in load_benchmark(b, data_dir) if r["split"] == "development"] for b in ("kuq", "selfaware")}
    write_jsonl(honesty_samples(dev, DEV_SAMPLES, split="development"), out_dir / "dev_honesty.jsonl",
                keys=("prompt", "response"))
    write_jsonl(task_samples([r for r in load_benchmark("hotpotqa", data_dir) if r["split"] == "development"],
                             DEV_SAMPLES, "hotpotqa", split="development"), out_dir / "dev_task.jsonl",
                keys=("prompt", "response"))
    pools = {b: [r for r in load_benchmark(b, data_dir) if r["split"] == "calibration"] for b in ("kuq", "selfaware")}
    hon = honesty_samples(pools, n)
    task = task_samples([r for r in load_benchmark("hotpotqa", data_dir) if r["split"] == "calibration"], n,
                        "hotpotqa")
    write_jsonl(hon, out_dir / "honesty.jsonl", keys=("prompt", "response"))
    write_jsonl(task, out_dir / "task.jsonl", keys=("prompt", "response"))
    return len(hon), len(task)


def shared_questions_table(data_dir: Path) -> dict:
    """{"questions": {question_key: [benchmarks]}} for every question held by two or more of the
    benchmarks found in ``data_dir`` (the split gives such a question one side everywhere)."""
    holders: dict[str, set[str]] = {}
    for name in BENCHMARKS:
        if locate(name, data_dir).root != data_dir and not BENCHMARKS[name].evaluation_only:
            continue  # only the full files (and our own evaluation-only sets) define the table
        for r in raw_rows(name, data_dir):
            holders.setdefault(question_key(r["question"]), set()).add(name)
    return {"about": "hashes (hcnr_jax.data.benchmarks.question_key) of questions found in several benchmarks; "
                     "built by `python -m hcnr_jax.eval.bundle --data-dir DIR` from the full files",
            "questions": {k: sorted(v) for k, v in sorted(holders.items()) if len(v) > 1}}


def write_catalog(out_dir: Path) -> int:
    """The generated catalogue task (hcnr_jax/data/catalog.py) as ``catalog/catalog.jsonl``."""
    from hcnr_jax.data.catalog import generate

    rows = generate()
    atomic_write_text(out_dir / "catalog" / "catalog.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, required=True, help="folder holding the full benchmark files")
    args = ap.parse_args()
    # First: the split of every row below depends on it.
    atomic_write_text(SHARED_QUESTIONS, json.dumps(shared_questions_table(args.data_dir), indent=0) + "\n")
    shared_questions.cache_clear()
    print("catalog", write_catalog(BUNDLED_DATA), "rows")
    for name in SUBSET:
        print(name, write_subset(name, args.data_dir, BUNDLED_DATA), "rows")
    # Built from the shipped subsets, so anyone can rebuild them without the full data.
    print("calibration", build_default_calibration(BUNDLED_DATA, CALIBRATION_DIR))


if __name__ == "__main__":
    main()
