"""A second fine-tuning task: does HCNR also repair M0 fine-tuned on MedMCQA?

M1 (the main experiments) is M0 fine-tuned on HotpotQA. Here M0 is fine-tuned instead on MedMCQA
multiple-choice questions (the prompt the evaluation uses, `hcnr_jax.eval.runner.mcq_prompt`;
response: the correct letter), from the MedMCQA calibration pool. Then, with settings chosen on
HotpotQA and not retuned here (r_cw 0.5, the rest default), HCNR repairs it towards M0 on the
shipped 128 honesty samples and 128 of the MedMCQA training samples. M0, the MedMCQA fine-tune and
its repair are evaluated on the five honesty benchmarks (evaluation splits, balanced, greedy, 32
new tokens) and on MedMCQA option accuracy (evaluation split).

    python experiments/second_task.py --data-dir DIR [--work runs/second_task] [--limit 100]

Stages are skipped when their output exists (training resumes from its checkpoints), so an
interrupted run resumes. Writes experiments/results/second_task.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import make_models as mm

BUNDLED = Path(__file__).resolve().parents[1] / "hcnr_jax" / "bundled" / "models"


def build_data(work: Path, data_dir: str | None, n: int, seed: int) -> None:
    from hcnr_jax.data.benchmarks import load_benchmark, order_key
    from hcnr_jax.data.jsonl import write_jsonl
    from hcnr_jax.eval.runner import MCQ_LETTERS, mcq_prompt

    pool = sorted((r for r in load_benchmark("medmcqa", data_dir) if r["split"] == "calibration"),
                  key=lambda r: order_key(r["id"], seed))[:n]
    rows = [{"prompt": mcq_prompt(r["question"], r["options"]), "response": MCQ_LETTERS[r["gold"]], "id": r["id"]}
            for r in pool]
    write_jsonl(rows, work / "med_train.jsonl")
    write_jsonl(rows[:128], work / "med_task.jsonl")  # HCNR's task samples: from the fine-tuning data
    print(f"wrote {len(rows)} MedMCQA training samples", flush=True)


def sources(work: Path) -> dict[str, str]:
    m0 = f"{mm.gguf()}+{BUNDLED / 'honest'}"
    return {"m0": m0, "med": f"{m0}+{work / 'finetuned'}", "med_hcnr": str(work / "repaired")}


def scores(work: Path, tag: str, rng: np.random.Generator) -> dict:
    """`make_models.examples_scores` of ``work/eval_<tag>``, with MedMCQA as the task."""
    recs = [json.loads(x) for x in (work / f"eval_{tag}" / "examples.jsonl").read_text().splitlines() if x.strip()]
    return mm.examples_scores(recs, rng, task="medmcqa")


def report(work: Path, out: Path, limit: int) -> None:
    from hcnr_jax.io import atomic_write_text

    rng = np.random.default_rng(0)
    tags = [t for t in ("m0", "med", "med_hcnr") if (work / f"eval_{t}" / "examples.jsonl").exists()]
    sc = {t: scores(work, t, rng) for t in tags}
    names = {"m0": "M0 (honest base)", "med": "M0 + MedMCQA fine-tune", "med_hcnr": "MedMCQA fine-tune + HCNR"}

    def ci(s: dict, key: str) -> str:
        lo, hi = s[key + "_ci"]
        return f"{100 * s[key]:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"

    lines = ["# A second task: M0 fine-tuned on MedMCQA, and its HCNR repair", "",
             f"`python experiments/second_task.py --data-dir DIR --limit {limit}`. Evaluation splits, N = {limit} per "
             "honesty benchmark (balanced) and per MedMCQA, greedy, 32 new tokens; 95% bootstrap intervals "
             "(1,000 resamples within each benchmark, seed 0). HCNR: r_cw 0.5 (chosen on HotpotQA, not retuned "
             "here), other settings default, the shipped 128 honesty samples + 128 MedMCQA training samples.", "",
             "| model | " + " | ".join(f"F1 {b}" for b in mm.HONESTY_BENCHMARKS)
             + " | avg F1 [95% CI] | avg RF delta [95% CI] | MedMCQA acc [95% CI] |",
             "|---|" + "---|" * (len(mm.HONESTY_BENCHMARKS) + 3)]
    for t in tags:
        s = sc[t]
        lines.append(f"| {names[t]} | " + " | ".join(f"{100 * s['f1'][b]:.1f}" for b in mm.HONESTY_BENCHMARKS)
                     + f" | {ci(s, 'avg_f1')} | {ci(s, 'avg_rf_delta')} | {ci(s, 'medmcqa_acc')} |")
    info = {}
    for name in ("train", "repair"):
        f = work / f"{name}_seconds.json"
        if f.exists():
            info[name] = json.loads(f.read_text())
    if "med" in sc and "m0" in sc:
        lost = sc["m0"]["avg_f1"] - sc["med"]["avg_f1"]
        lines += ["", f"Fine-tuning on MedMCQA moved avg refusal F1 by {100 * -lost:+.1f} points."]
        if "med_hcnr" in sc and lost > 0:
            back = sc["med_hcnr"]["avg_f1"] - sc["med"]["avg_f1"]
            lines.append(f"HCNR brought back {100 * back:.1f} points ({back / lost:.0%} of the loss).")
    if info:
        lines += ["", "Wall time on 2 CPU cores: " + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in info.items())
                  + "."]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    atomic_write_text(out.with_suffix(".json"), json.dumps({"limit": limit, "scores": sc, "time": info}, indent=1)
                      + "\n")
    print("\n".join(lines), flush=True)


def timed(work: Path, name: str, cmd: list[str]) -> None:
    t0 = time.perf_counter()
    mm.run(cmd)
    (work / f"{name}_seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - t0}) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="runs/second_task")
    ap.add_argument("--data-dir", default=None, help="benchmark data folder (hcnr data lookup otherwise)")
    ap.add_argument("--stage", default="all", choices=["all", "data", "train", "eval-m0", "eval-med", "repair",
                                                       "eval-med_hcnr", "report"])
    ap.add_argument("--samples", type=int, default=800, help="MedMCQA training samples")
    ap.add_argument("--limit", type=int, default=100, help="evaluation questions per benchmark")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    src = sources(work)
    stages = (["data", "train", "eval-med", "repair", "eval-med_hcnr", "eval-m0", "report"] if args.stage == "all"
              else [args.stage])
    for stage in stages:
        if stage == "data" and not (work / "med_train.jsonl").exists():
            build_data(work, args.data_dir, args.samples, args.seed)
        if stage == "train" and not (work / "finetuned").exists():
            timed(work, "train", ["hcnr", "train", "--model", src["m0"], "--data", str(work / "med_train.jsonl"),
                                  "--out", str(work / "finetuned"), "--config", "configs/train_task.yaml",
                                  "--max-length", "256", "--checkpoint-dir", str(work / "finetuned.ckpt")])
        if stage == "repair" and not (work / "repaired").exists():
            timed(work, "repair", ["hcnr", "repair", "--base", src["m0"], "--finetuned", src["med"], "--task-data",
                                   str(work / "med_task.jsonl"), "--r-cw", "0.5", "--max-length", "256",
                                   "--out", str(work / "repaired")])
        if stage.startswith("eval-"):
            tag = stage[len("eval-"):]
            if not (work / f"eval_{tag}" / "metrics.json").exists():
                mm.run(["hcnr", "eval", "--model", src[tag], "--benchmarks",
                        ",".join((*mm.HONESTY_BENCHMARKS, "medmcqa")), "--limit", str(args.limit),
                        "--max-new-tokens", "32", "--out", str(work / f"eval_{tag}"), *data])
        if stage == "report":
            report(work, Path("experiments/results/second_task"), args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
