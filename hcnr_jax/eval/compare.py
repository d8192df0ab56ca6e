"""Before/after: evaluated models side by side on the same examples, with paired differences.

`compare` takes each model's records (`hcnr eval`'s ``examples.jsonl``, the evaluated model's
rows) and, per benchmark, keeps the examples every model answered. A metric's difference between a
model and the first one ("before") is paired: each bootstrap resample draws one set of examples
(within the answerable / unanswerable halves of a refusal benchmark) and scores every model on that
same set, so the interval reflects the examples' shared difficulty once, not once per model. The
averages over the refusal benchmarks average the benchmarks' replicates (drawn independently
across benchmarks), as `hcnr eval` does.

`hcnr compare` prints `markdown` and writes it with `compare.json` and `plot` (compare.png).
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hcnr_jax.errors import DataError
from hcnr_jax.eval import metrics as M
from hcnr_jax.eval.data import REFUSAL_BENCHMARKS
from hcnr_jax.eval.runner import AVERAGED, LOG_SCORES, _statistic, read_records

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
    stats = [_statistic(bench, [b[i] for i in ids], None) for b in by_id]
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
            if bench in REFUSAL_BENCHMARKS and k in AVERAGED and all(math.isfinite(v) for v in rows[-1]["values"]):
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


def _fmt(metric: str, v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    return f"{v:.3f}" if metric in LOG_SCORES else f"{100 * v:.1f}"


def _diff_cell(metric: str, d: dict) -> str:
    text = _fmt(metric, d["difference"])
    if text != "—" and not text.startswith("-"):
        text = "+" + text
    ci = d["interval"]
    if not ci or not all(c is not None and math.isfinite(c) for c in ci):
        return text
    excludes_zero = ci[0] > 0 or ci[1] < 0
    sep = " to " if metric in LOG_SCORES or ci[0] < 0 else "-"
    return f"{text} ({_fmt(metric, ci[0])}{sep}{_fmt(metric, ci[1])}){' *' if excludes_zero else ''}"


def markdown(result: dict[str, Any]) -> str:
    """One before/after table: a row per (benchmark, metric), a column per model, then each later
    model's paired difference from the first."""
    names = result["models"]
    head = ["benchmark", "metric", "N", *names, *(f"{n} − {names[0]}" for n in names[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["benchmark"], r["label"], str(r["n"]), *(_fmt(r["metric"], v) for v in r["values"]),
                 *(_diff_cell(r["metric"], d) for d in r["differences"])]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\nRates in %, log-likelihoods in nats. Every model is scored on the same N examples; a difference's "
            f"95% interval comes from a paired bootstrap ({result['resamples']} resamples of the examples, each "
            "scoring every model; within the answerable / unanswerable halves of a refusal benchmark). "
            "* the interval excludes 0.\n")
    return "\n".join(lines) + "\n" + note


def plot(result: dict[str, Any], path: str | Path) -> None:
    """compare.png: a panel per metric, bars per benchmark and model with their 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["models"]
    metrics = [k for k in METRICS if any(r["metric"] == k for r in result["rows"])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    width = 0.8 / len(names)
    for ax, k in zip(axes[0], metrics, strict=True):
        rows = [r for r in result["rows"] if r["metric"] == k]
        scale = 1 if k in LOG_SCORES else 100
        for i, name in enumerate(names):
            vals = np.array([scale * r["values"][i] for r in rows], float)
            lo = np.array([scale * (r["intervals"][i] or [np.nan])[0] for r in rows], float)
            hi = np.array([scale * (r["intervals"][i] or [np.nan, np.nan])[1] for r in rows], float)
            err = np.nan_to_num(np.vstack([vals - lo, hi - vals]).clip(min=0))
            ax.bar(np.arange(len(rows)) + (i - (len(names) - 1) / 2) * width, vals, width, yerr=err,
                   capsize=2, label=name)
        ax.set_xticks(np.arange(len(rows)), [r["benchmark"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_title(METRICS[k] + ("" if k in LOG_SCORES else " (%)"), fontsize=9)
        ax.axhline(0, color="black", linewidth=0.5)
    # One legend under the panels: inside one it would cover bars.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
