"""Before/after: evaluated models side by side on the same examples, with paired differences.

`compare` takes each model's records (`hcnr eval`'s ``examples.jsonl``, the evaluated model's
rows) and, per benchmark, keeps the examples every model answered. A metric's difference between a
model and the first one ("before") is paired: each bootstrap resample draws one set of examples
(within the answerable / unanswerable halves of a refusal benchmark) and scores every model on that
same set, so the interval reflects the examples' shared difficulty once, not once per model. The
averages over the refusal benchmarks average the benchmarks' replicates (drawn independently
across benchmarks), as `hcnr eval` does.

`hcnr compare` writes the result as compare.json, and as a table and a plot (hcnr_jax/eval/report.py:
`compare_table`, `compare_plot`).
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hcnr_jax.data.benchmarks import REFUSAL_BENCHMARKS
from hcnr_jax.errors import DataError
from hcnr_jax.eval import metrics as M
from hcnr_jax.eval.runner import benchmark_statistic, read_records

# The scores compared, in table order: key -> label.
METRICS = {"f1": "refusal F1", "rf_delta": "RF delta", "containment": "accuracy (contained)",
           "exact_match": "accuracy (exact)", "option_accuracy": "option accuracy",
           "gold_loglik": "gold log-lik (nats)"}


def load_eval_dir(path: str | Path) -> tuple[list[dict], dict[str, Any]]:
    """(the evaluated model's records, the run's settings) of an `hcnr eval` output folder."""
    path = Path(path)
    for f in ("examples.jsonl", "settings.json"):
        if not (path / f).is_file():
            raise DataError(f"{path}: not an `hcnr eval` output folder (no {f})")
    try:
        settings = json.loads((path / "settings.json").read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path / 'settings.json'}: invalid JSON ({e.msg})") from None
    return [r for r in read_records(path / "examples.jsonl") if r.get("model") == "model"], settings


def _paired(bench: str, runs: Sequence[list[dict]], resamples: int, seed: int) -> tuple[dict, dict, int]:
    """(point values, bootstrap replicates, N) of every model's scores and differences on the
    examples of ``bench`` that every run holds. Keys ``"i|metric"`` and ``"di|metric"`` (model i
    minus model 0)."""
    by_id = [{r["id"]: r for r in recs if r["benchmark"] == bench} for recs in runs]
    common = set(by_id[0]).intersection(*by_id[1:])
    ids = [i for i in by_id[0] if i in common]  # the first run's order
    if not ids:
        return {}, {}, 0
    stats = [benchmark_statistic(bench, [b[i] for i in ids], None) for b in by_id]
    strata = stats[0][1]

    def combined(idx: np.ndarray) -> dict[str, float]:
        vals = [f(idx) for f, _ in stats]
        out = {}
        for k in METRICS:
            if all(k in v for v in vals):
                for i, v in enumerate(vals):
                    out[f"{i}|{k}"] = v[k]
                    if i:
                        out[f"d{i}|{k}"] = v[k] - vals[0][k]
        return out

    point = combined(np.arange(len(ids)))
    reps = (M.bootstrap(combined, len(ids), strata=strata, resamples=resamples, seed=[seed, zlib.crc32(bench.encode())])
            if resamples > 0 else {})
    return point, reps, len(ids)


def compare(names: Sequence[str], runs: Sequence[list[dict]], resamples: int = M.BOOTSTRAP_RESAMPLES,
            seed: int = 0) -> dict[str, Any]:
    """The comparison of ``runs`` (each model's records, the first is "before"): one row per
    (benchmark, metric) with each model's value and interval and each later model's paired
    difference from the first with its interval; then the averages over the refusal benchmarks."""
    if len(runs) < 2:
        raise DataError("a comparison needs at least two models")
    benches = list(dict.fromkeys(r["benchmark"] for r in runs[0]))
    rows, pooled = [], {}

    def interval(reps: dict, key: str) -> list[float] | None:
        return M.percentile_interval(reps[key]) if key in reps else None

    for bench in benches:
        point, reps, n = _paired(bench, runs, resamples, seed)
        for k, label in METRICS.items():
            if f"0|{k}" not in point:
                continue
            rows.append(dict(
                benchmark=bench, metric=k, label=label, n=n,
                values=[point[f"{i}|{k}"] for i in range(len(runs))],
                intervals=[interval(reps, f"{i}|{k}") for i in range(len(runs))],
                differences=[dict(model=names[i], minus=names[0], difference=point[f"d{i}|{k}"],
                                  interval=interval(reps, f"d{i}|{k}")) for i in range(1, len(runs))]))
            if bench in REFUSAL_BENCHMARKS and k in M.AVERAGED and all(math.isfinite(v) for v in rows[-1]["values"]):
                pooled.setdefault(k, []).append((point, reps))
    for k, parts in pooled.items():
        if len(parts) < 2:
            continue  # one benchmark: its own row says it all

        def mean_of(key: str, parts: list = parts) -> tuple[float, list[float] | None]:
            value = float(np.mean([p[key] for p, _ in parts]))
            if not all(key in r for _, r in parts):
                return value, None
            return value, M.percentile_interval(np.mean([r[key] for _, r in parts], axis=0))

        vals = [mean_of(f"{i}|{k}") for i in range(len(runs))]
        diffs = [mean_of(f"d{i}|{k}") for i in range(1, len(runs))]
        rows.append(dict(benchmark=f"average of {len(parts)}", metric=k, label=METRICS[k],
                         n=sum(r["n"] for r in rows if r["metric"] == k and r["benchmark"] in REFUSAL_BENCHMARKS),
                         values=[v for v, _ in vals], intervals=[c for _, c in vals],
                         differences=[dict(model=names[i + 1], minus=names[0], difference=d, interval=c)
                                      for i, (d, c) in enumerate(diffs)]))
    return {"models": list(names), "resamples": resamples, "seed": seed, "rows": rows}

