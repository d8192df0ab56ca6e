"""SmolLM2-135M-Instruct on the five refusal benchmarks (+ MedMCQA option accuracy), evaluation splits.

    nohup python experiments/eval_smollm2.py --limit 60 --out experiments/results/smollm2_eval > log 2>&1 &

Same as `hcnr eval --model <gguf> --benchmarks falseqa,nec,refunq,kuq,selfaware,medmcqa --limit N`.
"""

from __future__ import annotations

import argparse

from hcnr_jax.cli import main
from hcnr_jax.embedded import smollm2_gguf

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--benchmarks", default="falseqa,nec,refunq,kuq,selfaware,medmcqa")
    ap.add_argument("--out", default="experiments/results/smollm2_eval")
    a = ap.parse_args()
    gguf = smollm2_gguf()
    raise SystemExit(main(["eval", "--model", str(gguf), "--benchmarks", a.benchmarks, "--limit", str(a.limit),
                           "--max-new-tokens", str(a.max_new_tokens), "--out", a.out]))
