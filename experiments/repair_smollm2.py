"""HCNR repair of SmolLM2-135M-Instruct on this CPU: time and peak memory per stage.

SmolLM2 has no public fine-tuned descendant here, so one is made: ``--sft-steps`` steps of full
fine-tuning (Adam) on the bundled task calibration file (short HotpotQA answers), which teaches
it to answer tersely and confidently. Then ``hcnr repair`` runs in a fresh process (so its peak
RSS is its own) with the bundled 128 honesty + 128 task samples, and its report is summarised.

    python experiments/repair_smollm2.py [--work runs/smollm2] [--sft-steps 6] [--solver exact] \
        [--extra "--r-cw 0.4"]

``--smoke`` checks that the whole job runs, in a couple of minutes on 2 CPU cores: 1 fine-tuning
step on 4 task samples at 64 tokens, then ``hcnr repair`` on 4 honesty + 4 task samples (short ones
copied from the bundled calibration files to temporary JSONL files) at 64 tokens (work folder
runs/smollm2_smoke unless --work).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMOKE_SAMPLES = 4
SMOKE_MAX_LENGTH = 64


def smollm2_path() -> Path:
    from hcnr_jax.embedded import smollm2_gguf

    return smollm2_gguf()


def finetune(out: Path, steps: int, lr: float, batch: int, seed: int, max_length: int = 256,
             samples: int | None = None) -> None:
    """Full fine-tuning with Adam on the bundled task samples (the first ``samples`` of them when
    given); writes a HF directory."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from hcnr_jax import load_pretrained, save_pretrained
    from hcnr_jax.data import load_samples
    from hcnr_jax.embedded import calibration_file
    from hcnr_jax.model import forward
    from hcnr_jax.stats import per_sample_loss

    model = load_pretrained(smollm2_path())
    data = load_samples(calibration_file("task"), model.tokenizer, max_length=max_length, limit=samples)
    n = len(data)
    cfg = model.config
    opt = optax.adam(lr)

    def loss_fn(params, ids, attn, lmask):
        logits = forward(params, cfg, ids, attn).logits
        return jnp.mean(per_sample_loss(logits, ids, lmask))

    @jax.jit
    def step(params, state, ids, attn, lmask):
        loss, g = jax.value_and_grad(loss_fn)(params, ids, attn, lmask)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, loss

    params, state = model.params, opt.init(model.params)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for i in range(steps):
        idx = rng.choice(n, min(batch, n), replace=False)
        t = int(data.attention_mask[idx].sum(1).max())
        params, state, loss = step(params, state, jnp.asarray(data.input_ids[idx, :t]),
                                   jnp.asarray(data.attention_mask[idx, :t]), jnp.asarray(data.loss_mask[idx, :t]))
        print(f"sft step {i + 1}/{steps} loss {float(loss):.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    save_pretrained(model.replace(params=params), out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="runs/smollm2")
    ap.add_argument("--sft-steps", type=int, default=6)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--solver", default="exact")
    ap.add_argument("--tag", default=None, help="output name (default: the solver)")
    ap.add_argument("--extra", default="", help="more `hcnr repair` flags")
    ap.add_argument("--smoke", action="store_true",
                    help=f"1 step on {SMOKE_SAMPLES} samples, repair on {SMOKE_SAMPLES} + {SMOKE_SAMPLES} samples, "
                         f"{SMOKE_MAX_LENGTH} tokens")
    ap.add_argument("--max-length", type=int, default=256, help=argparse.SUPPRESS)
    ap.add_argument("--samples", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--finetune-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    repair_data: list[str] = []
    if args.smoke:
        args.sft_steps, args.batch, args.samples, args.max_length = 1, SMOKE_SAMPLES, SMOKE_SAMPLES, SMOKE_MAX_LENGTH
        if args.work == ap.get_default("work"):
            args.work = "runs/smollm2_smoke"
    work = Path(args.work)
    sft = work / "sft"
    if args.finetune_only:
        finetune(sft, args.sft_steps, args.lr, args.batch, args.seed, args.max_length, args.samples)
        return 0
    if not sft.exists():
        # In a child process, so that this one holds no model while the repair is measured.
        rc = subprocess.call([sys.executable, __file__, "--work", str(work), "--finetune-only",
                              "--sft-steps", str(args.sft_steps), "--lr", str(args.lr),
                              "--batch", str(args.batch), "--seed", str(args.seed),
                              "--max-length", str(args.max_length),
                              *(["--samples", str(args.samples)] if args.samples else [])])
        if rc:
            return rc
    tmp = tempfile.TemporaryDirectory(prefix="hcnr_smoke_")
    if args.smoke:
        from hcnr_jax.embedded import calibration_file

        for kind in ("honesty", "task"):
            # The first samples short enough to keep target tokens within SMOKE_MAX_LENGTH (with the system prompt).
            lines = [ln for ln in calibration_file(kind).read_text().splitlines()
                     if sum(map(len, json.loads(ln).values())) < 120][:SMOKE_SAMPLES]
            (Path(tmp.name) / f"{kind}.jsonl").write_text("\n".join(lines) + "\n")
            repair_data += [f"--{kind}-data", str(Path(tmp.name) / f"{kind}.jsonl")]
        repair_data += ["--max-length", str(SMOKE_MAX_LENGTH), "--batch-size", str(SMOKE_SAMPLES)]
    out = work / f"repaired_{args.tag or args.solver}"
    args_ = ["repair", "--base", str(smollm2_path()), "--finetuned", str(sft), "--out", str(out),
             "--solver", args.solver, "--overwrite", *repair_data, *shlex.split(args.extra)]
    print("$ hcnr", " ".join(args_), flush=True)
    t0 = time.perf_counter()
    # This interpreter's hcnr (python -m), not whichever `hcnr` comes first on PATH.
    rc = subprocess.call([sys.executable, "-m", "hcnr_jax.cli", *args_])
    wall = time.perf_counter() - t0
    tmp.cleanup()
    if rc:
        return rc
    rep = json.loads((out / "hcnr_report.json").read_text())
    s = rep["summary"]
    print(f"\nwall time of the whole command (imports, loading, writing included): {wall:.1f}s")
    print("| stage | seconds | peak RSS MiB within the stage |")
    print("|---|---|---|")
    for k, v in rep["timing_s"].items():
        print(f"| {k} | {v:.1f} | {rep['memory']['peak_rss_mib'][k]:.0f} |")
    print(f"\nrestored {s['restored_params']:,} params = {100 * s['restored_fraction_of_linear']:.2f}% of block "
          f"linear weights ({100 * s['restored_fraction_of_model']:.2f}% of the model); kept {s['layers_kept']}/"
          f"{s['layers']} layers; objective sft {s['objective_sft']:.4g} -> restored {s['objective_before']:.4g} "
          f"-> compensated {s['objective_after']:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
