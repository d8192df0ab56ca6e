"""Tokens/s of JAX batched greedy generation against transformers' `generate` on SmolLM2-135M-Instruct.

Same prompts (chat template), batch 16, 32 new tokens, greedy, stop at end of turn; both run on
this CPU. Also checks token identity of every row, and splits the time into prefill (a run with
one new token) and decoding. ``decode_floor_s`` is the time of the matrix products alone that
the decoding steps need (every linear weight and the LM head applied to a batch of one token
per row, as one jitted function, times the number of steps): no exact float32 decoder built on
XLA's matmuls goes below it here. Usage:

    python experiments/bench_generate.py [--batch 16] [--new 32] [--reps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def smollm2_path() -> Path:
    from hcnr_jax.embedded import smollm2_gguf

    return smollm2_gguf()


def prompts(n: int) -> list[str]:
    from hcnr_jax.data.benchmarks import load_benchmark, select
    from hcnr_jax.embedded import BUNDLED_DATA

    qs = []
    for b in ("kuq", "selfaware", "hotpotqa"):
        qs += select(load_benchmark(b, BUNDLED_DATA), "evaluation", n)["question"]
    return qs[::3][:n] if len(qs[::3]) >= n else qs[:n]


def matmul_floor(model, batch: int, reps: int = 10) -> float:
    """Seconds per decode step spent in matrix products alone: every linear weight of the blocks
    and the LM head applied to ``[batch, in]`` inputs in one jitted function (median of reps)."""
    import jax
    import jax.numpy as jnp

    from hcnr_jax.model import lm_head
    from hcnr_jax.params import get, linear_names

    cfg, params = model.config, model.params

    # Inputs are arguments, not constants, so that XLA cannot fold the products away.
    dims = {get(params, n).shape[1] for n in linear_names(cfg)} | {cfg.hidden_size}
    xs = {d: jnp.asarray(np.random.default_rng(d).standard_normal((batch, d)), jnp.float32) for d in dims}

    @jax.jit
    def products(params, xs):
        total = jnp.zeros((), jnp.float32)
        for name in linear_names(cfg):
            w = get(params, name)
            total += jnp.sum(xs[w.shape[1]].astype(w.dtype) @ w.T)
        return total + jnp.sum(lm_head(params, cfg, xs[cfg.hidden_size][:, None]))

    jax.block_until_ready(products(params, xs))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(products(params, xs))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--out", type=Path, default=None, help="append the result to this JSON list")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hcnr_jax
    from hcnr_jax.generation import chat_prompts, generate_ids

    if args.threads:
        torch.set_num_threads(args.threads)
    path = smollm2_path()
    model = hcnr_jax.load_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    texts = chat_prompts(model.tokenizer, prompts(args.batch))
    ids = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    # JAX: the first call compiles; time the later ones.
    t0 = time.perf_counter()
    jax_out = generate_ids(model, ids, args.new, batch_size=args.batch)
    compile_s = time.perf_counter() - t0
    jax_times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        jax_out = generate_ids(model, ids, args.new, batch_size=args.batch)
        jax_times.append(time.perf_counter() - t0)

    # transformers: left padding, same stopping rule (eos ids of the generation config).
    tok.padding_side = "left"
    width = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    inp = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    eos = hcnr_jax.generation.eos_token_ids(model)
    hf_times = []
    with torch.inference_mode():
        ref.generate(input_ids=inp, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=pad)
        for _ in range(args.reps):
            t0 = time.perf_counter()
            out = ref.generate(input_ids=inp, attention_mask=mask, max_new_tokens=args.new, do_sample=False,
                               eos_token_id=eos, pad_token_id=pad)
            hf_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref.generate(input_ids=inp, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=pad)
        hf_prefill = time.perf_counter() - t0
    hf_out = []
    for row in out[:, width:].tolist():
        cut = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
        hf_out.append(row[:cut])

    generate_ids(model, ids, 1, batch_size=args.batch)  # compiles the one-token program
    t0 = time.perf_counter()
    generate_ids(model, ids, 1, batch_size=args.batch)
    jax_prefill = time.perf_counter() - t0
    steps = max(map(len, jax_out)) - 1
    floor_step = matmul_floor(model, args.batch)

    n_jax, n_hf = sum(map(len, jax_out)), sum(map(len, hf_out))
    res = dict(
        batch=args.batch, new_tokens=args.new, prompt_tokens_max=width, torch_threads=torch.get_num_threads(),
        identical_rows=sum(a == b for a, b in zip(jax_out, hf_out, strict=True)), rows=len(ids),
        jax_tokens=n_jax, hf_tokens=n_hf, jax_compile_s=round(compile_s, 2),
        jax_s=round(float(np.median(jax_times)), 3), hf_s=round(float(np.median(hf_times)), 3),
    )
    res.update(jax_prefill_s=round(jax_prefill, 3), hf_prefill_s=round(hf_prefill, 3),
               jax_decode_step_s=round((res["jax_s"] - jax_prefill) / steps, 4),
               hf_decode_step_s=round((res["hf_s"] - hf_prefill) / steps, 4),
               matmul_floor_step_s=round(floor_step, 4), decode_floor_s=round(floor_step * steps, 3))
    res["jax_tok_s"] = round(n_jax / res["jax_s"], 1)
    res["hf_tok_s"] = round(n_hf / res["hf_s"], 1)
    res["speedup"] = round(res["jax_tok_s"] / res["hf_tok_s"], 2)
    res["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(res, indent=1))
    print(f"\n| | JAX | transformers |\n|---|---|---|\n| total s | {res['jax_s']} | {res['hf_s']} |\n"
          f"| prefill s | {res['jax_prefill_s']} | {res['hf_prefill_s']} |\n"
          f"| decode step s | {res['jax_decode_step_s']} | {res['hf_decode_step_s']} |\n"
          f"| tokens/s | {res['jax_tok_s']} | {res['hf_tok_s']} |\n"
          f"speed-up {res['speedup']}x; matmul floor of {steps} decode steps {res['decode_floor_s']} s")
    if args.out is not None:
        runs = json.loads(args.out.read_text()) if args.out.exists() else []
        args.out.write_text(json.dumps([*runs, res], indent=1) + "\n")


if __name__ == "__main__":
    main()
