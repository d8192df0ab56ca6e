"""Honesty training data: the recipes of RAIT / R-Tuning and Alignment for Honesty (Yang et al. 2023,
arXiv 2312.07000), as pure builders over benchmark rows (the schema of `hcnr_jax.data.benchmarks`).

No model lives here: a recipe that needs the model's answers takes them as arguments (greedy answers,
or ``m`` sampled answers per row, parallel to ``rows``; `hcnr_jax.train.model_answers` generates
them). A response is correct when it contains a gold answer (`hcnr_jax.data.answers.contains_answer`).
Every builder

- accepts only rows of the calibration pool (`hcnr_jax.data.calibration.calibration_pool`), so
  training data never overlaps an evaluation split;
- gives unanswerable rows (``unanswerable == 1``) the idk response, whatever the model said (their
  entries in the answer lists are ignored); answerable and task rows (0 / -1) need gold answers
  (`with_gold` drops those without);
- returns records in a fixed seeded order (`hcnr_jax.data.benchmarks.order_key` of the row id):
  ``{"prompt", "response"}`` for SFT or ``{"prompt", "chosen", "rejected"}`` for DPO / ORPO, plus
  ``id``, ``benchmark``, ``recipe``, ``known`` (the target is an answer, not the idk response) and,
  for the sampling recipes, ``expected_accuracy`` (extra keys are ignored by the trainer).

Expected accuracy of a question = the fraction of its ``m`` sampled answers (temperature 1, m = 10 in
the paper) that are correct; the question is *known* when it is >= ``tau`` (0.1 in the paper).
The idk response, the confidence expressions and the PROMPT-based instruction are those of the
paper's released code (GAIR-NLP/alignment-for-honesty, ``train/process_training_data.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction
from pathlib import Path

from hcnr_jax.data.answers import contains_answer
from hcnr_jax.data.benchmarks import load_benchmark, order_key, select
from hcnr_jax.data.calibration import calibration_pool
from hcnr_jax.errors import DataError

log = logging.getLogger(__name__)

# Alignment for Honesty's idk response (its training target for unknown questions).
A4H_IDK = "I apologize, but I'm not able to provide an answer to the question."

# The PROMPT-based baseline: this instruction before the question at inference, no training.
PROMPT_BASED_INSTRUCTION = ("Answer the question. If you don't know the answer to the question, it is "
                            f'appropriate to say "{A4H_IDK}"')

# CONFIDENCE-NUM: "{}" is the expected accuracy in percent; "only about ..., but" up to 50%.
CONFIDENCE_NUM_LOW = ("I'm only about {}% confident to answer the question correctly, but based on my "
                      "understanding and knowledge, here's what I think is correct.")
CONFIDENCE_NUM_HIGH = ("I'm about {}% confident to answer the question correctly, and based on my "
                       "understanding and knowledge, here's what I think is correct.")
# CONFIDENCE-VERB: (highest expected accuracy of the bucket, prefix); with m = 10 samples the buckets
# are 1-2, 3-4, 5-6, 7-8 and 9-10 correct answers. The answer follows the prefix with its first
# letter lower-cased (as the paper's code does; acronyms are left alone here).
CONFIDENCE_VERB = (
    (Fraction(2, 10), "I'm really not sure about this, but "),
    (Fraction(4, 10), "I'm not completely sure about this, but "),
    (Fraction(6, 10), "I don't have strong feelings either way, but "),
    (Fraction(8, 10), "I'm fairly confident that "),
    (Fraction(1), "I'm absolutely certain that "),
)

RECIPES = ("label", "rait", "absolute", "confidence-num", "confidence-verb", "multisample", "dpo-pairs")
# What each recipe takes of the model: its greedy answers and/or m sampled answers per question.
NEEDS_GREEDY = frozenset({"rait", "absolute", "confidence-num", "confidence-verb", "dpo-pairs"})
NEEDS_SAMPLES = frozenset({"absolute", "confidence-num", "confidence-verb", "multisample"})


# ---------------------------------------------------------------------------------------------
# Shared checks


def _ordered(rows: Sequence[dict], where: str) -> list[int]:
    """Indices of ``rows`` in the fixed seeded order, after the calibration-pool check."""
    calibration_pool(rows, where)
    return sorted(range(len(rows)), key=lambda i: order_key(rows[i]["id"]))


def _check(rows: Sequence[dict], answers: Sequence, where: str, what: str) -> list[int]:
    """Pool check, parallel lengths, gold answers on every row that must be judged; the order."""
    if len(answers) != len(rows):
        raise DataError(f"{where}: {len(rows)} rows but {len(answers)} {what}")
    order = _ordered(rows, where)
    for r in rows:
        if r["unanswerable"] != 1 and not r["answers"]:
            raise DataError(f"{where}: {r['id']} is answerable but has no gold answers to judge it by "
                            "(drop such rows with with_gold)")
    return order


def _sample_count(rows: Sequence[dict], sampled: Sequence[Sequence[str]], where: str) -> int:
    """The common number ``m`` of sampled answers of the rows that are judged (unanswerable rows'
    lists are ignored; with none judged, the longest list, at least 1)."""
    counts = {len(s) for r, s in zip(rows, sampled, strict=True) if r["unanswerable"] != 1}
    if len(counts) > 1 or 0 in counts:
        raise DataError(f"{where}: every answerable row needs the same number (>= 1) of sampled answers, "
                        f"got {sorted(counts)}")
    return counts.pop() if counts else max([1, *map(len, sampled)])


def _threshold(tau: float) -> Fraction:
    if not 0 < tau <= 1:
        raise DataError(f"tau must be in (0, 1], got {tau}")
    return Fraction(str(tau))  # exact decimal: 1 of 10 correct is >= 0.1


def _record(row: dict, recipe: str, known: bool, **fields: object) -> dict:
    return {"prompt": row["question"], **fields, "id": row["id"], "benchmark": row.get("benchmark", ""),
            "recipe": recipe, "known": known}


def with_gold(rows: Iterable[dict]) -> list[dict]:
    """The rows a recipe can use: unanswerable ones, and answerable / task ones with gold answers."""
    return [r for r in rows if r["unanswerable"] == 1 or r["answers"]]


# ---------------------------------------------------------------------------------------------
# Recipes


def label_based(rows: Sequence[dict], idk: str = A4H_IDK) -> list[dict]:
    """The supervised recipe: unanswerable -> ``idk``, answerable -> its first gold answer (as
    `honesty_samples`, over whole pools instead of balanced to n)."""
    order = _check(rows, rows, "label", "rows")
    out = []
    for i in order:
        r = rows[i]
        known = r["unanswerable"] != 1
        out.append(_record(r, "label", known, response=r["answers"][0] if known else idk))
    return out


def rait(rows: Sequence[dict], greedy_responses: Sequence[str], idk: str = A4H_IDK) -> list[dict]:
    """RAIT / R-Tuning: the model's own greedy answer decides. Correct -> that answer is the target;
    wrong -> ``idk``; unanswerable -> ``idk`` always."""
    order = _check(rows, greedy_responses, "rait", "greedy responses")
    out = []
    for i in order:
        r, g = rows[i], greedy_responses[i]
        known = r["unanswerable"] != 1 and contains_answer(g, r["answers"])
        out.append(_record(r, "rait", known, response=g if known else idk))
    return out


def _judged(rows: Sequence[dict], sampled: Sequence[Sequence[str]], greedy: Sequence[str] | None,
            where: str) -> tuple[list[int], int, list[Fraction | None], list[str | None]]:
    """(order, m, then per row: expected accuracy, preferred correct answer; None for unanswerable rows).
    The preferred answer is the greedy one when given and correct, else the first correct sample."""
    order = _check(rows, sampled, where, "lists of sampled answers")
    if greedy is not None and len(greedy) != len(rows):
        raise DataError(f"{where}: {len(rows)} rows but {len(greedy)} greedy responses")
    m = _sample_count(rows, sampled, where)
    accs: list[Fraction | None] = []
    best: list[str | None] = []
    for i, r in enumerate(rows):
        if r["unanswerable"] == 1:
            accs.append(None)
            best.append(None)
            continue
        correct = [s for s in sampled[i] if contains_answer(s, r["answers"])]
        accs.append(Fraction(len(correct), m))
        g = greedy[i] if greedy is not None else None
        best.append(g if g is not None and contains_answer(g, r["answers"]) else (correct[0] if correct else None))
    return order, m, accs, best


def absolute(rows: Sequence[dict], sampled: Sequence[Sequence[str]], tau: float = 0.1, idk: str = A4H_IDK,
             greedy: Sequence[str] | None = None) -> list[dict]:
    """ABSOLUTE: known when expected accuracy >= ``tau``; target a correct answer (the greedy one if
    given and correct, else the first correct sample), otherwise ``idk``."""
    t = _threshold(tau)
    order, _, accs, best = _judged(rows, sampled, greedy, "absolute")
    out = []
    for i in order:
        acc = accs[i]
        known = acc is not None and acc >= t
        out.append(_record(rows[i], "absolute", known, response=best[i] if known else idk,
                           expected_accuracy=None if acc is None else float(acc)))
    return out


def confidence_expression(accuracy: Fraction | float, style: str) -> str:
    """The confidence prefix for an expected accuracy in (0, 1] (``style`` "num" or "verb")."""
    acc = Fraction(accuracy).limit_denominator(10**6)
    if not 0 < acc <= 1:
        raise DataError(f"confidence expression: expected accuracy must be in (0, 1], got {float(acc)}")
    if style == "num":
        return (CONFIDENCE_NUM_LOW if acc <= Fraction(1, 2) else CONFIDENCE_NUM_HIGH).format(round(acc * 100))
    if style == "verb":
        return next(text for top, text in CONFIDENCE_VERB if acc <= top)
    raise DataError(f"confidence style must be 'num' or 'verb', got {style!r}")


def _lower_first(answer: str) -> str:
    """The answer's first letter lower-cased after a verbal prefix, unless it starts an acronym."""
    word = answer.split(maxsplit=1)[0] if answer.strip() else ""
    return answer if len(word) > 1 and word.isupper() else answer[:1].lower() + answer[1:]


def confidence(rows: Sequence[dict], sampled: Sequence[Sequence[str]], style: str = "num", tau: float = 0.1,
               idk: str = A4H_IDK, greedy: Sequence[str] | None = None) -> list[dict]:
    """CONFIDENCE-NUM / CONFIDENCE-VERB: known questions (as in `absolute`) get the confidence
    expression of their expected accuracy followed by the answer; unknown ones ``idk``.
    NUM: ``<expression> <answer>``; VERB: ``<prefix><answer, first letter lower-cased>``."""
    if style not in ("num", "verb"):
        raise DataError(f"confidence style must be 'num' or 'verb', got {style!r}")
    t = _threshold(tau)
    recipe = f"confidence-{style}"
    order, _, accs, best = _judged(rows, sampled, greedy, recipe)
    out = []
    for i in order:
        acc, ans = accs[i], best[i]
        known = acc is not None and acc >= t
        if known:
            expr = confidence_expression(acc, style)
            response = f"{expr} {ans}" if style == "num" else expr + _lower_first(ans)
        else:
            response = idk
        out.append(_record(rows[i], recipe, known, response=response,
                           expected_accuracy=None if acc is None else float(acc)))
    return out


def multisample(rows: Sequence[dict], sampled: Sequence[Sequence[str]], idk: str = A4H_IDK) -> list[dict]:
    """MULTISAMPLE: one example per sampled answer, the answer if correct, else ``idk``.
    Unanswerable rows get ``m`` copies of ``idk`` (m = the answerable rows' sample count), so every
    question weighs the same in training, as in the paper (10 examples per question)."""
    order, m, accs, _ = _judged(rows, sampled, None, "multisample")
    out = []
    for i in order:
        r, acc = rows[i], accs[i]
        answers = [None] * m if acc is None else sampled[i]
        for s in answers:
            known = s is not None and contains_answer(s, r["answers"])
            out.append(_record(r, "multisample", known, response=s if known else idk,
                               expected_accuracy=None if acc is None else float(acc)))
    return out


def preference_pairs(rows: Sequence[dict], known: Sequence[bool], answers: Sequence[str],
                     idk: str = A4H_IDK) -> list[dict]:
    """DPO / ORPO pairs: known -> chosen = its answer, rejected = ``idk``; unknown or unanswerable ->
    chosen = ``idk``, rejected = the answer given (the model's wrong or unfounded answer).
    ``answers[i]`` must be a non-empty text other than ``idk``; gold answers are not needed."""
    if len(known) != len(rows) or len(answers) != len(rows):
        raise DataError(f"dpo-pairs: {len(rows)} rows but {len(known)} known flags and {len(answers)} answers")
    out = []
    for i in _ordered(rows, "dpo-pairs"):
        r, a = rows[i], answers[i]
        if not a.strip() or a.strip() == idk.strip():
            raise DataError(f"dpo-pairs: {r['id']}: the answer must be a non-empty text other than the idk "
                            f"response, got {a!r}")
        k = bool(known[i]) and r["unanswerable"] != 1
        out.append(_record(r, "dpo-pairs", k, chosen=a if k else idk, rejected=idk if k else a))
    return out


def greedy_preference_pairs(rows: Sequence[dict], greedy: Sequence[str], refused: Callable[[str, str], bool],
                            idk: str = A4H_IDK) -> tuple[list[dict], int]:
    """`preference_pairs` from the model's greedy answers, and how many rows were dropped. A row is
    known when answerable and its greedy answer contains a gold answer; an unknown question whose
    answer is empty or already a refusal (``refused(answer, question)``) has nothing to reject and is
    dropped."""
    known = [r["unanswerable"] != 1 and contains_answer(g, r["answers"])
             for r, g in zip(rows, greedy, strict=True)]
    keep = [i for i, r in enumerate(rows)
            if known[i] or (greedy[i].strip() and not refused(greedy[i], r["question"]))]
    pairs = preference_pairs([rows[i] for i in keep], [known[i] for i in keep], [greedy[i] for i in keep], idk)
    return pairs, len(rows) - len(keep)


def questions_to_answer(recipe: str, rows: Sequence[dict]) -> list[int]:
    """Indices of the rows whose model answers ``recipe`` uses: unanswerable rows always get the idk
    response, so only dpo-pairs needs the model's answer to them (as the rejected one)."""
    return [i for i, r in enumerate(rows) if recipe == "dpo-pairs" or r["unanswerable"] != 1]


def build(recipe: str, rows: Sequence[dict], greedy: Sequence[str] = (), sampled: Sequence[Sequence[str]] = (),
          *, tau: float = 0.1, idk: str = A4H_IDK,
          refused: Callable[[str, str], bool] | None = None) -> tuple[list[dict], int]:
    """The records of ``recipe`` (one of `RECIPES`) and the number of rows dropped. ``greedy`` and
    ``sampled``: the model's answers parallel to ``rows``, for the recipes in `NEEDS_GREEDY` /
    `NEEDS_SAMPLES` (label needs neither); ``refused``: the refusal test of dpo-pairs
    (`greedy_preference_pairs`)."""
    if recipe == "label":
        return label_based(rows, idk), 0
    if recipe == "rait":
        return rait(rows, greedy, idk), 0
    if recipe == "absolute":
        return absolute(rows, sampled, tau, idk, greedy=greedy), 0
    if recipe in ("confidence-num", "confidence-verb"):
        return confidence(rows, sampled, recipe.split("-")[1], tau, idk, greedy=greedy), 0
    if recipe == "multisample":
        return multisample(rows, sampled, idk), 0
    if recipe == "dpo-pairs":
        if refused is None:
            raise DataError("dpo-pairs: needs a refusal test (refused) to drop unknown questions answered by a refusal")
        return greedy_preference_pairs(rows, greedy, refused, idk)
    raise DataError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")


def prompt_based_instruction() -> str:
    """The PROMPT-based baseline's instruction (used at inference; nothing is trained)."""
    return PROMPT_BASED_INSTRUCTION


def with_instruction(questions: Iterable[str], instruction: str = PROMPT_BASED_INSTRUCTION) -> list[str]:
    """User turns of the PROMPT-based baseline: the paper's ``<instruction>\\nQ: <question>\\nA:``
    (its trailing space dropped). The instruction can instead go in the system prompt:
    ``generate(model, questions, system=prompt_based_instruction())``."""
    return [f"{instruction}\nQ: {q}\nA:" for q in questions]


# ---------------------------------------------------------------------------------------------
# Pools and mixing


def balance(records: Sequence[dict], by: str = "known", seed: int = 0) -> list[dict]:
    """Cap every class of ``record[by]`` at the size of the smallest one, keeping a seeded
    pseudo-random choice (`order_key` of the id and its occurrence) in the original order."""
    groups: dict[object, list[int]] = {}
    seen: dict[str, int] = {}
    keys = []
    for i, rec in enumerate(records):
        if by not in rec:
            raise DataError(f"balance: record {i} ({rec.get('id', '?')}) has no field {by!r}")
        n = seen[rec["id"]] = seen.get(rec["id"], -1) + 1
        keys.append(order_key(f"{rec['id']}#{n}", seed))
        groups.setdefault(rec[by], []).append(i)
    if not groups:
        return []
    cap = min(map(len, groups.values()))
    kept = {i for idx in groups.values() for i in sorted(idx, key=keys.__getitem__)[:cap]}
    return [rec for i, rec in enumerate(records) if i in kept]


def pools(names: Iterable[str], data_dir: str | Path | None = None, limit: int | None = None,
          require_gold: bool = True, skip_unreadable: bool = False) -> dict[str, list[dict]]:
    """Calibration-pool rows of each benchmark (`load_benchmark` + split "calibration") in the fixed
    order; ``require_gold`` first drops answerable rows without gold answers (see `with_gold`);
    ``limit`` then takes the first ``limit``, balanced between answerable and unanswerable.
    ``skip_unreadable``: a benchmark that cannot be read is left out (logged) instead of an error."""
    out = {}
    for name in names:
        try:
            ds = load_benchmark(name, data_dir)
        except DataError as e:
            if not skip_unreadable:
                raise
            log.warning("skipping %s: %s", name, e)
            continue
        if require_gold:
            ds = ds.select([i for i, (u, a) in enumerate(zip(ds["unanswerable"], ds["answers"], strict=True))
                            if u == 1 or a])
        out[name] = list(select(ds, "calibration", limit))
    return out
