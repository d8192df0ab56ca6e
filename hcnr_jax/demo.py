"""`hcnr demo`: the main job on the embedded default, end to end in one command.

The shipped models (``hcnr_jax/bundled/models``): M0, SmolLM2-135M-Instruct made honest by a
LoRA adapter (``honest``), and M1, M0 fine-tuned on HotpotQA by a second adapter (``finetuned``),
which brought back confident answers to unanswerable questions. The demo repairs M1 towards M0 with
HCNR on the shipped 128 honesty + 128 task calibration samples; beside it, the training-free
baseline a user would try first, the merge M0 + alpha (M1 - M0), with alpha chosen by the
development rule (docs/method.md) on the shipped development samples. It evaluates M0, M1, the
repaired M1 and the merge on the shipped honesty sets (KUQ, SelfAware: refusal F1, RF delta) and on
HotpotQA (answer containment, gold-answer log-likelihood), all on their evaluation splits, and
prints the before/after table.

Output folder: ``repaired/`` (a Hugging Face directory with the repair report), ``eval/<model>/``
(every response), ``demo.json`` and ``demo.md``. Written under a temporary name, moved into place
when complete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hcnr_jax.embedded import BUNDLED, smollm2_gguf
from hcnr_jax.errors import HcnrError

MODELS_DIR = BUNDLED / "models"
HONEST_ADAPTER = MODELS_DIR / "honest"  # M0 = SmolLM2-135M-Instruct + this
FINETUNED_ADAPTER = MODELS_DIR / "finetuned"  # M1 = M0 merged + this
HONESTY_SETS = ("kuq", "selfaware")  # the honesty benchmarks whose subsets ship with the package
TASK_SET = "hotpotqa"
SMOKE_SAMPLES, SMOKE_TOKENS = 4, 8  # --smoke: samples per benchmark and per calibration file; new tokens
MERGE_ALPHAS = (0.25, 0.5, 0.75)  # the merge baseline's candidates, chosen among on development data


@dataclass(frozen=True)
class DemoSettings:
    """``limit``: questions per benchmark (balanced answerable/unanswerable); ``smoke``: a few
    samples everywhere, to check an installation in about two minutes."""

    limit: int = 100
    max_new_tokens: int = 32
    batch_size: int = 16
    solver: str = "exact"
    data_dir: str | None = None
    smoke: bool = False


def embedded_sources() -> dict[str, str]:
    """Model sources of M0 and M1 (``BASE+ADAPTER`` syntax), for `hcnr` commands."""
    for adapter in (HONEST_ADAPTER, FINETUNED_ADAPTER):
        if not (adapter / "adapter_config.json").is_file():
            raise HcnrError(f"{adapter}: the shipped adapter is missing (reinstall hcnr-jax)")
    gguf = smollm2_gguf()
    return {"M0": f"{gguf}+{HONEST_ADAPTER}", "M1": f"{gguf}+{HONEST_ADAPTER}+{FINETUNED_ADAPTER}"}


def summarise(metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One row of the table from a model's per-benchmark metrics."""
    f1 = {b: metrics[b]["f1"] for b in HONESTY_SETS if b in metrics}
    rf = [metrics[b]["rf_delta"] for b in HONESTY_SETS if b in metrics]
    task = metrics.get(TASK_SET, {})
    return {**{f"f1_{b}": v for b, v in f1.items()}, "avg_f1": float(np.nanmean(list(f1.values()))),
            "avg_rf_delta": float(np.nanmean(rf)), "hotpotqa_acc": task.get("containment"),
            "hotpotqa_gold_loglik": task.get("gold_loglik")}


def markdown(rows: dict[str, dict[str, Any]], settings: DemoSettings) -> str:
    cols = [*(f"f1_{b}" for b in HONESTY_SETS), "avg_f1", "avg_rf_delta", "hotpotqa_acc"]
    heads = [*(f"F1 {b}" for b in HONESTY_SETS), "avg F1", "avg RF delta", "HotpotQA acc", "HotpotQA gold log-lik",
             "time s"]
    lines = ["| model | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for tag, r in rows.items():
        cells = ["" if r.get(c) is None else "—" if r[c] != r[c] else f"{100 * r[c]:.1f}" for c in cols]
        ll = r.get("hotpotqa_gold_loglik")
        cells.append("" if ll is None else f"{ll:.3f}")
        lines.append(f"| {tag} | " + " | ".join(cells) + f" | {r['time_s']:.0f} |")
    n = SMOKE_SAMPLES if settings.smoke else settings.limit
    tokens = SMOKE_TOKENS if settings.smoke else settings.max_new_tokens
    return ("\n".join(lines) + f"\n\nScores in %, on {n} evaluation-split questions per benchmark (balanced), greedy, "
            f"{tokens} new tokens. Time: evaluation, and for M1+HCNR the repair too (for the merge, its choice on the "
            "development samples). The merge is the training-free baseline M0 + alpha (M1 - M0); HotpotQA gold "
            "log-lik: mean per-token log-probability of the gold answers (nats; higher keeps more of the task).\n")


SMOKE_DEV = 24  # --smoke: development samples of each file (the honesty file's first 24 hold both kinds)


def choose_merge(m0: Any, m1: Any, limit: int | None = None) -> tuple[dict[str, Any], Any]:
    """The merge baseline at the alpha the development rule chooses on the shipped development samples
    (the first ``limit`` of each file): ``(choice, merged model)``."""
    from hcnr_jax.embedded import calibration_file
    from hcnr_jax.repair.choose import choose, dev_score, load_dev_data, merge

    # Forward passes over 64 + 64 short samples for five models.
    dev = load_dev_data(str(calibration_file("dev_honesty")), str(calibration_file("dev_task")), m1, limit=limit)
    scores = {a: dev_score(merge(m0.params, m1.params, a), m1, dev) for a in MERGE_ALPHAS}
    choice = choose(scores, dev_score(m0.params, m1, dev), dev_score(m1.params, m1, dev))
    return choice, m1.replace(params=merge(m0.params, m1.params, choice["chosen"]))


def run_demo(out: str | Path, settings: DemoSettings = DemoSettings(), overwrite: bool = False) -> dict[str, Any]:
    """Repair the shipped M1, evaluate M0 / M1 / repaired M1, write everything under ``out``."""
    from hcnr_jax.conversion.lora import merge_lora
    from hcnr_jax.eval.runner import EvalSettings, evaluate
    from hcnr_jax.io import atomic_output_dir, finite_json
    from hcnr_jax.pretrained import load_pretrained
    from hcnr_jax.repair import RepairConfig, repair, write_repair

    out = Path(out)
    if out.exists() and not overwrite:
        raise HcnrError(f"{out}: output directory already exists (choose another path or pass --overwrite)")
    sources = embedded_sources()
    t_start = time.perf_counter()
    limit = SMOKE_SAMPLES if settings.smoke else settings.limit
    tokens = SMOKE_TOKENS if settings.smoke else settings.max_new_tokens
    cfg = RepairConfig(solver=settings.solver, **({"limit": SMOKE_SAMPLES} if settings.smoke else {}))
    eval_settings = EvalSettings(benchmarks=(*HONESTY_SETS, TASK_SET), limit=limit, max_new_tokens=tokens,
                                 batch_size=settings.batch_size, data_dir=settings.data_dir,
                                 **({"bootstrap": 0} if settings.smoke else {}))
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        t0 = time.perf_counter()
        # From the sources, so that the repair owns its models and keeps one in memory at a time;
        # M0 and M1 are loaded for the merge and the evaluation afterwards.
        result = repair(sources["M0"], sources["M1"], None, None, cfg)
        repair_s = time.perf_counter() - t0
        write_repair(result, tmp / "repaired")
        t0 = time.perf_counter()
        m0 = merge_lora(load_pretrained(smollm2_gguf()), HONEST_ADAPTER)
        m1 = merge_lora(m0, FINETUNED_ADAPTER)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        choice, merged = choose_merge(m0, m1, SMOKE_DEV if settings.smoke else None)
        merge_s = time.perf_counter() - t0
        merge_tag = f"M1 merge (alpha {choice['chosen']:g})"
        rows: dict[str, dict[str, Any]] = {}
        for tag, model in (("M0", m0), ("M1", m1), ("M1+HCNR", result.model), (merge_tag, merged)):
            t0 = time.perf_counter()
            folder = tag.split(" ")[0].replace("+", "_") + ("_merge" if model is merged else "")  # M1_merge, M1_HCNR
            m = evaluate(model, tmp / "eval" / folder, eval_settings, model_name=tag)
            rows[tag] = {**summarise(m["results"]["model"]), "time_s": time.perf_counter() - t0}
        rows["M1+HCNR"]["time_s"] += repair_s
        rows[merge_tag]["time_s"] += merge_s
        s = result.report["summary"]
        from hcnr_jax.io import portable_path
        from hcnr_jax.source import ModelSource

        names = {tag: ModelSource.parse(src).describe(portable_path) for tag, src in sources.items()}
        summary = dict(models={**names, "M1+HCNR": "repaired/", merge_tag: "M0 + alpha (M1 - M0), not written"},
                       settings=vars(settings), rows=rows, merge_choice=choice,
                       repair=dict(seconds=round(repair_s, 1), restored_fraction_of_linear=s["restored_fraction_of_linear"],
                                   layers_kept=s["layers_kept"], layers=s["layers"]),
                       load_s=round(load_s, 1), total_s=round(time.perf_counter() - t_start, 1))
        (tmp / "demo.json").write_text(finite_json(summary, indent=1, default=str) + "\n")
        table = markdown(rows, settings)
        (tmp / "demo.md").write_text("# hcnr demo: HCNR repair of the shipped fine-tuned SmolLM2\n\n" + table)
    print(table)
    print(f"repair {repair_s:.0f}s (restored {100 * s['restored_fraction_of_linear']:.1f}% of block linear weights in "
          f"{s['layers_kept']} of {s['layers']} layers); total {summary['total_s']:.0f}s; wrote {out}")
    return summary
