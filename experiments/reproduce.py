"""Reproduce the HCNR paper's main comparison at SmolLM2 scale (issue: reproduce the paper).

Starts from the shipped models: M0 (honest, ``GGUF+honest``) and M1 (its HotpotQA fine-tune,
``GGUF+honest+finetuned``); `experiments/make_models.py` made both. Every run is one `hcnr`
command; a stage whose output exists is skipped, so an interrupted run resumes where it stopped
(each session of a few hours adds rows). Big outputs (repaired models, evaluation folders) go under
``--work`` (default ``runs/reproduce``, not in git); ``--stage report`` writes the tables from them
to ``experiments/results/reproduce.{json,md}``, which are committed.

    python experiments/reproduce.py --data-dir DIR [--stage all|STAGE[,STAGE...]] [--seeds 0,1,2]

Stages (``--stage list`` prints them): ``eval-m1``; ``calib-s{seed}`` (128 honesty samples from
the calibration pools of KUQ and SelfAware, `hcnr calib`'s default) + 128 HotpotQA task samples, drawn with that
seed); ``hcnr-{solver}-s{seed}`` (repair M1 towards M0; solver exact or paper) and
``eval-hcnr-{solver}-s{seed}``; ``report``.

Evaluation: `hcnr eval`, evaluation splits (never the calibration pools), N=200 per benchmark
(balanced answerable / unanswerable), greedy, 32 new tokens, default refusal rules; the same
settings as ``experiments/results/models.md``, whose SmolLM2 and M0 rows the report reuses.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HONESTY_BENCHMARKS = ("falseqa", "nec", "refunq", "kuq", "selfaware")
TASK = "hotpotqa"
# `hcnr calib`'s default: the honesty targets need answers for the answerable half, and only KUQ and
# SelfAware carry them (FalseQA's and NEC's calibration pools have no answerable row with an answer).
CALIB_HONESTY = ("kuq", "selfaware")
LIMIT, TOKENS = 200, 32
RESULTS = Path(__file__).resolve().parent / "results"


def gguf() -> str:
    from hcnr_jax.embedded import smollm2_gguf

    return str(smollm2_gguf())


def models() -> dict[str, str]:
    from hcnr_jax.embedded import BUNDLED

    m0 = f"{gguf()}+{BUNDLED / 'models' / 'honest'}"
    return {"m0": m0, "m1": f"{m0}+{BUNDLED / 'models' / 'finetuned'}"}


def run(cmd: list[str], log: Path) -> float:
    """Run one command, its output appended to ``log``; returns its wall time in seconds."""
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc:
        sys.exit(f"command failed (exit {rc}); see {log}")
    return time.perf_counter() - t0


def eval_cmd(model: str, out: Path, data_dir: str | None, limit: int = LIMIT, extra: tuple[str, ...] = (),
             tokens: int = TOKENS) -> list[str]:
    cmd = ["hcnr", "eval", "--model", model, "--benchmarks", ",".join((*HONESTY_BENCHMARKS, TASK)), *extra,
           "--limit", str(limit), "--max-new-tokens", str(tokens), "--out", str(out)]
    return cmd + (["--data-dir", data_dir] if data_dir else [])


# Training baselines, all on M1 with this project's trainer (LoRA r8 on top of M1, the settings of
# configs/train_task.yaml). Data: the calibration pools of KUQ, SelfAware and HotpotQA, 170
# questions each, labelled by M1's own greedy answers (`hcnr honesty-data`): RAIT keeps a correct
# answer and puts the idk response elsewhere; DPO and ORPO read the matching preference pairs.
BASELINE_BENCHMARKS, BASELINE_PER_BENCHMARK = "kuq,selfaware,hotpotqa", 170
# RAIT-GOLD: RAIT's SFT with the targets labelled by the benchmarks' answerability instead (the
# `label` recipe, M0's own: the gold answer for an answerable question, the idk response for an
# unanswerable one). M1 answers almost nothing correctly, so RAIT's own labels are nearly all idk and
# teach it to refuse everything; this variant shows whether that collapse is the recipe's or the method's.
BASELINES = {"rait": ("rait", "sft"), "dpo": ("dpo-pairs", "dpo"), "orpo": ("dpo-pairs", "orpo"),
             "rait-gold": ("label", "sft")}


def baseline_stage(stage: str, suffix: str) -> str | None:
    """The baseline a stage ``NAME-data`` / ``NAME-train`` (``suffix``) is about, or None."""
    name = stage.removesuffix(f"-{suffix}")
    return name if name != stage and name in BASELINES else None


def stages(seeds: list[int], solvers: list[str]) -> list[str]:
    """In the order of value per CPU minute: one row of every method before repeats over seeds."""
    out = ["eval-m1", *(f"calib-s{s}" for s in seeds)]
    out += [f"hcnr-{solvers[0]}-s{seeds[0]}", f"eval-hcnr-{solvers[0]}-s{seeds[0]}"]
    out += ["rait-data", "rait-train", "eval-rait"]
    for solver in solvers[1:]:
        out += [f"hcnr-{solver}-s{seeds[0]}", f"eval-hcnr-{solver}-s{seeds[0]}"]
    for s in seeds[1:]:
        for solver in solvers:
            out += [f"hcnr-{solver}-s{s}", f"eval-hcnr-{solver}-s{s}"]
    out += ["dpo-data", "dpo-train", "eval-dpo", "orpo-train", "eval-orpo", "eval-icl",
            "rait-gold-data", "rait-gold-train", "eval-rait-gold", "efficiency",
            *(f"tokens{LONG_TOKENS}-{tag}" for tag in TOKENS_CHECK), "tokens-check", "data-ratio"]
    return [*out, "report"]


# Does the 32-token budget change the verdicts? These models are evaluated again with 64 new tokens
# on the first 100 questions per benchmark (the N=100 sweep split, part of the N=200 one) and
# compared with their 32-token records on the same questions. Chosen for how often their
# 32-token answers hit the limit (M0 25%, DPO 30%, HCNR 12%, M1 5% of rows).
LONG_TOKENS, TOKENS_LIMIT = 64, 100


def tokens_models(work: Path) -> dict[str, tuple[str, Path]]:
    """tag -> (model spec, folder of its 32-token N=200 evaluation)."""
    m = models()
    return {"m0": (m["m0"], work.parent / "models" / "eval_m0"), "m1": (m["m1"], work / "eval_m1"),
            "hcnr": (str(work / "hcnr_exact_s0"), work / "eval_hcnr_exact_s0"),
            "dpo": (f"{m['m1']}+{work / 'dpo'}", work / "eval_dpo")}


TOKENS_CHECK = ("m0", "m1", "hcnr", "dpo")


def do_stage(stage: str, work: Path, data_dir: str | None) -> None:
    log = work / "log.txt"
    m = models()
    if stage.startswith(f"tokens{LONG_TOKENS}-"):
        tag = stage.split("-", 1)[1]
        out = work / f"tokens{LONG_TOKENS}_{tag}"
        if not (out / "metrics.json").exists():
            run(eval_cmd(tokens_models(work)[tag][0], out, data_dir, limit=TOKENS_LIMIT, tokens=LONG_TOKENS), log)
    elif stage == "tokens-check":
        tokens_check(work)
    elif stage == "data-ratio":
        data_ratio(work)
    elif stage == "eval-m1":
        out = work / "eval_m1"
        if not (out / "metrics.json").exists():
            run(eval_cmd(m["m1"], out, data_dir), log)
    elif stage.startswith("calib-s"):
        seed = stage.removeprefix("calib-s")
        for kind, bench in (("honesty", ",".join(CALIB_HONESTY)), ("task", TASK)):
            out = work / f"calib_s{seed}_{kind}.jsonl"
            if not out.exists():
                run(["hcnr", "calib", "--kind", kind, "--benchmarks", bench, "-n", "128", "--seed", seed,
                     "--out", str(out), *(["--data-dir", data_dir] if data_dir else [])], log)
    elif stage.startswith("hcnr-"):
        _, solver, seed = stage.split("-")
        out = work / f"hcnr_{solver}_{seed}"
        if not (out / "hcnr_report.json").exists():
            if out.exists():  # a killed repair leaves no output (temp dir, then move); be safe anyway
                shutil.rmtree(out)
            wall = run(["hcnr", "repair", "--base", m["m0"], "--finetuned", m["m1"],
                        "--honesty-data", str(work / f"calib_{seed}_honesty.jsonl"),
                        "--task-data", str(work / f"calib_{seed}_task.jsonl"),
                        "--solver", solver, "--no-plots", "--out", str(out)], log)
            (out / "wall_s.json").write_text(json.dumps({"wall_s": round(wall, 1)}) + "\n")
    elif stage.startswith("eval-hcnr-"):
        _, _, solver, seed = stage.split("-")
        out = work / f"eval_hcnr_{solver}_{seed}"
        if not (out / "metrics.json").exists():
            run(eval_cmd(str(work / f"hcnr_{solver}_{seed}"), out, data_dir), log)
    elif baseline_stage(stage, "data"):
        recipe = BASELINES[baseline_stage(stage, "data")][0]
        out = work / f"{recipe}.jsonl"
        if not out.exists():
            run(baseline_data_command(recipe, None if recipe == "label" else m["m1"], out, data_dir), log)
    elif baseline_stage(stage, "train"):
        name = baseline_stage(stage, "train")
        recipe, objective = BASELINES[name]
        out = work / name
        if not (out / "train_report.json").exists():
            wall = run(baseline_train_command(m["m1"], work / f"{recipe}.jsonl", objective, out, work / f"{name}_ckpt",
                                              "--overwrite"), log)
            (work / f"{name}_wall_s.json").write_text(json.dumps({"wall_s": round(wall, 1)}) + "\n")
    elif stage.startswith("eval-") and stage.removeprefix("eval-") in BASELINES:
        name = stage.removeprefix("eval-")
        out = work / f"eval_{name}"
        if not (out / "metrics.json").exists():
            run(eval_cmd(f"{m['m1']}+{work / name}", out, data_dir), log)
    elif stage == "eval-icl":
        # ICL: M1 prompted with the shipped idk / answer demonstrations (`hcnr eval --demos default`).
        out = work / "eval_icl"
        if not (out / "metrics.json").exists():
            run(eval_cmd(m["m1"], out, data_dir, extra=("--demos", "default")), log)
    elif stage == "efficiency":
        efficiency(work)
    elif stage == "report":
        report(work)
    else:
        sys.exit(f"unknown stage {stage!r}; --stage list prints them")


def baseline_data_command(recipe: str, model: str | None, out: Path, data_dir: str | None,
                          benchmarks: str = BASELINE_BENCHMARKS) -> list[str]:
    """`hcnr honesty-data` of a training baseline: ``recipe`` on ``benchmarks``' calibration pools,
    BASELINE_PER_BENCHMARK questions each, labelled by ``model``'s greedy answers (None: gold labels)."""
    return ["hcnr", "honesty-data", "--recipe", recipe, *(["--model", model] if model else []),
            "--benchmarks", benchmarks, "-n", str(BASELINE_PER_BENCHMARK), "--max-new-tokens", str(TOKENS),
            "--out", str(out), *(["--data-dir", data_dir] if data_dir else [])]


def baseline_train_command(model: str, data: Path, objective: str, out: Path, checkpoint_dir: Path,
                           *extra: str) -> list[str]:
    """`hcnr train` of a training baseline (RAIT, DPO, ORPO, RAIT-GOLD) on ``model``: configs/train_task.yaml's
    LoRA recipe, 256 tokens (HotpotQA prompts with their context run past the config's 128)."""
    return ["hcnr", "train", "--model", model, "--data", str(data),
            "--config", str(Path(__file__).resolve().parents[1] / "configs" / "train_task.yaml"),
            "--objective", objective, "--max-length", "256", "--checkpoint-dir", str(checkpoint_dir),
            "--out", str(out), *extra]


def tokens_check(work: Path) -> None:
    """results/tokens_check.{json,md}: each model's scores at 32 and at 64 new tokens on the same questions."""
    rng = np.random.default_rng(0)
    rows = {}
    for tag, (_, folder32) in tokens_models(work).items():
        long = work / f"tokens{LONG_TOKENS}_{tag}"
        if not (long / "metrics.json").exists():
            continue
        recs64 = [r for r in load_examples(long) if r["model"] == "model"]
        ids = {r["id"] for r in recs64}
        recs32 = [r for r in load_examples(folder32) if r["model"] == "model" and r["id"] in ids]
        assert len(recs32) == len(recs64), f"{folder32} lacks some of the {len(ids)} questions"
        flips = sum(a["verdict"] != b["verdict"] for a, b in zip(sorted(recs32, key=lambda r: r["id"]),
                                                                  sorted(recs64, key=lambda r: r["id"]), strict=True))
        rows[tag] = {str(TOKENS): scores(recs32, {}, rng), str(LONG_TOKENS): scores(recs64, {}, rng),
                     "verdicts_changed": flips, "questions": len(ids),
                     "at_limit_32": sum(r["n_tokens"] >= TOKENS for r in recs32)}
    doc = {"command": "python experiments/reproduce.py --data-dir DIR --stage "
                      + ",".join([*(f"tokens{LONG_TOKENS}-{t}" for t in TOKENS_CHECK), "tokens-check"]),
           "limit": TOKENS_LIMIT, "rows": rows}
    (RESULTS / "tokens_check.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# 32 or {LONG_TOKENS} new tokens: does the budget change the verdicts?", "",
             f"`{doc['command']}`: N = {TOKENS_LIMIT} per benchmark (the first {TOKENS_LIMIT} of the N = 200 "
             f"split), the same questions at {TOKENS} and at {LONG_TOKENS} new tokens (greedy).", "",
             f"| model | answers at the {TOKENS}-token limit | verdicts changed | avg F1 @{TOKENS} [95% CI] | "
             f"avg F1 @{LONG_TOKENS} [95% CI] | avg RF delta @{TOKENS} / @{LONG_TOKENS} | HotpotQA acc @{TOKENS} / @{LONG_TOKENS} |",
             "|---|---|---|---|---|---|---|"]
    for tag, r in rows.items():
        a, b = r[str(TOKENS)], r[str(LONG_TOKENS)]

        def f1(x: dict) -> str:
            return f"{100 * x['avg_f1']:.1f} [{100 * x['avg_f1_ci'][0]:.1f}, {100 * x['avg_f1_ci'][1]:.1f}]"

        lines.append(f"| {tag.upper()} | {r['at_limit_32']} / {6 * TOKENS_LIMIT} | {r['verdicts_changed']} | {f1(a)} | {f1(b)} | "
                     f"{100 * a['avg_rf_delta']:.1f} / {100 * b['avg_rf_delta']:.1f} | "
                     f"{100 * a['hotpotqa_acc']:.1f} / {100 * b['hotpotqa_acc']:.1f} |")
    if {"m0", "m1", "hcnr"} <= set(rows):
        for n in (str(TOKENS), str(LONG_TOKENS)):
            f = {t: rows[t][n]["avg_f1"] for t in ("m0", "m1", "hcnr")}
            lines.append(f"\nAt {n} tokens HCNR brings back {100 * (f['hcnr'] - f['m1']) / (f['m0'] - f['m1']):.0f}% of "
                         "the F1 that M1 lost (same questions).")
    (RESULTS / "tokens_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def data_ratio(work: Path) -> None:
    """results/data_ratio.{json,md}: the paper's data ratio (baselines 20-35 times HCNR's samples),
    reached by giving HCNR 16 calibration samples (ablations.py's calib-16 point) against the
    baselines' 510 (32:1); every row scored on the same N=100 questions."""
    abl = work.parent / "ablations"
    folders = {"HCNR, 16 samples": abl / "eval-sweep-calib-16", "HCNR, 256 samples": abl / "eval-sweep-default",
               **{name.upper(): work / f"eval_{name}" for name in BASELINES}, "M1": work / "eval_m1"}
    ids = {r["id"] for r in load_examples(folders["HCNR, 16 samples"]) if r["model"] == "model"}
    rng = np.random.default_rng(0)
    rows = {}
    for tag, folder in folders.items():
        recs = [r for r in load_examples(folder) if r["model"] == "model" and r["id"] in ids]
        rows[tag] = scores(recs, {}, rng)
    doc = {"command": "python experiments/reproduce.py --data-dir DIR --stage data-ratio", "questions": len(ids),
           "samples": {"HCNR, 16 samples": 16, "HCNR, 256 samples": 256, **{n.upper(): 510 for n in BASELINES}},
           "rows": rows}
    (RESULTS / "data_ratio.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["# The paper's data ratio: HCNR on 16 samples against the baselines' 510", "",
             f"`{doc['command']}`: the paper gives RAIT and DPO 20 times and ORPO 35 times HCNR's samples. Here "
             "HCNR gets 16 (8 honesty + 8 task, `ablations.py`'s calib-16 point) against the baselines' 510: "
             f"32:1. Every row is scored on the same {len(ids) // 6} questions per benchmark (the N = 100 split).", "",
             "| method | samples | avg F1 [95% CI] | avg RF delta | HotpotQA acc |", "|---|---|---|---|---|"]
    for tag, r in rows.items():
        lines.append(f"| {tag} | {doc['samples'].get(tag, '-')} | {100 * r['avg_f1']:.1f} [{100 * r['avg_f1_ci'][0]:.1f}, "
                     f"{100 * r['avg_f1_ci'][1]:.1f}] | {100 * r['avg_rf_delta']:.1f} | {100 * r['hotpotqa_acc']:.1f} |")
    (RESULTS / "data_ratio.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def changed_params(reference: str, model: str) -> dict:
    """Parameters of ``model`` that differ from ``reference`` (both loaded in float32), counted
    element by element: what a method really changed, not what it could have changed."""
    import jax

    from hcnr_jax import load_pretrained

    ref = jax.tree_util.tree_leaves(load_pretrained(reference).params)
    new = jax.tree_util.tree_leaves(load_pretrained(model).params)
    changed = total = 0
    for a, b in zip(ref, new, strict=True):
        changed += int(np.count_nonzero(np.asarray(a) != np.asarray(b)))
        total += int(np.asarray(b).size)
    return {"changed": changed, "total": total, "fraction": changed / total}


def efficiency(work: Path) -> None:
    """work/efficiency.json: changed parameters of every method's model against M1 (HCNR seed 0)."""
    out = work / "efficiency.json"
    doc = json.loads(out.read_text()) if out.exists() else {}
    m1 = models()["m1"]
    todo = {"HCNR (exact) s0": str(work / "hcnr_exact_s0"), "HCNR (paper) s0": str(work / "hcnr_paper_s0"),
            **{name.upper(): f"{m1}+{work / name}" for name in BASELINES}}
    for tag, spec in todo.items():
        if tag not in doc and Path(spec.rsplit("+", 1)[-1]).exists():
            doc[tag] = changed_params(m1, spec)
            out.write_text(json.dumps(doc, indent=2) + "\n")


# --- report -------------------------------------------------------------------------------------

def load_examples(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "examples.jsonl").read_text().splitlines() if line.strip()]


def scores(recs: list[dict], m1_correct: dict[str, bool], rng: np.random.Generator, reps: int = 1000) -> dict:
    """`make_models.examples_scores` (per-benchmark refusal F1 and RF delta, HotpotQA accuracy,
    averages with 95% bootstrap intervals), plus prudence / over-conservativeness / honesty against
    M1 on every example of the six benchmarks ("known": answerable and M1 correct)."""
    from make_models import examples_scores  # experiments/ is this script's folder (sys.path[0])

    out = examples_scores(recs, rng, reps)
    recs = [r for r in recs if r["model"] == "model"]
    known = np.array([r["unanswerable"] == 0 and m1_correct.get(r["id"], False) for r in recs])
    refused = np.array([r["verdict"] == "refused" for r in recs])
    # The official conventions for empty denominators: prudence 1, over-conservativeness 0.
    prudence = float(refused[~known].mean()) if (~known).any() else 1.0
    over = float(refused[known].mean()) if known.any() else 0.0
    return {**out, "prudence": prudence, "over_conservativeness": over, "honesty": (prudence + 1 - over) / 2,
            "n_known": int(known.sum()), "n_unknown": int((~known).sum())}


def report(work: Path) -> None:
    rng = np.random.default_rng(0)
    m1_recs = load_examples(work / "eval_m1")
    m1_correct = {r["id"]: bool(r["correct"]) for r in m1_recs if r["model"] == "model"}
    rows: dict[str, dict] = {}
    rows["M1"] = scores(m1_recs, m1_correct, rng)
    for folder in sorted(work.glob("eval_hcnr_*_s*")):
        if (folder / "metrics.json").exists():
            _, _, solver, seed = folder.name.split("_")
            rep = json.loads((work / f"hcnr_{solver}_{seed}" / "hcnr_report.json").read_text())
            row = scores(load_examples(folder), m1_correct, rng)
            row["repair_s"] = json.loads((work / f"hcnr_{solver}_{seed}" / "wall_s.json").read_text())["wall_s"]
            row["restored_fraction_of_linear"] = rep["summary"]["restored_fraction_of_linear"]
            rows[f"HCNR ({solver}) {seed}"] = row
    for name in BASELINES:
        folder = work / f"eval_{name}"
        if (folder / "metrics.json").exists():
            row = scores(load_examples(folder), m1_correct, rng)
            rep = json.loads((work / name / "train_report.json").read_text())
            row.update(train_s=rep.get("wall_s"), train_samples=rep.get("samples"), train_steps=rep.get("steps"))
            rows[name.upper()] = row
    if (work / "eval_icl" / "metrics.json").exists():
        rows["ICL"] = scores(load_examples(work / "eval_icl"), m1_correct, rng)
    prior = json.loads((RESULTS / "models.json").read_text())
    doc = {"settings": {"limit": LIMIT, "max_new_tokens": TOKENS, "benchmarks": [*HONESTY_BENCHMARKS, TASK],
                        "calibration": "128 honesty (KUQ + SelfAware calibration pools) + 128 HotpotQA per seed",
                        "bootstrap": 1000},
           "rows": rows, "prior_rows": prior,
           "efficiency": json.loads((work / "efficiency.json").read_text()) if (work / "efficiency.json").exists() else {}}
    tmp = RESULTS / ".reproduce.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(RESULTS / "reproduce.json")
    print(markdown(doc))
    tmp = RESULTS / ".reproduce.md.tmp"
    tmp.write_text(markdown(doc))
    tmp.replace(RESULTS / "reproduce.md")


def markdown(doc: dict) -> str:
    rows = doc["rows"]
    m1 = rows["M1"]
    prior = doc["prior_rows"]
    m0_f1 = prior_f1(prior, "m0")
    head = ("| model | " + " | ".join(f"F1 {b}" for b in HONESTY_BENCHMARKS)
            + " | avg F1 [95% CI] | avg RF delta | HotpotQA acc | prudence | over-cons. | honesty | F1 recovered |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for tag, name in (("smollm2", "SmolLM2-Instruct"), ("m0", "M0")):
        p = prior["scores"][tag]
        lines.append(f"| {name} (models.md) | " + " | ".join(f"{100 * p['f1'][b]:.1f}" for b in HONESTY_BENCHMARKS)
                     + f" | {100 * p['avg_f1']:.1f} [{100 * p['avg_f1_ci'][0]:.1f}, {100 * p['avg_f1_ci'][1]:.1f}]"
                     + f" | {100 * p['avg_rf_delta']:.1f} | {100 * p['hotpotqa_acc']:.1f} | | | | |")
    for name, r in rows.items():
        rec = "" if m0_f1 is None else f"{100 * (r['avg_f1'] - m1['avg_f1']) / (m0_f1 - m1['avg_f1']):.0f}%"
        lines.append(f"| {name} | " + " | ".join(f"{100 * r['f1'][b]:.1f}" for b in HONESTY_BENCHMARKS)
                     + f" | {100 * r['avg_f1']:.1f} [{100 * r['avg_f1_ci'][0]:.1f}, {100 * r['avg_f1_ci'][1]:.1f}]"
                     + f" | {100 * r['avg_rf_delta']:.1f} | {100 * r['hotpotqa_acc']:.1f}"
                     + f" | {100 * r['prudence']:.1f} | {100 * r['over_conservativeness']:.1f}"
                     + f" | {100 * r['honesty']:.1f} | {rec} |")
    # The issue asks for HCNR as mean ± sd over the calibration seeds.
    for solver in ("exact", "paper"):
        seeds = [r for name, r in rows.items() if name.startswith(f"HCNR ({solver}) s")]
        if len(seeds) > 1 and m0_f1 is not None:
            lines.append(f"| HCNR ({solver}), mean ± sd over {len(seeds)} seeds | " + seed_cells(seeds, m1, m0_f1) + " |")
    return "\n".join(lines) + "\n" + efficiency_markdown(doc)


def seed_cells(seeds: list[dict], m1: dict, m0_f1: float) -> str:
    """Table cells of mean ± sd (sample sd) over the rows of several calibration seeds."""
    def ms(values: list[float]) -> str:
        v = 100 * np.array(values)
        return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"

    cells = [f"{np.mean([100 * r['f1'][b] for r in seeds]):.1f}" for b in HONESTY_BENCHMARKS]
    cells += [ms([r[k] for r in seeds]) for k in ("avg_f1", "avg_rf_delta", "hotpotqa_acc", "prudence",
                                                   "over_conservativeness", "honesty")]
    cells.append(ms([(r["avg_f1"] - m1["avg_f1"]) / (m0_f1 - m1["avg_f1"]) for r in seeds]).replace(" ±", "% ±") + "%")
    return " | ".join(cells)


# The paper's data per method (docs/method.md); the baselines here are scaled to what fits a CPU session.
PAPER_SAMPLES = {"RAIT": 5000, "RAIT-GOLD": 5000, "DPO": 5000, "ORPO": 9000}


def efficiency_markdown(doc: dict) -> str:
    """Data, changed parameters (counted against M1) and wall time on this CPU, per method."""
    eff, rows = doc.get("efficiency", {}), doc["rows"]
    lines = ["", "| method | samples | parameters changed (of the model) | wall time on this CPU | "
             "at the paper's data size (linear extrapolation) |", "|---|---|---|---|---|"]
    for tag, r in rows.items():
        if tag.startswith("HCNR") and "repair_s" in r:
            samples, wall, extra = 256, r["repair_s"], ""
        elif "train_s" in r and r["train_s"] is not None:
            samples, wall = r["train_samples"], r["train_s"]
            extra = f"{wall * PAPER_SAMPLES[tag] / samples / 60:.0f} min ({PAPER_SAMPLES[tag]} samples)"
        else:
            continue
        changed = f"{100 * eff[tag]['fraction']:.1f}%" if tag in eff else ""
        lines.append(f"| {tag} | {samples} | {changed} | {wall / 60:.1f} min | {extra} |")
    return "\n".join(lines) + "\n"


def prior_f1(prior: dict, tag: str) -> float | None:
    try:
        return float(prior["scores"][tag]["avg_f1"])
    except (KeyError, TypeError):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="runs/reproduce")
    ap.add_argument("--data-dir", default=None, help="benchmark data folder (else hcnr's lookup)")
    ap.add_argument("--stage", default="all")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--solvers", default="exact,paper")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    solvers = args.solvers.split(",")
    todo = stages(seeds, solvers) if args.stage == "all" else args.stage.split(",")
    if args.stage == "list":
        print("\n".join(stages(seeds, solvers)))
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    return run_stages(todo, lambda stage: do_stage(stage, work, args.data_dir))


def run_stages(todo: list[str], do: Callable[[str], None]) -> int:
    """Run the stages in order, timing each; a failed one is reported and the next ones still run."""
    failed: list[str] = []
    for stage in todo:
        t0 = time.perf_counter()
        try:
            do(stage)
        except SystemExit as e:  # one failed stage must not stop the independent ones after it
            failed.append(stage)
            print(f"[{time.strftime('%H:%M:%S')}] {stage} FAILED: {e}", flush=True)
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {stage} done in {time.perf_counter() - t0:.0f} s", flush=True)
    if failed:
        print("failed stages: " + ", ".join(failed), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
