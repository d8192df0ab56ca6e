"""HCNR repair of the shipped SmolLM2 fine-tune on this CPU: time and peak memory per stage.

The models are the package's embedded default (``hcnr_jax/bundled/models``, made by
``experiments/make_models.py``): M0 = SmolLM2-135M-Instruct + the ``honest`` adapter (the model
before fine-tuning) and M1 = M0 + the ``finetuned`` adapter (HotpotQA SFT). ``hcnr repair`` runs in
a fresh process (so its peak RSS is its own) with the bundled 128 honesty + 128 task samples, and
its report is summarised. (``hcnr demo`` runs the same repair and also evaluates the models.)

    python experiments/repair_smollm2.py [--work runs/smollm2] [--solver exact] [--extra "--r-cw 0.4"]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    from hcnr_jax.demo import embedded_sources

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="runs/smollm2")
    ap.add_argument("--solver", default="exact")
    ap.add_argument("--tag", default=None, help="output name (default: the solver)")
    ap.add_argument("--extra", default="", help="more `hcnr repair` flags")
    args = ap.parse_args()

    src = embedded_sources()
    out = Path(args.work) / f"repaired_{args.tag or args.solver}"
    # `python -m hcnr_jax.cli`, not `hcnr`: the interpreter running this script, whatever is on PATH.
    cmd = [sys.executable, "-m", "hcnr_jax.cli", "repair", "--base", src["M0"], "--finetuned", src["M1"],
           "--out", str(out), "--solver", args.solver, "--overwrite", *shlex.split(args.extra)]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    wall = time.perf_counter() - t0
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
