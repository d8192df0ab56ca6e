"""Fisher statistics on SmolLM2-135M-Instruct: hcnr-jax against three baselines, side by side.

  (a) floor: one batched ``value_and_grad`` over the same tokens (no per-sample information)
  hcnr:      ``hcnr_jax.stats.fisher`` (ghost norms from layer inputs and output gradients), at
             ``StatsOptions``' default (every block recomputed in the backward pass: one block's
             activations live, for one more forward pass)
  hcnr-no-remat: the same with every block's activations kept (``remat=False``)
  (b) vmap:  ``vmap(grad)`` per sample, full per-sample gradients of every linear weight
  (c) torch: the PyTorch loop a user would write (one backward per sample, square, accumulate)

The GGUF is dequantised to a float32 Hugging Face directory once; each method then runs in its own
subprocess loading that directory (peak RSS is per method). Times exclude compilation (a warm-up
pass runs first; for torch one sample) and model loading. PyTorch uses as many threads as there are
CPU cores; on a shared, loaded machine its per-sample loop is the method most sensitive to other
load (its OpenMP threads wait on each other), so compare runs only at similar load averages (the
JSON records the load average at the end). For the JAX methods but vmap the table also gives XLA's
count of floating-point operations of the run (``cost_analysis`` of the compiled per-batch program,
times the batches): the time a method can reach on the same cores is bounded by its FLOPs at the
floor's rate, so "x floor GFLOP" is what its "x floor" time would be at equal efficiency (recomputing
the blocks adds one forward pass of them). Prints a table and writes JSON (``--out``). Usage:

    python experiments/bench_stats.py --samples 32 --tokens 64 --batch 8 --out experiments/results/bench_stats.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = ("floor", "hcnr", "hcnr-no-remat", "vmap", "torch")


def gguf_path() -> Path:
    from hcnr_jax.embedded import smollm2_gguf

    return smollm2_gguf()


def make_samples(n: int, t: int, vocab: int):
    from hcnr_jax.data.samples import samples_from_records

    rng = np.random.default_rng(0)
    # Loss over the second half of every sequence, like a response after a prompt.
    recs = [{"input_ids": rng.integers(0, vocab, t).tolist(), "loss_mask": [0] * (t // 2) + [1] * (t - t // 2)}
            for _ in range(n)]
    return samples_from_records(recs, tokenizer=None)


def run_method(method: str, args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    import hcnr_jax
    from hcnr_jax import stats
    from hcnr_jax.model import forward
    from hcnr_jax.plan import compiled_flops
    from hcnr_jax.stats import StatsOptions, fisher_accum
    from hcnr_jax.stats.reference import fisher_vmap

    model = hcnr_jax.load_pretrained(args.model_dir, dtype="float32")
    cfg, params = model.config, model.params
    samples = make_samples(args.samples, args.tokens, cfg.vocab_size)
    bs = args.batch

    batches = -(-len(samples) // bs)
    first = (samples.input_ids[:bs], samples.attention_mask[:bs], samples.loss_mask[:bs])
    batch_flops = None  # XLA's FLOPs of one batch's program, counted after the timing (a compile of its own)
    if method == "floor":
        vg = jax.jit(jax.value_and_grad(lambda p, ids, a, lm: jnp.mean(
            stats.per_sample_loss(forward(p, cfg, ids, a).logits, ids, lm))))
        dev = jax.device_put(params)

        def batch_flops():
            return compiled_flops(vg.lower(dev, *first).compile())

        def go():
            out = None
            for s in range(0, len(samples), bs):
                out = vg(dev, samples.input_ids[s:s + bs], samples.attention_mask[s:s + bs],
                         samples.loss_mask[s:s + bs])
            jax.block_until_ready(out)
    elif method in ("hcnr", "hcnr-no-remat"):
        options = StatsOptions(batch_size=bs, backend=args.backend, remat=method == "hcnr")
        # The very step stats.fisher compiles (same static arguments), on the first batch.
        static = stats.fisher_static(options, "input", fisher_accum.target_capacity(samples.loss_mask))
        step = jax.jit(functools.partial(stats.fisher_update, cfg=cfg, **static))
        batch = dict(zip(("input_ids", "attention_mask", "loss_mask"), first, strict=True))

        def batch_flops():
            return compiled_flops(step.lower(fisher_accum.init(params, cfg), params, batch).compile())

        def go():
            stats.fisher(params, cfg, samples, options)
    elif method == "vmap":
        def go():
            fisher_vmap(params, cfg, samples, batch_size=args.vmap_batch)
    else:
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count() or 1)
        del model, params
        tm = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
        lin = {n: p for n, p in tm.named_parameters() if n.endswith("proj.weight")}
        for n, p in tm.named_parameters():
            p.requires_grad_(n in lin)  # only the block linear weights' gradients are needed

        def go(count=None):
            # One forward + backward per sample (unpadded: all samples have the same length here),
            # squared gradient of every block linear weight summed per input neuron (column).
            acc = {n: torch.zeros(p.shape[1]) for n, p in lin.items()}
            for i in range(len(samples) if count is None else count):
                ids = torch.tensor(samples.input_ids[i:i + 1], dtype=torch.long)
                lm = torch.tensor(samples.loss_mask[i, 1:], dtype=torch.float32)
                tm.zero_grad(set_to_none=True)
                logits = tm(ids).logits[0, :-1]
                nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
                ((nll * lm).sum() / lm.sum()).backward()
                for n, p in lin.items():
                    acc[n] += (p.grad**2).sum(0)
            return acc

    t0 = time.perf_counter()
    go() if method != "torch" else go(1)  # warm-up: compilation (torch: allocator, one sample)
    warm = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        go()
        times.append(time.perf_counter() - t0)
    gflop = batch_flops() * batches / 1e9 if batch_flops else None
    return {"method": method, "seconds": min(times), "first_call_s": warm, "gflop": gflop,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vmap-batch", type=int, default=4, help="samples per vmap(grad) call (memory)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:
        print("RESULT " + json.dumps(run_method(args.method, args)), flush=True)
        return
    import hcnr_jax

    model_dir = Path(tempfile.mkdtemp()) / "smollm2-f32"
    hcnr_jax.save_pretrained(hcnr_jax.load_pretrained(gguf_path(), dtype="float32"), model_dir)
    rows = []
    t_start = time.perf_counter()
    for m in args.methods.split(","):
        cmd = [sys.executable, __file__, "--method", m, "--model-dir", str(model_dir), "--samples", str(args.samples),
               "--tokens", str(args.tokens), "--batch", str(args.batch), "--vmap-batch", str(args.vmap_batch),
               "--repeats", str(args.repeats), "--backend", args.backend]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(f"{m}: failed\n{out.stderr[-2000:]}", flush=True)
            continue
        rows.append(json.loads(line[0][7:]))
        print(f"done {m}: {rows[-1]}", flush=True)
    import jax

    setup = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised, float32)", "samples": args.samples,
             "tokens": args.tokens, "batch": args.batch, "vmap_batch": args.vmap_batch, "repeats": args.repeats,
             "backend": args.backend, "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
             "load_average_at_end": os.getloadavg(), "total_wall_s": time.perf_counter() - t_start}
    if args.out:
        from hcnr_jax.io import atomic_write_text

        atomic_write_text(args.out, json.dumps({"setup": setup, "results": rows}, indent=2) + "\n")
    print(f"\nSmolLM2-135M-Instruct (float32), {args.samples} samples x {args.tokens} tokens, batch {args.batch}, "
          f"device {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores")
    from tables import bench_stats_table  # experiments/tables.py: the same table docs/scale.md shows

    print(bench_stats_table({"setup": setup, "results": rows}), end="")


if __name__ == "__main__":
    main()
