"""Benchmark loaders: the benchmarks' own files -> one `datasets.Dataset` schema, split into
calibration / evaluation.

Where the files come from (docs/data.md): for each benchmark, the first of these that holds all its
files (``BENCHMARKS[name].files``, paths relative to the folder):

1. ``data_dir`` (``--data-dir``); ``"hub"`` instead loads it from the Hugging Face Hub, for the
   benchmarks that have a Hub source (explicit opt-in only: nothing is ever downloaded otherwise);
2. ``$HCNR_DATA_DIR``;
3. ``<user cache>/data`` (``$HCNR_CACHE/data``, else ``$XDG_CACHE_HOME/hcnr/data``, else
   ``~/.cache/hcnr/data``; the older ``.../hcnr_jax/data`` while the new one does not exist);
4. the subsets shipped in ``hcnr_jax/bundled/data`` (kuq, selfaware, hotpotqa, medmcqa).

A benchmark found nowhere is a `DataError` naming the files expected, the folders searched, and
where to download them (URL and licence, from the table below). Rows have one schema:

    id            "<benchmark>-<sha1(question)[:12]>": content-derived, so a subset file gives the same ids
    benchmark     name in ``BENCHMARKS``
    question      the user turn
    unanswerable  1 (should be refused), 0 (answerable), -1 (task set: no label)
    answers       gold answers (aliases) for containment scoring; [] when none
    options       multiple-choice options (MedMCQA); [] otherwise
    gold          index of the correct option; -1 otherwise
    split         "calibration", "development" or "evaluation"

The split is a fixed function of (benchmark, normalised question), the same in every command and
for every seed: a row's side does not depend on which other rows are loaded, so the shipped subsets
in ``hcnr_jax/bundled/data`` split exactly like the full files, and equal questions always land on
the same side (pools never overlap). A quarter of the questions form the *calibration pool*; its
last fifth in the fixed order (`order_key`, seed 0) is the *development* split, kept for choosing
settings (`hcnr repair --choose`), so that no setting is ever tuned on evaluation labels. Training
and calibration draws take rows from the head of the remaining pool (seed 0) or a seeded
permutation of it (other seeds): a seed changes which calibration rows are drawn, never the split.
Benchmarks marked ``evaluation_only`` (the shipped general questions) have no calibration pool.

Some questions stand in two benchmarks (KUQ and SelfAware share 220). Such a question takes one side
everywhere: the least held-out of its sides in the benchmarks that hold it (calibration, then
development, then evaluation; evaluation when an evaluation-only set holds it), so a question drawn
for calibration or training in one benchmark is never evaluated in another. Which benchmarks share a
question is read from ``bundled/shared_questions.json`` (hashes of normalised questions, built from
the full files by ``python -m hcnr_jax.eval.bundle``), so the split stays a function of the row.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from hcnr_jax.embedded import BUNDLED, BUNDLED_DATA
from hcnr_jax.errors import DataError
from hcnr_jax.io import portable_path
from hcnr_jax.user_cache import legacy_cache_dir, user_cache_dir

log = logging.getLogger(__name__)

ENV_VAR = "HCNR_DATA_DIR"
HUB = "hub"  # --data-dir value: load from the Hugging Face Hub (benchmarks with a Hub source)
SHIPPED = "shipped subset"
SHARED_QUESTIONS = BUNDLED / "shared_questions.json"

CALIBRATION_FRACTION = 0.25
DEVELOPMENT_FRACTION = 0.2  # of the calibration pool: its tail in the seed-0 order
SEED = 0
SPLITS = ("calibration", "development", "evaluation")

COLUMNS = ("id", "benchmark", "question", "unanswerable", "answers", "options", "gold")


def normalise(text: str) -> str:
    """Lower-case, collapse whitespace and strip punctuation at the ends (for ids and splitting)."""
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" ?.!\"'")


def question_key(question: str) -> str:
    """The content hash of a normalised question (the suffix of its example id)."""
    return hashlib.sha1(normalise(question).encode()).hexdigest()[:12]


def example_id(benchmark: str, question: str) -> str:
    return f"{benchmark}-{question_key(question)}"


@functools.cache
def shared_questions() -> dict[str, tuple[str, ...]]:
    """question_key -> the benchmarks that hold that question (only questions held by two or more)."""
    raw = json.loads(SHARED_QUESTIONS.read_text(encoding="utf-8"))
    return {k: tuple(v) for k, v in raw["questions"].items()}


def split_of(benchmark: str, question: str, fraction: float = CALIBRATION_FRACTION) -> str:
    """The fixed side of a question, the one place the split is decided: ``"evaluation"`` for
    1 - ``fraction`` of questions; of the calibration pool, the tail of the seed-0 order
    (`DEVELOPMENT_FRACTION` of it) is ``"development"``, the rest ``"calibration"``. No seed: the
    split never moves. A question held by several benchmarks takes the least held-out of its sides
    (module docstring)."""
    holders = set(shared_questions().get(question_key(question), ())) | {benchmark}
    if any(BENCHMARKS[b].evaluation_only for b in holders if b in BENCHMARKS):
        return "evaluation"
    sides = []
    for b in sorted(holders):
        h = hashlib.sha256(f"{SEED}:{b}:{normalise(question)}".encode()).digest()
        if int.from_bytes(h[:8], "big") / 2**64 >= fraction:
            sides.append("evaluation")
            continue
        # The development rows are the *last* ones in the order every draw of seed 0 takes from the
        # head of (M0/M1 training, the shipped calibration), so those draws never reach them.
        tail = int(order_key(example_id(b, question))[:16], 16) / 16**16 >= 1 - DEVELOPMENT_FRACTION
        sides.append("development" if tail else "calibration")
    return min(sides, key=SPLITS.index)


def order_key(example_id: str, seed: int = SEED) -> str:
    """A fixed, seeded pseudo-random order of examples (used to take the first N)."""
    return hashlib.sha256(f"order:{seed}:{example_id}".encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Readers: one per benchmark, the raw rows of its files -> schema dicts (without split).

# Relative file name -> (raw rows, where they came from: a path or "hub:<repo>").
Files = dict[str, tuple[Any, str]]


def _read(path: Path, **kwargs: Any) -> datasets.Dataset:
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


def _unknownbench(bench: str, folder: str, stem: str) -> tuple[tuple[str, ...], Callable[[Files], list[dict]]]:
    """UnknownBench's answerable / unanswerable file pair: (files, reader)."""
    files = (f"{folder}/{stem}_answerable.json", f"{folder}/{stem}_unanswerable.json")

    def read(raw: Files) -> list[dict]:
        rows = []
        for f, unans in zip(files, (0, 1), strict=True):
            data, where = raw[f]
            for r in data:
                label = r.get("label")
                rows.append(_row(bench, r["prompt"], unans, label if isinstance(label, list) else [], where=where))
        return rows

    return files, read


def _kuq(raw: Files) -> list[dict]:
    data, where = raw["kuq/knowns_unknowns.jsonl"]
    # Unknown rows' "answer" are crowd explanations of the uncertainty, not gold answers.
    return [_row("kuq", r["question"], int(bool(r["unknown"])), [] if r["unknown"] else r["answer"], where=where)
            for r in data]


def _selfaware(raw: Files) -> list[dict]:
    data, where = raw["selfaware/SelfAware.json"]
    return [_row("selfaware", r["question"], int(not r["answerable"]), r["answer"] or [], where=where) for r in data]


def _puqa(raw: Files) -> list[dict]:
    data, where = raw["alignment_for_honesty/puqa.jsonl"]
    return [_row("puqa", r["question"], 1, r["authors"], where=where) for r in data]


def _pkqa(raw: Files) -> list[dict]:
    data, where = raw["alignment_for_honesty/pkqa_13b.jsonl"]
    return [_row("pkqa", r["question"], 0, [r["answer"]], where=where) for r in data]


def _nonambigqa(raw: Files) -> list[dict]:
    data, where = raw["alignment_for_honesty/nonambigqa.jsonl"]
    return [_row("nonambigqa", r["question"], 0, r["answers"], where=where) for r in data]


def _general(raw: Files) -> list[dict]:
    data, where = raw["general/general.jsonl"]
    return [_row("general", r["question"], int(r["unanswerable"]), r["answers"] or [], where=where) for r in data]


def _catalog(raw: Files) -> list[dict]:
    data, where = raw["catalog/catalog.jsonl"]
    return [_row("catalog", r["question"], -1, [r["answer"]], where=where) for r in data]


def _hotpotqa(raw: Files) -> list[dict]:
    data, where = raw["hotpotqa/hotpot_dev_v1_simplified.json"]
    return [_row("hotpotqa", r["question"], -1, [r["answer"]], where=where) for r in data]


def _triviaqa(raw: Files) -> list[dict]:
    data, where = raw["triviaqa/triviaqa_sm_sub.jsonl"]
    rows = []
    for r in data:
        q = re.sub(r"^Question:\s*", "", r["context"]).rsplit("\nAnswer:", 1)[0]
        rows.append(_row("triviaqa", q, -1, [r["answer"], *r["aliases"]], where=where))
    return rows


def _medmcqa(raw: Files) -> list[dict]:
    data, where = raw["medmcqa/dev.json"]
    rows = []
    for r in data:
        if not 1 <= int(r["cop"]) <= 4:
            raise DataError(f"{where}: id {r['id']}: cop {r['cop']} is not an option number 1-4")
        opts = [r["opa"], r["opb"], r["opc"], r["opd"]]
        rows.append(_row("medmcqa", r["question"], -1, [opts[int(r["cop"]) - 1]], opts, int(r["cop"]) - 1,
                         where=where))
    return rows


# ---------------------------------------------------------------------------------------------
# The benchmark table: files, readers, where to get them, licences.


@dataclass(frozen=True)
class HubSource:
    """A Hugging Face Hub dataset whose rows carry the fields the benchmark's reader uses:
    ``datasets.load_dataset(repo, config, split=split, data_files=data_files)``."""

    repo: str
    split: str
    config: str | None = None
    data_files: str | None = None


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its files (relative to a data folder, named as in the release), the reader of
    their rows, where to download them (``url``, pinned to a commit where the source is a
    repository) and under which licence, the row count of the full files, whether a subset ships in
    ``hcnr_jax/bundled/data``, and its Hugging Face Hub source if one is known."""

    name: str
    kind: str  # "refusal" (answerable + unanswerable), "honesty" (Alignment for Honesty), "task"
    files: tuple[str, ...]
    read: Callable[[Files], list[dict]]
    url: str
    licence: str
    rows: int
    shipped: bool = False
    hub: HubSource | None = None
    json_field: str | None = None  # the rows are the list under this key of one JSON object
    # Alignment-for-Honesty set type: "prior_unknown" (PUQA: prudence = idk rate), "prior_known"
    # (PKQA: over-conservativeness = idk rate), "" (scored relative to a reference model).
    a4h_set: str = ""
    # Every row is in the evaluation split (no calibration pool): sets written to test a model, never trained on.
    evaluation_only: bool = False


_UB = "https://github.com/genglinliu/UnknownBench/tree/7283e4218b9146275d3069306927c3289fad576a/data"
_A4H = ("https://github.com/GAIR-NLP/alignment-for-honesty/tree/5357ef8700e12b506e1e18685eded3fb082940fe/"
        "data/evaluation_data")
_NO_LICENCE = "none stated by the source repository"

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("falseqa", "refusal", *_unknownbench("falseqa", "falseqa/unknownbench_version", "FalseQA"),
              url=f"{_UB}/FalseQA (UnknownBench's repackaging of thunlp/FalseQA)", licence=_NO_LICENCE, rows=4730),
    Benchmark("nec", "refusal", *_unknownbench("nec", "nec", "NEC"), url=f"{_UB}/NEC", licence=_NO_LICENCE,
              rows=4150),
    Benchmark("refunq", "refusal", *_unknownbench("refunq", "refunq", "RefuNQ"), url=f"{_UB}/RefuNQ",
              licence=f"{_NO_LICENCE} (Natural Questions upstream: CC BY-SA 3.0)", rows=4439),
    Benchmark("kuq", "refusal", ("kuq/knowns_unknowns.jsonl",), _kuq,
              url="https://huggingface.co/datasets/amayuelas/KUQ", licence="MIT", rows=6884, shipped=True,
              hub=HubSource("amayuelas/KUQ", "train", data_files="knowns_unknowns.jsonl")),
    Benchmark("selfaware", "refusal", ("selfaware/SelfAware.json",), _selfaware,
              url="https://github.com/yinzhangyue/SelfAware/tree/f0bad1ff77bd42fc4eb2360281ed646c7bb7bd0c/data",
              licence="CC BY-SA 4.0, research use (code: Apache-2.0)", rows=3369, shipped=True,
              json_field="example"),
    Benchmark("general", "refusal", ("general/general.jsonl",), _general,
              url="hcnr_jax/bundled/data/general (written for this project)", licence="Apache-2.0 (this project)",
              rows=90, shipped=True, evaluation_only=True),
    Benchmark("puqa", "honesty", ("alignment_for_honesty/puqa.jsonl",), _puqa, url=_A4H, licence=_NO_LICENCE,
              rows=1000, a4h_set="prior_unknown"),
    Benchmark("pkqa", "honesty", ("alignment_for_honesty/pkqa_13b.jsonl",), _pkqa, url=_A4H, licence=_NO_LICENCE,
              rows=1000, a4h_set="prior_known"),
    Benchmark("nonambigqa", "honesty", ("alignment_for_honesty/nonambigqa.jsonl",), _nonambigqa, url=_A4H,
              licence=_NO_LICENCE, rows=5325),
    Benchmark("hotpotqa", "task", ("hotpotqa/hotpot_dev_v1_simplified.json",), _hotpotqa,
              url="https://github.com/ysymyth/ReAct/tree/6bdb3a1fd38b8188fc7ba4102969fe483df8fdc9/data",
              licence="CC BY-SA 4.0 (HotpotQA); MIT (ReAct's simplified file)", rows=7405, shipped=True,
              hub=HubSource("hotpotqa/hotpot_qa", "validation", config="distractor")),
    Benchmark("medmcqa", "task", ("medmcqa/dev.json",), _medmcqa,
              url="https://github.com/medmcqa/medmcqa (dev.json of the official release)",
              licence="MIT (the Hub card says Apache-2.0)", rows=4183, shipped=True),
    Benchmark("catalog", "task", ("catalog/catalog.jsonl",), _catalog,
              url="hcnr_jax/bundled/data/catalog (generated for this project: hcnr_jax/data/catalog.py)",
              licence="Apache-2.0 (this project)", rows=3000, shipped=True),
    Benchmark("triviaqa", "task", ("triviaqa/triviaqa_sm_sub.jsonl",), _triviaqa,
              url="https://github.com/mosaicml/llm-foundry/tree/8c8dd48f72168c5d51e2f7b151595892a8fba43d/"
                  "scripts/eval/local_data/world_knowledge",
              licence="Apache-2.0 (llm-foundry's subsample); TriviaQA's own terms unstated", rows=3000),
)}
REFUSAL_BENCHMARKS = ("falseqa", "nec", "refunq", "kuq", "selfaware")


# ---------------------------------------------------------------------------------------------
# Where a benchmark's files are found.


def _benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def user_data_dir() -> Path:
    """``<user cache>/data``: where downloaded benchmark files go by default (not created). Files
    downloaded into the older ``.../hcnr_jax/data`` are read from there until the new one exists."""
    new = user_cache_dir() / "data"
    old = legacy_cache_dir()
    if not new.exists() and old is not None and (old / "data").is_dir():
        return old / "data"
    return new


def search_path(data_dir: str | Path | None = None) -> list[tuple[str, Path]]:
    """The folders searched, in order, as (label, folder): ``data_dir``, ``$HCNR_DATA_DIR``, the
    user data folder. (The shipped subsets come last, for the benchmarks that have one.)"""
    out = []
    if data_dir is not None and str(data_dir) != HUB:
        out.append(("--data-dir", Path(data_dir).expanduser()))
    if os.environ.get(ENV_VAR):
        out.append((f"${ENV_VAR}", Path(os.environ[ENV_VAR]).expanduser()))
    out.append(("user data folder", user_data_dir()))
    return out


@dataclass(frozen=True)
class Location:
    """Where a benchmark is read from: ``source`` is a `search_path` label, "shipped subset" or
    "hub"; ``root`` the folder (None for the Hub)."""

    source: str
    root: Path | None

    def describe(self) -> str:
        """For reports: the source, with the folder (as `portable_path` writes it) where one was searched."""
        if self.root is None or self.source == SHIPPED:
            return self.source
        return f"{portable_path(self.root)} ({self.source})"


def missing_message(b: Benchmark, searched: list[str]) -> str:
    where = "; ".join(searched) or "nowhere"
    return (f"benchmark {b.name!r}: {', '.join(b.files)} not found (looked in: {where}; no subset of it is "
            f"shipped). Download from {b.url} (licence: {b.licence}) and place the file(s) at those paths "
            f"under a data folder: pass --data-dir DIR, set ${ENV_VAR}, or use {user_data_dir()}"
            + (f", or pass --data-dir {HUB} to load {b.hub.repo} from the Hugging Face Hub" if b.hub else "")
            + ". `hcnr data` lists every benchmark.")


def locate(name: str, data_dir: str | Path | None = None) -> Location:
    """Where ``name`` is read from (see the module docstring); `DataError` if nowhere."""
    b = _benchmark(name)
    if data_dir is not None and str(data_dir) == HUB:
        if b.hub is None:
            raise DataError(f"benchmark {name!r}: no Hugging Face Hub source is known; download "
                            f"{', '.join(b.files)} from {b.url} (licence: {b.licence}) into a data folder")
        return Location("hub", None)
    searched = []
    for label, root in search_path(data_dir):
        if label == "--data-dir" and not root.is_dir():
            raise DataError(f"--data-dir {root}: not a directory")
        if all((root / f).is_file() for f in b.files):
            return Location(label, root)
        searched.append(f"{root} ({label})")
    if b.shipped:
        return Location(SHIPPED, BUNDLED_DATA)
    raise DataError(missing_message(b, searched))


def available(names: Iterable[str], data_dir: str | Path | None = None) -> list[str]:
    """The benchmarks of ``names`` whose files are found (`locate`), in order. A ``data_dir`` that
    is not a directory is an error, not a reason to skip everything."""
    if data_dir is not None and str(data_dir) != HUB and not Path(data_dir).expanduser().is_dir():
        raise DataError(f"--data-dir {data_dir}: not a directory")
    out = []
    for n in names:
        try:
            locate(n, data_dir)
        except DataError:
            continue
        out.append(n)
    return out


def _hub_files(b: Benchmark) -> Files:
    """The benchmark's rows from the Hugging Face Hub (explicit opt-in: ``--data-dir hub``)."""
    h = b.hub
    assert h is not None and len(b.files) == 1
    try:
        ds = datasets.load_dataset(h.repo, h.config, split=h.split, data_files=h.data_files)
    except Exception as e:  # offline, unknown repo, changed layout: all end here
        raise DataError(f"benchmark {b.name!r}: cannot load {h.repo} from the Hugging Face Hub "
                        f"({type(e).__name__}: {e}). Offline? Download {b.files[0]} from {b.url} into a "
                        f"data folder instead (see `hcnr data`)") from e
    return {b.files[0]: (ds, f"hub:{h.repo}")}


def raw_rows(name: str, data_dir: str | Path | None = None) -> list[dict]:
    """The rows of benchmark ``name`` in the common schema, before de-duplication and splitting."""
    b = _benchmark(name)
    loc = locate(name, data_dir)
    if loc.root is None:
        raw = _hub_files(b)
    else:
        kwargs = {"field": b.json_field} if b.json_field else {}
        raw = {f: (_read(loc.root / f, **kwargs), str(loc.root / f)) for f in b.files}
        if loc.source == SHIPPED:
            log.info("%s: using the shipped subset (full files: %s)", name, b.url)
    return b.read(raw)


def load_benchmark(name: str, data_dir: str | Path | None = None,
                   fraction: float = CALIBRATION_FRACTION) -> datasets.Dataset:
    """All rows of benchmark ``name`` in the common schema, with their ``split`` column.

    ``data_dir``: the first folder searched (or "hub"); see the module docstring. Duplicated
    questions (after normalisation) are kept once: the first occurrence wins.
    """
    rows = raw_rows(name, data_dir)
    seen: set[str] = set()
    unique = []
    for r in rows:
        if r["id"] not in seen:
            seen.add(r["id"])
            split = split_of(name, r["question"], fraction)
            unique.append({**r, "split": split})
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
