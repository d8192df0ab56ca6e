"""`hcnr eval` driver: generate, classify and score, example by example, resumably. The scores
are hcnr_jax/eval/metrics.py's (`benchmark_metrics` binds a benchmark to them), the files a
reader opens are written by hcnr_jax/eval/report.py.

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
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from hcnr_jax import interrupt
from hcnr_jax.data import tasks as task_data
from hcnr_jax.data.answers import contains_answer
from hcnr_jax.data.benchmarks import BENCHMARKS, REFUSAL_BENCHMARKS, load_benchmark, locate, select
from hcnr_jax.errors import DataError, HcnrError
from hcnr_jax.eval import metrics as M
from hcnr_jax.eval import report
from hcnr_jax.eval.refusal import RefusalDetector
from hcnr_jax.generation import PackShape, chat_prompts, generate_ids, pack_shape, padded_length
from hcnr_jax.io import atomic_write_text
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
        width = padded_length(max(map(len, chunk)))
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
    from hcnr_jax.data.recipes import with_instruction

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
                                     correct=contains_answer(resp, r["answers"]) if r["answers"] else None,
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


def benchmark_statistic(bench: str, recs: list[dict], ref: list[dict] | None) -> tuple[M.Statistic, np.ndarray | None]:
    """``(statistic, strata)`` of benchmark ``bench``'s records (`hcnr_jax.eval.metrics.records_statistic`
    for its kind and Alignment-for-Honesty set)."""
    kind = _kind(bench)
    return M.records_statistic(kind, recs, ref, "" if kind == "task" else BENCHMARKS[bench].a4h_set)


def benchmark_metrics(bench: str, recs: list[dict], ref: list[dict] | None, resamples: int = 0,
                      seed: int = 0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Metrics of one benchmark from its records (and the reference model's, when given), each
    score with its 95% percentile bootstrap interval ``<key>_ci`` when ``resamples`` > 0; and the
    bootstrap replicates (for averages over benchmarks)."""
    statistic, strata = benchmark_statistic(bench, recs, ref)
    # Seeded by (seed, benchmark): a benchmark's intervals do not depend on the others run.
    return M.with_intervals(statistic, len(recs), strata, resamples, seed=[seed, zlib.crc32(bench.encode())])


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


def _write_settings(path: Path, cfg: dict[str, Any]) -> None:
    """settings.json: ``cfg``; a folder holding a run with other settings is a `DataError` (a run
    resumes only under the settings its records were made with)."""
    if path.exists():
        old = json.loads(path.read_text())
        default = settings_record(EvalSettings())  # a key missing from an older run's file: its default
        changed = [k for k, v in cfg.items() if k not in SCORING_SETTINGS + RECORDED_SETTINGS
                   and old.get(k, default.get(k)) != v]
        if changed:
            raise DataError(f"{path}: this directory holds a run with other settings ({', '.join(changed)}); "
                            "use another --out (resuming needs identical settings)")
    atomic_write_text(path, json.dumps(cfg, indent=1, default=str))


def _write_records(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _kept_records(path: Path) -> list[dict]:
    """The complete records of examples.jsonl; a torn last line (an interrupted write) is dropped
    from the file too, before anything is appended."""
    kept = read_records(path)
    if path.exists() and path.read_text(encoding="utf-8") != "".join(
            json.dumps(r, ensure_ascii=False) + "\n" for r in kept):
        _write_records(path, kept)
    return kept


def _benchmark_rows(settings: EvalSettings) -> dict[str, list[dict]]:
    """benchmark -> its evaluation rows (the built-in ones, then the user's --task-data)."""
    rows_by = {}
    for bench in settings.benchmarks:
        ds = load_benchmark(bench, settings.data_dir)
        rows_by[bench] = list(select(ds, "evaluation", settings.limit, settings.seed))
    if settings.task_data:
        rows_by[task_data.name_of(settings.task_data)] = task_data.load_rows(settings.task_data, settings.limit)
    return rows_by


def _reclassified(path: Path, detector: RefusalDetector) -> list[dict]:
    """The records of examples.jsonl with verdicts of the current detector: responses generated by
    an earlier run (or classified by earlier rules) are reclassified, and the file is rewritten if
    any changed."""
    records = read_records(path)
    changed = False
    for r in records:
        if "response" in r:
            det = detector.detect(r["response"], r["question"])
            if (det.verdict, det.reason) != (r["verdict"], r["reason"]):
                r["verdict"], r["reason"], changed = det.verdict, det.reason, True
    if changed:
        _write_records(path, records)
    return records


def _score(records: list[dict], rows_by: dict[str, list[dict]], tags: list[str],
           settings: EvalSettings) -> tuple[dict[str, dict[str, dict]], dict[str, dict]]:
    """(tag -> benchmark -> metrics, tag -> averages over the refusal benchmarks); the evaluated
    model is scored against the reference's records when there is one."""
    results: dict[str, dict[str, dict]] = {}
    avgs: dict[str, dict] = {}
    for tag in tags:
        results[tag], reps = {}, {}
        for bench, rows in rows_by.items():
            ids = {r["id"] for r in rows}
            recs = [r for r in records if r["model"] == tag and r["id"] in ids]
            ref = ([r for r in records if r["model"] == "reference" and r["id"] in ids]
                   if tag == "model" and "reference" in tags else None)
            results[tag][bench], reps[bench] = benchmark_metrics(bench, recs, ref, settings.bootstrap, settings.seed)
        avgs[tag] = M.averages(results[tag], reps, over=REFUSAL_BENCHMARKS)
    return results, avgs


def evaluate(model: Any, out_dir: str | Path, settings: EvalSettings, reference: Any = None,
             model_name: str = "", reference_name: str = "") -> dict[str, Any]:
    """Evaluate ``model`` (and ``reference``) on ``settings.benchmarks``; resumes from ``out_dir``."""
    detector = refusal_detector(settings.rules, settings.embedding)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = settings_record(settings, model_name, reference_name)
    _write_settings(out / "settings.json", cfg)
    examples = out / "examples.jsonl"
    done = {(r["model"], r["id"]) for r in _kept_records(examples)}
    models = [("model", model)] + ([("reference", reference)] if reference is not None else [])
    rows_by = _benchmark_rows(settings)
    shapes = {tag: generation_shape(m, ([r for r in rows if (tag, r["id"]) not in done] for rows in rows_by.values()),
                                    settings.batch_size, demos_for(settings, tag), instruction_for(settings, tag))
              for tag, m in models}
    for bench in rows_by:
        for tag, m in models:
            run_model(m, tag, rows_by[bench], out, settings, done, detector, shapes[tag])
    results, avgs = _score(_reclassified(examples, detector), rows_by, [tag for tag, _ in models], settings)
    data = {b: locate(b, settings.data_dir).describe() for b in settings.benchmarks}
    if settings.task_data:
        data[task_data.name_of(settings.task_data)] = f"{settings.task_data} (--task-data)"
    summary = dict(settings=cfg, data=data, results=results, averages=avgs,
                   names={"model": model_name, "reference": reference_name} if reference is not None
                   else {"model": model_name})
    report.write_eval(out, summary, settings)
    return summary
