"""Benchmark loaders: local files -> one `datasets.Dataset` schema, split into calibration / evaluation.

Every loader reads the staged files of ``../shared/data`` (or ``--data-dir``) through
``datasets.load_dataset`` and returns rows of one schema:

    id            "<benchmark>-<sha1(question)[:12]>": content-derived, so a subset file gives the same ids
    benchmark     name in ``BENCHMARKS``
    question      the user turn
    unanswerable  1 (should be refused), 0 (answerable), -1 (task set: no label)
    answers       gold answers (aliases) for containment scoring; [] when none
    options       multiple-choice options (MedMCQA); [] otherwise
    gold          index of the correct option; -1 otherwise
    split         "calibration" or "evaluation"

The split is a fixed function of (seed, benchmark, normalised question): a row's side does not
depend on which other rows are loaded, so the shipped subsets in ``hcnr_jax/bundled/data`` split
exactly like the full files, and equal questions always land on the same side (pools never overlap).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from hcnr_jax.embedded import BUNDLED, BUNDLED_DATA
from hcnr_jax.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = BUNDLED.parent.parent.parent / "shared" / "data"  # ../shared/data from the repo root

CALIBRATION_FRACTION = 0.25
SEED = 0

COLUMNS = ("id", "benchmark", "question", "unanswerable", "answers", "options", "gold")


def normalise(text: str) -> str:
    """Lower-case, collapse whitespace and strip punctuation at the ends (for ids and splitting)."""
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" ?.!\"'")


def example_id(benchmark: str, question: str) -> str:
    return f"{benchmark}-{hashlib.sha1(normalise(question).encode()).hexdigest()[:12]}"


def split_of(benchmark: str, question: str, seed: int = SEED, fraction: float = CALIBRATION_FRACTION) -> str:
    """``"calibration"`` for a fixed, seeded ``fraction`` of questions, ``"evaluation"`` otherwise."""
    h = hashlib.sha256(f"{seed}:{benchmark}:{normalise(question)}".encode()).digest()
    return "calibration" if int.from_bytes(h[:8], "big") / 2**64 < fraction else "evaluation"


def order_key(example_id: str, seed: int = SEED) -> str:
    """A fixed, seeded pseudo-random order of examples (used to take the first N)."""
    return hashlib.sha256(f"order:{seed}:{example_id}".encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Readers: one per benchmark, raw files -> list of schema dicts (without split).


def _read(path: Path, **kwargs: Any) -> datasets.Dataset:
    if not path.is_file():
        raise DataError(f"{path}: benchmark file not found (set --data-dir to the folder holding it)")
    try:
        return datasets.load_dataset("json", data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets wraps parse errors in several exception types
        raise DataError(f"{path}: cannot read as JSON/JSON Lines: {e}") from e


def _row(bench: str, question: Any, unanswerable: int, answers: Any = (), options: Any = (), gold: int = -1,
         where: str = "") -> dict:
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: empty or non-text question {question!r}")
    if isinstance(answers, str):
        answers = [answers]
    return dict(id=example_id(bench, question), benchmark=bench, question=question.strip(),
                unanswerable=int(unanswerable), answers=[str(a) for a in (answers or []) if str(a).strip()],
                options=[str(o) for o in options], gold=int(gold))


def _unknownbench(bench: str, folder: str, stem: str) -> Callable[[Path], list[dict]]:
    def read(root: Path) -> list[dict]:
        rows = []
        for side, unans in (("answerable", 0), ("unanswerable", 1)):
            path = root / folder / f"{stem}_{side}.json"
            for r in _read(path):
                label = r.get("label")
                answers = label if isinstance(label, list) else []
                rows.append(_row(bench, r["prompt"], unans, answers, where=str(path)))
        return rows

    return read


def _kuq(root: Path) -> list[dict]:
    path = root / "kuq" / "knowns_unknowns.jsonl"
    # Unknown rows' "answer" are crowd explanations of the uncertainty, not gold answers.
    return [_row("kuq", r["question"], int(bool(r["unknown"])), [] if r["unknown"] else r["answer"], where=str(path))
            for r in _read(path)]


def _selfaware(root: Path) -> list[dict]:
    path = root / "selfaware" / "SelfAware.json"
    return [_row("selfaware", r["question"], int(not r["answerable"]), r["answer"] or [], where=str(path))
            for r in _read(path, field="example")]


def _puqa(root: Path) -> list[dict]:
    path = root / "alignment_for_honesty" / "puqa.jsonl"
    return [_row("puqa", r["question"], 1, r["authors"], where=str(path)) for r in _read(path)]


def _pkqa(root: Path) -> list[dict]:
    path = root / "alignment_for_honesty" / "pkqa_13b.jsonl"
    return [_row("pkqa", r["question"], 0, [r["answer"]], where=str(path)) for r in _read(path)]


def _nonambigqa(root: Path) -> list[dict]:
    path = root / "alignment_for_honesty" / "nonambigqa.jsonl"
    return [_row("nonambigqa", r["question"], 0, r["answers"], where=str(path)) for r in _read(path)]


def _hotpotqa(root: Path) -> list[dict]:
    path = root / "hotpotqa" / "hotpot_dev_v1_simplified.json"
    return [_row("hotpotqa", r["question"], -1, [r["answer"]], where=str(path)) for r in _read(path)]


def _triviaqa(root: Path) -> list[dict]:
    path = root / "triviaqa" / "triviaqa_sm_sub.jsonl"
    rows = []
    for r in _read(path):
        q = re.sub(r"^Question:\s*", "", r["context"]).rsplit("\nAnswer:", 1)[0]
        rows.append(_row("triviaqa", q, -1, [r["answer"], *r["aliases"]], where=str(path)))
    return rows


def _medmcqa(root: Path) -> list[dict]:
    path = root / "medmcqa" / "dev.json"
    rows = []
    for r in _read(path):
        if not 1 <= int(r["cop"]) <= 4:
            raise DataError(f"{path}: id {r['id']}: cop {r['cop']} is not an option number 1-4")
        opts = [r["opa"], r["opb"], r["opc"], r["opd"]]
        rows.append(_row("medmcqa", r["question"], -1, [opts[int(r["cop"]) - 1]], opts, int(r["cop"]) - 1,
                         where=str(path)))
    return rows


@dataclass(frozen=True)
class Benchmark:
    name: str
    kind: str  # "refusal" (answerable + unanswerable), "honesty" (Alignment for Honesty), "task"
    read: Callable[[Path], list[dict]]
    shipped: bool  # a licensed subset lives in hcnr_jax/bundled/data


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("falseqa", "refusal", _unknownbench("falseqa", "falseqa/unknownbench_version", "FalseQA"), False),
    Benchmark("nec", "refusal", _unknownbench("nec", "nec", "NEC"), False),
    Benchmark("refunq", "refusal", _unknownbench("refunq", "refunq", "RefuNQ"), False),
    Benchmark("kuq", "refusal", _kuq, True),
    Benchmark("selfaware", "refusal", _selfaware, True),
    Benchmark("puqa", "honesty", _puqa, False),
    Benchmark("pkqa", "honesty", _pkqa, False),
    Benchmark("nonambigqa", "honesty", _nonambigqa, False),
    Benchmark("hotpotqa", "task", _hotpotqa, True),
    Benchmark("medmcqa", "task", _medmcqa, True),
    Benchmark("triviaqa", "task", _triviaqa, False),
)}
REFUSAL_BENCHMARKS = ("falseqa", "nec", "refunq", "kuq", "selfaware")


def resolve_data_dir(data_dir: str | Path | None, benchmark: str) -> Path:
    """The folder to read ``benchmark`` from: ``data_dir`` (default ``../shared/data``), else the shipped subset."""
    root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    if root.is_dir():
        return root
    if BENCHMARKS[benchmark].shipped and data_dir is None:
        log.info("%s: %s not found, using the shipped subset", benchmark, root)
        return BUNDLED_DATA
    raise DataError(f"{root}: data directory not found for benchmark {benchmark!r}"
                    + ("" if BENCHMARKS[benchmark].shipped else " (no subset of it is shipped)"))


def load_benchmark(name: str, data_dir: str | Path | None = None, seed: int = SEED,
                   fraction: float = CALIBRATION_FRACTION) -> datasets.Dataset:
    """All rows of benchmark ``name`` in the common schema, with their ``split`` column.

    Duplicated questions (after normalisation) are kept once: the first occurrence wins.
    """
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    rows = BENCHMARKS[name].read(resolve_data_dir(data_dir, name))
    seen: set[str] = set()
    unique = []
    for r in rows:
        if r["id"] not in seen:
            seen.add(r["id"])
            unique.append({**r, "split": split_of(name, r["question"], seed, fraction)})
    if not unique:
        raise DataError(f"benchmark {name!r}: no rows")
    features = datasets.Features(
        id=datasets.Value("string"), benchmark=datasets.Value("string"), question=datasets.Value("string"),
        unanswerable=datasets.Value("int8"), answers=datasets.List(datasets.Value("string")),
        options=datasets.List(datasets.Value("string")), gold=datasets.Value("int8"), split=datasets.Value("string"))
    return datasets.Dataset.from_list(unique, features=features)


def select(ds: datasets.Dataset, split: str, limit: int | None = None, seed: int = SEED) -> datasets.Dataset:
    """Rows of ``split`` in a fixed seeded order; with ``limit``, the first ``limit`` of them,
    balanced between answerable and unanswerable where the benchmark has both."""
    idx = [i for i, s in enumerate(ds["split"]) if s == split]
    ids = ds["id"]
    idx.sort(key=lambda i: order_key(ids[i], seed))
    if limit is not None and limit < len(idx):
        labels = ds["unanswerable"]
        groups: dict[int, list[int]] = {}
        for i in idx:
            groups.setdefault(labels[i], []).append(i)
        if len(groups) == 1:
            idx = idx[:limit]
        else:
            # Round-robin over the classes (in the seeded order) until `limit` rows are taken.
            picked: list[int] = []
            queues = [groups[k] for k in sorted(groups)]
            pos = [0] * len(queues)
            while len(picked) < limit:
                for q, queue in enumerate(queues):
                    if pos[q] < len(queue) and len(picked) < limit:
                        picked.append(queue[pos[q]])
                        pos[q] += 1
            idx = sorted(picked, key=lambda i: order_key(ids[i], seed))
    return ds.select(idx)
