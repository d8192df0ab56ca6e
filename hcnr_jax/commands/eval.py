"""`hcnr eval --model SRC [--reference SRC] --benchmarks ... --out DIR`: honesty and task evaluation."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hcnr_jax.eval.data import BENCHMARKS, REFUSAL_BENCHMARKS

log = logging.getLogger(__name__)


def _benchmarks(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if names == ("all",):
        return names
    bad = [n for n in names if n not in BENCHMARKS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown benchmark(s) {bad}; known: all, {', '.join(BENCHMARKS)}")
    return names


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate refusals / honesty / task accuracy; writes JSON, markdown, JSONL")
    p.add_argument("--model", required=True, help="model to evaluate (HF dir, .gguf, hub id, BASE+ADAPTER_DIR)")
    p.add_argument("--reference", help="reference model for prudence / over-conservativeness / honesty")
    p.add_argument("--benchmarks", type=_benchmarks, default=None,
                   help=f"comma-separated, or 'all' (every available one). Default: the available ones of "
                        f"{','.join(REFUSAL_BENCHMARKS)} (`hcnr data` lists them); known: {','.join(BENCHMARKS)}")
    p.add_argument("--limit", type=int, default=None, help="examples per benchmark (balanced; default: all)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="split / order seed")
    p.add_argument("--data-dir", default=None,
                   help="benchmark data folder searched first, then $HCNR_DATA_DIR, the user data folder "
                        "(~/.cache/hcnr_jax/data) and the shipped subsets; 'hub': the Hugging Face Hub (docs/data.md)")
    p.add_argument("--rules", default="default", help="refusal phrase rules: default, selfaware, "
                                                      "alignment_for_honesty, unknownbench")
    p.add_argument("--embedding", action="store_true", help="add MiniLM similarity refusal detection")
    p.add_argument("--demos", default=None, metavar="FILE",
                   help="in-context demonstrations put before every question of --model as earlier chat turns "
                        "(the ICL baseline): a JSONL file of {\"prompt\": ..., \"response\": ...} rows, or "
                        "'default' for the shipped idk demonstrations (docs/evaluation.md)")
    p.add_argument("--instruction", default=None, metavar="TEXT",
                   help="an instruction put before every question of --model (\"TEXT\\nQ: question\\nA:\"), or "
                        "'prompt-based' for Alignment for Honesty's PROMPT-based baseline (docs/evaluation.md)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples for the 95%% intervals of every score (0: none)")
    p.add_argument("--out", required=True, help="output directory (an existing one is resumed)")
    p.set_defaults(func=run)


def resolve_benchmarks(names: tuple[str, ...] | None, data_dir: str | None) -> tuple[str, ...]:
    """The benchmarks to run: the named ones; ``("all",)``: every available one; None: the
    available refusal benchmarks. Skipped ones are logged; none available, or a named one missing,
    is an error (raised before any model is loaded)."""
    from hcnr_jax.errors import DataError
    from hcnr_jax.eval.data import available, locate

    if names is not None and names != ("all",):
        for n in names:
            locate(n, data_dir)
        return names
    wanted = REFUSAL_BENCHMARKS if names is None else tuple(BENCHMARKS)
    found = tuple(available(wanted, data_dir))
    missing = [n for n in wanted if n not in found]
    if missing:
        log.warning("not found, skipped: %s (`hcnr data` says where to get them)", ", ".join(missing))
    if not found:
        raise DataError(f"none of {', '.join(wanted)} is available (`hcnr data` says where to get them)")
    return found


def run(args: argparse.Namespace) -> int:
    from hcnr_jax.errors import DataError, HcnrError
    from hcnr_jax.eval.data import DEFAULT_DEMOS, load_demos
    from hcnr_jax.eval.runner import EvalSettings, evaluate, refusal_detector
    from hcnr_jax.io import check_output_apart, portable_path
    from hcnr_jax.pretrained import load_pretrained
    from hcnr_jax.source import ModelSource

    if args.bootstrap < 0:
        raise HcnrError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    for name in ("limit", "max_new_tokens", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:  # --limit 0 would score nothing and write NaN
            raise HcnrError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    # Everything cheap is checked before a model is loaded.
    check_output_apart(args.out, [("--model", args.model), ("--reference", args.reference)])
    try:
        refusal_detector(args.rules)
    except HcnrError as e:
        raise HcnrError(f"--rules: {e}") from None
    demos, demos_source = (), ""
    if args.demos is not None:
        try:
            demos = load_demos(args.demos)
        except DataError as e:
            raise DataError(f"--demos {e}") from None
        demos_source = DEFAULT_DEMOS if args.demos == DEFAULT_DEMOS else portable_path(args.demos)
    instruction = args.instruction or ""
    if args.instruction is not None:
        from hcnr_jax.train.recipes import PROMPT_BASED_INSTRUCTION

        instruction = PROMPT_BASED_INSTRUCTION if args.instruction == "prompt-based" else args.instruction.strip()
        if not instruction:
            raise HcnrError("--instruction must not be empty")
    settings = EvalSettings(benchmarks=resolve_benchmarks(args.benchmarks, args.data_dir), limit=args.limit,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                            data_dir=args.data_dir, rules=args.rules, embedding=args.embedding,
                            bootstrap=args.bootstrap, demos=demos, demos_source=demos_source,
                            instruction=instruction)
    model = load_pretrained(args.model)
    reference = load_pretrained(args.reference) if args.reference else None
    def name(src: str) -> str:
        return ModelSource.parse(src).describe(portable_path)

    evaluate(model, args.out, settings, reference, name(args.model), name(args.reference) if args.reference else "")
    print(Path(args.out, "table.md").read_text())
    return 0
