"""The user's own task as an evaluation set: `hcnr eval --task-data FILE`.

FILE is the JSONL format every other command reads, one ``{"prompt": ..., "response": ...}`` per
line: the prompt is asked (chat template, greedy), and the response is the gold answer. Each row is
scored like a built-in open task (docs/evaluation.md): accuracy by contained match (the normalised
gold response appears in the normalised generated one) and by exact match, and the mean per-token
log-likelihood of the gold response given the prompt (a forward pass, no generation). In records
and tables the set is named ``task:<file stem>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hcnr_jax.data import read_jsonl
from hcnr_jax.errors import DataError

PREFIX = "task:"


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
