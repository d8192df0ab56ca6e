"""What `hcnr eval` and `hcnr compare` write for a reader (markdown tables, metrics.json,
compare.png), and the tables of the refusal detector against the hand labels (hcnr_jax/eval/labels.py).

The numbers come from hcnr_jax/eval/metrics.py (`hcnr eval`, through hcnr_jax/eval/runner.py; the
labels) and hcnr_jax/eval/compare.py (`hcnr compare`); this module only formats them. Rates are printed in %,
log-likelihoods in nats; an undefined score (nan, e.g. precision without a predicted refusal) is a
dash in a table and null in JSON.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hcnr_jax.io import atomic_write_text, finite_json

if TYPE_CHECKING:
    from hcnr_jax.eval.runner import EvalSettings

LOG_SCORES = ("gold_loglik",)  # reported in nats, not %

# `hcnr eval`'s table: score key -> column header, in column order (a column only when some row has it).
EVAL_COLUMNS = (("n", "N"), ("f1", "refusal F1"), ("refusal_rate_unanswerable", "RR unans"),
                ("refusal_rate_answerable", "RR ans"), ("rf_delta", "RF delta"), ("undetermined", "undet."),
                ("answer_accuracy", "ans. acc"), ("a4h_prudence", "prudence"),
                ("a4h_over_conservativeness", "over-cons."), ("a4h_honesty", "honesty"), ("a4h_accuracy", "loose acc"),
                ("containment", "task acc"), ("exact_match", "EM"), ("idk_rate", "idk rate"),
                ("option_accuracy", "option acc"), ("gold_loglik", "gold log-lik"))


# --- hcnr eval ---------------------------------------------------------------------------------------

def _cell(m: dict, k: str) -> str:
    v = m.get(k)
    if v is None:
        return ""
    if k == "n":
        return str(v)
    scale, fmt = (1, "{:.3f}") if k in LOG_SCORES else (100, "{:.1f}")  # rates in %, log-likelihoods in nats
    text = "—" if not math.isfinite(v) else fmt.format(scale * v)  # undefined (e.g. precision, no refusal)
    ci = m.get(f"{k}_ci")
    if ci is None or not all(c is not None and math.isfinite(c) for c in ci):
        return text
    sep = " to " if k in LOG_SCORES else "-"  # log-likelihoods are negative
    return f"{text} ({fmt.format(scale * ci[0])}{sep}{fmt.format(scale * ci[1])})"


def eval_table(results: dict[str, dict[str, dict]], avgs: dict[str, dict] | None = None,
               labels: dict[str, str] | None = None) -> str:
    """`hcnr eval`'s results (tag -> benchmark -> scores) as one markdown table, a row per (model,
    benchmark), then each model's averages; ``labels``: tag -> the name its rows carry (default: the tag)."""
    labels = labels or {}
    used = [c for c in EVAL_COLUMNS if any(c[0] in m for res in results.values() for m in res.values())]
    lines = ["| model | benchmark | " + " | ".join(h for _, h in used) + " |",
             "|---|---|" + "---|" * len(used)]
    for tag, res in results.items():
        label = labels.get(tag) or tag
        for bench, m in res.items():
            lines.append(f"| {label} | {bench} | " + " | ".join(_cell(m, k) for k, _ in used) + " |")
        avg = (avgs or {}).get(tag)
        if avg:
            lines.append(f"| {label} | average | " + " | ".join("" if k == "n" else _cell(avg, k) for k, _ in used) + " |")
    return ("\n".join(lines) + "\n\nRates in %, with 95% bootstrap intervals in parentheses (percentile, examples "
            "resampled within the answerable / unanswerable halves). RF delta = refusal rate on unanswerable minus "
            "on answerable. average: the mean over the refusal benchmarks (docs/evaluation.md). gold log-lik: "
            "mean per-token log-probability of the gold answer (nats).\n")


def prompt_notes(settings: EvalSettings, with_reference: bool) -> str:
    """The lines under the table that say how `model` was prompted (--demos, --instruction)."""
    notes = ""
    if settings.demos:
        notes += (f"\nPrompts: {len(settings.demos)} in-context demonstrations ({settings.demos_source or 'given'}) "
                  f"before every question of `model` (--demos)"
                  + ("; `reference` is prompted without them" if with_reference else "") + ".\n")
    if settings.instruction:
        notes += (f"\nPrompts: every question of `model` follows the instruction {settings.instruction!r} (--instruction)"
                  + ("; `reference` gets the bare question" if with_reference else "") + ".\n")
    return notes


def write_eval(out: Path, summary: dict[str, Any], settings: EvalSettings) -> None:
    """metrics.json (``summary``; undefined scores, NaN, written as null) and table.md in ``out``."""
    atomic_write_text(out / "metrics.json", finite_json(summary, indent=1, default=str))
    names = summary["names"]
    table = eval_table(summary["results"], summary["averages"],
                       {"model": names["model"], "reference": names.get("reference", "")})
    atomic_write_text(out / "table.md", table + prompt_notes(settings, "reference" in names))


# --- hcnr compare ------------------------------------------------------------------------------------

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


def compare_table(result: dict[str, Any]) -> str:
    """`hcnr compare`'s result (`hcnr_jax.eval.compare.compare`) as one before/after table: a row
    per (benchmark, metric), a column per model, then each later model's paired difference from the first."""
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


def compare_plot(result: dict[str, Any], path: str | Path) -> None:
    """compare.png: a panel per metric, bars per benchmark and model with their 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hcnr_jax.eval.compare import METRICS  # here: compare imports the runner, which imports this module

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


# --- the refusal detector against the hand labels (python -m hcnr_jax.eval.labels) -------------------

def rules_table(summary: dict[str, dict[str, Any]]) -> str:
    """Rule set -> its `hcnr_jax.eval.metrics.detector_agreement` with the labels, a row each."""
    lines = ["| rules | precision | recall | F1 | 3-way accuracy |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {a['precision']:.3f} | {a['recall']:.3f} | {a['f1']:.3f} | {a['accuracy']:.3f} |"
              for name, a in summary.items()]
    return "\n".join(lines)


def _with_interval(v: float, ci: tuple[float, float]) -> str:
    return "n/a" if math.isnan(v) else f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def detector_table(table: list[dict[str, Any]]) -> str:
    """`hcnr_jax.eval.labels.pr_table`'s rows: class "refused" per (detector, group of responses)."""
    lines = ["| detector | responses | n | hand refused | TP | FP | FN | precision [95% CI] | recall [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['detector']} | {t['group']} | {t['n']} | {t['n_refused']} | {t['tp']} | {t['fp']} "
                     f"| {t['fn']} | {_with_interval(t['precision'], t['precision_ci'])} "
                     f"| {_with_interval(t['recall'], t['recall_ci'])} |")
    return "\n".join(lines)


def subsets_table(subsets: list[dict[str, Any]]) -> str:
    """One rule set's agreement per subset of the labels (``subset``, ``n_refused`` and
    `hcnr_jax.eval.metrics.detector_agreement`'s scores)."""
    lines = ["| subset | n | refused | precision | recall | F1 | 3-way accuracy |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {s['subset']} | {s['n']} | {s['n_refused']} | {s['precision']:.3f} | {s['recall']:.3f} "
              f"| {s['f1']:.3f} | {s['accuracy']:.3f} |" for s in subsets]
    return "\n".join(lines)
