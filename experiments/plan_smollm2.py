"""`hcnr plan`'s compiled memory against the measured peak, on SmolLM2-135M-Instruct (CPU).

The plan is taken from the embedded GGUF's config alone (``hcnr_jax.plan``, float32 storage as the
GGUF is dequantised, the bundled 128 honesty samples' batch shape). Each step (Fisher update,
Hessian update of the worst-case kept layers, largest layer's exact solve) is then run for real
on the SmolLM2 weights and data, each in a fresh subprocess:

- glibc is told to serve every allocation of 64 KiB or more with its own mmap and to unmap it on
  free (``MALLOC_MMAP_THRESHOLD_=65536``, which also stops the threshold from adapting), so the
  resident set follows the live XLA buffers instead of malloc's free lists;
- the step is compiled ahead of time; with its arguments (weights, accumulators, batch) resident,
  the kernel's high-water mark is reset (``/proc/self/clear_refs``) and the step runs: measured
  peak = VmHWM - VmRSS just before the run. This is the first run: after it XLA's CPU runtime
  keeps the step's buffers mapped for the next execution (the resident set stays up by about
  the temp size), so a second run shows almost no growth; it is recorded too.

That measures the step's own memory above its arguments, which XLA's analysis predicts as
``temp + output - alias``; the arguments are compared separately (with the sizes of the arrays
passed). Writes OUT.json and prints a markdown table. Usage (about 2 minutes on 2 busy cores):

    python experiments/plan_smollm2.py --out experiments/results/plan_smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

STEPS = ("fisher", "hessian", "solve")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def load():
    """(model, honesty samples, plan request) exactly as the parent and every child see them."""
    import hcnr_jax
    from hcnr_jax import plan as planlib
    from hcnr_jax.data.samples import load_samples
    from hcnr_jax.embedded import calibration_file, smollm2_gguf
    from hcnr_jax.repair.config import RepairConfig
    from hcnr_jax.stats.fisher_accum import target_capacity

    model = hcnr_jax.load_pretrained(smollm2_gguf())
    rcfg = RepairConfig()
    hon = load_samples(calibration_file("honesty"), model.tokenizer, max_length=rcfg.max_length,
                       vocab_size=model.config.vocab_size)
    req = planlib.PlanRequest(hf_config=planlib.load_hf_config(smollm2_gguf()), batch_size=rcfg.batch_size,
                              seq_len=int(hon.input_ids.shape[1]), max_targets=target_capacity(hon.loss_mask),
                              dtype="float32", repair=rcfg.to_dict(), num_honesty=len(hon), num_task=128)
    return model, hon, req, rcfg


def measure(step_name: str) -> dict:
    """Run one step for real in this process and measure its peak above its resident arguments."""
    import jax
    import jax.numpy as jnp

    from hcnr_jax import plan as planlib
    from hcnr_jax import sharding, stats
    from hcnr_jax.stats import engine, fisher_accum, hessian_accum

    model, hon, req, rcfg = load()
    cfg, params = model.config, model.params
    rss0 = _status("VmRSS")
    if step_name == "solve":
        prog, args = _solve_inputs(cfg, rcfg)
        compiled = prog.lower(*args).compile()
    else:
        mesh = sharding.make_mesh("data=1")
        if step_name == "fisher":
            init = partial(fisher_accum.init, cfg=cfg, neuron_axis=rcfg.neuron_axis)
            update = stats.fisher_update
            opts = {"neuron_axis": rcfg.neuron_axis, "backend": "auto", "max_targets": req.max_targets}
        else:
            init = partial(hessian_accum.init, cfg=cfg, owners=tuple(planlib.kept_owners(cfg, rcfg)))
            update, opts = stats.hessian_update, {"backend": "auto"}
        state0 = jax.eval_shape(init, params)
        step, state_sh, param_sh, batch_sh = engine.step_and_shardings(update, cfg, opts, mesh, False, state0, params)
        dev_params = sharding.put_tree(params, param_sh)
        state = jax.tree.map(lambda s, sh: sharding.put(np.zeros(s.shape, s.dtype), sh), state0, state_sh)
        b = req.batch_size
        batch = {"input_ids": hon.input_ids[:b].astype(np.int32), "attention_mask": hon.attention_mask[:b].astype(bool),
                 "loss_mask": hon.loss_mask[:b].astype(bool)}
        batch = {k: sharding.put(v, batch_sh) for k, v in batch.items()}
        compiled = step.lower(state, dev_params, batch).compile()
        args = [state, dev_params, batch]
    analysis = planlib._memory(compiled)
    runs = []
    for _ in range(2):  # warm-up, then measured
        jax.block_until_ready(args)
        before = _status("VmRSS")
        _reset_hwm()
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        runs.append({"seconds": round(time.perf_counter() - t0, 2), "peak_above_args": _status("VmHWM") - before,
                     "rss_before": before, "rss_after": _status("VmRSS")})
        if step_name != "solve":
            args[0] = out  # the state was donated
        del out
    return {"step": step_name, "analysis": analysis, "runs": runs, "rss_at_start": rss0,
            "argument_array_bytes": int(sum(x.nbytes for x in jax.tree.leaves(args))), "jnp": str(jnp.zeros(()).dtype)}


def _solve_inputs(cfg, rcfg):
    import jax.numpy as jnp

    from hcnr_jax.params import linear_names, param_specs
    from hcnr_jax.plan import solve_program
    from hcnr_jax.repair.selection import top_count

    specs = param_specs(cfg)
    out_dim, in_dim = max((specs[n] for n in linear_names(cfg)), key=lambda s: (s[1], s[0]))
    n_hc = top_count(rcfg.r_iw, in_dim)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2 * in_dim, in_dim)).astype(np.float32)
    w = rng.normal(size=(out_dim, in_dim)).astype(np.float32)
    perm = rng.permutation(in_dim).astype(np.int32)
    args = [jnp.asarray(w), jnp.asarray(w + 0.01 * rng.normal(size=w.shape).astype(np.float32)),
            jnp.asarray(x.T @ x), jnp.asarray(np.sort(perm[:n_hc])), jnp.asarray(np.sort(perm[n_hc:])),
            jnp.float32(0.01)]
    return solve_program(rcfg.solver, out_dim, in_dim, n_hc), args


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="experiments/results/plan_smollm2", help="writes OUT.json and OUT.md")
    ap.add_argument("--measure", choices=STEPS, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.measure:
        print("RESULT" + json.dumps(measure(args.measure)))
        return 0

    from hcnr_jax import plan as planlib

    _, hon, req, _ = load()
    t0 = time.perf_counter()
    result = planlib.compute_plan(req)
    plan_s = time.perf_counter() - t0
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "JAX_PLATFORMS": "cpu"}
    measured = {}
    for name in STEPS:
        res = subprocess.run([sys.executable, __file__, "--measure", name], env=env, capture_output=True, text=True)
        if res.returncode:
            print(res.stderr[-3000:], file=sys.stderr)
            return 1
        measured[name] = json.loads(next(x for x in res.stdout.splitlines() if x.startswith("RESULT"))[6:])
    rows = []
    for name in STEPS:
        p, m = result["steps"][name], measured[name]
        predicted = p["temp_bytes"] + p["output_bytes"] - p["alias_bytes"]
        got = m["runs"][0]["peak_above_args"]
        rows.append({"step": name, "what": p["what"], "argument_bytes": p["argument_bytes"],
                     "argument_array_bytes": m["argument_array_bytes"],
                     "predicted_above_args": predicted, "measured_above_args": got,
                     "measured_second_run": m["runs"][1]["peak_above_args"], "ratio": got / predicted,
                     "rss_kept_after_first_run": m["runs"][0]["rss_after"] - m["runs"][0]["rss_before"],
                     "same_program": m["analysis"] == {k: p[k] for k in m["analysis"]},
                     "step_seconds": m["runs"][0]["seconds"]})
    doc = {"model": "SmolLM2-135M-Instruct (embedded GGUF, float32)", "plan_compile_s": round(plan_s, 1),
           "batch": result["batch"], "samples_T": int(hon.input_ids.shape[1]), "rows": rows,
           "method": "fresh subprocess per step, MALLOC_MMAP_THRESHOLD_=65536, AOT-compiled step; measured = "
                     "VmHWM - VmRSS just before its first run (arguments resident)",
           "load_avg": os.getloadavg()}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    mib = 2**20
    lines = ["| step | plan: temp + output - alias (MiB) | measured peak above arguments (MiB) | measured / plan | "
             "RSS kept after the run (MiB) | plan: arguments (MiB) | the arguments' arrays (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['predicted_above_args'] / mib:.1f} | {r['measured_above_args'] / mib:.1f} | "
                     f"{r['ratio']:.2f} | {r['rss_kept_after_first_run'] / mib:.1f} | {r['argument_bytes'] / mib:.1f} | "
                     f"{r['argument_array_bytes'] / mib:.1f} |")
    print("\n".join(lines))
    print(json.dumps(doc["rows"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
