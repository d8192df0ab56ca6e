"""JSON Lines files, the format every command reads and writes: one JSON value per line."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hcnr_jax.errors import DataError
from hcnr_jax.io import atomic_write_text


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, parsed object) of each non-blank line; ``DataError`` names file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    records = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{i}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                records.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from None
    if not records:
        raise DataError(f"{path}: empty data file")
    return records


def write_jsonl(samples: Sequence[dict], path: str | Path, keys: Sequence[str] | None = None) -> None:
    """Write ``samples`` as JSON Lines (atomically), keeping only ``keys`` when given."""
    rows = samples if keys is None else [{k: s[k] for k in keys} for s in samples]
    atomic_write_text(Path(path), "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in rows))
