"""`hcnr calib --kind honesty|task --out FILE`: build calibration JSONL for `hcnr repair` from
benchmark calibration pools (never overlapping the evaluation splits)."""

from __future__ import annotations

import argparse

from hcnr_jax.data.benchmarks import BENCHMARKS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calib", help="build honesty / task calibration JSONL from benchmark calibration pools",
                       description="Write JSONL samples for hcnr repair (--split calibration) or for choosing a "
                                   "setting (--split development), drawn from pools that never overlap the "
                                   "evaluation splits.")
    p.add_argument("--kind", choices=["honesty", "task"], required=True,
                   help="honesty: unanswerable questions -> \"I don't know\" and answerable ones -> their answer; "
                        "task: task questions -> their answer")
    p.add_argument("--benchmarks", default=None,
                   help="comma-separated (default: kuq,selfaware for honesty, hotpotqa for task)")
    p.add_argument("-n", type=int, default=128, help="number of samples (default 128)")
    p.add_argument("--idk-response", default=None, help="target for unanswerable questions")
    p.add_argument("--data-dir", default=None,
                   help="benchmark data folder searched first (then $HCNR_DATA_DIR, the user data folder, "
                        "the shipped subsets; docs/data.md)")
    p.add_argument("--seed", type=int, default=0,
                   help="which calibration rows are drawn (the draw order within the calibration pool); the "
                        "calibration / development / evaluation split is fixed and never moves (default 0)")
    p.add_argument("--split", choices=["calibration", "development"], default="calibration",
                   help="draw from the calibration pool (for hcnr repair) or the development split (for "
                        "--choose: choosing a setting, never evaluation data) [calibration]")
    p.add_argument("--out", required=True, help="output JSONL file (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hcnr_jax.data.benchmarks import load_benchmark
    from hcnr_jax.data.calibration import IDK_RESPONSE, honesty_samples, task_samples
    from hcnr_jax.data.jsonl import write_jsonl
    from hcnr_jax.errors import DataError
    from hcnr_jax.io import refuse_existing

    if args.n < 1:
        raise DataError(f"-n {args.n}: the number of samples must be a positive integer")
    default = "kuq,selfaware" if args.kind == "honesty" else "hotpotqa"
    names = [n.strip() for n in (args.benchmarks or default).split(",") if n.strip()]
    for n in names:
        if n not in BENCHMARKS:
            raise DataError(f"--benchmarks: unknown benchmark {n!r}; known: {', '.join(BENCHMARKS)}")
    refuse_existing(args.out, args.overwrite)
    pools = {n: [r for r in load_benchmark(n, args.data_dir) if r["split"] == args.split] for n in names}
    if args.kind == "honesty":
        samples = honesty_samples(pools, args.n, args.idk_response or IDK_RESPONSE, args.seed, args.split)
    else:
        quotas = [args.n // len(names) + (i < args.n % len(names)) for i in range(len(names))]
        samples = [s for n, q in zip(names, quotas, strict=True)
                   for s in task_samples(pools[n], q, n, args.seed, args.split)]
    write_jsonl(samples, args.out, keys=("prompt", "response"))
    print(f"wrote {len(samples)} {args.kind} samples to {args.out}")
    return 0
