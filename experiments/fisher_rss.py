"""The Fisher stage's peak memory on this CPU, before and after a change: `hcnr repair` of the
shipped SmolLM2 pair (experiments/repair_smollm2.py, no cache) with the package of commit
``--before`` and with the working tree, each in a fresh process; the repair's own stage report
gives each stage's peak RSS (per-stage VmHWM) and seconds; beside them, XLA's compiled temporaries
of one Fisher step with the norms taken after the backward pass and in it, at the data's length
(96 tokens) and longer. Prints a table and writes JSON.

    python experiments/fisher_rss.py --before 8187876^ --out experiments/results/fisher_rss_smollm2.json
    python experiments/fisher_rss.py --from-reports B/hcnr_report.json A/hcnr_report.json --before 8187876^ --out ...

(``--from-reports``: tabulate two reports of runs made as above, without running them again.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_repair(work: Path, pythonpath: str | None) -> Path:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath  # ahead of the editable install: that commit's hcnr_jax
    subprocess.run([sys.executable, str(ROOT / "experiments" / "repair_smollm2.py"), "--work", str(work),
                    "--extra=--no-cache"], env=env, check=True, cwd=ROOT)
    return work / "repaired_exact" / "hcnr_report.json"


def compiled_temps(lengths: tuple[int, ...], batch: int = 8) -> list[dict]:
    """XLA's compiled temporaries of one Fisher step on SmolLM2 (float32), the previous step
    (``fisher_accum.update_unfused``: norms after the whole backward pass) against the current one,
    at ``batch`` x each length with every position a target."""
    import functools

    import jax

    from hcnr_jax import plan as planlib
    from hcnr_jax.config import config_from_hf
    from hcnr_jax.embedded import smollm2_gguf
    from hcnr_jax.stats import fisher_accum

    cfg = config_from_hf(planlib.load_hf_config(str(smollm2_gguf())), source="SmolLM2 GGUF")
    params = planlib._abstract_params(cfg, "float32")
    state = jax.eval_shape(functools.partial(fisher_accum.init, cfg=cfg), params)
    out = []
    for t in lengths:
        entry = {"batch": batch, "tokens": t}
        for name, fn in (("unfused", fisher_accum.update_unfused), ("fused", fisher_accum.update)):
            step = jax.jit(functools.partial(fn, cfg=cfg, max_targets=t - 1))
            m = step.lower(state, params, planlib._abstract_batch(batch, t)).compile().memory_analysis()
            entry[f"{name}_temp_mib"] = round(m.temp_size_in_bytes / 2**20, 1)
        out.append(entry)
    return out


def row(report: dict) -> dict:
    return {"peak_rss_mib": report["memory"]["peak_rss_mib"], "seconds": report["timing_s"],
            "rss_method": report["memory"].get("rss_method")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="commit whose hcnr_jax is the 'before' side")
    ap.add_argument("--from-reports", nargs=2, metavar=("BEFORE", "AFTER"), default=None)
    ap.add_argument("--work", default=None, help="folder for the two repairs [a temporary one]")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.from_reports:
        before_p, after_p = map(Path, args.from_reports)
    else:
        work = Path(args.work or tempfile.mkdtemp())
        src = work / "before_src"
        src.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", args.before, "hcnr_jax"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        before_p = run_repair(work / "before", str(src))
        after_p = run_repair(work / "after", None)
    commit = subprocess.run(["git", "rev-parse", args.before], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    before, after = (row(json.loads(p.read_text())) for p in (before_p, after_p))
    f0, f1 = before["peak_rss_mib"]["fisher"], after["peak_rss_mib"]["fisher"]
    l0, l1 = before["peak_rss_mib"]["load"], after["peak_rss_mib"]["load"]
    doc = {"what": "hcnr repair of the shipped SmolLM2 pair on this CPU (128 + 128 bundled samples, batch 8, "
                   "no cache): per-stage peak RSS and seconds from the repair's report",
           "before_commit": commit, "before": before, "after": after,
           "fisher_peak_rss_ratio": f1 / f0,
           "fisher_rss_above_load_mib": {"before": f0 - l0, "after": f1 - l1},
           "fisher_rss_above_load_ratio": (f1 - l1) / (f0 - l0) if f0 != l0 else None,
           "compiled_fisher_temp": compiled_temps((96, 256, 512)),
           "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg()}
    print("| stage | before: peak RSS MiB | after: peak RSS MiB | before: s | after: s |")
    print("|---|---|---|---|---|")
    for k in before["peak_rss_mib"]:
        print(f"| {k} | {before['peak_rss_mib'][k]:.0f} | {after['peak_rss_mib'].get(k, float('nan')):.0f} | "
              f"{before['seconds'][k]:.1f} | {after['seconds'].get(k, float('nan')):.1f} |")
    print(f"fisher stage peak RSS: {f0:.0f} -> {f1:.0f} MiB ({f1 / f0:.2f}x); above the load stage's: "
          f"{f0 - l0:.0f} -> {f1 - l1:.0f} MiB")
    for e in doc["compiled_fisher_temp"]:
        print(f"compiled Fisher step temporaries at [{e['batch']}, {e['tokens']}]: {e['unfused_temp_mib']:.0f} MiB "
              f"(norms after the backward pass) -> {e['fused_temp_mib']:.0f} MiB (in it)")
    if args.out:
        sys.path.insert(0, str(ROOT))
        from hcnr_jax.io import atomic_write_text

        atomic_write_text(args.out, json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
