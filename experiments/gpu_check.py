"""One-shot accelerator check (< 10 minutes on one H100/H200): does hcnr-jax compute the right numbers
there, how fast, and in how much memory? Writes JSON and exits 1 on any mismatch or error.

Rows (each: check, ok true/false/null = informational, value, limit, seconds, detail):

1. ``kernel:*``: the Pallas kernels (compiled; interpret mode off GPU) against float64 NumPy,
   beside their jax.numpy references, with timings. Passing rows on a platform are what
   ``kernels/backend.py`` ``VERIFIED`` may then list for ``backend="auto"``.
2. ``stats:*``: Fisher (both neuron axes) and Hessian of a small random Llama on the default
   device against a float64 reference on the CPU (PyTorch per-sample loop when torch is
   installed, else JAX CPU float32 at HIGHEST); ``tf32_control`` shows what the default matmul
   precision of this device gives on the same kind of product (TF32 on NVIDIA: ~1e-3).
3. ``repair``: the full HCNR repair of Llama-3.1-8B-sized random weights (bfloat16 storage,
   float32 statistics; ``--tiny``: a tiny config), stage times from its report, device peak
   memory against ``hcnr_jax.plan``'s compiled prediction, and steady-state Fisher / Hessian
   step times with their model FLOP utilisation (XLA's compiled FLOPs per step / time / peak).
4. ``generate`` (run before the repair): greedy tokens/s of ``generate_ids`` (batch 16, 64 new tokens); against
   transformers ``generate`` when torch with CUDA is present, else that row is skipped.
5. ``kernels_at_scale:*`` (last): the Fisher / Hessian step on the 8B config with the Pallas kernels
   against the XLA path: agreement and speed ratio.

Rows ``stats:*:pallas`` repeat the statistics with ``backend="pallas"``. When every kernel row and
every Pallas statistics row passed compiled (not interpreted), the script prints the ``VERIFIED``
line this supports; ``experiments/gpu_check.sh`` is the prepared command for a lent device.

Usage: ``python experiments/gpu_check.py --out experiments/results/gpu_check_h200.json``;
``--tiny`` runs every row on a tiny config (on CPU in under a minute; it is a test in the suite).
JAX's preallocation is turned off (``XLA_PYTHON_CLIENT_PREALLOCATE=false``) so that PyTorch can
share the device for the transformers row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

LLAMA_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False,
                rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192, rope_type="llama3"))
TINY = dict(model_type="llama", vocab_size=97, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-5, max_position_embeddings=512,
            rope_theta=10000.0, tie_word_embeddings=False)
SMALL = dict(TINY, vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=3, num_attention_heads=8,
             head_dim=32)


class Rows:
    """Result rows; with ``out``, the JSON is rewritten after every row, so a run killed at the
    device's time limit still leaves what it measured."""

    def __init__(self, out: Path | None = None, meta: dict[str, Any] | None = None) -> None:
        self.rows: list[dict[str, Any]] = []
        self.out, self.meta, self.t0 = out, meta or {}, time.perf_counter()

    def document(self, done: bool) -> dict[str, Any]:
        failed = [r["check"] for r in self.rows if r["ok"] is False]
        return {"ok": not failed and done, "complete": done, "failed": failed, **self.meta,
                "seconds": round(time.perf_counter() - self.t0, 1), "rows": self.rows}

    def flush(self, done: bool = False) -> dict[str, Any]:
        doc = self.document(done)
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out.with_name(f".{self.out.name}.tmp")
            tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
            tmp.replace(self.out)
        return doc

    @contextmanager
    def check(self, name: str):
        """Run a block that fills a row; an exception makes the row a failure with its message."""
        row: dict[str, Any] = {"check": name, "ok": None}
        t0 = time.perf_counter()
        try:
            yield row
        except Exception as e:  # a failed check is a result, not a crash
            # Paths relative to the repository: the JSON is committed and must not name this machine.
            tb = traceback.format_exc().replace(str(ROOT) + os.sep, "")
            row.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=tb[-2000:])
        row["seconds"] = round(time.perf_counter() - t0, 2)
        self.rows.append(row)
        self.flush()
        status = {True: "ok", False: "FAIL", None: "info"}[row["ok"]]
        shown = {k: v for k, v in row.items() if k not in ("check", "ok", "traceback")}
        print(f"[{status:4}] {name}: {json.dumps(shown, default=str)[:400]}", flush=True)


def rel_err(got: Any, want: Any) -> float:
    want = np.asarray(want, np.float64)
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / max(np.linalg.norm(want), 1e-300))


def timed(fn, *args, repeats: int = 3) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) / repeats


# --- 1. kernels -------------------------------------------------------------------------------

def check_kernels(rows: Rows, tiny: bool) -> None:
    import jax
    import jax.numpy as jnp

    from hcnr_jax.kernels.fisher_norms import neuron_sq_norms_pallas, neuron_sq_norms_reference
    from hcnr_jax.kernels.gram import gram_pallas, gram_reference

    interpret = jax.default_backend() != "gpu"
    rng = np.random.default_rng(0)
    shapes = [(2, 13, 40, 24)] if tiny else [(2, 13, 40, 24), (8, 256, 1024, 512)]
    for b, t, o, i in shapes:
        g = rng.normal(size=(b, t, o)).astype(np.float32)
        x = rng.normal(size=(b, t, i)).astype(np.float32)
        grad = np.einsum("bto,bti->boi", g.astype(np.float64), x.astype(np.float64))
        for axis in ("input", "output"):
            with rows.check(f"kernel:fisher_norms:{axis}:{b}x{t}x{o}x{i}") as row:
                want = (grad**2).sum(1 if axis == "input" else 2)
                ref = jax.jit(lambda g, x, axis=axis: neuron_sq_norms_reference(g, x, axis))
                pal = jax.jit(lambda g, x, axis=axis: neuron_sq_norms_pallas(g, x, axis=axis, interpret=interpret))
                gd, xd = jnp.asarray(g), jnp.asarray(x)
                e_ref, e_pal = rel_err(ref(gd, xd), want), rel_err(pal(gd, xd), want)
                row.update(value=e_pal, reference_err=e_ref, limit=2e-5, ok=max(e_pal, e_ref) <= 2e-5,
                           pallas_ms=round(1e3 * timed(pal, gd, xd), 3), reference_ms=round(1e3 * timed(ref, gd, xd), 3),
                           interpret=interpret)
    for n, i in ([(50, 37)] if tiny else [(50, 37), (4096, 1024)]):
        with rows.check(f"kernel:gram:{n}x{i}") as row:
            x = rng.normal(size=(n, i)).astype(np.float32)
            mask = rng.random(n) < 0.7
            h0 = rng.normal(size=(i, i)).astype(np.float32)
            xm = x.astype(np.float64) * mask[:, None]
            want = h0 + xm.T @ xm
            ref = jax.jit(gram_reference)
            pal = jax.jit(lambda h, x, m: gram_pallas(h, x, m, interpret=interpret))
            args = (jnp.asarray(h0), jnp.asarray(x), jnp.asarray(mask))
            e_ref, e_pal = rel_err(ref(*args), want), rel_err(pal(jnp.asarray(h0), *args[1:]), want)
            t_pal = timed(lambda h, x, m, pal=pal: pal(jnp.asarray(h), x, m), h0, *args[1:])
            row.update(value=e_pal, reference_err=e_ref, limit=2e-5, ok=max(e_pal, e_ref) <= 2e-5,
                       pallas_ms=round(1e3 * t_pal, 3), reference_ms=round(1e3 * timed(ref, *args), 3),
                       interpret=interpret)


# --- 2. statistics vs float64 -----------------------------------------------------------------

def random_params(hf: dict, dtype: str, seed: int, scale: float = 0.02, base: Any = None) -> Any:
    """Random parameters made on the default device (no host copy): linears and embeddings
    N(0, scale), norms 1 (+ small noise); with ``base``, base + N(0, scale) on the block linears."""
    import jax
    import jax.numpy as jnp

    from hcnr_jax.config import config_from_hf
    from hcnr_jax.params import flatten, param_specs, unflatten

    cfg = config_from_hf(hf)
    dt = jnp.dtype(dtype)
    key = jax.random.key(seed)
    prev = flatten(base) if base is not None else {}
    flat = {}
    for j, (name, shape) in enumerate(param_specs(cfg).items()):
        k = jax.random.fold_in(key, j)
        if name in prev:
            moved = "layers" in name and name.endswith("proj.weight")
            flat[name] = (prev[name] + scale * jax.random.normal(k, shape, dt)).astype(dt) if moved else prev[name]
        elif "norm" in name:
            flat[name] = (1.0 + 0.1 * jax.random.normal(k, shape, jnp.float32)).astype(dt)
        else:
            flat[name] = (scale * jax.random.normal(k, shape, jnp.float32)).astype(dt)
    return cfg, unflatten(flat, cfg.num_layers)


def random_samples(n: int, t: int, vocab: int, seed: int) -> Any:
    from hcnr_jax.data.samples import samples_from_records

    rng = np.random.default_rng(seed)
    recs = []
    for _ in range(n):
        length = int(rng.integers(t // 2, t + 1))
        recs.append({"input_ids": rng.integers(3, vocab, length).tolist(),
                     "loss_mask": [0] * (length // 2) + [1] * (length - length // 2)})
    return samples_from_records(recs, tokenizer=None, max_length=t)


def torch_reference(hf: dict, flat: dict, samples: Any) -> tuple[dict, dict, dict] | None:
    """float64 PyTorch per-sample loop (the tests' reference): Fisher sums per input and output
    neuron, and X^T X per layer; None without torch."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    cfg = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    m = transformers.LlamaForCausalLM(cfg).double().eval()
    m.load_state_dict({k: torch.tensor(np.asarray(v, np.float64)) for k, v in flat.items()}, strict=True)
    lin = {n: p for n, p in m.named_parameters() if n.endswith("proj.weight")}
    inputs: dict[str, list] = {}
    hooks = [mod.register_forward_hook(lambda mod, a, o, name=name: inputs.setdefault(name, []).append(a[0][0]))
             for name, mod in m.named_modules() if name + ".weight" in lin]
    fin = {n: 0 for n in lin}
    fout = {n: 0 for n in lin}
    for i in range(len(samples)):
        real = np.flatnonzero(samples.attention_mask[i])
        a, b = int(real[0]), int(real[-1]) + 1
        ids = torch.tensor(samples.input_ids[i, a:b], dtype=torch.long)
        lm = torch.tensor(samples.loss_mask[i, a + 1:b], dtype=torch.float64)
        logits = m(ids[None]).logits[0]
        nll = -torch.log_softmax(logits[:-1], -1)[torch.arange(b - a - 1), ids[1:]]
        grads = torch.autograd.grad((nll * lm).sum() / lm.sum(), list(lin.values()))
        for n, g in zip(lin, grads, strict=True):
            fin[n] = fin[n] + (g**2).sum(0)
            fout[n] = fout[n] + (g**2).sum(1)
    for h in hooks:
        h.remove()
    n = len(samples)
    hess = {k + ".weight": sum(x.T @ x for x in xs).detach().numpy() for k, xs in inputs.items()}
    return ({k: (v / n).detach().numpy() for k, v in fin.items()}, {k: (v / n).detach().numpy() for k, v in fout.items()},
            hess)


def check_statistics(rows: Rows, tiny: bool) -> None:
    import jax
    import jax.numpy as jnp

    from hcnr_jax import sharding, stats
    from hcnr_jax.params import flatten
    from hcnr_jax.stats import StatsOptions

    hf = TINY if tiny else SMALL
    cfg, params = random_params(hf, "float32", seed=1, scale=0.1)
    samples = random_samples(6 if tiny else 16, 16 if tiny else 64, hf["vocab_size"], seed=2)
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    got = {"fisher_input": stats.fisher(params, cfg, samples, StatsOptions(batch_size=4)),
           "fisher_output": stats.fisher(params, cfg, samples, StatsOptions(batch_size=4),
                                         neuron_axis="output"),
           "hessian": stats.hessian(params, cfg, samples, StatsOptions(batch_size=4))}
    ref = torch_reference(hf, flat, samples)
    kind = "torch float64 per-sample loop (CPU)"
    if ref is None:
        kind = "JAX CPU float32, precision=HIGHEST (torch not installed)"
        cpu = jax.devices("cpu")[:1]
        host = jax.device_put(params, cpu[0])
        mesh = sharding.make_mesh("data=1", cpu)
        ref = (stats.fisher(host, cfg, samples, StatsOptions(batch_size=4, mesh=mesh)),
               stats.fisher(host, cfg, samples, StatsOptions(batch_size=4, mesh=mesh), neuron_axis="output"),
               stats.hessian(host, cfg, samples, StatsOptions(batch_size=4, mesh=mesh)))
    for (name, result), want in zip(got.items(), ref, strict=True):
        with rows.check(f"stats:{name}") as row:
            errs = {n: rel_err(result[n], want[n]) for n in want}
            worst = max(errs, key=errs.get)
            row.update(value=errs[worst], worst=worst, limit=2e-5, ok=errs[worst] <= 2e-5, reference=kind,
                       device=str(jax.devices()[0].device_kind))
    # The same statistics with the Pallas kernels forced (compiled on a GPU, interpreted elsewhere): the
    # kernels inside the estimators they serve, which is what VERIFIED opens for backend="auto".
    interpret = jax.default_backend() != "gpu"
    pallas = {"fisher_input": lambda: stats.fisher(params, cfg, samples, StatsOptions(batch_size=4,
                                                                                      backend="pallas")),
              "fisher_output": lambda: stats.fisher(params, cfg, samples, StatsOptions(
                  batch_size=4, backend="pallas"), neuron_axis="output"),
              "hessian": lambda: stats.hessian(params, cfg, samples, StatsOptions(batch_size=4,
                                                                                  backend="pallas"))}
    for (name, run), want in zip(pallas.items(), ref, strict=True):
        with rows.check(f"stats:{name}:pallas") as row:
            result = run()
            errs = {n: rel_err(result[n], want[n]) for n in want}
            worst = max(errs, key=errs.get)
            row.update(value=errs[worst], worst=worst, limit=2e-5, ok=errs[worst] <= 2e-5, reference=kind,
                       interpret=interpret)
    with rows.check("stats:tf32_control") as row:
        rng = np.random.default_rng(3)
        a = rng.normal(size=(512, 1024)).astype(np.float32)
        b = rng.normal(size=(1024, 512)).astype(np.float32)
        want = a.astype(np.float64) @ b.astype(np.float64)
        default = rel_err(jnp.matmul(jnp.asarray(a), jnp.asarray(b)), want)
        highest = rel_err(jnp.matmul(jnp.asarray(a), jnp.asarray(b), precision=jax.lax.Precision.HIGHEST), want)
        row.update(value=default, highest=highest, ok=highest <= 1e-5,
                   detail="relative error of a float32 matmul at the default precision vs HIGHEST")


# --- 3. the repair ------------------------------------------------------------------------------

PEAK_TFLOPS = {"H100": ("H100-SXM", 989.4), "H200": ("H200-SXM", 989.4), "A100": ("A100-SXM-80GB", 312.0)}


def device_peak() -> tuple[str | None, float | None]:
    import jax

    kind = jax.devices()[0].device_kind
    for key, (name, tflops) in PEAK_TFLOPS.items():
        if key in kind:
            return name, tflops
    return None, None


def device_peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def check_repair(rows: Rows, tiny: bool, args: argparse.Namespace) -> None:
    import jax

    from hcnr_jax import plan as planlib
    from hcnr_jax import stats
    from hcnr_jax.pretrained import Pretrained
    from hcnr_jax.repair import RepairConfig
    from hcnr_jax.repair.pipeline import repair
    from hcnr_jax.stats import StatsOptions
    from hcnr_jax.stats.fisher_accum import target_capacity

    hf = TINY if tiny else LLAMA_8B
    n, t, batch = (16, 32, 4) if tiny else (args.samples, args.seq_len, args.batch_size)
    with rows.check("repair:weights") as row:
        t0 = time.perf_counter()
        cfg, base = random_params(hf, "bfloat16", seed=10)
        _, sft = random_params(hf, "bfloat16", seed=11, scale=0.002, base=base)
        jax.block_until_ready((base, sft))
        row.update(value=round(time.perf_counter() - t0, 1), detail=f"random {planlib._num_params(cfg):,} params x 2, "
                   "bfloat16, on the device")
    hon = random_samples(n, t, hf["vocab_size"], seed=12)
    task = random_samples(n, t, hf["vocab_size"], seed=13)
    meta = {"eos_token_id": [hf["vocab_size"] - 1]}
    base_m = Pretrained(cfg, base, None, dict(hf), "random-base", generation_config=meta)
    sft_m = Pretrained(cfg, sft, None, dict(hf), "random-sft", generation_config=meta)
    rcfg = RepairConfig(batch_size=batch, max_length=t)
    with rows.check("repair:fisher_peak") as row:
        # Before the repair, so that the device's high-water mark is this step's (and the earlier
        # sections' smaller ones): both models resident, one Fisher batch, against the plan of
        # that very step compiled here (the GPU's own compiler when run on one).
        from hcnr_jax.sharding import make_mesh

        one = hon.select(slice(0, batch))
        cap = target_capacity(one.loss_mask)
        before = device_peak_bytes()
        stats.fisher(sft, cfg, one, StatsOptions(batch_size=batch))
        measured = device_peak_bytes()
        step = planlib.fisher_step(cfg, rcfg, make_mesh(None), False, "bfloat16", batch, t, cap)
        model_bytes = sum(int(a.nbytes) for a in jax.tree.leaves(base))
        predicted = step["peak_bytes"] + model_bytes
        row.update(predicted_mib=round(predicted / 2**20, 1), plan_fisher_step_mib=round(step["peak_bytes"] / 2**20, 1),
                   resident_model_mib=round(model_bytes / 2**20, 1),
                   measured_peak_mib=None if measured is None else round(measured / 2**20, 1),
                   peak_before_mib=None if before is None else round(before / 2**20, 1),
                   isolated=None if measured is None or before is None else measured > before,
                   ratio=None if measured is None else measured / predicted,
                   detail=f"one Fisher batch [{batch}, {t}] ({cap} target slots) with both models on the device: "
                          "the device's peak_bytes_in_use against the step's compiled peak + the other model "
                          "(isolated: the step raised the high-water mark; none on CPU)")
    with rows.check("repair") as row:
        res = repair(base_m, sft_m, hon, task, rcfg, progress=False)
        s = res.report["summary"]
        kept = [r for r in res.report["layers"] if r["kept"]]
        finite = all(np.isfinite(r[k]) for r in kept for k in ("objective_sft", "objective_before", "objective_after"))
        better = all(r["objective_after"] <= r["objective_before"] * (1 + 1e-3) + 1e-6 for r in kept)
        row.update(ok=finite and better and s["layers_kept"] > 0, value=s["restored_fraction_of_linear"],
                   stage_seconds=res.report["timing_s"], layers_kept=s["layers_kept"],
                   objective=[s["objective_sft"], s["objective_before"], s["objective_after"]],
                   peak_device_mib=res.report["memory"]["peak_device_mib"],
                   peak_rss_mib=res.report["memory"]["peak_rss_mib"])
        del res
    with rows.check("repair:plan_vs_measured") as row:
        req = planlib.PlanRequest(hf_config=hf, batch_size=batch, seq_len=int(max(hon.input_ids.shape[1],
                                  task.input_ids.shape[1])), max_targets=max(target_capacity(hon.loss_mask),
                                  target_capacity(task.loss_mask)), dtype="bfloat16", repair=rcfg.to_dict(),
                                  num_honesty=n, num_task=n, layers="full" if tiny else "extrapolate",
                                  # the repair above was given loaded models: both stay on the device
                                  offload_idle=False)
        plan = planlib.compute_plan(req)
        predicted = max(planlib.step_need(plan, k) for k in planlib.STEPS)
        measured = device_peak_bytes()
        row.update(predicted_mib=round(predicted / 2**20, 1), plan_steps={k: round(v["peak_bytes"] / 2**20, 1)
                   for k, v in plan["steps"].items()}, measured_peak_mib=None if measured is None else
                   round(measured / 2**20, 1), ratio=None if measured is None else measured / predicted,
                   detail="plan: largest step peak + what is resident beside it (compiled here); measured: the device's "
                          "peak_bytes_in_use over the whole run (none on CPU)")
    name, peak = device_peak()
    sub = hon.select(slice(0, 4 * batch))
    kept = planlib.kept_owners(cfg, rcfg)
    for kind in ("fisher", "hessian"):
        with rows.check(f"repair:mfu:{kind}") as row:
            def run(kind=kind, params=sft):
                if kind == "fisher":
                    return stats.fisher(params, cfg, sub, StatsOptions(batch_size=batch))
                return stats.hessian(params, cfg, sub, StatsOptions(batch_size=batch), layers=kept)

            run()  # warm (compiles for this subset's shapes)
            t0 = time.perf_counter()
            run()
            step_s = (time.perf_counter() - t0) / 4
            flops = plan["steps"][kind]["flops"]
            row.update(step_s=round(step_s, 4), tflops_per_s=round(flops / step_s / 1e12, 3),
                       value=None if peak is None else round(flops / step_s / 1e12 / peak, 4),
                       accelerator=name, detail="XLA's compiled FLOPs of one step as planned (the Hessian: the "
                       "worst-case kept layers) / steady-state time of a step (4 batches) / bf16 dense peak")


# --- 4. generation ------------------------------------------------------------------------------

def check_generation(rows: Rows, tiny: bool) -> None:
    import jax

    from hcnr_jax.generation import generate_ids
    from hcnr_jax.params import flatten
    from hcnr_jax.pretrained import Pretrained, logits

    hf = TINY if tiny else LLAMA_8B
    cfg, params = random_params(hf, "float32" if tiny else "bfloat16", seed=20)
    model = Pretrained(cfg, params, None, dict(hf), "random", generation_config={"eos_token_id": [hf["vocab_size"] - 1]})
    rng = np.random.default_rng(21)
    b, new = (4, 8) if tiny else (16, 64)
    prompts = [rng.integers(3, hf["vocab_size"] - 1, int(rng.integers(32, 65))).tolist() for _ in range(b)]
    with rows.check("generate:jax") as row:
        generate_ids(model, prompts, new, batch_size=b)  # compile
        t0 = time.perf_counter()
        out = generate_ids(model, prompts, new, batch_size=b)
        sec = time.perf_counter() - t0
        tokens = sum(len(o) for o in out)
        row.update(value=round(tokens / sec, 1), tokens=tokens, seconds_run=round(sec, 3), batch=b, new_tokens=new)
        # The first generated token's logits, left-padded like transformers' batch below: with random bf16
        # weights the top two logits are often near-tied, so token equality alone says little.
        width = max(len(p) for p in prompts)
        ids = np.array([[0] * (width - len(p)) + p for p in prompts], np.int32)
        mask = np.arange(width)[None] >= np.array([width - len(p) for p in prompts])[:, None]
        pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
        first = np.asarray(logits(model, ids, mask, pos)[:, -1], np.float32)
    with rows.check("generate:transformers") as row:
        try:
            import torch
            import transformers
        except ImportError:
            torch = None
        if torch is None or not torch.cuda.is_available() or jax.default_backend() != "gpu":
            row.update(skipped="torch with CUDA not available")
            return
        tcfg = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k != "model_type"})
        with torch.device("cuda"):
            tm = transformers.LlamaForCausalLM(tcfg).to(torch.bfloat16).eval()
        tm.load_state_dict({k: torch.from_dlpack(v) for k, v in flatten(params).items()}, strict=True)
        del model, params
        ids, mask, pos = (torch.tensor(a.astype(np.int64), device="cuda") for a in (ids, mask, pos))
        kw = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            want = tm(ids, attention_mask=mask, position_ids=pos).logits[:, -1].float().cpu().numpy()
            tm.generate(ids, **kw)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            got = tm.generate(ids, **kw)
            torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        jax_row = next(r for r in rows.rows if r["check"] == "generate:jax")
        same = np.mean([o == g[width:].tolist()[: len(o)] for o, g in zip(out, got.cpu(), strict=True)])
        row.update(value=round(b * new / sec, 1), speedup_jax=round(jax_row["value"] / (b * new / sec), 2),
                   identical_rows=float(same), torch=torch.__version__, transformers=transformers.__version__,
                   first_logits_rel_err=float(np.max(np.linalg.norm(first - want, axis=-1) / np.linalg.norm(want, axis=-1))),
                   first_top1_agree=float(np.mean(first.argmax(-1) == want.argmax(-1))),
                   first_top2_margin_median=float(np.median(np.diff(np.sort(want, -1)[:, -2:], axis=-1))))
        del tm, got
        torch.cuda.empty_cache()


# --- 5. the kernels at scale --------------------------------------------------------------------

def check_kernels_at_scale(rows: Rows, tiny: bool, args: argparse.Namespace) -> None:
    """Steady-state Fisher / Hessian step of the 8B config (bf16 weights) with the Pallas kernels against
    the XLA path: is the kernel worth turning on where it is correct? Informational; last, since the
    device's minutes are few (each kernel shape compiles once)."""
    import jax

    from hcnr_jax import plan as planlib
    from hcnr_jax import stats
    from hcnr_jax.repair import RepairConfig
    from hcnr_jax.stats import StatsOptions

    hf = TINY if tiny else LLAMA_8B
    t, batch = (32, 4) if tiny else (args.seq_len, args.batch_size)
    cfg, params = random_params(hf, "bfloat16", seed=30)
    sub = random_samples(2 * batch, t, hf["vocab_size"], seed=31)
    kept = planlib.kept_owners(cfg, RepairConfig(batch_size=batch, max_length=t))
    for kind in ("fisher", "hessian"):
        with rows.check(f"kernels_at_scale:{kind}") as row:
            times, results = {}, {}
            for backend in ("reference", "pallas"):
                def run(backend=backend, kind=kind):
                    if kind == "fisher":
                        return stats.fisher(params, cfg, sub, StatsOptions(batch_size=batch, backend=backend))
                    return stats.hessian(params, cfg, sub, StatsOptions(batch_size=batch, backend=backend),
                                         layers=kept)

                results[backend] = run()  # compiles
                t0 = time.perf_counter()
                run()
                times[backend] = round((time.perf_counter() - t0) / 2, 4)  # per batch
            errs = {n: rel_err(results["pallas"][n], results["reference"][n]) for n in results["reference"]}
            worst = max(errs, key=errs.get)
            # The limit is bf16's, not float32's: the two backends compile to different programs whose bf16
            # activations round differently (measured on CPU: 1.6e-3 here against 8e-8 with float32 weights, and
            # each kernel matches float64 on the same inputs to 1e-7). Exactness is the stats:*:pallas rows' job;
            # this one catches a kernel broken at 8B shapes (errors of order 1).
            row.update(value=round(times["reference"] / times["pallas"], 3), step_s=times,
                       pallas_vs_xla_err=errs[worst], worst=worst, limit=1e-2, ok=errs[worst] <= 1e-2,
                       interpret=jax.default_backend() != "gpu",
                       detail="value: XLA step time / Pallas step time (>1: the kernel is faster); error: Pallas "
                              "statistics against the XLA path's, both float32 statistics on bf16 weights")
            del results


def verified_hint(doc: dict[str, Any]) -> str | None:
    """The VERIFIED line this run supports (every kernel row and every Pallas statistics row passed,
    compiled), or None."""
    rows = [r for r in doc["rows"] if r["check"].startswith("kernel:") or r["check"].endswith(":pallas")]
    if doc.get("tiny") or not rows or any(r["ok"] is not True or r.get("interpret") for r in rows):
        return None
    return (f"kernels/backend.py VERIFIED may now list {doc['backend']!r} for 'fisher_norms' and 'gram' "
            f"({len(rows)} kernel rows passed, compiled, on {doc['device']})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny configs everywhere (a CPU test of the script)")
    ap.add_argument("--out", default="experiments/results/gpu_check.json", help="JSON results")
    ap.add_argument("--samples", type=int, default=128, help="honesty and task samples of the 8B repair [128]")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sample of the 8B repair [256]")
    ap.add_argument("--batch-size", type=int, default=4, help="statistics batch size of the 8B repair [4]")
    ap.add_argument("--deadline", type=float, default=0.0,
                    help="seconds after which sections not yet started are skipped (0: none)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: kernels,stats,generate,repair,"
                    "kernels_at_scale")
    args = ap.parse_args(argv)
    import jax

    import hcnr_jax

    skip = set(filter(None, args.skip.split(",")))
    rows = Rows(Path(args.out), {"tiny": args.tiny, "backend": jax.default_backend(),
                                 "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
                                 "jax": jax.__version__, "hcnr_jax": hcnr_jax.__version__})
    # Generation before the repair: PyTorch (the transformers row) needs device memory that JAX's
    # allocator pool would still hold after the repair.
    for section, fn in (("kernels", check_kernels), ("stats", check_statistics), ("generate", check_generation),
                        ("repair", lambda r, t: check_repair(r, t, args)),
                        ("kernels_at_scale", lambda r, t: check_kernels_at_scale(r, t, args))):
        if section in skip:
            continue
        if args.deadline and time.perf_counter() - rows.t0 > args.deadline:
            rows.rows.append({"check": f"section:{section}", "ok": None, "skipped": "past --deadline"})
            continue
        with rows.check(f"section:{section}") as row:
            fn(rows, args.tiny)
            row.update(detail="section completed")
    doc = rows.flush(done=True)
    failed = doc["failed"]
    hint = verified_hint(doc)
    if hint:
        print(hint)
    print(f"{'OK' if not failed else 'FAILED: ' + ', '.join(failed)} in {doc['seconds']} s -> {args.out}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
