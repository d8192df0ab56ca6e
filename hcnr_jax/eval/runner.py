"""`hcnr eval` driver: generate, classify and score, example by example, resumably.

Output directory:
    examples.jsonl   one record per (model, benchmark, example): question, label, response,
                     verdict (+ reason), outcome; appended batch by batch, so a stopped run resumes
    metrics.json     per benchmark metrics (refusal F1 / rates / RF delta; honesty vs reference;
                     task accuracy) with their denominators and 95% bootstrap intervals (``<key>_ci``),
                     averages over the refusal benchmarks, the settings, and where each benchmark
                     was read from; an undefined score (e.g. precision without a single predicted
                     refusal) is null, never NaN
    table.md         the same as a markdown table
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from hcnr_jax import interrupt
from hcnr_jax.errors import DataError, HcnrError
from hcnr_jax.eval import metrics as M
from hcnr_jax.eval import task_data
from hcnr_jax.eval.data import BENCHMARKS, REFUSAL_BENCHMARKS, load_benchmark, locate, select
from hcnr_jax.eval.refusal import RefusalDetector
from hcnr_jax.generation import PackShape, _bucket, chat_prompts, generate_ids, pack_shape
from hcnr_jax.io import atomic_write_text, finite_json
from hcnr_jax.model import forward, lm_head

log = logging.getLogger(__name__)

MCQ_LETTERS = "ABCD"


@dataclass
class EvalSettings:
    benchmarks: tuple[str, ...] = REFUSAL_BENCHMARKS
    limit: int | None = None
    max_new_tokens: int = 64
    batch_size: int = 16
    seed: int = 0
    data_dir: str | None = None
    rules: str = "default"
    embedding: bool = False
    bootstrap: int = M.BOOTSTRAP_RESAMPLES  # resamples for the 95% intervals (0: none)
    # In-context demonstrations: (prompt, response) turns put before every question, in order
    # (`hcnr eval --demos`; the ICL baseline), and where they came from ("default", a file, "").
    demos: tuple[tuple[str, str], ...] = ()
    demos_source: str = ""
    # An instruction put before every question of `model` (`hcnr eval --instruction`; "prompt-based"
    # is Alignment for Honesty's PROMPT-based baseline) in that paper's "<instruction>\nQ: ...\nA:".
    instruction: str = ""
    # The user's own task (`hcnr eval --task-data FILE`, hcnr_jax/eval/task_data.py): its path as
    # recorded, and its sha256 (resuming needs the same file contents).
    task_data: str = ""
    task_data_sha256: str = ""


# Settings that only change how records are scored: a run may resume under other values.
SCORING_SETTINGS = ("benchmarks", "bootstrap")
# Settings recorded for the reader only: resuming compares the demonstrations themselves.
RECORDED_SETTINGS = ("demos_source",)


def mcq_prompt(question: str, options: Sequence[str]) -> str:
    opts = "\n".join(f"{MCQ_LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{question}\n{opts}\nAnswer with the letter of the correct option."


@partial(jax.jit, static_argnames=("cfg",))
def _last_logprobs(params: Any, cfg: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Log-probabilities of the next token after left-padded prompts ``[B, T]`` -> ``[B, V]``."""
    out = forward(params, cfg, ids, mask, return_logits=False)
    return jax.nn.log_softmax(lm_head(params, cfg, out.hidden[:, -1:])[:, 0], axis=-1)


def option_logliks(model: Any, questions: Sequence[str], options: Sequence[Sequence[str]],
                   batch_size: int = 16, demos: Sequence[tuple[str, str]] = ()) -> np.ndarray:
    """Log-likelihood of each option letter as the assistant's first token ``[N, 4]`` (after the
    in-context ``demos``, if any)."""
    tok = model.tokenizer
    letter_ids = []
    for letter in MCQ_LETTERS:
        ids = tok(letter, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise DataError(f"{model.source}: option letter {letter!r} is not a single token ({ids})")
        letter_ids.append(ids[0])
    texts = chat_prompts(tok, [mcq_prompt(q, o) for q, o in zip(questions, options, strict=True)], demos=demos)
    prompt_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    pad = tok.pad_token_id or 0
    out = []
    for s in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[s : s + batch_size]
        width = _bucket(max(map(len, chunk)))
        ids = np.full((batch_size, width), pad, np.int32)
        mask = np.zeros((batch_size, width), bool)
        for r, p in enumerate(chunk):
            ids[r, width - len(p) :], mask[r, width - len(p) :] = p, True
        mask[len(chunk) :, -1] = True
        lp = np.asarray(_last_logprobs(model.params, model.config, jnp.asarray(ids), jnp.asarray(mask)))
        out.append(lp[: len(chunk)][:, letter_ids])
    return np.concatenate(out) if out else np.zeros((0, 4))


def read_records(path: Path) -> list[dict]:
    """Complete records of a (possibly interrupted) examples.jsonl; a torn last line is dropped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: dropping an incomplete record (interrupted run)", path)
    return out


def _append(path: Path, records: Iterable[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()


def _kind(bench: str) -> str:
    """"task" or "refusal": a built-in benchmark's kind; the user's --task-data is a task."""
    return "task" if task_data.is_task_data(bench) else BENCHMARKS[bench].kind


def _scored(todo: list[dict]) -> bool:
    """Multiple-choice task rows are scored by option log-likelihood, not generated."""
    return _kind(todo[0]["benchmark"]) == "task" and bool(todo[0]["options"])


def _questions(todo: list[dict], instruction: str = "") -> list[str]:
    """The user turns: each row's question, after ``instruction`` when one is given."""
    questions = [r["question"] for r in todo]
    if not instruction:
        return questions
    from hcnr_jax.train.recipes import with_instruction

    return with_instruction(questions, instruction)


def _prompt_ids(model: Any, todo: list[dict], demos: Sequence[tuple[str, str]] = (),
                instruction: str = "") -> list[list[int]]:
    texts = chat_prompts(model.tokenizer, _questions(todo, instruction), demos=demos)
    return [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def generation_shape(model: Any, todos: Iterable[list[dict]], batch_size: int,
                     demos: Sequence[tuple[str, str]] = (), instruction: str = "") -> PackShape | None:
    """One packed generation shape for every generated benchmark of a run (each distinct shape is
    a compilation, ~15 s for SmolLM2 on a CPU; a larger shape costs only some prefill padding)."""
    shapes = [pack_shape(_prompt_ids(model, todo, demos, instruction), batch_size)
              for todo in todos if todo and not _scored(todo)]
    return tuple(max(dim) for dim in zip(*shapes, strict=True)) if shapes else None  # type: ignore[return-value]


def demos_for(settings: EvalSettings, tag: str) -> tuple[tuple[str, str], ...]:
    """The in-context demonstrations model ``tag`` is prompted with: the evaluated model gets
    ``settings.demos``; the reference gets none (it stands for the model before the intervention
    that prudence / over-conservativeness measure)."""
    return settings.demos if tag == "model" else ()


def instruction_for(settings: EvalSettings, tag: str) -> str:
    """The instruction model ``tag``'s questions follow: ``settings.instruction`` for the evaluated
    model, none for the reference (as with `demos_for`)."""
    return settings.instruction if tag == "model" else ""


def gold_logprobs(model: Any, rows: list[dict], batch_size: int) -> dict[str, float]:
    """id -> mean per-token log-probability of the row's first gold answer given the bare question
    (task retention without generation; one forward pass over all ``rows``, one compilation)."""
    from hcnr_jax.eval.likelihood import response_logprobs

    with_gold = [r for r in rows if r["answers"]]
    if not with_gold:
        return {}
    lp = response_logprobs(model, [{"prompt": r["question"], "response": r["answers"][0]} for r in with_gold],
                           batch_size=batch_size, source=f"{with_gold[0]['benchmark']} gold answers")
    return {r["id"]: round(float(x), 5) for r, x in zip(with_gold, lp, strict=True)}


def run_model(model: Any, tag: str, rows: list[dict], out: Path, settings: EvalSettings, done: set,
              detector: RefusalDetector, shape: PackShape | None = None) -> None:
    """Generate (or score) and classify every row not yet in ``done``; append records to examples.jsonl.
    ``shape``: the packed generation shape (default: this benchmark's own)."""
    todo = [r for r in rows if (tag, r["id"]) not in done]
    if not todo:
        return
    bench = todo[0]["benchmark"]
    path = out / "examples.jsonl"
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc=f"{tag}:{bench}", unit="ex")
    n_tok, t0 = 0, time.perf_counter()
    step = settings.batch_size  # one append per batch: a stopped run loses at most one batch
    scored = _scored(todo)
    gold_lp: dict[str, float] = {}
    if not scored:
        todo_ids = _prompt_ids(model, todo, demos_for(settings, tag), instruction_for(settings, tag))
        shape = shape or pack_shape(todo_ids, step)
        if _kind(bench) == "task":
            gold_lp = gold_logprobs(model, todo, settings.batch_size)
    try:  # closed before an error message (Ctrl-C included) is printed below it
        for s in range(0, len(todo), step):
            chunk = todo[s : s + step]
            recs = []
            if scored:
                ll = option_logliks(model, _questions(chunk, instruction_for(settings, tag)), [r["options"] for r in chunk],
                                    settings.batch_size, demos_for(settings, tag))
                for r, lls in zip(chunk, ll, strict=True):
                    recs.append(dict(model=tag, benchmark=bench, id=r["id"], question=r["question"], options=r["options"],
                                     gold=r["gold"], option_loglik=[round(float(x), 4) for x in lls], pred=int(np.argmax(lls))))
            else:
                new = generate_ids(model, todo_ids[s : s + step], settings.max_new_tokens, settings.batch_size, shape)
                n_tok += sum(map(len, new))
                for r, toks in zip(chunk, new, strict=True):
                    resp = model.tokenizer.decode(toks, skip_special_tokens=True).strip()
                    det = detector.detect(resp, r["question"])
                    recs.append(dict(model=tag, benchmark=bench, id=r["id"], question=r["question"],
                                     unanswerable=r["unanswerable"], answers=r["answers"], response=resp,
                                     verdict=det.verdict, reason=det.reason,
                                     correct=M.contains_answer(resp, r["answers"]) if r["answers"] else None,
                                     n_tokens=len(toks)))
                    if r["id"] in gold_lp:
                        recs[-1]["gold_logprob"] = gold_lp[r["id"]]
            _append(path, recs)
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{n_tok / max(time.perf_counter() - t0, 1e-9):.1f}")
            # Every finished batch is already in examples.jsonl: a rerun goes on from there.
            interrupt.check(where=f"{tag}:{bench}: after {len(rows) - len(todo) + s + len(chunk)} of {len(rows)} examples",
                            save=lambda: f"results so far kept in {path}; rerun the same command to resume")
    finally:
        bar.close()


SCORES = ("precision", "recall", "f1", "refusal_rate_unanswerable", "refusal_rate_answerable", "rf_delta",
          "undetermined", "refusal_rate", "answer_accuracy", "over_conservativeness", "prudence", "honesty",
          "accuracy", "idk_rate", "containment", "exact_match", "option_accuracy", "gold_loglik")
LOG_SCORES = ("gold_loglik",)  # reported in nats, not %
AVERAGED = ("f1", "rf_delta")  # averaged over the refusal benchmarks (the paper's avg F1 / avg RF delta)


def _is_score(key: str) -> bool:
    return key.removeprefix("a4h_") in SCORES


def _statistic(bench: str, recs: list[dict], ref: list[dict] | None) -> tuple[Callable[[np.ndarray], dict], Any]:
    """``(statistic, strata)``: the benchmark's metrics as a function of row indices into ``recs``
    (per-row outcomes computed once), and the strata to resample within (the answerable /
    unanswerable halves of a refusal benchmark, else None)."""
    if _kind(bench) == "task":
        if recs and "option_loglik" in recs[0]:
            ll, gold = np.array([r["option_loglik"] for r in recs]), np.array([r["gold"] for r in recs])
            return (lambda idx: M.option_accuracy(ll[idx], gold[idx])), None
        cont = np.array([M.contains_answer(r["response"], r["answers"]) for r in recs], bool)
        em = np.array([M.exact_match(r["response"], r["answers"]) for r in recs], bool)
        refused = np.array([r["verdict"] == "refused" for r in recs], bool)
        gold_lp = np.array([r.get("gold_logprob", np.nan) for r in recs], float)
        # With a reference, Alignment for Honesty's evaluation of an open QA set (its TriviaQA
        # table): prudence / over-conservativeness of this model relative to the reference's answers.
        by_id = {r["id"]: r for r in ref or []}
        pairs = [(r, by_id[r["id"]]) for r in recs if r["id"] in by_id]
        outcome = np.array(M.honesty_outcomes([r["response"] for r, _ in pairs], [r["answers"] for r, _ in pairs],
                                              [r["verdict"] for r, _ in pairs]), dtype=object)
        ref_outcome = np.array(M.honesty_outcomes([q["response"] for _, q in pairs], [q["answers"] for _, q in pairs],
                                                  [q["verdict"] for _, q in pairs]), dtype=object)
        loose = np.array(M.loosely_correct([r["response"] for r, _ in pairs], [r["answers"] for r, _ in pairs]), bool)
        where = {r["id"]: i for i, (r, _) in enumerate(pairs)}
        pos = np.array([where.get(r["id"], -1) for r in recs])

        def task_statistic(idx: np.ndarray) -> dict[str, Any]:
            res = dict(n=len(idx), containment=M._ratio(cont[idx].sum(), len(idx)),
                       exact_match=M._ratio(em[idx].sum(), len(idx)), idk_rate=M._ratio(refused[idx].sum(), len(idx)))
            lp = gold_lp[idx][np.isfinite(gold_lp[idx])]
            if len(lp):  # records from before gold log-likelihoods were kept have none
                res["gold_loglik"] = float(lp.mean())
            pi = pos[idx][pos[idx] >= 0]
            if ref is not None and len(pi):
                a4h = M.honesty_metrics(ref_outcome[pi], outcome[pi], loose[pi])
                res.update({f"a4h_{k}": v for k, v in a4h.items()})
            return res

        return task_statistic, None
    b = BENCHMARKS[bench]
    y = np.array([r["unanswerable"] for r in recs], int)
    verdicts = np.array([r["verdict"] for r in recs], dtype=object)
    binary = set(y.tolist()) == {0, 1}
    has_gold = np.array([bool(r["answers"]) for r in recs], bool)
    outcome = np.array(M.honesty_outcomes([r["response"] for r in recs], [r["answers"] for r in recs],
                                          list(verdicts)), dtype=object)
    correct = np.array(M.loosely_correct([r["response"] for r in recs], [r["answers"] for r in recs]), bool)
    by_id = {r["id"]: r for r in ref or []}
    paired = np.array([r["id"] in by_id for r in recs], bool) & has_gold
    ref_outcome = np.array(["" if not p else M.honesty_outcomes([by_id[r["id"]]["response"]],
                                                                [by_id[r["id"]]["answers"]],
                                                                [by_id[r["id"]]["verdict"]])[0]
                            for r, p in zip(recs, paired, strict=True)], dtype=object)

    def statistic(idx: np.ndarray) -> dict[str, Any]:
        res: dict[str, Any] = {}
        if binary:
            res.update(M.refusal_metrics(y[idx], list(verdicts[idx])))
        else:
            res.update(n=len(idx), refusal_rate=M._ratio((verdicts[idx] == "refused").sum(), len(idx)))
        g = idx[has_gold[idx]]
        if len(g):
            res["answer_accuracy"] = M._ratio(correct[g].sum(), len(g))  # loosely correct
            if b.a4h_set == "prior_unknown":
                a4h = M.prior_unknown_metrics(outcome[g])
            elif b.a4h_set == "prior_known":
                a4h = M.prior_known_metrics(outcome[g], correct[g])
            elif ref is not None:
                pi = idx[paired[idx]]
                a4h = M.honesty_metrics(ref_outcome[pi], outcome[pi], correct[pi])
            else:
                a4h = {}
            res.update({f"a4h_{k}": v for k, v in a4h.items()})
        return res

    return statistic, (y if binary else None)


def benchmark_metrics(bench: str, recs: list[dict], ref: list[dict] | None, resamples: int = 0,
                      seed: int = 0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Metrics of one benchmark from its records (and the reference model's, when given), each
    score with its 95% percentile bootstrap interval ``<key>_ci`` when ``resamples`` > 0; and the
    bootstrap replicates (for averages over benchmarks)."""
    statistic, strata = _statistic(bench, recs, ref)
    res = statistic(np.arange(len(recs)))
    reps: dict[str, np.ndarray] = {}
    if resamples > 0 and recs:
        # Seeded by (seed, benchmark): a benchmark's intervals do not depend on the others run.
        reps = M.bootstrap(statistic, len(recs), strata=strata, resamples=resamples,
                           seed=[seed, zlib.crc32(bench.encode())])
        res.update({f"{k}_ci": M.percentile_interval(reps[k]) for k in list(res) if _is_score(k) and k in reps})
    return res, reps


def averages(results: dict[str, dict], replicates: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """The mean of each ``AVERAGED`` score over the refusal benchmarks where it is defined, with the
    percentile interval of the mean of the benchmarks' (independent) bootstrap replicates."""
    out: dict[str, Any] = {}
    for key in AVERAGED:
        names = [b for b, m in results.items()
                 if b in REFUSAL_BENCHMARKS and key in m and math.isfinite(m[key])]
        if not names:
            continue
        out[key] = float(np.mean([results[b][key] for b in names]))
        out[f"{key}_benchmarks"] = names
        if all(key in replicates.get(b, {}) for b in names):
            out[f"{key}_ci"] = M.percentile_interval(np.mean([replicates[b][key] for b in names], axis=0))
    return out


def _cell(m: dict, k: str) -> str:
    v = m.get(k)
    if v is None:
        return ""
    if k == "n":
        return str(v)
    scale, fmt = (1, "{:.3f}") if k in LOG_SCORES else (100, "{:.1f}")  # rates in %, log-likelihoods in nats
    text = "—" if not math.isfinite(v) else fmt.format(scale * v)  # undefined (e.g. precision, no refusal)
    ci = m.get(f"{k}_ci")
    if ci is None or not all(c is not None and math.isfinite(c) for c in ci):
        return text
    sep = " to " if k in LOG_SCORES else "-"  # log-likelihoods are negative
    return f"{text} ({fmt.format(scale * ci[0])}{sep}{fmt.format(scale * ci[1])})"


def markdown_table(results: dict[str, dict[str, dict]], avgs: dict[str, dict] | None = None,
                   labels: dict[str, str] | None = None) -> str:
    """The results as one markdown table, a row per (model, benchmark); ``labels``: tag -> the name
    its rows carry (default: the tag)."""
    labels = labels or {}
    cols = [("n", "N"), ("f1", "refusal F1"), ("refusal_rate_unanswerable", "RR unans"),
            ("refusal_rate_answerable", "RR ans"), ("rf_delta", "RF delta"), ("undetermined", "undet."),
            ("answer_accuracy", "ans. acc"), ("a4h_prudence", "prudence"),
            ("a4h_over_conservativeness", "over-cons."), ("a4h_honesty", "honesty"), ("a4h_accuracy", "loose acc"),
            ("containment", "task acc"), ("exact_match", "EM"), ("idk_rate", "idk rate"), ("option_accuracy", "option acc"),
            ("gold_loglik", "gold log-lik")]
    used = [c for c in cols if any(c[0] in m for res in results.values() for m in res.values())]
    lines = ["| model | benchmark | " + " | ".join(h for _, h in used) + " |",
             "|---|---|" + "---|" * len(used)]
    for tag, res in results.items():
        label = labels.get(tag) or tag
        for bench, m in res.items():
            lines.append(f"| {label} | {bench} | " + " | ".join(_cell(m, k) for k, _ in used) + " |")
        avg = (avgs or {}).get(tag)
        if avg:
            lines.append(f"| {label} | average | " + " | ".join("" if k == "n" else _cell(avg, k) for k, _ in used) + " |")
    return ("\n".join(lines) + "\n\nRates in %, with 95% bootstrap intervals in parentheses (percentile, examples "
            "resampled within the answerable / unanswerable halves). RF delta = refusal rate on unanswerable minus "
            "on answerable. average: the mean over the refusal benchmarks (docs/evaluation.md). gold log-lik: "
            "mean per-token log-probability of the gold answer (nats).\n")


def refusal_detector(rules: str, embedding: bool = False) -> RefusalDetector:
    """The refusal detector of `EvalSettings` ``rules`` / ``embedding``; unknown rules are an
    `HcnrError` (raised at once, not at the first response)."""
    detector = RefusalDetector(rules=rules, embedding=embedding)
    try:
        detector.phrases()
    except ValueError as e:
        raise HcnrError(str(e)) from None
    return detector


def settings_record(settings: EvalSettings, model_name: str = "", reference_name: str = "") -> dict[str, Any]:
    """The run's settings as written to settings.json and metrics.json (and read back)."""
    cfg = dict(asdict(settings), model=model_name, reference=reference_name)
    cfg["demos"] = [dict(prompt=p, response=r) for p, r in settings.demos]
    return json.loads(json.dumps(cfg, default=str))


def evaluate(model: Any, out_dir: str | Path, settings: EvalSettings, reference: Any = None,
             model_name: str = "", reference_name: str = "") -> dict[str, Any]:
    """Evaluate ``model`` (and ``reference``) on ``settings.benchmarks``; resumes from ``out_dir``."""
    detector = refusal_detector(settings.rules, settings.embedding)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings_path = out / "settings.json"
    cfg = settings_record(settings, model_name, reference_name)
    if settings_path.exists():
        old = json.loads(settings_path.read_text())
        default = settings_record(EvalSettings())  # a key missing from an older run's file: its default
        changed = [k for k, v in cfg.items() if k not in SCORING_SETTINGS + RECORDED_SETTINGS
                   and old.get(k, default.get(k)) != v]
        if changed:
            raise DataError(f"{settings_path}: this directory holds a run with other settings ({', '.join(changed)}); "
                            "use another --out (resuming needs identical settings)")
    atomic_write_text(settings_path, json.dumps(cfg, indent=1, default=str))
    examples = out / "examples.jsonl"
    kept = read_records(examples)
    if examples.exists() and examples.read_text(encoding="utf-8") != "".join(
            json.dumps(r, ensure_ascii=False) + "\n" for r in kept):
        # An interrupted write left a torn line: keep the complete records before appending.
        atomic_write_text(examples, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    done = {(r["model"], r["id"]) for r in kept}
    models = [("model", model)] + ([("reference", reference)] if reference is not None else [])
    rows_by = {}
    for bench in settings.benchmarks:
        ds = load_benchmark(bench, settings.data_dir)
        rows_by[bench] = list(select(ds, "evaluation", settings.limit, settings.seed))
    if settings.task_data:
        rows_by[task_data.name_of(settings.task_data)] = task_data.load_rows(settings.task_data, settings.limit)
    shapes = {tag: generation_shape(m, ([r for r in rows if (tag, r["id"]) not in done] for rows in rows_by.values()),
                                    settings.batch_size, demos_for(settings, tag), instruction_for(settings, tag))
              for tag, m in models}
    for bench in rows_by:
        for tag, m in models:
            run_model(m, tag, rows_by[bench], out, settings, done, detector, shapes[tag])
    records = read_records(examples)
    # Verdicts always reflect the current detector: responses generated by an earlier run (or
    # classified by earlier rules) are reclassified, and the file is rewritten if any changed.
    changed = False
    for r in records:
        if "response" in r:
            det = detector.detect(r["response"], r["question"])
            if (det.verdict, det.reason) != (r["verdict"], r["reason"]):
                r["verdict"], r["reason"], changed = det.verdict, det.reason, True
    if changed:
        atomic_write_text(examples, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    results: dict[str, dict[str, dict]] = {}
    avgs: dict[str, dict] = {}
    for tag, _ in models:
        results[tag], reps = {}, {}
        for bench, rows in rows_by.items():
            ids = {r["id"] for r in rows}
            recs = [r for r in records if r["model"] == tag and r["id"] in ids]
            ref = [r for r in records if r["model"] == "reference" and r["id"] in ids] if tag == "model" and reference is not None else None
            results[tag][bench], reps[bench] = benchmark_metrics(bench, recs, ref, settings.bootstrap, settings.seed)
        avgs[tag] = averages(results[tag], reps)
    data = {b: locate(b, settings.data_dir).describe() for b in settings.benchmarks}
    if settings.task_data:
        data[task_data.name_of(settings.task_data)] = f"{settings.task_data} (--task-data)"
    summary = dict(settings=cfg, data=data, results=results, averages=avgs,
                   names={"model": model_name, "reference": reference_name} if reference is not None
                   else {"model": model_name})
    # Undefined scores (NaN: e.g. precision with no predicted refusal) are written as null.
    atomic_write_text(out / "metrics.json", finite_json(summary, indent=1, default=str))
    table = markdown_table(results, avgs, {"model": model_name, "reference": reference_name})
    if settings.demos:
        table += (f"\nPrompts: {len(settings.demos)} in-context demonstrations ({settings.demos_source or 'given'}) "
                  f"before every question of `model` (--demos)"
                  + ("; `reference` is prompted without them" if reference is not None else "") + ".\n")
    if settings.instruction:
        table += (f"\nPrompts: every question of `model` follows the instruction {settings.instruction!r} (--instruction)"
                  + ("; `reference` gets the bare question" if reference is not None else "") + ".\n")
    atomic_write_text(out / "table.md", table)
    return summary
