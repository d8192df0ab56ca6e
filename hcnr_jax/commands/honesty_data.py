"""`hcnr honesty-data --recipe R --out FILE`: honesty training data (SFT or preference pairs) from the
benchmarks' calibration pools (never overlapping the evaluation splits), labelled by gold answers or
by the model's own answers (`hcnr_jax.train.recipes`)."""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_BENCHMARKS = ("falseqa", "nec", "refunq", "kuq", "selfaware", "triviaqa")
# = hcnr_jax.train.recipes.RECIPES, not imported: `hcnr --help` should not load the trainer.
RECIPES = ("label", "rait", "absolute", "confidence-num", "confidence-verb", "multisample", "dpo-pairs")
# What each model-based recipe generates: greedy answers and/or m sampled answers per question.
GREEDY = {"rait", "absolute", "confidence-num", "confidence-verb", "dpo-pairs"}
SAMPLED = {"absolute", "confidence-num", "confidence-verb", "multisample"}


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
    from hcnr_jax.errors import DataError, HcnrError
    from hcnr_jax.eval.data import BENCHMARKS

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


def _load_pools(names: list[str], given: bool, args: argparse.Namespace) -> dict[str, list[dict]]:
    """Calibration pools; with the default list, benchmarks that cannot be read are skipped (logged)."""
    from hcnr_jax.errors import DataError
    from hcnr_jax.train.recipes import pools

    out: dict[str, list[dict]] = {}
    for name in names:
        try:
            out.update(pools([name], args.data_dir, args.limit))
        except DataError as e:
            if given:
                raise
            log.warning("skipping %s: %s", name, e)
    if not out or not any(out.values()):
        raise DataError(f"--benchmarks: no calibration rows in {', '.join(names)} (data dir {args.data_dir})")
    return out


def _generate(model: Any, prompts: list[str], args: argparse.Namespace, copies: int,
              sample: bool) -> list[list[str]]:
    """``copies`` answers per prompt (each prompt repeated; every index has its own random stream)."""
    from hcnr_jax.generation import generate

    flat = [p for p in prompts for _ in range(copies)]
    if not flat:
        return [[] for _ in prompts]
    kw = dict(temperature=args.temperature, top_p=1.0, seed=args.seed) if sample else {}  # greedy: the default
    out = generate(model, flat, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                   progress="sampled answers" if sample else "greedy answers", **kw)
    return [out[i * copies : (i + 1) * copies] for i in range(len(prompts))]


def _model_records(rows: list[dict], args: argparse.Namespace, idk: str) -> tuple[list[dict], int]:
    """(records, rows dropped) of a model-based recipe; generation covers only the rows that need it."""
    from hcnr_jax.eval.metrics import contains_answer
    from hcnr_jax.eval.refusal import RefusalDetector
    from hcnr_jax.pretrained import load_pretrained
    from hcnr_jax.train import recipes as R

    recipe = args.recipe
    # Unanswerable rows always get idk: only DPO needs the model's answer to them (as the rejected one).
    todo = [i for i, r in enumerate(rows) if recipe == "dpo-pairs" or r["unanswerable"] != 1]
    cache = AnswerCache(args)
    need_greedy = [i for i in todo if recipe in GREEDY and rows[i]["id"] not in cache.greedy]
    need_sampled = [i for i in todo if recipe in SAMPLED and rows[i]["id"] not in cache.sampled]
    if need_greedy or need_sampled:
        model = load_pretrained(args.model)
        for i, g in zip(need_greedy, _generate(model, [rows[i]["question"] for i in need_greedy], args, 1,
                                               sample=False), strict=True):
            cache.greedy[rows[i]["id"]] = g[0]
        # Sampling streams are indexed by position in the prompt list: a question's samples depend on
        # which others are generated with it, so the cache (not a rerun) is what makes them reusable.
        for i, s in zip(need_sampled, _generate(model, [rows[i]["question"] for i in need_sampled], args,
                                                args.samples, sample=True), strict=True):
            cache.sampled[rows[i]["id"]] = s
        cache.save()
    greedy = [cache.greedy.get(r["id"], "") if recipe in GREEDY else "" for r in rows]
    sampled = [cache.sampled.get(r["id"], []) if recipe in SAMPLED else [] for r in rows]
    if recipe == "rait":
        return R.rait(rows, greedy, idk), 0
    if recipe == "absolute":
        return R.absolute(rows, sampled, args.tau, idk, greedy=greedy), 0
    if recipe.startswith("confidence-"):
        return R.confidence(rows, sampled, recipe.split("-")[1], args.tau, idk, greedy=greedy), 0
    if recipe == "multisample":
        return R.multisample(rows, sampled, idk), 0
    # dpo-pairs: an unknown question whose answer is empty or already a refusal has nothing to reject.
    known = [r["unanswerable"] != 1 and contains_answer(g, r["answers"])
             for r, g in zip(rows, greedy, strict=True)]
    detector = RefusalDetector()
    keep = [i for i, r in enumerate(rows)
            if known[i] or (greedy[i].strip() and detector.detect(greedy[i], r["question"]).verdict != "refused")]
    pairs = R.preference_pairs([rows[i] for i in keep], [known[i] for i in keep], [greedy[i] for i in keep], idk)
    return pairs, len(rows) - len(keep)


class AnswerCache:
    """``--answers FILE``: the model's greedy and sampled answers by question id, with the settings
    that produced them. A file made with other settings is an error naming the setting."""

    def __init__(self, args: argparse.Namespace) -> None:
        import json

        from hcnr_jax.errors import DataError
        from hcnr_jax.io import portable_path
        from hcnr_jax.source import ModelSource

        self.path = Path(args.answers) if args.answers else None
        self.settings = dict(model=ModelSource.parse(args.model).describe(portable_path), samples=args.samples, temperature=args.temperature,
                             seed=args.seed, max_new_tokens=args.max_new_tokens)
        self.greedy: dict[str, str] = {}
        self.sampled: dict[str, list[str]] = {}
        if self.path is None or not self.path.exists():
            return
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            old, greedy, sampled = doc["settings"], doc["greedy"], doc["sampled"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"--answers {self.path}: not an answers file of hcnr honesty-data ({e})") from None
        changed = [k for k, v in self.settings.items() if old.get(k) != v]
        if changed:
            raise DataError(f"--answers {self.path}: holds answers made with other settings ("
                            + ", ".join(f"{k} {old.get(k)!r}, now {self.settings[k]!r}" for k in changed)
                            + "); use another file")
        if not (isinstance(greedy, dict) and isinstance(sampled, dict)
                and all(isinstance(v, str) for v in greedy.values())
                and all(isinstance(v, list) and len(v) == args.samples for v in sampled.values())):
            raise DataError(f"--answers {self.path}: 'greedy' must map ids to strings and 'sampled' ids to "
                            f"lists of {args.samples} strings")
        self.greedy, self.sampled = greedy, sampled

    def save(self) -> None:
        import json

        from hcnr_jax.io import atomic_write_text

        if self.path is not None:
            atomic_write_text(self.path, json.dumps(dict(settings=self.settings, greedy=self.greedy,
                                                         sampled=self.sampled), ensure_ascii=False))


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
    from hcnr_jax.errors import DataError
    from hcnr_jax.eval.calibration import write_jsonl
    from hcnr_jax.train import recipes as R

    names, given = _validate(args)
    idk = args.idk_response or R.A4H_IDK
    by_benchmark = _load_pools(names, given, args)
    rows = [r for pool in by_benchmark.values() for r in pool]
    if args.recipe == "label":
        records, dropped = R.label_based(rows, idk), 0
    else:
        records, dropped = _model_records(rows, args, idk)
    if args.balance:
        records = R.balance(records, "known", args.seed)
    if not records:
        raise DataError(f"--recipe {args.recipe}: no examples left ({dropped} questions dropped); nothing written")
    write_jsonl(records, args.out)
    print(_summary(records, by_benchmark, dropped, args))
    return 0
