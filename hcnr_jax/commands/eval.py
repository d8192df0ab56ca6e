"""`hcnr eval --model SRC [--reference SRC] --benchmarks ... --out DIR`: honesty and task evaluation."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hcnr_jax.data.benchmarks import BENCHMARKS, REFUSAL_BENCHMARKS

log = logging.getLogger(__name__)


def _benchmarks(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if names == ("all",):
        return names
    if names == ("none",):  # only --task-data
        return ()
    bad = [n for n in names if n not in BENCHMARKS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown benchmark(s) {bad}; known: all, {', '.join(BENCHMARKS)}")
    return names


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate refusals / honesty / task accuracy; writes JSON, markdown, JSONL",
                       description="Generate the model's answers to benchmark questions (greedy, batched) and score "
                                   "them: refusal F1 and RF delta, prudence / over-conservativeness / honesty against "
                                   "--reference, task accuracy (docs/evaluation.md). --out is written whole at the end; a "
                                   "stopped run resumes.")
    p.add_argument("--model", required=True, help="model to evaluate (HF dir, .gguf, hub id, BASE+ADAPTER_DIR)")
    p.add_argument("--reference", help="reference model for prudence / over-conservativeness / honesty")
    add_eval_options(p)
    p.add_argument("--demos", default=None, metavar="FILE",
                   help="in-context demonstrations put before every question of --model as earlier chat turns "
                        "(the ICL baseline): a JSONL file of {\"prompt\": ..., \"response\": ...} rows, or "
                        "'default' for the shipped idk demonstrations (docs/evaluation.md)")
    p.add_argument("--instruction", default=None, metavar="TEXT",
                   help="an instruction put before every question of --model (\"TEXT\\nQ: question\\nA:\"), or "
                        "'prompt-based' for Alignment for Honesty's PROMPT-based baseline (docs/evaluation.md)")
    p.add_argument("--out", required=True,
                   help="output directory, written whole at the end (must not exist unless --overwrite; a stopped "
                        "run resumes from the user cache, `hcnr cache info`)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    from hcnr_jax.commands.cache import add_flags

    add_flags(p, "evaluation records")
    p.set_defaults(func=run)


def add_eval_options(p: argparse.ArgumentParser) -> None:
    """What is evaluated and how: the options `hcnr eval` and `hcnr compare` share."""
    p.add_argument("--benchmarks", type=_benchmarks, default=None,
                   help=f"comma-separated, 'all' (every available one) or 'none' (only --task-data). Default: "
                        f"the available ones of "
                        f"{','.join(REFUSAL_BENCHMARKS)} (`hcnr data` lists them); known: {','.join(BENCHMARKS)}")
    p.add_argument("--limit", type=int, default=None, help="examples per benchmark (balanced; default: all)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per generated answer (default 64)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default 16)")
    p.add_argument("--seed", type=int, default=0, help="split / order seed")
    p.add_argument("--data-dir", default=None,
                   help="benchmark data folder searched first, then $HCNR_DATA_DIR, the user data folder "
                        "(~/.cache/hcnr/data) and the shipped subsets; 'hub': the Hugging Face Hub (docs/data.md)")
    p.add_argument("--rules", default="default", help="refusal phrase rules: default, selfaware, "
                                                      "alignment_for_honesty, unknownbench")
    p.add_argument("--embedding", action="store_true", help="add MiniLM similarity refusal detection")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples for the 95%% intervals of every score (0: none)")
    p.add_argument("--task-data", default=None, metavar="FILE",
                   help="your own task: JSONL of {\"prompt\", \"response\"} rows (the format the other commands "
                        "read); each prompt is answered and scored against its response: accuracy by contained and "
                        "exact match, and the gold response's mean log-likelihood (docs/evaluation.md)")


def resolve_benchmarks(names: tuple[str, ...] | None, data_dir: str | None) -> tuple[str, ...]:
    """The benchmarks to run: the named ones; ``("all",)``: every available one; None: the
    available refusal benchmarks. Skipped ones are logged; none available, or a named one missing,
    is an error (raised before any model is loaded)."""
    from hcnr_jax.data.benchmarks import available, locate
    from hcnr_jax.errors import DataError

    if names == ():
        return names
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
    from hcnr_jax.errors import HcnrError
    from hcnr_jax.io import check_output_apart

    # Everything cheap is checked before a model is loaded.
    check_output_apart(args.out, [("--model", args.model), ("--reference", args.reference)],
                       replaces=args.overwrite)
    resume_from = _unfinished(Path(args.out))
    if Path(args.out).exists() and not (args.overwrite or resume_from):
        raise HcnrError(f"{args.out}: output directory already exists (choose another path or pass --overwrite)")
    settings = build_settings(args)
    names = (source_name(args.model), source_name(args.reference) if args.reference else "")
    publish(args, settings, names, resume_from)
    print(Path(args.out, "table.md").read_text())
    print(f"wrote {args.out}: table.md, metrics.json (95% bootstrap intervals), examples.jsonl (every response)")
    return 0


def source_name(src: str) -> str:
    """A model source as records and tables name it (machine-independent paths)."""
    from hcnr_jax.io import portable_path
    from hcnr_jax.source import ModelSource

    return ModelSource.parse(src).describe(portable_path)


def build_settings(args: argparse.Namespace):
    """The `EvalSettings` of parsed options, every one checked (errors name the option or file)
    before any model is loaded."""
    from hcnr_jax.data.tasks import DEFAULT_DEMOS, load_demos
    from hcnr_jax.errors import DataError, HcnrError
    from hcnr_jax.eval.runner import EvalSettings, refusal_detector
    from hcnr_jax.io import portable_path, sha256_file

    if args.bootstrap < 0:
        raise HcnrError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    for name in ("limit", "max_new_tokens", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:  # --limit 0 would score nothing and write NaN
            raise HcnrError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    from hcnr_jax.commands.cache import check_flags

    check_flags(args)
    if args.benchmarks == () and not args.task_data:
        raise HcnrError("--benchmarks none: give --task-data (there is nothing else to evaluate)")
    rows = None
    if args.task_data:
        from hcnr_jax.data.tasks import load_rows

        rows = load_rows(args.task_data)  # a bad line fails now, naming the file, line and field
    try:
        refusal_detector(args.rules)
    except HcnrError as e:
        raise HcnrError(f"--rules: {e}") from None
    demos, demos_source = (), ""
    if getattr(args, "demos", None) is not None:
        try:
            demos = load_demos(args.demos)
        except DataError as e:
            raise DataError(f"--demos {e}") from None
        demos_source = DEFAULT_DEMOS if args.demos == DEFAULT_DEMOS else portable_path(args.demos)
    instruction = getattr(args, "instruction", None) or ""
    if getattr(args, "instruction", None) is not None:
        from hcnr_jax.data.recipes import PROMPT_BASED_INSTRUCTION

        instruction = PROMPT_BASED_INSTRUCTION if args.instruction == "prompt-based" else args.instruction.strip()
        if not instruction:
            raise HcnrError("--instruction must not be empty")
    return EvalSettings(benchmarks=resolve_benchmarks(args.benchmarks, args.data_dir), limit=args.limit,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                        data_dir=args.data_dir, rules=args.rules, embedding=args.embedding,
                        bootstrap=args.bootstrap, demos=demos, demos_source=demos_source,
                        instruction=instruction,
                        task_data=portable_path(args.task_data) if rows else "",
                        task_data_sha256=sha256_file(args.task_data) if rows else "")


def _unfinished(out: Path) -> bool:
    """An `hcnr eval` output of an older version that was stopped: records, no metrics. It is
    resumed (its records seed the run) and replaced, as those versions did."""
    return out.is_dir() and (out / "examples.jsonl").is_file() and not (out / "metrics.json").exists()


def publish(args: argparse.Namespace, settings, names: tuple[str, str], resume_from: bool) -> None:
    """Evaluate in the user cache's run folder (a stopped run resumes there), then write --out whole."""
    import contextlib
    import shutil

    from hcnr_jax.commands.cache import say_kept
    from hcnr_jax.io import atomic_output_dir

    with contextlib.ExitStack() as stack:
        work, run = evaluate_cached(stack, args, args.model, args.reference, settings, names,
                                    seed_from=Path(args.out) if resume_from else None)
        with atomic_output_dir(args.out, overwrite=args.overwrite or resume_from) as tmp:
            for f in OUTPUTS:
                shutil.copy2(work / f, tmp / f)
    say_kept(run)


OUTPUTS = ("settings.json", "examples.jsonl", "metrics.json", "table.md")


def evaluate_cached(stack, args: argparse.Namespace, model_src: str, reference_src: str | None, settings,
                    names: tuple[str, str], seed_from: Path | None = None):
    """Evaluate ``model_src`` (against ``reference_src``) in its user-cache run folder, entered on
    ``stack`` (removed when the stack closes, after success, unless --keep-cache; kept after an
    error or Ctrl-C so that the same command resumes); a temporary folder with --no-cache.
    ``seed_from``: an older version's stopped output whose records the run starts from. Returns
    (the folder holding `OUTPUTS`, the `hcnr_jax.user_cache.Run` or None)."""
    import shutil
    import tempfile

    from hcnr_jax import user_cache
    from hcnr_jax.commands.cache import run_folder
    from hcnr_jax.eval.runner import RECORDED_SETTINGS, evaluate, settings_record
    from hcnr_jax.pretrained import load_pretrained

    record = settings_record(settings, *names)
    identity = {"model": user_cache.source_identity(model_src), "reference": user_cache.source_identity(reference_src),
                "settings": {k: v for k, v in record.items() if k not in ("bootstrap", *RECORDED_SETTINGS)}}
    run = stack.enter_context(run_folder(args, "eval", identity, f"hcnr eval --model {model_src}"))
    work = run.path / "eval" if run is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
    if run is not None and run.resumed:
        print(f"{names[0]}: resuming the stopped evaluation kept in {work}", flush=True)
    if seed_from is not None and not (work / "examples.jsonl").exists():
        work.mkdir(parents=True, exist_ok=True)
        for f in ("examples.jsonl", "settings.json"):
            if (seed_from / f).is_file():
                shutil.copy2(seed_from / f, work / f)
    model = load_pretrained(model_src, dtype=compute_dtype())
    reference = load_pretrained(reference_src, dtype=compute_dtype()) if reference_src else None
    evaluate(model, work, settings, reference, *names)
    return work, run


def compute_dtype() -> str | None:
    """"float32" on a CPU, else None (the stored dtype). XLA's CPU backend multiplies bfloat16 about
    2.6x slower than float32 (a 16 x 576 x 1536 matmul, 1.29 against 0.49 ms on this project's
    machines), and upcasting stored bfloat16 / float16 weights is exact: a repaired model written in
    bfloat16 is then scored on the very weights it holds, computed as its float32 reference is."""
    import jax

    return "float32" if jax.default_backend() == "cpu" else None
