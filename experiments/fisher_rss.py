"""The Fisher stage's peak memory on this CPU, before and after a change: `hcnr repair` of the
shipped SmolLM2 pair (experiments/repair_smollm2.py, no cache) with the package of commit
``--before`` and with the working tree, each in a fresh process; the repair's own stage report
gives each stage's peak RSS (per-stage VmHWM) and seconds; beside them, XLA's compiled temporaries
of one Fisher step with the norms taken after the backward pass and in it, at the data's length
(96 tokens) and longer. The working tree runs twice: at the defaults (blocks recomputed in the
backward pass), and with ``--remat off`` (every block's activations kept). Prints a table and writes JSON.

    python experiments/fisher_rss.py --before 8187876^ --out experiments/results/fisher_rss_smollm2.json
    python experiments/fisher_rss.py --before 0f91dbc --reuse-before experiments/results/fisher_rss_smollm2.json \
        --out experiments/results/fisher_rss_smollm2.json   # the working tree again, the same before run
    python experiments/fisher_rss.py --from-reports B/hcnr_report.json A/hcnr_report.json --before 8187876^ --out ...
    python experiments/fisher_rss.py --before HEAD --temps-only --out experiments/results/fisher_temps_smollm2.json

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


def run_repair(work: Path, pythonpath: str | None, extra: str = "") -> Path:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath  # ahead of the editable install: that commit's hcnr_jax
    subprocess.run([sys.executable, str(ROOT / "experiments" / "repair_smollm2.py"), "--work", str(work),
                    f"--extra=--no-cache {extra}".strip()], env=env, check=True, cwd=ROOT)
    return work / "repaired_exact" / "hcnr_report.json"


def compiled_temps(lengths: tuple[int, ...], batch: int = 8, no_remat: bool = False) -> list[dict]:
    """XLA's compiled temporaries of one Fisher step on SmolLM2 (float32), the previous step
    (``fisher_accum.update_unfused``: norms after the whole backward pass) against the current one,
    at ``batch`` x each length with every position a target; ``no_remat``: also the current one
    with every block's activations kept (``--remat off``)."""
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
        fns = [("unfused", fisher_accum.update_unfused), ("fused", fisher_accum.update)]
        if no_remat:
            fns.append(("fused_no_remat", functools.partial(fisher_accum.update, remat=False)))
        for name, fn in fns:
            step = jax.jit(functools.partial(fn, cfg=cfg, max_targets=t - 1))
            m = step.lower(state, params, planlib._abstract_batch(batch, t)).compile().memory_analysis()
            entry[f"{name}_temp_mib"] = round(m.temp_size_in_bytes / 2**20, 1)
        out.append(entry)
    return out


def row(report: dict) -> dict:
    return {"peak_rss_mib": report["memory"]["peak_rss_mib"], "seconds": report["timing_s"],
            "rss_method": report["memory"].get("rss_method")}


# The working tree's repairs: name -> extra `hcnr repair` flags.
VARIANTS = {"after": "", "after --remat off": "--remat off"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="commit whose hcnr_jax is the 'before' side")
    ap.add_argument("--reuse-before", default=None, metavar="JSON",
                    help="take the 'before' run from this earlier output of the script (same commit) instead of "
                         "running it again")
    ap.add_argument("--from-reports", nargs=2, metavar=("BEFORE", "AFTER"), default=None)
    ap.add_argument("--temps-only", action="store_true",
                    help="only the compiled temporaries, with and without blocks recomputed (no repair runs)")
    ap.add_argument("--work", default=None, help="folder for the repairs [a temporary one]")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.temps_only:
        temps = compiled_temps((96, 256, 512), no_remat=True)
        for e in temps:
            print(" | ".join(f"{k} {v}" for k, v in e.items()))
        if args.out:
            sys.path.insert(0, str(ROOT))
            from hcnr_jax.io import atomic_write_text

            atomic_write_text(args.out, json.dumps({"what": "XLA's compiled temporaries of one Fisher step on "
                                                    "SmolLM2 (float32, batch 8, every position a target): norms "
                                                    "after the backward pass (unfused), in it with blocks recomputed "
                                                    "(fused, the default), in it with every block's activations "
                                                    "kept (fused_no_remat)", "compiled_fisher_temp": temps},
                                                   indent=2) + "\n")
        return 0
    commit = subprocess.run(["git", "rev-parse", args.before], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    work = Path(args.work or tempfile.mkdtemp())
    if args.from_reports:
        before_p, after_p = map(Path, args.from_reports)
        before = row(json.loads(before_p.read_text()))
        rows = {"after": row(json.loads(after_p.read_text()))}
    else:
        if args.reuse_before:
            old = json.loads(Path(args.reuse_before).read_text())
            if old["before_commit"] != commit:
                sys.exit(f"{args.reuse_before}: its before run is of {old['before_commit']}, not {commit}")
            before = old["before"]
        else:
            src = work / "before_src"
            src.mkdir(parents=True, exist_ok=True)
            archive = subprocess.run(["git", "archive", args.before, "hcnr_jax"], cwd=ROOT, check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
            before = row(json.loads(run_repair(work / "before", str(src)).read_text()))
        rows = {name: row(json.loads(run_repair(work / name.replace(" ", "_"), None, extra).read_text()))
                for name, extra in VARIANTS.items()}
    f0, l0 = before["peak_rss_mib"]["fisher"], before["peak_rss_mib"]["load"]
    p0 = max(before["peak_rss_mib"].values())
    ratios = {name: {"fisher_peak_rss_ratio": r["peak_rss_mib"]["fisher"] / f0,
                     "process_peak_rss_ratio": max(r["peak_rss_mib"].values()) / p0,
                     "fisher_seconds_ratio": r["seconds"]["fisher"] / before["seconds"]["fisher"]}
              for name, r in rows.items()}
    doc = {"what": "hcnr repair of the shipped SmolLM2 pair on this CPU (128 + 128 bundled samples, batch 8, "
                   "no cache): per-stage peak RSS and seconds from the repair's report; the process's peak is the "
                   "largest stage peak",
           "before_commit": commit, "before": before, **rows, "ratios": ratios,
           "fisher_rss_above_load_mib": {"before": f0 - l0, **{n: r["peak_rss_mib"]["fisher"] - r["peak_rss_mib"]["load"]
                                                               for n, r in rows.items()}},
           "compiled_fisher_temp": compiled_temps((96, 256, 512)),
           "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg()}
    names = ["before", *rows]
    table = {"before": before, **rows}
    print("| stage | " + " | ".join(f"{n}: peak RSS MiB" for n in names) + " | " + " | ".join(f"{n}: s" for n in names) + " |")
    print("|---" * (1 + 2 * len(names)) + "|")
    for k in before["peak_rss_mib"]:
        print(f"| {k} | " + " | ".join(f"{table[n]['peak_rss_mib'].get(k, float('nan')):.0f}" for n in names) + " | "
              + " | ".join(f"{table[n]['seconds'].get(k, float('nan')):.1f}" for n in names) + " |")
    for name, r in ratios.items():
        print(f"{name}: Fisher stage peak RSS {r['fisher_peak_rss_ratio']:.2f}x before, the process's peak "
              f"{r['process_peak_rss_ratio']:.2f}x, Fisher stage seconds {r['fisher_seconds_ratio']:.2f}x")
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
