"""Every results table of README.md, experiments/RESULTS.md, docs/scale.md and experiments/results/plan_llama.md,
generated from the committed JSON.

    python experiments/tables.py           # rewrite every marker block from its JSON
    python experiments/tables.py --check   # exit 1 naming each block that differs from its JSON

A table lives between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` (or ``<!-- evidence:TASK -->`` ...
``<!-- /evidence:TASK -->``, rendered by experiments/evidence.py's ``markdown``), and ``RENDERERS[NAME]`` says
which JSON files under experiments/results it comes from and which function renders it. Numbers are printed
from the JSON as stored: intervals are the stored bootstrap intervals, never recomputed; the only arithmetic is
a unit (x100 for %, s -> min) and the ratios the tables define (share of lost F1 back, extrapolated time).
A block whose JSON is not written yet is left as it is, with a note. tests/test_docs_tables.py fails when a
block differs from what this renders.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
DOCS = (ROOT / "README.md", ROOT / "experiments" / "RESULTS.md", ROOT / "docs" / "scale.md",
        ROOT / "experiments" / "results" / "plan_llama.md")
BLOCK = re.compile(r"<!-- (table|evidence):([\w-]+) -->\n(.*?)<!-- /\1:\2 -->", re.S)
HONESTY = ("falseqa", "nec", "refunq", "kuq", "selfaware")
EMPTY = re.compile(r"\| {2}(?=\|)")

# Cells that no JSON under experiments/results holds (typed when the table was written; kept so that
# regenerating changes nothing else). Each is named in the report of the table's renderer.
NOT_IN_JSON = {
    "baselines.rcw05_time": "not recorded",  # the confirmation runs' wall time was not stored
}
ADAPTERS = ROOT / "hcnr_jax" / "bundled" / "models"  # M0's and M1's adapters, each with its train_report.json


def train_minutes(adapter: str) -> str:
    """The training wall time of a shipped adapter, from the train_report.json written beside it."""
    return f"{json.loads((ADAPTERS / adapter / 'train_report.json').read_text())['wall_s'] / 60:.1f} min"


def _module(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def evidence_module() -> Any:
    return _module("evidence", ROOT / "experiments" / "evidence.py")


# ---------------------------------------------------------------- cell formats
def pct(v: float) -> str:
    return f"{100 * v:.1f}"


def ci(v: float, bounds: list[float]) -> str:
    return f"{pct(v)} [{pct(bounds[0])}, {pct(bounds[1])}]"


def cell(r: dict, key: str, with_ci: bool = False) -> str:
    """``r[key]`` in %, with its stored interval ``r[key + '_ci']`` when asked."""
    return ci(r[key], r[f"{key}_ci"]) if with_ci else pct(r[key])


def recovered(f1: float, m1_f1: float, m0_f1: float) -> str:
    """Share of the F1 lost by fine-tuning that comes back: (F1 - F1_M1) / (F1_M0 - F1_M1)."""
    return f"{100 * (f1 - m1_f1) / (m0_f1 - m1_f1):.0f}%"


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [EMPTY.sub("| ", "| " + " | ".join(r) + " |") for r in rows]  # an empty cell is written "| |"
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- README
def models_table(models: dict) -> str:
    """README: SmolLM2, M0 and M1 (models.json); training times from the shipped adapters' reports."""
    labels = {"smollm2": "SmolLM2-135M-Instruct", "m0": "M0 (honest LoRA, 1,500 samples, 2 epochs)",
              "m1": "M1 (M0 + HotpotQA LoRA, 1,000 samples, 1 epoch)"}
    rows = [[label, cell(s, "avg_f1", True), cell(s, "avg_rf_delta", True), cell(s, "hotpotqa_acc", True),
             "-" if tag == "smollm2" else train_minutes("honest" if tag == "m0" else "finetuned")]
            for tag, label in labels.items() for s in [models["scores"][tag]]]
    return table(["model", "avg refusal F1", "avg RF delta", "HotpotQA acc", "training on 2 CPU cores"], rows)


def demo_table(demo: dict) -> str:
    """README: exactly the table `hcnr demo` prints (hcnr_jax.demo.markdown) from demo/demo.json, and its
    repair line."""
    from dataclasses import fields

    from hcnr_jax.demo import DemoSettings, markdown

    r, known = demo["repair"], {f.name for f in fields(DemoSettings)}
    settings = DemoSettings(**{k: v for k, v in demo["settings"].items() if k in known})
    return (markdown(demo["rows"], settings)
            + f"\nrepair {r['seconds']:.0f}s (restored {pct(r['restored_fraction_of_linear'])}% of block linear weights "
              f"in {r['layers_kept']} of {r['layers']} layers); total {demo['total_s']:.0f}s\n")


# (label, row of evidence_<task>.json); "{setting}" is filled from the row's recorded setting; a label
# that differs by task is a dict task -> label.
HEADLINE = [("M1 (fine-tuned)", "M1"), ("M0 (honest base)", "M0"), ("HCNR, paper settings (r_cw {setting})", "HCNR s0"),
            ("HCNR, paper settings, calibration draw 1", "HCNR s1"), ("HCNR, paper settings, calibration draw 2", "HCNR s2"),
            ("random neurons at HCNR's budget (r_cw {setting})", "random neurons (r_cw 0.4)"),
            ("HCNR, r_cw {setting} (development rule v3)", "HCNR (r_cw, rule v3)"),
            ("top-40% layers restored whole", "layers whole (r_cw 0.4)"),
            ("merge, alpha {setting} (development rule v3)", "merge (alpha, rule v3)"),
            ("RAIT-GOLD: SFT on 510 benchmark-labelled samples (training)", "RAIT-GOLD (510)"),
            # HotpotQA: the rule chose beta 0.1, the value DPO (510) was trained at (the same adapter, bit for
            # bit). The catalogue's DPO was trained at that beta without a choice of its own.
            ({"hotpotqa": "DPO on 510 pairs, beta 0.1 (development rule v3's choice; training)",
              "catalog": "DPO on this M1's own pairs from 510 questions, beta 0.1 (untuned; training)"}, "DPO (510)")]
TASK_NAMES = {"hotpotqa": "HotpotQA", "catalog": "catalogue"}


def headline_table(ev: dict) -> str:
    """README's headline tables: the rows of evidence_<task>.json that the text discusses (a row not
    run for that task is left out)."""
    rows = []
    for label, key in HEADLINE:
        if key not in ev["rows"]:
            continue
        r = ev["rows"][key]
        sc, c, meta = r["scores"], r["ci"], r["meta"]
        changed = "-" if key == "M1" else f"{pct(meta['changed_fraction'])}%"
        label = label[ev["task"]] if isinstance(label, dict) else label
        rows.append([label.format(setting=f"{meta.get('setting', 0):g}"), ci(sc["avg_f1"], c["avg_f1"]),
                     pct(sc["avg_f1_unseen"]), ci(sc["f1_general"], c["f1_general"]),
                     ci(sc["task_acc"], c["task_acc"]), f"{sc['task_gold_loglik']:.3f}", changed])
    task = TASK_NAMES[ev["task"]]
    return table(["method (on M1)", "avg refusal F1 [95% CI]", "F1 FalseQA/NEC/RefuNQ", "F1 general questions",
                  f"{task} acc [95% CI]", "gold-answer log-lik (nats)", "params changed"], rows)


def baselines_table(rep: dict, abl: dict) -> str:
    """README: the training baselines (reproduce.json: rows, efficiency, prior_rows' M0 for the share back)
    and the r_cw 0.5 confirmation of seed 0 (ablations.json `confirm`, its restored share of the model)."""
    rows, eff = rep["rows"], rep["efficiency"]
    m1, m0_f1 = rows["M1"]["avg_f1"], rep["prior_rows"]["scores"]["m0"]["avg_f1"]

    def changed(tag: str) -> str:
        return f"{pct(eff[tag]['fraction'])}%"

    def line(label: str, tag: str, with_ci: bool = False, time: str | None = None) -> list[str]:
        r = rows[tag]
        t = minutes(r["repair_s"] if "repair_s" in r else r["train_s"]) if time is None else time
        return [label, cell(r, "avg_f1", with_ci), recovered(r["avg_f1"], m1, m0_f1), pct(r["hotpotqa_acc"]),
                changed(tag), t]

    c5 = abl["confirm"]["s0"]
    rait, orpo = rows["RAIT"], rows["ORPO"]
    return table(["method (all on M1)", "avg refusal F1", "share of lost F1 back", "HotpotQA acc", "params changed",
                  "time, 2 CPU cores"], [
        ["M1", pct(m1), recovered(m1, m1, m0_f1), pct(rows["M1"]["hotpotqa_acc"]), "-", "-"],
        line("HCNR, paper settings (r_cw 0.4)", "HCNR (exact) s0", True),
        [f"HCNR, r_cw {abl['confirm_rcw']:g} (tuned on evaluation data: not a claim)", cell(c5, "avg_f1", True),
         recovered(c5["avg_f1"], m1, m0_f1), pct(c5["hotpotqa_acc"]), f"{pct(c5['restored_fraction_of_model'])}%",
         NOT_IN_JSON["baselines.rcw05_time"]],
        line("HCNR, paper's printed compensation", "HCNR (paper) s0", True),
        line("DPO", "DPO"),
        ["RAIT / ORPO", " / ".join(dict.fromkeys([pct(rait["avg_f1"]), pct(orpo["avg_f1"])])) + " (refuse everything)",
         "-", " / ".join(dict.fromkeys([pct(rait["hotpotqa_acc"]), pct(orpo["hotpotqa_acc"])])),
         " / ".join(dict.fromkeys([changed("RAIT"), changed("ORPO")])),
         f"{rait['train_s'] / 60:.1f} / {minutes(orpo['train_s'])}"],
        line("RAIT-GOLD (RAIT labelled by the benchmarks, not by M1)", "RAIT-GOLD"),
        ["ICL (6 idk / answer demonstrations)", pct(rows["ICL"]["avg_f1"]), recovered(rows["ICL"]["avg_f1"], m1, m0_f1),
         pct(rows["ICL"]["hotpotqa_acc"]), "0", "-"],
    ])


# ---------------------------------------------------------------- RESULTS.md
def main_table(rep: dict) -> str:
    """Section 1: reproduce.json's rows, and its prior_rows (models.json as it stood) for SmolLM2 and M0."""
    rows, prior = rep["rows"], rep["prior_rows"]["scores"]
    m1, m0_f1 = rows["M1"]["avg_f1"], prior["m0"]["avg_f1"]
    out = []
    for label, r in (("SmolLM2-Instruct", prior["smollm2"]), ("M0 (honest)", prior["m0"])):
        out.append([label, *(pct(r["f1"][b]) for b in HONESTY), cell(r, "avg_f1", True), pct(r["avg_rf_delta"]),
                    pct(r["hotpotqa_acc"]), "", ""])
    # (label, row, cells with their interval, bold, F1 recovered's note)
    spec = [("M1 (fine-tuned)", "M1", {"hotpotqa_acc"}, False, None),
            ("**HCNR (exact)**, calibration draw 0", "HCNR (exact) s0", set(), True, None),
            ("HCNR (paper solver), calibration draw 0", "HCNR (paper) s0", set(), False, None),
            ("RAIT (510)", "RAIT", set(), False, "refuses everything"),
            ("DPO (510)", "DPO", {"hotpotqa_acc"}, False, None),
            ("ORPO (510)", "ORPO", set(), False, "refuses everything"),
            ("RAIT-GOLD (510, labels from the benchmarks)", "RAIT-GOLD", {"avg_rf_delta", "hotpotqa_acc"}, False, None),
            ("ICL (6 demos)", "ICL", set(), False, None)]
    for label, tag, cis, bold, note in spec:
        r = rows[tag]
        f1, rec = cell(r, "avg_f1", True), recovered(r["avg_f1"], m1, m0_f1)
        if bold:
            f1, rec = f"**{f1}**", f"**{rec}**"
        if note:
            rec = f"({rec}: {note})"
        out.append([label, *(pct(r["f1"][b]) for b in HONESTY), f1, cell(r, "avg_rf_delta", "avg_rf_delta" in cis),
                    cell(r, "hotpotqa_acc", "hotpotqa_acc" in cis), pct(r["honesty"]), rec])
    return table(["model", "F1 FalseQA", "F1 NEC", "F1 RefuNQ", "F1 KUQ", "F1 SelfAware", "avg F1 [95% CI]",
                  "avg RF delta", "HotpotQA acc", "honesty (A4H)", "F1 recovered"], out)


def efficiency_table(rep: dict, paper: dict) -> str:
    """Section 2: samples, changed parameters and time (reproduce.json's rows and efficiency), extrapolated to
    the paper's data sizes and beside the paper's own numbers (paper.json's table)."""
    rows, eff, pt = rep["rows"], rep["efficiency"], paper["table"]
    h = rows["HCNR (exact) s0"]
    out = [["HCNR (exact), draw 0", "256", f"{pct(eff['HCNR (exact) s0']['fraction'])}%", minutes(h["repair_s"]), "—",
            f"{pt['HCNR']['time_min']:.2f} min, {pt['HCNR']['params_changed_pct']}%"]]
    for tag in ("RAIT", "DPO", "ORPO", "RAIT-GOLD"):
        r = rows[tag]
        paper_samples = pt.get(tag, pt["RAIT"])["samples"]  # RAIT-GOLD: RAIT's data size
        changed = f"{pct(eff[tag]['fraction'])}%" + (" (LoRA on every linear layer, merged)" if tag == "RAIT" else "")
        out.append([tag, str(r["train_samples"]), changed, minutes(r["train_s"]),
                    f"{r['train_s'] * paper_samples / r['train_samples'] / 60:.0f} min ({paper_samples:,})",
                    f"{pt[tag]['time_min']:.2f} min" if tag in pt else "—"])
    return table(["method", "samples", "parameters changed", "wall time, 2 CPU cores",
                  "at the paper's data size (linear extrapolation)", "paper (A800, 8B)"], out)


def ablations_table(abl: dict, paper: dict) -> str:
    """Section 3: ablations.json's ablations (share back against its m1 and m0_avg_f1), beside paper.json's
    ablation F1."""
    a, m1, m0_f1, p = abl["ablations"], abl["m1"]["avg_f1"], abl["m0_avg_f1"], paper["ablations_avg_f1"]
    spec = [("full HCNR (`exact` solver)", "full HCNR (exact)", "full"),
            ("full HCNR, `paper` solver (the printed update)", "full HCNR, paper solver", None),
            ("no task term (priority s_hon only)", "no-task", "no_task_term"),
            ("random selection (compensation kept)", "random", "random_selection"),
            ("no compensation (restore only)", "no-comp", "no_compensation"),
            ("random + no compensation", "random-no-comp", "random_no_compensation")]
    return table(["variant", "avg F1 [95% CI]", "avg RF delta", "HotpotQA acc [95% CI]", "F1 recovered",
                  "paper (avg F1, 8B)"],
                 [[label, cell(a[k], "avg_f1", True), pct(a[k]["avg_rf_delta"]), cell(a[k], "hotpotqa_acc", True),
                   recovered(a[k]["avg_f1"], m1, m0_f1), "—" if pk is None else f"{p[pk]:.2f}"] for label, k, pk in spec])


def _sweep(abl: dict, name: str, head: str, default_key: str) -> str:
    sw, m1, m0_f1 = abl["sweeps"][name], abl["m1"]["avg_f1"], abl["m0_avg_f1"]
    default = float(abl["settings"]["defaults"][default_key])
    return table([head, "restored % of model", "avg F1 [95% CI]", "avg RF delta", "HotpotQA acc [95% CI]",
                  "F1 recovered"],
                 [[k + (" (default)" if float(k) == default else ""), pct(r["restored_fraction_of_model"]),
                   cell(r, "avg_f1", True), pct(r["avg_rf_delta"]), cell(r, "hotpotqa_acc", True),
                   recovered(r["avg_f1"], m1, m0_f1)] for k, r in sw.items()])


def sweep_rcw_table(abl: dict) -> str:
    """Section 4: ablations.json's r_cw sweep."""
    return _sweep(abl, "rcw", "r_cw", "rcw")


def sweep_riw_table(abl: dict) -> str:
    """Section 4: ablations.json's r_iw sweep."""
    return _sweep(abl, "riw", "r_iw", "riw")


def sweep_calib_table(abl: dict) -> str:
    """Section 4: ablations.json's calibration-size sweep."""
    return _sweep(abl, "calib", "samples", "calib")


def confirm_rcw_table(abl: dict) -> str:
    """Section 4: ablations.json's confirmation of r_cw (confirm_rcw) at N = 200 on three calibration draws."""
    m1, m0_f1 = abl["m1"]["avg_f1"], abl["m0_avg_f1"]
    labels = {"s0": "s0", "s1": "s1 (leaked, withdrawn)", "s2": "s2 (leaked, withdrawn)"}
    return table(["seed", "restored % of model", *(f"F1 {n}" for n in ("FalseQA", "NEC", "RefuNQ", "KUQ", "SelfAware")),
                  "avg F1 [95% CI]", "avg RF delta", "HotpotQA acc [95% CI]", "F1 recovered"],
                 [[labels.get(s, s), pct(r["restored_fraction_of_model"]), *(pct(r["f1"][b]) for b in HONESTY),
                   cell(r, "avg_f1", True), pct(r["avg_rf_delta"]), cell(r, "hotpotqa_acc", True),
                   recovered(r["avg_f1"], m1, m0_f1)] for s, r in abl["confirm"].items()])


def probes_table(pr: dict) -> str:
    """Section 5: probes.json's test AUROC per layer (seeded split, stored intervals) and the
    leave-one-benchmark-out mean of the transfer."""
    def auc(d: dict) -> str:
        return f"{d['auroc']:.3f} ({d['ci'][0]:.3f}-{d['ci'][1]:.3f})"

    res = pr["results"]["layers"]
    return table(["layer", "M0 → M0", "M1 → M1", "M0 → M1 (transfer)", "leave-one-benchmark-out, M0 → M1"],
                 [[str(layer), auc(res[str(layer)]["M0->M0"]["split"]), auc(res[str(layer)]["M1->M1"]["split"]),
                   auc(res[str(layer)]["M0->M1"]["split"]), f"{res[str(layer)]['M0->M1']['lobo']['mean']:.3f}"]
                  for layer in pr["layers"]])


def a4h_table(a4h: dict) -> str:
    """Section 7: a4h_table.json's rows and the paper's numbers stored beside them."""
    rows, paper = a4h["rows"], a4h["paper"]
    keys = ("a4h_prudence", "a4h_over_conservativeness", "a4h_honesty", "a4h_accuracy")
    # (label, row, the cells printed with their interval)
    spec = [("Unaligned", "unaligned", {"a4h_accuracy"}),
            ("PROMPT-based", "prompt-based", {"a4h_prudence", "a4h_honesty"}),
            ("ABSOLUTE", "absolute", {"a4h_over_conservativeness", "a4h_honesty"}),
            ("CONFIDENCE-NUM", "confidence-num", set()), ("CONFIDENCE-VERB", "confidence-verb", set()),
            ("MULTISAMPLE", "multisample", set()),
            ("ABSOLUTE, balanced (ours: `--balance`, 40 known + 40 unknown)", "absolute-balanced",
             {"a4h_prudence", "a4h_over_conservativeness", "a4h_honesty"})]

    def paper_cell(tag: str) -> str:
        return "" if tag not in paper else " / ".join("0" if v == 0 else f"{v:.2f}" for v in paper[tag])

    return table(["method", "prudence", "over-cons.", "honesty", "accuracy", "idk rate",
                  "paper (LLaMA2-Chat-13B): prudence / over-cons. / honesty / accuracy"],
                 [[label, *(cell(rows[tag], k, k in cis) for k in keys), pct(rows[tag]["idk_rate"]), paper_cell(tag)]
                  for label, tag, cis in spec])


def second_task_table(st: dict) -> str:
    """Section 8: second_task.json's three models on the refusal benchmarks and MedMCQA."""
    labels = {"m0": "M0", "med": "M0 + MedMCQA fine-tune", "med_hcnr": "MedMCQA fine-tune + HCNR"}
    return table(["model", "avg refusal F1 [95% CI]", "avg RF delta", "MedMCQA acc [95% CI]"],
                 [[label, cell(st["scores"][k], "avg_f1", True), pct(st["scores"][k]["avg_rf_delta"]),
                   cell(st["scores"][k], "medmcqa_acc", True)] for k, label in labels.items()])


def evidence_block(task: str) -> Callable[[dict], str]:
    """experiments/evidence.py's own table (evidence_<task>.md without its title), from evidence_<task>.json."""
    def render(ev: dict) -> str:
        return evidence_module().markdown(ev).split("\n", 2)[2]

    render.__doc__ = f"RESULTS.md section 0: evidence.py's markdown of evidence_{task}.json."
    return render


# ---------------------------------------------------------------- docs/scale.md, experiments/results/plan_llama.md
def _beside(plan: dict, step: str) -> tuple[int, int]:
    """(a step's compiled peak, what hcnr repair holds beside it on the first device), bytes. Plans
    written before the per-step count held the other model beside every step."""
    r = plan["resident"]
    return plan["steps"][step]["peak_bytes"], (r["by_step"][step] if "by_step" in r else r["first_device_extra_bytes"])


def plans_table(old8: dict, new8: dict, old70: dict, new70: dict, small8: dict) -> str:
    """plan_llama.md and docs/scale.md: each step's peak and what is resident beside it on the first device
    (GiB), before (the plans of 5b75bd1, the other model beside every step) and now, and whether it fits;
    the 8B on one 24 GB device has no "before"."""
    gib = 2**30
    rows = []
    for label, old, new in (("Llama-3.1-8B, 1 device", old8, new8), ("Llama-3.1-70B, 8 devices, model=8", old70, new70),
                            ("Llama-3.1-8B, 1 device", None, small8)):
        limit = new["fit"]["device_bytes"]
        for step in ("fisher", "hessian", "solve"):
            cells = []
            for plan in (old, new):
                if plan is None:
                    cells.append("-")
                    continue
                peak, beside = _beside(plan, step)
                n = plan["steps"][step].get("passes", 1)
                passes = f" ({n} pass{'es' if n > 1 else ''})" if step == "hessian" else ""
                cells.append(f"{peak / gib:.2f} + {beside / gib:.2f} = {(peak + beside) / gib:.2f}{passes}")
            need = sum(_beside(new, step))
            rows.append([label, step, *cells, f"{'yes' if need <= limit else 'no'} ({limit / 1e9:.0f} GB = "
                                               f"{limit / gib:.2f} GiB)"])
    return table(["model, devices", "step", "before: peak + beside = need", "now: peak + beside = need", "fits"],
                 rows)


def bench_stats_table(bench: dict) -> str:
    """experiments/bench_stats.py's table (it prints this) and docs/scale.md's, from its JSON ``{"setup",
    "results"}``: time against the floor (one batched value_and_grad) and the torch loop, XLA's FLOPs where
    counted, samples/s, peak RSS, the first call."""
    rows = bench["results"]
    floor = next((r for r in rows if r["method"] == "floor"), None)
    torch_s = next((r["seconds"] for r in rows if r["method"] == "torch"), None)
    samples = bench["setup"]["samples"]

    def ratio(a: float | None, b: float | None, fmt: str = ".2f") -> str:
        return f"{a / b:{fmt}}" if a and b else "-"

    out = []
    for r in rows:
        s, gf = r["seconds"], r.get("gflop")
        out.append([r["method"], f"{s:.2f}", ratio(s, floor and floor["seconds"]), f"{gf:.0f}" if gf else "-",
                    ratio(gf, floor and floor.get("gflop")), ratio(gf, s, ".1f"), ratio(torch_s, s),
                    f"{samples / s:.2f}", f"{r['peak_rss_mib']:.0f}", f"{r['first_call_s']:.1f}"])
    return table(["method", "time (s)", "x floor", "GFLOP (XLA)", "x floor GFLOP", "GFLOP/s", "torch loop / method",
                  "samples/s", "peak RSS (MiB)", "first call (s)"], out)


# NAME -> (JSON files under experiments/results, renderer taking them in that order)
RENDERERS: dict[str, tuple[tuple[str, ...], Callable[..., str]]] = {
    "table:models": (("models.json",), models_table),
    "table:demo": (("demo/demo.json",), demo_table),
    "table:headline": (("evidence_hotpotqa.json",), headline_table),
    "table:headline-catalog": (("evidence_catalog.json",), headline_table),
    "table:baselines": (("reproduce.json", "ablations.json"), baselines_table),
    "table:main": (("reproduce.json",), main_table),
    "table:efficiency": (("reproduce.json", "paper.json"), efficiency_table),
    "table:ablations": (("ablations.json", "paper.json"), ablations_table),
    "table:sweep-rcw": (("ablations.json",), sweep_rcw_table),
    "table:confirm-rcw": (("ablations.json",), confirm_rcw_table),
    "table:sweep-riw": (("ablations.json",), sweep_riw_table),
    "table:sweep-calib": (("ablations.json",), sweep_calib_table),
    "table:probes": (("probes.json",), probes_table),
    "table:a4h": (("a4h_table.json",), a4h_table),
    "table:second-task": (("second_task.json",), second_task_table),
    "evidence:hotpotqa": (("evidence_hotpotqa.json",), evidence_block("hotpotqa")),
    "evidence:catalog": (("evidence_catalog.json",), evidence_block("catalog")),
    "table:plans": (("plan_llama-3.1-8b_1dev_40GB.json", "plan_llama-3.1-8b_1dev_40GB_v3.json",
                     "plan_llama-3.1-70b_model8_60GB.json", "plan_llama-3.1-70b_model8_60GB_v3.json",
                     "plan_llama-3.1-8b_1dev_24GB_v3.json"),
                    plans_table),
    "table:bench-stats": (("bench_stats_v3.json",), bench_stats_table),
}


def load(source: str) -> dict | None:
    path = RESULTS / source
    return json.loads(path.read_text()) if path.exists() else None


def render(name: str) -> str | None:
    """The block's content from its JSON; None while a JSON it needs is not written yet."""
    if name not in RENDERERS:
        raise KeyError(f"{name}: no renderer in experiments/tables.py (RENDERERS)")
    sources, fn = RENDERERS[name]
    docs = [load(s) for s in sources]
    return None if any(d is None for d in docs) else fn(*docs)


def blocks(text: str) -> list[tuple[str, str]]:
    """(NAME, content) of every marker block of a document, in order."""
    return [(f"{m.group(1)}:{m.group(2)}", m.group(3)) for m in BLOCK.finditer(text)]


def regenerate(text: str, notes: list[str] | None = None) -> str:
    """The document with every block rendered from its JSON (blocks without JSON yet kept as they are)."""
    def sub(m: re.Match) -> str:
        name = f"{m.group(1)}:{m.group(2)}"
        new = render(name)
        if new is None:
            if notes is not None:
                notes.append(f"{name}: {', '.join(RENDERERS[name][0])} not written yet; block left as it is")
            return m.group(0)
        return f"<!-- {name} -->\n{new}<!-- /{name} -->"

    return BLOCK.sub(sub, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 naming every block out of date")
    args = ap.parse_args(argv)
    stale, notes = [], []
    for path in DOCS:
        text = path.read_text()
        new = regenerate(text, notes)
        old_blocks, new_blocks = dict(blocks(text)), dict(blocks(new))
        changed = [n for n in old_blocks if old_blocks[n] != new_blocks[n]]
        if args.check:
            stale += [f"{path.relative_to(ROOT)}: {n}" for n in changed]
        elif new != text:
            from hcnr_jax.io import atomic_write_text

            atomic_write_text(path, new)
            print(f"{path.relative_to(ROOT)}: regenerated {', '.join(changed)}")
    for note in notes:
        print(f"note: {note}")
    if stale:
        print("out of date (run `python experiments/tables.py`):\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
