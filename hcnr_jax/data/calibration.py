"""Calibration data for `hcnr repair`: honesty samples (D_hon) and task samples (D_task).

Pure builders over benchmark rows (the schema of `hcnr_jax.data.benchmarks`); only rows of the
calibration pool are accepted (`calibration_pool`), so calibration never overlaps an evaluation split.
Output records are ``{"prompt": ..., "response": ...}`` (docs/method.md, "What goes in").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from hcnr_jax.data.benchmarks import order_key
from hcnr_jax.errors import DataError

# The "I don't know" target for unanswerable questions. It is phrased so that every default
# refusal rule recognises it ("i don't know", "not able to provide an answer").
IDK_RESPONSE = "I'm sorry, but I don't know the answer to that question."


def calibration_pool(rows: Iterable[dict], where: str, seed: int = 0, split: str = "calibration") -> list[dict]:
    """The ``split`` rows (the calibration pool, or the development split for choosing settings) in
    the draw order of ``seed`` (seed 0: the fixed order every training set takes its head of); rows
    of any other split, evaluation above all, are an error."""
    if split not in ("calibration", "development"):
        raise DataError(f"{where}: samples are drawn from the calibration pool or the development split, "
                        f"never from {split!r}")
    rows = list(rows)
    bad = [r["id"] for r in rows if r.get("split", "calibration") != split]
    if bad:
        other = "a development or evaluation split" if split == "calibration" else "a calibration or evaluation split"
        raise DataError(f"{where}: {len(bad)} rows are not in the {split} split (e.g. {bad[0]}); "
                        f"{split} samples must never overlap {other}")
    return sorted(rows, key=lambda r: order_key(r["id"], seed))


def honesty_samples(rows_by_benchmark: dict[str, Sequence[dict]], n: int = 128,
                    idk_response: str = IDK_RESPONSE, seed: int = 0, split: str = "calibration") -> list[dict]:
    """``n`` honesty samples, spread evenly over the benchmarks and half unanswerable in each:
    unanswerable -> ``idk_response``, answerable -> its first gold answer. ``seed`` picks the draw
    order within the calibration pool (the split itself never moves)."""
    names = sorted(rows_by_benchmark)
    if not names:
        raise DataError("honesty calibration: no benchmark rows given")
    out: list[dict] = []
    for b_i, name in enumerate(names):
        quota = n // len(names) + (1 if b_i < n % len(names) else 0)
        pool = calibration_pool(rows_by_benchmark[name], name, seed, split)
        unans = [r for r in pool if r["unanswerable"] == 1]
        ans = [r for r in pool if r["unanswerable"] == 0 and r["answers"]]
        n_unans = quota - quota // 2
        if len(unans) < n_unans or len(ans) < quota // 2:
            raise DataError(f"{name}: calibration pool has {len(unans)} unanswerable / {len(ans)} answerable "
                            f"rows, {n_unans} / {quota // 2} needed")
        picked = [(r, idk_response) for r in unans[:n_unans]] + [(r, r["answers"][0]) for r in ans[: quota // 2]]
        out.extend({"prompt": r["question"], "response": resp, "id": r["id"]} for r, resp in picked)
    return sorted(out, key=lambda s: order_key(s["id"]))


def training_rows(rows: Iterable[dict], n: int, where: str = "training") -> list[dict]:
    """The training questions of a model built from this pool (M0's honesty SFT, M1's task SFT):
    the first ``n`` calibration-pool rows in the fixed order, half unanswerable where the benchmark
    labels answerability (``unanswerable`` -1: the first ``n``). Heads of the seed-0 order never
    reach the development tail while ``n`` stays under the pool's non-development size."""
    pool = calibration_pool(rows, where)
    if all(r["unanswerable"] == -1 for r in pool):
        picked = pool[:n]
    else:
        unans = [r for r in pool if r["unanswerable"] == 1][: n // 2]
        picked = unans + [r for r in pool if r["unanswerable"] == 0][: n - len(unans)]
    if len(picked) < n:
        raise DataError(f"{where}: calibration pool has {len(picked)} usable rows, {n} needed")
    return picked


def task_samples(rows: Sequence[dict], n: int = 128, where: str = "task", seed: int = 0,
                 split: str = "calibration") -> list[dict]:
    """``n`` task samples: question -> first gold answer (open QA) or the correct option (MCQ),
    drawn in the order of ``seed`` within the calibration pool."""
    pool = [r for r in calibration_pool(rows, where, seed, split) if r["answers"]]
    if len(pool) < n:
        raise DataError(f"{where}: calibration pool has {len(pool)} rows with answers, {n} needed")
    return [{"prompt": r["question"], "response": r["answers"][0], "id": r["id"]} for r in pool[:n]]

