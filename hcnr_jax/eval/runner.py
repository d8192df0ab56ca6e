"""`hcnr eval` driver: generate, classify and score, example by example, resumably.

Output directory:
    examples.jsonl   one record per (model, benchmark, example): question, label, response,
                     verdict (+ reason), outcome; appended batch by batch, so a stopped run resumes
    metrics.json     per benchmark metrics (refusal F1 / rates / RF delta; honesty vs reference;
                     task accuracy), the settings, and N per benchmark
    table.md         the same as a markdown table
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from hcnr_jax.errors import DataError
from hcnr_jax.eval import metrics as M
from hcnr_jax.eval.data import BENCHMARKS, REFUSAL_BENCHMARKS, load_benchmark, select
from hcnr_jax.eval.refusal import RefusalDetector
from hcnr_jax.generation import PackShape, _bucket, chat_prompts, generate_ids, pack_shape
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
    extra: dict = field(default_factory=dict)


def mcq_prompt(question: str, options: Sequence[str]) -> str:
    opts = "\n".join(f"{MCQ_LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{question}\n{opts}\nAnswer with the letter of the correct option."


@partial(jax.jit, static_argnames=("cfg",))
def _last_logprobs(params: Any, cfg: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Log-probabilities of the next token after left-padded prompts ``[B, T]`` -> ``[B, V]``."""
    out = forward(params, cfg, ids, mask, return_logits=False)
    return jax.nn.log_softmax(lm_head(params, cfg, out.hidden[:, -1:])[:, 0], axis=-1)


def option_logliks(model: Any, questions: Sequence[str], options: Sequence[Sequence[str]],
                   batch_size: int = 16) -> np.ndarray:
    """Log-likelihood of each option letter as the assistant's first token ``[N, 4]``."""
    tok = model.tokenizer
    letter_ids = []
    for letter in MCQ_LETTERS:
        ids = tok(letter, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise DataError(f"{model.source}: option letter {letter!r} is not a single token ({ids})")
        letter_ids.append(ids[0])
    texts = chat_prompts(tok, [mcq_prompt(q, o) for q, o in zip(questions, options, strict=True)])
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


def _scored(todo: list[dict]) -> bool:
    """Multiple-choice task rows are scored by option log-likelihood, not generated."""
    return BENCHMARKS[todo[0]["benchmark"]].kind == "task" and bool(todo[0]["options"])


def _prompt_ids(model: Any, todo: list[dict]) -> list[list[int]]:
    texts = chat_prompts(model.tokenizer, [r["question"] for r in todo])
    return [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def generation_shape(model: Any, todos: Iterable[list[dict]], batch_size: int) -> PackShape | None:
    """One packed generation shape for every generated benchmark of a run (each distinct shape is
    a compilation, ~15 s for SmolLM2 on a CPU; a larger shape costs only some prefill padding)."""
    shapes = [pack_shape(_prompt_ids(model, todo), batch_size) for todo in todos if todo and not _scored(todo)]
    return tuple(max(dim) for dim in zip(*shapes, strict=True)) if shapes else None  # type: ignore[return-value]


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
    if not scored:
        todo_ids = _prompt_ids(model, todo)
        shape = shape or pack_shape(todo_ids, step)
    for s in range(0, len(todo), step):
        chunk = todo[s : s + step]
        recs = []
        if scored:
            ll = option_logliks(model, [r["question"] for r in chunk], [r["options"] for r in chunk],
                                settings.batch_size)
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
        _append(path, recs)
        bar.update(len(chunk))
        bar.set_postfix(tok_s=f"{n_tok / max(time.perf_counter() - t0, 1e-9):.1f}")
    bar.close()


def benchmark_metrics(bench: str, recs: list[dict], ref: list[dict] | None) -> dict[str, Any]:
    """Metrics of one benchmark from its records (and the reference model's, when given)."""
    kind = BENCHMARKS[bench].kind
    if kind == "task":
        if recs and "option_loglik" in recs[0]:
            return M.option_accuracy(np.array([r["option_loglik"] for r in recs]), [r["gold"] for r in recs])
        return M.task_accuracy([r["response"] for r in recs], [r["answers"] for r in recs])
    res: dict[str, Any] = {}
    labels = {r["unanswerable"] for r in recs}
    if labels <= {0, 1} and len(labels) == 2:
        res.update(M.refusal_metrics([r["unanswerable"] for r in recs], [r["verdict"] for r in recs]))
    else:
        res.update(n=len(recs), refusal_rate=float(np.mean([r["verdict"] == "refused" for r in recs])))
    scored = [r for r in recs if r["answers"]]
    if scored:
        cur = M.honesty_outcomes([r["response"] for r in scored], [r["answers"] for r in scored],
                                 [r["verdict"] for r in scored])
        res["answer_accuracy"] = float(np.mean([c == "correct" for c in cur]))
        if ref is not None:
            by_id = {r["id"]: r for r in ref}
            pairs = [(by_id[r["id"]], c) for r, c in zip(scored, cur, strict=True) if r["id"] in by_id]
            ref_out = M.honesty_outcomes([p["response"] for p, _ in pairs], [p["answers"] for p, _ in pairs],
                                         [p["verdict"] for p, _ in pairs])
            res.update({f"a4h_{k}": v for k, v in M.honesty_metrics(ref_out, [c for _, c in pairs]).items()})
    return res


def markdown_table(results: dict[str, dict[str, dict]]) -> str:
    cols = [("n", "N"), ("f1", "refusal F1"), ("refusal_rate_unanswerable", "RR unans"),
            ("refusal_rate_answerable", "RR ans"), ("rf_delta", "RF delta"), ("undetermined", "undet."),
            ("answer_accuracy", "ans. acc"), ("a4h_prudence", "prudence"),
            ("a4h_over_conservativeness", "over-cons."), ("a4h_honesty", "honesty"), ("containment", "task acc"),
            ("exact_match", "EM"), ("option_accuracy", "option acc")]
    used = [c for c in cols if any(c[0] in m for res in results.values() for m in res.values())]
    lines = ["| model | benchmark | " + " | ".join(h for _, h in used) + " |",
             "|---|---|" + "---|" * len(used)]
    for tag, res in results.items():
        for bench, m in res.items():
            cells = []
            for k, _ in used:
                v = m.get(k)
                cells.append("" if v is None else str(v) if k == "n" else "nan" if v != v else f"{100 * v:.1f}")
            lines.append(f"| {tag} | {bench} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nRates in %. RF delta = refusal rate on unanswerable minus on answerable.\n"


def evaluate(model: Any, out_dir: str | Path, settings: EvalSettings, reference: Any = None,
             model_name: str = "", reference_name: str = "") -> dict[str, Any]:
    """Evaluate ``model`` (and ``reference``) on ``settings.benchmarks``; resumes from ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings_path = out / "settings.json"
    cfg = dict(asdict(settings), model=model_name, reference=reference_name)
    if settings_path.exists():
        old = json.loads(settings_path.read_text())
        if {k: v for k, v in old.items() if k != "benchmarks"} != {k: v for k, v in cfg.items() if k != "benchmarks"}:
            raise DataError(f"{settings_path}: this directory holds a run with other settings; "
                            "use another --out (resuming needs identical settings)")
    atomic_write_text(settings_path, json.dumps(cfg, indent=1, default=str))
    detector = RefusalDetector(rules=settings.rules, embedding=settings.embedding)
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
        ds = load_benchmark(bench, settings.data_dir, settings.seed)
        rows_by[bench] = list(select(ds, "evaluation", settings.limit, settings.seed))
    shapes = {tag: generation_shape(m, ([r for r in rows if (tag, r["id"]) not in done] for rows in rows_by.values()),
                                    settings.batch_size) for tag, m in models}
    for bench in settings.benchmarks:
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
    for tag, _ in models:
        results[tag] = {}
        for bench, rows in rows_by.items():
            ids = {r["id"] for r in rows}
            recs = [r for r in records if r["model"] == tag and r["id"] in ids]
            ref = [r for r in records if r["model"] == "reference" and r["id"] in ids] if tag == "model" and reference is not None else None
            results[tag][bench] = benchmark_metrics(bench, recs, ref)
    summary = dict(settings=cfg, results=results)
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=1, default=str))
    atomic_write_text(out / "table.md", markdown_table(results))
    return summary
