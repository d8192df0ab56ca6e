"""`hcnr demo [--out DIR]`: repair the shipped fine-tuned SmolLM2 and print the before/after table."""

from __future__ import annotations

import argparse

from hcnr_jax.demo import DemoSettings


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = DemoSettings()
    p = sub.add_parser(
        "demo", help="the main job: repair the shipped dishonest fine-tune of SmolLM2, compare before/after",
        description="Repairs M1 (SmolLM2-135M-Instruct made honest, then fine-tuned on HotpotQA; both shipped) with "
                    "HCNR on the shipped calibration samples, evaluates M0, M1 and the repaired M1, and writes "
                    "DIR/demo.md, DIR/demo.json, DIR/repaired/ (a Hugging Face directory) and DIR/eval/.")
    p.add_argument("--out", default="hcnr_demo", help="output directory [hcnr_demo]")
    p.add_argument("--limit", type=int, default=d.limit, help=f"questions per benchmark [{d.limit}]")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help=f"[{d.max_new_tokens}]")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"generation batch [{d.batch_size}]")
    p.add_argument("--solver", default=d.solver, help=f"compensation solver [{d.solver}]")
    p.add_argument("--data-dir", default=None, help="benchmark data folder searched first (docs/data.md; default: the lookup, then the shipped subsets)")
    p.add_argument("--smoke", action="store_true", help="a few samples everywhere: checks an installation quickly")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hcnr_jax.demo import run_demo
    from hcnr_jax.errors import HcnrError

    for name in ("limit", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise HcnrError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be a positive integer")
    settings = DemoSettings(limit=args.limit, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            solver=args.solver, data_dir=args.data_dir, smoke=args.smoke)
    run_demo(args.out, settings, overwrite=args.overwrite)
    return 0
