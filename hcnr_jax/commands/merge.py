"""`hcnr merge --base SRC --finetuned SRC --alpha A[,A...] --out DIR`: the weight-space baseline
``base + alpha * (finetuned - base)``; with several values, the development rule chooses one."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="baseline: scale the fine-tuning delta (linear merge of base and fine-tuned)",
                       description="Write BASE + alpha (FINETUNED - BASE), the training-free baseline to beat; with "
                                   "several --alpha values the development rule chooses one (docs/method.md).")
    p.add_argument("--base", required=True, help="model before fine-tuning (HF dir, .gguf, BASE+ADAPTER_DIR)")
    p.add_argument("--finetuned", required=True, help="fine-tuned model (same architecture and sizes)")
    p.add_argument("--alpha", required=True,
                   help="share of the fine-tuning delta kept (0: base, 1: fine-tuned); several comma-separated "
                        "values: the development rule chooses one (needs --dev-honesty and --dev-task)")
    p.add_argument("--dev-honesty", default=None, metavar="FILE",
                   help="development honesty samples (JSONL prompt/response; `hcnr calib --split development`)")
    p.add_argument("--dev-task", default=None, metavar="FILE", help="development task samples (JSONL prompt/response)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="dtype of the written weights (the merge itself is computed as loaded: float32 for a GGUF) "
                        "[the fine-tuned input's float type; bfloat16 for a quantised GGUF, which has none]")
    p.add_argument("--out", required=True, help="output directory (HF format)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hcnr_jax.errors import HcnrError
    from hcnr_jax.io import check_output_apart
    from hcnr_jax.preflight import check_pair_inputs
    from hcnr_jax.pretrained import load_pretrained, save_pretrained
    from hcnr_jax.repair import check_compatible
    from hcnr_jax.repair.choose import changed_fraction, merge_choosing, parse_candidates

    alphas = parse_candidates(args.alpha, "--alpha")
    if any(not 0.0 <= a <= 1.0 for a in alphas):
        raise HcnrError(f"--alpha {args.alpha}: every value must lie in [0, 1]")
    if len(alphas) > 1 and not (args.dev_honesty and args.dev_task):
        raise HcnrError("--alpha with several values: give --dev-honesty and --dev-task (the development data "
                        "the rule chooses on; docs/method.md)")
    for f in (args.dev_honesty, args.dev_task):
        if f and not Path(f).is_file():
            raise HcnrError(f"{f}: no such data file")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise HcnrError(f"{out} exists; pass --overwrite to replace it")
    # --overwrite replaces --out as a whole: it must neither be, sit inside nor contain an input model.
    check_output_apart(out, [("--base", args.base), ("--finetuned", args.finetuned)], replaces=True)
    # The development data, then the models' configs (each, and against each other), before any weight.
    check_pair_inputs(args.base, args.finetuned, (args.dev_honesty, args.dev_task))
    t0 = time.perf_counter()
    base, ft = load_pretrained(args.base), load_pretrained(args.finetuned)
    check_compatible(base, ft)
    params, alpha, choice = merge_choosing(base, ft, alphas, args.dev_honesty, args.dev_task)
    from hcnr_jax.repair.output import cast, folder_bytes, output_dtype
    from hcnr_jax.user_cache import human

    dtype, why = output_dtype(args.dtype, args.finetuned, ft)
    report = {"method": "merge", "alpha": alpha, "changed_fraction": changed_fraction(ft.params, params),
              "choice": choice, "base": args.base, "finetuned": args.finetuned, "dtype": dtype, "dtype_from": why,
              "wall_s": time.perf_counter() - t0}
    # The report is written inside the model's temporary folder: the output appears whole or not at all.
    save_pretrained(cast(ft.replace(params=params), dtype), out, overwrite=args.overwrite,
                    extra_files={"merge_report.json": json.dumps(report, indent=1) + "\n"})
    print(f"Wrote {out}: base + {alpha:g} x (finetuned - base), {100 * report['changed_fraction']:.1f}% of parameters "
          f"changed; {dtype}, {human(folder_bytes(out))} ({why}), in {report['wall_s']:.1f}s.")
    print("Check it against the fine-tuned model on the same questions (paired differences):")
    print(f"  hcnr compare --model {args.finetuned} --model {out} --out {out}_compare")
    return 0
