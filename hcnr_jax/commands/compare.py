"""`hcnr compare --model BEFORE --model AFTER [...] --out DIR`: one before/after table of several
models on the same examples, with paired differences (hcnr_jax/eval/compare.py)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

DESCRIPTION = """\
Evaluate every --model on the same questions (as `hcnr eval` does; each model's records are kept in
the user cache while the command runs, so a stopped run resumes), or read --eval-dir folders that
`hcnr eval` wrote, and print one table: each model's scores and each later model's difference from
the first with a 95% paired-bootstrap interval. Writes DIR/compare.md, compare.json, compare.png
and each model's evaluation under DIR/models/."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from hcnr_jax.commands.cache import add_flags
    from hcnr_jax.commands.eval import add_eval_options

    p = sub.add_parser("compare", help="before/after table of several models on the same examples (paired differences)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], metavar="SRC",
                   help="a model to evaluate (HF dir, .gguf, hub id, BASE+ADAPTER_DIR); twice or more, the first "
                        "is 'before' (e.g. the fine-tuned model, then the repaired one)")
    p.add_argument("--eval-dir", action="append", default=[], metavar="DIR",
                   help="instead of --model: an `hcnr eval` output folder (its evaluated model's records); twice or more")
    p.add_argument("--name", action="append", default=[],
                   help="a name per model, in order (default: from the source: its folder or file name)")
    add_eval_options(p)
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_flags(p, "evaluation records")
    p.set_defaults(func=run)


def short_name(src: str) -> str:
    """A model's name for table columns: the folder or file name of each part of its source."""
    from hcnr_jax.source import ModelSource

    s = ModelSource.parse(src)
    base = s.base if s.hub else Path(s.base).name.removesuffix(".gguf")
    return "+".join([base, *(Path(a).name for a in s.adapters)])


def _names(args: argparse.Namespace, sources: list[str]) -> list[str]:
    from hcnr_jax.errors import HcnrError

    if args.name and len(args.name) != len(sources):
        raise HcnrError(f"--name given {len(args.name)} times for {len(sources)} models: one per model, in order")
    names = list(args.name) or [short_name(s) for s in sources]
    for i, n in enumerate(names):  # the same folder name twice (a/model, b/model): number them
        if names.count(n) > 1:
            names[i] = f"{n} ({i + 1})"
    return names


def run(args: argparse.Namespace) -> int:
    from hcnr_jax.errors import HcnrError
    from hcnr_jax.io import check_output_apart

    if args.model and args.eval_dir:
        raise HcnrError("give --model or --eval-dir, not both")
    sources = args.model or args.eval_dir
    if len(sources) < 2:
        raise HcnrError("give at least two --model (or --eval-dir): the first is 'before', the others are compared "
                        "with it")
    names = _names(args, sources)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise HcnrError(f"{out}: output directory already exists (choose another path or pass --overwrite)")
    check_output_apart(out, [("--model", s) for s in args.model] + [("--eval-dir", d) for d in args.eval_dir],
                       replaces=args.overwrite)
    if args.eval_dir:
        from hcnr_jax.eval.compare import load_eval_dir

        loaded = [load_eval_dir(d) for d in args.eval_dir]  # every folder checked before anything is written
        _write(args, names, [recs for recs, _ in loaded], {n: Path(d) for n, d in zip(names, args.eval_dir,
                                                                                       strict=True)})
        return 0
    _compare_models(args, names)
    return 0


def _compare_models(args: argparse.Namespace, names: list[str]) -> None:
    import contextlib

    from hcnr_jax.commands.cache import say_kept
    from hcnr_jax.commands.eval import build_settings, evaluate_cached, source_name
    from hcnr_jax.eval.runner import read_records

    settings = build_settings(args)
    with contextlib.ExitStack() as stack:
        works, runs = {}, []
        for name, src in zip(names, args.model, strict=True):
            print(f"evaluating {name} ({src})", flush=True)
            work, run = evaluate_cached(stack, args, src, None, settings, (source_name(src), ""))
            works[name] = work
            runs.append(run)
        records = [[r for r in read_records(w / "examples.jsonl") if r["model"] == "model"] for w in works.values()]
        _write(args, names, records, works)
    for run in runs:
        say_kept(run)


def _write(args: argparse.Namespace, names: list[str], records: list[list[dict]], evals: dict[str, Path]) -> None:
    """compare.md/.json/.png and each model's evaluation files, written whole into --out."""
    import shutil

    from hcnr_jax.commands.eval import OUTPUTS
    from hcnr_jax.eval.compare import compare
    from hcnr_jax.eval.report import compare_plot, compare_table
    from hcnr_jax.io import atomic_output_dir, finite_json

    result = compare(names, records, resamples=args.bootstrap, seed=args.seed)
    result["sources"] = list(args.model or args.eval_dir)
    table = compare_table(result)
    with atomic_output_dir(args.out, overwrite=args.overwrite) as tmp:
        (tmp / "compare.md").write_text(table, encoding="utf-8")
        (tmp / "compare.json").write_text(finite_json(result, indent=1) + "\n", encoding="utf-8")
        compare_plot(result, tmp / "compare.png")
        for name, folder in evals.items():
            dest = tmp / "models" / re.sub(r"[^A-Za-z0-9._+-]+", "_", name)
            dest.mkdir(parents=True, exist_ok=True)
            for f in OUTPUTS:
                if (folder / f).is_file():
                    shutil.copy2(folder / f, dest / f)
    print(table)
    print(f"wrote {args.out}: compare.md, compare.json, compare.png, models/ (each model's evaluation)")
