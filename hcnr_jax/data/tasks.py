"""The user's own prompt/response files, beside the benchmarks: an evaluation task and in-context
demonstrations.

The task, `hcnr eval --task-data FILE`: FILE is the JSONL format every other command reads, one
``{"prompt": ..., "response": ...}`` per line: the prompt is asked (chat template, greedy), and the
response is the gold answer. Each row is scored like a built-in open task (docs/evaluation.md):
accuracy by contained match (the normalised gold response appears in the normalised generated one)
and by exact match, and the mean per-token log-likelihood of the gold response given the prompt (a
forward pass, no generation). In records and tables the set is named ``task:<file stem>``.

Demonstrations, `hcnr eval --demos FILE|default`: ``(prompt, response)`` pairs shown before each
question (`load_demos`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hcnr_jax.data.jsonl import read_jsonl
from hcnr_jax.embedded import BUNDLED
from hcnr_jax.errors import DataError

PREFIX = "task:"
DEFAULT_DEMOS = "default"  # `hcnr eval --demos default`: the shipped in-context demonstrations
DEMOS_FILE = BUNDLED / "demos.jsonl"


def name_of(path: str | Path) -> str:
    """``task:<stem>``: how the set is named in records, metrics and tables."""
    return PREFIX + Path(path).stem


def is_task_data(bench: str) -> bool:
    return bench.startswith(PREFIX)


def load_rows(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The evaluation rows of ``path`` (the first ``limit`` when given), in the runner's row format.
    A line that is not an object with non-empty string ``prompt`` and ``response`` is a
    `DataError` naming the file, the line and the field."""
    rows = []
    name = name_of(path)
    for line, rec in read_jsonl(path):
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{line}: expected a JSON object with \"prompt\" and \"response\"")
        for field in ("prompt", "response"):
            value = rec.get(field)
            if not isinstance(value, str) or not value.strip():
                got = "missing" if field not in rec else f"{type(value).__name__} {value!r}"[:60]
                raise DataError(f"{path}:{line}: field \"{field}\" must be a non-empty string (got {got})")
        rows.append(dict(id=f"{name}#{len(rows)}", benchmark=name, question=rec["prompt"], answers=[rec["response"]],
                         unanswerable=None, options=[], gold=None, line=line))
        if limit is not None and len(rows) == limit:
            break
    return rows


def load_demos(source: str | Path) -> tuple[tuple[str, str], ...]:
    """In-context demonstrations for `hcnr eval --demos`: ``(prompt, response)`` pairs, in file
    order, from a JSONL file of ``{"prompt": ..., "response": ...}`` rows (other keys are ignored),
    or ``"default"``: the shipped set (``hcnr_jax/bundled/demos.jsonl``). A missing or empty file,
    invalid JSON, or a row without both fields as non-empty strings is a `DataError` naming the
    file and line."""
    path = DEMOS_FILE if str(source) == DEFAULT_DEMOS else Path(source)
    try:
        rows = read_jsonl(path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    demos = []
    for line, rec in rows:
        where = f"{path}:{line}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object with 'prompt' and 'response', got {type(rec).__name__}")
        for key in ("prompt", "response"):
            if key not in rec:
                raise DataError(f"{where}: missing field '{key}' (a demonstration needs 'prompt' and 'response')")
            if not isinstance(rec[key], str):
                raise DataError(f"{where}: field '{key}' must be a string, got {type(rec[key]).__name__}")
            if not rec[key].strip():
                raise DataError(f"{where}: field '{key}' is empty")
        demos.append((rec["prompt"], rec["response"]))
    return tuple(demos)
