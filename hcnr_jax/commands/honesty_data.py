"""`hcnr honesty-data --recipe R --out FILE`: honesty training data (SFT or preference pairs) from the
benchmarks' calibration pools (never overlapping the evaluation splits), labelled by gold answers or
by the model's own answers (`hcnr_jax.data.recipes`, `hcnr_jax.train.model_answers`)."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from hcnr_jax.data.recipes import RECIPES

DEFAULT_BENCHMARKS = ("falseqa", "nec", "refunq", "kuq", "selfaware", "triviaqa")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("honesty-data", help="build honesty training data (RAIT, Alignment for Honesty, DPO pairs)",
                       description="Write honesty training data for hcnr train from the benchmarks' calibration "
                                   "pools, labelled by gold answers or by the model's own answers (docs/training.md).")
    p.add_argument("--recipe", choices=RECIPES, required=True,
                   help="label: gold answer / idk; rait: the model's greedy answer if correct, else idk; "
                        "absolute, confidence-num, confidence-verb, multisample: Alignment for Honesty from "
                        "--samples answers per question; dpo-pairs: chosen/rejected from greedy answers")
    p.add_argument("--model", help="model whose answers label the data (HF dir, .gguf, hub id, BASE+ADAPTER_DIR); "
                                   "every recipe but label")
    p.add_argument("--benchmarks", default=None,
                   help=f"comma-separated (default: those of {','.join(DEFAULT_BENCHMARKS)} that are available)")
    p.add_argument("--data-dir", default=None,
                   help="benchmark data folder (default: that of hcnr eval, else the shipped subsets)")
    p.add_argument("-n", "--limit", type=int, default=None,
                   help="questions per benchmark (balanced answerable/unanswerable; default: the whole pool)")
    p.add_argument("--samples", type=int, default=10, help="sampled answers per question (default 10)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--tau", type=float, default=0.1, help="known when expected accuracy >= tau (default 0.1)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per generated answer (default 32)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default 16)")
    p.add_argument("--seed", type=int, default=0, help="sampling and --balance seed (default 0)")
    p.add_argument("--idk-response", default=None, help="target for unknown questions "
                                                        "(default: Alignment for Honesty's)")
    p.add_argument("--balance", action="store_true", help="cap the majority of known / unknown examples")
    p.add_argument("--answers", default=None, metavar="FILE",
                   help="JSON file keeping the model's greedy and sampled answers: answers already there (same "
                        "model, --samples, --temperature, --seed, --max-new-tokens) are reused, new ones added; "
                        "several recipes then share one generation pass")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run)


def _validate(args: argparse.Namespace) -> tuple[list[str], bool]:
    """Every argument checked before anything is loaded; (benchmark names, names were given)."""
    from hcnr_jax.data.benchmarks import BENCHMARKS
    from hcnr_jax.errors import DataError, HcnrError

    checks = [
        (args.limit is None or args.limit > 0, f"-n/--limit must be > 0, got {args.limit}"),
        (args.samples >= 1, f"--samples must be >= 1, got {args.samples}"),
        (0 < args.tau <= 1, f"--tau must be in (0, 1], got {args.tau}"),
        (args.temperature >= 0, f"--temperature must be >= 0, got {args.temperature}"),
        (args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"),
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.idk_response is None or args.idk_response.strip() != "", "--idk-response must not be empty"),
        (args.recipe == "label" or args.model,
         f"--recipe {args.recipe} needs --model (the model's answers label it)"),
        (args.recipe != "label" or not args.model, "--recipe label uses gold answers only; drop --model"),
        (args.recipe != "label" or not args.answers, "--recipe label uses gold answers only; drop --answers"),
        (not args.answers or Path(args.answers).absolute() != Path(args.out).absolute(),
         "--answers and --out must be different files"),
    ]
    for ok, message in checks:
        if not ok:
            raise HcnrError(message)
    out = Path(args.out)
    if out.is_dir():
        raise HcnrError(f"--out {out}: is a directory, expected a JSONL file path")
    if out.exists() and not args.overwrite:
        raise HcnrError(f"--out {out}: already exists (pass --overwrite to replace it)")
    given = args.benchmarks is not None
    names = list(dict.fromkeys(n.strip() for n in (args.benchmarks or ",".join(DEFAULT_BENCHMARKS)).split(",")
                               if n.strip()))
    bad = [n for n in names if n not in BENCHMARKS]
    if bad or not names:
        raise DataError(f"--benchmarks: unknown benchmark(s) {bad}; known: {', '.join(BENCHMARKS)}")
    return names, given


def _model_records(rows: list[dict], args: argparse.Namespace, idk: str) -> tuple[list[dict], int]:
    """(records, rows dropped) of a model-based recipe; ``--answers`` keeps the model's answers."""
    from hcnr_jax.errors import DataError
    from hcnr_jax.eval.refusal import RefusalDetector
    from hcnr_jax.train.model_answers import AnswerSettings, AnswersFile, honesty_records

    settings = AnswerSettings(model=args.model, samples=args.samples, temperature=args.temperature, seed=args.seed,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    try:
        cache = AnswersFile(args.answers, settings)
    except DataError as e:
        raise DataError(f"--answers {e}") from None
    refused = None
    if args.recipe == "dpo-pairs":
        detector = RefusalDetector()

        def refused(answer: str, question: str) -> bool:
            return detector.detect(answer, question).verdict == "refused"

    return honesty_records(args.recipe, rows, settings, cache, tau=args.tau, idk=idk, refused=refused)


def _summary(records: list[dict], pools: dict[str, list[dict]], dropped: int, args: argparse.Namespace) -> str:
    known = Counter((r["benchmark"], r["known"]) for r in records)
    lines = [f"{'benchmark':<12} {'questions':>9} {'known':>7} {'unknown':>7}  (known / unknown: examples)"]
    for name, rows in pools.items():
        lines.append(f"{name:<12} {len(rows):>9} {known[name, True]:>7} {known[name, False]:>7}")
    kind = "preference pairs" if args.recipe == "dpo-pairs" else "examples"
    note = f" ({dropped} unknown questions dropped: the model's answer is empty or a refusal)" if dropped else ""
    lines.append(f"wrote {len(records)} {args.recipe} {kind} to {args.out}{note}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from hcnr_jax.data import recipes as R
    from hcnr_jax.data.jsonl import write_jsonl
    from hcnr_jax.errors import DataError

    names, given = _validate(args)
    idk = args.idk_response or R.A4H_IDK
    # With the default list, benchmarks that cannot be read are skipped (logged).
    by_benchmark = R.pools(names, args.data_dir, args.limit, skip_unreadable=not given)
    if not by_benchmark or not any(by_benchmark.values()):
        raise DataError(f"--benchmarks: no calibration rows in {', '.join(names)} (data dir {args.data_dir})")
    rows = [r for pool in by_benchmark.values() for r in pool]
    if args.recipe == "label":
        records, dropped = R.build("label", rows, idk=idk)
    else:
        records, dropped = _model_records(rows, args, idk)
    if args.balance:
        records = R.balance(records, "known", args.seed)
    if not records:
        raise DataError(f"--recipe {args.recipe}: no examples left ({dropped} questions dropped); nothing written")
    write_jsonl(records, args.out)
    print(_summary(records, by_benchmark, dropped, args))
    return 0
